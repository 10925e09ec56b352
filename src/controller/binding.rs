//! Reconciles a `MailboxBinding`: preflight (leadership, a stale cache, deletion), gather (the
//! provider, the grant state, the Secrets), decide, act (the provider call, the grant state
//! written first), publish, write status and Events.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration as StdDuration;

use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Patch, PatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Api, Resource, ResourceExt};
use tracing::{debug, info, warn};

use super::resolve::ProviderUse;
use super::secrets::{Role, binding_label, desired, grant_secret_name, up_to_date};
use super::{Context, Fence};
use crate::api::{
    AUTHORIZATION_RESPONSE_ANNOTATION, Grant, MailboxBinding, MailboxBindingStatus, OWNED_KEYS_ANNOTATION, Protocol,
    SOURCE_ANNOTATION, ServerAddress,
};
use crate::error::{Error, Result};
use crate::oauth::authorize::{Response, parse_response};
use crate::oauth::exchange::Requester;
use crate::oauth::grants::{Flow, flow_for};
use crate::policy::Reason;
use crate::policy::at_rest::{self, grant_digest, grant_for};
use crate::policy::binding::{
    Decision, Inputs, Outcome, ProviderState, Why, decide, grant_matches, needs_issuer, next_status,
    reauthorize_requested, redeemable, requeue_after, status_over,
};
use crate::policy::classify::Failure;
use crate::policy::events::transitions;
use crate::policy::grant_state::{GrantState, PendingAuthorization, spent_request_data};
use crate::policy::ownership::{Claim, claimed_by_other, existing_conflict, from_predecessor};
use crate::policy::publish::published_data;
use crate::policy::relay::{self, RelayCredentials};
use crate::policy::relay_signature::{self, SIGNATURE_ANNOTATION};

use super::grant_store::{
    apply_owned, create_owned, created_or_foreign, decode_grant, decode_pending, decode_relay, get_secret,
    persist_grant, persist_pending_data, rewrite_grant,
};
use super::obtain::{Known, Obtained, obtain};
use super::owned::Cached;
use super::resolve::provider_for;

/// Reconciles one binding, in stages: what needs no decision first, then everything the decision
/// needs read once, the decision (pure), the provider call with the grant state written before
/// anything else, and the writes of what the result says (published Secret, status, Events).
pub async fn reconcile(binding: Arc<MailboxBinding>, ctx: Arc<Context>) -> Result<Action> {
    if let Some(done) = preflight(&ctx, &binding).await? {
        return Ok(done);
    }
    // A grant state whose write failed before is written before anything else happens; that
    // write completes the earlier token request, so nothing is requested in this reconcile.
    let flushed = flush_kept(&ctx, &binding).await?;
    let mut seen = match gather(&ctx, &binding, flushed).await? {
        Gathered::AtRest(requeue) => {
            verify_hook(&ctx, &binding, None);
            return Ok(requeue);
        }
        Gathered::Seen(seen) => *seen,
    };
    settle(&ctx, &binding, &mut seen).await?;
    let now = ctx.now();
    let decision = decide(seen.inputs(now, &binding));
    let acted = act(&ctx, &binding, &mut seen, &decision, flushed, now).await?;
    let (status, failure, next_poll) = write(&ctx, &binding, &seen, acted, now).await?;
    verify_hook(&ctx, &binding, Some(&status));
    let requeue = requeue_after(now, &decision, &status, failure.as_ref(), next_poll);
    Ok(requeue.and_then(|d| d.to_std().ok()).map_or_else(Action::await_change, Action::requeue))
}

/// What ends a reconcile before anything is read: another replica leads (a grant state this one
/// could not write while it led is still written: it may hold the only copy of a rotated refresh
/// token); the cached copy is older than this process's own last status write (acting on it
/// could repeat what that write recorded; the cache catches up within milliseconds); the binding
/// is being deleted ([`super::cleanup`]), which also keeps the finalizer in line with the spec.
async fn preflight(ctx: &Context, binding: &MailboxBinding) -> Result<Option<Action>> {
    let name = binding.name_any();
    let ns =
        binding.namespace().ok_or_else(|| Error::MissingNamespace { kind: "MailboxBinding", name: name.clone() })?;
    if !ctx.leader.is_leader() {
        flush_kept(ctx, binding).await?;
        return Ok(Some(Action::await_change()));
    }
    if ctx.behind_own_write(&ns, &name, binding.resource_version().as_deref()) {
        debug!("the cache has not caught up with the last status write; waiting");
        return Ok(Some(Action::requeue(StdDuration::from_millis(200))));
    }
    super::cleanup::handle(ctx, binding).await
}

