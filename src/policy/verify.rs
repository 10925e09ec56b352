//! Mailbox verification, the pure half: what a mail server answered to an XOAUTH2 login
//! ([`Observed`], produced by `crate::mail`) becomes a typed reason with its fix ([`Verdict`]).
//! Exchange Online's answers are recognised by their exact texts; server text is already
//! scrubbed by the mail client (see [`server_text`]) and is shortened again here.

use super::scrub::provider_text;
use crate::api::Protocol;

/// Why `MailboxVerified` has its status (api.md, "Mailbox verification").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VerifyReason {
    /// The mailbox logged in with its token and out again.
    Verified,
    /// Exchange refused SMTP AUTH for the tenant or the mailbox (`535 5.7.139`).
    SmtpAuthDisabled,
    /// The protocol is disabled for the mailbox (IMAP "User is authenticated but not connected.").
    ProtocolDisabled,
    /// An app-only token may not open the mailbox (no `FullAccess` / `SendAs` for the application).
    MailboxAccessDenied,
    /// The server refused the login for another reason (its text is in the message).
    LoginRefused,
    /// The server could not be reached, did not answer in time, or broke the protocol.
    ServerUnreachable,
    /// TLS could not be set up: a certificate problem, or STARTTLS not offered or refused.
    TlsFailed,
    /// The provider names no server for the protocol.
    NoServer,
}

impl VerifyReason {
    /// The CamelCase name written into conditions and `status.verification`.
    pub fn as_str(self) -> &'static str {
        match self {
            VerifyReason::Verified => "Verified",
            VerifyReason::SmtpAuthDisabled => "SmtpAuthDisabled",
            VerifyReason::ProtocolDisabled => "ProtocolDisabled",
            VerifyReason::MailboxAccessDenied => "MailboxAccessDenied",
            VerifyReason::LoginRefused => "LoginRefused",
            VerifyReason::ServerUnreachable => "ServerUnreachable",
            VerifyReason::TlsFailed => "TLSFailed",
            VerifyReason::NoServer => "NoServer",
        }
    }
}

/// What the mail client saw. Server text in here has been through [`server_text`] already.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Observed {
    /// The login succeeded (and the client logged out).
    LoggedIn,
    /// The login succeeded but the first command after it was refused (Exchange: "User is
    /// authenticated but not connected." when IMAP is off for the mailbox).
    NotConnected {
        /// The server's answer to that command.
        text: String,
    },
    /// The server refused the login.
    Refused {
        /// The server's final answer to the authentication.
        text: String,
        /// The server said the failure is temporary (IMAP `[UNAVAILABLE]`, SMTP 4xx, POP3
        /// `[SYS/TEMP]`).
        temporary: bool,
    },
    /// The server offers neither XOAUTH2 nor OAUTHBEARER (after TLS).
    NoMechanism {
        /// The mechanisms it offers, as it listed them (shortened).
        offered: String,
    },
    /// No conversation: connection, time-out, outbound policy, or a server breaking the protocol.
    Unreachable {
        /// A fixed sentence naming the step; never the token.
        why: String,
    },
    /// TLS could not be set up, so the token was not sent.
    Tls {
        /// A fixed sentence naming the host and the problem.
        why: String,
    },
}

/// Whose token it is: an app-only (client credentials) token needs mailbox permissions for the
/// application, a delegated one is the person's own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GrantKind {
    /// A person's token (refresh token, device code, authorization code, JWT bearer for a user).
    Delegated,
    /// An application's token (client credentials).
    AppOnly,
}

/// What was checked, for the message.
#[derive(Clone, Copy, Debug)]
pub struct Check<'a> {
    /// The protocol.
    pub protocol: Protocol,
    /// The server's host.
    pub host: &'a str,
    /// The server's port.
    pub port: u16,
    /// The mailbox (`spec.mailbox`).
    pub mailbox: &'a str,
    /// Whose token it is.
    pub grant: GrantKind,
    /// The application's service principal object id, when known (app-only fixes name it; see
    /// [`app_token`]).
    pub service_principal: Option<&'a str>,
    /// The application's client id, when known (names the application where the object id is
    /// not known).
    pub client_id: Option<&'a str>,
}

