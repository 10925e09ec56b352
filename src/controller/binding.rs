//! Reconciles a `MailboxBinding`: find its provider, read its two Secrets, decide, maybe ask the
//! token endpoint, persist the grant state first, publish the token, write status.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration as StdDuration;

use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Resource, ResourceExt};
use secrecy::{ExposeSecret, SecretString};
use tracing::{debug, info, warn};

use super::secrets::{Role, binding_label, desired, grant_secret_name, up_to_date};
use super::{Context, Pending};
use crate::api::common::find_condition;
use crate::api::{
    AUTHORIZATION_RESPONSE_ANNOTATION, ClientAuthMethod, ConditionStatus, Endpoints, FIELD_MANAGER, MailProviderSpec,
    MailProviderStatus, MailboxBinding, MailboxBindingStatus, Protocol, ProviderKind, ServerAddress,
};
use crate::error::{Error, Result};
use crate::oauth::authorize::{Response, parse_response};
use crate::oauth::exchange::{Requester, client_for, grant_state_from, request_for, rescued_state, rotated};
use crate::oauth::grants::{
    Flow, FlowInput, Needs, ProviderFacts, Step, authorization_code, device_code, flow_for, refresh,
};
use crate::oauth::provider::{
    auth_method, authorize_params, device_flow_for_mail, preset_name, scopes_for, secret_refs, servers,
};
use crate::oauth::{Client, ClientAuth, DeviceRequest, GrantCall};
use crate::policy::Reason;
use crate::policy::binding::{
    Decision, Inputs, Outcome, ProviderState, conditions, decide, grant_matches, next_status, reauthorize_requested,
    requeue_after,
};
use crate::policy::classify::{Failure, classify};
use crate::policy::grant_state::{Fenced, GrantState, PendingAuthorization, after_conflict, spent_request_data};
use crate::policy::identity::pinned;
use crate::policy::ownership::{Claim, claimed_by_other, existing_conflict, from_predecessor};
use crate::policy::provider::{mailbox_allowed, scopes_not_allowed};
use crate::policy::publish::published_data;
use crate::policy::reference::{may_read, not_allowed};
use crate::policy::scrub::scrub;

/// Writes of a grant state tried in one reconcile before it is kept in memory for the next.
const GRANT_WRITE_ATTEMPTS: u64 = 3;

/// What a usable provider offers this binding.
#[derive(Clone, Debug)]
pub struct ProviderUse {
    /// `Kind/name`.
    pub key: String,
    /// The registration.
    pub spec: MailProviderSpec,
    /// Resolved endpoints.
    pub endpoints: Endpoints,
    /// Where its Secrets live.
    pub secrets_namespace: String,
    /// Scopes this binding requests.
    pub scopes: Vec<String>,
    /// Mail servers.
    pub servers: BTreeMap<Protocol, ServerAddress>,
    /// The cluster admin's limits, for a `ClusterMailProvider`: what a token may carry (granted
    /// scopes, the identity that consented) is checked against them too.
    pub cluster: Option<crate::api::ClusterMailProviderSpec>,
}

