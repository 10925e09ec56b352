//! Prometheus metrics: the counters and their encoding. State metrics (token expiry and renewal
//! per binding, readiness, client secret expiry per provider) are computed at scrape time by a
//! collector beside the state it reads (`controller::observe`), so a deleted object leaves no
//! series. Event metrics (token requests by provider and outcome, their
//! duration, reconciles by kind and outcome) are counters with bounded label values: provider
//! keys, condition reasons and fixed words, never a token, a mailbox or a message. The series of
//! a provider that is no longer in the caches are removed at scrape time, so deleted providers
//! do not add up.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Label pairs: names are fixed words, values bounded (provider keys, reasons, kinds).
pub type Labels = Vec<(&'static str, String)>;

/// A histogram family with the token-request buckets.
type Durations = Family<Labels, Histogram, fn() -> Histogram>;

/// A provider as the per-provider series name it: `(namespace, provider key)`, the namespace
/// empty for a `ClusterMailProvider`.
pub type ProviderLabel = (String, String);

/// The counters the controllers update.
#[derive(Debug)]
pub struct Metrics {
    token_requests: Family<Labels, Counter>,
    token_request_seconds: Durations,
    reconciles: Family<Labels, Counter>,
    mailbox_check_seconds: Durations,
    leader: prometheus_client::metrics::gauge::Gauge,
    /// The outcomes counted per provider: the label sets to remove when the provider is gone
    /// (prometheus-client's families cannot be iterated).
    outcomes: Mutex<BTreeMap<ProviderLabel, BTreeSet<String>>>,
}

fn request_buckets() -> Histogram {
    Histogram::new([0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0])
}

fn check_buckets() -> Histogram {
    Histogram::new([0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 45.0])
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            token_requests: Family::default(),
            token_request_seconds: Family::new_with_constructor(request_buckets),
            reconciles: Family::default(),
            mailbox_check_seconds: Family::new_with_constructor(check_buckets),
            leader: prometheus_client::metrics::gauge::Gauge::default(),
            outcomes: Mutex::default(),
        }
    }
}

impl Metrics {
    /// Counts one token-endpoint request (any grant) and how long it took; `namespace` is the
    /// binding's (a `MailProvider` is named within it).
    pub fn token_request(&self, namespace: &str, provider: &str, outcome: &str, seconds: f64) {
        if let Ok(mut outcomes) = self.outcomes.lock() {
            outcomes.entry((namespace.to_owned(), provider.to_owned())).or_default().insert(outcome.to_owned());
        }
        let provider = provider_labels(namespace, provider);
        let mut labels = provider.clone();
        labels.push(("outcome", outcome.to_owned()));
        self.token_requests.get_or_create(&labels).inc();
        self.token_request_seconds.get_or_create(&provider).observe(seconds);
    }

    /// Removes the token-request series of every provider not in `live`.
    pub fn prune_providers(&self, live: &BTreeSet<ProviderLabel>) {
        let Ok(mut outcomes) = self.outcomes.lock() else { return };
        outcomes.retain(|(namespace, provider), seen| {
            if live.contains(&(namespace.clone(), provider.clone())) {
                return true;
            }
            let labels = provider_labels(namespace, provider);
            for outcome in seen.iter() {
                let mut with_outcome = labels.clone();
                with_outcome.push(("outcome", outcome.clone()));
                self.token_requests.remove(&with_outcome);
            }
            self.token_request_seconds.remove(&labels);
            false
        });
    }

    /// Counts one mailbox check of `protocol` (`imap`, `smtp`, `pop3`) that ended in `result` (a
    /// verification reason) and how long it took.
    pub fn mailbox_check(&self, protocol: &str, result: &str, seconds: f64) {
        let labels = vec![("protocol", protocol.to_owned()), ("result", result.to_owned())];
        self.mailbox_check_seconds.get_or_create(&labels).observe(seconds);
    }

    /// Records whether this replica leads (1) or waits (0).
    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
    }

    /// Counts one reconcile of `kind` that ended in `outcome` (`ok` or an error category).
    pub fn reconcile(&self, kind: &'static str, outcome: &'static str) {
        self.reconciles.get_or_create(&vec![("kind", kind.to_owned()), ("outcome", outcome.to_owned())]).inc();
    }
}

fn provider_labels(namespace: &str, provider: &str) -> Labels {
    vec![("namespace", namespace.to_owned()), ("provider", provider.to_owned())]
}

/// The registry `/metrics` encodes, with the counters that need no state. The runtime registers
/// the collectors of the parts that keep state beside them (the controllers' caches: see
/// `controller::observe`); the per-provider counters are encoded by such a collector, after the
/// series of providers no longer in the caches are removed ([`Metrics::encode_providers`]).
pub fn registry(metrics: &Metrics) -> Registry {
    let mut registry = Registry::with_prefix("mailoauth");
    registry.register("reconciles", "Reconciles, by kind and outcome", metrics.reconciles.clone());
    registry.register(
        "mailbox_check_duration_seconds",
        "Duration of mailbox checks (log in and out), by protocol and result",
        metrics.mailbox_check_seconds.clone(),
    );
    registry.register(
        "leader",
        "1 on the replica that requests tokens and writes, 0 on replicas waiting to take over",
        metrics.leader.clone(),
    );
    registry
}

impl Metrics {
    /// Encodes the per-provider counters (token requests and their durations).
    pub fn encode_providers(&self, encoder: &mut DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        family(
            encoder,
            "token_requests",
            "Requests to token endpoints, by provider and outcome (ok, or the condition reason)",
            &self.token_requests,
        )?;
        family(
            encoder,
            "token_request_duration_seconds",
            "Duration of token-endpoint requests, by provider",
            &self.token_request_seconds,
        )
    }

    /// How many providers have counted series (for tests of the pruning).
    pub fn providers_counted(&self) -> usize {
        self.outcomes.lock().map(|o| o.len()).unwrap_or_default()
    }
}

/// Encodes a family as the registry would (nothing when it has no series).
fn family<'a>(
    encoder: &mut DescriptorEncoder<'a>,
    name: &str,
    help: &str,
    metric: &impl EncodeMetric,
) -> Result<(), std::fmt::Error> {
    if metric.is_empty() {
        return Ok(());
    }
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

/// Label pairs and a value: one series of a gauge computed at scrape time.
pub type Series = (Labels, f64);

/// Encodes a gauge computed at scrape time: one series per entry (no labels: a single value).
pub fn gauge<'a>(
    encoder: &mut DescriptorEncoder<'a>,
    name: &str,
    help: &str,
    series: &[Series],
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in series {
        if labels.is_empty() {
            ConstGauge::new(*value).encode(family)?;
            return Ok(());
        }
        ConstGauge::new(*value).encode(family.encode_family(labels)?)?;
    }
    Ok(())
}

/// The text exposition of `registry`.
pub fn encode(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry)?;
    Ok(out)
}
