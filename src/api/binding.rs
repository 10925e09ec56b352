//! `MailboxBinding`: one mailbox, one grant, one published Secret.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{
    Condition, Protocol, SecretKeySelector, annotation_map, conditions_list_map, label_map, list_set, template_data_map,
};

/// Go `time.Duration` syntax, as `kubectl` users write it (`10m`, `1h30m`).
const GO_DURATION: &str = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$";
/// An OAuth scope token (RFC 6749 §3.3): printable, no spaces, no quotes or backslashes.
pub(crate) const SCOPE_TOKEN: &str = r"^[\x21\x23-\x5B\x5D-\x7E]+$";
/// A mail address: something, one `@`, a domain with a dot.
const MAILBOX: &str = r"^[^@\s]+@[^@\s]+\.[^@\s]+$";
/// A DNS-1123 subdomain (a Secret name).
const DNS_SUBDOMAIN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";

/// One mailbox whose OAuth token the operator obtains, refreshes and publishes into a Secret.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "mailoauth.io",
    version = "v1alpha1",
    kind = "MailboxBinding",
    namespaced,
    status = "MailboxBindingStatus",
    shortname = "mbx",
    category = "mailoauth",
    printcolumn = r#"{"name":"READY","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"MAILBOX","type":"string","jsonPath":".spec.mailbox"}"#,
    printcolumn = r#"{"name":"PROVIDER","type":"string","jsonPath":".spec.providerRef.name"}"#,
    printcolumn = r#"{"name":"STATUS","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"EXPIRES","type":"string","jsonPath":".status.token.expiresAt"}"#,
    printcolumn = r#"{"name":"AGE","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    printcolumn = r#"{"name":"RENEW","type":"string","priority":1,"jsonPath":".status.token.renewAt"}"#,
    printcolumn = r#"{"name":"SECRET","type":"string","priority":1,"jsonPath":".spec.secretName"}"#,
    printcolumn = r#"{"name":"IDENTITY","type":"string","priority":1,"jsonPath":".spec.identity"}"#,
    printcolumn = r#"{"name":"VERIFIED","type":"string","priority":1,"jsonPath":".status.conditions[?(@.type==\"MailboxVerified\")].reason"}"#,
    printcolumn = r#"{"name":"IMAP","type":"string","priority":1,"jsonPath":".status.verification.imap.result"}"#,
    printcolumn = r#"{"name":"SMTP","type":"string","priority":1,"jsonPath":".status.verification.smtp.result"}"#,
    printcolumn = r#"{"name":"POP3","type":"string","priority":1,"jsonPath":".status.verification.pop3.result"}"#,
    printcolumn = r#"{"name":"MESSAGE","type":"string","priority":1,"jsonPath":".status.conditions[?(@.type==\"Ready\")].message"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct MailboxBindingSpec {
    /// The provider registration to use.
    pub provider_ref: ProviderRef,
    /// The mailbox address: the identity, and XOAUTH2's `user=`.
    #[schemars(length(min = 3, max = 254), regex(pattern = MAILBOX))]
    pub mailbox: String,
    /// Other identities the provider may vouch for that belong to this mailbox's owner (a user
    /// principal name that differs from the address, an alias). When the provider says who
    /// consented (an id_token's `email`, `preferred_username` or `upn`), it must be `mailbox` or
    /// one of these, compared without case; otherwise nothing is stored (`IdentityMismatch`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 16),
        inner(length(min = 3, max = 254), regex(pattern = MAILBOX)),
        transform = list_set
    )]
    pub identity_aliases: Vec<String>,
    /// Whether the identity the provider vouches for is checked: `verified` (the default) pins
    /// it to `mailbox` or an alias, and a token for which no identity came back is refused;
    /// `unchecked` turns identity pinning off for this binding (the token is published whoever
    /// consented). A `ClusterMailProvider` allows `unchecked` only with
    /// `allowUncheckedIdentity: true`. Shown in the wide `IDENTITY` column.
    #[serde(default)]
    pub identity: IdentityCheck,
    /// Protocols the token is for; default scopes and servers come from the provider.
    #[serde(default = "default_protocols")]
    #[schemars(length(min = 1, max = 3), transform = list_set)]
    pub protocols: Vec<Protocol>,
    /// Scopes to request instead of the provider's defaults (compared as a set).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 512), regex(pattern = SCOPE_TOKEN)), transform = list_set)]
    pub scopes: Vec<String>,
    /// How the token is obtained: exactly one grant.
    pub grant: Grant,
    /// The Secret workloads mount.
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN))]
    pub secret_name: String,
    /// Extra labels, annotations and templated keys for the published Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_template: Option<SecretTemplate>,
    /// Minimum margin before expiry at which the token is renewed (Go duration, default `10m`,
    /// at most `24h`; the margin is never more than half the token's lifetime).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 32), regex(pattern = GO_DURATION))]
    pub refresh_before: Option<String>,
    /// Revoke the refresh token at the provider when the binding is deleted.
    #[serde(default)]
    pub revoke_on_delete: bool,
    /// Stop refreshing; the published Secret stays as it is.
    #[serde(default)]
    pub suspend: bool,
    /// Whether and how often the mailbox is checked by logging in to its mail servers with the
    /// token (`MailboxVerified`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<VerifySpec>,
    /// Password-only apps and devices send and read mail through the operator's relay with
    /// credentials the operator generates and publishes (`relay_username`, `relay_password`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<RelaySpec>,
}

