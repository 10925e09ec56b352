//! Decisions for a `MailboxBinding`: what to do now (a pure function of the clock, the binding,
//! what is known of its provider and its stored grant) and the status that results.

use chrono::{DateTime, Duration, Utc};

use super::Reason;
use super::classify::Failure;
use super::condition::condition;
use super::grant_state::{GrantState, PendingAuthorization, rfc3339};
use super::time::{between, plus};
use super::{schedule, validate};
use crate::api::common::find_condition;
use crate::api::{
    AuthorizationStatus, Condition, ConditionStatus, MailboxBinding, MailboxBindingStatus, Phase,
    REAUTHORIZE_REQUESTED_ANNOTATION, REFRESH_REQUESTED_ANNOTATION, TokenStatus,
};

/// Condition types of a binding.
pub mod conditions {
    /// The published token is valid.
    pub const READY: &str = "Ready";
    /// The grant holds a working credential.
    pub const AUTHORIZED: &str = "Authorized";
    /// The last token request failed (the published token may still be valid).
    pub const REFRESH_FAILING: &str = "RefreshFailing";
    /// The mailbox logged in with its token (written by the verifier, never by the reconcile).
    pub const MAILBOX_VERIFIED: &str = "MailboxVerified";
}

/// What the controller found out about the provider a binding refers to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProviderState {
    /// Usable: its identity and the scopes this binding must request.
    Usable {
        /// `Kind/name`.
        key: String,
        /// The OAuth client id.
        client_id: String,
        /// Scopes this binding requests.
        scopes: Vec<String>,
        /// The token endpoint it sends to now.
        token_url: Option<String>,
    },
    /// Not usable (missing, not ready, not allowed, cannot serve this grant).
    Unusable {
        /// Why.
        reason: Reason,
        /// What to do.
        message: String,
    },
}

/// Everything a decision looks at.
#[derive(Clone, Copy, Debug)]
pub struct Inputs<'a> {
    /// The clock.
    pub now: DateTime<Utc>,
    /// The binding as observed.
    pub binding: &'a MailboxBinding,
    /// The provider.
    pub provider: &'a ProviderState,
    /// The stored grant state, when one exists, parses and came from the binding's grant as the
    /// spec says it now (see `oauth::grants::Flow::owns`).
    pub grant: Option<&'a GrantState>,
    /// The stored grant state whatever grant produced it: a refresh token in it is bound to its
    /// issuer even when the spec's grant changed.
    pub stored: Option<&'a GrantState>,
    /// Why the binding may not write its Secrets, if it may not.
    pub secret_conflict: Option<&'a str>,
    /// Whether this version implements the binding's grant.
    pub supported: bool,
}

/// Why a token is requested now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Why {
    /// There is no usable token yet.
    Initial,
    /// The renewal time has come.
    Due,
    /// A person asked (annotation).
    Requested,
    /// The requested scopes changed.
    ScopesChanged,
    /// A transient failure's backoff is over.
    Retry,
}

/// What to do now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// `spec.suspend`: touch nothing at the provider.
    Suspended,
    /// Something a person must fix stops the binding; no token request.
    Blocked {
        /// Why.
        reason: Reason,
        /// What to do.
        message: String,
    },
    /// Take the grant's next step (ask the token endpoint, start or poll an authorization).
    Obtain {
        /// Why now.
        why: Why,
    },
    /// The stored token is current: publish it and come back at `renew_at`.
    Keep {
        /// When to renew.
        renew_at: DateTime<Utc>,
    },
    /// A failure stands: publish what is valid and wait (for a change, or until `until`).
    Wait {
        /// When to try again; `None` waits for a spec change or an annotation.
        until: Option<DateTime<Utc>>,
    },
}

/// The refresh margin the binding asks for (the default when the spec's is invalid; such a
/// binding is blocked with `InvalidSpec` before it gets this far).
pub fn refresh_before(binding: &MailboxBinding) -> Duration {
    validate::refresh_before(&binding.spec).unwrap_or(schedule::DEFAULT_REFRESH_BEFORE)
}

/// The binding's jitter seed (a hash of its uid).
pub fn seed(binding: &MailboxBinding) -> u64 {
    schedule::seed(binding.metadata.uid.as_deref().unwrap_or_default())
}

/// The longest `Retry-After` honoured; a longer one is shortened to this (a token endpoint must
/// not be able to stop renewals for longer than a token lives).
pub const MAX_RETRY_AFTER: Duration = Duration::hours(1);

/// Whether two scope lists name the same set of scopes (either spelling of an Exchange Online
/// scope being one scope: see [`super::provider::scope_key`]).
pub fn same_scopes(a: &[String], b: &[String]) -> bool {
    fn set(v: &[String]) -> std::collections::BTreeSet<std::borrow::Cow<'_, str>> {
        v.iter().map(|s| super::provider::scope_key(s)).collect()
    }
    set(a) == set(b)
}

/// When the binding's stored token is renewed.
pub fn renew_at(binding: &MailboxBinding, grant: &GrantState) -> DateTime<Utc> {
    schedule::renew_at(grant.issued_at, grant.expires_at, refresh_before(binding), seed(binding))
}

fn annotation<'a>(binding: &'a MailboxBinding, key: &str) -> Option<&'a str> {
    binding.metadata.annotations.as_ref()?.get(key).map(String::as_str)
}

/// A new `refresh-requested` value not acted on yet.
pub fn refresh_requested(binding: &MailboxBinding) -> Option<&str> {
    let value = annotation(binding, REFRESH_REQUESTED_ANNOTATION)?;
    let seen = binding.status.as_ref().and_then(|s| s.last_refresh_request.as_deref());
    (seen != Some(value)).then_some(value)
}

