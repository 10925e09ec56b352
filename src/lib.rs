//! mail-oauth-operator: obtains, refreshes and publishes OAuth 2.0 tokens for mailboxes.
//!
//! Layers, from data to I/O: [`api`] (types) → [`policy`] (pure decisions) → [`oauth`] (token
//! endpoint client) → [`controller`] (Kubernetes I/O) → [`server`] (HTTP endpoints); at the top,
//! [`cli`] (the operator's command line) and [`plugin`] (the `kubectl mailoauth` plugin).

#![cfg_attr(test, allow(clippy::arithmetic_side_effects))]

pub mod api;
pub mod cli;
pub mod controller;
pub mod error;
pub mod mail;
pub mod metrics;
pub mod oauth;
pub mod plugin;
pub mod policy;
pub mod relay;
pub mod runtime;
pub mod server;
#[cfg(any(test, feature = "testing"))]
#[doc(hidden)]
pub mod testing;

pub use error::{Error, Result};
