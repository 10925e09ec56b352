//! Authorization requests (RFC 6749 §4.1 with PKCE S256, RFC 7636): the URL a person's browser is
//! sent to, with a fresh single-use `state` and code verifier (oauth2 makes both, from the
//! operating system's random source), `login_hint` = the mailbox, and the provider's extra
//! parameters (Google's `access_type=offline` and `prompt=consent`). The `state` starts with the
//! binding's namespace and name, so that a callback finds its binding without an index.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use oauth2::basic::BasicClient;
use oauth2::{AuthUrl, ClientId, CsrfToken, PkceCodeChallenge, RedirectUrl, Scope};
use secrecy::SecretString;

/// A request to send a person to, and what must be kept to finish it.
#[derive(Clone, Debug)]
pub struct AuthorizationRequest {
    /// The provider's authorize URL with every parameter.
    pub url: String,
    /// The single-use `state`.
    pub state: String,
    /// The PKCE code verifier.
    pub code_verifier: SecretString,
}

/// What an authorization request is made of.
#[derive(Clone, Copy, Debug)]
pub struct Params<'a> {
    /// The provider's authorization endpoint.
    pub authorize_url: &'a str,
    /// The client id.
    pub client_id: &'a str,
    /// Where the provider sends the browser back.
    pub redirect_uri: &'a str,
    /// Scopes to ask for.
    pub scopes: &'a [String],
    /// The mailbox, as `login_hint`.
    pub login_hint: &'a str,
    /// The provider's extra parameters.
    pub extra: &'a [(&'static str, &'static str)],
    /// The binding's namespace.
    pub namespace: &'a str,
    /// The binding's name.
    pub name: &'a str,
}

/// A new authorization request.
pub fn request(p: &Params<'_>) -> Result<AuthorizationRequest, String> {
    let auth =
        AuthUrl::new(p.authorize_url.to_owned()).map_err(|_| "the authorization endpoint is not a URL".to_owned())?;
    let redirect =
        RedirectUrl::new(p.redirect_uri.to_owned()).map_err(|_| "the redirect URI is not a URL".to_owned())?;
    let client = BasicClient::new(ClientId::new(p.client_id.to_owned())).set_auth_uri(auth).set_redirect_uri(redirect);
    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
    let state = format!("{}.{}", binding_key(p.namespace, p.name), CsrfToken::new_random().secret());
    let mut builder = client
        .authorize_url(|| CsrfToken::new(state.clone()))
        .set_pkce_challenge(challenge)
        .add_scopes(p.scopes.iter().cloned().map(Scope::new))
        .add_extra_param("login_hint", p.login_hint);
    for (k, v) in p.extra {
        builder = builder.add_extra_param(*k, *v);
    }
    let (url, _) = builder.url();
    Ok(AuthorizationRequest { url: url.to_string(), state, code_verifier: SecretString::from(verifier.into_secret()) })
}

fn binding_key(namespace: &str, name: &str) -> String {
    URL_SAFE_NO_PAD.encode(format!("{namespace}/{name}"))
}

/// The binding a `state` was made for: `(namespace, name)`.
pub fn binding_of(state: &str) -> Option<(String, String)> {
    let (key, _) = state.rsplit_once('.')?;
    let text = String::from_utf8(URL_SAFE_NO_PAD.decode(key).ok()?).ok()?;
    let (ns, name) = text.split_once('/')?;
    (!ns.is_empty() && !name.is_empty()).then(|| (ns.to_owned(), name.to_owned()))
}

/// Compares two states without an early exit on the first differing byte.
pub fn same_state(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0_u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// What the provider sent the browser back with.
#[derive(Clone, Debug)]
pub enum Response {
    /// A code to exchange, for `state`.
    Code {
        /// The code.
        code: SecretString,
        /// The state it came with.
        state: String,
    },
    /// The person or the provider refused (`error`, e.g. `access_denied`).
    Error {
        /// The `error` code.
        error: String,
        /// The state it came with, if any.
        state: Option<String>,
    },
}

/// Reads a redirect URL, its query alone, or a bare `code=...&state=...` as pasted by a person.
pub fn parse_response(text: &str) -> Option<Response> {
    let text = text.trim();
    let query = match text.split_once('?') {
        Some((_, q)) => q,
        None => text,
    };
    let query = query.split('#').next().unwrap_or_default();
    let mut code = None;
    let mut state = None;
    let mut error = None;
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        match k.as_ref() {
            "code" => code = Some(v.into_owned()),
            "state" => state = Some(v.into_owned()),
            "error" => error = Some(v.chars().filter(char::is_ascii_graphic).take(64).collect::<String>()),
            _ => {}
        }
    }
    match (error, code, state) {
        (Some(error), _, state) => Some(Response::Error { error, state }),
        (None, Some(code), Some(state)) if !code.is_empty() => Some(Response::Code { code: code.into(), state }),
        _ => None,
    }
}

