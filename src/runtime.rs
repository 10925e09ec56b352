//! The runtime ([`Runtime`], a builder): leader election, the admin server and the authorization
//! listener, one `ClusterMailProvider` controller, and per watched namespace (or for all) a
//! `MailProvider` and a `MailboxBinding` controller. Owned Secrets are watched by metadata only
//! and by label; bindings trigger on spec and annotation changes, not on our status writes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::Secret;
use kube::core::PartialObjectMeta;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{Controller, Predicate, WatchStreamExt, predicates, watcher};
use kube::{Api, Client, ResourceExt};
use tracing::{debug, info};

use crate::api::{
    ALLOW_REFERENCE_LABEL, ClusterMailProvider, MANAGED_BY_LABEL, MANAGED_BY_VALUE, MailProvider, MailboxBinding,
    ProviderKind,
};
use crate::controller::{self, Clock, Context, Shutdown, binding, provider};
use crate::oauth::TokenEndpoint;
use crate::oauth::http::HttpClients;

/// What the controllers need to start.
pub struct Settings {
    /// Namespaces to watch; empty means all.
    pub namespaces: Vec<String>,
    /// Namespace of `ClusterMailProvider` Secrets.
    pub cluster_namespace: String,
    /// Name reported on Events.
    pub instance: String,
    /// Lifetime assumed when a token endpoint gives no usable `expires_in`.
    pub default_lifetime: chrono::Duration,
    /// How long shutdown may spend writing grant states that could not be written before.
    pub flush_timeout: std::time::Duration,
    /// Which referenced Secrets may be read.
    pub references: crate::policy::reference::ReferencePolicy,
    /// Where people's browsers go for the authorization code grant.
    pub authorization: controller::AuthorizationSettings,
    /// Filled with each context as it is made, for the authorization listener and `/metrics`.
    pub contexts: controller::Contexts,
    /// Counters for `/metrics`.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Token requests per provider.
    pub limits: Arc<controller::limits::RateLimits>,
    /// Reconciles running at once, per controller.
    pub concurrency: u16,
    /// The mailbox verifier's concurrency and per-server rate.
    pub verify: controller::verify::VerifySettings,
    /// The relay signing key's Secret (namespace, name); `None`: published Secrets are not signed.
    pub relay_signing_key: Option<(String, String)>,
}

/// The operator's runtime, assembled step by step:
///
/// ```text
/// Runtime::new(client, settings, tokens, http, clock, shutdown)
///     .admin(listen address)          // /healthz, /readyz, /metrics
///     .callback(address, client)      // the authorization listener, if any, with its own client
///     .election(lease settings)       // leader election, if any
///     .run().await
/// ```
///
/// `run` joins the election, then builds the shared `ClusterMailProvider` reflector and, per
/// watched scope, the provider and binding reflectors and controllers ([`Runtime::scope`]), runs
/// every task until shutdown, writes pending grant states, and only then releases the lease.
pub struct Runtime {
    client: Client,
    settings: Settings,
    tokens: Arc<dyn TokenEndpoint>,
    http: HttpClients,
    clock: Arc<dyn Clock>,
    shutdown: Shutdown,
    admin: Option<std::net::SocketAddr>,
    callback: Option<std::net::SocketAddr>,
    /// The authorization listener's own apiserver client (its own request budget), and the
    /// contexts it finds bindings in: the controllers' caches with that client.
    listener: Option<(Client, controller::Contexts)>,
    election: Option<controller::leader::ElectionSettings>,
    ready: Arc<AtomicBool>,
}

/// What the steps of [`Runtime::run`] share while the controllers are built.
struct Assembly {
    tasks: Vec<BoxFuture<'static, ()>>,
    syncs: Vec<Synced>,
    pending: controller::PendingGrants,
    leader: Arc<controller::leader::Leadership>,
    reporter: Reporter,
    cluster_store: reflector::Store<ClusterMailProvider>,
    cluster_writer: Option<reflector::store::Writer<ClusterMailProvider>>,
    first_ctx: Option<Arc<Context>>,
    /// Every scope's context, for the verifier.
    contexts: Vec<Arc<Context>>,
    /// The verifier's nudges, given to every context.
    nudges: controller::verify::Nudges,
    /// The relay signing key, shared by every context.
    relay_keys: Arc<controller::relay_key::RelayKeys>,
}

