//! One POP3 client session of the relay. Before authentication the relay speaks POP3 itself:
//! `CAPA`, `STLS`, `USER`/`PASS`, `AUTH PLAIN` (two steps or with an initial response), `AUTH`
//! alone (the mechanism list), `QUIT`; anything else is `-ERR`. Where a login would cross the
//! network in clear, `USER` and `SASL` are not offered and `USER`, `PASS` and `AUTH` are refused.
//! After the password check ([`super::login`]) the upstream is logged in to with XOAUTH2, the
//! client gets `+OK`, and from there every byte is copied as it is ([`super::pipe`]) (`RETR` and
//! `TOP` unchanged, byte for byte).

use std::net::IpAddr;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use super::login::{Outcome, login, plain};
use super::pipe::{Side, join};
use super::wire::{Wire, WireError};
use super::{Shared, TLS_HANDSHAKE};
use crate::api::Protocol;
use crate::mail::Io;

const PRIVACY: &str = "-ERR [AUTH] Plaintext authentication is disallowed without TLS (use STLS)";

/// Serves one client connection. `implicit_tls`: the connection is already under TLS.
pub(crate) async fn session(io: Box<dyn Io>, peer: IpAddr, implicit_tls: bool, shared: Arc<Shared>) {
    let total = shared.limits.total_mailbox;
    let _ = tokio::time::timeout(total, run(io, peer, implicit_tls, &shared)).await;
}

async fn run(io: Box<dyn Io>, peer: IpAddr, implicit_tls: bool, shared: &Shared) {
    let limits = shared.limits;
    let mut client = Wire::new(io, Vec::new(), limits.max_line);
    if shared.failures.refused(peer) {
        shared.metrics.authentication(crate::api::Protocol::Pop3, super::metrics::AuthOutcome::Refused);
        let _ =
            client.write_line("-ERR [SYS/TEMP] Too many failed authentications, try again later", limits.write).await;
        client.close().await;
        return;
    }
    if client.write_line(&format!("+OK {} POP3 relay ready", shared.name), limits.write).await.is_err() {
        return;
    }
    if let Ok(Some((client, upstream))) =
        tokio::time::timeout(super::LOGIN_DEADLINE, before_auth(client, peer, implicit_tls, shared)).await
    {
        let (io, pending) = client.into_parts();
        join(Side { io, pending }, upstream, limits.idle_mailbox, limits.write).await;
    }
}

fn capa(shared: &Shared, tls: bool, auth_allowed: bool) -> String {
    let mut lines = vec!["+OK Capability list follows"];
    if auth_allowed {
        lines.extend(["USER", "SASL PLAIN"]);
    }
    if !tls && shared.certs.is_some() {
        lines.push("STLS");
    }
    lines.extend(["RESP-CODES", "AUTH-RESP-CODE", "."]);
    lines.join("\r\n")
}

/// `AUTH PLAIN [initial]`: the credentials, or the answer when there are none; `Err` when the
/// client is gone.
async fn auth_plain(
    client: &mut Wire,
    shared: &Shared,
    initial: &[u8],
) -> Result<Result<(String, Vec<u8>), String>, ()> {
    let response = match initial {
        b"" => {
            client.write_line("+ ", shared.limits.write).await.map_err(|_| ())?;
            client.read_line(shared.limits.idle_before_auth).await.map_err(|_| ())?
        }
        b"=" => Vec::new(),
        given => given.to_vec(),
    };
    if response == b"*" {
        return Ok(Err("-ERR Authentication cancelled".to_owned()));
    }
    let Ok(decoded) = STANDARD.decode(&response) else {
        return Ok(Err("-ERR Invalid base64 in the response".to_owned()));
    };
    Ok(plain(&decoded).ok_or_else(|| "-ERR Malformed PLAIN response".to_owned()))
}

