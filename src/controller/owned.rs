//! The Secrets the operator owns, as their metadata alone (a label-selected metadata watch): what
//! lets a reconcile know, without reading a Secret, that it is absent (create it, no read) or as
//! the operator last wrote it (see [`crate::policy::at_rest`]). The cache is believed only once
//! its first list is in, and never about a Secret this process is writing or has just written
//! (its watch event may not be in yet); Secrets found at create to belong to someone else are
//! read from then on.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::core::PartialObjectMeta;
use kube::runtime::watcher::Event;

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
///
/// Each Secret's metadata, as [`slim`] leaves it, is kept as one compact JSON string (without its
/// name and namespace, which are the key) and decoded when a reconcile looks at it: two Secrets
/// per binding, kept for every binding, are most of the operator's memory per binding, and an
/// `ObjectMeta` with its two maps and a dozen strings takes about three times the bytes of its
/// JSON (measured with a heap profile: docs/performance.md, "Memory per binding").
#[derive(Clone, Debug, Default)]
pub struct OwnedSecrets {
    cache: Option<Arc<RwLock<Listed>>>,
    synced: Arc<AtomicBool>,
    foreign: Arc<Mutex<HashSet<(String, String)>>>,
}

/// The Secrets listed and watched, by `namespace/name`; while a (re)list is in, the Secrets it
/// has delivered so far.
#[derive(Debug, Default)]
struct Listed {
    current: HashMap<Box<str>, Box<str>>,
    relist: Option<HashMap<Box<str>, Box<str>>>,
}

fn key(namespace: &str, name: &str) -> Box<str> {
    format!("{namespace}/{name}").into_boxed_str()
}

/// A cached Secret's key and compact form: its metadata as JSON without name and namespace.
fn compact(secret: &PartialObjectMeta<Secret>) -> Option<(Box<str>, Box<str>)> {
    let meta = &secret.metadata;
    let key = key(meta.namespace.as_deref()?, meta.name.as_deref()?);
    let rest = ObjectMeta { name: None, namespace: None, ..meta.clone() };
    Some((key, serde_json::to_string(&rest).ok()?.into_boxed_str()))
}

impl OwnedSecrets {
    /// A cache to be filled from a watch ([`Self::observe`]), believed once its first list is in.
    pub fn watched() -> Self {
        Self { cache: Some(Arc::default()), ..Self::default() }
    }

    /// Takes in one event of the owned Secrets' (slimmed) metadata watch, as kube's reflector
    /// store would: a (re)list replaces everything once it is done; until then the cache is not
    /// believed (what it lacks may exist).
    pub fn observe(&self, event: &Event<PartialObjectMeta<Secret>>) {
        let Some(Ok(mut listed)) = self.cache.as_ref().map(|c| c.write()) else { return };
        match event {
            Event::Init => {
                self.synced.store(false, Ordering::Release);
                listed.relist = Some(HashMap::new());
            }
            Event::InitApply(s) => {
                if let (Some(relist), Some((k, v))) = (listed.relist.as_mut(), compact(s)) {
                    relist.insert(k, v);
                }
            }
            Event::InitDone => {
                if let Some(relist) = listed.relist.take() {
                    listed.current = relist;
                }
                self.synced.store(true, Ordering::Release);
            }
            Event::Apply(s) => {
                if let Some((k, v)) = compact(s) {
                    listed.current.insert(k, v);
                }
            }
            Event::Delete(s) => {
                if let (Some(ns), Some(name)) = (s.metadata.namespace.as_deref(), s.metadata.name.as_deref()) {
                    listed.current.remove(&key(ns, name));
                }
            }
        }
    }

    /// The watch failed: what the cache lacks may exist until its next list is in.
    pub fn desynced(&self) {
        self.synced.store(false, Ordering::Release);
    }

