//! Pure parsers of one server line each: IMAP (tagged, untagged, continuation), SMTP (code,
//! continuation flag, text) and POP3 (`+OK`, `-ERR`, `+` continuation), plus capability lists and
//! the choice of SASL mechanism. Lines arrive without their CRLF and already bounded in length
//! by the line reader; nothing here allocates more than the line.

/// The SASL mechanism used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mechanism {
    /// Google's and Microsoft's XOAUTH2 (preferred).
    XOauth2,
    /// RFC 7628 OAUTHBEARER, used only where XOAUTH2 is not offered.
    OAuthBearer,
}

impl Mechanism {
    /// The mechanism's name in commands.
    pub fn name(self) -> &'static str {
        match self {
            Mechanism::XOauth2 => "XOAUTH2",
            Mechanism::OAuthBearer => "OAUTHBEARER",
        }
    }
}

/// XOAUTH2 if offered, else OAUTHBEARER if offered, compared without case.
pub fn pick_mechanism<'a>(offered: impl IntoIterator<Item = &'a str>) -> Option<Mechanism> {
    let mut bearer = false;
    for m in offered {
        if m.eq_ignore_ascii_case("XOAUTH2") {
            return Some(Mechanism::XOauth2);
        }
        bearer |= m.eq_ignore_ascii_case("OAUTHBEARER");
    }
    bearer.then_some(Mechanism::OAuthBearer)
}

/// An IMAP status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImapStatus {
    /// `OK`.
    Ok,
    /// `NO`.
    No,
    /// `BAD`.
    Bad,
}

/// One IMAP server line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Imap<'a> {
    /// `* ...`: the text after `* `.
    Untagged(&'a str),
    /// `+ ...`: the text after `+` (a SASL challenge, or nothing).
    Continuation(&'a str),
    /// `<tag> OK|NO|BAD text`.
    Tagged {
        /// The tag.
        tag: &'a str,
        /// The status.
        status: ImapStatus,
        /// The rest.
        text: &'a str,
    },
    /// Anything else.
    Other,
}

/// Parses one IMAP line.
pub fn imap(line: &str) -> Imap<'_> {
    if let Some(rest) = line.strip_prefix("* ") {
        return Imap::Untagged(rest);
    }
    if line == "+" {
        return Imap::Continuation("");
    }
    if let Some(rest) = line.strip_prefix("+ ") {
        return Imap::Continuation(rest.trim());
    }
    let Some((tag, rest)) = line.split_once(' ') else { return Imap::Other };
    let (word, text) = rest.split_once(' ').unwrap_or((rest, ""));
    let status = if word.eq_ignore_ascii_case("OK") {
        ImapStatus::Ok
    } else if word.eq_ignore_ascii_case("NO") {
        ImapStatus::No
    } else if word.eq_ignore_ascii_case("BAD") {
        ImapStatus::Bad
    } else {
        return Imap::Other;
    };
    if tag.is_empty() || tag == "*" || tag == "+" {
        return Imap::Other;
    }
    Imap::Tagged { tag, status, text }
}

/// The capabilities in an untagged `CAPABILITY a b c` or in a `[CAPABILITY a b c] ...` response
/// code (greeting or tagged OK), upper-cased; `None` when `text` carries none.
pub fn imap_capabilities(text: &str) -> Option<Vec<String>> {
    imap_capabilities_as_sent(text).map(|caps| caps.iter().map(|c| c.to_ascii_uppercase()).collect())
}

/// [`imap_capabilities`] as the server wrote them (what the relay passes on to its client).
pub fn imap_capabilities_as_sent(text: &str) -> Option<Vec<String>> {
    let rest = text.trim_start();
    let rest = rest.strip_prefix("OK ").map(str::trim_start).unwrap_or(rest);
    let list = if let Some(code) = rest.strip_prefix('[') {
        let (inside, _) = code.split_once(']')?;
        strip_word(inside, "CAPABILITY")?
    } else {
        strip_word(rest, "CAPABILITY")?
    };
    Some(list.split_ascii_whitespace().take(256).map(str::to_owned).collect())
}

