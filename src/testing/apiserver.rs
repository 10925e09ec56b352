//! The scenario harness: a mocked API server (tower-test) that a test answers request by
//! request, asserting each exact call; a canned token endpoint; a context over stores holding
//! the given objects, at a fixed time.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration as StdDuration;

use chrono::{DateTime, Duration};
use futures::future::BoxFuture;
use http::{Method, Request, Response, StatusCode};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{FieldsV1, ManagedFieldsEntry};
use kube::Client;
use kube::client::Body;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::store;
use kube::runtime::watcher;
use secrecy::ExposeSecret;
use serde_json::{Value, json};
use tower_test::mock::{self, Handle, SendResponse};

use super::Fixed;
use crate::api::{FIELD_MANAGER, MailProvider, MailboxBinding};
use crate::controller::Context;
use crate::controller::owned::{OwnedSecrets, slim};
use crate::oauth::{
    DeviceCode, DeviceRequest, Rejected, RevokeRequest, TokenEndpoint, TokenRequest, TokenSet, UserinfoRequest,
};

/// The API server side of a scenario: answers each expected request in order.
pub struct ApiServer {
    handle: Handle<Request<Body>, Response<Body>>,
    namespace: String,
}

/// A client whose every request reaches the returned [`ApiServer`]; Secrets are created and
/// Events published in `namespace`.
pub fn mocked(namespace: &str) -> (Client, ApiServer) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(service, "default"), ApiServer { handle, namespace: namespace.into() })
}

/// What a request carried besides its body: its query parameters and its content type.
pub struct Sent {
    /// The query parameters.
    pub query: BTreeMap<String, String>,
    /// The `Content-Type` header.
    pub content_type: String,
}

impl Sent {
    /// Asserts a server-side apply by the operator's field manager that takes over conflicting
    /// fields (`force`): without `force` a field another manager set would make the write fail,
    /// and under another manager name the operator's own fields would conflict with themselves.
    #[track_caller]
    pub fn assert_apply(&self, what: &str) {
        assert_eq!(self.content_type, "application/apply-patch+yaml", "{what}: not a server-side apply");
        assert_eq!(self.query.get("fieldManager").map(String::as_str), Some(FIELD_MANAGER), "{what}");
        assert_eq!(self.query.get("force").map(String::as_str), Some("true"), "{what}: {:?}", self.query);
    }
}

impl ApiServer {
    /// Expects one request; returns its body and the answer to send.
    pub async fn expect(&mut self, method: Method, path: &str) -> (Value, SendResponse<Response<Body>>) {
        let (body, _, send) = self.expect_sent(method, path).await;
        (body, send)
    }

    /// Expects one request; returns its body, what else it carried, and the answer to send.
    pub async fn expect_sent(&mut self, method: Method, path: &str) -> (Value, Sent, SendResponse<Response<Body>>) {
        let (request, send) = tokio::time::timeout(StdDuration::from_secs(5), self.handle.next_request())
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

    /// The namespace's Secrets collection.
    pub fn secrets_path(&self) -> String {
        format!("/api/v1/namespaces/{}/secrets", self.namespace)
    }

    /// Expects a create (POST) of the Secret `name` by our field manager (an absent Secret is
    /// created, never applied over one someone else made); answers with its body, returns it.
    pub async fn create(&mut self, name: &str) -> Value {
        let path = self.secrets_path();
        let (body, sent, send) = self.expect_sent(Method::POST, &path).await;
        assert_eq!(body["metadata"]["name"], name, "{body}");
        assert_eq!(sent.query.get("fieldManager").map(String::as_str), Some(FIELD_MANAGER), "{name}");
        send.send_response(ok(&body));
        body
    }

    /// Expects a GET of `path`; answers with `answer`, or 404 Not Found.
    pub async fn get(&mut self, path: &str, answer: Option<Value>) {
        let (_, send) = self.expect(Method::GET, path).await;
        match answer {
            Some(v) => send.send_response(ok(&v)),
            None => send.send_response(not_found()),
        }
    }

    /// Expects a server-side apply by our field manager, with `force`; answers with its body,
    /// returns the body.
    pub async fn apply(&mut self, path: &str) -> Value {
        let (body, sent, send) = self.expect_sent(Method::PATCH, path).await;
        sent.assert_apply(path);
        send.send_response(ok(&body));
        body
    }

    /// Expects a status apply by our field manager, with `force`; answers with `object` carrying
    /// that status, returns the body.
    pub async fn apply_status(&mut self, path: &str, object: &MailboxBinding) -> Value {
        let (body, sent, send) = self.expect_sent(Method::PATCH, path).await;
        sent.assert_apply(path);
        let mut answer = serde_json::to_value(object).expect("json");
        answer["status"] = body["status"].clone();
        send.send_response(ok(&answer));
        body
    }

    /// The namespace's Events collection.
    pub fn events_path(&self) -> String {
        format!("/apis/events.k8s.io/v1/namespaces/{}/events", self.namespace)
    }

    /// Expects one Event of `type_` and `reason`; returns its note.
    pub async fn event(&mut self, type_: &str, reason: &str) -> String {
        let path = self.events_path();
        let (event, send) = self.expect(Method::POST, &path).await;
        assert_eq!((event["type"].as_str(), event["reason"].as_str()), (Some(type_), Some(reason)), "{event}");
        send.send_response(ok(&event));
        event["note"].as_str().unwrap_or_default().to_owned()
    }

    /// Fails if another request arrives within 300 ms.
    pub async fn nothing_more(&mut self) {
        let next = tokio::time::timeout(StdDuration::from_millis(300), self.handle.next_request()).await;
        if let Ok(Some((request, _))) = next {
            panic!("unexpected request {} {}", request.method(), request.uri());
        }
    }
}

/// 200 OK with `v`.
pub fn ok(v: &Value) -> Response<Body> {
    Response::builder().body(Body::from(serde_json::to_vec(v).expect("json"))).expect("response")
}

/// A `Status` failure answer.
fn failure(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason,
                        "code": code.as_u16(), "message": message});
    Response::builder().status(code).body(Body::from(serde_json::to_vec(&status).expect("json"))).expect("response")
}

