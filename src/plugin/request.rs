//! `refresh`, `reauthorize`, `verify` and `rotate-relay-password`: each sets its annotation to a
//! new value (a merge patch) and, by default, waits until the operator says it acted on that
//! value — the status field where it records the last value handled — then tells the outcome.

use kube::Api;
use serde_json::Value;

use super::view::{absolute, authorize_hint, failing, relative};
use super::wait::{Seen, Step, annotate, unique_value, until};
use super::{Connection, PluginError, Result, WaitFlags};
use crate::api::common::find_condition;
use crate::api::{
    Grant, MailboxBinding, Phase, REAUTHORIZE_REQUESTED_ANNOTATION, REFRESH_REQUESTED_ANNOTATION,
    ROTATE_RELAY_PASSWORD_ANNOTATION, VERIFY_REQUESTED_ANNOTATION,
};
use crate::policy::binding::conditions;

/// Flags of the request commands.
#[derive(Clone, Debug, clap::Args)]
pub struct RequestArgs {
    /// The binding.
    pub name: String,
    /// Waiting.
    #[command(flatten)]
    pub wait: WaitFlags,
}

/// What is asked of the operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// A new token now.
    Refresh,
    /// Drop the grant and start again.
    Reauthorize,
    /// A mailbox check now.
    Verify,
    /// A new relay password.
    RotateRelayPassword,
}

impl Request {
    /// The annotation that asks for it.
    pub fn annotation(self) -> &'static str {
        match self {
            Request::Refresh => REFRESH_REQUESTED_ANNOTATION,
            Request::Reauthorize => REAUTHORIZE_REQUESTED_ANNOTATION,
            Request::Verify => VERIFY_REQUESTED_ANNOTATION,
            Request::RotateRelayPassword => ROTATE_RELAY_PASSWORD_ANNOTATION,
        }
    }

    fn what(self) -> &'static str {
        match self {
            Request::Refresh => "a refresh",
            Request::Reauthorize => "a new authorization",
            Request::Verify => "a mailbox check",
            Request::RotateRelayPassword => "a new relay password",
        }
    }

    /// Whether the operator has acted on `value`: the status field where it records the last
    /// value handled (`lastRefreshRequest`, `lastReauthorizeRequest`,
    /// `verification.lastRequest`, `relay.lastRotateRequest`).
    pub fn acknowledged(self, raw: &Value, value: &str) -> bool {
        let status = raw.get("status").unwrap_or(&Value::Null);
        let at = |path: &[&str]| path.iter().try_fold(status, |v, k| v.get(k)).and_then(Value::as_str) == Some(value);
        match self {
            Request::Refresh => at(&["lastRefreshRequest"]),
            Request::Reauthorize => at(&["lastReauthorizeRequest"]),
            Request::Verify => at(&["verification", "lastRequest"]),
            Request::RotateRelayPassword => at(&["relay", "lastRotateRequest"]),
        }
    }
}

/// Why the request cannot be acted on as the binding is now, before anything is set.
pub fn refusal(request: Request, binding: &MailboxBinding) -> Option<String> {
    let name = binding.metadata.name.as_deref().unwrap_or_default();
    let status = binding.status.clone().unwrap_or_default();
    if binding.spec.suspend {
        return Some(format!("{name} is suspended (spec.suspend): the operator acts on nothing until it is resumed"));
    }
    if request == Request::RotateRelayPassword && !binding.spec.relay.as_ref().is_some_and(|r| r.enabled) {
        return Some(format!("{name} has no relay password: spec.relay.enabled is not true"));
    }
    if request != Request::Verify {
        return None;
    }
    if binding.spec.verify.as_ref().is_some_and(|v| !v.enabled) {
        return Some(format!("{name} has spec.verify.enabled: false: its mailbox is not checked"));
    }
    let ready = find_condition(&status.conditions, conditions::READY).is_some_and(|c| c.is_true());
    let valid = status.token.as_ref().is_some_and(|t| t.expires_at > chrono::Utc::now());
    if !(ready && valid) {
        let why = match failing(binding.metadata.namespace.as_deref().unwrap_or_default(), name, &status) {
            Some((reason, fix)) => format!(" ({reason}; fix: {fix})"),
            None => String::new(),
        };
        return Some(format!("{name} has no valid token to check the mailbox with yet{why}"));
    }
    None
}

