//! Wires the controllers: one `ClusterMailProvider` controller, and per watched namespace (or for
//! all) a `MailProvider` and a `MailboxBinding` controller. Owned Secrets are watched by metadata
//! only and by label; bindings trigger on spec and annotation changes, not on our status writes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::future::{BoxFuture, Shared};
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::Secret;
use kube::core::PartialObjectMeta;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{Controller, Predicate, WatchStreamExt, predicates, watcher};
use kube::{Api, Client, ResourceExt};
use tracing::{debug, info};

use super::{Clock, Context, binding, provider};
use crate::api::{
    ALLOW_REFERENCE_LABEL, ClusterMailProvider, MANAGED_BY_LABEL, MANAGED_BY_VALUE, MailProvider, MailboxBinding,
    ProviderKind,
};
use crate::oauth::TokenEndpoint;
use crate::oauth::http::HttpClients;

/// A shutdown signal every task can wait on.
pub type Shutdown = Shared<BoxFuture<'static, ()>>;

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
    pub authorization: super::AuthorizationSettings,
    /// Filled with each context as it is made, for the authorization listener and `/metrics`.
    pub contexts: super::Contexts,
    /// Counters for `/metrics`.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Token requests per provider.
    pub limits: Arc<super::limits::RateLimits>,
    /// Reconciles running at once, per controller.
    pub concurrency: u16,
    /// Whether this replica leads; controllers reconcile everything each time it starts to.
    pub leader: Arc<super::leader::Leadership>,
}