/// Writes the grant state kept in memory after a failed write, if any; whether there was one.
async fn flush_kept(ctx: &Context, binding: &MailboxBinding) -> Result<bool> {
    let ns = binding.namespace().unwrap_or_default();
    let Some(mut kept) = ctx.take_pending(&ns, &binding.name_any()) else { return Ok(false) };
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    persist_grant(ctx, &secrets, binding, kept.state, &mut kept.fence).await?;
    Ok(true)
}

/// Everything the decision needs, read once.
struct Seen {
    /// The binding's grant as the spec says it now; `None`: not supported by this version.
    flow: Option<Box<dyn Flow>>,
    /// The provider as the decision sees it.
    provider: ProviderState,
    /// What a usable provider offers.
    usable: Option<ProviderUse>,
    /// The published Secret as read or cached.
    published: Published,
    /// Why the binding may not write its Secrets, if so.
    conflict: Option<String>,
    /// The stored grant state (none when the Secrets conflict).
    grant: Option<GrantState>,
    /// The authorization in progress as stored.
    stored_pending: Option<PendingAuthorization>,
    /// What grant-state writes are conditioned on.
    fence: Fence,
    /// The grant state is an earlier binding's of this name, to be made this one's.
    adopted: bool,
    /// The grant state lacks the digests a restart judges it by (written by an older version).
    unmarked: bool,
    /// The relay credentials stored (also beside an authorization in progress, with no grant);
    /// after [`act`], what they are to be.
    relay: Option<RelayCredentials>,
}

impl Seen {
    /// The stored grant the binding's grant produced (as the spec says it now): the one the
    /// decisions use; any valid token stays published either way.
    fn owned(&self) -> Option<&GrantState> {
        self.grant.as_ref().filter(|g| self.flow.as_ref().is_some_and(|f| f.owns(g)))
    }

    fn inputs<'a>(&'a self, now: DateTime<Utc>, binding: &'a MailboxBinding) -> Inputs<'a> {
        Inputs {
            now,
            binding,
            provider: &self.provider,
            grant: self.owned(),
            stored: self.grant.as_ref(),
            secret_conflict: self.conflict.as_deref(),
            supported: self.flow.is_some(),
        }
    }
}

/// The published Secret as the reconcile knows it.
enum Published {
    /// Absent (as read, or as the owned-Secret cache says: created, never applied over).
    Absent,
    /// Its cached metadata: judged by the digests written with it, not read.
    Cached(Arc<PartialObjectMeta<Secret>>),
    /// Read.
    Read(Box<Secret>),
}

impl Published {
    fn meta(&self) -> Option<&ObjectMeta> {
        match self {
            Published::Absent => None,
            Published::Cached(m) => Some(&m.metadata),
            Published::Read(s) => Some(&s.metadata),
        }
    }
}

/// What gathering found.
enum Gathered {
    /// The binding is at rest (see [`crate::policy::at_rest`]): nothing was read, nothing is to be
    /// written; come back then.
    AtRest(Action),
    /// What the decision needs.
    Seen(Box<Seen>),
}

/// Asks the verifier to look at the binding when the reconcile saw a reason for a check (a new
/// token, identity or scopes, a `verify-requested` value): it only enqueues, it never waits on a
/// mail server. Periodic checks need no reconcile (the verifier sweeps the caches).
fn verify_hook(ctx: &Context, binding: &MailboxBinding, written: Option<&MailboxBindingStatus>) {
    if super::verify::worth_a_look(binding, written) {
        ctx.verify.nudge(&binding.namespace().unwrap_or_default(), &binding.name_any());
    }
}

