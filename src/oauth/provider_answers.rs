//! The providers' own answers as fixtures (`tests/fixtures/provider-answers/*.json`): each body,
//! sent with its status, is read as the token client reads it (scrubbed, reduced), classified,
//! and must yield the documented reason and a message whose fix is the right one. A file named
//! `device-*.json` is the answer to a device-code poll and goes through the device flow first.

use std::path::PathBuf;

use chrono::{DateTime, Duration, Utc};
use secrecy::SecretString;
use serde::Deserialize;

use super::client::{DeviceCode, outcome};
use super::grants::device_code::{DeviceCodeFlow, pending};
use super::grants::{Flow, FlowInput, Step};
use super::http::Recorded;
use super::response::parse_error;
use crate::policy::classify::{Failure, classify};

#[derive(Deserialize)]
struct Fixture {
    /// Where the text and its meaning come from.
    source: String,
    status: u16,
    body: serde_json::Value,
    reason: String,
    transient: bool,
    /// Words the message a person sees must carry.
    shows: Vec<String>,
    /// Words it must not carry (a wrong fix).
    never: Vec<String>,
}

/// A credential the request held; a body that echoed it must not show it.
const HELD: &str = "held-client-secret-0123456789";

fn fixtures() -> Vec<(String, Fixture)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/provider-answers");
    let mut out: Vec<(String, Fixture)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| {
            let name = p.file_stem().unwrap().to_string_lossy().into_owned();
            let fixture = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap_or_else(|e| panic!("{name}: {e}"));
            (name, fixture)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn at(s: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap()
}

fn answer(name: &str, f: &Fixture, body: &[u8]) -> Failure {
    let recorded = Recorded { status: Some(f.status), error: parse_error(body), ..Default::default() };
    let rejected = outcome(recorded, &[HELD]).err().unwrap_or_else(|| panic!("{name}: not a failure"));
    if !name.starts_with("device-") {
        return classify(&rejected.error);
    }
    let code = DeviceCode {
        device_code: SecretString::from("dc".to_owned()),
        user_code: "QZJJRRML".into(),
        verification_uri: "https://microsoft.com/devicelogin".into(),
        verification_uri_complete: None,
        expires_in: Duration::minutes(15),
        interval: Duration::seconds(5),
    };
    let p = pending(code, at(0), "MailProvider/p", "c", &["mail".to_owned()], "https://idp/token");
    let input = FlowInput {
        now: at(30),
        grant: None,
        pending: Some(&p),
        read: None,
        scopes: &[],
        response: None,
        binding_uid: None,
        generation: None,
        mailbox: "scanner@contoso.com",
        token_url: "https://idp/token",
    };
    match DeviceCodeFlow.refused(&rejected.error, &input) {
        Some(Step::Fail(f)) => f,
        other => panic!("{name}: the device flow did not stop: {other:?}"),
    }
}

#[test]
fn every_provider_answer_yields_its_documented_reason_and_the_right_fix() {
    let all = fixtures();
    assert!(all.len() >= 16, "fixtures missing: {}", all.len());
    for (name, f) in &all {
        assert!(f.source.contains("https://") || f.source.starts_with("RFC"), "{name}: cite the provider's page");
        let failure = answer(name, f, f.body.to_string().as_bytes());
        let shown = failure.reason.message(&failure.message);
        assert_eq!((failure.reason.as_str(), failure.transient), (f.reason.as_str(), f.transient), "{name}: {shown}");
        for w in &f.shows {
            assert!(shown.contains(w.as_str()), "{name}: {w:?} missing in: {shown}");
        }
        for w in &f.never {
            assert!(!shown.contains(w.as_str()), "{name}: {w:?} is a wrong fix in: {shown}");
        }
        assert!(!shown.contains("Trace ID") && !shown.contains('\r'), "{name}: only the first line: {shown}");
    }
}

#[test]
fn provider_text_echoing_a_held_credential_is_scrubbed_in_every_answer() {
    for (name, f) in &fixtures() {
        let mut body = f.body.clone();
        let echoed = format!("client_secret={HELD} {}", body["error_description"].as_str().unwrap_or_default());
        body["error_description"] = serde_json::Value::String(echoed.replace("\r\n", " "));
        let failure = answer(name, f, body.to_string().as_bytes());
        assert!(!failure.message.contains(HELD), "{name}: {}", failure.message);
    }
}
