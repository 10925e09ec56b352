//! The operator's reconcilers against a real OAuth server (oidc-provider over TLS, discovered
//! through `issuerUrl` and trusted through `caBundle`), with Kubernetes replaced by an in-memory
//! API. Time is a manual clock, so renewals happen when the test says.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use chrono::{DateTime, Duration, Utc};
use kube::runtime::reflector::{Store, store, store::Writer};
use kube::runtime::watcher;
use mail_oauth_operator::api::{ClusterMailProvider, MailProvider, MailboxBinding, Phase};
use mail_oauth_operator::controller::{Clock, Context, binding, grant_store, provider};
use mail_oauth_operator::oauth::HttpTokenEndpoint;
use mail_oauth_operator::oauth::http::{HttpClients, OutboundPolicy};
use mail_oauth_operator::policy::reference::ReferencePolicy;
use serde_json::{Value, json};
use support::fake_api::FakeApi;
use support::oauth_server::OAuthServer;

const NS: &str = "mail";

struct ManualClock(Mutex<DateTime<Utc>>);

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.0.lock().expect("clock")
    }
}

struct Harness {
    api: FakeApi,
    ctx: Arc<Context>,
    clock: Arc<ManualClock>,
    server: OAuthServer,
    providers: Writer<MailProvider>,
    bindings: Writer<MailboxBinding>,
}

fn provider_path(name: &str) -> String {
    format!("/apis/mailoauth.io/v1alpha1/namespaces/{NS}/mailproviders/{name}")
}
fn binding_path(name: &str) -> String {
    format!("/apis/mailoauth.io/v1alpha1/namespaces/{NS}/mailboxbindings/{name}")
}
fn secret_path(name: &str) -> String {
    format!("/api/v1/namespaces/{NS}/secrets/{name}")
}

fn secret(name: &str, data: &[(&str, &str)]) -> Value {
    let data: BTreeMap<&str, String> = data.iter().map(|(k, v)| (*k, STANDARD.encode(v))).collect();
    json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": NS}, "data": data})
}

fn decode(secret: &Value, key: &str) -> Option<String> {
    let b64 = secret["data"][key].as_str()?;
    String::from_utf8(STANDARD.decode(b64).ok()?).ok()
}

fn context(
    api: &FakeApi,
    clock: &Arc<ManualClock>,
    providers: Store<MailProvider>,
    bindings: Store<MailboxBinding>,
    references: ReferencePolicy,
    rate: f64,
) -> Arc<Context> {
    let (cluster_store, _): (Store<ClusterMailProvider>, _) = store();
    // The test server listens on 127.0.0.1, which the default outbound policy refuses.
    let http = HttpClients::new(OutboundPolicy { allow_private: true });
    let client = api.client();
    Arc::new(Context {
        client: client.clone(),
        tokens: Arc::new(HttpTokenEndpoint::new(http.clone())),
        http,
        providers,
        cluster_providers: cluster_store,
        bindings,
        cluster_namespace: "mail-oauth-operator".into(),
        recorder: kube::runtime::events::Recorder::new(
            client,
            kube::runtime::events::Reporter { controller: "mail-oauth-operator".into(), instance: None },
        ),
        reporter: kube::runtime::events::Reporter { controller: "mail-oauth-operator".into(), instance: None },
        clock: Arc::clone(clock) as Arc<dyn Clock>,
        pending: Default::default(),
        default_lifetime: Duration::hours(1),
        references,
        polls: Default::default(),
        written: Default::default(),
        own_writes: Default::default(),
        owned: Default::default(),
        referable: Default::default(),
        client_secrets: Default::default(),
        verify: Default::default(),
        authorization: Default::default(),
        metrics: Default::default(),
        limits: Arc::new(mail_oauth_operator::controller::limits::RateLimits::new(rate)),
        leader: mail_oauth_operator::controller::leader::Leadership::always(),
    })
}

impl Harness {
    async fn start(access_ttl: u64) -> Self {
        Self::start_with(access_ttl, ReferencePolicy::Any).await
    }

    async fn start_with(access_ttl: u64, references: ReferencePolicy) -> Self {
        Self::start_on(OAuthServer::start(access_ttl).await, references)
    }

    fn start_on(server: OAuthServer, references: ReferencePolicy) -> Self {
        let api = FakeApi::default();
        let clock = Arc::new(ManualClock(Mutex::new(Utc::now())));
        let (provider_store, providers): (Store<MailProvider>, _) = store();
        let (binding_store, bindings) = store();
        let ctx = context(&api, &clock, provider_store, binding_store, references, 100.0);
        Self { api, ctx, clock, server, providers, bindings }
    }

    /// A new process: the same API and OAuth server, nothing kept in memory.
    fn restart(&mut self) {
        let providers = self.ctx.providers.clone();
        let bindings = self.ctx.bindings.clone();
        self.ctx = context(&self.api, &self.clock, providers, bindings, self.ctx.references, 100.0);
    }

    fn advance_to(&self, t: DateTime<Utc>) {
        *self.clock.0.lock().expect("clock") = t;
    }

    fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    /// Creates a generic provider for the test server and reconciles it until it is Ready.
    async fn provider(&mut self, name: &str, client_id: &str, secret_refs: Value, method: &str) -> MailProvider {
        let object = json!({
            "apiVersion": "mailoauth.io/v1alpha1", "kind": "MailProvider",
            "metadata": {"name": name, "namespace": NS, "uid": format!("uid-{name}"), "generation": 1},
            "spec": {
                "generic": {
                    "issuerUrl": self.server.issuer, "caBundle": self.server.ca_pem,
                    "scopes": {"imap": ["openid", "offline_access", "email", "mail"], "smtp": ["mail"]},
                    "servers": {"imap": {"host": "127.0.0.1", "port": 10143}}
                },
                "clientId": client_id,
                "clientAuthentication": {"clientSecretRefs": secret_refs, "method": method}
            }
        });
        self.api.put(&provider_path(name), object.clone());
        let p: MailProvider = serde_json::from_value(object).expect("provider");
        provider::reconcile(Arc::new(p), Arc::clone(&self.ctx)).await.expect("provider reconcile");
        let stored: MailProvider =
            serde_json::from_value(self.api.get(&provider_path(name)).expect("stored")).expect("provider parses");
        self.providers.apply_watcher_event(&watcher::Event::Apply(stored.clone()));
        stored
    }

    /// A provider for a public client (no client authentication), reconciled until Ready.
    async fn public_provider(&mut self, name: &str, client_id: &str) {
        let object = json!({
            "apiVersion": "mailoauth.io/v1alpha1", "kind": "MailProvider",
            "metadata": {"name": name, "namespace": NS, "uid": format!("uid-{name}"), "generation": 1},
            "spec": {
                "generic": {
                    "issuerUrl": self.server.issuer, "caBundle": self.server.ca_pem,
                    "scopes": {"imap": ["openid", "offline_access", "email", "mail"]},
                    "servers": {"imap": {"host": "127.0.0.1", "port": 10143}}
                },
                "clientId": client_id
            }
        });
        self.api.put(&provider_path(name), object.clone());
        let p: MailProvider = serde_json::from_value(object).expect("provider");
        provider::reconcile(Arc::new(p), Arc::clone(&self.ctx)).await.expect("provider reconcile");
        let stored: MailProvider =
            serde_json::from_value(self.api.get(&provider_path(name)).expect("stored")).expect("provider parses");
        self.providers.apply_watcher_event(&watcher::Event::Apply(stored));
    }

    /// Sets an annotation on the stored binding.
    fn annotate(&mut self, name: &str, key: &str, value: &str) {
        let mut object = self.api.get(&binding_path(name)).expect("binding");
        object["metadata"]["annotations"][key] = json!(value);
        self.api.put(&binding_path(name), object.clone());
        let b: MailboxBinding = serde_json::from_value(object).expect("binding");
        self.bindings.apply_watcher_event(&watcher::Event::Apply(b));
    }

    fn binding(&mut self, name: &str, grant: Value, scopes: Value) {
        let object = json!({
            "apiVersion": "mailoauth.io/v1alpha1", "kind": "MailboxBinding",
            "metadata": {"name": name, "namespace": NS, "uid": format!("uid-{name}"), "generation": 1,
                         "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"providerRef": {"name": "idp"}, "mailbox": "helpdesk@example.com", "protocols": ["imap"],
                     "scopes": scopes, "grant": grant, "secretName": format!("{name}-mail-token")}
        });
        self.api.put(&binding_path(name), object.clone());
        let b: MailboxBinding = serde_json::from_value(object).expect("binding");
        self.bindings.apply_watcher_event(&watcher::Event::Apply(b));
    }

    /// A provider for the server and a binding importing a freshly seeded refresh token; returns it.
    async fn import_binding(&mut self, name: &str) -> String {
        let seed = self.server.seed_refresh_token("helpdesk@example.com").await;
        self.api.put(&secret_path("client"), secret("client", &[("client-secret", "mail-app-secret")]));
        self.api.put(&secret_path("seed"), secret("seed", &[("refresh_token", &seed)]));
        self.provider("idp", "mail-app", json!([{"name": "client"}]), "clientSecretPost").await;
        self.binding(name, json!({"refreshToken": {"secretRef": {"name": "seed", "key": "refresh_token"}}}), json!([]));
        seed
    }

    /// Runs one reconcile of the binding as stored, and returns it as stored afterwards.
    async fn reconcile(&self, name: &str) -> MailboxBinding {
        let b: MailboxBinding =
            serde_json::from_value(self.api.get(&binding_path(name)).expect("binding")).expect("parse");
        binding::reconcile(Arc::new(b), Arc::clone(&self.ctx)).await.expect("binding reconcile");
        serde_json::from_value(self.api.get(&binding_path(name)).expect("binding")).expect("parse")
    }

    fn published(&self, name: &str) -> Value {
        self.api.get(&secret_path(&format!("{name}-mail-token"))).expect("published Secret")
    }

