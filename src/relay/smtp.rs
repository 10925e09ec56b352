//! One SMTP client session of the relay. Before authentication the relay speaks SMTP itself
//! (greeting, `EHLO`/`HELO`, `STARTTLS`, `AUTH PLAIN`/`LOGIN`, `NOOP`, `RSET`, `QUIT`; anything
//! else is `530`). After `AUTH` it checks the credentials ([`super::login::check`]), logs in upstream with XOAUTH2
//! ([`crate::mail::submission`]) and answers `235` only then; from there every command goes
//! upstream in order and the upstream's reply comes back as the upstream wrote it, except
//! where authentication is concerned: `MAIL FROM` of another sender than the mailbox, `AUTH` and
//! `STARTTLS` are answered by the relay, and `EHLO` is answered from the upstream's extensions
//! with its `AUTH` line replaced by the relay's. Pipelined commands are read from the buffer in
//! order, so replies keep their order; when the upstream offers `PIPELINING`, a client's group of
//! `MAIL`/`RCPT`/`RSET` (up to a `NOOP` or `DATA`) already read goes upstream in one write, every
//! `MAIL` sender checked first, and the replies come back in one; `DATA` and `BDAT` bodies are
//! copied a read at a time.

use std::net::IpAddr;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use super::login::Checked;
use super::metrics::{AuthOutcome, UpstreamFailure};
use super::wire::{Wire, WireError};
use super::{Shared, TLS_HANDSHAKE};
use crate::api::Protocol;
use crate::mail::Io;

/// Extensions offered before the upstream was ever seen: ones every submission server has.
const FALLBACK_EXTENSIONS: [&str; 3] = ["PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES"];

/// How a session ended before authentication.
enum Before {
    /// Go on relaying (upstream logged in).
    Relay(Box<Wire>, crate::mail::Submission, Vec<String>),
    /// The session is over.
    Done,
}

/// Whether a command line reads the same to the relay and to any upstream: printable ASCII and
/// spaces (no tab, NUL, CR or other control character, nothing beyond ASCII), not starting with
/// a space.
fn plain_command(line: &[u8]) -> bool {
    line.first().is_some_and(|b| *b != b' ') && line.iter().all(|b| (0x20..0x7f).contains(b))
}

/// The size of `BDAT <size> [LAST]`: digits only (no sign), at most 12 of them.
fn bdat_size(args: &str) -> Option<u64> {
    let n = args.split(' ').next()?;
    (!n.is_empty() && n.len() <= 12 && n.bytes().all(|b| b.is_ascii_digit())).then(|| n.parse().ok()).flatten()
}

fn verb_of(line: &[u8]) -> (String, String) {
    let text = String::from_utf8_lossy(line);
    let (verb, rest) = text.split_once(' ').unwrap_or((&text, ""));
    (verb.to_ascii_uppercase(), rest.trim().to_owned())
}

/// Serves one client connection. `implicit_tls`: the connection is already under TLS.
pub(crate) async fn session(io: Box<dyn Io>, peer: IpAddr, implicit_tls: bool, shared: Arc<Shared>) {
    let total = shared.limits.total;
    let _ = tokio::time::timeout(total, run(io, peer, implicit_tls, &shared)).await;
}

async fn run(io: Box<dyn Io>, peer: IpAddr, implicit_tls: bool, shared: &Shared) {
    let limits = shared.limits;
    let mut client = Wire::new(io, Vec::new(), limits.max_line);
    if shared.failures.refused(peer) {
        shared.metrics.authentication(crate::api::Protocol::Smtp, super::metrics::AuthOutcome::Refused);
        let _ = client.write_line("421 4.7.0 Too many failed authentications, try again later", limits.write).await;
        client.close().await;
        return;
    }
    if client.write_line(&format!("220 {} ESMTP relay ready", shared.name), limits.write).await.is_err() {
        return;
    }
    match tokio::time::timeout(super::LOGIN_DEADLINE, before_auth(client, peer, implicit_tls, shared)).await {
        Ok(Before::Relay(client, upstream, senders)) => relay(*client, upstream, &senders, shared).await,
        Ok(Before::Done) | Err(_) => {}
    }
}

