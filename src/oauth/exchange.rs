//! The pure ends of a token exchange: the request for a binding, and the grant state a response
//! becomes (the rotated refresh token replaces the used one; an unrotated one is kept).

use chrono::{DateTime, Duration, Utc};
use secrecy::{ExposeSecret, SecretString};

use super::client::{Client, ClientAuth, GrantCall};
use super::{TokenRequest, TokenSet};
use crate::api::{ClientAuthMethod, Endpoints, MailProviderSpec};
use crate::policy::grant_state::{GrantState, Issuer};

/// Lifetime assumed when the token endpoint does not say (`expires_in` is optional, or zero or
/// negative, which is read as not saying); `--default-token-lifetime` overrides it.
pub const DEFAULT_LIFETIME: Duration = Duration::hours(1);

/// Who asks, for which scopes.
#[derive(Clone, Debug)]
pub struct Requester<'a> {
    /// `Kind/name` of the provider.
    pub provider_key: &'a str,
    /// The provider registration.
    pub provider: &'a MailProviderSpec,
    /// Its resolved endpoints.
    pub endpoints: &'a Endpoints,
    /// Scopes to request.
    pub scopes: &'a [String],
    /// The mailbox.
    pub mailbox: &'a str,
}

/// The token request for `grant`, as `client`.
pub fn request_for(who: &Requester<'_>, client: Client, grant: GrantCall) -> TokenRequest {
    TokenRequest { token_url: who.endpoints.token.clone().unwrap_or_default(), client, grant }
}

/// The client as `who`'s provider registers it, authenticating with `secrets` (none: public).
pub fn client_for(who: &Requester<'_>, secrets: Vec<SecretString>) -> Client {
    let auth = if secrets.is_empty() {
        ClientAuth::Public
    } else {
        let basic = super::provider::auth_method(who.provider) == Some(ClientAuthMethod::ClientSecretBasic);
        ClientAuth::Secrets { basic, secrets }
    };
    Client {
        client_id: who.provider.client_id.clone(),
        auth,
        ca_bundle: super::provider::ca_bundle(who.provider).map(str::to_owned),
    }
}

/// The issuer a grant obtained now through `who`'s provider is bound to: its token endpoint, its
/// revocation endpoint and how the client authenticates. `None` without a token endpoint.
pub fn issuer_of(who: &Requester<'_>) -> Option<Issuer> {
    let token_url = who.endpoints.token.clone()?;
    let client_auth = match super::provider::auth_method(who.provider) {
        None => "none",
        Some(ClientAuthMethod::ClientSecretPost) => "clientSecretPost",
        Some(ClientAuthMethod::ClientSecretBasic) => "clientSecretBasic",
        Some(ClientAuthMethod::PrivateKeyJwt) => "privateKeyJwt",
    };
    Some(Issuer { token_url, revocation_url: who.endpoints.revocation.clone(), client_auth: client_auth.to_owned() })
}

/// Whether the response carries a refresh token other than the one used.
pub fn rotated(set: &TokenSet, used: Option<&SecretString>) -> bool {
    match (&set.refresh_token, used) {
        (Some(new), Some(old)) => new.expose_secret() != old.expose_secret(),
        _ => false,
    }
}

/// The grant state a successful response becomes; `default_lifetime` stands in for a missing
/// `expires_in`. A rotated refresh token is stored with the one it replaces beside it (see
/// [`GrantState::previous_refresh_token`]); an unrotated one has just been proven to work, so
/// nothing older is kept.
pub fn grant_state_from(
    who: &Requester<'_>,
    set: TokenSet,
    used: Option<&SecretString>,
    imported_from: Option<String>,
    now: DateTime<Utc>,
    default_lifetime: Duration,
) -> GrantState {
    let previous = if rotated(&set, used) { used.cloned() } else { None };
    GrantState {
        refresh_token: set.refresh_token.or_else(|| used.cloned()),
        previous_refresh_token: previous,
        access_token: set.access_token,
        token_type: "Bearer".into(),
        issued_at: now,
        expires_at: crate::policy::time::plus(now, set.expires_in.unwrap_or(default_lifetime)),
        scopes: set.scopes.unwrap_or_else(|| who.scopes.to_vec()),
        requested_scopes: who.scopes.to_vec(),
        provider: who.provider_key.to_owned(),
        client_id: who.provider.client_id.clone(),
        imported_from,
        mailbox: Some(who.mailbox.to_owned()),
        account: None,
        issuer: issuer_of(who),
        relay: None,
    }
}

/// The state to keep when a response was unusable but carried a refresh token: the previous
/// state (its access token stays published while valid) with the new refresh token, or, with no
/// previous state, an expired state holding just the refresh token.
pub fn rescued_state(
    who: &Requester<'_>,
    previous: Option<&GrantState>,
    refresh_token: SecretString,
    imported_from: Option<String>,
    now: DateTime<Utc>,
) -> GrantState {
    match previous {
        Some(p) => GrantState {
            previous_refresh_token: p.refresh_token.clone().or_else(|| p.previous_refresh_token.clone()),
            refresh_token: Some(refresh_token),
            mailbox: Some(who.mailbox.to_owned()),
            ..p.clone()
        },
        None => GrantState {
            refresh_token: Some(refresh_token),
            previous_refresh_token: None,
            access_token: SecretString::from(String::new()),
            token_type: "Bearer".into(),
            issued_at: now,
            expires_at: now,
            scopes: who.scopes.to_vec(),
            requested_scopes: who.scopes.to_vec(),
            provider: who.provider_key.to_owned(),
            client_id: who.provider.client_id.clone(),
            imported_from,
            mailbox: Some(who.mailbox.to_owned()),
            account: None,
            issuer: issuer_of(who),
            relay: None,
        },
    }
}
