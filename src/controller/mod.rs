//! The controllers: Kubernetes I/O only. They read what the decisions in [`crate::policy`] need,
//! call the token endpoint through [`crate::oauth::TokenEndpoint`], and write what the decisions
//! say — Secrets and status by server-side apply, skipped when nothing changed.

pub mod binding;
pub mod certificate;
pub mod cleanup;
pub mod grant_store;
pub mod leader;
pub mod limits;
pub mod observe;
pub mod obtain;
pub mod owned;
pub mod provider;
pub mod relay_key;
pub mod resolve;
pub mod secrets;
pub mod verify;
pub mod versions;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Duration, Utc};
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::Store;

use crate::api::{ClusterMailProvider, MailProvider, MailboxBinding};
use crate::oauth::TokenEndpoint;
use crate::oauth::http::HttpClients;
use crate::policy::grant_state::GrantState;
use crate::policy::reference::ReferencePolicy;

/// A shutdown signal every task can wait on.
pub type Shutdown = futures::future::Shared<futures::future::BoxFuture<'static, ()>>;

/// The clock, injected so that tests can fix time.
pub trait Clock: Send + Sync {
    /// Now.
    fn now(&self) -> DateTime<Utc>;
}

/// The system clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// What every reconcile shares.
pub struct Context {
    /// Kubernetes client.
    pub client: Client,
    /// The token endpoint.
    pub tokens: Arc<dyn TokenEndpoint>,
    /// HTTP clients for discovery.
    pub http: HttpClients,
    /// `MailProvider`s in the watched namespace(s).
    pub providers: Store<MailProvider>,
    /// `ClusterMailProvider`s.
    pub cluster_providers: Store<ClusterMailProvider>,
    /// `MailboxBinding`s, for Secret-name conflicts.
    pub bindings: Store<MailboxBinding>,
    /// Namespace of `ClusterMailProvider` Secrets.
    pub cluster_namespace: String,
    /// Event recorder (folds repeats of an Event into a series: for retries).
    pub recorder: Recorder,
    /// Who reports this process's Events: transitions are published each as an Event of its own.
    pub reporter: Reporter,
    /// The clock.
    pub clock: Arc<dyn Clock>,
    /// Grant states whose write failed, by (namespace, binding): written before anything else,
    /// and flushed at shutdown. Shared by every controller of the process.
    pub pending: PendingGrants,
    /// Lifetime assumed when a token endpoint gives no usable `expires_in`.
    pub default_lifetime: Duration,
    /// Which referenced Secrets may be read (strict mode: only labelled ones).
    pub references: ReferencePolicy,
    /// Where people's browsers go for the authorization code grant.
    pub authorization: AuthorizationSettings,
    /// Counters for `/metrics`.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Token requests per provider.
    pub limits: Arc<limits::RateLimits>,
    /// Whether this replica leads (requests tokens and writes).
    pub leader: Arc<leader::Leadership>,
    /// When each authorization in progress is polled next, by (namespace, binding): kept in
    /// memory, so that a poll costs no write (after a restart the first poll is at once).
    pub polls: Polls,
    /// The `resourceVersion` each binding had when this process last wrote its status, until the
    /// cache shows a later one: a reconcile that starts from that older copy (queued while the
    /// write was in flight) would act on an annotation already acted on, so it waits instead.
    pub written: Written,
    /// Secrets this process has just written (published and grant state), until their watch
    /// event arrives: that event is our own write and triggers no reconcile.
    pub own_writes: OwnWrites,
    /// The metadata of the Secrets the operator owns: absent ones are created without a read,
    /// bindings at rest are re-checked without one.
    pub owned: owned::OwnedSecrets,
    /// Namespaces' labels as read for a `ClusterMailProvider`'s namespace selector, for a few
    /// seconds: a restart reads each namespace once, not once per binding.
    pub namespace_labels: NamespaceLabels,
    /// Versions of the Secrets labelled as referable (strict mode), from a metadata watch.
    pub referable: versions::SecretVersions,
    /// Client secrets read before, with the version of the Secret they came from: reused while
    /// the watch shows that version (strict mode only; a Secret unlabelled or changed is read
    /// again, and refused if it may no longer be read).
    pub client_secrets: ClientSecretCache,
    /// The verifier's nudges: the binding reconcile asks for a look, never waits for a check.
    pub verify: verify::Nudges,
    /// The key that signs published Secrets with relay keys for the shared relay.
    pub relay_keys: Arc<relay_key::RelayKeys>,
}

/// Namespaces' labels, each kept for [`NamespaceLabels::TTL`] (at most 4,096 namespaces).
#[derive(Clone, Debug, Default)]
pub struct NamespaceLabels(Arc<Mutex<HashMap<String, LabelsRead>>>);

/// When a namespace's labels were read, and the labels.
type LabelsRead = (std::time::Instant, std::collections::BTreeMap<String, String>);

impl NamespaceLabels {
    /// How long labels read are used: a label change takes effect within this.
    pub const TTL: std::time::Duration = std::time::Duration::from_secs(10);