fn ehlo_reply(shared: &Shared, extensions: &[String], starttls: bool, auth: bool) -> String {
    let mut lines = vec![shared.name.clone()];
    for e in extensions {
        let upper = e.to_ascii_uppercase();
        if upper == "STARTTLS" || upper.starts_with("AUTH ") || upper.starts_with("AUTH=") || upper == "AUTH" {
            continue;
        }
        lines.push(e.clone());
    }
    if starttls {
        lines.push("STARTTLS".to_owned());
    }
    if auth {
        lines.push("AUTH PLAIN LOGIN".to_owned());
    }
    let last = lines.len().saturating_sub(1);
    lines
        .iter()
        .enumerate()
        .map(|(i, l)| format!("250{}{l}\r\n", if i == last { ' ' } else { '-' }))
        .collect::<String>()
}

fn known_extensions(shared: &Shared) -> Vec<String> {
    shared
        .extensions
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone()
        .unwrap_or_else(|| FALLBACK_EXTENSIONS.iter().map(|e| (*e).to_owned()).collect())
}

async fn before_auth(mut client: Wire, peer: IpAddr, implicit_tls: bool, shared: &Shared) -> Before {
    let limits = shared.limits;
    let mut tls = implicit_tls;
    let mut greeted = false;
    for _ in 0..limits.commands_before_auth {
        let line = match client.read_line(limits.idle_before_auth).await {
            Ok(l) => l,
            Err(WireError::LineTooLong) => {
                let _ = client.write_line("500 5.5.6 Line too long", limits.write).await;
                client.close().await;
                return Before::Done;
            }
            Err(WireError::Timeout) => {
                let _ = client.write_line("421 4.4.2 Idle timeout, closing", limits.write).await;
                client.close().await;
                return Before::Done;
            }
            Err(WireError::Closed) => return Before::Done,
        };
        let (verb, rest) = verb_of(&line);
        let auth_allowed = tls || peer.to_canonical().is_loopback() || shared.allow_plaintext_auth;
        let reply = match verb.as_str() {
            "EHLO" => {
                greeted = true;
                let starttls = !tls && shared.certs.is_some();
                let text = ehlo_reply(shared, &known_extensions(shared), starttls, auth_allowed);
                if client.write(text.as_bytes(), limits.write).await.is_err() {
                    return Before::Done;
                }
                continue;
            }
            "HELO" => {
                greeted = true;
                format!("250 {}", shared.name)
            }
            "STARTTLS" if tls => "503 5.5.1 TLS is already active".to_owned(),
            "STARTTLS" => match shared.certs.as_ref().map(|c| c.acceptor()) {
                Some(Ok(acceptor)) => {
                    if client.write_line("220 2.0.0 Ready to start TLS", limits.write).await.is_err() {
                        return Before::Done;
                    }
                    // Commands sent before the handshake would be taken as sent under TLS.
                    let Some(plain) = client.into_stream() else { return Before::Done };
                    match tokio::time::timeout(TLS_HANDSHAKE, acceptor.accept(plain)).await {
                        Ok(Ok(stream)) => {
                            client = Wire::new(Box::new(stream), Vec::new(), limits.max_line);
                            tls = true;
                            greeted = false;
                            continue;
                        }
                        _ => return Before::Done,
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "no TLS certificate for STARTTLS");
                    "454 4.7.0 TLS not available due to temporary reason".to_owned()
                }
                None => "502 5.5.1 STARTTLS is not offered here".to_owned(),
            },
            "AUTH" if !greeted => "503 5.5.1 Send EHLO first".to_owned(),
            "AUTH" if !auth_allowed => {
                "538 5.7.11 Encryption required for requested authentication mechanism".to_owned()
            }
            "AUTH" => match authenticate(&mut client, &rest, peer, shared).await {
                Ok(Some((upstream, senders))) => return Before::Relay(Box::new(client), upstream, senders),
                Ok(None) => continue,
                Err(()) => {
                    client.close().await;
                    return Before::Done;
                }
            },
            "NOOP" => "250 2.0.0 OK".to_owned(),
            "RSET" => "250 2.0.0 OK".to_owned(),
            "QUIT" => {
                let _ = client.write_line("221 2.0.0 Bye", limits.write).await;
                client.close().await;
                return Before::Done;
            }
            _ => "530 5.7.0 Authentication required".to_owned(),
        };
        if client.write_line(&reply, limits.write).await.is_err() {
            return Before::Done;
        }
    }
    let _ = client.write_line("421 4.7.0 Too many commands before authentication", limits.write).await;
    client.close().await;
    Before::Done
}

