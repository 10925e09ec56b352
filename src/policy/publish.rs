//! What the published Secret holds: exactly the keys of the API (`username`, `access_token`,
//! `token_type`, `expires_at`, `xoauth2`, server hosts and ports) plus templated keys.

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use secrecy::ExposeSecret;

use super::grant_state::{GrantState, rfc3339};
use crate::api::{Protocol, SecretTemplate, ServerAddress};

/// The keys the operator owns in a published Secret, besides server keys and template keys.
pub const TOKEN_KEYS: [&str; 5] = ["username", "access_token", "token_type", "expires_at", "xoauth2"];

/// SASL XOAUTH2 initial response, base64: `user=<mailbox>^Aauth=Bearer <token>^A^A`.
pub fn xoauth2(mailbox: &str, access_token: &str) -> String {
    STANDARD.encode(format!("user={mailbox}\x01auth=Bearer {access_token}\x01\x01"))
}

/// Largest total text of `secretTemplate.data`.
pub const TEMPLATE_MAX_BYTES: usize = 64 * 1024;

/// Largest rendered published Secret data (Kubernetes allows 1 MiB per Secret).
pub const PUBLISHED_MAX_BYTES: usize = 512 * 1024;

/// A published key the template could not produce.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TemplateError {
    /// `{{ name }}` names no published key.
    #[error("secretTemplate.data[{key}] uses {{{{ {name} }}}}, which is not a published key (use one of: {known})")]
    UnknownPlaceholder {
        /// The template key.
        key: String,
        /// The unknown name.
        name: String,
        /// The names that work.
        known: String,
    },
    /// A template key would overwrite a key the operator writes.
    #[error("secretTemplate.data[{key}] would overwrite a key the operator writes; choose another key")]
    ReservedKey {
        /// The template key.
        key: String,
    },
    /// `{{` without `}}`.
    #[error("secretTemplate.data[{key}] has an unclosed {{{{")]
    Unclosed {
        /// The template key.
        key: String,
    },
    /// The rendered Secret would be larger than [`PUBLISHED_MAX_BYTES`].
    #[error("secretTemplate.data renders to more than {} KiB; use fewer or shorter placeholders", PUBLISHED_MAX_BYTES / 1024)]
    TooLarge,
}

/// The published Secret's data for a binding.
pub fn published_data(
    mailbox: &str,
    grant: &GrantState,
    protocols: &[Protocol],
    servers: &BTreeMap<Protocol, ServerAddress>,
    relay: BTreeMap<String, String>,
    template: Option<&SecretTemplate>,
) -> Result<BTreeMap<String, String>, TemplateError> {
    let token = grant.access_token.expose_secret();
    let mut data = BTreeMap::new();
    data.insert("username".to_owned(), mailbox.to_owned());
    data.insert("access_token".to_owned(), token.to_owned());
    data.insert("token_type".to_owned(), "Bearer".to_owned());
    data.insert("expires_at".to_owned(), rfc3339(grant.expires_at));
    data.insert("xoauth2".to_owned(), xoauth2(mailbox, token));
    for p in protocols {
        if let Some(addr) = servers.get(p) {
            data.insert(format!("{}_host", p.as_str()), addr.host.clone());
            data.insert(format!("{}_port", p.as_str()), addr.port.to_string());
            // The provider's TLS mode when it states one (the relay's upstream follows it).
            if let Some(tls) = addr.tls {
                data.insert(format!("{}_tls", p.as_str()), tls.as_str().to_owned());
            }
        }
    }
    data.extend(relay);
    if let Some(template) = template {
        let mut values = data.clone();
        values.insert("mailbox".to_owned(), mailbox.to_owned());
        let mut budget = PUBLISHED_MAX_BYTES.saturating_sub(data.values().map(String::len).sum());
        for (key, text) in &template.data {
            if values.contains_key(key) || super::relay::published_keys::ALL.contains(&key.as_str()) {
                return Err(TemplateError::ReservedKey { key: key.clone() });
            }
            let rendered = render(key, text, &values, budget)?;
            budget = budget.saturating_sub(rendered.len());
            data.insert(key.clone(), rendered);
        }
    }
    Ok(data)
}

/// The names used in `{{ }}` in `text`, in order; `None` for an unclosed `{{`.
pub fn placeholders(text: &str) -> Option<Vec<&str>> {
    let mut names = Vec::new();
    let mut rest = text;
    while let Some((_, after)) = rest.split_once("{{") {
        let (name, tail) = after.split_once("}}")?;
        names.push(name.trim());
        rest = tail;
    }
    Some(names)
}

