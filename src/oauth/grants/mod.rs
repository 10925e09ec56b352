//! The grants, one module each, behind one trait: given a configured oauth2 client and an HTTP
//! function, exchange something for a token response.

pub mod client_credentials;
pub mod refresh_token;

use std::future::Future;

use oauth2::basic::{BasicErrorResponse, BasicTokenResponse};
use oauth2::{EndpointNotSet, EndpointSet, RequestTokenError, Scope};

use super::http::{Http, TransportError};

/// An oauth2 client with a token endpoint.
pub type TokenClient =
    oauth2::basic::BasicClient<EndpointNotSet, EndpointNotSet, EndpointNotSet, EndpointNotSet, EndpointSet>;

/// What a grant request may fail with, before classification.
pub type GrantError = RequestTokenError<TransportError, BasicErrorResponse>;

/// One OAuth grant.
pub trait Grant: Send + Sync {
    /// Asks the token endpoint for a token.
    fn exchange<'a>(
        &'a self,
        client: &'a TokenClient,
        http: &'a Http,
        scopes: &'a [String],
    ) -> impl Future<Output = Result<BasicTokenResponse, GrantError>> + Send + 'a;
}

fn scopes(s: &[String]) -> impl Iterator<Item = Scope> + '_ {
    s.iter().cloned().map(Scope::new)
}