/// `text` after a leading `word` and a space (or nothing), compared without case.
fn strip_word<'a>(text: &'a str, word: &str) -> Option<&'a str> {
    let (first, rest) = text.split_once(' ').unwrap_or((text, ""));
    first.eq_ignore_ascii_case(word).then_some(rest)
}

/// The mechanisms among IMAP capabilities (`AUTH=XOAUTH2` → `XOAUTH2`).
pub fn imap_mechanisms(caps: &[String]) -> impl Iterator<Item = &str> {
    caps.iter().filter_map(|c| c.strip_prefix("AUTH="))
}

/// One SMTP reply line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Smtp<'a> {
    /// The three-digit code.
    pub code: u16,
    /// Whether this is the reply's last line (`250 x`, not `250-x`).
    pub last: bool,
    /// The text after the code and separator.
    pub text: &'a str,
}

/// Parses one SMTP reply line; `None` when it does not start with a reply code.
pub fn smtp(line: &str) -> Option<Smtp<'_>> {
    let mut chars = line.char_indices();
    let mut code: u16 = 0;
    for _ in 0..3 {
        let (_, c) = chars.next()?;
        let d = c.to_digit(10)?;
        code = code.checked_mul(10)?.checked_add(u16::try_from(d).ok()?)?;
    }
    if !(200..600).contains(&code) {
        return None;
    }
    match chars.next() {
        None => Some(Smtp { code, last: true, text: "" }),
        Some((i, sep @ (' ' | '-'))) => {
            let text = line.get(i.checked_add(1)?..).unwrap_or_default();
            Some(Smtp { code, last: sep == ' ', text })
        }
        Some(_) => None,
    }
}

/// The mechanisms of an EHLO `AUTH XOAUTH2 PLAIN` (or old `AUTH=XOAUTH2`) line, if it is one.
pub fn smtp_auth_mechanisms(ehlo_line: &str) -> Option<Vec<String>> {
    let upper = ehlo_line.to_ascii_uppercase();
    let list = upper.strip_prefix("AUTH ").or_else(|| upper.strip_prefix("AUTH="))?;
    Some(list.split_ascii_whitespace().take(64).map(str::to_owned).collect())
}

