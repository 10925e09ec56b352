//! Classification of token-endpoint failures into typed reasons, from the HTTP status, the OAuth
//! `error` code and Microsoft's AADSTS numbers. Upstream bodies are reduced to these fields first.

use chrono::Duration;

use super::Reason;

/// What the operator keeps of a failed token request: never the body, never a token.
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
    /// A transport failure (connect, TLS, timeout), described without secrets.
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

/// Longest upstream description kept.
const MAX_DESCRIPTION: usize = 200;

/// Reduces an `error_description` to its first line, at most 200 characters.
pub fn reduce_description(description: &str) -> String {
    let first = description.lines().next().unwrap_or_default().trim();
    first.chars().take(MAX_DESCRIPTION).collect()
}

/// The AADSTS number in a Microsoft `error_description` (`AADSTS70008: ...`).
pub fn aadsts_code(description: &str) -> Option<u32> {
    let start = description.find("AADSTS")? + "AADSTS".len();
    let digits: String = description[start..].chars().take_while(char::is_ascii_digit).collect();
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
        Some(70008 | 700082 | 50173 | 700084 | 50076 | 50079 | 50078) => {
            return (Reason::ReauthorizationRequired, false);
        }
        Some(65001) => return (Reason::ConsentRequired, false),
        Some(7000222) => return (Reason::ClientSecretExpired, false),
        Some(7000215 | 700016 | 7000218) => return (Reason::ClientCredentialsInvalid, false),
        _ => {}
    }
    match err.error.as_deref() {
        Some("invalid_grant" | "interaction_required" | "login_required") => (Reason::ReauthorizationRequired, false),
        Some("invalid_scope" | "consent_required") => (Reason::ConsentRequired, false),
        Some("invalid_client" | "unauthorized_client") => (Reason::ClientCredentialsInvalid, false),
        Some("slow_down") => (Reason::Throttled, true),
        Some("temporarily_unavailable" | "server_error") => (Reason::TokenEndpointUnavailable, true),
        _ => match err.status {
            Some(429) => (Reason::Throttled, true),
            Some(s) if s >= 500 => (Reason::TokenEndpointUnavailable, true),
            None => (Reason::TokenEndpointUnavailable, true),
            // An unknown 4xx: retried slowly, as a change elsewhere may fix it.
            Some(_) => (Reason::TokenRequestFailed, true),
        },
    }
}

fn describe(err: &UpstreamError) -> String {
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
        out.push_str(&format!(": {}", reduce_description(d)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(reduce_description(&long), "AADSTS70008: expired.");
        assert_eq!(reduce_description(&"y".repeat(500)).len(), MAX_DESCRIPTION);
    }

    #[test]
    fn aadsts_codes_are_read_from_the_description() {
        assert_eq!(aadsts_code("AADSTS700082: The refresh token has expired due to inactivity."), Some(700082));
        assert_eq!(aadsts_code("no code here"), None);
    }
}