impl Runtime {
    /// A runtime with no admin server, no callback listener and no election.
    pub fn new(
        client: Client,
        settings: Settings,
        tokens: Arc<dyn TokenEndpoint>,
        http: HttpClients,
        clock: Arc<dyn Clock>,
        shutdown: Shutdown,
    ) -> Self {
        Self {
            client,
            settings,
            tokens,
            http,
            clock,
            shutdown,
            admin: None,
            callback: None,
            listener: None,
            election: None,
            ready: Arc::default(),
        }
    }

    /// Serves `/healthz`, `/readyz` and `/metrics` on `address`.
    pub fn admin(mut self, address: std::net::SocketAddr) -> Self {
        self.admin = Some(address);
        self
    }

    /// Serves the authorization listener on `address`, if given. Its apiserver reads and writes
    /// go through `client` (give it a request budget of its own): a flood of browser requests
    /// then cannot starve the lease renewals and reconciles of the main client.
    pub fn callback(mut self, address: Option<std::net::SocketAddr>, client: Client) -> Self {
        self.callback = address;
        self.listener = address.map(|_| (client, controller::Contexts::default()));
        self
    }

    /// Takes part in leader election, if given.
    pub fn election(mut self, election: Option<controller::leader::ElectionSettings>) -> Self {
        self.election = election;
        self
    }

    /// Runs until shutdown (see the type's documentation for the order of things).
    pub async fn run(self) -> crate::Result<()> {
        let (leader, election) = self.join_election().await?;
        let servers = self.servers();
        let ready = Arc::clone(&self.ready);
        let flush_client = self.client.clone();
        let flush_timeout = self.settings.flush_timeout;
        let (cluster_store, cluster_writer) = reflector::store_shared::<ClusterMailProvider>(SHARED_BUFFER);
        let reporter =
            Reporter { controller: "mail-oauth-operator".into(), instance: Some(self.settings.instance.clone()) };
        let (nudges, nudged) = controller::verify::channel();
        let relay_keys = match &self.settings.relay_signing_key {
            Some((namespace, name)) => {
                controller::relay_key::RelayKeys::new(self.client.clone(), namespace.clone(), name.clone())
            }
            None => controller::relay_key::RelayKeys::off(),
        };
        let mut assembly = Assembly {
            tasks: Vec::new(),
            syncs: Vec::new(),
            pending: Arc::default(),
            leader,
            reporter,
            cluster_store,
            cluster_writer: Some(cluster_writer),
            first_ctx: None,
            contexts: Vec::new(),
            nudges,
            relay_keys: Arc::clone(&relay_keys),
        };
        {
            let shutdown = self.shutdown.clone();
            let watch = Arc::clone(&relay_keys).watch();
            assembly.tasks.push(
                async move {
                    tokio::select! {
                        () = watch => {}
                        () = shutdown => {}
                    }
                }
                .boxed(),
            );
        }
        let scopes: Vec<Option<String>> = if self.settings.namespaces.is_empty() {
            vec![None]
        } else {
            self.settings.namespaces.iter().cloned().map(Some).collect()
        };
        info!(namespaces = ?self.settings.namespaces, cluster_namespace = %self.settings.cluster_namespace, "starting");
        for scope in scopes {
            self.scope(&mut assembly, scope.as_deref());
        }
        self.cluster_providers(&mut assembly);
        // The verifier: mail servers are reached outside every reconcile.
        assembly.tasks.push(
            controller::verify::run(
                std::mem::take(&mut assembly.contexts),
                nudged,
                self.settings.verify.clone(),
                self.shutdown.clone(),
            )
            .boxed(),
        );
        assembly.tasks.push(readiness(std::mem::take(&mut assembly.syncs), ready, self.shutdown.clone()));
        assembly.tasks.push(trim_memory(self.shutdown.clone()));

        // Each task runs on its own: a panic in one (a bug) is logged and cannot unwind the
        // others or the process.
        let handles: Vec<_> = assembly.tasks.into_iter().map(tokio::spawn).collect();
        let (served, ()) = tokio::join!(servers, async {
            for result in futures::future::join_all(handles).await {
                if let Err(e) = result {
                    tracing::error!(error = %e, "a controller task ended abnormally");
                }
            }
        });
        // Every controller has drained; what could not be written yet is written now, and only
        // then is the lease given up, so that the next leader reads it.
        let deadline = tokio::time::Instant::now().checked_add(flush_timeout).unwrap_or_else(tokio::time::Instant::now);
        let lost = controller::grant_store::flush_pending(&flush_client, &assembly.pending, deadline).await;
        if lost > 0 {
            tracing::error!(lost, "grant states could not be written before shutdown");
        }
        if let Some(election) = election {
            election.release().await;
        }
        served
    }