/// Reads the provider (from the caches) and whatever of the two Secrets the owned-Secret cache
/// cannot answer for (both at once: one round trip of latency), and judges whether the binding
/// may write them. A binding at rest reads nothing. The grant state of a grant that spends a
/// credential (a refresh token, a device code) is read even when the cache says it is absent:
/// a Secret of someone else by that name must stop the request, not be found after it; a
/// stateless grant's (client credentials, JWT bearer) is not: a Secret of someone else there
/// costs one access token, never written over it.
async fn gather(ctx: &Context, binding: &MailboxBinding, flushed: bool) -> Result<Gathered> {
    let name = binding.name_any();
    let ns = binding.namespace().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let flow = flow_for(&binding.spec.grant);
    let (provider, usable) = provider_for(binding, flow.as_deref(), ctx).await?;
    let grant_name = grant_secret_name(&name);
    let grant_view = ctx.owned.view(&ns, &grant_name, &ctx.own_writes);
    let published_view = ctx.owned.view(&ns, &binding.spec.secret_name, &ctx.own_writes);
    if let (false, Cached::Present(g), Cached::Present(p), Some(u)) =
        (flushed, &grant_view, &published_view, usable.as_ref())
        && let Some(renew_at) = at_rest_until(ctx, binding, u, &g.metadata, &p.metadata)
        && claim_conflict(binding, ctx).is_none()
        && signed_with_current_key(ctx, binding, &p.metadata).await?
    {
        debug!("at rest: nothing read, nothing to write");
        let status = binding.status.clone().unwrap_or_default();
        let requeue = requeue_after(ctx.now(), &Decision::Keep { renew_at }, &status, None, None);
        return Ok(Gathered::AtRest(
            requeue.and_then(|d| d.to_std().ok()).map_or_else(Action::await_change, Action::requeue),
        ));
    }
    let stateless = matches!(binding.spec.grant, Grant::ClientCredentials {} | Grant::JwtBearer {});
    let read_grant = !matches!(grant_view, Cached::Absent) || !stateless;
    // Before a first grant, a published Secret the cache says is absent is read all the same: a
    // Secret of someone else by that name (the cache sees only the operator's) must stop the
    // token request. With a grant stored, an absent one is created (a conflict answers then).
    let read_published = match published_view {
        Cached::Unknown => true,
        Cached::Absent => !matches!(grant_view, Cached::Present(_)),
        Cached::Present(_) => false,
    };
    let maybe = |read: bool, name: String| {
        let secrets = secrets.clone();
        let ns = ns.clone();
        async move { if read { get_secret(&secrets, &ns, &name).await } else { Ok(None) } }
    };
    let (grant_secret, read) = futures::future::try_join(
        maybe(read_grant, grant_name.clone()),
        maybe(read_published, binding.spec.secret_name.clone()),
    )
    .await?;
    let published = match (published_view, read) {
        (Cached::Present(m), _) => Published::Cached(m),
        (_, Some(s)) => Published::Read(Box::new(s)),
        (_, None) => Published::Absent,
    };
    for (secret, seen) in
        [(&grant_name, grant_secret.is_some()), (&binding.spec.secret_name, published.meta().is_some())]
    {
        if !seen {
            ctx.owned.not_foreign(&ns, secret);
        }
    }
    let conflict = secret_conflict(binding, &provider, grant_secret.as_ref(), published.meta(), ctx);
    let ours = grant_secret.as_ref().filter(|_| conflict.is_none());
    let grant = ours.and_then(decode_grant);
    let uid = binding.uid().unwrap_or_default();
    Ok(Gathered::Seen(Box::new(Seen {
        adopted: ours.is_some_and(|s| from_predecessor(&uid, &name, &binding_label(&name), &s.metadata)),
        unmarked: ours.zip(grant.as_ref()).is_some_and(|(s, g)| {
            let want = super::grant_store::grant_secret(binding, &grant_name, g);
            let have = s.metadata.annotations.as_ref();
            want.metadata.annotations.iter().flatten().any(|(k, v)| have.and_then(|a| a.get(k)) != Some(v))
        }),
        stored_pending: ours.and_then(decode_pending),
        relay: ours.and_then(decode_relay),
        // Every grant-state write is conditioned on the version read here (see `Fence`).
        fence: Fence {
            version: grant_secret.as_ref().and_then(|s| s.resource_version()),
            basis: grant.as_ref().and_then(|g| g.refresh_token.clone()),
            absent: grant_secret.is_none(),
            keys: grant_secret.as_ref().map(super::grant_store::data_keys).or_else(|| Some(Default::default())),
        },
        grant,
        flow,
        provider,
        usable,
        published,
        conflict,
    })))
}

/// When the binding is at rest with its Secrets as cached, its renewal time.
fn at_rest_until(
    ctx: &Context,
    binding: &MailboxBinding,
    usable: &ProviderUse,
    grant: &ObjectMeta,
    published: &ObjectMeta,
) -> Option<DateTime<Utc>> {
    let spec = serde_json::to_string(&binding.spec.grant).ok()?;
    let grant_for =
        grant_for(&spec, &usable.key, &usable.spec.client_id, usable.endpoints.token.as_deref(), &usable.scopes);
    let inputs = publish_inputs(binding, &usable.servers);
    let want = desired(binding, &binding.spec.secret_name, Role::Published, BTreeMap::new());
    let labels = want.metadata.labels.unwrap_or_default();
    let mut annotations = want.metadata.annotations.unwrap_or_default();
    annotations.remove(OWNED_KEYS_ANNOTATION);
    let seen = at_rest::Seen {
        now: ctx.now(),
        binding,
        grant,
        published,
        grant_for: &grant_for,
        inputs: &inputs,
        published_labels: &labels,
        published_annotations: &annotations,
    };
    at_rest::at_rest(&seen)
}

