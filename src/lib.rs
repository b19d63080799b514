//! xoauth2-proxy: legacy mail clients log in with a username and password;
//! the proxy authenticates upstream with SASL XOAUTH2 and splices the streams.
#![forbid(unsafe_code)]
// The product must not panic on input; tests may unwrap freely.
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

pub mod accounts;
pub mod cli;
pub mod config;
pub mod fsutil;
pub mod preflight;
pub mod protocol;
pub mod sasl;
pub mod secret;
pub mod server;
pub mod splice;
pub mod telemetry;
pub mod text;
pub mod tls;
pub mod token;
pub mod upstream;
