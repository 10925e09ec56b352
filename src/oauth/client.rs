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

#[cfg(test)]
mod tests {
    use super::*;
    use oauth2::basic::BasicErrorResponse;

    fn parse(json: &str) -> TokenSet {
        token_set(serde_json::from_str::<BasicTokenResponse>(json).expect("a token response"))
    }

    #[test]
    fn a_microsoft_token_response_keeps_lifetime_scopes_and_the_rotated_refresh_token() {
        let set = parse(
            r#"{"token_type":"Bearer","scope":"https://outlook.office365.com/IMAP.AccessAsUser.All https://outlook.office365.com/SMTP.Send","expires_in":4299,"ext_expires_in":4299,"access_token":"eyJ0eXAi","refresh_token":"0.AXoA-rotated"}"#,
        );
        assert_eq!(set.access_token.expose_secret(), "eyJ0eXAi");
        assert_eq!(set.refresh_token.as_ref().map(ExposeSecret::expose_secret), Some("0.AXoA-rotated"));
        assert_eq!(set.expires_in, Some(Duration::seconds(4299)));
        assert_eq!(
            set.scopes,
            Some(vec![
                "https://outlook.office365.com/IMAP.AccessAsUser.All".to_owned(),
                "https://outlook.office365.com/SMTP.Send".to_owned()
            ])
        );
    }

    #[test]
    fn a_google_refresh_response_without_a_new_refresh_token_is_read() {
        let set = parse(
            r#"{"access_token":"ya29.a0","expires_in":3599,"scope":"https://mail.google.com/","token_type":"Bearer"}"#,
        );
        assert!(set.refresh_token.is_none(), "the caller keeps the refresh token it used");
        assert_eq!(set.expires_in, Some(Duration::seconds(3599)));
    }

    #[test]
    fn a_response_without_expiry_or_scope_and_a_lower_case_token_type_is_read() {
        let set = parse(r#"{"access_token":"opaque","token_type":"bearer"}"#);
        assert_eq!(set.expires_in, None);
        assert_eq!(set.scopes, None);
    }

    #[test]
    fn a_token_set_never_shows_its_tokens_in_debug_output() {
        let set = parse(r#"{"access_token":"very-secret-at","refresh_token":"very-secret-rt","token_type":"Bearer"}"#);
        let shown = format!("{set:?}");
        assert!(!shown.contains("very-secret"), "{shown}");
    }

    #[test]
    fn a_microsoft_error_body_is_reduced_to_its_code_and_first_description_line() {
        let body = r#"{"error":"invalid_grant","error_description":"AADSTS70008: The provided authorization code or refresh token has expired due to inactivity.\r\nTrace ID: 1f8e\r\nCorrelation ID: 9a2b\r\nTimestamp: 2026-11-21 10:00:00Z","error_codes":[70008],"timestamp":"2026-11-21 10:00:00Z","trace_id":"1f8e","correlation_id":"9a2b"}"#;
        let err: BasicErrorResponse = serde_json::from_str(body).expect("an error response");
        let upstream =
            upstream(RequestTokenError::ServerResponse(err), Recorded { status: Some(400), retry_after: None });
        assert_eq!(upstream.error.as_deref(), Some("invalid_grant"));
        assert_eq!(
            upstream.description.as_deref(),
            Some("AADSTS70008: The provided authorization code or refresh token has expired due to inactivity.")
        );
        assert_eq!(classify(&upstream).reason, Reason::ReauthorizationRequired);
    }

    #[test]
    fn an_unparseable_body_is_dropped_and_only_the_status_kept() {
        let mut json = serde_json::Deserializer::from_str(r#"{"access_token": 5}"#);
        let err =
            serde_path_to_error::deserialize::<_, BasicTokenResponse>(&mut json).expect_err("not a token response");
        let upstream = upstream(
            RequestTokenError::Parse(err, b"secret body".to_vec()),
            Recorded { status: Some(502), retry_after: None },
        );
        assert_eq!(upstream.status, Some(502));
        assert!(!format!("{upstream:?}").contains("secret body"));
        assert_eq!(classify(&upstream).reason, Reason::TokenEndpointUnavailable);
    }
}
