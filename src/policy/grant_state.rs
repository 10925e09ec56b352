//! The grant state: the refresh token and what is needed to use it, plus the current access token.
//! Stored in a Secret owned by the binding that workloads never mount; this module encodes and
//! decodes that Secret's data.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, Utc};
use secrecy::{ExposeSecret, SecretString};

use super::relay::RelayCredentials;

/// Keys of the grant-state Secret.
pub mod keys {
    /// The refresh token (rotated copies replace it).
    pub const REFRESH_TOKEN: &str = "refresh_token";
    /// The refresh token the current one replaced, kept until the current one has worked once.
    pub const PREVIOUS_REFRESH_TOKEN: &str = "previous_refresh_token";
    /// The current access token.
    pub const ACCESS_TOKEN: &str = "access_token";
    /// `Bearer`.
    pub const TOKEN_TYPE: &str = "token_type";
    /// RFC 3339.
    pub const ISSUED_AT: &str = "issued_at";
    /// RFC 3339.
    pub const EXPIRES_AT: &str = "expires_at";
    /// Granted scopes, space separated.
    pub const SCOPES: &str = "scopes";
    /// Requested scopes, space separated.
    pub const REQUESTED_SCOPES: &str = "requested_scopes";
    /// `Kind/name` of the provider the tokens were issued through.
    pub const PROVIDER: &str = "provider";
    /// The client id the tokens were issued to.
    pub const CLIENT_ID: &str = "client_id";
    /// `secret/key` the refresh token was imported from.
    pub const IMPORTED_FROM: &str = "imported_from";
    /// The mailbox the grant is for (so a recreated binding can adopt its own grant).
    pub const MAILBOX: &str = "mailbox";
    /// The identity the provider vouched for, when it said.
    pub const ACCOUNT: &str = "account";
    /// The token endpoint that issued the grant: refreshes go there and nowhere else.
    pub const TOKEN_URL: &str = "token_url";
    /// The revocation endpoint known when the grant was issued: revocation goes there or nowhere.
    pub const REVOCATION_URL: &str = "revocation_url";
    /// How the client authenticated when the grant was issued (`none`, `clientSecretPost`, ...).
    pub const CLIENT_AUTH: &str = "client_auth";
}

/// What the operator holds for one binding.
#[derive(Clone, Debug)]
pub struct GrantState {
    /// The refresh token, if the grant has one.
    pub refresh_token: Option<SecretString>,
    /// The refresh token that the current one replaced, until the current one has been used
    /// successfully: Microsoft and Google keep a replaced refresh token valid, so if the current
    /// one is ever refused (a damaged copy, a response whose token was unusable) the grant is
    /// recovered with this one instead of being lost.
    pub previous_refresh_token: Option<SecretString>,
    /// The current access token.
    pub access_token: SecretString,
    /// Token type, `Bearer`.
    pub token_type: String,
    /// When the access token was issued.
    pub issued_at: DateTime<Utc>,
    /// When it expires.
    pub expires_at: DateTime<Utc>,
    /// Scopes granted.
    pub scopes: Vec<String>,
    /// Scopes requested.
    pub requested_scopes: Vec<String>,
    /// `Kind/name` of the provider.
    pub provider: String,
    /// Client id the tokens belong to.
    pub client_id: String,
    /// `secret/key` of the imported refresh token, for the refreshToken grant.
    pub imported_from: Option<String>,
    /// The mailbox (absent in states written by older versions).
    pub mailbox: Option<String>,
    /// The identity the provider vouched for (an id_token's claim), when it said.
    pub account: Option<String>,
    /// The issuer the grant is bound to (absent in states written before 2026-12).
    pub issuer: Option<Issuer>,
    /// The relay credentials (`spec.relay`), stored beside the grant and carried across renewals
    /// and new grants (see [`super::relay`]).
    pub relay: Option<RelayCredentials>,
}

/// What issued a grant, recorded when the grant is first obtained and carried unchanged across
/// refreshes: a stored refresh token is only ever sent to this token endpoint, for this client,
/// and revoked only at this revocation endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Issuer {
    /// The token endpoint.
    pub token_url: String,
    /// The revocation endpoint, when the provider had one.
    pub revocation_url: Option<String>,
    /// How the client authenticated (`none`, `clientSecretPost`, `clientSecretBasic`,
    /// `privateKeyJwt`).
    pub client_auth: String,
}