/// Replaces `{{ name }}` with `values[name]`, producing at most `budget` bytes. Deliberately tiny:
/// no logic, no functions.
fn render(key: &str, text: &str, values: &BTreeMap<String, String>, budget: usize) -> Result<String, TemplateError> {
    let mut out = String::new();
    let push = |out: &mut String, s: &str| {
        if out.len().saturating_add(s.len()) > budget {
            return Err(TemplateError::TooLarge);
        }
        out.push_str(s);
        Ok(())
    };
    let mut rest = text;
    while let Some((before, after)) = rest.split_once("{{") {
        push(&mut out, before)?;
        let (name, tail) = after.split_once("}}").ok_or_else(|| TemplateError::Unclosed { key: key.to_owned() })?;
        let name = name.trim();
        let value = values.get(name).ok_or_else(|| TemplateError::UnknownPlaceholder {
            key: key.to_owned(),
            name: name.chars().take(80).collect(),
            known: values.keys().cloned().collect::<Vec<_>>().join(", "),
        })?;
        push(&mut out, value)?;
        rest = tail;
    }
    push(&mut out, rest)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::DateTime;

    fn bad(k: &str, v: &str) -> SecretTemplate {
        SecretTemplate { data: BTreeMap::from([(k.to_owned(), v.to_owned())]), ..Default::default() }
    }

    fn grant() -> GrantState {
        GrantState {
            refresh_token: Some("refresh-secret".to_owned().into()),
            access_token: "ya29.token".to_owned().into(),
            issued_at: DateTime::from_timestamp(1_700_000_000, 0).unwrap_or_default(),
            expires_at: DateTime::from_timestamp(1_700_003_600, 0).unwrap_or_default(),
            scopes: vec![],
            requested_scopes: vec![],
            provider: "MailProvider/p".into(),
            client_id: "c".into(),
            mailbox: None,
            issuer: None,
            relay: None,
            ..GrantState::test()
        }
    }

    #[test]
    fn xoauth2_is_the_base64_of_the_exact_sasl_bytes() {
        let raw = b"user=someuser@example.com\x01auth=Bearer ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg\x01\x01";
        let got = xoauth2("someuser@example.com", "ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg");
        assert_eq!(STANDARD.decode(&got).unwrap_or_default(), raw.to_vec());
        // The example from Google's XOAUTH2 documentation.
        assert_eq!(
            got,
            "dXNlcj1zb21ldXNlckBleGFtcGxlLmNvbQFhdXRoPUJlYXJlciB5YTI5LnZGOWRmdDRxbVRjMk52YjNSbGNrQmhkSFJoZG1semRHRXVZMjl0Q2cBAQ=="
        );
    }

    #[test]
    fn the_published_keys_are_exactly_those_of_the_api() {
        let servers = BTreeMap::from([
            (
                Protocol::Imap,
                ServerAddress {
                    host: "imap.example.com".into(),
                    port: 993,
                    tls: Some(crate::api::ServerTls::Implicit),
                },
            ),
            (Protocol::Pop3, ServerAddress { host: "pop.example.com".into(), port: 995, tls: None }),
        ]);
        let data = published_data(
            "a@example.com",
            &grant(),
            &[Protocol::Imap, Protocol::Smtp],
            &servers,
            BTreeMap::new(),
            None,
        )
        .unwrap_or_default();
        let keys: Vec<&str> = data.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            ["access_token", "expires_at", "imap_host", "imap_port", "imap_tls", "token_type", "username", "xoauth2"]
        );
        assert_eq!(data["imap_tls"], "implicit");
        assert_eq!(data["expires_at"], "2023-11-14T23:13:20Z");
        assert_eq!(data["imap_port"], "993");
        assert!(!data.values().any(|v| v.contains("refresh-secret")));
    }

    #[test]
    fn templates_fill_in_published_keys() {
        let template = SecretTemplate {
            data: BTreeMap::from([("msmtprc".to_owned(), "user {{ mailbox }}\nhost {{imap_host}}\n".to_owned())]),
            ..Default::default()
        };
        let servers =
            BTreeMap::from([(Protocol::Imap, ServerAddress { host: "imap.example.com".into(), port: 993, tls: None })]);
        let data =
            published_data("a@example.com", &grant(), &[Protocol::Imap], &servers, BTreeMap::new(), Some(&template))
                .unwrap_or_default();
        assert_eq!(data["msmtprc"], "user a@example.com\nhost imap.example.com\n");
    }

    #[test]
    fn templates_cannot_name_unknown_keys_or_overwrite_ours() {
        let servers = BTreeMap::new();
        let unknown = published_data(
            "a@example.com",
            &grant(),
            &[],
            &servers,
            BTreeMap::new(),
            Some(&bad("x", "{{ refresh_token }}")),
        );
        assert!(matches!(unknown, Err(TemplateError::UnknownPlaceholder { .. })));
        let reserved =
            published_data("a@example.com", &grant(), &[], &servers, BTreeMap::new(), Some(&bad("access_token", "x")));
        assert_eq!(reserved, Err(TemplateError::ReservedKey { key: "access_token".into() }));
        let unclosed =
            published_data("a@example.com", &grant(), &[], &servers, BTreeMap::new(), Some(&bad("x", "{{ mailbox")));
        assert_eq!(unclosed, Err(TemplateError::Unclosed { key: "x".into() }));
    }

    #[test]
    fn a_template_that_would_blow_up_the_secret_is_refused_without_allocating_it() {
        let servers = BTreeMap::new();
        let bomb = bad("x", &"{{xoauth2}}".repeat(100_000));
        let result = published_data("a@example.com", &grant(), &[], &servers, BTreeMap::new(), Some(&bomb));
        assert_eq!(result, Err(TemplateError::TooLarge));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(crate::policy::fuzz_cases()))]
        #[test]
        fn any_template_renders_or_errs_within_the_budget(text in "(\\{\\{|\\}\\}| ?[a-z_]{0,12} ?|\\PC{0,3}){0,40}") {
            let servers = BTreeMap::new();
            if let Ok(data) = published_data("a@example.com", &grant(), &[], &servers, BTreeMap::new(), Some(&bad("x", &text))) {
                proptest::prop_assert!(data.values().map(String::len).sum::<usize>() <= PUBLISHED_MAX_BYTES);
                proptest::prop_assert!(!data["x"].contains("refresh-secret"));
            }
        }

        #[test]
        fn xoauth2_decodes_to_the_exact_sasl_bytes_for_any_input(mailbox in "\\PC{0,64}", token in "\\PC{0,256}") {
            let raw = STANDARD.decode(xoauth2(&mailbox, &token)).unwrap();
            proptest::prop_assert_eq!(raw, format!("user={mailbox}\x01auth=Bearer {token}\x01\x01").into_bytes());
        }
    }
}
