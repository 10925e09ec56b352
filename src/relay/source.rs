//! Where the relay finds the credentials a client logs in with: one code path, two sources.
//! [`Source::Mounted`] is a sidecar's: one published Secret mounted as a volume, read afresh at
//! every login ([`super::secret`]). [`Source::Api`] is the shared relay's: every published Secret
//! with relay keys in the namespaces it serves, kept current by a watch ([`super::watch`]) in an
//! [`Index`] by user name.
//!
//! The index keeps, per Secret, what a login needs and nothing else: the mailbox, the relay
//! user name, the password's SHA-256 digest (never the password), the previous password's digest
//! and the end of its grace, the senders, the token and its expiry, and the servers. A Secret
//! larger than [`MAX_SECRET`] is not kept. In the shared relay a client logs in as `mailbox` or
//! `namespace/mailbox`, and the password picks the binding: accepted when exactly one binding of
//! that name (in that namespace) has it. A mailbox bound in another namespace too (any tenant can
//! have the operator publish a binding of any mailbox) therefore neither locks the first one's
//! devices out of the bare name nor reaches them. An unknown name, or a password two bindings
//! share, is answered as a wrong password (no oracle), after the same digest computation.
//!
//! Only Secrets the operator signed are kept ([`crate::policy::relay_signature`]): the signature
//! covers the namespace, the name and every key the relay trusts, with a key from a Secret in
//! the operator's namespace that tenants cannot read. A labelled Secret a tenant made, changed or
//! copied from another namespace is refused and counted
//! (`mailoauth_relay_secrets_refused_total{reason}`). The access token is not signed (it changes
//! at every renewal; whoever can write the Secret can read the token already, and a token swapped
//! in still goes only to the signed server for the signed mailbox).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::Secret;
use secrecy::SecretString;
use sha2::{Digest, Sha256};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use super::secret::{Mounted, SecretError};
use crate::api::Protocol;
use crate::mail::TlsMode;
use crate::policy::relay_signature::{Refusal, SIGNATURE_ANNOTATION, SigningKey};

/// The largest published Secret the shared relay keeps (keys and values together; a published
/// Secret is a few KiB).
pub const MAX_SECRET: usize = 64 * 1024;

/// The longest access token kept (Entra's are a few KiB).
pub const MAX_TOKEN: usize = 16 * 1024;

/// The most bindings served per namespace, and in all: a namespace that publishes more (its own
/// Secrets carrying the operator's labels) is served up to the bound and said in the log, and
/// cannot grow the relay's memory without bound.
pub const MAX_PER_NAMESPACE: usize = 1_000;
/// See [`MAX_PER_NAMESPACE`].
pub const MAX_ENTRIES: usize = 50_000;

/// A server as published: host, port, TLS mode.
pub(crate) type Server = (String, u16, TlsMode);

/// One binding's relay credentials.
#[derive(Debug)]
pub struct Entry {
    /// The credentials (digests only) and the SMTP server.
    pub(crate) mounted: Mounted,
    /// `imap_host`/`imap_port`/`imap_tls`.
    imap: Option<Server>,
    /// `pop3_host`/`pop3_port`/`pop3_tls`.
    pop3: Option<Server>,
}

