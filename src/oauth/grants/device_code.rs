//! The device authorization grant (RFC 8628): the operator asks for a code, status shows it with
//! the URL where a person enters it, and the operator polls the token endpoint at the interval the
//! server gives (5 s more after each `slow_down`) until the person approves, denies, or the code
//! expires. The code is kept in the grant-state Secret, so polling goes on after a restart. An
//! expired code is not replaced by itself: a new one starts on the next
//! `mailoauth.io/reauthorize-requested` value, so nobody gets an endless series of codes.

use chrono::Duration;

use super::{Flow, FlowInput, ProviderFacts, ScopeKind, Step, refresh_stored};
use crate::oauth::client::{DeviceCode, GrantCall, Param};
use crate::policy::Reason;
use crate::policy::classify::{Failure, UpstreamError};
use crate::policy::grant_state::{GrantState, PendingAuthorization, rfc3339};
use crate::policy::time::plus;

/// The grant type of a device code poll.
pub const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:device_code";

/// What `slow_down` adds to the interval (RFC 8628 §3.5).
pub const SLOW_DOWN: Duration = Duration::seconds(5);

/// The longest poll interval kept, whatever the server asks.
pub const MAX_INTERVAL: Duration = Duration::minutes(5);

/// The method name in status and the pending authorization.
pub const METHOD: &str = "deviceCode";

/// Device code, then the stored refresh token.
pub struct DeviceCodeFlow;

