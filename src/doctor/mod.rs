//! The Entra and Exchange doctor behind `check --online`, and the `setup`
//! guide: from "it fails" to the exact fix, in the admin's own ids.
//!
//! # Layout
//! - [`report`]: a check per step; text (one line per step, the fix indented)
//!   and JSON; the exit status
//! - [`commands`]: the ids fixes are written with; PowerShell lines and Entra
//!   admin center paths, shared with [`setup`]
//! - [`endpoint`], [`entra`], [`claims`], [`exchange`]: pure judges of steps
//!   1 to 4 (the discovery answer, Entra's refusals, the token's claims,
//!   Exchange's answers), unit-tested as tables
//! - `login`: step 4's I/O, the one function that knows the upstream login API
//! - `driver`: runs the steps in order and stops a chain at its first failure
//! - [`setup`]: the guide for a new registration

pub mod claims;
pub mod commands;
mod driver;
pub mod endpoint;
pub mod entra;
pub mod exchange;
mod login;
pub mod report;
pub mod setup;

pub use driver::diagnose;
pub use report::{Check, Diagnosis, Fix, Report, Status, Step};