impl Entry {
    /// Reads the keys through `get` (see [`super::secret::parse`]).
    fn parse(
        shown: &str,
        mut get: impl FnMut(&'static str) -> Result<Option<String>, SecretError>,
    ) -> Result<Self, SecretError> {
        let mounted = super::secret::parse(shown, &mut get)?;
        let imap = super::secret::server_of(Protocol::Imap, &mut get)?;
        let pop3 = super::secret::server_of(Protocol::Pop3, &mut get)?;
        Ok(Self { mounted, imap, pop3 })
    }

    /// The upstream server for `protocol`, when published.
    pub(crate) fn server(&self, protocol: Protocol) -> Option<Server> {
        match protocol {
            Protocol::Smtp => {
                let m = &self.mounted;
                let (host, port) = m.smtp_host.clone().zip(m.smtp_port)?;
                Some((host, port, m.smtp_tls.unwrap_or_else(|| TlsMode::for_port(port))))
            }
            Protocol::Imap => self.imap.clone(),
            Protocol::Pop3 => self.pop3.clone(),
        }
    }

    /// The token, when one is current `margin` after `now`.
    pub(crate) fn current_token(&self, now: DateTime<Utc>, margin: chrono::Duration) -> Option<&SecretString> {
        self.mounted.current_token(now, margin)
    }
}

/// The result of a credential check.
pub(crate) enum Check {
    /// The user name and password are a binding's.
    Accepted(Arc<Entry>),
    /// Wrong, unknown or ambiguous.
    Wrong,
    /// The credentials cannot be read now (the mounted Secret; the shared relay before its first
    /// list).
    Unreadable,
}

/// Where the credentials come from.
#[derive(Debug, Clone)]
pub enum Source {
    /// One published Secret mounted at this directory (a sidecar).
    Mounted(PathBuf),
    /// The published Secrets of the served namespaces, through the API (the shared relay).
    Api(Arc<Index>),
}

impl Source {
    /// Checks `user` and `password` at `now`.
    pub(crate) async fn check(&self, user: &str, password: &[u8], now: DateTime<Utc>) -> Check {
        match self {
            Source::Mounted(dir) => {
                let dir = dir.clone();
                let read = tokio::task::spawn_blocking(move || {
                    let mounted = super::secret::read(&dir)?;
                    let imap = super::secret::server(&dir, Protocol::Imap)?;
                    let pop3 = super::secret::server(&dir, Protocol::Pop3)?;
                    Ok::<_, SecretError>(Entry { mounted, imap, pop3 })
                })
                .await;
                match read {
                    Ok(Ok(entry)) if entry.mounted.accepts_at(user, password, now) => Check::Accepted(Arc::new(entry)),
                    Ok(Ok(_)) => Check::Wrong,
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "the mounted Secret cannot be read");
                        Check::Unreadable
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "reading the mounted Secret failed");
                        Check::Unreadable
                    }
                }
            }
            Source::Api(index) => index.check(user, password, now),
        }
    }
}

/// A Secret's place: namespace and name.
type Key = (String, String);

#[derive(Debug, Default)]
struct Inner {
    entries: HashMap<Key, Arc<Entry>>,
    /// `relay_username` in ASCII lower case → the Secrets that have it.
    names: HashMap<String, Vec<Key>>,
    /// Entries per namespace.
    per_namespace: HashMap<String, usize>,
}

impl Inner {
    fn remove(&mut self, key: &Key) -> bool {
        let Some(old) = self.entries.remove(key) else { return false };
        if let Some(n) = self.per_namespace.get_mut(&key.0) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_namespace.remove(&key.0);
            }
        }
        let name = old.mounted.relay_username.to_ascii_lowercase();
        if let Some(keys) = self.names.get_mut(&name) {
            keys.retain(|k| k != key);
            if keys.is_empty() {
                self.names.remove(&name);
            }
        }
        true
    }

    fn insert(&mut self, key: Key, entry: Entry) {
        self.remove(&key);
        let name = entry.mounted.relay_username.to_ascii_lowercase();
        self.names.entry(name).or_default().push(key.clone());
        let n = self.per_namespace.entry(key.0.clone()).or_default();
        *n = n.saturating_add(1);
        self.entries.insert(key, Arc::new(entry));
    }

    /// Whether `key` may be kept: it is kept already, or its namespace and the index are below
    /// their bounds.
    fn room_for(&self, key: &Key) -> bool {
        if self.entries.contains_key(key) {
            return true;
        }
        self.entries.len() < MAX_ENTRIES && self.per_namespace.get(&key.0).copied().unwrap_or(0) < MAX_PER_NAMESPACE
    }

    /// The one entry named `name` (in `namespace`, when given) that accepts the password whose
    /// digest is `given` at `now`. Every entry of the name is checked (no early return), so the
    /// time taken depends on the number of bindings of the name, never on which one matched.
    fn accepting(
        &self,
        name: &str,
        namespace: Option<&str>,
        given: &[u8; 32],
        now: DateTime<Utc>,
    ) -> Option<Arc<Entry>> {
        let keys = self.names.get(&name.to_ascii_lowercase())?;
        let mut found: Option<&Arc<Entry>> = None;
        let mut matches = 0_usize;
        for entry in keys.iter().filter(|k| namespace.is_none_or(|n| k.0 == n)).filter_map(|k| self.entries.get(k)) {
            if entry.mounted.accepts_digest_at(name, given, now) {
                matches = matches.saturating_add(1);
                found = Some(entry);
            }
        }
        // Two bindings that accept the same password: neither is chosen.
        (matches == 1).then(|| found.cloned()).flatten()
    }
}