/// Relay credentials for the binding's mailbox.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RelaySpec {
    /// Generate a relay password and publish `relay_username` (the mailbox) and `relay_password`
    /// (default `false`); `false` again removes them from the published Secret and forgets the
    /// password.
    #[serde(default)]
    pub enabled: bool,
    /// Envelope senders the relay accepts besides the mailbox (at most 32 addresses), e.g. a
    /// `noreply@` address the mailbox may send as.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(min = 3, max = 254), regex(pattern = MAILBOX)), transform = list_set)]
    pub senders: Vec<String>,
    /// How long the previous password keeps working after a rotation
    /// (`mailoauth.io/rotate-relay-password`), so that devices can be changed over (Go duration,
    /// at most `168h`, default `24h`; `0s` ends it at once, for a leaked password).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 2, max = 32), regex(pattern = GO_DURATION))]
    pub rotation_grace_period: Option<String>,
}

/// Mailbox verification: log in with the token to each protocol's server and out again
/// (nothing read, nothing sent).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VerifySpec {
    /// Check the mailbox (default `true`); `false` stops the checks and removes their results.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// How often the mailbox is checked again (Go duration, `1h` to `720h`, default `24h`);
    /// each binding's checks are spread by a jitter of up to a tenth of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 2, max = 32), regex(pattern = GO_DURATION))]
    pub interval: Option<String>,
}

impl Default for VerifySpec {
    fn default() -> Self {
        Self { enabled: true, interval: None }
    }
}

fn default_true() -> bool {
    true
}

fn default_protocols() -> Vec<Protocol> {
    vec![Protocol::Imap, Protocol::Smtp]
}

/// Whether a binding's identity is pinned (`spec.identity`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum IdentityCheck {
    /// The identity the provider vouches for must be the mailbox or one of its aliases; no
    /// identity at all is a failure, not a pass.
    #[default]
    Verified,
    /// Identity pinning is off for this binding, by the binding's explicit choice.
    Unchecked,
}

/// Which provider kind a binding refers to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ProviderKind {
    /// A `MailProvider` in the binding's namespace.
    #[default]
    MailProvider,
    /// A cluster-scoped `ClusterMailProvider`.
    ClusterMailProvider,
}

/// Reference to a provider.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProviderRef {
    /// `MailProvider` (default) or `ClusterMailProvider`.
    #[serde(default)]
    pub kind: ProviderKind,
    /// Name of the provider.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// How a binding obtains its token. Exactly one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", rename_all_fields = "camelCase")]
