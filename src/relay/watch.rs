//! The shared relay's watch: the published Secrets (selected by the operator's labels) of each
//! served namespace, or of every namespace, fed into the [`Index`]. Data keys cannot be
//! selected on, so every published Secret is seen and only those with `relay_password` are kept
//! ([`Index::apply`]). After each full list (the first one, and after a watch restarts) the
//! Secrets the list no longer has are forgotten; until then the ones known keep working. Watch
//! errors (the API unreachable, RBAC refusing) are logged and retried with backoff.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::runtime::{WatchStreamExt, watcher};

use super::source::{Applied, Index, key_of};
use crate::api::{MANAGED_BY_LABEL, MANAGED_BY_VALUE, SECRET_ROLE_LABEL};

/// The label selector of the published Secrets.
pub fn selector() -> String {
    format!("{MANAGED_BY_LABEL}={MANAGED_BY_VALUE},{SECRET_ROLE_LABEL}=published")
}

/// Watches `namespaces` (every namespace when empty) into `index` until the runtime ends; `ready`
/// turns true once every namespace has been listed.
pub async fn run(client: kube::Client, namespaces: Vec<String>, index: Arc<Index>, ready: Arc<AtomicBool>) {
    let scopes: Vec<Option<String>> =
        if namespaces.is_empty() { vec![None] } else { namespaces.into_iter().map(Some).collect() };
    let total = scopes.len();
    let listed = Arc::new(AtomicUsize::new(0));
    futures::future::join_all(scopes.into_iter().map(|scope| {
        let (client, index, ready, listed) = (client.clone(), index.clone(), ready.clone(), listed.clone());
        async move {
            let mut first = true;
            scope_watch(client, scope, &index, || {
                if std::mem::take(&mut first) && listed.fetch_add(1, Ordering::SeqCst).saturating_add(1) >= total {
                    tracing::info!(secrets = index.len(), "the shared relay has listed its namespaces");
                    index.set_listed();
                    ready.store(true, Ordering::SeqCst);
                }
            })
            .await;
        }
    }))
    .await;
}

async fn scope_watch(client: kube::Client, scope: Option<String>, index: &Index, mut on_listed: impl FnMut()) {
    let api: Api<Secret> = match &scope {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    };
    let shown = scope.as_deref().unwrap_or("all namespaces").to_owned();
    let mut stream =
        watcher(api, watcher::Config::default().labels(&selector()).page_size(50)).default_backoff().boxed();
    let mut listing: Option<HashSet<(String, String)>> = None;
    while let Some(event) = stream.next().await {
        match event {
            Ok(watcher::Event::Init) => listing = Some(HashSet::new()),
            Ok(watcher::Event::InitApply(secret)) => {
                if let Some(listing) = listing.as_mut() {
                    listing.insert(key_of(&secret));
                }
                apply(index, &secret);
            }
            Ok(watcher::Event::InitDone) => {
                if let Some(listing) = listing.take() {
                    index.retain_listed(scope.as_deref(), &listing);
                }
                on_listed();
            }
            Ok(watcher::Event::Apply(secret)) => apply(index, &secret),
            Ok(watcher::Event::Delete(secret)) => index.delete(&secret),
            Err(e) => tracing::warn!(namespace = %shown, error = %e, "watching the published Secrets failed; retrying"),
        }
    }
}

fn apply(index: &Index, secret: &Secret) {
    let (namespace, name) = key_of(secret);
    match index.apply(secret) {
        Applied::Kept => tracing::debug!(%namespace, %name, "relay credentials taken"),
        Applied::NoRelay => {}
        Applied::TooLarge => tracing::warn!(
            %namespace,
            %name,
            "the published Secret is larger than {} bytes: the shared relay does not serve it",
            super::source::MAX_SECRET
        ),
        Applied::Invalid(why) => {
            tracing::warn!(%namespace, %name, why = %why, "the published Secret's relay keys are unusable");
        }
        Applied::Full => tracing::warn!(
            %namespace,
            %name,
            "the shared relay serves at most {} bindings per namespace and {} in all: this one is not served",
            super::source::MAX_PER_NAMESPACE,
            super::source::MAX_ENTRIES
        ),
    }
}
