//! POP3: greeting, `CAPA`, `STLS`, `CAPA` again, `AUTH XOAUTH2` (or OAUTHBEARER when only that
//! is offered) in two steps, `QUIT`. No message is listed or read.

use super::conn::Conn;
use super::reply::{self, Pop3};
use super::{Credentials, MailError, Sasl, Settings, Step, Target, TlsMode, ensure_protected};
use crate::policy::verify::{Observed, server_text};

/// `CAPA`: the capability lines, or `None` when the server does not know CAPA.
async fn capa(conn: &mut Conn, settings: &Settings) -> Result<Option<Vec<String>>, MailError> {
    conn.write_line("CAPA", Step::Capabilities).await?;
    let first = conn.read_line(Step::Capabilities).await?;
    match reply::pop3(&first) {
        Pop3::Ok(_) => {}
        Pop3::Err(_) => return Ok(None),
        _ => return Err(MailError::Unexpected { step: Step::Capabilities, text: server_text(&[first], &[]) }),
    }
    let mut lines = Vec::new();
    for _ in 0..settings.limits.max_lines {
        let line = conn.read_line(Step::Capabilities).await?;
        if line == "." {
            return Ok(Some(lines));
        }
        lines.push(line.strip_prefix('.').map(str::to_owned).unwrap_or(line));
    }
    Err(MailError::TooManyLines { step: Step::Capabilities, max: settings.limits.max_lines })
}

/// Greeting, `STLS` when the target says so, `CAPA`: the mechanism to log in with, or what was
/// seen when the server offers none the client has.
async fn prepare(
    conn: &mut Conn,
    target: &Target,
    settings: &Settings,
) -> Result<Result<reply::Mechanism, Observed>, MailError> {
    let greeting = conn.read_line(Step::Greeting).await?;
    if !matches!(reply::pop3(&greeting), Pop3::Ok(_)) {
        return Err(MailError::Unexpected { step: Step::Greeting, text: server_text(&[greeting], &[]) });
    }
    if target.tls == TlsMode::Starttls {
        let caps = capa(conn, settings).await?.unwrap_or_default();
        if !caps.iter().any(|c| c.eq_ignore_ascii_case("STLS")) {
            return Err(MailError::NoStarttls);
        }
        conn.write_line("STLS", Step::Starttls).await?;
        let answer = conn.read_line(Step::Starttls).await?;
        if !matches!(reply::pop3(&answer), Pop3::Ok(_)) {
            return Err(MailError::StarttlsRefused { text: server_text(&[answer], &[]) });
        }
        conn.starttls().await?;
    }
    // Without CAPA (RFC 2449 is optional), XOAUTH2 is tried.
    Ok(match capa(conn, settings).await? {
        None => Ok(reply::Mechanism::XOauth2),
        Some(caps) => {
            let offered: Vec<String> = caps.iter().filter_map(|c| reply::pop3_sasl(c)).flatten().collect();
            reply::pick_mechanism(offered.iter().map(String::as_str))
                .ok_or_else(|| Observed::NoMechanism { offered: server_text(&offered, &[]) })
        }
    })
}

pub(crate) async fn verify(
    conn: &mut Conn,
    target: &Target,
    creds: &Credentials,
    settings: &Settings,
) -> Result<Observed, MailError> {
    let mechanism = match prepare(conn, target, settings).await? {
        Ok(m) => m,
        Err(seen) => return Ok(seen),
    };
    let sasl = Sasl::new(mechanism, creds, target);
    ensure_protected(conn, target)?;
    let seen = login(conn, &sasl).await?;
    // QUIT is a courtesy: the verdict is already known.
    if conn.write_line("QUIT", Step::Logout).await.is_ok() {
        let _ = conn.read_line(Step::Logout).await;
    }
    Ok(seen)
}

/// Everything [`verify`] does up to and including the login, for the relay that goes on with the
/// session in the TRANSACTION state; what was seen when the login did not succeed.
pub(crate) async fn open(
    conn: &mut Conn,
    target: &Target,
    creds: &Credentials,
    settings: &Settings,
) -> Result<Result<(), Observed>, MailError> {
    let mechanism = match prepare(conn, target, settings).await? {
        Ok(m) => m,
        Err(seen) => return Ok(Err(seen)),
    };
    let sasl = Sasl::new(mechanism, creds, target);
    ensure_protected(conn, target)?;
    Ok(match login(conn, &sasl).await? {
        Observed::LoggedIn => Ok(()),
        seen => Err(seen),
    })
}

/// The two-step SASL exchange.
async fn login(conn: &mut Conn, sasl: &Sasl) -> Result<Observed, MailError> {
    conn.write_line(&format!("AUTH {}", sasl.mechanism.name()), Step::Authenticate).await?;
    let line = conn.read_line(Step::Authenticate).await?;
    match reply::pop3(&line) {
        Pop3::Continuation(_) => {}
        Pop3::Err(_) => return Ok(refused(sasl, line)),
        _ => return Err(MailError::Unexpected { step: Step::Authenticate, text: sasl.text(&[line]) }),
    }
    conn.write_secret_line(sasl.response(), Step::Authenticate).await?;
    let mut line = conn.read_line(Step::Authenticate).await?;
    if matches!(reply::pop3(&line), Pop3::Continuation(_)) {
        // A failure challenge (base64 JSON): answer it so that the server ends the exchange.
        conn.write_line(sasl.failure_answer(), Step::Authenticate).await?;
        line = conn.read_line(Step::Authenticate).await?;
    }
    match reply::pop3(&line) {
        Pop3::Ok(_) => Ok(Observed::LoggedIn),
        Pop3::Err(_) => Ok(refused(sasl, line)),
        _ => Err(MailError::Unexpected { step: Step::Authenticate, text: sasl.text(&[line]) }),
    }
}

fn refused(sasl: &Sasl, line: String) -> Observed {
    let temporary = line.contains("[SYS/TEMP]") || line.contains("[IN-USE]");
    Observed::Refused { text: sasl.text(&[line]), temporary }
}