/// Where a binding's request queues at its provider (earliest first): a renewal that is due by
/// its token's expiry, never earlier than now (an expired token does not jump the queue);
/// anything else — a first grant, an authorization, a requested or retried refresh of a token
/// not yet due — as if its token expired in an hour, behind every renewal due before then. So a
/// flood of new bindings or of `refresh-requested` values cannot starve renewals that are due.
pub fn queue_deadline(now: DateTime<Utc>, binding: &MailboxBinding, grant: Option<&GrantState>) -> DateTime<Utc> {
    match grant {
        Some(g) if now >= renew_at(binding, g) => std::cmp::max(g.expires_at, now),
        _ => super::time::plus(now, Duration::hours(1)),
    }
}

/// A new `reauthorize-requested` value not acted on yet.
pub fn reauthorize_requested(binding: &MailboxBinding) -> Option<&str> {
    let value = annotation(binding, REAUTHORIZE_REQUESTED_ANNOTATION)?;
    let seen = binding.status.as_ref().and_then(|s| s.last_reauthorize_request.as_deref());
    (seen != Some(value)).then_some(value)
}

/// Whether the stored grant was issued through the binding's current provider, client and token
/// endpoint. A state written before issuers were recorded matches on provider and client.
pub fn grant_matches(provider_key: &str, client_id: &str, token_url: Option<&str>, grant: &GrantState) -> bool {
    grant.provider == provider_key
        && grant.client_id == client_id
        && grant.issuer.as_ref().is_none_or(|i| Some(i.token_url.as_str()) == token_url)
}

/// Why a stored grant holding a refresh token may not be used with the provider as it is now
/// (another provider, client or token endpoint): the refresh token is the issuer's alone. `None`
/// when it may be used, holds no refresh token, or a reauthorization is asked for.
pub fn issuer_changed(
    binding: &MailboxBinding,
    provider_key: &str,
    client_id: &str,
    token_url: Option<&str>,
    stored: Option<&GrantState>,
) -> Option<String> {
    let g = stored.filter(|g| g.refresh_token.is_some() || g.previous_refresh_token.is_some())?;
    if reauthorize_requested(binding).is_some() || grant_matches(provider_key, client_id, token_url, g) {
        return None;
    }
    let short = |s: &str| s.chars().take(200).collect::<String>();
    let issued_at =
        g.issuer.as_ref().map_or_else(|| "an unrecorded token endpoint".to_owned(), |i| short(&i.token_url));
    Some(Reason::IssuerChanged.message(format!(
        "the stored grant was issued through {} (client {}, token endpoint {issued_at}), but the binding now uses \
         {provider_key} (client {}, token endpoint {}): nothing was sent, and the stored grant is kept",
        short(&g.provider),
        short(&g.client_id),
        short(client_id),
        token_url.map_or_else(|| "unknown".to_owned(), short),
    )))
}

/// The permanent failure recorded in status for the current generation, if any.
fn standing_permanent_failure(binding: &MailboxBinding) -> Option<&Condition> {
    let status = binding.status.as_ref()?;
    let authorized = find_condition(&status.conditions, conditions::AUTHORIZED)?;
    let permanent = authorized.status == ConditionStatus::False
        && is_permanent(&authorized.reason)
        && authorized.observed_generation == binding.metadata.generation;
    permanent.then_some(authorized)
}

/// Reasons that wait for a person instead of being retried.
pub fn is_permanent(reason: &str) -> bool {
    [
        Reason::ReauthorizationRequired,
        Reason::ConsentRequired,
        Reason::ClientCredentialsInvalid,
        Reason::ClientSecretExpired,
        Reason::IdentityMismatch,
        Reason::AuthorizationExpired,
        Reason::AuthorizationDenied,
        Reason::RequestRejected,
    ]
    .iter()
    .any(|r| r.as_str() == reason)
}

/// When a transient failure's backoff ends, if one is under way: the time recorded in status
/// (so a restart honours it), else one computed from the last failure.
fn backoff_until(binding: &MailboxBinding) -> Option<DateTime<Utc>> {
    let status = binding.status.as_ref()?;
    if status.failed_attempts == 0 {
        return None;
    }
    status.next_attempt_time.or_else(|| {
        status.last_failure_time.map(|last| plus(last, schedule::backoff(status.failed_attempts, seed(binding))))
    })
}

/// What to do now.
pub fn decide(inputs: Inputs<'_>) -> Decision {
    let Inputs { now, binding, provider, grant, stored, secret_conflict, supported } = inputs;
    if binding.spec.suspend {
        return Decision::Suspended;
    }
    if let Err(why) = validate::spec(&binding.spec) {
        return Decision::Blocked { reason: Reason::InvalidSpec, message: Reason::InvalidSpec.message(why) };
    }
    if !supported {
        return Decision::Blocked {
            reason: Reason::GrantNotSupported,
            message: Reason::GrantNotSupported
                .message(format!("the {} grant is not supported yet by this version", binding.spec.grant.name())),
        };
    }
    let (key, client_id, scopes, token_url) = match provider {
        ProviderState::Usable { key, client_id, scopes, token_url } => (key, client_id, scopes, token_url.as_deref()),
        ProviderState::Unusable { reason, message } => {
            return Decision::Blocked { reason: *reason, message: message.clone() };
        }
    };
    if let Some(conflict) = secret_conflict {
        return Decision::Blocked { reason: Reason::SecretConflict, message: conflict.to_owned() };
    }
    if let Some(message) = issuer_changed(binding, key, client_id, token_url, stored) {
        return Decision::Blocked { reason: Reason::IssuerChanged, message };
    }

    let reauthorize = reauthorize_requested(binding).is_some();
    let usable = grant.filter(|g| !reauthorize && grant_matches(key, client_id, token_url, g));
    let why = match usable {
        None => Some(Why::Initial),
        Some(_) if refresh_requested(binding).is_some() => Some(Why::Requested),
        Some(g) if !same_scopes(&g.requested_scopes, scopes) => Some(Why::ScopesChanged),
        Some(g) if now >= renew_at(binding, g) => Some(Why::Due),
        Some(_) => None,
    };
    let Some(why) = why else {
        // `why` is None only when `usable` is Some.
        return match usable {
            Some(g) => Decision::Keep { renew_at: renew_at(binding, g) },
            None => Decision::Wait { until: None },
        };
    };
    // A person's request always goes through; otherwise a standing failure is respected.
    let asked = reauthorize || why == Why::Requested;
    if !asked {
        if standing_permanent_failure(binding).is_some() {
            return Decision::Wait { until: None };
        }
        if let Some(until) = backoff_until(binding).filter(|u| now < *u) {
            return Decision::Wait { until: Some(until) };
        }
    }
    let why = if !asked && backoff_until(binding).is_some() { Why::Retry } else { why };
    Decision::Obtain { why }
}