    /// The leadership the controllers consult: elected, or always when there is no election.
    async fn join_election(
        &self,
    ) -> crate::Result<(Arc<controller::leader::Leadership>, Option<controller::leader::Election>)> {
        let Some(settings) = self.election.clone() else {
            self.settings.metrics.set_leader(true);
            return Ok((controller::leader::Leadership::always(), None));
        };
        info!(lease = %settings.name, namespace = %settings.namespace, identity = %settings.identity, "joining leader election");
        let (leader, election, tasks) = controller::leader::elect(
            settings.client.clone().unwrap_or_else(|| self.client.clone()),
            settings,
            Arc::clone(&self.clock),
            Arc::clone(&self.settings.metrics),
            self.shutdown.clone(),
        )
        .await?;
        for task in tasks {
            tokio::spawn(task);
        }
        Ok((leader, Some(election)))
    }

    /// The admin server and the authorization listener, each if asked for.
    fn servers(&self) -> BoxFuture<'static, crate::Result<()>> {
        let admin = self.admin.map(|address| {
            let mut registry = crate::metrics::registry(&self.settings.metrics);
            controller::observe::register(
                &mut registry,
                &self.settings.metrics,
                Arc::clone(&self.settings.contexts),
                Arc::clone(&self.settings.limits),
            );
            let admin = crate::server::Admin { ready: Arc::clone(&self.ready), registry: Arc::new(registry) };
            crate::server::serve(address, admin, self.shutdown.clone())
        });
        let callback = self.callback.zip(self.listener.as_ref()).map(|(address, (_, contexts))| {
            crate::server::authorize::serve(address, Arc::clone(contexts), self.shutdown.clone())
        });
        async move {
            let admin = async {
                match admin {
                    Some(serve) => serve.await,
                    None => Ok(()),
                }
            };
            let callback = async {
                match callback {
                    Some(serve) => serve.await,
                    None => Ok(()),
                }
            };
            let (a, c) = tokio::join!(admin, callback);
            a.and(c)
        }
        .boxed()
    }

    /// One watched scope (a namespace, or all): its providers' shared reflector and controller;
    /// its bindings' reflector and controller, triggered by their owned Secrets (metadata only,
    /// by label, our own writes left out) and by the providers they use; in strict mode the
    /// versions of referable Secrets.
    fn scope(&self, assembly: &mut Assembly, scope: Option<&str>) {
        let wc = list_from_cache();
        let client = &self.client;
        let settings = &self.settings;
        let shutdown = &self.shutdown;
        let providers_api: Api<MailProvider> = scoped(client, scope);
        let bindings_api: Api<MailboxBinding> = scoped(client, scope);

        // One reflector per provider kind feeds both its own controller and the binding
        // controllers' triggers: an event is dispatched only after the shared store holds it, so
        // a binding reconciled because its provider turned Ready also sees it Ready.
        let (provider_store, provider_writer) = reflector::store_shared::<MailProvider>(SHARED_BUFFER);
        let providers_for_controller = subscribe(&provider_writer);
        let providers_for_bindings = subscribe(&provider_writer);
        let cluster_for_bindings = match &assembly.cluster_writer {
            Some(writer) => subscribe(writer),
            None => futures::stream::empty().boxed(),
        };
        assembly.tasks.push(drive(
            watcher(providers_api, wc.clone()).modify(slim).default_backoff().reflect_shared(provider_writer),
            shutdown.clone(),
        ));
        let provider_controller = Controller::for_shared_stream(providers_for_controller, provider_store.clone());

        let (binding_store, writer) = reflector::store();
        let written: controller::Written = Default::default();
        let caught_up = Arc::clone(&written);
        let binding_stream = reflector::reflector(writer, watcher(bindings_api, wc).modify(slim))
            .inspect(move |event| {
                if let Ok(watcher::Event::Apply(b) | watcher::Event::InitApply(b)) = event {
                    controller::caught_up(&caught_up, &b.metadata);
                }
            })
            .default_backoff()
            .applied_objects()
            .predicate_filter(predicates::generation.combine(predicates::annotations), Default::default());
        let referable = self.referable_versions(assembly, scope);
        let own_writes = controller::OwnWrites::default();
        let (owned, owned_secrets) = owned_secrets(client, scope, own_writes.clone());
        let by_provider = {
            let store = binding_store.clone();
            move |p: Arc<MailProvider>| referencing(&store, ProviderKind::MailProvider, &p.name_any(), p.namespace())
        };
        let by_cluster_provider = {
            let store = binding_store.clone();
            move |p: Arc<ClusterMailProvider>| {
                referencing(&store, ProviderKind::ClusterMailProvider, &p.name_any(), None)
            }
        };
        let binding_controller = Controller::for_stream(binding_stream, binding_store.clone())
            .owns_stream(owned_secrets)
            .watches_shared_stream(providers_for_bindings, by_provider)
            .watches_shared_stream(cluster_for_bindings, by_cluster_provider)
            // A rotated or deleted relay signing key: every published Secret is signed again.
            .reconcile_all_on(assembly.relay_keys.changes());

        let polls: controller::Polls = Default::default();
        let client_secrets: controller::ClientSecretCache = Default::default();
        let namespace_labels = controller::NamespaceLabels::default();
        // One context per client: the controllers' and, with the authorization listener, the
        // listener's (same caches and state, its own apiserver client).
        let context = |client: &Client| Context {
            client: client.clone(),
            tokens: Arc::clone(&self.tokens),
            http: self.http.clone(),
            providers: provider_store.clone(),
            cluster_providers: assembly.cluster_store.clone(),
            bindings: binding_store.clone(),
            cluster_namespace: settings.cluster_namespace.clone(),
            recorder: Recorder::new(client.clone(), assembly.reporter.clone()),
            reporter: assembly.reporter.clone(),
            clock: Arc::clone(&self.clock),
            pending: Arc::clone(&assembly.pending),
            default_lifetime: settings.default_lifetime,
            references: settings.references,
            polls: Arc::clone(&polls),
            written: Arc::clone(&written),
            own_writes: own_writes.clone(),
            owned: owned.clone(),
            namespace_labels: namespace_labels.clone(),
            referable: referable.clone(),
            client_secrets: Arc::clone(&client_secrets),
            authorization: settings.authorization.clone(),
            metrics: Arc::clone(&settings.metrics),
            limits: Arc::clone(&settings.limits),
            leader: Arc::clone(&assembly.leader),
            verify: assembly.nudges.clone(),
            relay_keys: Arc::clone(&assembly.relay_keys),
        };
        let ctx = Arc::new(context(client));
        if let Some((listener_client, contexts)) = &self.listener
            && let Ok(mut all) = contexts.lock()
        {
            all.push(Arc::new(context(listener_client)));
        }
        assembly.first_ctx.get_or_insert_with(|| Arc::clone(&ctx));
        assembly.contexts.push(Arc::clone(&ctx));
        if let Ok(mut all) = settings.contexts.lock() {
            all.push(Arc::clone(&ctx));
        }
        assembly.syncs.push(synced(provider_store.clone()));
        assembly.syncs.push(synced(binding_store.clone()));
        let task = self.controller(
            "MailProvider",
            provider_controller,
            provider_store,
            &assembly.leader,
            provider::reconcile,
            provider::error_policy,
            Arc::clone(&ctx),
        );
        assembly.tasks.push(task);
        let task = self.controller(
            "MailboxBinding",
            binding_controller,
            binding_store,
            &assembly.leader,
            binding::reconcile,
            binding::error_policy,
            ctx,
        );
        assembly.tasks.push(task);
    }

    /// The shared `ClusterMailProvider` reflector (every scope's bindings have subscribed by now)
    /// and its controller.
    fn cluster_providers(&self, assembly: &mut Assembly) {
        let store = assembly.cluster_store.clone();
        let Some(writer) = assembly.cluster_writer.take() else { return };
        let for_controller = subscribe(&writer);
        assembly.tasks.push(drive(
            watcher(Api::<ClusterMailProvider>::all(self.client.clone()), list_from_cache())
                .modify(slim)
                .default_backoff()
                .reflect_shared(writer),
            self.shutdown.clone(),
        ));
        let Some(ctx) = assembly.first_ctx.clone() else { return };
        assembly.syncs.push(synced(store.clone()));
        let controller = Controller::for_shared_stream(for_controller, store.clone());
        let task = self.controller(
            "ClusterMailProvider",
            controller,
            store,
            &assembly.leader,
            provider::reconcile,
            provider::error_policy,
            ctx,
        );
        assembly.tasks.push(task);
    }

    /// In strict mode, the versions of referable Secrets (a client secret read once is reused
    /// until its Secret changes).
    fn referable_versions(&self, assembly: &mut Assembly, scope: Option<&str>) -> controller::versions::SecretVersions {
        let referable = controller::versions::SecretVersions::default();
        if self.settings.references == crate::policy::reference::ReferencePolicy::Labelled {
            let versions = referable.clone();
            let api: Api<PartialObjectMeta<Secret>> = scoped(&self.client, scope);
            assembly.tasks.push(drive(
                watcher(api, list_from_cache().labels(&format!("{ALLOW_REFERENCE_LABEL}=true")))
                    .default_backoff()
                    .inspect(move |e| {
                        if let Ok(e) = e {
                            versions.observe(e);
                        }
                    }),
                self.shutdown.clone(),
            ));
        }
        referable
    }

    /// One controller as a task: bounded concurrency, everything reconciled again each time this
    /// replica starts to lead, a graceful end at shutdown; each reconcile guarded, in a span
    /// naming the object, and counted for `/metrics`.
    #[allow(clippy::too_many_arguments)]
    fn controller<K, R, F>(
        &self,
        kind: &'static str,
        controller: Controller<K>,
        store: reflector::Store<K>,
        leader: &controller::leader::Leadership,
        reconcile: R,
        error_policy: fn(Arc<K>, &crate::Error, Arc<Context>) -> kube::runtime::controller::Action,
        ctx: Arc<Context>,
    ) -> BoxFuture<'static, ()>
    where
        K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
        K::DynamicType: Eq + std::hash::Hash + Clone + Default + std::fmt::Debug + Unpin + Send + Sync,
        R: Fn(Arc<K>, Arc<Context>) -> F + Send + Sync + 'static,
        F: std::future::Future<Output = crate::Result<kube::runtime::controller::Action>> + Send + 'static,
    {
        let run = controller
            .with_config(controller_config(self.settings.concurrency))
            .reconcile_all_on(leader.terms())
            .graceful_shutdown_on(self.shutdown.clone())
            .run(
                move |object, c| {
                    counted(kind, traced(kind, &*object, reconcile(Arc::clone(&object), Arc::clone(&c))), c)
                },
                error_policy,
                ctx,
            )
            .for_each(log_result)
            .boxed();
        until_shutdown(run, store, self.shutdown.clone())
    }
}

