//! XOAUTH2 mail clients for IMAP, SMTP submission and POP3: connect where the outbound policy
//! allows, set up TLS (implicit, or STARTTLS/STLS that must succeed before any credential is
//! sent), log in with the two-step SASL exchange (never an initial response: long Entra tokens
//! pass servers that cut first lines), log out. Every line, reply and wait is bounded; the
//! outcome is an [`Observed`] that `crate::policy::verify` classifies. Verification uses it, and
//! the relay opens its upstream sessions with [`open_session`] (the same steps, stopping after the
//! login).

mod conn;
mod imap;
mod pop3;
pub mod reply;
mod smtp;

#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use secrecy::{ExposeSecret, SecretString};
use tokio_rustls::rustls::pki_types::CertificateDer;
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};

use crate::api::Protocol;
use crate::oauth::http::OutboundPolicy;
use crate::policy::verify::{Observed, server_text};
pub use reply::Mechanism;

use conn::Conn;

/// How a connection to a mail server is protected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsMode {
    /// TLS from the first byte (993, 995, 465).
    Implicit,
    /// Plain greeting, then STARTTLS (IMAP, SMTP) or STLS (POP3); refused STARTTLS ends the check.
    Starttls,
    /// No TLS: only to loopback or private addresses with private endpoints allowed.
    None,
}

impl TlsMode {
    /// The mode a port implies when `tls` is not given: 993, 995, 465 implicit, else STARTTLS.
    pub fn for_port(port: u16) -> Self {
        match port {
            993 | 995 | 465 => TlsMode::Implicit,
            _ => TlsMode::Starttls,
        }
    }

    /// The mode a published Secret's `<protocol>_tls` names (`implicit`, `starttls`, `none`).
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "implicit" => Some(TlsMode::Implicit),
            "starttls" => Some(TlsMode::Starttls),
            "none" => Some(TlsMode::None),
            _ => None,
        }
    }
}

/// A mail server to log in to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// The protocol spoken.
    pub protocol: Protocol,
    /// Host name or address (also the name the certificate must carry).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// How the connection is protected.
    pub tls: TlsMode,
}

/// Who logs in: the mailbox and its access token (never shown by `Debug`).
#[derive(Clone, Debug)]
pub struct Credentials {
    /// The SASL user (`spec.mailbox`).
    pub user: String,
    /// The access token.
    pub token: SecretString,
}

/// Bounds on one check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Name resolution and TCP connect, each.
    pub connect: Duration,
    /// The TLS handshake.
    pub tls: Duration,
    /// Each wait for a line from the server, and each write.
    pub reply: Duration,
    /// The whole check.
    pub overall: Duration,
    /// Longest line read.
    pub max_line: usize,
    /// Most lines in one reply (SMTP multi-line, IMAP untagged responses before the tagged one,
    /// POP3 CAPA).
    pub max_lines: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(10),
            tls: Duration::from_secs(10),
            reply: Duration::from_secs(20),
            overall: Duration::from_secs(45),
            max_line: 8 * 1024,
            max_lines: 256,
        }
    }
}

/// What every check shares: the outbound policy, the TLS trust, the bounds.
#[derive(Clone)]
pub struct Settings {
    /// Where connections may go (private endpoints allow `tls: none` to private addresses).
    pub policy: OutboundPolicy,
    /// TLS client configuration (see [`tls_config`]).
    pub tls: Arc<ClientConfig>,
    /// Bounds.
    pub limits: Limits,
    /// The name given in SMTP `EHLO`.
    pub client_name: String,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("policy", &self.policy)
            .field("limits", &self.limits)
            .field("client_name", &self.client_name)
            .finish_non_exhaustive()
    }
}

impl Settings {
    /// Settings trusting the web roots plus `extra_roots`, with default bounds.
    pub fn new(policy: OutboundPolicy, extra_roots: &[CertificateDer<'static>]) -> Result<Self, MailError> {
        Ok(Self {
            policy,
            tls: tls_config(extra_roots)?,
            limits: Limits::default(),
            client_name: "mail-oauth-operator.invalid".to_owned(),
        })
    }
}

/// A rustls client configuration (ring, safe default versions) trusting the web roots the
/// operator's HTTP client trusts plus `extra_roots` (a provider's CA bundle, a test CA).
pub fn tls_config(extra_roots: &[CertificateDer<'static>]) -> Result<Arc<ClientConfig>, MailError> {
    let mut roots = RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    for cert in extra_roots {
        roots.add(cert.clone()).map_err(|_| MailError::CaBundle)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|_| MailError::CaBundle)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The certificates of a PEM bundle (a provider's `caBundle`).
pub fn certificates_from_pem(pem_text: &str) -> Result<Vec<CertificateDer<'static>>, MailError> {
    let found = pem::parse_many(pem_text).map_err(|_| MailError::CaBundle)?;
    let certs: Vec<CertificateDer<'static>> = found
        .into_iter()
        .filter(|p| p.tag() == "CERTIFICATE")
        .map(|p| CertificateDer::from(p.into_contents()))
        .collect();
    if certs.is_empty() { Err(MailError::CaBundle) } else { Ok(certs) }
}

/// The step a failure happened in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Name resolution.
    Resolve,
    /// TCP connect.
    Connect,
    /// The TLS handshake.
    Tls,
    /// The server's greeting.
    Greeting,
    /// Asking for capabilities (CAPABILITY, EHLO, CAPA).
    Capabilities,
    /// STARTTLS / STLS.
    Starttls,
    /// The SASL exchange.
    Authenticate,
    /// The command after the login that shows the mailbox is connected.
    Check,
    /// LOGOUT / QUIT.
    Logout,
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Step::Resolve => "name resolution",
            Step::Connect => "connect",
            Step::Tls => "the TLS handshake",
            Step::Greeting => "the greeting",
            Step::Capabilities => "the capability query",
            Step::Starttls => "STARTTLS",
            Step::Authenticate => "authentication",
            Step::Check => "the check after login",
            Step::Logout => "logout",
        })
    }
}

