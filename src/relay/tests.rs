//! The relay against a scripted upstream submission server (in-process, STARTTLS with an rcgen
//! CA, XOAUTH2 checked against the token) and a client over an in-memory pipe whose source
//! address the test chooses (loopback or not).

use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::guard::{FailureLimits, Failures};
use super::wire::Wire;
use super::{SessionLimits, Shared};
use crate::mail::{Limits, Settings};
use crate::oauth::http::OutboundPolicy;

pub(super) const MAILBOX: &str = "scanner@example.com";
pub(super) const PASSWORD: &str = "correct horse battery staple 0123456789";
pub(super) const TOKEN: &str = "ya29.relay-TOKEN-Zx9Qk3mP0sL7vR2tY5uW8eA1dG4hJ6";

pub(super) fn pki() -> (CertificateDer<'static>, TlsAcceptor) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_owned()]).unwrap().signed_by(&key, &issuer).unwrap();
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())))
        .unwrap();
    (ca_cert.der().clone(), TlsAcceptor::from(Arc::new(config)))
}

/// Every line the upstream received.
type Seen = Arc<Mutex<Vec<String>>>;

/// A submission server: STARTTLS, XOAUTH2 (two steps) accepting only `TOKEN` for `MAILBOX`,
/// then MAIL/RCPT/DATA; the message gets `data_reply`. Two replies drop the connection instead:
/// [`DROP_IN_DATA`] at the first line of the message, [`DROP_AFTER_DATA`] after its final dot.
async fn upstream(acceptor: TlsAcceptor, data_reply: &'static str) -> (u16, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen: Seen = Arc::default();
    let log = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            let (acceptor, log) = (acceptor.clone(), log.clone());
            tokio::spawn(async move {
                let wait = Duration::from_secs(5);
                let mut w = Wire::new(Box::new(tcp), Vec::new(), 64 * 1024);
                w.write_line("220 upstream ESMTP", wait).await.unwrap();
                let mut in_data = false;
                while let Ok(line) = w.read_line(wait).await {
                    let line = String::from_utf8_lossy(&line).into_owned();
                    log.lock().unwrap().push(line.clone());
                    if in_data {
                        if data_reply == DROP_IN_DATA || (line == "." && data_reply == DROP_AFTER_DATA) {
                            return;
                        }
                        if line == "." {
                            in_data = false;
                            w.write_line(data_reply, wait).await.unwrap();
                        }
                        continue;
                    }
                    let verb = line.split(' ').next().unwrap().to_ascii_uppercase();
                    let reply = match verb.as_str() {
                        "EHLO" => "250-upstream\r\n250-PIPELINING\r\n250-SIZE 35882577\r\n250-STARTTLS\r\n250-AUTH XOAUTH2 PLAIN\r\n250 CHUNKING".to_owned(),
                        "STARTTLS" => {
                            w.write_line("220 2.0.0 go", wait).await.unwrap();
                            let stream = acceptor.accept(w.into_stream().unwrap()).await.unwrap();
                            w = Wire::new(Box::new(stream), Vec::new(), 64 * 1024);
                            continue;
                        }
                        "AUTH" => "334 ".to_owned(),
                        _ if line == crate::policy::publish::xoauth2(MAILBOX, TOKEN) => "235 2.7.0 ok".to_owned(),
                        "MAIL" | "RCPT" | "RSET" => "250 2.1.0 Ok".to_owned(),
                        "DATA" => {
                            in_data = true;
                            "354 End data with <CR><LF>.<CR><LF>".to_owned()
                        }
                        "QUIT" => {
                            let _ = w.write_line("221 2.0.0 Bye", wait).await;
                            return;
                        }
                        _ => "535 5.7.8 no".to_owned(),
                    };
                    if w.write_line(&reply, wait).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (port, seen)
}

fn write_secret(dir: &Path, port: u16, token: &str, expires_at: &str) {
    for (k, v) in [
        ("username", MAILBOX),
        ("relay_password", PASSWORD),
        ("access_token", token),
        ("expires_at", expires_at),
        ("smtp_host", "localhost"),
        ("smtp_port", &port.to_string()),
    ] {
        std::fs::write(dir.join(k), v).unwrap();
    }
}

/// The upstream closes the connection at the message's first line.
const DROP_IN_DATA: &str = "(drop in DATA)";
/// The upstream closes the connection after the message's final dot, without a reply.
const DROP_AFTER_DATA: &str = "(drop after DATA)";

pub(super) fn future() -> String {
    (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339()
}

fn shared(dir: &Path, ca: &CertificateDer<'static>) -> Arc<Shared> {
    let mut mail = Settings::new(OutboundPolicy { allow_private: true }, std::slice::from_ref(ca)).unwrap();
    mail.limits = Limits { overall: Duration::from_secs(4), reply: Duration::from_secs(2), ..Limits::default() };
    Arc::new(Shared {
        source: super::source::Source::Mounted(dir.to_owned()),
        metrics: super::metrics::RelayMetrics::default(),
        certs: None,
        allow_plaintext_auth: false,
        mail,
        limits: SessionLimits { upstream_reply: Duration::from_secs(3), ..SessionLimits::default() },
        failures: Failures::new(FailureLimits {
            delay_per_failure: Duration::from_millis(200),
            max_delay: Duration::from_secs(1),
            refuse_after: 3,
            forget_after: Duration::from_secs(60),
            max_sources: 16,
        }),
        name: "relay.test".to_owned(),
        extensions: Mutex::new(None),
    })
}

struct Client {
    wire: Wire,
    /// Everything the relay sent.
    heard: String,
}

impl Client {
    fn connect(shared: &Arc<Shared>, peer: &str) -> Self {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let peer: IpAddr = peer.parse().unwrap();
        tokio::spawn(super::smtp::session(Box::new(b), peer, false, shared.clone()));
        Client { wire: Wire::new(Box::new(a), Vec::new(), 64 * 1024), heard: String::new() }
    }

    /// One whole reply, its lines joined by newlines.
    async fn reply(&mut self) -> String {
        let mut lines = Vec::new();
        loop {
            let line = String::from_utf8(self.wire.read_line(Duration::from_secs(10)).await.unwrap()).unwrap();
            let last = line.as_bytes().get(3) != Some(&b'-');
            lines.push(line);
            if last {
                break;
            }
        }
        let text = lines.join("\n");
        self.heard.push_str(&text);
        text
    }

    async fn send(&mut self, line: &str) -> String {
        self.wire.write_line(line, Duration::from_secs(5)).await.unwrap();
        self.reply().await
    }

    async fn login(&mut self, password: &str) -> String {
        assert!(self.reply().await.starts_with("220 "));
        let ehlo = self.send("EHLO client.test").await;
        assert!(ehlo.contains("AUTH PLAIN LOGIN"), "{ehlo}");
        let plain =
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, format!("\0{MAILBOX}\0{password}"));
        self.send(&format!("AUTH PLAIN {plain}")).await
    }
}

pub(super) fn b64(s: &str) -> String {
    base64::Engine::encode(&base64::engine::general_purpose::STANDARD, s)
}

#[tokio::test]
async fn auth_plain_then_a_message_goes_upstream_with_xoauth2_and_its_reply_comes_back() {
    let (ca, acceptor) = pki();
    let (port, seen) = upstream(acceptor, "250 2.0.0 Ok: queued as 4F2A").await;
    let dir = tempfile::tempdir().unwrap();
    write_secret(dir.path(), port, TOKEN, &future());
    let shared = shared(dir.path(), &ca);
    let mut c = Client::connect(&shared, "127.0.0.1");
    assert!(c.login(PASSWORD).await.starts_with("235 "), "{}", c.heard);
    // After AUTH, EHLO lists the upstream's extensions with the relay's AUTH instead of its own.
    let ehlo = c.send("EHLO client.test").await;
    assert!(ehlo.contains("SIZE 35882577") && ehlo.contains("CHUNKING") && ehlo.contains("AUTH PLAIN LOGIN"), "{ehlo}");
    assert!(!ehlo.contains("XOAUTH2") && !ehlo.contains("STARTTLS"), "{ehlo}");
    // Pipelined: MAIL, RCPT, DATA in one write; replies in order.
    c.wire
        .write(
            format!("MAIL FROM:<{MAILBOX}>\r\nRCPT TO:<a@example.org>\r\nDATA\r\n").as_bytes(),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    assert!(c.reply().await.starts_with("250 "));
    assert!(c.reply().await.starts_with("250 "));
    assert!(c.reply().await.starts_with("354 "));
    assert_eq!(c.send("Subject: hi\r\n\r\n..dot\r\n.").await, "250 2.0.0 Ok: queued as 4F2A");
    assert!(c.send("QUIT").await.starts_with("221 "));
    let upstream_saw = seen.lock().unwrap().join("\n");
    assert!(upstream_saw.contains("AUTH XOAUTH2") && upstream_saw.contains("..dot"), "{upstream_saw}");
    assert!(!upstream_saw.contains(PASSWORD) && !upstream_saw.contains(&b64(&format!("\0{MAILBOX}\0{PASSWORD}"))));
    assert!(!c.heard.contains(TOKEN) && !c.heard.contains(&crate::policy::publish::xoauth2(MAILBOX, TOKEN)));
}

#[tokio::test]
async fn auth_login_works_and_the_upstreams_refusal_of_a_message_is_relayed_not_250() {
    let (ca, acceptor) = pki();
    let (port, _) = upstream(acceptor, "554 5.7.1 Rejected: spam").await;
    let dir = tempfile::tempdir().unwrap();
    write_secret(dir.path(), port, TOKEN, &future());
    let shared = shared(dir.path(), &ca);
    let mut c = Client::connect(&shared, "127.0.0.1");
    assert!(c.reply().await.starts_with("220 "));
    c.send("EHLO x").await;
    assert_eq!(c.send("AUTH LOGIN").await, "334 VXNlcm5hbWU6");
    assert_eq!(c.send(&b64(MAILBOX)).await, "334 UGFzc3dvcmQ6");
    assert!(c.send(&b64(PASSWORD)).await.starts_with("235 "), "{}", c.heard);
    assert!(c.send(&format!("MAIL FROM:<{MAILBOX}>")).await.starts_with("250"));
    assert!(c.send("RCPT TO:<a@example.org>").await.starts_with("250"));
    assert!(c.send("DATA").await.starts_with("354"));
    assert_eq!(c.send("body\r\n.").await, "554 5.7.1 Rejected: spam");
}

/// An upstream that drops the connection in the middle of a message, or after its end without
/// answering: the client gets a 421 (try again), never a 250, and the session ends.
#[tokio::test]
async fn an_upstream_that_drops_mid_data_is_a_temporary_failure_never_a_250() {
    for drop in [DROP_IN_DATA, DROP_AFTER_DATA] {
        let (ca, acceptor) = pki();
        let (port, _) = upstream(acceptor, drop).await;
        let dir = tempfile::tempdir().unwrap();
        write_secret(dir.path(), port, TOKEN, &future());
        let shared = shared(dir.path(), &ca);
        let mut c = Client::connect(&shared, "127.0.0.1");
        assert!(c.login(PASSWORD).await.starts_with("235 "), "{}", c.heard);
        assert!(c.send(&format!("MAIL FROM:<{MAILBOX}>")).await.starts_with("250"));
        assert!(c.send("RCPT TO:<a@example.org>").await.starts_with("250"));
        assert!(c.send("DATA").await.starts_with("354"));
        // A message of 256 KiB: the relay is still copying it when the upstream goes.
        let line = "x".repeat(1000);
        let body: String = (0..256).map(|_| format!("{line}\r\n")).collect();
        let _ = c.wire.write(body.as_bytes(), Duration::from_secs(5)).await;
        let _ = c.wire.write(b".\r\n", Duration::from_secs(5)).await;
        let answer = c.reply().await;
        assert!(answer.starts_with("421 4.4.2 "), "{drop}: {answer}");
        let after_354 = c.heard.split_once("354 ").unwrap().1;
        assert!(!after_354.contains("250"), "{drop}: {}", c.heard);
        // The relay has closed the session.
        assert!(c.wire.read_line(Duration::from_secs(5)).await.is_err(), "{drop}");
        let text = encoded(&shared.metrics);
        assert!(text.contains(r#"mailoauth_relay_upstream_failures_total{protocol="smtp",reason="lost"} 1"#), "{text}");
    }
}

#[tokio::test]
async fn mail_before_auth_another_sender_and_auth_without_tls_from_the_network_are_refused() {
    let (ca, acceptor) = pki();
    let (port, seen) = upstream(acceptor, "250 ok").await;
    let dir = tempfile::tempdir().unwrap();
    write_secret(dir.path(), port, TOKEN, &future());
    let shared = shared(dir.path(), &ca);
    let mut c = Client::connect(&shared, "127.0.0.1");
    assert!(c.reply().await.starts_with("220 "));
    c.send("EHLO x").await;
    assert!(c.send(&format!("MAIL FROM:<{MAILBOX}>")).await.starts_with("530 5.7.0"));
    assert!(c.send("RCPT TO:<a@example.org>").await.starts_with("530 5.7.0"));
    assert!(c.send("DATA").await.starts_with("530 5.7.0"));
    // Nothing reached the upstream: it is not even connected before AUTH.
    assert!(seen.lock().unwrap().is_empty());

    // From a non-loopback source without TLS: AUTH is neither offered nor accepted.
    let mut c = Client::connect(&shared, "192.0.2.10");
    assert!(c.reply().await.starts_with("220 "));
    let ehlo = c.send("EHLO x").await;
    assert!(!ehlo.contains("AUTH"), "{ehlo}");
    let plain = b64(&format!("\0{MAILBOX}\0{PASSWORD}"));
    assert!(c.send(&format!("AUTH PLAIN {plain}")).await.starts_with("538 5.7.11"));

    // Authenticated, another envelope sender is refused and not sent upstream.
    let mut c = Client::connect(&shared, "127.0.0.1");
    assert!(c.login(PASSWORD).await.starts_with("235 "));
    assert!(c.send("MAIL FROM:<ceo@example.com>").await.starts_with("550 5.7.1"));
    assert!(!seen.lock().unwrap().iter().any(|l| l.contains("ceo@example.com")));
    assert!(c.send(&format!("MAIL FROM:<{MAILBOX}> SIZE=100")).await.starts_with("250"));
}

#[tokio::test]
async fn wrong_passwords_are_slowed_then_the_source_is_refused() {
    let (ca, acceptor) = pki();
    let (port, seen) = upstream(acceptor, "250 ok").await;
    let dir = tempfile::tempdir().unwrap();
    write_secret(dir.path(), port, TOKEN, &future());
    let shared = shared(dir.path(), &ca);
    let mut c = Client::connect(&shared, "127.0.0.1");
    let started = Instant::now();
    assert!(c.login("wrong").await.starts_with("535 5.7.8"));
    let plain = b64(&format!("\0{MAILBOX}\0also wrong"));
    assert!(c.send(&format!("AUTH PLAIN {plain}")).await.starts_with("535 5.7.8"));
    // 200 ms, then 400 ms.
    assert!(started.elapsed() >= Duration::from_millis(600), "{:?}", started.elapsed());
    // The third failure reaches the limit: answered, then the connection is closed.
    let third = c.send(&format!("AUTH PLAIN {plain}")).await;
    assert!(third.starts_with("535 5.7.8"), "{third}");
    assert!(c.reply().await.starts_with("421 4.7.0"));
    // A new connection from the source is refused at once, even with the right password.
    let mut c = Client::connect(&shared, "127.0.0.1");
    assert!(c.reply().await.starts_with("421 4.7.0"));
    // Another source is not.
    let mut c = Client::connect(&shared, "::1");
    assert!(c.login(PASSWORD).await.starts_with("235 "));
    assert!(!seen.lock().unwrap().iter().any(|l| l.contains("wrong")));
    let metrics = encoded(&shared.metrics);
    for line in [
        r#"mailoauth_relay_authentications_total{protocol="smtp",outcome="wrong"} 3"#,
        r#"mailoauth_relay_authentications_total{protocol="smtp",outcome="refused"} 1"#,
        r#"mailoauth_relay_authentications_total{protocol="smtp",outcome="ok"} 1"#,
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} not in\n{metrics}");
    }
}

#[tokio::test]
async fn an_expired_token_or_an_unreachable_upstream_is_a_temporary_failure() {
    let (ca, _) = pki();
    let dir = tempfile::tempdir().unwrap();
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap().port();
    write_secret(dir.path(), closed, TOKEN, &future());
    let shared = shared(dir.path(), &ca);
    let mut c = Client::connect(&shared, "127.0.0.1");
    let answer = c.login(PASSWORD).await;
    assert!(answer.starts_with("454 4.7.0"), "{answer}");
    // The client may try again on the same connection; still no mail without AUTH.
    assert!(c.send(&format!("MAIL FROM:<{MAILBOX}>")).await.starts_with("530"));

    write_secret(dir.path(), closed, TOKEN, "2020-01-01T00:00:00Z");
    let mut c = Client::connect(&shared, "127.0.0.1");
    assert!(c.login(PASSWORD).await.starts_with("454 4.7.0"));
    write_secret_without_token(dir.path());
    let mut c = Client::connect(&shared, "127.0.0.1");
    assert!(c.login(PASSWORD).await.starts_with("454 4.7.0"));
    assert!(!c.heard.contains(TOKEN));
    // Counted: three temporary failures, by their upstream reasons.
    let metrics = encoded(&shared.metrics);
    for line in [
        r#"mailoauth_relay_authentications_total{protocol="smtp",outcome="temporary"} 3"#,
        r#"mailoauth_relay_upstream_failures_total{protocol="smtp",reason="unreachable"} 1"#,
        r#"mailoauth_relay_upstream_failures_total{protocol="smtp",reason="no_token"} 2"#,
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} not in\n{metrics}");
    }
    assert!(!metrics.contains(MAILBOX) && !metrics.contains("127.0.0.1"), "{metrics}");
}

/// The relay's metrics in the text format.
pub(super) fn encoded(metrics: &super::metrics::RelayMetrics) -> String {
    let mut registry = prometheus_client::registry::Registry::default();
    metrics.register(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    text
}

fn write_secret_without_token(dir: &Path) {
    let _ = std::fs::remove_file(dir.join("access_token"));
}

#[tokio::test]
async fn the_relay_does_not_start_without_a_relay_password() {
    let (ca, _) = pki();
    let dir = tempfile::tempdir().unwrap();
    write_secret(dir.path(), 1, TOKEN, &future());
    std::fs::remove_file(dir.path().join("relay_password")).unwrap();
    let mail = Settings::new(OutboundPolicy { allow_private: true }, std::slice::from_ref(&ca)).unwrap();
    let config = super::RelayConfig {
        source: super::source::Source::Mounted(dir.path().to_owned()),
        metrics: super::metrics::RelayMetrics::default(),
        smtp: Some("127.0.0.1:0".parse().unwrap()),
        smtps: None,
        imap: None,
        imaps: None,
        pop3: None,
        pop3s: None,
        cert_dir: None,
        allow_plaintext_auth: false,
        mail,
        limits: SessionLimits::default(),
        failures: FailureLimits::default(),
        max_connections: 4,
        name: "relay.test".to_owned(),
    };
    let err = super::Relay::bind(config).await.err().unwrap().to_string();
    assert!(err.contains("relay_password is missing"), "{err}");
}

#[test]
fn a_kubelet_update_is_read_from_the_new_version_of_the_directory() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (version, password) in [("..v1", "old password"), ("..v2", "new password")] {
        std::fs::create_dir(d.join(version)).unwrap();
        std::fs::write(d.join(version).join("username"), MAILBOX).unwrap();
        std::fs::write(d.join(version).join("relay_password"), password).unwrap();
    }
    std::os::unix::fs::symlink("..v1", d.join("..data")).unwrap();
    for key in ["username", "relay_password"] {
        std::os::unix::fs::symlink(format!("..data/{key}"), d.join(key)).unwrap();
    }
    assert!(super::secret::read(d).unwrap().accepts(MAILBOX, b"old password"));
    // kubelet's swap: a new ..data link renamed over the old one.
    std::os::unix::fs::symlink("..v2", d.join("..data_tmp")).unwrap();
    std::fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
    let now = super::secret::read(d).unwrap();
    assert!(now.accepts("SCANNER@example.com", b"new password") && !now.accepts(MAILBOX, b"old password"));
    assert!(!format!("{now:?}").contains("password\""));
}

#[test]
fn a_rotated_password_works_beside_the_new_one_until_its_grace_ends_and_senders_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let until = chrono::Utc::now() + chrono::Duration::hours(1);
    for (k, v) in [
        ("username", MAILBOX.to_owned()),
        ("relay_password", "new password".to_owned()),
        ("relay_previous_sha256", crate::policy::relay::sha256_hex("old password")),
        ("relay_previous_until", until.to_rfc3339()),
        ("relay_senders", "noreply@example.com, info@example.com".to_owned()),
    ] {
        std::fs::write(d.join(k), v).unwrap();
    }
    let m = super::secret::read(d).unwrap();
    assert!(m.accepts(MAILBOX, b"new password"));
    assert!(m.accepts(MAILBOX, b"old password"), "during the grace period");
    assert!(!m.accepts_at(MAILBOX, b"old password", until), "not from its end on");
    assert!(m.accepts_at(MAILBOX, b"new password", until));
    assert!(!m.accepts(MAILBOX, b"another password"));
    assert_eq!(m.senders(), vec![MAILBOX.to_owned(), "noreply@example.com".into(), "info@example.com".into()]);
    // A damaged digest is no password at all.
    std::fs::write(d.join("relay_previous_sha256"), "zz").unwrap();
    assert!(!super::secret::read(d).unwrap().accepts(MAILBOX, b"old password"));
}

#[tokio::test]
async fn a_sender_of_spec_relay_senders_is_accepted_and_others_still_refused() {
    let (ca, acceptor) = pki();
    let (port, seen) = upstream(acceptor, "250 ok").await;
    let dir = tempfile::tempdir().unwrap();
    write_secret(dir.path(), port, TOKEN, &future());
    std::fs::write(dir.path().join("relay_senders"), "noreply@example.com").unwrap();
    let shared = shared(dir.path(), &ca);
    let mut c = Client::connect(&shared, "127.0.0.1");
    assert!(c.login(PASSWORD).await.starts_with("235 "));
    assert!(c.send("MAIL FROM:<ceo@example.com>").await.starts_with("550 5.7.1"));
    assert!(c.send("MAIL FROM:<NoReply@example.com>").await.starts_with("250"));
    assert!(seen.lock().unwrap().iter().any(|l| l.contains("NoReply@example.com")));
    assert!(!seen.lock().unwrap().iter().any(|l| l.contains("ceo@example.com")));
}

#[tokio::test]
async fn a_pipelined_group_goes_upstream_in_order_and_a_foreign_sender_in_it_is_still_refused() {
    let (ca, acceptor) = pki();
    let (port, seen) = upstream(acceptor, "250 2.0.0 queued").await;
    let dir = tempfile::tempdir().unwrap();
    write_secret(dir.path(), port, TOKEN, &future());
    let shared = shared(dir.path(), &ca);
    let mut c = Client::connect(&shared, "127.0.0.1");
    assert!(c.login(PASSWORD).await.starts_with("235 "));
    // One write: a group the relay forwards whole, a foreign sender in the middle (answered by
    // the relay, in its place), a group after it ending in DATA, and the message and the next
    // command right behind (a client should wait for the 354; the relay still reads them in
    // order).
    let batch = format!(
        "RSET\r\nMAIL FROM:<{MAILBOX}>\r\nRCPT TO:<a@example.org>\r\nMAIL FROM:<ceo@example.com>\r\n\
         RCPT TO:<b@example.org>\r\nNOOP\r\nRSET\r\nMAIL FROM:<{MAILBOX}>\r\nRCPT TO:<c@example.org>\r\nDATA\r\n\
         Subject: x\r\n\r\nbody\n.\r\nQUIT\r\n"
    );
    c.wire.write(batch.as_bytes(), Duration::from_secs(5)).await.unwrap();
    let mut replies = Vec::new();
    for _ in 0..12 {
        replies.push(c.reply().await);
    }
    let codes: Vec<&str> = replies.iter().map(|r| r.get(..3).unwrap_or_default()).collect();
    assert_eq!(
        codes,
        ["250", "250", "250", "550", "250", "535", "250", "250", "250", "354", "250", "221"],
        "{replies:?}"
    );
    let upstream_saw = seen.lock().unwrap().clone();
    assert!(!upstream_saw.iter().any(|l| l.contains("ceo@example.com")), "{upstream_saw:?}");
    let after_login: Vec<&str> =
        upstream_saw.iter().map(String::as_str).skip_while(|l| !l.starts_with("RSET")).collect();
    assert_eq!(
        after_login,
        [
            "RSET",
            format!("MAIL FROM:<{MAILBOX}>").as_str(),
            "RCPT TO:<a@example.org>",
            "RCPT TO:<b@example.org>",
            "NOOP",
            "RSET",
            format!("MAIL FROM:<{MAILBOX}>").as_str(),
            "RCPT TO:<c@example.org>",
            "DATA",
            "Subject: x",
            "",
            "body",
            ".",
            "QUIT",
        ],
        "the upstream got every forwarded command once, in order"
    );
}

#[tokio::test]
async fn a_pipelined_group_longer_than_the_bound_goes_in_several_writes_every_reply_in_order() {
    let (ca, acceptor) = pki();
    let (port, seen) = upstream(acceptor, "250 ok").await;
    let dir = tempfile::tempdir().unwrap();
    write_secret(dir.path(), port, TOKEN, &future());
    let shared = shared(dir.path(), &ca);
    let mut c = Client::connect(&shared, "127.0.0.1");
    assert!(c.login(PASSWORD).await.starts_with("235 "));
    let mut batch = format!("MAIL FROM:<{MAILBOX}>\r\n");
    for i in 0..150 {
        batch.push_str(&format!("RCPT TO:<r{i}@example.org>\r\n"));
    }
    c.wire.write(batch.as_bytes(), Duration::from_secs(5)).await.unwrap();
    for _ in 0..151 {
        assert!(c.reply().await.starts_with("250 "), "{}", c.heard);
    }
    assert!(c.send("QUIT").await.starts_with("221 "));
    let rcpts: Vec<String> = seen.lock().unwrap().iter().filter(|l| l.starts_with("RCPT")).cloned().collect();
    assert_eq!(rcpts, (0..150).map(|i| format!("RCPT TO:<r{i}@example.org>")).collect::<Vec<_>>());
}

#[tokio::test(start_paused = true)]
async fn a_client_trickling_a_byte_a_minute_is_closed_at_the_login_deadline() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (ca, _acceptor) = pki();
    let dir = tempfile::tempdir().unwrap();
    write_secret(dir.path(), 1, TOKEN, &future());
    let shared = shared(dir.path(), &ca);
    let (mut client, server) = tokio::io::duplex(64 * 1024);
    let session = tokio::spawn(super::smtp::session(Box::new(server), "127.0.0.1".parse().unwrap(), false, shared));
    let mut greeting = [0_u8; 64];
    assert!(client.read(&mut greeting).await.unwrap() > 0);
    let started = tokio::time::Instant::now();
    // One byte every 50 s: never a whole line, never idle for the 60 s a read may wait.
    while !session.is_finished() {
        let _ = client.write_all(b"N").await;
        tokio::time::sleep(Duration::from_secs(50)).await;
        assert!(started.elapsed() < Duration::from_secs(600), "still held after 10 minutes");
    }
    let held = started.elapsed();
    assert!(held >= super::LOGIN_DEADLINE && held <= super::LOGIN_DEADLINE + Duration::from_secs(60), "{held:?}");
}