/// The owned Secrets' metadata (by label, no data): kept in `cache` (slimmed: see
/// [`controller::owned::slim`]), and as triggers for their bindings. Our own writes' events are
/// left out of the triggers (they would only make the binding look at its Secrets again to find
/// them as it wrote them), and so is the first list at start (every binding is reconciled from
/// the bindings' own list then; later relists do trigger: changes may hide in them).
fn owned_secrets(
    client: &Client,
    scope: Option<&str>,
    own: controller::OwnWrites,
) -> (
    controller::owned::OwnedSecrets,
    impl futures::Stream<Item = Result<PartialObjectMeta<Secret>, watcher::Error>> + Send + 'static,
) {
    // Metadata only, also over the wire (kube 5 asks an `Api<PartialObjectMeta<_>>` for
    // PartialObjectMetadata): a Secret's data never reaches this process here.
    let api: Api<PartialObjectMeta<Secret>> = scoped(client, scope);
    let cache = controller::owned::OwnedSecrets::watched();
    let mut first_list = true;
    let watch = watcher(api, list_from_cache().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY_VALUE}")))
        .modify(controller::owned::slim)
        .default_backoff();
    let observer = cache.clone();
    let stream = watch
        .inspect(move |event| match event {
            // The cache takes every event before it triggers anything, as a reflector's store:
            // a binding reconciled for a Secret's change sees that change. Once a (re)list is
            // in, absence in the cache means absence; until then every Secret is read.
            Ok(event) => observer.observe(event),
            Err(_) => observer.desynced(),
        })
        .filter_map(move |event| {
            std::future::ready(match event {
                Ok(watcher::Event::Apply(s) | watcher::Event::Delete(s)) => Some(Ok(s)),
                Ok(watcher::Event::InitApply(s)) => (!first_list).then_some(Ok(s)),
                Ok(watcher::Event::InitDone) => {
                    first_list = false;
                    None
                }
                Ok(watcher::Event::Init) => None,
                Err(e) => Some(Err(e)),
            })
        })
        .filter(move |s| std::future::ready(s.as_ref().map_or(true, |m| !own.is_own(&m.metadata))));
    (cache, stream)
}

