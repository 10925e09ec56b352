//! The scale benchmark's baseline: the work the operator does to make N client-credentials
//! bindings Ready, done by a bare loop with the same client libraries (kube, reqwest) and the same
//! concurrency, without an operator: per binding one token request, the grant-state Secret, the
//! published Secret and the status, each by server-side apply. Run by `scripts/bench.sh`:
//!
//! ```text
//! BENCH_NAMESPACE=bench BENCH_COUNT=1000 BENCH_TOKEN_URL=https://127.0.0.1:P/token \
//! BENCH_CA=ca.crt BENCH_CONCURRENCY=16 cargo bench --bench bare_loop
//! ```
//!
//! Prints one JSON line: `{"bindings": N, "seconds": S}`.

// A benchmark tool, like a test: a missing setting ends it with a message.
#![allow(clippy::expect_used, clippy::panic, clippy::arithmetic_side_effects, clippy::indexing_slicing)]

use std::collections::BTreeMap;
use std::time::Instant;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use mail_oauth_operator::api::MailboxBinding;
use serde_json::json;

fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} must be set (see scripts/bench.sh)"))
}

#[tokio::main]
async fn main() {
    // A test runner listing tests (`--list`) finds none here: the loop runs only as a benchmark.
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let namespace = var("BENCH_NAMESPACE");
    let count: usize = var("BENCH_COUNT").parse().expect("BENCH_COUNT");
    let concurrency: usize = std::env::var("BENCH_CONCURRENCY").ok().and_then(|c| c.parse().ok()).unwrap_or(16);
    let token_url = var("BENCH_TOKEN_URL");
    let ca = reqwest::Certificate::from_pem(&std::fs::read(var("BENCH_CA")).expect("BENCH_CA")).expect("CA");
    let http = reqwest::Client::builder().add_root_certificate(ca).build().expect("HTTP client");
    let client = Client::try_default().await.expect("kubeconfig");
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
    let bindings: Api<MailboxBinding> = Api::namespaced(client, &namespace);
    let apply = PatchParams::apply("bench-bare-loop").force();

    let started = Instant::now();
    let results: Vec<Result<(), String>> = futures::stream::iter(0..count)
        .map(|i| {
            let (http, secrets, bindings, apply, token_url) =
                (http.clone(), secrets.clone(), bindings.clone(), apply.clone(), token_url.clone());
            async move {
                let name = format!("b-{i}");
                let form = [
                    ("grant_type", "client_credentials".to_owned()),
                    ("scope", format!("bench-{i}")),
                    ("client_id", "bench".to_owned()),
                    ("client_secret", "bench-secret".to_owned()),
                ];
                let body: serde_json::Value = http
                    .post(&token_url)
                    .form(&form)
                    .send()
                    .await
                    .map_err(|e| e.to_string())?
                    .json()
                    .await
                    .map_err(|e| e.to_string())?;
                let token = body["access_token"].as_str().ok_or("no access_token")?.to_owned();
                let now = chrono::Utc::now();
                let expires = now + chrono::Duration::seconds(body["expires_in"].as_i64().unwrap_or(3600));
                let grant: BTreeMap<&str, String> = [
                    ("access_token", token.clone()),
                    ("token_type", "Bearer".into()),
                    ("issued_at", now.to_rfc3339()),
                    ("expires_at", expires.to_rfc3339()),
                    ("scopes", format!("bench-{i}")),
                    ("requested_scopes", format!("bench-{i}")),
                    ("provider", "MailProvider/fast".into()),
                    ("client_id", "bench".into()),
                    ("mailbox", format!("{name}@example.com")),
                    ("origin", "clientCredentials".into()),
                ]
                .into();
                let published: BTreeMap<&str, String> = [
                    ("username", format!("{name}@example.com")),
                    ("access_token", token.clone()),
                    ("token_type", "Bearer".into()),
                    ("expires_at", expires.to_rfc3339()),
                    ("xoauth2", format!("user={name}@example.com\x01auth=Bearer {token}\x01\x01")),
                    ("imap_host", "127.0.0.1".into()),
                    ("imap_port", "993".into()),
                ]
                .into();
                for (secret, data) in [(format!("{name}.mailoauth-grant"), grant), (format!("{name}-mail-token"), published)]
                {
                    let body = json!({"apiVersion": "v1", "kind": "Secret",
                        "metadata": {"name": secret, "labels": {"app.kubernetes.io/managed-by": "bench-bare-loop"}},
                        "type": "Opaque", "stringData": data});
                    secrets.patch(&secret, &apply, &Patch::Apply(body)).await.map_err(|e| e.to_string())?;
                }
                let status = json!({"apiVersion": "mailoauth.io/v1alpha1", "kind": "MailboxBinding",
                    "status": {"conditions": [{"type": "Ready", "status": "True", "reason": "Ready",
                        "message": "token valid", "lastTransitionTime": now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)}],
                        "token": {"issuedAt": now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                            "expiresAt": expires.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                            "renewAt": (expires - chrono::Duration::minutes(10)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true)},
                        "lastRefreshTime": now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                        "secretName": format!("{name}-mail-token")}});
                bindings.patch_status(&name, &apply, &Patch::Apply(status)).await.map_err(|e| e.to_string())?;
                Ok(())
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let seconds = started.elapsed().as_secs_f64();
    let failed = results.iter().filter(|r| r.is_err()).count();
    if let Some(Err(e)) = results.iter().find(|r| r.is_err()) {
        eprintln!("first failure: {e}");
    }
    println!("{}", json!({"bindings": count, "failed": failed, "seconds": seconds}));
}
