//! The verifier: checks mailboxes by logging in to their mail servers with the published token
//! and out again, outside the binding reconcile, so that a slow or hostile mail server never
//! holds a reconcile slot. One task for the process ([`run`]), fed by nudges from the binding
//! reconcile ([`Nudges`]) and by a sweep of the bindings' caches (a binding at rest is never
//! reconciled in full and is still checked when due; after a restart nothing is checked before
//! its time, which lives in status). Checks are paced per mail server
//! ([`crate::policy::verification::Pacer`]), a bounded number run at once, and only while this
//! replica leads. Each check writes `status.verification` and `MailboxVerified` by server-side
//! apply under its own field manager ([`crate::api::VERIFY_FIELD_MANAGER`]); the token is never
//! logged, and a failing check touches neither the token nor `Ready`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Resource, ResourceExt};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{Instrument, debug, info, warn};

use super::{Context, Shutdown};
use crate::api::{
    Grant, MailProviderSpec, MailboxBinding, Protocol, ProviderKind, ServerAddress, ServerTls, VERIFY_FIELD_MANAGER,
};
use crate::mail::{self, Credentials, Target, TlsMode};
use crate::policy::binding::conditions;
use crate::policy::events::Announcement;
use crate::policy::verification::{
    Key, Next, Pacer, Queue, announcement, basis, invalid, merged, next, requested, server_key,
};
use crate::policy::verify::{AppToken, Check, GrantKind, Verdict, app_token, classify, no_server};

/// Nudges sent by the binding reconcile: "look at this binding now". Never waits: when the
/// verifier is busy a nudge is dropped, and the sweep finds the binding all the same.
#[derive(Clone, Debug, Default)]
pub struct Nudges {
    tx: Option<mpsc::Sender<Key>>,
}

impl Nudges {
    /// Asks the verifier to look at a binding.
    pub fn nudge(&self, namespace: &str, name: &str) {
        if let Some(tx) = &self.tx {
            let _ = tx.try_send((namespace.to_owned(), name.to_owned()));
        }
    }
}

/// The nudge channel: the sending half for the contexts, the receiving half for [`run`].
pub fn channel() -> (Nudges, mpsc::Receiver<Key>) {
    let (tx, rx) = mpsc::channel(1024);
    (Nudges { tx: Some(tx) }, rx)
}

/// How the verifier runs.
#[derive(Clone, Debug)]
pub struct VerifySettings {
    /// Checks running at once (the process's, all mail servers together).
    pub concurrency: usize,
    /// Check starts per second at each mail server.
    pub per_server_rate: f64,
    /// How often the caches are swept for due checks.
    pub sweep: std::time::Duration,
    /// Bounds of one check.
    pub limits: mail::Limits,
}

impl Default for VerifySettings {
    fn default() -> Self {
        Self {
            concurrency: 4,
            per_server_rate: 1.0,
            sweep: std::time::Duration::from_secs(30),
            limits: mail::Limits::default(),
        }
    }
}

/// The verifier's state.
struct Verifier {
    contexts: Vec<Arc<Context>>,
    settings: VerifySettings,
    /// Checks waiting for their start and running, paced per mail server (per-namespace limit:
    /// half the places).
    queue: Queue,
    /// Bindings whose check could not be made (no Secret, a failed write): not before then.
    backoff: HashMap<Key, DateTime<Utc>>,
    running: JoinSet<(Key, bool)>,
}

/// Runs the verifier until shutdown.
pub async fn run(
    contexts: Vec<Arc<Context>>,
    mut nudges: mpsc::Receiver<Key>,
    settings: VerifySettings,
    shutdown: Shutdown,
) {
    let mut sweep = tokio::time::interval(settings.sweep);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut v = Verifier {
        contexts,
        queue: Queue::new(settings.concurrency / 2, Pacer::new(settings.per_server_rate)),
        settings,
        backoff: HashMap::new(),
        running: JoinSet::new(),
    };
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let wait = v.until_next_start();
        tokio::select! {
            () = &mut shutdown => break,
            Some(key) = nudges.recv() => v.consider(key),
            _ = sweep.tick() => v.sweep(),
            Some(done) = v.running.join_next(), if !v.running.is_empty() => v.finished(done),
            () = tokio::time::sleep(wait) => {}
        }
        v.start_ready();
    }
    v.running.abort_all();
}