/// What happened in this reconcile, for the status.
#[derive(Clone, Debug, PartialEq, Eq)]
#[allow(clippy::large_enum_variant)]
pub enum Outcome {
    /// `spec.suspend`.
    Suspended,
    /// A person must fix something.
    Blocked {
        /// Why.
        reason: Reason,
        /// What to do.
        message: String,
    },
    /// Nothing was requested; the stored token (if any) is published.
    Unchanged,
    /// A new token was obtained and stored.
    Refreshed,
    /// The token request failed.
    Failed(Failure),
    /// A person has yet to complete an authorization.
    Awaiting(PendingAuthorization),
}

/// The status after a reconcile. Equal to the previous status when nothing changed, so that the
/// controller can skip the write.
pub fn next_status(
    now: DateTime<Utc>,
    binding: &MailboxBinding,
    grant: Option<&GrantState>,
    outcome: &Outcome,
) -> MailboxBindingStatus {
    let previous = binding.status.clone().unwrap_or_default();
    let generation = binding.metadata.generation;
    let prev = previous.conditions.as_slice();
    let mut status = MailboxBindingStatus {
        phase: None,
        conditions: Vec::new(),
        authorization: None,
        token: grant.map(|g| TokenStatus {
            issued_at: g.issued_at,
            expires_at: g.expires_at,
            renew_at: renew_at(binding, g),
            scopes: g.scopes.clone(),
        }),
        account: grant.and_then(|g| g.account.clone()).or_else(|| previous.account.clone()),
        last_refresh_time: previous.last_refresh_time,
        failed_attempts: previous.failed_attempts,
        last_failure_time: previous.last_failure_time,
        next_attempt_time: previous.next_attempt_time,
        secret_name: Some(binding.spec.secret_name.clone()),
        last_refresh_request: previous.last_refresh_request.clone(),
        last_reauthorize_request: previous.last_reauthorize_request.clone(),
        observed_generation: generation,
        // The verifier's, carried as it is (see `reconcile_owned`).
        verification: previous.verification.clone(),
        relay: match grant {
            Some(g) => super::relay::status(binding, g.relay.as_ref(), now),
            None => previous.relay.clone().filter(|_| super::relay::enabled(binding).is_some()),
        },
    };
    let valid = grant.filter(|g| g.expires_at > now);
    let cond = |type_: &str, s: ConditionStatus, r: Reason, m: String| condition(prev, type_, s, r, m, now, generation);

    // Annotations are acted on by any reconcile that requested a token.
    if matches!(outcome, Outcome::Refreshed | Outcome::Failed(_) | Outcome::Awaiting(_)) {
        if let Some(v) = refresh_requested(binding) {
            status.last_refresh_request = Some(v.to_owned());
        }
        if let Some(v) = reauthorize_requested(binding) {
            status.last_reauthorize_request = Some(v.to_owned());
        }
    }

    let ready = |valid: Option<&GrantState>| match (valid, grant) {
        (Some(g), _) => cond(
            conditions::READY,
            ConditionStatus::True,
            Reason::TokenValid,
            format!("token valid until {}, renewal at {}", rfc3339(g.expires_at), rfc3339(renew_at(binding, g))),
        ),
        (None, Some(g)) => cond(
            conditions::READY,
            ConditionStatus::False,
            Reason::Expired,
            Reason::Expired.message(format!("the token expired at {}", rfc3339(g.expires_at))),
        ),
        (None, None) => {
            cond(conditions::READY, ConditionStatus::False, Reason::Pending, "no token obtained yet".into())
        }
    };

    match outcome {
        Outcome::Suspended => {
            status.phase = Some(Phase::Suspended);
            status.conditions.push(ready(valid));
            carry(prev, &mut status.conditions, conditions::AUTHORIZED);
            carry(prev, &mut status.conditions, conditions::REFRESH_FAILING);
        }
        Outcome::Blocked { reason, message } => {
            // A blocked binding is not Ready even with a valid token: a person has to act.
            status.phase = Some(Phase::Error);
            let message = match valid {
                Some(g) if *reason != Reason::SecretConflict => {
                    format!("{message} (the published token stays valid until {})", rfc3339(g.expires_at))
                }
                _ => message.clone(),
            };
            status.conditions.push(cond(conditions::READY, ConditionStatus::False, *reason, message));
            carry(prev, &mut status.conditions, conditions::AUTHORIZED);
            carry(prev, &mut status.conditions, conditions::REFRESH_FAILING);
        }
        Outcome::Unchanged | Outcome::Refreshed => {
            if *outcome == Outcome::Refreshed {
                status.last_refresh_time = Some(now);
                status.failed_attempts = 0;
                status.last_failure_time = None;
                status.next_attempt_time = None;
                status.conditions.push(ready(valid));
                status.conditions.push(cond(
                    conditions::AUTHORIZED,
                    ConditionStatus::True,
                    Reason::Authorized,
                    format!("{} grant holds a working credential", binding.spec.grant.name()),
                ));
                status.conditions.push(cond(
                    conditions::REFRESH_FAILING,
                    ConditionStatus::False,
                    Reason::RefreshSucceeded,
                    "the last token request succeeded".into(),
                ));
            } else {
                status.conditions.push(ready(valid));
                carry(prev, &mut status.conditions, conditions::AUTHORIZED);
                carry(prev, &mut status.conditions, conditions::REFRESH_FAILING);
            }
            status.phase = Some(phase_of(&status.conditions, valid.is_some()));
        }
        Outcome::Failed(failure) => {
            status.failed_attempts = previous.failed_attempts.saturating_add(1);
            status.last_failure_time = Some(now);
            status.next_attempt_time = failure.transient.then(|| {
                let backoff = schedule::backoff(status.failed_attempts, seed(binding));
                let asked = failure.retry_after.unwrap_or_else(Duration::zero).clamp(Duration::zero(), MAX_RETRY_AFTER);
                plus(now, std::cmp::max(backoff, asked))
            });
            let message = failure_message(failure, valid);
            status.conditions.push(match valid {
                Some(_) => ready(valid),
                None => cond(
                    conditions::READY,
                    ConditionStatus::False,
                    if grant.is_some() { Reason::Expired } else { failure.reason },
                    message.clone(),
                ),
            });
            if failure.transient {
                carry(prev, &mut status.conditions, conditions::AUTHORIZED);
            } else {
                status.conditions.push(cond(
                    conditions::AUTHORIZED,
                    ConditionStatus::False,
                    failure.reason,
                    message.clone(),
                ));
            }
            status.conditions.push(cond(conditions::REFRESH_FAILING, ConditionStatus::True, failure.reason, message));
            status.phase = Some(phase_of(&status.conditions, valid.is_some()));
        }
        Outcome::Awaiting(p) => {
            // Waiting for a person is no failure: nothing is counted, and the way to go on is shown.
            status.failed_attempts = 0;
            status.last_failure_time = None;
            status.next_attempt_time = None;
            status.phase = Some(Phase::AwaitingAuthorization);
            status.authorization = Some(AuthorizationStatus {
                method: p.method.clone(),
                user_code: p.user_code.clone(),
                verification_uri: p.verification_uri.clone(),
                verification_uri_complete: p.verification_uri_complete.clone(),
                url: p.url.clone(),
                // An operator link makes a fresh request at each visit: it does not expire.
                expires_at: p.persistent().then_some(p.expires_at),
            });
            let message = awaiting_message(&binding.spec.mailbox, p);
            status.conditions.push(match valid {
                Some(_) => ready(valid),
                None => cond(conditions::READY, ConditionStatus::False, Reason::AwaitingAuthorization, message.clone()),
            });
            status.conditions.push(cond(
                conditions::AUTHORIZED,
                ConditionStatus::False,
                Reason::AwaitingAuthorization,
                message,
            ));
            status.conditions.push(cond(
                conditions::REFRESH_FAILING,
                ConditionStatus::False,
                Reason::AwaitingAuthorization,
                "no token request has failed; waiting for a person to authorize".into(),
            ));
        }
    }
    carry(prev, &mut status.conditions, conditions::MAILBOX_VERIFIED);
    status
}

