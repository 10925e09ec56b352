//! The JWT bearer grant (RFC 7523 §2.1), as Google's domain-wide delegation uses it: a service
//! account signs an assertion (`iss` = its `client_email`, `sub` = the mailbox it acts for,
//! `scope`, `aud` = the token endpoint, five minutes) with the key from its JSON key file, and
//! gets an access token for the mailbox. There is no refresh token: a new assertion is signed
//! whenever a token is due.

use secrecy::{ExposeSecret, SecretString};

use super::{Flow, FlowInput, Needs, ProviderFacts, Step};
use crate::api::MailProviderSpec;
use crate::oauth::assertion::{SigningKey, bearer_assertion};
use crate::oauth::client::{GrantCall, Param};
use crate::policy::Reason;
use crate::policy::classify::Failure;

/// The grant type of a JWT bearer request.
pub const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

/// A service account acting for the mailbox.
pub struct JwtBearerFlow;

/// The fields of a service-account key file the grant uses.
struct ServiceAccount {
    client_email: String,
    key: SigningKey,
}

fn service_account(json: &SecretString) -> Result<ServiceAccount, String> {
    let v: serde_json::Value =
        serde_json::from_str(json.expose_secret()).map_err(|_| "the service-account key is not JSON".to_owned())?;
    let text = |k: &str| v.get(k).and_then(serde_json::Value::as_str).map(str::to_owned);
    let client_email = text("client_email").ok_or("the service-account key has no client_email")?;
    let pem = text("private_key").ok_or("the service-account key has no private_key")?;
    let key = SigningKey::from_pem(pem.as_bytes(), None, text("private_key_id"))?;
    Ok(ServiceAccount { client_email, key })
}

fn invalid(message: String) -> Step {
    Step::Fail(Failure { reason: Reason::InvalidSpec, transient: false, message, retry_after: None })
}

impl Flow for JwtBearerFlow {
    fn name(&self) -> &'static str {
        "jwtBearer"
    }

    fn unusable(&self, provider: &ProviderFacts<'_>) -> Option<String> {
        (!provider.service_account).then(|| {
            "the jwtBearer grant needs the provider's serviceAccountKeyRef (a service-account JSON key)".to_owned()
        })
    }

    fn reads<'a>(
        &'a self,
        _grant: Option<&crate::policy::grant_state::GrantState>,
        provider: &'a MailProviderSpec,
    ) -> Option<Needs<'a>> {
        provider.service_account_key_ref.as_ref().map(Needs::Provider)
    }

    fn step(&self, input: &FlowInput<'_>) -> Step {
        let Some(json) = input.read else {
            return Step::Fail(Failure {
                reason: Reason::ClientSecretNotFound,
                transient: true,
                message: "the Secret serviceAccountKeyRef names is missing or empty".into(),
                retry_after: None,
            });
        };
        let account = match service_account(json) {
            Ok(a) => a,
            Err(why) => return invalid(format!("serviceAccountKeyRef: {why}")),
        };
        // Signed with the wall clock: the server checks the assertion's times against its own.
        let now = chrono::Utc::now();
        match bearer_assertion(&account.key, &account.client_email, input.mailbox, input.scopes, input.token_url, now) {
            Ok(assertion) => {
                Step::Token(GrantCall { grant_type: GRANT_TYPE, params: vec![("assertion", Param::Secret(assertion))] })
            }
            Err(why) => invalid(format!("serviceAccountKeyRef: {why}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use base64::Engine;
    use chrono::DateTime;

    use super::*;

    #[test]
    fn an_assertion_names_the_account_the_mailbox_the_scopes_and_the_token_endpoint() {
        let key = rcgen::KeyPair::generate().unwrap();
        let json = serde_json::json!({
            "type": "service_account", "client_email": "mailer@project.iam.gserviceaccount.com",
            "private_key": key.serialize_pem(), "private_key_id": "k1",
        });
        let secret = SecretString::from(json.to_string());
        let scopes = vec!["https://mail.google.com/".to_owned()];
        let input = FlowInput {
            now: DateTime::from_timestamp(1_800_000_000, 0).unwrap(),
            grant: None,
            pending: None,
            read: Some(&secret),
            scopes: &scopes,
            response: None,
            binding_uid: None,
            generation: None,
            mailbox: "helpdesk@example.com",
            token_url: "https://oauth2.googleapis.com/token",
        };
        let Step::Token(call) = JwtBearerFlow.step(&input) else { panic!("token") };
        assert_eq!(call.grant_type, GRANT_TYPE);
        let assertion = call.secrets().next().unwrap().to_owned();
        let payload = assertion.split('.').nth(1).unwrap();
        let claims: serde_json::Value =
            serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
        assert_eq!(claims["iss"], "mailer@project.iam.gserviceaccount.com");
        assert_eq!(claims["sub"], "helpdesk@example.com");
        assert_eq!(claims["scope"], "https://mail.google.com/");
        assert_eq!(claims["aud"], "https://oauth2.googleapis.com/token");
        assert!(claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap() <= 3600);
    }

    #[test]
    fn a_key_file_that_is_not_a_service_account_is_an_invalid_spec() {
        let secret = SecretString::from("{\"client_email\":\"x\"}".to_owned());
        let input = FlowInput {
            now: DateTime::from_timestamp(1_800_000_000, 0).unwrap(),
            grant: None,
            pending: None,
            read: Some(&secret),
            scopes: &[],
            response: None,
            binding_uid: None,
            generation: None,
            mailbox: "m@example.com",
            token_url: "https://t",
        };
        let Step::Fail(f) = JwtBearerFlow.step(&input) else { panic!("fail") };
        assert_eq!(f.reason, Reason::InvalidSpec);
        assert!(f.message.contains("private_key"), "{}", f.message);
    }
}