impl PartialEq for GrantState {
    fn eq(&self, other: &Self) -> bool {
        self.refresh_token.as_ref().map(ExposeSecret::expose_secret)
            == other.refresh_token.as_ref().map(ExposeSecret::expose_secret)
            && self.previous_refresh_token.as_ref().map(ExposeSecret::expose_secret)
                == other.previous_refresh_token.as_ref().map(ExposeSecret::expose_secret)
            && self.access_token.expose_secret() == other.access_token.expose_secret()
            && self.token_type == other.token_type
            && self.issued_at == other.issued_at
            && self.expires_at == other.expires_at
            && self.scopes == other.scopes
            && self.requested_scopes == other.requested_scopes
            && self.provider == other.provider
            && self.client_id == other.client_id
            && self.imported_from == other.imported_from
            && self.mailbox == other.mailbox
            && self.account == other.account
            && self.issuer == other.issuer
            && self.relay == other.relay
    }
}

impl GrantState {
    /// A fixture for tests: a delegated grant of `MailProvider/idp` (client `client`) for
    /// `a@example.com`, refresh token `rt`, access token `at` issued at 2027-01-15T08:00:00Z for an
    /// hour, scope `mail`, bound to `https://idp.example.com/token`. Change what a test is about
    /// with struct update syntax: `GrantState { expires_at, ..GrantState::test() }`.
    #[doc(hidden)]
    pub fn test() -> Self {
        let issued_at = DateTime::from_timestamp(1_800_000_000, 0).unwrap_or_default();
        Self {
            refresh_token: Some("rt".to_owned().into()),
            previous_refresh_token: None,
            access_token: "at".to_owned().into(),
            token_type: "Bearer".into(),
            issued_at,
            expires_at: DateTime::from_timestamp(1_800_003_600, 0).unwrap_or_default(),
            scopes: vec!["mail".into()],
            requested_scopes: vec!["mail".into()],
            provider: "MailProvider/idp".into(),
            client_id: "client".into(),
            imported_from: None,
            mailbox: Some("a@example.com".into()),
            account: None,
            issuer: Some(Issuer {
                token_url: "https://idp.example.com/token".into(),
                revocation_url: None,
                client_auth: "none".into(),
            }),
            relay: None,
        }
    }

    /// The Secret data for this state.
    pub fn encode(&self) -> BTreeMap<String, String> {
        let mut data = BTreeMap::new();
        let mut put = |k: &str, v: String| {
            data.insert(k.to_owned(), v);
        };
        if let Some(rt) = &self.refresh_token {
            put(keys::REFRESH_TOKEN, rt.expose_secret().to_owned());
        }
        if let Some(rt) = &self.previous_refresh_token {
            put(keys::PREVIOUS_REFRESH_TOKEN, rt.expose_secret().to_owned());
        }
        put(keys::ACCESS_TOKEN, self.access_token.expose_secret().to_owned());
        put(keys::TOKEN_TYPE, self.token_type.clone());
        put(keys::ISSUED_AT, rfc3339(self.issued_at));
        put(keys::EXPIRES_AT, rfc3339(self.expires_at));
        put(keys::SCOPES, self.scopes.join(" "));
        put(keys::REQUESTED_SCOPES, self.requested_scopes.join(" "));
        put(keys::PROVIDER, self.provider.clone());
        put(keys::CLIENT_ID, self.client_id.clone());
        if let Some(from) = &self.imported_from {
            put(keys::IMPORTED_FROM, from.clone());
        }
        if let Some(mailbox) = &self.mailbox {
            put(keys::MAILBOX, mailbox.clone());
        }
        if let Some(account) = &self.account {
            put(keys::ACCOUNT, account.clone());
        }
        if let Some(issuer) = &self.issuer {
            put(keys::TOKEN_URL, issuer.token_url.clone());
            if let Some(url) = &issuer.revocation_url {
                put(keys::REVOCATION_URL, url.clone());
            }
            put(keys::CLIENT_AUTH, issuer.client_auth.clone());
        }
        if let Some(relay) = &self.relay {
            relay.encode_into(&mut data);
        }
        data
    }

