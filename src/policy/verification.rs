//! Mailbox verification in the operator's life, the pure half: when a binding's mailbox is checked
//! next ([`next`]: at once after a new grant, a change of identity, scopes, protocols or servers,
//! or a new `mailoauth.io/verify-requested` value; otherwise every jittered `spec.verify.interval`),
//! how checks are paced per mail server ([`Pacer`]), and what a check's verdicts make of
//! `status.verification` and the `MailboxVerified` condition ([`merged`]), with one Event per
//! change of the results ([`announcement`]).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};

use chrono::{DateTime, Duration, Utc};

use super::binding::conditions;
use super::events::Announcement;
use super::schedule::seed;
use super::verify::{Verdict, VerifyReason};
use crate::api::common::find_condition;
use crate::api::{
    Condition, ConditionStatus, MailboxBinding, MailboxBindingStatus, Protocol, ProtocolCheck, ServerAddress,
    VERIFY_REQUESTED_ANNOTATION, VerificationStatus,
};

/// The interval when `spec.verify.interval` is not given.
pub const DEFAULT_INTERVAL: Duration = Duration::hours(24);
/// The shortest interval allowed.
pub const MIN_INTERVAL: Duration = Duration::hours(1);
/// The longest interval allowed.
pub const MAX_INTERVAL: Duration = Duration::hours(720);
/// After a check whose failure may pass by itself (`ServerUnreachable`), the next one comes this
/// much later (or after the interval, when shorter).
pub const RETRY_TRANSIENT: Duration = Duration::minutes(15);
/// The reason of `MailboxVerified` when `spec.verify` cannot be used.
pub const INVALID_SPEC: &str = "InvalidSpec";

/// Whether the binding's mailbox is checked (`spec.verify.enabled`, default true).
pub fn enabled(binding: &MailboxBinding) -> bool {
    binding.spec.verify.as_ref().is_none_or(|v| v.enabled)
}

/// The binding's check interval, or what is wrong with it and how to fix it.
pub fn interval(binding: &MailboxBinding) -> Result<Duration, String> {
    let Some(text) = binding.spec.verify.as_ref().and_then(|v| v.interval.as_deref()) else {
        return Ok(DEFAULT_INTERVAL);
    };
    let fix = "set spec.verify.interval to a duration from 1h to 720h, such as 24h";
    match super::duration::parse(text) {
        Ok(d) if (MIN_INTERVAL..=MAX_INTERVAL).contains(&d) => Ok(d),
        Ok(_) => Err(format!("spec.verify.interval {text:?} is outside 1h..720h; {fix}")),
        Err(e) => Err(format!("spec.verify.interval: {e}; {fix}")),
    }
}

/// A new `mailoauth.io/verify-requested` value not acted on yet.
pub fn requested(binding: &MailboxBinding) -> Option<&str> {
    let value = binding.metadata.annotations.as_ref()?.get(VERIFY_REQUESTED_ANNOTATION)?;
    let seen = binding.status.as_ref().and_then(|s| s.verification.as_ref()).and_then(|v| v.last_request.as_deref());
    (seen != Some(value.as_str())).then_some(value.as_str())
}

/// A digest of what a check is made for: the mailbox, the grant and its provider, the identity
/// the provider vouched for, the granted scopes, the last reauthorization, the protocols and
/// their servers. Not secret (none of these is); a change makes a new check due at once.
pub fn basis(binding: &MailboxBinding, servers: &BTreeMap<Protocol, ServerAddress>) -> String {
    let status = binding.status.as_ref();
    let token_scopes = status.and_then(|s| s.token.as_ref()).map(|t| t.scopes.clone()).unwrap_or_default();
    let text = serde_json::to_string(&(
        &binding.spec.mailbox,
        binding.spec.grant.name(),
        &binding.spec.provider_ref.name,
        status.and_then(|s| s.account.as_deref()),
        token_scopes,
        status.and_then(|s| s.last_reauthorize_request.as_deref()),
        &binding.spec.protocols,
        servers,
    ))
    .unwrap_or_default();
    format!("{:016x}", seed(&text))
}

/// Why a check is due.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Why {
    /// A protocol of the binding was never checked.
    First,
    /// What the last check was made for changed (a new grant, identity, scopes, servers).
    Changed,
    /// A new `mailoauth.io/verify-requested` value.
    Requested,
    /// The interval has passed since the last check.
    Interval,
    /// The last check could not reach a server.
    Retry,
}

/// What the verifier does next for a binding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Next {
    /// Nothing (no valid token yet, or nothing to say).
    Idle,
    /// Verification is off: the verifier's fields are removed.
    Clear,
    /// `spec.verify` cannot be used: `MailboxVerified` says so.
    Invalid(String),
    /// A check at `at`.
    Check {
        /// When.
        at: DateTime<Utc>,
        /// Why.
        why: Why,
    },
}

/// Up to a tenth of `wait` (whole seconds), the same for the same binding and last check.
pub fn jitter(binding: &MailboxBinding, last: DateTime<Utc>, wait: Duration) -> Duration {
    let tenth = (wait.num_seconds() / 10).max(1);
    let uid = binding.metadata.uid.as_deref().unwrap_or_default();
    let s = seed(&format!("{uid}/{}", last.timestamp()));
    let spread = s.checked_rem(u64::try_from(tenth).unwrap_or(1)).unwrap_or(0);
    Duration::seconds(i64::try_from(spread).unwrap_or(0))
}

