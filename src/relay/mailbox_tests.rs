//! The relay's IMAP and POP3 listeners against scripted upstream servers (in-process, STARTTLS
//! or STLS with an rcgen CA, XOAUTH2 checked against the token), with a client over an in-memory
//! pipe whose source address the test chooses (loopback or not).

use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use tokio::net::TcpListener;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::guard::{FailureLimits, Failures};
use super::tests::{MAILBOX, PASSWORD, TOKEN, b64, future, pki};
use super::tls::CertDir;
use super::wire::Wire;
use super::{SessionLimits, Shared};
use crate::mail::{Limits, Settings};
use crate::oauth::http::OutboundPolicy;
use crate::policy::publish::xoauth2;

/// Every line the upstream received.
type Seen = Arc<Mutex<Vec<String>>>;

const WAIT: Duration = Duration::from_secs(5);

/// A message body with every byte value, CRLF lines and lines that start with a dot.
fn body(size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(size);
    let mut i: usize = 0;
    while out.len() < size {
        match i % 97 {
            0 => out.extend_from_slice(b"\r\n.dot line\r\n"),
            n => out.push(u8::try_from((i * 31 + n) % 256).unwrap()),
        }
        i += 1;
    }
    out
}

/// Without bare CR or LF (a POP3 message is lines).
fn lines_body(size: usize) -> Vec<u8> {
    body(size)
        .into_iter()
        .map(|b| if b == b'\r' || b == b'\n' || b == 0 { b'x' } else { b })
        .collect::<Vec<u8>>()
        .chunks(70)
        .flat_map(|c| {
            let mut line = c.to_vec();
            if line.first() == Some(&b'x') {
                line.insert(0, b'.');
            }
            line.extend_from_slice(b"\r\n");
            line
        })
        .collect()
}

async fn listen() -> (TcpListener, u16) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    (listener, port)
}

