//! A token endpoint that answers as told, for what the real OAuth server never says (a 429 with
//! `Retry-After`, Entra's `AADSTS7000222`, a failing revocation endpoint): Node.js's own HTTPS
//! server (no packages) on 127.0.0.1 with a certificate of a fresh CA, started on demand and
//! stopped on drop.
//!
//! Each POST is answered by the first of `"<path> <client secret>"` and `"<path>"` found in the
//! answers given at start (the client secret from the form's `client_secret` or HTTP Basic);
//! anything else is a 404. `GET /stats` counts the POSTs by the same keys.

use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const SCRIPT: &str = r#"
const https = require('node:https');
const fs = require('node:fs');
const answers = JSON.parse(process.env.ANSWERS);
const stats = {};
const server = https.createServer({ cert: fs.readFileSync(process.env.TLS_CERT), key: fs.readFileSync(process.env.TLS_KEY) }, (req, res) => {
  if (req.method === 'GET' && req.url === '/stats') {
    res.writeHead(200, { 'content-type': 'application/json' });
    return res.end(JSON.stringify(stats));
  }
  let body = '';
  req.on('data', (chunk) => { body += chunk; });
  req.on('end', () => {
    let secret = new URLSearchParams(body).get('client_secret') || '';
    const auth = req.headers.authorization || '';
    if (!secret && auth.startsWith('Basic ')) {
      const pair = Buffer.from(auth.slice(6), 'base64').toString();
      secret = decodeURIComponent(pair.slice(pair.indexOf(':') + 1));
    }
    const key = `${req.url} ${secret}`;
    stats[key] = (stats[key] || 0) + 1;
    const answer = answers[key] || answers[req.url] || { status: 404, body: { error: 'not_found' } };
    res.writeHead(answer.status, { 'content-type': 'application/json', ...(answer.headers || {}) });
    res.end(JSON.stringify(answer.body === undefined ? {} : answer.body));
  });
});
server.listen(0, '127.0.0.1', () => console.log(JSON.stringify({ port: server.address().port })));
"#;

/// A running endpoint.
pub struct FakeEndpoint {
    /// `https://127.0.0.1:<port>`.
    pub base: String,
    /// PEM of the CA that signed its certificate (a provider's `caBundle`).
    pub ca_pem: String,
    child: Child,
    _dir: tempfile::TempDir,
    http: reqwest::Client,
}

impl FakeEndpoint {
    /// Starts an endpoint giving `answers`: `{"<path>[ <client secret>]": {"status": 429,
    /// "headers": {...}, "body": {...}}}`.
    pub async fn start(answers: Value) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let (ca_pem, cert, key) = super::oauth_server::certificates();
        std::fs::write(dir.path().join("tls.crt"), &cert).expect("write cert");
        std::fs::write(dir.path().join("tls.key"), &key).expect("write key");
        let mut child = Command::new("node")
            .args(["-e", SCRIPT])
            .env("TLS_CERT", dir.path().join("tls.crt"))
            .env("TLS_KEY", dir.path().join("tls.key"))
            .env("ANSWERS", answers.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("node starts");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("the fake endpoint announced itself within 30 s")
            .expect("read stdout")
            .expect("a line");
        let port = serde_json::from_str::<Value>(&line).expect("JSON announcement")["port"].as_u64().expect("port");
        let http = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes()).expect("CA"))
            .build()
            .expect("client");
        Self { base: format!("https://127.0.0.1:{port}"), ca_pem, child, _dir: dir, http }
    }

    /// POSTs answered so far under `key` (`"<path> <client secret>"`).
    pub async fn count(&self, key: &str) -> u64 {
        let stats: Value = self
            .http
            .get(format!("{}/stats", self.base))
            .send()
            .await
            .expect("stats")
            .json()
            .await
            .expect("stats json");
        stats[key].as_u64().unwrap_or(0)
    }
}

impl Drop for FakeEndpoint {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}