/// Reads one base64 SASL response line; `None` when cancelled (`*`) or undecodable (answered).
async fn sasl_line(client: &mut Wire, shared: &Shared) -> Result<Option<Vec<u8>>, ()> {
    let line = client.read_line(shared.limits.idle_before_auth).await.map_err(|_| ())?;
    decode(client, &line, shared).await
}

async fn decode(client: &mut Wire, text: &[u8], shared: &Shared) -> Result<Option<Vec<u8>>, ()> {
    if text == b"*" {
        client.write_line("501 5.0.0 Authentication cancelled", shared.limits.write).await.map_err(|_| ())?;
        return Ok(None);
    }
    match STANDARD.decode(text) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(_) => {
            client.write_line("501 5.5.2 Cannot decode the response", shared.limits.write).await.map_err(|_| ())?;
            Ok(None)
        }
    }
}

/// `AUTH PLAIN` or `AUTH LOGIN`; `Ok(Some)` with the upstream logged in, `Ok(None)` when the
/// client was answered and may go on, `Err` when the connection is to be closed.
async fn authenticate(
    client: &mut Wire,
    args: &str,
    peer: IpAddr,
    shared: &Shared,
) -> Result<Option<(crate::mail::Submission, Vec<String>)>, ()> {
    let write = shared.limits.write;
    let (mechanism, initial) = args.split_once(' ').unwrap_or((args, ""));
    let (user, password) = match mechanism.to_ascii_uppercase().as_str() {
        "PLAIN" => {
            let response = if initial.is_empty() {
                client.write_line("334 ", write).await.map_err(|_| ())?;
                sasl_line(client, shared).await?
            } else {
                decode(client, initial.as_bytes(), shared).await?
            };
            let Some(response) = response else { return Ok(None) };
            let mut parts = response.split(|b| *b == 0);
            match (parts.next(), parts.next(), parts.next(), parts.next()) {
                (Some(authz), Some(user), Some(password), None) if authz.is_empty() || authz == user => {
                    (String::from_utf8_lossy(user).into_owned(), password.to_vec())
                }
                _ => {
                    client.write_line("501 5.5.2 Malformed PLAIN response", write).await.map_err(|_| ())?;
                    return Ok(None);
                }
            }
        }
        "LOGIN" => {
            let user = if initial.is_empty() {
                client.write_line("334 VXNlcm5hbWU6", write).await.map_err(|_| ())?;
                sasl_line(client, shared).await?
            } else {
                decode(client, initial.as_bytes(), shared).await?
            };
            let Some(user) = user else { return Ok(None) };
            client.write_line("334 UGFzc3dvcmQ6", write).await.map_err(|_| ())?;
            let Some(password) = sasl_line(client, shared).await? else { return Ok(None) };
            (String::from_utf8_lossy(&user).into_owned(), password)
        }
        _ => {
            client.write_line("504 5.5.4 Unrecognized authentication type", write).await.map_err(|_| ())?;
            return Ok(None);
        }
    };
    let temporary = |why: &str| format!("454 4.7.0 Temporary authentication failure: {why}");
    let (entry, target, creds) = match super::login::check(shared, peer, Protocol::Smtp, &user, &password).await {
        Checked::Ready(entry, target, creds) => (entry, target, creds),
        Checked::Wrong { refused } => {
            client.write_line("535 5.7.8 Authentication credentials invalid", write).await.map_err(|_| ())?;
            if refused {
                let _ = client.write_line("421 4.7.0 Too many failed authentications, try again later", write).await;
                return Err(());
            }
            return Ok(None);
        }
        Checked::Temporary(why) => {
            client.write_line(&temporary(why), write).await.map_err(|_| ())?;
            return Ok(None);
        }
    };
    match crate::mail::submission(&target, &creds, &shared.mail).await {
        Ok(upstream) => {
            // A sidecar shows its one upstream's extensions before the next login; the shared
            // relay shows the fixed list (one tenant's upstream never speaks to another's client).
            if matches!(shared.source, super::source::Source::Mounted(_)) {
                *shared.extensions.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
                    Some(upstream.extensions.clone());
            }
            shared.metrics.authentication(Protocol::Smtp, AuthOutcome::Ok);
            client.write_line("235 2.7.0 Authentication successful", write).await.map_err(|_| ())?;
            tracing::debug!(source = %peer, upstream = %target.host, "relay session authenticated");
            Ok(Some((upstream, entry.mounted.senders())))
        }
        Err(seen) => {
            super::login::upstream_failed(shared, &target, &seen);
            client.write_line(&temporary("the upstream server is unavailable"), write).await.map_err(|_| ())?;
            Ok(None)
        }
    }
}

