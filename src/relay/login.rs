//! The login every listener shares: the credentials checked against the relay's source
//! ([`super::source::Source::check`]: the mounted Secret read afresh, or the shared relay's
//! index; a failure is counted per source address and answered after the guard's delay), then
//! the upstream server the binding's Secret names (`<protocol>_host`/`<protocol>_port`, TLS as
//! `<protocol>_tls` or the port says) logged in to with XOAUTH2 and the current token
//! ([`crate::mail::open_session`]). Nothing a client can fix (no token, an expired one, no server
//! named, the upstream down or refusing) is a temporary failure, never a success. Every outcome
//! is counted ([`super::metrics`]). Logs name the source and the upstream, never a secret.

use std::net::IpAddr;
use std::sync::Arc;

use crate::api::Protocol;
use crate::mail::{Credentials, Session, Target};

use super::Shared;
use super::metrics::{AuthOutcome, UpstreamFailure};
use super::source::{Check, Entry};

/// How a login ended.
pub(crate) enum Outcome {
    /// Logged in upstream: go on with this session.
    LoggedIn(Session),
    /// Wrong credentials (already delayed); `refused`: the source is now refused, close.
    Wrong {
        /// Whether the source has reached the failure limit.
        refused: bool,
    },
    /// Try again later; the text says why, for the client (no secret in it).
    Temporary(&'static str),
}

/// The credentials checked, ready for the upstream login.
pub(crate) enum Checked {
    /// The binding's entry, the upstream and the XOAUTH2 credentials.
    Ready(Arc<Entry>, Target, Credentials),
    /// Wrong credentials (already delayed and counted).
    Wrong {
        /// Whether the source has reached the failure limit.
        refused: bool,
    },
    /// Try again later (counted).
    Temporary(&'static str),
}

/// Checks `user` and `password` and finds the upstream for `protocol`: everything before the
/// upstream login.
pub(crate) async fn check(shared: &Shared, peer: IpAddr, protocol: Protocol, user: &str, password: &[u8]) -> Checked {
    let metrics = &shared.metrics;
    let entry = match shared.source.check(user, password, chrono::Utc::now()).await {
        Check::Accepted(entry) => entry,
        Check::Wrong => {
            let delay = shared.failures.fail(peer);
            tracing::info!(source = %peer, protocol = protocol.as_str(), "relay authentication failed");
            metrics.authentication(protocol, AuthOutcome::Wrong);
            tokio::time::sleep(delay).await;
            return Checked::Wrong { refused: shared.failures.refused(peer) };
        }
        Check::Unreadable => {
            metrics.authentication(protocol, AuthOutcome::Temporary);
            return Checked::Temporary("the relay cannot read its credentials");
        }
    };
    shared.failures.succeed(peer);
    let Some(token) = entry.current_token(chrono::Utc::now(), chrono::Duration::seconds(30)).cloned() else {
        tracing::warn!(
            protocol = protocol.as_str(),
            mailbox = %entry.mounted.mailbox,
            "no current access token for the binding: the client is told to retry"
        );
        metrics.upstream_failure(protocol, UpstreamFailure::NoToken);
        metrics.authentication(protocol, AuthOutcome::Temporary);
        return Checked::Temporary("no current access token");
    };
    let Some((host, port, tls)) = entry.server(protocol) else {
        tracing::warn!(
            protocol = protocol.as_str(),
            mailbox = %entry.mounted.mailbox,
            "the binding's Secret names no {0}_host and {0}_port",
            protocol.as_str()
        );
        metrics.upstream_failure(protocol, UpstreamFailure::NoServer);
        metrics.authentication(protocol, AuthOutcome::Temporary);
        return Checked::Temporary("no upstream server known");
    };
    let target = Target { protocol, host, port, tls };
    let creds = Credentials { user: entry.mounted.mailbox.clone(), token };
    Checked::Ready(entry, target, creds)
}

/// Counts an upstream login's failure and logs it.
pub(crate) fn upstream_failed(shared: &Shared, target: &Target, seen: &crate::policy::verify::Observed) {
    tracing::warn!(protocol = target.protocol.as_str(), upstream = %target.host, port = target.port, seen = ?seen, "the upstream login failed: the client is told to retry");
    shared.metrics.upstream_failure(target.protocol, UpstreamFailure::of(seen));
    shared.metrics.authentication(target.protocol, AuthOutcome::Temporary);
}

/// Checks `user` and `password` and logs in upstream for `protocol` (IMAP, POP3).
pub(crate) async fn login(shared: &Shared, peer: IpAddr, protocol: Protocol, user: &str, password: &[u8]) -> Outcome {
    let (target, creds) = match check(shared, peer, protocol, user, password).await {
        Checked::Ready(_, target, creds) => (target, creds),
        Checked::Wrong { refused } => return Outcome::Wrong { refused },
        Checked::Temporary(why) => return Outcome::Temporary(why),
    };
    match crate::mail::open_session(&target, &creds, &shared.mail).await {
        Ok(session) => {
            tracing::debug!(source = %peer, protocol = protocol.as_str(), upstream = %target.host, "relay session authenticated");
            shared.metrics.authentication(protocol, AuthOutcome::Ok);
            Outcome::LoggedIn(session)
        }
        Err(seen) => {
            upstream_failed(shared, &target, &seen);
            Outcome::Temporary("the upstream server is unavailable")
        }
    }
}

/// A SASL PLAIN response's user and password (the authorization identity empty or the user's).
pub(crate) fn plain(response: &[u8]) -> Option<(String, Vec<u8>)> {
    let mut parts = response.split(|b| *b == 0);
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(authz), Some(user), Some(password), None) if authz.is_empty() || authz == user => {
            Some((String::from_utf8_lossy(user).into_owned(), password.to_vec()))
        }
        _ => None,
    }
}
