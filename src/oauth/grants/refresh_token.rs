//! The refresh token grant with an imported refresh token (RFC 6749 §6): the token obtained
//! elsewhere is read once from the Secret the spec names; after that the operator's own stored
//! (and rotated) refresh token is used.

use super::{Flow, FlowInput, Needs, Step, refresh, refresh_stored};
use crate::api::{MailProviderSpec, SecretKeySelector};
use crate::policy::Reason;
use crate::policy::classify::Failure;
use crate::policy::grant_state::GrantState;

/// Import from `secret_ref`, then keep the rotated token.
pub struct RefreshTokenFlow {
    /// The Secret key holding the refresh token to import.
    pub secret_ref: SecretKeySelector,
}

impl RefreshTokenFlow {
    fn import_id(&self) -> String {
        format!("{}/{}", self.secret_ref.name, self.secret_ref.key)
    }
}

impl Flow for RefreshTokenFlow {
    fn name(&self) -> &'static str {
        "refreshToken"
    }

    fn reads<'a>(&'a self, grant: Option<&GrantState>, _provider: &'a MailProviderSpec) -> Option<Needs<'a>> {
        grant.is_none_or(|g| g.refresh_token.is_none()).then_some(Needs::Binding(&self.secret_ref))
    }

    /// A grant imported from another Secret (or obtained otherwise) is not this one: changing
    /// the `secretRef` imports again.
    fn owns(&self, grant: &GrantState) -> bool {
        grant.refresh_token.is_some() && grant.imported_from.as_deref() == Some(self.import_id().as_str())
    }

    fn origin(&self) -> Option<String> {
        Some(self.import_id())
    }

    fn step(&self, input: &FlowInput<'_>) -> Step {
        if let Some(step) = refresh_stored(input) {
            return step;
        }
        match input.read {
            Some(rt) => Step::Token(refresh(rt, input.scopes)),
            None => Step::Fail(Failure {
                reason: Reason::ImportSecretNotFound,
                transient: true,
                message: format!("Secret {} has no non-empty key {}", self.secret_ref.name, self.secret_ref.key),
                retry_after: None,
            }),
        }
    }
}