    /// The labels of `namespace` read less than [`Self::TTL`] ago.
    pub fn get(&self, namespace: &str) -> Option<std::collections::BTreeMap<String, String>> {
        let map = self.0.lock().ok()?;
        let (at, labels) = map.get(namespace)?;
        (at.elapsed() < Self::TTL).then(|| labels.clone())
    }

    /// Keeps the labels just read of `namespace`.
    pub fn put(&self, namespace: &str, labels: std::collections::BTreeMap<String, String>) {
        if let Ok(mut map) = self.0.lock() {
            if map.len() >= 4096 {
                map.retain(|_, (at, _)| at.elapsed() < Self::TTL);
                if map.len() >= 4096 {
                    map.clear();
                }
            }
            map.insert(namespace.to_owned(), (std::time::Instant::now(), labels));
        }
    }
}

/// Client secrets by (namespace, Secret, key): the Secret's `resourceVersion` and the value.
pub type ClientSecretCache = Arc<Mutex<HashMap<(String, String, String), (String, secrecy::SecretString)>>>;

pub use versions::OwnWrites;

/// `resourceVersion`s written over, by (namespace, binding).
pub type Written = Arc<Mutex<HashMap<(String, String), String>>>;

/// The binding cache has a copy of a binding other than the one its status was last written
/// over: that write is behind it, its entry goes (the map gives its room back once mostly empty:
/// after a burst of first writes it would otherwise keep a slot for every binding).
pub fn caught_up(written: &Written, meta: &kube::api::ObjectMeta) {
    let (Some(ns), Some(name)) = (&meta.namespace, &meta.name) else { return };
    let Ok(mut written) = written.lock() else { return };
    if written.is_empty() {
        return;
    }
    let key = (ns.clone(), name.clone());
    if written.get(&key).is_some_and(|rv| meta.resource_version.as_ref() != Some(rv)) {
        written.remove(&key);
        if written.len().saturating_mul(4) < written.capacity() && written.capacity() > 64 {
            let keep = written.len().saturating_mul(2);
            written.shrink_to(keep);
        }
    }
}

/// The controllers' contexts, one per watched scope, filled in as the controllers start (the
/// authorization listener finds a binding's context here).
pub type Contexts = Arc<Mutex<Vec<Arc<Context>>>>;

/// Where people's browsers go for the authorization code grant.
#[derive(Clone, Debug)]
pub struct AuthorizationSettings {
    /// The redirect URI registered at providers: `<public URL>/callback`, or
    /// `http://localhost:8400/callback` when no public URL is set (the paste path).
    pub redirect_uri: String,
    /// With the callback listener on: the public URL the browser uses, for the
    /// `/authorize/<namespace>/<name>` link shown in status.
    pub link_base: Option<String>,
}

impl Default for AuthorizationSettings {
    fn default() -> Self {
        Self { redirect_uri: DEFAULT_REDIRECT_URI.into(), link_base: None }
    }
}

/// The redirect URI without a public URL: a loopback address, which Entra and Google desktop
/// clients allow, reached with `kubectl port-forward` or not at all (the paste path).
pub const DEFAULT_REDIRECT_URI: &str = "http://localhost:8400/callback";

/// Next poll times of authorizations in progress, by (namespace, binding).
pub type Polls = Arc<Mutex<HashMap<(String, String), DateTime<Utc>>>>;

/// A grant state that could not be written yet, with the Secret that holds it.
#[derive(Clone, Debug)]
pub struct Pending {
    /// The state.
    pub state: GrantState,
    /// The grant-state Secret to apply.
    pub secret: Secret,
    /// What the write is fenced with.
    pub fence: Fence,
}

/// What a grant-state write is conditioned on: the Secret's version as read, and the refresh
/// token of the grant the new state was obtained from. A write whose version no longer matches
/// is judged by [`crate::policy::grant_state::after_conflict`]: retried over what it started
/// from, dropped over a newer grant (a deposed leader's late result), done when it already landed.
#[derive(Clone, Debug, Default)]
pub struct Fence {
    /// The grant-state Secret's `resourceVersion` as last read or written (`None`: absent).
    pub version: Option<String>,
    /// The refresh token stored when it was read.
    pub basis: Option<secrecy::SecretString>,
    /// The Secret was absent when read (or as the owned-Secret cache says): the first write
    /// creates it, so that a Secret someone else made meanwhile is never written over.
    pub absent: bool,
    /// The data keys the Secret held when read or last written (`None`: unknown). A write that
    /// drops keys removes them explicitly: a Secret created by a create (not an apply) keeps the
    /// keys the create set until they are removed so.
    pub keys: Option<std::collections::BTreeSet<String>>,
}

/// Grant states waiting to be written, by (namespace, binding).
pub type PendingGrants = Arc<Mutex<HashMap<(String, String), Pending>>>;

impl Context {
    /// Fails with [`crate::Error::NotLeader`] unless this replica leads: asked right before each
    /// request to a provider, as leadership may end while a reconcile waits.
    pub fn leading(&self) -> crate::Result<()> {
        if self.leader.is_leader() { Ok(()) } else { Err(crate::Error::NotLeader) }
    }

