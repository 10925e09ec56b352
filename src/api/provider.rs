//! `MailProvider` and `ClusterMailProvider`: one OAuth client registration each.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{Condition, ServerAddress, conditions_list_map, label_map, list_set};

/// Pattern for URLs the operator sends credentials to: https only.
const HTTPS_URL: &str = r"^https://[^\s/?#]+([/?#]\S*)?$";
/// A DNS-1123 label (a namespace name).
const DNS_LABEL: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";
/// Most client secrets a provider may list (each is a Secret read per token request at worst).
pub const MAX_CLIENT_SECRET_REFS: usize = 8;

/// One OAuth client registration (an Entra ID app, a Google Cloud OAuth client, or any OAuth 2.0
/// server) serving bindings in its own namespace.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "mailoauth.io",
    version = "v1alpha1",
    kind = "MailProvider",
    namespaced,
    status = "MailProviderStatus",
    shortname = "mprov",
    category = "mailoauth",
    printcolumn = r#"{"name":"READY","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"REASON","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"CLIENT","type":"string","jsonPath":".spec.clientId"}"#,
    printcolumn = r#"{"name":"SECRET EXPIRES","type":"string","jsonPath":".status.clientSecretExpiresAt"}"#,
    printcolumn = r#"{"name":"AGE","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    printcolumn = r#"{"name":"MESSAGE","type":"string","priority":1,"jsonPath":".status.conditions[?(@.type==\"Ready\")].message"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct MailProviderSpec {
    /// The provider preset: exactly one of `google`, `microsoft`, `generic`.
    #[serde(flatten)]
    pub preset: Preset,
    /// The OAuth client id (Entra application id, Google client id, ...).
    #[schemars(length(min = 1, max = 512))]
    pub client_id: String,
    /// How the client authenticates at the token endpoint; omitted means a public client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_authentication: Option<ClientAuthentication>,
    /// Google service-account key for domain-wide delegation (the `jwtBearer` grant).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_key_ref: Option<super::SecretKeySelector>,
}

/// The admin's shared client registration. Its Secrets live in the operator's cluster-resource
/// namespace; `allowedNamespaces` limits who may bind to it.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "mailoauth.io",
    version = "v1alpha1",
    kind = "ClusterMailProvider",
    status = "MailProviderStatus",
    shortname = "cmprov",
    category = "mailoauth",
    printcolumn = r#"{"name":"READY","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"REASON","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"CLIENT","type":"string","jsonPath":".spec.clientId"}"#,
    printcolumn = r#"{"name":"SECRET EXPIRES","type":"string","jsonPath":".status.clientSecretExpiresAt"}"#,
    printcolumn = r#"{"name":"AGE","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    printcolumn = r#"{"name":"MESSAGE","type":"string","priority":1,"jsonPath":".status.conditions[?(@.type==\"Ready\")].message"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ClusterMailProviderSpec {
    /// The client registration, as in `MailProvider`.
    #[serde(flatten)]
    pub provider: MailProviderSpec,
    /// Which namespaces may bind to this provider. Omitted means all; `{}` (or one whose fields
    /// the apiserver pruned as unknown) and a selector without requirements admit none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_namespaces: Option<AllowedNamespaces>,
    /// Scopes a binding may request; empty means any. A binding asking for another scope is
    /// refused with `ProviderNotAllowed` before anything is requested.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 64),
        inner(length(min = 1, max = 512), regex(pattern = super::binding::SCOPE_TOKEN)),
        transform = list_set
    )]
    pub allowed_scopes: Vec<String>,
    /// Mailboxes a binding may name: domains (`contoso.com`) or globs (`*@contoso.com`,
    /// `scan-*@contoso.com`), case-insensitive; empty means any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), inner(length(min = 1, max = 254), regex(pattern = r"^[^\s]+$")), transform = list_set)]
    pub allowed_mailboxes: Vec<String>,
    /// Whether bindings of this provider may set `identity: unchecked` (turn identity pinning
    /// off). Default `false`: such a binding is refused.
    #[serde(default)]
    pub allow_unchecked_identity: bool,
    /// Whether a binding's `identityAliases` may name mailboxes outside `allowedMailboxes`.
    /// Default `false`: every alias must match `allowedMailboxes` as `mailbox` must.
    #[serde(default)]
    pub allow_identity_aliases: bool,
}