/// An IMAP server: STARTTLS, AUTHENTICATE XOAUTH2 (two steps) accepting only `TOKEN` for
/// `MAILBOX` (or refusing every login with `refuse`), then SELECT, FETCH (a 200 KiB literal),
/// APPEND (a literal), IDLE (an EXISTS while idling), LOGOUT.
async fn imap_upstream(acceptor: TlsAcceptor, refuse: Option<&'static str>) -> (u16, Seen) {
    let (listener, port) = listen().await;
    let seen: Seen = Arc::default();
    let log = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            let (acceptor, log) = (acceptor.clone(), log.clone());
            tokio::spawn(async move {
                let mut w = Wire::new(Box::new(tcp), Vec::new(), 64 * 1024);
                w.write_line("* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] upstream ready", WAIT).await.unwrap();
                while let Ok(line) = w.read_line(WAIT).await {
                    let line = String::from_utf8_lossy(&line).into_owned();
                    log.lock().unwrap().push(line.clone());
                    let mut words = line.splitn(3, ' ');
                    let tag = words.next().unwrap_or_default().to_owned();
                    let verb = words.next().unwrap_or_default().to_ascii_uppercase();
                    let rest = words.next().unwrap_or_default().to_owned();
                    let reply: Vec<u8> = match verb.as_str() {
                        "STARTTLS" => {
                            w.write_line(&format!("{tag} OK go"), WAIT).await.unwrap();
                            let stream = acceptor.accept(w.into_stream().unwrap()).await.unwrap();
                            w = Wire::new(Box::new(stream), Vec::new(), 64 * 1024);
                            continue;
                        }
                        "CAPABILITY" => {
                            format!("* CAPABILITY IMAP4rev1 SASL-IR IDLE AUTH=XOAUTH2\r\n{tag} OK done\r\n").into()
                        }
                        "AUTHENTICATE" => {
                            w.write_line("+ ", WAIT).await.unwrap();
                            let response = String::from_utf8(w.read_line(WAIT).await.unwrap()).unwrap();
                            log.lock().unwrap().push(response.clone());
                            match refuse {
                                Some(text) => format!("{tag} NO {text}\r\n").into(),
                                None if response == xoauth2(MAILBOX, TOKEN) => {
                                    format!("{tag} OK [CAPABILITY IMAP4rev1 IDLE MOVE AUTH=XOAUTH2] Logged in\r\n")
                                        .into()
                                }
                                None => format!("{tag} NO [AUTHENTICATIONFAILED] bad token\r\n").into(),
                            }
                        }
                        "SELECT" => format!("* 1 EXISTS\r\n{tag} OK [READ-WRITE] SELECT completed\r\n").into(),
                        "FETCH" => {
                            let b = body(200 * 1024);
                            let mut out = format!("* 1 FETCH (BODY[] {{{}}}\r\n", b.len()).into_bytes();
                            out.extend_from_slice(&b);
                            out.extend_from_slice(format!(")\r\n{tag} OK FETCH completed\r\n").as_bytes());
                            out
                        }
                        "APPEND" => {
                            let n: usize = rest.rsplit('{').next().unwrap().trim_end_matches('}').parse().unwrap();
                            w.write_line("+ go ahead", WAIT).await.unwrap();
                            let got = w.read_exact(n, WAIT).await.unwrap();
                            assert_eq!(got, body(n));
                            let _ = w.read_line(WAIT).await.unwrap();
                            format!("{tag} OK APPEND completed, {n} bytes\r\n").into()
                        }
                        "IDLE" => {
                            w.write_line("+ idling", WAIT).await.unwrap();
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            w.write_line("* 2 EXISTS", WAIT).await.unwrap();
                            let done = w.read_line(WAIT).await.unwrap();
                            log.lock().unwrap().push(String::from_utf8_lossy(&done).into_owned());
                            format!("{tag} OK IDLE terminated\r\n").into()
                        }
                        "LOGOUT" => {
                            let _ = w.write(format!("* BYE\r\n{tag} OK LOGOUT completed\r\n").as_bytes(), WAIT).await;
                            return;
                        }
                        _ => format!("{tag} BAD unknown\r\n").into(),
                    };
                    if w.write(&reply, WAIT).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (port, seen)
}

/// A POP3 server: STLS, AUTH XOAUTH2 (two steps) accepting only `TOKEN` for `MAILBOX` (or
/// refusing with `refuse`), then STAT, RETR (a dot-stuffed 50 KiB message), QUIT.
async fn pop3_upstream(acceptor: TlsAcceptor, refuse: Option<&'static str>) -> (u16, Seen) {
    let (listener, port) = listen().await;
    let seen: Seen = Arc::default();
    let log = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            let (acceptor, log) = (acceptor.clone(), log.clone());
            tokio::spawn(async move {
                let mut w = Wire::new(Box::new(tcp), Vec::new(), 64 * 1024);
                w.write_line("+OK upstream ready", WAIT).await.unwrap();
                let message = lines_body(50 * 1024);
                while let Ok(line) = w.read_line(WAIT).await {
                    let line = String::from_utf8_lossy(&line).into_owned();
                    log.lock().unwrap().push(line.clone());
                    let verb = line.split(' ').next().unwrap_or_default().to_ascii_uppercase();
                    let reply: Vec<u8> = match verb.as_str() {
                        "CAPA" => b"+OK\r\nSTLS\r\nSASL XOAUTH2\r\nUSER\r\n.\r\n".to_vec(),
                        "STLS" => {
                            w.write_line("+OK go", WAIT).await.unwrap();
                            let stream = acceptor.accept(w.into_stream().unwrap()).await.unwrap();
                            w = Wire::new(Box::new(stream), Vec::new(), 64 * 1024);
                            continue;
                        }
                        "AUTH" => {
                            w.write_line("+ ", WAIT).await.unwrap();
                            let response = String::from_utf8(w.read_line(WAIT).await.unwrap()).unwrap();
                            log.lock().unwrap().push(response.clone());
                            match refuse {
                                Some(text) => format!("-ERR {text}\r\n").into(),
                                None if response == xoauth2(MAILBOX, TOKEN) => b"+OK logged in\r\n".to_vec(),
                                None => b"-ERR [AUTH] bad token\r\n".to_vec(),
                            }
                        }
                        "STAT" => format!("+OK 1 {}\r\n", message.len()).into(),
                        "RETR" => {
                            let mut out = format!("+OK {} octets\r\n", message.len()).into_bytes();
                            out.extend_from_slice(&message);
                            out.extend_from_slice(b".\r\n");
                            out
                        }
                        "QUIT" => {
                            let _ = w.write_line("+OK bye", WAIT).await;
                            return;
                        }
                        _ => b"-ERR unknown\r\n".to_vec(),
                    };
                    if w.write(&reply, WAIT).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (port, seen)
}

fn write_secret(dir: &Path, imap_port: u16, pop3_port: u16, expires_at: &str) {
    for (k, v) in [
        ("username", MAILBOX),
        ("relay_password", PASSWORD),
        ("access_token", TOKEN),
        ("expires_at", expires_at),
        ("imap_host", "localhost"),
        ("imap_port", &imap_port.to_string()),
        ("pop3_host", "localhost"),
        ("pop3_port", &pop3_port.to_string()),
    ] {
        std::fs::write(dir.join(k), v).unwrap();
    }
}

/// The relay's own certificate (for `localhost`) in `dir`, from a CA of its own, returned.
fn relay_certificate(dir: &Path) -> CertificateDer<'static> {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_owned()]).unwrap().signed_by(&key, &issuer).unwrap();
    std::fs::write(dir.join("tls.crt"), cert.pem()).unwrap();
    std::fs::write(dir.join("tls.key"), key.serialize_pem()).unwrap();
    ca_cert.der().clone()
}

fn shared(dir: &Path, ca: &CertificateDer<'static>, certs: Option<CertDir>) -> Arc<Shared> {
    let limits = SessionLimits { max_line: 1024, commands_before_auth: 12, ..SessionLimits::default() };
    shared_with(dir, ca, certs, limits)
}

fn shared_with(dir: &Path, ca: &CertificateDer<'static>, certs: Option<CertDir>, limits: SessionLimits) -> Arc<Shared> {
    let mut mail = Settings::new(OutboundPolicy { allow_private: true }, std::slice::from_ref(ca)).unwrap();
    mail.limits = Limits { overall: Duration::from_secs(4), reply: Duration::from_secs(2), ..Limits::default() };
    Arc::new(Shared {
        source: super::source::Source::Mounted(dir.to_owned()),
        metrics: super::metrics::RelayMetrics::default(),
        certs,
        allow_plaintext_auth: false,
        mail,
        limits,
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
    /// Everything the relay sent, as text.
    heard: String,
}

impl Client {
    fn imap(shared: &Arc<Shared>, peer: &str) -> Self {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let peer: IpAddr = peer.parse().unwrap();
        tokio::spawn(super::imap::session(Box::new(b), peer, false, shared.clone()));
        Client { wire: Wire::new(Box::new(a), Vec::new(), 64 * 1024), heard: String::new() }
    }

    fn pop3(shared: &Arc<Shared>, peer: &str) -> Self {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let peer: IpAddr = peer.parse().unwrap();
        tokio::spawn(super::pop3::session(Box::new(b), peer, false, shared.clone()));
        Client { wire: Wire::new(Box::new(a), Vec::new(), 64 * 1024), heard: String::new() }
    }

    async fn line(&mut self) -> String {
        let line = String::from_utf8(self.wire.read_line(Duration::from_secs(10)).await.unwrap()).unwrap();
        self.heard.push_str(&line);
        self.heard.push('\n');
        line
    }

    async fn write(&mut self, line: &str) {
        self.wire.write_line(line, WAIT).await.unwrap();
    }

    /// Sends an IMAP command; the lines up to and including the one tagged `tag`.
    async fn imap_command(&mut self, tag: &str, line: &str) -> String {
        self.write(line).await;
        self.until_tagged(tag).await
    }

    async fn until_tagged(&mut self, tag: &str) -> String {
        let mut lines = Vec::new();
        loop {
            let line = self.line().await;
            let done = line.starts_with(&format!("{tag} "));
            lines.push(line);
            if done {
                return lines.join("\n");
            }
        }
    }

    /// Sends a POP3 command; its one-line answer.
    async fn pop3_command(&mut self, line: &str) -> String {
        self.write(line).await;
        self.line().await
    }

    /// Whether the relay closed the connection (nothing more to read).
    async fn closed(&mut self) -> bool {
        matches!(self.wire.read_line(Duration::from_secs(5)).await, Err(super::wire::WireError::Closed))
    }
}

fn quoted(password: &str) -> String {
    format!("\"{}\"", password.replace('\\', "\\\\").replace('"', "\\\""))
}

#[tokio::test]
async fn imap_login_then_select_fetch_append_and_idle_pass_through_unchanged() {
    let (ca, acceptor) = pki();
    let (port, seen) = imap_upstream(acceptor, None).await;
    let dir = tempfile::tempdir().unwrap();
    write_secret(dir.path(), port, 1, &future());
    let shared = shared(dir.path(), &ca, None);
    let mut c = Client::imap(&shared, "127.0.0.1");
    let greeting = c.line().await;
    assert!(greeting.starts_with("* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN]"), "{greeting}");
    assert!(c.imap_command("c1", "c1 CAPABILITY").await.contains("* CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN"));
    assert!(c.imap_command("c2", "c2 SELECT INBOX").await.starts_with("c2 BAD"));
    let ok = c.imap_command("c3", &format!("c3 LOGIN {MAILBOX} {}", quoted(PASSWORD))).await;
    // The upstream's capabilities, without its AUTH=.
    assert_eq!(ok, "c3 OK [CAPABILITY IMAP4rev1 IDLE MOVE] Logged in");
    // From here the upstream answers.
    assert!(c.imap_command("c4", "c4 SELECT INBOX").await.contains("c4 OK [READ-WRITE]"));
    c.write("c5 FETCH 1 BODY[]").await;
    let head = c.line().await;
    let expected = body(200 * 1024);
    assert_eq!(head, format!("* 1 FETCH (BODY[] {{{}}}", expected.len()));
    assert_eq!(c.wire.read_exact(expected.len(), WAIT).await.unwrap(), expected);
    assert_eq!(c.until_tagged("c5").await, ")\nc5 OK FETCH completed");
    // A literal after the login goes through as bytes.
    let append = body(10_000);
    c.write(&format!("c6 APPEND INBOX {{{}}}", append.len())).await;
    assert_eq!(c.line().await, "+ go ahead");
    c.wire.write(&append, WAIT).await.unwrap();
    assert_eq!(c.imap_command("c6", "").await, "c6 OK APPEND completed, 10000 bytes");
    // IDLE: the continuation, a new message while idling, DONE.
    c.write("c7 IDLE").await;
    assert_eq!(c.line().await, "+ idling");
    assert_eq!(c.line().await, "* 2 EXISTS");
    assert_eq!(c.imap_command("c7", "DONE").await, "c7 OK IDLE terminated");
    assert!(c.imap_command("c8", "c8 LOGOUT").await.ends_with("c8 OK LOGOUT completed"));
    let upstream = seen.lock().unwrap().join("\n");
    assert!(upstream.contains("AUTHENTICATE XOAUTH2") && upstream.contains("DONE"), "{upstream}");
    assert!(!upstream.contains(PASSWORD) && !upstream.contains("LOGIN"), "{upstream}");
    assert!(!c.heard.contains(TOKEN) && !c.heard.contains(&xoauth2(MAILBOX, TOKEN)));
}

#[tokio::test]
async fn imap_authenticate_plain_in_two_steps_with_sasl_ir_and_login_with_literals() {
    let (ca, acceptor) = pki();
    let (port, _) = imap_upstream(acceptor, None).await;
    let dir = tempfile::tempdir().unwrap();
    write_secret(dir.path(), port, 1, &future());
    let shared = shared(dir.path(), &ca, None);
    let response = b64(&format!("\0{MAILBOX}\0{PASSWORD}"));

    let mut c = Client::imap(&shared, "::1");
    c.line().await;
    c.write("a1 AUTHENTICATE PLAIN").await;
    assert_eq!(c.line().await, "+ ");
    assert!(c.imap_command("a1", &response).await.starts_with("a1 OK [CAPABILITY"), "{}", c.heard);

    let mut c = Client::imap(&shared, "127.0.0.1");
    c.line().await;
    assert!(c.imap_command("a2", &format!("a2 authenticate plain {response}")).await.starts_with("a2 OK"));

    // Cancelled, then a response that is not base64, then the right one: the session goes on.
    let mut c = Client::imap(&shared, "127.0.0.1");
    c.line().await;
    c.write("a3 AUTHENTICATE PLAIN").await;
    c.line().await;
    assert!(c.imap_command("a3", "*").await.starts_with("a3 BAD"));
    assert!(c.imap_command("a4", "a4 AUTHENTICATE PLAIN !!").await.starts_with("a4 BAD"));
    assert!(c.imap_command("a5", "a5 AUTHENTICATE XOAUTH2").await.starts_with("a5 NO"));

    // LOGIN with two synchronizing literals (the password has a space, a quote and a brace).
    c.write(&format!("a6 LOGIN {{{}}}", MAILBOX.len())).await;
    assert!(c.line().await.starts_with("+ "));
    c.write(&format!("{MAILBOX} {{{}}}", PASSWORD.len())).await;
    assert!(c.line().await.starts_with("+ "));
    assert!(c.imap_command("a6", PASSWORD).await.starts_with("a6 OK"), "{}", c.heard);
    // A non-synchronizing literal (LITERAL+) is taken too.
    let mut c = Client::imap(&shared, "127.0.0.1");
    c.line().await;
    c.write(&format!("a7 LOGIN {MAILBOX} {{{}+}}", PASSWORD.len())).await;
    assert!(c.imap_command("a7", PASSWORD).await.starts_with("a7 OK"), "{}", c.heard);
}

#[tokio::test]
async fn imap_wrong_passwords_are_authenticationfailed_slowed_then_refused() {
    let (ca, acceptor) = pki();
    let (port, seen) = imap_upstream(acceptor, None).await;
    let dir = tempfile::tempdir().unwrap();
    write_secret(dir.path(), port, 1, &future());
    let shared = shared(dir.path(), &ca, None);
    let mut c = Client::imap(&shared, "127.0.0.1");
    c.line().await;
    let started = Instant::now();
    assert_eq!(
        c.imap_command("w1", &format!("w1 LOGIN {MAILBOX} wrong")).await,
        "w1 NO [AUTHENTICATIONFAILED] Authentication failed"
    );
    let plain = b64(&format!("\0{MAILBOX}\0also wrong"));
    assert!(
        c.imap_command("w2", &format!("w2 AUTHENTICATE PLAIN {plain}"))
            .await
            .starts_with("w2 NO [AUTHENTICATIONFAILED]")
    );
    assert!(started.elapsed() >= Duration::from_millis(600), "{:?}", started.elapsed());
    // The third reaches the limit: answered, BYE, closed; the source is refused at connect.
    assert!(
        c.imap_command("w3", &format!("w3 LOGIN {MAILBOX} wrong")).await.starts_with("w3 NO [AUTHENTICATIONFAILED]")
    );
    assert!(c.line().await.starts_with("* BYE"));
    assert!(c.closed().await);
    let mut c = Client::imap(&shared, "127.0.0.1");
    assert!(c.line().await.starts_with("* BYE [UNAVAILABLE]"));
    // The upstream was never contacted.
    assert!(seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn imap_without_tls_from_the_network_refuses_logins_until_starttls() {
    let (ca, acceptor) = pki();
    let (port, seen) = imap_upstream(acceptor, None).await;
    let dir = tempfile::tempdir().unwrap();
    write_secret(dir.path(), port, 1, &future());
    let certs = tempfile::tempdir().unwrap();
    let relay_ca = relay_certificate(certs.path());
    let shared = shared(dir.path(), &ca, Some(CertDir::load(certs.path().to_owned()).unwrap()));
    let mut c = Client::imap(&shared, "192.0.2.10");
    let greeting = c.line().await;
    assert!(greeting.contains("STARTTLS LOGINDISABLED]") && !greeting.contains("AUTH="), "{greeting}");
    let privacy = c.imap_command("p1", &format!("p1 LOGIN {MAILBOX} {}", quoted(PASSWORD))).await;
    assert!(privacy.starts_with("p1 NO [PRIVACYREQUIRED]"), "{privacy}");
    assert!(c.imap_command("p2", "p2 AUTHENTICATE PLAIN").await.starts_with("p2 NO [PRIVACYREQUIRED]"));
    // A literal password is refused before the client sends it: no "+".
    let refused = c.imap_command("p3", &format!("p3 LOGIN {MAILBOX} {{{}}}", PASSWORD.len())).await;
    assert!(refused.starts_with("p3 NO [PRIVACYREQUIRED]"), "{refused}");
    assert_eq!(c.imap_command("p4", "p4 STARTTLS").await, "p4 OK Begin TLS negotiation now");
    let plain = std::mem::replace(&mut c.wire, Wire::new(Box::new(tokio::io::empty()), Vec::new(), 1)).into_stream();
    let connector = TlsConnector::from(crate::mail::tls_config(&[relay_ca]).unwrap());
    let tls = connector.connect(ServerName::try_from("localhost").unwrap(), plain.unwrap()).await.unwrap();
    c.wire = Wire::new(Box::new(tls), Vec::new(), 64 * 1024);
    let caps = c.imap_command("p5", "p5 CAPABILITY").await;
    assert!(caps.contains("AUTH=PLAIN") && !caps.contains("STARTTLS") && !caps.contains("LOGINDISABLED"), "{caps}");
    assert!(c.imap_command("p6", "p6 STARTTLS").await.starts_with("p6 BAD"));
    assert!(c.imap_command("p7", &format!("p7 LOGIN {MAILBOX} {}", quoted(PASSWORD))).await.starts_with("p7 OK"));
    assert!(c.imap_command("p8", "p8 SELECT INBOX").await.contains("p8 OK"));
    assert!(!seen.lock().unwrap().iter().any(|l| l.contains(PASSWORD)));
}

#[tokio::test]
async fn imap_literals_and_commands_before_login_are_bounded() {
    let (ca, acceptor) = pki();
    let (port, _) = imap_upstream(acceptor, None).await;
    let dir = tempfile::tempdir().unwrap();
    write_secret(dir.path(), port, 1, &future());
    let shared = shared(dir.path(), &ca, None);
    let mut c = Client::imap(&shared, "127.0.0.1");
    c.line().await;
    // Larger than the line bound (1 KiB here): refused before it is sent; the session goes on.
    assert_eq!(c.imap_command("l1", "l1 LOGIN {5000}").await, "l1 BAD Literal too large");
    assert!(c.imap_command("l2", "l2 NOOP").await.starts_with("l2 OK"));
    // Two literals that fit alone but not together.
    c.write("l3 LOGIN {600}").await;
    c.line().await;
    c.wire.write(&[b'u'; 600], WAIT).await.unwrap();
    assert_eq!(c.imap_command("l3", " {600}").await, "l3 BAD Literal too large");
    // A non-synchronizing literal too large: the command cannot be found again, so BYE.
    c.write("l4 LOGIN {5000+}").await;
    assert!(c.line().await.starts_with("* BYE"));
    assert!(c.closed().await);
    // Commands before the login: at most 12 here.
    let mut c = Client::imap(&shared, "127.0.0.1");
    c.line().await;
    for i in 0..12 {
        assert!(c.imap_command("n", "n NOOP").await.starts_with("n OK"), "{i}");
    }
    assert_eq!(c.line().await, "* BYE Too many commands before authentication");
    // An overlong line.
    let mut c = Client::imap(&shared, "127.0.0.1");
    c.line().await;
    c.write(&format!("x LOGIN {}", "u".repeat(2000))).await;
    assert!(c.line().await.starts_with("* BYE"));
}

#[tokio::test]
async fn imap_upstream_trouble_and_an_expired_token_are_unavailable_not_success() {
    let (ca, acceptor) = pki();
    let (refusing, _) = imap_upstream(acceptor.clone(), Some("[AUTHENTICATIONFAILED] token revoked")).await;
    let dir = tempfile::tempdir().unwrap();
    let shared = shared(dir.path(), &ca, None);
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap().port();
    let login = format!("t LOGIN {MAILBOX} {}", quoted(PASSWORD));
    for (port, expires) in [(refusing, future()), (closed, future()), (refusing, "2020-01-01T00:00:00Z".to_owned())] {
        write_secret(dir.path(), port, 1, &expires);
        let mut c = Client::imap(&shared, "127.0.0.1");
        c.line().await;
        let answer = c.imap_command("t", &login).await;
        assert!(answer.starts_with("t NO [UNAVAILABLE] Temporary failure"), "{port} {expires}: {answer}");
        // The session stays open and unauthenticated.
        assert!(c.imap_command("s", "s SELECT INBOX").await.starts_with("s BAD"));
        assert!(!c.heard.contains(TOKEN));
    }
    // No IMAP server published.
    write_secret(dir.path(), refusing, 1, &future());
    std::fs::remove_file(dir.path().join("imap_host")).unwrap();
    let mut c = Client::imap(&shared, "127.0.0.1");
    c.line().await;
    assert!(c.imap_command("t", &login).await.contains("no upstream server known"));
}

#[tokio::test]
async fn pop3_user_pass_then_stat_and_retr_pass_through_byte_for_byte() {
    let (ca, acceptor) = pki();
    let (port, seen) = pop3_upstream(acceptor, None).await;
    let dir = tempfile::tempdir().unwrap();
    write_secret(dir.path(), 1, port, &future());
    let shared = shared(dir.path(), &ca, None);
    let mut c = Client::pop3(&shared, "127.0.0.1");
    assert!(c.line().await.starts_with("+OK relay.test"));
    c.write("CAPA").await;
    let mut capa = Vec::new();
    loop {
        let line = c.line().await;
        if line == "." {
            break;
        }
        capa.push(line);
    }
    assert_eq!(capa, ["+OK Capability list follows", "USER", "SASL PLAIN", "RESP-CODES", "AUTH-RESP-CODE"]);
    assert!(c.pop3_command("STAT").await.starts_with("-ERR"));
    assert!(c.pop3_command("PASS x").await.starts_with("-ERR"));
    assert!(c.pop3_command(&format!("USER {MAILBOX}")).await.starts_with("+OK"));
    assert_eq!(c.pop3_command(&format!("PASS {PASSWORD}")).await, "+OK Logged in");
    let message = lines_body(50 * 1024);
    assert_eq!(c.pop3_command("STAT").await, format!("+OK 1 {}", message.len()));
    c.write("RETR 1").await;
    assert_eq!(c.line().await, format!("+OK {} octets", message.len()));
    let mut expected = message.clone();
    expected.extend_from_slice(b".\r\n");
    assert_eq!(c.wire.read_exact(expected.len(), WAIT).await.unwrap(), expected);
    assert_eq!(c.pop3_command("QUIT").await, "+OK bye");
    let upstream = seen.lock().unwrap().join("\n");
    assert!(upstream.contains("AUTH XOAUTH2") && upstream.contains("RETR 1"), "{upstream}");
    assert!(!upstream.contains(PASSWORD) && !upstream.contains("USER"), "{upstream}");
}

#[tokio::test]
async fn pop3_auth_plain_two_step_and_initial_a_wrong_password_and_upstream_trouble() {
    let (ca, acceptor) = pki();
    let (port, _) = pop3_upstream(acceptor.clone(), None).await;
    let (refusing, _) = pop3_upstream(acceptor, Some("[SYS/TEMP] maintenance")).await;
    let dir = tempfile::tempdir().unwrap();
    write_secret(dir.path(), 1, port, &future());
    let shared = shared(dir.path(), &ca, None);
    let response = b64(&format!("\0{MAILBOX}\0{PASSWORD}"));

    let mut c = Client::pop3(&shared, "127.0.0.1");
    c.line().await;
    assert_eq!(c.pop3_command("AUTH").await, "+OK");
    assert_eq!(c.line().await, "PLAIN");
    assert_eq!(c.line().await, ".");
    assert!(c.pop3_command("AUTH XOAUTH2").await.starts_with("-ERR"));
    assert_eq!(c.pop3_command("AUTH PLAIN").await, "+ ");
    assert_eq!(c.pop3_command(&response).await, "+OK Logged in");
    assert!(c.pop3_command("STAT").await.starts_with("+OK 1 "));

    let mut c = Client::pop3(&shared, "127.0.0.1");
    c.line().await;
    assert_eq!(c.pop3_command(&format!("AUTH PLAIN {response}")).await, "+OK Logged in");

    let mut c = Client::pop3(&shared, "127.0.0.1");
    c.line().await;
    c.pop3_command(&format!("USER {MAILBOX}")).await;
    assert_eq!(c.pop3_command("PASS wrong").await, "-ERR [AUTH] Authentication failed");
    let wrong = b64(&format!("\0{MAILBOX}\0wrong"));
    assert_eq!(c.pop3_command(&format!("AUTH PLAIN {wrong}")).await, "-ERR [AUTH] Authentication failed");

    // The upstream refuses, or the token has expired: temporary, the session goes on.
    for (port, expires) in [(refusing, future()), (port, "2020-01-01T00:00:00Z".to_owned())] {
        write_secret(dir.path(), 1, port, &expires);
        let mut c = Client::pop3(&shared, "::1");
        c.line().await;
        c.pop3_command(&format!("USER {MAILBOX}")).await;
        let answer = c.pop3_command(&format!("PASS {PASSWORD}")).await;
        assert!(answer.starts_with("-ERR [SYS/TEMP] Temporary failure"), "{answer}");
        assert!(c.pop3_command("STAT").await.starts_with("-ERR"));
    }
}

#[tokio::test]
async fn pop3_without_tls_from_the_network_offers_and_accepts_no_login() {
    let (ca, acceptor) = pki();
    let (port, seen) = pop3_upstream(acceptor, None).await;
    let dir = tempfile::tempdir().unwrap();
    write_secret(dir.path(), 1, port, &future());
    let shared = shared(dir.path(), &ca, None);
    let mut c = Client::pop3(&shared, "192.0.2.10");
    c.line().await;
    c.write("CAPA").await;
    let mut capa = Vec::new();
    loop {
        let line = c.line().await;
        if line == "." {
            break;
        }
        capa.push(line);
    }
    assert_eq!(capa, ["+OK Capability list follows", "RESP-CODES", "AUTH-RESP-CODE"]);
    for command in [format!("USER {MAILBOX}"), format!("PASS {PASSWORD}"), "AUTH PLAIN".to_owned()] {
        assert!(c.pop3_command(&command).await.starts_with("-ERR [AUTH] Plaintext authentication is disallowed"));
    }
    assert!(c.pop3_command("STLS").await.starts_with("-ERR STLS is not offered"));
    assert_eq!(c.pop3_command("QUIT").await, "+OK Bye");
    assert!(seen.lock().unwrap().is_empty());
}

fn config(dir: &Path, ca: &CertificateDer<'static>) -> super::RelayConfig {
    super::RelayConfig {
        source: super::source::Source::Mounted(dir.to_owned()),
        metrics: super::metrics::RelayMetrics::default(),
        smtp: None,
        smtps: None,
        imap: None,
        imaps: None,
        pop3: None,
        pop3s: None,
        cert_dir: None,
        allow_plaintext_auth: false,
        mail: Settings::new(OutboundPolicy { allow_private: true }, std::slice::from_ref(ca)).unwrap(),
        limits: SessionLimits::default(),
        failures: FailureLimits::default(),
        max_connections: 1,
        name: "relay.test".to_owned(),
    }
}

#[tokio::test]
async fn listeners_need_a_certificate_for_implicit_tls_and_refuse_beyond_the_connection_bound() {
    let (ca, _) = pki();
    let dir = tempfile::tempdir().unwrap();
    write_secret(dir.path(), 1, 1, &future());
    let err = super::Relay::bind(super::RelayConfig {
        imaps: Some("127.0.0.1:0".parse().unwrap()),
        ..config(dir.path(), &ca)
    })
    .await
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("--imaps-address") && err.contains("--tls-cert-dir"), "{err}");
    let err = super::Relay::bind(config(dir.path(), &ca)).await.err().unwrap().to_string();
    assert!(err.contains("--pop3-address"), "{err}");

    // One connection slot: the second client of each protocol is told so in its own protocol.
    let relay = super::Relay::bind(super::RelayConfig {
        imap: Some("127.0.0.1:0".parse().unwrap()),
        pop3: Some("127.0.0.1:0".parse().unwrap()),
        ..config(dir.path(), &ca)
    })
    .await
    .unwrap();
    let imap = relay.address(super::Service::Imap, false).unwrap();
    let pop3 = relay.address(super::Service::Pop3, false).unwrap();
    assert!(relay.address(super::Service::Imap, true).is_none());
    tokio::spawn(relay.serve(std::future::pending()));
    let open = |address| async move {
        let tcp = tokio::net::TcpStream::connect(address).await.unwrap();
        let mut wire = Wire::new(Box::new(tcp), Vec::new(), 4096);
        String::from_utf8(wire.read_line(WAIT).await.unwrap()).unwrap()
    };
    let first = tokio::net::TcpStream::connect(imap).await.unwrap();
    let mut first = Wire::new(Box::new(first), Vec::new(), 4096);
    assert!(String::from_utf8(first.read_line(WAIT).await.unwrap()).unwrap().starts_with("* OK [CAPABILITY"));
    assert_eq!(open(imap).await, "* BYE [UNAVAILABLE] Too many connections, try again later");
    assert_eq!(open(pop3).await, "-ERR [SYS/TEMP] Too many connections, try again later");
    first.write_line("a LOGOUT", WAIT).await.unwrap();
    assert!(String::from_utf8(first.read_line(WAIT).await.unwrap()).unwrap().starts_with("* BYE"));
    // The slot is free again once the session has ended.
    let deadline = Instant::now() + WAIT;
    loop {
        let greeting = open(pop3).await;
        if greeting.starts_with("+OK") {
            break;
        }
        assert!(Instant::now() < deadline, "{greeting}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_logged_in_session_ends_after_the_idle_bound_without_a_byte_either_way() {
    let (ca, acceptor) = pki();
    let (port, _) = imap_upstream(acceptor, None).await;
    let dir = tempfile::tempdir().unwrap();
    write_secret(dir.path(), port, 1, &future());
    let limits = SessionLimits { idle_mailbox: Duration::from_millis(600), ..SessionLimits::default() };
    let shared = shared_with(dir.path(), &ca, None, limits);
    let mut c = Client::imap(&shared, "127.0.0.1");
    c.line().await;
    assert!(c.imap_command("a", &format!("a LOGIN {MAILBOX} {}", quoted(PASSWORD))).await.starts_with("a OK"));
    // Traffic keeps it open past the bound...
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(c.imap_command("s", "s SELECT INBOX").await.contains("s OK"));
    }
    // ...silence closes it.
    let started = Instant::now();
    assert!(c.closed().await);
    assert!(started.elapsed() >= Duration::from_millis(500), "{:?}", started.elapsed());
}
