//! Starts `tests/oauth-server/server.mjs` (oidc-provider) on 127.0.0.1 with a fresh CA and server
//! certificate, installs its npm dependencies when they are missing, and stops it on drop.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// The service account's email.
pub const SERVICE_ACCOUNT: &str = "mailer@test-project.iam.gserviceaccount.com";

/// A running OAuth server.
pub struct OAuthServer {
    /// `https://127.0.0.1:<port>`.
    pub issuer: String,
    /// PEM of the CA that signed the server certificate.
    pub ca_pem: String,
    /// The certificate of the `private_key_jwt` client `mail-cert` (RSA, as Entra's certificates
    /// are; the server accepts only PS256 assertions from it, as Entra asks).
    pub client_cert_pem: String,
    /// Its private key.
    pub client_key_pem: String,
    /// A service-account key file (JSON) for the JWT bearer grant, as Google issues them.
    pub service_account_json: String,
    child: Child,
    _dir: tempfile::TempDir,
    http: reqwest::Client,
}

fn server_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/oauth-server")
}

async fn ensure_installed() {
    let dir = server_dir();
    if dir.join("node_modules/oidc-provider").exists() {
        return;
    }
    let status = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(&dir)
        .status()
        .await
        .expect("npm runs (Node.js 20+ and npm must be installed)");
    assert!(status.success(), "npm ci in {} failed", dir.display());
}

/// A fresh 2048-bit RSA private key (PKCS#8 PEM), made by openssl: ring cannot generate RSA keys.
pub fn rsa_private_key() -> String {
    let out = std::process::Command::new("openssl")
        .args(["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"])
        .output()
        .expect("openssl runs");
    assert!(out.status.success(), "openssl genpkey failed");
    String::from_utf8(out.stdout).expect("PEM")
}

/// A fresh CA and a server certificate for 127.0.0.1 and localhost signed by it: (CA PEM,
/// certificate PEM, key PEM).
pub fn certificates() -> (String, String, String) {
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "mail-oauth-operator test CA");
    let ca_cert = ca.self_signed(&ca_key).expect("CA cert");
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().expect("server key");
    let mut params = CertificateParams::new(vec!["localhost".to_owned()]).expect("server params");
    params.subject_alt_names.push(SanType::IpAddress("127.0.0.1".parse().expect("ip")));
    let cert = params.signed_by(&key, &issuer).expect("server cert");
    (ca_cert.pem(), cert.pem(), key.serialize_pem())
}

impl OAuthServer {
    /// Starts the server with access tokens valid for `access_ttl` seconds.
    pub async fn start(access_ttl: u64) -> Self {
        Self::start_with(access_ttl, &[]).await
    }

