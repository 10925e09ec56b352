//! The OAuth 2.0 client: provider presets as data, provider resolution and discovery, one module
//! per grant, and the token endpoint behind the [`TokenEndpoint`] trait.

pub mod client;
pub mod discovery;
pub mod exchange;
pub mod grants;
pub mod http;
pub mod presets;
pub mod provider;
pub mod response;

pub use client::{GrantInput, HttpTokenEndpoint, Rejected, TokenEndpoint, TokenRequest, TokenSet};