/// What a published Secret is made from besides the grant (see [`at_rest::source`]): the
/// binding's mailbox, protocols and template, and the provider's mail servers.
pub(crate) fn publish_inputs(binding: &MailboxBinding, servers: &BTreeMap<Protocol, ServerAddress>) -> String {
    let spec = &binding.spec;
    let inputs = (&spec.mailbox, &spec.protocols, servers, &spec.secret_template);
    // The relay's inputs only when set, so that the digests of bindings without it stay as
    // earlier versions wrote them.
    match &spec.relay {
        None => serde_json::to_string(&inputs),
        Some(relay) => serde_json::to_string(&(inputs, relay)),
    }
    .unwrap_or_default()
}

/// Grant-state writes that come before any decision, and send nothing: a grant state adopted from
/// an earlier binding of this name is made this binding's own (owner reference: garbage
/// collection keeps it and later writes are ours), and one an older version wrote gets the
/// digests a restart judges it by (once); a grant stored before issuers were recorded is
/// bound to the provider it matches (by name and client id) as it is at this first look, so that
/// an edit of that provider's endpoints from here on finds the grant bound.
async fn settle(ctx: &Context, binding: &MailboxBinding, seen: &mut Seen) -> Result<()> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &binding.namespace().unwrap_or_default());
    if let (true, Some(state)) = (seen.adopted || seen.unmarked, seen.grant.clone()) {
        if seen.adopted {
            info!("adopting the grant state of an earlier binding of this name");
        } else {
            info!("recording the digests of a grant state an older version wrote");
        }
        rewrite_grant(ctx, &secrets, binding, state, &mut seen.fence).await?;
    }
    if let (Some(g), Some(u)) = (seen.grant.as_ref(), seen.usable.as_ref())
        && needs_issuer(g, &u.key, &u.spec.client_id, u.endpoints.token.as_deref())
    {
        let who = requester(binding, u);
        let bound = GrantState { issuer: crate::oauth::exchange::issuer_of(&who), ..g.clone() };
        info!("recording the issuer of a grant stored before issuers were recorded");
        rewrite_grant(ctx, &secrets, binding, bound.clone(), &mut seen.fence).await?;
        seen.grant = Some(bound);
    }
    Ok(())
}

/// Who a request is sent for: the binding at its usable provider.
fn requester<'a>(binding: &'a MailboxBinding, usable: &'a ProviderUse) -> Requester<'a> {
    Requester {
        provider_key: &usable.key,
        provider: &usable.spec,
        endpoints: &usable.endpoints,
        scopes: &usable.scopes,
        mailbox: &binding.spec.mailbox,
    }
}

/// What the action came to, for the writes after it.
struct Acted {
    outcome: Outcome,
    failure: Option<Failure>,
    next_poll: Option<DateTime<Utc>>,
    /// A pasted authorization response was read: it is removed (after what it brought is stored).
    forget_pasted: bool,
}

/// Carries out the decision: asks the provider when the decision says so, and stores what must
/// be stored before anything else (a new grant state, an authorization in progress, a spent
/// request). `seen.grant` becomes the grant to publish.
async fn act(
    ctx: &Context,
    binding: &MailboxBinding,
    seen: &mut Seen,
    decision: &Decision,
    flushed: bool,
    now: DateTime<Utc>,
) -> Result<Acted> {
    let mut acted = Acted { outcome: Outcome::Unchanged, failure: None, next_poll: None, forget_pasted: false };
    let name = binding.name_any();
    if !matches!(decision, Decision::Suspended | Decision::Blocked { .. }) {
        seen.relay = relay::plan(binding, seen.relay.as_ref(), now, fresh_password);
    }
    let usable = seen.usable.clone();
    let flow = seen.flow.take();
    acted.outcome = match (decision, usable, flow.as_deref()) {
        (Decision::Suspended, _, _) => Outcome::Suspended,
        (Decision::Blocked { reason, message }, _, _) => Outcome::Blocked { reason: *reason, message: message.clone() },
        // The flushed state is the token an earlier request obtained: that refresh ends here.
        _ if flushed => Outcome::Refreshed,
        (Decision::Obtain { why }, Some(usable), Some(flow)) => {
            obtain_and_store(ctx, binding, seen, (&usable, flow, *why), &mut acted, now).await?
        }
        _ => Outcome::Unchanged,
    };
    seen.flow = flow;
    // Relay credentials issued, rotated, ended or turned off: stored with the grant before they
    // are published (a token obtained above already carries them).
    if matches!(acted.outcome, Outcome::Unchanged | Outcome::Refreshed)
        && let Some(grant) = seen.grant.as_ref().filter(|g| g.relay != seen.relay)
    {
        let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &binding.namespace().unwrap_or_default());
        let state = GrantState { relay: seen.relay.clone(), ..grant.clone() };
        info!(binding = %name, "storing the relay credentials");
        rewrite_grant(ctx, &secrets, binding, state.clone(), &mut seen.fence).await?;
        seen.grant = Some(state);
    }
    Ok(acted)
}