/// The envelope sender of `MAIL FROM:<addr> params`, when the line has one.
fn sender(args: &str) -> Option<&str> {
    let rest = args.get(..5).filter(|p| p.eq_ignore_ascii_case("FROM:")).and(args.get(5..))?.trim_start();
    let inner = rest.strip_prefix('<')?;
    inner.split_once('>').map(|(a, _)| a)
}

/// Reads one whole upstream reply (raw lines with CRLF) and its code.
async fn upstream_reply(up: &mut Wire, shared: &Shared) -> Result<(u16, Vec<u8>), WireError> {
    let mut raw = Vec::new();
    for _ in 0..shared.mail.limits.max_lines {
        let line = up.read_line(shared.limits.upstream_reply).await?;
        let text = String::from_utf8_lossy(&line);
        let Some(parsed) = crate::mail::reply::smtp(&text) else { return Err(WireError::Closed) };
        raw.extend_from_slice(&line);
        raw.extend_from_slice(b"\r\n");
        if parsed.last {
            return Ok((parsed.code, raw));
        }
    }
    Err(WireError::LineTooLong)
}

/// The most pipelined commands sent upstream in one write (their replies are held until the
/// last comes, so this bounds that memory too; a longer group goes in several).
const MAX_GROUP: usize = 64;

const LOST: &str = "421 4.4.2 The upstream connection was lost, nothing was sent; try again later";

/// Tells the client the upstream connection was lost, and counts it.
async fn lost(client: &mut Wire, shared: &Shared) {
    shared.metrics.upstream_failure(Protocol::Smtp, UpstreamFailure::Lost);
    let _ = client.write_line(LOST, shared.limits.write).await;
}