    fn stored_refresh_token(&self, name: &str) -> String {
        let grant = self.api.get(&secret_path(&format!("{name}.mailoauth-grant"))).expect("grant Secret");
        decode(&grant, "refresh_token").expect("refresh_token")
    }
}

fn condition<'a>(b: &'a MailboxBinding, type_: &str) -> &'a mail_oauth_operator::api::Condition {
    b.status.as_ref().and_then(|s| s.conditions.iter().find(|c| c.type_ == type_)).expect("condition")
}

#[tokio::test]
async fn a_server_without_openid_connect_discovery_is_found_through_its_rfc8414_metadata() {
    let server = OAuthServer::start_with(3600, &[("DISCOVERY", "rfc8414")]).await;
    let mut h = Harness::start_on(server, ReferencePolicy::Any);
    h.api.put(&secret_path("idp-client"), secret("idp-client", &[("client-secret", "mail-app-secret")]));
    let p = h.provider("idp", "mail-app", json!([{"name": "idp-client"}]), "clientSecretPost").await;
    let status = p.status.as_ref().expect("status");
    assert_eq!(status.conditions[0].reason, "ProviderReady", "{:?}", status.conditions);
    let endpoints = status.endpoints.clone().expect("endpoints discovered");
    assert_eq!(endpoints.token, Some(format!("{}/token", h.server.issuer)));
    h.binding("app", json!({"clientCredentials": {}}), json!(["mail"]));
    let b = h.reconcile("app").await;
    assert_eq!(b.status.as_ref().and_then(|s| s.phase), Some(Phase::Ready), "{:?}", b.status);
}

#[tokio::test]
async fn client_credentials_publish_a_token_from_a_discovered_provider_over_its_ca_bundle() {
    let mut h = Harness::start(3600).await;
    h.api.put(&secret_path("idp-client"), secret("idp-client", &[("client-secret", "mail-app-secret")]));
    let p = h.provider("idp", "mail-app", json!([{"name": "idp-client"}]), "clientSecretPost").await;
    let endpoints = p.status.as_ref().and_then(|s| s.endpoints.clone()).expect("endpoints discovered");
    assert_eq!(endpoints.token, Some(format!("{}/token", h.server.issuer)));

    h.binding("app", json!({"clientCredentials": {}}), json!(["mail"]));
    let b = h.reconcile("app").await;
    let status = b.status.as_ref().expect("status");
    assert_eq!(status.phase, Some(Phase::Ready));
    assert_eq!(condition(&b, "Ready").reason, "TokenValid");
    let published = h.published("app");
    let token = decode(&published, "access_token").expect("access_token");
    assert!(!token.is_empty());
    let sasl = STANDARD.decode(decode(&published, "xoauth2").expect("xoauth2")).expect("base64");
    assert_eq!(sasl, format!("user=helpdesk@example.com\x01auth=Bearer {token}\x01\x01").into_bytes());
    assert_eq!(decode(&published, "imap_host").as_deref(), Some("127.0.0.1"));
    assert_eq!(h.server.grants("client_credentials").await, 1);
    let expires = status.token.as_ref().expect("token").expires_at;
    assert!((expires - (h.now() + Duration::hours(1))).num_seconds().abs() <= 1, "{expires}");

    // Nothing is due: another reconcile asks the server for nothing and writes nothing.
    let writes = h.api.writes().len();
    h.reconcile("app").await;
    assert_eq!(h.server.token_requests().await, 1);
    assert_eq!(h.api.writes().len(), writes, "{:?}", &h.api.writes()[writes..]);
}

#[tokio::test]
async fn client_secret_basic_falls_back_to_the_next_secret_when_the_first_is_rejected() {
    let mut h = Harness::start(3600).await;
    h.api.put(&secret_path("old"), secret("old", &[("client-secret", "revoked-secret")]));
    h.api.put(&secret_path("new"), secret("new", &[("client-secret", "mail-app-basic-secret")]));
    h.provider("idp", "mail-app-basic", json!([{"name": "old"}, {"name": "new"}]), "clientSecretBasic").await;
    h.binding("app", json!({"clientCredentials": {}}), json!(["mail"]));
    let b = h.reconcile("app").await;
    assert_eq!(b.status.as_ref().and_then(|s| s.phase), Some(Phase::Ready));
    assert_eq!(h.server.token_requests().await, 2, "the rejected secret, then the working one");
}

#[tokio::test]
async fn a_wrong_client_secret_is_reported_as_invalid_credentials_and_not_retried() {
    let mut h = Harness::start(3600).await;
    h.api.put(&secret_path("idp-client"), secret("idp-client", &[("client-secret", "wrong")]));
    h.provider("idp", "mail-app", json!([{"name": "idp-client"}]), "clientSecretPost").await;
    h.binding("app", json!({"clientCredentials": {}}), json!(["mail"]));
    let b = h.reconcile("app").await;
    let authorized = condition(&b, "Authorized");
    assert_eq!(authorized.reason, "ClientCredentialsInvalid");
    assert!(authorized.message.contains("invalid_client"), "{}", authorized.message);
    assert!(!authorized.message.contains("wrong"), "the secret never shows: {}", authorized.message);
    assert_eq!(condition(&b, "Ready").status, mail_oauth_operator::api::ConditionStatus::False);
    let before = h.server.token_requests().await;
    h.advance_to(h.now() + Duration::minutes(30));
    h.reconcile("app").await;
    assert_eq!(h.server.token_requests().await, before, "a permanent failure waits for a change");
}

#[tokio::test]
async fn an_imported_refresh_token_is_used_once_and_every_rotation_is_kept() {
    let mut h = Harness::start(600).await;
    let seed = h.import_binding("helpdesk").await;

    let mut b = h.reconcile("helpdesk").await;
    let mut previous_rt = seed.clone();
    let mut previous_at = decode(&h.published("helpdesk"), "access_token").expect("token");
    for round in 1..=3 {
        let rt = h.stored_refresh_token("helpdesk");
        assert_ne!(rt, previous_rt, "round {round}: the rotated refresh token was stored");
        let renew_at = b.status.as_ref().and_then(|s| s.token.as_ref()).expect("token status").renew_at;
        assert!(renew_at > h.now(), "renewal is in the future");
        h.advance_to(renew_at + Duration::seconds(1));
        b = h.reconcile("helpdesk").await;
        assert_eq!(b.status.as_ref().and_then(|s| s.phase), Some(Phase::Ready), "round {round}");
        let at = decode(&h.published("helpdesk"), "access_token").expect("token");
        assert_ne!(at, previous_at, "round {round}: a new access token was published");
        previous_at = at;
        previous_rt = rt;
    }
    assert_eq!(h.server.grants("refresh_token").await, 4, "one import and three renewals, nothing lost");

    // The imported copy is dead at the server; replaying it revokes the whole grant, so any
    // earlier use of a stale token by the operator would have failed the rounds above.
    let replay = h.server.refresh_directly(&seed).await;
    assert_eq!(replay["error"], "invalid_grant");
}

#[tokio::test]
async fn a_revoked_grant_needs_reauthorization_and_the_valid_token_stays_published_until_expiry() {
    let mut h = Harness::start(600).await;
    h.import_binding("helpdesk").await;
    let b = h.reconcile("helpdesk").await;
    let token = b.status.as_ref().and_then(|s| s.token.clone()).expect("token");
    let published_before = decode(&h.published("helpdesk"), "access_token");

    h.server.revoke(&h.stored_refresh_token("helpdesk")).await;
    h.advance_to(token.renew_at + Duration::seconds(1));
    let b = h.reconcile("helpdesk").await;
    let status = b.status.as_ref().expect("status");
    assert_eq!(status.phase, Some(Phase::ReauthorizationRequired));
    assert_eq!(condition(&b, "Authorized").reason, "ReauthorizationRequired");
    assert_eq!(condition(&b, "Ready").reason, "TokenValid", "the current token still works");
    assert_eq!(decode(&h.published("helpdesk"), "access_token"), published_before, "left in place");

    // No hammering: later reconciles before expiry ask the server nothing.
    let requests = h.server.token_requests().await;
    h.advance_to(token.renew_at + Duration::seconds(60));
    h.reconcile("helpdesk").await;
    assert_eq!(h.server.token_requests().await, requests);

    // After expiry the binding is not Ready; the Secret is not deleted.
    h.advance_to(token.expires_at + Duration::seconds(1));
    let b = h.reconcile("helpdesk").await;
    assert_eq!(condition(&b, "Ready").reason, "Expired");
    assert_eq!(b.status.as_ref().and_then(|s| s.phase), Some(Phase::ReauthorizationRequired));
    assert_eq!(decode(&h.published("helpdesk"), "access_token"), published_before);
    assert_eq!(h.server.token_requests().await, requests);
}

#[tokio::test]
async fn a_deleted_or_edited_published_secret_is_restored_without_a_token_request() {
    let mut h = Harness::start(3600).await;
    h.api.put(&secret_path("idp-client"), secret("idp-client", &[("client-secret", "mail-app-secret")]));
    h.provider("idp", "mail-app", json!([{"name": "idp-client"}]), "clientSecretPost").await;
    h.binding("app", json!({"clientCredentials": {}}), json!(["mail"]));
    h.reconcile("app").await;
    let original = h.published("app");
    let token = decode(&original, "access_token");

    h.api.delete(&secret_path("app-mail-token"));
    h.reconcile("app").await;
    assert_eq!(decode(&h.published("app"), "access_token"), token, "restored from the grant state");

    let mut edited = h.published("app");
    edited["data"]["access_token"] = json!(STANDARD.encode("tampered"));
    edited["data"]["added-by-someone"] = json!(STANDARD.encode("keep me"));
    h.api.put(&secret_path("app-mail-token"), edited);
    h.reconcile("app").await;
    let restored = h.published("app");
    assert_eq!(decode(&restored, "access_token"), token);
    assert_eq!(decode(&restored, "added-by-someone").as_deref(), Some("keep me"));
    assert_eq!(h.server.token_requests().await, 1);
}

