//! The client credentials grant (RFC 6749 §4.4): an app-only token.

use oauth2::basic::BasicTokenResponse;

use super::{Grant, GrantError, TokenClient, scopes};
use crate::oauth::http::Http;

/// App-only token for the client itself.
pub struct ClientCredentialsGrant;

impl Grant for ClientCredentialsGrant {
    async fn exchange(
        &self,
        client: &TokenClient,
        http: &Http,
        requested: &[String],
    ) -> Result<BasicTokenResponse, GrantError> {
        client.exchange_client_credentials().add_scopes(scopes(requested)).request_async(http).await
    }
}
