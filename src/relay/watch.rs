//! The shared relay's watch: the published Secrets (selected by the operator's labels) of each
//! served namespace, or of every namespace, fed into the [`Index`]. Data keys cannot be
//! selected on, so every published Secret is seen and only those with `relay_password` are kept
//! ([`Index::apply`]). After each full list (the first one, and after a watch restarts) the
//! Secrets the list no longer has are forgotten; until then the ones known keep working. Watch
//! errors (the API unreachable, RBAC refusing) are logged and retried with backoff.
//!
//! The operator's relay signing key is watched too (its one Secret, by name, in the operator's
//! namespace): the namespaces are listed once it has been read (or found absent: then nothing is
//! served until it appears), and listed again whenever it changes, so that the Secrets the
//! operator signs anew are taken and those signed with the old key are dropped. A deleted key is
//! kept until the operator has made the next one.

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

/// Watches `namespaces` (every namespace when empty) into `index` until the runtime ends, with
/// the signing key of the Secret `signing` (namespace, name); `ready` turns true once the key has
/// been looked for and every namespace has been listed.
pub async fn run(
    client: kube::Client,
    namespaces: Vec<String>,
    signing: (String, String),
    index: Arc<Index>,
    ready: Arc<AtomicBool>,
) {
    let (generation_tx, generation) = tokio::sync::watch::channel(0_u64);
    let (looked_tx, mut looked) = tokio::sync::watch::channel(false);
    let keys = key_watch(client.clone(), signing, index.clone(), generation_tx, looked_tx);
    let scopes: Vec<Option<String>> =
        if namespaces.is_empty() { vec![None] } else { namespaces.into_iter().map(Some).collect() };
    let total = scopes.len();
    let listed = Arc::new(AtomicUsize::new(0));
    let secrets = async move {
        // The Secrets are judged with the key: look for it first.
        let _ = looked.wait_for(|l| *l).await;
        futures::future::join_all(scopes.into_iter().map(|scope| {
            let (client, index, ready, listed) = (client.clone(), index.clone(), ready.clone(), listed.clone());
            let generation = generation.clone();
            async move {
                let mut first = true;
                scope_watch(client, scope, &index, generation, || {
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
    };
    tokio::join!(keys, secrets);
}

/// Watches the signing key's Secret into `index`: a new key bumps `generation` (the namespaces
/// are listed again); `looked` turns true after the first list.
async fn key_watch(
    client: kube::Client,
    (namespace, name): (String, String),
    index: Arc<Index>,
    generation: tokio::sync::watch::Sender<u64>,
    looked: tokio::sync::watch::Sender<bool>,
) {
    let api: Api<Secret> = Api::namespaced(client, &namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut stream = watcher(api, config).default_backoff().boxed();
    let mut found = false;
    let take = |secret: &Secret| match crate::controller::relay_key::key_of(secret) {
        Ok(key) => {
            if index.key().as_ref() != Some(&key) {
                tracing::info!(key = %key.id(), "the shared relay has the operator's signing key");
                index.set_key(Some(key));
                generation.send_modify(|g| *g = g.wrapping_add(1));
            }
        }
        Err(why) => {
            tracing::warn!(%namespace, %name, why = %why, "the relay signing key Secret is unusable; the key known is kept")
        }
    };
    while let Some(event) = stream.next().await {
        match event {
            Ok(watcher::Event::Init) => found = false,
            Ok(watcher::Event::InitApply(s) | watcher::Event::Apply(s)) => {
                found = true;
                take(&s);
            }
            Ok(watcher::Event::InitDone) => {
                if !found && index.key().is_none() {
                    tracing::warn!(
                        %namespace,
                        %name,
                        "the relay signing key Secret is absent: nothing is served until the operator makes it \
                         (it does when it publishes relay credentials)"
                    );
                }
                looked.send_replace(true);
            }
            Ok(watcher::Event::Delete(_)) => tracing::warn!(
                %namespace,
                %name,
                "the relay signing key Secret was deleted: the key known is kept until the operator makes the next"
            ),
            Err(e) => {
                tracing::warn!(%namespace, %name, error = %e, "watching the relay signing key failed; retrying");
            }
        }
    }
}

async fn scope_watch(
    client: kube::Client,
    scope: Option<String>,
    index: &Index,
    mut generation: tokio::sync::watch::Receiver<u64>,
    mut on_listed: impl FnMut(),
) {
    let api: Api<Secret> = match &scope {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    };
    let shown = scope.as_deref().unwrap_or("all namespaces").to_owned();
    // A new signing key: the watch starts again, and its list judges every Secret with it.
    loop {
        generation.mark_unchanged();
        let mut stream = watcher(api.clone(), watcher::Config::default().labels(&selector()).page_size(50))
            .default_backoff()
            .boxed();
        let mut listing: Option<HashSet<(String, String)>> = None;
        loop {
            let event = tokio::select! {
                event = stream.next() => event,
                changed = generation.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    tracing::info!(namespace = %shown, "the signing key changed: listing the published Secrets again");
                    break;
                }
            };
            let Some(event) = event else { return };
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
                Err(e) => {
                    tracing::warn!(namespace = %shown, error = %e, "watching the published Secrets failed; retrying");
                }
            }
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
        Applied::Refused(why) => tracing::warn!(
            %namespace,
            %name,
            reason = why.label(),
            "the published Secret is not served: {}",
            why.describe()
        ),
        Applied::Full => tracing::warn!(
            %namespace,
            %name,
            "the shared relay serves at most {} bindings per namespace and {} in all: this one is not served",
            super::source::MAX_PER_NAMESPACE,
            super::source::MAX_ENTRIES
        ),
    }
}