#[tokio::test]
async fn a_refused_refresh_token_falls_back_to_the_one_it_replaced_where_the_provider_keeps_it_valid() {
    // mail-app-stable does not rotate, as Google does not; Microsoft rotates but keeps replaced
    // tokens valid. Either way the replaced token still works when the current copy does not.
    let mut h = Harness::start(600).await;
    let seed = h.server.seed_refresh_token_for("helpdesk@example.com", "mail-app-stable").await;
    h.api.put(&secret_path("client"), secret("client", &[("client-secret", "mail-app-stable-secret")]));
    h.api.put(&secret_path("seed"), secret("seed", &[("refresh_token", &seed)]));
    h.provider("idp", "mail-app-stable", json!([{"name": "client"}]), "clientSecretPost").await;
    h.binding("helpdesk", json!({"refreshToken": {"secretRef": {"name": "seed", "key": "refresh_token"}}}), json!([]));
    let b = h.reconcile("helpdesk").await;
    assert_eq!(b.status.as_ref().and_then(|s| s.phase), Some(Phase::Ready));

    // The stored copy is damaged; the one it replaced is kept beside it.
    let path = secret_path("helpdesk.mailoauth-grant");
    let mut grant = h.api.get(&path).expect("grant Secret");
    grant["data"]["refresh_token"] = json!(STANDARD.encode("damaged-copy"));
    grant["data"]["previous_refresh_token"] = json!(STANDARD.encode(&seed));
    h.api.put(&path, grant);

    let renew_at = b.status.as_ref().and_then(|s| s.token.as_ref()).expect("token").renew_at;
    h.advance_to(renew_at + Duration::seconds(1));
    let before = h.server.token_requests().await;
    let b = h.reconcile("helpdesk").await;
    assert_eq!(b.status.as_ref().and_then(|s| s.phase), Some(Phase::Ready), "{:?}", b.status);
    assert_eq!(condition(&b, "RefreshFailing").reason, "RefreshSucceeded");
    assert_eq!(h.server.token_requests().await, before + 2, "the damaged copy, then the replaced token");
    assert_eq!(h.stored_refresh_token("helpdesk"), seed, "the working token is stored again");
}

#[tokio::test]
async fn a_rotated_refresh_token_is_stored_with_the_one_it_replaced() {
    let mut h = Harness::start(600).await;
    let seed = h.import_binding("helpdesk").await;
    h.reconcile("helpdesk").await;
    let grant = h.api.get(&secret_path("helpdesk.mailoauth-grant")).expect("grant Secret");
    assert_ne!(decode(&grant, "refresh_token").as_deref(), Some(seed.as_str()), "rotated");
    assert_eq!(decode(&grant, "previous_refresh_token"), Some(seed));
}

#[tokio::test]
async fn in_strict_mode_an_unlabelled_secret_is_never_sent_and_labelling_it_lets_the_binding_proceed() {
    let mut h = Harness::start_with(600, ReferencePolicy::Labelled).await;
    h.api.put(&secret_path("idp-client"), secret("idp-client", &[("client-secret", "mail-app-secret")]));
    let p = h.provider("idp", "mail-app", json!([{"name": "idp-client"}]), "clientSecretPost").await;
    let ready = p.status.as_ref().and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready")).expect("Ready");
    assert_eq!(ready.reason, "SecretReferenceNotAllowed");
    assert!(ready.message.contains("Secret mail/idp-client is not labelled mailoauth.io/allow-reference=true"));

    // Even with the provider somehow marked ready, the binding reads nothing it may not.
    let mut labelled = secret("idp-client", &[("client-secret", "mail-app-secret")]);
    labelled["metadata"]["labels"] = json!({"mailoauth.io/allow-reference": "true"});
    h.api.put(&secret_path("idp-client"), labelled);
    h.provider("idp", "mail-app", json!([{"name": "idp-client"}]), "clientSecretPost").await;
    let seed = h.server.seed_refresh_token("helpdesk@example.com").await;
    h.api.put(&secret_path("seed"), secret("seed", &[("refresh_token", &seed)]));
    h.binding("helpdesk", json!({"refreshToken": {"secretRef": {"name": "seed", "key": "refresh_token"}}}), json!([]));
    let b = h.reconcile("helpdesk").await;
    let failing = condition(&b, "RefreshFailing");
    assert_eq!(failing.reason, "SecretReferenceNotAllowed");
    assert!(failing.message.contains("Secret mail/seed is not labelled"), "{}", failing.message);
    assert_eq!(failing.message.matches("fix:").count(), 1, "{}", failing.message);
    assert_eq!(h.server.token_requests().await, 0, "nothing was sent anywhere");

    let mut seed_secret = secret("seed", &[("refresh_token", &seed)]);
    seed_secret["metadata"]["labels"] = json!({"mailoauth.io/allow-reference": "true"});
    h.api.put(&secret_path("seed"), seed_secret);
    h.advance_to(h.now() + Duration::minutes(5));
    let b = h.reconcile("helpdesk").await;
    assert_eq!(b.status.as_ref().and_then(|s| s.phase), Some(Phase::Ready), "{:?}", b.status);
}

fn authorization(b: &MailboxBinding) -> mail_oauth_operator::api::AuthorizationStatus {
    b.status.as_ref().and_then(|s| s.authorization.clone()).expect("status.authorization")
}

#[tokio::test]
async fn a_device_code_is_shown_polled_at_its_interval_and_once_approved_the_binding_is_ready_and_refreshes() {
    let mut h = Harness::start(600).await;
    h.public_provider("idp", "mail-device").await;
    h.binding("desk", json!({"deviceCode": {}}), json!([]));
    set_mailbox(&mut h, "desk", "desk@example.com", &[]);

    let b = h.reconcile("desk").await;
    assert_eq!(b.status.as_ref().and_then(|s| s.phase), Some(Phase::AwaitingAuthorization));
    let shown = authorization(&b);
    let code = shown.user_code.clone().expect("user code");
    assert_eq!(shown.method, "deviceCode");
    assert_eq!(shown.verification_uri.as_deref(), Some(format!("{}/device", h.server.issuer).as_str()));
    let ready = condition(&b, "Ready");
    assert_eq!(ready.reason, "AwaitingAuthorization");
    assert!(ready.message.contains(&code) && ready.message.contains("/device"), "{}", ready.message);
    assert_eq!((h.server.count("device_codes").await, h.server.count("device_polls").await), (1, 0));
    let grant = h.api.get(&secret_path("desk.mailoauth-grant")).expect("the pending code is stored");
    assert!(decode(&grant, "pending_device_code").is_some());

    // No poll before the interval; a poll after it, answered authorization_pending.
    h.advance_to(h.now() + Duration::seconds(2));
    h.reconcile("desk").await;
    assert_eq!(h.server.count("device_polls").await, 0, "polled before the interval");
    h.advance_to(h.now() + Duration::seconds(3));
    let b = h.reconcile("desk").await;
    assert_eq!(h.server.count("device_polls").await, 1);
    assert_eq!(b.status.as_ref().and_then(|s| s.phase), Some(Phase::AwaitingAuthorization));
    let writes = h.api.writes().len();

    // slow_down: the interval grows by 5 s and is stored; polls wait for it.
    h.server.slow_down(1).await;
    h.advance_to(h.now() + Duration::seconds(5));
    h.reconcile("desk").await;
    assert_eq!(h.server.count("device_polls").await, 2);
    let grant = h.api.get(&secret_path("desk.mailoauth-grant")).expect("grant");
    assert_eq!(decode(&grant, "pending_interval").as_deref(), Some("10"));
    assert!(h.api.writes().len() > writes, "the new interval was written");
    h.advance_to(h.now() + Duration::seconds(5));
    h.reconcile("desk").await;
    assert_eq!(h.server.count("device_polls").await, 2, "slow_down is honoured");

    // A restart in the middle: the stored code is polled again at once.
    h.restart();
    h.server.approve_device(&code, "desk@example.com").await;
    let b = h.reconcile("desk").await;
    assert_eq!(h.server.count("device_polls").await, 3);
    assert_eq!(b.status.as_ref().and_then(|s| s.phase), Some(Phase::Ready), "{:?}", b.status);
    assert!(b.status.as_ref().and_then(|s| s.authorization.as_ref()).is_none(), "nothing left to do for a person");
    assert_eq!(condition(&b, "Authorized").reason, "Authorized");
    assert_eq!(b.status.as_ref().and_then(|s| s.account.as_deref()), Some("desk@example.com"), "identity vouched for");
    let grant = h.api.get(&secret_path("desk.mailoauth-grant")).expect("grant");
    assert!(decode(&grant, "refresh_token").is_some(), "the device grant gave a refresh token");
    assert!(decode(&grant, "pending_device_code").is_none(), "the spent device code is gone");
    let token = decode(&h.published("desk"), "access_token").expect("published");
    assert!(!token.is_empty());

    // From now on it is an ordinary refresh, with the refresh token the device grant gave.
    let renew_at = b.status.as_ref().and_then(|s| s.token.as_ref()).expect("token").renew_at;
    h.advance_to(renew_at + Duration::seconds(1));
    let b = h.reconcile("desk").await;
    assert_eq!(b.status.as_ref().and_then(|s| s.phase), Some(Phase::Ready));
    assert_eq!(h.server.grants("refresh_token").await, 1);
    assert_ne!(decode(&h.published("desk"), "access_token"), Some(token));
    assert_eq!(h.server.count("device_codes").await, 1, "one code in all");
}

