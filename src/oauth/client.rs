//! The token endpoint client: one request type for every grant, a trait the controller calls (so
//! scenario tests can replace the network), and the HTTP implementation with client-secret
//! fallback (secrets are tried in order, the next one after an `invalid_client`).

use chrono::Duration;
use futures::future::BoxFuture;
use oauth2::basic::BasicClient;
use oauth2::{AuthType, ClientId, ClientSecret, TokenUrl};
use secrecy::{ExposeSecret, SecretString};

use super::grants::client_credentials::ClientCredentialsGrant;
use super::grants::refresh_token::RefreshTokenGrant;
use super::grants::{Grant, TokenClient};
use super::http::{Http, HttpClients, Recorded};
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
    /// Lifetime, when the server said (a positive number, at most a year).
    pub expires_in: Option<Duration>,
    /// Granted scopes, when the server said.
    pub scopes: Option<Vec<String>>,
}

/// A failed token request: what went wrong, and any refresh token the response carried anyway
/// (a 2xx body that is no usable token response may still rotate the refresh token, and that
/// token must be kept).
#[derive(Clone, Debug, Default)]
pub struct Rejected {
    /// The failure, reduced and scrubbed.
    pub error: UpstreamError,
    /// A refresh token found in an unusable response.
    pub refresh_token: Option<SecretString>,
}

impl From<UpstreamError> for Rejected {
    fn from(error: UpstreamError) -> Self {
        Self { error, refresh_token: None }
    }
}

/// The token endpoint, as the controller sees it.
pub trait TokenEndpoint: Send + Sync {
    /// Sends the request; failures are reduced to [`Rejected`].
    fn request<'a>(&'a self, request: &'a TokenRequest) -> BoxFuture<'a, Result<TokenSet, Rejected>>;
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

    async fn request_once(&self, request: &TokenRequest, secret: Option<&SecretString>) -> Result<TokenSet, Rejected> {
        let config_error = |m: String| Rejected::from(UpstreamError { transport: Some(m), ..Default::default() });
        let url = self.clients.policy().check_endpoint(&request.token_url).map_err(config_error)?;
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
        // oauth2 builds and sends the request; the answer is taken from what the recorder read,
        // not from oauth2's strict parse (see `oauth::response`).
        let _strict = match &request.grant {
            GrantInput::RefreshToken(rt) => {
                RefreshTokenGrant { refresh_token: rt.clone() }.exchange(&client, &http, &request.scopes).await
            }
            GrantInput::ClientCredentials => ClientCredentialsGrant.exchange(&client, &http, &request.scopes).await,
        };
        outcome(http.recorded(), &credentials(request))
    }
}

/// Every credential a request carries, for scrubbing provider text.
fn credentials(request: &TokenRequest) -> Vec<&str> {
    let mut out: Vec<&str> = request.client_secrets.iter().map(ExposeSecret::expose_secret).collect();
    if let GrantInput::RefreshToken(rt) = &request.grant {
        out.push(rt.expose_secret());
    }
    out
}

