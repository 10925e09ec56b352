//! Token-endpoint bodies, read leniently. A 2xx body that a strict parser refuses (an
//! `expires_in` sent as a string, a missing `token_type`, a wrong content type) may still carry a
//! rotated refresh token, and losing that token kills the mailbox; so every field is read on its
//! own, and whatever is there is kept.

use chrono::Duration;
use secrecy::SecretString;
use serde_json::Value;

/// The longest token lifetime believed; longer claims are shortened to this.
pub const MAX_LIFETIME: Duration = Duration::days(366);

/// Most scopes read from a response.
const MAX_SCOPES: usize = 64;

/// Longest token accepted (bodies are capped at 64 KiB anyway).
const MAX_TOKEN: usize = 16 * 1024;

/// The token fields of a 2xx response.
#[derive(Clone, Debug, Default)]
pub struct TokenFields {
    /// `access_token`, when a non-empty string.
    pub access_token: Option<SecretString>,
    /// `refresh_token`, when a non-empty string.
    pub refresh_token: Option<SecretString>,
    /// `expires_in` when a positive number (or numeric string), at most [`MAX_LIFETIME`].
    pub expires_in: Option<Duration>,
    /// `scope`, split on spaces.
    pub scopes: Option<Vec<String>>,
    /// Who the provider says consented: the `email`, `preferred_username` and `upn` claims of
    /// the `id_token`, in that order, when there is one.
    pub identities: Vec<String>,
}

/// The fields of a 2xx device authorization response (RFC 8628 §3.2).
#[derive(Clone, Debug, Default)]
pub struct DeviceFields {
    /// `device_code`, kept secret: whoever holds it can collect the person's tokens.
    pub device_code: Option<SecretString>,
    /// `user_code`, the code the person types.
    pub user_code: Option<String>,
    /// `verification_uri` (Google says `verification_url`).
    pub verification_uri: Option<String>,
    /// `verification_uri_complete`, the URI with the code filled in.
    pub verification_uri_complete: Option<String>,
    /// `expires_in`, bounded like a token lifetime.
    pub expires_in: Option<Duration>,
    /// `interval`, when a positive number.
    pub interval: Option<Duration>,
}

/// Longest user code or verification URI shown.
const MAX_SHOWN: usize = 512;

fn shown(v: Option<&Value>) -> Option<String> {
    v.and_then(Value::as_str)
        .map(str::trim)
        .filter(|t| !t.is_empty() && t.len() <= MAX_SHOWN && t.chars().all(|c| c.is_ascii_graphic()))
        .map(str::to_owned)
}

/// Reads a 2xx device authorization response; `None` when the body is not a JSON object.
pub fn parse_device(body: &[u8]) -> Option<DeviceFields> {
    let map = object(body)?;
    Some(DeviceFields {
        device_code: token(map.get("device_code")),
        user_code: shown(map.get("user_code")),
        verification_uri: shown(map.get("verification_uri")).or_else(|| shown(map.get("verification_url"))),
        verification_uri_complete: shown(map.get("verification_uri_complete")),
        expires_in: lifetime(map.get("expires_in")),
        interval: lifetime(map.get("interval")),
    })
}

/// The error fields of a non-2xx response, as sent (scrub before showing).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ErrorFields {
    /// `error`.
    pub error: Option<String>,
    /// `error_description`.
    pub description: Option<String>,
}

fn object(body: &[u8]) -> Option<serde_json::Map<String, Value>> {
    match serde_json::from_slice::<Value>(body).ok()? {
        Value::Object(map) => Some(map),
        _ => None,
    }
}

fn token(v: Option<&Value>) -> Option<SecretString> {
    v.and_then(Value::as_str)
        .map(str::trim)
        .filter(|t| !t.is_empty() && t.len() <= MAX_TOKEN && t.chars().all(|c| c.is_ascii_graphic()))
        .map(|t| SecretString::from(t.to_owned()))
}

