//! The login the IMAP and POP3 listeners share: the mounted Secret read afresh, the relay
//! credentials checked ([`super::secret::Mounted::accepts`]; a failure is counted per source and
//! answered after the guard's delay), then the upstream server named in the Secret
//! (`imap_host`/`imap_port`, `pop3_host`/`pop3_port`; TLS as the port implies) logged in to
//! with XOAUTH2 and the current token ([`crate::mail::open_session`]). Nothing a client can fix
//! (no token, an expired one, no server named, the upstream down or refusing) is a temporary
//! failure, never a success. Logs name the source and the upstream, never a secret.

use std::net::IpAddr;

use crate::api::Protocol;
use crate::mail::{Credentials, Session, Target};

use super::Shared;

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

/// Checks `user` and `password` against the mounted Secret and logs in upstream for `protocol`.
pub(crate) async fn login(shared: &Shared, peer: IpAddr, protocol: Protocol, user: &str, password: &[u8]) -> Outcome {
    let dir = shared.secret_dir.clone();
    let read = tokio::task::spawn_blocking(move || {
        let mounted = super::secret::read(&dir)?;
        let server = super::secret::server(&dir, protocol)?;
        Ok::<_, super::secret::SecretError>((mounted, server))
    })
    .await;
    let (mounted, server) = match read {
        Ok(Ok(found)) => found,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "the mounted Secret cannot be read");
            return Outcome::Temporary("the relay cannot read its credentials");
        }
        Err(e) => {
            tracing::warn!(error = %e, "reading the mounted Secret failed");
            return Outcome::Temporary("the relay cannot read its credentials");
        }
    };
    if !mounted.accepts(user, password) {
        let delay = shared.failures.fail(peer);
        tracing::info!(source = %peer, protocol = protocol.as_str(), "relay authentication failed");
        tokio::time::sleep(delay).await;
        return Outcome::Wrong { refused: shared.failures.refused(peer) };
    }
    shared.failures.succeed(peer);
    let Some(token) = mounted.current_token(chrono::Utc::now(), chrono::Duration::seconds(30)) else {
        tracing::warn!(
            protocol = protocol.as_str(),
            "no current access token in the mounted Secret: the client is told to retry"
        );
        return Outcome::Temporary("no current access token");
    };
    let Some((host, port, tls)) = server else {
        tracing::warn!(
            protocol = protocol.as_str(),
            "the mounted Secret names no {0}_host and {0}_port",
            protocol.as_str()
        );
        return Outcome::Temporary("no upstream server known");
    };
    let target = Target { protocol, host, port, tls };
    let creds = Credentials { user: mounted.mailbox.clone(), token: token.clone() };
    match crate::mail::open_session(&target, &creds, &shared.mail).await {
        Ok(session) => {
            tracing::debug!(source = %peer, protocol = protocol.as_str(), upstream = %target.host, "relay session authenticated");
            Outcome::LoggedIn(session)
        }
        Err(seen) => {
            tracing::warn!(protocol = protocol.as_str(), upstream = %target.host, port = target.port, seen = ?seen, "the upstream login failed: the client is told to retry");
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