/// Reconciles one binding.
pub async fn reconcile(binding: Arc<MailboxBinding>, ctx: Arc<Context>) -> Result<Action> {
    let name = binding.name_any();
    let ns =
        binding.namespace().ok_or_else(|| Error::MissingNamespace { kind: "MailboxBinding", name: name.clone() })?;
    // Another replica leads: it does everything. A grant state this replica could not write while
    // it led is still written (it may hold the only copy of a rotated refresh token).
    if !ctx.leader.is_leader() {
        if let Some(mut pending) = ctx.take_pending(&ns, &name) {
            let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
            persist_grant(&ctx, &secrets, &binding, pending.state, &mut pending.fence).await?;
        }
        return Ok(Action::await_change());
    }
    // A copy from before this process's own last status write (the cache lags by milliseconds):
    // acting on it could repeat what that write recorded (a requested refresh). Soon the cache
    // has caught up.
    if ctx.behind_own_write(&ns, &name, binding.resource_version().as_deref()) {
        debug!("the cache has not caught up with the last status write; waiting");
        return Ok(Action::requeue(StdDuration::from_millis(200)));
    }
    // revokeOnDelete's finalizer, and a deletion: nothing else is done for a deleted binding.
    if let Some(action) = super::revoke::handle(&ctx, &binding).await? {
        return Ok(action);
    }
    let now = ctx.now();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let grant_name = grant_secret_name(&name);

    // A grant state whose write failed before is written before anything else happens; that
    // write completes the earlier token request, so nothing is requested in this reconcile.
    let flushed = match ctx.take_pending(&ns, &name) {
        Some(mut pending) => {
            persist_grant(&ctx, &secrets, &binding, pending.state.clone(), &mut pending.fence).await?;
            true
        }
        None => false,
    };

    let flow = flow_for(&binding.spec.grant);
    let (provider, usable) = provider_for(&binding, flow.as_deref(), &ctx).await?;
    // Both Secrets at once: one round trip of latency, not two.
    let (grant_secret, published) = futures::future::try_join(
        get_secret(&secrets, &ns, &grant_name),
        get_secret(&secrets, &ns, &binding.spec.secret_name),
    )
    .await?;
    let conflict = secret_conflict(&binding, &provider, grant_secret.as_ref(), published.as_ref(), &ctx);
    let mut grant = grant_secret.as_ref().filter(|_| conflict.is_none()).and_then(decode_grant);
    let stored_pending = grant_secret.as_ref().filter(|_| conflict.is_none()).and_then(decode_pending);
    // Every grant-state write below is conditioned on the version read here (see `Fence`).
    let mut fence = super::Fence {
        version: grant_secret.as_ref().and_then(|s| s.resource_version()),
        basis: grant.as_ref().and_then(|g| g.refresh_token.clone()),
    };
    // A grant state adopted from an earlier binding of this name is made this binding's own
    // (owner reference), so that garbage collection keeps it and later writes are ours.
    let uid = binding.uid().unwrap_or_default();
    let adopted =
        grant_secret.as_ref().is_some_and(|s| from_predecessor(&uid, &name, &binding_label(&name), &s.metadata));
    if let (true, None, Some(state)) = (adopted, conflict.as_ref(), grant.as_ref()) {
        info!("adopting the grant state of an earlier binding of this name");
        persist_grant(&ctx, &secrets, &binding, state.clone(), &mut fence).await?;
    }

    // A grant stored before issuers were recorded is bound now, to the provider it matches (by
    // name and client id) as it is at this first look: written only, nothing is sent. From here
    // on an edit of that provider's endpoints finds the grant bound.
    if let (None, Some(g), Some(u)) = (conflict.as_ref(), grant.as_ref(), usable.as_ref())
        && g.issuer.is_none()
        && (g.refresh_token.is_some() || g.previous_refresh_token.is_some())
        && grant_matches(&u.key, &u.spec.client_id, u.endpoints.token.as_deref(), g)
    {
        let who = Requester {
            provider_key: &u.key,
            provider: &u.spec,
            endpoints: &u.endpoints,
            scopes: &u.scopes,
            mailbox: &binding.spec.mailbox,
        };
        let bound = GrantState { issuer: crate::oauth::exchange::issuer_of(&who), ..g.clone() };
        info!("recording the issuer of a grant stored before issuers were recorded");
        persist_grant(&ctx, &secrets, &binding, bound.clone(), &mut fence).await?;
        grant = Some(bound);
    }

    // Only a grant state the binding's grant produced (as the spec says it now) is used for
    // decisions; any valid token stays published either way.
    let owned = grant.as_ref().filter(|g| flow.as_ref().is_some_and(|f| f.owns(g)));
    let decision = decide(Inputs {
        now,
        binding: &binding,
        provider: &provider,
        grant: owned,
        stored: grant.as_ref(),
        secret_conflict: conflict.as_deref(),
        supported: flow.is_some(),
    });
    let mut failure = None;
    let mut next_poll = None;
    let mut forget_pasted = false;
    let mut outcome = match (&decision, &usable, flow.as_deref()) {
        (Decision::Suspended, _, _) => Outcome::Suspended,
        (Decision::Blocked { reason, message }, _, _) => Outcome::Blocked { reason: *reason, message: message.clone() },
        // The flushed state is the token an earlier request obtained: that refresh ends here.
        _ if flushed => Outcome::Refreshed,
        (Decision::Obtain { why }, Some(usable), Some(flow)) => {
            let reauthorize = reauthorize_requested(&binding).is_some();
            let client_id = &usable.spec.client_id;
            let token_url = usable.endpoints.token.as_deref();
            let usable_grant = owned.filter(|g| !reauthorize && grant_matches(&usable.key, client_id, token_url, g));
            // A device code or an authorization code is redeemed only where it was issued for.
            let pending = stored_pending
                .as_ref()
                .filter(|p| !reauthorize && p.provider == usable.key && &p.client_id == client_id)
                .filter(|p| p.token_url.as_deref().is_none_or(|u| Some(u) == token_url))
                .map(|p| PendingAuthorization { next_poll: ctx.next_poll(&ns, &name, p.next_poll), ..p.clone() });
            // What a person's browser brought back: a pasted redirect URL, or the callback's code.
            let pasted = annotation(&binding, AUTHORIZATION_RESPONSE_ANNOTATION);
            let response = match (pasted, pending.as_ref()) {
                (Some(text), _) => parse_response(text),
                (None, Some(p)) => match (&p.code, &p.state) {
                    (Some(code), Some(state)) => Some(Response::Code { code: code.clone(), state: state.clone() }),
                    _ => None,
                },
                (None, None) => None,
            };
            let known = Known { grant: usable_grant, pending: pending.as_ref(), response: response.as_ref() };
            let obtained = obtain(&ctx, &binding, usable, flow, known, now).await?;
            failpoint("after-token-response", &name);
            // Consumed once, then removed (after what it brought is stored): the code in it is
            // single-use anyway.
            forget_pasted = pasted.is_some();
            if response.is_some()
                && matches!(obtained, Obtained::Failed { .. })
                && let Some(data) = spent_request_data(grant.as_ref(), stored_pending.as_ref())
            {
                // A response is answered once: the request it answered is spent. A stored grant is
                // kept whatever the response was (a stray or replayed one answers nothing).
                let kept = grant.as_ref().and_then(|g| g.refresh_token.clone());
                persist_pending_data(&secrets, &binding, data, &mut fence, kept).await?;
            }
            match obtained {
                Obtained::Awaiting(p) if !p.persistent() => {
                    next_poll = Some(p.next_poll);
                    Outcome::Awaiting(p)
                }
                Obtained::Awaiting(p) => {
                    if !stored_pending.as_ref().is_some_and(|s| s.same_stored(&p)) {
                        let started = stored_pending.as_ref().is_none_or(|s| s.device_code_differs(&p));
                        persist_pending_data(&secrets, &binding, p.encode(), &mut fence, None).await?;
                        if started {
                            info!(method = %p.method, "waiting for a person to authorize");
                            // A new authorization replaces whatever grant was stored.
                            grant = None;
                        }
                    }
                    ctx.set_next_poll(&ns, &name, p.next_poll);
                    next_poll = Some(p.next_poll);
                    Outcome::Awaiting(p)
                }
                Obtained::Token(state) => {
                    info!(why = ?why, expires_at = %state.expires_at, "token obtained");
                    ctx.forget_poll(&ns, &name);
                    persist_grant(&ctx, &secrets, &binding, state.clone(), &mut fence).await?;
                    failpoint("after-grant-write", &name);
                    grant = Some(state);
                    Outcome::Refreshed
                }
                Obtained::Failed { failure: f, rescued } => {
                    warn!(reason = %f.reason, message = %f.message, "token request failed");
                    if let Some(state) = rescued {
                        warn!("the failed response carried a refresh token; storing it");
                        persist_grant(&ctx, &secrets, &binding, state.clone(), &mut fence).await?;
                        grant = Some(state);
                    }
                    failure = Some(f.clone());
                    Outcome::Failed(f)
                }
            }
        }
        _ => Outcome::Unchanged,
    };
    if forget_pasted {
        forget_pasted_response(&ctx, &binding).await;
    }

    if !matches!(outcome, Outcome::Suspended | Outcome::Blocked { .. })
        && let (Some(g), Some(usable)) = (grant.as_ref().filter(|g| g.expires_at > now), usable.as_ref())
    {
        match published_data(
            &binding.spec.mailbox,
            g,
            &binding.spec.protocols,
            &usable.servers,
            binding.spec.secret_template.as_ref(),
        ) {
            Ok(data) => {
                let want = desired(&binding, &binding.spec.secret_name, Role::Published, data);
                if !published.as_ref().is_some_and(|p| up_to_date(p, &want)) {
                    match apply_owned(&ctx, &secrets, &want).await {
                        Ok(_) => {
                            info!(secret = %binding.spec.secret_name, "published Secret written");
                            failpoint("after-publish", &name);
                        }
                        // The apiserver refuses what it will always refuse: say so in status
                        // instead of retrying the same write.
                        Err(kube::Error::Api(e)) if e.code == 422 || e.code == 400 => {
                            let shown: String = e.message.chars().take(300).collect();
                            outcome = Outcome::Blocked {
                                reason: Reason::InvalidSpec,
                                message: Reason::InvalidSpec.message(format!(
                                    "the apiserver refused the published Secret {}: {shown}",
                                    binding.spec.secret_name
                                )),
                            };
                        }
                        Err(source) => {
                            return Err(Error::WritePublishedSecret {
                                namespace: ns.clone(),
                                name: binding.spec.secret_name.clone(),
                                source,
                            });
                        }
                    }
                }
            }
            Err(e) => outcome = Outcome::Blocked { reason: Reason::InvalidSpec, message: e.to_string() },
        }
    }

    let mut status = next_status(now, &binding, grant.as_ref(), &outcome);
    if binding.status.as_ref() != Some(&status) {
        match patch_status(&ctx, &binding, &status).await {
            // The cached copy was stale (our own last status write had not reached the cache yet).
            // A reconcile that did something (a refresh, an annotation acted on) must not lose it
            // to a retry that sees nothing to do: the status is computed again from the current
            // object and written once more.
            Err(e) if e.is_conflict() && !matches!(outcome, Outcome::Unchanged) => {
                let api: Api<MailboxBinding> = Api::namespaced(ctx.client.clone(), &ns);
                let fresh = api.get(&name).await.map_err(|source| Error::WriteStatus {
                    kind: "MailboxBinding",
                    name: name.clone(),
                    source,
                })?;
                // The annotation values acted on are this reconcile's, not the current object's
                // (a newer value there has not been acted on yet).
                let acted = (status.last_refresh_request.clone(), status.last_reauthorize_request.clone());
                status = next_status(now, &fresh, grant.as_ref(), &outcome);
                (status.last_refresh_request, status.last_reauthorize_request) = acted;
                if fresh.status.as_ref() != Some(&status) {
                    patch_status(&ctx, &fresh, &status).await?;
                }
            }
            other => other?,
        }
    }
    announce(&ctx, &binding, &status).await;
    let requeue = requeue_after(now, &decision, &status, failure.as_ref(), next_poll);
    Ok(requeue.and_then(|d| d.to_std().ok()).map_or_else(Action::await_change, Action::requeue))
}

