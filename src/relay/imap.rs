//! One IMAP client session of the relay. Before authentication the relay speaks IMAP itself:
//! `CAPABILITY`, `NOOP`, `LOGOUT`, `STARTTLS`, `LOGIN` (atoms, quoted strings and literals) and
//! `AUTHENTICATE PLAIN` (two steps or with an initial response, SASL-IR); anything else is `BAD`.
//! Its capabilities are its own: `IMAP4rev1 SASL-IR`, `STARTTLS` when it can, and `AUTH=PLAIN`,
//! or `LOGINDISABLED` where a login would cross the network in clear. After the password check
//! ([`super::login`]) the upstream is logged in to with XOAUTH2; the client's tagged `OK` carries
//! the upstream's capabilities (without its `AUTH=`), and from there every byte is copied as it
//! is ([`super::pipe`]), so `IDLE`, literals and large `FETCH`es work unchanged.
//!
//! Bounds before authentication: a command (its lines and literals together) is at most
//! `max_line` bytes, a synchronizing literal beyond that is refused before the client sends it,
//! a non-synchronizing one ends the session; commands, and the wait for each line, are bounded.

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

/// One command: its tag, its verb (upper case) and its arguments (atoms, quoted strings
/// unquoted, literals), raw bytes.
#[derive(Debug, PartialEq, Eq)]
struct Command {
    tag: String,
    verb: String,
    args: Vec<Vec<u8>>,
}

/// What reading a command gave.
enum Read {
    /// A whole command.
    Command(Command),
    /// Refused: answer this line and read the next command.
    Refused(String),
    /// Answer this line and close.
    Fatal(String),
    /// The client is gone.
    Closed,
}

/// `{n}` or `{n+}` at the end of a line: the text before it, `n`, and whether it synchronizes.
fn literal_marker(line: &[u8]) -> Option<(usize, usize, bool)> {
    let inner = line.strip_suffix(b"}")?;
    let open = inner.iter().rposition(|b| *b == b'{')?;
    let digits = inner.get(open.saturating_add(1)..)?;
    let (digits, sync) = match digits.strip_suffix(b"+") {
        Some(d) => (d, false),
        None => (digits, true),
    };
    if digits.is_empty() || digits.len() > 10 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = std::str::from_utf8(digits).ok()?.parse::<usize>().ok()?;
    Some((open, n, sync))
}

/// The first word of `line` (the tag), for answers to a command that could not be read whole.
fn tag_of(line: &[u8]) -> String {
    let word = line.split(|b| *b == b' ').next().unwrap_or_default();
    let tag = String::from_utf8_lossy(word).into_owned();
    if tag.is_empty() || tag.len() > 64 || tag.contains(['{', '"']) { "*".to_owned() } else { tag }
}

/// Splits a command line's text into atoms and quoted strings; `Err` for an unterminated quote.
fn words(text: &[u8], into: &mut Vec<Vec<u8>>) -> Result<(), ()> {
    let mut i = 0;
    while let Some(&b) = text.get(i) {
        match b {
            b' ' => i = i.saturating_add(1),
            b'"' => {
                let mut word = Vec::new();
                i = i.saturating_add(1);
                loop {
                    match text.get(i) {
                        None => return Err(()),
                        Some(b'"') => break,
                        Some(b'\\') => {
                            word.push(*text.get(i.saturating_add(1)).ok_or(())?);
                            i = i.saturating_add(2);
                        }
                        Some(c) => {
                            word.push(*c);
                            i = i.saturating_add(1);
                        }
                    }
                }
                i = i.saturating_add(1);
                into.push(word);
            }
            _ => {
                let end = text
                    .get(i..)
                    .and_then(|t| t.iter().position(|c| *c == b' '))
                    .map_or(text.len(), |n| i.saturating_add(n));
                into.push(text.get(i..end).unwrap_or_default().to_vec());
                i = end;
            }
        }
    }
    Ok(())
}

/// The command from its parts: each line's text and the literal that followed it.
fn parse(parts: Vec<(Vec<u8>, Option<Vec<u8>>)>) -> Result<Command, String> {
    let tag = parts.first().map(|(t, _)| tag_of(t)).unwrap_or_else(|| "*".to_owned());
    let mut all = Vec::new();
    for (text, literal) in parts {
        if words(&text, &mut all).is_err() {
            return Err(format!("{tag} BAD Unterminated quoted string"));
        }
        if let Some(literal) = literal {
            all.push(literal);
        }
    }
    let mut all = all.into_iter();
    match (all.next(), all.next()) {
        (Some(t), Some(verb)) if tag != "*" && t == tag.as_bytes() => {
            Ok(Command { tag, verb: String::from_utf8_lossy(&verb).to_ascii_uppercase(), args: all.collect() })
        }
        _ => Err(format!("{tag} BAD Expected a tag and a command")),
    }
}