/// A new relay password from the system's random source (`None` if it fails: the stored one,
/// if any, stays).
fn fresh_password() -> Option<secrecy::SecretString> {
    use ring::rand::SecureRandom;
    let random = ring::rand::SystemRandom::new();
    relay::password_from(|buf| random.fill(buf).is_ok())
}

/// The grant's next step at the provider, and what its answer makes stored.
async fn obtain_and_store(
    ctx: &Context,
    binding: &MailboxBinding,
    seen: &mut Seen,
    (usable, flow, why): (&ProviderUse, &dyn Flow, Why),
    acted: &mut Acted,
    now: DateTime<Utc>,
) -> Result<Outcome> {
    let name = binding.name_any();
    let ns = binding.namespace().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let reauthorize = reauthorize_requested(binding).is_some();
    let token_url = usable.endpoints.token.as_deref();
    let usable_grant = seen
        .grant
        .as_ref()
        .filter(|g| flow.owns(g))
        .filter(|g| !reauthorize && grant_matches(&usable.key, &usable.spec.client_id, token_url, g));
    // A device code or an authorization code is redeemed only where it was issued for.
    let pending = redeemable(seen.stored_pending.as_ref(), reauthorize, &usable.key, &usable.spec.client_id, token_url)
        .map(|p| PendingAuthorization { next_poll: ctx.next_poll(&ns, &name, p.next_poll), ..p.clone() });
    // What a person's browser brought back: a pasted redirect URL, or the callback's code.
    let pasted = annotation(binding, AUTHORIZATION_RESPONSE_ANNOTATION);
    let response = browser_response(pasted, pending.as_ref());
    let known = Known { grant: usable_grant, pending: pending.as_ref(), response: response.as_ref() };
    let obtained = obtain(ctx, binding, usable, flow, known, now).await?;
    failpoint("after-token-response", &name);
    // Consumed once, then removed (after what it brought is stored): the code in it is single-use
    // anyway.
    acted.forget_pasted = pasted.is_some();
    if response.is_some()
        && matches!(obtained, Obtained::Failed { .. })
        && let Some(mut data) = spent_request_data(seen.grant.as_ref(), seen.stored_pending.as_ref())
    {
        data.extend(RelayCredentials::encoded(seen.relay.as_ref()));
        // A response is answered once: the request it answered is spent. A stored grant is kept
        // whatever the response was (a stray or replayed one answers nothing).
        let kept = seen.grant.as_ref().and_then(|g| g.refresh_token.clone());
        persist_pending_data(&secrets, binding, data, &mut seen.fence, kept).await?;
    }
    Ok(match obtained {
        Obtained::Awaiting(p) if !p.persistent() => {
            acted.next_poll = Some(p.next_poll);
            Outcome::Awaiting(p)
        }
        Obtained::Awaiting(p) => {
            let stored = seen.stored_pending.as_ref();
            if !stored.is_some_and(|s| s.same_stored(&p)) {
                let started = stored.is_none_or(|s| s.device_code_differs(&p));
                // The relay credentials stay across a new authorization: devices keep working.
                let mut data = p.encode();
                data.extend(RelayCredentials::encoded(seen.relay.as_ref()));
                persist_pending_data(&secrets, binding, data, &mut seen.fence, None).await?;
                if started {
                    info!(method = %p.method, "waiting for a person to authorize");
                    // A new authorization replaces whatever grant was stored.
                    seen.grant = None;
                }
            }
            ctx.set_next_poll(&ns, &name, p.next_poll);
            acted.next_poll = Some(p.next_poll);
            Outcome::Awaiting(p)
        }
        Obtained::Token(state) => {
            let state = GrantState { relay: seen.relay.clone(), ..state };
            info!(why = ?why, expires_at = %state.expires_at, "token obtained");
            ctx.forget_poll(&ns, &name);
            persist_grant(ctx, &secrets, binding, state.clone(), &mut seen.fence).await?;
            failpoint("after-grant-write", &name);
            seen.grant = Some(state);
            Outcome::Refreshed
        }
        Obtained::Failed { failure, rescued } => {
            warn!(reason = %failure.reason, message = %failure.message, "token request failed");
            if let Some(state) = rescued {
                let state = GrantState { relay: seen.relay.clone(), ..state };
                warn!("the failed response carried a refresh token; storing it");
                persist_grant(ctx, &secrets, binding, state.clone(), &mut seen.fence).await?;
                seen.grant = Some(state);
            }
            acted.failure = Some(failure.clone());
            Outcome::Failed(failure)
        }
    })
}

