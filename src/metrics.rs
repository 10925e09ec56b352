//! Prometheus metrics. State metrics (token expiry and renewal per binding, readiness, client
//! secret expiry per provider) are computed from the controllers' caches at scrape time, so a
//! deleted object leaves no series. Event metrics (token requests by provider and outcome, their
//! duration, reconciles by kind and outcome) are counters with bounded label values: provider
//! keys, condition reasons and fixed words, never a token, a mailbox or a message. The series of
//! a provider that is no longer in the caches are removed at scrape time, so deleted providers
//! do not add up.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::controller::Contexts;
use crate::controller::limits::RateLimits;

/// Label pairs: names are fixed words, values bounded (provider keys, reasons, kinds).
type Labels = Vec<(&'static str, String)>;

/// A histogram family with the token-request buckets.
type Durations = Family<Labels, Histogram, fn() -> Histogram>;

/// A provider as the per-provider series name it: `(namespace, provider key)`, the namespace
/// empty for a `ClusterMailProvider`.
type ProviderLabel = (String, String);

/// The counters the controllers update.
#[derive(Debug)]
pub struct Metrics {
    token_requests: Family<Labels, Counter>,
    token_request_seconds: Durations,
    reconciles: Family<Labels, Counter>,
    leader: prometheus_client::metrics::gauge::Gauge,
    /// The outcomes counted per provider: the label sets to remove when the provider is gone
    /// (prometheus-client's families cannot be iterated).
    outcomes: Mutex<BTreeMap<ProviderLabel, BTreeSet<String>>>,
}

fn request_buckets() -> Histogram {
    Histogram::new([0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0])
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            token_requests: Family::default(),
            token_request_seconds: Family::new_with_constructor(request_buckets),
            reconciles: Family::default(),
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

/// The registry `/metrics` encodes: the counters, and the state computed from `contexts`. The
/// per-provider counters are encoded by the state collector, after the series of providers no
/// longer in the caches are removed.
pub fn registry(metrics: &Arc<Metrics>, contexts: Contexts, limits: Arc<RateLimits>) -> Registry {
    let mut registry = Registry::with_prefix("mailoauth");
    registry.register("reconciles", "Reconciles, by kind and outcome", metrics.reconciles.clone());
    registry.register(
        "leader",
        "1 on the replica that requests tokens and writes, 0 on replicas waiting to take over",
        metrics.leader.clone(),
    );
    registry.register_collector(Box::new(State { contexts, limits, metrics: Arc::clone(metrics) }));
    registry
}

/// Metrics read from the caches at scrape time, and the per-provider counters.
struct State {
    contexts: Contexts,
    limits: Arc<RateLimits>,
    metrics: Arc<Metrics>,
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

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("State")
    }
}

fn gauge<'a>(
    encoder: &mut DescriptorEncoder<'a>,
    name: &str,
    help: &str,
    series: &[(Labels, f64)],
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

impl Collector for State {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let contexts = self.contexts.lock().map(|c| c.clone());
        // Prune only from caches that were read: with none (not started, a poisoned lock)
        // nothing is known to be gone.
        let caches_read = contexts.as_ref().is_ok_and(|c| !c.is_empty());
        let contexts = contexts.unwrap_or_default();
        let (mut expiry, mut renew, mut ready, mut secret_expiry) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut providers_seen = BTreeSet::new();
        let mut live = BTreeSet::new();
        for ctx in &contexts {
            for b in ctx.bindings.state() {
                let labels = vec![
                    ("namespace", b.metadata.namespace.clone().unwrap_or_default()),
                    ("binding", b.metadata.name.clone().unwrap_or_default()),
                ];
                let status = b.status.as_ref();
                if let Some(t) = status.and_then(|s| s.token.as_ref()) {
                    #[allow(clippy::cast_precision_loss)]
                    {
                        expiry.push((labels.clone(), t.expires_at.timestamp() as f64));
                        renew.push((labels.clone(), t.renew_at.timestamp() as f64));
                    }
                }
                let is_ready = status
                    .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
                    .is_some_and(crate::api::Condition::is_true);
                ready.push((labels, if is_ready { 1.0 } else { 0.0 }));
            }
            let namespaced = ctx.providers.state().into_iter().map(|p| {
                let labels = vec![
                    ("namespace", p.metadata.namespace.clone().unwrap_or_default()),
                    ("provider", format!("MailProvider/{}", p.metadata.name.clone().unwrap_or_default())),
                ];
                (labels, p.status.as_ref().and_then(|s| s.client_secret_expires_at))
            });
            let cluster = ctx.cluster_providers.state().into_iter().map(|p| {
                let labels = vec![
                    ("namespace", String::new()),
                    ("provider", format!("ClusterMailProvider/{}", p.metadata.name.clone().unwrap_or_default())),
                ];
                (labels, p.status.as_ref().and_then(|s| s.client_secret_expires_at))
            });
            for (labels, at) in namespaced.chain(cluster) {
                if let [(_, namespace), (_, provider)] = labels.as_slice() {
                    live.insert((namespace.clone(), provider.clone()));
                }
                if let Some(at) = at
                    && providers_seen.insert(labels.clone())
                {
                    #[allow(clippy::cast_precision_loss)]
                    secret_expiry.push((labels, at.timestamp() as f64));
                }
            }
        }
        if caches_read {
            self.metrics.prune_providers(&live);
        }
        family(
            &mut encoder,
            "token_requests",
            "Requests to token endpoints, by provider and outcome (ok, or the condition reason)",
            &self.metrics.token_requests,
        )?;
        family(
            &mut encoder,
            "token_request_duration_seconds",
            "Duration of token-endpoint requests, by provider",
            &self.metrics.token_request_seconds,
        )?;
        // The renewal most overdue: how far the oldest renewal time that has passed lies behind.
        let now = chrono::Utc::now().timestamp();
        #[allow(clippy::cast_precision_loss)]
        let overdue = renew.iter().map(|(_, at)| now as f64 - at).filter(|late| *late > 0.0).fold(0.0_f64, f64::max);
        gauge(&mut encoder, "binding_token_expiry_timestamp_seconds", "When the published token expires", &expiry)?;
        gauge(
            &mut encoder,
            "renewal_overdue_seconds",
            "How long the most overdue renewal is behind its renewal time (0: none overdue)",
            &[(Vec::new(), overdue)],
        )?;
        #[allow(clippy::cast_precision_loss)]
        let waiting = self.limits.waiting() as f64;
        gauge(
            &mut encoder,
            "token_requests_waiting",
            "Token requests waiting for their provider's rate limit",
            &[(Vec::new(), waiting)],
        )?;
        gauge(&mut encoder, "binding_token_renew_timestamp_seconds", "When the operator renews the token", &renew)?;
        gauge(&mut encoder, "binding_ready", "1 when the binding's Ready condition is True", &ready)?;
        gauge(
            &mut encoder,
            "provider_client_secret_expiry_timestamp_seconds",
            "The earliest known client secret or certificate expiry of a provider",
            &secret_expiry,
        )
    }
}