    /// Reads a state back; `None` when a required key is missing or does not parse. A state
    /// without an access token is read (it holds a refresh token rescued from a response that
    /// had no usable access token) and is simply expired.
    pub fn decode(data: &BTreeMap<String, Vec<u8>>) -> Option<Self> {
        let text = |k: &str| data.get(k).and_then(|v| String::from_utf8(v.clone()).ok());
        let time = |k: &str| text(k).and_then(|t| DateTime::parse_from_rfc3339(&t).ok()).map(|t| t.with_timezone(&Utc));
        let words = |k: &str| text(k).map(|s| s.split_whitespace().map(str::to_owned).collect()).unwrap_or_default();
        Some(Self {
            refresh_token: text(keys::REFRESH_TOKEN).filter(|t| !t.is_empty()).map(SecretString::from),
            previous_refresh_token: text(keys::PREVIOUS_REFRESH_TOKEN)
                .filter(|t| !t.is_empty())
                .map(SecretString::from),
            access_token: SecretString::from(text(keys::ACCESS_TOKEN).unwrap_or_default()),
            token_type: text(keys::TOKEN_TYPE).unwrap_or_else(|| "Bearer".to_owned()),
            issued_at: time(keys::ISSUED_AT)?,
            expires_at: time(keys::EXPIRES_AT)?,
            scopes: words(keys::SCOPES),
            requested_scopes: words(keys::REQUESTED_SCOPES),
            provider: text(keys::PROVIDER)?,
            client_id: text(keys::CLIENT_ID)?,
            imported_from: text(keys::IMPORTED_FROM),
            mailbox: text(keys::MAILBOX),
            account: text(keys::ACCOUNT),
            issuer: text(keys::TOKEN_URL).filter(|u| !u.is_empty()).map(|token_url| Issuer {
                token_url,
                revocation_url: text(keys::REVOCATION_URL).filter(|u| !u.is_empty()),
                client_auth: text(keys::CLIENT_AUTH).unwrap_or_default(),
            }),
            relay: RelayCredentials::decode(data),
        })
        .filter(|s| s.refresh_token.is_some() || !s.access_token.expose_secret().is_empty())
    }
}

/// Keys of an authorization in progress, beside (or instead of) the grant state's keys.
pub mod pending_keys {
    /// `deviceCode`.
    pub const METHOD: &str = "pending_method";
    /// The device code the operator polls with (secret).
    pub const DEVICE_CODE: &str = "pending_device_code";
    /// The code the person types.
    pub const USER_CODE: &str = "pending_user_code";
    /// Where to type it.
    pub const VERIFICATION_URI: &str = "pending_verification_uri";
    /// The same with the code filled in.
    pub const VERIFICATION_URI_COMPLETE: &str = "pending_verification_uri_complete";
    /// RFC 3339.
    pub const STARTED_AT: &str = "pending_started_at";
    /// RFC 3339.
    pub const EXPIRES_AT: &str = "pending_expires_at";
    /// Seconds between polls.
    pub const INTERVAL: &str = "pending_interval";
    /// `Kind/name` of the provider it was started with.
    pub const PROVIDER: &str = "pending_provider";
    /// The client id it was started with.
    pub const CLIENT_ID: &str = "pending_client_id";
    /// Scopes asked for, space separated.
    pub const SCOPES: &str = "pending_scopes";
    /// The single-use `state` of an authorization request.
    pub const STATE: &str = "pending_state";
    /// The PKCE code verifier (secret).
    pub const CODE_VERIFIER: &str = "pending_code_verifier";
    /// The redirect URI the request named.
    pub const REDIRECT_URI: &str = "pending_redirect_uri";
    /// Where the person goes: the provider's authorize URL, or the operator's link to it.
    pub const URL: &str = "pending_url";
    /// The authorization code the callback received, waiting to be exchanged once (secret).
    pub const CODE: &str = "pending_code";
    /// The binding's uid when the request was made.
    pub const BINDING_UID: &str = "pending_binding_uid";
    /// The binding's generation when the request was made.
    pub const GENERATION: &str = "pending_generation";
    /// The token endpoint the device code or authorization code will be redeemed at.
    pub const TOKEN_URL: &str = "pending_token_url";
}

