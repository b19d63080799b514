//! xoauth2-proxy: legacy mail clients log in with a username and password;
//! the proxy authenticates upstream with SASL XOAUTH2 and splices the streams.
//!
//! # Layout
//!
//! One login, in the order it touches the modules:
//!
//! - [`server`] binds the listeners and accepts a connection: admission
//!   limits ([`server::limits`]), local TLS, one task per connection.
//! - [`protocol`] is pure: the connection's pre-auth dialogue is one
//!   [`protocol::PreAuth`] machine with a protocol's [`protocol::Dialect`]
//!   (framing in [`protocol::line`], replies from the one table in
//!   [`protocol::reply`]); SASL PLAIN and LOGIN come from [`sasl`].
//! - [`accounts`] checks the username and password (argon2id).
//! - [`token`] hands out a cached access token for the account's identity,
//!   refreshing it from Entra ID ([`token::entra`]) and keeping refresh tokens
//!   in the encrypted [`token::store`].
//! - [`upstream`] connects to the mail server, runs the protocol's
//!   [`protocol::Dialogue`] (TLS, `AUTH XOAUTH2`) and returns the stream.
//! - [`splice`] joins the two streams, untouched, until either side closes.
//!
//! Beside the path: [`config`] (raw serde layer, `${VAR}` expansion,
//! validation; imports nothing above [`protocol`] and [`secret`]),
//! [`preflight`] (the files a config names), [`tls`], [`secret`] (the
//! redacting `Secret<T>`), [`text`], [`fsutil`], [`telemetry`], [`doctor`]
//! (`check --online`'s diagnosis of the path above, and the `setup` guide),
//! [`state`] (what several replicas share in Redis: tokens, the refresh lock,
//! session leases, failure counts), [`metrics`] (the counters the path feeds)
//! and [`admin`] (the HTTP listener serving them with the health checks), and
//! [`cli`] (one module per subcommand).
#![forbid(unsafe_code)]

pub mod accounts;
pub mod admin;
pub mod cli;
pub mod config;
pub mod doctor;
pub mod fsutil;
pub mod metrics;
pub mod preflight;
pub mod protocol;
pub mod sasl;
pub mod secret;
pub mod server;
pub mod service;
pub mod splice;
pub mod state;
pub mod telemetry;
pub mod text;
pub mod tls;
pub mod token;
pub mod upstream;
pub mod verifier;