/// Who an app-only access token says it is for: read from a JWT's payload for display in a fix
/// command only (the signature is not checked; nothing is decided on it).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AppToken {
    /// `oid`: Entra puts the object id of the application's service principal (its Enterprise
    /// application, not the app registration) there. Only a GUID is taken.
    pub object_id: Option<String>,
    /// `appid` (Entra v1 tokens) or `azp` (v2): the client id. Only a GUID or up to 128 letters,
    /// digits and `._-@:` are taken.
    pub client_id: Option<String>,
}

/// Longest token whose payload is looked at (Entra's are 1.5 to 3 KB).
const MAX_TOKEN: usize = 16 * 1024;

/// Reads `oid` and `appid`/`azp` from an access token that is a JWT (three base64url parts, the
/// middle one a JSON object); nothing from an opaque token, an oversized one or one that does
/// not parse. Never fails and never shows the token.
pub fn app_token(token: &str) -> AppToken {
    use base64::Engine;
    let none = AppToken::default();
    if token.len() > MAX_TOKEN {
        return none;
    }
    let mut parts = token.split('.');
    let (Some(_header), Some(payload), Some(_signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return none;
    };
    let Ok(bytes) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')) else {
        return none;
    };
    let Ok(serde_json::Value::Object(claims)) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
        return none;
    };
    let text = |k: &str| claims.get(k).and_then(serde_json::Value::as_str);
    let object_id = text("oid").filter(|v| is_guid(v)).map(str::to_owned);
    let client_id = text("appid")
        .or_else(|| text("azp"))
        .filter(|v| {
            is_guid(v)
                || (!v.is_empty()
                    && v.len() <= 128
                    && v.chars().all(|c| c.is_ascii_alphanumeric() || "._-@:".contains(c)))
        })
        .map(str::to_owned);
    AppToken { object_id, client_id }
}

/// `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` in hex digits.
fn is_guid(v: &str) -> bool {
    v.len() == 36
        && v.char_indices().all(|(i, c)| if matches!(i, 8 | 13 | 18 | 23) { c == '-' } else { c.is_ascii_hexdigit() })
}

/// A classified check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// The typed reason.
    pub reason: VerifyReason,
    /// Whether checking again later without a change may help.
    pub transient: bool,
    /// What happened and what to do, for `status.verification.<protocol>.message`.
    pub message: String,
}

/// Server text made safe to keep: the lines joined by spaces, printable, without any of
/// `secrets` (in any form they travel in), at most [`super::scrub::MAX_TEXT`] characters.
pub fn server_text(lines: &[String], secrets: &[&str]) -> String {
    provider_text(&lines.join(" "), secrets)
}

/// The verdict when the provider knows no server for `protocol`.
pub fn no_server(protocol: Protocol) -> Verdict {
    Verdict {
        reason: VerifyReason::NoServer,
        transient: false,
        message: format!(
            "the provider names no {} server: set servers.{} (host, port, tls) on the provider",
            upper(protocol),
            protocol.as_str()
        ),
    }
}

fn upper(p: Protocol) -> &'static str {
    match p {
        Protocol::Imap => "IMAP",
        Protocol::Smtp => "SMTP",
        Protocol::Pop3 => "POP3",
    }
}

/// A mailbox (or service principal) as shown in a PowerShell command: as it is when it holds only
/// letters, digits and `@._+-`; otherwise in single quotes (PowerShell takes nothing in them
/// literally but a doubled quote), printable ASCII only. Bounded.
fn shown(mailbox: &str) -> String {
    let printable: String = mailbox.chars().filter(|c| c.is_ascii_graphic() || *c == ' ').take(254).collect();
    if !printable.is_empty() && printable.chars().all(|c| c.is_ascii_alphanumeric() || "@._+-".contains(c)) {
        printable
    } else {
        format!("'{}'", printable.replace('\'', "''"))
    }
}