/// What a Secret's update did to the index.
#[derive(Debug, PartialEq, Eq)]
pub enum Applied {
    /// Kept (new or replaced).
    Kept,
    /// Not (or no longer) kept: no `relay_password`.
    NoRelay,
    /// Not (or no longer) kept: larger than [`MAX_SECRET`].
    TooLarge,
    /// Not (or no longer) kept: the relay keys are unusable (the reason names a key, no value).
    Invalid(String),
    /// Not kept: the namespace (or the relay) already serves as many as it may.
    Full,
    /// Not (or no longer) kept: not signed with the operator's key.
    Refused(Refusal),
}

/// The shared relay's credentials: every published Secret with relay keys in the served
/// namespaces, by namespace and name and by user name.
#[derive(Debug, Default)]
pub struct Index {
    inner: RwLock<Inner>,
    /// Every served namespace has been listed once: before that an unknown name may be one not
    /// read yet, and a login is a temporary failure.
    listed: AtomicBool,
    /// The operator's signing key, when known.
    key: RwLock<Option<SigningKey>>,
    /// Secrets refused, by reason (a fixed word).
    refused: Family<[(&'static str, &'static str); 1], Counter>,
}

impl Index {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Registers `mailoauth_relay_secrets_refused_total{reason}`.
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.sub_registry_with_prefix("mailoauth_relay").register(
            "secrets_refused",
            "Published Secrets not served because they are not signed with the operator's key, by reason",
            self.refused.clone(),
        );
    }

    /// Takes the operator's signing key (`None`: unknown). Secrets already kept stay until they
    /// are applied again (the watch lists them again after a change).
    pub fn set_key(&self, key: Option<SigningKey>) {
        *self.key.write().unwrap_or_else(std::sync::PoisonError::into_inner) = key;
    }

    /// The signing key known now.
    pub fn key(&self) -> Option<SigningKey> {
        self.key.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Whether the Secret is signed with the operator's key, over its namespace, name and relay
    /// keys.
    fn verified(&self, key: &Key, secret: &Secret) -> Result<(), Refusal> {
        let Some(signing) = self.key() else { return Err(Refusal::NoKey) };
        let data = secret.data.as_ref();
        let message = crate::policy::relay_signature::message(&key.0, &key.1, |k| {
            data.and_then(|d| d.get(k)).map(|v| String::from_utf8_lossy(&v.0).into_owned())
        });
        let signature = secret.metadata.annotations.as_ref().and_then(|a| a.get(SIGNATURE_ANNOTATION));
        signing.verify(signature.map(String::as_str), &message)
    }

    /// Notes that every served namespace has been listed.
    pub fn set_listed(&self) {
        self.listed.store(true, Ordering::SeqCst);
    }

    /// The Secrets kept.
    pub fn len(&self) -> usize {
        self.read().entries.len()
    }

    /// Whether none is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes a Secret as the API gives it: kept when it has `relay_password` and is within
    /// [`MAX_SECRET`], else removed.
    pub fn apply(&self, secret: &Secret) -> Applied {
        let key = key_of(secret);
        let data = secret.data.as_ref();
        let size: usize = data.map_or(0, |d| d.iter().map(|(k, v)| k.len().saturating_add(v.0.len())).sum());
        let outcome = if size > MAX_SECRET {
            Applied::TooLarge
        } else if data.is_none_or(|d| !d.contains_key("relay_password")) {
            Applied::NoRelay
        } else if let Err(why) = self.verified(&key, secret) {
            self.refused.get_or_create(&[("reason", why.label())]).inc();
            Applied::Refused(why)
        } else if data.and_then(|d| d.get("access_token")).is_some_and(|t| t.0.len() > MAX_TOKEN) {
            Applied::Invalid(format!("access_token is longer than {MAX_TOKEN} bytes"))
        } else if data
            .and_then(|d| d.get("relay_username").or_else(|| d.get("username")))
            .is_some_and(|u| u.0.contains(&b'/'))
        {
            // `namespace/mailbox` is how a client names a binding: a user name with a `/` would
            // shadow another namespace's qualified name.
            Applied::Invalid("relay_username contains '/'".to_owned())
        } else if !self.read().room_for(&key) {
            Applied::Full
        } else {
            let shown = format!("Secret {}/{}", key.0, key.1);
            let get = |k: &'static str| {
                Ok(data
                    .and_then(|d| d.get(k))
                    .map(|v| String::from_utf8_lossy(&v.0).trim().to_owned())
                    .filter(|v| !v.is_empty()))
            };
            match Entry::parse(&shown, get) {
                Ok(entry) => {
                    self.write().insert(key, entry);
                    return Applied::Kept;
                }
                Err(e) => Applied::Invalid(e.to_string()),
            }
        };
        self.write().remove(&key);
        outcome
    }

    /// Forgets a deleted Secret.
    pub fn delete(&self, secret: &Secret) {
        self.write().remove(&key_of(secret));
    }

    /// After a full list of `namespace` (every namespace when `None`): forgets the Secrets there
    /// that the list did not have.
    pub fn retain_listed(&self, namespace: Option<&str>, listed: &HashSet<(String, String)>) {
        let mut inner = self.write();
        let gone: Vec<Key> = inner
            .entries
            .keys()
            .filter(|k| namespace.is_none_or(|n| k.0 == n) && !listed.contains(*k))
            .cloned()
            .collect();
        for key in gone {
            inner.remove(&key);
        }
    }

    /// Checks `user` (`mailbox`, or `namespace/mailbox`) and `password` at `now`: accepted when
    /// exactly one binding of that name (in that namespace) has that password. A name bound in
    /// several namespaces (another namespace may bind any mailbox: the operator signs what it
    /// publishes, not whose mailbox it is) still logs in by itself with each binding's own
    /// password, so no other namespace can lock a binding's devices out of the bare name, nor
    /// reach a binding without its password. The digest is computed once whether or not the name
    /// is known.
    pub(crate) fn check(&self, user: &str, password: &[u8], now: DateTime<Utc>) -> Check {
        if !self.listed.load(Ordering::SeqCst) {
            return Check::Unreadable;
        }
        let given: [u8; 32] = Sha256::digest(password).into();
        let inner = self.read();
        // A name with a `/` is only ever `namespace/mailbox` (no kept user name has one).
        let found = match user.split_once('/') {
            Some((namespace, name)) => inner.accepting(name, Some(namespace), &given, now),
            None => inner.accepting(user, None, &given, now),
        };
        match found {
            Some(entry) => Check::Accepted(entry),
            None => Check::Wrong,
        }
    }
}

/// A Secret's namespace and name.
pub fn key_of(secret: &Secret) -> (String, String) {
    (secret.metadata.namespace.clone().unwrap_or_default(), secret.metadata.name.clone().unwrap_or_default())
}
