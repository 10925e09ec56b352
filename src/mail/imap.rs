//! IMAP: greeting, CAPABILITY, STARTTLS, `AUTHENTICATE XOAUTH2` (or OAUTHBEARER when only that
//! is offered) in two steps, `LIST "" ""` (names no mailbox and reads no message; Exchange answers
//! it "User is authenticated but not connected." when IMAP is off for the mailbox), LOGOUT.

use super::conn::Conn;
use super::reply::{self, Imap, ImapStatus};
use super::{Credentials, MailError, Sasl, Settings, Step, Target, TlsMode, ensure_protected};
use crate::policy::verify::{Observed, server_text};

/// A tagged answer and the untagged lines before it.
struct Answer {
    status: ImapStatus,
    line: String,
    untagged: Vec<String>,
}

/// Reads until the tagged answer to `tag`, or a continuation when `continuation` is set
/// (returned as `Err(text)` in the outer `Ok`).
async fn answer(
    conn: &mut Conn,
    tag: &str,
    step: Step,
    settings: &Settings,
    continuation: bool,
) -> Result<Result<Answer, String>, MailError> {
    let mut untagged = Vec::new();
    for _ in 0..settings.limits.max_lines {
        let line = conn.read_line(step).await?;
        match reply::imap(&line) {
            Imap::Tagged { tag: t, status, .. } if t == tag => return Ok(Ok(Answer { status, line, untagged })),
            Imap::Continuation(text) if continuation => return Ok(Err(text.to_owned())),
            Imap::Untagged(text) => {
                if text.get(..3).is_some_and(|w| w.eq_ignore_ascii_case("BYE")) {
                    // During authentication a BYE is the server's refusal (Dovecot: "Authentication
                    // response too large"); elsewhere the conversation is over.
                    if step == Step::Authenticate {
                        return Ok(Ok(Answer { status: ImapStatus::No, line, untagged }));
                    }
                    return Err(MailError::Closed { step });
                }
                untagged.push(text.to_owned());
            }
            _ => return Err(MailError::Unexpected { step, text: server_text(&[line], &[]) }),
        }
    }
    Err(MailError::TooManyLines { step, max: settings.limits.max_lines })
}

async fn capabilities(conn: &mut Conn, tag: &str, settings: &Settings) -> Result<Vec<String>, MailError> {
    conn.write_line(&format!("{tag} CAPABILITY"), Step::Capabilities).await?;
    let a = match answer(conn, tag, Step::Capabilities, settings, false).await? {
        Ok(a) => a,
        Err(text) => return Err(MailError::Unexpected { step: Step::Capabilities, text }),
    };
    if a.status != ImapStatus::Ok {
        return Err(MailError::Unexpected { step: Step::Capabilities, text: server_text(&[a.line], &[]) });
    }
    Ok(a.untagged.iter().find_map(|u| reply::imap_capabilities(u)).unwrap_or_default())
}

/// Greeting, capabilities, STARTTLS when the target says so, capabilities again: what the
/// server offers once the connection is protected as the target says.
async fn prepare(conn: &mut Conn, target: &Target, settings: &Settings) -> Result<Vec<String>, MailError> {
    let greeting = conn.read_line(Step::Greeting).await?;
    let mut caps = match reply::imap(&greeting) {
        Imap::Untagged(text) if text.get(..2).is_some_and(|w| w.eq_ignore_ascii_case("OK")) => {
            reply::imap_capabilities(text)
        }
        _ => return Err(MailError::Unexpected { step: Step::Greeting, text: server_text(&[greeting], &[]) }),
    };
    if target.tls == TlsMode::Starttls {
        let offered = match caps.take() {
            Some(c) => c,
            None => capabilities(conn, "a1", settings).await?,
        };
        if !offered.iter().any(|c| c == "STARTTLS") {
            return Err(MailError::NoStarttls);
        }
        conn.write_line("a2 STARTTLS", Step::Starttls).await?;
        match answer(conn, "a2", Step::Starttls, settings, false).await? {
            Ok(a) if a.status == ImapStatus::Ok => conn.starttls().await?,
            Ok(a) => return Err(MailError::StarttlsRefused { text: server_text(&[a.line], &[]) }),
            Err(text) => return Err(MailError::StarttlsRefused { text }),
        }
        // Capabilities from before TLS are not believed.
        caps = None;
    }
    match caps {
        Some(c) => Ok(c),
        None => capabilities(conn, "a3", settings).await,
    }
}