/// An authorization a person has yet to complete, kept in the grant-state Secret so that it
/// survives a restart (the device code stays secret there, like a refresh token).
#[derive(Clone, Debug)]
pub struct PendingAuthorization {
    /// The grant that started it (`deviceCode`).
    pub method: String,
    /// The device code to poll with.
    pub device_code: Option<SecretString>,
    /// The code the person types.
    pub user_code: Option<String>,
    /// Where to type it.
    pub verification_uri: Option<String>,
    /// The same with the code filled in.
    pub verification_uri_complete: Option<String>,
    /// When it was started.
    pub started_at: DateTime<Utc>,
    /// When the code stops working.
    pub expires_at: DateTime<Utc>,
    /// Time between polls.
    pub interval: Duration,
    /// When to poll next (not stored: after a restart the next poll is at once).
    pub next_poll: DateTime<Utc>,
    /// `Kind/name` of the provider.
    pub provider: String,
    /// Client id.
    pub client_id: String,
    /// Scopes asked for.
    pub scopes: Vec<String>,
    /// The single-use `state` (authorization code).
    pub state: Option<String>,
    /// The PKCE code verifier (authorization code).
    pub code_verifier: Option<SecretString>,
    /// The redirect URI (authorization code).
    pub redirect_uri: Option<String>,
    /// Where the person goes (authorization code).
    pub url: Option<String>,
    /// The code the callback received, to be exchanged once.
    pub code: Option<SecretString>,
    /// The binding's uid when the request was made.
    pub binding_uid: Option<String>,
    /// The binding's generation when the request was made.
    pub generation: Option<i64>,
    /// The token endpoint the code will be redeemed at (absent in requests made before 2026-12).
    pub token_url: Option<String>,
}

impl PartialEq for PendingAuthorization {
    fn eq(&self, other: &Self) -> bool {
        self.same_stored(other) && self.next_poll == other.next_poll
    }
}

impl Eq for PendingAuthorization {}

impl PendingAuthorization {
    /// Whether `other` is another authorization rather than this one with a new interval or a
    /// received code.
    pub fn device_code_differs(&self, other: &Self) -> bool {
        self.method != other.method
            || self.state != other.state
            || self.device_code.as_ref().map(ExposeSecret::expose_secret)
                != other.device_code.as_ref().map(ExposeSecret::expose_secret)
    }

    /// Whether two pending authorizations store the same data (`next_poll` is not stored).
    pub fn same_stored(&self, other: &Self) -> bool {
        self.encode() == other.encode()
    }

    /// The Secret data for this pending authorization.
    pub fn encode(&self) -> BTreeMap<String, String> {
        use pending_keys as k;
        let mut data = BTreeMap::new();
        let mut put = |key: &str, v: Option<String>| {
            if let Some(v) = v {
                data.insert(key.to_owned(), v);
            }
        };
        put(k::METHOD, Some(self.method.clone()));
        put(k::DEVICE_CODE, self.device_code.as_ref().map(|c| c.expose_secret().to_owned()));
        put(k::USER_CODE, self.user_code.clone());
        put(k::VERIFICATION_URI, self.verification_uri.clone());
        put(k::VERIFICATION_URI_COMPLETE, self.verification_uri_complete.clone());
        put(k::STARTED_AT, Some(rfc3339(self.started_at)));
        put(k::EXPIRES_AT, Some(rfc3339(self.expires_at)));
        put(k::INTERVAL, Some(self.interval.num_seconds().to_string()));
        put(k::PROVIDER, Some(self.provider.clone()));
        put(k::CLIENT_ID, Some(self.client_id.clone()));
        put(k::SCOPES, Some(self.scopes.join(" ")));
        put(k::STATE, self.state.clone());
        put(k::CODE_VERIFIER, self.code_verifier.as_ref().map(|c| c.expose_secret().to_owned()));
        put(k::REDIRECT_URI, self.redirect_uri.clone());
        put(k::URL, self.url.clone());
        put(k::CODE, self.code.as_ref().map(|c| c.expose_secret().to_owned()));
        put(k::BINDING_UID, self.binding_uid.clone());
        put(k::GENERATION, self.generation.map(|g| g.to_string()));
        put(k::TOKEN_URL, self.token_url.clone());
        data
    }

