//! Test fixtures, for the unit tests and, with the `testing` feature, the scenario tests under
//! `tests/`: one fixture per kind with chained modifiers (`MailboxBinding::test().deleting()`,
//! `MailProvider::test().ready()`, `GrantState::test()`), one context (`Context::test(client)`),
//! the fixtures' clock, and [`apiserver`], the mocked API server the scenarios answer request by
//! request. Never in a release build; no production module imports it (`tests/layers.rs`).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

pub mod apiserver;

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::Client;
use kube::runtime::events::{Recorder, Reporter};

use crate::api::{
    ClientAuthentication, ClientSecretRef, Condition, ConditionStatus, GenericPreset, Grant, IdentityCheck,
    MailProvider, MailProviderSpec, MailProviderStatus, MailboxBinding, MailboxBindingSpec, MailboxBindingStatus,
    MicrosoftPreset, Phase, Preset, Protocol, ProviderKind, ProviderRef, RelaySpec, SecretKeySelector, TokenStatus,
};
use crate::controller::{
    AuthorizationSettings, ClientSecretCache, Clock, Context, NamespaceLabels, OwnWrites, PendingGrants, Polls,
    SystemClock, Written,
};
use crate::oauth::http::HttpClients;
use crate::policy::binding::{Outcome, conditions, next_status};
use crate::policy::grant_state::{GrantState, Issuer};
use crate::policy::reference::ReferencePolicy;

/// The fixtures' epoch, 2027-01-15T08:00:00Z: when [`GrantState::test`] was issued.
pub const EPOCH: i64 = 1_800_000_000;

/// `secs` seconds after [`EPOCH`].
pub fn t(secs: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(EPOCH + secs, 0).unwrap_or_default()
}

/// A clock stopped at one time.
#[derive(Clone, Copy, Debug)]
pub struct Fixed(pub DateTime<Utc>);

impl Clock for Fixed {
    fn now(&self) -> DateTime<Utc> {
        self.0
    }
}

/// The token endpoint [`MailProvider::test`] states.
pub const TOKEN_URL: &str = "https://idp.example.com/token";

impl MailboxBinding {
    /// A binding `ns/b` (uid `uid-b`, generation 1) of a client credentials grant at
    /// `MailProvider/idp` for `a@example.com` (IMAP and SMTP), published as `b-mail-token`; no
    /// status. Change it with the modifiers below: `MailboxBinding::test().grant(..).ready(..)`.
    pub fn test() -> Self {
        let spec = MailboxBindingSpec {
            provider_ref: ProviderRef { kind: ProviderKind::MailProvider, name: "idp".into() },
            mailbox: "a@example.com".into(),
            identity_aliases: Vec::new(),
            identity: IdentityCheck::Verified,
            protocols: vec![Protocol::Imap, Protocol::Smtp],
            scopes: Vec::new(),
            grant: Grant::ClientCredentials {},
            secret_name: "b-mail-token".into(),
            secret_template: None,
            refresh_before: None,
            revoke_on_delete: false,
            suspend: false,
            verify: None,
            relay: None,
        };
        let mut b = MailboxBinding::new("b", spec);
        b.metadata.namespace = Some("ns".into());
        b.metadata.uid = Some("uid-b".into());
        b.metadata.generation = Some(1);
        b
    }

    /// Named `name`: uid `uid-<name>`, published as `<name>-mail-token`.
    #[must_use]
    pub fn named(mut self, name: &str) -> Self {
        self.metadata.name = Some(name.into());
        self.metadata.uid = Some(format!("uid-{name}"));
        self.spec.secret_name = format!("{name}-mail-token");
        self
    }

    /// In namespace `namespace`.
    #[must_use]
    pub fn in_namespace(mut self, namespace: &str) -> Self {
        self.metadata.namespace = Some(namespace.into());
        self
    }

    /// With uid `uid`.
    #[must_use]
    pub fn with_uid(mut self, uid: &str) -> Self {
        self.metadata.uid = Some(uid.into());
        self
    }

    /// Of the `MailProvider` `name`.
    #[must_use]
    pub fn provider(mut self, name: &str) -> Self {
        self.spec.provider_ref = ProviderRef { kind: ProviderKind::MailProvider, name: name.into() };
        self
    }