#[tokio::test]
async fn a_declined_or_expired_device_code_waits_for_a_reauthorize_request_and_then_starts_a_new_code() {
    let mut h = Harness::start(600).await;
    h.public_provider("idp", "mail-device").await;
    h.binding("desk", json!({"deviceCode": {}}), json!([]));
    let b = h.reconcile("desk").await;
    let first = authorization(&b).user_code.expect("code");

    h.server.deny_device(&first).await;
    h.advance_to(h.now() + Duration::seconds(5));
    let b = h.reconcile("desk").await;
    assert_eq!(condition(&b, "Authorized").reason, "AuthorizationDenied");
    assert!(condition(&b, "Authorized").message.contains("reauthorize-requested"));
    let (codes, polls) = (h.server.count("device_codes").await, h.server.count("device_polls").await);
    h.advance_to(h.now() + Duration::minutes(30));
    h.reconcile("desk").await;
    assert_eq!(
        (h.server.count("device_codes").await, h.server.count("device_polls").await),
        (codes, polls),
        "a declined code is not polled again and no new code is started unasked"
    );

    h.annotate("desk", "mailoauth.io/reauthorize-requested", "1");
    let b = h.reconcile("desk").await;
    let second = authorization(&b).user_code.expect("a new code");
    assert_ne!(second, first);
    assert_eq!(b.status.as_ref().and_then(|s| s.phase), Some(Phase::AwaitingAuthorization));

    // Nobody enters it: once it expires the binding says so and asks for nothing more.
    let expires = authorization(&b).expires_at.expect("expiry");
    h.advance_to(expires + Duration::seconds(1));
    let b = h.reconcile("desk").await;
    assert_eq!(condition(&b, "Authorized").reason, "AuthorizationExpired");
    assert!(condition(&b, "Authorized").message.contains(&second));
    let codes = h.server.count("device_codes").await;
    for _ in 0..3 {
        h.advance_to(h.now() + Duration::minutes(20));
        h.reconcile("desk").await;
    }
    assert_eq!(h.server.count("device_codes").await, codes, "no endless series of codes nobody reads");
}

#[tokio::test]
async fn a_confidential_client_authenticates_its_device_requests() {
    let mut h = Harness::start(600).await;
    h.api.put(&secret_path("client"), secret("client", &[("client-secret", "mail-app-secret")]));
    h.provider("idp", "mail-app", json!([{"name": "client"}]), "clientSecretPost").await;
    h.binding("desk", json!({"deviceCode": {}}), json!([]));
    let b = h.reconcile("desk").await;
    let code = authorization(&b).user_code.expect("code");
    h.server.approve_device(&code, "helpdesk@example.com").await;
    h.advance_to(h.now() + Duration::seconds(5));
    let b = h.reconcile("desk").await;
    assert_eq!(b.status.as_ref().and_then(|s| s.phase), Some(Phase::Ready), "{:?}", b.status);
}

/// Changes the stored binding's mailbox and identity aliases.
fn set_mailbox(h: &mut Harness, name: &str, mailbox: &str, aliases: &[&str]) {
    let mut object = h.api.get(&binding_path(name)).expect("binding");
    object["spec"]["mailbox"] = json!(mailbox);
    object["spec"]["identityAliases"] = json!(aliases);
    h.api.put(&binding_path(name), object.clone());
    let b: MailboxBinding = serde_json::from_value(object).expect("binding");
    h.bindings.apply_watcher_event(&watcher::Event::Apply(b));
}

#[tokio::test]
async fn a_person_who_signs_in_as_someone_else_gets_nothing_stored_and_an_identity_mismatch() {
    let mut h = Harness::start(600).await;
    h.public_provider("idp", "mail-device").await;
    h.binding("desk", json!({"deviceCode": {}}), json!([]));
    set_mailbox(&mut h, "desk", "desk@example.com", &[]);
    let b = h.reconcile("desk").await;
    let code = authorization(&b).user_code.expect("code");
    h.server.approve_device(&code, "mallory@example.com").await;
    h.advance_to(h.now() + Duration::seconds(5));
    let b = h.reconcile("desk").await;
    let authorized = condition(&b, "Authorized");
    assert_eq!(authorized.reason, "IdentityMismatch");
    assert!(
        authorized.message.contains("mallory@example.com") && authorized.message.contains("desk@example.com"),
        "{}",
        authorized.message
    );
    let grant = h.api.get(&secret_path("desk.mailoauth-grant")).expect("grant");
    assert_eq!(decode(&grant, "refresh_token"), None, "nothing stored");
    assert!(h.api.get(&secret_path("desk-mail-token")).is_none(), "nothing published");
    assert_eq!(b.status.as_ref().and_then(|s| s.account.as_deref()), None);

    // The same person under a declared alias is accepted.
    set_mailbox(&mut h, "desk", "desk@example.com", &["shared-desk@example.com"]);
    h.annotate("desk", "mailoauth.io/reauthorize-requested", "1");
    let b = h.reconcile("desk").await;
    let code = authorization(&b).user_code.expect("a new code");
    h.server.approve_device(&code, "Shared-Desk@example.com").await;
    h.advance_to(h.now() + Duration::seconds(5));
    let b = h.reconcile("desk").await;
    assert_eq!(b.status.as_ref().and_then(|s| s.phase), Some(Phase::Ready), "{:?}", b.status);
    assert_eq!(b.status.as_ref().and_then(|s| s.account.as_deref()), Some("Shared-Desk@example.com"));
}

#[tokio::test]
async fn an_authorization_code_pasted_back_is_exchanged_once_with_pkce_and_the_binding_turns_ready() {
    let mut h = Harness::start(600).await;
    h.public_provider("idp", "mail-device").await;
    h.binding("desk", json!({"authorizationCode": {}}), json!([]));
    set_mailbox(&mut h, "desk", "desk@example.com", &[]);

    let b = h.reconcile("desk").await;
    assert_eq!(b.status.as_ref().and_then(|s| s.phase), Some(Phase::AwaitingAuthorization));
    let shown = authorization(&b);
    assert_eq!(shown.method, "authorizationCode");
    let url = shown.url.clone().expect("the provider URL, for the paste path");
    assert!(url.starts_with(&format!("{}/auth?", h.server.issuer)), "{url}");
    assert!(url.contains("code_challenge_method=S256") && url.contains("login_hint=desk%40example.com"), "{url}");
    assert!(url.contains("redirect_uri=http%3A%2F%2Flocalhost%3A8400%2Fcallback"), "{url}");
    assert!(shown.expires_at.is_some());
    assert!(condition(&b, "Ready").message.contains("mailoauth.io/authorization-response"));

    // A person signs in; the browser lands on the loopback redirect, which nothing serves: the
    // person copies its address into the annotation.
    let landed = h.server.browse(&url, None, false).await;
    assert!(landed.starts_with("http://localhost:8400/callback?code="), "{landed}");
    h.annotate("desk", "mailoauth.io/authorization-response", &landed);
    let b = h.reconcile("desk").await;
    assert_eq!(b.status.as_ref().and_then(|s| s.phase), Some(Phase::Ready), "{:?}", b.status);
    assert_eq!(b.status.as_ref().and_then(|s| s.account.as_deref()), Some("desk@example.com"));
    assert_eq!(h.server.grants("authorization_code").await, 1);
    let grant = h.api.get(&secret_path("desk.mailoauth-grant")).expect("grant");
    assert!(decode(&grant, "refresh_token").is_some());
    assert!(decode(&grant, "pending_code_verifier").is_none(), "the spent request is gone");
    assert!(
        h.api.writes().iter().any(|w| w == &format!("PATCH {}", binding_path("desk"))),
        "the pasted response was removed from the binding"
    );

    // The same response again (replayed) answers no request: nothing is sent, nothing changes.
    h.reauthorize_and_paste_old(&landed).await;
}

impl Harness {
    /// After a reauthorize request, pastes a response of the previous request: it must be refused
    /// without a token request.
    async fn reauthorize_and_paste_old(&mut self, old: &str) {
        self.annotate("desk", "mailoauth.io/reauthorize-requested", "1");
        let b = self.reconcile("desk").await;
        assert_eq!(b.status.as_ref().and_then(|s| s.phase), Some(Phase::AwaitingAuthorization));
        let requests = self.server.token_requests().await;
        self.annotate("desk", "mailoauth.io/authorization-response", old);
        let b = self.reconcile("desk").await;
        assert_eq!(condition(&b, "Authorized").reason, "AuthorizationExpired", "{:?}", b.status);
        assert!(
            condition(&b, "Authorized").message.contains("state differs"),
            "{}",
            condition(&b, "Authorized").message
        );
        assert_eq!(self.server.token_requests().await, requests, "a replayed state is refused before any request");
    }
}

#[tokio::test]
async fn a_confidential_client_gets_a_code_for_the_right_person_and_a_declined_consent_says_so() {
    let mut h = Harness::start(600).await;
    h.api.put(&secret_path("client"), secret("client", &[("client-secret", "mail-web-secret")]));
    h.provider("idp", "mail-web", json!([{"name": "client"}]), "clientSecretPost").await;
    h.binding("desk", json!({"authorizationCode": {}}), json!([]));

    let b = h.reconcile("desk").await;
    let url = authorization(&b).url.expect("url");
    let landed = h.server.browse(&url, None, true).await;
    assert!(landed.contains("error=access_denied"), "{landed}");
    h.annotate("desk", "mailoauth.io/authorization-response", &landed);
    let b = h.reconcile("desk").await;
    assert_eq!(condition(&b, "Authorized").reason, "AuthorizationDenied");

    // Someone signs in as another account: nothing is stored.
    h.annotate("desk", "mailoauth.io/reauthorize-requested", "1");
    let b = h.reconcile("desk").await;
    let url = authorization(&b).url.expect("url");
    let landed = h.server.browse(&url, Some("mallory@example.com"), false).await;
    h.annotate("desk", "mailoauth.io/authorization-response", &landed);
    let b = h.reconcile("desk").await;
    assert_eq!(condition(&b, "Authorized").reason, "IdentityMismatch", "{:?}", b.status);
    let grant = h.api.get(&secret_path("desk.mailoauth-grant")).expect("grant");
    assert_eq!(decode(&grant, "refresh_token"), None);

    // The right person: Ready, and renewals use the refresh token the code gave.
    h.annotate("desk", "mailoauth.io/reauthorize-requested", "2");
    let b = h.reconcile("desk").await;
    let url = authorization(&b).url.expect("url");
    let landed = h.server.browse(&url, None, false).await;
    h.annotate("desk", "mailoauth.io/authorization-response", &landed);
    let b = h.reconcile("desk").await;
    assert_eq!(b.status.as_ref().and_then(|s| s.phase), Some(Phase::Ready), "{:?}", b.status);
    let renew_at = b.status.as_ref().and_then(|s| s.token.as_ref()).expect("token").renew_at;
    h.advance_to(renew_at + Duration::seconds(1));
    let b = h.reconcile("desk").await;
    assert_eq!(condition(&b, "RefreshFailing").reason, "RefreshSucceeded");
    assert_eq!(h.server.grants("refresh_token").await, 1);
}