/// Like [`shown`], always in single quotes (an id PowerShell could otherwise read as a number).
fn quoted(text: &str) -> String {
    let printable: String = text.chars().filter(|c| c.is_ascii_graphic() || *c == ' ').take(254).collect();
    format!("'{}'", printable.replace('\'', "''"))
}

fn contains(text: &str, needle: &str) -> bool {
    text.to_ascii_lowercase().contains(&needle.to_ascii_lowercase())
}

/// What stands for the service principal in the commands when the token does not name it.
const SP_PLACEHOLDER: &str = "<service principal object id>";

/// The PowerShell commands that give an application access to a mailbox: with the service
/// principal's object id when the token named it, else with a placeholder and where to find it.
fn permission_commands(check: &Check<'_>) -> String {
    let mailbox = shown(check.mailbox);
    let sp = check.service_principal.map(shown).unwrap_or_else(|| SP_PLACEHOLDER.to_owned());
    let mut text = format!(
        "give the application access to the mailbox in Exchange Online PowerShell: \
         Add-MailboxPermission -Identity {mailbox} -User {sp} -AccessRights FullAccess; and, to send as it, \
         Add-RecipientPermission -Identity {mailbox} -Trustee {sp} -AccessRights SendAs"
    );
    match check.service_principal {
        Some(_) => text.push_str(
            " (the object id is the token's oid claim: the application's Enterprise application; it must be \
             registered in Exchange with New-ServicePrincipal -AppId <client id> -ObjectId <that id>)",
        ),
        None => {
            let app = check
                .client_id
                .map(|id| format!("Get-ServicePrincipal | Where-Object AppId -eq {}", quoted(id)))
                .unwrap_or_else(|| "Get-ServicePrincipal".to_owned());
            text.push_str(&format!(
                " ({SP_PLACEHOLDER}: the token does not name it; it is the Object ID of the application's \
                 Enterprise application in Entra (Enterprise applications, not App registrations), also shown by \
                 {app} once registered with New-ServicePrincipal)"
            ));
        }
    }
    text
}

/// The Set-CASMailbox switch that turns the protocol on for a mailbox.
fn enable_command(check: &Check<'_>) -> String {
    let mailbox = shown(check.mailbox);
    match check.protocol {
        Protocol::Imap => format!("Set-CASMailbox -Identity {mailbox} -ImapEnabled $true"),
        Protocol::Pop3 => format!("Set-CASMailbox -Identity {mailbox} -PopEnabled $true"),
        Protocol::Smtp => format!("Set-CASMailbox -Identity {mailbox} -SmtpClientAuthenticationDisabled $false"),
    }
}

/// Classifies what the mail client saw.
pub fn classify(check: &Check<'_>, seen: &Observed) -> Verdict {
    let at = format!("{} at {}:{}", upper(check.protocol), shown(check.host), check.port);
    let mailbox = shown(check.mailbox);
    let verdict = |reason, transient, message| Verdict { reason, transient, message };
    match seen {
        Observed::LoggedIn => {
            verdict(VerifyReason::Verified, false, format!("{mailbox} logged in to {at} with its token and out again"))
        }
        Observed::NotConnected { text } => {
            let text = provider_text(text, &[]);
            if contains(&text, "authenticated but not connected") {
                let mut message = format!(
                    "{at} accepted the token but did not connect {mailbox} (\"{text}\"): {} is disabled for the \
                     mailbox; run {}",
                    upper(check.protocol),
                    enable_command(check)
                );
                if check.grant == GrantKind::AppOnly {
                    message.push_str(&format!("; for an app-only token, also {}", permission_commands(check)));
                }
                verdict(VerifyReason::ProtocolDisabled, false, message)
            } else {
                verdict(
                    VerifyReason::LoginRefused,
                    false,
                    format!("{at} accepted the token but refused the first command after it: \"{text}\""),
                )
            }
        }
        Observed::Refused { text, temporary } => refused(check, &at, &provider_text(text, &[]), *temporary),
        Observed::NoMechanism { offered } => verdict(
            VerifyReason::LoginRefused,
            false,
            format!(
                "{at} offers neither XOAUTH2 nor OAUTHBEARER (it offers: {}): enable OAuth 2.0 for {} at the \
                 server, or check servers.{}",
                provider_text(offered, &[]),
                upper(check.protocol),
                check.protocol.as_str()
            ),
        ),
        Observed::Unreachable { why } => {
            verdict(VerifyReason::ServerUnreachable, true, format!("{at}: {}", provider_text(why, &[])))
        }
        Observed::Tls { why } => verdict(
            VerifyReason::TlsFailed,
            false,
            format!("{at}: {}; the token was not sent", provider_text(why, &[])),
        ),
    }
}

