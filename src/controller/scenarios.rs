//! tower-test scenarios: the exact Kubernetes API calls of a reconcile, against a mocked API
//! server, with the token endpoint replaced by a canned one.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration as StdDuration;

use chrono::{DateTime, Duration, Utc};
use futures::future::BoxFuture;
use http::{Method, Request, Response, StatusCode};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::Client;
use kube::client::Body;
use kube::runtime::reflector::store;
use kube::runtime::watcher;
use serde_json::{Value, json};
use tower_test::mock::{self, Handle};

use super::secrets::{Role, desired, grant_secret_name};
use super::{Clock, Context, binding, grant_store};
use crate::api::{
    Condition, ConditionStatus, Endpoints, MailProvider, MailProviderSpec, MailProviderStatus, MailboxBinding,
    MailboxBindingSpec,
};
use crate::oauth::{
    DeviceCode, DeviceRequest, Rejected, RevokeRequest, TokenEndpoint, TokenRequest, TokenSet, UserinfoRequest,
};
use crate::policy::at_rest;
use crate::policy::binding::{Outcome, next_status};
use crate::policy::grant_state::GrantState;
use crate::policy::publish::published_data;

const NS: &str = "mail";

fn now() -> DateTime<Utc> {
    DateTime::from_timestamp(1_800_000_000, 0).unwrap_or_default()
}

struct Fixed(DateTime<Utc>);

impl Clock for Fixed {
    fn now(&self) -> DateTime<Utc> {
        self.0
    }
}

/// A token endpoint that counts calls and hands out `at-<n>` tokens valid for an hour.
#[derive(Default)]
struct Canned {
    calls: AtomicUsize,
}

impl TokenEndpoint for Canned {
    fn request<'a>(&'a self, _request: &'a TokenRequest) -> BoxFuture<'a, Result<TokenSet, Rejected>> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        Box::pin(async move {
            Ok(TokenSet {
                access_token: format!("at-{n}").into(),
                refresh_token: None,
                expires_in: Some(Duration::hours(1)),
                scopes: None,
                identities: Vec::new(),
            })
        })
    }

    fn userinfo<'a>(&'a self, _request: &'a UserinfoRequest) -> BoxFuture<'a, Result<Vec<String>, Rejected>> {
        Box::pin(async { Ok(Vec::new()) })
    }

    fn revoke<'a>(&'a self, _request: &'a RevokeRequest) -> BoxFuture<'a, Result<(), Rejected>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Box::pin(async { Ok(()) })
    }

    /// A new code each time: `dc-<n>`, shown to a person as `CODE-<n>`.
    fn device_authorization<'a>(&'a self, _request: &'a DeviceRequest) -> BoxFuture<'a, Result<DeviceCode, Rejected>> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        Box::pin(async move {
            Ok(DeviceCode {
                device_code: format!("dc-{n}").into(),
                user_code: format!("CODE-{n}"),
                verification_uri: "https://microsoft.com/devicelogin".into(),
                verification_uri_complete: None,
                expires_in: Duration::minutes(15),
                interval: Duration::seconds(5),
            })
        })
    }
}

fn provider() -> MailProvider {
    let spec: MailProviderSpec = serde_json::from_value(json!({
        "microsoft": {"tenant": "contoso.com"}, "clientId": "app-id",
        "clientAuthentication": {"clientSecretRefs": [{"name": "contoso-oauth"}]},
    }))
    .unwrap_or_else(|e| panic!("{e}"));
    let mut p = MailProvider::new("contoso", spec);
    p.metadata.namespace = Some(NS.into());
    p.metadata.generation = Some(1);
    p.status = Some(MailProviderStatus {
        conditions: vec![Condition {
            type_: "Ready".into(),
            status: ConditionStatus::True,
            reason: "ProviderReady".into(),
            message: String::new(),
            last_transition_time: now(),
            observed_generation: Some(1),
        }],
        endpoints: Some(Endpoints {
            token: Some("https://login.microsoftonline.com/contoso.com/oauth2/v2.0/token".into()),
            ..Default::default()
        }),
        client_secret_expires_at: None,
        observed_generation: Some(1),
    });
    p
}

fn binding_object() -> MailboxBinding {
    let spec: MailboxBindingSpec = serde_json::from_value(json!({
        "providerRef": {"name": "contoso"}, "mailbox": "helpdesk@contoso.com",
        "grant": {"clientCredentials": {}}, "secretName": "helpdesk-mail-token",
    }))
    .unwrap_or_else(|e| panic!("{e}"));
    let mut b = MailboxBinding::new("helpdesk", spec);
    b.metadata.namespace = Some(NS.into());
    b.metadata.uid = Some("uid-helpdesk".into());
    b.metadata.generation = Some(1);
    b
}

fn context(client: Client, tokens: Arc<Canned>, bindings: &[MailboxBinding]) -> Arc<Context> {
    context_with(client, tokens, bindings, provider())
}

fn context_with(
    client: Client,
    tokens: Arc<Canned>,
    bindings: &[MailboxBinding],
    provider: MailProvider,
) -> Arc<Context> {
    let (providers, mut pw) = store();
    pw.apply_watcher_event(&watcher::Event::Apply(provider));
    let (cluster_providers, _cw) = store();
    let (binding_store, mut bw) = store();
    for b in bindings {
        bw.apply_watcher_event(&watcher::Event::Apply(b.clone()));
    }
    Arc::new(Context {
        tokens,
        providers,
        cluster_providers,
        bindings: binding_store,
        clock: Arc::new(Fixed(now())),
        ..Context::test(client)
    })
}

/// The API server side of a scenario: answers each expected request in order.
struct ApiServer(Handle<Request<Body>, Response<Body>>);

/// What a request carried besides its body: its query parameters and its content type.
struct Sent {
    query: BTreeMap<String, String>,
    content_type: String,
}

