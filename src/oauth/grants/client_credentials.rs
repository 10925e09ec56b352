//! The client credentials grant (RFC 6749 §4.4): an app-only token for the client itself
//! (Microsoft `https://outlook.office365.com/.default` with Exchange application permissions).

use super::{Flow, FlowInput, ProviderFacts, ScopeKind, Step, scope};
use crate::oauth::client::GrantCall;

/// App-only tokens, requested anew whenever one is due.
pub struct ClientCredentialsFlow;

impl Flow for ClientCredentialsFlow {
    fn name(&self) -> &'static str {
        "clientCredentials"
    }

    fn unusable(&self, provider: &ProviderFacts<'_>) -> Option<String> {
        (!provider.confidential).then(|| {
            "the clientCredentials grant needs client authentication, and the provider has neither \
             clientAuthentication.clientSecretRefs nor clientAuthentication.certificateRef"
                .to_owned()
        })
    }

    fn scope_kind(&self) -> ScopeKind {
        ScopeKind::AppOnly
    }

    fn step(&self, input: &FlowInput<'_>) -> Step {
        Step::Token(GrantCall { grant_type: "client_credentials", params: scope(input.scopes).into_iter().collect() })
    }
}