/// The part of a status the binding reconcile writes: everything but the verifier's fields
/// (`verification`, the `MailboxVerified` condition). [`next_status`] carries those over as they
/// are, so that "unchanged, no write" compares whole statuses; the apply leaves them out, so the
/// reconcile's field manager never owns them and neither apply removes the other's fields.
pub fn reconcile_owned(status: &MailboxBindingStatus) -> MailboxBindingStatus {
    let mut mine = status.clone();
    mine.verification = None;
    mine.conditions.retain(|c| c.type_ != conditions::MAILBOX_VERIFIED);
    mine
}

/// What a person has to do, in one line (shown in the wide `MESSAGE` column and the Event).
pub fn awaiting_message(mailbox: &str, p: &PendingAuthorization) -> String {
    if let Some(url) = &p.url {
        let mut m = format!("open {url} and sign in as {mailbox}");
        if p.persistent() {
            m.push_str(&format!(
                " before {}; if the browser cannot reach the redirect page, paste its address into the \
                 mailoauth.io/authorization-response annotation",
                rfc3339(p.expires_at)
            ));
        }
        return m;
    }
    let uri = p.verification_uri.as_deref().unwrap_or("the provider's verification page");
    let code = p.user_code.as_deref().unwrap_or("?");
    let mut m =
        format!("open {uri} and enter the code {code} before {}, signed in as {mailbox}", rfc3339(p.expires_at));
    if let Some(complete) = &p.verification_uri_complete {
        m.push_str(&format!(" (or open {complete})"));
    }
    m
}

fn failure_message(failure: &Failure, valid: Option<&GrantState>) -> String {
    let what = match valid {
        Some(g) => format!("{}; the published token stays valid until {}", failure.message, rfc3339(g.expires_at)),
        None => failure.message.clone(),
    };
    failure.reason.message(what)
}

fn carry(previous: &[Condition], into: &mut Vec<Condition>, type_: &str) {
    if let Some(c) = find_condition(previous, type_) {
        into.push(c.clone());
    }
}

fn phase_of(conditions: &[Condition], valid: bool) -> Phase {
    let authorized = find_condition(conditions, conditions::AUTHORIZED);
    let failing = find_condition(conditions, conditions::REFRESH_FAILING).is_some_and(Condition::is_true);
    match authorized {
        Some(a) if a.status == ConditionStatus::False && is_permanent(&a.reason) => Phase::ReauthorizationRequired,
        _ if valid && failing => Phase::Refreshing,
        _ if valid => Phase::Ready,
        _ if failing => Phase::Error,
        _ => Phase::Pending,
    }
}