    /// Now, to whole seconds (as Kubernetes stores time and the grant state records it).
    pub fn now(&self) -> DateTime<Utc> {
        use chrono::SubsecRound;
        self.clock.now().trunc_subsecs(0)
    }

    /// Whether `resource_version` is a copy of the binding from before this process's last
    /// status write (the cache has not caught up). Forgets the write once the cache has.
    pub fn behind_own_write(&self, namespace: &str, binding: &str, resource_version: Option<&str>) -> bool {
        let Ok(mut written) = self.written.lock() else { return false };
        let key = (namespace.to_owned(), binding.to_owned());
        if written.get(&key).is_some_and(|rv| Some(rv.as_str()) == resource_version) {
            return true;
        }
        written.remove(&key);
        false
    }

    /// Records that the status of a binding at `resource_version` was just written over.
    pub fn wrote_status(&self, namespace: &str, binding: &str, resource_version: Option<&str>) {
        if let (Ok(mut written), Some(rv)) = (self.written.lock(), resource_version) {
            // The write's watch event often comes before its answer: when the cache already has
            // a later copy, no reconcile can start from the older one (and `caught_up`, which ran
            // for that event, found nothing to forget). Asked under the lock `caught_up` takes.
            let cached = self.bindings.get(&kube::runtime::reflector::ObjectRef::new(binding).within(namespace));
            if cached.is_some_and(|b| b.metadata.resource_version.as_deref() != Some(rv)) {
                written.remove(&(namespace.to_owned(), binding.to_owned()));
                return;
            }
            let grew = written.insert((namespace.to_owned(), binding.to_owned()), rv.to_owned()).is_none();
            // Deleted bindings are never reconciled again; their entries go each time the map
            // has grown by another 1024.
            if grew && written.len().is_multiple_of(1024) {
                let live: std::collections::HashSet<(String, String)> = self
                    .bindings
                    .state()
                    .iter()
                    .map(|b| {
                        (b.metadata.namespace.clone().unwrap_or_default(), b.metadata.name.clone().unwrap_or_default())
                    })
                    .collect();
                if written.len() > live.len().saturating_add(1024) {
                    written.retain(|key, _| live.contains(key));
                    written.shrink_to_fit();
                }
            }
        }
    }

    /// A grant state waiting to be written.
    pub fn take_pending(&self, namespace: &str, binding: &str) -> Option<Pending> {
        self.pending.lock().ok()?.remove(&(namespace.to_owned(), binding.to_owned()))
    }

    /// When to poll a binding's authorization next: the later of `stored` and the time kept in
    /// memory.
    pub fn next_poll(&self, namespace: &str, binding: &str, stored: DateTime<Utc>) -> DateTime<Utc> {
        let kept = self.polls.lock().ok().and_then(|p| p.get(&(namespace.to_owned(), binding.to_owned())).copied());
        kept.map_or(stored, |k| std::cmp::max(k, stored))
    }

    /// Remembers when to poll a binding's authorization next.
    pub fn set_next_poll(&self, namespace: &str, binding: &str, at: DateTime<Utc>) {
        if let Ok(mut p) = self.polls.lock() {
            p.insert((namespace.to_owned(), binding.to_owned()), at);
        }
    }

    /// Forgets a finished authorization's poll time.
    pub fn forget_poll(&self, namespace: &str, binding: &str) {
        if let Ok(mut p) = self.polls.lock() {
            p.remove(&(namespace.to_owned(), binding.to_owned()));
        }
    }

    /// Keeps a grant state whose write failed, to be retried first.
    pub fn keep_pending(&self, namespace: &str, binding: &str, pending: Pending) {
        if let Ok(mut p) = self.pending.lock() {
            p.insert((namespace.to_owned(), binding.to_owned()), pending);
        }
    }
}

/// Writes `status` by server-side apply, with the `resourceVersion` the status was computed from
/// as a precondition: a reconcile that started from a stale cached copy gets a conflict instead
/// of overwriting a newer status. The one status write of every kind.
pub async fn apply_status<K>(api: &kube::Api<K>, object: &K, status: &impl serde::Serialize) -> crate::Result<()>
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    use kube::ResourceExt;
    use kube::api::{Patch, PatchParams};
    let precondition = match object.meta().resource_version.as_deref() {
        Some(rv) => serde_json::json!({ "resourceVersion": rv }),
        None => serde_json::json!({}),
    };
    let body = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "metadata": precondition,
        "status": status,
    });
    api.patch_status(&object.name_any(), &PatchParams::apply(crate::api::FIELD_MANAGER).force(), &Patch::Apply(body))
        .await
        .map_err(|source| crate::Error::WriteStatus { kind: kind_name::<K>(), name: object.name_any(), source })?;
    Ok(())
}

/// The kind's name for errors.
fn kind_name<K: kube::Resource<DynamicType = ()>>() -> &'static str {
    match K::kind(&()).as_ref() {
        "MailboxBinding" => "MailboxBinding",
        "MailProvider" => "MailProvider",
        "ClusterMailProvider" => "ClusterMailProvider",
        _ => "object",
    }
}