/// Answers for a wire error before authentication.
fn fatal(e: WireError) -> Read {
    match e {
        WireError::LineTooLong => Read::Fatal("* BYE Command line too long".to_owned()),
        WireError::Timeout => Read::Fatal("* BYE Autologout; idle for too long".to_owned()),
        WireError::Closed => Read::Closed,
    }
}

/// Reads one command with its literals, within `max_line` bytes in all. `plain_refused`: a
/// `LOGIN` or `AUTHENTICATE` literal is refused before the client sends it (no TLS).
async fn read_command(client: &mut Wire, shared: &Shared, plain_refused: bool) -> Read {
    let limits = shared.limits;
    let mut budget = limits.max_line;
    let mut parts: Vec<(Vec<u8>, Option<Vec<u8>>)> = Vec::new();
    loop {
        let line = match client.read_line(limits.idle_before_auth).await {
            Ok(l) => l,
            Err(e) => return fatal(e),
        };
        let Some(left) = budget.checked_sub(line.len()) else {
            return Read::Fatal("* BYE Command too long".to_owned());
        };
        budget = left;
        let Some((text_len, count, sync)) = literal_marker(&line) else {
            parts.push((line, None));
            return match parse(parts) {
                Ok(command) => Read::Command(command),
                Err(reply) => Read::Refused(reply),
            };
        };
        let mut text = line;
        text.truncate(text_len);
        let first = parts.first().map_or(text.as_slice(), |(t, _)| t.as_slice());
        let tag = tag_of(first);
        let verb = first.split(|b| *b == b' ').nth(1).map(|v| v.to_ascii_uppercase()).unwrap_or_default();
        let login = verb == b"LOGIN" || verb == b"AUTHENTICATE";
        if count > budget || (plain_refused && login) {
            if !sync {
                // The client sends the bytes anyway: the command cannot be found again.
                return Read::Fatal("* BYE Literal too large or not allowed here".to_owned());
            }
            return Read::Refused(if count > budget {
                format!("{tag} BAD Literal too large")
            } else {
                format!("{tag} NO [PRIVACYREQUIRED] Plaintext authentication is disallowed without TLS (use STARTTLS)")
            });
        }
        if sync && client.write_line("+ Ready for literal data", limits.write).await.is_err() {
            return Read::Closed;
        }
        let literal = match client.read_exact(count, limits.idle_before_auth).await {
            Ok(l) => l,
            Err(e) => return fatal(e),
        };
        budget = budget.saturating_sub(count);
        parts.push((text, Some(literal)));
    }
}

/// The capabilities before authentication.
fn capabilities(shared: &Shared, tls: bool, auth_allowed: bool) -> String {
    let mut caps = vec!["IMAP4rev1", "SASL-IR"];
    if !tls && shared.certs.is_some() {
        caps.push("STARTTLS");
    }
    caps.push(if auth_allowed { "AUTH=PLAIN" } else { "LOGINDISABLED" });
    caps.join(" ")
}

/// Serves one client connection. `implicit_tls`: the connection is already under TLS.
pub(crate) async fn session(io: Box<dyn Io>, peer: IpAddr, implicit_tls: bool, shared: Arc<Shared>) {
    let total = shared.limits.total_mailbox;
    let _ = tokio::time::timeout(total, run(io, peer, implicit_tls, &shared)).await;
}

async fn run(io: Box<dyn Io>, peer: IpAddr, implicit_tls: bool, shared: &Shared) {
    let limits = shared.limits;
    let mut client = Wire::new(io, Vec::new(), limits.max_line);
    if shared.failures.refused(peer) {
        shared.metrics.authentication(crate::api::Protocol::Imap, super::metrics::AuthOutcome::Refused);
        let _ = client
            .write_line("* BYE [UNAVAILABLE] Too many failed authentications, try again later", limits.write)
            .await;
        client.close().await;
        return;
    }
    let auth_allowed = implicit_tls || peer.to_canonical().is_loopback() || shared.allow_plaintext_auth;
    let greeting = format!(
        "* OK [CAPABILITY {}] {} IMAP relay ready",
        capabilities(shared, implicit_tls, auth_allowed),
        shared.name
    );
    if client.write_line(&greeting, limits.write).await.is_err() {
        return;
    }
    if let Ok(Some((client, upstream))) =
        tokio::time::timeout(super::LOGIN_DEADLINE, before_auth(client, peer, implicit_tls, shared)).await
    {
        let (io, pending) = client.into_parts();
        join(Side { io, pending }, upstream, limits.idle_mailbox, limits.write).await;
    }
}