/// What the browser brought back: a pasted redirect URL first, else the code the callback
/// listener stored with the request.
fn browser_response(pasted: Option<&str>, pending: Option<&PendingAuthorization>) -> Option<Response> {
    match (pasted, pending) {
        (Some(text), _) => parse_response(text),
        (None, Some(p)) => match (&p.code, &p.state) {
            (Some(code), Some(state)) => Some(Response::Code { code: code.clone(), state: state.clone() }),
            _ => None,
        },
        (None, None) => None,
    }
}

/// Writes what the action's result says: the published Secret (when a valid token is held and
/// the binding is neither suspended nor blocked), the status, the Events of its transitions.
/// Returns the status written and what the requeue depends on.
async fn write(
    ctx: &Context,
    binding: &MailboxBinding,
    seen: &Seen,
    acted: Acted,
    now: DateTime<Utc>,
) -> Result<(MailboxBindingStatus, Option<Failure>, Option<DateTime<Utc>>)> {
    let Acted { mut outcome, failure, next_poll, forget_pasted } = acted;
    if forget_pasted {
        forget_pasted_response(ctx, binding).await;
    }
    if !matches!(outcome, Outcome::Suspended | Outcome::Blocked { .. })
        && let (Some(g), Some(usable)) = (seen.grant.as_ref().filter(|g| g.expires_at > now), seen.usable.as_ref())
        && let Some(blocked) = publish(ctx, binding, g, usable, &seen.published).await?
    {
        outcome = blocked;
    }
    let status = write_status(ctx, binding, seen.grant.as_ref(), &outcome, now).await?;
    announce(ctx, binding, &status).await;
    Ok((status, failure, next_poll))
}

/// Writes the published Secret unless it is up to date (judged from its data when it was read,
/// from the digest written with it when only its metadata is cached). An absent one is created,
/// so that a Secret of someone else of that name is never written over: the create fails and
/// the binding is blocked with `SecretConflict`. `Some(outcome)`: the binding is blocked (also
/// when the template cannot render, or the apiserver refuses what it will always refuse: said
/// in status instead of retrying the same write).
async fn publish(
    ctx: &Context,
    binding: &MailboxBinding,
    grant: &GrantState,
    usable: &ProviderUse,
    published: &Published,
) -> Result<Option<Outcome>> {
    let spec = &binding.spec;
    let relay_keys = relay::published(binding, grant.relay.as_ref(), ctx.now());
    let rendered = published_data(
        &spec.mailbox,
        grant,
        &spec.protocols,
        &usable.servers,
        relay_keys,
        spec.secret_template.as_ref(),
    );
    let data = match rendered {
        Ok(data) => data,
        Err(e) => return Ok(Some(Outcome::Blocked { reason: Reason::InvalidSpec, message: e.to_string() })),
    };
    let signature = relay_signature(ctx, binding, &data).await?;
    let mut want = desired(binding, &spec.secret_name, Role::Published, data);
    if let Some(signature) = signature {
        want.metadata.annotations.get_or_insert_with(BTreeMap::new).insert(SIGNATURE_ANNOTATION.to_owned(), signature);
    }
    let made_from = at_rest::source(&grant_digest(&grant.encode()), &publish_inputs(binding, &usable.servers));
    want.metadata.annotations.get_or_insert_with(BTreeMap::new).insert(SOURCE_ANNOTATION.to_owned(), made_from);
    let current = match published {
        Published::Absent => false,
        Published::Cached(m) => cached_up_to_date(&m.metadata, &want),
        Published::Read(s) => up_to_date(s, &want),
    };
    if current {
        return Ok(None);
    }
    let ns = binding.namespace().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    // Known only from the cache: written over the version the cache shows, so that a Secret
    // deleted and made again by someone else meanwhile is not taken over (the conflict is read).
    let mut conditional = want.clone();
    if let Published::Cached(m) = published {
        conditional.metadata.resource_version = m.metadata.resource_version.clone();
    }
    let mut written = match published {
        Published::Absent => create_owned(ctx, &secrets, &want).await,
        _ => apply_owned(ctx, &secrets, &conditional).await,
    };
    if let (Published::Absent | Published::Cached(_), Err(kube::Error::Api(e))) = (published, &written)
        && e.code == 409
    {
        let (found, foreign) = created_or_foreign(ctx, &secrets, binding, &ns, &spec.secret_name).await?;
        if let (true, Some(s)) = (foreign, found.as_ref()) {
            let uid = binding.uid().unwrap_or_default();
            let message = existing_conflict(&uid, &s.metadata).unwrap_or_default();
            return Ok(Some(Outcome::Blocked { reason: Reason::SecretConflict, message }));
        }
        written = match found {
            Some(_) => apply_owned(ctx, &secrets, &want).await,
            None => create_owned(ctx, &secrets, &want).await,
        };
    }
    // Keys this Secret held from an earlier write that it no longer has (a protocol or template
    // key dropped) go explicitly: a Secret made by a create keeps them through an apply.
    let before: std::collections::BTreeSet<String> = published
        .meta()
        .and_then(|m| m.annotations.as_ref())
        .and_then(|a| a.get(OWNED_KEYS_ANNOTATION))
        .map(|k| k.split(',').filter(|k| !k.is_empty()).map(str::to_owned).collect())
        .unwrap_or_default();
    if let Ok(done) = &written {
        let stale: Vec<String> =
            before.into_iter().filter(|k| !want.data.as_ref().is_some_and(|d| d.contains_key(k))).collect();
        if !stale.is_empty()
            && let Err(e) =
                super::grant_store::remove_keys(ctx, &secrets, &spec.secret_name, &stale, done.resource_version()).await
        {
            warn!(error = %e, "removing published keys no longer written failed; the next write removes them");
        }
    }
    match written {
        Ok(_) => {
            info!(secret = %spec.secret_name, "published Secret written");
            failpoint("after-publish", &binding.name_any());
            Ok(None)
        }
        Err(kube::Error::Api(e)) if e.code == 422 || e.code == 400 => {
            let shown: String = e.message.chars().take(300).collect();
            Ok(Some(Outcome::Blocked {
                reason: Reason::InvalidSpec,
                message: Reason::InvalidSpec
                    .message(format!("the apiserver refused the published Secret {}: {shown}", spec.secret_name)),
            }))
        }
        Err(source) => Err(Error::WritePublishedSecret { namespace: ns, name: spec.secret_name.clone(), source }),
    }
}

