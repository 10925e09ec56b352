//! Scenarios: the exact Kubernetes API calls of a binding reconcile, against a mocked API server
//! (`mail_oauth_operator::testing::apiserver`, which answers request by request), with the token
//! endpoint replaced by a canned one and the clock fixed.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use http::Method;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::Client;
use mail_oauth_operator::api::{Endpoints, Grant, MailProvider, MailboxBinding};
use mail_oauth_operator::controller::{Context, binding};
use mail_oauth_operator::policy::grant_state::{GrantState, Issuer};
use mail_oauth_operator::testing::apiserver::{
    self, ApiServer, Canned, already_exists, conflict, ok, owned_cache, secret_json, server_error,
};
use mail_oauth_operator::testing::{t, written_secrets};
use serde_json::{Value, json};

const NS: &str = "mail";

fn now() -> DateTime<Utc> {
    t(0)
}

/// The Microsoft preset for `contoso.com`, Ready; of its endpoints only the token endpoint (each
/// scenario adds the one its grant needs).
fn provider() -> MailProvider {
    MailProvider::test()
        .named("contoso")
        .in_namespace(NS)
        .microsoft("contoso.com")
        .client_id("app-id")
        .client_secret(Some("contoso-oauth"))
        .ready()
        .endpoints_with(|e| *e = Endpoints { token: e.token.take(), ..Endpoints::default() })
}

/// `mail/helpdesk`: client credentials for `helpdesk@contoso.com`, published as
/// `helpdesk-mail-token`.
fn binding_object() -> MailboxBinding {
    MailboxBinding::test().named("helpdesk").in_namespace(NS).provider("contoso").mailbox("helpdesk@contoso.com")
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
    Arc::new(apiserver::context(client, now(), tokens, provider, bindings))
}