    /// Of the `ClusterMailProvider` `name`.
    #[must_use]
    pub fn cluster_provider(mut self, name: &str) -> Self {
        self.spec.provider_ref = ProviderRef { kind: ProviderKind::ClusterMailProvider, name: name.into() };
        self
    }

    /// Obtaining its token by `grant`.
    #[must_use]
    pub fn grant(mut self, grant: Grant) -> Self {
        self.spec.grant = grant;
        self
    }

    /// Importing the refresh token in the key `key` of the Secret `secret` (the `refreshToken`
    /// grant).
    #[must_use]
    pub fn importing(self, secret: &str, key: &str) -> Self {
        self.grant(Grant::RefreshToken { secret_ref: SecretKeySelector { name: secret.into(), key: key.into() } })
    }

    /// For the mailbox `mailbox`.
    #[must_use]
    pub fn mailbox(mut self, mailbox: &str) -> Self {
        self.spec.mailbox = mailbox.into();
        self
    }

    /// Published as the Secret `name`.
    #[must_use]
    pub fn secret_name(mut self, name: &str) -> Self {
        self.spec.secret_name = name.into();
        self
    }

    /// For `protocols`.
    #[must_use]
    pub fn protocols(mut self, protocols: &[Protocol]) -> Self {
        self.spec.protocols = protocols.to_vec();
        self
    }

    /// Asking for `scopes` instead of the provider's.
    #[must_use]
    pub fn scopes(mut self, scopes: &[&str]) -> Self {
        self.spec.scopes = scopes.iter().map(|s| (*s).to_owned()).collect();
        self
    }

    /// Changes the spec with `change` (for the fields without a modifier of their own).
    #[must_use]
    pub fn spec_with(mut self, change: impl FnOnce(&mut MailboxBindingSpec)) -> Self {
        change(&mut self.spec);
        self
    }

    /// Carrying the annotation `key: value` (besides those it has).
    #[must_use]
    pub fn annotated(mut self, key: &str, value: &str) -> Self {
        self.metadata.annotations.get_or_insert_with(BTreeMap::new).insert(key.into(), value.into());
        self
    }

    /// At generation `generation`.
    #[must_use]
    pub fn generation(mut self, generation: i64) -> Self {
        self.metadata.generation = Some(generation);
        self
    }

    /// As read at `resourceVersion` `version`.
    #[must_use]
    pub fn at_version(mut self, version: &str) -> Self {
        self.metadata.resource_version = Some(version.into());
        self
    }

    /// Deleted at [`t`]`(0)`, held by the operator's finalizer.
    #[must_use]
    pub fn deleting(mut self) -> Self {
        self.metadata.deletion_timestamp =
            Some(Time(k8s_openapi::jiff::Timestamp::from_second(EPOCH).unwrap_or_default()));
        self.metadata.finalizers.get_or_insert_with(Vec::new).push(crate::controller::cleanup::FINALIZER.into());
        self
    }

    /// With relay credentials on (`spec.relay.enabled`).
    #[must_use]
    pub fn with_relay(self) -> Self {
        self.relay(RelaySpec { enabled: true, ..RelaySpec::default() })
    }

    /// With `spec.relay` = `relay`.
    #[must_use]
    pub fn relay(mut self, relay: RelaySpec) -> Self {
        self.spec.relay = Some(relay);
        self
    }

    /// With `status`.
    #[must_use]
    pub fn with_status(mut self, status: MailboxBindingStatus) -> Self {
        self.status = Some(status);
        self
    }