/// What to do when a reconcile fails: retry soon; at once after a stale-object conflict.
pub fn error_policy(binding: Arc<MailboxBinding>, error: &Error, _ctx: Arc<Context>) -> Action {
    if matches!(error, Error::NotLeader) {
        // The leading replica has it; this one reconciles everything again if it leads later.
        debug!(binding = %binding.name_any(), "leadership ended during the reconcile");
        return Action::await_change();
    }
    if error.is_conflict() {
        debug!(binding = %binding.name_any(), "status was computed from a stale copy; retrying");
        return Action::requeue(StdDuration::from_secs(1));
    }
    match error {
        // Not a failure: the provider had no room; the slot was given back.
        Error::Deferred(wait) => {
            debug!(binding = %binding.name_any(), ?wait, "the provider has no room now; coming back later");
            let jitter = crate::policy::schedule::seed(&binding.name_any()) % 500;
            return Action::requeue(wait.saturating_add(StdDuration::from_millis(jitter)));
        }
        Error::StaleGrantState { .. } => {
            info!(binding = %binding.name_any(), "the grant state changed meanwhile; starting again from it");
            return Action::requeue(StdDuration::from_secs(1));
        }
        _ => {}
    }
    warn!(binding = %binding.name_any(), namespace = ?binding.namespace(), %error, "reconcile failed");
    let wait = match error {
        Error::WriteGrantState { .. } => 2,
        Error::Panicked => 300,
        _ => 15,
    };
    Action::requeue(StdDuration::from_secs(wait))
}

async fn get_secret(api: &Api<Secret>, ns: &str, name: &str) -> Result<Option<Secret>> {
    debug!(namespace = %ns, secret = %name, "reading Secret");
    api.get_opt(name).await.map_err(|source| Error::ReadSecret {
        namespace: ns.to_owned(),
        name: name.to_owned(),
        source,
    })
}

/// Writes a published or grant-state Secret, so that the watch event of this write triggers no
/// reconcile.
async fn apply_owned(ctx: &Context, api: &Api<Secret>, secret: &Secret) -> Result<Secret, kube::Error> {
    let ns = secret.metadata.namespace.clone().unwrap_or_default();
    let name = secret.metadata.name.clone().unwrap_or_default();
    ctx.own_writes.begin(&ns, &name);
    let result = apply_secret(api, secret).await;
    match &result {
        Ok(written) => ctx.own_writes.record(written),
        Err(_) => ctx.own_writes.abandon(&ns, &name),
    }
    result
}

async fn apply_secret(api: &Api<Secret>, secret: &Secret) -> Result<Secret, kube::Error> {
    let name = secret.metadata.name.clone().unwrap_or_default();
    let mut body = serde_json::to_value(secret).map_err(kube::Error::SerdeError)?;
    if let Some(obj) = body.as_object_mut() {
        obj.insert("apiVersion".into(), "v1".into());
        obj.insert("kind".into(), "Secret".into());
    }
    api.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(body)).await
}

/// Writes the grant state (always new after a token request). It is kept in memory *before* the
/// write, so that neither a failed write nor a cancelled reconcile loses it: written before
/// anything else on the next reconcile, and flushed at shutdown. The write is conditioned on the
/// version read ([`super::Fence`]): a deposed leader's late result never overwrites a newer grant.
async fn persist_grant(
    ctx: &Context,
    api: &Api<Secret>,
    binding: &MailboxBinding,
    state: GrantState,
    fence: &mut super::Fence,
) -> Result<()> {
    let ns = binding.namespace().unwrap_or_default();
    let binding_name = binding.name_any();
    let name = grant_secret_name(&binding_name);
    let mut want = desired(binding, &name, Role::Grant, state.encode());
    ctx.keep_pending(&ns, &binding_name, Pending { state: state.clone(), secret: want.clone(), fence: fence.clone() });
    let mut attempt = 0_u64;
    let source = loop {
        want.metadata.resource_version = fence.version.clone();
        match apply_owned(ctx, api, &want).await {
            Ok(written) => {
                fence.version = written.resource_version();
                fence.basis = state.refresh_token.clone();
                ctx.take_pending(&ns, &binding_name);
                return Ok(());
            }
            Err(kube::Error::Api(e)) if e.code == 409 => {
                let current = get_secret(api, &ns, &name).await?;
                match after_conflict(
                    current.as_ref().and_then(decode_grant).as_ref(),
                    current.as_ref().and_then(decode_pending).is_some(),
                    fence.basis.as_ref().map(ExposeSecret::expose_secret),
                    &state,
                ) {
                    Fenced::Written => {
                        fence.version = current.and_then(|s| s.resource_version());
                        fence.basis = state.refresh_token.clone();
                        ctx.take_pending(&ns, &binding_name);
                        return Ok(());
                    }
                    Fenced::Stale => {
                        warn!("the grant state was replaced by a newer one since it was read; this result is dropped");
                        ctx.take_pending(&ns, &binding_name);
                        return Err(Error::StaleGrantState { namespace: ns, name });
                    }
                    Fenced::Retry => fence.version = current.and_then(|s| s.resource_version()),
                }
            }
            Err(e) => {
                warn!(attempt, error = %e, "writing grant state failed");
                attempt = attempt.saturating_add(1);
                if attempt >= GRANT_WRITE_ATTEMPTS {
                    break e;
                }
                tokio::time::sleep(StdDuration::from_millis(attempt.saturating_mul(250))).await;
                continue;
            }
        }
        attempt = attempt.saturating_add(1);
        if attempt >= GRANT_WRITE_ATTEMPTS {
            return Err(Error::StaleGrantState { namespace: ns, name });
        }
    };
    ctx.keep_pending(&ns, &binding_name, Pending { state, secret: want, fence: fence.clone() });
    Err(Error::WriteGrantState { namespace: ns, name, source })
}

/// Writes every grant state still waiting, retrying until `deadline`; called at shutdown so that
/// a rotated refresh token outlives the process. Returns how many could not be written. A write
/// that meets a newer grant (409, and the Secret holds another grant than the one it started
/// from) is dropped, as in [`persist_grant`].
pub async fn flush_pending(
    client: &kube::Client,
    pending: &super::PendingGrants,
    deadline: tokio::time::Instant,
) -> usize {
    let waiting: Vec<((String, String), Pending)> = pending.lock().map(|mut p| p.drain().collect()).unwrap_or_default();
    let mut lost = 0_usize;
    for ((ns, binding), p) in waiting {
        let api: Api<Secret> = Api::namespaced(client.clone(), &ns);
        let mut wait = StdDuration::from_millis(200);
        let mut secret = p.secret.clone();
        secret.metadata.resource_version = p.fence.version.clone();
        loop {
            let result = apply_secret(&api, &secret).await;
            let retry = match result {
                Ok(_) => {
                    info!(%binding, namespace = %ns, "grant state written at shutdown");
                    break;
                }
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    let name = secret.metadata.name.clone().unwrap_or_default();
                    let current = api.get_opt(&name).await.ok().flatten();
                    let basis = p.fence.basis.as_ref().map(ExposeSecret::expose_secret);
                    let pending_now = current.as_ref().and_then(decode_pending).is_some();
                    match after_conflict(current.as_ref().and_then(decode_grant).as_ref(), pending_now, basis, &p.state)
                    {
                        Fenced::Written => break,
                        Fenced::Stale => {
                            warn!(%binding, namespace = %ns, "a newer grant state was stored meanwhile; this one is dropped");
                            break;
                        }
                        Fenced::Retry => {
                            secret.metadata.resource_version = current.and_then(|s| s.resource_version());
                            "the grant state changed since it was read".to_owned()
                        }
                    }
                }
                Err(e) => e.to_string(),
            };
            if tokio::time::Instant::now().checked_add(wait).is_some_and(|t| t < deadline) {
                warn!(%binding, namespace = %ns, error = %retry, "writing grant state at shutdown failed; retrying");
                tokio::time::sleep(wait).await;
                wait = std::cmp::min(wait.saturating_mul(2), StdDuration::from_secs(2));
            } else {
                tracing::error!(%binding, namespace = %ns, error = %retry, "grant state could not be written before shutdown");
                lost = lost.saturating_add(1);
                break;
            }
        }
    }
    lost
}

