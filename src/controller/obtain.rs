//! Carries out a grant's next [`Step`]: starts an authorization, or sends a request to the
//! provider (in the namespace's lane, within the provider's rate) and reads the answer into a new
//! grant state, a wait for a person, or a classified failure. It writes nothing.

use std::time::Duration as StdDuration;

use chrono::{DateTime, Utc};
use kube::ResourceExt;
use secrecy::{ExposeSecret, SecretString};
use tracing::{info, warn};

use super::Context;
use crate::api::{Endpoints, MailProviderSpec, MailboxBinding};
use crate::error::{Error, Result};
use crate::oauth::authorize::Response;
use crate::oauth::exchange::{Requester, grant_state_from, request_for, rescued_state, rotated};
use crate::oauth::grants::{Flow, FlowInput, Needs, Step, authorization_code, device_code, refresh};
use crate::oauth::provider::authorize_params;
use crate::oauth::{DeviceRequest, GrantCall};
use crate::policy::Reason;
use crate::policy::binding::reauthorize_requested;
use crate::policy::classify::{Failure, classify};
use crate::policy::grant_state::{GrantState, PendingAuthorization};
use crate::policy::identity::pinned;
use crate::policy::scrub::scrub;

use super::resolve::{ProviderUse, Read, client_of, not_ready, read_key};

/// A new authorization request for a person's browser: with the callback listener, the status
/// shows the operator's start link, `<public URL>/authorize/<ns>/<name>?start=<random>` (each
/// visit makes a fresh request; only those who can read the binding see the link, and the
/// listener refuses any other `start`). The link stays while the binding waits, so that a
/// reconcile never invalidates a link a person has open; a re-authorization request makes a new
/// one. Without the listener, a request is made now and its provider URL shown, for the person to
/// paste the final redirect URL back.
pub(crate) fn start_authorization(
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
        let url = crate::oauth::authorize::start_link(base, &ns, &name, current);
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

/// What is known of a grant before its next step.
#[derive(Clone, Copy)]
pub(crate) struct Known<'a> {
    /// The stored grant the flow may use.
    pub grant: Option<&'a GrantState>,
    /// The authorization in progress.
    pub pending: Option<&'a PendingAuthorization>,
    /// What a person's browser brought back.
    pub response: Option<&'a Response>,
}

/// Takes the grant's next step: asks the flow what to do, then does it. The outer error is a
/// Kubernetes failure; the inner result what the authorization server said.
pub(crate) async fn obtain(
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
            Read::NotAllowed(what) => return Ok(Obtained::failed(not_ready(Reason::SecretReferenceNotAllowed, what))),
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
            Err(why) => Obtained::failed(not_ready(Reason::InvalidSpec, why)),
        }),
        Step::StartDeviceAuthorization => {
            let client = match client_of(ctx, usable, &who).await? {
                Ok(c) => c,
                Err(f) => return Ok(Obtained::failed(f)),
            };
            let Some(url) = usable.endpoints.device_authorization.clone() else {
                return Ok(Obtained::failed(not_ready(
                    Reason::InvalidSpec,
                    "the provider has no device authorization endpoint".into(),
                )));
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
                Err(f) => return Ok(Obtained::failed(f)),
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

impl Obtained {
    /// A failure before or without a token response: nothing to store.
    pub(crate) fn failed(failure: Failure) -> Self {
        Self::Failed { failure, rescued: None }
    }
}
