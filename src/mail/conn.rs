//! One connection to a mail server: TCP to an address the outbound policy allows, TLS (implicit
//! or after STARTTLS) with rustls, and a bounded line reader (hand-written: every line, every read
//! and the buffer are bounded, and STARTTLS needs to know that nothing was read ahead of it).

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::{self, CertificateError, ClientConfig};

use super::{Limits, MailError, Step, TlsMode};
use crate::oauth::http::{OutboundPolicy, allowed_addresses};

/// The socket, plain or under TLS.
enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    /// Between the plain socket and its TLS session.
    Gone,
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::Gone => Poll::Ready(Err(std::io::ErrorKind::NotConnected.into())),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::Gone => Poll::Ready(Err(std::io::ErrorKind::NotConnected.into())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::Gone => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::Gone => Poll::Ready(Ok(())),
        }
    }
}

/// A connection with its read buffer.
pub(crate) struct Conn {
    stream: Stream,
    buf: Vec<u8>,
    limits: Limits,
    host: String,
    tls: Arc<ClientConfig>,
}

/// Whether `ip` is loopback or private (allowed only with private endpoints allowed), by the
/// outbound policy's own ranges.
fn loopback_or_private(ip: IpAddr) -> bool {
    OutboundPolicy::default().refuse_ip(ip).is_some() && OutboundPolicy { allow_private: true }.refuse_ip(ip).is_none()
}

impl Conn {
    /// Connects to `host:port` at an address `policy` allows; with `tls: none`, only to a loopback
    /// or private address and only when `policy` allows private endpoints. Implicit TLS is set up
    /// here.
    pub(crate) async fn open(
        host: &str,
        port: u16,
        mode: TlsMode,
        policy: OutboundPolicy,
        tls: Arc<ClientConfig>,
        limits: Limits,
    ) -> Result<Self, MailError> {
        if mode == TlsMode::None && !policy.allow_private {
            return Err(MailError::PlaintextRefused);
        }
        let found: Vec<SocketAddr> = tokio::time::timeout(limits.connect, tokio::net::lookup_host((host, port)))
            .await
            .map_err(|_| MailError::Timeout { step: Step::Resolve })?
            .map_err(|_| MailError::Resolve)?
            .take(16)
            .collect();
        let mut allowed = allowed_addresses(policy, found).map_err(|_| MailError::OutboundPolicy)?;
        if mode == TlsMode::None {
            allowed.retain(|a| loopback_or_private(a.ip()));
            if allowed.is_empty() {
                return Err(MailError::PlaintextRefused);
            }
        }
        let mut last = MailError::Connect;
        let mut tcp = None;
        for addr in allowed {
            match tokio::time::timeout(limits.connect, TcpStream::connect(addr)).await {
                Ok(Ok(s)) => {
                    // Whole lines and flushed chunks: no reason to wait for an ACK (the relay's
                    // last chunk of a message would otherwise wait for the delayed one).
                    let _ = s.set_nodelay(true);
                    tcp = Some(s);
                    break;
                }
                Ok(Err(_)) => last = MailError::Connect,
                Err(_) => last = MailError::Timeout { step: Step::Connect },
            }
        }
        let tcp = tcp.ok_or(last)?;
        let mut conn = Conn { stream: Stream::Plain(tcp), buf: Vec::new(), limits, host: host.to_owned(), tls };
        if mode == TlsMode::Implicit {
            conn.handshake().await?;
        }
        Ok(conn)
    }

    /// Starts TLS on the plain connection (after the server's yes to STARTTLS/STLS). Anything
    /// the server sent after that yes and before TLS is refused (it would be read as if it came
    /// over TLS).
    pub(crate) async fn starttls(&mut self) -> Result<(), MailError> {
        if !self.buf.is_empty() {
            return Err(MailError::DataBeforeTls);
        }
        self.handshake().await
    }

    /// Whether the connection is under TLS.
    pub(crate) fn is_tls(&self) -> bool {
        matches!(self.stream, Stream::Tls(_))
    }

    async fn handshake(&mut self) -> Result<(), MailError> {
        let Stream::Plain(tcp) = std::mem::replace(&mut self.stream, Stream::Gone) else {
            return Err(MailError::Tls { host: self.host.clone(), why: "TLS was already set up".to_owned() });
        };
        let name = ServerName::try_from(self.host.clone())
            .map_err(|_| MailError::Tls { host: self.host.clone(), why: "the host is no valid TLS name".to_owned() })?;
        let connector = TlsConnector::from(self.tls.clone());
        let tls = tokio::time::timeout(self.limits.tls, connector.connect(name, tcp))
            .await
            .map_err(|_| MailError::Timeout { step: Step::Tls })?
            .map_err(|e| MailError::Tls { host: self.host.clone(), why: tls_problem(&e, &self.host) })?;
        self.stream = Stream::Tls(Box::new(tls));
        Ok(())
    }

