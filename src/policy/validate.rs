//! Checks of a binding's spec before anything is requested or written: every write the operator
//! makes must be one the apiserver accepts, so a bad value becomes `InvalidSpec` naming the field,
//! never a silent retry loop. Kubernetes' own rules for names, labels and annotations are
//! restated here by hand (a few lines each; no regex engine is needed for them).

use std::collections::BTreeSet;

use chrono::Duration;

use super::duration;
use super::publish::{TEMPLATE_MAX_BYTES, placeholders};
use super::schedule::{DEFAULT_REFRESH_BEFORE, MAX_REFRESH_BEFORE};
use crate::api::common::{MAX_ANNOTATION_VALUE, MAX_MAP_ENTRIES, MAX_TEMPLATE_KEYS, MAX_TEMPLATE_VALUE};
use crate::api::provider::MAX_CLIENT_SECRET_REFS;
use crate::api::{GROUP, MANAGED_BY_LABEL, MailProviderSpec, MailboxBindingSpec, Protocol};

/// Suffix of every grant-state Secret's name.
pub const GRANT_SECRET_SUFFIX: &str = ".mailoauth-grant";

/// Longest label value, and longest name part of a qualified name.
pub const MAX_LABEL: usize = 63;

/// Largest total size of a Secret's annotations (Kubernetes' limit).
const MAX_ANNOTATIONS_BYTES: usize = 256 * 1024;

/// `[A-Za-z0-9]` at both ends, `[-A-Za-z0-9_.]` between, at most 63: a label value, or the name
/// part of a qualified name.
fn is_label_word(s: &str) -> bool {
    let alnum = |c: char| c.is_ascii_alphanumeric();
    s.len() <= MAX_LABEL
        && s.starts_with(alnum)
        && s.ends_with(alnum)
        && s.chars().all(|c| alnum(c) || c == '-' || c == '_' || c == '.')
}

/// A DNS-1123 subdomain: lower-case alphanumerics, `-` and `.`, alphanumeric at each end, at most
/// 253 characters, each dot-separated part non-empty.
pub fn is_dns_subdomain(s: &str) -> bool {
    let part_ok = |p: &str| {
        let edge = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
        p.starts_with(edge) && p.ends_with(edge) && p.chars().all(|c| edge(c) || c == '-')
    };
    !s.is_empty() && s.len() <= 253 && s.split('.').all(part_ok)
}

/// A Kubernetes qualified name (`prefix/name` or `name`), as label and annotation keys are.
pub fn is_qualified_name(s: &str) -> bool {
    match s.split_once('/') {
        Some((prefix, name)) => is_dns_subdomain(prefix) && is_label_word(name),
        None => is_label_word(s),
    }
}

/// A label value: empty, or a label word.
pub fn is_label_value(s: &str) -> bool {
    s.is_empty() || is_label_word(s)
}

/// A Secret data key: `[-._a-zA-Z0-9]+`, at most 253, not `.` or `..`.
pub fn is_secret_key(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s != "."
        && s != ".."
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
}

/// Whether a label or annotation key is one the operator sets itself.
fn reserved_key(key: &str) -> bool {
    key == MANAGED_BY_LABEL
        || key.split_once('/').is_some_and(|(prefix, _)| prefix == GROUP || prefix.ends_with(".mailoauth.io"))
}

/// Shortens `s` to at most `max` characters for a message.
fn show(s: &str) -> String {
    const MAX: usize = 80;
    if s.chars().count() <= MAX { s.to_owned() } else { format!("{}...", s.chars().take(MAX).collect::<String>()) }
}

/// The refresh margin of a spec, or why it is refused.
pub fn refresh_before(spec: &MailboxBindingSpec) -> Result<Duration, String> {
    let Some(text) = spec.refresh_before.as_deref() else { return Ok(DEFAULT_REFRESH_BEFORE) };
    let d = duration::parse(text).map_err(|e| format!("spec.refreshBefore: {e}"))?;
    if d > MAX_REFRESH_BEFORE {
        return Err(format!("spec.refreshBefore: {} is longer than the largest accepted margin, 24h", show(text)));
    }
    Ok(d)
}