    /// Ready since [`t`]`(0)`: `Ready` and `Authorized` true, a token of scope `mail` for
    /// `a@example.com`, issued an hour before `expires_at`, renewed at `renew_at`.
    #[must_use]
    pub fn ready(self, expires_at: DateTime<Utc>, renew_at: DateTime<Utc>) -> Self {
        let generation = self.metadata.generation;
        let condition = |type_: &str, reason: &str| Condition {
            type_: type_.into(),
            status: ConditionStatus::True,
            reason: reason.into(),
            message: String::new(),
            last_transition_time: t(0),
            observed_generation: generation,
        };
        self.with_status(MailboxBindingStatus {
            phase: Some(Phase::Ready),
            conditions: vec![
                condition(conditions::READY, "TokenValid"),
                condition(conditions::AUTHORIZED, "Authorized"),
            ],
            token: Some(TokenStatus {
                issued_at: expires_at - Duration::hours(1),
                expires_at,
                renew_at,
                scopes: vec!["mail".into()],
            }),
            account: Some("a@example.com".into()),
            observed_generation: generation,
            ..MailboxBindingStatus::default()
        })
    }

    /// With the status the binding reconcile writes at `now` after obtaining `grant`.
    #[must_use]
    pub fn refreshed(mut self, now: DateTime<Utc>, grant: &GrantState) -> Self {
        self.status = Some(next_status(now, &self, Some(grant), &Outcome::Refreshed));
        self
    }
}

impl MailProvider {
    /// A generic provider `ns/idp` (generation 1, no status) with the token endpoint
    /// [`TOKEN_URL`], client `client`, and its client secret in the Secret `idp-oauth`
    /// (key `client-secret`).
    pub fn test() -> Self {
        let spec = MailProviderSpec {
            preset: Preset::Generic(Box::new(GenericPreset {
                token_url: Some(TOKEN_URL.into()),
                ..GenericPreset::default()
            })),
            client_id: "client".into(),
            client_authentication: Some(ClientAuthentication {
                client_secret_refs: vec![ClientSecretRef {
                    name: "idp-oauth".into(),
                    key: "client-secret".into(),
                    expires_at: None,
                }],
                ..ClientAuthentication::default()
            }),
            service_account_key_ref: None,
        };
        let mut p = MailProvider::new("idp", spec);
        p.metadata.namespace = Some("ns".into());
        p.metadata.generation = Some(1);
        p
    }

    /// Named `name`.
    #[must_use]
    pub fn named(mut self, name: &str) -> Self {
        self.metadata.name = Some(name.into());
        self
    }

    /// In namespace `namespace`.
    #[must_use]
    pub fn in_namespace(mut self, namespace: &str) -> Self {
        self.metadata.namespace = Some(namespace.into());
        self
    }

    /// The Microsoft preset for `tenant`.
    #[must_use]
    pub fn microsoft(mut self, tenant: &str) -> Self {
        self.spec.preset = Preset::Microsoft(MicrosoftPreset { tenant: tenant.into() });
        self
    }

    /// With client id `id`.
    #[must_use]
    pub fn client_id(mut self, id: &str) -> Self {
        self.spec.client_id = id.into();
        self
    }

    /// With its one client secret in the Secret `name` (key `client-secret`); `None`: a public
    /// client.
    #[must_use]
    pub fn client_secret(mut self, name: Option<&str>) -> Self {
        self.spec.client_authentication = name.map(|name| ClientAuthentication {
            client_secret_refs: vec![ClientSecretRef {
                name: name.into(),
                key: "client-secret".into(),
                expires_at: None,
            }],
            ..ClientAuthentication::default()
        });
        self
    }

    /// Ready since [`t`]`(0)`, with the endpoints known without discovery (the preset's, or the
    /// generic URLs).
    #[must_use]
    pub fn ready(mut self) -> Self {
        let generation = self.metadata.generation;
        self.status = Some(MailProviderStatus {
            conditions: vec![Condition {
                type_: "Ready".into(),
                status: ConditionStatus::True,
                reason: "ProviderReady".into(),
                message: String::new(),
                last_transition_time: t(0),
                observed_generation: generation,
            }],
            endpoints: crate::oauth::provider::static_endpoints(&self.spec),
            client_secret_expires_at: None,
            observed_generation: generation,
        });
        self
    }

    /// Changes the resolved endpoints in its status with `change` (after [`Self::ready`]).
    #[must_use]
    pub fn endpoints_with(mut self, change: impl FnOnce(&mut crate::api::Endpoints)) -> Self {
        if let Some(e) = self.status.as_mut().and_then(|s| s.endpoints.as_mut()) {
            change(e);
        }
        self
    }
}