/// When the controller should look at the binding again.
pub fn requeue_after(
    now: DateTime<Utc>,
    decision: &Decision,
    status: &MailboxBindingStatus,
    failure: Option<&Failure>,
    next_poll: Option<DateTime<Utc>>,
) -> Option<Duration> {
    let expiry = status.token.as_ref().map(|t| t.expires_at).filter(|e| *e > now);
    let next = match decision {
        Decision::Suspended | Decision::Blocked { .. } => {
            // Provider or conflict problems may clear without an event we watch for.
            Some(plus(now, Duration::minutes(5)))
        }
        Decision::Keep { renew_at } => Some(*renew_at),
        Decision::Wait { until } => *until,
        Decision::Obtain { .. } => match failure {
            None => next_poll.or_else(|| status.token.as_ref().map(|t| t.renew_at)),
            Some(f) if f.transient => status.next_attempt_time,
            Some(_) => None,
        },
    };
    // Always come back at expiry, so `Ready` turns `False` on time; and when a previous relay
    // password's grace ends, so that it is unpublished on time.
    let grace_end = status.relay.as_ref().and_then(|r| r.previous_password_valid_until).filter(|e| *e > now);
    let next = [next, expiry, grace_end].into_iter().flatten().min()?;
    Some(std::cmp::max(between(now, next), Duration::seconds(1)))
}

/// Whether a stored grant was stored before issuers were recorded and is to be bound now to the
/// provider it matches (by name and client id) as that provider is at this first look: it holds a
/// refresh token, and no issuer yet.
pub fn needs_issuer(grant: &GrantState, provider_key: &str, client_id: &str, token_url: Option<&str>) -> bool {
    grant.issuer.is_none()
        && (grant.refresh_token.is_some() || grant.previous_refresh_token.is_some())
        && grant_matches(provider_key, client_id, token_url, grant)
}

/// The stored authorization in progress that may be redeemed at this provider: none when a new
/// authorization is asked for, and a device code or an authorization code goes only to the
/// provider, client and token endpoint it was issued for.
pub fn redeemable<'a>(
    stored: Option<&'a PendingAuthorization>,
    reauthorize: bool,
    provider_key: &str,
    client_id: &str,
    token_url: Option<&str>,
) -> Option<&'a PendingAuthorization> {
    stored
        .filter(|_| !reauthorize)
        .filter(|p| p.provider == provider_key && p.client_id == client_id)
        .filter(|p| p.token_url.as_deref().is_none_or(|u| Some(u) == token_url))
}