/// Whether a template data key is one the operator writes for some binding (whatever this
/// binding's protocols and relay setting): a consumer or the relay reads these keys as the
/// operator's, so a template never writes them.
fn reserved_data_key(k: &str) -> bool {
    super::relay::published_keys::ALL.contains(&k)
        || super::publish::TOKEN_KEYS.contains(&k)
        || Protocol::ALL.iter().any(|p| ["host", "port", "tls"].iter().any(|s| k == format!("{}_{s}", p.as_str())))
}

/// The relay's grace period, bounded, and its senders' count (the schema's bound, checked again).
fn relay(spec: &MailboxBindingSpec) -> Result<(), String> {
    let Some(r) = &spec.relay else { return Ok(()) };
    if r.senders.len() > 32 {
        return Err("spec.relay.senders: more than 32 entries".to_owned());
    }
    let Some(text) = r.rotation_grace_period.as_deref() else { return Ok(()) };
    let d = duration::parse(text).map_err(|e| format!("spec.relay.rotationGracePeriod: {e}"))?;
    if d > super::relay::MAX_GRACE {
        return Err(format!(
            "spec.relay.rotationGracePeriod: {} is longer than the longest accepted grace period, 168h",
            show(text)
        ));
    }
    Ok(())
}

/// The names a template may use in `{{ }}`: the published keys for these protocols and `mailbox`.
pub fn template_names(protocols: &[Protocol]) -> BTreeSet<String> {
    let mut names: BTreeSet<String> = super::publish::TOKEN_KEYS.iter().map(|k| (*k).to_owned()).collect();
    for p in protocols {
        names.insert(format!("{}_host", p.as_str()));
        names.insert(format!("{}_port", p.as_str()));
        names.insert(format!("{}_tls", p.as_str()));
    }
    names.insert("mailbox".to_owned());
    names
}

/// Most identity aliases and scopes of a binding (the schema's bounds).
const MAX_ALIASES: usize = 16;
const MAX_SCOPES: usize = 64;

/// The schema's bounds on sizes and counts, checked again: an object stored before the bounds
/// were in the CRD is not checked by the apiserver until someone changes it.
fn sizes(spec: &MailboxBindingSpec) -> Result<(), String> {
    if spec.identity_aliases.len() > MAX_ALIASES {
        return Err(format!("spec.identityAliases: more than {MAX_ALIASES} entries"));
    }
    if spec.scopes.len() > MAX_SCOPES {
        return Err(format!("spec.scopes: more than {MAX_SCOPES} entries"));
    }
    let Some(t) = &spec.secret_template else { return Ok(()) };
    let maps = [
        ("labels", &t.labels, MAX_MAP_ENTRIES, MAX_LABEL),
        ("annotations", &t.annotations, MAX_MAP_ENTRIES, MAX_ANNOTATION_VALUE),
        ("data", &t.data, MAX_TEMPLATE_KEYS, MAX_TEMPLATE_VALUE),
    ];
    for (field, map, entries, value_bytes) in maps {
        if map.len() > entries {
            return Err(format!("spec.secretTemplate.{field}: more than {entries} entries"));
        }
        if let Some((k, _)) = map.iter().find(|(_, v)| v.len() > value_bytes) {
            return Err(format!("spec.secretTemplate.{field}[{}]: longer than {value_bytes} bytes", show(k)));
        }
    }
    Ok(())
}

/// Checks a provider's spec (either kind) for what the schema of an older CRD let through: at
/// most [`MAX_CLIENT_SECRET_REFS`] client secrets, no two naming the same Secret key (each would
/// be read and tried again for nothing). Call it before any client secret is read; a refusal is
/// `InvalidSpec` with this message.
pub fn provider(spec: &MailProviderSpec) -> Result<(), String> {
    let refs = spec.client_authentication.as_ref().map(|a| a.client_secret_refs.as_slice()).unwrap_or_default();
    if refs.len() > MAX_CLIENT_SECRET_REFS {
        return Err(format!(
            "spec.clientAuthentication.clientSecretRefs: {} entries, at most {MAX_CLIENT_SECRET_REFS} are accepted",
            refs.len()
        ));
    }
    let mut seen = BTreeSet::new();
    for r in refs {
        if !seen.insert((r.name.as_str(), r.key.as_str())) {
            return Err(format!(
                "spec.clientAuthentication.clientSecretRefs: Secret {} key {} is listed twice; remove the duplicate",
                show(&r.name),
                show(&r.key)
            ));
        }
    }
    Ok(())
}

