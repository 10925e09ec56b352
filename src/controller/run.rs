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
use crate::api::{ClusterMailProvider, MANAGED_BY_LABEL, MANAGED_BY_VALUE, MailProvider, MailboxBinding, ProviderKind};
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
    let cluster_controller = Controller::new(Api::<ClusterMailProvider>::all(client.clone()), wc.clone());
    let cluster_store = cluster_controller.store();
    let reporter = Reporter { controller: "mail-oauth-operator".into(), instance: Some(settings.instance.clone()) };
    let scopes: Vec<Option<String>> = if settings.namespaces.is_empty() {
        vec![None]
    } else {
        settings.namespaces.iter().cloned().map(Some).collect()
    };

    let mut tasks: Vec<BoxFuture<'static, ()>> = Vec::new();
    let mut syncs: Vec<BoxFuture<'static, ()>> = Vec::new();
    let mut first_ctx = None;
    for scope in scopes {
        let providers_api: Api<MailProvider> = scoped(&client, scope.as_deref());
        let bindings_api: Api<MailboxBinding> = scoped(&client, scope.as_deref());
        let secrets_api: Api<PartialObjectMeta<Secret>> = scoped(&client, scope.as_deref());

        let provider_controller = Controller::new(providers_api.clone(), wc.clone());
        let provider_store = provider_controller.store();

        let (binding_store, writer) = reflector::store();
        let binding_stream = reflector::reflector(writer, watcher(bindings_api, wc.clone()))
            .default_backoff()
            .applied_objects()
            .predicate_filter(predicates::generation.combine(predicates::annotations), Default::default());
        let owned_secrets =
            watcher(secrets_api, watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY_VALUE}")))
                .default_backoff()
                .touched_objects();
        let by_provider = {
            let store = binding_store.clone();
            move |p: MailProvider| referencing(&store, ProviderKind::MailProvider, &p.name_any(), p.namespace())
        };
        let by_cluster_provider = {
            let store = binding_store.clone();
            move |p: ClusterMailProvider| referencing(&store, ProviderKind::ClusterMailProvider, &p.name_any(), None)
        };
        let binding_controller = Controller::for_stream(binding_stream, binding_store.clone())
            .owns_stream(owned_secrets)
            .watches(providers_api, wc.clone(), by_provider)
            .watches(Api::<ClusterMailProvider>::all(client.clone()), wc.clone(), by_cluster_provider);

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
            pending: Default::default(),
        });
        first_ctx.get_or_insert_with(|| Arc::clone(&ctx));
        syncs.push(synced(provider_store.clone()));
        syncs.push(synced(binding_store.clone()));
        tasks.push(until_shutdown(
            provider_controller
                .graceful_shutdown_on(shutdown.clone())
                .run(provider::reconcile, provider::error_policy, Arc::clone(&ctx))
                .for_each(log_result)
                .boxed(),
            provider_store,
            shutdown.clone(),
        ));
        tasks.push(until_shutdown(
            binding_controller
                .graceful_shutdown_on(shutdown.clone())
                .run(binding::reconcile, binding::error_policy, ctx)
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
                .graceful_shutdown_on(shutdown.clone())
                .run(provider::reconcile, provider::error_policy, ctx)
                .for_each(log_result)
                .boxed(),
            cluster_store,
            shutdown.clone(),
        ));
    }
    tasks.push(
        async move {
            tokio::select! {
                _ = futures::future::join_all(syncs) => {
                    ready.store(true, Ordering::SeqCst);
                    info!("caches synced; ready");
                }
                () = shutdown => {}
            }
        }
        .boxed(),
    );
    futures::future::join_all(tasks).await;
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

fn synced<K>(store: reflector::Store<K>) -> BoxFuture<'static, ()>
where
    K: kube::Resource + Clone + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Send + Sync,
{
    async move {
        let _ = store.wait_until_ready().await;
    }
    .boxed()
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