/// The upstream's capabilities for the client after the login: without what concerns the login.
fn after_login(capabilities: &[String]) -> Vec<&str> {
    capabilities
        .iter()
        .map(String::as_str)
        .filter(|c| {
            let upper = c.to_ascii_uppercase();
            !(upper.starts_with("AUTH=") || upper == "LOGINDISABLED" || upper == "STARTTLS" || upper == "SASL-IR")
        })
        .collect()
}

/// What a command before authentication led to.
enum Step {
    /// Answer these lines and read the next command.
    Answer(String),
    /// Answer and close.
    Close(String),
    /// Start TLS.
    Starttls(String),
    /// Check these credentials.
    Login(String, String, Vec<u8>),
}

/// `AUTHENTICATE PLAIN`: the credentials, or the answer when there are none.
async fn authenticate(client: &mut Wire, shared: &Shared, command: &Command) -> Result<Step, ()> {
    let tag = &command.tag;
    let mechanism = command.args.first().map(|m| m.to_ascii_uppercase()).unwrap_or_default();
    if mechanism != b"PLAIN" {
        return Ok(Step::Answer(format!("{tag} NO Unsupported authentication mechanism")));
    }
    let response = match command.args.get(1) {
        Some(initial) if initial == b"=" => Vec::new(),
        Some(initial) => initial.clone(),
        None => {
            client.write_line("+ ", shared.limits.write).await.map_err(|_| ())?;
            client.read_line(shared.limits.idle_before_auth).await.map_err(|_| ())?
        }
    };
    if response == b"*" {
        return Ok(Step::Answer(format!("{tag} BAD Authentication cancelled")));
    }
    let Ok(decoded) = STANDARD.decode(&response) else {
        return Ok(Step::Answer(format!("{tag} BAD Invalid base64 in the response")));
    };
    Ok(match plain(&decoded) {
        Some((user, password)) => Step::Login(tag.clone(), user, password),
        None => Step::Answer(format!("{tag} BAD Malformed PLAIN response")),
    })
}

async fn dispatch(
    client: &mut Wire,
    shared: &Shared,
    command: Command,
    tls: bool,
    auth_allowed: bool,
) -> Result<Step, ()> {
    let tag = &command.tag;
    let privacy =
        format!("{tag} NO [PRIVACYREQUIRED] Plaintext authentication is disallowed without TLS (use STARTTLS)");
    Ok(match command.verb.as_str() {
        "CAPABILITY" => Step::Answer(format!(
            "* CAPABILITY {}\r\n{tag} OK CAPABILITY completed",
            capabilities(shared, tls, auth_allowed)
        )),
        "NOOP" => Step::Answer(format!("{tag} OK NOOP completed")),
        "LOGOUT" => Step::Close(format!("* BYE Logging out\r\n{tag} OK LOGOUT completed")),
        "STARTTLS" if tls => Step::Answer(format!("{tag} BAD TLS is already active")),
        "STARTTLS" if shared.certs.is_none() => Step::Answer(format!("{tag} BAD STARTTLS is not offered here")),
        "STARTTLS" => Step::Starttls(format!("{tag} OK Begin TLS negotiation now")),
        "LOGIN" | "AUTHENTICATE" if !auth_allowed => Step::Answer(privacy),
        "LOGIN" => match command.args.as_slice() {
            [user, password] => Step::Login(tag.clone(), String::from_utf8_lossy(user).into_owned(), password.clone()),
            _ => Step::Answer(format!("{tag} BAD LOGIN takes a user name and a password")),
        },
        "AUTHENTICATE" => authenticate(client, shared, &command).await?,
        _ => Step::Answer(format!("{tag} BAD Log in first")),
    })
}