/// The status to write over `fresh` (the current object, after a status write from a stale copy
/// conflicted): computed again from it, but with the annotation values this reconcile acted on
/// (`acted`'s), not the current object's (a newer value there has not been acted on yet).
pub fn status_over(
    now: DateTime<Utc>,
    fresh: &MailboxBinding,
    grant: Option<&GrantState>,
    outcome: &Outcome,
    acted: &MailboxBindingStatus,
) -> MailboxBindingStatus {
    let mut status = next_status(now, fresh, grant, outcome);
    status.last_refresh_request.clone_from(&acted.last_refresh_request);
    status.last_reauthorize_request.clone_from(&acted.last_reauthorize_request);
    status
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::MailboxBindingSpec;
    use crate::policy::classify::{UpstreamError, classify};

    fn t(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + secs, 0).unwrap_or_default()
    }

    fn binding(grant: serde_json::Value) -> MailboxBinding {
        let spec: MailboxBindingSpec = serde_json::from_value(serde_json::json!({
            "providerRef": {"name": "idp"}, "mailbox": "a@example.com", "secretName": "a-mail", "grant": grant,
        }))
        .unwrap_or_else(|e| panic!("spec: {e}"));
        let mut b = MailboxBinding::new("a", spec);
        b.metadata.namespace = Some("ns".into());
        b.metadata.uid = Some("uid-a".into());
        b.metadata.generation = Some(1);
        b
    }

    fn import() -> MailboxBinding {
        binding(serde_json::json!({"refreshToken": {"secretRef": {"name": "seed", "key": "refresh_token"}}}))
    }

    fn provider() -> ProviderState {
        ProviderState::Usable {
            key: "MailProvider/idp".into(),
            client_id: "client".into(),
            scopes: vec!["mail".into()],
            token_url: Some(TOKEN_URL.into()),
        }
    }

    const TOKEN_URL: &str = "https://idp.example.com/token";

    fn grant(issued: i64, lifetime: i64) -> GrantState {
        GrantState {
            issued_at: t(issued),
            expires_at: t(issued + lifetime),
            imported_from: Some("seed/refresh_token".into()),
            issuer: Some(crate::policy::grant_state::Issuer {
                token_url: TOKEN_URL.into(),
                revocation_url: Some("https://idp.example.com/revoke".into()),
                client_auth: "none".into(),
            }),
            ..GrantState::test()
        }
    }

    /// Decides as the controller does: the stored grant counts only when the binding's flow owns it.
    fn decide_at(now: DateTime<Utc>, b: &MailboxBinding, g: Option<&GrantState>) -> Decision {
        decide(inputs(now, b, &provider(), g))
    }

    fn inputs<'a>(
        now: DateTime<Utc>,
        b: &'a MailboxBinding,
        p: &'a ProviderState,
        g: Option<&'a GrantState>,
    ) -> Inputs<'a> {
        let flow = crate::oauth::grants::flow_for(&b.spec.grant);
        let grant = g.filter(|g| flow.as_ref().is_some_and(|f| f.owns(g)));
        Inputs { now, binding: b, provider: p, grant, stored: g, secret_conflict: None, supported: flow.is_some() }
    }

    #[test]
    fn a_grant_is_never_used_with_another_token_endpoint_client_or_provider_and_is_kept() {
        let b = import();
        let g = grant(0, 3600);
        let moved = |key: &str, client: &str, url: &str| ProviderState::Usable {
            key: key.into(),
            client_id: client.into(),
            scopes: vec!["mail".into()],
            token_url: Some(url.into()),
        };
        for p in [
            moved("MailProvider/idp", "client", "https://attacker.example/token"),
            moved("MailProvider/idp", "other-client", TOKEN_URL),
            moved("MailProvider/mine", "client", TOKEN_URL),
        ] {
            // Due or requested or not: nothing is asked of the new endpoint.
            for now in [t(60), t(3500)] {
                let d = decide(inputs(now, &b, &p, Some(&g)));
                let Decision::Blocked { reason: Reason::IssuerChanged, message } = d else {
                    panic!("expected IssuerChanged for {p:?}, got {d:?}")
                };
                assert!(message.contains(TOKEN_URL) && message.contains("reauthorize-requested"), "{message}");
            }
        }
        // The grant's own issuer: used as before.
        assert!(matches!(decide(inputs(t(60), &b, &provider(), Some(&g))), Decision::Keep { .. }));
        // A deliberate reauthorization may move on.
        let mut asked = b.clone();
        asked.metadata.annotations =
            Some([(crate::api::REAUTHORIZE_REQUESTED_ANNOTATION.to_owned(), "1".to_owned())].into());
        let p = moved("MailProvider/idp", "client", "https://new.example/token");
        assert_eq!(decide(inputs(t(60), &asked, &p, Some(&g))), Decision::Obtain { why: Why::Initial });
    }

    #[test]
    fn a_grant_from_before_issuers_were_recorded_matches_on_provider_and_client() {
        let g = GrantState { issuer: None, ..grant(0, 3600) };
        assert!(grant_matches("MailProvider/idp", "client", Some("https://anything/token"), &g));
        assert!(!grant_matches("MailProvider/other", "client", Some(TOKEN_URL), &g));
    }

    #[test]
    fn due_renewals_queue_before_first_grants_and_requested_refreshes_and_expired_ones_do_not_jump() {
        let b = import();
        let g = grant(0, 3600);
        let due = queue_deadline(t(3500), &b, Some(&g));
        assert_eq!(due, t(3600), "a due renewal queues by its expiry");
        assert_eq!(queue_deadline(t(60), &b, Some(&g)), t(3660), "a refresh of a token not due: an hour out");
        assert_eq!(queue_deadline(t(0), &b, None), t(3600), "a first grant: an hour out");
        assert!(queue_deadline(t(3000), &b, None) > due, "behind the due renewal");
        assert_eq!(queue_deadline(t(9000), &b, Some(&g)), t(9000), "an expired token queues at now, not before");
    }

    #[test]
    fn a_new_import_binding_imports_its_refresh_token() {
        let b = import();
        assert_eq!(decide_at(t(0), &b, None), Decision::Obtain { why: Why::Initial });
    }

    #[test]
    fn once_a_token_is_stored_the_imported_copy_is_never_used_again() {
        let b = import();
        let g = grant(0, 3600);
        assert_eq!(decide_at(t(3000), &b, Some(&g)), Decision::Obtain { why: Why::Due });
    }

    #[test]
    fn a_current_token_is_kept_until_its_renewal_time() {
        let b = import();
        let g = grant(0, 3600);
        let Decision::Keep { renew_at: at } = decide_at(t(60), &b, Some(&g)) else { panic!("expected Keep") };
        assert_eq!(at, renew_at(&b, &g));
        assert!(at > t(2300) && at <= t(2400), "{at}");
    }

    #[test]
    fn a_restart_with_a_current_token_requests_nothing() {
        // After a restart the binding carries its status; only the grant state and the clock count.
        let mut b = import();
        let g = grant(0, 3600);
        b.status = Some(next_status(t(1), &b, Some(&g), &Outcome::Refreshed));
        assert!(matches!(decide_at(t(1200), &b, Some(&g)), Decision::Keep { .. }));
    }

    #[test]
    fn a_person_can_ask_for_a_refresh_once_per_annotation_value() {
        let mut b = import();
        let g = grant(0, 3600);
        b.metadata.annotations = Some([(REFRESH_REQUESTED_ANNOTATION.to_owned(), "1".to_owned())].into());
        assert_eq!(decide_at(t(10), &b, Some(&g)), Decision::Obtain { why: Why::Requested });
        b.status = Some(next_status(t(10), &b, Some(&g), &Outcome::Refreshed));
        assert!(matches!(decide_at(t(11), &b, Some(&g)), Decision::Keep { .. }));
    }

    #[test]
    fn reauthorizing_drops_the_stored_grant_and_imports_again() {
        let mut b = import();
        let g = grant(0, 3600);
        b.metadata.annotations = Some([(REAUTHORIZE_REQUESTED_ANNOTATION.to_owned(), "x".to_owned())].into());
        assert!(matches!(decide_at(t(10), &b, Some(&g)), Decision::Obtain { why: Why::Initial }));
    }

    #[test]
    fn a_changed_import_reference_starts_over_and_a_changed_client_keeps_the_grant_unused() {
        let b = binding(serde_json::json!({"refreshToken": {"secretRef": {"name": "other", "key": "rt"}}}));
        let g = grant(0, 3600);
        assert!(matches!(decide_at(t(10), &b, Some(&g)), Decision::Obtain { why: Why::Initial, .. }));
        let mut moved = grant(0, 3600);
        moved.client_id = "another-client".into();
        let d = decide_at(t(10), &import(), Some(&moved));
        assert!(matches!(d, Decision::Blocked { reason: Reason::IssuerChanged, .. }), "{d:?}");
    }

    #[test]
    fn changed_scopes_are_requested_at_once() {
        let mut g = grant(0, 3600);
        g.requested_scopes = vec!["old".into()];
        assert!(matches!(decide_at(t(10), &import(), Some(&g)), Decision::Obtain { why: Why::ScopesChanged, .. }));
    }

    #[test]
    fn a_permanent_failure_waits_for_a_person_and_keeps_the_valid_token_ready() {
        let mut b = import();
        let g = grant(0, 3600);
        let failure = classify(&UpstreamError {
            status: Some(400),
            error: Some("invalid_grant".into()),
            description: Some("grant request is invalid".into()),
            ..Default::default()
        });
        let status = next_status(t(2500), &b, Some(&g), &Outcome::Failed(failure));
        assert_eq!(status.phase, Some(Phase::ReauthorizationRequired));
        let ready = find_condition(&status.conditions, conditions::READY).cloned().unwrap_or_else(|| panic!("Ready"));
        assert_eq!((ready.status, ready.reason.as_str()), (ConditionStatus::True, "TokenValid"));
        let auth =
            find_condition(&status.conditions, conditions::AUTHORIZED).cloned().unwrap_or_else(|| panic!("Auth"));
        assert_eq!((auth.status, auth.reason.as_str()), (ConditionStatus::False, "ReauthorizationRequired"));
        assert!(auth.message.contains("fix: authorize again"), "{}", auth.message);
        b.status = Some(status);
        assert_eq!(decide_at(t(2600), &b, Some(&g)), Decision::Wait { until: None });
        // After expiry the binding is no longer Ready, and still waits.
        let expired = next_status(t(4000), &b, Some(&g), &Outcome::Unchanged);
        let ready = find_condition(&expired.conditions, conditions::READY).cloned().unwrap_or_else(|| panic!("Ready"));
        assert_eq!((ready.status, ready.reason.as_str()), (ConditionStatus::False, "Expired"));
        assert_eq!(expired.phase, Some(Phase::ReauthorizationRequired));
        // A spec change lets it try again.
        b.metadata.generation = Some(2);
        assert!(matches!(decide_at(t(4001), &b, Some(&g)), Decision::Obtain { .. }));
    }

    #[test]
    fn a_transient_failure_backs_off_and_keeps_ready_while_the_token_is_valid() {
        let mut b = import();
        let g = grant(0, 3600);
        let failure = classify(&UpstreamError { status: Some(503), ..Default::default() });
        let status = next_status(t(2500), &b, Some(&g), &Outcome::Failed(failure.clone()));
        assert_eq!(status.phase, Some(Phase::Refreshing));
        assert_eq!(status.failed_attempts, 1);
        let failing = find_condition(&status.conditions, conditions::REFRESH_FAILING).cloned();
        assert_eq!(failing.map(|c| c.reason), Some("TokenEndpointUnavailable".to_owned()));
        // The first backoff is between 15 and 30 s (jittered), recorded in status.
        let next = status.next_attempt_time.unwrap_or_else(|| panic!("nextAttemptTime"));
        assert!(next >= t(2515) && next <= t(2530), "{next}");
        b.status = Some(status.clone());
        assert_eq!(decide_at(t(2510), &b, Some(&g)), Decision::Wait { until: Some(next) });
        assert_eq!(decide_at(next, &b, Some(&g)), Decision::Obtain { why: Why::Retry });
        let decision = Decision::Obtain { why: Why::Due };
        assert_eq!(requeue_after(t(2500), &decision, &status, Some(&failure), None), Some(next - t(2500)));
    }

    #[test]
    fn retry_after_is_kept_in_status_honoured_after_a_restart_and_bounded() {
        let mut b = import();
        let g = grant(0, 3600);
        let mut failure = classify(&UpstreamError { status: Some(429), ..Default::default() });
        failure.retry_after = Some(Duration::minutes(20));
        let status = next_status(t(2500), &b, Some(&g), &Outcome::Failed(failure.clone()));
        assert_eq!(status.next_attempt_time, Some(t(2500 + 1200)));
        // A restart only has the status: the wait still holds.
        b.status = Some(status);
        assert_eq!(decide_at(t(2600), &b, Some(&g)), Decision::Wait { until: Some(t(3700)) });
        failure.retry_after = Some(Duration::days(365_000));
        let absurd = next_status(t(2500), &b, Some(&g), &Outcome::Failed(failure));
        assert_eq!(absurd.next_attempt_time, Some(t(2500) + MAX_RETRY_AFTER));
    }

    #[test]
    fn scopes_are_compared_as_sets() {
        let mut g = grant(0, 3600);
        g.requested_scopes = vec!["b".into(), "mail".into(), "b".into()];
        let p = ProviderState::Usable {
            key: "MailProvider/idp".into(),
            client_id: "client".into(),
            scopes: vec!["mail".into(), "b".into()],
            token_url: Some(TOKEN_URL.into()),
        };
        let d = decide(inputs(t(10), &import(), &p, Some(&g)));
        assert!(matches!(d, Decision::Keep { .. }), "{d:?}");
    }

    #[test]
    fn an_invalid_spec_is_blocked_before_any_request_with_the_field_named() {
        let mut b = import();
        b.spec.refresh_before = Some("99999999999999999999h".into());
        let Decision::Blocked { reason, message } = decide_at(t(0), &b, None) else { panic!("expected Blocked") };
        assert_eq!(reason, Reason::InvalidSpec);
        assert!(message.contains("spec.refreshBefore") && message.contains("fix:"), "{message}");
    }

    #[test]
    fn an_unsupported_grant_says_so_instead_of_staying_silent() {
        let b = binding(serde_json::json!({ "jwtBearer": {} }));
        let p = provider();
        let d = decide(Inputs { supported: false, ..inputs(t(0), &b, &p, None) });
        let Decision::Blocked { reason, message } = d else { panic!("expected Blocked") };
        assert_eq!(reason, Reason::GrantNotSupported);
        assert!(message.contains("jwtBearer") && message.contains("not supported yet"), "{message}");
        let status = next_status(t(0), &b, None, &Outcome::Blocked { reason, message });
        assert_eq!(status.phase, Some(Phase::Error));
        assert_eq!(status.conditions[0].reason, "GrantNotSupported");
    }

    #[test]
    fn every_grant_of_the_api_has_a_flow() {
        for grant in ["deviceCode", "authorizationCode", "clientCredentials", "jwtBearer"] {
            let b = binding(serde_json::json!({ grant: {} }));
            let flow = crate::oauth::grants::flow_for(&b.spec.grant);
            assert_eq!(flow.map(|f| f.name()), Some(grant));
        }
    }

    #[test]
    fn provider_problems_and_conflicts_block_without_a_token_request() {
        let b = binding(serde_json::json!({"clientCredentials": {}}));
        let missing = ProviderState::Unusable { reason: Reason::ProviderNotFound, message: "no".into() };
        let d = decide(inputs(t(0), &b, &missing, None));
        assert_eq!(d, Decision::Blocked { reason: Reason::ProviderNotFound, message: "no".into() });
        let p = provider();
        let d = decide(Inputs { secret_conflict: Some("taken"), ..inputs(t(0), &b, &p, None) });
        assert_eq!(d, Decision::Blocked { reason: Reason::SecretConflict, message: "taken".into() });
        assert_eq!(decide_at(t(0), &b, None), Decision::Obtain { why: Why::Initial });
    }

    #[test]
    fn a_reconcile_that_changes_nothing_produces_the_same_status() {
        let mut b = import();
        let g = grant(0, 3600);
        b.status = Some(next_status(t(1), &b, Some(&g), &Outcome::Refreshed));
        assert_eq!(Some(next_status(t(500), &b, Some(&g), &Outcome::Unchanged)), b.status);
    }

    #[test]
    fn requeue_comes_at_renewal_and_never_after_expiry() {
        let mut b = import();
        let g = grant(0, 3600);
        let status = next_status(t(1), &b, Some(&g), &Outcome::Refreshed);
        b.status = Some(status.clone());
        let keep = Decision::Keep { renew_at: renew_at(&b, &g) };
        assert_eq!(requeue_after(t(100), &keep, &status, None, None), Some(renew_at(&b, &g) - t(100)));
        let wait = Decision::Wait { until: None };
        assert_eq!(requeue_after(t(100), &wait, &status, None, None), Some(Duration::seconds(3500)));
    }

    fn device_pending(provider: &str, client_id: &str, token_url: Option<&str>) -> PendingAuthorization {
        PendingAuthorization {
            method: "deviceCode".into(),
            device_code: Some("dc".to_owned().into()),
            user_code: Some("ABCD".into()),
            verification_uri: None,
            verification_uri_complete: None,
            started_at: t(0),
            expires_at: t(900),
            interval: Duration::seconds(5),
            next_poll: t(5),
            provider: provider.into(),
            client_id: client_id.into(),
            scopes: vec!["mail".into()],
            state: None,
            code_verifier: None,
            redirect_uri: None,
            url: None,
            code: None,
            binding_uid: Some("uid-a".into()),
            generation: Some(1),
            token_url: token_url.map(str::to_owned),
        }
    }

    #[test]
    fn a_pending_code_is_redeemed_only_where_it_was_issued_and_not_when_a_new_one_is_asked_for() {
        let p = device_pending("MailProvider/idp", "client", Some(TOKEN_URL));
        let redeem = |p: &PendingAuthorization, again: bool, key: &str, client: &str, url: Option<&str>| {
            redeemable(Some(p), again, key, client, url).is_some()
        };
        assert!(redeem(&p, false, "MailProvider/idp", "client", Some(TOKEN_URL)));
        assert!(!redeem(&p, true, "MailProvider/idp", "client", Some(TOKEN_URL)), "reauthorization asked for");
        assert!(!redeem(&p, false, "MailProvider/other", "client", Some(TOKEN_URL)), "another provider");
        assert!(!redeem(&p, false, "MailProvider/idp", "other", Some(TOKEN_URL)), "another client");
        assert!(!redeem(&p, false, "MailProvider/idp", "client", Some("https://evil.example/token")), "moved endpoint");
        let legacy = device_pending("MailProvider/idp", "client", None);
        assert!(redeem(&legacy, false, "MailProvider/idp", "client", Some(TOKEN_URL)), "stored before endpoints were");
        assert!(redeemable(None, false, "MailProvider/idp", "client", Some(TOKEN_URL)).is_none());
    }

    #[test]
    fn only_a_legacy_grant_holding_a_refresh_token_at_its_own_provider_gets_an_issuer() {
        let legacy = GrantState { issuer: None, ..grant(0, 3600) };
        assert!(needs_issuer(&legacy, "MailProvider/idp", "client", Some(TOKEN_URL)));
        assert!(!needs_issuer(&grant(0, 3600), "MailProvider/idp", "client", Some(TOKEN_URL)), "bound already");
        assert!(!needs_issuer(&legacy, "MailProvider/other", "client", Some(TOKEN_URL)), "another provider");
        assert!(!needs_issuer(&legacy, "MailProvider/idp", "other", Some(TOKEN_URL)), "another client");
        let no_refresh = GrantState { refresh_token: None, previous_refresh_token: None, ..legacy };
        assert!(!needs_issuer(&no_refresh, "MailProvider/idp", "client", Some(TOKEN_URL)), "nothing to bind");
    }

    #[test]
    fn a_status_recomputed_after_a_conflict_keeps_the_annotation_values_acted_on() {
        let b = import();
        let g = grant(0, 3600);
        let mut acted = next_status(t(10), &b, Some(&g), &Outcome::Refreshed);
        acted.last_refresh_request = Some("acted-on".into());
        let mut fresh = b.clone();
        fresh.metadata.annotations =
            Some([("mailoauth.io/refresh-requested".to_owned(), "newer".to_owned())].into_iter().collect());
        let again = status_over(t(10), &fresh, Some(&g), &Outcome::Refreshed, &acted);
        assert_eq!(again.last_refresh_request.as_deref(), Some("acted-on"), "the newer value is not acted on yet");
        assert_eq!(again.token, acted.token);
    }

    #[test]
    fn either_spelling_of_an_exchange_scope_is_no_scope_change() {
        let docs = vec!["https://outlook.office.com/IMAP.AccessAsUser.All".to_owned(), "offline_access".to_owned()];
        let sent = vec!["offline_access".to_owned(), "https://outlook.office365.com/IMAP.AccessAsUser.All".to_owned()];
        assert!(same_scopes(&docs, &sent));
        assert!(!same_scopes(&docs, &["offline_access".to_owned()]));
        assert!(!same_scopes(&["Mail".to_owned()], &["mail".to_owned()]), "other scopes keep their case");
    }
}