    /// What the cache says of `namespace/name`.
    pub fn view(&self, namespace: &str, name: &str, own: &OwnWrites) -> Cached {
        let Some(cache) = self.cache.as_ref().filter(|_| self.synced.load(Ordering::Acquire)) else {
            return Cached::Unknown;
        };
        if own.is_tracked(namespace, name) || self.is_foreign(namespace, name) {
            return Cached::Unknown;
        }
        let Ok(listed) = cache.read() else { return Cached::Unknown };
        let Some(json) = listed.current.get(&key(namespace, name)) else { return Cached::Absent };
        match serde_json::from_str::<ObjectMeta>(json) {
            Ok(meta) => Cached::Present(Arc::new(PartialObjectMeta {
                metadata: ObjectMeta { name: Some(name.to_owned()), namespace: Some(namespace.to_owned()), ..meta },
                ..PartialObjectMeta::default()
            })),
            // It was encoded by this process: never expected; read the Secret then.
            Err(_) => Cached::Unknown,
        }
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
        let cache = OwnedSecrets::watched();
        assert!(matches!(cache.view("ns", "a", &own), Cached::Unknown), "not listed yet");
        cache.observe(&Event::Init);
        assert!(matches!(cache.view("ns", "a", &own), Cached::Unknown), "not synced yet");
        cache.observe(&Event::InitDone);
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

    fn secret_meta(name: &str, rv: &str) -> PartialObjectMeta<Secret> {
        let mut s = PartialObjectMeta::<Secret> {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                uid: Some(format!("uid-{name}")),
                resource_version: Some(rv.into()),
                labels: Some([(MANAGED_BY_LABEL.to_owned(), "mail-oauth-operator".to_owned())].into()),
                annotations: Some([(SOURCE_ANNOTATION.to_owned(), "abc".to_owned())].into()),
                owner_references: Some(vec![k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                    api_version: "mailoauth.io/v1alpha1".into(),
                    kind: "MailboxBinding".into(),
                    name: "b".into(),
                    uid: "uid-b".into(),
                    controller: Some(true),
                    block_owner_deletion: Some(true),
                }]),
                managed_fields: Some(vec![entry(FIELD_MANAGER, serde_json::json!({"f:data": {"f:token": {}}}))]),
                ..ObjectMeta::default()
            },
            ..PartialObjectMeta::default()
        };
        slim(&mut s);
        s
    }

    #[test]
    fn a_cached_secret_reads_back_as_the_slimmed_metadata_it_was() {
        let own = OwnWrites::default();
        let cache = OwnedSecrets::watched();
        cache.observe(&Event::Init);
        cache.observe(&Event::InitApply(secret_meta("a", "1")));
        cache.observe(&Event::InitDone);
        let Cached::Present(a) = cache.view("ns", "a", &own) else { panic!("a is listed") };
        assert_eq!(a.metadata, secret_meta("a", "1").metadata);
        assert!(matches!(cache.view("other", "a", &own), Cached::Absent), "by namespace too");
        cache.observe(&Event::Apply(secret_meta("a", "2")));
        let Cached::Present(a) = cache.view("ns", "a", &own) else { panic!("a is there") };
        assert_eq!(a.metadata.resource_version.as_deref(), Some("2"));
        cache.observe(&Event::Delete(secret_meta("a", "3")));
        assert!(matches!(cache.view("ns", "a", &own), Cached::Absent));
    }

    #[test]
    fn a_relist_replaces_the_cache_once_done_and_until_then_nothing_is_believed() {
        let own = OwnWrites::default();
        let cache = OwnedSecrets::watched();
        cache.observe(&Event::Init);
        cache.observe(&Event::InitApply(secret_meta("a", "1")));
        cache.observe(&Event::InitDone);
        cache.observe(&Event::Init);
        cache.observe(&Event::InitApply(secret_meta("b", "2")));
        assert!(matches!(cache.view("ns", "b", &own), Cached::Unknown), "relisting");
        cache.observe(&Event::InitDone);
        assert!(matches!(cache.view("ns", "a", &own), Cached::Absent), "gone while the watch was down");
        assert!(matches!(cache.view("ns", "b", &own), Cached::Present(_)));
        cache.desynced();
        assert!(matches!(cache.view("ns", "b", &own), Cached::Unknown), "a failed watch");
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
