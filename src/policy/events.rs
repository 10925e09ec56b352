//! The Events a binding's status change deserves, once: a Warning when the binding enters a
//! failure it did not have before, a Normal Event when it first becomes Ready and when it
//! recovers, and a Normal Event with the code and URL whenever a new authorization waits for a
//! person. Waiting states (`Pending`, `ProviderPending`, `AwaitingAuthorization`) are no failure
//! and get no Warning. Ready and Authorized often fail for the same reason: one Event per reason.

use std::collections::BTreeSet;

use crate::api::common::find_condition;
use crate::api::{ConditionStatus, MailboxBindingStatus};
use crate::policy::Reason;
use crate::policy::binding::conditions;

/// An Event to publish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Announcement {
    /// Warning (true) or Normal.
    pub warning: bool,
    /// The reason (a condition reason, `Ready` or `Recovered`).
    pub reason: String,
    /// What a person reads.
    pub note: String,
}

/// The failures a status shows: (reason, message) of Ready and Authorized when False, waiting
/// states left out.
fn failing(status: Option<&MailboxBindingStatus>) -> Vec<(String, String)> {
    let waiting = [Reason::Pending, Reason::ProviderPending, Reason::AwaitingAuthorization];
    status
        .into_iter()
        .flat_map(|s| s.conditions.iter())
        .filter(|c| c.type_ == conditions::READY || c.type_ == conditions::AUTHORIZED)
        .filter(|c| c.status == ConditionStatus::False)
        .filter(|c| !waiting.iter().any(|r| r.as_str() == c.reason))
        .map(|c| (c.reason.clone(), c.message.clone()))
        .collect()
}

/// The Events of the change from `before` to `after`, in the order to publish them.
pub fn transitions(before: Option<&MailboxBindingStatus>, after: &MailboxBindingStatus) -> Vec<Announcement> {
    let old = failing(before);
    let shown =
        |s: Option<&MailboxBindingStatus>| s.and_then(|s| s.authorization.as_ref()).map(|a| a.user_code.clone());
    // One Normal Event per new code or link a person has to use.
    let awaiting = after
        .conditions
        .iter()
        .find(|c| c.type_ == conditions::AUTHORIZED && c.reason == Reason::AwaitingAuthorization.as_str())
        .filter(|_| shown(before) != shown(Some(after)))
        .map(|c| Announcement {
            warning: false,
            reason: Reason::AwaitingAuthorization.as_str().to_owned(),
            note: c.message.clone(),
        });
    let mut events: Vec<Announcement> = failing(Some(after))
        .into_iter()
        .filter(|(reason, _)| !old.iter().any(|(r, _)| r == reason))
        .map(|(reason, note)| Announcement { warning: true, reason, note })
        .chain(awaiting)
        .collect();
    let ready = |s: Option<&MailboxBindingStatus>| {
        s.and_then(|s| find_condition(&s.conditions, conditions::READY)).filter(|c| c.is_true()).cloned()
    };
    if let (None, Some(now_ready)) = (ready(before), ready(Some(after))) {
        let recovered = !old.is_empty();
        events.push(if recovered {
            Announcement {
                warning: false,
                reason: "Recovered".into(),
                note: format!("recovered: {}", now_ready.message),
            }
        } else {
            Announcement { warning: false, reason: "Ready".into(), note: now_ready.message }
        });
    }
    let mut seen = BTreeSet::new();
    events.retain(|e| seen.insert((e.warning, e.reason.clone())));
    events
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{AuthorizationStatus, Condition};

    fn condition(type_: &str, status: ConditionStatus, reason: &str, message: &str) -> Condition {
        Condition {
            type_: type_.into(),
            status,
            reason: reason.into(),
            message: message.into(),
            last_transition_time: chrono::DateTime::<chrono::Utc>::UNIX_EPOCH,
            observed_generation: None,
        }
    }

    fn status(conditions: Vec<Condition>) -> MailboxBindingStatus {
        MailboxBindingStatus { conditions, ..MailboxBindingStatus::default() }
    }

    fn ready() -> MailboxBindingStatus {
        status(vec![condition(conditions::READY, ConditionStatus::True, "TokenValid", "token valid until 10:00")])
    }

    fn failed(reason: Reason) -> MailboxBindingStatus {
        status(vec![
            condition(conditions::READY, ConditionStatus::False, reason.as_str(), "it failed"),
            condition(conditions::AUTHORIZED, ConditionStatus::False, reason.as_str(), "it failed"),
        ])
    }

    fn awaiting(code: &str) -> MailboxBindingStatus {
        let mut s = status(vec![condition(
            conditions::AUTHORIZED,
            ConditionStatus::False,
            Reason::AwaitingAuthorization.as_str(),
            &format!("enter {code}"),
        )]);
        s.authorization = Some(AuthorizationStatus { user_code: Some(code.into()), ..AuthorizationStatus::default() });
        s
    }

    #[test]
    fn the_first_ready_is_announced_once_and_a_status_that_stays_ready_announces_nothing() {
        let events = transitions(None, &ready());
        assert_eq!(events.len(), 1);
        assert_eq!((events[0].warning, events[0].reason.as_str()), (false, "Ready"));
        assert_eq!(events[0].note, "token valid until 10:00");
        assert!(transitions(Some(&ready()), &ready()).is_empty());
    }

    #[test]
    fn a_new_failure_is_one_warning_for_both_conditions_and_the_same_failure_again_is_none() {
        let events = transitions(Some(&ready()), &failed(Reason::ReauthorizationRequired));
        assert_eq!(
            events,
            vec![Announcement { warning: true, reason: "ReauthorizationRequired".into(), note: "it failed".into() }]
        );
        assert!(
            transitions(Some(&failed(Reason::ReauthorizationRequired)), &failed(Reason::ReauthorizationRequired))
                .is_empty()
        );
        let other = transitions(Some(&failed(Reason::ReauthorizationRequired)), &failed(Reason::ProviderNotFound));
        assert_eq!(other.len(), 1, "another failure is new: {other:?}");
    }

    #[test]
    fn ready_after_a_failure_is_a_recovery() {
        let events = transitions(Some(&failed(Reason::ReauthorizationRequired)), &ready());
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].reason, "Recovered");
        assert_eq!(events[0].note, "recovered: token valid until 10:00");
    }

    #[test]
    fn each_new_code_is_announced_and_waiting_is_no_warning() {
        let first = transitions(None, &awaiting("ABCD"));
        assert_eq!(
            first,
            vec![Announcement { warning: false, reason: "AwaitingAuthorization".into(), note: "enter ABCD".into() }]
        );
        assert!(transitions(Some(&awaiting("ABCD")), &awaiting("ABCD")).is_empty(), "the same code: shown already");
        assert_eq!(transitions(Some(&awaiting("ABCD")), &awaiting("EFGH")).len(), 1, "a new code: shown again");
        let pending = failed(Reason::Pending);
        assert!(transitions(None, &pending).is_empty(), "Pending is no failure");
    }
}