async fn relay(mut client: Wire, upstream: crate::mail::Submission, senders: &[String], shared: &Shared) {
    let limits = shared.limits;
    let extensions = upstream.extensions.clone();
    let pipelining = extensions.iter().any(|e| e.eq_ignore_ascii_case("PIPELINING"));
    let mut up = Wire::new(upstream.stream, upstream.pending, shared.mail.limits.max_line);
    loop {
        let line = match client.read_line(limits.idle_after_auth).await {
            Ok(l) => l,
            Err(e) => {
                let _ = match e {
                    WireError::LineTooLong => client.write_line("500 5.5.6 Line too long", limits.write).await,
                    WireError::Timeout => client.write_line("421 4.4.2 Idle timeout, closing", limits.write).await,
                    WireError::Closed => Ok(()),
                };
                let _ = up.write_line("QUIT", limits.write).await;
                up.close().await;
                client.close().await;
                return;
            }
        };
        let (mut verb, mut rest) = verb_of(&line);
        let chunking = extensions.iter().any(|e| e.eq_ignore_ascii_case("CHUNKING"));
        let local = match verb.as_str() {
            // A line the relay would read otherwise than the upstream (a tab or a leading space
            // before the verb, a NUL or a bare CR) is refused: the sender check must see the
            // command the upstream will act on.
            _ if !plain_command(&line) => Some("500 5.5.2 Syntax error: malformed command line".to_owned()),
            "BDAT" if !chunking || bdat_size(&rest).is_none() => {
                Some("501 5.5.4 BDAT needs a size in digits (and an upstream offering CHUNKING)".to_owned())
            }
            "AUTH" => Some("503 5.5.1 Already authenticated".to_owned()),
            "STARTTLS" => Some("503 5.5.1 STARTTLS is not allowed after authentication".to_owned()),
            "MAIL" => match sender(&rest) {
                Some(from) if senders.iter().any(|s| from.eq_ignore_ascii_case(s)) => None,
                _ => Some(
                    "550 5.7.1 Sender address rejected: this relay sends only as its mailbox and spec.relay.senders"
                        .to_owned(),
                ),
            },
            "EHLO" | "HELO" => {
                // A new EHLO resets the transaction: the upstream is reset, the answer is the
                // upstream's extensions with the relay's AUTH.
                if up.write_line("RSET", limits.write).await.is_err() || upstream_reply(&mut up, shared).await.is_err()
                {
                    lost(&mut client, shared).await;
                    return;
                }
                if verb == "EHLO" {
                    let text = ehlo_reply(shared, &extensions, false, true);
                    if client.write(text.as_bytes(), limits.write).await.is_err() {
                        return;
                    }
                    continue;
                }
                Some(format!("250 {}", shared.name))
            }
            _ => None,
        };
        if let Some(reply) = local {
            if client.write_line(&reply, limits.write).await.is_err() {
                return;
            }
            continue;
        }
        let mut command = line.clone();
        command.extend_from_slice(b"\r\n");
        // A client that pipelines (RFC 2920): the commands it sent together that go upstream as
        // they are go in one write, and their replies come back in one, in order. A command
        // the relay answers itself (another sender, AUTH, EHLO, ...) ends the group and is
        // taken in the next turn, so the replies keep their order; DATA ends it too.
        let mut group = 1usize;
        while pipelining && group < MAX_GROUP && matches!(verb.as_str(), "MAIL" | "RCPT" | "RSET") {
            let Some(next) = client.buffered_line().filter(|l| plain_command(l)) else { break };
            let (next_verb, next_rest) = verb_of(next);
            let goes_up = match next_verb.as_str() {
                "MAIL" => sender(&next_rest).is_some_and(|from| senders.iter().any(|s| from.eq_ignore_ascii_case(s))),
                "RCPT" | "RSET" | "NOOP" | "DATA" => true,
                _ => false,
            };
            if !goes_up {
                break;
            }
            let Ok(next) = client.read_line(limits.idle_after_auth).await else { break };
            command.extend_from_slice(&next);
            command.extend_from_slice(b"\r\n");
            group = group.saturating_add(1);
            verb = next_verb;
            rest = next_rest;
        }
        if up.write(&command, limits.write).await.is_err() {
            lost(&mut client, shared).await;
            return;
        }
        if verb == "BDAT" {
            let Some(count) = bdat_size(&rest) else {
                let _ = client.write_line("501 5.5.4 BDAT needs a size", limits.write).await;
                return;
            };
            if let Err((upstream_side, _)) = client.copy_exact(&mut up, count, limits.idle_after_auth).await {
                if upstream_side {
                    lost(&mut client, shared).await;
                }
                return;
            }
        }
        let mut replies = Vec::new();
        let mut code = 0;
        for _ in 0..group {
            let Ok((last_code, reply)) = upstream_reply(&mut up, shared).await else {
                lost(&mut client, shared).await;
                return;
            };
            code = last_code;
            replies.extend_from_slice(&reply);
        }
        if client.write(&replies, limits.write).await.is_err() {
            return;
        }
        if verb == "QUIT" {
            up.close().await;
            client.close().await;
            return;
        }
        if verb == "DATA" && code == 354 {
            if let Err((upstream_side, _)) = client.copy_data(&mut up, limits.idle_after_auth).await {
                if upstream_side {
                    lost(&mut client, shared).await;
                }
                return;
            }
            // The upstream's final answer to the message, as it is: never a 250 of the relay's.
            let Ok((_, reply)) = upstream_reply(&mut up, shared).await else {
                lost(&mut client, shared).await;
                return;
            };
            if client.write(&reply, limits.write).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod parse_tests {
    use super::*;

    #[test]
    fn command_lines_the_upstream_could_read_otherwise_are_refused_and_bdat_sizes_are_digits() {
        assert!(plain_command(b"MAIL FROM:<a@example.com>"));
        assert!(!plain_command(b"MAIL\tFROM:<ceo@example.com>"));
        assert!(!plain_command(b" MAIL FROM:<ceo@example.com>"));
        assert!(!plain_command(b"MAIL FROM:<a@example.com>\r"));
        assert!(!plain_command(b"MAIL FROM:<a@example.com>\0"));
        assert!(!plain_command(b""));
        assert_eq!(bdat_size("30 LAST"), Some(30));
        assert_eq!(bdat_size("+30"), None);
        assert_eq!(bdat_size("-1"), None);
        assert_eq!(bdat_size("1234567890123"), None);
        assert_eq!(bdat_size(""), None);
    }

    #[test]
    fn the_sender_comes_from_mail_from() {
        assert_eq!(sender("FROM:<a@example.com> SIZE=10"), Some("a@example.com"));
        assert_eq!(sender("from: <a@example.com>"), Some("a@example.com"));
        assert_eq!(sender("FROM:<>"), Some(""));
        assert_eq!(sender("TO:<a@example.com>"), None);
        assert_eq!(sender("FROM:a@example.com"), None);
    }
}