/// Why a check ended without an answer to the login. Never carries a token.
#[derive(Debug, thiserror::Error)]
pub enum MailError {
    /// The host name does not resolve.
    #[error("the host name does not resolve")]
    Resolve,
    /// Every address of the host is refused by the outbound policy.
    #[error("every address of the host is refused by the outbound policy (private, loopback, link-local or metadata)")]
    OutboundPolicy,
    /// No address accepted the connection.
    #[error("the connection was refused or the host is unreachable")]
    Connect,
    /// The server did not answer in time.
    #[error("no answer in time during {step}")]
    Timeout {
        /// The step.
        step: Step,
    },
    /// The server closed the connection.
    #[error("the server closed the connection during {step}")]
    Closed {
        /// The step.
        step: Step,
    },
    /// A line longer than the limit.
    #[error("the server sent a line longer than {max} bytes during {step}")]
    LineTooLong {
        /// The step.
        step: Step,
        /// The limit.
        max: usize,
    },
    /// A reply of more lines than the limit.
    #[error("the server sent more than {max} lines in one reply during {step}")]
    TooManyLines {
        /// The step.
        step: Step,
        /// The limit.
        max: usize,
    },
    /// An answer the protocol does not allow there.
    #[error("unexpected answer during {step}: {text}")]
    Unexpected {
        /// The step.
        step: Step,
        /// The server's text, scrubbed and shortened.
        text: String,
    },
    /// TLS could not be set up.
    #[error("TLS with {host} failed: {why}")]
    Tls {
        /// The host.
        host: String,
        /// A fixed sentence.
        why: String,
    },
    /// The server does not offer STARTTLS.
    #[error("the server does not offer STARTTLS (STLS for POP3)")]
    NoStarttls,
    /// The server refused STARTTLS.
    #[error("the server refused STARTTLS: {text}")]
    StarttlsRefused {
        /// The server's text, scrubbed and shortened.
        text: String,
    },
    /// The server sent data after agreeing to STARTTLS and before the handshake.
    #[error("the server sent data between its STARTTLS answer and the TLS handshake")]
    DataBeforeTls,
    /// `tls: none` to a host that is not loopback or private, or without private endpoints.
    #[error(
        "tls: none is allowed only for loopback or private addresses with --allow-private-endpoints (the token would cross the network in clear)"
    )]
    PlaintextRefused,
    /// The CA bundle holds no usable certificate.
    #[error("the CA bundle holds no usable certificate")]
    CaBundle,
}

impl MailError {
    /// What the check saw, for classification.
    pub fn observed(&self) -> Observed {
        match self {
            MailError::Tls { .. }
            | MailError::NoStarttls
            | MailError::StarttlsRefused { .. }
            | MailError::DataBeforeTls
            | MailError::PlaintextRefused
            | MailError::CaBundle => Observed::Tls { why: self.to_string() },
            _ => Observed::Unreachable { why: self.to_string() },
        }
    }
}

/// The SASL exchange's secret parts, and the server text scrubber that knows them.
pub(crate) struct Sasl {
    pub(crate) mechanism: Mechanism,
    token: SecretString,
    initial: SecretString,
}

impl Sasl {
    fn new(mechanism: Mechanism, creds: &Credentials, target: &Target) -> Self {
        let token = creds.token.expose_secret();
        let initial = match mechanism {
            Mechanism::XOauth2 => crate::policy::publish::xoauth2(&creds.user, token),
            Mechanism::OAuthBearer => {
                // RFC 7628 §3.1; RFC 5801 saslname: "," and "=" escaped.
                let user = creds.user.replace('=', "=3D").replace(',', "=2C");
                STANDARD.encode(format!(
                    "n,a={user},\x01host={}\x01port={}\x01auth=Bearer {token}\x01\x01",
                    target.host, target.port
                ))
            }
        };
        Self { mechanism, token: creds.token.clone(), initial: SecretString::from(initial) }
    }