impl Sent {
    /// Asserts a server-side apply by the operator's field manager that takes over conflicting
    /// fields (`force`): without `force` a field another manager set would make the write fail,
    /// and under another manager name the operator's own fields would conflict with themselves.
    #[track_caller]
    fn assert_apply(&self, what: &str) {
        assert_eq!(self.content_type, "application/apply-patch+yaml", "{what}: not a server-side apply");
        assert_eq!(self.query.get("fieldManager").map(String::as_str), Some(crate::api::FIELD_MANAGER), "{what}");
        assert_eq!(self.query.get("force").map(String::as_str), Some("true"), "{what}: {:?}", self.query);
    }
}

impl ApiServer {
    async fn expect(&mut self, method: Method, path: &str) -> (Value, tower_test::mock::SendResponse<Response<Body>>) {
        let (body, _, send) = self.expect_sent(method, path).await;
        (body, send)
    }

    /// Expects one request; returns its body, what else it carried, and the answer to send.
    async fn expect_sent(
        &mut self,
        method: Method,
        path: &str,
    ) -> (Value, Sent, tower_test::mock::SendResponse<Response<Body>>) {
        let (request, send) = tokio::time::timeout(StdDuration::from_secs(5), self.0.next_request())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {method} {path}"))
            .unwrap_or_else(|| panic!("no request: expected {method} {path}"));
        assert_eq!(request.method(), method, "{}", request.uri());
        assert_eq!(request.uri().path(), path);
        let query = request
            .uri()
            .query()
            .unwrap_or_default()
            .split('&')
            .filter_map(|pair| pair.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let content_type = request
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let bytes = request.into_body().collect_bytes().await.unwrap_or_default();
        (serde_json::from_slice(&bytes).unwrap_or(Value::Null), Sent { query, content_type }, send)
    }

    /// Expects a create (POST) of the Secret `name` by our field manager (an absent Secret is
    /// created, never applied over one someone else made); answers with its body, returns it.
    async fn create(&mut self, name: &str) -> Value {
        let (body, sent, send) = self.expect_sent(Method::POST, SECRETS_PATH).await;
        assert_eq!(body["metadata"]["name"], name, "{body}");
        assert_eq!(sent.query.get("fieldManager").map(String::as_str), Some(crate::api::FIELD_MANAGER), "{name}");
        send.send_response(ok(&body));
        body
    }

    async fn get(&mut self, path: &str, answer: Option<Value>) {
        let (_, send) = self.expect(Method::GET, path).await;
        match answer {
            Some(v) => send.send_response(ok(&v)),
            None => send.send_response(not_found()),
        }
    }

    /// Expects a server-side apply by our field manager, with `force`; answers with its body,
    /// returns the body.
    async fn apply(&mut self, path: &str) -> Value {
        let (body, sent, send) = self.expect_sent(Method::PATCH, path).await;
        sent.assert_apply(path);
        send.send_response(ok(&body));
        body
    }

    /// Expects a status apply by our field manager, with `force`; answers with `object` carrying
    /// that status, returns the body.
    async fn apply_status(&mut self, path: &str, object: &MailboxBinding) -> Value {
        let (body, sent, send) = self.expect_sent(Method::PATCH, path).await;
        sent.assert_apply(path);
        let mut answer = serde_json::to_value(object).expect("json");
        answer["status"] = body["status"].clone();
        send.send_response(ok(&answer));
        body
    }

    /// Expects one Event of `type_` and `reason`; returns its note.
    async fn event(&mut self, type_: &str, reason: &str) -> String {
        let (event, send) = self.expect(Method::POST, "/apis/events.k8s.io/v1/namespaces/mail/events").await;
        assert_eq!((event["type"].as_str(), event["reason"].as_str()), (Some(type_), Some(reason)), "{event}");
        send.send_response(ok(&event));
        event["note"].as_str().unwrap_or_default().to_owned()
    }

    async fn nothing_more(&mut self) {
        let next = tokio::time::timeout(StdDuration::from_millis(300), self.0.next_request()).await;
        if let Ok(Some((request, _))) = next {
            panic!("unexpected request {} {}", request.method(), request.uri());
        }
    }
}

fn ok(v: &Value) -> Response<Body> {
    Response::builder().body(Body::from(serde_json::to_vec(v).expect("json"))).expect("response")
}

fn not_found() -> Response<Body> {
    let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"});
    Response::builder()
        .status(StatusCode::NOT_FOUND)
        .body(Body::from(serde_json::to_vec(&status).expect("json")))
        .expect("response")
}

fn secret_json(s: &Secret) -> Value {
    let mut v = serde_json::to_value(s).unwrap_or_default();
    v["apiVersion"] = "v1".into();
    v["kind"] = "Secret".into();
    v
}

fn client_secret() -> Value {
    json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "contoso-oauth", "namespace": NS},
           "data": {"client-secret": "czNjcjN0"}})
}

fn decoded_keys(v: &Value) -> Vec<String> {
    v["data"].as_object().map(|m| m.keys().cloned().collect()).unwrap_or_default()
}

const GRANT_PATH: &str = "/api/v1/namespaces/mail/secrets/helpdesk.mailoauth-grant";
const SECRETS_PATH: &str = "/api/v1/namespaces/mail/secrets";
const GRANT_NAME: &str = "helpdesk.mailoauth-grant";
const PUBLISHED_NAME: &str = "helpdesk-mail-token";
const PUBLISHED_PATH: &str = "/api/v1/namespaces/mail/secrets/helpdesk-mail-token";
const CLIENT_SECRET_PATH: &str = "/api/v1/namespaces/mail/secrets/contoso-oauth";
const STATUS_PATH: &str = "/apis/mailoauth.io/v1alpha1/namespaces/mail/mailboxbindings/helpdesk/status";

fn mocked() -> (Client, ApiServer) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(service, "default"), ApiServer(handle))
}

