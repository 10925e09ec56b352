//! The published Secret: the SASL XOAUTH2 value and `secretTemplate` substitution, with any
//! mailbox, token and template text.
#![no_main]
use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use mail_oauth_operator::api::SecretTemplate;
use mail_oauth_operator::policy::grant_state::GrantState;
use mail_oauth_operator::policy::publish::{placeholders, published_data, xoauth2};

fuzz_target!(|input: (&str, &str, &str, &str)| {
    let (mailbox, token, key, template) = input;
    let _ = xoauth2(mailbox, token);
    let _ = placeholders(template);
    let now = chrono::DateTime::from_timestamp(1_800_000_000, 0).unwrap_or_default();
    let grant = GrantState {
        refresh_token: None,
        access_token: secrecy::SecretString::from(token.to_owned()),
        issued_at: now,
        expires_at: now,
        mailbox: Some(mailbox.to_owned()),
        issuer: None,
        ..GrantState::test()
    };
    let template =
        SecretTemplate { data: BTreeMap::from([(key.to_owned(), template.to_owned())]), ..Default::default() };
    let _ = published_data(mailbox, &grant, &[], &BTreeMap::new(), BTreeMap::new(), Some(&template));
});
