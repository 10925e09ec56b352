//! The relay's Prometheus metrics, served at `/metrics` of its `--listen-address`: connections by
//! protocol and listener, connections open, authentications by outcome, upstream failures by
//! reason and bytes on the client connections by direction. Every label value is a fixed word
//! (no binding, mailbox, user name or address: bounded series, and nothing a client chooses).

use std::pin::Pin;
use std::task::{Context, Poll};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::api::Protocol;
use crate::policy::verify::Observed;

type One = [(&'static str, &'static str); 1];
type Two = [(&'static str, &'static str); 2];

/// How an authentication ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AuthOutcome {
    /// Accepted and logged in upstream.
    Ok,
    /// Wrong (or ambiguous, or unknown) credentials.
    Wrong,
    /// The source had too many failures and was turned away.
    Refused,
    /// Right credentials, but the upstream login could not be made (or the credentials could
    /// not be read): the client was told to retry.
    Temporary,
}

impl AuthOutcome {
    fn label(self) -> &'static str {
        match self {
            AuthOutcome::Ok => "ok",
            AuthOutcome::Wrong => "wrong",
            AuthOutcome::Refused => "refused",
            AuthOutcome::Temporary => "temporary",
        }
    }
}

/// Why the upstream side failed (a fixed set).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum UpstreamFailure {
    /// No current access token published.
    NoToken,
    /// No `<protocol>_host`/`<protocol>_port` published.
    NoServer,
    /// The server could not be reached (connection, time-out, outbound policy, protocol).
    Unreachable,
    /// TLS with the server could not be set up.
    Tls,
    /// The server refused the XOAUTH2 login (or the first command after it).
    Refused,
    /// The server offers no OAuth mechanism.
    NoMechanism,
    /// The connection was lost after the login, during an SMTP session.
    Lost,
}

impl UpstreamFailure {
    fn label(self) -> &'static str {
        match self {
            UpstreamFailure::NoToken => "no_token",
            UpstreamFailure::NoServer => "no_server",
            UpstreamFailure::Unreachable => "unreachable",
            UpstreamFailure::Tls => "tls",
            UpstreamFailure::Refused => "refused",
            UpstreamFailure::NoMechanism => "no_mechanism",
            UpstreamFailure::Lost => "lost",
        }
    }

    /// The reason of a failed upstream login.
    pub(crate) fn of(seen: &Observed) -> Self {
        match seen {
            Observed::Tls { .. } => UpstreamFailure::Tls,
            Observed::Refused { .. } | Observed::NotConnected { .. } | Observed::LoggedIn => UpstreamFailure::Refused,
            Observed::NoMechanism { .. } => UpstreamFailure::NoMechanism,
            Observed::Unreachable { .. } => UpstreamFailure::Unreachable,
        }
    }
}

fn protocol(p: Protocol) -> &'static str {
    p.as_str()
}

/// The relay's counters (cheap to clone: every family is shared).
#[derive(Clone, Debug, Default)]
pub struct RelayMetrics {
    connections: Family<Two, Counter>,
    busy: Family<One, Counter>,
    open: Family<One, Gauge>,
    authentications: Family<Two, Counter>,
    upstream_failures: Family<Two, Counter>,
    bytes: Family<Two, Counter>,
}

impl RelayMetrics {
    /// Registers the families in `registry` (names get the `mailoauth_relay_` prefix).
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("mailoauth_relay");
        r.register("connections", "Client connections accepted, by protocol and listener", self.connections.clone());
        r.register(
            "connections_busy",
            "Client connections turned away because every connection slot was taken",
            self.busy.clone(),
        );
        r.register("connections_open", "Client connections open now", self.open.clone());
        r.register(
            "authentications",
            "Client authentications by outcome (ok, wrong, refused, temporary)",
            self.authentications.clone(),
        );
        r.register("upstream_failures", "Upstream failures by reason", self.upstream_failures.clone());
        r.register(
            "bytes",
            "Bytes on the client connections (as on the wire, TLS included), by direction",
            self.bytes.clone(),
        );
    }

    /// Counts an accepted connection and keeps it open until the guard is dropped.
    pub(crate) fn connection(&self, p: Protocol, implicit_tls: bool) -> OpenGuard {
        let listener = if implicit_tls { "implicit_tls" } else { "starttls" };
        self.connections.get_or_create(&[("protocol", protocol(p)), ("listener", listener)]).inc();
        let gauge = self.open.get_or_create(&[("protocol", protocol(p))]).clone();
        gauge.inc();
        OpenGuard(gauge)
    }

    /// Counts a connection turned away for want of a slot.
    pub(crate) fn busy(&self, p: Protocol) {
        self.busy.get_or_create(&[("protocol", protocol(p))]).inc();
    }

    /// Counts an authentication's outcome.
    pub(crate) fn authentication(&self, p: Protocol, outcome: AuthOutcome) {
        self.authentications.get_or_create(&[("protocol", protocol(p)), ("outcome", outcome.label())]).inc();
    }

    /// Counts an upstream failure.
    pub(crate) fn upstream_failure(&self, p: Protocol, reason: UpstreamFailure) {
        self.upstream_failures.get_or_create(&[("protocol", protocol(p)), ("reason", reason.label())]).inc();
    }

    /// The byte counters of one connection: (received from the client, sent to it).
    pub(crate) fn bytes(&self, p: Protocol) -> (Counter, Counter) {
        let get = |d| self.bytes.get_or_create(&[("protocol", protocol(p)), ("direction", d)]).clone();
        (get("received"), get("sent"))
    }
}

/// Keeps `connections_open` up while a connection lives.
pub(crate) struct OpenGuard(Gauge);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A stream that counts the bytes read from and written to it.
pub(crate) struct Counted<S> {
    inner: S,
    received: Counter,
    sent: Counter,
}

impl<S> Counted<S> {
    /// Wraps `inner`; `(received, sent)` from [`RelayMetrics::bytes`].
    pub(crate) fn new(inner: S, (received, sent): (Counter, Counter)) -> Self {
        Self { inner, received, sent }
    }
}

fn count(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        let read = buf.filled().len().saturating_sub(before);
        if read > 0 {
            this.received.inc_by(count(read));
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            this.sent.inc_by(count(n));
        }
        polled
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
