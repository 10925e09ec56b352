//! SMTP submission: greeting, `EHLO`, `STARTTLS`, `EHLO` again, `AUTH XOAUTH2` (or OAUTHBEARER
//! when only that is offered) in two steps, `QUIT`. No mail is sent here; [`open`] stops after the
//! login for the relay, which sends it.

use super::conn::Conn;
use super::reply;
use super::{Credentials, MailError, Sasl, Settings, Step, Target, TlsMode, ensure_protected};
use crate::policy::verify::{Observed, server_text};

/// A whole reply: its code and the text of each line.
struct Reply {
    code: u16,
    lines: Vec<String>,
}

impl Reply {
    /// The reply as the server wrote it, one line after the other.
    fn shown(&self) -> Vec<String> {
        self.lines.iter().map(|l| format!("{} {l}", self.code)).collect()
    }
}

async fn read_reply(conn: &mut Conn, step: Step, settings: &Settings) -> Result<Reply, MailError> {
    let mut lines = Vec::new();
    let mut code = None;
    for _ in 0..settings.limits.max_lines {
        let line = conn.read_line(step).await?;
        let Some(parsed) = reply::smtp(&line) else {
            return Err(MailError::Unexpected { step, text: server_text(&[line], &[]) });
        };
        if code.is_some_and(|c| c != parsed.code) {
            return Err(MailError::Unexpected { step, text: server_text(&[line], &[]) });
        }
        code = Some(parsed.code);
        lines.push(parsed.text.to_owned());
        if parsed.last {
            return Ok(Reply { code: parsed.code, lines });
        }
    }
    Err(MailError::TooManyLines { step, max: settings.limits.max_lines })
}

async fn command(conn: &mut Conn, line: &str, step: Step, settings: &Settings) -> Result<Reply, MailError> {
    conn.write_line(line, step).await?;
    read_reply(conn, step, settings).await
}

/// `EHLO`: the extension lines (the first line is the server's name).
async fn ehlo(conn: &mut Conn, settings: &Settings) -> Result<Vec<String>, MailError> {
    let r = command(conn, &format!("EHLO {}", settings.client_name), Step::Capabilities, settings).await?;
    if r.code != 250 {
        return Err(MailError::Unexpected { step: Step::Capabilities, text: server_text(&r.shown(), &[]) });
    }
    Ok(r.lines.into_iter().skip(1).collect())
}

pub(crate) async fn verify(
    conn: &mut Conn,
    target: &Target,
    creds: &Credentials,
    settings: &Settings,
) -> Result<Observed, MailError> {
    let seen = match open(conn, target, creds, settings).await? {
        Ok(_) => Observed::LoggedIn,
        Err(seen) => seen,
    };
    // QUIT is a courtesy: the verdict is already known.
    let _ = command(conn, "QUIT", Step::Logout, settings).await;
    Ok(seen)
}

/// Greeting, `EHLO`, `STARTTLS`, `EHLO`, the two-step SASL login: the server's extensions
/// (after TLS) when logged in, else what was seen. The relay goes on from here.
pub(crate) async fn open(
    conn: &mut Conn,
    target: &Target,
    creds: &Credentials,
    settings: &Settings,
) -> Result<Result<Vec<String>, Observed>, MailError> {
    let greeting = read_reply(conn, Step::Greeting, settings).await?;
    if greeting.code != 220 {
        return Err(MailError::Unexpected { step: Step::Greeting, text: server_text(&greeting.shown(), &[]) });
    }
    let mut extensions = ehlo(conn, settings).await?;
    if target.tls == TlsMode::Starttls {
        if !extensions.iter().any(|e| e.eq_ignore_ascii_case("STARTTLS")) {
            return Err(MailError::NoStarttls);
        }
        let r = command(conn, "STARTTLS", Step::Starttls, settings).await?;
        if r.code != 220 {
            return Err(MailError::StarttlsRefused { text: server_text(&r.shown(), &[]) });
        }
        conn.starttls().await?;
        extensions = ehlo(conn, settings).await?;
    }
    let offered: Vec<String> = extensions.iter().filter_map(|e| reply::smtp_auth_mechanisms(e)).flatten().collect();
    let Some(mechanism) = reply::pick_mechanism(offered.iter().map(String::as_str)) else {
        return Ok(Err(Observed::NoMechanism { offered: server_text(&offered, &[]) }));
    };
    let sasl = Sasl::new(mechanism, creds, target);
    ensure_protected(conn, target)?;
    Ok(match login(conn, &sasl, settings).await? {
        Observed::LoggedIn => Ok(extensions),
        seen => Err(seen),
    })
}

/// The two-step SASL exchange.
async fn login(conn: &mut Conn, sasl: &Sasl, settings: &Settings) -> Result<Observed, MailError> {
    let r = command(conn, &format!("AUTH {}", sasl.mechanism.name()), Step::Authenticate, settings).await?;
    if r.code != 334 {
        return Ok(refused(sasl, &r));
    }
    conn.write_secret_line(sasl.response(), Step::Authenticate).await?;
    let mut r = read_reply(conn, Step::Authenticate, settings).await?;
    if r.code == 334 {
        // A failure challenge (base64 JSON): answer it so that the server ends the exchange.
        r = command(conn, sasl.failure_answer(), Step::Authenticate, settings).await?;
    }
    Ok(if r.code == 235 { Observed::LoggedIn } else { refused(sasl, &r) })
}

fn refused(sasl: &Sasl, r: &Reply) -> Observed {
    Observed::Refused { text: sasl.text(&r.shown()), temporary: (400..500).contains(&r.code) }
}
