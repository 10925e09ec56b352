//! Secret versions. [`SecretVersions`]: the `resourceVersion` of each Secret a metadata watch
//! sees, kept current from the watch's events (a relist replaces the whole map), to reuse a
//! client secret read once until its Secret changes. [`OwnWrites`]: the Secrets this process is
//! writing or has just written, so that the watch events of its own writes trigger no reconcile.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use k8s_openapi::api::core::v1::Secret;
use kube::core::PartialObjectMeta;
use kube::runtime::watcher::Event;

/// (namespace, name) → `resourceVersion`.
type Map = HashMap<(String, String), String>;

/// Versions of the Secrets one watch covers.
#[derive(Clone, Debug, Default)]
pub struct SecretVersions {
    inner: Arc<RwLock<Inner>>,
}

#[derive(Debug, Default)]
struct Inner {
    current: Map,
    relist: Option<Map>,
}

fn key(meta: &kube::api::ObjectMeta) -> Option<((String, String), String)> {
    Some(((meta.namespace.clone()?, meta.name.clone()?), meta.resource_version.clone()?))
}

impl SecretVersions {
    /// Takes in one watch event.
    pub fn observe(&self, event: &Event<PartialObjectMeta<Secret>>) {
        let Ok(mut inner) = self.inner.write() else { return };
        match event {
            Event::Init => inner.relist = Some(Map::new()),
            Event::InitApply(s) => {
                if let (Some(relist), Some((k, rv))) = (inner.relist.as_mut(), key(&s.metadata)) {
                    relist.insert(k, rv);
                }
            }
            Event::InitDone => {
                if let Some(relist) = inner.relist.take() {
                    inner.current = relist;
                }
            }
            Event::Apply(s) => {
                if let Some((k, rv)) = key(&s.metadata) {
                    inner.current.insert(k, rv);
                }
            }
            Event::Delete(s) => {
                if let Some((k, _)) = key(&s.metadata) {
                    inner.current.remove(&k);
                }
            }
        }
    }

    /// The version last seen of a Secret, if the watch covers it.
    pub fn version(&self, namespace: &str, name: &str) -> Option<String> {
        self.inner.read().ok()?.current.get(&(namespace.to_owned(), name.to_owned())).cloned()
    }
}

/// Where one of our Secret writes stands.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Write {
    /// Sent, no answer yet.
    InFlight,
    /// Its watch event came before the answer.
    Seen,
    /// Answered with this version; its event has not come yet.
    Written(String),
}

/// Secrets this process is writing or has just written, by (namespace, name).
#[derive(Clone, Debug, Default)]
pub struct OwnWrites(Arc<std::sync::Mutex<HashMap<(String, String), Write>>>);

impl OwnWrites {
    /// A write of this Secret is about to be sent.
    pub fn begin(&self, namespace: &str, name: &str) {
        if let Ok(mut map) = self.0.lock() {
            map.insert((namespace.to_owned(), name.to_owned()), Write::InFlight);
        }
    }

    /// The write failed: nothing of ours will be seen.
    pub fn abandon(&self, namespace: &str, name: &str) {
        if let Ok(mut map) = self.0.lock() {
            map.remove(&(namespace.to_owned(), name.to_owned()));
        }
    }

    /// The write succeeded; `secret` is what the apiserver returned.
    pub fn record(&self, secret: &Secret) {
        let (Some(ns), Some(name)) = (secret.metadata.namespace.clone(), secret.metadata.name.clone()) else {
            return;
        };
        let Ok(mut map) = self.0.lock() else { return };
        let key = (ns, name);
        match (map.get(&key), secret.metadata.resource_version.clone()) {
            (Some(Write::InFlight), Some(rv)) => {
                map.insert(key, Write::Written(rv));
            }
            _ => {
                map.remove(&key);
            }
        }
    }

    /// Whether a write of this Secret is in flight or its watch event has not come yet.
    pub fn is_tracked(&self, namespace: &str, name: &str) -> bool {
        self.0.lock().is_ok_and(|map| map.contains_key(&(namespace.to_owned(), name.to_owned())))
    }

    /// Whether a watched Secret event is our own write (each write is recognised once; a later
    /// version is someone else's change). An event that comes while the write is in flight is
    /// taken as ours: the apiserver answers a write after storing it, so an event seen then is
    /// that write's (or, within those milliseconds, a change the next reconcile sees anyway).
    pub fn is_own(&self, meta: &kube::api::ObjectMeta) -> bool {
        let (Some(ns), Some(name)) = (&meta.namespace, &meta.name) else { return false };
        let Ok(mut map) = self.0.lock() else { return false };
        let key = (ns.clone(), name.clone());
        match map.get(&key) {
            Some(Write::InFlight) => {
                map.insert(key, Write::Seen);
                true
            }
            Some(Write::Written(rv)) => {
                let own = meta.resource_version.as_ref() == Some(rv);
                map.remove(&key);
                own
            }
            Some(Write::Seen) | None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(name: &str, rv: &str) -> PartialObjectMeta<Secret> {
        let mut m = PartialObjectMeta::<Secret>::default();
        m.metadata.namespace = Some("mail".into());
        m.metadata.name = Some(name.into());
        m.metadata.resource_version = Some(rv.into());
        m
    }

    fn secret(rv: &str) -> Secret {
        let mut s = Secret::default();
        s.metadata.namespace = Some("mail".into());
        s.metadata.name = Some("a".into());
        s.metadata.resource_version = Some(rv.into());
        s
    }

    #[test]
    fn our_write_is_recognised_once_whether_its_event_comes_before_or_after_the_answer() {
        let own = OwnWrites::default();
        // The event after the answer.
        own.begin("mail", "a");
        own.record(&secret("7"));
        assert!(own.is_own(&secret("7").metadata));
        assert!(!own.is_own(&secret("7").metadata), "once");
        // The event before the answer.
        own.begin("mail", "a");
        assert!(own.is_own(&secret("8").metadata));
        own.record(&secret("8"));
        assert!(!own.is_own(&secret("9").metadata), "a later change is someone else's");
        // Someone else's change after our answer.
        own.begin("mail", "a");
        own.record(&secret("10"));
        assert!(!own.is_own(&secret("11").metadata));
        // A failed write expects nothing.
        own.begin("mail", "a");
        own.abandon("mail", "a");
        assert!(!own.is_own(&secret("12").metadata));
    }

    #[test]
    fn versions_follow_changes_deletions_and_relists() {
        let v = SecretVersions::default();
        v.observe(&Event::Apply(meta("a", "1")));
        v.observe(&Event::Apply(meta("a", "2")));
        assert_eq!(v.version("mail", "a").as_deref(), Some("2"));
        v.observe(&Event::Delete(meta("a", "3")));
        assert_eq!(v.version("mail", "a"), None);
        v.observe(&Event::Apply(meta("b", "4")));
        // A relist keeps what it lists and forgets the rest, once done.
        v.observe(&Event::Init);
        v.observe(&Event::InitApply(meta("c", "5")));
        assert_eq!(v.version("mail", "b").as_deref(), Some("4"), "unchanged until the relist is done");
        v.observe(&Event::InitDone);
        assert_eq!(v.version("mail", "b"), None);
        assert_eq!(v.version("mail", "c").as_deref(), Some("5"));
    }
}