/// Turns `ready` true once every cache has synced. Polled, not awaited: waiting on every store's
/// readiness future from a task of its own was seen to miss the wake-up now and then.
fn readiness(syncs: Vec<Synced>, ready: Arc<AtomicBool>, shutdown: Shutdown) -> BoxFuture<'static, ()> {
    async move {
        loop {
            if syncs.iter().all(|synced| synced()) {
                ready.store(true, Ordering::SeqCst);
                info!("caches synced; ready");
                break;
            }
            tokio::select! {
                () = tokio::time::sleep(std::time::Duration::from_millis(100)) => {}
                () = shutdown.clone() => break,
            }
        }
    }
    .boxed()
}

/// Gives the memory the allocator holds free back to the system every [`TRIM_EVERY`]. glibc's
/// malloc returns freed memory on its own only from the top of its heaps: what a burst freed
/// below live objects (the first list of thousands of bindings and Secrets, their first
/// reconciles, a relist) would stay resident for good. (jemalloc and mimalloc purge such pages
/// after a delay of their own; this is the same for glibc.) One call walks the free lists; with
/// nothing freed since the last one it costs microseconds.
fn trim_memory(shutdown: Shutdown) -> BoxFuture<'static, ()> {
    async move {
        let mut every = tokio::time::interval(TRIM_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = every.tick() => trim(),
                () = shutdown.clone() => break,
            }
        }
    }
    .boxed()
}

