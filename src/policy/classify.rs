//! Classification of token-endpoint failures into typed reasons, from the HTTP status, the OAuth
//! `error` code and Microsoft's AADSTS numbers. Upstream bodies are reduced to these fields first.

use chrono::Duration;

use super::Reason;

/// What the operator keeps of a failed token request: never the body, never a token. `error` and
/// `description` are provider text already passed through [`super::scrub::provider_text`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UpstreamError {
    /// HTTP status, when a response arrived.
    pub status: Option<u16>,
    /// The OAuth `error` code.
    pub error: Option<String>,
    /// The first line of `error_description`, shortened.
    pub description: Option<String>,
    /// `Retry-After`, when the server sent one.
    pub retry_after: Option<Duration>,
    /// A transport failure (connect, TLS, timeout, refused address), as a short fixed sentence:
    /// never the underlying error text, which would make status a port scanner's report.
    pub transport: Option<String>,
}

/// A classified failure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// The typed reason.
    pub reason: Reason,
    /// Whether retrying without a change can help (network, 5xx, 429).
    pub transient: bool,
    /// What happened, for the condition message.
    pub message: String,
    /// How long the server asked us to wait.
    pub retry_after: Option<Duration>,
}

/// Reduces an `error_description` to its first line, printable, at most 200 characters, without
/// any of `secrets`.
pub fn reduce_description(description: &str, secrets: &[&str]) -> String {
    super::scrub::provider_text(description, secrets)
}

/// The AADSTS number in a Microsoft `error_description` (`AADSTS70008: ...`).
pub fn aadsts_code(description: &str) -> Option<u32> {
    let (_, after) = description.split_once("AADSTS")?;
    let digits: String = after.chars().take_while(char::is_ascii_digit).take(9).collect();
    digits.parse().ok()
}

/// Classifies a failed token request.
pub fn classify(err: &UpstreamError) -> Failure {
    let (reason, transient) = reason_of(err);
    Failure { reason, transient, message: describe(err), retry_after: err.retry_after }
}

fn reason_of(err: &UpstreamError) -> (Reason, bool) {
    if err.transport.is_some() {
        return (Reason::TokenEndpointUnavailable, true);
    }
    let aadsts = err.description.as_deref().and_then(aadsts_code);
    match aadsts {
        Some(70008 | 700082 | 50173 | 700084 | 50076 | 50079 | 50078 | 70043) => {
            return (Reason::ReauthorizationRequired, false);
        }
        Some(65001) => return (Reason::ConsentRequired, false),
        Some(7000222) => return (Reason::ClientSecretExpired, false),
        Some(7000215 | 700016) => return (Reason::ClientCredentialsInvalid, false),
        // Entra wants a client secret or assertion: the app does not allow public client flows
        // (not a wrong secret), or a redirect URI is not registered: the registration refuses
        // this request, retrying cannot help.
        Some(7000218 | 50011) => return (Reason::RequestRejected, false),
        // The assertion's times are off: the clock, which NTP repairs without anyone's edit.
        Some(700024) => return (Reason::TokenRequestFailed, true),
        _ => {}
    }
    if let Some(found) = google_reason(err) {
        return found;
    }
    match err.error.as_deref() {
        Some("invalid_grant" | "interaction_required" | "login_required") => (Reason::ReauthorizationRequired, false),
        // `access_denied` at a token endpoint (not a person declining a code, which the device
        // flow reads first): the server will not issue for this client and subject, e.g.
        // Google's domain-wide delegation that does not list the client.
        Some("invalid_scope" | "consent_required" | "access_denied") => (Reason::ConsentRequired, false),
        Some("invalid_client") => (Reason::ClientCredentialsInvalid, false),
        Some("invalid_request" | "unsupported_grant_type" | "unauthorized_client") => (Reason::RequestRejected, false),
        Some("slow_down") => (Reason::Throttled, true),
        Some("temporarily_unavailable" | "server_error") => (Reason::TokenEndpointUnavailable, true),
        _ => match err.status {
            // RFC 6749 §5.2: a failed client authentication may answer 401 with no body at all.
            Some(401) => (Reason::ClientCredentialsInvalid, false),
            Some(429) => (Reason::Throttled, true),
            Some(s) if s >= 500 => (Reason::TokenEndpointUnavailable, true),
            None => (Reason::TokenEndpointUnavailable, true),
            // Anything else (an unknown 4xx, a 2xx that is no token response, a redirect):
            // retried with backoff, as a change elsewhere may fix it.
            Some(_) => (Reason::TokenRequestFailed, true),
        },
    }
}