/// The SASL mechanism to use among `caps`, or what was seen when there is none.
fn mechanism(caps: &[String]) -> Result<reply::Mechanism, Observed> {
    reply::pick_mechanism(reply::imap_mechanisms(caps)).ok_or_else(|| {
        let offered: Vec<String> = reply::imap_mechanisms(caps).map(str::to_owned).collect();
        Observed::NoMechanism { offered: server_text(&offered, &[]) }
    })
}

pub(crate) async fn verify(
    conn: &mut Conn,
    target: &Target,
    creds: &Credentials,
    settings: &Settings,
) -> Result<Observed, MailError> {
    let caps = prepare(conn, target, settings).await?;
    let mechanism = match mechanism(&caps) {
        Ok(m) => m,
        Err(seen) => return Ok(seen),
    };
    let sasl = Sasl::new(mechanism, creds, target);
    ensure_protected(conn, target)?;
    let seen = login(conn, &sasl, settings).await?;
    // Logging out is a courtesy: the verdict is already known.
    if conn.write_line("a6 LOGOUT", Step::Logout).await.is_ok() {
        let _ = answer(conn, "a6", Step::Logout, settings, false).await;
    }
    Ok(seen)
}

/// Everything [`verify`] does up to and including the login, for the relay that goes on with the
/// session: the capabilities the server announced with its answer to the login (a `CAPABILITY`
/// response or response code, as written; empty when it sent none), else what was seen.
pub(crate) async fn open(
    conn: &mut Conn,
    target: &Target,
    creds: &Credentials,
    settings: &Settings,
) -> Result<Result<Vec<String>, Observed>, MailError> {
    let caps = prepare(conn, target, settings).await?;
    let mechanism = match mechanism(&caps) {
        Ok(m) => m,
        Err(seen) => return Ok(Err(seen)),
    };
    let sasl = Sasl::new(mechanism, creds, target);
    ensure_protected(conn, target)?;
    Ok(match authenticate(conn, &sasl, settings).await? {
        Ok(done) => Ok(std::iter::once(done.line.as_str())
            .chain(done.untagged.iter().map(String::as_str))
            .find_map(|text| {
                // `a4 OK [CAPABILITY ...]`: the text after the tag.
                let text = text.strip_prefix("a4 ").unwrap_or(text);
                reply::imap_capabilities_as_sent(text)
            })
            .unwrap_or_default()),
        Err(seen) => Err(seen),
    })
}

/// The two-step SASL exchange: the server's tagged `OK` (with the untagged lines before it), or
/// what was seen when it refused.
async fn authenticate(
    conn: &mut Conn,
    sasl: &Sasl,
    settings: &Settings,
) -> Result<Result<Answer, Observed>, MailError> {
    conn.write_line(&format!("a4 AUTHENTICATE {}", sasl.mechanism.name()), Step::Authenticate).await?;
    match answer(conn, "a4", Step::Authenticate, settings, true).await? {
        Err(_ready) => {}
        Ok(a) => return Ok(Err(refused(sasl, a))),
    }
    conn.write_secret_line(sasl.response(), Step::Authenticate).await?;
    let done = match answer(conn, "a4", Step::Authenticate, settings, true).await? {
        Ok(a) => a,
        Err(_challenge) => {
            // A failure challenge (base64 JSON): answer it so that the server ends the exchange.
            conn.write_line(sasl.failure_answer(), Step::Authenticate).await?;
            match answer(conn, "a4", Step::Authenticate, settings, false).await? {
                Ok(a) => a,
                Err(text) => return Err(MailError::Unexpected { step: Step::Authenticate, text }),
            }
        }
    };
    if done.status != ImapStatus::Ok {
        return Ok(Err(refused(sasl, done)));
    }
    Ok(Ok(done))
}

/// The two-step SASL exchange and, when it succeeds, the check that the mailbox is connected.
async fn login(conn: &mut Conn, sasl: &Sasl, settings: &Settings) -> Result<Observed, MailError> {
    if let Err(seen) = authenticate(conn, sasl, settings).await? {
        return Ok(seen);
    }
    conn.write_line("a5 LIST \"\" \"\"", Step::Check).await?;
    Ok(match answer(conn, "a5", Step::Check, settings, false).await? {
        Ok(a) if a.status == ImapStatus::Ok => Observed::LoggedIn,
        Ok(a) => Observed::NotConnected { text: sasl.text(&[a.line]) },
        Err(text) => Observed::NotConnected { text: sasl.text(&[text]) },
    })
}

fn refused(sasl: &Sasl, a: Answer) -> Observed {
    let temporary = a.line.contains("[UNAVAILABLE]");
    Observed::Refused { text: sasl.text(&[a.line]), temporary }
}