#[tokio::test]
async fn a_first_reconcile_reads_two_secrets_and_the_client_secret_then_writes_grant_published_and_status() {
    let (client, mut server) = mocked();
    let tokens = Arc::new(Canned::default());
    let mut b = binding_object();
    b.metadata.resource_version = Some("42".into());
    let ctx = context(client, Arc::clone(&tokens), std::slice::from_ref(&b));
    let reconcile = tokio::spawn(binding::reconcile(Arc::new(b.clone()), ctx));

    server.get(GRANT_PATH, None).await;
    server.get(PUBLISHED_PATH, None).await;
    server.get(CLIENT_SECRET_PATH, Some(client_secret())).await;
    let grant = server.create(GRANT_NAME).await;
    assert_eq!(grant["metadata"]["labels"]["mailoauth.io/secret-role"], "grant");
    assert!(grant["metadata"]["annotations"]["mailoauth.io/grant-digest"].is_string(), "{grant}");
    assert!(grant["metadata"]["annotations"]["mailoauth.io/grant-for"].is_string(), "{grant}");
    assert_eq!(grant["metadata"]["ownerReferences"][0]["uid"], "uid-helpdesk");
    assert_eq!(grant["metadata"]["ownerReferences"][0]["controller"], true);
    let published = server.create(PUBLISHED_NAME).await;
    assert!(published["metadata"]["annotations"]["mailoauth.io/source"].is_string(), "{published}");
    assert_eq!(
        decoded_keys(&published),
        [
            "access_token",
            "expires_at",
            "imap_host",
            "imap_port",
            "smtp_host",
            "smtp_port",
            "token_type",
            "username",
            "xoauth2"
        ]
    );
    assert_eq!(published["metadata"]["labels"]["app.kubernetes.io/managed-by"], "mail-oauth-operator");
    assert_eq!(published["metadata"]["labels"]["mailoauth.io/binding"], "helpdesk");
    let status = server.apply_status(STATUS_PATH, &b).await;
    assert_eq!(status["metadata"]["resourceVersion"], "42", "a stale copy must conflict, not overwrite");
    assert_eq!(status["status"]["phase"], "Ready");
    assert_eq!(status["status"]["token"]["expiresAt"], "2027-01-15T09:00:00Z");
    let note = server.event("Normal", "Ready").await;
    assert!(note.contains("token valid until 2027-01-15T09:00:00Z"), "{note}");
    server.nothing_more().await;

    let action = reconcile.await.unwrap_or_else(|e| panic!("{e}")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(tokens.calls.load(Ordering::SeqCst), 1);
    let requeue = format!("{action:?}");
    assert!(requeue.contains("requeue_after: Some("), "{requeue}");
}

#[tokio::test]
async fn a_reconcile_from_the_copy_its_own_status_write_replaced_waits_for_the_cache_and_requests_nothing() {
    let (client, mut server) = mocked();
    let tokens = Arc::new(Canned::default());
    let mut b = binding_object();
    b.metadata.resource_version = Some("42".into());
    b.metadata.annotations = Some([("mailoauth.io/refresh-requested".to_owned(), "1".to_owned())].into());
    let ctx = context(client, Arc::clone(&tokens), std::slice::from_ref(&b));
    // The status of resourceVersion 42 was just written (recording refresh request "1"); the
    // cache still holds 42, as when a Secret event queues a reconcile before the status event.
    ctx.wrote_status("mail", "helpdesk", Some("42"));
    let reconcile = tokio::spawn(binding::reconcile(Arc::new(b.clone()), Arc::clone(&ctx)));
    server.nothing_more().await;
    let action = reconcile.await.unwrap_or_else(|e| panic!("{e}")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(tokens.calls.load(Ordering::SeqCst), 0, "no second refresh for the same request");
    assert!(format!("{action:?}").contains("200ms"), "{action:?}");
    // Once the cache shows a later version, the binding is reconciled as usual.
    assert!(!ctx.behind_own_write("mail", "helpdesk", Some("43")));
    assert!(!ctx.behind_own_write("mail", "helpdesk", Some("42")), "the write is forgotten once seen past");
}

#[tokio::test]
async fn a_reconcile_with_nothing_to_do_reads_and_writes_nothing_else() {
    let (client, mut server) = mocked();
    let tokens = Arc::new(Canned::default());
    let mut b = binding_object();
    let grant = GrantState {
        refresh_token: None,
        access_token: "at-0".to_owned().into(),
        issued_at: now() - Duration::minutes(5),
        expires_at: now() + Duration::minutes(55),
        scopes: vec!["https://outlook.office365.com/.default".into()],
        requested_scopes: vec!["https://outlook.office365.com/.default".into()],
        provider: "MailProvider/contoso".into(),
        client_id: "app-id".into(),
        mailbox: Some("helpdesk@contoso.com".into()),
        issuer: None,
        ..GrantState::test()
    };
    b.status = Some(next_status(now() - Duration::minutes(5), &b, Some(&grant), &Outcome::Refreshed));
    let servers = crate::oauth::provider::servers(&provider().spec);
    let data =
        published_data(&b.spec.mailbox, &grant, &b.spec.protocols, &servers, BTreeMap::new(), None).unwrap_or_default();
    let grant_secret = grant_store::grant_secret(&b, &grant_secret_name("helpdesk"), &grant);
    let mut published = desired(&b, &b.spec.secret_name, Role::Published, data);
    let source = at_rest::source(&at_rest::grant_digest(&grant.encode()), &binding::publish_inputs(&b, &servers));
    published
        .metadata
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(crate::api::SOURCE_ANNOTATION.into(), source);
    // A key someone else added does not make the Secret out of date.
    if let Some(d) = published.data.as_mut() {
        d.insert("added-by-someone".into(), k8s_openapi::ByteString(b"x".to_vec()));
    }
    let ctx = context(client, Arc::clone(&tokens), std::slice::from_ref(&b));
    let reconcile = tokio::spawn(binding::reconcile(Arc::new(b), ctx));

    server.get(GRANT_PATH, Some(secret_json(&grant_secret))).await;
    server.get(PUBLISHED_PATH, Some(secret_json(&published))).await;
    server.nothing_more().await;

    reconcile.await.unwrap_or_else(|e| panic!("{e}")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(tokens.calls.load(Ordering::SeqCst), 0, "no token request");
}

/// `ctx` with an owned-Secret cache that has listed `secrets` (their metadata) and nothing else.
fn cached(ctx: Arc<Context>, secrets: &[Secret]) -> Arc<Context> {
    let (store, mut writer) = store::<kube::core::PartialObjectMeta<Secret>>();
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{FieldsV1, ManagedFieldsEntry};
    for s in secrets {
        let mut meta = kube::core::PartialObjectMeta::<Secret> { metadata: s.metadata.clone(), ..Default::default() };
        // As the apiserver shows it: the operator's field manager owns every data key no other
        // manager took.
        let others = crate::policy::at_rest::data_keys(&meta.metadata, crate::api::FIELD_MANAGER, false);
        let ours: serde_json::Map<String, Value> = s
            .data
            .iter()
            .flatten()
            .map(|(k, _)| k)
            .filter(|k| !others.contains(k))
            .map(|k| (format!("f:{k}"), json!({})))
            .collect();
        meta.metadata.managed_fields.get_or_insert_with(Vec::new).push(ManagedFieldsEntry {
            manager: Some(crate::api::FIELD_MANAGER.into()),
            operation: Some("Apply".into()),
            fields_v1: Some(FieldsV1(json!({"f:data": ours}))),
            ..Default::default()
        });
        super::owned::slim(&mut meta);
        writer.apply_watcher_event(&watcher::Event::Apply(meta));
    }
    let synced = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let mut ctx = Arc::try_unwrap(ctx).unwrap_or_else(|_| panic!("one reference"));
    ctx.owned = super::owned::OwnedSecrets::new(store, synced);
    Arc::new(ctx)
}

/// A binding made Ready five minutes ago, and its two Secrets as the operator wrote them.
fn at_rest_binding() -> (MailboxBinding, Secret, Secret) {
    let mut b = binding_object();
    let token_url = "https://login.microsoftonline.com/contoso.com/oauth2/v2.0/token";
    let grant = GrantState {
        refresh_token: None,
        access_token: "at-0".to_owned().into(),
        issued_at: now() - Duration::minutes(5),
        expires_at: now() + Duration::minutes(55),
        scopes: vec!["https://outlook.office365.com/.default".into()],
        requested_scopes: vec!["https://outlook.office365.com/.default".into()],
        provider: "MailProvider/contoso".into(),
        client_id: "app-id".into(),
        mailbox: Some("helpdesk@contoso.com".into()),
        issuer: Some(crate::policy::grant_state::Issuer {
            token_url: token_url.into(),
            revocation_url: None,
            client_auth: "client_secret_post".into(),
        }),
        ..GrantState::test()
    };
    b.status = Some(next_status(now() - Duration::minutes(5), &b, Some(&grant), &Outcome::Refreshed));
    let servers = crate::oauth::provider::servers(&provider().spec);
    let data =
        published_data(&b.spec.mailbox, &grant, &b.spec.protocols, &servers, BTreeMap::new(), None).unwrap_or_default();
    let grant_secret = grant_store::grant_secret(&b, &grant_secret_name("helpdesk"), &grant);
    let mut published = desired(&b, &b.spec.secret_name, Role::Published, data);
    let source = at_rest::source(&at_rest::grant_digest(&grant.encode()), &binding::publish_inputs(&b, &servers));
    published
        .metadata
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(crate::api::SOURCE_ANNOTATION.into(), source);
    (b, grant_secret, published)
}

#[tokio::test]
async fn a_binding_at_rest_with_its_secrets_cached_as_written_reads_and_writes_nothing() {
    let (client, mut server) = mocked();
    let tokens = Arc::new(Canned::default());
    let (b, grant_secret, published) = at_rest_binding();
    let ctx = cached(context(client, Arc::clone(&tokens), std::slice::from_ref(&b)), &[grant_secret, published]);
    let reconcile = tokio::spawn(binding::reconcile(Arc::new(b), ctx));
    server.nothing_more().await;
    let action = reconcile.await.unwrap_or_else(|e| panic!("{e}")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(tokens.calls.load(Ordering::SeqCst), 0, "no token request");
    assert!(format!("{action:?}").contains("requeue_after: Some("), "{action:?}");
}

#[tokio::test]
async fn a_cached_secret_someone_else_edited_or_a_provider_edit_is_not_at_rest() {
    // Someone else's field manager owns a data key of the published Secret: it is read.
    let (client, mut server) = mocked();
    let tokens = Arc::new(Canned::default());
    let (b, grant_secret, mut published) = at_rest_binding();
    published.metadata.managed_fields =
        Some(vec![k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry {
            manager: Some("kubectl-edit".into()),
            fields_v1: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::FieldsV1(
                json!({"f:data": {"f:access_token": {}}}),
            )),
            ..Default::default()
        }]);
    let ctx =
        cached(context(client, Arc::clone(&tokens), std::slice::from_ref(&b)), &[grant_secret.clone(), published]);
    let reconcile = tokio::spawn(binding::reconcile(Arc::new(b.clone()), ctx));
    server.get(GRANT_PATH, Some(secret_json(&grant_secret))).await;
    // Judged from its metadata: the edited key is rewritten, nothing read.
    let repaired = server.apply(PUBLISHED_PATH).await;
    assert_eq!(repaired["metadata"]["name"], PUBLISHED_NAME);
    server.nothing_more().await;
    reconcile.await.unwrap_or_else(|e| panic!("{e}")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(tokens.calls.load(Ordering::SeqCst), 0, "no token request");

    // The provider's token endpoint changed: the grant state is read (the decision needs it), and
    // a grant that holds no refresh token is obtained again there.
    let (client, mut server) = mocked();
    let (b, grant_secret, published) = at_rest_binding();
    let mut moved = provider();
    if let Some(e) = moved.status.as_mut().and_then(|s| s.endpoints.as_mut()) {
        e.token = Some("https://idp.example.com/token".into());
    }
    let ctx = cached(
        context_with(client, Arc::clone(&tokens), std::slice::from_ref(&b), moved),
        &[grant_secret.clone(), published],
    );
    let reconcile = tokio::spawn(binding::reconcile(Arc::new(b.clone()), ctx));
    server.get(GRANT_PATH, Some(secret_json(&grant_secret))).await;
    server.get(CLIENT_SECRET_PATH, Some(client_secret())).await;
    server.apply(GRANT_PATH).await;
    server.apply(PUBLISHED_PATH).await;
    server.apply_status(STATUS_PATH, &b).await;
    server.nothing_more().await;
    reconcile.await.unwrap_or_else(|e| panic!("{e}")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(tokens.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_first_grant_creates_its_secrets_reading_only_whether_its_published_name_is_taken() {
    let (client, mut server) = mocked();
    let tokens = Arc::new(Canned::default());
    let mut b = binding_object();
    b.metadata.resource_version = Some("42".into());
    let ctx = cached(context(client, Arc::clone(&tokens), std::slice::from_ref(&b)), &[]);
    let reconcile = tokio::spawn(binding::reconcile(Arc::new(b.clone()), ctx));
    // The cache sees only the operator's Secrets: whether someone else's has the published name
    // is asked once, before the token request. The grant state (client credentials) is not read.
    server.get(PUBLISHED_PATH, None).await;
    server.get(CLIENT_SECRET_PATH, Some(client_secret())).await;
    server.create(GRANT_NAME).await;
    server.create(PUBLISHED_NAME).await;
    server.apply_status(STATUS_PATH, &b).await;
    server.event("Normal", "Ready").await;
    server.nothing_more().await;
    reconcile.await.unwrap_or_else(|e| panic!("{e}")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(tokens.calls.load(Ordering::SeqCst), 1);

    // Someone else's Secret has the published name: nothing is asked of the provider.
    let (client, mut server) = mocked();
    let ctx = cached(context(client, Arc::clone(&tokens), std::slice::from_ref(&b)), &[]);
    let reconcile = tokio::spawn(binding::reconcile(Arc::new(b.clone()), ctx));
    let foreign = json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": PUBLISHED_NAME, "namespace": NS, "resourceVersion": "7"}, "data": {"password": "eA=="}});
    server.get(PUBLISHED_PATH, Some(foreign)).await;
    let status = server.apply_status(STATUS_PATH, &b).await;
    assert_eq!(status["status"]["conditions"][0]["reason"], "SecretConflict", "{status}");
    server.event("Warning", "SecretConflict").await;
    server.nothing_more().await;
    reconcile.await.unwrap_or_else(|e| panic!("{e}")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(tokens.calls.load(Ordering::SeqCst), 1, "no token request");
}

#[tokio::test]
async fn a_published_secret_recreated_by_someone_else_is_found_at_create_and_never_written_over() {
    let (client, mut server) = mocked();
    let tokens = Arc::new(Canned::default());
    let (b, grant_secret, _) = at_rest_binding();
    // The published Secret was deleted (the cache shows only the grant state) and someone else
    // made one of that name.
    let ctx =
        cached(context(client, Arc::clone(&tokens), std::slice::from_ref(&b)), std::slice::from_ref(&grant_secret));
    let first = tokio::spawn(binding::reconcile(Arc::new(b.clone()), Arc::clone(&ctx)));
    server.get(GRANT_PATH, Some(secret_json(&grant_secret))).await;
    let (_, _, send) = server.expect_sent(Method::POST, SECRETS_PATH).await;
    send.send_response(
        Response::builder()
            .status(StatusCode::CONFLICT)
            .body(Body::from(
                serde_json::to_vec(&json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                    "reason": "AlreadyExists", "code": 409, "message": "already exists"}))
                .expect("json"),
            ))
            .expect("response"),
    );
    let foreign = json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": PUBLISHED_NAME, "namespace": NS, "resourceVersion": "7"}, "data": {"password": "eA=="}});
    server.get(PUBLISHED_PATH, Some(foreign.clone())).await;
    let status = server.apply_status(STATUS_PATH, &b).await;
    assert_eq!(status["status"]["conditions"][0]["reason"], "SecretConflict", "{status}");
    server.event("Warning", "SecretConflict").await;
    server.nothing_more().await;
    first.await.unwrap_or_else(|e| panic!("{e}")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(tokens.calls.load(Ordering::SeqCst), 0);

    // From now on that name is read, and the conflict seen before anything is written.
    let second = tokio::spawn(binding::reconcile(Arc::new(b.clone()), Arc::clone(&ctx)));
    server.get(GRANT_PATH, Some(secret_json(&grant_secret))).await;
    server.get(PUBLISHED_PATH, Some(foreign)).await;
    let status = server.apply_status(STATUS_PATH, &b).await;
    assert_eq!(status["status"]["conditions"][0]["reason"], "SecretConflict");
    server.event("Warning", "SecretConflict").await;
    server.nothing_more().await;
    second.await.unwrap_or_else(|e| panic!("{e}")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(tokens.calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn secrets_an_older_version_wrote_get_their_digests_once_and_nothing_is_requested() {
    let (client, mut server) = mocked();
    let tokens = Arc::new(Canned::default());
    let (b, marked, published) = at_rest_binding();
    // As an older version wrote them: the same data, no digests.
    let mut grant_secret = marked.clone();
    grant_secret.metadata.annotations = None;
    let mut old_published = published.clone();
    if let Some(a) = old_published.metadata.annotations.as_mut() {
        a.remove(crate::api::SOURCE_ANNOTATION);
    }
    let ctx = context(client, Arc::clone(&tokens), std::slice::from_ref(&b));
    let reconcile = tokio::spawn(binding::reconcile(Arc::new(b), ctx));
    server.get(GRANT_PATH, Some(secret_json(&grant_secret))).await;
    server.get(PUBLISHED_PATH, Some(secret_json(&old_published))).await;
    let grant = server.apply(GRANT_PATH).await;
    assert_eq!(
        grant["metadata"]["annotations"],
        serde_json::to_value(&marked.metadata.annotations).unwrap_or_default()
    );
    assert_eq!(grant["data"], serde_json::to_value(&marked.data).unwrap_or_default(), "the same grant");
    let rewritten = server.apply(PUBLISHED_PATH).await;
    assert_eq!(
        rewritten["metadata"]["annotations"],
        serde_json::to_value(&published.metadata.annotations).unwrap_or_default()
    );
    server.nothing_more().await;
    reconcile.await.unwrap_or_else(|e| panic!("{e}")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(tokens.calls.load(Ordering::SeqCst), 0, "no token request");
}

#[tokio::test]
async fn a_failed_digest_rewrite_keeps_nothing_in_memory_and_is_never_taken_for_a_token_obtained() {
    let (client, mut server) = mocked();
    let tokens = Arc::new(Canned::default());
    let (b, marked, published) = at_rest_binding();
    let mut grant_secret = marked.clone();
    grant_secret.metadata.annotations = None;
    let ctx = context(client, Arc::clone(&tokens), std::slice::from_ref(&b));
    let reconcile = tokio::spawn(binding::reconcile(Arc::new(b.clone()), Arc::clone(&ctx)));
    server.get(GRANT_PATH, Some(secret_json(&grant_secret))).await;
    server.get(PUBLISHED_PATH, Some(secret_json(&published))).await;
    for _ in 0..3 {
        let (_, _, send) = server.expect_sent(Method::PATCH, GRANT_PATH).await;
        send.send_response(server_error());
    }
    let result = reconcile.await.unwrap_or_else(|e| panic!("{e}"));
    assert!(matches!(result, Err(crate::Error::WriteGrantState { .. })), "{result:?}");
    // The same credentials are in the Secret: nothing is kept to be written "first" next time (a
    // kept state would make the next reconcile record a refresh that never happened).
    assert!(ctx.take_pending(NS, "helpdesk").is_none());
    assert_eq!(tokens.calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_secret_owned_by_someone_else_is_left_alone_and_reported_as_a_conflict() {
    let (client, mut server) = mocked();
    let tokens = Arc::new(Canned::default());
    let b = binding_object();
    let foreign = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some("helpdesk-mail-token".into()),
            namespace: Some(NS.into()),
            owner_references: Some(vec![OwnerReference {
                api_version: "external-secrets.io/v1".into(),
                kind: "ExternalSecret".into(),
                name: "helpdesk".into(),
                uid: "uid-eso".into(),
                controller: Some(true),
                block_owner_deletion: None,
            }]),
            ..Default::default()
        },
        data: Some(BTreeMap::new()),
        ..Default::default()
    };
    let ctx = context(client, Arc::clone(&tokens), std::slice::from_ref(&b));
    let reconcile = tokio::spawn(binding::reconcile(Arc::new(b.clone()), ctx));

    server.get(GRANT_PATH, None).await;
    server.get(PUBLISHED_PATH, Some(secret_json(&foreign))).await;
    let status = server.apply_status(STATUS_PATH, &b).await;
    assert_eq!(status["status"]["phase"], "Error");
    assert_eq!(status["status"]["conditions"][0]["reason"], "SecretConflict");
    let message = status["status"]["conditions"][0]["message"].as_str().unwrap_or_default().to_owned();
    assert!(message.contains("controlled by ExternalSecret helpdesk"), "{message}");
    let (event, send) = server.expect(Method::POST, "/apis/events.k8s.io/v1/namespaces/mail/events").await;
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["reason"], "SecretConflict");
    send.send_response(ok(&event));
    server.nothing_more().await;

    reconcile.await.unwrap_or_else(|e| panic!("{e}")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(tokens.calls.load(Ordering::SeqCst), 0, "no token request");
}

fn server_error() -> Response<Body> {
    let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "InternalError", "code": 500, "message": "etcd unavailable"});
    Response::builder()
        .status(StatusCode::INTERNAL_SERVER_ERROR)
        .body(Body::from(serde_json::to_vec(&status).expect("json")))
        .expect("response")
}

#[tokio::test]
async fn a_grant_state_that_cannot_be_written_is_kept_and_written_first_on_the_next_reconcile() {
    let (client, mut server) = mocked();
    let tokens = Arc::new(Canned::default());
    let b = binding_object();
    let ctx = context(client, Arc::clone(&tokens), std::slice::from_ref(&b));

    // First reconcile: the token arrives, every grant-state write fails; nothing else is written.
    let first = tokio::spawn(binding::reconcile(Arc::new(b.clone()), Arc::clone(&ctx)));
    server.get(GRANT_PATH, None).await;
    server.get(PUBLISHED_PATH, None).await;
    server.get(CLIENT_SECRET_PATH, Some(client_secret())).await;
    let mut written = Vec::new();
    for _ in 0..3 {
        // Absent when read: created, never applied over.
        let (body, _, send) = server.expect_sent(Method::POST, SECRETS_PATH).await;
        written.push(body["data"]["access_token"].clone());
        send.send_response(server_error());
    }
    let result = first.await.expect("joined");
    assert!(matches!(result, Err(crate::Error::WriteGrantState { .. })), "{result:?}");
    assert_eq!(tokens.calls.load(Ordering::SeqCst), 1);

    // Next reconcile: the kept state is written before anything else, and no new token is asked for.
    let second = tokio::spawn(binding::reconcile(Arc::new(b.clone()), Arc::clone(&ctx)));
    let grant = server.create(GRANT_NAME).await;
    assert_eq!(grant["data"]["access_token"], written[0], "the same token as the failed writes");
    let mut stored = grant.clone();
    stored["apiVersion"] = "v1".into();
    stored["kind"] = "Secret".into();
    server.get(GRANT_PATH, Some(stored)).await;
    server.get(PUBLISHED_PATH, None).await;
    let published = server.create(PUBLISHED_NAME).await;
    assert_eq!(published["data"]["access_token"], written[0]);
    let status = server.apply_status(STATUS_PATH, &b).await;
    assert_eq!(status["status"]["phase"], "Ready");
    assert!(status["status"]["lastRefreshTime"].is_string(), "the kept write completes a refresh: {status}");
    server.event("Normal", "Ready").await;
    server.nothing_more().await;
    second.await.expect("joined").expect("second reconcile");
    assert_eq!(tokens.calls.load(Ordering::SeqCst), 1, "the rotated token was not dropped and re-requested");
}

fn conflict() -> Response<Body> {
    let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409, "message": "the object has been modified"});
    Response::builder()
        .status(StatusCode::CONFLICT)
        .body(Body::from(serde_json::to_vec(&status).expect("json")))
        .expect("response")
}

#[tokio::test]
async fn a_refresh_whose_status_write_meets_a_stale_copy_is_written_again_from_the_current_object() {
    let (client, mut server) = mocked();
    let tokens = Arc::new(Canned::default());
    let mut b = binding_object();
    b.metadata.resource_version = Some("41".into());
    let annotate = |b: &mut MailboxBinding, v: &str| {
        b.metadata.annotations =
            Some([("mailoauth.io/refresh-requested".to_owned(), v.to_owned())].into_iter().collect());
    };
    annotate(&mut b, "1");
    let ctx = context(client, Arc::clone(&tokens), std::slice::from_ref(&b));
    let reconcile = tokio::spawn(binding::reconcile(Arc::new(b.clone()), ctx));

    server.get(GRANT_PATH, None).await;
    server.get(PUBLISHED_PATH, None).await;
    server.get(CLIENT_SECRET_PATH, Some(client_secret())).await;
    server.create(GRANT_NAME).await;
    server.create(PUBLISHED_NAME).await;
    let (_, sent, send) = server.expect_sent(Method::PATCH, STATUS_PATH).await;
    sent.assert_apply(STATUS_PATH);
    send.send_response(conflict());
    // The current object, with the status an earlier reconcile wrote.
    let mut current = b.clone();
    current.metadata.resource_version = Some("42".into());
    // Meanwhile a person asked for another refresh: that one has not been acted on.
    annotate(&mut current, "2");
    server
        .get(
            "/apis/mailoauth.io/v1alpha1/namespaces/mail/mailboxbindings/helpdesk",
            Some(serde_json::to_value(&current).expect("json")),
        )
        .await;
    let status = server.apply_status(STATUS_PATH, &current).await;
    assert_eq!(status["metadata"]["resourceVersion"], "42");
    assert!(status["status"]["lastRefreshTime"].is_string(), "the refresh is recorded: {status}");
    assert_eq!(status["status"]["lastRefreshRequest"], "1", "only the request acted on is recorded");
    server.event("Normal", "Ready").await;
    server.nothing_more().await;
    reconcile.await.expect("joined").expect("reconcile");
    assert_eq!(tokens.calls.load(Ordering::SeqCst), 1);
}

const BINDING_PATH: &str = "/apis/mailoauth.io/v1alpha1/namespaces/mail/mailboxbindings/helpdesk";

#[tokio::test]
async fn a_pasted_response_is_removed_by_a_merge_patch_of_that_annotation_alone() {
    let (client, mut server) = mocked();
    let tokens = Arc::new(Canned::default());
    let b = pasted_binding();
    let ctx = context_with(client, Arc::clone(&tokens), std::slice::from_ref(&b), provider_with_authorization());
    let reconcile = tokio::spawn(binding::reconcile(Arc::new(b.clone()), ctx));

    server.get(GRANT_PATH, None).await;
    server.get(PUBLISHED_PATH, None).await;
    // Exactly this: a JSON merge patch whose null removes the one annotation, nothing else (not a
    // server-side apply, which would make the operator an owner of the binding's metadata).
    let (patch, sent, send) = server.expect_sent(Method::PATCH, BINDING_PATH).await;
    assert_eq!(sent.content_type, "application/merge-patch+json");
    assert_eq!(patch, json!({"metadata": {"annotations": {"mailoauth.io/authorization-response": null}}}));
    assert!(!sent.query.contains_key("fieldManager") && !sent.query.contains_key("force"), "{:?}", sent.query);
    send.send_response(ok(&serde_json::to_value(&b).expect("json")));
    let status = server.apply_status(STATUS_PATH, &b).await;
    assert_eq!(status["status"]["conditions"][0]["reason"], "AuthorizationExpired", "{status}");
    // (Its Warning Event is the next scenario's subject: the API server goes away here, and the
    // event is lost, as any failed event publish is.)
    drop(server);
    reconcile.await.expect("joined").expect("reconcile");
    assert_eq!(tokens.calls.load(Ordering::SeqCst), 0, "a response that answers no request is not exchanged");
}

/// The binding of the paste scenario: an authorization code grant, a response pasted for a
/// request that no longer waits (no grant state holds one), and someone else's annotation.
fn pasted_binding() -> MailboxBinding {
    let spec: MailboxBindingSpec = serde_json::from_value(json!({
        "providerRef": {"name": "contoso"}, "mailbox": "helpdesk@contoso.com",
        "grant": {"authorizationCode": {}}, "secretName": "helpdesk-mail-token",
    }))
    .unwrap_or_else(|e| panic!("{e}"));
    let mut b = MailboxBinding::new("helpdesk", spec);
    b.metadata.namespace = Some(NS.into());
    b.metadata.uid = Some("uid-helpdesk".into());
    b.metadata.generation = Some(1);
    b.metadata.annotations = Some(
        [
            (
                crate::api::AUTHORIZATION_RESPONSE_ANNOTATION.to_owned(),
                "http://localhost:8400/callback?code=stale-code&state=gone".to_owned(),
            ),
            ("team.example.com/owner".to_owned(), "mail-ops".to_owned()),
        ]
        .into(),
    );
    b
}

/// The provider of the paste scenario: the Microsoft preset with its authorization endpoint.
fn provider_with_authorization() -> MailProvider {
    let mut p = provider();
    if let Some(e) = p.status.as_mut().and_then(|s| s.endpoints.as_mut()) {
        e.authorization = Some("https://login.microsoftonline.com/contoso.com/oauth2/v2.0/authorize".into());
    }
    p
}

#[tokio::test]
async fn a_new_failure_is_announced_by_one_warning_event_created_once() {
    // The failure sets both Ready and Authorized to AuthorizationExpired: one failure, one Event.
    // kube-runtime's recorder would fold a second publish of the same reason into a PATCH of the
    // first Event (`series.count: 2`), so a count of Event objects cannot tell; the calls can.
    let (client, mut server) = mocked();
    let tokens = Arc::new(Canned::default());
    let b = pasted_binding();
    let ctx = context_with(client, Arc::clone(&tokens), std::slice::from_ref(&b), provider_with_authorization());
    let reconcile = tokio::spawn(binding::reconcile(Arc::new(b.clone()), ctx));
    server.get(GRANT_PATH, None).await;
    server.get(PUBLISHED_PATH, None).await;
    let (_, send) = server.expect(Method::PATCH, BINDING_PATH).await;
    send.send_response(ok(&serde_json::to_value(&b).expect("json")));
    let status = server.apply_status(STATUS_PATH, &b).await;
    let reasons: Vec<_> = status["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["status"] == "False")
        .map(|c| (c["type"].as_str().unwrap_or_default(), c["reason"].as_str().unwrap_or_default()))
        .collect();
    assert!(reasons.contains(&("Ready", "AuthorizationExpired")), "{reasons:?}");
    assert!(reasons.contains(&("Authorized", "AuthorizationExpired")), "{reasons:?}");
    let note = server.event("Warning", "AuthorizationExpired").await;
    assert!(note.contains("answers no request in progress"), "{note}");
    server.nothing_more().await;
    reconcile.await.expect("joined").expect("reconcile");
}

#[tokio::test]
async fn each_new_device_code_reaches_an_event_of_its_own() {
    // The docs promise a Normal Event with the code for each new device code. kube-runtime's
    // recorder keys Events by type, reason, action and object, not by note: a second publish
    // within its six-minute window becomes a PATCH of the first Event that re-sends the first
    // note, and the new code reaches no Event.
    let (client, mut server) = mocked();
    let tokens = Arc::new(Canned::default());
    let mut p = provider();
    if let Some(e) = p.status.as_mut().and_then(|s| s.endpoints.as_mut()) {
        e.device_authorization = Some("https://login.microsoftonline.com/contoso.com/oauth2/v2.0/devicecode".into());
    }
    let spec: MailboxBindingSpec = serde_json::from_value(json!({
        "providerRef": {"name": "contoso"}, "mailbox": "helpdesk@contoso.com",
        "grant": {"deviceCode": {}}, "secretName": "helpdesk-mail-token",
    }))
    .unwrap_or_else(|e| panic!("{e}"));
    let mut b = MailboxBinding::new("helpdesk", spec);
    b.metadata.namespace = Some(NS.into());
    b.metadata.uid = Some("uid-helpdesk".into());
    b.metadata.generation = Some(1);
    b.metadata.resource_version = Some("1".into());
    let ctx = context_with(client, Arc::clone(&tokens), std::slice::from_ref(&b), p);

    let first = tokio::spawn(binding::reconcile(Arc::new(b.clone()), Arc::clone(&ctx)));
    server.get(GRANT_PATH, None).await;
    server.get(PUBLISHED_PATH, None).await;
    server.get(CLIENT_SECRET_PATH, Some(client_secret())).await;
    let mut stored = server.apply(GRANT_PATH).await;
    let status = server.apply_status(STATUS_PATH, &b).await;
    assert_eq!(status["status"]["authorization"]["userCode"], "CODE-1", "{status}");
    let note = server.event("Normal", "AwaitingAuthorization").await;
    assert!(note.contains("CODE-1"), "{note}");
    server.nothing_more().await;
    first.await.expect("joined").expect("first reconcile");

    // A person asks for a new code (the first one was declined, say), a minute later.
    b.status = serde_json::from_value(status["status"].clone()).expect("status");
    b.metadata.resource_version = Some("2".into());
    b.metadata.annotations = Some([("mailoauth.io/reauthorize-requested".to_owned(), "1".to_owned())].into());
    stored["apiVersion"] = "v1".into();
    stored["kind"] = "Secret".into();
    let second = tokio::spawn(binding::reconcile(Arc::new(b.clone()), Arc::clone(&ctx)));
    server.get(GRANT_PATH, Some(stored)).await;
    server.get(PUBLISHED_PATH, None).await;
    server.get(CLIENT_SECRET_PATH, Some(client_secret())).await;
    server.apply(GRANT_PATH).await;
    let status = server.apply_status(STATUS_PATH, &b).await;
    assert_eq!(status["status"]["authorization"]["userCode"], "CODE-2", "{status}");
    let (event, send) = server.expect(Method::POST, "/apis/events.k8s.io/v1/namespaces/mail/events").await;
    assert_eq!((event["type"].as_str(), event["reason"].as_str()), (Some("Normal"), Some("AwaitingAuthorization")));
    assert!(event["note"].as_str().is_some_and(|n| n.contains("CODE-2")), "{event}");
    assert!(event["series"].is_null(), "a new Event, not a repeat of the first: {event}");
    send.send_response(ok(&event));
    server.nothing_more().await;
    second.await.expect("joined").expect("second reconcile");
    assert_eq!(tokens.calls.load(Ordering::SeqCst), 2, "two device authorizations, no token request");
}