#[tokio::test]
async fn a_client_authenticated_by_a_certificate_signs_an_assertion_the_server_accepts() {
    let mut h = Harness::start(600).await;
    let mut cert = secret("cert", &[("tls.crt", &h.server.client_cert_pem), ("tls.key", &h.server.client_key_pem)]);
    cert["type"] = json!("kubernetes.io/tls");
    h.api.put(&secret_path("cert"), cert);
    let object = json!({
        "apiVersion": "mailoauth.io/v1alpha1", "kind": "MailProvider",
        "metadata": {"name": "idp", "namespace": NS, "uid": "uid-idp", "generation": 1},
        "spec": {
            "generic": {"issuerUrl": h.server.issuer, "caBundle": h.server.ca_pem, "scopes": {"imap": ["mail"]}},
            "clientId": "mail-cert",
            "clientAuthentication": {"method": "privateKeyJwt", "certificateRef": {"name": "cert"}}
        }
    });
    h.api.put(&provider_path("idp"), object.clone());
    let p: MailProvider = serde_json::from_value(object).expect("provider");
    provider::reconcile(Arc::new(p), Arc::clone(&h.ctx)).await.expect("provider reconcile");
    let stored: MailProvider =
        serde_json::from_value(h.api.get(&provider_path("idp")).expect("stored")).expect("parse");
    let status = stored.status.clone().expect("status");
    assert_eq!(status.conditions[0].reason, "ProviderReady", "{:?}", status.conditions);
    assert!(status.client_secret_expires_at.is_some(), "the certificate's expiry is tracked");
    h.providers.apply_watcher_event(&watcher::Event::Apply(stored));

    h.binding("app", json!({"clientCredentials": {}}), json!(["mail"]));
    let b = h.reconcile("app").await;
    assert_eq!(b.status.as_ref().and_then(|s| s.phase), Some(Phase::Ready), "{:?}", b.status);
    assert_eq!(h.server.grants("client_credentials").await, 1);

    // Another key than the registered one is refused as invalid client credentials.
    let other = rcgen::KeyPair::generate().expect("key");
    let other_cert =
        rcgen::CertificateParams::new(vec!["x".to_owned()]).expect("params").self_signed(&other).expect("cert");
    h.api.put(
        &secret_path("cert"),
        secret("cert", &[("tls.crt", &other_cert.pem()), ("tls.key", &other.serialize_pem())]),
    );
    h.annotate("app", "mailoauth.io/refresh-requested", "1");
    let b = h.reconcile("app").await;
    assert_eq!(condition(&b, "Authorized").reason, "ClientCredentialsInvalid", "{:?}", b.status);
}

#[tokio::test]
async fn a_service_account_gets_tokens_for_the_mailbox_with_a_new_assertion_each_time() {
    let mut h = Harness::start(600).await;
    h.api.put(&secret_path("sa"), secret("sa", &[("key.json", &h.server.service_account_json)]));
    let object = json!({
        "apiVersion": "mailoauth.io/v1alpha1", "kind": "MailProvider",
        "metadata": {"name": "idp", "namespace": NS, "uid": "uid-idp", "generation": 1},
        "spec": {
            "generic": {"issuerUrl": h.server.issuer, "caBundle": h.server.ca_pem, "scopes": {"imap": ["email", "mail"]}},
            "clientId": "mail-sa",
            "serviceAccountKeyRef": {"name": "sa", "key": "key.json"}
        }
    });
    h.api.put(&provider_path("idp"), object.clone());
    let p: MailProvider = serde_json::from_value(object).expect("provider");
    provider::reconcile(Arc::new(p), Arc::clone(&h.ctx)).await.expect("provider reconcile");
    let stored: MailProvider =
        serde_json::from_value(h.api.get(&provider_path("idp")).expect("stored")).expect("parse");
    h.providers.apply_watcher_event(&watcher::Event::Apply(stored));
    h.binding("desk", json!({"jwtBearer": {}}), json!([]));

    let b = h.reconcile("desk").await;
    assert_eq!(b.status.as_ref().and_then(|s| s.phase), Some(Phase::Ready), "{:?}", b.status);
    let grant = h.api.get(&secret_path("desk.mailoauth-grant")).expect("grant");
    assert_eq!(decode(&grant, "refresh_token"), None, "no refresh token in this grant");
    let first = decode(&h.published("desk"), "access_token");
    let renew_at = b.status.as_ref().and_then(|s| s.token.as_ref()).expect("token").renew_at;
    h.advance_to(renew_at + Duration::seconds(1));
    let b = h.reconcile("desk").await;
    assert_eq!(b.status.as_ref().and_then(|s| s.phase), Some(Phase::Ready));
    assert_ne!(decode(&h.published("desk"), "access_token"), first);
    assert_eq!(h.server.grants("urn:ietf:params:oauth:grant-type:jwt-bearer").await, 2, "a new assertion each time");
}

