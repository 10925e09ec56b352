//! Who may write a Secret: the operator writes only Secrets it controls for this binding, and two
//! bindings never share one Secret (the older binding keeps it).

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

use crate::api::{BINDING_LABEL, MANAGED_BY_LABEL, MANAGED_BY_VALUE};

/// What the ownership check needs to know of another binding in the namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    /// The binding's name.
    pub binding: String,
    /// When it was created.
    pub created: Option<DateTime<Utc>>,
    /// The Secret it publishes.
    pub secret_name: String,
}

/// The controller owner of an object, if any.
pub fn controller_of(meta: &ObjectMeta) -> Option<&OwnerReference> {
    meta.owner_references.as_deref()?.iter().find(|o| o.controller == Some(true))
}

/// Whether the Secret with `meta` was written by the operator for an earlier `MailboxBinding` of
/// the same name (deleted and recreated, deleted with `--cascade=orphan`, or restored from a
/// backup): controlled by that binding, or controlled by nobody and carrying the operator's
/// labels for this binding name (`binding_label`). Such a Secret may be adopted.
pub fn from_predecessor(uid: &str, binding: &str, binding_label: &str, meta: &ObjectMeta) -> bool {
    match controller_of(meta) {
        Some(o) => o.kind == "MailboxBinding" && o.name == binding && o.uid != uid,
        None => meta.labels.as_ref().is_some_and(|l| {
            l.get(MANAGED_BY_LABEL).map(String::as_str) == Some(MANAGED_BY_VALUE)
                && l.get(BINDING_LABEL).map(String::as_str) == Some(binding_label)
        }),
    }
}

/// Why the binding `uid` may not write the existing Secret with `meta`, if it may not.
pub fn existing_conflict(uid: &str, meta: &ObjectMeta) -> Option<String> {
    let name = meta.name.as_deref().unwrap_or_default();
    match controller_of(meta) {
        Some(owner) if owner.uid == uid => None,
        Some(owner) => Some(format!(
            "Secret {name} is controlled by {} {}; the operator does not overwrite it",
            owner.kind, owner.name
        )),
        None => Some(format!(
            "Secret {name} already exists and is not managed by this binding; the operator does not overwrite it"
        )),
    }
}

/// Whether an older binding already claims the same Secret name. Ties go to the smaller name.
pub fn claimed_by_other(me: &Claim, others: &[Claim]) -> Option<String> {
    let earlier = |o: &Claim| match (o.created, me.created) {
        (Some(a), Some(b)) if a != b => a < b,
        _ => o.binding < me.binding,
    };
    others
        .iter()
        .filter(|o| o.binding != me.binding && o.secret_name == me.secret_name && earlier(o))
        .min_by(|a, b| a.created.cmp(&b.created).then_with(|| a.binding.cmp(&b.binding)))
        .map(|o| format!("Secret {} is already published by MailboxBinding {}", me.secret_name, o.binding))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owned_by(uid: &str, kind: &str) -> ObjectMeta {
        ObjectMeta {
            name: Some("s".into()),
            owner_references: Some(vec![OwnerReference {
                api_version: "v1".into(),
                kind: kind.into(),
                name: "other".into(),
                uid: uid.into(),
                controller: Some(true),
                block_owner_deletion: None,
            }]),
            ..Default::default()
        }
    }

    #[test]
    fn a_secret_of_an_earlier_binding_of_the_same_name_is_recognised() {
        let mut meta = owned_by("old-uid", "MailboxBinding");
        assert!(from_predecessor("new-uid", "other", "other", &meta));
        assert!(!from_predecessor("old-uid", "other", "other", &meta), "that is this binding itself");
        assert!(!from_predecessor("new-uid", "someone-else", "someone-else", &meta));
        meta.owner_references.iter_mut().flatten().for_each(|o| o.kind = "ExternalSecret".into());
        assert!(!from_predecessor("new-uid", "other", "other", &meta));
        // Orphaned (owner references removed) but labelled by the operator for this name.
        let labels = |b: &str| {
            Some(std::collections::BTreeMap::from([
                (MANAGED_BY_LABEL.to_owned(), MANAGED_BY_VALUE.to_owned()),
                (BINDING_LABEL.to_owned(), b.to_owned()),
            ]))
        };
        let orphan = ObjectMeta { name: Some("s".into()), labels: labels("other"), ..Default::default() };
        assert!(from_predecessor("new-uid", "other", "other", &orphan));
        assert!(!from_predecessor("new-uid", "third", "third", &orphan));
        assert!(
            !from_predecessor("new-uid", "other", "other", &ObjectMeta::default()),
            "an unlabelled Secret is not ours"
        );
    }

    #[test]
    fn a_secret_controlled_by_this_binding_may_be_written() {
        assert_eq!(existing_conflict("me", &owned_by("me", "MailboxBinding")), None);
    }

    #[test]
    fn a_secret_controlled_by_someone_else_is_refused_with_its_owner_named() {
        let why = existing_conflict("me", &owned_by("them", "ExternalSecret")).unwrap_or_default();
        assert_eq!(why, "Secret s is controlled by ExternalSecret other; the operator does not overwrite it");
        let unowned = ObjectMeta { name: Some("s".into()), ..Default::default() };
        assert!(existing_conflict("me", &unowned).is_some());
    }

    #[test]
    fn the_older_of_two_bindings_naming_one_secret_keeps_it() {
        let t = |s| DateTime::from_timestamp(s, 0);
        let old = Claim { binding: "old".into(), created: t(1), secret_name: "x".into() };
        let new = Claim { binding: "new".into(), created: t(2), secret_name: "x".into() };
        let all = [old.clone(), new.clone()];
        assert_eq!(claimed_by_other(&old, &all), None);
        assert_eq!(claimed_by_other(&new, &all), Some("Secret x is already published by MailboxBinding old".into()));
        let other_name = Claim { binding: "z".into(), created: t(0), secret_name: "y".into() };
        assert_eq!(claimed_by_other(&new, &[other_name]), None);
    }
}
