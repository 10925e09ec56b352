//! What the plugin shows, computed without I/O: one row per binding (its reason and the fix
//! for it), relative times as kubectl writes them, and tables aligned in columns.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, SecondsFormat, Utc};
use serde::Serialize;

use crate::api::common::find_condition;
use crate::api::{Condition, ConditionStatus, MailboxBinding, MailboxBindingStatus};
use crate::policy::binding::conditions;
use crate::policy::reason::Reason;

/// A duration as kubectl's `AGE` column writes it: `45s`, `3m20s`, `42m`, `5h12m`, `30h`,
/// `3d4h`, `12d`, `2y30d` (negative durations as their absolute value).
pub fn human(d: Duration) -> String {
    let s = d.num_seconds().saturating_abs();
    let (m, h, days) = (s / 60, s / 3600, s / 86_400);
    let pair = |a: i64, unit_a: &str, b: i64, unit_b: &str| {
        if b == 0 { format!("{a}{unit_a}") } else { format!("{a}{unit_a}{b}{unit_b}") }
    };
    match s {
        _ if s < 120 => format!("{s}s"),
        _ if m < 10 => pair(m, "m", s % 60, "s"),
        _ if h < 3 => format!("{m}m"),
        _ if h < 8 => pair(h, "h", m % 60, "m"),
        _ if h < 48 => format!("{h}h"),
        _ if days < 8 => pair(days, "d", h % 24, "h"),
        _ if days < 730 => format!("{days}d"),
        _ => pair(days / 365, "y", days % 365, "d"),
    }
}

/// `in 42m` for a time ahead of `now`, `3m ago` for one behind it.
pub fn relative(at: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let d = at.signed_duration_since(now);
    if d >= Duration::zero() { format!("in {}", human(d)) } else { format!("{} ago", human(d)) }
}

/// A time as RFC 3339 in UTC, to the second.
pub fn absolute(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// The command that completes an interactive grant, shown as the fix of `AwaitingAuthorization`.
pub fn authorize_hint(namespace: &str, name: &str) -> String {
    format!("kubectl mailoauth authorize -n {namespace} {name}")
}

/// One binding as `status` shows it; the JSON and YAML outputs are this, field for field.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Row {
    /// The binding's namespace.
    pub namespace: String,
    /// The binding's name.
    pub name: String,
    /// `spec.mailbox`.
    pub mailbox: String,
    /// `spec.providerRef.name` (`ClusterMailProvider/<name>` for a cluster provider).
    pub provider: String,
    /// The grant's name (`deviceCode`, `refreshToken`, ...).
    pub grant: String,
    /// `status.phase`, when written.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// `Ready`'s status (`True`, `False`, `Unknown`); `Unknown` before the operator wrote one.
    pub ready: String,
    /// `Ready`'s reason; empty before the operator wrote one.
    pub reason: String,
    /// `Ready`'s message.
    pub message: String,
    /// When the published token expires.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
    /// The same, relative to now (`in 42m`, `3m ago`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_in: Option<String>,
    /// The last check's result per protocol of `spec.protocols` that was checked.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub verification: BTreeMap<String, String>,
    /// `MailboxVerified`'s reason, when checked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verified: Option<String>,
    /// The identity the provider vouched for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    /// The published Secret.
    pub secret: String,
    /// The failing reason, when something fails or waits for a person.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failing: Option<String>,
    /// What to do about it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

fn condition<'a>(status: &'a MailboxBindingStatus, type_: &str) -> Option<&'a Condition> {
    find_condition(&status.conditions, type_)
}

/// The fix the operator wrote at the end of a message (`...; fix: <fix>`), for a reason this
/// version does not know.
fn fix_in_message(message: &str) -> Option<String> {
    message.rfind("fix: ").and_then(|i| message.get(i.saturating_add(5)..)).map(str::to_owned)
}