/// A test hook: when `MAIL_OAUTH_OPERATOR_FAILPOINT` is `<step>/<binding>`, the process aborts at
/// that step of that binding's reconcile, as a SIGKILL would stop it (no flush, no cleanup). Used
/// by the crash-safety tests; unset, it does nothing.
pub fn failpoint(step: &str, binding: &str) {
    static FAILPOINT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let armed = FAILPOINT.get_or_init(|| std::env::var("MAIL_OAUTH_OPERATOR_FAILPOINT").ok().filter(|v| !v.is_empty()));
    if armed.as_deref().and_then(|a| a.split_once('/')) == Some((step, binding)) {
        tracing::error!(step, "failpoint reached; aborting");
        std::process::abort();
    }
}

async fn patch_status(ctx: &Context, binding: &MailboxBinding, status: &MailboxBindingStatus) -> Result<()> {
    let ns = binding.namespace().unwrap_or_default();
    let api: Api<MailboxBinding> = Api::namespaced(ctx.client.clone(), &ns);
    super::apply_status(&api, binding, status).await?;
    ctx.wrote_status(&ns, &binding.name_any(), binding.resource_version().as_deref());
    Ok(())
}

/// Events that tell a person what changed, once: a Warning when the binding enters a failure it
/// did not have before, a Normal Event when it first becomes Ready and when it recovers, and a
/// Normal Event with the code and URL whenever a new authorization waits for a person. Waiting
/// states (`Pending`, `ProviderPending`, `AwaitingAuthorization`) are no failure and get no Warning.
async fn announce(ctx: &Context, binding: &MailboxBinding, status: &MailboxBindingStatus) {
    let before = binding.status.as_ref();
    let failing = |s: Option<&MailboxBindingStatus>| {
        s.into_iter()
            .flat_map(|s| s.conditions.iter())
            .filter(|c| c.type_ == conditions::READY || c.type_ == conditions::AUTHORIZED)
            .filter(|c| c.status == ConditionStatus::False)
            .filter(|c| {
                ![Reason::Pending, Reason::ProviderPending, Reason::AwaitingAuthorization]
                    .iter()
                    .any(|r| r.as_str() == c.reason)
            })
            .map(|c| (c.reason.clone(), c.message.clone()))
            .collect::<Vec<_>>()
    };
    let old = failing(before);
    // One Normal Event per new code or link a person has to use.
    let shown =
        |s: Option<&MailboxBindingStatus>| s.and_then(|s| s.authorization.as_ref()).map(|a| a.user_code.clone());
    let awaiting = status
        .conditions
        .iter()
        .find(|c| c.type_ == conditions::AUTHORIZED && c.reason == Reason::AwaitingAuthorization.as_str())
        .filter(|_| shown(before) != shown(Some(status)))
        .map(|c| (EventType::Normal, Reason::AwaitingAuthorization.as_str().to_owned(), c.message.clone()));
    let mut events: Vec<(EventType, String, String)> = failing(Some(status))
        .into_iter()
        .filter(|(reason, _)| !old.iter().any(|(r, _)| r == reason))
        .map(|(reason, message)| (EventType::Warning, reason, message))
        .chain(awaiting)
        .collect();
    let ready = |s: Option<&MailboxBindingStatus>| {
        s.and_then(|s| find_condition(&s.conditions, conditions::READY)).filter(|c| c.is_true()).cloned()
    };
    if let (None, Some(now_ready)) = (ready(before), ready(Some(status))) {
        let recovered = !old.is_empty();
        let note = if recovered { format!("recovered: {}", now_ready.message) } else { now_ready.message.clone() };
        events.push((EventType::Normal, if recovered { "Recovered".into() } else { "Ready".into() }, note));
    }
    // Ready and Authorized often fail for the same reason: one Event per reason.
    let mut seen = std::collections::BTreeSet::new();
    events.retain(|(type_, reason, _)| seen.insert((*type_ == EventType::Warning, reason.clone())));
    for (type_, reason, note) in events {
        let event = Event { type_, reason, note: Some(note), action: "Reconcile".into(), secondary: None };
        // Each a new Event: the shared recorder would fold an Event of the same type and reason
        // published within six minutes into the first one, re-sending its old note (a new device
        // code would never be shown). Only transitions get here, so nothing needs folding.
        let recorder = kube::runtime::events::Recorder::new(ctx.client.clone(), ctx.reporter.clone());
        if let Err(e) = recorder.publish(&event, &binding.object_ref(&())).await {
            warn!(error = %e, "publishing event failed");
        }
    }
}

fn secret_conflict(
    binding: &MailboxBinding,
    provider: &ProviderState,
    grant: Option<&Secret>,
    published: Option<&Secret>,
    ctx: &Context,
) -> Option<String> {
    let uid = binding.uid().unwrap_or_default();
    let name = binding.name_any();
    let label = binding_label(&name);
    let ns = binding.namespace();
    let claim = |b: &MailboxBinding| Claim {
        binding: b.name_any(),
        created: b.creation_timestamp().and_then(|t| DateTime::<Utc>::from_timestamp(t.0.as_second(), 0)),
        secret_name: b.spec.secret_name.clone(),
    };
    let others: Vec<Claim> = ctx.bindings.state().iter().filter(|b| b.namespace() == ns).map(|b| claim(b)).collect();
    // A Secret of an earlier binding of this name is adopted: the published one always, the grant
    // state when it is for the same mailbox and provider (its refresh token may be the only copy).
    let adoptable_grant = |s: &Secret| {
        let state = decode_grant(s);
        let provider_key = match provider {
            ProviderState::Usable { key, .. } => Some(key.as_str()),
            ProviderState::Unusable { .. } => None,
        };
        state.is_some_and(|g| {
            g.mailbox.as_deref().is_some_and(|m| m.eq_ignore_ascii_case(&binding.spec.mailbox))
                && provider_key.is_some_and(|k| k == g.provider)
        })
    };
    let published_conflict = published
        .filter(|s| !from_predecessor(&uid, &name, &label, &s.metadata))
        .and_then(|s| existing_conflict(&uid, &s.metadata));
    let grant_conflict = grant.and_then(|s| {
        if from_predecessor(&uid, &name, &label, &s.metadata) {
            (!adoptable_grant(s)).then(|| {
                format!(
                    "grant-state Secret {} belongs to an earlier MailboxBinding {name} for another mailbox or provider; \
                     delete it to start over",
                    grant_secret_name(&name)
                )
            })
        } else {
            existing_conflict(&uid, &s.metadata)
        }
    });
    published_conflict.or(grant_conflict).or_else(|| claimed_by_other(&claim(binding), &others))
}

fn secret_bytes(secret: &Secret) -> Option<BTreeMap<String, Vec<u8>>> {
    secret.data.as_ref().map(|d| d.iter().map(|(k, v)| (k.clone(), v.0.clone())).collect())
}

/// The grant state a Secret holds, if it holds one.
fn decode_grant(secret: &Secret) -> Option<GrantState> {
    secret_bytes(secret).and_then(|d| GrantState::decode(&d))
}

/// The authorization in progress a grant-state Secret holds, if any.
fn decode_pending(secret: &Secret) -> Option<PendingAuthorization> {
    secret_bytes(secret).and_then(|d| PendingAuthorization::decode(&d))
}

/// Writes an authorization in progress as the whole grant state: a new authorization replaces
/// whatever grant was stored (a person asked for it, or there was none). Losing this write loses
/// no token: the next reconcile starts a new authorization.
pub async fn persist_pending(
    api: &Api<Secret>,
    binding: &MailboxBinding,
    pending: &PendingAuthorization,
) -> Result<()> {
    persist_pending_data(api, binding, pending.encode(), &mut super::Fence::default(), None).await
}

