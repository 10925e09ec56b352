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
use crate::api::FIELD_MANAGER;
use crate::policy::at_rest::{FOREIGN_KEYS, OWN_KEYS, data_keys};

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
    pub fn found_foreign(&self, namespace: &str, name: &str) {
        if let Ok(mut f) = self.foreign.lock() {
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

/// What the cache keeps of an owned Secret's metadata: the data keys other field managers own
/// become one in-memory annotation ([`FOREIGN_KEYS`]); the managed fields themselves and
/// `kubectl apply`'s last-applied copy (which may hold the whole Secret) are dropped.
pub fn slim(secret: &mut PartialObjectMeta<Secret>) {
    let meta = &mut secret.metadata;
    let foreign = data_keys(meta, FIELD_MANAGER, false);
    let own = data_keys(meta, FIELD_MANAGER, true);
    meta.managed_fields = None;
    let annotations = meta.annotations.get_or_insert_with(Default::default);
    annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
    for (key, keys) in [(FOREIGN_KEYS, foreign), (OWN_KEYS, own)] {
        if keys.is_empty() {
            annotations.remove(key);
        } else {
            annotations.insert(key.to_owned(), keys.join(","));
        }
    }
    if annotations.is_empty() {
        meta.annotations = None;
    }
}

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
    }
}