/// The reason that needs a person and what to do, from `Authorized` (False), `Ready` (not
/// True), `RefreshFailing` (True) in that order, then `MailboxVerified` (False) of a Ready
/// binding. The fix is the operator's own ([`Reason::fix`]); for a reason this version does not
/// know, the one at the end of the condition's message; for a verification result, the
/// condition's message, which says what to do per protocol.
pub fn failing(namespace: &str, name: &str, status: &MailboxBindingStatus) -> Option<(String, String)> {
    let awaiting = Reason::AwaitingAuthorization.as_str();
    let candidates = [
        condition(status, conditions::AUTHORIZED).filter(|c| c.status == ConditionStatus::False),
        condition(status, conditions::READY).filter(|c| c.status != ConditionStatus::True),
        condition(status, conditions::REFRESH_FAILING).filter(|c| c.status == ConditionStatus::True),
    ];
    for c in candidates.into_iter().flatten() {
        if c.reason == awaiting {
            return Some((c.reason.clone(), authorize_hint(namespace, name)));
        }
        let fix = match Reason::parse(&c.reason) {
            Some(r) => Some(r.fix().to_owned()).filter(|f| !f.is_empty()),
            None => fix_in_message(&c.message),
        };
        if let Some(fix) = fix {
            return Some((c.reason.clone(), fix));
        }
    }
    let ready = condition(status, conditions::READY).is_some_and(Condition::is_true);
    condition(status, conditions::MAILBOX_VERIFIED)
        .filter(|c| ready && c.status == ConditionStatus::False)
        .map(|c| (c.reason.clone(), c.message.clone()))
}

/// The row of `binding` at `now`.
pub fn row(binding: &MailboxBinding, now: DateTime<Utc>) -> Row {
    let namespace = binding.metadata.namespace.clone().unwrap_or_default();
    let name = binding.metadata.name.clone().unwrap_or_default();
    let status = binding.status.clone().unwrap_or_default();
    let ready = condition(&status, conditions::READY);
    let expires_at = status.token.as_ref().map(|t| t.expires_at);
    let verification = binding
        .spec
        .protocols
        .iter()
        .filter_map(|p| {
            let check = status.verification.as_ref()?.get(*p)?;
            Some((p.as_str().to_owned(), check.result.clone()))
        })
        .collect();
    let provider = match binding.spec.provider_ref.kind {
        crate::api::ProviderKind::MailProvider => binding.spec.provider_ref.name.clone(),
        crate::api::ProviderKind::ClusterMailProvider => {
            format!("ClusterMailProvider/{}", binding.spec.provider_ref.name)
        }
    };
    let (failing_reason, fix) = failing(&namespace, &name, &status).unzip();
    Row {
        mailbox: binding.spec.mailbox.clone(),
        provider,
        grant: binding.spec.grant.name().to_owned(),
        phase: status.phase.map(|p| format!("{p:?}")),
        ready: ready.map_or("Unknown", |c| status_word(c.status)).to_owned(),
        reason: ready.map(|c| c.reason.clone()).unwrap_or_default(),
        message: ready.map(|c| c.message.clone()).unwrap_or_default(),
        expires_at,
        expires_in: expires_at.map(|at| relative(at, now)),
        verification,
        verified: condition(&status, conditions::MAILBOX_VERIFIED).map(|c| c.reason.clone()),
        account: status.account.clone(),
        secret: status.secret_name.clone().unwrap_or_else(|| binding.spec.secret_name.clone()),
        failing: failing_reason,
        fix,
        namespace,
        name,
    }
}

fn status_word(s: ConditionStatus) -> &'static str {
    match s {
        ConditionStatus::True => "True",
        ConditionStatus::False => "False",
        ConditionStatus::Unknown => "Unknown",
    }
}

/// Which columns a table has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Columns {
    /// A `NAMESPACE` column first (`-A`).
    pub namespace: bool,
    /// The wide columns (`-o wide`): the account, the Secret, the message.
    pub wide: bool,
}

/// The table of `rows`, as kubectl prints one: a header, columns three spaces apart, `-` for
/// nothing, the fix last (it is the longest).
pub fn table(rows: &[Row], columns: Columns) -> String {
    let mut header =
        vec!["NAMESPACE", "NAME", "MAILBOX", "PROVIDER", "GRANT", "READY", "REASON", "EXPIRES", "EXPIRES AT"];
    if columns.wide {
        header.extend(["ACCOUNT", "SECRET"]);
    }
    header.push("VERIFIED");
    if columns.wide {
        header.push("MESSAGE");
    }
    header.push("FIX");
    let dash = |s: &str| if s.is_empty() { "-".to_owned() } else { s.to_owned() };
    let mut lines: Vec<Vec<String>> = vec![header.iter().map(|s| (*s).to_owned()).collect()];
    for r in rows {
        let verified = r.verification.iter().map(|(p, v)| format!("{p}={v}")).collect::<Vec<_>>().join(",");
        let mut line = vec![
            r.namespace.clone(),
            r.name.clone(),
            r.mailbox.clone(),
            r.provider.clone(),
            r.grant.clone(),
            r.ready.clone(),
            dash(&r.reason),
            dash(r.expires_in.as_deref().unwrap_or_default()),
            dash(&r.expires_at.map(absolute).unwrap_or_default()),
        ];
        if columns.wide {
            line.push(dash(r.account.as_deref().unwrap_or_default()));
            line.push(r.secret.clone());
        }
        line.push(dash(&verified));
        if columns.wide {
            line.push(dash(&r.message));
        }
        line.push(dash(r.fix.as_deref().unwrap_or_default()));
        lines.push(line);
    }
    if !columns.namespace {
        for line in &mut lines {
            line.remove(0);
        }
    }
    aligned(&lines)
}

