//! The Secrets the operator owns, as their metadata alone (a label-selected metadata watch): what
//! lets a reconcile know, without reading a Secret, that it is absent (create it, no read) or as
//! the operator last wrote it (see [`crate::policy::at_rest`]). The cache is believed only once
//! its first list is in, and never about a Secret this process is writing or has just written
//! (its watch event may not be in yet); Secrets found at create to belong to someone else are
//! read from then on.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::Secret;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{ObjectRef, Store};

use super::OwnWrites;
use crate::api::{
    BINDING_LABEL, FIELD_MANAGER, GRANT_DIGEST_ANNOTATION, GRANT_FOR_ANNOTATION, MANAGED_BY_LABEL,
    OWNED_KEYS_ANNOTATION, SECRET_ROLE_LABEL, SOURCE_ANNOTATION,
};
use crate::policy::at_rest::{FOREIGN_KEYS, OWN_KEYS, TRIMMED, data_keys};

/// What the cache says of one Secret.
#[derive(Clone, Debug)]
pub enum Cached {
    /// Not known: read it.
    Unknown,
    /// It does not exist as an operator-owned Secret (a Secret of someone else may: create, never
    /// apply over it).
    Absent,
    /// Its metadata.
    Present(Arc<PartialObjectMeta<Secret>>),
}

/// The owned Secrets' metadata cache.
#[derive(Clone, Debug, Default)]
pub struct OwnedSecrets {
    store: Option<Store<PartialObjectMeta<Secret>>>,
    synced: Arc<AtomicBool>,
    foreign: Arc<Mutex<HashSet<(String, String)>>>,
}

impl OwnedSecrets {
    /// A cache over `store`, believed once `synced` is set (its first list is in).
    pub fn new(store: Store<PartialObjectMeta<Secret>>, synced: Arc<AtomicBool>) -> Self {
        Self { store: Some(store), synced, foreign: Arc::default() }
    }

    /// What the cache says of `namespace/name`.
    pub fn view(&self, namespace: &str, name: &str, own: &OwnWrites) -> Cached {
        let Some(store) = self.store.as_ref().filter(|_| self.synced.load(Ordering::Acquire)) else {
            return Cached::Unknown;
        };
        if own.is_tracked(namespace, name) || self.is_foreign(namespace, name) {
            return Cached::Unknown;
        }
        store.get(&ObjectRef::new(name).within(namespace)).map_or(Cached::Absent, Cached::Present)
    }

    /// Remembers that `namespace/name` exists and is someone else's (a create met it): it is read
    /// from now on, so that the reconcile sees the conflict before asking for a token.
    /// At most [`MAX_FOREIGN`] names are kept: beyond it the set starts again empty (a name
    /// forgotten is found again by the next create's conflict, never written over), so that
    /// bindings made and deleted over foreign names cannot grow it without bound.
    pub fn found_foreign(&self, namespace: &str, name: &str) {
        if let Ok(mut f) = self.foreign.lock() {
            if f.len() >= MAX_FOREIGN {
                f.clear();
            }
            f.insert((namespace.to_owned(), name.to_owned()));
        }
    }

    /// Forgets that `namespace/name` was someone else's (a read found it gone, or ours).
    pub fn not_foreign(&self, namespace: &str, name: &str) {
        if let Ok(mut f) = self.foreign.lock()
            && !f.is_empty()
        {
            f.remove(&(namespace.to_owned(), name.to_owned()));
        }
    }

    fn is_foreign(&self, namespace: &str, name: &str) -> bool {
        self.foreign.lock().is_ok_and(|f| !f.is_empty() && f.contains(&(namespace.to_owned(), name.to_owned())))
    }
}

/// The most names of someone else's Secrets remembered at once.
pub const MAX_FOREIGN: usize = 16_384;

/// What the cache keeps of an owned Secret's metadata: the data keys other field managers own and
/// those the operator's own become in-memory annotations ([`FOREIGN_KEYS`], [`OWN_KEYS`]); the
/// managed fields themselves, `kubectl apply`'s last-applied copy (which may hold the whole
/// Secret), finalizers and owner references other than the controller's are dropped. Anyone who
/// can write a Secret can label it as the operator's: what is kept of one is bounded
/// ([`KEEP_BYTES`]); beyond that only the operator's own labels and annotations are kept, and the
/// Secret is marked ([`TRIMMED`]) so that it is read, never judged from the cache.
pub fn slim(secret: &mut PartialObjectMeta<Secret>) {
    let meta = &mut secret.metadata;
    let foreign = data_keys(meta, FIELD_MANAGER, false).join(",");
    let own = data_keys(meta, FIELD_MANAGER, true).join(",");
    meta.managed_fields = None;
    meta.finalizers = None;
    meta.generate_name = None;
    if let Some(owners) = meta.owner_references.as_mut() {
        owners.retain(|o| o.controller == Some(true));
    }
    let annotations = meta.annotations.get_or_insert_with(Default::default);
    annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
    for key in [FOREIGN_KEYS, OWN_KEYS, TRIMMED] {
        annotations.remove(key);
    }
    let size = |m: &Option<std::collections::BTreeMap<String, String>>| {
        m.iter().flatten().map(|(k, v)| k.len().saturating_add(v.len())).fold(0_usize, usize::saturating_add)
    };
    let kept = size(&meta.annotations)
        .saturating_add(size(&meta.labels))
        .saturating_add(foreign.len())
        .saturating_add(own.len());
    let annotations = meta.annotations.get_or_insert_with(Default::default);
    if kept > KEEP_BYTES {
        annotations.retain(|k, v| OURS.contains(&k.as_str()) && v.len() <= 1024);
        if let Some(labels) = meta.labels.as_mut() {
            labels.retain(|k, v| LABELS.contains(&k.as_str()) && v.len() <= 63);
        }
        annotations.insert(TRIMMED.to_owned(), "true".to_owned());
    } else {
        for (key, keys) in [(FOREIGN_KEYS, foreign), (OWN_KEYS, own)] {
            if !keys.is_empty() {
                annotations.insert(key.to_owned(), keys);
            }
        }
    }
    if annotations.is_empty() {
        meta.annotations = None;
    }
}

