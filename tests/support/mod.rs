//! Test support: the real OAuth server (oidc-provider over TLS with a throwaway CA) and an
//! in-memory stand-in for the Kubernetes API that keeps what the operator writes, and a token
//! endpoint that answers as told.

#![allow(dead_code)]

pub mod fake_api;
pub mod fake_endpoint;
pub mod oauth_server;
