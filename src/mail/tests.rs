//! The mail clients against scripted servers (in-process tokio listeners, TLS with an rcgen CA):
//! the exact client bytes of each protocol, Exchange's answers, STARTTLS downgrades, a
//! certificate for another host, a long token at a server that cuts long first lines, and hostile
//! servers (endless lines, endless replies, silence).

use std::sync::Arc;
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
use secrecy::SecretString;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::*;
use crate::policy::publish::xoauth2;
use crate::policy::verify::{Check, GrantKind, VerifyReason, classify};

const USER: &str = "scanner@example.com";

fn token() -> String {
    "ya29.a0AfB_byC-TOKEN-Zx9Qk3mP0sL7vR2tY5uW8eA1dG4hJ6".to_owned()
}

/// A CA, and acceptors for certificates it signed: one for localhost/127.0.0.1, one naming
/// another host; and a self-signed one from no trusted CA.
struct Pki {
    ca: CertificateDer<'static>,
    good: TlsAcceptor,
    other_name: TlsAcceptor,
    unknown_ca: TlsAcceptor,
}

fn acceptor(cert: CertificateDer<'static>, key: &KeyPair) -> TlsAcceptor {
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .unwrap();
    TlsAcceptor::from(Arc::new(config))
}

fn pki() -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "mail test CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let signed = |names: Vec<String>, ip: bool| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(names).unwrap();
        if ip {
            params.subject_alt_names.push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        }
        let cert = params.signed_by(&key, &issuer).unwrap();
        acceptor(cert.der().clone(), &key)
    };
    let stray_key = KeyPair::generate().unwrap();
    let stray = CertificateParams::new(vec!["localhost".to_owned()]).unwrap().self_signed(&stray_key).unwrap();
    Pki {
        ca: ca_cert.der().clone(),
        good: signed(vec!["localhost".to_owned()], true),
        other_name: signed(vec!["mail.other.example".to_owned()], false),
        unknown_ca: acceptor(stray.der().clone(), &stray_key),
    }
}

fn settings(pki: &Pki) -> Settings {
    let mut s = Settings::new(OutboundPolicy { allow_private: true }, std::slice::from_ref(&pki.ca)).unwrap();
    s.limits = Limits {
        connect: Duration::from_secs(2),
        tls: Duration::from_secs(2),
        reply: Duration::from_millis(700),
        overall: Duration::from_secs(4),
        max_line: 8 * 1024,
        max_lines: 64,
    };
    s.client_name = "client.test".to_owned();
    s
}

fn creds(token: &str) -> Credentials {
    Credentials { user: USER.to_owned(), token: SecretString::from(token.to_owned()) }
}

/// One step of a scripted server.
enum S {
    /// Send this line (CRLF added).
    Send(String),
    /// Send these bytes as they are.
    Raw(Vec<u8>),
    /// Expect exactly this line from the client.
    Expect(String),
    /// Expect a line of at most this many bytes (a server that cuts long first lines), then
    /// answer with the second string.
    ExpectShort(usize, String),
    /// Start TLS (server side).
    StartTls,
    /// Send this many bytes without a line end.
    Flood(usize),
    /// Send this line forever (until the client goes).
    Forever(String),
    /// Say nothing for this long.
    Sleep(Duration),
}

fn send(s: &str) -> S {
    S::Send(s.to_owned())
}
fn expect(s: &str) -> S {
    S::Expect(s.to_owned())
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// What the server saw: every client line (and whether it came under TLS), and whether the
/// script ran to its end.
#[derive(Debug, Default)]
struct Seen {
    lines: Vec<(bool, String)>,
    completed: bool,
    failure: Option<String>,
}

impl Seen {
    fn contains(&self, needle: &str) -> bool {
        self.lines.iter().any(|(_, l)| l.contains(needle))
    }
}

async fn read_line(io: &mut (dyn Io + '_)) -> Option<String> {
    let mut line = Vec::new();
    let mut byte = [0_u8; 1];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), io.read(&mut byte)).await {
            Ok(Ok(1)) => {}
            _ => return None,
        }
        if byte[0] == b'\n' {
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            return Some(String::from_utf8_lossy(&line).into_owned());
        }
        line.push(byte[0]);
    }
}