/// What the operator made of the request, once acknowledged: the line to print, or the failure.
pub fn outcome(request: Request, binding: &MailboxBinding) -> Result<String> {
    let namespace = binding.metadata.namespace.as_deref().unwrap_or_default();
    let name = binding.metadata.name.as_deref().unwrap_or_default();
    let status = binding.status.clone().unwrap_or_default();
    let ready = find_condition(&status.conditions, conditions::READY).is_some_and(|c| c.is_true());
    let refresh_failing =
        find_condition(&status.conditions, conditions::REFRESH_FAILING).filter(|c| c.is_true()).map(|c| &c.reason);
    let expiry = status.token.as_ref().map(|t| {
        format!("; the token expires at {} ({})", absolute(t.expires_at), relative(t.expires_at, chrono::Utc::now()))
    });
    let failure = |what: &str| {
        let why = failing(namespace, name, &status)
            .map(|(reason, fix)| format!(": {reason}; fix: {fix}"))
            .unwrap_or_else(|| format!(": {}", status.phase.map(|p| format!("{p:?}")).unwrap_or_default()));
        PluginError::Failed(format!("{what} {namespace}/{name}{why}"))
    };
    match request {
        Request::Refresh if ready && refresh_failing.is_none() => {
            Ok(format!("{namespace}/{name} refreshed{}", expiry.unwrap_or_default()))
        }
        Request::Refresh => Err(failure("the operator could not refresh")),
        Request::Reauthorize if status.phase == Some(Phase::AwaitingAuthorization) => {
            Ok(format!("{namespace}/{name} awaits a person's authorization: {}", authorize_hint(namespace, name)))
        }
        Request::Reauthorize if ready => {
            Ok(format!("{namespace}/{name} authorized again{}", expiry.unwrap_or_default()))
        }
        Request::Reauthorize if matches!(status.phase, Some(Phase::Pending | Phase::Refreshing) | None) => {
            Ok(format!("{namespace}/{name}: the grant was dropped; the operator is obtaining a new one"))
        }
        Request::Reauthorize => Err(failure("the new authorization of")),
        Request::Verify => {
            let checks = status.verification.clone().unwrap_or_default();
            let mut lines: Vec<String> = binding
                .spec
                .protocols
                .iter()
                .filter_map(|p| {
                    let c = checks.get(*p)?;
                    let message = if c.message.is_empty() { String::new() } else { format!(": {}", c.message) };
                    Some(format!("  {}: {}{message}", p.as_str(), c.result))
                })
                .collect();
            let verified = find_condition(&status.conditions, conditions::MAILBOX_VERIFIED);
            let head = match verified {
                Some(c) => format!("{namespace}/{name} MailboxVerified={:?} ({})", c.status, c.reason),
                None => format!("{namespace}/{name} was checked"),
            };
            lines.insert(0, head);
            let text = lines.join("\n");
            if verified.is_some_and(|c| c.status == crate::api::ConditionStatus::False) {
                Err(PluginError::Failed(text))
            } else {
                Ok(text)
            }
        }
        Request::RotateRelayPassword => {
            let relay = status.relay.clone().unwrap_or_default();
            let issued = relay.password_issued_at.map(|t| format!(" (issued {})", absolute(t))).unwrap_or_default();
            let previous = relay
                .previous_password_valid_until
                .map(|t| {
                    format!("; the previous one works until {} ({})", absolute(t), relative(t, chrono::Utc::now()))
                })
                .unwrap_or_else(|| "; the previous one no longer works".to_owned());
            Ok(format!(
                "{namespace}/{name}: a new relay password is published in {}{issued}{previous}",
                status.secret_name.clone().unwrap_or_else(|| binding.spec.secret_name.clone())
            ))
        }
    }
}