fn refused(check: &Check<'_>, at: &str, text: &str, temporary: bool) -> Verdict {
    let mailbox = shown(check.mailbox);
    let app_only = check.grant == GrantKind::AppOnly;
    // Exchange: "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for
    // the Tenant. Visit https://aka.ms/smtp_auth_disabled for more information."
    if contains(text, "5.7.139") && contains(text, "SmtpClientAuthentication is disabled") {
        let scope = if contains(text, "for the Mailbox") { "the mailbox" } else { "the tenant" };
        return Verdict {
            reason: VerifyReason::SmtpAuthDisabled,
            transient: false,
            message: format!(
                "{at} refused SMTP AUTH: it is disabled for {scope} (\"{text}\"); turn it on for this mailbox with \
                 Set-CASMailbox -Identity {mailbox} -SmtpClientAuthenticationDisabled $false, or for the whole \
                 tenant with Set-TransportConfig -SmtpClientAuthenticationDisabled $false (a mailbox's own \
                 setting wins over the tenant's)"
            ),
        };
    }
    if contains(text, "authenticated but not connected")
        || (check.protocol != Protocol::Smtp && !temporary && contains(text, "disabled"))
    {
        return Verdict {
            reason: VerifyReason::ProtocolDisabled,
            transient: false,
            message: format!(
                "{at} refused {mailbox}: {} is disabled for the mailbox (\"{text}\"); run {}",
                upper(check.protocol),
                enable_command(check)
            ),
        };
    }
    // Exchange's answers to a token it accepted for no mailbox: IMAP "AUTHENTICATE failed.",
    // POP3 "Authentication failure", SMTP "535 5.7.3 Authentication unsuccessful".
    let exchange_failure = contains(text, "AUTHENTICATE failed")
        || contains(text, "Authentication failure")
        || contains(text, "5.7.3 Authentication unsuccessful");
    if app_only && !temporary && exchange_failure {
        return Verdict {
            reason: VerifyReason::MailboxAccessDenied,
            transient: false,
            message: format!(
                "{at} refused the application's token for {mailbox} (\"{text}\"): {}",
                permission_commands(check)
            ),
        };
    }
    let hint = if temporary {
        "the server called the failure temporary; the check is repeated later".to_owned()
    } else if exchange_failure && check.protocol != Protocol::Smtp {
        format!(
            "the token may be for another user than {mailbox}, or {} may be disabled for the mailbox ({})",
            upper(check.protocol),
            enable_command(check)
        )
    } else {
        format!("check that the token is for {mailbox} and that the server accepts OAuth 2.0 tokens from this provider")
    };
    Verdict {
        reason: VerifyReason::LoginRefused,
        transient: temporary,
        message: format!("{at} refused the login of {mailbox}: \"{text}\"; {hint}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAILBOX: &str = "scanner@contoso.com";

    fn check(protocol: Protocol, grant: GrantKind) -> Check<'static> {
        Check {
            protocol,
            host: "outlook.office365.com",
            port: 993,
            mailbox: MAILBOX,
            grant,
            service_principal: Some("6d1b2a55-0c1f-4a4e-9f4e-5a1f0b0c2d3e"),
            client_id: Some("0e3b5f2a-7c1d-4e8f-9a6b-1c2d3e4f5a6b"),
        }
    }

    fn refused_with(text: &str) -> Observed {
        Observed::Refused { text: text.to_owned(), temporary: false }
    }

    /// Exchange Online's exact answers, as seen by clients.
    const SMTP_TENANT: &str = "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the \
                               Tenant. Visit https://aka.ms/smtp_auth_disabled for more information. \
                               [SN4PR0501CA0056.namprd05.prod.outlook.com]";
    const SMTP_MAILBOX: &str = "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the \
                                Mailbox. Visit https://aka.ms/smtp_auth_disabled for more information. \
                                [AM0PR02CA0001.eurprd02.prod.outlook.com]";
    const IMAP_FAILED: &str = "a2 NO AUTHENTICATE failed.";
    const IMAP_NOT_CONNECTED: &str = "a3 BAD User is authenticated but not connected.";

    #[test]
    fn exchange_smtp_auth_disabled_for_the_tenant_or_the_mailbox_gives_both_commands() {
        for (text, scope) in [(SMTP_TENANT, "the tenant"), (SMTP_MAILBOX, "the mailbox")] {
            let v = classify(&check(Protocol::Smtp, GrantKind::Delegated), &refused_with(text));
            assert_eq!(v.reason, VerifyReason::SmtpAuthDisabled, "{text}");
            assert_eq!(v.reason.as_str(), "SmtpAuthDisabled");
            assert!(!v.transient);
            assert!(v.message.contains(&format!("disabled for {scope}")), "{}", v.message);
            assert!(
                v.message
                    .contains("Set-CASMailbox -Identity scanner@contoso.com -SmtpClientAuthenticationDisabled $false"),
                "{}",
                v.message
            );
            assert!(
                v.message.contains("Set-TransportConfig -SmtpClientAuthenticationDisabled $false"),
                "{}",
                v.message
            );
            assert!(v.message.contains("5.7.139"), "{}", v.message);
        }
    }

    #[test]
    fn imap_authenticated_but_not_connected_is_the_protocol_disabled() {
        let v = classify(
            &check(Protocol::Imap, GrantKind::Delegated),
            &Observed::NotConnected { text: IMAP_NOT_CONNECTED.to_owned() },
        );
        assert_eq!(v.reason, VerifyReason::ProtocolDisabled);
        assert!(v.message.contains("Set-CASMailbox -Identity scanner@contoso.com -ImapEnabled $true"), "{}", v.message);
        assert!(!v.message.contains("Add-MailboxPermission"), "{}", v.message);
        // The same for an app-only token also names the application's permission.
        let v = classify(
            &check(Protocol::Imap, GrantKind::AppOnly),
            &Observed::NotConnected { text: IMAP_NOT_CONNECTED.to_owned() },
        );
        assert_eq!(v.reason, VerifyReason::ProtocolDisabled);
        assert!(v.message.contains("Add-MailboxPermission"), "{}", v.message);
        // Another refusal after the login is a refused login, with the text.
        let v = classify(
            &check(Protocol::Imap, GrantKind::Delegated),
            &Observed::NotConnected { text: "a3 NO [SERVERBUG] oops".to_owned() },
        );
        assert_eq!(v.reason, VerifyReason::LoginRefused);
        assert!(v.message.contains("[SERVERBUG] oops"), "{}", v.message);
    }

    #[test]
    fn pop_disabled_for_the_mailbox_is_the_protocol_disabled() {
        let v = classify(
            &check(Protocol::Pop3, GrantKind::Delegated),
            &refused_with("-ERR Protocol is disabled for this user."),
        );
        assert_eq!(v.reason, VerifyReason::ProtocolDisabled);
        assert!(v.message.contains("Set-CASMailbox -Identity scanner@contoso.com -PopEnabled $true"), "{}", v.message);
    }

    #[test]
    fn an_app_only_authenticate_failed_is_mailbox_access_denied_with_the_permission_commands() {
        let v = classify(&check(Protocol::Imap, GrantKind::AppOnly), &refused_with(IMAP_FAILED));
        assert_eq!(v.reason, VerifyReason::MailboxAccessDenied);
        for command in [
            "Add-MailboxPermission -Identity scanner@contoso.com -User 6d1b2a55-0c1f-4a4e-9f4e-5a1f0b0c2d3e -AccessRights FullAccess",
            "Add-RecipientPermission -Identity scanner@contoso.com -Trustee 6d1b2a55-0c1f-4a4e-9f4e-5a1f0b0c2d3e -AccessRights SendAs",
        ] {
            assert!(v.message.contains(command), "{}", v.message);
        }
        assert!(v.message.contains("the token's oid claim"), "{}", v.message);
        assert!(!v.message.contains("<service principal object id>"), "{}", v.message);
        // Without a known service principal, a placeholder says what to put there and where to
        // find it, naming the client id when known.
        let mut c = check(Protocol::Imap, GrantKind::AppOnly);
        c.service_principal = None;
        let v = classify(&c, &refused_with(IMAP_FAILED));
        assert!(v.message.contains("-User <service principal object id> -AccessRights FullAccess"), "{}", v.message);
        assert!(v.message.contains("-Trustee <service principal object id> -AccessRights SendAs"), "{}", v.message);
        assert!(v.message.contains("Enterprise applications"), "{}", v.message);
        assert!(
            v.message.contains("Get-ServicePrincipal | Where-Object AppId -eq '0e3b5f2a-7c1d-4e8f-9a6b-1c2d3e4f5a6b'"),
            "{}",
            v.message
        );
        c.client_id = None;
        let v = classify(&c, &refused_with(IMAP_FAILED));
        assert!(v.message.contains("also shown by Get-ServicePrincipal once"), "{}", v.message);
        // SMTP and POP3 give the same for Exchange's texts.
        let v = classify(
            &check(Protocol::Smtp, GrantKind::AppOnly),
            &refused_with("535 5.7.3 Authentication unsuccessful [BN9PR03CA0001.namprd03.prod.outlook.com]"),
        );
        assert_eq!(v.reason, VerifyReason::MailboxAccessDenied);
        let v = classify(
            &check(Protocol::Pop3, GrantKind::AppOnly),
            &refused_with("-ERR Authentication failure: unknown user name or bad password."),
        );
        assert_eq!(v.reason, VerifyReason::MailboxAccessDenied);
    }

    /// An Entra app-only access token (v1, client credentials) as Exchange Online gets it; the
    /// signature part is a stand-in (it is never checked).
    const ENTRA_APP_TOKEN: &str = concat!(
        "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiIsIng1dCI6IktRMnRBY3JFN2xCYVZpR21OX1VlIiwia2lkIjoiS1EydEFjckU3bEJhVmlHbU5fVWUifQ.",
        "eyJhdWQiOiJodHRwczovL291dGxvb2sub2ZmaWNlMzY1LmNvbSIsImlzcyI6Imh0dHBzOi8vc3RzLndpbmRvd3MubmV0Lzcy",
        "Zjk4OGJmLTg2ZjEtNDFhZi05MWFiLTJkN2NkMDExZGI0Ny8iLCJpYXQiOjE3NjQ1OTAwMDAsIm5iZiI6MTc2NDU5MDAwMCwi",
        "ZXhwIjoxNzY0NTkzOTAwLCJhcHBfZGlzcGxheW5hbWUiOiJzY2FubmVyIiwiYXBwaWQiOiIwZTNiNWYyYS03YzFkLTRlOGYt",
        "OWE2Yi0xYzJkM2U0ZjVhNmIiLCJhcHBpZGFjciI6IjEiLCJpZHAiOiJodHRwczovL3N0cy53aW5kb3dzLm5ldC83MmY5ODhi",
        "Zi04NmYxLTQxYWYtOTFhYi0yZDdjZDAxMWRiNDcvIiwib2lkIjoiNmQxYjJhNTUtMGMxZi00YTRlLTlmNGUtNWExZjBiMGMy",
        "ZDNlIiwicm9sZXMiOlsiSU1BUC5BY2Nlc3NBc0FwcCIsIlNNVFAuU2VuZEFzQXBwIl0sInN1YiI6IjZkMWIyYTU1LTBjMWYt",
        "NGE0ZS05ZjRlLTVhMWYwYjBjMmQzZSIsInRpZCI6IjcyZjk4OGJmLTg2ZjEtNDFhZi05MWFiLTJkN2NkMDExZGI0NyIsInZl",
        "ciI6IjEuMCJ9",
        ".c2lnbmF0dXJlLW5vdC1jaGVja2Vk"
    );

    #[test]
    fn an_entra_app_only_token_names_its_service_principal_and_client_id() {
        let t = app_token(ENTRA_APP_TOKEN);
        assert_eq!(t.object_id.as_deref(), Some("6d1b2a55-0c1f-4a4e-9f4e-5a1f0b0c2d3e"));
        assert_eq!(t.client_id.as_deref(), Some("0e3b5f2a-7c1d-4e8f-9a6b-1c2d3e4f5a6b"));
        // The id goes into the commands.
        let mut c = check(Protocol::Imap, GrantKind::AppOnly);
        c.service_principal = t.object_id.as_deref();
        let v = classify(&c, &refused_with(IMAP_FAILED));
        assert!(
            v.message.contains("-User 6d1b2a55-0c1f-4a4e-9f4e-5a1f0b0c2d3e -AccessRights FullAccess"),
            "{}",
            v.message
        );
    }

    #[test]
    fn an_opaque_odd_or_oversized_token_names_nobody() {
        use base64::Engine;
        let jwt = |claims: &str| {
            let b = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
            format!("{}.{}.sig", b(r#"{"alg":"none"}"#), b(claims))
        };
        let none = AppToken::default();
        for token in [
            "EwBwA8l6BAAURSN/FHlDW5xN74t6GzbtsBBeBUYAAZ8U8lQ3vD+opaque".to_owned(),
            "ya29.a0AfB_byC-opaque-google-token".to_owned(),
            String::new(),
            "a.b".to_owned(),
            "a.!!!.c".to_owned(),
            jwt("[1,2]"),
            jwt("not json"),
            jwt(r#"{"oid":"x'; Remove-Mailbox","appid":"a b"}"#),
            jwt(r#"{"oid":42,"azp":{"x":1}}"#),
            format!("{}.x", jwt(r#"{"oid":"6d1b2a55-0c1f-4a4e-9f4e-5a1f0b0c2d3e"}"#)),
        ] {
            assert_eq!(app_token(&token), none, "{token}");
        }
        // A payload over the bound is not decoded.
        let big = jwt(&format!(r#"{{"oid":"6d1b2a55-0c1f-4a4e-9f4e-5a1f0b0c2d3e","pad":"{}"}}"#, "x".repeat(20_000)));
        assert_eq!(app_token(&big), none);
        // v2 tokens carry the client id in azp; an oid that is no GUID is not taken.
        let t = app_token(&jwt(r#"{"azp":"mail-app","oid":"6d1b2a55-0c1f-4a4e-9f4e-5a1f0b0c2d3"}"#));
        assert_eq!(t, AppToken { object_id: None, client_id: Some("mail-app".to_owned()) });
    }

    #[test]
    fn a_delegated_authenticate_failed_is_a_refused_login_with_the_likely_causes() {
        let v = classify(&check(Protocol::Imap, GrantKind::Delegated), &refused_with(IMAP_FAILED));
        assert_eq!(v.reason, VerifyReason::LoginRefused);
        assert!(v.message.contains("AUTHENTICATE failed."), "{}", v.message);
        assert!(v.message.contains("-ImapEnabled $true"), "{}", v.message);
        assert!(!v.message.contains("Add-MailboxPermission"), "{}", v.message);
    }

    #[test]
    fn a_temporary_refusal_is_transient_and_never_an_access_problem() {
        let seen =
            Observed::Refused { text: "a2 NO [UNAVAILABLE] Temporary authentication failure".into(), temporary: true };
        let v = classify(&check(Protocol::Imap, GrantKind::AppOnly), &seen);
        assert_eq!(v.reason, VerifyReason::LoginRefused);
        assert!(v.transient);
        let seen =
            Observed::Refused { text: "454 4.7.0 Temporary authentication failure: disabled".into(), temporary: true };
        assert_eq!(classify(&check(Protocol::Pop3, GrantKind::Delegated), &seen).reason, VerifyReason::LoginRefused);
    }

    #[test]
    fn server_text_is_scrubbed_of_the_token_and_shortened() {
        let token = "EwBwA8l6BAAURSN/FHlDW5xN74t6GzbtsBBeBUYAAZ8U8lQ3vD+secret";
        let lines = vec![format!("a2 NO unknown token {token}"), "x".repeat(1_000)];
        let text = server_text(&lines, &[token]);
        assert!(!text.contains("EwBwA8l6"), "{text}");
        assert!(text.contains("[redacted]"), "{text}");
        let v = classify(&check(Protocol::Imap, GrantKind::Delegated), &refused_with(&text));
        assert!(!v.message.contains("EwBwA8l6"), "{}", v.message);
        assert!(v.message.len() < 1_000, "{}", v.message);
        // Control characters from a hostile server never reach the message.
        let v =
            classify(&check(Protocol::Imap, GrantKind::Delegated), &refused_with("a2 NO \u{1b}[31mred\r\nInjected: 1"));
        assert!(!v.message.contains('\u{1b}') && !v.message.contains("Injected"), "{}", v.message);
    }

    #[test]
    fn reaching_tls_mechanisms_and_missing_servers_have_their_reasons() {
        let c = check(Protocol::Imap, GrantKind::Delegated);
        let v = classify(&c, &Observed::LoggedIn);
        assert_eq!((v.reason, v.transient), (VerifyReason::Verified, false));
        let v = classify(&c, &Observed::Unreachable { why: "the connection was refused".into() });
        assert_eq!((v.reason, v.transient), (VerifyReason::ServerUnreachable, true));
        assert!(v.message.contains("outlook.office365.com:993"), "{}", v.message);
        let v = classify(
            &c,
            &Observed::Tls { why: "the certificate of outlook.office365.com does not name that host".into() },
        );
        assert_eq!(v.reason.as_str(), "TLSFailed");
        assert!(v.message.contains("does not name that host") && v.message.contains("not sent"), "{}", v.message);
        let v = classify(&c, &Observed::NoMechanism { offered: "PLAIN LOGIN".into() });
        assert_eq!(v.reason, VerifyReason::LoginRefused);
        assert!(v.message.contains("PLAIN LOGIN"), "{}", v.message);
        let v = no_server(Protocol::Pop3);
        assert_eq!(v.reason.as_str(), "NoServer");
        assert!(v.message.contains("servers.pop3"), "{}", v.message);
    }

    #[test]
    fn a_hostile_mailbox_name_cannot_inject_into_the_commands() {
        let mut c = check(Protocol::Smtp, GrantKind::Delegated);
        c.mailbox = "x@y.com; Remove-Mailbox -Identity 'ceo'\n$(rm)";
        let v = classify(&c, &refused_with(SMTP_TENANT));
        assert!(
            v.message.contains(
                "-Identity 'x@y.com; Remove-Mailbox -Identity ''ceo''$(rm)' -SmtpClientAuthenticationDisabled"
            ),
            "{}",
            v.message
        );
        assert!(!v.message.contains('\n'), "{}", v.message);
        c.mailbox = "scanner@contoso.com";
        assert!(classify(&c, &refused_with(SMTP_TENANT)).message.contains("-Identity scanner@contoso.com -Smtp"));
    }
}