async fn before_auth(mut client: Wire, peer: IpAddr, implicit_tls: bool, shared: &Shared) -> Option<(Wire, Side)> {
    let limits = shared.limits;
    let mut tls = implicit_tls;
    let mut user: Option<String> = None;
    for _ in 0..limits.commands_before_auth {
        let line = match client.read_line(limits.idle_before_auth).await {
            Ok(l) => l,
            Err(e) => {
                let _ = match e {
                    WireError::LineTooLong => client.write_line("-ERR Line too long", limits.write).await,
                    WireError::Timeout => client.write_line("-ERR Autologout; idle for too long", limits.write).await,
                    WireError::Closed => Ok(()),
                };
                client.close().await;
                return None;
            }
        };
        let (verb, rest) = match line.iter().position(|b| *b == b' ') {
            Some(i) => (line.get(..i).unwrap_or_default(), line.get(i.saturating_add(1)..).unwrap_or_default()),
            None => (line.as_slice(), &b""[..]),
        };
        let verb = String::from_utf8_lossy(verb).to_ascii_uppercase();
        let auth_allowed = tls || peer.to_canonical().is_loopback() || shared.allow_plaintext_auth;
        let credentials = match verb.as_str() {
            "CAPA" => Err(capa(shared, tls, auth_allowed)),
            "QUIT" => {
                let _ = client.write_line("+OK Bye", limits.write).await;
                client.close().await;
                return None;
            }
            "STLS" if tls => Err("-ERR TLS is already active".to_owned()),
            "STLS" => {
                let Some(Ok(acceptor)) = shared.certs.as_ref().map(|c| c.acceptor()) else {
                    let reply = if shared.certs.is_none() {
                        "-ERR STLS is not offered here"
                    } else {
                        "-ERR [SYS/TEMP] TLS is not available now"
                    };
                    client.write_line(reply, limits.write).await.ok()?;
                    continue;
                };
                client.write_line("+OK Begin TLS negotiation", limits.write).await.ok()?;
                // Commands sent before the handshake would be taken as sent under TLS.
                let plain = client.into_stream()?;
                let stream = tokio::time::timeout(TLS_HANDSHAKE, acceptor.accept(plain)).await.ok()?.ok()?;
                client = Wire::new(Box::new(stream), Vec::new(), limits.max_line);
                tls = true;
                user = None;
                continue;
            }
            "USER" | "PASS" | "AUTH" if !auth_allowed => Err(PRIVACY.to_owned()),
            "USER" if rest.is_empty() => Err("-ERR USER takes a user name".to_owned()),
            "USER" => {
                user = Some(String::from_utf8_lossy(rest).trim().to_owned());
                Err("+OK Send the password".to_owned())
            }
            // The password is the rest of the line, spaces included (RFC 1939).
            "PASS" => match user.take() {
                Some(name) => Ok((name, rest.to_vec())),
                None => Err("-ERR Send USER first".to_owned()),
            },
            "AUTH" if rest.is_empty() => Err("+OK\r\nPLAIN\r\n.".to_owned()),
            "AUTH" => {
                let (mechanism, initial) = match rest.iter().position(|b| *b == b' ') {
                    Some(i) => (rest.get(..i).unwrap_or_default(), rest.get(i.saturating_add(1)..).unwrap_or_default()),
                    None => (rest, &b""[..]),
                };
                if mechanism.eq_ignore_ascii_case(b"PLAIN") {
                    let Ok(answer) = auth_plain(&mut client, shared, initial).await else {
                        client.close().await;
                        return None;
                    };
                    answer
                } else {
                    Err("-ERR Unsupported authentication mechanism".to_owned())
                }
            }
            _ => Err("-ERR Authenticate first".to_owned()),
        };
        let (name, password) = match credentials {
            Ok(c) => c,
            Err(reply) => {
                client.write_line(&reply, limits.write).await.ok()?;
                continue;
            }
        };
        user = None;
        match login(shared, peer, Protocol::Pop3, &name, &password).await {
            Outcome::LoggedIn(session) => {
                client.write_line("+OK Logged in", limits.write).await.ok()?;
                return Some((client, Side { io: session.stream, pending: session.pending }));
            }
            Outcome::Wrong { refused } => {
                client.write_line("-ERR [AUTH] Authentication failed", limits.write).await.ok()?;
                if refused {
                    client.close().await;
                    return None;
                }
            }
            Outcome::Temporary(why) => {
                let reply = format!("-ERR [SYS/TEMP] Temporary failure: {why}; try again later");
                client.write_line(&reply, limits.write).await.ok()?;
            }
        }
    }
    let _ = client.write_line("-ERR Too many commands before authentication", limits.write).await;
    client.close().await;
    None
}