/// The text exposition of `registry`.
pub fn encode(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_carry_bounded_labels_and_the_state_of_no_cache_is_empty() {
        let metrics = Arc::new(Metrics::default());
        metrics.token_request("mail", "MailProvider/idp", "ok", 0.2);
        metrics.token_request("mail", "MailProvider/idp", "ReauthorizationRequired", 0.1);
        metrics.reconcile("MailboxBinding", "ok");
        let limits = Arc::new(RateLimits::new(1.0));
        let text = encode(&registry(&metrics, crate::controller::Contexts::default(), limits)).unwrap();
        assert!(
            text.contains(
                r#"mailoauth_token_requests_total{namespace="mail",provider="MailProvider/idp",outcome="ok"} 1"#
            ),
            "{text}"
        );
        assert!(text.contains("mailoauth_token_request_duration_seconds_bucket"), "{text}");
        assert!(text.contains(r#"mailoauth_reconciles_total{kind="MailboxBinding",outcome="ok"} 1"#), "{text}");
        assert!(text.contains("# TYPE mailoauth_binding_ready gauge"), "{text}");
        assert!(text.contains("mailoauth_token_requests_waiting 0.0"), "{text}");
        assert!(text.contains("mailoauth_renewal_overdue_seconds 0.0"), "{text}");
    }

    #[test]
    fn the_series_of_a_provider_no_longer_in_the_caches_are_removed() {
        let metrics = Arc::new(Metrics::default());
        metrics.token_request("mail", "MailProvider/gone", "ok", 0.2);
        metrics.token_request("mail", "MailProvider/gone", "InvalidGrant", 0.2);
        metrics.token_request("mail", "MailProvider/kept", "ok", 0.2);
        metrics.token_request("", "ClusterMailProvider/shared", "ok", 0.2);
        metrics.token_request("", "ClusterMailProvider/deleted", "ok", 0.2);
        let live: BTreeSet<ProviderLabel> = [
            ("mail".to_owned(), "MailProvider/kept".to_owned()),
            (String::new(), "ClusterMailProvider/shared".to_owned()),
            // A provider of the same name in another namespace keeps nothing alive here.
            ("other".to_owned(), "MailProvider/gone".to_owned()),
        ]
        .into();
        metrics.prune_providers(&live);
        let limits = Arc::new(RateLimits::new(1.0));
        let text = encode(&registry(&metrics, crate::controller::Contexts::default(), limits)).unwrap();
        assert!(!text.contains("gone"), "{text}");
        assert!(!text.contains("deleted"), "{text}");
        assert!(text.contains(r#"provider="MailProvider/kept",outcome="ok"} 1"#), "{text}");
        assert!(text.contains(r#"provider="ClusterMailProvider/shared",outcome="ok"} 1"#), "{text}");
        assert!(
            text.contains(
                r#"mailoauth_token_request_duration_seconds_count{namespace="mail",provider="MailProvider/kept"} 1"#
            ),
            "{text}"
        );
        assert_eq!(metrics.outcomes.lock().map(|o| o.len()).unwrap_or_default(), 2);
        // A provider that comes back counts from zero.
        metrics.token_request("mail", "MailProvider/gone", "ok", 0.1);
        let text = encode(&registry(&metrics, crate::controller::Contexts::default(), Arc::new(RateLimits::new(1.0))))
            .unwrap();
        assert!(text.contains(r#"provider="MailProvider/gone",outcome="ok"} 1"#), "{text}");
        assert!(!text.contains("InvalidGrant"), "{text}");
    }
}