/// Writes `data` as the whole grant-state Secret's content.
/// Conditioned on the version read: a Secret changed meanwhile (a newer grant, the listener's
/// write) is not overwritten; the reconcile starts again from it.
async fn persist_pending_data(
    api: &Api<Secret>,
    binding: &MailboxBinding,
    data: BTreeMap<String, String>,
    fence: &mut super::Fence,
    basis: Option<SecretString>,
) -> Result<()> {
    let name = grant_secret_name(&binding.name_any());
    let namespace = binding.namespace().unwrap_or_default();
    let mut want = desired(binding, &name, Role::Grant, data);
    want.metadata.resource_version = fence.version.clone();
    match apply_secret(api, &want).await {
        Ok(written) => {
            fence.version = written.resource_version();
            fence.basis = basis;
            Ok(())
        }
        Err(kube::Error::Api(e)) if e.code == 409 => Err(Error::StaleGrantState { namespace, name }),
        Err(source) => Err(Error::WriteGrantState { namespace, name, source }),
    }
}

/// Finds the provider and says whether this binding can use it.
pub async fn provider_for(
    binding: &MailboxBinding,
    flow: Option<&dyn Flow>,
    ctx: &Context,
) -> Result<(ProviderState, Option<ProviderUse>)> {
    let r = &binding.spec.provider_ref;
    let ns = binding.namespace().unwrap_or_default();
    let unusable =
        |reason: Reason, what: String| Ok((ProviderState::Unusable { reason, message: reason.message(what) }, None));
    let (key, spec, status, generation, secrets_namespace, cluster_limits) = match r.kind {
        ProviderKind::MailProvider => {
            let Some(p) = ctx.providers.get(&ObjectRef::new(&r.name).within(&ns)) else {
                return unusable(
                    Reason::ProviderNotFound,
                    format!("MailProvider {} not found in namespace {ns}", r.name),
                );
            };
            (
                format!("MailProvider/{}", r.name),
                p.spec.clone(),
                p.status.clone(),
                p.metadata.generation,
                ns.clone(),
                None,
            )
        }
        ProviderKind::ClusterMailProvider => {
            let Some(p) = ctx.cluster_providers.get(&ObjectRef::new(&r.name)) else {
                return unusable(Reason::ProviderNotFound, format!("ClusterMailProvider {} not found", r.name));
            };
            if !namespace_allowed(ctx, &p.spec.allowed_namespaces, &ns).await? {
                return unusable(
                    Reason::ProviderNotAllowed,
                    format!("ClusterMailProvider {} does not allow namespace {ns}", r.name),
                );
            }
            let spec = p.spec.provider.clone();
            (
                format!("ClusterMailProvider/{}", r.name),
                spec,
                p.status.clone(),
                p.metadata.generation,
                ctx.cluster_namespace.clone(),
                Some(p.spec.clone()),
            )
        }
    };
    let kind_name = key.replace('/', " ");
    if let Err(why) = crate::policy::validate::provider(&spec) {
        return unusable(Reason::InvalidSpec, format!("{kind_name}: {why}"));
    }
    let Some(endpoints) = ready_endpoints(status.as_ref(), generation) else {
        let current = status.as_ref().is_some_and(|s| s.observed_generation == generation);
        return match status.as_ref().and_then(|s| find_condition(&s.conditions, "Ready")).filter(|_| current) {
            Some(c) => {
                unusable(Reason::ProviderNotReady, format!("{kind_name} is not ready ({}: {})", c.reason, c.message))
            }
            // Not a failure: the provider's controller has not looked at this generation yet.
            None => Ok((
                ProviderState::Unusable {
                    reason: Reason::ProviderPending,
                    message: format!("waiting for {kind_name} to be reconciled"),
                },
                None,
            )),
        };
    };
    let facts = ProviderFacts {
        preset: preset_name(&spec),
        confidential: !secret_refs(&spec).is_empty()
            || spec.client_authentication.as_ref().is_some_and(|a| a.certificate_ref.is_some()),
        device_endpoint: endpoints.device_authorization.is_some(),
        device_flow_for_mail: device_flow_for_mail(&spec),
        authorization_endpoint: endpoints.authorization.is_some(),
        service_account: spec.service_account_key_ref.is_some(),
    };
    if binding.spec.revoke_on_delete && endpoints.revocation.is_none() {
        return unusable(
            Reason::InvalidSpec,
            format!(
                "spec.revokeOnDelete: {kind_name} has no revocation endpoint (Microsoft offers none; a generic \
                 provider needs revocationUrl or an issuer whose discovery lists revocation_endpoint); set \
                 revokeOnDelete: false"
            ),
        );
    }
    if let Some(why) = flow.and_then(|f| f.unusable(&facts)) {
        return unusable(Reason::InvalidSpec, format!("{kind_name}: {why}"));
    }
    let kind = flow.map_or(crate::oauth::grants::ScopeKind::Delegated, |f| f.scope_kind());
    let scopes = match scopes_for(&spec, &binding.spec, kind) {
        Ok(s) => s,
        Err(why) => return unusable(Reason::InvalidSpec, why),
    };
    if let Some(limits) = &cluster_limits {
        let refused = scopes_not_allowed(&limits.allowed_scopes, &scopes);
        if !refused.is_empty() {
            let shown: Vec<String> = refused.iter().take(5).map(|s| s.chars().take(100).collect()).collect();
            return unusable(
                Reason::ProviderNotAllowed,
                format!("{kind_name} does not allow the scopes {} (allowedScopes)", shown.join(" ")),
            );
        }
        if !mailbox_allowed(&limits.allowed_mailboxes, &binding.spec.mailbox) {
            return unusable(
                Reason::ProviderNotAllowed,
                format!("{kind_name} does not allow the mailbox {} (allowedMailboxes)", binding.spec.mailbox),
            );
        }
        if let Some(why) = crate::policy::provider::cluster_refuses(
            limits,
            &binding.spec,
            kind == crate::oauth::grants::ScopeKind::AppOnly,
        ) {
            return unusable(Reason::ProviderNotAllowed, format!("{kind_name} {why}"));
        }
    }
    let state = ProviderState::Usable {
        key: key.clone(),
        client_id: spec.client_id.clone(),
        scopes: scopes.clone(),
        token_url: endpoints.token.clone(),
    };
    let servers = servers(&spec);
    let cluster = cluster_limits;
    Ok((state, Some(ProviderUse { key, spec, endpoints, secrets_namespace, scopes, servers, cluster })))
}

fn ready_endpoints(status: Option<&MailProviderStatus>, generation: Option<i64>) -> Option<Endpoints> {
    let status = status?;
    let ready = find_condition(&status.conditions, "Ready")?;
    let current = ready.is_true() && status.observed_generation == generation;
    current.then(|| status.endpoints.clone()).flatten().filter(|e| e.token.is_some())
}

async fn namespace_allowed(ctx: &Context, allowed: &Option<crate::api::AllowedNamespaces>, ns: &str) -> Result<bool> {
    let needs_labels = allowed.as_ref().is_some_and(|a| a.selector.is_some() && !a.names.iter().any(|n| n == ns));
    let labels = if needs_labels {
        let api: Api<Namespace> = Api::all(ctx.client.clone());
        let namespace = api.get_opt(ns).await.map_err(|source| Error::ReadNamespace { name: ns.to_owned(), source })?;
        namespace.map(|n| n.labels().clone()).unwrap_or_default()
    } else {
        BTreeMap::new()
    };
    Ok(crate::policy::provider::namespace_allowed(allowed.as_ref(), ns, &labels))
}

/// One key of a referenced Secret.
enum Read {
    /// The trimmed, non-empty value.
    Value(SecretString),
    /// The Secret or key is missing or empty.
    Missing,
    /// The Secret lacks the opt-in label strict mode asks for.
    NotAllowed(String),
}