pub enum Grant {
    /// Device authorization (RFC 8628): a person types a code at a URL.
    DeviceCode {},
    /// Authorization code with PKCE through an operator-hosted callback, or a pasted redirect URL.
    AuthorizationCode {},
    /// Import a refresh token obtained elsewhere, once; rotated tokens are kept by the operator.
    RefreshToken {
        /// The Secret key holding the refresh token to import.
        secret_ref: SecretKeySelector,
    },
    /// App-only token (Microsoft `https://outlook.office365.com/.default`).
    ClientCredentials {},
    /// Google service account with domain-wide delegation, `sub` = mailbox.
    JwtBearer {},
}

impl Grant {
    /// The grant's name as written in the spec.
    pub fn name(&self) -> &'static str {
        match self {
            Grant::DeviceCode {} => "deviceCode",
            Grant::AuthorizationCode {} => "authorizationCode",
            Grant::RefreshToken { .. } => "refreshToken",
            Grant::ClientCredentials {} => "clientCredentials",
            Grant::JwtBearer {} => "jwtBearer",
        }
    }
}

/// Extra content for the published Secret, like External Secrets' `target.template`. Keys and
/// values follow Kubernetes' rules for labels, annotations and Secret keys; the operator checks
/// them before any token request (`InvalidSpec` names the offending key).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretTemplate {
    /// Extra labels: at most 64, each value a label value (at most 63 characters).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(transform = label_map)]
    pub labels: BTreeMap<String, String>,
    /// Extra annotations: at most 64, each value at most 4 KiB.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(transform = annotation_map)]
    pub annotations: BTreeMap<String, String>,
    /// Extra keys; `{{ name }}` is replaced by the published key `name` (`mailbox` also works).
    /// At most 16 keys, each value at most 16 KiB, and 64 KiB of text in all.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(transform = template_data_map)]
    pub data: BTreeMap<String, String>,
}

/// One word for humans.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Phase {
    /// Nothing obtained yet.
    Pending,
    /// A person has to complete an interactive grant.
    AwaitingAuthorization,
    /// The published token is valid.
    Ready,
    /// A refresh is under way or being retried while the token is still valid.
    Refreshing,
    /// The grant is dead; a person has to authorize again.
    ReauthorizationRequired,
    /// Something else stops the binding; see the `Ready` condition.
    Error,
    /// `spec.suspend` is set.
    Suspended,
}

/// Observed state of a binding.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MailboxBindingStatus {
    /// One word for humans.
    #[serde(default, deserialize_with = "crate::api::lenient::or_default", skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// `Ready`, `Authorized` and `RefreshFailing`.
    #[serde(default, deserialize_with = "crate::api::lenient::or_default")]
    #[schemars(transform = conditions_list_map)]
    pub conditions: Vec<Condition>,
    /// What a person has to do for an interactive grant.
    #[serde(default, deserialize_with = "crate::api::lenient::or_default", skip_serializing_if = "Option::is_none")]
    pub authorization: Option<AuthorizationStatus>,
    /// The published token's times and scopes.
    #[serde(default, deserialize_with = "crate::api::lenient::or_default", skip_serializing_if = "Option::is_none")]
    pub token: Option<TokenStatus>,
    /// The identity the provider vouched for, when it says.
    #[serde(default, deserialize_with = "crate::api::lenient::or_default", skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    /// When a token was last obtained.
    #[serde(default, deserialize_with = "crate::api::lenient::or_default", skip_serializing_if = "Option::is_none")]
    pub last_refresh_time: Option<DateTime<Utc>>,
    /// Token requests that failed in a row.
    #[serde(default, deserialize_with = "crate::api::lenient::or_default")]
    pub failed_attempts: u32,
    /// When the last token request failed.
    #[serde(default, deserialize_with = "crate::api::lenient::or_default", skip_serializing_if = "Option::is_none")]
    pub last_failure_time: Option<DateTime<Utc>>,
    /// After a transient failure: when the next token request may be made (jittered backoff, or
    /// the token endpoint's `Retry-After` when longer). Kept across restarts.
    #[serde(default, deserialize_with = "crate::api::lenient::or_default", skip_serializing_if = "Option::is_none")]
    pub next_attempt_time: Option<DateTime<Utc>>,
    /// The published Secret.
    #[serde(default, deserialize_with = "crate::api::lenient::or_default", skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
    /// The last `mailoauth.io/refresh-requested` value acted on.
    #[serde(default, deserialize_with = "crate::api::lenient::or_default", skip_serializing_if = "Option::is_none")]
    pub last_refresh_request: Option<String>,
    /// The last `mailoauth.io/reauthorize-requested` value acted on.
    #[serde(default, deserialize_with = "crate::api::lenient::or_default", skip_serializing_if = "Option::is_none")]
    pub last_reauthorize_request: Option<String>,
    /// The generation this status was computed from.
    #[serde(default, deserialize_with = "crate::api::lenient::or_default", skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The last mailbox check per protocol. Written by the verifier under its own field manager
    /// (`mail-oauth-operator-verify`), with the `MailboxVerified` condition.
    #[serde(default, deserialize_with = "crate::api::lenient::or_default", skip_serializing_if = "Option::is_none")]
    pub verification: Option<VerificationStatus>,
    /// The relay credentials published (never the password), when `spec.relay.enabled`.
    #[serde(default, deserialize_with = "crate::api::lenient::or_default", skip_serializing_if = "Option::is_none")]
    pub relay: Option<RelayStatus>,
}

