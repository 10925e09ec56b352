//! The authorization code grant with PKCE S256 (RFC 6749 §4.1, RFC 7636). A person's browser goes
//! to the provider with a single-use `state` bound to the binding (its uid and generation) and a
//! code challenge; the code comes back to the operator's `/callback`, or is pasted by the person
//! into the `mailoauth.io/authorization-response` annotation. Either way it is exchanged once,
//! only for the request it answers, with the verifier only the operator holds. Then the stored
//! refresh token is used like any other.

use super::{Flow, FlowInput, ProviderFacts, ScopeKind, Step, refresh_stored};
use crate::oauth::authorize::{Response, same_state};
use crate::oauth::client::{GrantCall, Param};
use crate::policy::Reason;
use crate::policy::classify::{Failure, UpstreamError};
use crate::policy::grant_state::{GrantState, PendingAuthorization, rfc3339};

/// The method name in status and the pending authorization.
pub const METHOD: &str = "authorizationCode";

/// Authorization code with PKCE, then the stored refresh token.
pub struct AuthorizationCodeFlow;

fn failed(reason: Reason, message: String) -> Step {
    Step::Fail(Failure { reason, transient: false, message, retry_after: None })
}

impl Flow for AuthorizationCodeFlow {
    fn name(&self) -> &'static str {
        METHOD
    }

    fn unusable(&self, provider: &ProviderFacts<'_>) -> Option<String> {
        (!provider.authorization_endpoint).then(|| {
            "the provider has no authorization endpoint: set generic.authorizationUrl, or use an issuerUrl whose \
             discovery document lists authorization_endpoint"
                .to_owned()
        })
    }

    fn scope_kind(&self) -> ScopeKind {
        ScopeKind::Consent
    }

    fn owns(&self, grant: &GrantState) -> bool {
        grant.refresh_token.is_some() && grant.imported_from.is_none()
    }

    fn step(&self, input: &FlowInput<'_>) -> Step {
        if let Some(step) = refresh_stored(input) {
            return step;
        }
        let pending = input.pending.filter(|p| p.method == METHOD && p.state.is_some());
        match (input.response, pending) {
            (Some(Response::Error { error, .. }), _)
                if error == "access_denied" || error == "authorization_declined" =>
            {
                failed(
                    Reason::AuthorizationDenied,
                    "the person declined at the provider's consent page (access_denied)".into(),
                )
            }
            (Some(Response::Error { error, .. }), _) => failed(
                Reason::AuthorizationExpired,
                format!("the provider sent the browser back with error {error} instead of a code"),
            ),
            (Some(Response::Code { code, state }), Some(p)) => exchange(input, p, code, state),
            (Some(Response::Code { .. }), None) => failed(
                Reason::AuthorizationExpired,
                "the authorization response answers no request in progress (it was used already, or the request \
                 was replaced)"
                    .into(),
            ),
            // Nothing to poll: the callback's write (or a pasted response) wakes the binding; come
            // back at the request's expiry. (A stored request's `next_poll` is its start after a
            // restart: taken as is, the binding would be reconciled every second.)
            (None, Some(p)) if input.now < p.expires_at => {
                Step::Await(PendingAuthorization { next_poll: p.expires_at, ..p.clone() })
            }
            (None, _) => Step::StartAuthorization,
        }
    }

    fn refused(&self, error: &UpstreamError, input: &FlowInput<'_>) -> Option<Step> {
        (input.response.is_some() && error.error.as_deref() == Some("invalid_grant")).then(|| {
            failed(
                Reason::AuthorizationExpired,
                "the provider refused the authorization code (expired, used already, or issued for another request)"
                    .into(),
            )
        })
    }
}

/// The code exchange, if the response answers `p` and `p` is still current for this binding.
fn exchange(input: &FlowInput<'_>, p: &PendingAuthorization, code: &secrecy::SecretString, state: &str) -> Step {
    let answers = p.state.as_deref().is_some_and(|s| same_state(s, state));
    let same_binding = p.binding_uid.as_deref() == input.binding_uid && p.generation == input.generation;
    let (Some(verifier), Some(redirect_uri)) = (&p.code_verifier, &p.redirect_uri) else {
        return Step::StartAuthorization;
    };
    if !answers {
        return failed(
            Reason::AuthorizationExpired,
            "the authorization response does not answer the current request (its state differs: an older link, \
             or someone else's)"
                .into(),
        );
    }
    if !same_binding {
        return failed(
            Reason::AuthorizationExpired,
            "the binding was changed or recreated since the authorization request was made".into(),
        );
    }
    if input.now >= p.expires_at {
        return failed(
            Reason::AuthorizationExpired,
            format!("the authorization request expired at {}", rfc3339(p.expires_at)),
        );
    }
    Step::Token(GrantCall {
        grant_type: "authorization_code",
        params: vec![
            ("code", Param::Secret(code.clone())),
            ("redirect_uri", Param::Plain(redirect_uri.clone())),
            ("code_verifier", Param::Secret(verifier.clone())),
        ],
    })
}