/// Namespaces allowed to use a `ClusterMailProvider`: listed names and/or a label selector.
/// A namespace matching either is allowed. A selector with no requirement at all matches *no*
/// namespace (unlike Kubernetes' usual "empty selects everything"), so a selector whose
/// requirements were mistyped or pruned never widens access.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AllowedNamespaces {
    /// Namespace names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1024), inner(length(min = 1, max = 63), regex(pattern = DNS_LABEL)), transform = list_set)]
    pub names: Vec<String>,
    /// Namespaces whose labels match this selector.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
}

/// A Kubernetes label selector: `matchLabels` and `matchExpressions`, all of which must hold.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelector {
    /// Labels a namespace must carry, all of them (at most 64).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(transform = label_map)]
    pub match_labels: BTreeMap<String, String>,
    /// Requirements on labels, all of which must hold.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub match_expressions: Vec<LabelSelectorRequirement>,
}

/// One requirement of a label selector.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelectorRequirement {
    /// The label key.
    #[schemars(length(min = 1, max = 317))]
    pub key: String,
    /// How the label relates to `values`.
    pub operator: SelectorOperator,
    /// Values for `In` and `NotIn`; empty for `Exists` and `DoesNotExist`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 256),
        inner(length(max = 63), regex(pattern = super::common::LABEL_VALUE)),
        transform = list_set
    )]
    pub values: Vec<String>,
}

/// Label selector operators.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum SelectorOperator {
    /// The label's value is one of `values`.
    In,
    /// The label is absent or its value is none of `values`.
    NotIn,
    /// The label is present.
    Exists,
    /// The label is absent.
    DoesNotExist,
}

/// Which provider preset a registration uses.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Preset {
    /// Google Workspace / Gmail.
    Google(GooglePreset),
    /// Microsoft 365 / Exchange Online.
    Microsoft(MicrosoftPreset),
    /// Any OAuth 2.0 server.
    Generic(Box<GenericPreset>),
}

/// Google has nothing to configure: endpoints, scope and servers are known.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct GooglePreset {}

/// Microsoft identity platform (Entra ID).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MicrosoftPreset {
    /// `common`, `organizations`, `consumers`, a tenant id or a verified domain.
    #[serde(default = "default_tenant")]
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9.-]*$"))]
    pub tenant: String,
}

impl Default for MicrosoftPreset {
    fn default() -> Self {
        Self { tenant: default_tenant() }
    }
}

fn default_tenant() -> String {
    "organizations".to_owned()
}

/// Any OAuth 2.0 server: OIDC discovery from `issuerUrl`, or explicit URLs (explicit wins).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GenericPreset {
    /// Issuer for discovery: OpenID Connect's `/.well-known/openid-configuration`, or, when the
    /// server has none, RFC 8414's `/.well-known/oauth-authorization-server`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048), regex(pattern = HTTPS_URL))]
    pub issuer_url: Option<String>,
    /// Authorization endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048), regex(pattern = HTTPS_URL))]
    pub authorization_url: Option<String>,
    /// Token endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048), regex(pattern = HTTPS_URL))]
    pub token_url: Option<String>,
    /// Device authorization endpoint (RFC 8628).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048), regex(pattern = HTTPS_URL))]
    pub device_authorization_url: Option<String>,
    /// Revocation endpoint (RFC 7009).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048), regex(pattern = HTTPS_URL))]
    pub revocation_url: Option<String>,
    /// Extra PEM trust roots for the endpoints above (at most 64 KiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 65536))]
    pub ca_bundle: Option<String>,
    /// Scopes per protocol.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scopes: Option<ProtocolScopes>,
    /// Mail servers per protocol, published to workloads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub servers: Option<ProtocolServers>,
}