#[tokio::test]
async fn revoke_on_delete_keeps_a_finalizer_and_revokes_the_refresh_token_when_the_binding_is_deleted() {
    let mut h = Harness::start(600).await;
    h.import_binding("helpdesk").await;
    let mut object = h.api.get(&binding_path("helpdesk")).expect("binding");
    object["spec"]["revokeOnDelete"] = json!(true);
    h.api.put(&binding_path("helpdesk"), object);
    let b = h.reconcile("helpdesk").await;
    assert!(b.metadata.finalizers.as_ref().is_some_and(|f| f.iter().any(|f| f == "mailoauth.io/revoke-on-delete")));
    let b = h.reconcile("helpdesk").await;
    assert_eq!(b.status.as_ref().and_then(|s| s.phase), Some(Phase::Ready), "{:?}", b.status);
    let rt = h.stored_refresh_token("helpdesk");

    // kubectl delete: the apiserver sets deletionTimestamp and waits for the finalizer.
    let mut object = h.api.get(&binding_path("helpdesk")).expect("binding");
    object["metadata"]["deletionTimestamp"] =
        json!(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
    h.api.put(&binding_path("helpdesk"), object);
    let b = h.reconcile("helpdesk").await;
    assert!(b.metadata.finalizers.as_ref().is_none_or(|f| f.is_empty()), "the finalizer is removed once revoked");
    let replay = h.server.refresh_directly(&rt).await;
    assert_eq!(replay["error"], "invalid_grant", "the refresh token was revoked at the provider: {replay}");
}

#[tokio::test]
async fn an_authorization_response_after_its_request_expired_is_refused_without_a_request() {
    let mut h = Harness::start(600).await;
    h.public_provider("idp", "mail-device").await;
    h.binding("desk", json!({"authorizationCode": {}}), json!([]));
    set_mailbox(&mut h, "desk", "desk@example.com", &[]);
    let b = h.reconcile("desk").await;
    let url = authorization(&b).url.expect("url");
    let expires = authorization(&b).expires_at.expect("expiry");
    let landed = h.server.browse(&url, None, false).await;
    h.advance_to(expires + Duration::seconds(1));
    h.annotate("desk", "mailoauth.io/authorization-response", &landed);
    let requests = h.server.token_requests().await;
    let b = h.reconcile("desk").await;
    assert_eq!(condition(&b, "Authorized").reason, "AuthorizationExpired", "{:?}", b.status);
    assert_eq!(h.server.token_requests().await, requests, "an expired state is refused before any request");
}

#[tokio::test]
async fn token_requests_to_one_provider_never_exceed_its_rate() {
    let mut h = Harness::start(600).await;
    h.api.put(&secret_path("idp-client"), secret("idp-client", &[("client-secret", "mail-app-secret")]));
    h.provider("idp", "mail-app", json!([{"name": "idp-client"}]), "clientSecretPost").await;
    let providers = h.ctx.providers.clone();
    let bindings = h.ctx.bindings.clone();
    h.ctx = context(&h.api, &h.clock, providers, bindings, ReferencePolicy::Any, 2.0);
    let names: Vec<String> = (0..6).map(|i| format!("app{i}")).collect();
    for n in &names {
        h.binding(n, json!({"clientCredentials": {}}), json!(["mail"]));
    }
    let counted_before = h.server.token_requests().await;
    let started = std::time::Instant::now();
    // A reconcile without room at the provider gives its slot back (Deferred) and, as the
    // controller's error policy does, comes back after the wait it was told.
    let deferred = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let runs = names.iter().map(|n| {
        let b: MailboxBinding = serde_json::from_value(h.api.get(&binding_path(n)).expect("binding")).expect("parse");
        let (ctx, deferred) = (Arc::clone(&h.ctx), Arc::clone(&deferred));
        async move {
            loop {
                match binding::reconcile(Arc::new(b.clone()), Arc::clone(&ctx)).await {
                    Err(mail_oauth_operator::Error::Deferred(wait)) => {
                        assert!(wait <= std::time::Duration::from_secs(300), "{wait:?}");
                        deferred.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        tokio::time::sleep(wait).await;
                    }
                    other => return other,
                }
            }
        }
    });
    // The server's own count of token requests (counted as each POST arrives), sampled back to
    // back while the reconciles run: (sent, answered, count) per sample.
    let done = std::sync::atomic::AtomicBool::new(false);
    let sampler = async {
        let mut samples = Vec::new();
        loop {
            let finished = done.load(std::sync::atomic::Ordering::SeqCst);
            let sent = std::time::Instant::now();
            let count = h.server.token_requests().await;
            samples.push((sent, std::time::Instant::now(), count));
            if finished {
                return samples;
            }
        }
    };
    let work = async {
        let results = futures::future::join_all(runs).await;
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        results
    };
    let (results, samples) = futures::join!(work, sampler);
    for r in results {
        r.expect("reconcile");
    }
    let elapsed = started.elapsed();
    assert_eq!(h.server.grants("client_credentials").await, 6);
    // The last two could not have had a slot within the bounded wait: they were sent away.
    assert!(deferred.load(std::sync::atomic::Ordering::SeqCst) >= 1, "nobody was sent away");
    // Six requests at two per second: the first at once, the last 2.5 s later.
    assert!(elapsed >= std::time::Duration::from_millis(2400), "{elapsed:?}");
    // Per second at the server, not only in total (a burst of four and two more late would pass
    // the total): request k arrived after the last sample that did not count it was sent, and
    // before the first sample that did was answered.
    let arrival = |k: u64| {
        let after = samples.iter().rev().find(|s| s.2 < counted_before + k).map_or(started, |s| s.0);
        let before = samples.iter().find(|s| s.2 >= counted_before + k).map(|s| s.1).expect("counted");
        (after, before)
    };
    let windows: Vec<_> = (1..=6).map(arrival).collect();
    for k in 0..windows.len() {
        // Two per second: one every 500 ms. Allowing for the network and the sampling, no two
        // requests within 300 ms, and no three within 800 ms (at most two in any second).
        if let Some(next) = windows.get(k + 1) {
            let gap = next.0.saturating_duration_since(windows[k].1);
            assert!(gap >= std::time::Duration::from_millis(300), "requests {} and {}: {gap:?} apart", k + 1, k + 2);
        }
        if let Some(third) = windows.get(k + 2) {
            let span = third.0.saturating_duration_since(windows[k].1);
            assert!(
                span >= std::time::Duration::from_millis(800),
                "requests {} to {}: three within {span:?}",
                k + 1,
                k + 3
            );
        }
    }
    assert_eq!(samples.last().map(|s| s.2), Some(counted_before + 6), "no other token request");
}

#[tokio::test]
async fn without_an_id_token_the_identity_is_asked_at_userinfo_and_pinned() {
    let server = OAuthServer::start_with(600, &[("CONFORM_ID_TOKEN_CLAIMS", "true")]).await;
    let mut h = Harness::start_on(server, ReferencePolicy::Any);
    h.public_provider("idp", "mail-device").await;
    h.binding("desk", json!({"deviceCode": {}}), json!([]));
    set_mailbox(&mut h, "desk", "desk@example.com", &[]);
    let b = h.reconcile("desk").await;
    let code = authorization(&b).user_code.expect("code");
    h.server.approve_device(&code, "mallory@example.com").await;
    h.advance_to(h.now() + Duration::seconds(5));
    let b = h.reconcile("desk").await;
    assert_eq!(condition(&b, "Authorized").reason, "IdentityMismatch", "{:?}", b.status);
    assert!(condition(&b, "Authorized").message.contains("mallory@example.com"));

    h.annotate("desk", "mailoauth.io/reauthorize-requested", "1");
    let b = h.reconcile("desk").await;
    let code = authorization(&b).user_code.expect("a new code");
    h.server.approve_device(&code, "desk@example.com").await;
    h.advance_to(h.now() + Duration::seconds(5));
    let b = h.reconcile("desk").await;
    assert_eq!(b.status.as_ref().and_then(|s| s.phase), Some(Phase::Ready), "{:?}", b.status);
    assert_eq!(b.status.as_ref().and_then(|s| s.account.as_deref()), Some("desk@example.com"));
}

/// The provider as if it knew no userinfo endpoint (a generic provider with explicit URLs).
fn forget_userinfo(h: &mut Harness, name: &str) {
    let mut object = h.api.get(&provider_path(name)).expect("provider");
    object["status"]["endpoints"]["userinfo"] = Value::Null;
    h.api.put(&provider_path(name), object.clone());
    let p: MailProvider = serde_json::from_value(object).expect("provider");
    assert!(p.status.as_ref().and_then(|s| s.endpoints.as_ref()).is_some_and(|e| e.userinfo.is_none()));
    h.providers.apply_watcher_event(&watcher::Event::Apply(p));
}

#[tokio::test]
async fn a_consent_that_names_nobody_is_identity_unverified_unless_the_binding_says_unchecked() {
    // id_tokens without email, and no userinfo endpoint to ask: the provider names nobody.
    let server = OAuthServer::start_with(600, &[("CONFORM_ID_TOKEN_CLAIMS", "true")]).await;
    let mut h = Harness::start_on(server, ReferencePolicy::Any);
    h.public_provider("idp", "mail-device").await;
    forget_userinfo(&mut h, "idp");
    h.binding("desk", json!({"deviceCode": {}}), json!([]));
    set_mailbox(&mut h, "desk", "desk@example.com", &[]);
    let b = h.reconcile("desk").await;
    let code = authorization(&b).user_code.expect("code");
    h.server.approve_device(&code, "mallory@example.com").await;
    h.advance_to(h.now() + Duration::seconds(5));
    let b = h.reconcile("desk").await;
    let c = condition(&b, "Authorized");
    assert_eq!(c.reason, "IdentityUnverified", "{:?}", b.status);
    assert!(c.message.contains("nothing was stored"), "{}", c.message);
    assert!(h.api.get(&secret_path("desk-mail-token")).is_none(), "a token for an unknown person was published");
    let grant = h.api.get(&secret_path("desk.mailoauth-grant"));
    assert!(
        grant.as_ref().and_then(|g| decode(g, "refresh_token")).is_none(),
        "a token for an unknown person was stored"
    );

    // The binding says, explicitly, that its identity is not checked: the next consent is taken.
    let mut object = h.api.get(&binding_path("desk")).expect("binding");
    object["spec"]["identity"] = json!("unchecked");
    h.api.put(&binding_path("desk"), object.clone());
    h.bindings.apply_watcher_event(&watcher::Event::Apply(serde_json::from_value(object).expect("binding")));
    h.annotate("desk", "mailoauth.io/reauthorize-requested", "1");
    let b = h.reconcile("desk").await;
    let code = authorization(&b).user_code.expect("a new code");
    h.server.approve_device(&code, "desk@example.com").await;
    h.advance_to(h.now() + Duration::seconds(5));
    let b = h.reconcile("desk").await;
    assert_eq!(b.status.as_ref().and_then(|s| s.phase), Some(Phase::Ready), "{:?}", b.status);
    assert_eq!(b.status.as_ref().and_then(|s| s.account.clone()), None, "no identity is claimed");
}

// ---------- Behaviours the documentation promises, each run here once (issue 18) ----------

impl Harness {
    /// One reconcile of the binding as stored, its outcome as is.
    async fn try_reconcile(&self, name: &str) -> mail_oauth_operator::Result<kube::runtime::controller::Action> {
        let b: MailboxBinding =
            serde_json::from_value(self.api.get(&binding_path(name)).expect("binding")).expect("parse");
        binding::reconcile(Arc::new(b), Arc::clone(&self.ctx)).await
    }

    /// What the referable-Secret watch (strict mode, by label) reports of a Secret as stored now:
    /// `Apply` of its metadata, or `Delete` once it is unlabelled.
    fn watch_reports(&self, name: &str, event: fn(PartialSecret) -> watcher::Event<PartialSecret>) {
        let stored = self.api.get(&secret_path(name)).expect("Secret");
        let meta = PartialSecret {
            metadata: serde_json::from_value(stored["metadata"].clone()).expect("metadata"),
            ..Default::default()
        };
        self.ctx.referable.observe(&event(meta));
    }

    /// Points a stored binding at another provider of its namespace.
    fn use_provider(&mut self, name: &str, provider: &str) {
        let mut object = self.api.get(&binding_path(name)).expect("binding");
        object["spec"]["providerRef"]["name"] = json!(provider);
        self.api.put(&binding_path(name), object.clone());
        self.bindings.apply_watcher_event(&watcher::Event::Apply(serde_json::from_value(object).expect("binding")));
    }

    /// Sets `spec.revokeOnDelete` on a stored binding.
    fn revoke_on_delete(&mut self, name: &str, on: bool) {
        let mut object = self.api.get(&binding_path(name)).expect("binding");
        object["spec"]["revokeOnDelete"] = json!(on);
        self.api.put(&binding_path(name), object.clone());
        self.bindings.apply_watcher_event(&watcher::Event::Apply(serde_json::from_value(object).expect("binding")));
    }

    /// Stores a generic provider with these `generic` settings and client authentication (no
    /// discovery unless `issuerUrl` is among them), reconciles it, and puts it in the cache; returns
    /// it as stored and what its reconcile asked for.
    async fn generic_provider(
        &mut self,
        name: &str,
        generic: Value,
        client_id: &str,
        authentication: Value,
    ) -> (MailProvider, kube::runtime::controller::Action) {
        let object = json!({
            "apiVersion": "mailoauth.io/v1alpha1", "kind": "MailProvider",
            "metadata": {"name": name, "namespace": NS, "uid": format!("uid-{name}"), "generation": 1},
            "spec": {"generic": generic, "clientId": client_id, "clientAuthentication": authentication}
        });
        self.api.put(&provider_path(name), object);
        self.reconcile_provider(name).await
    }

    /// One reconcile of a stored provider; puts the result in the cache.
    async fn reconcile_provider(&mut self, name: &str) -> (MailProvider, kube::runtime::controller::Action) {
        let p: MailProvider =
            serde_json::from_value(self.api.get(&provider_path(name)).expect("provider")).expect("provider parses");
        let action = provider::reconcile(Arc::new(p), Arc::clone(&self.ctx)).await.expect("provider reconcile");
        let stored: MailProvider =
            serde_json::from_value(self.api.get(&provider_path(name)).expect("stored")).expect("provider parses");
        self.providers.apply_watcher_event(&watcher::Event::Apply(stored.clone()));
        (stored, action)
    }

    /// The grant state kept in memory for a binding whose write failed.
    fn pending_refresh_token(&self, name: &str) -> Option<String> {
        use secrecy::ExposeSecret;
        let pending = self.ctx.pending.lock().expect("pending");
        let p = pending.get(&(NS.to_owned(), name.to_owned()))?;
        p.state.refresh_token.as_ref().map(|t| t.expose_secret().to_owned())
    }
}

type PartialSecret = kube::core::PartialObjectMeta<k8s_openapi::api::core::v1::Secret>;

fn labelled_secret(name: &str, data: &[(&str, &str)]) -> Value {
    let mut s = secret(name, data);
    s["metadata"]["labels"] = json!({"mailoauth.io/allow-reference": "true"});
    s
}

fn any_condition<'a>(b: &'a MailboxBinding, reason: &str) -> Option<&'a mail_oauth_operator::api::Condition> {
    b.status.as_ref().and_then(|s| s.conditions.iter().find(|c| c.reason == reason))
}