/// Google's token endpoint answers a service account's assertion (domain-wide delegation) with
/// the generic codes; its `error_description` says which part is wrong.
fn google_reason(err: &UpstreamError) -> Option<(Reason, bool)> {
    let description = err.description.as_deref()?;
    if description.contains(GOOGLE_DELEGATION_MISSING) {
        // The delegation is the Workspace admin's consent for the domain.
        Some((Reason::ConsentRequired, false))
    } else if description.contains(GOOGLE_CLOCK) {
        Some((Reason::TokenRequestFailed, true))
    } else if description.contains(GOOGLE_SIGNATURE) {
        Some((Reason::ClientCredentialsInvalid, false))
    } else if description.contains(GOOGLE_NO_USER) {
        Some((Reason::InvalidSpec, false))
    } else {
        None
    }
}

/// Google: the service account's client id is not listed, or not for these scopes.
const GOOGLE_DELEGATION_MISSING: &str = "Client is unauthorized to retrieve access tokens";
/// Google: the assertion's `iat`/`exp` are not around Google's time.
const GOOGLE_CLOCK: &str = "Invalid JWT: Token must be a short-lived token";
/// Google: the assertion is not signed by a current key of the service account.
const GOOGLE_SIGNATURE: &str = "Invalid JWT Signature";
/// Google: the `sub` (the mailbox) is no user of the domain.
const GOOGLE_NO_USER: &str = "Invalid email or User ID";

/// Where a Workspace admin lists a service account for domain-wide delegation.
const GOOGLE_DELEGATION_FIX: &str = "Google Admin console -> Security -> Access and data control -> API controls -> \
     Manage Domain Wide Delegation: add the service account's numeric client ID (its Unique ID, not its email) with \
     exactly the scopes the binding requests (https://mail.google.com/); a new or changed delegation may take up \
     to 24 hours to apply, then set mailoauth.io/refresh-requested to a new value";

/// Provider answers whose cause a person could not guess from the text, with what to do. Data,
/// not branches: a new one is a row. The first row that matches is shown.
const HINTS: &[(Hint, &str)] = &[
    (
        Hint::Aadsts(53003),
        "Conditional Access blocked the sign-in; the Microsoft-managed policy \"Block device code flow\" (since \
         2025) can exclude users and groups only, not apps: use the authorizationCode grant, or have an admin \
         exclude the mailbox's user from that policy",
    ),
    (
        Hint::Aadsts(700082),
        "the refresh token was not used for 90 days and expired: authorize again, and keep the binding \
         unsuspended so that it is used",
    ),
    (
        Hint::Aadsts(70043),
        "a Conditional Access sign-in frequency policy ended the grant: authorize again, or have an admin \
         exclude the mailbox's user from that sign-in frequency policy",
    ),
    (
        Hint::Aadsts(700024),
        "the client assertion's times are outside what Entra accepts: the operator's clock is off; check \
         the node's time synchronisation (NTP); retried with backoff",
    ),
    (
        Hint::Aadsts(7000215),
        "the client secret is wrong: use the secret's Value, not its ID, from the app registration",
    ),
    (
        Hint::Aadsts(7000218),
        "Entra treats the app as a confidential client and got no secret or assertion: for a public client \
         (no clientAuthentication, e.g. deviceCode) turn on Authentication -> Advanced settings -> \
         \"Allow public client flows\" in the app registration; otherwise give the provider a client secret \
         or certificate",
    ),
    (
        Hint::Aadsts(700016),
        "no app with this client id exists in the tenant: check clientId (the Application (client) ID) and \
         microsoft.tenant; an app registered in another tenant must first be consented in this one",
    ),
    (
        Hint::Aadsts(50011),
        "the redirect URI is not registered: add <public URL>/callback exactly, under Authentication, to \
         the app registration (\"Mobile and desktop applications\" for http://localhost, \"Web\" for https)",
    ),
    (Hint::Text(GOOGLE_DELEGATION_MISSING), GOOGLE_DELEGATION_FIX),
    (
        Hint::Text(GOOGLE_CLOCK),
        "Google refused the service-account assertion's times: the operator's clock is off; check the \
         node's time synchronisation (NTP); retried with backoff",
    ),
    (
        Hint::Text(GOOGLE_SIGNATURE),
        "Google did not accept the assertion's signature: the key in serviceAccountKeyRef was deleted, \
         disabled or belongs to another service account; create a new JSON key for this service account \
         and put it in that Secret",
    ),
    (
        Hint::Text(GOOGLE_NO_USER),
        "Google knows no user spec.mailbox in the Workspace domain: name the mailbox's primary address \
         of an existing user (not a group or an alias)",
    ),
    (
        Hint::Text("Token has been expired or revoked"),
        "if this happens about a week after consent, the Google OAuth consent screen is External and in \
         Testing: for a Workspace domain make the app Internal (or publish it, In production), then \
         authorize again",
    ),
    (Hint::Error("access_denied"), GOOGLE_DELEGATION_FIX),
];

