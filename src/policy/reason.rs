//! Typed condition reasons. Each names what happened and carries the fix a person can apply;
//! docs/conditions.md lists them all.

use std::fmt;

/// Why a condition has its status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The published token is valid.
    TokenValid,
    /// Waiting for a person to complete an interactive grant.
    AwaitingAuthorization,
    /// The person did not complete the interactive grant in time.
    AuthorizationExpired,
    /// The person declined the interactive grant (`access_denied`; Entra's device flow says
    /// `authorization_declined`).
    AuthorizationDenied,
    /// The grant is dead (`invalid_grant`: revoked, expired, password changed).
    ReauthorizationRequired,
    /// The user or an admin has not consented to the scopes (`invalid_scope`, AADSTS65001), or a
    /// token endpoint denied this client (`access_denied`; Google: a domain-wide delegation that
    /// does not list the client or its scopes).
    ConsentRequired,
    /// The provider rejected the client id or its credential (`invalid_client`, AADSTS7000215,
    /// AADSTS700016, Google's "Invalid JWT Signature").
    ClientCredentialsInvalid,
    /// The client secret has expired (AADSTS7000222).
    ClientSecretExpired,
    /// The provider vouched for another identity than `spec.mailbox`.
    IdentityMismatch,
    /// The provider said nothing usable about who consented (no id_token claim, userinfo failed,
    /// `email_verified: false`), and the binding does not say `identity: unchecked`.
    IdentityUnverified,
    /// The stored grant was issued by another token endpoint, client or provider than the one the
    /// binding points at now: nothing is sent, the grant is kept.
    IssuerChanged,
    /// The referenced provider does not exist.
    ProviderNotFound,
    /// The referenced provider exists but is not ready.
    ProviderNotReady,
    /// The `ClusterMailProvider` does not allow this namespace.
    ProviderNotAllowed,
    /// The Secret to write is controlled by someone else, or named by another binding.
    SecretConflict,
    /// The token endpoint could not be reached or failed (network, 5xx).
    TokenEndpointUnavailable,
    /// The token endpoint throttled us (429).
    Throttled,
    /// The published token has expired.
    Expired,
    /// The grant in the spec is not implemented by this version.
    GrantNotSupported,
    /// The spec asks for something this provider cannot do, or is inconsistent.
    InvalidSpec,
    /// The Secret holding the refresh token to import is missing or empty.
    ImportSecretNotFound,
    /// The provider's client secret Secret is missing or empty.
    ClientSecretNotFound,
    /// The provider's endpoints could not be resolved (discovery failed, none given).
    EndpointsUnresolved,
    /// The provider is usable.
    ProviderReady,
    /// `spec.suspend` is set.
    Suspended,
    /// Nothing obtained yet.
    Pending,
    /// The grant holds a working credential.
    Authorized,
    /// The last refresh worked.
    RefreshSucceeded,
    /// The client secret expires soon.
    ClientSecretExpiring,
    /// No known client secret expires soon.
    ClientSecretValid,
    /// The token endpoint answered with an error the operator does not know, or with something
    /// that is no token response.
    TokenRequestFailed,
    /// The token endpoint refused the request itself (`invalid_request`,
    /// `unsupported_grant_type`, `unauthorized_client`): retrying cannot help.
    RequestRejected,
    /// The provider has not been reconciled yet; the binding proceeds as soon as it is.
    ProviderPending,
    /// A referenced Secret lacks the `mailoauth.io/allow-reference: "true"` label (strict mode).
    SecretReferenceNotAllowed,
}

