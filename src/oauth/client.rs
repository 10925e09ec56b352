//! The token endpoint client: one request shape for every grant (a `grant_type` and its
//! parameters, see [`crate::oauth::grants`]), client authentication as one exhaustive type, a
//! trait the controller calls (so scenario tests can replace the network), and the HTTP
//! implementation with client-secret fallback (secrets are tried in order, the next one after an
//! `invalid_client`).
//!
//! Requests are plain form POSTs (RFC 6749 §4, RFC 8628 §3.1 and §3.4) rather than oauth2's typed
//! builders: those cannot poll a device code once (their poll loops and sleeps inside one call,
//! which would hold a reconcile for up to the code's lifetime and not survive a restart) and have
//! no custom grant type (the JWT bearer grant), and their response parsing is strict where a
//! rotated refresh token must be kept (see `oauth::response`).

use chrono::Duration;
use futures::future::BoxFuture;
use secrecy::{ExposeSecret, SecretString};

use std::sync::Arc;

use super::assertion::{SigningKey, client_assertion};
use super::http::{Basic, HttpClients, Recorded, post_form};
use crate::policy::Reason;
use crate::policy::classify::{UpstreamError, classify, reduce_description};

/// A value in a grant's request.
#[derive(Clone, Debug)]
pub enum Param {
    /// Shown freely (`scope`, `redirect_uri`).
    Plain(String),
    /// A credential (a refresh token, a device code, a code verifier, an assertion): scrubbed from
    /// whatever the endpoint answers.
    Secret(SecretString),
}

impl Param {
    fn value(&self) -> &str {
        match self {
            Param::Plain(v) => v,
            Param::Secret(v) => v.expose_secret(),
        }
    }
}

/// What a grant sends to the token endpoint: its `grant_type` and parameters.
#[derive(Clone, Debug)]
pub struct GrantCall {
    /// `grant_type`.
    pub grant_type: &'static str,
    /// The grant's parameters.
    pub params: Vec<(&'static str, Param)>,
}

impl GrantCall {
    /// The credential this call spends, if it is a refresh: a rotated response replaces it.
    pub fn refresh_token(&self) -> Option<&SecretString> {
        (self.grant_type == "refresh_token")
            .then(|| {
                self.params.iter().find_map(|(k, v)| match (k, v) {
                    (&"refresh_token", Param::Secret(s)) => Some(s),
                    _ => None,
                })
            })
            .flatten()
    }

    /// Every secret value in the call.
    pub fn secrets(&self) -> impl Iterator<Item = &str> {
        self.params.iter().filter_map(|(_, v)| match v {
            Param::Secret(s) => Some(s.expose_secret()),
            Param::Plain(_) => None,
        })
    }
}

/// How the client proves who it is. Exhaustive: a new method is a new variant, and every place
/// that sends a request handles it.
#[derive(Clone, Debug)]
pub enum ClientAuth {
    /// A public client: `client_id` in the body and nothing else.
    Public,
    /// Client secrets, tried in order (the next after an `invalid_client`).
    Secrets {
        /// HTTP Basic (`client_secret_basic`) rather than the body (`client_secret_post`).
        basic: bool,
        /// The secrets; never empty.
        secrets: Vec<SecretString>,
    },
    /// `private_key_jwt` (RFC 7523 §2.2): a fresh signed assertion with every request.
    PrivateKey(Arc<SigningKey>),
}

impl ClientAuth {
    fn secrets(&self) -> &[SecretString] {
        match self {
            ClientAuth::Public | ClientAuth::PrivateKey(_) => &[],
            ClientAuth::Secrets { secrets, .. } => secrets,
        }
    }
}

/// Where and as whom a request is sent.
#[derive(Clone, Debug)]
pub struct Client {
    /// Client id.
    pub client_id: String,
    /// Client authentication.
    pub auth: ClientAuth,
    /// Extra trust roots.
    pub ca_bundle: Option<String>,
}

impl Client {
    /// The client secrets, for scrubbing provider text.
    pub fn auth_secrets(&self) -> impl Iterator<Item = &str> {
        self.auth.secrets().iter().map(ExposeSecret::expose_secret)
    }
}

/// One token request, whatever the grant.
#[derive(Clone, Debug)]
pub struct TokenRequest {
    /// Token endpoint (https).
    pub token_url: String,
    /// The client.
    pub client: Client,
    /// The grant.
    pub grant: GrantCall,
}

/// A device authorization request (RFC 8628 §3.1).
#[derive(Clone, Debug)]
pub struct DeviceRequest {
    /// Device authorization endpoint (https).
    pub url: String,
    /// The client.
    pub client: Client,
    /// Scopes to ask the person for.
    pub scopes: Vec<String>,
}

/// A token revocation request (RFC 7009).
#[derive(Clone, Debug)]
pub struct RevokeRequest {
    /// Revocation endpoint (https).
    pub url: String,
    /// The client.
    pub client: Client,
    /// The token to revoke.
    pub token: SecretString,
    /// `refresh_token` or `access_token`.
    pub hint: &'static str,
}

/// A userinfo request (OpenID Connect Core §5.3): who the access token's person is.
#[derive(Clone, Debug)]
pub struct UserinfoRequest {
    /// Userinfo endpoint (https).
    pub url: String,
    /// The access token just obtained.
    pub access_token: SecretString,
    /// Extra trust roots.
    pub ca_bundle: Option<String>,
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
    /// Who consented, when the server said (from an `id_token`).
    pub identities: Vec<String>,
}

/// A device code for a person to enter (RFC 8628 §3.2).
#[derive(Clone, Debug)]
pub struct DeviceCode {
    /// The code the operator polls with.
    pub device_code: SecretString,
    /// The code the person types.
    pub user_code: String,
    /// Where to type it.
    pub verification_uri: String,
    /// The same with the code filled in, when the server offers one.
    pub verification_uri_complete: Option<String>,
    /// How long the code is valid.
    pub expires_in: Duration,
    /// How long to wait between polls (default 5 s).
    pub interval: Duration,
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

/// The authorization server, as the controller sees it.
pub trait TokenEndpoint: Send + Sync {
    /// Sends a token request; failures are reduced to [`Rejected`].
    fn request<'a>(&'a self, request: &'a TokenRequest) -> BoxFuture<'a, Result<TokenSet, Rejected>>;