#[tokio::test]
async fn in_strict_mode_a_client_secret_is_read_once_and_again_only_when_its_secret_changes_or_is_unlabelled() {
    let mut h = Harness::start_with(3600, ReferencePolicy::Labelled).await;
    h.api.versioned();
    let client = secret_path("idp-client");
    h.api.put(&client, labelled_secret("idp-client", &[("client-secret", "mail-app-secret")]));
    h.provider("idp", "mail-app", json!([{"name": "idp-client"}]), "clientSecretPost").await;
    // The referable-Secret metadata watch shows the Secret at its version.
    h.watch_reports("idp-client", watcher::Event::Apply);
    h.binding("app", json!({"clientCredentials": {}}), json!(["mail"]));

    let read = h.api.gets(&client);
    let b = h.reconcile("app").await;
    assert_eq!(b.status.as_ref().and_then(|s| s.phase), Some(Phase::Ready), "{:?}", b.status);
    assert_eq!(h.api.gets(&client), read + 1, "the first token request reads the client secret");

    // A second token request: the client secret comes from memory, no GET of its Secret.
    h.annotate("app", "mailoauth.io/refresh-requested", "1");
    let b = h.reconcile("app").await;
    assert_eq!(b.status.as_ref().and_then(|s| s.last_refresh_request.as_deref()), Some("1"));
    assert_eq!(h.server.grants("client_credentials").await, 2);
    assert_eq!(h.api.gets(&client), read + 1, "the cached client secret was read again");

    // The Secret changes (a new resourceVersion, as the watch shows): read again, then cached.
    h.api.put(&client, labelled_secret("idp-client", &[("client-secret", "mail-app-secret")]));
    h.watch_reports("idp-client", watcher::Event::Apply);
    h.annotate("app", "mailoauth.io/refresh-requested", "2");
    h.reconcile("app").await;
    assert_eq!(h.server.grants("client_credentials").await, 3);
    assert_eq!(h.api.gets(&client), read + 2, "a changed Secret was not read again");
    h.annotate("app", "mailoauth.io/refresh-requested", "3");
    h.reconcile("app").await;
    assert_eq!(h.server.grants("client_credentials").await, 4);
    assert_eq!(h.api.gets(&client), read + 2, "the new version is cached");

    // Unlabelled: the watch (by label) loses it; it is read again, refused, and nothing is sent.
    h.api.put(&client, secret("idp-client", &[("client-secret", "mail-app-secret")]));
    h.watch_reports("idp-client", watcher::Event::Delete);
    h.annotate("app", "mailoauth.io/refresh-requested", "4");
    let requests = h.server.token_requests().await;
    let b = h.reconcile("app").await;
    assert_eq!(h.api.gets(&client), read + 3, "an unlabelled Secret was not read again");
    let refused = any_condition(&b, "SecretReferenceNotAllowed").expect("refused");
    assert!(refused.message.contains("Secret mail/idp-client is not labelled"), "{}", refused.message);
    assert_eq!(h.server.token_requests().await, requests, "a client secret that may no longer be read was sent");
}

#[tokio::test]
async fn a_grant_state_that_could_not_be_written_is_kept_and_written_at_shutdown() {
    let mut h = Harness::start(600).await;
    h.api.versioned();
    let seed = h.import_binding("helpdesk").await;
    let b = h.reconcile("helpdesk").await;
    assert_eq!(b.status.as_ref().and_then(|s| s.phase), Some(Phase::Ready));
    let stored = h.stored_refresh_token("helpdesk");

    // The apiserver fails every write of the grant state: the rotated refresh token the renewal
    // brings lives in memory only (the stored one is spent at the server).
    let grant = secret_path("helpdesk.mailoauth-grant");
    h.api.fail_writes(&grant, usize::MAX);
    let renew_at = b.status.as_ref().and_then(|s| s.token.as_ref()).expect("token").renew_at;
    h.advance_to(renew_at + Duration::seconds(1));
    let failed = h.try_reconcile("helpdesk").await;
    assert!(matches!(failed, Err(mail_oauth_operator::Error::WriteGrantState { .. })), "{failed:?}");
    assert_eq!(h.stored_refresh_token("helpdesk"), stored);
    let rotated = h.pending_refresh_token("helpdesk").expect("the new grant state is kept in memory");
    assert_ne!(rotated, stored);
    let kept = h.ctx.pending.lock().expect("pending").clone();

    // Shutdown while the apiserver still fails: retried until the deadline, then reported lost.
    let soon = tokio::time::Instant::now() + std::time::Duration::from_millis(600);
    assert_eq!(grant_store::flush_pending(&h.ctx.client, &h.ctx.pending, soon).await, 1);

    // Shutdown once the apiserver answers: written (the same state, kept again as before).
    *h.ctx.pending.lock().expect("pending") = kept;
    h.api.heal(&grant);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    assert_eq!(grant_store::flush_pending(&h.ctx.client, &h.ctx.pending, deadline).await, 0, "nothing lost");
    assert!(h.ctx.pending.lock().expect("pending").is_empty());
    assert_eq!(h.stored_refresh_token("helpdesk"), rotated, "the rotated refresh token was written at shutdown");

    // The next process renews with what was written: the grant is alive and nothing was lost.
    h.restart();
    let b = h.reconcile("helpdesk").await;
    let renew_at = b.status.as_ref().and_then(|s| s.token.as_ref()).expect("token").renew_at;
    h.advance_to(renew_at + Duration::seconds(1));
    let b = h.reconcile("helpdesk").await;
    assert_eq!(b.status.as_ref().and_then(|s| s.phase), Some(Phase::Ready), "{:?}", b.status);
    assert_eq!(h.server.grants("refresh_token").await, 3, "import, the renewal written at shutdown, this one");
    assert_eq!(h.server.refresh_directly(&seed).await["error"], "invalid_grant");
}

#[tokio::test]
async fn a_grant_state_flushed_at_shutdown_never_overwrites_a_newer_grant() {
    let mut h = Harness::start(600).await;
    h.api.versioned();
    h.import_binding("helpdesk").await;
    let b = h.reconcile("helpdesk").await;
    let grant = secret_path("helpdesk.mailoauth-grant");
    h.api.fail_writes(&grant, usize::MAX);
    let renew_at = b.status.as_ref().and_then(|s| s.token.as_ref()).expect("token").renew_at;
    h.advance_to(renew_at + Duration::seconds(1));
    assert!(h.try_reconcile("helpdesk").await.is_err());
    let ours = h.pending_refresh_token("helpdesk").expect("kept in memory");

    // Meanwhile the Secret was only touched (a label): the grant in it is the one ours came
    // from, so ours is written over it.
    let mut touched = h.api.get(&grant).expect("grant Secret");
    touched["metadata"]["labels"]["example.com/touched"] = json!("yes");
    h.api.put(&grant, touched);
    let kept = h.ctx.pending.lock().expect("pending").clone();
    h.api.heal(&grant);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    assert_eq!(grant_store::flush_pending(&h.ctx.client, &h.ctx.pending, deadline).await, 0);
    assert_eq!(h.stored_refresh_token("helpdesk"), ours, "a touched Secret still takes the grant it came from");

    // Meanwhile another writer (the next leader) stored a newer grant: ours is dropped.
    let mut newer = h.api.get(&grant).expect("grant Secret");
    newer["data"]["refresh_token"] = json!(STANDARD.encode("newer-grant-of-the-next-leader"));
    h.api.put(&grant, newer);
    // (The same state again, fenced on the version this process read before its failed write.)
    *h.ctx.pending.lock().expect("pending") = kept;
    assert_eq!(grant_store::flush_pending(&h.ctx.client, &h.ctx.pending, deadline).await, 0, "dropped, not lost");
    assert!(h.ctx.pending.lock().expect("pending").is_empty());
    assert_eq!(h.stored_refresh_token("helpdesk"), "newer-grant-of-the-next-leader", "a newer grant was overwritten");
}

#[tokio::test]
async fn a_revocation_that_keeps_failing_holds_the_deletion_two_minutes_then_lets_go_with_revocation_failed() {
    let mut h = Harness::start(600).await;
    h.import_binding("helpdesk").await;
    h.revoke_on_delete("helpdesk", true);
    h.reconcile("helpdesk").await;
    let b = h.reconcile("helpdesk").await;
    assert_eq!(b.status.as_ref().and_then(|s| s.phase), Some(Phase::Ready), "{:?}", b.status);
    let rt = h.stored_refresh_token("helpdesk");
    // The provider refuses the client's credentials from now on: every revocation fails.
    h.api.put(&secret_path("client"), secret("client", &[("client-secret", "not-the-secret-any-more")]));

    let deleted = h.now() - Duration::nanoseconds(h.now().timestamp_subsec_nanos().into());
    let mut object = h.api.get(&binding_path("helpdesk")).expect("binding");
    object["metadata"]["deletionTimestamp"] = json!(deleted.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
    h.api.put(&binding_path("helpdesk"), object);
    let held = |b: &MailboxBinding| {
        b.metadata.finalizers.as_ref().is_some_and(|f| f.iter().any(|f| f == "mailoauth.io/revoke-on-delete"))
    };
    let failed =
        |h: &Harness| h.api.events().into_iter().filter(|e| e["reason"] == "RevocationFailed").collect::<Vec<_>>();

    h.advance_to(deleted);
    let action = h.try_reconcile("helpdesk").await.expect("reconcile");
    assert_eq!(action, kube::runtime::controller::Action::requeue(std::time::Duration::from_secs(10)));
    assert!(held(&h.reconcile("helpdesk").await), "the deletion is held while revocation may still work");
    h.advance_to(deleted + Duration::minutes(2) - Duration::seconds(1));
    assert!(held(&h.reconcile("helpdesk").await), "let go before the 2 minutes");
    assert!(failed(&h).is_empty(), "{:?}", failed(&h));

    h.advance_to(deleted + Duration::minutes(2));
    let b = h.reconcile("helpdesk").await;
    assert!(!held(&b), "still held after 2 minutes of failing revocations");
    let events = failed(&h);
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["type"], "Warning");
    let note = events[0]["note"].as_str().unwrap_or_default();
    assert!(note.contains("could not be revoked") && note.contains("after 2 minutes"), "{note}");
    assert!(!note.contains("not-the-secret-any-more"), "{note}");
    // Nothing was revoked: the refresh token still works, as the Warning says.
    assert!(h.server.refresh_directly(&rt).await["access_token"].is_string());
}