/// Reads one key of a referenced Secret, if the reference policy lets it be read.
/// A client secret: from memory while the referable-Secret watch shows the version it was read
/// from, else read (and kept, when the watch covers its Secret).
async fn read_client_secret(ctx: &Context, ns: &str, name: &str, key: &str) -> Result<Read> {
    let id = (ns.to_owned(), name.to_owned(), key.to_owned());
    let seen = ctx.referable.version(ns, name);
    if let Ok(mut cache) = ctx.client_secrets.lock() {
        match (cache.get(&id), seen.as_ref()) {
            (Some((rv, value)), Some(seen)) if rv == seen => return Ok(Read::Value(value.clone())),
            // Changed, unlabelled or deleted: forgotten, and read again below.
            (Some(_), _) => {
                cache.remove(&id);
            }
            (None, _) => {}
        }
    }
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let Some(secret) = get_secret(&api, ns, name).await? else {
        return Ok(Read::Missing);
    };
    let read = value_of(ctx, ns, name, key, secret.clone());
    if let (Read::Value(value), Some(rv), Some(_)) = (&read, secret.metadata.resource_version, seen)
        && let Ok(mut cache) = ctx.client_secrets.lock()
    {
        cache.insert(id, (rv, value.clone()));
    }
    Ok(read)
}

async fn read_key(ctx: &Context, ns: &str, name: &str, key: &str) -> Result<Read> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let Some(secret) = get_secret(&api, ns, name).await? else {
        return Ok(Read::Missing);
    };
    Ok(value_of(ctx, ns, name, key, secret))
}

/// A key of a Secret read, if the reference policy lets it be read.
fn value_of(ctx: &Context, ns: &str, name: &str, key: &str, secret: Secret) -> Read {
    if !may_read(ctx.references, ns, &ctx.cluster_namespace, secret.metadata.labels.as_ref()) {
        return Read::NotAllowed(not_allowed(ns, name, secret.metadata.labels.as_ref()));
    }
    secret
        .data
        .and_then(|mut d| d.remove(key))
        .and_then(|v| String::from_utf8(v.0).ok())
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
        .map_or(Read::Missing, |v| Read::Value(SecretString::from(v)))
}

fn annotation<'a>(binding: &'a MailboxBinding, key: &str) -> Option<&'a str> {
    binding.metadata.annotations.as_ref()?.get(key).map(String::as_str)
}

/// Removes the pasted authorization response from the binding (best effort: a response read
/// again answers no request and changes nothing).
async fn forget_pasted_response(ctx: &Context, binding: &MailboxBinding) {
    let api: Api<MailboxBinding> = Api::namespaced(ctx.client.clone(), &binding.namespace().unwrap_or_default());
    let patch = serde_json::json!({"metadata": {"annotations": {AUTHORIZATION_RESPONSE_ANNOTATION: null}}});
    if let Err(e) = api.patch_metadata(&binding.name_any(), &PatchParams::default(), &Patch::Merge(patch)).await {
        warn!(error = %e, "removing the pasted authorization response failed");
    }
}

/// A new authorization request for a person's browser: with the callback listener, the status
/// shows the operator's start link, `<public URL>/authorize/<ns>/<name>?start=<random>` (each
/// visit makes a fresh request; only those who can read the binding see the link, and the
/// listener refuses any other `start`). The link stays while the binding waits, so that a
/// reconcile never invalidates a link a person has open; a re-authorization request makes a new
/// one. Without the listener, a request is made now and its provider URL shown, for the person to
/// paste the final redirect URL back.
fn start_authorization(
    ctx: &Context,
    binding: &MailboxBinding,
    usable: &ProviderUse,
    now: DateTime<Utc>,
) -> std::result::Result<PendingAuthorization, String> {
    let ns = binding.namespace().unwrap_or_default();
    let name = binding.name_any();
    if let Some(base) = &ctx.authorization.link_base {
        let shown = binding.status.as_ref().and_then(|s| s.authorization.as_ref()).and_then(|a| a.url.as_deref());
        let current = shown.filter(|_| reauthorize_requested(binding).is_none());
        let url = crate::server::authorize::start_link(base, &ns, &name, current);
        return Ok(request_pending(binding, usable, now, None, url));
    }
    let redirect_uri = &ctx.authorization.redirect_uri;
    let made = authorization_request(&usable.spec, &usable.endpoints, &usable.scopes, binding, redirect_uri)?;
    let url = made.url.clone();
    Ok(request_pending(binding, usable, now, Some((made, redirect_uri.clone())), url))
}

/// The pending authorization of an authorization code request: with the request (state,
/// verifier, redirect URI) once one is made, or just the operator's link that makes one.
pub fn request_pending(
    binding: &MailboxBinding,
    usable: &ProviderUse,
    now: DateTime<Utc>,
    request: Option<(crate::oauth::authorize::AuthorizationRequest, String)>,
    url: String,
) -> PendingAuthorization {
    let expires_at = crate::policy::time::plus(now, AUTHORIZATION_REQUEST_LIFETIME);
    let (state, code_verifier, redirect_uri) = match request {
        Some((r, redirect_uri)) => (Some(r.state), Some(r.code_verifier), Some(redirect_uri)),
        None => (None, None, None),
    };
    PendingAuthorization {
        method: authorization_code::METHOD.into(),
        device_code: None,
        user_code: None,
        verification_uri: None,
        verification_uri_complete: None,
        started_at: now,
        expires_at,
        interval: chrono::Duration::seconds(1),
        next_poll: expires_at,
        provider: usable.key.clone(),
        client_id: usable.spec.client_id.clone(),
        scopes: usable.scopes.clone(),
        state,
        code_verifier,
        redirect_uri,
        url: Some(url),
        code: None,
        binding_uid: binding.uid(),
        generation: binding.metadata.generation,
        token_url: usable.endpoints.token.clone(),
    }
}

/// How long an authorization request (its state and verifier) may be answered.
pub const AUTHORIZATION_REQUEST_LIFETIME: chrono::Duration = chrono::Duration::minutes(15);

/// An authorization request for `binding` at its provider.
pub fn authorization_request(
    spec: &MailProviderSpec,
    endpoints: &Endpoints,
    scopes: &[String],
    binding: &MailboxBinding,
    redirect_uri: &str,
) -> std::result::Result<crate::oauth::authorize::AuthorizationRequest, String> {
    let authorize_url = endpoints.authorization.as_deref().ok_or("the provider has no authorization endpoint")?;
    crate::oauth::authorize::request(&crate::oauth::authorize::Params {
        authorize_url,
        client_id: &spec.client_id,
        redirect_uri,
        scopes,
        login_hint: &binding.spec.mailbox,
        extra: authorize_params(spec, scopes),
        namespace: &binding.namespace().unwrap_or_default(),
        name: &binding.name_any(),
    })
}

/// A transient failure before any request (a Secret missing or not labelled for the operator).
fn not_ready(reason: Reason, what: String) -> Obtained {
    Obtained::Failed { failure: Failure { reason, transient: true, message: what, retry_after: None }, rescued: None }
}

/// The client as the provider registers it, with the client secrets found, or why not.
pub(crate) async fn client_of(
    ctx: &Context,
    usable: &ProviderUse,
    who: &Requester<'_>,
) -> Result<Result<Client, Obtained>> {
    if auth_method(&usable.spec) == Some(ClientAuthMethod::PrivateKeyJwt) {
        return Ok(match super::certificate::read(ctx, &usable.spec, &usable.secrets_namespace).await? {
            Some(Ok(cert)) => Ok(Client {
                client_id: usable.spec.client_id.clone(),
                auth: ClientAuth::PrivateKey(Arc::new(cert.key)),
                ca_bundle: crate::oauth::provider::ca_bundle(&usable.spec).map(str::to_owned),
            }),
            Some(Err((reason, what))) => Err(not_ready(reason, what)),
            None => Err(not_ready(
                Reason::InvalidSpec,
                "clientAuthentication.method is privateKeyJwt but no certificateRef is given".into(),
            )),
        });
    }
    let mut client_secrets = Vec::new();
    for r in secret_refs(&usable.spec) {
        match read_client_secret(ctx, &usable.secrets_namespace, &r.name, &r.key).await? {
            Read::Value(s) => client_secrets.push(s),
            Read::Missing => {}
            Read::NotAllowed(what) => return Ok(Err(not_ready(Reason::SecretReferenceNotAllowed, what))),
        }
    }
    if auth_method(&usable.spec).is_some() && client_secrets.is_empty() {
        return Ok(Err(not_ready(
            Reason::ClientSecretNotFound,
            format!(
                "no client secret found in the Secrets {} names in namespace {}",
                usable.key, usable.secrets_namespace
            ),
        )));
    }
    Ok(Ok(client_for(who, client_secrets)))
}