    /// Starts a device authorization; failures are reduced to [`Rejected`].
    fn device_authorization<'a>(&'a self, request: &'a DeviceRequest) -> BoxFuture<'a, Result<DeviceCode, Rejected>>;

    /// Revokes a token; failures are reduced to [`Rejected`].
    fn revoke<'a>(&'a self, request: &'a RevokeRequest) -> BoxFuture<'a, Result<(), Rejected>>;

    /// Asks who the access token's person is: `email`, `preferred_username`, `upn`.
    fn userinfo<'a>(&'a self, request: &'a UserinfoRequest) -> BoxFuture<'a, Result<Vec<String>, Rejected>>;
}

/// The real authorization server over HTTPS.
#[derive(Clone, Debug, Default)]
pub struct HttpTokenEndpoint {
    clients: HttpClients,
}

/// How a response becomes a result: `(recorded, credentials to scrub)`.
type Reader<T> = fn(Recorded, &[&str]) -> Result<T, Rejected>;

impl HttpTokenEndpoint {
    /// A token endpoint client sharing `clients`.
    pub fn new(clients: HttpClients) -> Self {
        Self { clients }
    }

    /// One POST with one credential (a client secret, an assertion, or none).
    async fn post_once(
        &self,
        url: &str,
        client: &Client,
        credential: Credential<'_>,
        form: &[(&str, &str)],
    ) -> Result<Recorded, Rejected> {
        let config_error = |m: String| Rejected::from(UpstreamError { transport: Some(m), ..Default::default() });
        let url = self.clients.policy().check_endpoint(url).map_err(config_error)?;
        let http = self.clients.get(client.ca_bundle.as_deref()).map_err(|e| config_error(e.to_string()))?;
        let mut body: Vec<(&str, &str)> = form.to_vec();
        let mut basic = None;
        match credential {
            Credential::None => body.push(("client_id", &client.client_id)),
            Credential::Secret(s) if matches!(client.auth, ClientAuth::Secrets { basic: true, .. }) => {
                basic = Some(Basic { id: &client.client_id, secret: s.expose_secret() });
            }
            Credential::Secret(s) => {
                body.push(("client_id", &client.client_id));
                body.push(("client_secret", s.expose_secret()));
            }
            Credential::Assertion(a) => {
                body.push(("client_id", &client.client_id));
                body.push(("client_assertion_type", CLIENT_ASSERTION_TYPE));
                body.push(("client_assertion", a.expose_secret()));
            }
        }
        Ok(post_form(&http, url, &body, basic).await)
    }

