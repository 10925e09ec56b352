//! The operator's relay signing key (see [`crate::policy::relay_signature`]): a Secret in the
//! operator's namespace holding [`KEY_LEN`] random bytes, read once on first need (a restart reads
//! it once, and no other Secret data for it), made with the system's random source and created
//! when absent (a create that finds one made meanwhile by another replica reads that one: never
//! two keys). A watch of that one Secret (by name) notices a rotation: when the key is deleted or
//! replaced, every binding is reconciled, so that each published Secret with relay keys is signed
//! again (a deleted key is made anew by the first of them). The key is never logged.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use futures::StreamExt;
use futures::stream::BoxStream;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::PostParams;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use ring::rand::SecureRandom;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::api::{FIELD_MANAGER, SECRET_ROLE_LABEL};
use crate::error::{Error, Result};
use crate::policy::relay_signature::{KEY_DATA, KEY_LEN, SigningKey};

/// The `mailoauth.io/secret-role` of the key's Secret.
pub const KEY_ROLE: &str = "relay-signing-key";

/// The relay signing key as this process knows it.
pub struct RelayKeys {
    /// The key's Secret (namespace, name) and the client to read it; `None`: nothing is signed.
    place: Option<(Client, String, String)>,
    current: RwLock<Option<SigningKey>>,
    /// One read-or-create at a time.
    fetch: tokio::sync::Mutex<()>,
    /// Counts key changes (rotations, deletions) seen by the watch.
    changes: watch::Sender<u64>,
}

impl std::fmt::Debug for RelayKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayKeys")
            .field("secret", &self.place.as_ref().map(|(_, ns, name)| format!("{ns}/{name}")))
            .field("key", &self.cached().map(|k| k.id().to_owned()))
            .finish()
    }
}

impl RelayKeys {
    /// No signing (tests; an operator run with an empty `--relay-signing-key`).
    pub fn off() -> Arc<Self> {
        Arc::new(Self {
            place: None,
            current: RwLock::new(None),
            fetch: tokio::sync::Mutex::new(()),
            changes: watch::channel(0).0,
        })
    }

    /// The key kept in the Secret `namespace`/`name`, read with `client`.
    pub fn new(client: Client, namespace: String, name: String) -> Arc<Self> {
        Arc::new(Self {
            place: Some((client, namespace, name)),
            current: RwLock::new(None),
            fetch: tokio::sync::Mutex::new(()),
            changes: watch::channel(0).0,
        })
    }

    /// A key as known already, without a read (tests).
    pub fn fixed(key: SigningKey) -> Arc<Self> {
        let keys = Self::off();
        keys.set(Some(key));
        keys
    }

    /// Whether published Secrets are signed.
    pub fn signs(&self) -> bool {
        self.place.is_some() || self.cached().is_some()
    }

    /// The key known now, without a read.
    pub fn cached(&self) -> Option<SigningKey> {
        self.current.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    fn set(&self, key: Option<SigningKey>) -> Option<SigningKey> {
        std::mem::replace(&mut *self.current.write().unwrap_or_else(std::sync::PoisonError::into_inner), key)
    }

    /// The key: as known, else read from its Secret, else made and created there. `None` when
    /// nothing is signed.
    pub async fn key(&self) -> Result<Option<SigningKey>> {
        if let Some(k) = self.cached() {
            return Ok(Some(k));
        }
        let Some((client, namespace, name)) = &self.place else { return Ok(None) };
        let _one = self.fetch.lock().await;
        if let Some(k) = self.cached() {
            return Ok(Some(k));
        }
        let failed = |why: String| Error::RelaySigningKey { namespace: namespace.clone(), name: name.clone(), why };
        let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
        let found = api.get_opt(name).await.map_err(|e| failed(format!("reading it failed: {e}")))?;
        let key = match found {
            Some(s) => key_of(&s).map_err(failed)?,
            None => {
                let mut bytes = [0_u8; KEY_LEN];
                ring::rand::SystemRandom::new()
                    .fill(&mut bytes)
                    .map_err(|_| failed("the system's random source failed".to_owned()))?;
                let params = PostParams { dry_run: false, field_manager: Some(FIELD_MANAGER.to_owned()) };
                match api.create(&params, &key_secret(namespace, name, &bytes)).await {
                    Ok(_) => {
                        info!(namespace = %namespace, name = %name, "relay signing key created");
                        SigningKey::new(&bytes).map_err(|e| failed(e.to_string()))?
                    }
                    // Made meanwhile (another replica): that one is the key.
                    Err(kube::Error::Api(e)) if e.code == 409 => {
                        let s = api.get(name).await.map_err(|e| failed(format!("reading it failed: {e}")))?;
                        key_of(&s).map_err(failed)?
                    }
                    Err(e) => return Err(failed(format!("creating it failed: {e}"))),
                }
            }
        };
        self.set(Some(key.clone()));
        Ok(Some(key))
    }

    /// A stream that yields each time the watch sees the key deleted or replaced, for the binding
    /// controllers to reconcile everything (and so sign again).
    pub fn changes(&self) -> BoxStream<'static, ()> {
        let mut rx = self.changes.subscribe();
        rx.mark_unchanged();
        futures::stream::unfold(rx, |mut rx| async move { rx.changed().await.ok().map(|()| ((), rx)) }).boxed()
    }