    /// Whether there is anything to store: a device code, or an authorization request's state.
    pub fn persistent(&self) -> bool {
        self.device_code.is_some() || self.state.is_some()
    }

    /// Reads a pending authorization back; `None` when there is none or it does not parse.
    pub fn decode(data: &BTreeMap<String, Vec<u8>>) -> Option<Self> {
        use pending_keys as k;
        let text = |key: &str| data.get(key).and_then(|v| String::from_utf8(v.clone()).ok()).filter(|t| !t.is_empty());
        let time =
            |key: &str| text(key).and_then(|t| DateTime::parse_from_rfc3339(&t).ok()).map(|t| t.with_timezone(&Utc));
        let interval = text(k::INTERVAL).and_then(|t| t.parse::<i64>().ok()).filter(|s| (1..=3600).contains(s))?;
        let started_at = time(k::STARTED_AT)?;
        Some(Self {
            method: text(k::METHOD)?,
            device_code: text(k::DEVICE_CODE).map(SecretString::from),
            user_code: text(k::USER_CODE),
            verification_uri: text(k::VERIFICATION_URI),
            verification_uri_complete: text(k::VERIFICATION_URI_COMPLETE),
            started_at,
            expires_at: time(k::EXPIRES_AT)?,
            interval: Duration::seconds(interval),
            next_poll: started_at,
            provider: text(k::PROVIDER)?,
            client_id: text(k::CLIENT_ID)?,
            scopes: text(k::SCOPES).map(|s| s.split_whitespace().map(str::to_owned).collect()).unwrap_or_default(),
            state: text(k::STATE),
            code_verifier: text(k::CODE_VERIFIER).map(SecretString::from),
            redirect_uri: text(k::REDIRECT_URI),
            url: text(k::URL),
            code: text(k::CODE).map(SecretString::from),
            binding_uid: text(k::BINDING_UID),
            generation: text(k::GENERATION).and_then(|g| g.parse().ok()),
            token_url: text(k::TOKEN_URL),
        })
    }
}

/// What the grant-state Secret holds once a browser's response was answered with a failure: the
/// authorization request it answered is spent, and any grant stored beside it is kept. `None`:
/// nothing to write (no request was waiting, so the response answered nothing and nothing is
/// spent; a stored grant in particular is never touched by a stray or replayed response).
pub fn spent_request_data(
    grant: Option<&GrantState>,
    pending: Option<&PendingAuthorization>,
) -> Option<BTreeMap<String, String>> {
    pending?;
    Some(grant.map(GrantState::encode).unwrap_or_default())
}

/// What a grant-state write that lost an optimistic-concurrency race (409) is, judged from what
/// the Secret holds now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fenced {
    /// The Secret already holds our refresh token (our earlier write landed): done.
    Written,
    /// Someone else stored another grant since we read it (a newer leader, a person): ours is
    /// stale and must not overwrite it.
    Stale,
    /// Nothing that supersedes ours (an authorization request, the grant we started from): write
    /// again against the current version.
    Retry,
}

/// Judges a conflict: `current` is the grant the Secret holds now, `pending_now` whether it holds
/// an authorization in progress, `basis` the refresh token of the grant this result was obtained
/// from (none for a first grant), `ours` the state to write. A refresh of a grant that a
/// deliberate new authorization has replaced meanwhile is stale too.
pub fn after_conflict(
    current: Option<&GrantState>,
    pending_now: bool,
    basis: Option<&str>,
    ours: &GrantState,
) -> Fenced {
    let token = |g: &GrantState| g.refresh_token.as_ref().map(|t| t.expose_secret().to_owned());
    let Some(current) = current else {
        return if pending_now && basis.is_some() { Fenced::Stale } else { Fenced::Retry };
    };
    let now_stored = token(current);
    if now_stored.is_some() && now_stored == token(ours) {
        return Fenced::Written;
    }
    if now_stored.as_deref() == basis { Fenced::Retry } else { Fenced::Stale }
}

