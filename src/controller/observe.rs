//! The metrics collector over the controllers' caches: token expiry and renewal per binding,
//! readiness, client secret expiry per provider, requests waiting for a provider's rate, computed
//! at scrape time with the controllers' clock. Registered by the runtime; the controllers do not
//! know it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::registry::Registry;

use super::Contexts;
use super::limits::RateLimits;
use crate::api::Protocol;
use crate::metrics::{Metrics, gauge};

/// Registers the collector of the controllers' state in `registry`.
pub fn register(registry: &mut Registry, metrics: &Arc<Metrics>, contexts: Contexts, limits: Arc<RateLimits>) {
    registry.register_collector(Box::new(State { contexts, limits, metrics: Arc::clone(metrics) }));
}

/// Metrics read from the caches at scrape time, and the per-provider counters.
struct State {
    contexts: Contexts,
    limits: Arc<RateLimits>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("State")
    }
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
        // Bindings by protocol whose last check logged in, and by protocol and reason whose did not.
        let mut verified: BTreeMap<&'static str, f64> =
            ["imap", "smtp", "pop3"].into_iter().map(|p| (p, 0.0)).collect();
        let mut unverified: BTreeMap<(&'static str, String), f64> = BTreeMap::new();
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
                if let Some(v) = status.and_then(|s| s.verification.as_ref()) {
                    for p in [Protocol::Imap, Protocol::Smtp, Protocol::Pop3] {
                        match v.get(p) {
                            Some(c) if c.result == "Verified" => *verified.entry(p.as_str()).or_default() += 1.0,
                            Some(c) => *unverified.entry((p.as_str(), c.result.clone())).or_default() += 1.0,
                            None => {}
                        }
                    }
                }
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
        self.metrics.encode_providers(&mut encoder)?;
        // The renewal most overdue: how far the oldest renewal time that has passed lies behind.
        let now = contexts.first().map_or_else(chrono::Utc::now, |ctx| ctx.clock.now()).timestamp();
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
        let verified: Vec<_> = verified.into_iter().map(|(p, n)| (vec![("protocol", p.to_owned())], n)).collect();
        gauge(
            &mut encoder,
            "mailbox_verified",
            "Bindings whose last check of the protocol logged in with the token",
            &verified,
        )?;
        let unverified: Vec<_> =
            unverified.into_iter().map(|((p, r), n)| (vec![("protocol", p.to_owned()), ("reason", r)], n)).collect();
        if !unverified.is_empty() {
            gauge(
                &mut encoder,
                "mailbox_unverified",
                "Bindings whose last check of the protocol failed, by reason",
                &unverified,
            )?;
        }
        gauge(&mut encoder, "binding_ready", "1 when the binding's Ready condition is True", &ready)?;
        gauge(
            &mut encoder,
            "provider_client_secret_expiry_timestamp_seconds",
            "The earliest known client secret or certificate expiry of a provider",
            &secret_expiry,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{ProviderLabel, encode, registry};

    fn registry_of(metrics: &Arc<Metrics>, limits: Arc<RateLimits>) -> Registry {
        let mut r = registry(metrics);
        register(&mut r, metrics, Contexts::default(), limits);
        r
    }

    #[test]
    fn counters_carry_bounded_labels_and_the_state_of_no_cache_is_empty() {
        let metrics = Arc::new(Metrics::default());
        metrics.token_request("mail", "MailProvider/idp", "ok", 0.2);
        metrics.token_request("mail", "MailProvider/idp", "ReauthorizationRequired", 0.1);
        metrics.reconcile("MailboxBinding", "ok");
        let limits = Arc::new(RateLimits::new(1.0));
        let text = encode(&registry_of(&metrics, limits)).unwrap();
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
        let text = encode(&registry_of(&metrics, limits)).unwrap();
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
        assert_eq!(metrics.providers_counted(), 2);
        // A provider that comes back counts from zero.
        metrics.token_request("mail", "MailProvider/gone", "ok", 0.1);
        let text = encode(&registry_of(&metrics, Arc::new(RateLimits::new(1.0)))).unwrap();
        assert!(text.contains(r#"provider="MailProvider/gone",outcome="ok"} 1"#), "{text}");
        assert!(!text.contains("InvalidGrant"), "{text}");
    }
}