    /// POSTs `form` with the client's authentication, trying each client secret in turn while
    /// the endpoint says the client credentials are wrong.
    async fn post<T>(
        &self,
        url: &str,
        client: &Client,
        form: &[(&str, &str)],
        scrub: &[&str],
        read: Reader<T>,
    ) -> Result<T, Rejected> {
        let secrets = match &client.auth {
            ClientAuth::Public => return read(self.post_once(url, client, Credential::None, form).await?, scrub),
            ClientAuth::PrivateKey(key) => {
                let assertion = client_assertion(key, &client.client_id, url, chrono::Utc::now())
                    .map_err(|m| Rejected::from(UpstreamError { transport: Some(m), ..Default::default() }))?;
                let mut scrub = scrub.to_vec();
                scrub.push(assertion.expose_secret());
                let recorded = self.post_once(url, client, Credential::Assertion(&assertion), form).await?;
                return read(recorded, &scrub);
            }
            ClientAuth::Secrets { secrets, .. } => secrets,
        };
        let mut last = Rejected::default();
        for (i, secret) in secrets.iter().enumerate() {
            match self.post_once(url, client, Credential::Secret(secret), form).await.and_then(|r| read(r, scrub)) {
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
    }
}

/// `client_assertion_type` of a JWT client assertion.
pub const CLIENT_ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// What proves the client in one request.
#[derive(Clone, Copy)]
enum Credential<'a> {
    None,
    Secret(&'a SecretString),
    Assertion(&'a SecretString),
}

/// Every credential a request carries, for scrubbing provider text.
fn credentials<'a>(client: &'a Client, extra: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    client.auth.secrets().iter().map(ExposeSecret::expose_secret).chain(extra).collect()
}

impl TokenEndpoint for HttpTokenEndpoint {
    fn request<'a>(&'a self, request: &'a TokenRequest) -> BoxFuture<'a, Result<TokenSet, Rejected>> {
        Box::pin(async move {
            let mut form: Vec<(&str, &str)> = vec![("grant_type", request.grant.grant_type)];
            form.extend(request.grant.params.iter().map(|(k, v)| (*k, v.value())));
            let scrub = credentials(&request.client, request.grant.secrets());
            self.post(&request.token_url, &request.client, &form, &scrub, outcome).await
        })
    }

    fn userinfo<'a>(&'a self, request: &'a UserinfoRequest) -> BoxFuture<'a, Result<Vec<String>, Rejected>> {
        Box::pin(async move {
            let failed = |m: String| Rejected::from(UpstreamError { transport: Some(m), ..Default::default() });
            let url = self.clients.policy().check_endpoint(&request.url).map_err(failed)?;
            let http = self.clients.get(request.ca_bundle.as_deref()).map_err(|e| failed(e.to_string()))?;
            let response = http
                .get(url)
                .bearer_auth(request.access_token.expose_secret())
                .header(http::header::ACCEPT, "application/json")
                .send()
                .await
                .map_err(|e| failed(super::http::describe(&e)))?;
            let status = response.status();
            if !status.is_success() {
                return Err(UpstreamError { status: Some(status.as_u16()), ..Default::default() }.into());
            }
            let body = super::http::read_capped(response).await.map_err(|e| failed(e.0))?;
            Ok(super::response::userinfo_identities(&body))
        })
    }

    fn revoke<'a>(&'a self, request: &'a RevokeRequest) -> BoxFuture<'a, Result<(), Rejected>> {
        Box::pin(async move {
            let form: Vec<(&str, &str)> =
                vec![("token", request.token.expose_secret()), ("token_type_hint", request.hint)];
            let scrub = credentials(&request.client, std::iter::once(request.token.expose_secret()));
            self.post(&request.url, &request.client, &form, &scrub, revoke_outcome).await
        })
    }

    fn device_authorization<'a>(&'a self, request: &'a DeviceRequest) -> BoxFuture<'a, Result<DeviceCode, Rejected>> {
        Box::pin(async move {
            let scope = request.scopes.join(" ");
            let form: Vec<(&str, &str)> = vec![("scope", &scope)];
            let scrub = credentials(&request.client, std::iter::empty());
            self.post(&request.url, &request.client, &form, &scrub, device_outcome).await
        })
    }
}

/// The answer to a revocation: any 2xx is done (RFC 7009 §2.2: also for a token already invalid).
pub fn revoke_outcome(recorded: Recorded, secrets: &[&str]) -> Result<(), Rejected> {
    let success = recorded.status.is_some_and(|s| (200..300).contains(&s)) && recorded.transport.is_none();
    if success {
        return Ok(());
    }
    Err(outcome(Recorded { token: None, ..recorded }, secrets).err().unwrap_or_default())
}

/// Default poll interval (RFC 8628 §3.2).
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::seconds(5);

/// The answer to a device authorization request.
pub fn device_outcome(recorded: Recorded, secrets: &[&str]) -> Result<DeviceCode, Rejected> {
    let success = recorded.status.is_some_and(|s| (200..300).contains(&s)) && recorded.transport.is_none();
    if !success {
        // A non-2xx answer or a transport failure: read as a token endpoint error would be.
        return Err(outcome(Recorded { token: None, ..recorded }, secrets).err().unwrap_or_default());
    }
    let fields = recorded.device.clone().unwrap_or_default();
    match (fields.device_code, fields.user_code, fields.verification_uri) {
        (Some(device_code), Some(user_code), Some(verification_uri)) => Ok(DeviceCode {
            device_code,
            user_code,
            verification_uri,
            verification_uri_complete: fields.verification_uri_complete,
            expires_in: fields.expires_in.unwrap_or(Duration::minutes(15)),
            interval: fields.interval.unwrap_or(DEFAULT_POLL_INTERVAL),
        }),
        _ => Err(UpstreamError {
            status: recorded.status,
            description: Some(
                "the response is not a device authorization (device_code, user_code and verification_uri are required)"
                    .into(),
            ),
            ..Default::default()
        }
        .into()),
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
                identities: fields.identities,
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
