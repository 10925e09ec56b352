//! What mail servers send: every reply parser of the XOAUTH2 clients on any line, and the
//! classification of any server text (which must never echo the token).
#![no_main]
use libfuzzer_sys::fuzz_target;
use mail_oauth_operator::api::Protocol;
use mail_oauth_operator::mail::reply;
use mail_oauth_operator::policy::verify::{Check, GrantKind, Observed, classify, server_text};

const TOKEN: &str = "ya29.fuzz-token-value";

fuzz_target!(|bytes: &[u8]| {
    let line = String::from_utf8_lossy(bytes);
    let _ = reply::imap(&line);
    if let Some(caps) = reply::imap_capabilities(&line) {
        let _ = reply::pick_mechanism(reply::imap_mechanisms(&caps));
    }
    let _ = reply::smtp(&line);
    let _ = reply::smtp_auth_mechanisms(&line);
    let _ = reply::pop3(&line);
    let _ = reply::pop3_sasl(&line);
    let text = server_text(&[line.clone().into_owned(), TOKEN.to_owned()], &[TOKEN]);
    assert!(!text.contains(TOKEN));
    for protocol in Protocol::ALL {
        for grant in [GrantKind::Delegated, GrantKind::AppOnly] {
            let check = Check {
                protocol,
                host: "mail.example",
                port: 993,
                mailbox: "m@example.com",
                grant,
                service_principal: None,
                client_id: None,
            };
            // Any mailbox name (tenant input) stays on one line.
            let any_mailbox = Check { mailbox: &line, service_principal: Some(&line), client_id: Some(&line), ..check };
            for seen in [
                Observed::Refused { text: text.clone(), temporary: false },
                Observed::NotConnected { text: text.clone() },
            ] {
                let verdict = classify(&check, &seen);
                assert!(!verdict.message.contains(TOKEN));
                assert!(!verdict.message.contains('\n'));
                assert!(!classify(&any_mailbox, &seen).message.contains('\n'));
            }
        }
    }
});
