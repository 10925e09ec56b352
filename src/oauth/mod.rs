//! The OAuth 2.0 client: provider presets as data, provider resolution and discovery, one module
//! per grant behind one flow trait, and the authorization server behind the [`TokenEndpoint`] trait.

pub mod assertion;
pub mod authorize;
pub mod client;
pub mod discovery;
pub mod exchange;
pub mod grants;
pub mod http;
pub mod presets;
pub mod provider;
#[cfg(test)]
mod provider_answers;
pub mod response;

pub use client::{
    Client, ClientAuth, DeviceCode, DeviceRequest, GrantCall, HttpTokenEndpoint, Param, Rejected, RevokeRequest,
    TokenEndpoint, TokenRequest, TokenSet, UserinfoRequest,
};