impl Reason {
    /// Every reason, in declaration order.
    pub const ALL: [Reason; 34] = [
        Reason::TokenValid,
        Reason::AwaitingAuthorization,
        Reason::AuthorizationExpired,
        Reason::AuthorizationDenied,
        Reason::ReauthorizationRequired,
        Reason::ConsentRequired,
        Reason::ClientCredentialsInvalid,
        Reason::ClientSecretExpired,
        Reason::IdentityMismatch,
        Reason::IdentityUnverified,
        Reason::IssuerChanged,
        Reason::ProviderNotFound,
        Reason::ProviderNotReady,
        Reason::ProviderNotAllowed,
        Reason::SecretConflict,
        Reason::TokenEndpointUnavailable,
        Reason::Throttled,
        Reason::Expired,
        Reason::GrantNotSupported,
        Reason::InvalidSpec,
        Reason::ImportSecretNotFound,
        Reason::ClientSecretNotFound,
        Reason::EndpointsUnresolved,
        Reason::ProviderReady,
        Reason::Suspended,
        Reason::Pending,
        Reason::Authorized,
        Reason::RefreshSucceeded,
        Reason::ClientSecretExpiring,
        Reason::ClientSecretValid,
        Reason::TokenRequestFailed,
        Reason::RequestRejected,
        Reason::ProviderPending,
        Reason::SecretReferenceNotAllowed,
    ];

    /// The reason named `text` as written into a condition; `None` for a name this version does
    /// not know (a newer operator's, or a verification result).
    pub fn parse(text: &str) -> Option<Reason> {
        Self::ALL.into_iter().find(|r| r.as_str() == text)
    }