/// 404 Not Found.
pub fn not_found() -> Response<Body> {
    failure(StatusCode::NOT_FOUND, "NotFound", "not found")
}

/// 500 Internal Server Error.
pub fn server_error() -> Response<Body> {
    failure(StatusCode::INTERNAL_SERVER_ERROR, "InternalError", "etcd unavailable")
}

/// 409 Conflict: the `resourceVersion` precondition failed.
pub fn conflict() -> Response<Body> {
    failure(StatusCode::CONFLICT, "Conflict", "the object has been modified")
}

/// 409 Conflict: a create found the name taken.
pub fn already_exists() -> Response<Body> {
    failure(StatusCode::CONFLICT, "AlreadyExists", "already exists")
}

/// `s` as the API server sends it (with `apiVersion` and `kind`).
pub fn secret_json(s: &Secret) -> Value {
    let mut v = serde_json::to_value(s).unwrap_or_default();
    v["apiVersion"] = "v1".into();
    v["kind"] = "Secret".into();
    v
}

/// A token endpoint that counts calls and hands out `at-<n>` tokens valid for an hour.
#[derive(Default)]
pub struct Canned {
    /// Calls so far (token requests, revocations and device authorizations).
    pub calls: AtomicUsize,
    /// The revocations asked for: the endpoint, the token type hint and the token.
    pub revoked: Mutex<Vec<(String, &'static str, String)>>,
}

impl Canned {
    /// Calls so far.
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// The revocations asked for so far.
    pub fn revoked(&self) -> Vec<(String, &'static str, String)> {
        self.revoked.lock().map(|r| r.clone()).unwrap_or_default()
    }
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

    fn revoke<'a>(&'a self, request: &'a RevokeRequest) -> BoxFuture<'a, Result<(), Rejected>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if let Ok(mut r) = self.revoked.lock() {
            r.push((request.url.clone(), request.hint, request.token.expose_secret().to_owned()));
        }
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

/// A context over `client` at `now`, with `tokens` as the token endpoint and stores holding
/// `provider` and `bindings`.
pub fn context(
    client: Client,
    now: DateTime<chrono::Utc>,
    tokens: Arc<dyn TokenEndpoint>,
    provider: MailProvider,
    bindings: &[MailboxBinding],
) -> Context {
    let (providers, mut pw) = store();
    pw.apply_watcher_event(&watcher::Event::Apply(provider));
    let (cluster_providers, _cw) = store();
    let (binding_store, mut bw) = store();
    for b in bindings {
        bw.apply_watcher_event(&watcher::Event::Apply(b.clone()));
    }
    Context {
        tokens,
        providers,
        cluster_providers,
        bindings: binding_store,
        clock: Arc::new(Fixed(now)),
        ..Context::test(client)
    }
}

/// An owned-Secret cache that has listed `secrets` (their metadata) and nothing else, each as
/// the API server shows it: the operator's field manager owns every data key no other manager
/// took.
pub fn owned_cache(secrets: &[Secret]) -> OwnedSecrets {
    let cache = OwnedSecrets::watched();
    cache.observe(&watcher::Event::Init);
    for s in secrets {
        let mut meta = PartialObjectMeta::<Secret> { metadata: s.metadata.clone(), ..Default::default() };
        let others = crate::policy::at_rest::data_keys(&meta.metadata, FIELD_MANAGER, false);
        let ours: serde_json::Map<String, Value> = s
            .data
            .iter()
            .flatten()
            .map(|(k, _)| k)
            .filter(|k| !others.contains(k))
            .map(|k| (format!("f:{k}"), json!({})))
            .collect();
        meta.metadata.managed_fields.get_or_insert_with(Vec::new).push(ManagedFieldsEntry {
            manager: Some(FIELD_MANAGER.into()),
            operation: Some("Apply".into()),
            fields_v1: Some(FieldsV1(json!({"f:data": ours}))),
            ..Default::default()
        });
        slim(&mut meta);
        cache.observe(&watcher::Event::InitApply(meta));
    }
    cache.observe(&watcher::Event::InitDone);
    cache
}
