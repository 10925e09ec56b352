//! Leader election with a `coordination.k8s.io` Lease (kube-lease-manager acquires and renews
//! it). One replica requests tokens and writes; the others keep their caches warm and serve
//! health and metrics. Whether this replica leads is judged at each use from the Lease as last
//! watched ([`crate::policy::leader::holds`]), so a leader cut off from the API server stops when
//! its lease runs out, not when it learns it lost.

use std::sync::Arc;

use chrono::Duration;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use kube_lease_manager::{LeaseManagerBuilder, LeaseManagerError};
use tokio::sync::watch;
use tracing::{info, warn};

use super::Clock;
use super::Shutdown;
use crate::policy::leader::{LeaseView, holds};

/// How a replica takes part in leader election.
#[derive(Clone)]
pub struct ElectionSettings {
    /// The Lease's namespace (the operator's).
    pub namespace: String,
    /// The Lease's name.
    pub name: String,
    /// This replica's identity (the pod name).
    pub identity: String,
    /// How long a lease lasts unrenewed; it is renewed half-way through.
    pub duration: std::time::Duration,
    /// The client the Lease is read and renewed with: one of its own, so that no burst of
    /// reconciles (nor the listener) can spend the budget the lease needs. `None`: the runtime's.
    pub client: Option<kube::Client>,
}

/// Whether this replica may act, asked before every token request and every reconcile.
pub struct Leadership {
    elected: Option<Elected>,
    terms: watch::Receiver<u64>,
}

struct Elected {
    identity: String,
    lease: Store<Lease>,
    key: ObjectRef<Lease>,
    margin: Duration,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for Leadership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leadership").field("elected", &self.elected.as_ref().map(|e| &e.identity)).finish()
    }
}

impl Leadership {
    /// No election: this replica always acts (one replica, or tests).
    pub fn always() -> Arc<Self> {
        let (_, terms) = watch::channel(0);
        Arc::new(Self { elected: None, terms })
    }

    /// Whether this replica may request tokens and write now.
    pub fn is_leader(&self) -> bool {
        match &self.elected {
            None => true,
            Some(e) => holds(&view(e.lease.get(&e.key).as_deref()), &e.identity, e.clock.now(), e.margin),
        }
    }

    /// Whether this replica takes part in an election.
    pub fn elected(&self) -> bool {
        self.elected.is_some()
    }

    /// A stream that yields each time this replica starts to lead, for the controllers to
    /// reconcile everything (what they skipped while another replica led).
    pub fn terms(&self) -> BoxStream<'static, ()> {
        let mut rx = self.terms.clone();
        rx.mark_unchanged();
        futures::stream::unfold(rx, |mut rx| async move { rx.changed().await.ok().map(|()| ((), rx)) }).boxed()
    }
}

