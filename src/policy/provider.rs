//! Decisions for providers: readiness, client-secret expiry warnings (60 / 30 / 7 days) and which
//! namespaces may bind to a `ClusterMailProvider`.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, Utc};

use super::Reason;
use super::condition::condition;
use super::grant_state::rfc3339;
use super::time::{between, minus};
use crate::api::provider::{LabelSelector, SelectorOperator};
use crate::api::{AllowedNamespaces, ClientSecretRef, ConditionStatus, Endpoints, MailProviderStatus};

/// Condition types of a provider.
pub mod conditions {
    /// Endpoints resolved, referenced Secrets present and parseable.
    pub const READY: &str = "Ready";
    /// A client secret expires within 60 days.
    pub const CLIENT_SECRET_EXPIRING: &str = "ClientSecretExpiring";
}

/// Warning thresholds before a client secret expires.
pub const EXPIRY_WARNINGS_DAYS: [i64; 3] = [60, 30, 7];

/// A client secret's `expiresAt`, read.
pub fn parse_expiry(r: &ClientSecretRef) -> Result<Option<DateTime<Utc>>, String> {
    r.expires_at
        .as_deref()
        .map(|t| {
            DateTime::parse_from_rfc3339(t).map(|t| t.with_timezone(&Utc)).map_err(|_| {
                let shown: String = t.chars().take(64).collect();
                format!(
                    "clientAuthentication.clientSecretRefs[{}].expiresAt: {shown:?} is not an RFC 3339 time such as 2027-05-01T00:00:00Z",
                    r.name
                )
            })
        })
        .transpose()
}

/// The earliest expiry among the client secrets (unreadable ones are reported by [`status`]).
pub fn earliest_expiry(refs: &[ClientSecretRef]) -> Option<DateTime<Utc>> {
    refs.iter().filter_map(|r| parse_expiry(r).ok().flatten()).min()
}

/// The tightest warning threshold (in days) that `expires_at` falls within, if any.
pub fn expiry_threshold(now: DateTime<Utc>, expires_at: DateTime<Utc>) -> Option<i64> {
    let left = between(now, expires_at);
    EXPIRY_WARNINGS_DAYS.iter().rev().copied().find(|d| left <= Duration::days(*d))
}

/// What the controller found out about a provider.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    /// The endpoints, or why they could not be resolved.
    pub endpoints: Result<Endpoints, String>,
    /// A problem with a referenced Secret (missing, empty), if any.
    pub secret_problem: Option<(Reason, String)>,
    /// When the client certificate (`certificateRef`) expires, if there is one.
    pub certificate_expires_at: Option<DateTime<Utc>>,
}

/// The provider's status.
pub fn status(
    now: DateTime<Utc>,
    generation: Option<i64>,
    previous: Option<&MailProviderStatus>,
    secret_refs: &[ClientSecretRef],
    observed: &Observed,
) -> MailProviderStatus {
    let prev = previous.map(|p| p.conditions.as_slice()).unwrap_or_default();
    let expires = earliest(earliest_expiry(secret_refs), observed.certificate_expires_at);
    let unreadable = secret_refs.iter().find_map(|r| parse_expiry(r).err()).map(|why| (Reason::InvalidSpec, why));
    let ready = match (&observed.endpoints, unreadable.as_ref().or(observed.secret_problem.as_ref())) {
        (Err(why), _) => condition(
            prev,
            conditions::READY,
            ConditionStatus::False,
            Reason::EndpointsUnresolved,
            Reason::EndpointsUnresolved.message(why),
            now,
            generation,
        ),
        (Ok(_), Some((reason, why))) => {
            condition(prev, conditions::READY, ConditionStatus::False, *reason, reason.message(why), now, generation)
        }
        (Ok(e), None) => condition(
            prev,
            conditions::READY,
            ConditionStatus::True,
            Reason::ProviderReady,
            format!("token endpoint {}", e.token.as_deref().unwrap_or("unknown")),
            now,
            generation,
        ),
    };
    let expiring = match expires.and_then(|e| expiry_threshold(now, e).map(|d| (e, d))) {
        Some((e, _)) if e <= now => condition(
            prev,
            conditions::CLIENT_SECRET_EXPIRING,
            ConditionStatus::True,
            Reason::ClientSecretExpired,
            Reason::ClientSecretExpired.message(format!("a client secret or certificate expired at {}", rfc3339(e))),
            now,
            generation,
        ),
        Some((e, days)) => condition(
            prev,
            conditions::CLIENT_SECRET_EXPIRING,
            ConditionStatus::True,
            Reason::ClientSecretExpiring,
            Reason::ClientSecretExpiring
                .message(format!("a client secret or certificate expires at {} (within {days} days)", rfc3339(e))),
            now,
            generation,
        ),
        None => condition(
            prev,
            conditions::CLIENT_SECRET_EXPIRING,
            ConditionStatus::False,
            Reason::ClientSecretValid,
            match expires {
                Some(e) => format!("the earliest client secret or certificate expiry is {}", rfc3339(e)),
                None => "no client secret or certificate expiry is known".to_owned(),
            },
            now,
            generation,
        ),
    };
    MailProviderStatus {
        conditions: vec![ready, expiring],
        endpoints: observed.endpoints.as_ref().ok().cloned(),
        client_secret_expires_at: expires,
        observed_generation: generation,
    }
}