/// The binding's periodic check time after a check at `last`: the binding's own moment in every
/// `wait` (a phase from its uid, stable across restarts), the first such moment at least half an
/// interval after `last`. So the checks of many bindings spread evenly over the interval however
/// they were first made (a first start over 10,000 bindings, paced per server, is over in hours),
/// and a binding is checked once an interval; only the second check of a binding may come between
/// half and one and a half intervals after its first.
pub fn slot(binding: &MailboxBinding, last: DateTime<Utc>, wait: Duration) -> DateTime<Utc> {
    let w = wait.num_seconds().max(1);
    let uid = binding.metadata.uid.as_deref().unwrap_or_default();
    let phase = seed(uid).checked_rem(u64::try_from(w).unwrap_or(1)).and_then(|p| i64::try_from(p).ok()).unwrap_or(0);
    let earliest = last.timestamp().saturating_add(w / 2);
    let from_phase = earliest.saturating_sub(phase);
    let whole = from_phase.checked_div_euclid(w).unwrap_or(0);
    let k = if from_phase.checked_rem_euclid(w) == Some(0) { whole } else { whole.saturating_add(1) };
    DateTime::from_timestamp(k.saturating_mul(w).saturating_add(phase), 0).unwrap_or(last)
}

/// What the verifier does next for `binding`, whose provider names `servers`.
pub fn next(binding: &MailboxBinding, servers: &BTreeMap<Protocol, ServerAddress>, now: DateTime<Utc>) -> Next {
    let default = MailboxBindingStatus::default();
    let status = binding.status.as_ref().unwrap_or(&default);
    let verified = find_condition(&status.conditions, conditions::MAILBOX_VERIFIED);
    if !enabled(binding) {
        return if status.verification.is_some() || verified.is_some() { Next::Clear } else { Next::Idle };
    }
    let wait = match interval(binding) {
        Ok(i) => i,
        Err(message) => {
            let said = verified.is_some_and(|c| c.reason == INVALID_SPEC && c.message == message);
            return if said { Next::Idle } else { Next::Invalid(message) };
        }
    };
    let ready = find_condition(&status.conditions, conditions::READY).is_some_and(Condition::is_true);
    let valid = status.token.as_ref().is_some_and(|t| t.expires_at > now);
    if !ready || !valid {
        return Next::Idle;
    }
    let check = |at, why| Next::Check { at, why };
    if requested(binding).is_some() {
        return check(now, Why::Requested);
    }
    let v = status.verification.clone().unwrap_or_default();
    let checks: Vec<Option<&ProtocolCheck>> = binding.spec.protocols.iter().map(|p| v.get(*p)).collect();
    let Some(last) = checks.iter().map(|c| c.map(|c| c.checked_at)).collect::<Option<Vec<_>>>() else {
        return check(now, Why::First);
    };
    if v.basis.as_deref() != Some(basis(binding, servers).as_str()) || verified.is_none_or(|c| c.reason == INVALID_SPEC)
    {
        return check(now, Why::Changed);
    }
    let Some(last) = last.into_iter().min() else { return check(now, Why::First) };
    let unreachable = checks.iter().flatten().any(|c| c.result == VerifyReason::ServerUnreachable.as_str());
    if !unreachable {
        return check(slot(binding, last, wait), Why::Interval);
    }
    let wait = std::cmp::min(RETRY_TRANSIENT, wait);
    let at = wait.checked_sub(&jitter(binding, last, wait)).and_then(|w| last.checked_add_signed(w)).unwrap_or(last);
    check(at, Why::Retry)
}

/// Paces checks per mail server: at most one check start per `spacing` at each server. A start
/// is recorded when the check actually starts ([`Queue::start`]), never reserved ahead: a check
/// that waited (for a free place, or for its namespace's running checks) cannot start back to
/// back with another at the same server. A check that talks to several servers waits until
/// every one of them is free, and takes a start at each.
#[derive(Clone, Debug)]
pub struct Pacer {
    spacing: Duration,
    next: HashMap<String, DateTime<Utc>>,
}

impl Pacer {
    /// A pacer allowing `per_second` check starts per server (at least one a day).
    pub fn new(per_second: f64) -> Self {
        let millis = if per_second.is_finite() && per_second > 0.0 { (1000.0 / per_second).ceil() } else { 1000.0 };
        #[allow(clippy::cast_possible_truncation)]
        let spacing = Duration::milliseconds((millis as i64).clamp(1, 86_400_000));
        Self { spacing, next: HashMap::new() }
    }

    /// The earliest time a check of `servers` may start (`None`: at once, nothing held).
    pub fn free_at(&self, servers: &[String]) -> Option<DateTime<Utc>> {
        servers.iter().filter_map(|s| self.next.get(s)).max().copied()
    }

    /// Records a check of `servers` starting at `now`: the next may start `spacing` later.
    pub fn take(&mut self, servers: &[String], now: DateTime<Utc>) {
        let after = now.checked_add_signed(self.spacing).unwrap_or(now);
        for s in servers {
            let at = self.next.entry(s.clone()).or_insert(after);
            *at = std::cmp::max(*at, after);
        }
    }

    /// Forgets servers whose next start is due (they are free again anyway).
    pub fn prune(&mut self, now: DateTime<Utc>) {
        self.next.retain(|_, at| *at > now);
    }

    /// Servers with a start still ahead.
    pub fn servers(&self) -> usize {
        self.next.len()
    }
}

/// A binding, by (namespace, name).
pub type Key = (String, String);

/// Checks waiting for their start, each binding once, and the pacing of their starts.
///
/// A check is queued with its due time and the servers it talks to. Once due it waits with the
/// other due checks of the same servers (a group, earliest first); a group whose servers the
/// [`Pacer`] holds waits as a whole, so that a flood of due checks at one server costs one
/// look per start, not one per check. At most `per_namespace` checks of a namespace run at
/// once, so that one tenant's slow or hostile mail servers hold at most that many of the
/// verifier's places and every other namespace keeps the rest; a due check of a namespace at its
/// limit waits apart, and one of them comes back each time one of that namespace's checks ends.
#[derive(Clone, Debug)]
pub struct Queue {
    /// Checks not yet due, earliest first.
    later: BinaryHeap<Reverse<(DateTime<Utc>, Key)>>,
    /// Due checks by the servers they talk to (sorted), earliest first.
    due: BTreeMap<Vec<String>, BTreeSet<(DateTime<Utc>, Key)>>,
    /// Every queued, waiting or running check, with its servers.
    queued: HashMap<Key, Vec<String>>,
    /// Due checks of namespaces at their limit, by namespace, earliest first.
    blocked: HashMap<String, BTreeSet<(DateTime<Utc>, Key)>>,
    running: HashMap<String, usize>,
    per_namespace: usize,
    pacer: Pacer,
}