    /// The CamelCase name written into conditions.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::TokenValid => "TokenValid",
            Reason::AwaitingAuthorization => "AwaitingAuthorization",
            Reason::AuthorizationExpired => "AuthorizationExpired",
            Reason::AuthorizationDenied => "AuthorizationDenied",
            Reason::ReauthorizationRequired => "ReauthorizationRequired",
            Reason::ConsentRequired => "ConsentRequired",
            Reason::ClientCredentialsInvalid => "ClientCredentialsInvalid",
            Reason::ClientSecretExpired => "ClientSecretExpired",
            Reason::IdentityMismatch => "IdentityMismatch",
            Reason::IdentityUnverified => "IdentityUnverified",
            Reason::IssuerChanged => "IssuerChanged",
            Reason::ProviderNotFound => "ProviderNotFound",
            Reason::ProviderNotReady => "ProviderNotReady",
            Reason::ProviderNotAllowed => "ProviderNotAllowed",
            Reason::SecretConflict => "SecretConflict",
            Reason::TokenEndpointUnavailable => "TokenEndpointUnavailable",
            Reason::Throttled => "Throttled",
            Reason::Expired => "Expired",
            Reason::GrantNotSupported => "GrantNotSupported",
            Reason::InvalidSpec => "InvalidSpec",
            Reason::ImportSecretNotFound => "ImportSecretNotFound",
            Reason::ClientSecretNotFound => "ClientSecretNotFound",
            Reason::EndpointsUnresolved => "EndpointsUnresolved",
            Reason::ProviderReady => "ProviderReady",
            Reason::Suspended => "Suspended",
            Reason::Pending => "Pending",
            Reason::Authorized => "Authorized",
            Reason::RefreshSucceeded => "RefreshSucceeded",
            Reason::ClientSecretExpiring => "ClientSecretExpiring",
            Reason::ClientSecretValid => "ClientSecretValid",
            Reason::TokenRequestFailed => "TokenRequestFailed",
            Reason::RequestRejected => "RequestRejected",
            Reason::ProviderPending => "ProviderPending",
            Reason::SecretReferenceNotAllowed => "SecretReferenceNotAllowed",
        }
    }

    /// What a person can do about it; empty where nothing is needed.
    pub fn fix(self) -> &'static str {
        match self {
            Reason::ReauthorizationRequired => {
                "authorize again: set the mailoauth.io/reauthorize-requested annotation to a new value (for \
                 the refreshToken grant, put a new refresh token into the import Secret first)"
            }
            Reason::ConsentRequired => {
                "grant consent for the requested scopes (an admin may have to consent for the \
                 tenant), then set mailoauth.io/refresh-requested to a new value"
            }
            Reason::ClientCredentialsInvalid => {
                "check the provider's clientId (and for Microsoft its tenant) and its credential: the client \
                 secret in the referenced Secret, the certificate in certificateRef, or the service account \
                 key in serviceAccountKeyRef"
            }
            Reason::ClientSecretExpired => {
                "create a new client secret at the provider, add it first in \
                 clientAuthentication.clientSecretRefs"
            }
            Reason::IdentityMismatch => {
                "authorize again signed in as the account named in spec.mailbox (or list the other \
                 identity in spec.identityAliases if it is the same person's), then set \
                 mailoauth.io/reauthorize-requested to a new value"
            }
            Reason::IdentityUnverified => {
                "make the provider say who consented (ask for the openid and email scopes, or give the \
                 provider a userinfo endpoint), then set mailoauth.io/reauthorize-requested to a new value; \
                 or, if the mailbox's identity truly cannot be checked, set spec.identity: unchecked"
            }
            Reason::IssuerChanged => {
                "point the provider (or spec.providerRef) back at the issuer named in the message; or, to \
                 use the new one deliberately, set mailoauth.io/reauthorize-requested to a new value (a \
                 person consents again at the new issuer; the old grant is dropped then)"
            }
            Reason::AuthorizationExpired | Reason::AuthorizationDenied => {
                "set the mailoauth.io/reauthorize-requested annotation to a new value for a new code, and \
                 complete it in time (kubectl annotate mbx <name> mailoauth.io/reauthorize-requested=$(date +%s) --overwrite)"
            }
            Reason::ProviderNotFound => "create the provider or fix spec.providerRef",
            Reason::ProviderNotReady => "see the provider's Ready condition",
            Reason::ProviderNotAllowed => {
                "ask the cluster admin to allow this namespace, mailbox, alias, scope or grant in the \
                 provider's allowedNamespaces, allowedMailboxes or allowedScopes"
            }
            Reason::SecretConflict => "choose another spec.secretName",
            Reason::TokenEndpointUnavailable | Reason::Throttled => "nothing: the operator retries with backoff",
            Reason::Expired => "see the other conditions for why the token could not be renewed",
            Reason::GrantNotSupported => {
                "use the deviceCode, refreshToken or clientCredentials grant with this version"
            }
            Reason::ImportSecretNotFound => {
                "create the Secret named in spec.grant.refreshToken.secretRef with the refresh token"
            }
            Reason::ClientSecretNotFound => "create the Secret named in clientAuthentication.clientSecretRefs",
            Reason::EndpointsUnresolved => {
                "check generic.issuerUrl (it must serve /.well-known/openid-configuration or RFC 8414's \
                 /.well-known/oauth-authorization-server over https) or give tokenUrl explicitly"
            }
            Reason::ClientSecretExpiring => {
                "create a new client secret at the provider and add it first in clientSecretRefs"
            }
            Reason::TokenRequestFailed => {
                "check the provider's token endpoint and registration; the operator retries with backoff"
            }
            Reason::RequestRejected => {
                "allow this grant type for the client at the provider, or check the provider's \
                 endpoints and clientAuthentication.method; then set mailoauth.io/refresh-requested to a new value"
            }
            Reason::InvalidSpec => "correct the field named in the message",
            Reason::SecretReferenceNotAllowed => {
                "if this Secret is meant for the operator, label it mailoauth.io/allow-reference=true \
                 (kubectl label secret -n <namespace> <name> mailoauth.io/allow-reference=true)"
            }
            _ => "",
        }
    }

    /// A message: what happened, then the fix.
    pub fn message(self, what: impl fmt::Display) -> String {
        let fix = self.fix();
        if fix.is_empty() { what.to_string() } else { format!("{what}; fix: {fix}") }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_is_found_by_its_name_and_unknown_names_are_none() {
        for r in Reason::ALL {
            assert_eq!(Reason::parse(r.as_str()), Some(r));
        }
        assert_eq!(Reason::parse("Verified"), None);
        assert_eq!(Reason::parse(""), None);
        assert!(Reason::parse("ConsentRequired").is_some_and(|r| !r.fix().is_empty()));
    }
}