/// The relay credentials as published (the password only in the Secret).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RelayStatus {
    /// The user name clients log in with (`relay_username`).
    pub username: String,
    /// When the current password was generated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_issued_at: Option<DateTime<Utc>>,
    /// The last `mailoauth.io/rotate-relay-password` value acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_rotate_request: Option<String>,
    /// Until when the password before the last rotation still works.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_password_valid_until: Option<DateTime<Utc>>,
}

/// The last mailbox check per protocol, and what it was made for.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VerificationStatus {
    /// IMAP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub imap: Option<ProtocolCheck>,
    /// SMTP submission.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smtp: Option<ProtocolCheck>,
    /// POP3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pop3: Option<ProtocolCheck>,
    /// The last `mailoauth.io/verify-requested` value acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_request: Option<String>,
    /// A digest of what the last check was made for (mailbox, grant, identity, scopes,
    /// protocols, servers): a change makes a new check due at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub basis: Option<String>,
}

impl VerificationStatus {
    /// The check of `protocol`.
    pub fn get(&self, protocol: Protocol) -> Option<&ProtocolCheck> {
        match protocol {
            Protocol::Imap => self.imap.as_ref(),
            Protocol::Smtp => self.smtp.as_ref(),
            Protocol::Pop3 => self.pop3.as_ref(),
        }
    }

    /// Sets the check of `protocol`.
    pub fn set(&mut self, protocol: Protocol, check: Option<ProtocolCheck>) {
        match protocol {
            Protocol::Imap => self.imap = check,
            Protocol::Smtp => self.smtp = check,
            Protocol::Pop3 => self.pop3 = check,
        }
    }
}

/// One protocol's last check.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProtocolCheck {
    /// `Verified`, or why not (`SmtpAuthDisabled`, `ProtocolDisabled`, `MailboxAccessDenied`,
    /// `LoginRefused`, `ServerUnreachable`, `TLSFailed`, `NoServer`).
    pub result: String,
    /// When the check was made.
    pub checked_at: DateTime<Utc>,
    /// What happened and what to do (server text scrubbed, never a token). (No schema default:
    /// Kubernetes 1.20 refuses an empty-string default.)
    pub message: String,
}

/// What a person has to do to complete an interactive grant.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationStatus {
    /// `deviceCode` or `authorizationCode`.
    pub method: String,
    /// The code to type (device flow).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_code: Option<String>,
    /// Where to type it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification_uri: Option<String>,
    /// The same with the code filled in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification_uri_complete: Option<String>,
    /// The operator-hosted authorize link (authorization code flow).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// When the code or link stops working.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
}

/// Times and scopes of the published token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TokenStatus {
    /// When the token was issued.
    pub issued_at: DateTime<Utc>,
    /// When it expires.
    pub expires_at: DateTime<Utc>,
    /// When the operator renews it.
    pub renew_at: DateTime<Utc>,
    /// Scopes granted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,
}