/// RFC 3339 in UTC with seconds, as written everywhere (`2026-01-02T03:04:05Z`).
pub fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_survives_encoding_and_decoding() {
        let state = GrantState {
            refresh_token: Some("rt-1".to_owned().into()),
            previous_refresh_token: Some("rt-0".to_owned().into()),
            access_token: "at-1".to_owned().into(),
            issued_at: DateTime::from_timestamp(1_700_000_000, 0).unwrap_or_default(),
            expires_at: DateTime::from_timestamp(1_700_003_600, 0).unwrap_or_default(),
            scopes: vec!["openid".into(), "mail".into()],
            provider: "MailProvider/p".into(),
            imported_from: Some("import/refresh_token".into()),
            issuer: None,
            relay: None,
            ..GrantState::test()
        };
        let data = state.encode().into_iter().map(|(k, v)| (k, v.into_bytes())).collect();
        assert_eq!(GrantState::decode(&data), Some(state));
    }

    #[test]
    fn a_pending_authorization_survives_encoding_and_decoding_but_not_its_next_poll() {
        let t = DateTime::from_timestamp(1_700_000_000, 0).unwrap_or_default();
        let p = PendingAuthorization {
            method: "deviceCode".into(),
            device_code: Some("dc-secret".to_owned().into()),
            user_code: Some("ABCD-EFGH".into()),
            verification_uri: Some("https://idp/device".into()),
            verification_uri_complete: None,
            started_at: t,
            expires_at: t + Duration::minutes(10),
            interval: Duration::seconds(5),
            next_poll: t + Duration::seconds(35),
            provider: "MailProvider/p".into(),
            client_id: "c".into(),
            scopes: vec!["openid".into(), "mail".into()],
            state: None,
            code_verifier: None,
            redirect_uri: None,
            url: None,
            code: None,
            binding_uid: None,
            generation: None,
            token_url: None,
        };
        let data = p.encode().into_iter().map(|(k, v)| (k, v.into_bytes())).collect();
        let back = PendingAuthorization::decode(&data).unwrap();
        assert!(back.same_stored(&p));
        assert_eq!(back.next_poll, t, "after a restart the next poll is at once");
        assert!(!format!("{back:?}").contains("dc-secret"));
        assert!(PendingAuthorization::decode(&BTreeMap::new()).is_none());
    }

    fn state(rt: Option<&str>) -> GrantState {
        GrantState {
            refresh_token: rt.map(|t| SecretString::from(t.to_owned())),
            issued_at: DateTime::from_timestamp(1_700_000_000, 0).unwrap_or_default(),
            expires_at: DateTime::from_timestamp(1_700_003_600, 0).unwrap_or_default(),
            scopes: vec![],
            requested_scopes: vec![],
            provider: "MailProvider/p".into(),
            client_id: "c".into(),
            mailbox: None,
            issuer: Some(Issuer {
                token_url: "https://idp/token".into(),
                revocation_url: None,
                client_auth: "none".into(),
            }),
            ..GrantState::test()
        }
    }

    fn bytes(data: BTreeMap<String, String>) -> BTreeMap<String, Vec<u8>> {
        data.into_iter().map(|(k, v)| (k, v.into_bytes())).collect()
    }

    #[test]
    fn the_issuer_survives_encoding_and_is_absent_in_old_states() {
        let s = state(Some("rt"));
        assert_eq!(GrantState::decode(&bytes(s.encode())), Some(s.clone()));
        let mut old = s.encode();
        old.remove(keys::TOKEN_URL);
        assert_eq!(GrantState::decode(&bytes(old)).and_then(|g| g.issuer), None);
    }

    #[test]
    fn a_stale_writer_never_overwrites_a_newer_grant_and_a_landed_write_is_not_repeated() {
        let ours = state(Some("rt-2"));
        assert_eq!(after_conflict(Some(&state(Some("rt-2"))), false, Some("rt-1"), &ours), Fenced::Written);
        assert_eq!(after_conflict(Some(&state(Some("rt-9"))), false, Some("rt-1"), &ours), Fenced::Stale);
        assert_eq!(after_conflict(Some(&state(Some("rt-1"))), false, Some("rt-1"), &ours), Fenced::Retry);
        assert_eq!(after_conflict(None, false, Some("rt-1"), &ours), Fenced::Retry);
        // A first grant meets another replica's first grant: theirs stands.
        assert_eq!(after_conflict(Some(&state(Some("rt-9"))), false, None, &ours), Fenced::Stale);
        // A late refresh meets a new authorization a person started: the person's choice stands;
        // a first grant (the answer to an authorization) is written over a newer request for one.
        assert_eq!(after_conflict(None, true, Some("rt-1"), &ours), Fenced::Stale);
        assert_eq!(after_conflict(None, true, None, &ours), Fenced::Retry);
    }

    proptest::proptest! {
        /// No failure erases a refresh token: a response answered with a failure spends only the
        /// request it answered, whatever is stored.
        #[test]
        fn a_spent_request_never_loses_a_stored_refresh_token(
            rt in proptest::option::of("[a-zA-Z0-9._-]{1,40}"),
            with_pending in proptest::bool::ANY,
        ) {
            let grant = rt.as_deref().map(|t| state(Some(t)));
            let pending = with_pending.then(|| PendingAuthorization::decode(&bytes(BTreeMap::from([
                (pending_keys::METHOD.to_owned(), "authorizationCode".to_owned()),
                (pending_keys::STARTED_AT.to_owned(), "2026-01-01T00:00:00Z".to_owned()),
                (pending_keys::EXPIRES_AT.to_owned(), "2026-01-01T00:15:00Z".to_owned()),
                (pending_keys::INTERVAL.to_owned(), "1".to_owned()),
                (pending_keys::PROVIDER.to_owned(), "MailProvider/p".to_owned()),
                (pending_keys::CLIENT_ID.to_owned(), "c".to_owned()),
                (pending_keys::STATE.to_owned(), "s".to_owned()),
            ]))).unwrap());
            match spent_request_data(grant.as_ref(), pending.as_ref()) {
                None => proptest::prop_assert!(pending.is_none()),
                Some(data) => {
                    let back = GrantState::decode(&bytes(data));
                    let kept = back.and_then(|g| g.refresh_token).map(|t| t.expose_secret().to_owned());
                    proptest::prop_assert_eq!(kept, rt);
                }
            }
        }

        /// A conflict never lets a write replace a grant other than the one it started from.
        #[test]
        fn a_conflict_only_retries_over_the_grant_it_started_from(
            current in proptest::option::of("[a-c]"),
            basis in proptest::option::of("[a-c]"),
            ours in "[a-c]",
        ) {
            let now = current.as_deref().map(|t| state(Some(t)));
            let verdict = after_conflict(now.as_ref(), false, basis.as_deref(), &state(Some(&ours)));
            if verdict == Fenced::Retry {
                proptest::prop_assert!(current.is_none() || current == basis);
            }
            if verdict == Fenced::Written {
                proptest::prop_assert_eq!(current.as_deref(), Some(ours.as_str()));
            }
        }
    }

    #[test]
    fn a_state_without_any_token_is_not_read() {
        let mut data = BTreeMap::new();
        data.insert(keys::REFRESH_TOKEN.to_owned(), b"rt".to_vec());
        assert_eq!(GrantState::decode(&data), None);
    }

    #[test]
    fn debug_output_never_shows_tokens() {
        let state = GrantState {
            refresh_token: Some("very-secret-refresh".to_owned().into()),
            previous_refresh_token: Some("very-secret-previous".to_owned().into()),
            access_token: "very-secret-access".to_owned().into(),
            issued_at: Utc::now(),
            expires_at: Utc::now(),
            scopes: vec![],
            requested_scopes: vec![],
            provider: "MailProvider/p".into(),
            client_id: "c".into(),
            mailbox: None,
            issuer: None,
            relay: None,
            ..GrantState::test()
        };
        let shown = format!("{state:?}");
        assert!(!shown.contains("very-secret"), "{shown}");
    }
}