fn earliest(a: Option<DateTime<Utc>>, b: Option<DateTime<Utc>>) -> Option<DateTime<Utc>> {
    match (a, b) {
        (Some(a), Some(b)) => Some(std::cmp::min(a, b)),
        (a, b) => a.or(b),
    }
}

/// When to look at a provider again: sooner while it is not ready, and at each expiry warning.
pub fn requeue_after(
    now: DateTime<Utc>,
    ready: bool,
    secret_refs: &[ClientSecretRef],
    certificate_expires_at: Option<DateTime<Utc>>,
) -> Duration {
    let base = if ready { Duration::minutes(10) } else { Duration::minutes(1) };
    let next_warning = earliest(earliest_expiry(secret_refs), certificate_expires_at).and_then(|e| {
        EXPIRY_WARNINGS_DAYS.iter().map(|d| minus(e, Duration::days(*d))).chain([e]).filter(|t| *t > now).min()
    });
    match next_warning {
        Some(t) => std::cmp::max(std::cmp::min(base, between(now, t)), Duration::seconds(1)),
        None => base,
    }
}

/// Whether a namespace with these labels may bind to a cluster provider. Only a missing
/// `allowedNamespaces` allows every namespace; `{}` (or one whose mistyped keys the apiserver
/// pruned) and a selector without any requirement admit none: a limit that says nothing readable
/// fails closed.
pub fn namespace_allowed(
    allowed: Option<&AllowedNamespaces>,
    namespace: &str,
    labels: &BTreeMap<String, String>,
) -> bool {
    let Some(allowed) = allowed else { return true };
    allowed.names.iter().any(|n| n == namespace) || allowed.selector.as_ref().is_some_and(|s| selects(s, labels))
}

/// Why a `ClusterMailProvider`'s limits refuse a binding beyond its namespace, scopes and mailbox
/// (checked apart): an alias outside `allowedMailboxes` (unless `allowIdentityAliases`), identity
/// pinning turned off without `allowUncheckedIdentity`, and an application grant (client
/// credentials, a service account's domain-wide delegation: tokens that open any mailbox the
/// application may) on a provider that names no `allowedMailboxes`.
pub fn cluster_refuses(
    limits: &crate::api::ClusterMailProviderSpec,
    binding: &crate::api::MailboxBindingSpec,
    app_only: bool,
) -> Option<String> {
    let short = |s: &str| s.chars().take(254).collect::<String>();
    if !limits.allow_identity_aliases
        && let Some(alias) = binding.identity_aliases.iter().find(|a| !mailbox_allowed(&limits.allowed_mailboxes, a))
    {
        return Some(format!("does not allow the identity alias {} (allowedMailboxes)", short(alias)));
    }
    if binding.identity == crate::api::IdentityCheck::Unchecked && !limits.allow_unchecked_identity {
        return Some("does not allow identity: unchecked (allowUncheckedIdentity)".to_owned());
    }
    let application = app_only || matches!(binding.grant, crate::api::Grant::JwtBearer {});
    if application && limits.allowed_mailboxes.is_empty() {
        return Some(format!(
            "does not allow the {} grant: its tokens open any mailbox the application may, so the provider must \
             name allowedMailboxes first",
            binding.grant.name()
        ));
    }
    None
}