impl Verifier {
    /// Now, to the clock's precision: the pacing works in milliseconds (at 200 starts a second a
    /// start every 5 ms), which [`Context::now`]'s whole seconds would turn into one a second.
    fn now(&self) -> DateTime<Utc> {
        self.contexts.first().map_or_else(Utc::now, |c| c.clock.now())
    }

    /// How long until the earliest queued check may start (an hour when nothing waits or every
    /// slot is taken: a finishing check wakes the loop).
    fn until_next_start(&self) -> std::time::Duration {
        let idle = std::time::Duration::from_secs(3600);
        if self.running.len() >= self.settings.concurrency {
            return idle;
        }
        self.queue
            .next_at()
            .map_or(idle, |at| at.signed_duration_since(self.now()).to_std().unwrap_or(std::time::Duration::ZERO))
    }

    fn find(&self, key: &Key) -> Option<(Arc<Context>, Arc<MailboxBinding>)> {
        let r = ObjectRef::new(&key.1).within(&key.0);
        self.contexts.iter().find_map(|c| c.bindings.get(&r).map(|b| (Arc::clone(c), b)))
    }

    fn sweep(&mut self) {
        let now = self.now();
        self.queue.prune(now);
        self.backoff.retain(|_, at| *at > now);
        let keys: Vec<Key> = self
            .contexts
            .iter()
            .filter(|c| c.leader.is_leader())
            .flat_map(|c| c.bindings.state())
            .map(|b| (b.namespace().unwrap_or_default(), b.name_any()))
            .collect();
        for key in keys {
            self.consider(key);
        }
    }

    /// Queues the binding's check when it is due (the queue paces its start per server), or its
    /// status write when there is one to make without a check (not paced).
    fn consider(&mut self, key: Key) {
        if self.queue.contains(&key) {
            return;
        }
        let now = self.now();
        if self.backoff.get(&key).is_some_and(|at| *at > now) {
            return;
        }
        let Some((ctx, binding)) = self.find(&key) else { return };
        if !ctx.leader.is_leader() {
            return;
        }
        let servers = servers_of(&ctx, &binding).unwrap_or_default();
        let paced = match next(&binding, &servers, now) {
            Next::Idle => return,
            Next::Check { at, .. } if at > now => return,
            Next::Check { .. } => {
                binding.spec.protocols.iter().filter_map(|p| servers.get(p)).map(server_key).collect()
            }
            Next::Clear | Next::Invalid(_) => Vec::new(),
        };
        self.queue.push(now, key, paced);
    }

    fn start_ready(&mut self) {
        let free = self.settings.concurrency.saturating_sub(self.running.len());
        for key in self.queue.start(self.now(), free) {
            let Some((ctx, _)) = self.find(&key) else {
                self.queue.finish(&key);
                continue;
            };
            let limits = self.settings.limits;
            let span = tracing::info_span!("verify", namespace = %key.0, binding = %key.1);
            self.running.spawn(
                async move {
                    let ok = match check(&ctx, &key, limits).await {
                        Ok(()) => true,
                        Err(e) => {
                            warn!(error = %e, "mailbox check not completed");
                            false
                        }
                    };
                    (key, ok)
                }
                .instrument(span),
            );
        }
    }

    fn finished(&mut self, done: Result<(Key, bool), tokio::task::JoinError>) {
        match done {
            Ok((key, ok)) => {
                if !ok {
                    let now = self.now();
                    let retry = now.checked_add_signed(chrono::Duration::minutes(5)).unwrap_or(now);
                    self.backoff.insert(key.clone(), retry);
                }
                self.queue.finish(&key);
            }
            Err(e) => {
                // A panicking check (a bug): its binding stays counted as running until the
                // process restarts rather than being checked in a loop.
                tracing::error!(error = %e, "a mailbox check ended abnormally");
            }
        }
    }
}