/// Runs one request command.
pub async fn run(conn: &Connection, request: Request, args: &RequestArgs) -> Result<()> {
    let ns = conn.namespace.as_str();
    let api = Api::<MailboxBinding>::namespaced(conn.client.clone(), ns);
    let seen = super::wait::read(&api, ns, &args.name).await?;
    if let Some(why) = refusal(request, &seen.binding) {
        return Err(PluginError::Refused(why));
    }
    let value = unique_value();
    annotate(&api, &args.name, request.annotation(), &value).await?;
    eprintln!("asked for {} of {ns}/{} ({}={value})", request.what(), args.name, request.annotation());
    if !args.wait.wait {
        return Ok(());
    }
    let handled = until(&api, ns, &args.name, args.wait.timeout, |s: &Seen| {
        if request.acknowledged(&s.raw, &value) {
            return Ok(Step::Done(s.binding.clone()));
        }
        let phase =
            s.binding.status.as_ref().and_then(|s| s.phase).map(|p| format!(" (now {p:?})")).unwrap_or_default();
        Ok(Step::Waiting(format!("waiting for the operator to act on {}{phase}", request.what())))
    })
    .await
    .map_err(|e| match e {
        PluginError::Timeout { after, what } => {
            PluginError::Timeout { after, what: format!("{what}; is the operator running? (kubectl mailoauth check)") }
        }
        other => other,
    })?;
    println!("{}", outcome(request, &handled)?);
    if request == Request::Reauthorize && matches!(handled.spec.grant, Grant::RefreshToken { .. }) {
        eprintln!("(for the refreshToken grant, put the new refresh token into the import Secret first)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{
        Condition, ConditionStatus, MailboxBindingStatus, ProtocolCheck, TokenStatus, VerificationStatus,
    };

    fn binding(conditions: &[(&str, ConditionStatus, &str)], phase: Phase) -> MailboxBinding {
        let spec = serde_json::from_value(serde_json::json!({
            "providerRef": {"name": "idp"}, "mailbox": "a@example.com", "protocols": ["imap"],
            "grant": {"deviceCode": {}}, "secretName": "a-mail-token"
        }))
        .unwrap();
        let mut b = MailboxBinding::new("a", spec);
        b.metadata.namespace = Some("mail".into());
        let now = chrono::Utc::now();
        b.status = Some(MailboxBindingStatus {
            phase: Some(phase),
            conditions: conditions
                .iter()
                .map(|(t, s, r)| Condition {
                    type_: (*t).into(),
                    status: *s,
                    reason: (*r).into(),
                    message: String::new(),
                    last_transition_time: now,
                    observed_generation: None,
                })
                .collect(),
            token: Some(TokenStatus {
                issued_at: now,
                expires_at: now + chrono::Duration::hours(1),
                renew_at: now,
                scopes: vec![],
            }),
            ..Default::default()
        });
        b
    }

    #[test]
    fn each_request_is_acknowledged_where_the_operator_records_it() {
        let raw = serde_json::json!({"status": {
            "lastRefreshRequest": "r1", "lastReauthorizeRequest": "a1",
            "verification": {"lastRequest": "v1"}, "relay": {"lastRotateRequest": "p1"}
        }});
        assert!(Request::Refresh.acknowledged(&raw, "r1") && !Request::Refresh.acknowledged(&raw, "a1"));
        assert!(Request::Reauthorize.acknowledged(&raw, "a1") && !Request::Reauthorize.acknowledged(&raw, "r1"));
        assert!(Request::Verify.acknowledged(&raw, "v1") && !Request::Verify.acknowledged(&raw, "r1"));
        assert!(Request::RotateRelayPassword.acknowledged(&raw, "p1"));
        assert!(!Request::RotateRelayPassword.acknowledged(&raw, "p2"));
        assert!(!Request::Refresh.acknowledged(&serde_json::json!({}), "r1"));
    }

    #[test]
    fn a_check_needs_a_valid_token_and_a_suspended_binding_acts_on_nothing() {
        let ready = binding(&[("Ready", ConditionStatus::True, "TokenValid")], Phase::Ready);
        assert_eq!(refusal(Request::Verify, &ready), None);
        let waiting =
            binding(&[("Ready", ConditionStatus::False, "AwaitingAuthorization")], Phase::AwaitingAuthorization);
        let why = refusal(Request::Verify, &waiting).unwrap();
        assert!(why.contains("no valid token") && why.contains("kubectl mailoauth authorize -n mail a"), "{why}");
        assert_eq!(refusal(Request::Refresh, &waiting), None);
        let mut suspended = ready.clone();
        suspended.spec.suspend = true;
        assert!(refusal(Request::Refresh, &suspended).unwrap().contains("suspended"));
        let why = refusal(Request::RotateRelayPassword, &ready).unwrap();
        assert!(why.contains("spec.relay.enabled is not true"), "{why}");
        let mut relayed = ready.clone();
        relayed.spec.relay = Some(crate::api::RelaySpec { enabled: true, ..Default::default() });
        assert_eq!(refusal(Request::RotateRelayPassword, &relayed), None);
    }

    #[test]
    fn outcomes_say_what_happened_and_the_fix_when_it_failed() {
        let ready = binding(&[("Ready", ConditionStatus::True, "TokenValid")], Phase::Ready);
        assert!(outcome(Request::Refresh, &ready).unwrap().starts_with("mail/a refreshed; the token expires at "));
        let failed = binding(
            &[
                ("Ready", ConditionStatus::True, "TokenValid"),
                ("Authorized", ConditionStatus::False, "ConsentRequired"),
                ("RefreshFailing", ConditionStatus::True, "ConsentRequired"),
            ],
            Phase::Refreshing,
        );
        let e = outcome(Request::Refresh, &failed).unwrap_err().to_string();
        assert!(e.contains("ConsentRequired; fix: grant consent"), "{e}");
        let waiting =
            binding(&[("Ready", ConditionStatus::False, "AwaitingAuthorization")], Phase::AwaitingAuthorization);
        assert!(outcome(Request::Reauthorize, &waiting).unwrap().contains("kubectl mailoauth authorize -n mail a"));
        let mut checked = ready.clone();
        let status = checked.status.as_mut().unwrap();
        status.verification = Some(VerificationStatus {
            imap: Some(ProtocolCheck {
                result: "LoginRefused".into(),
                checked_at: chrono::Utc::now(),
                message: "refused; check the token".into(),
            }),
            ..Default::default()
        });
        status.conditions.push(Condition {
            type_: "MailboxVerified".into(),
            status: ConditionStatus::False,
            reason: "LoginRefused".into(),
            message: String::new(),
            last_transition_time: chrono::Utc::now(),
            observed_generation: None,
        });
        let e = outcome(Request::Verify, &checked).unwrap_err().to_string();
        assert!(
            e.contains("MailboxVerified=False (LoginRefused)\n  imap: LoginRefused: refused; check the token"),
            "{e}"
        );
    }
}