/// How often freed memory is given back to the system.
pub const TRIM_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() {
    // SAFETY: malloc_trim only releases free pages of the allocator's own heaps; it takes the
    // allocator's locks itself and touches no memory the program holds.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}

/// Every controller's configuration: a bounded number of reconciles at once.
fn controller_config(concurrency: u16) -> kube::runtime::controller::Config {
    kube::runtime::controller::Config::default().concurrency(concurrency)
}

/// Counts a reconcile's outcome for `/metrics`.
async fn counted(
    kind: &'static str,
    reconcile: impl std::future::Future<Output = crate::Result<kube::runtime::controller::Action>>,
    ctx: Arc<Context>,
) -> crate::Result<kube::runtime::controller::Action> {
    let result = reconcile.await;
    ctx.metrics.reconcile(kind, result.as_ref().map_or_else(crate::Error::category, |_| "ok"));
    result
}

/// Runs one reconcile, guarded, inside a span naming the object: every log line of the reconcile
/// carries `kind`, `namespace` and `object` (the name) without repeating them.
fn traced<K, F>(
    kind: &'static str,
    object: &K,
    reconcile: F,
) -> tracing::instrument::Instrumented<impl std::future::Future<Output = F::Output> + use<K, F>>
where
    K: kube::Resource,
    F: std::future::Future<Output = crate::Result<kube::runtime::controller::Action>>,
{
    use tracing::Instrument;
    let meta = object.meta();
    let span = tracing::info_span!(
        "reconcile",
        kind,
        namespace = meta.namespace.as_deref().unwrap_or_default(),
        object = meta.name.as_deref().unwrap_or_default()
    );
    guarded(reconcile).instrument(span)
}

/// Runs one reconcile so that a panic in it (a bug) becomes an error for that object only,
/// retried later by the error policy, instead of ending the controller.
/// A reconcile that runs past [`RECONCILE_DEADLINE`] is cancelled (its slot is given back) and
/// retried: a token obtained before is already kept in memory (see `binding::persist_grant`).
async fn guarded(
    reconcile: impl std::future::Future<Output = crate::Result<kube::runtime::controller::Action>>,
) -> crate::Result<kube::runtime::controller::Action> {
    let run = std::panic::AssertUnwindSafe(reconcile).catch_unwind();
    match tokio::time::timeout(RECONCILE_DEADLINE, run).await {
        Ok(Ok(result)) => result,
        Ok(Err(_)) => {
            tracing::error!("a reconcile panicked; it is retried later");
            Err(crate::Error::Panicked)
        }
        Err(_) => {
            tracing::warn!(deadline = ?RECONCILE_DEADLINE, "a reconcile ran past its deadline and was cancelled");
            Err(crate::Error::TimedOut(RECONCILE_DEADLINE))
        }
    }
}

/// The longest one reconcile may run: a token request's own limit (30 s), the bounded wait for
/// the provider's rate limit, and the Kubernetes reads and writes around them.
pub const RECONCILE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(45);

/// Runs a controller until it ends. kube's controller never ends while its cache has not synced
/// (its runner waits for the store before anything else), so a shutdown that finds the cache
/// unsynced stops it at once: it has not started a reconcile, so nothing is cut short.
fn until_shutdown<K>(
    controller: BoxFuture<'static, ()>,
    store: reflector::Store<K>,
    shutdown: Shutdown,
) -> BoxFuture<'static, ()>
where
    K: kube::Resource + Clone + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Send + Sync,
{
    async move {
        let unsynced_at_shutdown = async {
            shutdown.await;
            if store.wait_until_ready().now_or_never().is_some() {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            () = controller => {}
            () = unsynced_at_shutdown => debug!("stopping a controller whose cache never synced"),
        }
    }
    .boxed()
}

/// What the caches keep of an object: everything but `managedFields` and kubectl's
/// last-applied copy of the object, which the operator never reads (together often larger than
/// the rest of a binding).
fn slim<K: kube::Resource>(object: &mut K) {
    let meta = object.meta_mut();
    meta.managed_fields = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
}

/// Events buffered per subscriber of a shared reflector before the reflector waits.
const SHARED_BUFFER: usize = 256;

/// A subscription to a shared store's events. Stores made by `store_shared` always allow one;
/// the empty fallback only satisfies the type.
fn subscribe<K>(writer: &reflector::store::Writer<K>) -> futures::stream::BoxStream<'static, Arc<K>>
where
    K: kube::Resource + Clone + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Default + Send + Sync,
{
    match writer.subscribe() {
        Some(handle) => handle.boxed(),
        None => futures::stream::empty().boxed(),
    }
}

/// Drives a reflector stream until shutdown.
fn drive<S, T>(stream: S, shutdown: Shutdown) -> BoxFuture<'static, ()>
where
    S: futures::Stream<Item = T> + Send + 'static,
{
    stream.take_until(shutdown).for_each(|_| std::future::ready(())).boxed()
}

/// Whether a store has synced, asked without waiting.
type Synced = Box<dyn Fn() -> bool + Send + Sync>;

fn synced<K>(store: reflector::Store<K>) -> Synced
where
    K: kube::Resource + Clone + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Send + Sync,
{
    Box::new(move || store.wait_until_ready().now_or_never().is_some())
}

fn scoped<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

fn referencing(
    store: &reflector::Store<MailboxBinding>,
    kind: ProviderKind,
    name: &str,
    namespace: Option<String>,
) -> Vec<ObjectRef<MailboxBinding>> {
    store
        .state()
        .iter()
        .filter(|b| b.spec.provider_ref.kind == kind && b.spec.provider_ref.name == name)
        .filter(|b| namespace.is_none() || b.namespace() == namespace)
        .map(|b| ObjectRef::from_obj(&**b))
        .collect()
}

async fn log_result<K: std::fmt::Debug, E: std::fmt::Display>(result: Result<K, E>) {
    match result {
        Ok(obj) => debug!(?obj, "reconciled"),
        Err(e) => debug!(error = %e, "reconcile did not complete"),
    }
}

/// A watch whose (re)lists are served from the apiserver's watch cache (`resourceVersion=0`, as
/// client-go's informers list): a restart over 10,000 bindings and 20,000 Secrets lists them
/// without reading every object from etcd. What the cache may lag by is delivered by the watch
/// that follows, and every decision on a Secret is fenced by its version anyway.
fn list_from_cache() -> watcher::Config {
    watcher::Config::default().any_semantic()
}