/// What a hint matches.
#[derive(Clone, Copy, Debug)]
enum Hint {
    /// A Microsoft AADSTS number.
    Aadsts(u32),
    /// Text in the `error_description`.
    Text(&'static str),
    /// The OAuth `error` code.
    Error(&'static str),
}

/// The hint for a provider answer, if there is one.
pub fn hint(err: &UpstreamError) -> Option<&'static str> {
    let description = err.description.as_deref().unwrap_or_default();
    let code = aadsts_code(description);
    HINTS
        .iter()
        .find(|(h, _)| match h {
            Hint::Aadsts(n) => code == Some(*n),
            Hint::Text(t) => description.contains(t),
            Hint::Error(e) => err.error.as_deref() == Some(*e),
        })
        .map(|(_, text)| *text)
}

fn describe(err: &UpstreamError) -> String {
    let plain = describe_plain(err);
    match hint(err) {
        Some(h) => format!("{plain} ({h})"),
        None => plain,
    }
}

fn describe_plain(err: &UpstreamError) -> String {
    if let Some(t) = &err.transport {
        return format!("token endpoint unreachable: {t}");
    }
    let mut out = String::from("token endpoint answered");
    if let Some(s) = err.status {
        out.push_str(&format!(" HTTP {s}"));
    }
    if let Some(e) = &err.error {
        out.push_str(&format!(" {e}"));
    }
    if let Some(d) = err.description.as_deref().filter(|d| !d.is_empty()) {
        out.push_str(&format!(": {}", reduce_description(d, &[])));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_answers_nobody_could_guess_carry_what_to_do() {
        let cases = [
            (
                "invalid_grant",
                "AADSTS53003: Access has been blocked by Conditional Access policies.",
                "authorizationCode grant",
            ),
            ("invalid_grant", "AADSTS700082: The refresh token has expired due to inactivity.", "90 days"),
            ("invalid_client", "AADSTS700024: Client assertion is not within its valid time range.", "NTP"),
            (
                "invalid_grant",
                "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe.",
                "clock",
            ),
            ("invalid_grant", "Token has been expired or revoked.", "consent screen is External and in Testing"),
        ];
        for (error, description, words) in cases {
            let f = classify(&oauth(400, error, description));
            assert!(f.message.contains(words), "{description}: {}", f.message);
        }
        assert_eq!(hint(&oauth(400, "invalid_grant", "grant request is invalid")), None);
    }

    fn oauth(status: u16, error: &str, description: &str) -> UpstreamError {
        UpstreamError {
            status: Some(status),
            error: Some(error.into()),
            description: Some(description.into()),
            ..Default::default()
        }
    }

    #[test]
    fn invalid_grant_means_reauthorization_is_required_and_is_permanent() {
        let f = classify(&oauth(400, "invalid_grant", "grant request is invalid"));
        assert_eq!(f.reason, Reason::ReauthorizationRequired);
        assert!(!f.transient);
        assert_eq!(f.message, "token endpoint answered HTTP 400 invalid_grant: grant request is invalid");
    }

    #[test]
    fn aadsts_numbers_win_over_the_generic_error_code() {
        let cases = [
            ("invalid_grant", "AADSTS70008: The refresh token has expired", Reason::ReauthorizationRequired),
            ("invalid_grant", "AADSTS65001: The user or administrator has not consented", Reason::ConsentRequired),
            (
                "invalid_client",
                "AADSTS7000222: The provided client secret keys are expired.",
                Reason::ClientSecretExpired,
            ),
            ("invalid_client", "AADSTS7000215: Invalid client secret provided.", Reason::ClientCredentialsInvalid),
            (
                "invalid_grant",
                "AADSTS50173: The provided grant has expired due to it being revoked",
                Reason::ReauthorizationRequired,
            ),
        ];
        for (code, description, want) in cases {
            assert_eq!(classify(&oauth(400, code, description)).reason, want, "{description}");
        }
    }

    #[test]
    fn the_plain_oauth_codes_map_to_their_reasons() {
        assert_eq!(classify(&oauth(400, "invalid_scope", "")).reason, Reason::ConsentRequired);
        assert_eq!(classify(&oauth(401, "invalid_client", "")).reason, Reason::ClientCredentialsInvalid);
        let busy = classify(&oauth(503, "temporarily_unavailable", ""));
        assert_eq!(busy.reason, Reason::TokenEndpointUnavailable);
        assert!(busy.transient);
    }

    #[test]
    fn status_codes_without_an_oauth_error_are_transient() {
        let throttled =
            UpstreamError { status: Some(429), retry_after: Some(Duration::seconds(20)), ..Default::default() };
        let f = classify(&throttled);
        assert_eq!((f.reason, f.transient, f.retry_after), (Reason::Throttled, true, Some(Duration::seconds(20))));
        let gateway = UpstreamError { status: Some(502), ..Default::default() };
        assert_eq!(classify(&gateway).reason, Reason::TokenEndpointUnavailable);
        let net = UpstreamError { transport: Some("connection refused".into()), ..Default::default() };
        assert_eq!(classify(&net).reason, Reason::TokenEndpointUnavailable);
        assert_eq!(classify(&net).message, "token endpoint unreachable: connection refused");
    }

    #[test]
    fn descriptions_are_reduced_to_their_first_line_and_shortened() {
        let long = format!("AADSTS70008: expired.\r\nTrace ID: abc\r\nCorrelation ID: def {}", "x".repeat(500));
        assert_eq!(reduce_description(&long, &[]), "AADSTS70008: expired.");
        assert_eq!(reduce_description(&"y".repeat(500), &[]).len(), crate::policy::scrub::MAX_TEXT);
    }

    #[test]
    fn malformed_and_unsupported_requests_are_permanent_and_a_bare_401_means_bad_credentials() {
        for code in ["invalid_request", "unsupported_grant_type", "unauthorized_client"] {
            let f = classify(&oauth(400, code, ""));
            assert_eq!((f.reason, f.transient), (Reason::RequestRejected, false), "{code}");
        }
        let bare = classify(&UpstreamError { status: Some(401), ..Default::default() });
        assert_eq!((bare.reason, bare.transient), (Reason::ClientCredentialsInvalid, false));
        let odd = classify(&UpstreamError {
            status: Some(200),
            description: Some("not a token response".into()),
            ..Default::default()
        });
        assert_eq!((odd.reason, odd.transient), (Reason::TokenRequestFailed, true));
    }

    #[test]
    fn huge_aadsts_numbers_do_not_overflow() {
        assert_eq!(aadsts_code("AADSTS99999999999999999999"), Some(999_999_999));
        assert_eq!(aadsts_code("AADSTS"), None);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(crate::policy::fuzz_cases()))]
        #[test]
        fn any_error_classifies_without_panicking(
            status in proptest::option::of(0_u16..1000), error in proptest::option::of("\\PC{0,40}"),
            description in proptest::option::of("\\PC{0,400}"), retry in proptest::option::of(proptest::num::i64::ANY)
        ) {
            let err = UpstreamError {
                status, error, description,
                retry_after: retry.and_then(Duration::try_seconds),
                transport: None,
            };
            let f = classify(&err);
            proptest::prop_assert!(f.message.len() < 2_000);
        }
    }

    #[test]
    fn aadsts_codes_are_read_from_the_description() {
        assert_eq!(aadsts_code("AADSTS700082: The refresh token has expired due to inactivity."), Some(700082));
        assert_eq!(aadsts_code("no code here"), None);
    }
}