/// `expires_in` as seconds: a number or a numeric string; zero, negative or absent is `None`.
fn lifetime(v: Option<&Value>) -> Option<Duration> {
    let secs: f64 = match v? {
        Value::Number(n) => n.as_f64()?,
        Value::String(s) => s.trim().parse().ok()?,
        _ => return None,
    };
    if !secs.is_finite() || secs < 1.0 {
        return None;
    }
    let max = MAX_LIFETIME.num_seconds();
    // Float to integer casts saturate; the bound keeps the value in range anyway.
    #[allow(clippy::cast_possible_truncation)]
    let whole = secs.min(max as f64) as i64;
    Some(Duration::seconds(whole.clamp(1, max)))
}

/// Reads a 2xx token response; `None` when the body is not a JSON object.
pub fn parse_token(body: &[u8]) -> Option<TokenFields> {
    let map = object(body)?;
    let scopes = map
        .get("scope")
        .and_then(Value::as_str)
        .map(|s| s.split_whitespace().take(MAX_SCOPES).map(str::to_owned).collect());
    Some(TokenFields {
        access_token: token(map.get("access_token")),
        refresh_token: token(map.get("refresh_token")),
        expires_in: lifetime(map.get("expires_in")),
        scopes,
        identities: map.get("id_token").and_then(Value::as_str).map(identities).unwrap_or_default(),
    })
}

/// The identities an id_token names. Its signature is not checked: it came straight from the
/// token endpoint over TLS, which OpenID Connect Core §3.1.3.7 allows in place of the signature.
pub fn identities(id_token: &str) -> Vec<String> {
    use base64::Engine;
    let Some(payload) = id_token.split('.').nth(1) else { return Vec::new() };
    let Ok(bytes) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')) else {
        return Vec::new();
    };
    object(&bytes).map(|claims| claim_identities(&claims)).unwrap_or_default()
}

/// The identities a userinfo response names.
pub fn userinfo_identities(body: &[u8]) -> Vec<String> {
    object(body).map(|claims| claim_identities(&claims)).unwrap_or_default()
}

/// `email`, `preferred_username` and `upn`, in that order, without duplicates. An `email` the
/// provider itself says is not verified (`email_verified: false`) is no identity: anyone may type
/// any address into an account's profile at some providers.
fn claim_identities(claims: &serde_json::Map<String, Value>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let unverified = matches!(claims.get("email_verified"), Some(Value::Bool(false)))
        || claims.get("email_verified").and_then(Value::as_str).is_some_and(|v| v.eq_ignore_ascii_case("false"));
    for claim in ["email", "preferred_username", "upn"] {
        if claim == "email" && unverified {
            continue;
        }
        if let Some(v) = shown(claims.get(claim)).filter(|v| v.len() <= 254)
            && !out.iter().any(|o| o.eq_ignore_ascii_case(&v))
        {
            out.push(v);
        }
    }
    out
}