/// The running election: release it at shutdown, after pending grant states are written.
pub struct Election {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Election {
    /// Gives the lease up so that another replica takes over at once.
    pub async fn release(self) {
        let _ = self.stop.send(());
        if let Err(e) = self.task.await {
            warn!(error = %e, "the leader election task ended abnormally");
        }
    }
}

/// Joins the election: creates the Lease if needed, starts acquiring and renewing it, and
/// watches it. Returns the leadership to consult, the election to release, and the tasks that
/// keep the watch and the term count going until `shutdown`.
pub async fn elect(
    client: Client,
    settings: ElectionSettings,
    clock: Arc<dyn Clock>,
    metrics: Arc<crate::metrics::Metrics>,
    shutdown: Shutdown,
) -> crate::Result<(Arc<Leadership>, Election, Vec<futures::future::BoxFuture<'static, ()>>)> {
    let seconds = settings.duration.as_secs().max(3);
    // Renewed half-way through; leadership is given up a sixth before the lease runs out. A
    // renewal thus has a third of the lease (5 s of the chart's 15 s) to be written and watched
    // back before this replica stops acting: with a sixth (renewing a third before the end), a
    // starved process under a burst (10,000 bindings, a debug build on two busy cores) saw its
    // renewals too late and stopped leading while it held the Lease. client-go renews far more
    // often (every 2 s of a 15 s lease).
    let grace = (seconds / 2).max(1);
    let margin = Duration::milliseconds(i64::try_from(seconds.saturating_mul(1000) / 6).unwrap_or(i64::MAX));
    let builder = {
        let (client, settings) = (client.clone(), settings.clone());
        move || {
            LeaseManagerBuilder::new(client.clone(), &settings.name)
                .with_namespace(&settings.namespace)
                .with_identity(&settings.identity)
                .with_duration(seconds)
                .with_grace(grace)
                .with_field_manager(format!("mail-oauth-operator/{}", settings.identity))
                .build()
        }
    };
    // The first one fails the start (no Lease permission is a setup error to report at once).
    let first = builder().await.map_err(|e| crate::Error::Election(e.to_string()))?;

    // The Lease as this replica sees it; a release by the leader is noticed here.
    let api: Api<Lease> = Api::namespaced(client, &settings.namespace);
    let (lease, writer) = reflector::store();
    let freed = Arc::new(tokio::sync::Notify::new());
    let config = watcher::Config::default().fields(&format!("metadata.name={}", settings.name));
    let watch_lease = {
        let freed = Arc::clone(&freed);
        watcher(api, config)
            .default_backoff()
            .reflect(writer)
            .applied_objects()
            .take_until(shutdown.clone())
            .for_each(move |lease| {
                if let Ok(lease) = lease
                    && lease.spec.as_ref().is_none_or(|s| s.holder_identity.is_none())
                {
                    freed.notify_one();
                }
                std::future::ready(())
            })
            .boxed()
    };

    let (term_tx, terms) = watch::channel(0_u64);
    let leadership = Arc::new(Leadership {
        elected: Some(Elected {
            identity: settings.identity.clone(),
            lease,
            key: ObjectRef::new(&settings.name).within(&settings.namespace),
            margin,
            clock,
        }),
        terms,
    });
    let count_terms = {
        let leadership = Arc::clone(&leadership);
        let identity = settings.identity.clone();
        async move {
            let mut leading = false;
            loop {
                let now = leadership.is_leader();
                if now != leading {
                    leading = now;
                    metrics.set_leader(leading);
                    if leading {
                        info!(identity = %identity, "leading: this replica requests tokens and writes");
                        term_tx.send_modify(|t| *t = t.wrapping_add(1));
                    } else {
                        warn!(identity = %identity, "not leading: another replica requests tokens and writes");
                    }
                }
                tokio::select! {
                    () = tokio::time::sleep(std::time::Duration::from_millis(250)) => {}
                    () = shutdown.clone() => break,
                }
            }
        }
        .boxed()
    };
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(campaign(first, builder, freed, stopped));
    Ok((leadership, Election { stop, task }, vec![watch_lease, count_terms]))
}

/// Acquires and renews the lease until told to stop, then releases it. The lease manager sleeps
/// until the lease it saw runs out; when the leader releases it earlier, a fresh manager is made
/// so that this replica takes over at once rather than after the old lease's time.
async fn campaign<F, Fut>(
    mut manager: kube_lease_manager::LeaseManager,
    builder: F,
    freed: Arc<tokio::sync::Notify>,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<kube_lease_manager::LeaseManager, LeaseManagerError>>,
{
    let mut holding = false;
    loop {
        tokio::select! {
            biased;
            _ = &mut stopped => break,
            changed = manager.changed() => match changed {
                Ok(now) => holding = now,
                Err(e) => {
                    warn!(error = %e, "leader election: the Lease could not be read or renewed; retrying");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
            },
            () = freed.notified(), if !holding => match builder().await {
                Ok(fresh) => manager = fresh,
                Err(e) => warn!(error = %e, "leader election: the Lease could not be read; retrying"),
            },
        }
    }
    match manager.release().await {
        Ok(()) => info!("leader lease released"),
        Err(e) => {
            warn!(error = %e, "the leader lease could not be released; another replica takes over when it runs out")
        }
    }
}

/// The parts of a Lease that decide leadership.
fn view(lease: Option<&Lease>) -> LeaseView {
    let Some(spec) = lease.and_then(|l| l.spec.as_ref()) else {
        return LeaseView::default();
    };
    LeaseView {
        holder: spec.holder_identity.clone(),
        renewed: spec.renew_time.as_ref().and_then(|t| {
            chrono::DateTime::from_timestamp(t.0.as_second(), u32::try_from(t.0.subsec_nanosecond()).unwrap_or(0))
        }),
        duration_seconds: spec.lease_duration_seconds,
    }
}