    /// The next line without its line end, decoded lossily; a line longer than the limit, a
    /// closed connection or a server that stops sending is an error naming `step`.
    pub(crate) async fn read_line(&mut self, step: Step) -> Result<String, MailError> {
        let max = self.limits.max_line;
        loop {
            if let Some(end) = self.buf.iter().position(|b| *b == b'\n') {
                if end > max {
                    return Err(MailError::LineTooLong { step, max });
                }
                let rest = self.buf.split_off(end.saturating_add(1));
                let mut line = std::mem::replace(&mut self.buf, rest);
                while line.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                    line.pop();
                }
                return Ok(String::from_utf8_lossy(&line).into_owned());
            }
            if self.buf.len() > max {
                return Err(MailError::LineTooLong { step, max });
            }
            let mut chunk = [0_u8; 4096];
            let n = tokio::time::timeout(self.limits.reply, self.stream.read(&mut chunk))
                .await
                .map_err(|_| MailError::Timeout { step })?
                .map_err(|_| MailError::Closed { step })?;
            if n == 0 {
                return Err(MailError::Closed { step });
            }
            self.buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
        }
    }

    /// Writes `line` and CRLF.
    pub(crate) async fn write_line(&mut self, line: &str, step: Step) -> Result<(), MailError> {
        let mut bytes = Vec::with_capacity(line.len().saturating_add(2));
        bytes.extend_from_slice(line.as_bytes());
        bytes.extend_from_slice(b"\r\n");
        self.write(&bytes, step).await
    }

    /// Writes a secret line and CRLF; only ever over TLS, or over a plain connection the caller
    /// was allowed to open as such (`tls: none` to a private address).
    pub(crate) async fn write_secret_line(&mut self, line: &SecretString, step: Step) -> Result<(), MailError> {
        let secret = line.expose_secret().as_bytes();
        let send = async {
            self.stream.write_all(secret).await?;
            self.stream.write_all(b"\r\n").await?;
            self.stream.flush().await
        };
        tokio::time::timeout(self.limits.reply, send)
            .await
            .map_err(|_| MailError::Timeout { step })?
            .map_err(|_| MailError::Closed { step })
    }

    async fn write(&mut self, bytes: &[u8], step: Step) -> Result<(), MailError> {
        let send = async {
            self.stream.write_all(bytes).await?;
            self.stream.flush().await
        };
        tokio::time::timeout(self.limits.reply, send)
            .await
            .map_err(|_| MailError::Timeout { step })?
            .map_err(|_| MailError::Closed { step })
    }

    /// The stream and what was read from it but not yet consumed, for a caller that goes on
    /// reading (the relay after the login).
    pub(crate) fn into_parts(self) -> (Box<dyn super::Io>, Vec<u8>) {
        (Box::new(self.stream), self.buf)
    }

    /// Closes the connection (TLS close_notify when under TLS), within a short time.
    pub(crate) async fn close(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(1), self.stream.shutdown()).await;
    }
}

/// A TLS failure as a fixed sentence naming `host` (never the peer's text).
fn tls_problem(e: &std::io::Error, host: &str) -> String {
    let inner = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>());
    match inner {
        Some(rustls::Error::InvalidCertificate(cert)) => match cert {
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                format!("the certificate presented by {host} does not name {host}")
            }
            CertificateError::UnknownIssuer => {
                format!("the certificate presented by {host} is not signed by a trusted authority")
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                format!("the certificate presented by {host} has expired")
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                format!("the certificate presented by {host} is not valid yet (check the clocks)")
            }
            CertificateError::Revoked => format!("the certificate presented by {host} is revoked"),
            _ => format!("the certificate presented by {host} is invalid"),
        },
        Some(rustls::Error::AlertReceived(_)) => format!("{host} ended the TLS handshake with an alert"),
        Some(rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. }) => {
            format!("{host} does not speak TLS on this port (check servers.<protocol>.tls)")
        }
        Some(_) => format!("the TLS handshake with {host} failed"),
        None => format!("the connection to {host} broke during the TLS handshake"),
    }
}