/// The provider's mail servers for the binding (from the caches, nothing cloned but them).
fn servers_of(ctx: &Context, binding: &MailboxBinding) -> Option<BTreeMap<Protocol, ServerAddress>> {
    let r = &binding.spec.provider_ref;
    Some(match r.kind {
        ProviderKind::MailProvider => crate::oauth::provider::servers(
            &ctx.providers.get(&ObjectRef::new(&r.name).within(&binding.namespace().unwrap_or_default()))?.spec,
        ),
        ProviderKind::ClusterMailProvider => {
            crate::oauth::provider::servers(&ctx.cluster_providers.get(&ObjectRef::new(&r.name))?.spec.provider)
        }
    })
}

/// The provider's registration for the binding (its CA bundle is the mail servers' extra trust).
fn provider_spec(ctx: &Context, binding: &MailboxBinding) -> Option<MailProviderSpec> {
    let r = &binding.spec.provider_ref;
    match r.kind {
        ProviderKind::MailProvider => Some(
            ctx.providers.get(&ObjectRef::new(&r.name).within(&binding.namespace().unwrap_or_default()))?.spec.clone(),
        ),
        ProviderKind::ClusterMailProvider => {
            Some(ctx.cluster_providers.get(&ObjectRef::new(&r.name))?.spec.provider.clone())
        }
    }
}

fn tls_mode(address: &ServerAddress) -> TlsMode {
    match address.tls {
        Some(ServerTls::Implicit) => TlsMode::Implicit,
        Some(ServerTls::Starttls) => TlsMode::Starttls,
        Some(ServerTls::None) => TlsMode::None,
        None => TlsMode::for_port(address.port),
    }
}

/// What a check could not do (nothing about the mailbox: it is tried again later).
#[derive(Debug, thiserror::Error)]
enum CheckError {
    #[error("the published Secret {0} has no access_token")]
    NoToken(String),
    #[error("reading the published Secret failed: {0}")]
    Read(kube::Error),
    #[error("writing the verification status failed: {0}")]
    Write(kube::Error),
    #[error("this replica no longer leads")]
    NotLeader,
}

/// One binding: checks its mailbox when due (each protocol in turn) and writes what was found;
/// or writes what is to be written without a check (verification off, an unusable spec).
async fn check(ctx: &Context, key: &Key, limits: mail::Limits) -> Result<(), CheckError> {
    let Some(binding) = ctx.bindings.get(&ObjectRef::new(&key.1).within(&key.0)) else { return Ok(()) };
    if !ctx.leader.is_leader() {
        return Err(CheckError::NotLeader);
    }
    let now = ctx.now();
    let servers = servers_of(ctx, &binding).unwrap_or_default();
    let spec = provider_spec(ctx, &binding);
    let previous = binding.status.clone().unwrap_or_default();
    let generation = binding.metadata.generation;
    match next(&binding, &servers, now) {
        Next::Idle => Ok(()),
        Next::Check { at, .. } if at > now => Ok(()),
        Next::Clear => {
            info!("verification is off: removing its results");
            apply(ctx, &binding, serde_json::json!({})).await
        }
        Next::Invalid(message) => {
            let condition = invalid(&previous, generation, message, now);
            // The last results stay (what the verifier no longer sends would be removed).
            let status = match &previous.verification {
                Some(v) => serde_json::json!({ "verification": v, "conditions": [condition] }),
                None => serde_json::json!({ "conditions": [condition] }),
            };
            apply(ctx, &binding, status).await?;
            announce(ctx, &binding, &Announcement { warning: true, reason: condition.reason, note: condition.message })
                .await;
            Ok(())
        }
        Next::Check { why, .. } => {
            debug!(?why, "checking the mailbox");
            let token = published_token(ctx, &binding).await?;
            let creds = Credentials { user: binding.spec.mailbox.clone(), token };
            // Every protocol at once, so that each server sees its login when the check starts (the
            // moment the pacer recorded), not after another server's login took its time.
            let verdicts: Vec<(Protocol, _)> = futures::future::join_all(binding.spec.protocols.iter().map(|p| {
                let p = *p;
                let (binding, spec, servers, creds) = (&binding, spec.as_ref(), &servers, &creds);
                async move { (p, one(ctx, binding, spec, servers, p, creds, limits).await) }
            }))
            .await;
            drop(creds);
            if !ctx.leader.is_leader() {
                return Err(CheckError::NotLeader);
            }
            let acted_on = requested(&binding);
            let (verification, condition) =
                merged(&previous, generation, &verdicts, acted_on, basis(&binding, &servers), now);
            let event = announcement(previous.verification.as_ref(), &verification, &condition);
            for (protocol, v) in &verdicts {
                info!(protocol = protocol.as_str(), result = v.reason.as_str(), "mailbox checked");
            }
            apply(ctx, &binding, serde_json::json!({ "verification": verification, "conditions": [condition] }))
                .await?;
            if let Some(event) = event {
                announce(ctx, &binding, &event).await;
            }
            Ok(())
        }
    }
}

