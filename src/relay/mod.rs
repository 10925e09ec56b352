//! The mail relay (`mail-oauth-operator relay`): apps and devices that only know a user name and
//! a password submit mail over SMTP to it, or read the mailbox over IMAP or POP3, and it logs in
//! upstream with XOAUTH2 and the mailbox's current access token. Two shapes, one code path
//! ([`source`]): a sidecar serves one published Secret mounted at `--secret-dir`; the shared relay
//! serves every binding with relay credentials in the namespaces it watches, reading the published
//! Secrets through the API ([`watch`]). Listeners for SMTP, IMAP and POP3, each with STARTTLS
//! (STLS) and with implicit TLS ([`Service`]); counters in [`metrics`].
//!
//! Design (see [`smtp`]): the relay answers the client itself until `AUTH` succeeds, and only
//! then opens the upstream submission (greeting, `EHLO`, `STARTTLS`, `EHLO`, two-step XOAUTH2 as
//! verification does it, [`crate::mail::submission`]); no upstream connection is opened for an
//! unauthenticated client, so the pre-`AUTH` `EHLO` lists the extensions of the last upstream
//! session (or a conservative three before the first). After `AUTH` the commands go upstream in
//! order (a pipelined group in one write), each reply comes back unchanged; message bodies are
//! copied a read at a time, never kept.
//! Everything that can fail upstream (no token, an expired one, an unreachable server, a refused
//! login, a connection lost mid-message) gives the client a `454`/`421`: a retry, never a bounce,
//! and never a `250` the upstream did not give.
//!
//! IMAP and POP3 (`imap`, `pop3`) work alike up to the login (`login`); after it the
//! relay copies bytes both ways unchanged (`pipe`): a mailbox session is the upstream's, so
//! `IDLE`, literals and large `FETCH`es work as without the relay. Failures upstream are
//! `NO [UNAVAILABLE]` and `-ERR [SYS/TEMP]`; a wrong password `NO [AUTHENTICATIONFAILED]` and
//! `-ERR [AUTH]`.
//!
//! Bounds: connections (one semaphore for all listeners; beyond it a one-line refusal and close),
//! line length, commands before authentication, idle times before and after it (30 minutes
//! after an IMAP or POP3 login: an `IDLE` sits silent between the server's keep-alives), each
//! upstream reply, the whole session; failed logins per source ([`guard`]). Logs carry neither
//! the password nor the token nor mail content.

pub mod guard;
mod imap;
mod login;
pub mod metrics;
mod pipe;
mod pop3;
pub mod secret;
mod smtp;
pub mod source;
pub mod tls;
pub mod watch;
mod wire;

#[cfg(test)]
mod mailbox_tests;
#[cfg(test)]
mod source_tests;
#[cfg(test)]
mod tests;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::api::Protocol;
use crate::mail::{Io, Settings as MailSettings};
use guard::{FailureLimits, Failures};
use metrics::{Counted, RelayMetrics};
use source::Source;
use tls::CertDir;

/// The longest TLS handshake with a client.
pub(crate) const TLS_HANDSHAKE: Duration = Duration::from_secs(10);

/// The longest time from a connection to a successful login (upstream login included): a client
/// that trickles a byte a minute cannot hold a connection slot for longer.
pub(crate) const LOGIN_DEADLINE: Duration = Duration::from_secs(180);

/// Bounds of one client session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionLimits {
    /// Longest client line (commands and SASL responses).
    pub max_line: usize,
    /// Commands before authentication.
    pub commands_before_auth: usize,
    /// Wait for each client line before authentication.
    pub idle_before_auth: Duration,
    /// Wait for each client line, and each read of a message, after SMTP authentication.
    pub idle_after_auth: Duration,
    /// After an IMAP or POP3 login: the longest time without a byte either way (RFC 9051's
    /// autologout timer is at least 30 minutes).
    pub idle_mailbox: Duration,
    /// Wait for each upstream reply.
    pub upstream_reply: Duration,
    /// Each write.
    pub write: Duration,
    /// The whole SMTP session.
    pub total: Duration,
    /// The whole IMAP or POP3 session (mail clients keep theirs open for hours).
    pub total_mailbox: Duration,
}

impl Default for SessionLimits {
    fn default() -> Self {
        Self {
            max_line: 4096,
            commands_before_auth: 32,
            idle_before_auth: Duration::from_secs(60),
            idle_after_auth: Duration::from_secs(300),
            idle_mailbox: Duration::from_secs(30 * 60),
            upstream_reply: Duration::from_secs(600),
            write: Duration::from_secs(60),
            total: Duration::from_secs(3600),
            total_mailbox: Duration::from_secs(24 * 3600),
        }
    }
}