impl Queue {
    /// An empty queue allowing `per_namespace` (at least one) running checks per namespace and
    /// starts per server as `pacer` allows.
    pub fn new(per_namespace: usize, pacer: Pacer) -> Self {
        Self {
            later: BinaryHeap::new(),
            due: BTreeMap::new(),
            queued: HashMap::new(),
            blocked: HashMap::new(),
            running: HashMap::new(),
            per_namespace: per_namespace.max(1),
            pacer,
        }
    }

    /// Whether the binding is queued or running.
    pub fn contains(&self, key: &Key) -> bool {
        self.queued.contains_key(key)
    }

    /// Queues a check due at `at` that talks to `servers` (none: not paced), unless the binding
    /// is queued or running already.
    pub fn push(&mut self, at: DateTime<Utc>, key: Key, mut servers: Vec<String>) -> bool {
        if self.queued.contains_key(&key) {
            return false;
        }
        servers.sort_unstable();
        servers.dedup();
        self.queued.insert(key.clone(), servers);
        self.later.push(Reverse((at, key)));
        true
    }

    /// When the earliest check that may start is due: its due time, or when the pacer frees its
    /// servers, whichever is later.
    pub fn next_at(&self) -> Option<DateTime<Utc>> {
        let later = self.later.peek().map(|Reverse((at, _))| *at);
        let due = self
            .due
            .iter()
            .filter_map(|(servers, checks)| {
                let first = checks.first()?.0;
                Some(self.pacer.free_at(servers).map_or(first, |free| std::cmp::max(first, free)))
            })
            .min();
        match (later, due) {
            (Some(a), Some(b)) => Some(std::cmp::min(a, b)),
            (a, b) => a.or(b),
        }
    }

    /// Takes up to `free` checks that may start at `now` (due, their servers free, their
    /// namespace within its limit), earliest first; records their starts with the pacer and
    /// counts them as running.
    pub fn start(&mut self, now: DateTime<Utc>, free: usize) -> Vec<Key> {
        while self.later.peek().is_some_and(|Reverse((at, _))| *at <= now) {
            let Some(Reverse((at, key))) = self.later.pop() else { break };
            let Some(servers) = self.queued.get(&key) else { continue };
            self.due.entry(servers.clone()).or_default().insert((at, key));
        }
        let mut started = Vec::new();
        while started.len() < free {
            // The group whose first check is earliest, among those whose servers are free.
            let pick = self
                .due
                .iter()
                .filter(|(servers, _)| self.pacer.free_at(servers).is_none_or(|free| free <= now))
                .filter_map(|(servers, checks)| checks.first().map(|first| (first, servers)))
                .min()
                .map(|(_, servers)| servers.clone());
            let Some(servers) = pick else { break };
            let Some(checks) = self.due.get_mut(&servers) else { break };
            let Some((at, key)) = checks.pop_first() else { break };
            if checks.is_empty() {
                self.due.remove(&servers);
            }
            let running = self.running.entry(key.0.clone()).or_default();
            if *running >= self.per_namespace {
                self.blocked.entry(key.0.clone()).or_default().insert((at, key));
                continue;
            }
            *running = running.saturating_add(1);
            self.pacer.take(&servers, now);
            started.push(key);
        }
        started
    }

    /// A check taken by [`Queue::start`] ended: the earliest of its namespace's waiting checks
    /// comes back.
    pub fn finish(&mut self, key: &Key) {
        self.queued.remove(key);
        if let Some(n) = self.running.get_mut(&key.0) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.running.remove(&key.0);
            }
        }
        if let Some(waiting) = self.blocked.get_mut(&key.0) {
            if let Some(first) = waiting.pop_first() {
                self.later.push(Reverse(first));
            }
            if waiting.is_empty() {
                self.blocked.remove(&key.0);
            }
        }
    }

    /// Forgets paced servers whose next start is due.
    pub fn prune(&mut self, now: DateTime<Utc>) {
        self.pacer.prune(now);
    }

    /// Checks queued, waiting apart or running.
    pub fn len(&self) -> usize {
        self.queued.len()
    }

    /// Whether nothing is queued or running.
    pub fn is_empty(&self) -> bool {
        self.queued.is_empty()
    }
}

/// The server a check of `protocol` talks to, as the pacer names it.
pub fn server_key(address: &ServerAddress) -> String {
    format!("{}:{}", address.host.to_ascii_lowercase(), address.port)
}

fn upper(p: Protocol) -> &'static str {
    match p {
        Protocol::Imap => "IMAP",
        Protocol::Smtp => "SMTP",
        Protocol::Pop3 => "POP3",
    }
}