    /// The client's answer to a failure challenge: empty for XOAUTH2, `%x01` for OAUTHBEARER.
    pub(crate) fn failure_answer(&self) -> &'static str {
        match self.mechanism {
            Mechanism::XOauth2 => "",
            Mechanism::OAuthBearer => "AQ==",
        }
    }

    /// The base64 response line.
    pub(crate) fn response(&self) -> &SecretString {
        &self.initial
    }

    /// Server text, scrubbed of the token and the SASL response, shortened.
    pub(crate) fn text(&self, lines: &[String]) -> String {
        server_text(lines, &[self.token.expose_secret(), self.initial.expose_secret()])
    }
}

/// Logs in to `target` as `creds` and out again; what happened, never an error.
pub async fn verify(target: &Target, creds: &Credentials, settings: &Settings) -> Observed {
    let limits = settings.limits;
    match tokio::time::timeout(limits.overall, session(target, creds, settings)).await {
        Ok(Ok(seen)) => seen,
        Ok(Err(e)) => e.observed(),
        Err(_) => {
            Observed::Unreachable { why: format!("the check did not finish within {} s", limits.overall.as_secs()) }
        }
    }
}

async fn session(target: &Target, creds: &Credentials, settings: &Settings) -> Result<Observed, MailError> {
    let mut conn =
        Conn::open(&target.host, target.port, target.tls, settings.policy, settings.tls.clone(), settings.limits)
            .await?;
    let seen = match target.protocol {
        Protocol::Imap => imap::verify(&mut conn, target, creds, settings).await,
        Protocol::Smtp => smtp::verify(&mut conn, target, creds, settings).await,
        Protocol::Pop3 => pop3::verify(&mut conn, target, creds, settings).await,
    };
    conn.close().await;
    seen
}

/// A byte stream a session can go on with: the mail server connection after the login.
pub trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// An SMTP submission session logged in with XOAUTH2 (or OAUTHBEARER): the relay's upstream.
pub struct Submission {
    /// The server's EHLO extensions after TLS (one keyword line each, as the server wrote them).
    pub extensions: Vec<String>,
    /// The stream, under TLS unless `tls: none` was allowed.
    pub stream: Box<dyn Io>,
    /// Bytes read after the login's reply (none from a server that waits for its client).
    pub pending: Vec<u8>,
}

/// A session logged in with XOAUTH2 (or OAUTHBEARER) over any of the three protocols: the
/// relay's upstream for IMAP and POP3.
pub struct Session {
    /// SMTP: the EHLO extensions after TLS; IMAP: the capabilities announced with the answer to
    /// the login (empty when none were); POP3: empty.
    pub capabilities: Vec<String>,
    /// The stream, under TLS unless `tls: none` was allowed.
    pub stream: Box<dyn Io>,
    /// Bytes read after the login's reply.
    pub pending: Vec<u8>,
}

/// Opens a session at `target` (its protocol) as `creds` and logs in, within the overall bound;
/// what was seen when it did not log in (never an error carrying a token). IMAP and POP3 stop
/// right after the login: the mailbox is neither listed nor read.
pub async fn open_session(target: &Target, creds: &Credentials, settings: &Settings) -> Result<Session, Observed> {
    let open = async {
        let mut conn =
            Conn::open(&target.host, target.port, target.tls, settings.policy, settings.tls.clone(), settings.limits)
                .await?;
        let opened = match target.protocol {
            Protocol::Smtp => smtp::open(&mut conn, target, creds, settings).await?,
            Protocol::Imap => imap::open(&mut conn, target, creds, settings).await?,
            Protocol::Pop3 => pop3::open(&mut conn, target, creds, settings).await?.map(|()| Vec::new()),
        };
        match opened {
            Ok(capabilities) => Ok(Ok((conn, capabilities))),
            Err(seen) => {
                conn.close().await;
                Ok(Err(seen))
            }
        }
    };
    match tokio::time::timeout(settings.limits.overall, open).await {
        Ok(Ok(Ok((conn, capabilities)))) => {
            let (stream, pending) = conn.into_parts();
            Ok(Session { capabilities, stream, pending })
        }
        Ok(Ok(Err(seen))) => Err(seen),
        Ok(Err(e)) => Err(MailError::observed(&e)),
        Err(_) => Err(Observed::Unreachable {
            why: format!("the login did not finish within {} s", settings.limits.overall.as_secs()),
        }),
    }
}

/// Opens an SMTP submission session at `target` as `creds` and logs in ([`open_session`]).
pub async fn submission(target: &Target, creds: &Credentials, settings: &Settings) -> Result<Submission, Observed> {
    let session = open_session(&Target { protocol: Protocol::Smtp, ..target.clone() }, creds, settings).await?;
    Ok(Submission { extensions: session.capabilities, stream: session.stream, pending: session.pending })
}

/// Fails unless the connection is protected as `target` says: the last guard before a token is
/// written.
pub(crate) fn ensure_protected(conn: &Conn, target: &Target) -> Result<(), MailError> {
    if target.tls == TlsMode::None || conn.is_tls() { Ok(()) } else { Err(MailError::NoStarttls) }
}
