//! Test doubles for xoauth2-proxy: a certificate authority made at test time,
//! a fake Microsoft Entra token endpoint, and fake IMAP/POP3/SMTP servers that
//! accept only XOAUTH2 with a token that endpoint issued.
//!
//! Deliberately independent of the proxy's own code: the fakes decode XOAUTH2
//! and speak the protocols with their own (simple) implementations, so a bug in
//! the proxy cannot be mirrored by the thing that checks it.
//!
//! A test double that cannot do its job must fail the test at once and
//! loudly, so here (unlike in the proxy) panicking is the error path.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod certs;
pub mod http;
pub mod mailbox;
pub mod token;
pub mod upstream;

pub use certs::TestPki;
pub use mailbox::Mailbox;
pub use token::{DeviceOutcome, Fault, TokenServer, TokenShape};
pub use upstream::{AfterAuth, ExchangeFault, FakeUpstream, Proto, Stall, UpstreamOptions, UpstreamTls};