/// Reads an error response; `None` when the body is not a JSON object.
pub fn parse_error(body: &[u8]) -> Option<ErrorFields> {
    let map = object(body)?;
    let text = |k: &str| map.get(k).and_then(Value::as_str).map(|s| s.chars().take(4096).collect::<String>());
    Some(ErrorFields { error: text("error"), description: text("error_description") })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use secrecy::ExposeSecret;

    #[test]
    fn a_response_a_strict_parser_refuses_still_yields_its_tokens() {
        let t = parse_token(br#"{"access_token":"at","refresh_token":"rt-new","expires_in":"3599"}"#).unwrap();
        assert_eq!(t.access_token.as_ref().map(ExposeSecret::expose_secret), Some("at"));
        assert_eq!(t.refresh_token.as_ref().map(ExposeSecret::expose_secret), Some("rt-new"));
        assert_eq!(t.expires_in, Some(Duration::seconds(3599)));
        let only_rt = parse_token(br#"{"refresh_token":"rt-2","expires_in":{"x":1}}"#).unwrap();
        assert!(only_rt.access_token.is_none());
        assert_eq!(only_rt.refresh_token.as_ref().map(ExposeSecret::expose_secret), Some("rt-2"));
    }

    #[test]
    fn absurd_lifetimes_are_none_or_bounded() {
        let life =
            |v: &str| parse_token(format!(r#"{{"access_token":"a","expires_in":{v}}}"#).as_bytes()).unwrap().expires_in;
        assert_eq!(life("0"), None);
        assert_eq!(life("-5"), None);
        assert_eq!(life("0.2"), None);
        assert_eq!(life("1e300"), Some(MAX_LIFETIME));
        assert_eq!(life("18446744073709551616"), Some(MAX_LIFETIME));
        assert_eq!(life("\"NaN\""), None);
        assert_eq!(life("null"), None);
        assert_eq!(life("60.9"), Some(Duration::seconds(60)));
    }

    #[test]
    fn bodies_that_are_not_json_objects_yield_nothing() {
        assert!(parse_token(b"<html>oops</html>").is_none());
        assert!(parse_token(b"[1,2]").is_none());
        assert!(parse_token(br#"{"access_token":"#).is_none());
        assert_eq!(
            parse_error(br#"{"error":"invalid_grant","error_description":"gone"}"#).unwrap().error.as_deref(),
            Some("invalid_grant")
        );
    }

    #[test]
    fn an_id_token_names_who_consented_without_duplicates() {
        use base64::Engine;
        let claims = r#"{"sub":"x","email":"Helpdesk@Contoso.com","preferred_username":"helpdesk@contoso.com","upn":"hd@contoso.onmicrosoft.com"}"#;
        let jwt =
            format!("eyJhbGciOiJSUzI1NiJ9.{}.sig", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(claims));
        assert_eq!(identities(&jwt), ["Helpdesk@Contoso.com", "hd@contoso.onmicrosoft.com"]);
        assert!(identities("not a jwt").is_empty());
        for verified in [r#"false"#, r#""false""#] {
            let body = format!(r#"{{"email":"boss@contoso.com","email_verified":{verified}}}"#);
            assert!(userinfo_identities(body.as_bytes()).is_empty(), "an unverified email was taken: {body}");
        }
        let body = r#"{"email":"boss@contoso.com","email_verified":true}"#;
        assert_eq!(userinfo_identities(body.as_bytes()), ["boss@contoso.com"]);
        assert!(identities("a.!!!.c").is_empty());
        let body = format!(r#"{{"access_token":"at","id_token":"{jwt}"}}"#);
        assert_eq!(parse_token(body.as_bytes()).unwrap().identities.len(), 2);
    }

    #[test]
    fn a_device_response_is_read_with_googles_spelling_too() {
        let d = parse_device(br#"{"device_code":"dc","user_code":"ABCD-EFGH","verification_url":"https://www.google.com/device","expires_in":1800,"interval":5}"#).unwrap();
        assert_eq!(d.device_code.as_ref().map(ExposeSecret::expose_secret), Some("dc"));
        assert_eq!(d.user_code.as_deref(), Some("ABCD-EFGH"));
        assert_eq!(d.verification_uri.as_deref(), Some("https://www.google.com/device"));
        assert_eq!((d.expires_in, d.interval), (Some(Duration::seconds(1800)), Some(Duration::seconds(5))));
        let odd = parse_device(br#"{"device_code":"dc","user_code":"bad\ncode","verification_uri":5}"#).unwrap();
        assert_eq!((odd.user_code, odd.verification_uri), (None, None));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(crate::policy::fuzz_cases()))]
        #[test]
        fn any_body_parses_or_not_without_panicking(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_token(&body);
            let _ = parse_error(&body);
            let _ = parse_device(&body);
            let _ = identities(&String::from_utf8_lossy(&body));
        }

        #[test]
        fn json_shaped_bodies_keep_lifetimes_in_range(
            expires in prop_oneof![any::<i64>().prop_map(|v| v.to_string()), any::<f64>().prop_map(|v| format!("{v:?}")), "\"[0-9.e+-]{0,20}\""],
            rt in "[!-~]{0,40}"
        ) {
            let body = format!(r#"{{"access_token":"at","token_type":"bEaReR","refresh_token":"{}","expires_in":{expires}}}"#, rt.replace(['"', '\\'], ""));
            if let Some(d) = parse_token(body.as_bytes()).and_then(|t| t.expires_in) {
                prop_assert!(d >= Duration::seconds(1) && d <= MAX_LIFETIME);
            }
        }
    }
}