/// What is known of a grant before its next step.
#[derive(Clone, Copy)]
struct Known<'a> {
    /// The stored grant the flow may use.
    grant: Option<&'a GrantState>,
    /// The authorization in progress.
    pending: Option<&'a PendingAuthorization>,
    /// What a person's browser brought back.
    response: Option<&'a Response>,
}

/// Takes the grant's next step: asks the flow what to do, then does it. The outer error is a
/// Kubernetes failure; the inner result what the authorization server said.
async fn obtain(
    ctx: &Context,
    binding: &MailboxBinding,
    usable: &ProviderUse,
    flow: &dyn Flow,
    known: Known<'_>,
    now: DateTime<Utc>,
) -> Result<Obtained> {
    let Known { grant, pending, response } = known;
    let ns = binding.namespace().unwrap_or_default();
    let needed = match flow.reads(grant, &usable.spec) {
        Some(Needs::Binding(r)) => Some((ns.as_str(), r)),
        Some(Needs::Provider(r)) => Some((usable.secrets_namespace.as_str(), r)),
        None => None,
    };
    let read = match needed {
        Some((secret_ns, r)) => match read_key(ctx, secret_ns, &r.name, &r.key).await? {
            Read::Value(v) => Some(v),
            Read::Missing => None,
            Read::NotAllowed(what) => return Ok(not_ready(Reason::SecretReferenceNotAllowed, what)),
        },
        None => None,
    };
    let input = FlowInput {
        now,
        grant,
        pending,
        read: read.as_ref(),
        scopes: &usable.scopes,
        response,
        binding_uid: binding.metadata.uid.as_deref(),
        generation: binding.metadata.generation,
        mailbox: &binding.spec.mailbox,
        token_url: usable.endpoints.token.as_deref().unwrap_or_default(),
    };
    let who = Requester {
        provider_key: &usable.key,
        provider: &usable.spec,
        endpoints: &usable.endpoints,
        scopes: &usable.scopes,
        mailbox: &binding.spec.mailbox,
    };
    match flow.step(&input) {
        Step::Await(p) => Ok(Obtained::Awaiting(p)),
        Step::Fail(failure) => Ok(Obtained::Failed { failure, rescued: None }),
        Step::StartAuthorization => Ok(match start_authorization(ctx, binding, usable, now) {
            Ok(p) => Obtained::Awaiting(p),
            Err(why) => not_ready(Reason::InvalidSpec, why),
        }),
        Step::StartDeviceAuthorization => {
            let client = match client_of(ctx, usable, &who).await? {
                Ok(c) => c,
                Err(o) => return Ok(o),
            };
            let Some(url) = usable.endpoints.device_authorization.clone() else {
                return Ok(not_ready(Reason::InvalidSpec, "the provider has no device authorization endpoint".into()));
            };
            let request = DeviceRequest { url, client, scopes: usable.scopes.clone() };
            let key = format!("{ns}/{}", binding.name_any());
            let deadline = crate::policy::binding::queue_deadline(now, binding, None);
            let _lane = admit(ctx, &ns, &key, &who, deadline).await?;
            Ok(match ctx.tokens.device_authorization(&request).await {
                Ok(code) => Obtained::Awaiting(device_code::pending(
                    code,
                    now,
                    &usable.key,
                    &who.provider.client_id,
                    who.scopes,
                    usable.endpoints.token.as_deref().unwrap_or_default(),
                )),
                Err(rejected) => {
                    let mut failure = classify(&rejected.error);
                    let held: Vec<&str> = request.client.auth_secrets().collect();
                    failure.message = scrub(&failure.message, &held);
                    Obtained::Failed { failure, rescued: None }
                }
            })
        }
        Step::Token(call) => {
            let client = match client_of(ctx, usable, &who).await? {
                Ok(c) => c,
                Err(o) => return Ok(o),
            };
            let sent = Sent { who: &who, cluster: usable.cluster.as_ref() };
            token(ctx, binding, &sent, flow, request_for(&who, client, call), &input).await
        }
    }
}

/// Sends a grant to the token endpoint and reads the answer: a new grant state, a step the flow
/// takes from a refusal (a device code not approved yet), or a classified failure.
async fn token(
    ctx: &Context,
    binding: &MailboxBinding,
    sent: &Sent<'_, '_>,
    flow: &dyn Flow,
    mut request: crate::oauth::TokenRequest,
    input: &FlowInput<'_>,
) -> Result<Obtained> {
    let who = sent.who;
    let ns = binding.namespace().unwrap_or_default();
    let grant = input.grant;
    let key = format!("{ns}/{}", binding.name_any());
    let deadline = crate::policy::binding::queue_deadline(ctx.now(), binding, grant);
    // The namespace's lane is held for everything this request leads to (the request, userinfo,
    // a revocation of a refused token): one tenant's slow endpoints hold at most its lane.
    let _lane = admit(ctx, &ns, &key, who, deadline).await?;
    let started = std::time::Instant::now();
    let mut result = timed(ctx, &ns, who, &request).await?;
    // A refused stored refresh token is not the end while the one it replaced is still held:
    // providers that keep replaced tokens valid (Microsoft, Google) accept it, and the grant lives.
    // Not when the first answer was slow: the reconcile's deadline must not cut a second request
    // whose answer (a rotated refresh token) could then be lost.
    if let (Err(rejected), Some(replaced)) = (&result, replaced_token(&request.grant, grant))
        && classify(&rejected.error).reason == Reason::ReauthorizationRequired
        && started.elapsed() < StdDuration::from_secs(10)
    {
        warn!("the stored refresh token was refused; trying the one it replaced");
        request.grant = refresh(&replaced, who.scopes);
        let _second = admit(ctx, &ns, &key, who, deadline).await?;
        result = timed(ctx, &ns, who, &request).await?;
    }
    let used = request.grant.refresh_token();
    // A refresh of the stored grant: the same grant, whose identity and scopes were judged when it
    // was first obtained. Its answer (a rotated refresh token) is kept whatever it says; judging it
    // again could only lose the grant.
    if let (Ok(set), Some(g)) = (&result, grant.filter(|_| used.is_some())) {
        let account = match pinned(&set.identities, &binding.spec.mailbox, &binding.spec.identity_aliases) {
            Ok(Some(account)) => Some(account),
            Ok(None) => g.account.clone(),
            Err(message) => {
                warn!(%message, "a refresh answer names another identity than the grant's; the grant is kept");
                g.account.clone()
            }
        };
        if rotated(set, used) {
            info!("refresh token rotated; storing the new one first");
        }
        let set = set.clone();
        let mut state = grant_state_from(who, set, used, flow.origin(), input.now, ctx.default_lifetime);
        state.account = account;
        if let Some(issuer) = g.issuer.clone() {
            state.issuer = Some(issuer);
        }
        return Ok(Obtained::Token(state));
    }
    Ok(match result {
        Ok(set) => {
            // Identity pinning: a token for someone else is not stored at all. Without an id_token
            // the provider's userinfo is asked, for a person who consented through the operator.
            let checked = binding.spec.identity == crate::api::IdentityCheck::Verified;
            let consent = flow.scope_kind() == crate::oauth::grants::ScopeKind::Consent;
            let mut vouched = set.identities.clone();
            let mut userinfo_failed = false;
            if checked
                && vouched.is_empty()
                && consent
                && let Some(url) = who.endpoints.userinfo.clone()
            {
                let asked = crate::oauth::UserinfoRequest {
                    url,
                    access_token: set.access_token.clone(),
                    ca_bundle: crate::oauth::provider::ca_bundle(who.provider).map(str::to_owned),
                };
                match ctx.tokens.userinfo(&asked).await {
                    Ok(ids) => vouched = ids,
                    Err(_) => {
                        warn!("userinfo could not be read; the identity cannot be checked");
                        userinfo_failed = true;
                    }
                }
            }
            let account = if checked {
                match pinned(&vouched, &binding.spec.mailbox, &binding.spec.identity_aliases) {
                    Ok(account) => account,
                    Err(message) => {
                        let failure =
                            Failure { reason: Reason::IdentityMismatch, transient: false, message, retry_after: None };
                        return Ok(Obtained::Failed { failure, rescued: None });
                    }
                }
            } else {
                None
            };
            // A person who consented through the operator must be named by the provider.
            if checked && consent && account.is_none() {
                let why = if userinfo_failed {
                    "the provider's userinfo endpoint could not be read"
                } else {
                    "the provider's answer names nobody (no email, preferred_username or upn claim, or an \
                     email it says is not verified)"
                };
                let failure = Failure {
                    reason: Reason::IdentityUnverified,
                    transient: false,
                    message: Reason::IdentityUnverified
                        .message(format!("{why}, so it is unknown who consented; nothing was stored")),
                    retry_after: None,
                };
                return Ok(Obtained::Failed { failure, rescued: None });
            }
            // The cluster admin's limits hold for what the provider granted, not only for what was
            // asked: more scopes, or an identity outside allowedMailboxes, and nothing is stored.
            let beyond = sent.cluster.and_then(|limits| {
                crate::policy::provider::granted_beyond(limits, who.scopes, set.scopes.as_deref(), account.as_deref())
            });
            if let Some(limits) = beyond {
                warn!("the provider granted more than the cluster provider allows; nothing is stored");
                revoke_refused(ctx, who, &request.client, &set).await;
                let failure = Failure {
                    reason: Reason::ProviderNotAllowed,
                    transient: false,
                    message: limits,
                    retry_after: None,
                };
                return Ok(Obtained::Failed { failure, rescued: None });
            }
            if rotated(&set, used) {
                info!("refresh token rotated; storing the new one first");
            }
            let mut state = grant_state_from(who, set, used, flow.origin(), input.now, ctx.default_lifetime);
            state.account = account;
            Obtained::Token(state)
        }
        Err(rejected) => {
            match flow.refused(&rejected.error, input) {
                Some(Step::Await(p)) => return Ok(Obtained::Awaiting(p)),
                Some(Step::Fail(failure)) => return Ok(Obtained::Failed { failure, rescued: None }),
                _ => {}
            }
            let mut failure = classify(&rejected.error);
            // Whatever the provider said is scrubbed of every credential held for this binding.
            let mut held: Vec<&str> = request.client.auth_secrets().chain(request.grant.secrets()).collect();
            if let Some(g) = grant {
                held.push(g.access_token.expose_secret());
                held.extend(g.refresh_token.as_ref().map(ExposeSecret::expose_secret));
                held.extend(g.previous_refresh_token.as_ref().map(ExposeSecret::expose_secret));
            }
            held.extend(input.pending.and_then(|p| p.device_code.as_ref()).map(ExposeSecret::expose_secret));
            failure.message = scrub(&failure.message, &held);
            let origin = flow.origin();
            let rescued = rejected.refresh_token.map(|rt| rescued_state(who, grant, rt, origin, input.now));
            Obtained::Failed { failure, rescued }
        }
    })
}