/// The shared relay's signature of the published Secret's `data` (see
/// [`crate::policy::relay_signature`]), when it carries relay keys and the operator signs.
async fn relay_signature(
    ctx: &Context,
    binding: &MailboxBinding,
    data: &BTreeMap<String, String>,
) -> Result<Option<String>> {
    if !data.contains_key(relay::published_keys::PASSWORD) {
        return Ok(None);
    }
    let Some(key) = ctx.relay_keys.key().await? else { return Ok(None) };
    let namespace = binding.namespace().unwrap_or_default();
    let message = relay_signature::message(&namespace, &binding.spec.secret_name, |k| data.get(k).cloned());
    Ok(Some(key.sign(&message)))
}

/// Whether a published Secret, as cached, is signed with the current relay signing key (or
/// needs no signature: the relay is off, or nothing is signed). Judged from the key id alone:
/// what is signed is judged with the rest of the Secret by its source digest.
async fn signed_with_current_key(ctx: &Context, binding: &MailboxBinding, published: &ObjectMeta) -> Result<bool> {
    if relay::enabled(binding).is_none() || !ctx.relay_keys.signs() {
        return Ok(true);
    }
    let Some(key) = ctx.relay_keys.key().await? else { return Ok(true) };
    let prefix = format!("v1.{}.", key.id());
    Ok(published.annotations.as_ref().and_then(|a| a.get(SIGNATURE_ANNOTATION)).is_some_and(|s| s.starts_with(&prefix)))
}

/// Whether a published Secret known by its cached metadata holds what `want` says: ours, carrying
/// every label and annotation of `want` (the source digest among them), and none of its data keys
/// owned by another field manager.
fn cached_up_to_date(meta: &ObjectMeta, want: &Secret) -> bool {
    let subset = |want: &Option<BTreeMap<String, String>>, have: &Option<BTreeMap<String, String>>| {
        want.iter().flatten().all(|(k, v)| have.as_ref().and_then(|h| h.get(k)) == Some(v))
    };
    let keys = |key: &str| -> std::collections::BTreeSet<&str> {
        meta.annotations
            .as_ref()
            .and_then(|a| a.get(key))
            .map_or("", String::as_str)
            .split(',')
            .filter(|k| !k.is_empty())
            .collect()
    };
    let wanted: std::collections::BTreeSet<&str> = want.data.iter().flatten().map(|(k, _)| k.as_str()).collect();
    // Every key still the operator's (none removed or replaced by anyone), none another's.
    let touched = !wanted.is_subset(&keys(at_rest::OWN_KEYS)) || !wanted.is_disjoint(&keys(at_rest::FOREIGN_KEYS));
    let owner_ok = want
        .metadata
        .owner_references
        .iter()
        .flatten()
        .all(|w| meta.owner_references.iter().flatten().any(|o| o.uid == w.uid && o.controller == w.controller));
    let trimmed = meta.annotations.as_ref().is_some_and(|a| a.contains_key(at_rest::TRIMMED));
    !trimmed
        && !touched
        && owner_ok
        && subset(&want.metadata.labels, &meta.labels)
        && subset(&want.metadata.annotations, &meta.annotations)
}