impl GrantState {
    /// A delegated grant of `MailProvider/idp` (client `client`) for `a@example.com`, refresh
    /// token `rt`, access token `at` issued at [`t`]`(0)` (2027-01-15T08:00:00Z) for an hour,
    /// scope `mail`, bound to [`TOKEN_URL`]. Change what a test is about with struct update
    /// syntax: `GrantState { expires_at, ..GrantState::test() }`.
    pub fn test() -> Self {
        Self {
            refresh_token: Some("rt".to_owned().into()),
            previous_refresh_token: None,
            access_token: "at".to_owned().into(),
            token_type: "Bearer".into(),
            issued_at: t(0),
            expires_at: t(3600),
            scopes: vec!["mail".into()],
            requested_scopes: vec!["mail".into()],
            provider: "MailProvider/idp".into(),
            client_id: "client".into(),
            imported_from: None,
            mailbox: Some("a@example.com".into()),
            account: None,
            issuer: Some(Issuer { token_url: TOKEN_URL.into(), revocation_url: None, client_auth: "none".into() }),
            relay: None,
        }
    }
}

impl Context {
    /// A context for tests, over `client`: empty caches, the system clock, the HTTP token
    /// endpoint, every Secret readable, a rate of 100 requests per second, this replica leading,
    /// no owned-Secret cache (every Secret is read). Change what a test is about with struct
    /// update syntax: `Context { tokens, clock, ..Context::test(client) }`.
    pub fn test(client: Client) -> Self {
        let reporter = Reporter { controller: crate::api::FIELD_MANAGER.into(), instance: None };
        Self {
            client: client.clone(),
            tokens: Arc::new(crate::oauth::HttpTokenEndpoint::default()),
            http: HttpClients::default(),
            providers: kube::runtime::reflector::store().0,
            cluster_providers: kube::runtime::reflector::store().0,
            bindings: kube::runtime::reflector::store().0,
            cluster_namespace: "mail-oauth-operator".into(),
            recorder: Recorder::new(client, reporter.clone()),
            reporter,
            clock: Arc::new(SystemClock),
            pending: PendingGrants::default(),
            default_lifetime: Duration::hours(1),
            references: ReferencePolicy::default(),
            polls: Polls::default(),
            written: Written::default(),
            own_writes: OwnWrites::default(),
            owned: crate::controller::owned::OwnedSecrets::default(),
            namespace_labels: NamespaceLabels::default(),
            referable: crate::controller::versions::SecretVersions::default(),
            client_secrets: ClientSecretCache::default(),
            verify: crate::controller::verify::Nudges::default(),
            relay_keys: crate::controller::relay_key::RelayKeys::off(),
            authorization: AuthorizationSettings::default(),
            metrics: Arc::default(),
            limits: Arc::new(crate::controller::limits::RateLimits::new(100.0)),
            leader: crate::controller::leader::Leadership::always(),
        }
    }
}

/// The grant-state and published Secrets of `binding` as the operator writes them when it holds
/// `grant` from `provider` (digests included): what a binding at rest finds.
pub fn written_secrets(binding: &MailboxBinding, grant: &GrantState, provider: &MailProviderSpec) -> (Secret, Secret) {
    use crate::controller::secrets::{Role, desired, grant_secret_name};
    use crate::policy::at_rest;
    let name = binding.metadata.name.clone().unwrap_or_default();
    let servers = crate::oauth::provider::servers(provider);
    let data = crate::policy::publish::published_data(
        &binding.spec.mailbox,
        grant,
        &binding.spec.protocols,
        &servers,
        BTreeMap::new(),
        None,
    )
    .unwrap_or_default();
    let grant_secret = crate::controller::grant_store::grant_secret(binding, &grant_secret_name(&name), grant);
    let mut published = desired(binding, &binding.spec.secret_name, Role::Published, data);
    let source = at_rest::source(
        &at_rest::grant_digest(&grant.encode()),
        &crate::controller::binding::publish_inputs(binding, &servers),
    );
    published
        .metadata
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(crate::api::SOURCE_ANNOTATION.into(), source);
    (grant_secret, published)
}
