//! The mail relay (`mail-oauth-operator relay`): apps and devices that only know a user name and
//! a password submit mail over SMTP to it, and it submits the mail upstream with XOAUTH2 and the
//! mailbox's current access token. This slice serves one published Secret mounted at
//! `--secret-dir` (a sidecar), on an SMTP listener with STARTTLS and one with implicit TLS.
//!
//! Design (see [`smtp`]): the relay answers the client itself until `AUTH` succeeds, and only
//! then opens the upstream submission (greeting, `EHLO`, `STARTTLS`, `EHLO`, two-step XOAUTH2 as
//! verification does it, [`crate::mail::submission`]); no upstream connection is opened for an
//! unauthenticated client, so the pre-`AUTH` `EHLO` lists the extensions of the last upstream
//! session (or a conservative three before the first). After `AUTH` the commands go upstream one
//! at a time, each reply comes back unchanged; message bodies are copied in chunks, never kept.
//! Everything that can fail upstream (no token, an expired one, an unreachable server, a refused
//! login, a connection lost mid-message) gives the client a `454`/`421`: a retry, never a bounce,
//! and never a `250` the upstream did not give.
//!
//! Bounds: connections (a semaphore; beyond it a `421` and close), line length, commands before
//! `AUTH`, idle times before and after `AUTH`, each upstream reply, the whole session; failed
//! logins per source ([`guard`]). Logs carry neither the password nor the token nor mail content.

pub mod guard;
pub mod secret;
mod smtp;
pub mod tls;
mod wire;

#[cfg(test)]
mod tests;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::mail::Settings as MailSettings;
use guard::{FailureLimits, Failures};
use tls::CertDir;

/// The longest TLS handshake with a client.
pub(crate) const TLS_HANDSHAKE: Duration = Duration::from_secs(10);

/// Bounds of one client session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionLimits {
    /// Longest client line (commands and SASL responses).
    pub max_line: usize,
    /// Commands before authentication.
    pub commands_before_auth: usize,
    /// Wait for each client line before authentication.
    pub idle_before_auth: Duration,
    /// Wait for each client line, and each read of a message, after authentication.
    pub idle_after_auth: Duration,
    /// Wait for each upstream reply.
    pub upstream_reply: Duration,
    /// Each write.
    pub write: Duration,
    /// The whole session.
    pub total: Duration,
}

impl Default for SessionLimits {
    fn default() -> Self {
        Self {
            max_line: 4096,
            commands_before_auth: 32,
            idle_before_auth: Duration::from_secs(60),
            idle_after_auth: Duration::from_secs(300),
            upstream_reply: Duration::from_secs(600),
            write: Duration::from_secs(60),
            total: Duration::from_secs(3600),
        }
    }
}

/// What the relay is given.
#[derive(Debug)]
pub struct RelayConfig {
    /// The mounted published Secret.
    pub secret_dir: PathBuf,
    /// SMTP submission with STARTTLS.
    pub smtp: Option<SocketAddr>,
    /// SMTP submission with implicit TLS.
    pub smtps: Option<SocketAddr>,
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
    #[error("--smtps-address needs --tls-cert-dir")]
    NoCertificate,
    /// No listener.
    #[error("no listener: give --smtp-address or --smtps-address")]
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
    pub(crate) secret_dir: PathBuf,
    pub(crate) certs: Option<CertDir>,
    pub(crate) allow_plaintext_auth: bool,
    pub(crate) mail: MailSettings,
    pub(crate) limits: SessionLimits,
    pub(crate) failures: Failures,
    pub(crate) name: String,
    /// The upstream's extensions at its last login.
    pub(crate) extensions: Mutex<Option<Vec<String>>>,
}

/// The bound listeners, ready to serve.
pub struct Relay {
    shared: Arc<Shared>,
    smtp: Option<TcpListener>,
    smtps: Option<TcpListener>,
    slots: Arc<Semaphore>,
}

async fn bind(address: Option<SocketAddr>) -> Result<Option<TcpListener>, RelayError> {
    match address {
        None => Ok(None),
        Some(address) => {
            TcpListener::bind(address).await.map(Some).map_err(|e| RelayError::Bind { address, why: e.to_string() })
        }
    }
}

