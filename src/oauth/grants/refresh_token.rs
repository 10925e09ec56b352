//! The refresh token grant (RFC 6749 §6): the stored or imported refresh token for a new access
//! token, and often a rotated refresh token.

use oauth2::RefreshToken;
use oauth2::basic::BasicTokenResponse;
use secrecy::{ExposeSecret, SecretString};

use super::{Grant, GrantError, TokenClient, scopes};
use crate::oauth::http::Http;

/// Refresh with this token.
pub struct RefreshTokenGrant {
    /// The refresh token.
    pub refresh_token: SecretString,
}

impl Grant for RefreshTokenGrant {
    async fn exchange(
        &self,
        client: &TokenClient,
        http: &Http,
        requested: &[String],
    ) -> Result<BasicTokenResponse, GrantError> {
        let token = RefreshToken::new(self.refresh_token.expose_secret().to_owned());
        client.exchange_refresh_token(&token).add_scopes(scopes(requested)).request_async(http).await
    }
}