/// What the relay is given.
#[derive(Debug)]
pub struct RelayConfig {
    /// Where the credentials come from.
    pub source: Source,
    /// The counters (registered by the caller).
    pub metrics: RelayMetrics,
    /// SMTP submission with STARTTLS.
    pub smtp: Option<SocketAddr>,
    /// SMTP submission with implicit TLS.
    pub smtps: Option<SocketAddr>,
    /// IMAP with STARTTLS.
    pub imap: Option<SocketAddr>,
    /// IMAP with implicit TLS.
    pub imaps: Option<SocketAddr>,
    /// POP3 with STLS.
    pub pop3: Option<SocketAddr>,
    /// POP3 with implicit TLS.
    pub pop3s: Option<SocketAddr>,
    /// `tls.crt` and `tls.key`.
    pub cert_dir: Option<PathBuf>,
    /// Accept `AUTH` without TLS from addresses other than loopback.
    pub allow_plaintext_auth: bool,
    /// The upstream client's settings (outbound policy, trust, bounds).
    pub mail: MailSettings,
    /// Client session bounds.
    pub limits: SessionLimits,
    /// Failed logins per source.
    pub failures: FailureLimits,
    /// Client connections at once, all listeners together.
    pub max_connections: usize,
    /// The name in the greeting and `EHLO`.
    pub name: String,
}

/// Why the relay does not start.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The mounted Secret is not usable.
    #[error("reading the mounted Secret: {0}")]
    Secret(#[from] secret::SecretError),
    /// The certificate does not load.
    #[error("loading the listeners' certificate: {0}")]
    Certificate(#[from] tls::CertError),
    /// Implicit TLS without a certificate.
    #[error("--smtps-address, --imaps-address and --pop3s-address need --tls-cert-dir")]
    NoCertificate,
    /// No listener.
    #[error(
        "no listener: give at least one of --smtp-address, --smtps-address, --imap-address, --imaps-address, --pop3-address, --pop3s-address"
    )]
    NoListener,
    /// A listener could not bind.
    #[error("binding {address}: {why}")]
    Bind {
        /// The address.
        address: SocketAddr,
        /// The I/O error.
        why: String,
    },
}

/// What every session shares.
pub(crate) struct Shared {
    pub(crate) source: Source,
    pub(crate) metrics: RelayMetrics,
    pub(crate) certs: Option<CertDir>,
    pub(crate) allow_plaintext_auth: bool,
    pub(crate) mail: MailSettings,
    pub(crate) limits: SessionLimits,
    pub(crate) failures: Failures,
    pub(crate) name: String,
    /// The upstream's extensions at its last login.
    pub(crate) extensions: Mutex<Option<Vec<String>>>,
}

/// What a listener speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Service {
    /// SMTP submission.
    Smtp,
    /// IMAP.
    Imap,
    /// POP3.
    Pop3,
}

impl Service {
    /// The protocol it speaks.
    fn protocol(self) -> Protocol {
        match self {
            Service::Smtp => Protocol::Smtp,
            Service::Imap => Protocol::Imap,
            Service::Pop3 => Protocol::Pop3,
        }
    }

    /// The one line a client gets when every connection slot is taken.
    fn busy(self) -> &'static [u8] {
        match self {
            Service::Smtp => b"421 4.3.2 Too many connections, try again later\r\n",
            Service::Imap => b"* BYE [UNAVAILABLE] Too many connections, try again later\r\n",
            Service::Pop3 => b"-ERR [SYS/TEMP] Too many connections, try again later\r\n",
        }
    }
}

/// One bound listener.
struct Listener {
    service: Service,
    implicit_tls: bool,
    socket: TcpListener,
}

/// The bound listeners, ready to serve.
pub struct Relay {
    shared: Arc<Shared>,
    listeners: Vec<Listener>,
    slots: Arc<Semaphore>,
}