/// Rows of cells as aligned columns, three spaces apart, the last column not padded.
pub fn aligned(lines: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = Vec::new();
    for line in lines {
        for (i, cell) in line.iter().enumerate() {
            let w = cell.chars().count();
            match widths.get_mut(i) {
                Some(width) => *width = (*width).max(w),
                None => widths.push(w),
            }
        }
    }
    let mut out = String::new();
    for line in lines {
        let last = line.len().saturating_sub(1);
        let mut text = String::new();
        for (i, cell) in line.iter().enumerate() {
            text.push_str(cell);
            if i < last {
                let pad = widths.get(i).copied().unwrap_or(0).saturating_sub(cell.chars().count());
                text.push_str(&" ".repeat(pad.saturating_add(3)));
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{MailboxBindingSpec, ProtocolCheck, TokenStatus, VerificationStatus};

    fn t(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + secs, 0).unwrap()
    }

    fn cond(type_: &str, status: ConditionStatus, reason: &str, message: &str) -> Condition {
        Condition {
            type_: type_.into(),
            status,
            reason: reason.into(),
            message: message.into(),
            last_transition_time: t(0),
            observed_generation: Some(1),
        }
    }

    fn binding(conditions: Vec<Condition>) -> MailboxBinding {
        let spec: MailboxBindingSpec = serde_json::from_value(serde_json::json!({
            "providerRef": {"name": "idp"}, "mailbox": "scanner@example.com", "protocols": ["imap", "smtp"],
            "grant": {"deviceCode": {}}, "secretName": "scanner-mail-token"
        }))
        .unwrap();
        let mut b = MailboxBinding::new("scanner", spec);
        b.metadata.namespace = Some("mail".into());
        b.status = Some(MailboxBindingStatus { conditions, ..Default::default() });
        b
    }

    #[test]
    fn durations_read_as_kubectl_writes_them() {
        let cases = [
            (0, "0s"),
            (45, "45s"),
            (119, "119s"),
            (200, "3m20s"),
            (180, "3m"),
            (5 * 3600, "5h"),
            (42 * 60, "42m"),
            (5 * 3600 + 12 * 60, "5h12m"),
            (30 * 3600, "30h"),
            (3 * 86_400 + 4 * 3600, "3d4h"),
            (12 * 86_400, "12d"),
            (800 * 86_400, "2y70d"),
        ];
        for (secs, text) in cases {
            assert_eq!(human(Duration::seconds(secs)), text, "{secs}s");
        }
        assert_eq!(relative(t(42 * 60), t(0)), "in 42m");
        assert_eq!(relative(t(0), t(180)), "3m ago");
        assert_eq!(absolute(t(0)), "2027-01-15T08:00:00Z");
    }

    #[test]
    fn the_fix_is_the_operators_own_for_the_failing_reason() {
        let b = binding(vec![
            cond("Ready", ConditionStatus::False, "Expired", "the token expired"),
            cond("Authorized", ConditionStatus::False, "ConsentRequired", "invalid_scope; fix: ..."),
        ]);
        let (reason, fix) = failing("mail", "scanner", b.status.as_ref().unwrap()).unwrap();
        assert_eq!(reason, "ConsentRequired");
        assert_eq!(fix, Reason::ConsentRequired.fix());
        // Awaiting a person: the plugin's own command.
        let b = binding(vec![cond("Ready", ConditionStatus::False, "AwaitingAuthorization", "open ...")]);
        let (_, fix) = failing("mail", "scanner", b.status.as_ref().unwrap()).unwrap();
        assert_eq!(fix, "kubectl mailoauth authorize -n mail scanner");
        // A reason this version does not know: the fix at the end of the operator's message.
        let b = binding(vec![cond("Ready", ConditionStatus::False, "SomethingNew", "it broke; fix: do this")]);
        assert_eq!(failing("mail", "scanner", b.status.as_ref().unwrap()).unwrap().1, "do this");
        // Waiting with nothing to do, or Ready: no fix.
        let b = binding(vec![cond("Ready", ConditionStatus::False, "Pending", "")]);
        assert_eq!(failing("mail", "scanner", b.status.as_ref().unwrap()), None);
        let b = binding(vec![cond("Ready", ConditionStatus::True, "TokenValid", "")]);
        assert_eq!(failing("mail", "scanner", b.status.as_ref().unwrap()), None);
        // A Ready binding whose mailbox check fails: the check's message says what to do.
        let b = binding(vec![
            cond("Ready", ConditionStatus::True, "TokenValid", ""),
            cond("MailboxVerified", ConditionStatus::False, "SmtpAuthDisabled", "SMTP: 535 5.7.139; Set-CASMailbox"),
        ]);
        let (reason, fix) = failing("mail", "scanner", b.status.as_ref().unwrap()).unwrap();
        assert_eq!((reason.as_str(), fix.as_str()), ("SmtpAuthDisabled", "SMTP: 535 5.7.139; Set-CASMailbox"));
    }

    #[test]
    fn a_row_and_its_table() {
        let mut b = binding(vec![cond("Ready", ConditionStatus::True, "TokenValid", "valid")]);
        let status = b.status.as_mut().unwrap();
        status.token =
            Some(TokenStatus { issued_at: t(0), expires_at: t(3600), renew_at: t(2400), scopes: Vec::new() });
        status.verification = Some(VerificationStatus {
            imap: Some(ProtocolCheck { result: "Verified".into(), checked_at: t(10), message: String::new() }),
            ..Default::default()
        });
        let mut failing = binding(vec![cond(
            "Ready",
            ConditionStatus::False,
            "ProviderNotFound",
            "no provider; fix: create the provider or fix spec.providerRef",
        )]);
        failing.metadata.name = Some("other".into());
        failing.spec.provider_ref.kind = crate::api::ProviderKind::ClusterMailProvider;
        let rows = [row(&b, t(60)), row(&failing, t(60))];
        assert_eq!(rows[0].expires_in.as_deref(), Some("in 59m"));
        assert_eq!(rows[0].verification.get("imap").map(String::as_str), Some("Verified"));
        assert_eq!(rows[1].fix.as_deref(), Some(Reason::ProviderNotFound.fix()));
        let text = table(&rows, Columns { namespace: false, wide: false });
        let expected = "\
NAME      MAILBOX               PROVIDER                  GRANT        READY   REASON             EXPIRES   EXPIRES AT             VERIFIED        FIX
scanner   scanner@example.com   idp                       deviceCode   True    TokenValid         in 59m    2027-01-15T09:00:00Z   imap=Verified   -
other     scanner@example.com   ClusterMailProvider/idp   deviceCode   False   ProviderNotFound   -         -                      -               create the provider or fix spec.providerRef
";
        assert_eq!(text, expected);
        let wide = table(&rows, Columns { namespace: true, wide: true });
        let head: Vec<&str> =
            wide.lines().next().unwrap().split("   ").map(str::trim).filter(|s| !s.is_empty()).collect();
        assert_eq!(
            head,
            [
                "NAMESPACE",
                "NAME",
                "MAILBOX",
                "PROVIDER",
                "GRANT",
                "READY",
                "REASON",
                "EXPIRES",
                "EXPIRES AT",
                "ACCOUNT",
                "SECRET",
                "VERIFIED",
                "MESSAGE",
                "FIX"
            ]
        );
        assert!(wide.lines().nth(1).unwrap().starts_with("mail        scanner"), "{wide}");
        assert!(wide.contains("2027-01-15T09:00:00Z"), "{wide}");
        let json = serde_json::to_value(&rows[0]).unwrap();
        assert_eq!(json["expiresAt"], "2027-01-15T09:00:00Z");
        assert_eq!(json["ready"], "True");
        assert!(json.get("fix").is_none());
    }
}