/// `ctx` with an owned-Secret cache that has listed `secrets` (their metadata) and nothing else.
fn cached(ctx: Arc<Context>, secrets: &[Secret]) -> Arc<Context> {
    let ctx = Arc::try_unwrap(ctx).unwrap_or_else(|_| panic!("one reference"));
    Arc::new(Context { owned: owned_cache(secrets), ..ctx })
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
const BINDING_PATH: &str = "/apis/mailoauth.io/v1alpha1/namespaces/mail/mailboxbindings/helpdesk";

fn mocked() -> (Client, ApiServer) {
    apiserver::mocked(NS)
}

/// The grant of `binding_object()` obtained five minutes ago, valid 55 minutes more, bound to
/// `issuer`.
fn helpdesk_grant(issuer: Option<Issuer>) -> GrantState {
    GrantState {
        refresh_token: None,
        access_token: "at-0".to_owned().into(),
        issued_at: now() - Duration::minutes(5),
        expires_at: now() + Duration::minutes(55),
        scopes: vec!["https://outlook.office365.com/.default".into()],
        requested_scopes: vec!["https://outlook.office365.com/.default".into()],
        provider: "MailProvider/contoso".into(),
        client_id: "app-id".into(),
        mailbox: Some("helpdesk@contoso.com".into()),
        issuer,
        ..GrantState::test()
    }
}

/// A binding made Ready five minutes ago, and its two Secrets as the operator wrote them.
fn at_rest_binding() -> (MailboxBinding, Secret, Secret) {
    let grant = helpdesk_grant(Some(Issuer {
        token_url: "https://login.microsoftonline.com/contoso.com/oauth2/v2.0/token".into(),
        revocation_url: None,
        client_auth: "client_secret_post".into(),
    }));
    let b = binding_object().refreshed(now() - Duration::minutes(5), &grant);
    let (grant_secret, published) = written_secrets(&b, &grant, &provider().spec);
    (b, grant_secret, published)
}

/// The binding of the paste scenario: an authorization code grant, a response pasted for a
/// request that no longer waits (no grant state holds one), and someone else's annotation.
fn pasted_binding() -> MailboxBinding {
    binding_object()
        .grant(Grant::AuthorizationCode {})
        .annotated(
            mail_oauth_operator::api::AUTHORIZATION_RESPONSE_ANNOTATION,
            "http://localhost:8400/callback?code=stale-code&state=gone",
        )
        .annotated("team.example.com/owner", "mail-ops")
}

/// The provider of the paste scenario: the Microsoft preset with its authorization endpoint.
fn provider_with_authorization() -> MailProvider {
    provider().endpoints_with(|e| {
        e.authorization = Some("https://login.microsoftonline.com/contoso.com/oauth2/v2.0/authorize".into());
    })
}

#[tokio::test]
async fn a_first_reconcile_reads_two_secrets_and_the_client_secret_then_writes_grant_published_and_status() {
    let (client, mut server) = mocked();
    let tokens = Arc::new(Canned::default());
    let b = binding_object().at_version("42");
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
    assert_eq!(tokens.calls(), 1);
    let requeue = format!("{action:?}");
    assert!(requeue.contains("requeue_after: Some("), "{requeue}");
}

#[tokio::test]
async fn a_published_secret_with_relay_keys_carries_the_signature_the_shared_relay_verifies() {
    use mail_oauth_operator::controller::relay_key::RelayKeys;
    use mail_oauth_operator::policy::relay_signature::{Refusal, SigningKey, message};
    let (client, mut server) = mocked();
    let tokens = Arc::new(Canned::default());
    let b = binding_object().with_relay().at_version("42");
    let key = SigningKey::new(&[5; 32]).unwrap_or_else(|e| panic!("{e}"));
    let ctx = context(client, Arc::clone(&tokens), std::slice::from_ref(&b));
    let ctx = Arc::try_unwrap(ctx).unwrap_or_else(|_| panic!("one reference"));
    let ctx = Arc::new(Context { relay_keys: RelayKeys::fixed(key.clone()), ..ctx });
    let reconcile = tokio::spawn(binding::reconcile(Arc::new(b.clone()), ctx));

    server.get(GRANT_PATH, None).await;
    server.get(PUBLISHED_PATH, None).await;
    server.get(CLIENT_SECRET_PATH, Some(client_secret())).await;
    server.create(GRANT_NAME).await;
    let published = server.create(PUBLISHED_NAME).await;
    let data: BTreeMap<String, String> = published["data"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| {
            let bytes = base64::engine::Engine::decode(
                &base64::engine::general_purpose::STANDARD,
                v.as_str().unwrap_or_default(),
            )
            .unwrap_or_default();
            (k.clone(), String::from_utf8(bytes).unwrap_or_default())
        })
        .collect();
    assert!(data.contains_key("relay_password"), "{published}");
    let signature = published["metadata"]["annotations"]["mailoauth.io/relay-signature"].as_str();
    assert!(signature.is_some_and(|s| s.starts_with(&format!("v1.{}.", key.id()))), "{published}");
    let signed = |ns: &str| message(ns, PUBLISHED_NAME, |k| data.get(k).cloned());
    assert_eq!(key.verify(signature, &signed(NS)), Ok(()));
    assert_eq!(key.verify(signature, &signed("elsewhere")), Err(Refusal::BadSignature));
    server.apply_status(STATUS_PATH, &b).await;
    server.event("Normal", "Ready").await;
    server.nothing_more().await;
    reconcile.await.unwrap_or_else(|e| panic!("{e}")).unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::test]
async fn a_reconcile_from_the_copy_its_own_status_write_replaced_waits_for_the_cache_and_requests_nothing() {
    let (client, mut server) = mocked();
    let tokens = Arc::new(Canned::default());
    let b = binding_object().at_version("42").annotated("mailoauth.io/refresh-requested", "1");
    let ctx = context(client, Arc::clone(&tokens), std::slice::from_ref(&b));
    // The status of resourceVersion 42 was just written (recording refresh request "1"); the
    // cache still holds 42, as when a Secret event queues a reconcile before the status event.
    ctx.wrote_status("mail", "helpdesk", Some("42"));
    let reconcile = tokio::spawn(binding::reconcile(Arc::new(b.clone()), Arc::clone(&ctx)));
    server.nothing_more().await;
    let action = reconcile.await.unwrap_or_else(|e| panic!("{e}")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(tokens.calls(), 0, "no second refresh for the same request");
    assert!(format!("{action:?}").contains("200ms"), "{action:?}");
    // Once the cache shows a later version, the binding is reconciled as usual.
    assert!(!ctx.behind_own_write("mail", "helpdesk", Some("43")));
    assert!(!ctx.behind_own_write("mail", "helpdesk", Some("42")), "the write is forgotten once seen past");
}

#[tokio::test]
async fn a_status_write_is_remembered_only_until_the_cache_shows_a_later_copy_and_the_room_goes_back() {
    let (client, _server) = mocked();
    let b = binding_object().at_version("42");
    let ctx = context(client, Arc::new(Canned::default()), std::slice::from_ref(&b));
    let remembered =
        |ctx: &mail_oauth_operator::controller::Context| ctx.written.lock().map_or(usize::MAX, |w| w.len());
    // The write's watch event came before its answer: the cache holds 42, later than the 41
    // written over, so no reconcile can start from 41 and nothing is kept.
    ctx.wrote_status("mail", "helpdesk", Some("41"));
    assert_eq!(remembered(&ctx), 0);
    // Written over the cached 42: kept until the cache shows another copy.
    ctx.wrote_status("mail", "helpdesk", Some("42"));
    assert!(ctx.behind_own_write("mail", "helpdesk", Some("42")));
    mail_oauth_operator::controller::caught_up(&ctx.written, &b.metadata);
    assert_eq!(remembered(&ctx), 1, "the same copy: still behind");
    mail_oauth_operator::controller::caught_up(&ctx.written, &binding_object().at_version("43").metadata);
    assert_eq!(remembered(&ctx), 0);
    // After a burst of first writes (bindings the cache does not hold), the map shrinks as the
    // cache catches up.
    for i in 0..1000 {
        ctx.wrote_status("mail", &format!("b{i}"), Some("1"));
    }
    let grown = ctx.written.lock().map_or(0, |w| w.capacity());
    for i in 0..1000 {
        let mut later = binding_object().at_version("2");
        later.metadata.name = Some(format!("b{i}"));
        mail_oauth_operator::controller::caught_up(&ctx.written, &later.metadata);
    }
    assert_eq!(remembered(&ctx), 0);
    assert!(ctx.written.lock().is_ok_and(|w| w.capacity() < grown / 8), "room given back");
}

#[tokio::test]
async fn a_reconcile_with_nothing_to_do_reads_and_writes_nothing_else() {
    let (client, mut server) = mocked();
    let tokens = Arc::new(Canned::default());
    let grant = helpdesk_grant(None);
    let b = binding_object().refreshed(now() - Duration::minutes(5), &grant);
    let (grant_secret, mut published) = written_secrets(&b, &grant, &provider().spec);
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
    assert_eq!(tokens.calls(), 0, "no token request");
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
    assert_eq!(tokens.calls(), 0, "no token request");
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
    assert_eq!(tokens.calls(), 0, "no token request");

    // The provider's token endpoint changed: the grant state is read (the decision needs it), and
    // a grant that holds no refresh token is obtained again there.
    let (client, mut server) = mocked();
    let (b, grant_secret, published) = at_rest_binding();
    let moved = revoking_provider().endpoints_with(|e| e.token = Some("https://idp.example.com/token".into()));
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
    assert_eq!(tokens.calls(), 1);
}

#[tokio::test]
async fn a_first_grant_creates_its_secrets_reading_only_whether_its_published_name_is_taken() {
    let (client, mut server) = mocked();
    let tokens = Arc::new(Canned::default());
    let b = binding_object().at_version("42");
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
    assert_eq!(tokens.calls(), 1);

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
    assert_eq!(tokens.calls(), 1, "no token request");
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
    send.send_response(already_exists());
    let foreign = json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": PUBLISHED_NAME, "namespace": NS, "resourceVersion": "7"}, "data": {"password": "eA=="}});
    server.get(PUBLISHED_PATH, Some(foreign.clone())).await;
    let status = server.apply_status(STATUS_PATH, &b).await;
    assert_eq!(status["status"]["conditions"][0]["reason"], "SecretConflict", "{status}");
    server.event("Warning", "SecretConflict").await;
    server.nothing_more().await;
    first.await.unwrap_or_else(|e| panic!("{e}")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(tokens.calls(), 0);

    // From now on that name is read, and the conflict seen before anything is written.
    let second = tokio::spawn(binding::reconcile(Arc::new(b.clone()), Arc::clone(&ctx)));
    server.get(GRANT_PATH, Some(secret_json(&grant_secret))).await;
    server.get(PUBLISHED_PATH, Some(foreign)).await;
    let status = server.apply_status(STATUS_PATH, &b).await;
    assert_eq!(status["status"]["conditions"][0]["reason"], "SecretConflict");
    server.event("Warning", "SecretConflict").await;
    server.nothing_more().await;
    second.await.unwrap_or_else(|e| panic!("{e}")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(tokens.calls(), 0);
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
        a.remove(mail_oauth_operator::api::SOURCE_ANNOTATION);
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
    assert_eq!(tokens.calls(), 0, "no token request");
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
    assert!(matches!(result, Err(mail_oauth_operator::Error::WriteGrantState { .. })), "{result:?}");
    // The same credentials are in the Secret: nothing is kept to be written "first" next time (a
    // kept state would make the next reconcile record a refresh that never happened).
    assert!(ctx.take_pending(NS, "helpdesk").is_none());
    assert_eq!(tokens.calls(), 0);
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
    assert_eq!(tokens.calls(), 0, "no token request");
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
    assert!(matches!(result, Err(mail_oauth_operator::Error::WriteGrantState { .. })), "{result:?}");
    assert_eq!(tokens.calls(), 1);

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
    assert_eq!(tokens.calls(), 1, "the rotated token was not dropped and re-requested");
}

#[tokio::test]
async fn a_refresh_whose_status_write_meets_a_stale_copy_is_written_again_from_the_current_object() {
    let (client, mut server) = mocked();
    let tokens = Arc::new(Canned::default());
    let b = binding_object().at_version("41").annotated("mailoauth.io/refresh-requested", "1");
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
    // Meanwhile a person asked for another refresh: that one has not been acted on.
    let current = b.clone().at_version("42").annotated("mailoauth.io/refresh-requested", "2");
    server.get(BINDING_PATH, Some(serde_json::to_value(&current).expect("json"))).await;
    let status = server.apply_status(STATUS_PATH, &current).await;
    assert_eq!(status["metadata"]["resourceVersion"], "42");
    assert!(status["status"]["lastRefreshTime"].is_string(), "the refresh is recorded: {status}");
    assert_eq!(status["status"]["lastRefreshRequest"], "1", "only the request acted on is recorded");
    server.event("Normal", "Ready").await;
    server.nothing_more().await;
    reconcile.await.expect("joined").expect("reconcile");
    assert_eq!(tokens.calls(), 1);
}

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
    assert_eq!(tokens.calls(), 0, "a response that answers no request is not exchanged");
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
    let p = provider().endpoints_with(|e| {
        e.device_authorization = Some("https://login.microsoftonline.com/contoso.com/oauth2/v2.0/devicecode".into());
    });
    let mut b = binding_object().grant(Grant::DeviceCode {}).at_version("1");
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
    b = b.at_version("2").annotated("mailoauth.io/reauthorize-requested", "1");
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
    assert_eq!(tokens.calls(), 2, "two device authorizations, no token request");
}

/// A provider with a revocation endpoint (as `revokeOnDelete` needs): since the grant below was
/// obtained, another one than the grant recorded.
fn revoking_provider() -> MailProvider {
    provider().endpoints_with(|e| e.revocation = Some("https://login.example/contoso/revoke-v2".into()))
}

/// The grant of a binding deleted with `revokeOnDelete`: a refresh token, bound to the provider's
/// token endpoint and to the revocation endpoint known when it was obtained.
fn revocable_grant() -> GrantState {
    GrantState {
        refresh_token: Some("rt-1".to_owned().into()),
        ..helpdesk_grant(Some(Issuer {
            token_url: "https://login.microsoftonline.com/contoso.com/oauth2/v2.0/token".into(),
            revocation_url: Some("https://login.example/contoso/revoke".into()),
            client_auth: "client_secret_post".into(),
        }))
    }
}

#[tokio::test]
async fn a_deleted_binding_revokes_its_refresh_token_where_it_was_issued_then_removes_its_finalizer() {
    let (client, mut server) = mocked();
    let tokens = Arc::new(Canned::default());
    let b = binding_object().spec_with(|s| s.revoke_on_delete = true).deleting().at_version("7");
    let (grant_secret, _) = written_secrets(&b, &revocable_grant(), &provider().spec);
    let ctx = context_with(client, Arc::clone(&tokens), std::slice::from_ref(&b), revoking_provider());
    let reconcile = tokio::spawn(binding::reconcile(Arc::new(b.clone()), ctx));

    server.get(GRANT_PATH, Some(secret_json(&grant_secret))).await;
    server.get(CLIENT_SECRET_PATH, Some(client_secret())).await;
    let note = server.event("Normal", "Revoked").await;
    assert!(note.contains("refresh_token"), "{note}");
    // The finalizer goes by a merge patch conditioned on the version the reconcile started from.
    let (patch, sent, send) = server.expect_sent(Method::PATCH, BINDING_PATH).await;
    assert_eq!(sent.content_type, "application/merge-patch+json");
    assert_eq!(patch, json!({"metadata": {"finalizers": [], "resourceVersion": "7"}}));
    send.send_response(ok(&serde_json::to_value(&b).expect("json")));
    server.nothing_more().await;

    reconcile.await.expect("joined").expect("reconcile");
    assert_eq!(
        tokens.revoked(),
        [("https://login.example/contoso/revoke".to_owned(), "refresh_token", "rt-1".to_owned())],
        "the refresh token, at the endpoint recorded with the grant (not the provider's new one)"
    );
    assert_eq!(tokens.calls(), 1, "nothing but the revocation");
}

#[tokio::test]
async fn a_deleted_binding_whose_provider_no_longer_issued_its_grant_sends_the_token_nowhere() {
    let (client, mut server) = mocked();
    let tokens = Arc::new(Canned::default());
    let b = binding_object().spec_with(|s| s.revoke_on_delete = true).deleting().at_version("7");
    let (grant_secret, _) = written_secrets(&b, &revocable_grant(), &provider().spec);
    // The provider now names another token endpoint: it is not the grant's issuer any more.
    let moved = revoking_provider().endpoints_with(|e| e.token = Some("https://idp.example.com/token".into()));
    let ctx = context_with(client, Arc::clone(&tokens), std::slice::from_ref(&b), moved);
    let reconcile = tokio::spawn(binding::reconcile(Arc::new(b.clone()), ctx));

    server.get(GRANT_PATH, Some(secret_json(&grant_secret))).await;
    let note = server.event("Warning", "RevocationFailed").await;
    assert!(note.contains("was not revoked") && note.contains("nothing was sent anywhere"), "{note}");
    let (patch, send) = server.expect(Method::PATCH, BINDING_PATH).await;
    assert_eq!(patch, json!({"metadata": {"finalizers": [], "resourceVersion": "7"}}));
    send.send_response(ok(&serde_json::to_value(&b).expect("json")));
    server.nothing_more().await;

    reconcile.await.expect("joined").expect("reconcile");
    assert!(tokens.revoked().is_empty(), "{:?}", tokens.revoked());
    assert_eq!(tokens.calls(), 0);
}