    /// Takes what the watch saw: the key's Secret as it is now (`None`: deleted). A new or
    /// deleted key where one was known counts as a change.
    fn observed(&self, secret: Option<&Secret>) {
        let (ns, name) = self.place.as_ref().map(|(_, ns, n)| (ns.as_str(), n.as_str())).unwrap_or_default();
        let seen = match secret.map(key_of) {
            Some(Ok(k)) => Some(k),
            Some(Err(why)) => {
                warn!(namespace = %ns, name = %name, why = %why, "the relay signing key Secret is unusable");
                None
            }
            None => None,
        };
        let before = self.set(seen.clone());
        if before.is_some() && before != seen {
            match &seen {
                Some(k) => info!(key = %k.id(), "the relay signing key changed: signing every published Secret again"),
                None => {
                    info!("the relay signing key is gone: a new one is made and every published Secret signed again")
                }
            }
            self.changes.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// Watches the key's Secret (by name) until the stream ends; nothing when nothing is signed.
    pub async fn watch(self: Arc<Self>) {
        let Some((client, namespace, name)) = self.place.clone() else { return };
        let api: Api<Secret> = Api::namespaced(client, &namespace);
        let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
        let mut stream = watcher(api, config).default_backoff().boxed();
        let mut listed = false;
        while let Some(event) = stream.next().await {
            match event {
                Ok(watcher::Event::Init) => listed = false,
                Ok(watcher::Event::InitApply(s) | watcher::Event::Apply(s)) => {
                    listed = true;
                    self.observed(Some(&s));
                }
                Ok(watcher::Event::InitDone) if !listed => self.observed(None),
                Ok(watcher::Event::InitDone) => {}
                Ok(watcher::Event::Delete(_)) => self.observed(None),
                Err(e) => {
                    warn!(namespace = %namespace, name = %name, error = %e, "watching the relay signing key failed; retrying")
                }
            }
        }
    }
}

/// The key in a Secret.
pub fn key_of(secret: &Secret) -> std::result::Result<SigningKey, String> {
    let bytes = secret
        .data
        .as_ref()
        .and_then(|d| d.get(KEY_DATA))
        .ok_or_else(|| format!("it has no `{KEY_DATA}` (delete it: the operator makes a new one)"))?;
    SigningKey::new(&bytes.0).map_err(|e| format!("{e} (delete it: the operator makes a new one)"))
}

/// The key's Secret as created.
fn key_secret(namespace: &str, name: &str, bytes: &[u8]) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([
                ("app.kubernetes.io/part-of".to_owned(), crate::api::MANAGED_BY_VALUE.to_owned()),
                (SECRET_ROLE_LABEL.to_owned(), KEY_ROLE.to_owned()),
            ])),
            ..Default::default()
        },
        type_: Some("Opaque".to_owned()),
        data: Some(BTreeMap::from([(KEY_DATA.to_owned(), ByteString(bytes.to_vec()))])),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rotation_or_a_deletion_counts_as_a_change_and_the_first_sight_does_not() {
        let keys = RelayKeys::off();
        let mut rx = keys.changes.subscribe();
        let a = key_secret("ns", "k", &[1; KEY_LEN]);
        let b = key_secret("ns", "k", &[2; KEY_LEN]);
        keys.observed(Some(&a));
        assert!(!rx.has_changed().unwrap(), "first sight");
        keys.observed(Some(&a));
        assert!(!rx.has_changed().unwrap(), "the same key again");
        keys.observed(Some(&b));
        assert!(rx.has_changed().unwrap(), "replaced");
        rx.mark_unchanged();
        keys.observed(None);
        assert!(rx.has_changed().unwrap(), "deleted");
        assert!(keys.cached().is_none());
        let mut broken = a.clone();
        broken.data = Some(BTreeMap::from([(KEY_DATA.to_owned(), ByteString(vec![1; 8]))]));
        assert!(key_of(&broken).unwrap_err().contains("delete it"));
        assert!(!format!("{keys:?}").contains("[1"));
    }
}