/// Random bytes in a start token (256 bits).
const START_BYTES: u32 = 32;

/// The shortest start token accepted from a status (128 bits, base64url).
const MIN_START_LEN: usize = 22;

/// The start link of a binding: `<base>/authorize/<ns>/<name>?start=<token>`, keeping the token
/// of `current` (the link the status shows) when it is such a link for this binding, else with a
/// new token from the operating system's random source.
pub fn start_link(base: &str, namespace: &str, name: &str, current: Option<&str>) -> String {
    let link = format!("{base}/authorize/{namespace}/{name}");
    let start = current
        .and_then(|url| start_of(url, &link))
        .map_or_else(|| oauth2::CsrfToken::new_random_len(START_BYTES).secret().clone(), str::to_owned);
    format!("{link}?start={start}")
}

/// The start token of `url` when it is `<link>?start=<token>` with a well-formed token.
pub fn start_of<'a>(url: &'a str, link: &str) -> Option<&'a str> {
    let token = url.strip_prefix(link)?.strip_prefix("?start=")?;
    let well_formed = (MIN_START_LEN..=128).contains(&token.len())
        && token.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    well_formed.then_some(token)
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret;

    use super::*;

    fn params<'a>(scopes: &'a [String]) -> Params<'a> {
        Params {
            authorize_url: "https://idp.example/authorize",
            client_id: "client",
            redirect_uri: "http://localhost:8400/callback",
            scopes,
            login_hint: "helpdesk@contoso.com",
            extra: &[("access_type", "offline"), ("prompt", "consent")],
            namespace: "mail",
            name: "helpdesk.eu",
        }
    }

    #[test]
    fn a_request_carries_pkce_s256_a_state_for_its_binding_and_the_login_hint() {
        let scopes = vec!["openid".to_owned(), "https://mail.google.com/".to_owned()];
        let r = request(&params(&scopes)).unwrap();
        let url = url::Url::parse(&r.url).unwrap();
        let q: std::collections::HashMap<_, _> = url.query_pairs().into_owned().collect();
        assert_eq!(q["response_type"], "code");
        assert_eq!(q["code_challenge_method"], "S256");
        assert_eq!(q["login_hint"], "helpdesk@contoso.com");
        assert_eq!(q["access_type"], "offline");
        assert_eq!(q["prompt"], "consent");
        assert_eq!(q["scope"], "openid https://mail.google.com/");
        assert_eq!(q["state"], r.state);
        assert_eq!(binding_of(&r.state), Some(("mail".into(), "helpdesk.eu".into())));
        assert!(!r.url.contains(r.code_verifier.expose_secret()), "the verifier never leaves the operator");
        let again = request(&params(&scopes)).unwrap();
        assert_ne!(again.state, r.state, "single use: a new state every time");
    }

    #[test]
    fn a_pasted_redirect_url_query_or_error_is_read() {
        let Some(Response::Code { code, state }) = parse_response("http://localhost:8400/callback?code=abc&state=s.1")
        else {
            panic!("code")
        };
        assert_eq!((code.expose_secret(), state.as_str()), ("abc", "s.1"));
        assert!(matches!(parse_response("  code=abc&state=x  "), Some(Response::Code { .. })));
        assert!(matches!(
            parse_response("https://h/callback?error=access_denied&state=x"),
            Some(Response::Error { error, .. }) if error == "access_denied"
        ));
        assert!(parse_response("code=abc").is_none(), "a code without its state is refused");
        assert!(parse_response("nonsense").is_none());
    }

    #[test]
    fn states_compare_exactly() {
        assert!(same_state("a.b", "a.b"));
        assert!(!same_state("a.b", "a.c"));
        assert!(!same_state("a.b", "a.bc"));
        assert_eq!(binding_of("garbage"), None);
    }
}
