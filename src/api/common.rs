//! Small types shared by the kinds: Secret references, protocols, server addresses, conditions.

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A key in a Secret of the resource's own namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeySelector {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key inside the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// A mail protocol a binding's token is used for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// IMAP (XOAUTH2 / OAUTHBEARER).
    Imap,
    /// SMTP submission.
    Smtp,
    /// POP3.
    Pop3,
}

impl Protocol {
    /// Every protocol, in the order keys are written.
    pub const ALL: [Protocol; 3] = [Protocol::Imap, Protocol::Smtp, Protocol::Pop3];

    /// The lower-case name used in Secret keys (`imap_host`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Imap => "imap",
            Protocol::Smtp => "smtp",
            Protocol::Pop3 => "pop3",
        }
    }
}

/// A mail server's host and port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServerAddress {
    /// Host name or address.
    #[schemars(length(min = 1, max = 253))]
    pub host: String,
    /// TCP port.
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,
    /// How the connection is protected: `implicit` (TLS from the first byte), `starttls`, or
    /// `none` (loopback or private addresses only, with `--allow-private-endpoints`: the token
    /// would cross the network in clear). Absent: 993, 995 and 465 are implicit, others STARTTLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ServerTls>,
}

/// How a mail server connection is protected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ServerTls {
    /// TLS from the first byte.
    Implicit,
    /// A plain greeting, then STARTTLS (STLS for POP3), which must succeed.
    Starttls,
    /// No TLS.
    None,
}

impl ServerTls {
    /// The mode as written in a spec (`implicit`, `starttls`, `none`).
    pub fn as_str(self) -> &'static str {
        match self {
            ServerTls::Implicit => "implicit",
            ServerTls::Starttls => "starttls",
            ServerTls::None => "none",
        }
    }
}

/// Status of a condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ConditionStatus {
    /// The condition holds.
    True,
    /// The condition does not hold.
    False,
    /// Not known yet.
    Unknown,
}

/// A status condition, shaped like `metav1.Condition`, with chrono time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Type of the condition (`Ready`, `Authorized`, ...).
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: ConditionStatus,
    /// A CamelCase reason; see the project's docs/conditions.md for each reason and its fix.
    pub reason: String,
    /// What happened and how to fix it, for humans. (No schema default: Kubernetes 1.20 refuses
    /// an empty-string default.)
    pub message: String,
    /// When the status last changed.
    pub last_transition_time: DateTime<Utc>,
    /// The generation this condition was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

impl Condition {
    /// Whether the condition is `True`.
    pub fn is_true(&self) -> bool {
        self.status == ConditionStatus::True
    }
}

/// Finds a condition by type.
pub fn find_condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Schema transform for `conditions`: a list keyed by `type`.
pub(crate) fn conditions_list_map(schema: &mut schemars::Schema) {
    schema.insert("x-kubernetes-list-type".into(), "map".into());
    schema.insert("x-kubernetes-list-map-keys".into(), serde_json::json!(["type"]));
}

/// Schema transform for a list of strings whose order carries no meaning and whose duplicates
/// would only cost memory: `x-kubernetes-list-type: set`, so the apiserver refuses a duplicate
/// (`Duplicate value`).
pub(crate) fn list_set(schema: &mut schemars::Schema) {
    schema.insert("x-kubernetes-list-type".into(), "set".into());
}

/// Longest label value (Kubernetes' rule).
pub const MAX_LABEL_VALUE: usize = 63;
/// A label value: empty, or alphanumerics at both ends with `-`, `_` and `.` between.
pub const LABEL_VALUE: &str = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$";
/// Longest annotation value a template may set.
pub const MAX_ANNOTATION_VALUE: usize = 4 * 1024;
/// Longest templated Secret value.
pub const MAX_TEMPLATE_VALUE: usize = 16 * 1024;
/// Most entries in a template's `labels` and `annotations`, and in a selector's `matchLabels`.
pub const MAX_MAP_ENTRIES: usize = 64;
/// Most templated Secret keys.
pub const MAX_TEMPLATE_KEYS: usize = 16;

/// A map of strings with at most `entries` entries, each value at most `max` long (and matching
/// `pattern` if given). Keys cannot be bounded by the schema of Kubernetes 1.20 (it has neither
/// `propertyNames` nor `patternProperties`); the operator checks them.
fn bounded_string_map(schema: &mut schemars::Schema, entries: usize, max: usize, pattern: Option<&str>) {
    let mut value = serde_json::json!({"type": "string", "maxLength": max});
    if let (Some(p), Some(obj)) = (pattern, value.as_object_mut()) {
        obj.insert("pattern".into(), p.into());
    }
    schema.insert("maxProperties".into(), entries.into());
    schema.insert("additionalProperties".into(), value);
}

/// Schema transform for label maps: at most 64 entries, each value a valid label value.
pub(crate) fn label_map(schema: &mut schemars::Schema) {
    bounded_string_map(schema, MAX_MAP_ENTRIES, MAX_LABEL_VALUE, Some(LABEL_VALUE));
}

/// Schema transform for a template's annotations: at most 64 entries of at most 4 KiB each.
pub(crate) fn annotation_map(schema: &mut schemars::Schema) {
    bounded_string_map(schema, MAX_MAP_ENTRIES, MAX_ANNOTATION_VALUE, None);
}

/// Schema transform for a template's data: at most 16 keys of at most 16 KiB each.
pub(crate) fn template_data_map(schema: &mut schemars::Schema) {
    bounded_string_map(schema, MAX_TEMPLATE_KEYS, MAX_TEMPLATE_VALUE, None);
}