/// Reads whatever else the client sends, until it closes.
async fn drain(mut io: Box<dyn Io>, tls: bool, mut seen: Seen) -> Seen {
    while let Some(line) = read_line(io.as_mut()).await {
        seen.lines.push((tls, line));
    }
    seen
}

/// A server that runs `script` for one client; for STARTTLS scripts the plain part runs on the
/// socket itself, so that it can be upgraded.
async fn serve(
    implicit: Option<TlsAcceptor>,
    starttls: TlsAcceptor,
    script: Vec<S>,
) -> (u16, tokio::task::JoinHandle<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let handle = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        if let Some(acceptor) = implicit {
            return match acceptor.accept(tcp).await {
                Ok(tls) => run_boxed(Box::new(tls), true, script).await,
                Err(e) => Seen { failure: Some(format!("implicit TLS handshake: {e}")), ..Seen::default() },
            };
        }
        if !script.iter().any(|s| matches!(s, S::StartTls)) {
            return run_boxed(Box::new(tcp), false, script).await;
        }
        // Split at StartTls: the plain part on the socket, the rest under TLS.
        let mut script = script;
        let at = script.iter().position(|s| matches!(s, S::StartTls)).unwrap();
        let after: Vec<S> = script.split_off(at + 1);
        script.pop();
        let mut tcp = tcp;
        let mut seen = run_plain(&mut tcp, script).await;
        if seen.failure.is_some() {
            return seen;
        }
        let tls = match starttls.accept(tcp).await {
            Ok(s) => s,
            Err(e) => {
                seen.failure = Some(format!("STARTTLS handshake: {e}"));
                return seen;
            }
        };
        let rest = run_boxed(Box::new(tls), true, after).await;
        seen.lines.extend(rest.lines);
        seen.completed = rest.completed;
        seen.failure = rest.failure;
        seen
    });
    (port, handle)
}

async fn run_plain(tcp: &mut TcpStream, script: Vec<S>) -> Seen {
    run_steps(tcp, false, script).await
}

async fn run_boxed(mut io: Box<dyn Io>, tls: bool, script: Vec<S>) -> Seen {
    let mut seen = run_steps(io.as_mut(), tls, script).await;
    if seen.failure.is_none() {
        seen.completed = true;
    }
    let rest = drain(io, tls, Seen::default()).await;
    seen.lines.extend(rest.lines);
    seen
}