/// One POP3 server line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pop3<'a> {
    /// `+OK text`.
    Ok(&'a str),
    /// `-ERR text`.
    Err(&'a str),
    /// `+ challenge` (SASL continuation).
    Continuation(&'a str),
    /// Anything else.
    Other,
}

/// Parses one POP3 status line.
pub fn pop3(line: &str) -> Pop3<'_> {
    let upper_prefix = |p: &str| line.get(..p.len()).is_some_and(|h| h.eq_ignore_ascii_case(p));
    if upper_prefix("+OK") {
        return Pop3::Ok(line.get(3..).unwrap_or_default().trim_start());
    }
    if upper_prefix("-ERR") {
        return Pop3::Err(line.get(4..).unwrap_or_default().trim_start());
    }
    if line == "+" {
        return Pop3::Continuation("");
    }
    if let Some(rest) = line.strip_prefix("+ ") {
        return Pop3::Continuation(rest.trim());
    }
    Pop3::Other
}

/// The mechanisms of a POP3 `CAPA` line `SASL XOAUTH2 PLAIN`, if it is one.
pub fn pop3_sasl(capa_line: &str) -> Option<Vec<String>> {
    let upper = capa_line.to_ascii_uppercase();
    let list = upper.strip_prefix("SASL")?;
    if !(list.is_empty() || list.starts_with(' ')) {
        return None;
    }
    Some(list.split_ascii_whitespace().take(64).map(str::to_owned).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imap_lines_are_told_apart() {
        assert_eq!(imap("* OK [CAPABILITY IMAP4rev1] ready"), Imap::Untagged("OK [CAPABILITY IMAP4rev1] ready"));
        assert_eq!(imap("+ "), Imap::Continuation(""));
        assert_eq!(imap("+"), Imap::Continuation(""));
        assert_eq!(imap("+ eyJzdGF0dXMiOiI0MDEifQ=="), Imap::Continuation("eyJzdGF0dXMiOiI0MDEifQ=="));
        assert_eq!(
            imap("a4 NO AUTHENTICATE failed."),
            Imap::Tagged { tag: "a4", status: ImapStatus::No, text: "AUTHENTICATE failed." }
        );
        assert_eq!(imap("a1 ok"), Imap::Tagged { tag: "a1", status: ImapStatus::Ok, text: "" });
        assert_eq!(imap("a1 MAYBE so"), Imap::Other);
        assert_eq!(imap(""), Imap::Other);
        assert_eq!(imap("*"), Imap::Other);
    }

    #[test]
    fn imap_capabilities_come_from_untagged_responses_and_response_codes() {
        let caps = imap_capabilities("CAPABILITY IMAP4rev1 STARTTLS AUTH=XOAUTH2 auth=oauthbearer").unwrap();
        assert_eq!(caps, ["IMAP4REV1", "STARTTLS", "AUTH=XOAUTH2", "AUTH=OAUTHBEARER"]);
        assert_eq!(pick_mechanism(imap_mechanisms(&caps)), Some(Mechanism::XOauth2));
        let caps = imap_capabilities("OK [CAPABILITY IMAP4rev1 AUTH=OAUTHBEARER] Dovecot ready.").unwrap();
        assert_eq!(pick_mechanism(imap_mechanisms(&caps)), Some(Mechanism::OAuthBearer));
        assert_eq!(imap_capabilities("OK Dovecot ready."), None);
        assert_eq!(imap_capabilities("OK [CAPABILITY unterminated"), None);
        assert_eq!(pick_mechanism(["PLAIN", "LOGIN"]), None);
    }

    #[test]
    fn smtp_lines_carry_code_continuation_and_text() {
        assert_eq!(smtp("250-AUTH XOAUTH2"), Some(Smtp { code: 250, last: false, text: "AUTH XOAUTH2" }));
        assert_eq!(smtp("334 "), Some(Smtp { code: 334, last: true, text: "" }));
        assert_eq!(smtp("221"), Some(Smtp { code: 221, last: true, text: "" }));
        assert_eq!(smtp("2500 x"), None);
        assert_eq!(smtp("25"), None);
        assert_eq!(smtp("099 x"), None);
        assert_eq!(smtp("é50 x"), None);
        assert_eq!(smtp_auth_mechanisms("AUTH PLAIN xoauth2"), Some(vec!["PLAIN".to_owned(), "XOAUTH2".to_owned()]));
        assert_eq!(smtp_auth_mechanisms("AUTH=LOGIN"), Some(vec!["LOGIN".to_owned()]));
        assert_eq!(smtp_auth_mechanisms("AUTHX"), None);
    }

    #[test]
    fn pop3_lines_are_told_apart() {
        assert_eq!(pop3("+OK Dovecot ready."), Pop3::Ok("Dovecot ready."));
        assert_eq!(pop3("+ok"), Pop3::Ok(""));
        assert_eq!(pop3("-ERR [AUTH] Authentication failed."), Pop3::Err("[AUTH] Authentication failed."));
        assert_eq!(pop3("+ "), Pop3::Continuation(""));
        assert_eq!(pop3("+ e30="), Pop3::Continuation("e30="));
        assert_eq!(pop3("hello"), Pop3::Other);
        assert_eq!(pop3("é"), Pop3::Other);
        assert_eq!(pop3_sasl("SASL PLAIN XOAUTH2"), Some(vec!["PLAIN".to_owned(), "XOAUTH2".to_owned()]));
        assert_eq!(pop3_sasl("SASLX"), None);
    }
}