/// Whether a label selector selects these labels. A selector without requirements selects nothing.
pub fn selects(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    if selector.match_labels.is_empty() && selector.match_expressions.is_empty() {
        return false;
    }
    selector.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v))
        && selector.match_expressions.iter().all(|r| {
            let value = labels.get(&r.key);
            match r.operator {
                SelectorOperator::In => value.is_some_and(|v| r.values.contains(v)),
                SelectorOperator::NotIn => value.is_none_or(|v| !r.values.contains(v)),
                SelectorOperator::Exists => value.is_some(),
                SelectorOperator::DoesNotExist => value.is_none(),
            }
        })
}

/// Whether `mailbox` matches one of `allowed` (domains or `*`/`?` globs, case-insensitive);
/// an empty list allows every mailbox.
pub fn mailbox_allowed(allowed: &[String], mailbox: &str) -> bool {
    let mailbox = mailbox.to_ascii_lowercase();
    allowed.is_empty()
        || allowed.iter().any(|pattern| {
            let pattern = pattern.to_ascii_lowercase();
            if pattern.contains('@') || pattern.contains('*') || pattern.contains('?') {
                glob(&pattern, &mailbox)
            } else {
                mailbox.rsplit_once('@').is_some_and(|(_, domain)| domain == pattern)
            }
        })
}

/// Exchange Online's resource, as the operator spells it in the scopes it sends.
const EXCHANGE_RESOURCE: &str = "https://outlook.office365.com/";

/// Other spellings of the same resource: Microsoft's pages write `https://outlook.office.com/`
/// (`https://outlook.office.com/IMAP.AccessAsUser.All`), and Entra accepts and may grant either.
const EXCHANGE_RESOURCE_ALIASES: [&str; 2] = ["https://outlook.office.com/", EXCHANGE_RESOURCE];

/// A scope as it is compared: an Exchange Online scope under either host, with its permission
/// name without case (Entra's permission names are case-insensitive); any other scope as written
/// (RFC 6749 §3.3: scope tokens are case-sensitive).
pub fn scope_key(scope: &str) -> std::borrow::Cow<'_, str> {
    for resource in EXCHANGE_RESOURCE_ALIASES {
        if let Some(head) = scope.get(..resource.len())
            && head.eq_ignore_ascii_case(resource)
        {
            let permission = scope.get(resource.len()..).unwrap_or_default();
            return std::borrow::Cow::Owned(format!("{EXCHANGE_RESOURCE}{}", permission.to_ascii_lowercase()));
        }
    }
    std::borrow::Cow::Borrowed(scope)
}

/// Whether two scopes name the same permission (see [`scope_key`]).
pub fn same_scope(a: &str, b: &str) -> bool {
    a == b || scope_key(a) == scope_key(b)
}

/// Whether `list` names `scope` (see [`scope_key`]).
pub fn lists_scope(list: &[String], scope: &str) -> bool {
    list.iter().any(|s| same_scope(s, scope))
}

/// The scopes among `requested` that `allowed` does not list (none when `allowed` is empty).
pub fn scopes_not_allowed<'a>(allowed: &[String], requested: &'a [String]) -> Vec<&'a str> {
    if allowed.is_empty() {
        return Vec::new();
    }
    requested.iter().filter(|s| !lists_scope(allowed, s)).map(String::as_str).collect()
}

/// Scopes a provider may grant beside those asked for without them counting as more: OpenID
/// Connect's own.
const IDENTITY_SCOPES: [&str; 4] = ["openid", "email", "profile", "offline_access"];