/// The verifier's part of the status after a check: `status.verification` with the verdicts
/// (protocols the binding no longer names dropped) and the `MailboxVerified` condition (True
/// when every protocol logged in; else False with the first failing protocol's reason; the
/// transition time kept while its status stays).
pub fn merged(
    previous: &MailboxBindingStatus,
    generation: Option<i64>,
    verdicts: &[(Protocol, Verdict)],
    acted_on: Option<&str>,
    basis: String,
    now: DateTime<Utc>,
) -> (VerificationStatus, Condition) {
    let before = previous.verification.clone().unwrap_or_default();
    let mut verification = VerificationStatus {
        last_request: acted_on.map(str::to_owned).or(before.last_request),
        basis: Some(basis),
        ..VerificationStatus::default()
    };
    for (protocol, verdict) in verdicts {
        verification.set(
            *protocol,
            Some(ProtocolCheck {
                result: verdict.reason.as_str().to_owned(),
                checked_at: now,
                message: verdict.message.clone(),
            }),
        );
    }
    let with = |reason: VerifyReason| -> Vec<&(Protocol, Verdict)> {
        verdicts.iter().filter(|(_, v)| v.reason == reason).collect()
    };
    // A protocol the provider names no server for could not be checked: the mailbox is not
    // known to fail (Unknown), unless another protocol did fail.
    let failing: Vec<&(Protocol, Verdict)> = verdicts
        .iter()
        .filter(|(_, v)| v.reason != VerifyReason::Verified && v.reason != VerifyReason::NoServer)
        .chain(with(VerifyReason::NoServer))
        .collect();
    let each = |list: &[&(Protocol, Verdict)]| -> String {
        list.iter().map(|(p, v)| format!("{}: {}", upper(*p), v.message)).collect::<Vec<_>>().join("; ")
    };
    let names = |list: &[&(Protocol, Verdict)]| list.iter().map(|(p, _)| upper(*p)).collect::<Vec<_>>().join(", ");
    let verified = with(VerifyReason::Verified);
    let (status, reason, message) = match failing.first() {
        None if verdicts.is_empty() => {
            (ConditionStatus::Unknown, "NotChecked".to_owned(), "no protocol to check".to_owned())
        }
        None => (
            ConditionStatus::True,
            VerifyReason::Verified.as_str().to_owned(),
            format!("the mailbox logged in with its token over {}", names(&verified)),
        ),
        Some((_, first)) if first.reason == VerifyReason::NoServer => {
            let mut message = each(&failing);
            if !verified.is_empty() {
                message = format!("{}: logged in; {message}", names(&verified));
            }
            (ConditionStatus::Unknown, first.reason.as_str().to_owned(), message)
        }
        Some((_, first)) => (ConditionStatus::False, first.reason.as_str().to_owned(), each(&failing)),
    };
    (verification, condition(previous, status, reason, message, now, generation))
}

/// `MailboxVerified` when `spec.verify` cannot be used.
pub fn invalid(
    previous: &MailboxBindingStatus,
    generation: Option<i64>,
    message: String,
    now: DateTime<Utc>,
) -> Condition {
    condition(previous, ConditionStatus::Unknown, INVALID_SPEC.to_owned(), message, now, generation)
}

fn condition(
    previous: &MailboxBindingStatus,
    status: ConditionStatus,
    reason: String,
    message: String,
    now: DateTime<Utc>,
    generation: Option<i64>,
) -> Condition {
    let since = find_condition(&previous.conditions, conditions::MAILBOX_VERIFIED)
        .filter(|c| c.status == status)
        .map_or(now, |c| c.last_transition_time);
    Condition {
        type_: conditions::MAILBOX_VERIFIED.to_owned(),
        status,
        reason,
        message,
        last_transition_time: since,
        observed_generation: generation,
    }
}

