//! API types of `mailoauth.io/v1alpha1`: the custom resources, their status and the names the
//! operator stamps on what it writes. Pure data: no I/O lives here.

pub mod binding;
pub mod common;
pub mod crds;
pub mod lenient;
pub mod provider;

pub use binding::{
    AuthorizationStatus, Grant, IdentityCheck, MailboxBinding, MailboxBindingSpec, MailboxBindingStatus, Phase,
    ProtocolCheck, ProviderKind, ProviderRef, RelaySpec, RelayStatus, SecretTemplate, TokenStatus, VerificationStatus,
    VerifySpec,
};
pub use common::{Condition, ConditionStatus, Protocol, SecretKeySelector, ServerAddress, ServerTls};
pub use provider::{
    AllowedNamespaces, ClientAuthMethod, ClientAuthentication, ClientSecretRef, ClusterMailProvider,
    ClusterMailProviderSpec, Endpoints, GenericPreset, GooglePreset, MailProvider, MailProviderSpec,
    MailProviderStatus, MicrosoftPreset, Preset, ProtocolScopes, ProtocolServers,
};

/// API group of every kind.
pub const GROUP: &str = "mailoauth.io";
/// Field manager for every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "mail-oauth-operator";
/// Label on everything the operator writes.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Value of [`MANAGED_BY_LABEL`].
pub const MANAGED_BY_VALUE: &str = "mail-oauth-operator";
/// Field manager of the verifier's status writes (`status.verification`, `MailboxVerified`):
/// its own, so that its applies and the binding reconcile's never remove each other's fields.
pub const VERIFY_FIELD_MANAGER: &str = "mail-oauth-operator-verify";
/// Annotation: any new value asks for a mailbox check now.
pub const VERIFY_REQUESTED_ANNOTATION: &str = "mailoauth.io/verify-requested";
/// Label naming the binding a written object belongs to.
pub const BINDING_LABEL: &str = "mailoauth.io/binding";
/// Label telling published Secrets from grant-state Secrets.
pub const SECRET_ROLE_LABEL: &str = "mailoauth.io/secret-role";
/// Annotation: any new value asks for a refresh now.
pub const REFRESH_REQUESTED_ANNOTATION: &str = "mailoauth.io/refresh-requested";
/// Annotation: any new value issues a new relay password (the previous one keeps working for
/// `spec.relay.rotationGracePeriod`).
pub const ROTATE_RELAY_PASSWORD_ANNOTATION: &str = "mailoauth.io/rotate-relay-password";
/// Annotation: any new value drops the grant and starts it again.
pub const REAUTHORIZE_REQUESTED_ANNOTATION: &str = "mailoauth.io/reauthorize-requested";
/// Label a Secret carries to be readable by reference from a `MailProvider` or `MailboxBinding`
/// when the operator runs with `--strict-secret-references` (the chart's default).
pub const ALLOW_REFERENCE_LABEL: &str = "mailoauth.io/allow-reference";
/// Annotation a person sets to the final redirect URL (or its `code=...&state=...`) of an
/// authorization code request when the browser cannot reach the operator; consumed once, then removed.
pub const AUTHORIZATION_RESPONSE_ANNOTATION: &str = "mailoauth.io/authorization-response";
/// Annotation listing the data keys the operator owns in a published Secret.
pub const OWNED_KEYS_ANNOTATION: &str = "mailoauth.io/owned-keys";
/// Annotation on a grant-state Secret: a digest of its data (SHA-256, never the data).
pub const GRANT_DIGEST_ANNOTATION: &str = "mailoauth.io/grant-digest";
/// Annotation on a grant-state Secret: a digest of what the grant was obtained for (the binding's
/// grant, the issuer's provider, client and token endpoint, the requested scopes).
pub const GRANT_FOR_ANNOTATION: &str = "mailoauth.io/grant-for";
/// Annotation on a published Secret: a digest of what it was made from (the grant-state digest
/// and the binding's and provider's publishing inputs).
pub const SOURCE_ANNOTATION: &str = "mailoauth.io/source";
