//! mail-oauth-operator: obtains, refreshes and publishes OAuth 2.0 tokens for mailboxes.
//!
//! Layers, from data to I/O: [`api`] (types) → [`policy`] (pure decisions) → [`oauth`] (token
//! endpoint client) → [`controller`] (Kubernetes I/O) → [`server`] (HTTP endpoints).

pub mod api;
pub mod policy;