    /// The same, with extra environment for the server.
    pub async fn start_with(access_ttl: u64, env: &[(&str, &str)]) -> Self {
        ensure_installed().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let (ca_pem, cert, key) = certificates();
        std::fs::write(dir.path().join("tls.crt"), &cert).expect("write cert");
        std::fs::write(dir.path().join("tls.key"), &key).expect("write key");
        let client_key = KeyPair::from_pem(&rsa_private_key()).expect("client key");
        let client_cert = CertificateParams::new(vec!["mail-cert".to_owned()])
            .expect("client params")
            .self_signed(&client_key)
            .expect("client cert");
        let (client_cert_pem, client_key_pem) = (client_cert.pem(), client_key.serialize_pem());
        std::fs::write(dir.path().join("client.crt"), &client_cert_pem).expect("write client cert");
        let sa_key = KeyPair::generate().expect("service account key");
        std::fs::write(dir.path().join("sa.pub"), sa_key.public_key_pem()).expect("write service account key");
        let service_account_json = serde_json::json!({
            "type": "service_account", "client_email": SERVICE_ACCOUNT, "private_key_id": "k1",
            "private_key": sa_key.serialize_pem(), "token_uri": "https://oauth2.googleapis.com/token",
        })
        .to_string();
        let mut child = Command::new("node")
            .arg(server_dir().join("server.mjs"))
            .env("TLS_CERT", dir.path().join("tls.crt"))
            .env("TLS_KEY", dir.path().join("tls.key"))
            .env("ACCESS_TOKEN_TTL", access_ttl.to_string())
            .env("CLIENT_CERT_FILE", dir.path().join("client.crt"))
            .env("SERVICE_ACCOUNT_PUBLIC_KEY_FILE", dir.path().join("sa.pub"))
            .env("SERVICE_ACCOUNT_EMAIL", SERVICE_ACCOUNT)
            .env("PORT", "0")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("node starts");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("OAuth server announced itself within 30 s")
            .expect("read stdout")
            .expect("a line");
        // Keep reading, so that later output never meets a closed pipe.
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                eprintln!("oauth-server: {line}");
            }
        });
        let announced: Value = serde_json::from_str(&line).expect("JSON announcement");
        let issuer = announced["issuer"].as_str().expect("issuer").to_owned();
        let http = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes()).expect("CA"))
            .build()
            .expect("client");
        Self { issuer, ca_pem, client_cert_pem, client_key_pem, service_account_json, child, _dir: dir, http }
    }

    /// Seeds a grant for `account` and returns its refresh token, as a person's consent would.
    pub async fn seed_refresh_token(&self, account: &str) -> String {
        self.seed_refresh_token_for(account, "mail-app").await
    }

    /// Seeds a grant for `account` through `client_id`.
    pub async fn seed_refresh_token_for(&self, account: &str, client_id: &str) -> String {
        let v: Value = self
            .http
            .post(format!("{}/test/seed", self.issuer))
            .json(&serde_json::json!({ "accountId": account, "clientId": client_id }))
            .send()
            .await
            .expect("seed")
            .json()
            .await
            .expect("seed json");
        v["refresh_token"].as_str().expect("refresh_token").to_owned()
    }

    /// Approves a device code as the person `account` would at the verification page.
    pub async fn approve_device(&self, user_code: &str, account: &str) {
        self.test_post("device/approve", serde_json::json!({ "userCode": user_code, "accountId": account })).await;
    }

    /// Declines a device code as a person would.
    pub async fn deny_device(&self, user_code: &str) {
        self.test_post("device/deny", serde_json::json!({ "userCode": user_code })).await;
    }

    /// Makes the next `polls` device polls answer `slow_down`.
    pub async fn slow_down(&self, polls: u64) {
        self.test_post("device/slow-down", serde_json::json!({ "polls": polls })).await;
    }

    async fn test_post(&self, route: &str, body: Value) -> Value {
        let v: Value = self
            .http
            .post(format!("{}/test/{route}", self.issuer))
            .json(&body)
            .send()
            .await
            .expect("test route")
            .json()
            .await
            .expect("test route json");
        assert!(v.get("error").is_none(), "{route}: {v}");
        v
    }

    /// Plays a person's browser through an authorization request: follows the provider's
    /// redirects (keeping its cookies), signs in at the login page as `account` (default: the
    /// request's login_hint), consents (or declines with `deny`), and returns the URL the provider
    /// finally sends the browser to (the redirect URI with `code` and `state`, or an `error`).
    pub async fn browse(&self, url: &str, account: Option<&str>, deny: bool) -> String {
        let client = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(self.ca_pem.as_bytes()).expect("CA"))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("browser");
        let mut cookies: std::collections::BTreeMap<String, String> = Default::default();
        let mut next = url.to_owned();
        for _ in 0..10 {
            if !next.starts_with(&self.issuer) {
                return next;
            }
            let mut target = url::Url::parse(&next).expect("url");
            if target.path().starts_with("/interaction/") {
                if let Some(a) = account {
                    target.query_pairs_mut().append_pair("account", a);
                }
                if deny {
                    target.query_pairs_mut().append_pair("deny", "1");
                }
            }
            let cookie = cookies.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("; ");
            let response = client.get(target).header("cookie", cookie).send().await.expect("browser request");
            for c in response.headers().get_all("set-cookie") {
                let pair = c.to_str().unwrap_or_default().split(';').next().unwrap_or_default().to_owned();
                if let Some((k, v)) = pair.split_once('=') {
                    cookies.insert(k.to_owned(), v.to_owned());
                }
            }
            let status = response.status();
            let location = response.headers().get("location").and_then(|l| l.to_str().ok()).map(str::to_owned);
            match location {
                Some(l) if l.starts_with('/') => next = format!("{}{l}", self.issuer),
                Some(l) => next = l,
                None => panic!("the provider stopped at {status}: {}", response.text().await.unwrap_or_default()),
            }
        }
        panic!("too many redirects")
    }

    /// A counter of the server's (`device_polls`, `device_codes`, `token_requests`).
    pub async fn count(&self, what: &str) -> u64 {
        self.stats().await[what].as_u64().unwrap_or(0)
    }

    /// The server's request counters.
    async fn stats(&self) -> Value {
        let response = self.http.get(format!("{}/test/stats", self.issuer)).send().await.expect("stats");
        response.json().await.expect("stats json")
    }

    /// Successful grants by grant type, as counted by the server.
    pub async fn grants(&self, grant_type: &str) -> u64 {
        self.stats().await["token_requests_by_grant"][grant_type].as_u64().unwrap_or(0)
    }

    /// Every POST to the token endpoint, failed ones included.
    pub async fn token_requests(&self) -> u64 {
        self.stats().await["token_requests"].as_u64().unwrap_or(0)
    }

    /// Sends a refresh request directly (as an attacker or a stale copy would).
    pub async fn refresh_directly(&self, refresh_token: &str) -> Value {
        self.http
            .post(format!("{}/token", self.issuer))
            .form(&[
                ("grant_type", "refresh_token"),
                ("client_id", "mail-app"),
                ("client_secret", "mail-app-secret"),
                ("refresh_token", refresh_token),
            ])
            .send()
            .await
            .expect("token request")
            .json()
            .await
            .expect("token json")
    }

    /// Revokes a refresh token at the revocation endpoint (RFC 7009).
    pub async fn revoke(&self, refresh_token: &str) {
        let status = self
            .http
            .post(format!("{}/token/revocation", self.issuer))
            .form(&[
                ("token", refresh_token),
                ("token_type_hint", "refresh_token"),
                ("client_id", "mail-app"),
                ("client_secret", "mail-app-secret"),
            ])
            .send()
            .await
            .expect("revocation")
            .status();
        assert!(status.is_success(), "revocation answered {status}");
    }
}

impl Drop for OAuthServer {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}