/// Why a token answering a binding of a `ClusterMailProvider` carries more than its limits allow:
/// granted scopes neither asked for (asked ones were checked before the request) nor OpenID
/// Connect's own, and not in `allowedScopes` (someone edited `scope=` in the authorize URL); or a
/// consenting identity outside `allowedMailboxes`. `None`: within the limits.
pub fn granted_beyond(
    limits: &crate::api::ClusterMailProviderSpec,
    requested: &[String],
    granted: Option<&[String]>,
    account: Option<&str>,
) -> Option<String> {
    let extra: Vec<&str> = granted
        .unwrap_or_default()
        .iter()
        .filter(|s| !lists_scope(requested, s) && !IDENTITY_SCOPES.contains(&s.as_str()))
        .map(String::as_str)
        .collect();
    let refused =
        scopes_not_allowed(&limits.allowed_scopes, &extra.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
            .into_iter()
            .map(|s| s.chars().take(100).collect::<String>())
            .take(5)
            .collect::<Vec<_>>();
    if !refused.is_empty() {
        return Some(format!(
            "the provider granted scopes the ClusterMailProvider does not allow ({}; allowedScopes): the token was not \
             stored and was revoked where the provider can",
            refused.join(" ")
        ));
    }
    if let Some(account) =
        account.filter(|a| !limits.allow_identity_aliases && !mailbox_allowed(&limits.allowed_mailboxes, a))
    {
        return Some(format!(
            "{} consented, a mailbox the ClusterMailProvider does not allow (allowedMailboxes): the token was not \
             stored and was revoked where the provider can",
            account.chars().take(254).collect::<String>()
        ));
    }
    None
}

/// `*` (any run) and `?` (one character) matching, in time linear in the pattern times the text
/// (the classic two-pointer algorithm with one backtrack point: no exponential blow-up).
pub fn glob(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0_usize, 0_usize);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, ti));
                pi = pi.saturating_add(1);
            }
            Some(c) if *c == '?' || t.get(ti) == Some(c) => {
                pi = pi.saturating_add(1);
                ti = ti.saturating_add(1);
            }
            _ => match star {
                Some((sp, st)) => {
                    pi = sp.saturating_add(1);
                    ti = st.saturating_add(1);
                    star = Some((sp, ti));
                }
                None => return false,
            },
        }
    }
    p.iter().skip(pi).all(|c| *c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(days: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).unwrap_or_default() + Duration::days(days)
    }

    fn secret(expires: Option<DateTime<Utc>>) -> ClientSecretRef {
        ClientSecretRef { name: "s".into(), key: "client-secret".into(), expires_at: expires.map(rfc3339) }
    }

    #[test]
    fn an_unreadable_secret_expiry_makes_the_provider_not_ready_naming_the_field() {
        let observed =
            Observed { endpoints: Ok(Endpoints::default()), secret_problem: None, certificate_expires_at: None };
        let bad = ClientSecretRef { name: "s".into(), key: "k".into(), expires_at: Some("2027-01-01T00:00:00".into()) };
        let s = status(at(0), Some(1), None, &[bad], &observed);
        assert_eq!((s.conditions[0].status, s.conditions[0].reason.as_str()), (ConditionStatus::False, "InvalidSpec"));
        assert!(s.conditions[0].message.contains("clientSecretRefs[s].expiresAt"), "{}", s.conditions[0].message);
    }

    #[test]
    fn selectors_support_expressions_and_an_empty_selector_selects_nothing() {
        use crate::api::provider::LabelSelectorRequirement;
        let labels = BTreeMap::from([("team".to_owned(), "mail".to_owned())]);
        let req = |key: &str, operator, values: &[&str]| LabelSelectorRequirement {
            key: key.into(),
            operator,
            values: values.iter().map(|v| (*v).to_owned()).collect(),
        };
        let sel = |e| LabelSelector { match_labels: BTreeMap::new(), match_expressions: vec![e] };
        assert!(selects(&sel(req("team", SelectorOperator::In, &["mail", "ops"])), &labels));
        assert!(!selects(&sel(req("team", SelectorOperator::NotIn, &["mail"])), &labels));
        assert!(selects(&sel(req("env", SelectorOperator::NotIn, &["prod"])), &labels));
        assert!(selects(&sel(req("team", SelectorOperator::Exists, &[])), &labels));
        assert!(!selects(&sel(req("team", SelectorOperator::DoesNotExist, &[])), &labels));
        assert!(!selects(&LabelSelector::default(), &labels), "an empty selector never widens access");
        let empty_selector = AllowedNamespaces { names: vec![], selector: Some(LabelSelector::default()) };
        assert!(!namespace_allowed(Some(&empty_selector), "dev", &labels));
        assert!(!namespace_allowed(Some(&AllowedNamespaces::default()), "dev", &labels), "{{}} admits nobody");
        assert!(namespace_allowed(None, "dev", &labels), "only a missing allowedNamespaces allows all");
    }

    fn cluster(extra: serde_json::Value) -> crate::api::ClusterMailProviderSpec {
        let mut spec = serde_json::json!({"google": {}, "clientId": "c"});
        if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
            s.extend(e.clone());
        }
        serde_json::from_value(spec).unwrap_or_else(|e| panic!("{e}"))
    }

    fn binding_spec(extra: serde_json::Value) -> crate::api::MailboxBindingSpec {
        let mut spec = serde_json::json!({
            "providerRef": {"kind": "ClusterMailProvider", "name": "corp"}, "mailbox": "a@contoso.com",
            "secretName": "a", "grant": {"deviceCode": {}},
        });
        if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
            s.extend(e.clone());
        }
        serde_json::from_value(spec).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn a_cluster_provider_limits_aliases_unchecked_identity_and_application_grants() {
        let limited = cluster(serde_json::json!({"allowedMailboxes": ["contoso.com"]}));
        let alias = binding_spec(serde_json::json!({"identityAliases": ["ceo@fabrikam.com"]}));
        assert!(cluster_refuses(&limited, &alias, false).is_some_and(|w| w.contains("ceo@fabrikam.com")));
        let own_alias = binding_spec(serde_json::json!({"identityAliases": ["hd@contoso.com"]}));
        assert_eq!(cluster_refuses(&limited, &own_alias, false), None);
        let open = cluster(serde_json::json!({"allowedMailboxes": ["contoso.com"], "allowIdentityAliases": true}));
        assert_eq!(cluster_refuses(&open, &alias, false), None);
        let unchecked = binding_spec(serde_json::json!({"identity": "unchecked"}));
        assert!(cluster_refuses(&limited, &unchecked, false).is_some());
        let jwt = binding_spec(serde_json::json!({"grant": {"jwtBearer": {}}}));
        assert!(cluster_refuses(&cluster(serde_json::json!({})), &jwt, false).is_some());
        assert_eq!(cluster_refuses(&limited, &jwt, false), None);
        let app = binding_spec(serde_json::json!({"grant": {"clientCredentials": {}}}));
        assert!(cluster_refuses(&cluster(serde_json::json!({})), &app, true).is_some());
    }

    #[test]
    fn what_was_granted_is_held_to_the_cluster_limits_too() {
        let limits = cluster(serde_json::json!({"allowedScopes": ["mail"], "allowedMailboxes": ["contoso.com"]}));
        let asked = vec!["mail".to_owned()];
        let granted = |s: &[&str]| s.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(granted_beyond(&limits, &asked, Some(&granted(&["mail", "openid", "email"])), None), None);
        let more = granted(&["mail", "Mail.ReadWrite.All"]);
        assert!(granted_beyond(&limits, &asked, Some(&more), None).is_some_and(|w| w.contains("Mail.ReadWrite.All")));
        assert!(granted_beyond(&limits, &asked, None, Some("boss@fabrikam.com")).is_some());
        assert_eq!(granted_beyond(&limits, &asked, None, Some("a@contoso.com")), None);
    }

    #[test]
    fn both_microsoft_spellings_of_an_exchange_scope_are_the_same_scope() {
        let docs = "https://outlook.office.com/IMAP.AccessAsUser.All";
        let sent = "https://outlook.office365.com/IMAP.AccessAsUser.All";
        let allowed = vec![docs.to_owned(), "https://outlook.office.com/SMTP.Send".to_owned(), "offline_access".into()];
        let requested =
            vec![sent.to_owned(), "https://outlook.office365.com/SMTP.Send".to_owned(), "offline_access".into()];
        assert!(scopes_not_allowed(&allowed, &requested).is_empty());
        let more = vec!["https://outlook.office365.com/Mail.ReadWrite".to_owned()];
        assert_eq!(scopes_not_allowed(&allowed, &more), vec!["https://outlook.office365.com/Mail.ReadWrite"]);
        // Entra grants under the other host than was asked: that is no scope beyond the request.
        let limits = cluster(serde_json::json!({"allowedScopes": [docs], "allowedMailboxes": ["contoso.com"]}));
        assert_eq!(granted_beyond(&limits, &[sent.to_owned()], Some(&[docs.to_owned(), "openid".into()]), None), None);
        let beyond = ["https://outlook.office.com/Mail.ReadWrite.All".to_owned()];
        assert!(granted_beyond(&limits, &[sent.to_owned()], Some(&beyond), None).is_some());
        // Only Exchange Online's resource: other scopes keep their case and host.
        assert!(!same_scope("https://mail.google.com/", "https://MAIL.google.com/"));
        assert!(!same_scope("https://outlook.office.com.evil/IMAP.AccessAsUser.All", sent));
        assert!(!same_scope(
            "https://outlook.office365.com/IMAP.AccessAsUser.All",
            "https://outlook.office365.com/POP.AccessAsUser.All"
        ));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(crate::policy::fuzz_cases()))]
        #[test]
        fn an_exchange_scope_under_either_host_is_allowed_by_the_other(
            permission in "[A-Za-z.]{1,30}", docs_host in proptest::bool::ANY, upper in proptest::bool::ANY
        ) {
            let host = |office365: bool| if office365 { "https://outlook.office365.com/" } else { "https://outlook.office.com/" };
            let allowed = vec![format!("{}{permission}", host(docs_host))];
            let written = format!("{}{permission}", host(!docs_host));
            let asked = if upper { written.to_ascii_uppercase() } else { written };
            proptest::prop_assert!(scopes_not_allowed(&allowed, std::slice::from_ref(&asked)).is_empty(), "{asked}");
            proptest::prop_assert!(same_scope(&asked, &allowed[0]));
            let other = format!("{}{permission}X", host(docs_host));
            proptest::prop_assert!(!same_scope(&other, &allowed[0]));
        }
    }

    #[test]
    fn mailboxes_match_domains_and_globs_case_insensitively() {
        let allowed = vec!["contoso.com".to_owned(), "scan-*@fabrikam.com".to_owned()];
        assert!(mailbox_allowed(&allowed, "Helpdesk@Contoso.com"));
        assert!(!mailbox_allowed(&allowed, "helpdesk@evil-contoso.com"));
        assert!(!mailbox_allowed(&allowed, "a@sub.contoso.com"));
        assert!(mailbox_allowed(&allowed, "scan-3@fabrikam.com"));
        assert!(!mailbox_allowed(&allowed, "ceo@fabrikam.com"));
        assert!(mailbox_allowed(&[], "anyone@anywhere.org"));
        assert!(glob("*@*.contoso.com", "a@mail.contoso.com"));
        assert!(!glob("a*a*a*a*a*a*a*b", &"a".repeat(200)), "no exponential backtracking");
    }

    #[test]
    fn only_listed_scopes_may_be_requested() {
        let allowed = vec!["mail".to_owned()];
        assert!(scopes_not_allowed(&allowed, &["mail".to_owned()]).is_empty());
        assert_eq!(scopes_not_allowed(&allowed, &["mail".to_owned(), "admin".to_owned()]), vec!["admin"]);
        assert!(scopes_not_allowed(&[], &["anything".to_owned()]).is_empty());
    }

    #[test]
    fn expiry_warnings_come_at_sixty_thirty_and_seven_days() {
        assert_eq!(expiry_threshold(at(0), at(90)), None);
        assert_eq!(expiry_threshold(at(0), at(60)), Some(60));
        assert_eq!(expiry_threshold(at(0), at(29)), Some(30));
        assert_eq!(expiry_threshold(at(0), at(3)), Some(7));
        assert_eq!(expiry_threshold(at(0), at(-1)), Some(7));
    }

    #[test]
    fn a_provider_with_endpoints_and_secrets_is_ready_and_warns_of_expiry() {
        let observed = Observed {
            endpoints: Ok(Endpoints { token: Some("https://t".into()), ..Default::default() }),
            secret_problem: None,
            certificate_expires_at: None,
        };
        let s = status(at(0), Some(3), None, &[secret(Some(at(20))), secret(Some(at(400)))], &observed);
        assert_eq!(s.conditions[0].status, ConditionStatus::True);
        assert_eq!(s.conditions[0].reason, "ProviderReady");
        assert_eq!(s.conditions[1].reason, "ClientSecretExpiring");
        assert!(s.conditions[1].message.contains("within 30 days"), "{}", s.conditions[1].message);
        assert_eq!(s.client_secret_expires_at, Some(at(20)));
        assert_eq!(s.observed_generation, Some(3));
    }

    #[test]
    fn a_provider_whose_secret_is_missing_is_not_ready_and_says_how_to_fix_it() {
        let observed = Observed {
            endpoints: Ok(Endpoints::default()),
            secret_problem: Some((Reason::ClientSecretNotFound, "Secret contoso-oauth not found".into())),
            certificate_expires_at: None,
        };
        let s = status(at(0), Some(1), None, &[], &observed);
        assert_eq!(s.conditions[0].status, ConditionStatus::False);
        assert_eq!(s.conditions[0].reason, "ClientSecretNotFound");
        assert!(s.conditions[0].message.contains("fix: create the Secret"), "{}", s.conditions[0].message);
    }

    #[test]
    fn an_unchanged_provider_keeps_its_transition_times() {
        let observed =
            Observed { endpoints: Ok(Endpoints::default()), secret_problem: None, certificate_expires_at: None };
        let first = status(at(0), Some(1), None, &[], &observed);
        let second = status(at(1), Some(1), Some(&first), &[], &observed);
        assert_eq!(first, second);
    }

    #[test]
    fn requeue_happens_at_the_next_expiry_warning() {
        let refs = [secret(Some(at(61)))];
        assert_eq!(requeue_after(at(0), true, &refs, None), Duration::minutes(10));
        let soon = at(61) - Duration::days(60) - Duration::minutes(3);
        assert_eq!(requeue_after(soon, true, &refs, None), Duration::minutes(3));
    }

    #[test]
    fn a_client_certificate_expiry_warns_like_a_client_secret() {
        let observed =
            Observed { endpoints: Ok(Endpoints::default()), secret_problem: None, certificate_expires_at: Some(at(6)) };
        let s = status(at(0), Some(1), None, &[secret(Some(at(90)))], &observed);
        assert_eq!(s.conditions[1].reason, "ClientSecretExpiring");
        assert!(s.conditions[1].message.contains("within 7 days"), "{}", s.conditions[1].message);
        assert_eq!(s.client_secret_expires_at, Some(at(6)));
        let soon = at(6) - Duration::days(7) - Duration::minutes(2);
        assert_eq!(requeue_after(soon, true, &[], Some(at(6))), Duration::minutes(2));
    }

    #[test]
    fn allowed_namespaces_match_by_name_or_labels() {
        let labels = BTreeMap::from([("team".to_owned(), "mail".to_owned())]);
        assert!(namespace_allowed(None, "x", &labels));
        let by_name = AllowedNamespaces { names: vec!["ops".into()], selector: None };
        assert!(namespace_allowed(Some(&by_name), "ops", &BTreeMap::new()));
        assert!(!namespace_allowed(Some(&by_name), "dev", &labels));
        let by_label = AllowedNamespaces {
            names: vec![],
            selector: Some(LabelSelector { match_labels: labels.clone(), match_expressions: vec![] }),
        };
        assert!(namespace_allowed(Some(&by_label), "dev", &labels));
        assert!(!namespace_allowed(Some(&by_label), "dev", &BTreeMap::new()));
    }
}