/// Scopes to request for each protocol.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProtocolScopes {
    /// Scopes for IMAP.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 64),
        inner(length(min = 1, max = 512), regex(pattern = super::binding::SCOPE_TOKEN)),
        transform = list_set
    )]
    pub imap: Vec<String>,
    /// Scopes for SMTP.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 64),
        inner(length(min = 1, max = 512), regex(pattern = super::binding::SCOPE_TOKEN)),
        transform = list_set
    )]
    pub smtp: Vec<String>,
    /// Scopes for POP3.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 64),
        inner(length(min = 1, max = 512), regex(pattern = super::binding::SCOPE_TOKEN)),
        transform = list_set
    )]
    pub pop3: Vec<String>,
}

/// Mail servers for each protocol.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProtocolServers {
    /// IMAP server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub imap: Option<ServerAddress>,
    /// SMTP submission server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smtp: Option<ServerAddress>,
    /// POP3 server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pop3: Option<ServerAddress>,
}

/// How the client authenticates at the token endpoint.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClientAuthentication {
    /// Client secrets, tried in order (zero-downtime rotation: add the new one first). At most 8,
    /// no two naming the same Secret key.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8), transform = client_secret_refs_map)]
    pub client_secret_refs: Vec<ClientSecretRef>,
    /// A Secret with `tls.crt`/`tls.key` for `privateKeyJwt`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_ref: Option<LocalObjectReference>,
    /// The method; defaults to `clientSecretPost` with secrets, `privateKeyJwt` with a certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<ClientAuthMethod>,
}

/// A client secret in a Secret, with its expiry when known.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClientSecretRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key inside the Secret.
    #[serde(default = "default_client_secret_key")]
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
    /// When the secret expires at the provider (Entra: 24 months at most), RFC 3339. Kept as
    /// text and checked by the operator, so that a value the apiserver accepts but the operator
    /// cannot read is reported in status instead of stopping the watch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64), extend("format" = "date-time"))]
    pub expires_at: Option<String>,
}

/// Schema transform for `clientSecretRefs`: a list keyed by `name` and `key` (`key` has a
/// default), so that the apiserver refuses two refs to the same Secret key.
fn client_secret_refs_map(schema: &mut schemars::Schema) {
    schema.insert("x-kubernetes-list-type".into(), "map".into());
    schema.insert("x-kubernetes-list-map-keys".into(), serde_json::json!(["name", "key"]));
}

fn default_client_secret_key() -> String {
    "client-secret".to_owned()
}

/// A Secret in the resource's own namespace.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct LocalObjectReference {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// Client authentication methods (RFC 6749 §2.3, RFC 7523).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum ClientAuthMethod {
    /// `client_secret` in the form body.
    ClientSecretPost,
    /// HTTP Basic with the client id and secret.
    ClientSecretBasic,
    /// A JWT signed with the certificate's key.
    PrivateKeyJwt,
}

/// Observed state of a provider.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MailProviderStatus {
    /// `Ready` and `ClientSecretExpiring`.
    #[serde(default, deserialize_with = "crate::api::lenient::or_default")]
    #[schemars(transform = conditions_list_map)]
    pub conditions: Vec<Condition>,
    /// Resolved endpoints.
    #[serde(default, deserialize_with = "crate::api::lenient::or_default", skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<Endpoints>,
    /// Earliest known client-secret expiry.
    #[serde(default, deserialize_with = "crate::api::lenient::or_default", skip_serializing_if = "Option::is_none")]
    pub client_secret_expires_at: Option<DateTime<Utc>>,
    /// The generation this status was computed from.
    #[serde(default, deserialize_with = "crate::api::lenient::or_default", skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Resolved OAuth endpoints.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Endpoints {
    /// Authorization endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorization: Option<String>,
    /// Token endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// Device authorization endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_authorization: Option<String>,
    /// Revocation endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revocation: Option<String>,
    /// Userinfo endpoint (asked who consented when a token response has no id_token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub userinfo: Option<String>,
}