#[tokio::test]
async fn revoke_on_delete_on_a_provider_without_a_revocation_endpoint_is_an_invalid_spec_and_sends_nothing() {
    let mut h = Harness::start(600).await;
    h.api.put(&secret_path("client"), secret("client", &[("client-secret", "mail-app-secret")]));
    // Explicit endpoints (no discovery): a token endpoint and no revocationUrl.
    let generic = json!({"tokenUrl": format!("{}/token", h.server.issuer), "caBundle": h.server.ca_pem,
                         "scopes": {"imap": ["mail"]}, "servers": {"imap": {"host": "127.0.0.1", "port": 10143}}});
    let (p, _) =
        h.generic_provider("idp", generic, "mail-app", json!({"clientSecretRefs": [{"name": "client"}]})).await;
    assert!(p.status.as_ref().and_then(|s| s.endpoints.as_ref()).is_some_and(|e| e.revocation.is_none()));
    h.binding("app", json!({"clientCredentials": {}}), json!(["mail"]));
    h.revoke_on_delete("app", true);
    h.reconcile("app").await;
    let b = h.reconcile("app").await;
    let ready = condition(&b, "Ready");
    assert_eq!(ready.reason, "InvalidSpec", "{:?}", b.status);
    assert!(
        ready.message.contains("spec.revokeOnDelete") && ready.message.contains("no revocation endpoint"),
        "{}",
        ready.message
    );
    assert_eq!(h.server.token_requests().await, 0, "nothing was requested for a binding that could not be revoked");

    h.revoke_on_delete("app", false);
    let b = h.reconcile("app").await;
    assert_eq!(b.status.as_ref().and_then(|s| s.phase), Some(Phase::Ready), "{:?}", b.status);
}

#[tokio::test]
async fn a_client_secret_whose_expires_at_has_passed_makes_the_provider_say_client_secret_expired() {
    let mut h = Harness::start(600).await;
    h.api.put(&secret_path("client"), secret("client", &[("client-secret", "mail-app-secret")]));
    let now = h.now();
    let expires = now - Duration::nanoseconds(now.timestamp_subsec_nanos().into()) + Duration::days(3);
    let stamp = expires.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let generic = json!({"issuerUrl": h.server.issuer, "caBundle": h.server.ca_pem, "scopes": {"imap": ["mail"]}});
    let refs = json!({"clientSecretRefs": [{"name": "client", "expiresAt": stamp}]});
    let (p, _) = h.generic_provider("idp", generic, "mail-app", refs).await;
    let conditions = &p.status.as_ref().expect("status").conditions;
    let expiring = conditions.iter().find(|c| c.type_ == "ClientSecretExpiring").expect("ClientSecretExpiring");
    assert_eq!((expiring.reason.as_str(), expiring.message.contains("within 7 days")), ("ClientSecretExpiring", true));

    // Five minutes before: the provider is looked at again when the secret expires.
    h.advance_to(expires - Duration::minutes(5));
    let (_, action) = h.reconcile_provider("idp").await;
    assert_eq!(action, kube::runtime::controller::Action::requeue(std::time::Duration::from_secs(300)));

    h.advance_to(expires);
    let (p, _) = h.reconcile_provider("idp").await;
    let status = p.status.as_ref().expect("status");
    let expired = status.conditions.iter().find(|c| c.type_ == "ClientSecretExpiring").expect("condition");
    assert_eq!(expired.reason, "ClientSecretExpired", "{:?}", status.conditions);
    assert_eq!(expired.status, mail_oauth_operator::api::ConditionStatus::True);
    assert!(expired.message.contains(&stamp), "{}", expired.message);
    assert_eq!(status.client_secret_expires_at, Some(expires));
}

#[tokio::test]
async fn an_entra_client_secret_expired_answer_falls_back_to_the_next_secret_and_alone_is_client_secret_expired() {
    let mut h = Harness::start(600).await;
    let entra = support::fake_endpoint::FakeEndpoint::start(json!({
        "/token expired-secret": {"status": 401, "body": {"error": "invalid_client",
            "error_description": "AADSTS7000222: The provided client secret keys for app 'mail-app' are expired. Visit the Azure portal to create new keys for your app.\r\nTrace ID: 1\r\nCorrelation ID: 2"}},
        "/token current-secret": {"status": 200, "body": {"access_token": "entra-access-token", "token_type": "Bearer", "expires_in": 3600}},
    }))
    .await;
    h.api.put(&secret_path("old"), secret("old", &[("client-secret", "expired-secret")]));
    h.api.put(&secret_path("new"), secret("new", &[("client-secret", "current-secret")]));
    let generic = json!({"tokenUrl": format!("{}/token", entra.base), "caBundle": entra.ca_pem,
                         "scopes": {"imap": ["mail"]}, "servers": {"imap": {"host": "127.0.0.1", "port": 10143}}});
    let both = json!({"clientSecretRefs": [{"name": "old"}, {"name": "new"}], "method": "clientSecretPost"});
    h.generic_provider("idp", generic.clone(), "mail-app", both).await;
    h.binding("app", json!({"clientCredentials": {}}), json!(["mail"]));
    let b = h.reconcile("app").await;
    assert_eq!(b.status.as_ref().and_then(|s| s.phase), Some(Phase::Ready), "{:?}", b.status);
    assert_eq!(decode(&h.published("app"), "access_token").as_deref(), Some("entra-access-token"));
    assert_eq!((entra.count("/token expired-secret").await, entra.count("/token current-secret").await), (1, 1));

    // Only the expired secret left: the binding says so, and waits for a person.
    let only_old = json!({"clientSecretRefs": [{"name": "old"}], "method": "clientSecretPost"});
    h.generic_provider("idp", generic, "mail-app", only_old).await;
    h.annotate("app", "mailoauth.io/refresh-requested", "1");
    let b = h.reconcile("app").await;
    let authorized = condition(&b, "Authorized");
    assert_eq!(authorized.reason, "ClientSecretExpired", "{:?}", b.status);
    assert!(authorized.message.contains("AADSTS7000222"), "{}", authorized.message);
    assert!(!authorized.message.contains("Trace ID"), "{}", authorized.message);
    h.advance_to(h.now() + Duration::minutes(30));
    h.reconcile("app").await;
    assert_eq!(entra.count("/token expired-secret").await, 2, "a permanent failure is not retried");
}

#[tokio::test]
async fn a_429_pauses_that_provider_only_and_another_provider_of_the_namespace_is_served_at_once() {
    let mut h = Harness::start(600).await;
    let throttled = support::fake_endpoint::FakeEndpoint::start(json!({
        "/token": {"status": 429, "headers": {"retry-after": "120"}, "body": {"error": "too_many_requests"}},
    }))
    .await;
    h.api.put(&secret_path("client"), secret("client", &[("client-secret", "mail-app-secret")]));
    h.api.put(&secret_path("other"), secret("other", &[("client-secret", "other-secret")]));
    h.provider("idp", "mail-app", json!([{"name": "client"}]), "clientSecretPost").await;
    let generic = json!({"tokenUrl": format!("{}/token", throttled.base), "caBundle": throttled.ca_pem,
                         "scopes": {"imap": ["mail"]}, "servers": {"imap": {"host": "127.0.0.1", "port": 10143}}});
    h.generic_provider("busy", generic, "other-app", json!({"clientSecretRefs": [{"name": "other"}]})).await;
    for (name, provider) in [("t1", "busy"), ("t2", "busy"), ("a1", "idp"), ("a2", "idp")] {
        h.binding(name, json!({"clientCredentials": {}}), json!(["mail"]));
        h.use_provider(name, provider);
    }

    let b = h.reconcile("t1").await;
    assert!(any_condition(&b, "Throttled").is_some(), "{:?}", b.status);
    assert_eq!(throttled.count("/token other-secret").await, 1);
    // The throttled provider's next binding is sent away without a request, for the pause.
    let started = std::time::Instant::now();
    match h.try_reconcile("t2").await {
        Err(mail_oauth_operator::Error::Deferred(wait)) => {
            assert!(wait > std::time::Duration::from_secs(100), "paused for {wait:?}, not the 120 s asked");
        }
        other => panic!("t2 was not deferred for the pause: {other:?}"),
    }
    assert_eq!(throttled.count("/token other-secret").await, 1, "a request went to a paused provider");
    // The other provider of the same namespace is not paused: served at once, without waiting.
    for name in ["a1", "a2"] {
        let b = h.reconcile(name).await;
        assert_eq!(b.status.as_ref().and_then(|s| s.phase), Some(Phase::Ready), "{name}: {:?}", b.status);
    }
    assert_eq!(h.server.grants("client_credentials").await, 2);
    assert!(started.elapsed() < std::time::Duration::from_secs(2), "waited {:?}", started.elapsed());
}