/// The most bytes of labels, annotations and data-key lists kept of one cached Secret.
pub const KEEP_BYTES: usize = 8 * 1024;

/// The annotations the operator writes on its Secrets.
const OURS: [&str; 4] = [OWNED_KEYS_ANNOTATION, GRANT_DIGEST_ANNOTATION, GRANT_FOR_ANNOTATION, SOURCE_ANNOTATION];

/// The labels the operator writes on its Secrets.
const LABELS: [&str; 3] = [MANAGED_BY_LABEL, BINDING_LABEL, SECRET_ROLE_LABEL];

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{FieldsV1, ManagedFieldsEntry, ObjectMeta};

    use super::*;

    fn entry(manager: &str, fields: serde_json::Value) -> ManagedFieldsEntry {
        ManagedFieldsEntry { manager: Some(manager.into()), fields_v1: Some(FieldsV1(fields)), ..Default::default() }
    }

    #[test]
    fn data_keys_of_other_managers_are_kept_as_one_annotation_and_the_rest_dropped() {
        let mut s = PartialObjectMeta::<Secret> {
            metadata: ObjectMeta {
                name: Some("a".into()),
                annotations: Some(
                    [("kubectl.kubernetes.io/last-applied-configuration".to_owned(), "{\"data\":{}}".to_owned())]
                        .into(),
                ),
                managed_fields: Some(vec![
                    entry(FIELD_MANAGER, serde_json::json!({"f:data": {"f:access_token": {}}})),
                    entry("kubectl-edit", serde_json::json!({"f:data": {"f:access_token": {}, ".": {}}})),
                    entry("other", serde_json::json!({"f:metadata": {"f:labels": {}}})),
                ]),
                ..ObjectMeta::default()
            },
            ..PartialObjectMeta::default()
        };
        slim(&mut s);
        assert!(s.metadata.managed_fields.is_none());
        let annotations = s.metadata.annotations.unwrap_or_default();
        assert_eq!(annotations.get(FOREIGN_KEYS).map(String::as_str), Some("access_token"));
        assert_eq!(annotations.get(OWN_KEYS).map(String::as_str), Some("access_token"));
        assert_eq!(annotations.len(), 2, "{annotations:?}");
    }

    #[test]
    fn an_unsynced_or_absent_cache_knows_nothing_and_a_write_in_flight_is_unknown() {
        let own = OwnWrites::default();
        assert!(matches!(OwnedSecrets::default().view("ns", "a", &own), Cached::Unknown));
        let (store, _writer) = kube::runtime::reflector::store::<PartialObjectMeta<Secret>>();
        let synced = Arc::new(AtomicBool::new(false));
        let cache = OwnedSecrets::new(store, Arc::clone(&synced));
        assert!(matches!(cache.view("ns", "a", &own), Cached::Unknown), "not synced yet");
        synced.store(true, Ordering::Release);
        assert!(matches!(cache.view("ns", "a", &own), Cached::Absent));
        own.begin("ns", "a");
        assert!(matches!(cache.view("ns", "a", &own), Cached::Unknown), "our write is in flight");
        own.abandon("ns", "a");
        cache.found_foreign("ns", "a");
        assert!(matches!(cache.view("ns", "a", &own), Cached::Unknown), "someone else's: read it");
        cache.not_foreign("ns", "a");
        assert!(matches!(cache.view("ns", "a", &own), Cached::Absent));
        // Bounded: names beyond the bound start the set again.
        for i in 0..=MAX_FOREIGN {
            cache.found_foreign("ns", &format!("s{i}"));
        }
        assert!(cache.foreign.lock().is_ok_and(|f| f.len() == 1), "cleared when full, then the new name");
    }

    #[test]
    fn a_labelled_secret_stuffed_with_metadata_is_kept_small_and_marked_to_be_read() {
        let big = "x".repeat(KEEP_BYTES);
        let mut s = PartialObjectMeta::<Secret> {
            metadata: ObjectMeta {
                name: Some("a".into()),
                labels: Some([(MANAGED_BY_LABEL.to_owned(), "mail-oauth-operator".to_owned())].into()),
                annotations: Some(
                    [("stuffing".to_owned(), big), (SOURCE_ANNOTATION.to_owned(), "s".to_owned())].into(),
                ),
                finalizers: Some(vec!["x".into(); 100]),
                ..ObjectMeta::default()
            },
            ..PartialObjectMeta::default()
        };
        slim(&mut s);
        let annotations = s.metadata.annotations.unwrap_or_default();
        assert_eq!(annotations.get(TRIMMED).map(String::as_str), Some("true"));
        assert_eq!(annotations.get(SOURCE_ANNOTATION).map(String::as_str), Some("s"));
        assert!(!annotations.contains_key("stuffing"));
        assert!(s.metadata.finalizers.is_none());
        assert_eq!(s.metadata.labels.map(|l| l.len()), Some(1));
    }
}