/// Writes the status the outcome gives, unless it is unchanged. The cached copy may be stale (our
/// own last status write had not reached the cache yet): a reconcile that did something (a
/// refresh, an annotation acted on) must not lose it to a retry that sees nothing to do, so on a
/// conflict the status is computed again from the current object and written once more.
async fn write_status(
    ctx: &Context,
    binding: &MailboxBinding,
    grant: Option<&GrantState>,
    outcome: &Outcome,
    now: DateTime<Utc>,
) -> Result<MailboxBindingStatus> {
    let status = next_status(now, binding, grant, outcome);
    if binding.status.as_ref() == Some(&status) {
        return Ok(status);
    }
    match patch_status(ctx, binding, &status).await {
        Err(e) if e.is_conflict() && !matches!(outcome, Outcome::Unchanged) => {
            let name = binding.name_any();
            let api: Api<MailboxBinding> =
                Api::namespaced(ctx.client.clone(), &binding.namespace().unwrap_or_default());
            let fresh = api.get(&name).await.map_err(|source| Error::WriteStatus {
                kind: "MailboxBinding",
                name: name.clone(),
                source,
            })?;
            let again = status_over(now, &fresh, grant, outcome, &status);
            if fresh.status.as_ref() != Some(&again) {
                patch_status(ctx, &fresh, &again).await?;
            }
            Ok(again)
        }
        other => other.map(|()| status),
    }
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
        Error::GrantStateTaken { .. } => {
            warn!(binding = %binding.name_any(), %error, "the grant state's name is taken");
            return Action::requeue(StdDuration::from_secs(60));
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
    // The verifier's fields are left to the verifier's own field manager.
    super::apply_status(&api, binding, &crate::policy::binding::reconcile_owned(status)).await?;
    ctx.wrote_status(&ns, &binding.name_any(), binding.resource_version().as_deref());
    Ok(())
}

/// Publishes the Events of the status change ([`crate::policy::events::transitions`]), each as an
/// Event of its own: the shared recorder would fold an Event of the same type and reason
/// published within six minutes into the first one, re-sending its old note (a new device code
/// would never be shown). Only transitions get here, so nothing needs folding.
async fn announce(ctx: &Context, binding: &MailboxBinding, status: &MailboxBindingStatus) {
    for e in transitions(binding.status.as_ref(), status) {
        let type_ = if e.warning { EventType::Warning } else { EventType::Normal };
        let event = Event { type_, reason: e.reason, note: Some(e.note), action: "Reconcile".into(), secondary: None };
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
    published: Option<&ObjectMeta>,
    ctx: &Context,
) -> Option<String> {
    let uid = binding.uid().unwrap_or_default();
    let name = binding.name_any();
    let label = binding_label(&name);

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
    let published_conflict =
        published.filter(|m| !from_predecessor(&uid, &name, &label, m)).and_then(|m| existing_conflict(&uid, m));
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
    published_conflict.or(grant_conflict).or_else(|| claim_conflict(binding, ctx))
}

/// Whether an older binding in the namespace claims the same published Secret name.
fn claim_conflict(binding: &MailboxBinding, ctx: &Context) -> Option<String> {
    let claim = |b: &MailboxBinding| Claim {
        binding: b.name_any(),
        created: b.creation_timestamp().and_then(|t| DateTime::<Utc>::from_timestamp(t.0.as_second(), 0)),
        secret_name: b.spec.secret_name.clone(),
    };
    // Only the bindings of this namespace naming the same Secret, picked under the store's lock
    // without copying the others: a copy of every binding's claim per reconcile made the first
    // burst quadratic (18 Ready a second at 100,000 bindings in one namespace, against 125 at
    // 10,000; `memmove` and clones were most of the operator's CPU).
    let others: Vec<Claim> = ctx
        .bindings
        .state_filter(|b| {
            b.metadata.namespace == binding.metadata.namespace && b.spec.secret_name == binding.spec.secret_name
        })
        .iter()
        .map(|b| claim(b))
        .collect();
    claimed_by_other(&claim(binding), &others)
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
