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

/// Likewise: more was labelled or annotated on the Secret than the cache keeps (so it is read).
pub const TRIMMED: &str = "internal.mailoauth.io/trimmed";

/// Likewise: the data keys the operator's field manager owns. A key someone else removed or
/// replaced is no longer among them (managed fields follow the object).
pub const OWN_KEYS: &str = "internal.mailoauth.io/own-data-keys";

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
    let mut set: Vec<std::borrow::Cow<'_, str>> =
        scopes.iter().map(|s| crate::policy::provider::scope_key(s)).collect();
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

/// The data keys of a Secret that field managers other than `manager` own (`ours` false), or
/// that `manager` owns (`ours` true), from its managed fields (`f:data` entries).
pub fn data_keys(meta: &ObjectMeta, manager: &str, ours: bool) -> Vec<String> {
    let mut keys: Vec<String> = meta
        .managed_fields
        .iter()
        .flatten()
        .filter(|m| (m.manager.as_deref() == Some(manager)) == ours)
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

fn keys<'a>(meta: &'a ObjectMeta, key: &str) -> std::collections::BTreeSet<&'a str> {
    annotation(meta, key).unwrap_or_default().split(',').filter(|k| !k.is_empty()).collect()
}

/// Whether a cached Secret is this binding's and holds the data keys it says it was written with
/// ([`OWNED_KEYS_ANNOTATION`]), all still the operator's: none removed or taken over by anyone.
pub fn untouched(meta: &ObjectMeta, uid: &str) -> bool {
    let owned = controller_of(meta).is_some_and(|o| o.uid == uid);
    let written = keys(meta, OWNED_KEYS_ANNOTATION);
    let foreign = keys(meta, FOREIGN_KEYS);
    owned
        && annotation(meta, TRIMMED).is_none()
        && !written.is_empty()
        && written == keys(meta, OWN_KEYS)
        && written.is_disjoint(&foreign)
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
    // The relay credentials: nothing asked for (a rotation), no grace period over.
    let relay = crate::policy::relay::settled(b, seen.now);
    if !settled || due || relay.is_err() {
        return None;
    }
    let grant_digest = annotation(seen.grant, GRANT_DIGEST_ANNOTATION)?;
    let grant_ok = untouched(seen.grant, uid) && annotation(seen.grant, GRANT_FOR_ANNOTATION) == Some(seen.grant_for);
    // (The published keys the operator wrote: the source digest covers what decides them, the
    // template and the protocols.)
    let carries = |want: &BTreeMap<String, String>, have: &Option<BTreeMap<String, String>>| {
        want.iter().all(|(k, v)| have.as_ref().and_then(|h| h.get(k)) == Some(v))
    };
    let published_ok = untouched(seen.published, uid)
        && annotation(seen.published, SOURCE_ANNOTATION) == Some(source(grant_digest, seen.inputs).as_str())
        && carries(seen.published_labels, &seen.published.labels)
        && carries(seen.published_annotations, &seen.published.annotations);
    let until = [Some(token.renew_at), Some(token.expires_at), relay.ok().flatten()].into_iter().flatten().min()?;
    (grant_ok && published_ok).then_some(until)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

    use super::*;
    use crate::api::MailboxBindingSpec;
    use crate::policy::binding::Outcome;

    fn t(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + secs, 0).unwrap_or_default()
    }

    fn binding() -> MailboxBinding {
        let spec: MailboxBindingSpec = serde_json::from_value(serde_json::json!({
            "providerRef": {"name": "idp"}, "mailbox": "a@example.com", "secretName": "a-mail",
            "grant": {"clientCredentials": {}},
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        let mut b = MailboxBinding::new("a", spec);
        b.metadata.uid = Some("uid-a".into());
        b.metadata.generation = Some(1);
        let grant = crate::policy::grant_state::GrantState {
            refresh_token: None,
            issued_at: t(0),
            expires_at: t(3600),
            scopes: vec![],
            requested_scopes: vec![],
            client_id: "c".into(),
            issuer: None,
            relay: None,
            ..crate::policy::grant_state::GrantState::test()
        };
        b.status = Some(crate::policy::binding::next_status(t(0), &b, Some(&grant), &Outcome::Refreshed));
        b
    }

    fn meta(annotations: &[(&str, &str)]) -> ObjectMeta {
        ObjectMeta {
            annotations: Some(annotations.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()),
            owner_references: Some(vec![OwnerReference {
                api_version: "mailoauth.io/v1alpha1".into(),
                kind: "MailboxBinding".into(),
                name: "a".into(),
                uid: "uid-a".into(),
                controller: Some(true),
                block_owner_deletion: None,
            }]),
            ..ObjectMeta::default()
        }
    }

    fn judge(b: &MailboxBinding, now: DateTime<Utc>, grant: &ObjectMeta, published: &ObjectMeta) -> bool {
        let none = BTreeMap::new();
        at_rest(&Seen {
            now,
            binding: b,
            grant,
            published,
            grant_for: "for",
            inputs: "inputs",
            published_labels: &none,
            published_annotations: &none,
        })
        .is_some()
    }

    fn secrets() -> (ObjectMeta, ObjectMeta) {
        let grant = meta(&[
            (GRANT_DIGEST_ANNOTATION, "g1"),
            (GRANT_FOR_ANNOTATION, "for"),
            (OWNED_KEYS_ANNOTATION, "access_token,expires_at"),
            (OWN_KEYS, "access_token,expires_at"),
        ]);
        let made_from = source("g1", "inputs");
        let published =
            meta(&[(SOURCE_ANNOTATION, made_from.as_str()), (OWNED_KEYS_ANNOTATION, "xoauth2"), (OWN_KEYS, "xoauth2")]);
        (grant, published)
    }

    #[test]
    fn a_ready_binding_with_its_secrets_as_written_is_at_rest_until_its_renewal() {
        let b = binding();
        let (grant, published) = secrets();
        assert!(judge(&b, t(60), &grant, &published));
        assert!(!judge(&b, t(3600), &grant, &published), "due (expired)");
    }

    #[test]
    fn anything_asked_for_changed_or_touched_is_not_at_rest() {
        let (grant, published) = secrets();
        let mut asked = binding();
        asked.metadata.annotations = Some([("mailoauth.io/refresh-requested".to_owned(), "1".to_owned())].into());
        assert!(!judge(&asked, t(60), &grant, &published), "a refresh asked for");
        let mut edited = binding();
        edited.metadata.generation = Some(2);
        assert!(!judge(&edited, t(60), &grant, &published), "a spec not observed yet");
        let mut other_for = grant.clone();
        other_for.annotations.get_or_insert_with(BTreeMap::new).insert(GRANT_FOR_ANNOTATION.into(), "other".into());
        assert!(!judge(&binding(), t(60), &other_for, &published), "the provider or scopes changed");
        let mut removed = grant.clone();
        removed.annotations.get_or_insert_with(BTreeMap::new).insert(OWN_KEYS.into(), "access_token".into());
        assert!(!judge(&binding(), t(60), &removed, &published), "a key removed by someone");
        let mut taken = published.clone();
        taken.annotations.get_or_insert_with(BTreeMap::new).insert(FOREIGN_KEYS.into(), "xoauth2".into());
        assert!(!judge(&binding(), t(60), &grant, &taken), "a key another manager wrote");
        let mut stale = published.clone();
        stale.annotations.get_or_insert_with(BTreeMap::new).insert(SOURCE_ANNOTATION.into(), "old".into());
        assert!(!judge(&binding(), t(60), &grant, &stale), "made from another grant or inputs");
        let mut foreign = grant;
        foreign.owner_references = None;
        assert!(!judge(&binding(), t(60), &foreign, &published), "not this binding's");
    }

    #[test]
    fn grant_for_treats_scope_sets_and_both_exchange_spellings_alike() {
        let a = grant_for(
            "g",
            "p",
            "c",
            Some("u"),
            &["b".into(), "https://outlook.office.com/IMAP.AccessAsUser.All".into()],
        );
        let b = grant_for(
            "g",
            "p",
            "c",
            Some("u"),
            &["https://outlook.office365.com/IMAP.AccessAsUser.All".into(), "b".into(), "b".into()],
        );
        assert_eq!(a, b);
        assert_ne!(a, grant_for("g", "p", "c", Some("v"), &["b".into()]));
    }
}