impl TokenEndpoint for HttpTokenEndpoint {
    fn request<'a>(&'a self, request: &'a TokenRequest) -> BoxFuture<'a, Result<TokenSet, Rejected>> {
        Box::pin(async move {
            if request.client_secrets.is_empty() {
                return self.request_once(request, None).await;
            }
            let mut last = Rejected::default();
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
                        let reason = classify(&e.error).reason;
                        if e.refresh_token.is_some()
                            || !matches!(reason, Reason::ClientCredentialsInvalid | Reason::ClientSecretExpired)
                        {
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

/// The answer to a token request, from what was recorded of the response.
pub fn outcome(recorded: Recorded, secrets: &[&str]) -> Result<TokenSet, Rejected> {
    let base = UpstreamError { status: recorded.status, retry_after: recorded.retry_after, ..Default::default() };
    if let Some(t) = recorded.transport {
        return Err(UpstreamError { transport: Some(t), ..base }.into());
    }
    let success = recorded.status.is_some_and(|s| (200..300).contains(&s));
    if success {
        let fields = recorded.token.unwrap_or_default();
        return match fields.access_token {
            Some(access_token) => Ok(TokenSet {
                access_token,
                refresh_token: fields.refresh_token,
                expires_in: fields.expires_in,
                scopes: fields.scopes,
            }),
            None => Err(Rejected {
                error: UpstreamError {
                    description: Some("the response is not a token response (no access_token)".into()),
                    ..base
                },
                refresh_token: fields.refresh_token,
            }),
        };
    }
    let fields = recorded.error.unwrap_or_default();
    let error = fields
        .error
        .map(|e| reduce_description(&e, secrets).chars().take(64).collect::<String>())
        .filter(|e| !e.is_empty());
    let description = fields.description.map(|d| reduce_description(&d, secrets)).filter(|d| !d.is_empty());
    Err(UpstreamError { error, description, ..base }.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oauth::response::{parse_error, parse_token};

    fn ok(body: &str) -> Result<TokenSet, Rejected> {
        outcome(Recorded { status: Some(200), token: parse_token(body.as_bytes()), ..Default::default() }, &[])
    }

    fn failed(status: u16, body: &str, secrets: &[&str]) -> UpstreamError {
        let recorded = Recorded { status: Some(status), error: parse_error(body.as_bytes()), ..Default::default() };
        outcome(recorded, secrets).err().map(|r| r.error).unwrap_or_default()
    }

    #[test]
    fn a_microsoft_token_response_keeps_lifetime_scopes_and_the_rotated_refresh_token() {
        let set = ok(r#"{"token_type":"Bearer","scope":"https://outlook.office365.com/IMAP.AccessAsUser.All https://outlook.office365.com/SMTP.Send","expires_in":4299,"ext_expires_in":4299,"access_token":"eyJ0eXAi","refresh_token":"0.AXoA-rotated"}"#).unwrap();
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
        let set = ok(
            r#"{"access_token":"ya29.a0","expires_in":3599,"scope":"https://mail.google.com/","token_type":"Bearer"}"#,
        )
        .unwrap();
        assert!(set.refresh_token.is_none(), "the caller keeps the refresh token it used");
        assert_eq!(set.expires_in, Some(Duration::seconds(3599)));
    }

    #[test]
    fn a_response_without_expiry_scope_or_token_type_is_read() {
        let set = ok(r#"{"access_token":"opaque"}"#).unwrap();
        assert_eq!(set.expires_in, None);
        assert_eq!(set.scopes, None);
    }

    #[test]
    fn a_2xx_without_an_access_token_still_hands_back_its_refresh_token() {
        let rejected = ok(r#"{"refresh_token":"rotated-but-broken","expires_in":"soon"}"#).err().unwrap();
        assert_eq!(rejected.refresh_token.as_ref().map(ExposeSecret::expose_secret), Some("rotated-but-broken"));
        assert_eq!(classify(&rejected.error).reason, Reason::TokenRequestFailed);
        assert!(!format!("{rejected:?}").contains("rotated-but-broken"));
    }

    #[test]
    fn a_token_set_never_shows_its_tokens_in_debug_output() {
        let set =
            ok(r#"{"access_token":"very-secret-at","refresh_token":"very-secret-rt","token_type":"Bearer"}"#).unwrap();
        let shown = format!("{set:?}");
        assert!(!shown.contains("very-secret"), "{shown}");
    }

    #[test]
    fn a_microsoft_error_body_is_reduced_to_its_code_and_first_description_line() {
        let body = r#"{"error":"invalid_grant","error_description":"AADSTS70008: The provided authorization code or refresh token has expired due to inactivity.\r\nTrace ID: 1f8e\r\nCorrelation ID: 9a2b\r\nTimestamp: 2026-11-21 10:00:00Z","error_codes":[70008],"timestamp":"2026-11-21 10:00:00Z","trace_id":"1f8e","correlation_id":"9a2b"}"#;
        let upstream = failed(400, body, &[]);
        assert_eq!(upstream.error.as_deref(), Some("invalid_grant"));
        assert_eq!(
            upstream.description.as_deref(),
            Some("AADSTS70008: The provided authorization code or refresh token has expired due to inactivity.")
        );
        assert_eq!(classify(&upstream).reason, Reason::ReauthorizationRequired);
    }

    #[test]
    fn an_endpoint_echoing_the_client_secret_gets_it_scrubbed_from_code_and_description() {
        let upstream = failed(
            401,
            r#"{"error":"invalid_client hunter2-secret","error_description":"client_secret=hunter2-secret is wrong"}"#,
            &["hunter2-secret"],
        );
        let shown = format!("{upstream:?} {}", classify(&upstream).message);
        assert!(!shown.contains("hunter2"), "{shown}");
    }

    #[test]
    fn an_html_error_page_keeps_only_the_status() {
        let upstream = failed(502, "<html><body>Bad gateway</body></html>", &[]);
        assert_eq!(
            (upstream.status, upstream.error.as_deref(), upstream.description.as_deref()),
            (Some(502), None, None)
        );
        assert_eq!(classify(&upstream).reason, Reason::TokenEndpointUnavailable);
    }
}