impl Flow for DeviceCodeFlow {
    fn name(&self) -> &'static str {
        METHOD
    }

    fn unusable(&self, provider: &ProviderFacts<'_>) -> Option<String> {
        if !provider.device_flow_for_mail {
            return Some(format!(
                "the {} provider's device flow does not allow mail scopes; use the authorizationCode grant",
                provider.preset.unwrap_or("generic")
            ));
        }
        (!provider.device_endpoint).then(|| {
            "the provider has no device authorization endpoint: set generic.deviceAuthorizationUrl, or use an \
             issuerUrl whose discovery document lists device_authorization_endpoint"
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
        let Some(p) = input.pending.filter(|p| p.method == METHOD) else {
            return Step::StartDeviceAuthorization;
        };
        if input.now >= p.expires_at {
            return Step::Fail(expired(p));
        }
        match &p.device_code {
            Some(code) if input.now >= p.next_poll => Step::Token(GrantCall {
                grant_type: GRANT_TYPE,
                params: vec![("device_code", Param::Secret(code.clone()))],
            }),
            Some(_) => Step::Await(p.clone()),
            None => Step::StartDeviceAuthorization,
        }
    }

    fn refused(&self, error: &UpstreamError, input: &FlowInput<'_>) -> Option<Step> {
        let p = input.pending?;
        let again = |interval: Duration| {
            let interval = std::cmp::min(interval, MAX_INTERVAL);
            PendingAuthorization { interval, next_poll: plus(input.now, interval), ..p.clone() }
        };
        match error.error.as_deref()? {
            "authorization_pending" => Some(Step::Await(again(p.interval))),
            "slow_down" => Some(Step::Await(again(plus_interval(p.interval)))),
            "expired_token" => Some(Step::Fail(expired(p))),
            // Entra says authorization_declined where RFC 8628 says access_denied.
            "access_denied" | "authorization_declined" => Some(Step::Fail(Failure {
                reason: Reason::AuthorizationDenied,
                transient: false,
                message: format!(
                    "the person at {} declined the request for code {}",
                    p.verification_uri.as_deref().unwrap_or("the verification page"),
                    p.user_code.as_deref().unwrap_or("?")
                ),
                retry_after: None,
            })),
            _ => None,
        }
    }
}

fn plus_interval(interval: Duration) -> Duration {
    interval.checked_add(&SLOW_DOWN).unwrap_or(MAX_INTERVAL)
}

fn expired(p: &PendingAuthorization) -> Failure {
    Failure {
        reason: Reason::AuthorizationExpired,
        transient: false,
        message: format!(
            "the code {} was not entered before it expired at {}",
            p.user_code.as_deref().unwrap_or("?"),
            rfc3339(p.expires_at)
        ),
        retry_after: None,
    }
}

/// The pending authorization for a new device code. The interval is at least 1 s and at most
/// [`MAX_INTERVAL`]; the code lives at most a day, whatever the server says.
pub fn pending(
    code: DeviceCode,
    now: chrono::DateTime<chrono::Utc>,
    provider: &str,
    client_id: &str,
    scopes: &[String],
    token_url: &str,
) -> PendingAuthorization {
    let interval = code.interval.clamp(Duration::seconds(1), MAX_INTERVAL);
    PendingAuthorization {
        method: METHOD.into(),
        device_code: Some(code.device_code),
        user_code: Some(code.user_code),
        verification_uri: Some(code.verification_uri),
        verification_uri_complete: code.verification_uri_complete,
        started_at: now,
        expires_at: plus(now, std::cmp::min(code.expires_in, Duration::days(1))),
        interval,
        next_poll: plus(now, interval),
        provider: provider.to_owned(),
        client_id: client_id.to_owned(),
        scopes: scopes.to_vec(),
        state: None,
        code_verifier: None,
        redirect_uri: None,
        url: None,
        code: None,
        binding_uid: None,
        generation: None,
        token_url: Some(token_url.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use chrono::{DateTime, Utc};
    use secrecy::SecretString;

    use super::*;

    use crate::testing::t as at;

    fn started() -> PendingAuthorization {
        let code = DeviceCode {
            device_code: SecretString::from("dc".to_owned()),
            user_code: "WDJB-MJHT".into(),
            verification_uri: "https://idp/device".into(),
            verification_uri_complete: None,
            expires_in: Duration::minutes(10),
            interval: Duration::seconds(5),
        };
        pending(code, at(0), "MailProvider/p", "c", &["mail".to_owned()], "https://idp/token")
    }

    fn input(now: DateTime<Utc>, pending: Option<&PendingAuthorization>) -> FlowInput<'_> {
        FlowInput {
            now,
            grant: None,
            pending,
            read: None,
            scopes: &[],
            response: None,
            binding_uid: None,
            generation: None,
            mailbox: "m@example.com",
            token_url: "https://idp/token",
        }
    }

    fn upstream(code: &str) -> UpstreamError {
        UpstreamError { status: Some(400), error: Some(code.into()), ..Default::default() }
    }

    #[test]
    fn without_a_code_a_device_authorization_is_started() {
        assert!(matches!(DeviceCodeFlow.step(&input(at(0), None)), Step::StartDeviceAuthorization));
    }

    #[test]
    fn a_code_is_polled_no_sooner_than_its_interval() {
        let p = started();
        assert!(matches!(DeviceCodeFlow.step(&input(at(4), Some(&p))), Step::Await(_)));
        match DeviceCodeFlow.step(&input(at(5), Some(&p))) {
            Step::Token(call) => assert_eq!(call.grant_type, GRANT_TYPE),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn pending_waits_an_interval_and_slow_down_adds_five_seconds() {
        let p = started();
        let i = input(at(5), Some(&p));
        let Some(Step::Await(next)) = DeviceCodeFlow.refused(&upstream("authorization_pending"), &i) else {
            panic!("pending")
        };
        assert_eq!((next.interval, next.next_poll), (Duration::seconds(5), at(10)));
        let Some(Step::Await(slower)) = DeviceCodeFlow.refused(&upstream("slow_down"), &i) else { panic!("slow") };
        assert_eq!((slower.interval, slower.next_poll), (Duration::seconds(10), at(15)));
        assert!(!slower.same_stored(&p), "a new interval is stored");
        assert!(next.same_stored(&p), "a pending answer changes nothing stored");
    }

    #[test]
    fn an_expired_or_denied_code_is_a_failure_that_waits_for_a_person() {
        let p = started();
        let Step::Fail(f) = DeviceCodeFlow.step(&input(at(600), Some(&p))) else { panic!("expired") };
        assert_eq!((f.reason, f.transient), (Reason::AuthorizationExpired, false));
        assert!(f.message.contains("WDJB-MJHT"), "{}", f.message);
        let i = input(at(30), Some(&p));
        let Some(Step::Fail(f)) = DeviceCodeFlow.refused(&upstream("access_denied"), &i) else { panic!("denied") };
        let Some(Step::Fail(declined)) = DeviceCodeFlow.refused(&upstream("authorization_declined"), &i) else {
            panic!("Entra's authorization_declined")
        };
        assert_eq!(declined.reason, Reason::AuthorizationDenied);
        assert_eq!(f.reason, Reason::AuthorizationDenied);
        let Some(Step::Fail(f)) = DeviceCodeFlow.refused(&upstream("expired_token"), &i) else { panic!("expired") };
        assert_eq!(f.reason, Reason::AuthorizationExpired);
        assert!(DeviceCodeFlow.refused(&upstream("invalid_client"), &i).is_none(), "classified as usual");
    }

    #[test]
    fn absurd_intervals_and_lifetimes_are_bounded() {
        let code = DeviceCode {
            device_code: SecretString::from("dc".to_owned()),
            user_code: "X".into(),
            verification_uri: "https://idp/device".into(),
            verification_uri_complete: None,
            expires_in: Duration::days(300),
            interval: Duration::days(1),
        };
        let p = pending(code, at(0), "p", "c", &[], "https://idp/token");
        assert_eq!(p.interval, MAX_INTERVAL);
        assert_eq!(p.expires_at, at(86_400));
    }

    #[test]
    fn google_and_providers_without_a_device_endpoint_are_refused() {
        let google = ProviderFacts { preset: Some("google"), device_endpoint: true, ..Default::default() };
        assert!(DeviceCodeFlow.unusable(&google).is_some_and(|m| m.contains("authorizationCode")));
        let none = ProviderFacts { device_flow_for_mail: true, ..Default::default() };
        assert!(DeviceCodeFlow.unusable(&none).is_some_and(|m| m.contains("deviceAuthorizationUrl")));
        let ok = ProviderFacts { device_flow_for_mail: true, device_endpoint: true, ..Default::default() };
        assert!(DeviceCodeFlow.unusable(&ok).is_none());
    }
}