/// One protocol's check, timed and classified.
async fn one(
    ctx: &Context,
    binding: &MailboxBinding,
    spec: Option<&MailProviderSpec>,
    servers: &BTreeMap<Protocol, ServerAddress>,
    protocol: Protocol,
    creds: &Credentials,
    limits: mail::Limits,
) -> Verdict {
    let Some(address) = servers.get(&protocol) else { return no_server(protocol) };
    let grant = match binding.spec.grant {
        Grant::ClientCredentials {} => GrantKind::AppOnly,
        _ => GrantKind::Delegated,
    };
    // An app-only token may name the application's service principal (Entra: `oid`), shown in
    // the permission commands; the client id stands in where it does not.
    let app = match grant {
        GrantKind::AppOnly => app_token(creds.token.expose_secret()),
        GrantKind::Delegated => AppToken::default(),
    };
    let check = Check {
        protocol,
        host: &address.host,
        port: address.port,
        mailbox: &binding.spec.mailbox,
        grant,
        service_principal: app.object_id.as_deref(),
        client_id: app.client_id.as_deref().or(spec.map(|s| s.client_id.as_str())),
    };
    let roots = spec.and_then(crate::oauth::provider::ca_bundle).map(mail::certificates_from_pem);
    let settings =
        match roots.unwrap_or_else(|| Ok(Vec::new())).and_then(|r| mail::Settings::new(ctx.http.policy(), &r)) {
            Ok(s) => mail::Settings { limits, ..s },
            Err(e) => return classify(&check, &e.observed()),
        };
    let target = Target { protocol, host: address.host.clone(), port: address.port, tls: tls_mode(address) };
    let started = Instant::now();
    let seen = mail::verify(&target, creds, &settings).await;
    let verdict = classify(&check, &seen);
    ctx.metrics.mailbox_check(protocol.as_str(), verdict.reason.as_str(), started.elapsed().as_secs_f64());
    verdict
}

/// The access token of the binding's published Secret.
async fn published_token(ctx: &Context, binding: &MailboxBinding) -> Result<SecretString, CheckError> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &binding.namespace().unwrap_or_default());
    let name = &binding.spec.secret_name;
    let secret = secrets.get_opt(name).await.map_err(CheckError::Read)?;
    let token = secret
        .and_then(|s| s.data)
        .and_then(|mut d| d.remove(crate::policy::grant_state::keys::ACCESS_TOKEN))
        .and_then(|b| String::from_utf8(b.0).ok())
        .filter(|t| !t.is_empty());
    token.map(SecretString::from).ok_or_else(|| CheckError::NoToken(name.clone()))
}

/// Applies the verifier's part of the status under its own field manager: fields it no longer
/// sends are removed, the binding reconcile's are left alone. The binding's uid is a
/// precondition: a binding deleted and made again under the name gets nothing of the old one.
async fn apply(ctx: &Context, binding: &MailboxBinding, status: serde_json::Value) -> Result<(), CheckError> {
    let api: Api<MailboxBinding> = Api::namespaced(ctx.client.clone(), &binding.namespace().unwrap_or_default());
    let body = serde_json::json!({
        "apiVersion": MailboxBinding::api_version(&()),
        "kind": MailboxBinding::kind(&()),
        "metadata": { "uid": binding.uid() },
        "status": status,
    });
    api.patch_status(&binding.name_any(), &PatchParams::apply(VERIFY_FIELD_MANAGER).force(), &Patch::Apply(body))
        .await
        .map_err(CheckError::Write)?;
    Ok(())
}

