//! A binding at rest: Ready, nothing asked for, not due, and both its Secrets (seen by their
//! metadata alone) as the operator last wrote them for the spec and provider as they are now.
//! Such a binding needs no Secret read and no write: a restart re-checks it from the caches.
//!
//! What the decision would need from the Secrets' data is recorded in digests the operator writes
//! beside the data ([`GRANT_DIGEST_ANNOTATION`], [`GRANT_FOR_ANNOTATION`] on the grant state,
//! [`SOURCE_ANNOTATION`] on the published Secret); a change by anyone else to the data shows in
//! the Secret's managed fields ([`FOREIGN_KEYS`]), so such a Secret is read.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use sha2::{Digest, Sha256};

use crate::api::common::find_condition;
use crate::api::{
    AUTHORIZATION_RESPONSE_ANNOTATION, ConditionStatus, GRANT_DIGEST_ANNOTATION, GRANT_FOR_ANNOTATION, MailboxBinding,
    OWNED_KEYS_ANNOTATION, SOURCE_ANNOTATION,
};
use crate::policy::binding::{conditions, reauthorize_requested, refresh_requested};
use crate::policy::ownership::controller_of;

/// An annotation set only in the operator's memory (never written) on a cached Secret's metadata:
/// the data keys some other field manager owns (comma separated).
pub const FOREIGN_KEYS: &str = "internal.mailoauth.io/foreign-data-keys";

fn hex(bytes: &[u8]) -> String {
    bytes.iter().take(16).map(|b| format!("{b:02x}")).collect()
}

fn digest(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.len().to_le_bytes());
        h.update(p.as_bytes());
    }
    hex(&h.finalize())
}

/// The digest of a grant state's data.
pub fn grant_digest(data: &BTreeMap<String, String>) -> String {
    let flat: Vec<&str> = data.iter().flat_map(|(k, v)| [k.as_str(), v.as_str()]).collect();
    digest(&flat)
}

/// What a grant is for: the binding's grant (as JSON), the provider key, client id, token
/// endpoint and the requested scopes (as a set).
pub fn grant_for(
    grant_spec: &str,
    provider: &str,
    client_id: &str,
    token_url: Option<&str>,
    scopes: &[String],
) -> String {
    let mut set: Vec<&str> = scopes.iter().map(String::as_str).collect();
    set.sort_unstable();
    set.dedup();
    let joined = set.join(" ");
    digest(&[grant_spec, provider, client_id, token_url.unwrap_or_default(), &joined])
}

/// What a published Secret is made from: the grant state's digest and the publishing inputs (the
/// binding's mailbox, protocols and template, the provider's servers, as JSON).
pub fn source(grant_digest: &str, inputs: &str) -> String {
    digest(&[grant_digest, inputs])
}

/// The data keys of a Secret that field managers other than `manager` own, from its managed
/// fields (`f:data` entries).
pub fn foreign_keys(meta: &ObjectMeta, manager: &str) -> Vec<String> {
    let mut keys: Vec<String> = meta
        .managed_fields
        .iter()
        .flatten()
        .filter(|m| m.manager.as_deref() != Some(manager))
        .filter_map(|m| m.fields_v1.as_ref())
        .filter_map(|f| f.0.get("f:data").and_then(|d| d.as_object()))
        .flat_map(|d| d.keys().filter_map(|k| k.strip_prefix("f:")).map(str::to_owned).collect::<Vec<_>>())
        .collect();
    keys.sort_unstable();
    keys.dedup();
    keys
}

fn annotation<'a>(meta: &'a ObjectMeta, key: &str) -> Option<&'a str> {
    meta.annotations.as_ref()?.get(key).map(String::as_str)
}

/// Whether a cached Secret is this binding's and untouched by others in the keys `ours`.
fn untouched(meta: &ObjectMeta, uid: &str, ours: &[&str]) -> bool {
    let owned = controller_of(meta).is_some_and(|o| o.uid == uid);
    let foreign = annotation(meta, FOREIGN_KEYS).unwrap_or_default();
    owned && !foreign.split(',').filter(|k| !k.is_empty()).any(|k| ours.is_empty() || ours.contains(&k))
}

/// What the at-rest judgement is given.
pub struct Seen<'a> {
    /// Now.
    pub now: DateTime<Utc>,
    /// The binding as cached.
    pub binding: &'a MailboxBinding,
    /// The grant-state Secret's cached metadata.
    pub grant: &'a ObjectMeta,
    /// The published Secret's cached metadata.
    pub published: &'a ObjectMeta,
    /// What the grant would be for now ([`grant_for`] of the spec and the usable provider).
    pub grant_for: &'a str,
    /// The publishing inputs now (see [`source`]).
    pub inputs: &'a str,
    /// The labels the published Secret must carry (ours and the template's).
    pub published_labels: &'a BTreeMap<String, String>,
    /// The annotations the published Secret must carry (the template's; ours are judged apart).
    pub published_annotations: &'a BTreeMap<String, String>,
}

/// When the binding is at rest: the time to come back (its renewal, or expiry if earlier). `None`
/// when anything may need a decision, a read or a write.
pub fn at_rest(seen: &Seen<'_>) -> Option<DateTime<Utc>> {
    let b = seen.binding;
    let status = b.status.as_ref()?;
    let token = status.token.as_ref()?;
    let uid = b.metadata.uid.as_deref()?;
    let is = |type_: &str, want: ConditionStatus| {
        find_condition(&status.conditions, type_).is_some_and(|c| c.status == want)
    };
    let current = status.observed_generation == b.metadata.generation
        && find_condition(&status.conditions, conditions::READY)
            .is_some_and(|c| c.observed_generation == b.metadata.generation);
    let settled = !b.spec.suspend
        && current
        && is(conditions::READY, ConditionStatus::True)
        && is(conditions::AUTHORIZED, ConditionStatus::True)
        && !is(conditions::REFRESH_FAILING, ConditionStatus::True)
        && status.failed_attempts == 0
        && status.authorization.is_none()
        && refresh_requested(b).is_none()
        && reauthorize_requested(b).is_none()
        && b.metadata.annotations.as_ref().is_none_or(|a| !a.contains_key(AUTHORIZATION_RESPONSE_ANNOTATION))
        && status.secret_name.as_deref() == Some(b.spec.secret_name.as_str());
    let due = seen.now >= token.renew_at || seen.now >= token.expires_at;
    if !settled || due {
        return None;
    }
    let grant_digest = annotation(seen.grant, GRANT_DIGEST_ANNOTATION)?;
    let grant_ok =
        untouched(seen.grant, uid, &[]) && annotation(seen.grant, GRANT_FOR_ANNOTATION) == Some(seen.grant_for);
    // The keys the operator wrote (the source digest covers what decides them: the template and
    // the protocols).
    let keys: Vec<&str> =
        annotation(seen.published, OWNED_KEYS_ANNOTATION).map(|k| k.split(',').collect()).unwrap_or_default();
    let carries = |want: &BTreeMap<String, String>, have: &Option<BTreeMap<String, String>>| {
        want.iter().all(|(k, v)| have.as_ref().and_then(|h| h.get(k)) == Some(v))
    };
    let published_ok = untouched(seen.published, uid, &keys)
        && annotation(seen.published, SOURCE_ANNOTATION) == Some(source(grant_digest, seen.inputs).as_str())
        && carries(seen.published_labels, &seen.published.labels)
        && carries(seen.published_annotations, &seen.published.annotations);
    (grant_ok && published_ok).then_some(std::cmp::min(token.renew_at, token.expires_at))
}
