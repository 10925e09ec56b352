//! The token endpoint client: one request type for every grant, a trait the controller calls (so
//! scenario tests can replace the network), and the HTTP implementation with client-secret
//! fallback (secrets are tried in order, the next one after an `invalid_client`).

use chrono::Duration;
use futures::future::BoxFuture;
use oauth2::basic::{BasicClient, BasicTokenResponse};
use oauth2::{AuthType, ClientId, ClientSecret, RequestTokenError, TokenResponse, TokenUrl};
use secrecy::{ExposeSecret, SecretString};

use super::grants::client_credentials::ClientCredentialsGrant;
use super::grants::refresh_token::RefreshTokenGrant;
use super::grants::{Grant, GrantError, TokenClient};
use super::http::{Http, HttpClients, Recorded, check_endpoint};
use crate::api::ClientAuthMethod;
use crate::policy::Reason;
use crate::policy::classify::{UpstreamError, classify, reduce_description};

/// What to exchange.
#[derive(Clone, Debug)]
pub enum GrantInput {
    /// A refresh token.
    RefreshToken(SecretString),
    /// Client credentials.
    ClientCredentials,
}

/// One token request, whatever the grant.
#[derive(Clone, Debug)]
pub struct TokenRequest {
    /// Token endpoint (https).
    pub token_url: String,
    /// Client id.
    pub client_id: String,
    /// Client secrets, tried in order; empty for a public client.
    pub client_secrets: Vec<SecretString>,
    /// How to send the secret.
    pub method: ClientAuthMethod,
    /// Extra trust roots.
    pub ca_bundle: Option<String>,
    /// Scopes to request.
    pub scopes: Vec<String>,
    /// The grant.
    pub grant: GrantInput,
}

/// A successful token response.
#[derive(Clone, Debug)]
pub struct TokenSet {
    /// The access token.
    pub access_token: SecretString,
    /// A (possibly rotated) refresh token.
    pub refresh_token: Option<SecretString>,
    /// Lifetime, when the server said.
    pub expires_in: Option<Duration>,
    /// Granted scopes, when the server said.
    pub scopes: Option<Vec<String>>,
}

/// The token endpoint, as the controller sees it.
pub trait TokenEndpoint: Send + Sync {
    /// Sends the request; failures are reduced to [`UpstreamError`].
    fn request<'a>(&'a self, request: &'a TokenRequest) -> BoxFuture<'a, Result<TokenSet, UpstreamError>>;
}

/// The real token endpoint over HTTPS.
#[derive(Clone, Debug, Default)]
pub struct HttpTokenEndpoint {
    clients: HttpClients,
}

impl HttpTokenEndpoint {
    /// A token endpoint client sharing `clients`.
    pub fn new(clients: HttpClients) -> Self {
        Self { clients }
    }

    async fn request_once(
        &self,
        request: &TokenRequest,
        secret: Option<&SecretString>,
    ) -> Result<TokenSet, UpstreamError> {
        let config_error = |m: String| UpstreamError { transport: Some(m), ..Default::default() };
        let url = check_endpoint(&request.token_url).map_err(config_error)?;
        let http_client = self.clients.get(request.ca_bundle.as_deref()).map_err(|e| config_error(e.to_string()))?;
        let http = Http::new(http_client);
        let mut client: TokenClient =
            BasicClient::new(ClientId::new(request.client_id.clone())).set_token_uri(TokenUrl::from_url(url));
        if let Some(secret) = secret {
            client = client.set_client_secret(ClientSecret::new(secret.expose_secret().to_owned()));
        }
        client = client.set_auth_type(match request.method {
            ClientAuthMethod::ClientSecretBasic => AuthType::BasicAuth,
            _ => AuthType::RequestBody,
        });
        let result = match &request.grant {
            GrantInput::RefreshToken(rt) => {
                RefreshTokenGrant { refresh_token: rt.clone() }.exchange(&client, &http, &request.scopes).await
            }
            GrantInput::ClientCredentials => ClientCredentialsGrant.exchange(&client, &http, &request.scopes).await,
        };
        result.map(token_set).map_err(|e| upstream(e, http.recorded()))
    }
}

impl TokenEndpoint for HttpTokenEndpoint {
    fn request<'a>(&'a self, request: &'a TokenRequest) -> BoxFuture<'a, Result<TokenSet, UpstreamError>> {
        Box::pin(async move {
            if request.client_secrets.is_empty() {
                return self.request_once(request, None).await;
            }
            let mut last = UpstreamError::default();
            for (i, secret) in request.client_secrets.iter().enumerate() {
                match self.request_once(request, Some(secret)).await {
                    Ok(t) => {
                        if i > 0 {
                            tracing::warn!(
                                index = i,
                                "an earlier client secret was rejected; the next one in clientSecretRefs worked"
                            );
                        }
                        return Ok(t);
                    }
                    Err(e) => {
                        let reason = classify(&e).reason;
                        if !matches!(reason, Reason::ClientCredentialsInvalid | Reason::ClientSecretExpired) {
                            return Err(e);
                        }
                        last = e;
                    }
                }
            }
            Err(last)
        })
    }
}

fn token_set(response: BasicTokenResponse) -> TokenSet {
    TokenSet {
        access_token: SecretString::from(response.access_token().secret().to_owned()),
        refresh_token: response.refresh_token().map(|t| SecretString::from(t.secret().to_owned())),
        expires_in: response.expires_in().and_then(|d| Duration::from_std(d).ok()),
        scopes: response.scopes().map(|s| s.iter().map(|x| x.to_string()).collect()),
    }
}

fn upstream(err: GrantError, recorded: Recorded) -> UpstreamError {
    let base = UpstreamError { status: recorded.status, retry_after: recorded.retry_after, ..Default::default() };
    match err {
        RequestTokenError::ServerResponse(e) => UpstreamError {
            error: Some(e.error().as_ref().to_owned()),
            description: e.error_description().map(|d| reduce_description(d)),
            ..base
        },
        RequestTokenError::Request(t) => UpstreamError { transport: Some(t.0), ..base },
        // The body is dropped: it may hold a token the parser did not understand.
        RequestTokenError::Parse(_, _) => {
            UpstreamError { description: Some("the response is not a valid token response".into()), ..base }
        }
        RequestTokenError::Other(m) => UpstreamError { description: Some(reduce_description(&m)), ..base },
    }
}