/// The Event of a check: one when the results (per protocol) differ from the last check's, none
/// when a check found what the last one found.
pub fn announcement(
    before: Option<&VerificationStatus>,
    after: &VerificationStatus,
    verified: &Condition,
) -> Option<Announcement> {
    let results = |v: Option<&VerificationStatus>| -> Vec<Option<String>> {
        [Protocol::Imap, Protocol::Smtp, Protocol::Pop3]
            .into_iter()
            .map(|p| v.and_then(|v| v.get(p)).map(|c| c.result.clone()))
            .collect()
    };
    if results(before) == results(Some(after)) {
        return None;
    }
    let ok = verified.status == ConditionStatus::True;
    Some(Announcement {
        // Unknown (a protocol without a server) is no failure of the mailbox: no Warning.
        warning: verified.status == ConditionStatus::False,
        reason: if ok { "MailboxVerified".to_owned() } else { verified.reason.clone() },
        note: verified.message.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::binding::{Outcome, next_status, reconcile_owned};
    use crate::policy::grant_state::GrantState;
    use crate::testing::t;

    /// `ns/a` (uid `uid`) Ready with a token of `t(0)` for an hour, renewed at `t(2400)`, its
    /// checks set by `verify`.
    fn ready(uid: &str, verify: serde_json::Value) -> MailboxBinding {
        let verify = serde_json::from_value(verify).unwrap_or_else(|e| panic!("verify: {e}"));
        MailboxBinding::test().named("a").with_uid(uid).spec_with(|s| s.verify = Some(verify)).ready(t(3600), t(2400))
    }

    fn servers() -> BTreeMap<Protocol, ServerAddress> {
        let at = |port| ServerAddress { host: "mail.example.com".into(), port, tls: None };
        BTreeMap::from([(Protocol::Imap, at(993)), (Protocol::Smtp, at(587))])
    }

    fn verdict(reason: VerifyReason) -> Verdict {
        Verdict { reason, transient: reason == VerifyReason::ServerUnreachable, message: format!("{reason:?}") }
    }

    /// The binding after the verifier wrote what `verdicts` make at `now`.
    fn checked(mut b: MailboxBinding, verdicts: &[(Protocol, Verdict)], now: DateTime<Utc>) -> MailboxBinding {
        let status = b.status.clone().unwrap_or_default();
        let (v, c) = merged(&status, Some(1), verdicts, requested(&b), basis(&b, &servers()), now);
        let s = b.status.get_or_insert_with(Default::default);
        s.verification = Some(v);
        s.conditions.retain(|x| x.type_ != conditions::MAILBOX_VERIFIED);
        s.conditions.push(c);
        b
    }

    fn both_verified() -> Vec<(Protocol, Verdict)> {
        vec![(Protocol::Imap, verdict(VerifyReason::Verified)), (Protocol::Smtp, verdict(VerifyReason::Verified))]
    }

    #[test]
    fn a_ready_binding_is_checked_at_once_then_after_the_jittered_interval() {
        let mut b = ready("uid-a", serde_json::json!({}));
        b.status = Some(MailboxBindingStatus::default());
        assert_eq!(next(&b, &servers(), t(10)), Next::Idle, "no token, no check");
        let b = ready("uid-a", serde_json::json!({}));
        assert_eq!(next(&b, &servers(), t(10)), Next::Check { at: t(10), why: Why::First });
        let b = checked(b, &both_verified(), t(10));
        let Next::Check { at, why } = next(&b, &servers(), t(20)) else { panic!("a check is planned") };
        assert_eq!(why, Why::Interval);
        let day = DEFAULT_INTERVAL;
        assert!(at >= t(10) + day / 2 && at < t(10) + day + day / 2, "{at}");
        // Then once a day at the binding's own moment.
        let again = checked(b.clone(), &both_verified(), at);
        assert_eq!(next(&again, &servers(), t(20)), Next::Check { at: at + day, why: Why::Interval });
        let late = checked(b.clone(), &both_verified(), at + Duration::minutes(20));
        assert_eq!(next(&late, &servers(), t(20)), Next::Check { at: at + day, why: Why::Interval }, "paced late");
        // An expired token is not checked.
        let mut expired = b.clone();
        if let Some(tk) = expired.status.as_mut().and_then(|s| s.token.as_mut()) {
            tk.expires_at = t(15);
        }
        assert_eq!(next(&expired, &servers(), t(20)), Next::Idle);
        // A shorter interval, within the bounds.
        let mut hourly = b.clone();
        hourly.spec.verify = Some(crate::api::VerifySpec { enabled: true, interval: Some("1h".into()) });
        let Next::Check { at, .. } = next(&hourly, &servers(), t(20)) else { panic!("planned") };
        assert!(at >= t(1810) && at < t(5410), "{at}");
    }

    #[test]
    fn the_annotation_a_new_grant_identity_scopes_or_servers_make_a_check_due_at_once() {
        let b = checked(ready("uid-a", serde_json::json!({})), &both_verified(), t(10));
        let mut asked = b.clone();
        asked.metadata.annotations =
            Some([(VERIFY_REQUESTED_ANNOTATION.to_owned(), "1".to_owned())].into_iter().collect());
        assert_eq!(next(&asked, &servers(), t(20)), Next::Check { at: t(20), why: Why::Requested });
        // Acted on: the value is recorded and asks for nothing more.
        let acted = checked(asked, &both_verified(), t(20));
        assert_eq!(
            acted.status.as_ref().and_then(|s| s.verification.as_ref()?.last_request.clone()).as_deref(),
            Some("1")
        );
        assert!(matches!(next(&acted, &servers(), t(30)), Next::Check { why: Why::Interval, .. }));
        for change in 0..4 {
            let mut c = acted.clone();
            let mut other_servers = servers();
            let s = c.status.as_mut().unwrap_or_else(|| panic!("status"));
            match change {
                0 => s.account = Some("someone-else@example.com".into()),
                1 => s.token.as_mut().unwrap_or_else(|| panic!("token")).scopes.push("more".into()),
                2 => s.last_reauthorize_request = Some("again".into()),
                _ => {
                    other_servers
                        .insert(Protocol::Imap, ServerAddress { host: "new.example.com".into(), port: 993, tls: None });
                }
            }
            assert_eq!(
                next(&c, &other_servers, t(30)),
                Next::Check { at: t(30), why: Why::Changed },
                "change {change}"
            );
        }
        // A renewal with the same identity and scopes changes nothing.
        let mut renewed = acted.clone();
        if let Some(tk) = renewed.status.as_mut().and_then(|s| s.token.as_mut()) {
            tk.issued_at = t(2400);
            tk.expires_at = t(6000);
        }
        assert!(matches!(next(&renewed, &servers(), t(2500)), Next::Check { why: Why::Interval, .. }));
        // A protocol never checked is checked at once.
        let mut more = acted;
        more.spec.protocols.push(Protocol::Pop3);
        assert_eq!(next(&more, &servers(), t(30)), Next::Check { at: t(30), why: Why::First });
    }

    #[test]
    fn an_unreachable_server_is_tried_again_sooner_and_verification_off_clears_once() {
        let b = checked(
            ready("uid-a", serde_json::json!({})),
            &[
                (Protocol::Imap, verdict(VerifyReason::ServerUnreachable)),
                (Protocol::Smtp, verdict(VerifyReason::Verified)),
            ],
            t(10),
        );
        let Next::Check { at, why } = next(&b, &servers(), t(20)) else { panic!("planned") };
        assert_eq!(why, Why::Retry);
        assert!(at <= t(10) + RETRY_TRANSIENT && at > t(10) + RETRY_TRANSIENT - RETRY_TRANSIENT / 10, "{at}");
        let mut off = b.clone();
        off.spec.verify = Some(crate::api::VerifySpec { enabled: false, interval: None });
        assert_eq!(next(&off, &servers(), t(20)), Next::Clear);
        if let Some(s) = off.status.as_mut() {
            s.verification = None;
            s.conditions.retain(|c| c.type_ != conditions::MAILBOX_VERIFIED);
        }
        assert_eq!(next(&off, &servers(), t(20)), Next::Idle, "cleared: nothing more to write");
    }

    #[test]
    fn an_interval_out_of_bounds_is_said_once_and_a_fixed_one_is_checked_at_once() {
        for bad in ["30m", "721h", "0s", "1x"] {
            let b = ready("uid-a", serde_json::json!({"interval": bad}));
            let Next::Invalid(message) = next(&b, &servers(), t(10)) else { panic!("{bad} refused") };
            assert!(message.contains("1h to 720h"), "{message}");
            let mut said = b.clone();
            let prev = said.status.clone().unwrap_or_default();
            if let Some(s) = said.status.as_mut() {
                s.conditions.push(invalid(&prev, Some(1), message, t(10)));
            }
            assert_eq!(next(&said, &servers(), t(20)), Next::Idle, "{bad}: said once");
            said.spec.verify = Some(crate::api::VerifySpec { enabled: true, interval: Some("48h".into()) });
            assert!(matches!(next(&said, &servers(), t(30)), Next::Check { at, .. } if at == t(30)));
        }
        for good in ["1h", "720h", "90m", "24h"] {
            assert!(interval(&ready("u", serde_json::json!({"interval": good}))).is_ok(), "{good}");
        }
    }

    #[test]
    fn jitter_is_stable_per_binding_and_check_and_spreads_bindings_over_a_tenth_of_the_interval() {
        let wait = DEFAULT_INTERVAL;
        let b = ready("uid-a", serde_json::json!({}));
        assert_eq!(jitter(&b, t(0), wait), jitter(&b, t(0), wait));
        let mut buckets = [0_u32; 10];
        for i in 0..10_000 {
            let j = jitter(&ready(&format!("uid-{i}"), serde_json::json!({})), t(0), wait);
            assert!(j >= Duration::zero() && j < wait / 10, "{j}");
            let bucket = usize::try_from(j.num_seconds() * 10 / (wait / 10).num_seconds()).unwrap_or(0);
            buckets[bucket.min(9)] += 1;
        }
        assert!(buckets.iter().all(|n| (800..1200).contains(n)), "{buckets:?}");
    }

    #[test]
    fn the_pacer_starts_at_most_rate_checks_per_second_at_each_server() {
        let a = vec!["imap.example.com:993".to_owned()];
        let b = vec!["imap.other.example:993".to_owned()];
        let both: Vec<String> = a.iter().chain(&b).cloned().collect();
        let key = |n: usize| ("ns".to_owned(), format!("b{n:05}"));
        let mut q = Queue::new(1000, Pacer::new(2.0));
        for n in 0..1000 {
            assert!(q.push(t(0), key(n), a.clone()));
        }
        assert!(q.push(t(0), key(5000), b.clone()));
        let both_key = ("ns".to_owned(), "a-both".to_owned());
        assert!(q.push(t(0), both_key.clone(), both.clone()));
        assert!(q.push(t(0), key(5002), Vec::new()), "a write without a check: not paced");
        // Everything is due at once, earliest (then by name) first: the check of both servers
        // takes a start at each, so only the unpaced write starts beside it.
        assert_eq!(q.start(t(0), 100), vec![both_key, key(5002)]);
        assert_eq!(q.next_at(), Some(t(0) + Duration::milliseconds(500)));
        assert!(q.start(t(0) + Duration::milliseconds(499), 100).is_empty());
        // Half a second later one start at each server.
        assert_eq!(q.start(t(0) + Duration::milliseconds(500), 100), vec![key(0), key(5000)]);
        assert_eq!(q.start(t(1), 100), vec![key(1)]);
        assert_eq!(q.next_at(), Some(t(1) + Duration::milliseconds(500)));
        // A check that waited for a free place (none free for a minute) does not start back to
        // back with the one before it: starts stay `spacing` apart at each server.
        let mut starts = Vec::new();
        let mut now = t(60);
        while starts.len() < 20 {
            let got = q.start(now, 100);
            assert!(got.len() <= 1, "{got:?} at {now}");
            if !got.is_empty() {
                starts.push(now);
            }
            for k in got {
                q.finish(&k);
            }
            now += Duration::milliseconds(100);
        }
        for pair in starts.windows(2) {
            assert_eq!(pair[1] - pair[0], Duration::milliseconds(500));
        }
        q.prune(t(3600));
        assert_eq!(q.pacer.servers(), 0);
    }

    #[test]
    fn slow_checks_that_fall_behind_never_start_back_to_back_at_a_server() {
        // Two at a time in the namespace, 3 s to 9 s each: checks wait for their namespace's
        // places far past the pacing, and two can end in the same second; starts stay 1 s apart.
        let sim = simulate(300, 1, 4, Duration::seconds(3), 6);
        assert!(sim.starts.len() >= 300, "{}", sim.starts.len());
        for pair in sim.starts.windows(2) {
            assert!(pair[1].0 - pair[0].0 >= Duration::seconds(1), "{:?}", pair);
        }
    }

    #[test]
    fn a_flood_at_one_server_costs_one_look_per_start() {
        // 50,000 due checks at one server and one at another: the other starts at once, and
        // each start looks at two groups, not at the 50,000 waiting.
        let mut q = Queue::new(100_000, Pacer::new(1.0));
        let hot = vec!["imap.hot.example:993".to_owned()];
        for n in 0..50_000 {
            q.push(t(0), ("ns".to_owned(), format!("b{n}")), hot.clone());
        }
        let started = std::time::Instant::now();
        assert_eq!(q.start(t(0), 4).len(), 1);
        q.push(t(0), ("other".to_owned(), "x".to_owned()), vec!["imap.cold.example:993".to_owned()]);
        for s in 1..=1000 {
            let got = q.start(t(0) + Duration::milliseconds(s * 10), 4);
            if s == 1 {
                assert_eq!(got, vec![("other".to_owned(), "x".to_owned())]);
            } else {
                assert_eq!(got.len(), usize::from(s % 100 == 0), "at {s}");
            }
        }
        assert_eq!(q.due.len(), 1);
        assert!(started.elapsed() < std::time::Duration::from_secs(5), "{:?}", started.elapsed());
    }

    /// What [`simulate`] saw: each check's start and binding, in order.
    struct Simulated {
        starts: Vec<(DateTime<Utc>, usize)>,
    }

    /// The verifier's scheduling over `n` bindings of one namespace at one IMAP and one SMTP
    /// server, without I/O: a sweep every 30 s queues the due ones (paced per server at 1 check
    /// start a second), `concurrency` checks run at once, each takes `check` and finds the
    /// mailbox verified; the verifier starts at `t(0)` with every binding unchecked. A pure
    /// simulation of `next` and `Queue` (with its `Pacer`) as `controller::verify` drives them.
    fn simulate(n: usize, days: i64, concurrency: usize, check: Duration, spread: i64) -> Simulated {
        let far = t(400 * 86_400);
        let mut bindings: Vec<MailboxBinding> = (0..n)
            .map(|i| {
                let mut b = ready(&format!("uid-{i}"), serde_json::json!({}));
                b.metadata.name = Some(format!("b{i}"));
                if let Some(token) = b.status.as_mut().and_then(|s| s.token.as_mut()) {
                    token.expires_at = far;
                }
                b
            })
            .collect();
        let server_keys: Vec<String> = servers().values().map(server_key).collect();
        let due = |b: &MailboxBinding, now| match next(b, &servers(), now) {
            Next::Check { at, .. } => at,
            other => panic!("{other:?}"),
        };
        let mut next_due: Vec<DateTime<Utc>> = bindings.iter().map(|b| due(b, t(0))).collect();
        let mut queue = Queue::new(concurrency / 2, Pacer::new(1.0));
        let mut queued = vec![false; n];
        let mut running: Vec<(DateTime<Utc>, usize)> = Vec::new();
        let mut starts = Vec::new();
        let end = t(days * 86_400);
        let mut now = t(0);
        while now < end {
            // Finished checks write their results; the binding's next check follows from them.
            let (done, still): (Vec<_>, Vec<_>) = running.into_iter().partition(|(until, _)| *until <= now);
            running = still;
            for (_, i) in done {
                let b = checked(bindings[i].clone(), &both_verified(), now);
                next_due[i] = due(&b, now);
                bindings[i] = b;
                queued[i] = false;
                queue.finish(&("ns".to_owned(), format!("b{i}")));
            }
            if (now - t(0)).num_seconds() % 30 == 0 {
                queue.prune(now);
                for i in 0..n {
                    if !queued[i] && next_due[i] <= now {
                        queued[i] = true;
                        queue.push(now, ("ns".to_owned(), format!("b{i}")), server_keys.clone());
                    }
                }
            }
            for (_, name) in queue.start(now, concurrency.saturating_sub(running.len())) {
                let i: usize = name.trim_start_matches('b').parse().unwrap_or_else(|e| panic!("{name}: {e}"));
                starts.push((now, i));
                // Checks of differing lengths (`check` plus up to `spread` seconds).
                let extra = i64::try_from(i.wrapping_mul(5)).unwrap_or(0) % (spread + 1);
                running.push((now + check + Duration::seconds(extra), i));
            }
            now += Duration::seconds(1);
        }
        Simulated { starts }
    }

    #[test]
    fn ten_thousand_bindings_spread_over_the_interval_and_never_exceed_the_per_server_rate() {
        let n = 10_000;
        let sim = simulate(n, 4, 4, Duration::milliseconds(1500), 0);
        // Never more than one start a second at a server (every check talks to both).
        for pair in sim.starts.windows(2) {
            assert!(pair[1].0 - pair[0].0 >= Duration::seconds(1), "{:?}", pair);
        }
        // The first round: everyone once, at the rate: about 10,000 s.
        let mut seen = vec![0_u32; n];
        let mut last: Vec<Option<DateTime<Utc>>> = vec![None; n];
        let mut gaps = Vec::new();
        for (at, i) in &sim.starts {
            seen[*i] += 1;
            if let Some(before) = last[*i] {
                gaps.push((seen[*i], *at - before));
            }
            last[*i] = Some(*at);
        }
        assert!(seen.iter().all(|c| *c >= 4), "every binding checked each day: {:?}", seen.iter().min());
        let first_round = sim.starts.get(n - 1).map(|(at, _)| *at - t(0)).unwrap_or_default();
        assert!(first_round <= Duration::seconds(10_100), "{first_round}");
        // The second check comes at the binding's own moment, half to one and a half intervals
        // after the first; every later one an interval after the one before (plus pacing).
        let span = |k: u32| {
            let g: Vec<Duration> = gaps.iter().filter(|(c, _)| *c == k).map(|(_, g)| *g).collect();
            (g.iter().min().copied().unwrap_or_default(), g.iter().max().copied().unwrap_or_default())
        };
        let (second_min, second_max) = span(2);
        assert!(
            second_min >= Duration::hours(12) && second_max <= Duration::hours(36) + Duration::minutes(5),
            "{second_min} {second_max}"
        );
        for k in 3..=4 {
            let (shortest, longest) = span(k);
            assert!(shortest >= Duration::hours(24) - Duration::minutes(5), "round {k}: {shortest}");
            assert!(longest <= Duration::hours(24) + Duration::minutes(5), "round {k}: {longest}");
        }
        // From the second round on the checks are spread over the whole day, evenly.
        let mut rounds: Vec<Vec<DateTime<Utc>>> = vec![Vec::new(); 5];
        let mut count = vec![0_usize; n];
        for (at, i) in &sim.starts {
            if let Some(round) = rounds.get_mut(count[*i]) {
                round.push(*at);
            }
            count[*i] += 1;
        }
        let window = |k: usize| {
            let r = &rounds[k];
            r.iter().max().copied().unwrap_or_default() - r.iter().min().copied().unwrap_or_default()
        };
        let mut hours = [0_u32; 24];
        for (at, _) in sim.starts.iter().filter(|(at, _)| *at >= t(3 * 86_400)) {
            hours[usize::try_from((*at - t(3 * 86_400)).num_hours()).unwrap_or(0).min(23)] += 1;
        }
        let (quietest, busiest) = (hours.iter().min().copied().unwrap_or(0), hours.iter().max().copied().unwrap_or(0));
        println!(
            "10,000 bindings, 1 check start/s per server: round 1 over {} s, round 2 over {} min, round 4 over {} \
             min; day 4 per hour {hours:?} ({quietest} to {busiest}); second gaps {second_min} to {second_max}",
            first_round.num_seconds(),
            window(1).num_minutes(),
            window(3).num_minutes()
        );
        assert_eq!(rounds[3].len(), n);
        assert!(window(1) >= Duration::hours(23) && window(3) >= Duration::hours(23), "{} {}", window(1), window(3));
        assert!(quietest >= 330 && busiest <= 500, "about 10,000 / 24 an hour: {hours:?}");
    }

    #[test]
    fn one_namespace_holds_at_most_its_share_of_the_running_checks() {
        let key = |ns: &str, n: usize| (ns.to_owned(), format!("b{n}"));
        let mut q = Queue::new(2, Pacer::new(1.0));
        for n in 0..10 {
            assert!(q.push(t(0), key("hostile", n), Vec::new()));
        }
        assert!(!q.push(t(0), key("hostile", 0), Vec::new()), "each binding once");
        assert!(q.push(t(1), key("other", 0), Vec::new()));
        assert!(q.push(t(100), key("later", 0), Vec::new()));
        let first = q.start(t(5), 4);
        assert_eq!(first, vec![key("hostile", 0), key("hostile", 1), key("other", 0)], "2 of 4 for one namespace");
        assert_eq!(q.next_at(), Some(t(100)), "the blocked ones wait apart");
        assert!(q.start(t(5), 1).is_empty());
        q.finish(&key("hostile", 0));
        assert!(!q.contains(&key("hostile", 0)) && q.contains(&key("hostile", 2)));
        assert_eq!(q.start(t(6), 4), vec![key("hostile", 2)]);
        q.finish(&key("other", 0));
        assert_eq!(q.start(t(200), 4), vec![key("later", 0)]);
        assert_eq!(q.len(), 10, "7 hostile waiting, 2 running, 1 later");
    }

    #[test]
    fn merged_results_make_the_condition_and_an_event_only_when_they_change() {
        let b = ready("uid-a", serde_json::json!({}));
        let ok = checked(b.clone(), &both_verified(), t(10));
        let s = ok.status.clone().unwrap_or_default();
        let c = find_condition(&s.conditions, conditions::MAILBOX_VERIFIED).cloned().unwrap_or_else(|| panic!("set"));
        assert_eq!((c.status, c.reason.as_str()), (ConditionStatus::True, "Verified"));
        let first = announcement(None, s.verification.as_ref().unwrap_or_else(|| panic!("v")), &c);
        assert!(first.is_some_and(|a| !a.warning && a.reason == "MailboxVerified"));
        // The same results again: no Event, the transition time kept.
        let (v2, c2) = merged(&s, Some(1), &both_verified(), None, basis(&ok, &servers()), t(100));
        assert_eq!(c2.last_transition_time, t(10));
        assert!(announcement(s.verification.as_ref(), &v2, &c2).is_none());
        assert_eq!(v2.imap.as_ref().map(|c| c.checked_at), Some(t(100)));
        // SMTP fails: False with its reason, one Warning.
        let failing = [
            (Protocol::Imap, verdict(VerifyReason::Verified)),
            (Protocol::Smtp, verdict(VerifyReason::SmtpAuthDisabled)),
        ];
        let (v3, c3) = merged(&s, Some(1), &failing, None, basis(&ok, &servers()), t(200));
        assert_eq!(
            (c3.status, c3.reason.as_str(), c3.last_transition_time),
            (ConditionStatus::False, "SmtpAuthDisabled", t(200))
        );
        assert!(c3.message.starts_with("SMTP: "), "{}", c3.message);
        let a = announcement(s.verification.as_ref(), &v3, &c3).unwrap_or_else(|| panic!("an Event"));
        assert!(a.warning && a.reason == "SmtpAuthDisabled");
        // No server for SMTP: Unknown and no Warning; a real failure elsewhere wins.
        let no_smtp =
            [(Protocol::Imap, verdict(VerifyReason::Verified)), (Protocol::Smtp, verdict(VerifyReason::NoServer))];
        let (v5, c5) = merged(&s, Some(1), &no_smtp, None, String::new(), t(250));
        assert_eq!((c5.status, c5.reason.as_str()), (ConditionStatus::Unknown, "NoServer"));
        assert!(c5.message.starts_with("IMAP: logged in; SMTP: "), "{}", c5.message);
        assert!(announcement(s.verification.as_ref(), &v5, &c5).is_some_and(|a| !a.warning));
        let both_bad =
            [(Protocol::Imap, verdict(VerifyReason::TlsFailed)), (Protocol::Smtp, verdict(VerifyReason::NoServer))];
        let (_, c6) = merged(&s, Some(1), &both_bad, None, String::new(), t(250));
        assert_eq!((c6.status, c6.reason.as_str()), (ConditionStatus::False, "TLSFailed"));
        // A protocol no longer named is dropped.
        let (v4, _) =
            merged(&s, Some(1), &[(Protocol::Imap, verdict(VerifyReason::Verified))], None, String::new(), t(300));
        assert!(v4.smtp.is_none() && v4.imap.is_some());
    }

    #[test]
    fn the_reconcile_carries_the_verifiers_fields_writes_none_of_them_and_sees_no_change() {
        let b = checked(ready("uid-a", serde_json::json!({})), &both_verified(), t(10));
        let grant = GrantState {
            refresh_token: None,
            previous_refresh_token: None,
            access_token: "at".to_owned().into(),
            token_type: "Bearer".into(),
            issued_at: t(0),
            expires_at: t(3600),
            scopes: vec!["mail".into()],
            requested_scopes: vec!["mail".into()],
            provider: "MailProvider/idp".into(),
            client_id: "client".into(),
            imported_from: None,
            mailbox: Some("a@example.com".into()),
            account: Some("a@example.com".into()),
            issuer: None,
            relay: None,
        };
        // The reconcile's own status, as it would have written it, then the verifier's on top.
        let mut settled = b.clone();
        let first = next_status(t(20), &settled, Some(&grant), &Outcome::Refreshed);
        settled.status = Some(first);
        let again = next_status(t(30), &settled, Some(&grant), &Outcome::Unchanged);
        assert_eq!(settled.status.as_ref(), Some(&again), "status unchanged: no write");
        assert_eq!(again.verification, b.status.as_ref().and_then(|s| s.verification.clone()));
        assert!(find_condition(&again.conditions, conditions::MAILBOX_VERIFIED).is_some());
        let written = reconcile_owned(&again);
        assert!(written.verification.is_none());
        assert!(find_condition(&written.conditions, conditions::MAILBOX_VERIFIED).is_none());
        assert!(find_condition(&written.conditions, conditions::READY).is_some());
        // A failing check leaves Ready alone, and Ready is what the at-rest judgement reads.
        let failed = checked(settled, &[(Protocol::Imap, verdict(VerifyReason::LoginRefused))], t(40));
        let s = failed.status.unwrap_or_default();
        assert!(find_condition(&s.conditions, conditions::READY).is_some_and(Condition::is_true));
    }
}