impl Relay {
    /// Checks the mounted Secret (`relay_password` must be there; a sidecar) and the certificate,
    /// and binds the listeners.
    pub async fn bind(config: RelayConfig) -> Result<Self, RelayError> {
        let wanted = [
            (Service::Smtp, false, config.smtp),
            (Service::Smtp, true, config.smtps),
            (Service::Imap, false, config.imap),
            (Service::Imap, true, config.imaps),
            (Service::Pop3, false, config.pop3),
            (Service::Pop3, true, config.pop3s),
        ];
        if wanted.iter().all(|(_, _, a)| a.is_none()) {
            return Err(RelayError::NoListener);
        }
        let mounted = match &config.source {
            Source::Mounted(dir) => Some(secret::read_async(dir.clone()).await?),
            Source::Api(_) => None,
        };
        let certs = config.cert_dir.map(CertDir::load).transpose()?;
        if certs.is_none() && wanted.iter().any(|(_, implicit, a)| *implicit && a.is_some()) {
            return Err(RelayError::NoCertificate);
        }
        let mut listeners = Vec::new();
        for (service, implicit_tls, address) in wanted {
            let Some(address) = address else { continue };
            let socket =
                TcpListener::bind(address).await.map_err(|e| RelayError::Bind { address, why: e.to_string() })?;
            listeners.push(Listener { service, implicit_tls, socket });
        }
        for (service, protocol) in [(Service::Imap, Protocol::Imap), (Service::Pop3, Protocol::Pop3)] {
            let Source::Mounted(dir) = &config.source else { continue };
            if listeners.iter().any(|l| l.service == service) && !matches!(secret::server(dir, protocol), Ok(Some(_))) {
                tracing::warn!(
                    "the mounted Secret names no {0}_host and {0}_port (the binding's provider has no {0} server): {0} logins will fail until it does",
                    protocol.as_str()
                );
            }
        }
        let shown: Vec<String> = listeners
            .iter()
            .map(|l| {
                let tls = if l.implicit_tls { " (implicit TLS)" } else { "" };
                format!("{:?} {}{tls}", l.service, l.socket.local_addr().map(|a| a.to_string()).unwrap_or_default())
            })
            .collect();
        tracing::info!(
            mailbox = mounted.as_ref().map_or("(the shared relay: every binding served)", |m| m.mailbox.as_str()),
            upstream = ?mounted.as_ref().and_then(|m| m.smtp_host.as_deref().zip(m.smtp_port)),
            listeners = %shown.join(", "),
            plaintext_auth = config.allow_plaintext_auth,
            "relay listening"
        );
        let shared = Arc::new(Shared {
            source: config.source,
            metrics: config.metrics,
            certs,
            allow_plaintext_auth: config.allow_plaintext_auth,
            mail: config.mail,
            limits: config.limits,
            failures: Failures::new(config.failures),
            name: config.name,
            extensions: Mutex::new(None),
        });
        Ok(Self { shared, listeners, slots: Arc::new(Semaphore::new(config.max_connections.max(1))) })
    }

    /// The address of the listener for `service` with (`implicit_tls`) or without implicit TLS.
    pub fn address(&self, service: Service, implicit_tls: bool) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|l| l.service == service && l.implicit_tls == implicit_tls)
            .and_then(|l| l.socket.local_addr().ok())
    }

    /// The SMTP STARTTLS listener's address.
    pub fn smtp_address(&self) -> Option<SocketAddr> {
        self.address(Service::Smtp, false)
    }

    /// The SMTP implicit TLS listener's address.
    pub fn smtps_address(&self) -> Option<SocketAddr> {
        self.address(Service::Smtp, true)
    }

    /// Serves until `shutdown` (open sessions end with the runtime).
    pub async fn serve(self, shutdown: impl std::future::Future<Output = ()> + Send) {
        let accept = futures::future::join_all(
            self.listeners.into_iter().map(|l| accept_loop(l, self.shared.clone(), self.slots.clone())),
        );
        tokio::select! {
            _ = accept => {}
            () = shutdown => {}
        }
    }
}

async fn accept_loop(listener: Listener, shared: Arc<Shared>, slots: Arc<Semaphore>) {
    let Listener { service, implicit_tls, socket } = listener;
    loop {
        let (tcp, peer) = match socket.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a relay connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            // Full: a one-line answer if the socket takes it now, then close.
            shared.metrics.busy(service.protocol());
            let _ = tcp.try_write(service.busy());
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _permit = permit;
            connection(tcp, peer.ip(), service, implicit_tls, shared).await;
        });
    }
}

async fn connection(
    tcp: tokio::net::TcpStream,
    peer: IpAddr,
    service: Service,
    implicit_tls: bool,
    shared: Arc<Shared>,
) {
    let _ = tcp.set_nodelay(true);
    let _open = shared.metrics.connection(service.protocol(), implicit_tls);
    let tcp = Counted::new(tcp, shared.metrics.bytes(service.protocol()));
    let io: Box<dyn Io> = if implicit_tls {
        let acceptor = match shared.certs.as_ref().map(CertDir::acceptor) {
            Some(Ok(a)) => a,
            Some(Err(e)) => {
                tracing::warn!(error = %e, "no TLS certificate for an implicit TLS connection");
                return;
            }
            None => return,
        };
        match tokio::time::timeout(TLS_HANDSHAKE, acceptor.accept(tcp)).await {
            Ok(Ok(stream)) => Box::new(stream),
            _ => return,
        }
    } else {
        Box::new(tcp)
    };
    match service {
        Service::Smtp => smtp::session(io, peer, implicit_tls, shared).await,
        Service::Imap => imap::session(io, peer, implicit_tls, shared).await,
        Service::Pop3 => pop3::session(io, peer, implicit_tls, shared).await,
    }
}

/// Serves `/healthz`, `/readyz` (ready when `ready` is: once listening, and for the shared relay
/// once its namespaces are listed) and `/metrics` (the `registry`) on `address`.
pub async fn serve_admin(
    address: SocketAddr,
    ready: Arc<AtomicBool>,
    registry: prometheus_client::registry::Registry,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> crate::error::Result<()> {
    let admin = crate::server::Admin { ready, registry: Arc::new(registry) };
    crate::server::serve(address, admin, shutdown).await
}