impl Relay {
    /// Checks the mounted Secret (`relay_password` must be there) and the certificate, and binds
    /// the listeners.
    pub async fn bind(config: RelayConfig) -> Result<Self, RelayError> {
        if config.smtp.is_none() && config.smtps.is_none() {
            return Err(RelayError::NoListener);
        }
        let mounted = secret::read_async(config.secret_dir.clone()).await?;
        let certs = config.cert_dir.map(CertDir::load).transpose()?;
        if config.smtps.is_some() && certs.is_none() {
            return Err(RelayError::NoCertificate);
        }
        let smtp = bind(config.smtp).await?;
        let smtps = bind(config.smtps).await?;
        tracing::info!(
            mailbox = %mounted.mailbox,
            upstream = ?mounted.smtp_host.as_deref().zip(mounted.smtp_port),
            smtp = ?smtp.as_ref().and_then(|l| l.local_addr().ok()),
            smtps = ?smtps.as_ref().and_then(|l| l.local_addr().ok()),
            plaintext_auth = config.allow_plaintext_auth,
            "relay listening"
        );
        let shared = Arc::new(Shared {
            secret_dir: config.secret_dir,
            certs,
            allow_plaintext_auth: config.allow_plaintext_auth,
            mail: config.mail,
            limits: config.limits,
            failures: Failures::new(config.failures),
            name: config.name,
            extensions: Mutex::new(None),
        });
        Ok(Self { shared, smtp, smtps, slots: Arc::new(Semaphore::new(config.max_connections.max(1))) })
    }

    /// The STARTTLS listener's address.
    pub fn smtp_address(&self) -> Option<SocketAddr> {
        self.smtp.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The implicit TLS listener's address.
    pub fn smtps_address(&self) -> Option<SocketAddr> {
        self.smtps.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Serves until `shutdown` (open sessions end with the runtime).
    pub async fn serve(self, shutdown: impl std::future::Future<Output = ()> + Send) {
        let accept = async {
            let a = accept_loop(self.smtp, false, self.shared.clone(), self.slots.clone());
            let b = accept_loop(self.smtps, true, self.shared.clone(), self.slots.clone());
            futures::future::join(a, b).await;
        };
        tokio::select! {
            () = accept => {}
            () = shutdown => {}
        }
    }
}

async fn accept_loop(listener: Option<TcpListener>, implicit_tls: bool, shared: Arc<Shared>, slots: Arc<Semaphore>) {
    let Some(listener) = listener else { return };
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a relay connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            // Full: a one-line answer if the socket takes it now, then close.
            let _ = tcp.try_write(b"421 4.3.2 Too many connections, try again later\r\n");
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _permit = permit;
            connection(tcp, peer.ip(), implicit_tls, shared).await;
        });
    }
}

async fn connection(tcp: tokio::net::TcpStream, peer: IpAddr, implicit_tls: bool, shared: Arc<Shared>) {
    let _ = tcp.set_nodelay(true);
    if !implicit_tls {
        smtp::session(Box::new(tcp), peer, false, shared).await;
        return;
    }
    let acceptor = match shared.certs.as_ref().map(CertDir::acceptor) {
        Some(Ok(a)) => a,
        Some(Err(e)) => {
            tracing::warn!(error = %e, "no TLS certificate for an implicit TLS connection");
            return;
        }
        None => return,
    };
    if let Ok(Ok(stream)) = tokio::time::timeout(TLS_HANDSHAKE, acceptor.accept(tcp)).await {
        smtp::session(Box::new(stream), peer, true, shared).await;
    }
}

/// Serves `/healthz`, `/readyz` (ready once listening) and `/metrics` on `address`.
pub async fn serve_admin(
    address: SocketAddr,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> crate::error::Result<()> {
    let admin = crate::server::Admin {
        ready: Arc::new(AtomicBool::new(true)),
        registry: Arc::new(prometheus_client::registry::Registry::default()),
    };
    crate::server::serve(address, admin, shutdown).await
}