async fn announce(ctx: &Context, binding: &MailboxBinding, a: &Announcement) {
    let type_ = if a.warning { EventType::Warning } else { EventType::Normal };
    let event =
        Event { type_, reason: a.reason.clone(), note: Some(a.note.clone()), action: "Verify".into(), secondary: None };
    let recorder = Recorder::new(ctx.client.clone(), ctx.reporter.clone());
    if let Err(e) = recorder.publish(&event, &binding.object_ref(&())).await {
        warn!(error = %e, "publishing event failed");
    }
}

/// Whether the binding reconcile should nudge the verifier: a new token, identity or scopes, a
/// protocol list or verification setting, or an annotation not acted on yet.
pub fn worth_a_look(binding: &MailboxBinding, written: Option<&crate::api::MailboxBindingStatus>) -> bool {
    if requested(binding).is_some() {
        return true;
    }
    let Some(after) = written else { return false };
    let before = binding.status.as_ref();
    let token = |s: Option<&crate::api::MailboxBindingStatus>| {
        s.and_then(|s| s.token.as_ref()).map(|t| (t.issued_at, t.scopes.clone()))
    };
    let ready = |s: Option<&crate::api::MailboxBindingStatus>| {
        s.and_then(|s| crate::api::common::find_condition(&s.conditions, conditions::READY))
            .is_some_and(crate::api::Condition::is_true)
    };
    token(before) != token(Some(after))
        || before.and_then(|s| s.account.as_ref()) != after.account.as_ref()
        || ready(before) != ready(Some(after))
        || before.is_none_or(|s| s.observed_generation != after.observed_generation)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{MailboxBindingStatus, TokenStatus, VERIFY_REQUESTED_ANNOTATION};
    use crate::testing::t;

    fn binding(status: MailboxBindingStatus) -> MailboxBinding {
        MailboxBinding::test().with_status(status)
    }

    fn with_token(issued: i64, scopes: &[&str]) -> MailboxBindingStatus {
        MailboxBindingStatus {
            token: Some(TokenStatus {
                issued_at: t(issued),
                expires_at: t(issued + 3600),
                renew_at: t(issued + 2400),
                scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
            }),
            observed_generation: Some(1),
            ..MailboxBindingStatus::default()
        }
    }

    #[test]
    fn the_reconcile_nudges_for_a_new_token_scopes_or_the_annotation_and_not_for_nothing() {
        let b = binding(with_token(0, &["mail"]));
        assert!(!worth_a_look(&b, None), "at rest, nothing asked");
        assert!(!worth_a_look(&b, b.status.as_ref()), "the same status");
        assert!(worth_a_look(&b, Some(&with_token(2400, &["mail"]))), "a renewal: the verifier judges it");
        assert!(worth_a_look(&b, Some(&with_token(0, &["mail", "more"]))));
        let asked = b.clone().annotated(VERIFY_REQUESTED_ANNOTATION, "x");
        assert!(worth_a_look(&asked, None), "the annotation, even at rest");
    }

    #[test]
    fn tls_follows_the_server_or_its_port() {
        let at = |port, tls| ServerAddress { host: "h".into(), port, tls };
        assert_eq!(tls_mode(&at(993, None)), TlsMode::Implicit);
        assert_eq!(tls_mode(&at(587, None)), TlsMode::Starttls);
        assert_eq!(tls_mode(&at(993, Some(ServerTls::None))), TlsMode::None);
        assert_eq!(tls_mode(&at(143, Some(ServerTls::Implicit))), TlsMode::Implicit);
    }

    #[test]
    fn a_nudge_never_waits_and_none_is_sent_without_a_verifier() {
        Nudges::default().nudge("ns", "a");
        let (nudges, mut rx) = channel();
        for i in 0..2000 {
            nudges.nudge("ns", &format!("b{i}"));
        }
        assert_eq!(rx.try_recv().ok(), Some(("ns".to_owned(), "b0".to_owned())));
    }
}
