//! The grants, one module each, behind one flow trait. A flow looks at what is stored (a grant
//! state, an authorization in progress) and says what to do next: send a grant to the token
//! endpoint, start a device authorization, wait for a person, or stop with a typed failure. It
//! also reads what the token endpoint refused, where that means something to it (a device code
//! not approved yet). Flows are pure: the controller does the I/O they ask for.
//!
//! Adding a grant: a module here implementing [`Flow`], its variant in `api::Grant`, its row in
//! [`flow_for`], and its docs.

pub mod authorization_code;
pub mod client_credentials;
pub mod device_code;
pub mod jwt_bearer;
pub mod refresh_token;

use chrono::{DateTime, Utc};
use secrecy::SecretString;

use super::authorize::Response;
use super::client::{GrantCall, Param};
pub use super::provider::ScopeKind;
use crate::api::{MailProviderSpec, SecretKeySelector};
use crate::policy::classify::{Failure, UpstreamError};
use crate::policy::grant_state::{GrantState, PendingAuthorization};

/// What a provider offers, as far as a flow cares.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProviderFacts<'a> {
    /// `microsoft`, `google`, or `None` for a generic provider.
    pub preset: Option<&'a str>,
    /// Whether the client authenticates (client secrets or a certificate): a confidential client.
    pub confidential: bool,
    /// Whether a device authorization endpoint is known.
    pub device_endpoint: bool,
    /// Whether the provider's device flow may ask for mail scopes (Google's may not).
    pub device_flow_for_mail: bool,
    /// Whether an authorization endpoint is known.
    pub authorization_endpoint: bool,
    /// Whether the provider names a service-account key (`serviceAccountKeyRef`).
    pub service_account: bool,
}

/// A Secret a flow reads, and whose it is.
#[derive(Clone, Copy, Debug)]
pub enum Needs<'a> {
    /// In the binding's namespace (an imported refresh token).
    Binding(&'a SecretKeySelector),
    /// Among the provider's Secrets (a service-account key).
    Provider(&'a SecretKeySelector),
}

/// What a flow sees when asked what to do.
#[derive(Clone, Copy, Debug)]
pub struct FlowInput<'a> {
    /// The clock.
    pub now: DateTime<Utc>,
    /// The stored grant, when it is this binding's (same provider and client, owned by this
    /// flow) and no reauthorization is asked for.
    pub grant: Option<&'a GrantState>,
    /// An authorization in progress with this provider and client; `None` when a
    /// reauthorization is asked for.
    pub pending: Option<&'a PendingAuthorization>,
    /// The value of the Secret the flow reads ([`Flow::reads`]), when present and readable.
    pub read: Option<&'a SecretString>,
    /// Scopes to request.
    pub scopes: &'a [String],
    /// What a person's browser brought back (a callback, or a pasted redirect URL), if anything.
    pub response: Option<&'a Response>,
    /// The binding's uid.
    pub binding_uid: Option<&'a str>,
    /// The binding's generation.
    pub generation: Option<i64>,
    /// The mailbox.
    pub mailbox: &'a str,
    /// The token endpoint (an assertion's audience).
    pub token_url: &'a str,
}

/// What to do next. (Short-lived; the waiting variant is larger than the others on purpose.)
#[derive(Clone, Debug)]
#[allow(clippy::large_enum_variant)]
pub enum Step {
    /// Send this grant to the token endpoint.
    Token(GrantCall),
    /// Ask the device authorization endpoint for a code a person enters.
    StartDeviceAuthorization,
    /// Make an authorization request (PKCE, a single-use state) for a person's browser.
    StartAuthorization,
    /// A person has yet to act: keep this authorization and look again at its `next_poll`.
    Await(PendingAuthorization),
    /// The flow cannot go on.
    Fail(Failure),
}

/// One grant.
pub trait Flow: Send + Sync {
    /// The grant's name in the spec.
    fn name(&self) -> &'static str;

    /// Why this provider cannot serve the grant, if it cannot.
    fn unusable(&self, _provider: &ProviderFacts<'_>) -> Option<String> {
        None
    }

    /// Whose token the grant gets: the application's, a person's, or a person's who consents
    /// through the operator (asked who they are as well, for identity pinning).
    fn scope_kind(&self) -> ScopeKind {
        ScopeKind::Delegated
    }

    /// The Secret to read before [`Flow::step`], given the stored grant and the provider, if any.
    fn reads<'a>(&'a self, _grant: Option<&GrantState>, _provider: &'a MailProviderSpec) -> Option<Needs<'a>> {
        None
    }

    /// Whether a stored grant state came from this grant as the spec says it now.
    fn owns(&self, _grant: &GrantState) -> bool {
        true
    }

    /// Where the tokens come from, recorded in the grant state (`imported_from`).
    fn origin(&self) -> Option<String> {
        None
    }

    /// The next step.
    fn step(&self, input: &FlowInput<'_>) -> Step;

    /// What a refusal by the token endpoint means to this flow, when it is not a failure to
    /// classify (a device code not approved yet).
    fn refused(&self, _error: &UpstreamError, _input: &FlowInput<'_>) -> Option<Step> {
        None
    }
}

/// The flow for a grant in the spec; `None` for a grant this version does not implement.
pub fn flow_for(grant: &crate::api::Grant) -> Option<Box<dyn Flow>> {
    use crate::api::Grant as G;
    match grant {
        G::RefreshToken { secret_ref } => {
            Some(Box::new(refresh_token::RefreshTokenFlow { secret_ref: secret_ref.clone() }))
        }
        G::ClientCredentials {} => Some(Box::new(client_credentials::ClientCredentialsFlow)),
        G::DeviceCode {} => Some(Box::new(device_code::DeviceCodeFlow)),
        G::AuthorizationCode {} => Some(Box::new(authorization_code::AuthorizationCodeFlow)),
        G::JwtBearer {} => Some(Box::new(jwt_bearer::JwtBearerFlow)),
    }
}

/// A refresh with `refresh_token` (RFC 6749 §6).
pub fn refresh(refresh_token: &SecretString, scopes: &[String]) -> GrantCall {
    let mut params = vec![("refresh_token", Param::Secret(refresh_token.clone()))];
    params.extend(scope(scopes));
    GrantCall { grant_type: "refresh_token", params }
}

/// The refresh of a stored grant, when it has a refresh token.
pub fn refresh_stored(input: &FlowInput<'_>) -> Option<Step> {
    let rt = input.grant?.refresh_token.as_ref()?;
    Some(Step::Token(refresh(rt, input.scopes)))
}

/// The `scope` parameter, when there are scopes.
pub fn scope(scopes: &[String]) -> Option<(&'static str, Param)> {
    (!scopes.is_empty()).then(|| ("scope", Param::Plain(scopes.join(" "))))
}