#[cfg(test)]
mod tests {
    use chrono::{DateTime, Duration, Utc};
    use secrecy::SecretString;

    use super::*;

    use crate::testing::t as at;

    fn pending() -> PendingAuthorization {
        PendingAuthorization {
            method: METHOD.into(),
            device_code: None,
            user_code: None,
            verification_uri: None,
            verification_uri_complete: None,
            started_at: at(0),
            expires_at: at(600),
            interval: Duration::seconds(1),
            next_poll: at(600),
            provider: "MailProvider/p".into(),
            client_id: "c".into(),
            scopes: vec![],
            state: Some("bWFpbC9h.s1".into()),
            code_verifier: Some(SecretString::from("verifier".to_owned())),
            redirect_uri: Some("http://localhost:8400/callback".into()),
            url: Some("https://idp/authorize?state=bWFpbC9h.s1".into()),
            code: None,
            binding_uid: Some("uid-1".into()),
            generation: Some(1),
            token_url: None,
        }
    }

    fn input<'a>(now: DateTime<Utc>, p: Option<&'a PendingAuthorization>, r: Option<&'a Response>) -> FlowInput<'a> {
        FlowInput {
            now,
            grant: None,
            pending: p,
            read: None,
            scopes: &[],
            response: r,
            binding_uid: Some("uid-1"),
            generation: Some(1),
            mailbox: "m@example.com",
            token_url: "https://idp/token",
        }
    }

    fn code(state: &str) -> Response {
        Response::Code { code: SecretString::from("the-code".to_owned()), state: state.into() }
    }

    #[test]
    fn without_a_request_one_is_started_and_a_current_one_is_awaited() {
        assert!(matches!(AuthorizationCodeFlow.step(&input(at(0), None, None)), Step::StartAuthorization));
        let p = PendingAuthorization { next_poll: at(0), ..pending() };
        let Step::Await(waiting) = AuthorizationCodeFlow.step(&input(at(10), Some(&p), None)) else { panic!("await") };
        assert_eq!(waiting.next_poll, p.expires_at, "nothing to poll: back at the request's expiry, not every second");
        assert!(matches!(AuthorizationCodeFlow.step(&input(at(600), Some(&p), None)), Step::StartAuthorization));
    }

    #[test]
    fn the_code_is_exchanged_with_the_verifier_only_for_the_request_it_answers() {
        let p = pending();
        let r = code("bWFpbC9h.s1");
        let Step::Token(call) = AuthorizationCodeFlow.step(&input(at(10), Some(&p), Some(&r))) else { panic!("token") };
        assert_eq!(call.grant_type, "authorization_code");
        assert!(call.params.iter().any(|(k, _)| *k == "code_verifier"));
        for (what, r, now) in
            [("another state", code("bWFpbC9h.s2"), at(10)), ("expired", code("bWFpbC9h.s1"), at(601))]
        {
            let step = AuthorizationCodeFlow.step(&input(now, Some(&p), Some(&r)));
            let Step::Fail(f) = step else { panic!("{what}") };
            assert_eq!(f.reason, Reason::AuthorizationExpired, "{what}");
        }
        let mut recreated = input(at(10), Some(&p), Some(&r));
        recreated.binding_uid = Some("uid-2");
        assert!(matches!(AuthorizationCodeFlow.step(&recreated), Step::Fail(_)), "bound to the binding's uid");
        assert!(matches!(AuthorizationCodeFlow.step(&input(at(10), None, Some(&r))), Step::Fail(_)), "single use");
    }

    #[test]
    fn a_refusal_or_a_refused_code_waits_for_a_person() {
        let p = pending();
        let denied = Response::Error { error: "access_denied".into(), state: None };
        let Step::Fail(f) = AuthorizationCodeFlow.step(&input(at(10), Some(&p), Some(&denied))) else { panic!() };
        assert_eq!((f.reason, f.transient), (Reason::AuthorizationDenied, false));
        let r = code("bWFpbC9h.s1");
        let e = UpstreamError { status: Some(400), error: Some("invalid_grant".into()), ..Default::default() };
        let Some(Step::Fail(f)) = AuthorizationCodeFlow.refused(&e, &input(at(10), Some(&p), Some(&r))) else {
            panic!()
        };
        assert_eq!(f.reason, Reason::AuthorizationExpired);
    }
}
