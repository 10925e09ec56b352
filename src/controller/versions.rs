//! The `resourceVersion` of each Secret a metadata watch sees, kept current from the watch's
//! events (a relist replaces the whole map). Used to reuse a client secret read once until its
//! Secret changes, instead of reading it again for every binding's token request.

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