/// Who a token request is sent for, and the cluster admin's limits on what may come back.
struct Sent<'a, 'b> {
    who: &'a Requester<'b>,
    cluster: Option<&'a crate::api::ClusterMailProviderSpec>,
}

/// Revokes a token set the operator refuses to keep (it carries more than allowed), where the
/// provider can revoke: best effort, never stored, never shown.
async fn revoke_refused(
    ctx: &Context,
    who: &Requester<'_>,
    client: &crate::oauth::Client,
    set: &crate::oauth::TokenSet,
) {
    let Some(url) = who.endpoints.revocation.clone() else { return };
    let (token, hint) = match &set.refresh_token {
        Some(rt) => (rt.clone(), "refresh_token"),
        None => (set.access_token.clone(), "access_token"),
    };
    let request = crate::oauth::RevokeRequest { url, client: client.clone(), token, hint };
    if ctx.tokens.revoke(&request).await.is_err() {
        warn!("revoking the refused token failed; it expires by itself");
    }
}

/// A place for a request to `who`'s provider, asked while leading and checked again after. The
/// provider's rate limit: the binding whose token expires first (`deadline`) goes first, and a
/// binding without a token yet (a first grant, an authorization) goes after every renewal due
/// within the hour, so that a flood of new bindings on a shared provider cannot starve renewals.
/// No long wait holds this reconcile's slot: without room now, the reconcile is
/// [`Error::Deferred`] and comes back later. The guard holds the namespace's lane until dropped.
pub(crate) async fn admit(
    ctx: &Context,
    ns: &str,
    binding_key: &str,
    who: &Requester<'_>,
    deadline: DateTime<Utc>,
) -> Result<crate::controller::limits::LaneGuard> {
    ctx.leading()?;
    let key = format!("{}/{}", request_namespace(ns, who), who.provider_key);
    let guard = match ctx.limits.admit(&key, ns, binding_key, deadline).await {
        crate::controller::limits::Admission::Go(guard) => guard,
        crate::controller::limits::Admission::Later(wait) => return Err(Error::Deferred(wait)),
    };
    ctx.leading()?;
    Ok(guard)
}

/// A token request, counted and timed for `/metrics` (outcome `ok` or the condition reason).
/// Sent only while this replica leads (asked again after waiting for the rate limit).
async fn timed(
    ctx: &Context,
    ns: &str,
    who: &Requester<'_>,
    request: &crate::oauth::TokenRequest,
) -> Result<std::result::Result<crate::oauth::TokenSet, crate::oauth::Rejected>> {
    let key = format!("{}/{}", request_namespace(ns, who), who.provider_key);
    let started = std::time::Instant::now();
    let result = ctx.tokens.request(request).await;
    // A 429 or a Retry-After pauses this provider only.
    if let Err(r) = &result
        && let Some(wait) =
            r.error.retry_after.or_else(|| (r.error.status == Some(429)).then(|| chrono::Duration::seconds(30)))
        && let Some(until) = wait
            .to_std()
            .ok()
            .and_then(|w| tokio::time::Instant::now().checked_add(w.min(std::time::Duration::from_secs(3600))))
    {
        ctx.limits.pause(&key, until);
    }
    let outcome = match &result {
        Ok(_) => "ok",
        Err(r) => classify(&r.error).reason.as_str(),
    };
    let namespace = request_namespace(ns, who);
    ctx.metrics.token_request(&namespace, who.provider_key, outcome, started.elapsed().as_secs_f64());
    Ok(result)
}

/// The namespace a provider key is named in, for metrics: the provider's Secrets' namespace for a
/// `MailProvider` (its own), empty for a `ClusterMailProvider`.
fn request_namespace(ns: &str, who: &Requester<'_>) -> String {
    if who.provider_key.starts_with("ClusterMailProvider/") { String::new() } else { ns.to_owned() }
}

/// The refresh token the stored one replaced, when the call spends the stored one and the two
/// differ.
fn replaced_token(call: &GrantCall, grant: Option<&GrantState>) -> Option<SecretString> {
    let used = call.refresh_token()?;
    let g = grant?;
    let stored = g.refresh_token.as_ref()?;
    let previous = g.previous_refresh_token.as_ref()?;
    (stored.expose_secret() == used.expose_secret() && previous.expose_secret() != used.expose_secret())
        .then(|| previous.clone())
}

/// What a token request came to.
pub(crate) enum Obtained {
    /// A new grant state, to be stored first.
    Token(GrantState),
    /// A person has yet to act: this authorization is kept and shown.
    Awaiting(PendingAuthorization),
    /// A failure, and a state holding a refresh token the failed response carried, if any.
    Failed {
        /// The classified failure.
        failure: Failure,
        /// To be stored before anything else.
        rescued: Option<GrantState>,
    },
}