/// Runs every controller until `shutdown`; `ready` turns true once every cache has synced.
pub async fn run(
    client: Client,
    settings: Settings,
    tokens: Arc<dyn TokenEndpoint>,
    http: HttpClients,
    clock: Arc<dyn Clock>,
    ready: Arc<AtomicBool>,
    shutdown: Shutdown,
) {
    let wc = watcher::Config::default();
    let pending: super::PendingGrants = Arc::default();
    let flush_client = client.clone();
    let scope_count = settings.namespaces.len().max(1);
    let mut tasks: Vec<BoxFuture<'static, ()>> = Vec::new();
    // One reflector per provider kind feeds both its own controller and the binding controllers'
    // triggers: an event is dispatched only after the shared store holds it, so a binding
    // reconciled because its provider turned Ready also sees it Ready.
    let (cluster_store, cluster_writer) = reflector::store_shared::<ClusterMailProvider>(SHARED_BUFFER);
    let cluster_for_controller = subscribe(&cluster_writer);
    let mut cluster_for_bindings: Vec<_> = (0..scope_count).map(|_| subscribe(&cluster_writer)).collect();
    tasks.push(drive(
        watcher(Api::<ClusterMailProvider>::all(client.clone()), wc.clone())
            .modify(slim)
            .default_backoff()
            .reflect_shared(cluster_writer),
        shutdown.clone(),
    ));
    let cluster_controller = Controller::for_shared_stream(cluster_for_controller, cluster_store.clone());
    let reporter = Reporter { controller: "mail-oauth-operator".into(), instance: Some(settings.instance.clone()) };
    let scopes: Vec<Option<String>> = if settings.namespaces.is_empty() {
        vec![None]
    } else {
        settings.namespaces.iter().cloned().map(Some).collect()
    };

    let mut syncs: Vec<Synced> = Vec::new();
    let mut first_ctx = None;
    for scope in scopes {
        let providers_api: Api<MailProvider> = scoped(&client, scope.as_deref());
        let bindings_api: Api<MailboxBinding> = scoped(&client, scope.as_deref());
        let secrets_api: Api<PartialObjectMeta<Secret>> = scoped(&client, scope.as_deref());

        let (provider_store, provider_writer) = reflector::store_shared::<MailProvider>(SHARED_BUFFER);
        let providers_for_controller = subscribe(&provider_writer);
        let providers_for_bindings = subscribe(&provider_writer);
        tasks.push(drive(
            watcher(providers_api, wc.clone()).modify(slim).default_backoff().reflect_shared(provider_writer),
            shutdown.clone(),
        ));
        let provider_controller = Controller::for_shared_stream(providers_for_controller, provider_store.clone());

        let (binding_store, writer) = reflector::store();
        let binding_stream = reflector::reflector(writer, watcher(bindings_api, wc.clone()).modify(slim))
            .default_backoff()
            .applied_objects()
            .predicate_filter(predicates::generation.combine(predicates::annotations), Default::default());
        // Metadata only (`PartialObjectMeta` asks the apiserver for no Secret data), and only
        // the Secrets we label.
        // In strict mode, the versions of referable Secrets (client secrets read once are reused
        // until theirs changes).
        let referable = super::versions::SecretVersions::default();
        if settings.references == crate::policy::reference::ReferencePolicy::Labelled {
            let versions = referable.clone();
            let api: Api<PartialObjectMeta<Secret>> = scoped(&client, scope.as_deref());
            tasks.push(drive(
                watcher(api, watcher::Config::default().labels(&format!("{ALLOW_REFERENCE_LABEL}=true")))
                    .default_backoff()
                    .inspect(move |e| {
                        if let Ok(e) = e {
                            versions.observe(e);
                        }
                    }),
                shutdown.clone(),
            ));
        }
        // Our own writes' events are dropped: they would only make the binding read its Secrets
        // again to find them as it wrote them.
        let own_writes = super::OwnWrites::default();
        let owned_secrets = {
            let own = own_writes.clone();
            // The first list at start triggers nothing either: every binding is reconciled from
            // the bindings' own list then (later relists do trigger: changes may hide in them).
            let mut first_list = true;
            watcher(secrets_api, watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY_VALUE}")))
                .default_backoff()
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
                .filter(move |s| std::future::ready(s.as_ref().map_or(true, |m| !own.is_own(&m.metadata))))
        };
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
        let cluster_trigger = cluster_for_bindings.pop().unwrap_or_else(|| futures::stream::empty().boxed());
        let binding_controller = Controller::for_stream(binding_stream, binding_store.clone())
            .owns_stream(owned_secrets)
            .watches_shared_stream(providers_for_bindings, by_provider)
            .watches_shared_stream(cluster_trigger, by_cluster_provider);

        let ctx = Arc::new(Context {
            client: client.clone(),
            tokens: Arc::clone(&tokens),
            http: http.clone(),
            providers: provider_store.clone(),
            cluster_providers: cluster_store.clone(),
            bindings: binding_store.clone(),
            cluster_namespace: settings.cluster_namespace.clone(),
            recorder: Recorder::new(client.clone(), reporter.clone()),
            clock: Arc::clone(&clock),
            pending: Arc::clone(&pending),
            default_lifetime: settings.default_lifetime,
            references: settings.references,
            polls: Default::default(),
            written: Default::default(),
            own_writes: own_writes.clone(),
            referable: referable.clone(),
            client_secrets: Default::default(),
            authorization: settings.authorization.clone(),
            metrics: Arc::clone(&settings.metrics),
            limits: Arc::clone(&settings.limits),
            leader: Arc::clone(&settings.leader),
        });
        first_ctx.get_or_insert_with(|| Arc::clone(&ctx));
        if let Ok(mut all) = settings.contexts.lock() {
            all.push(Arc::clone(&ctx));
        }
        syncs.push(synced(provider_store.clone()));
        syncs.push(synced(binding_store.clone()));
        tasks.push(until_shutdown(
            provider_controller
                .with_config(controller_config(settings.concurrency))
                .reconcile_all_on(settings.leader.terms())
                .graceful_shutdown_on(shutdown.clone())
                .run(
                    |p, c| {
                        counted(
                            "MailProvider",
                            traced("MailProvider", &*p, provider::reconcile(Arc::clone(&p), Arc::clone(&c))),
                            c,
                        )
                    },
                    provider::error_policy,
                    Arc::clone(&ctx),
                )
                .for_each(log_result)
                .boxed(),
            provider_store,
            shutdown.clone(),
        ));
        tasks.push(until_shutdown(
            binding_controller
                .with_config(controller_config(settings.concurrency))
                .reconcile_all_on(settings.leader.terms())
                .graceful_shutdown_on(shutdown.clone())
                .run(
                    |b, c| {
                        counted(
                            "MailboxBinding",
                            traced("MailboxBinding", &*b, binding::reconcile(Arc::clone(&b), Arc::clone(&c))),
                            c,
                        )
                    },
                    binding::error_policy,
                    ctx,
                )
                .for_each(log_result)
                .boxed(),
            binding_store,
            shutdown.clone(),
        ));
    }
    if let Some(ctx) = first_ctx {
        syncs.push(synced(cluster_store.clone()));
        tasks.push(until_shutdown(
            cluster_controller
                .with_config(controller_config(settings.concurrency))
                .reconcile_all_on(settings.leader.terms())
                .graceful_shutdown_on(shutdown.clone())
                .run(
                    |p, c| {
                        counted(
                            "ClusterMailProvider",
                            traced("ClusterMailProvider", &*p, provider::reconcile(Arc::clone(&p), Arc::clone(&c))),
                            c,
                        )
                    },
                    provider::error_policy,
                    ctx,
                )
                .for_each(log_result)
                .boxed(),
            cluster_store,
            shutdown.clone(),
        ));
    }
    tasks.push(
        async move {
            // Readiness is polled, not awaited: waiting on every store's readiness future from a
            // task of its own was seen to miss the wake-up now and then.
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
        .boxed(),
    );
    // Each task runs on its own: a panic in one (a bug) is logged and cannot unwind the others
    // or the process.
    let handles: Vec<_> = tasks.into_iter().map(tokio::spawn).collect();
    for result in futures::future::join_all(handles).await {
        if let Err(e) = result {
            tracing::error!(error = %e, "a controller task ended abnormally");
        }
    }
    // Every controller has drained; what could not be written yet is written now.
    let deadline =
        tokio::time::Instant::now().checked_add(settings.flush_timeout).unwrap_or_else(tokio::time::Instant::now);
    let lost = binding::flush_pending(&flush_client, &pending, deadline).await;
    if lost > 0 {
        tracing::error!(lost, "grant states could not be written before shutdown");
    }
}

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
async fn guarded(
    reconcile: impl std::future::Future<Output = crate::Result<kube::runtime::controller::Action>>,
) -> crate::Result<kube::runtime::controller::Action> {
    match std::panic::AssertUnwindSafe(reconcile).catch_unwind().await {
        Ok(result) => result,
        Err(_) => {
            tracing::error!("a reconcile panicked; it is retried later");
            Err(crate::Error::Panicked)
        }
    }
}

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