/// Runs steps other than StartTls on `io`.
async fn run_steps(io: &mut (dyn Io + '_), tls: bool, script: Vec<S>) -> Seen {
    let mut seen = Seen::default();
    for step in script {
        match step {
            S::Send(line) => {
                if io.write_all(format!("{line}\r\n").as_bytes()).await.is_err() {
                    seen.failure = Some(format!("client gone before {line}"));
                    return seen;
                }
            }
            S::Raw(bytes) => {
                let _ = io.write_all(&bytes).await;
            }
            S::Expect(want) => match read_line(io).await {
                Some(got) => {
                    seen.lines.push((tls, got.clone()));
                    if got != want {
                        seen.failure = Some(format!("expected {want:?}, got {got:?}"));
                        return seen;
                    }
                }
                None => {
                    seen.failure = Some(format!("client gone, expected {want:?}"));
                    return seen;
                }
            },
            S::ExpectShort(max, answer) => match read_line(io).await {
                Some(got) => {
                    let too_long = got.len() > max;
                    seen.lines.push((tls, got));
                    let reply = if too_long { "a4 BAD line too long".to_owned() } else { answer };
                    let _ = io.write_all(format!("{reply}\r\n").as_bytes()).await;
                }
                None => {
                    seen.failure = Some("client gone".into());
                    return seen;
                }
            },
            S::StartTls => {
                seen.failure = Some("StartTls inside run_steps".into());
                return seen;
            }
            S::Flood(n) => {
                let chunk = vec![b'x'; 64 * 1024];
                let mut sent = 0;
                while sent < n {
                    if io.write_all(&chunk).await.is_err() {
                        break;
                    }
                    sent += chunk.len();
                }
            }
            S::Forever(line) => {
                let line = format!("{line}\r\n");
                while io.write_all(line.as_bytes()).await.is_ok() {}
            }
            S::Sleep(d) => tokio::time::sleep(d).await,
        }
    }
    seen.completed = true;
    seen
}

async fn run(
    settings: &Settings,
    protocol: Protocol,
    tls: TlsMode,
    implicit: Option<TlsAcceptor>,
    starttls: TlsAcceptor,
    script: Vec<S>,
    token: &str,
) -> (Observed, Seen) {
    let (port, server) = serve(implicit, starttls, script).await;
    let target = Target { protocol, host: "localhost".to_owned(), port, tls };
    let observed = verify(&target, &creds(token), settings).await;
    let seen = server.await.unwrap();
    (observed, seen)
}

fn verdict(protocol: Protocol, grant: GrantKind, seen: &Observed) -> crate::policy::verify::Verdict {
    let check = Check {
        protocol,
        host: "localhost",
        port: 1,
        mailbox: USER,
        grant,
        service_principal: Some("sp-1"),
        client_id: None,
    };
    classify(&check, seen)
}

/// The IMAP conversation up to the SASL response, with STARTTLS.
fn imap_until_auth(mechs: &str) -> Vec<S> {
    vec![
        send("* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] ready"),
        expect("a2 STARTTLS"),
        send("a2 OK Begin TLS negotiation now"),
        S::StartTls,
        expect("a3 CAPABILITY"),
        S::Send(format!("* CAPABILITY IMAP4rev1 {mechs}")),
        send("a3 OK Pre-login capabilities listed"),
    ]
}

#[tokio::test]
async fn imap_logs_in_with_starttls_and_the_two_step_xoauth2_exchange_then_logs_out() {
    let pki = pki();
    let t = token();
    let mut script = imap_until_auth("AUTH=XOAUTH2 AUTH=OAUTHBEARER AUTH=PLAIN");
    script.extend([
        expect("a4 AUTHENTICATE XOAUTH2"),
        send("+ "),
        S::Expect(xoauth2(USER, &t)),
        send("a4 OK [CAPABILITY IMAP4rev1] Logged in"),
        expect("a5 LIST \"\" \"\""),
        send("* LIST (\\Noselect) \"/\" \"\""),
        send("a5 OK List completed"),
        expect("a6 LOGOUT"),
        send("* BYE Logging out"),
        send("a6 OK Logout completed."),
    ]);
    let (observed, seen) =
        run(&settings(&pki), Protocol::Imap, TlsMode::Starttls, None, pki.good.clone(), script, &t).await;
    assert_eq!(observed, Observed::LoggedIn, "{seen:?}");
    assert!(seen.completed && seen.failure.is_none(), "{seen:?}");
    // The exact client lines, the SASL response only under TLS, and nothing after LOGOUT.
    let sent: Vec<&str> = seen.lines.iter().map(|(_, l)| l.as_str()).collect();
    let response = xoauth2(USER, &t);
    assert_eq!(
        sent,
        ["a2 STARTTLS", "a3 CAPABILITY", "a4 AUTHENTICATE XOAUTH2", &response, "a5 LIST \"\" \"\"", "a6 LOGOUT"]
    );
    assert!(seen.lines.iter().filter(|(_, l)| l.contains(&response)).all(|(tls, _)| *tls));
    assert_eq!(verdict(Protocol::Imap, GrantKind::Delegated, &observed).reason, VerifyReason::Verified);
}

#[tokio::test]
async fn imap_answers_a_failure_challenge_with_an_empty_line_and_reports_the_refusal_scrubbed() {
    let pki = pki();
    let t = token();
    let mut script = imap_until_auth("AUTH=XOAUTH2");
    script.extend([
        expect("a4 AUTHENTICATE XOAUTH2"),
        send("+"),
        S::Expect(xoauth2(USER, &t)),
        send("+ eyJzdGF0dXMiOiI0MDAiLCJzY2hlbWVzIjoiQmVhcmVyIiwic2NvcGUiOiJtYWlsIn0="),
        expect(""),
        S::Send(format!("a4 NO [AUTHENTICATIONFAILED] Authentication failed for {t}")),
        expect("a6 LOGOUT"),
        send("a6 OK bye"),
    ]);
    let (observed, seen) =
        run(&settings(&pki), Protocol::Imap, TlsMode::Starttls, None, pki.good.clone(), script, &t).await;
    assert!(seen.completed, "{seen:?}");
    let Observed::Refused { text, temporary: false } = &observed else { panic!("{observed:?}") };
    assert!(text.contains("[AUTHENTICATIONFAILED]") && !text.contains("ya29") && text.contains("[redacted]"), "{text}");
    let v = verdict(Protocol::Imap, GrantKind::Delegated, &observed);
    assert_eq!(v.reason, VerifyReason::LoginRefused);
    assert!(!v.message.contains("ya29"), "{}", v.message);
}

#[tokio::test]
async fn exchange_imap_answers_give_mailbox_access_denied_and_protocol_disabled() {
    let pki = pki();
    let t = token();
    // App-only token without mailbox permission: "AUTHENTICATE failed."
    let mut script = imap_until_auth("AUTH=XOAUTH2");
    script.extend([
        expect("a4 AUTHENTICATE XOAUTH2"),
        send("+ "),
        S::Expect(xoauth2(USER, &t)),
        send("a4 NO AUTHENTICATE failed."),
    ]);
    let (observed, _) =
        run(&settings(&pki), Protocol::Imap, TlsMode::Starttls, None, pki.good.clone(), script, &t).await;
    assert_eq!(observed, Observed::Refused { text: "a4 NO AUTHENTICATE failed.".into(), temporary: false });
    let v = verdict(Protocol::Imap, GrantKind::AppOnly, &observed);
    assert_eq!(v.reason, VerifyReason::MailboxAccessDenied);
    assert!(
        v.message.contains("Add-MailboxPermission -Identity scanner@example.com -User sp-1 -AccessRights FullAccess")
    );
    // IMAP off for the mailbox: the login passes, the next command does not.
    let mut script = imap_until_auth("AUTH=XOAUTH2");
    script.extend([
        expect("a4 AUTHENTICATE XOAUTH2"),
        send("+ "),
        S::Expect(xoauth2(USER, &t)),
        send("a4 OK AUTHENTICATE completed."),
        expect("a5 LIST \"\" \"\""),
        send("a5 BAD User is authenticated but not connected."),
        expect("a6 LOGOUT"),
    ]);
    let (observed, seen) =
        run(&settings(&pki), Protocol::Imap, TlsMode::Starttls, None, pki.good.clone(), script, &t).await;
    assert!(seen.completed, "{seen:?}");
    assert_eq!(observed, Observed::NotConnected { text: "a5 BAD User is authenticated but not connected.".into() });
    assert_eq!(verdict(Protocol::Imap, GrantKind::Delegated, &observed).reason, VerifyReason::ProtocolDisabled);
}

#[tokio::test]
async fn oauthbearer_is_used_only_when_xoauth2_is_not_offered() {
    let pki = pki();
    let t = token();
    let port_free = TcpListener::bind("127.0.0.1:0").await.unwrap();
    drop(port_free);
    let mut script = imap_until_auth("AUTH=OAUTHBEARER AUTH=PLAIN");
    script.extend([
        expect("a4 AUTHENTICATE OAUTHBEARER"),
        send("+ "),
        // The expected response depends on the port; checked below from what was seen.
        S::ExpectShort(usize::MAX, "+ eyJzdGF0dXMiOiJpbnZhbGlkX3Rva2VuIn0=".to_owned()),
        expect("AQ=="),
        send("a4 NO [AUTHENTICATIONFAILED] Authentication failed."),
    ]);
    let (observed, seen) =
        run(&settings(&pki), Protocol::Imap, TlsMode::Starttls, None, pki.good.clone(), script, &t).await;
    assert!(seen.completed, "{seen:?}");
    assert!(matches!(observed, Observed::Refused { .. }), "{observed:?}");
    let (_, response) = &seen.lines[3];
    let decoded = String::from_utf8(base64::engine::general_purpose::STANDARD.decode(response).unwrap()).unwrap();
    assert!(decoded.starts_with(&format!("n,a={USER},\x01host=localhost\x01port=")), "{decoded:?}");
    assert!(decoded.ends_with(&format!("\x01auth=Bearer {t}\x01\x01")), "{decoded:?}");
}

/// The token never travels: no SASL response, no AUTH command, whatever the server said.
fn assert_no_token(seen: &Seen, t: &str) {
    assert!(!seen.contains(t) && !seen.contains(&xoauth2(USER, t)), "{seen:?}");
    assert!(!seen.lines.iter().any(|(_, l)| l.to_ascii_uppercase().contains("AUTH")), "{seen:?}");
}

#[tokio::test]
async fn a_starttls_that_is_not_offered_or_refused_never_sends_the_token() {
    let pki = pki();
    let t = token();
    let cases: Vec<(Protocol, Vec<S>)> = vec![
        // IMAP: not offered; refused.
        (Protocol::Imap, vec![send("* OK [CAPABILITY IMAP4rev1 AUTH=XOAUTH2] ready")]),
        (
            Protocol::Imap,
            vec![
                send("* OK [CAPABILITY IMAP4rev1 STARTTLS AUTH=XOAUTH2] ready"),
                expect("a2 STARTTLS"),
                send("a2 NO no"),
            ],
        ),
        // SMTP: not offered; 454.
        (
            Protocol::Smtp,
            vec![send("220 mx ESMTP"), expect("EHLO client.test"), send("250-mx"), send("250 AUTH XOAUTH2")],
        ),
        (
            Protocol::Smtp,
            vec![
                send("220 mx ESMTP"),
                expect("EHLO client.test"),
                send("250-mx"),
                send("250-STARTTLS"),
                send("250 AUTH XOAUTH2"),
                expect("STARTTLS"),
                send("454 4.7.0 TLS not available due to local problem"),
            ],
        ),
        // POP3: not offered; refused.
        (Protocol::Pop3, vec![send("+OK ready"), expect("CAPA"), send("+OK"), send("SASL XOAUTH2"), send(".")]),
        (
            Protocol::Pop3,
            vec![
                send("+OK ready"),
                expect("CAPA"),
                send("+OK"),
                send("STLS"),
                send("."),
                expect("STLS"),
                send("-ERR no"),
            ],
        ),
        // IMAP: data injected between the yes to STARTTLS and the handshake.
        (
            Protocol::Imap,
            vec![
                send("* OK [CAPABILITY IMAP4rev1 STARTTLS] ready"),
                expect("a2 STARTTLS"),
                S::Raw(b"a2 OK go\r\n* CAPABILITY IMAP4rev1 AUTH=XOAUTH2\r\n".to_vec()),
            ],
        ),
    ];
    for (protocol, script) in cases {
        let (observed, seen) =
            run(&settings(&pki), protocol, TlsMode::Starttls, None, pki.good.clone(), script, &t).await;
        assert!(seen.completed, "{protocol:?}: {seen:?}");
        assert!(matches!(observed, Observed::Tls { .. }), "{protocol:?}: {observed:?}");
        assert_eq!(verdict(protocol, GrantKind::Delegated, &observed).reason, VerifyReason::TlsFailed);
        assert_no_token(&seen, &t);
    }
}

#[tokio::test]
async fn a_certificate_for_another_host_or_from_an_unknown_authority_is_tls_failed_naming_the_host() {
    let pki = pki();
    let t = token();
    for (acceptor, problem) in [
        (pki.other_name.clone(), "does not name localhost"),
        (pki.unknown_ca.clone(), "not signed by a trusted authority"),
    ] {
        let (observed, seen) =
            run(&settings(&pki), Protocol::Imap, TlsMode::Implicit, Some(acceptor), pki.good.clone(), vec![], &t).await;
        let Observed::Tls { why } = &observed else { panic!("{observed:?}") };
        assert!(why.contains(problem) && why.contains("localhost"), "{why}");
        let v = verdict(Protocol::Imap, GrantKind::Delegated, &observed);
        assert_eq!(v.reason.as_str(), "TLSFailed");
        assert!(seen.lines.is_empty(), "{seen:?}");
    }
}

#[tokio::test]
async fn smtp_submission_ehlo_starttls_ehlo_auth_in_two_steps_then_quit() {
    let pki = pki();
    let t = token();
    let script = vec![
        send("220-mx.example ESMTP"),
        send("220 ready"),
        expect("EHLO client.test"),
        send("250-mx.example Hello"),
        send("250-SIZE 35882577"),
        send("250-STARTTLS"),
        send("250 8BITMIME"),
        expect("STARTTLS"),
        send("220 2.0.0 SMTP server ready"),
        S::StartTls,
        expect("EHLO client.test"),
        send("250-mx.example Hello"),
        send("250-AUTH LOGIN XOAUTH2"),
        send("250 8BITMIME"),
        expect("AUTH XOAUTH2"),
        send("334 "),
        S::Expect(xoauth2(USER, &t)),
        send("235 2.7.0 Authentication successful"),
        expect("QUIT"),
        send("221 2.0.0 Service closing transmission channel"),
    ];
    let (observed, seen) =
        run(&settings(&pki), Protocol::Smtp, TlsMode::Starttls, None, pki.good.clone(), script, &t).await;
    assert_eq!(observed, Observed::LoggedIn, "{seen:?}");
    assert!(seen.completed, "{seen:?}");
    let sent: Vec<&str> = seen.lines.iter().map(|(_, l)| l.as_str()).collect();
    let response = xoauth2(USER, &t);
    assert_eq!(sent, ["EHLO client.test", "STARTTLS", "EHLO client.test", "AUTH XOAUTH2", &response, "QUIT"]);
    assert!(seen.lines[2..].iter().all(|(tls, _)| *tls));
}

#[tokio::test]
async fn exchange_smtp_auth_disabled_after_the_failure_challenge_is_smtp_auth_disabled() {
    let pki = pki();
    let t = token();
    let exchange = "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant. \
                    Visit https://aka.ms/smtp_auth_disabled for more information. [SN4PR0501CA0056.namprd05.prod.outlook.com]";
    let script = vec![
        send("220 SN4PR0501CA0056.outlook.office365.com Microsoft ESMTP MAIL Service ready"),
        expect("EHLO client.test"),
        send("250-SN4PR0501CA0056.outlook.office365.com Hello"),
        send("250 AUTH LOGIN XOAUTH2"),
        expect("AUTH XOAUTH2"),
        send("334 "),
        S::Expect(xoauth2(USER, &t)),
        send("334 eyJzdGF0dXMiOiI0MDEifQ=="),
        expect(""),
        send(exchange),
        expect("QUIT"),
        send("221 bye"),
    ];
    let (observed, seen) =
        run(&settings(&pki), Protocol::Smtp, TlsMode::Implicit, Some(pki.good.clone()), pki.good.clone(), script, &t)
            .await;
    assert!(seen.completed, "{seen:?}");
    let v = verdict(Protocol::Smtp, GrantKind::Delegated, &observed);
    assert_eq!(v.reason, VerifyReason::SmtpAuthDisabled, "{observed:?}");
    assert!(
        v.message.contains("Set-CASMailbox -Identity scanner@example.com -SmtpClientAuthenticationDisabled $false")
    );
}

#[tokio::test]
async fn pop3_stls_capa_auth_in_two_steps_then_quit_and_pop_disabled() {
    let pki = pki();
    let t = token();
    let until_auth = || {
        vec![
            send("+OK Dovecot ready."),
            expect("CAPA"),
            send("+OK"),
            send("TOP"),
            send("STLS"),
            send("."),
            expect("STLS"),
            send("+OK Begin TLS negotiation now."),
            S::StartTls,
            expect("CAPA"),
            send("+OK"),
            send("SASL PLAIN XOAUTH2"),
            send("."),
            expect("AUTH XOAUTH2"),
            send("+ "),
            S::Expect(xoauth2(USER, &t)),
        ]
    };
    let mut script = until_auth();
    script.extend([send("+OK Logged in."), expect("QUIT"), send("+OK Logging out.")]);
    let (observed, seen) =
        run(&settings(&pki), Protocol::Pop3, TlsMode::Starttls, None, pki.good.clone(), script, &t).await;
    assert_eq!(observed, Observed::LoggedIn, "{seen:?}");
    let sent: Vec<&str> = seen.lines.iter().map(|(_, l)| l.as_str()).collect();
    let response = xoauth2(USER, &t);
    assert_eq!(sent, ["CAPA", "STLS", "CAPA", "AUTH XOAUTH2", &response, "QUIT"]);
    let mut script = until_auth();
    script.extend([send("-ERR Protocol is disabled for this user."), expect("QUIT")]);
    let (observed, seen) =
        run(&settings(&pki), Protocol::Pop3, TlsMode::Starttls, None, pki.good.clone(), script, &t).await;
    assert!(seen.completed, "{seen:?}");
    assert_eq!(verdict(Protocol::Pop3, GrantKind::Delegated, &observed).reason, VerifyReason::ProtocolDisabled);
}

#[tokio::test]
async fn a_token_over_8_kib_logs_in_at_a_server_that_refuses_first_lines_over_4_kib() {
    let pki = pki();
    let long = format!("eyJ0eXAiOiJKV1QiLCJub25jZSI6{}", "A".repeat(9 * 1024));
    for protocol in [Protocol::Imap, Protocol::Smtp, Protocol::Pop3] {
        let response = xoauth2(USER, &long);
        assert!(response.len() > 8 * 1024);
        let (tls, script) = match protocol {
            Protocol::Imap => (
                TlsMode::Implicit,
                vec![
                    send("* OK [CAPABILITY IMAP4rev1 AUTH=XOAUTH2] ready"),
                    S::ExpectShort(4096, "+ ".into()),
                    S::Expect(response.clone()),
                    send("a4 OK done"),
                    expect("a5 LIST \"\" \"\""),
                    send("a5 OK"),
                    expect("a6 LOGOUT"),
                    send("a6 OK"),
                ],
            ),
            Protocol::Smtp => (
                TlsMode::Implicit,
                vec![
                    send("220 mx"),
                    expect("EHLO client.test"),
                    send("250-mx"),
                    send("250 AUTH XOAUTH2"),
                    S::ExpectShort(4096, "334 ".into()),
                    S::Expect(response.clone()),
                    send("235 ok"),
                    expect("QUIT"),
                ],
            ),
            Protocol::Pop3 => (
                TlsMode::Implicit,
                vec![
                    send("+OK ready"),
                    expect("CAPA"),
                    send("+OK"),
                    send("SASL XOAUTH2"),
                    send("."),
                    S::ExpectShort(4096, "+ ".into()),
                    S::Expect(response.clone()),
                    send("+OK in"),
                    expect("QUIT"),
                ],
            ),
        };
        let mut s = settings(&pki);
        s.limits.max_line = 16 * 1024;
        let (observed, seen) = run(&s, protocol, tls, Some(pki.good.clone()), pki.good.clone(), script, &long).await;
        assert_eq!(observed, Observed::LoggedIn, "{protocol:?}: {:?}", seen.failure);
        assert!(seen.completed, "{protocol:?}: {:?}", seen.failure);
    }
}

#[tokio::test]
async fn hostile_servers_end_in_bounded_time_with_a_typed_reason_and_no_token() {
    let pki = pki();
    let t = token();
    let cases: Vec<(&str, Protocol, Vec<S>)> = vec![
        ("a 100 MB line", Protocol::Imap, vec![S::Flood(100 * 1024 * 1024)]),
        ("a greeting that never ends", Protocol::Smtp, vec![S::Forever("220-still greeting".into())]),
        (
            "untagged lines forever",
            Protocol::Imap,
            vec![send("* OK ready"), expect("a3 CAPABILITY"), S::Forever("* OK x".into())],
        ),
        ("a server that never answers", Protocol::Pop3, vec![S::Sleep(Duration::from_secs(6))]),
        (
            "silence after the token",
            Protocol::Imap,
            vec![
                send("* OK [CAPABILITY IMAP4rev1 AUTH=XOAUTH2] ready"),
                expect("a4 AUTHENTICATE XOAUTH2"),
                send("+ "),
                S::Expect(xoauth2(USER, &t)),
                S::Sleep(Duration::from_secs(6)),
            ],
        ),
        ("garbage for a greeting", Protocol::Smtp, vec![send("HTTP/1.1 400 Bad Request")]),
    ];
    for (what, protocol, script) in cases {
        let started = Instant::now();
        let (port, server) = serve(Some(pki.good.clone()), pki.good.clone(), script).await;
        let target = Target { protocol, host: "localhost".to_owned(), port, tls: TlsMode::Implicit };
        let observed = verify(&target, &creds(&t), &settings(&pki)).await;
        let took = started.elapsed();
        server.abort();
        assert!(took < Duration::from_secs(5), "{what}: took {took:?}");
        assert!(matches!(observed, Observed::Unreachable { .. }), "{what}: {observed:?}");
        assert_eq!(verdict(protocol, GrantKind::Delegated, &observed).reason, VerifyReason::ServerUnreachable);
        let Observed::Unreachable { why } = observed else { unreachable!() };
        assert!(!why.contains("ya29"), "{what}: {why}");
    }
}

#[tokio::test]
async fn tls_none_goes_only_to_private_addresses_with_private_endpoints_allowed() {
    let pki = pki();
    let t = token();
    // Allowed: loopback, private endpoints allowed, plain all the way.
    let script = vec![
        send("+OK ready"),
        expect("CAPA"),
        send("-ERR unknown command"),
        expect("AUTH XOAUTH2"),
        send("+ "),
        S::Expect(xoauth2(USER, &t)),
        send("-ERR [AUTH] Authentication failed."),
        expect("QUIT"),
    ];
    let (observed, seen) =
        run(&settings(&pki), Protocol::Pop3, TlsMode::None, None, pki.good.clone(), script, &t).await;
    assert!(seen.completed, "{seen:?}");
    assert!(matches!(observed, Observed::Refused { .. }), "{observed:?}");
    // Not allowed: the connection is never made.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut strict = settings(&pki);
    strict.policy = OutboundPolicy::default();
    for host in ["127.0.0.1", "localhost"] {
        for tls in [TlsMode::None, TlsMode::Implicit] {
            let target = Target { protocol: Protocol::Imap, host: host.to_owned(), port, tls };
            let observed = verify(&target, &creds(&t), &strict).await;
            let reason = verdict(Protocol::Imap, GrantKind::Delegated, &observed).reason;
            let expected = if tls == TlsMode::None { VerifyReason::TlsFailed } else { VerifyReason::ServerUnreachable };
            assert_eq!(reason, expected, "{host} {tls:?}: {observed:?}");
        }
    }
    let accepted = tokio::time::timeout(Duration::from_millis(200), listener.accept()).await;
    assert!(accepted.is_err(), "a refused check reached the listener");
}

#[test]
fn credentials_and_settings_never_show_the_token_and_ports_imply_tls() {
    let c = creds(&token());
    assert!(!format!("{c:?}").contains("ya29"));
    assert_eq!(TlsMode::for_port(993), TlsMode::Implicit);
    assert_eq!(TlsMode::for_port(995), TlsMode::Implicit);
    assert_eq!(TlsMode::for_port(465), TlsMode::Implicit);
    assert_eq!(TlsMode::for_port(587), TlsMode::Starttls);
    assert_eq!(TlsMode::for_port(143), TlsMode::Starttls);
    assert!(certificates_from_pem("garbage").is_err());
    let pem = rcgen::generate_simple_self_signed(vec!["x".to_owned()]).unwrap().cert.pem();
    assert_eq!(certificates_from_pem(&pem).unwrap().len(), 1);
}