async fn before_auth(mut client: Wire, peer: IpAddr, implicit_tls: bool, shared: &Shared) -> Option<(Wire, Side)> {
    let limits = shared.limits;
    let mut tls = implicit_tls;
    for _ in 0..limits.commands_before_auth {
        let auth_allowed = tls || peer.to_canonical().is_loopback() || shared.allow_plaintext_auth;
        let command = match read_command(&mut client, shared, !auth_allowed).await {
            Read::Command(c) => c,
            Read::Refused(reply) => {
                client.write_line(&reply, limits.write).await.ok()?;
                continue;
            }
            Read::Fatal(reply) => {
                let _ = client.write_line(&reply, limits.write).await;
                client.close().await;
                return None;
            }
            Read::Closed => return None,
        };
        let Ok(step) = dispatch(&mut client, shared, command, tls, auth_allowed).await else {
            client.close().await;
            return None;
        };
        match step {
            Step::Answer(reply) => client.write_line(&reply, limits.write).await.ok()?,
            Step::Close(reply) => {
                let _ = client.write_line(&reply, limits.write).await;
                client.close().await;
                return None;
            }
            Step::Starttls(reply) => {
                let acceptor = match shared.certs.as_ref().map(|c| c.acceptor()) {
                    Some(Ok(a)) => a,
                    _ => {
                        tracing::warn!("no TLS certificate for STARTTLS");
                        let tag = reply.split(' ').next().unwrap_or("*");
                        client
                            .write_line(&format!("{tag} NO [UNAVAILABLE] TLS is not available now"), limits.write)
                            .await
                            .ok()?;
                        continue;
                    }
                };
                client.write_line(&reply, limits.write).await.ok()?;
                // Commands sent before the handshake would be taken as sent under TLS.
                let plain = client.into_stream()?;
                let stream = tokio::time::timeout(TLS_HANDSHAKE, acceptor.accept(plain)).await.ok()?.ok()?;
                client = Wire::new(Box::new(stream), Vec::new(), limits.max_line);
                tls = true;
            }
            Step::Login(tag, user, password) => match login(shared, peer, Protocol::Imap, &user, &password).await {
                Outcome::LoggedIn(session) => {
                    let caps = after_login(&session.capabilities);
                    let reply = if caps.is_empty() {
                        format!("{tag} OK Logged in")
                    } else {
                        format!("{tag} OK [CAPABILITY {}] Logged in", caps.join(" "))
                    };
                    client.write_line(&reply, limits.write).await.ok()?;
                    return Some((client, Side { io: session.stream, pending: session.pending }));
                }
                Outcome::Wrong { refused } => {
                    client
                        .write_line(&format!("{tag} NO [AUTHENTICATIONFAILED] Authentication failed"), limits.write)
                        .await
                        .ok()?;
                    if refused {
                        let _ = client
                            .write_line("* BYE Too many failed authentications, try again later", limits.write)
                            .await;
                        client.close().await;
                        return None;
                    }
                }
                Outcome::Temporary(why) => {
                    client
                        .write_line(
                            &format!("{tag} NO [UNAVAILABLE] Temporary failure: {why}; try again later"),
                            limits.write,
                        )
                        .await
                        .ok()?;
                }
            },
        }
    }
    let _ = client.write_line("* BYE Too many commands before authentication", limits.write).await;
    client.close().await;
    None
}

#[cfg(test)]
mod parse_tests {
    use super::*;

    fn p(parts: &[(&str, Option<&str>)]) -> Result<Command, String> {
        parse(parts.iter().map(|(t, l)| (t.as_bytes().to_vec(), l.map(|l| l.as_bytes().to_vec()))).collect())
    }

    #[test]
    fn atoms_quoted_strings_and_literals_become_arguments() {
        let c = p(&[(r#"a1 login user@example.com "pa ss \"q\" \\""#, None)]).unwrap();
        assert_eq!((c.tag.as_str(), c.verb.as_str()), ("a1", "LOGIN"));
        assert_eq!(c.args, vec![b"user@example.com".to_vec(), br#"pa ss "q" \"#.to_vec()]);
        let c = p(&[("a2 LOGIN ", Some("user")), (" ", Some("p w")), ("", None)]).unwrap();
        assert_eq!(c.args, vec![b"user".to_vec(), b"p w".to_vec()]);
        assert!(p(&[(r#"a3 LOGIN u "unterminated"#, None)]).unwrap_err().starts_with("a3 BAD"));
        assert!(p(&[("lonely", None)]).unwrap_err().starts_with("lonely BAD"));
        assert!(p(&[("", None)]).unwrap_err().starts_with("* BAD"));
    }

    #[test]
    fn literal_markers_are_found_only_at_the_end() {
        assert_eq!(literal_marker(b"a LOGIN {12}"), Some((8, 12, true)));
        assert_eq!(literal_marker(b"a LOGIN u {3+}"), Some((10, 3, false)));
        assert_eq!(literal_marker(b"a LOGIN {x}"), None);
        assert_eq!(literal_marker(b"a LOGIN {99999999999}"), None);
        assert_eq!(literal_marker(b"a LOGIN {12} x"), None);
    }
}
