//! Test support: the real OAuth server (oidc-provider over TLS with a throwaway CA) and an
//! in-memory stand-in for the Kubernetes API that keeps what the operator writes.

#![allow(dead_code)]

pub mod fake_api;
pub mod oauth_server;