/// Checks everything in a binding's spec that the schema cannot: the refresh margin, the Secret
/// name, and the template's labels, annotations and keys (and the schema's sizes again). The
/// message names the field and says what is accepted.
pub fn spec(spec: &MailboxBindingSpec) -> Result<(), String> {
    refresh_before(spec)?;
    sizes(spec)?;
    relay(spec)?;
    if !is_dns_subdomain(&spec.secret_name) {
        return Err(format!("spec.secretName: {:?} is not a valid Secret name", show(&spec.secret_name)));
    }
    if spec.secret_name.ends_with(GRANT_SECRET_SUFFIX) {
        return Err(format!(
            "spec.secretName: names ending in {GRANT_SECRET_SUFFIX} are reserved for the operator's grant-state Secrets; choose another name"
        ));
    }
    let Some(t) = &spec.secret_template else { return Ok(()) };
    for (k, v) in &t.labels {
        if !is_qualified_name(k) {
            return Err(format!("spec.secretTemplate.labels: {:?} is not a valid label key", show(k)));
        }
        if reserved_key(k) {
            return Err(format!("spec.secretTemplate.labels: {k} is set by the operator; remove it"));
        }
        if !is_label_value(v) {
            return Err(format!(
                "spec.secretTemplate.labels[{k}]: {:?} is not a valid label value (at most 63 characters: letters, digits, '-', '_', '.', starting and ending with a letter or digit)",
                show(v)
            ));
        }
    }
    let mut annotation_bytes = 0_usize;
    for (k, v) in &t.annotations {
        if !is_qualified_name(k) {
            return Err(format!("spec.secretTemplate.annotations: {:?} is not a valid annotation key", show(k)));
        }
        if reserved_key(k) {
            return Err(format!("spec.secretTemplate.annotations: {k} is set by the operator; remove it"));
        }
        annotation_bytes = annotation_bytes.saturating_add(k.len()).saturating_add(v.len());
    }
    if annotation_bytes > MAX_ANNOTATIONS_BYTES {
        return Err("spec.secretTemplate.annotations: more than 256 KiB in all".to_owned());
    }
    let mut names = template_names(&spec.protocols);
    if spec.relay.as_ref().is_some_and(|r| r.enabled) {
        names.extend(super::relay::published_keys::ALL.iter().map(|k| (*k).to_owned()));
    }
    let mut template_bytes = 0_usize;
    for (k, text) in &t.data {
        if !is_secret_key(k) {
            return Err(format!(
                "spec.secretTemplate.data: {:?} is not a valid Secret key (letters, digits, '-', '_', '.')",
                show(k)
            ));
        }
        if names.contains(k) || reserved_data_key(k) {
            return Err(format!(
                "spec.secretTemplate.data[{k}] would overwrite a key the operator writes; choose another key"
            ));
        }
        template_bytes = template_bytes.saturating_add(text.len());
        for name in placeholders(text).ok_or_else(|| format!("spec.secretTemplate.data[{k}] has an unclosed {{{{"))? {
            if !names.contains(name) {
                return Err(format!(
                    "spec.secretTemplate.data[{k}] uses {{{{ {} }}}}, which is not a published key (use one of: {})",
                    show(name),
                    names.iter().cloned().collect::<Vec<_>>().join(", ")
                ));
            }
        }
    }
    if template_bytes > TEMPLATE_MAX_BYTES {
        return Err(format!("spec.secretTemplate.data: more than {} KiB of text in all", TEMPLATE_MAX_BYTES / 1024));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::SecretTemplate;
    use std::collections::BTreeMap;

    fn spec_with(template: SecretTemplate) -> MailboxBindingSpec {
        crate::api::MailboxBinding::test().spec_with(|s| s.secret_template = Some(template)).spec
    }

    fn labels(k: &str, v: &str) -> SecretTemplate {
        SecretTemplate { labels: BTreeMap::from([(k.to_owned(), v.to_owned())]), ..Default::default() }
    }

    #[test]
    fn kubernetes_names_labels_and_keys_are_checked_as_the_apiserver_does() {
        assert!(is_qualified_name("app.kubernetes.io/name"));
        assert!(is_qualified_name("team"));
        assert!(!is_qualified_name("Bad Key"));
        assert!(!is_qualified_name("a/b/c"));
        assert!(!is_qualified_name(&"x".repeat(64)));
        assert!(!is_qualified_name("UPPER.example.com/x"));
        assert!(is_label_value(""));
        assert!(is_label_value("v1.2_3-x"));
        assert!(!is_label_value("-lead"));
        assert!(!is_label_value("has space"));
        assert!(!is_label_value(&"v".repeat(64)));
        assert!(is_secret_key("msmtprc"));
        assert!(is_secret_key(".env"));
        assert!(!is_secret_key(".."));
        assert!(!is_secret_key("a/b"));
        assert!(is_dns_subdomain("a-b.c"));
        assert!(!is_dns_subdomain("a..b"));
        assert!(!is_dns_subdomain("A"));
    }

    #[test]
    fn each_bad_template_entry_is_named_in_the_message() {
        let bad = [
            (labels("bad key", "v"), "labels: \"bad key\""),
            (labels("team", "not a value"), "labels[team]"),
            (labels("mailoauth.io/binding", "x"), "set by the operator"),
            (labels(MANAGED_BY_LABEL, "me"), "set by the operator"),
            (
                SecretTemplate { annotations: BTreeMap::from([("a b".into(), "v".into())]), ..Default::default() },
                "annotations: \"a b\"",
            ),
            (
                SecretTemplate {
                    annotations: BTreeMap::from([("x".into(), "v".repeat(300_000))]),
                    ..Default::default()
                },
                "annotations[x]: longer than 4096",
            ),
            (
                SecretTemplate {
                    annotations: (0..64).map(|i| (format!("{i}{}", "k".repeat(60)), "v".repeat(4096))).collect(),
                    ..Default::default()
                },
                "256 KiB",
            ),
            (SecretTemplate { data: BTreeMap::from([("a/b".into(), "v".into())]), ..Default::default() }, "a/b"),
            (
                SecretTemplate { data: BTreeMap::from([("access_token".into(), "v".into())]), ..Default::default() },
                "overwrite",
            ),
            (
                SecretTemplate {
                    data: BTreeMap::from([("x".into(), "{{ refresh_token }}".into())]),
                    ..Default::default()
                },
                "refresh_token",
            ),
            (
                SecretTemplate { data: BTreeMap::from([("x".into(), "{{ mailbox".into())]), ..Default::default() },
                "unclosed",
            ),
            (
                SecretTemplate { data: BTreeMap::from([("x".into(), "{{ pop3_host }}".into())]), ..Default::default() },
                "pop3_host",
            ),
        ];
        // Server keys of protocols the binding does not publish are the operator's all the same:
        // the relay would take them as its upstream.
        let bad: Vec<(SecretTemplate, &str)> = ["pop3_host", "pop3_port", "pop3_tls", "smtp_tls", "imap_tls"]
            .into_iter()
            .map(|k| (SecretTemplate { data: BTreeMap::from([(k.into(), "v".into())]), ..Default::default() }, k))
            .chain(bad)
            .collect();
        for (template, want) in bad {
            let err = spec(&spec_with(template.clone())).err().unwrap_or_default();
            assert!(err.contains(want), "{template:?}: {err}");
        }
        let good = SecretTemplate {
            labels: BTreeMap::from([("team".into(), "mail".into())]),
            annotations: BTreeMap::from([("example.com/note".into(), "anything at all".into())]),
            data: BTreeMap::from([("msmtprc".into(), "user {{ mailbox }} host {{imap_host}}".into())]),
        };
        assert_eq!(spec(&spec_with(good)), Ok(()));
    }

    #[test]
    fn sizes_the_schema_bounds_are_checked_again_for_objects_stored_before_it() {
        let many = |n: usize, value: &str| (0..n).map(|i| (format!("k{i}"), value.to_owned())).collect();
        let cases = [
            (SecretTemplate { labels: many(65, "v"), ..Default::default() }, "labels: more than 64"),
            (SecretTemplate { annotations: many(65, "v"), ..Default::default() }, "annotations: more than 64"),
            (SecretTemplate { annotations: many(1, &"a".repeat(4097)), ..Default::default() }, "annotations[k0]"),
            (SecretTemplate { data: many(17, "v"), ..Default::default() }, "data: more than 16"),
            (SecretTemplate { data: many(1, &"d".repeat(16 * 1024 + 1)), ..Default::default() }, "data[k0]"),
        ];
        for (template, want) in cases {
            let err = spec(&spec_with(template)).err().unwrap_or_default();
            assert!(err.contains(want), "{want}: {err}");
        }
        let fits = SecretTemplate {
            annotations: many(60, &"a".repeat(4096)),
            data: many(4, &"d".repeat(16 * 1024)),
            ..Default::default()
        };
        assert_eq!(spec(&spec_with(fits)), Ok(()));
        let mut s = spec_with(SecretTemplate::default());
        s.identity_aliases = (0..17).map(|i| format!("a{i}@example.com")).collect();
        assert!(spec(&s).err().unwrap_or_default().contains("spec.identityAliases"));
        let mut s = spec_with(SecretTemplate::default());
        s.scopes = (0..65).map(|i| format!("s{i}")).collect();
        assert!(spec(&s).err().unwrap_or_default().contains("spec.scopes"));
    }

    #[test]
    fn a_provider_with_too_many_or_duplicate_client_secret_refs_is_refused() {
        let provider_with = |refs: serde_json::Value| -> MailProviderSpec {
            serde_json::from_value(serde_json::json!({
                "google": {}, "clientId": "c", "clientAuthentication": {"clientSecretRefs": refs},
            }))
            .unwrap()
        };
        let ok = provider_with(serde_json::json!([{"name": "a"}, {"name": "a", "key": "other"}, {"name": "b"}]));
        assert_eq!(provider(&ok), Ok(()));
        // `key` defaults to client-secret, so these two are the same Secret key.
        let twice = provider_with(serde_json::json!([{"name": "a"}, {"name": "a", "key": "client-secret"}]));
        let err = provider(&twice).err().unwrap_or_default();
        assert!(err.contains("clientSecretRefs") && err.contains("twice"), "{err}");
        let many: Vec<_> = (0..9).map(|i| serde_json::json!({"name": format!("s{i}")})).collect();
        let err = provider(&provider_with(serde_json::Value::from(many))).err().unwrap_or_default();
        assert!(err.contains("at most 8"), "{err}");
        let none: MailProviderSpec =
            serde_json::from_value(serde_json::json!({"google": {}, "clientId": "c"})).unwrap();
        assert_eq!(provider(&none), Ok(()));
    }

    #[test]
    fn a_secret_name_may_not_be_a_grant_state_name_and_refresh_before_is_bounded() {
        let mut s = spec_with(SecretTemplate::default());
        s.secret_name = "other.mailoauth-grant".into();
        assert!(spec(&s).err().unwrap_or_default().contains("reserved"));
        let mut s = spec_with(SecretTemplate::default());
        s.refresh_before = Some("99999999999999999999h".into());
        assert!(spec(&s).err().unwrap_or_default().contains("spec.refreshBefore"));
        s.refresh_before = Some("25h".into());
        assert!(spec(&s).err().unwrap_or_default().contains("24h"));
        s.refresh_before = Some("90m".into());
        assert_eq!(refresh_before(&s), Ok(Duration::minutes(90)));
    }
}
