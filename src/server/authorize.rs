//! The authorization listener for the authorizationCode grant, on its own address (off unless
//! `--callback-address` is set).
//!
//! Who may start an authorization: whoever can read the binding. The reconciler shows the start
//! link `<public URL>/authorize/<namespace>/<name>?start=<random>` (256 bits from the operating
//! system's random source) in the binding's status, which only readers of that namespace see.
//! `/authorize` compares the presented `start` with the one in the cached binding before anything
//! else, and answers every mismatch — an unknown binding, one not waiting, a wrong or missing
//! `start` — with one page that says nothing about the binding, from the cache alone. With the
//! right link it makes a fresh PKCE request, stores it in the grant-state Secret (a write that
//! fails if the Secret changed since it was read), sets a cookie that binds the request to this
//! browser (`<state>~<start>`, `HttpOnly`, `SameSite=Lax`, only sent to `/callback`), and sends
//! the browser to the provider's resolved authorization endpoint and nowhere else.
//!
//! `/callback` first checks that the browser holds the cookie for the `state` it brings back and
//! that the cookie carries the binding's current start token, again from the cache alone: a
//! response completed in another browser (a captured redirect, login CSRF) or a request from
//! someone who never had the link is refused with one generic page and reaches no apiserver.
//! Then it checks the response answers the stored request (state, expiry, binding uid and
//! generation, used once), stores the code for the reconciler with a precondition on the version
//! read, waits a moment for the result and tells the person in plain words what happened.
//!
//! Every response carries a strict Content-Security-Policy, `X-Frame-Options: DENY`,
//! `Referrer-Policy: no-referrer` (the start link never leaks to the provider through a Referer),
//! `Cache-Control: no-store` and `nosniff`. Requests are bounded: 32 in flight (more are answered
//! 503 at once), 30 s each, no body, an 8 KiB request target. The listener's apiserver requests go
//! through a client of its own with its own rate limit (`--listener-api-qps`), so that however
//! many browsers call it, the lease renewals and reconciles keep their budget. No token, apiserver
//! error or provider text is ever shown.

use std::sync::Arc;
use std::time::Duration as StdDuration;

use axum::Router;
use axum::error_handling::HandleErrorLayer;
use axum::extract::{DefaultBodyLimit, Path, RawQuery, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, ResourceExt};
use tower::ServiceBuilder;
use tower::limit::GlobalConcurrencyLimitLayer;

use crate::api::{FIELD_MANAGER, Grant, MailboxBinding, Phase};
use crate::controller::obtain::{AUTHORIZATION_REQUEST_LIFETIME, authorization_request, request_pending};
use crate::controller::resolve::provider_for;
use crate::controller::secrets::{Role, desired, grant_secret_name};
use crate::controller::{Context, Contexts};
use crate::oauth::authorize::{Response as Answer, binding_of, parse_response, same_state, start_of};
use crate::oauth::grants::authorization_code::METHOD;
use crate::oauth::grants::flow_for;
use crate::policy::grant_state::PendingAuthorization;

/// How long `/callback` waits for the reconciler's result before answering.
const RESULT_WAIT: StdDuration = StdDuration::from_secs(20);

/// How the listener is bounded.
#[derive(Clone, Copy, Debug)]
pub struct Bounds {
    /// Requests served at once; more are answered 503 at once, not queued.
    pub in_flight: usize,
    /// The longest one request may take (the callback's wait for the result included).
    pub timeout: StdDuration,
}

impl Default for Bounds {
    fn default() -> Self {
        Self { in_flight: 32, timeout: StdDuration::from_secs(30) }
    }
}

/// The largest request body read (the listener only serves GET).
const MAX_BODY: usize = 4096;

/// The longest request target (path and query) served: a provider's code and state fit easily.
const MAX_TARGET: usize = 8192;

/// The cookie binding a request to the browser that started it: `mailoauth_<binding key>`, one
/// per binding, so that two mailboxes can be authorized side by side.
const COOKIE_PREFIX: &str = "mailoauth_";

/// `Content-Security-Policy` of every response: nothing but the inline style of the pages.
const CSP: &str =
    "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

/// The router, with the default bounds.
pub fn router(contexts: Contexts) -> Router {
    router_with(contexts, Bounds::default())
}

/// The router with `bounds`: the security headers on every response (including the listener's
/// own refusals), the request-target bound, then the concurrency limit with load shedding and
/// the per-request timeout, then the two routes.
pub fn router_with(contexts: Contexts, bounds: Bounds) -> Router {
    let limits = ServiceBuilder::new()
        .layer(HandleErrorLayer::new(refused_by_bounds))
        .load_shed()
        .layer(GlobalConcurrencyLimitLayer::new(bounds.in_flight))
        .timeout(bounds.timeout);
    Router::new()
        .route("/authorize/{namespace}/{name}", get(authorize))
        .route("/callback", get(callback))
        .with_state(contexts)
        .layer(limits)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn(bounded_target))
        .layer(middleware::map_response(secured))
}

/// Serves until `shutdown`. `contexts` are the controllers' caches with the listener's own
/// apiserver client.
pub async fn serve(
    address: std::net::SocketAddr,
    contexts: Contexts,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> crate::Result<()> {
    let serve_error = |source| crate::Error::Serve { address: address.to_string(), source };
    let listener = tokio::net::TcpListener::bind(address).await.map_err(serve_error)?;
    let listener = Connections::new(listener, MAX_CONNECTIONS, CONNECTION_IDLE);
    tracing::info!(%address, "serving /authorize and /callback");
    axum::serve(listener, router(contexts)).with_graceful_shutdown(shutdown).await.map_err(serve_error)
}

/// Connections open at once: beyond them, new ones wait in the kernel's backlog, so that the
/// listener can never take the file descriptors the apiserver and token connections need.
const MAX_CONNECTIONS: usize = 256;

/// How long a connection may send nothing before it is closed (an idle keep-alive, or a request
/// dribbled in byte by byte); longer than a request may take.
const CONNECTION_IDLE: StdDuration = StdDuration::from_secs(60);

/// A TCP listener that holds at most `slots` connections open and closes a connection that has
/// sent nothing for `idle`.
pub struct Connections {
    listener: tokio::net::TcpListener,
    slots: Arc<tokio::sync::Semaphore>,
    idle: StdDuration,
}

impl Connections {
    /// Wraps `listener`.
    pub fn new(listener: tokio::net::TcpListener, slots: usize, idle: StdDuration) -> Self {
        Self { listener, slots: Arc::new(tokio::sync::Semaphore::new(slots)), idle }
    }
}

impl axum::serve::Listener for Connections {
    type Io = Connection;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        // The semaphore is never closed; were it, no connection would be taken any more.
        let Ok(slot) = Arc::clone(&self.slots).acquire_owned().await else {
            return std::future::pending().await;
        };
        let (stream, address) = axum::serve::Listener::accept(&mut self.listener).await;
        let idle = Box::pin(tokio::time::sleep(self.idle));
        (Connection { stream, _slot: slot, idle, after: self.idle }, address)
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}

/// One accepted connection: holds its slot until dropped; a read that finds nothing for its
/// idle time fails, which closes the connection.
pub struct Connection {
    stream: tokio::net::TcpStream,
    _slot: tokio::sync::OwnedSemaphorePermit,
    idle: std::pin::Pin<Box<tokio::time::Sleep>>,
    after: StdDuration,
}

impl tokio::io::AsyncRead for Connection {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::future::Future;
        let this = self.get_mut();
        let before = buf.filled().len();
        match std::pin::Pin::new(&mut this.stream).poll_read(cx, buf) {
            std::task::Poll::Ready(result) => {
                if buf.filled().len() > before
                    && let Some(next) = tokio::time::Instant::now().checked_add(this.after)
                {
                    this.idle.as_mut().reset(next);
                }
                std::task::Poll::Ready(result)
            }
            std::task::Poll::Pending => match this.idle.as_mut().poll(cx) {
                std::task::Poll::Ready(()) => {
                    std::task::Poll::Ready(Err(std::io::Error::from(std::io::ErrorKind::TimedOut)))
                }
                std::task::Poll::Pending => std::task::Poll::Pending,
            },
        }
    }
}

impl tokio::io::AsyncWrite for Connection {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// The binding and the context that serves it.
fn find(contexts: &Contexts, namespace: &str, name: &str) -> Option<(Arc<Context>, Arc<MailboxBinding>)> {
    let all = contexts.lock().ok()?.clone();
    all.into_iter().find_map(|ctx| {
        let b = ctx.bindings.get(&ObjectRef::new(name).within(namespace))?;
        Some((ctx, b))
    })
}

/// A binding waiting for a person through this listener, as the cache shows it.
struct Waiting {
    ctx: Arc<Context>,
    binding: Arc<MailboxBinding>,
    /// The start token of the link its status shows.
    start: String,
    /// That link.
    link: String,
}

/// The cached binding `namespace/name` with the start token its status shows, whatever it is
/// waiting for.
fn with_start(contexts: &Contexts, namespace: &str, name: &str) -> Option<Waiting> {
    let (ctx, binding) = find(contexts, namespace, name)?;
    let base = ctx.authorization.link_base.as_deref()?;
    let link = format!("{base}/authorize/{namespace}/{name}");
    let shown = binding.status.as_ref()?.authorization.as_ref()?.url.clone()?;
    let start = start_of(&shown, &link)?.to_owned();
    Some(Waiting { ctx, binding, start, link: shown })
}

/// Whether the binding waits for a person to complete an authorization code grant.
fn awaits_code(binding: &MailboxBinding) -> bool {
    let waiting = binding.status.as_ref().is_some_and(|s| {
        s.phase == Some(Phase::AwaitingAuthorization) && s.authorization.as_ref().is_some_and(|a| a.method == METHOD)
    });
    waiting && matches!(binding.spec.grant, Grant::AuthorizationCode {})
}

/// The value of `key` in a query string.
fn query_value(query: Option<&str>, key: &str) -> Option<String> {
    url::form_urlencoded::parse(query?.as_bytes()).find(|(k, _)| k == key).map(|(_, v)| v.into_owned())
}

// ---------- the cookie ----------

/// The cookie's name for a `state` the operator made (`<binding key>.<random>`).
fn cookie_name(state: &str) -> Option<String> {
    let (key, _) = state.rsplit_once('.')?;
    let token = !key.is_empty() && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    token.then(|| format!("{COOKIE_PREFIX}{key}"))
}

/// What the cookie holds: the state issued to this browser and the start token it came with.
fn cookie_value(state: &str, start: &str) -> String {
    format!("{state}~{start}")
}

/// `Set-Cookie` for a request made for this browser: sent back only to the callback's path,
/// never to another site's request (`SameSite=Lax` still sends it on the provider's top-level
/// redirect), invisible to scripts, gone when the request expires; `Secure` behind https.
fn set_cookie(state: &str, start: &str, redirect_uri: &str) -> Option<HeaderValue> {
    let name = cookie_name(state)?;
    let url = url::Url::parse(redirect_uri).ok()?;
    let secure = if url.scheme() == "https" { "; Secure" } else { "" };
    let value = format!(
        "{name}={}; Path={}; Max-Age={}; HttpOnly; SameSite=Lax{secure}",
        cookie_value(state, start),
        url.path(),
        AUTHORIZATION_REQUEST_LIFETIME.num_seconds()
    );
    HeaderValue::from_str(&value).ok()
}

/// `Set-Cookie` that removes the cookie once its request is answered.
fn clear_cookie(state: &str, redirect_uri: &str) -> Option<HeaderValue> {
    let name = cookie_name(state)?;
    let path = url::Url::parse(redirect_uri).ok()?.path().to_owned();
    HeaderValue::from_str(&format!("{name}=; Path={path}; Max-Age=0; HttpOnly; SameSite=Lax")).ok()
}

/// Every value the browser sent for cookie `name` (the `Cookie` headers, `a=b; c=d`).
fn cookies<'a>(headers: &'a HeaderMap, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .filter(move |(k, _)| *k == name)
        .map(|(_, v)| v.trim().trim_matches('"'))
}

/// Whether this browser holds the cookie for `state` issued with the binding's current `start`.
fn browser_holds(headers: &HeaderMap, state: &str, start: &str) -> bool {
    let Some(name) = cookie_name(state) else { return false };
    let want = cookie_value(state, start);
    // Every candidate is compared (no early exit on which one matched).
    cookies(headers, &name).fold(false, |found, have| same_state(have, &want) | found)
}

// ---------- pages and headers ----------

fn page(status: StatusCode, title: &str, lines: &[String]) -> Response {
    let body: String = lines.iter().map(|l| format!("<p>{}</p>", escape(l))).collect();
    let html = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{t}</title></head>\
         <body style=\"font-family:sans-serif;max-width:40em;margin:3em auto\"><h1>{t}</h1>{body}</body></html>",
        t = escape(title)
    );
    (status, Html(html)).into_response()
}

fn escape(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '<' => "&lt;".to_owned(),
            '>' => "&gt;".to_owned(),
            '&' => "&amp;".to_owned(),
            '"' => "&quot;".to_owned(),
            '\'' => "&#39;".to_owned(),
            c => c.to_string(),
        })
        .collect()
}

/// The one answer to a start link that does not start anything: the same page whether the
/// binding exists or not, waits or not.
fn invalid_link(namespace: &str, name: &str) -> Response {
    page(
        StatusCode::NOT_FOUND,
        "This link is not valid",
        &[
            "This link is not valid or has expired.".into(),
            format!("kubectl get mbx -n {namespace} {name} -o wide shows the current link."),
        ],
    )
}

/// The one answer to a callback that this browser did not start with a current link.
fn refused_callback() -> Response {
    page(
        StatusCode::BAD_REQUEST,
        "This sign-in cannot be completed here",
        &[
            "This answer from the sign-in page does not belong to a sign-in started in this browser, or it has \
             expired. Nothing was changed."
                .into(),
            "Open the link that kubectl get mbx -n <namespace> <name> -o wide shows, in the browser you sign in \
             with, and sign in again."
                .into(),
        ],
    )
}

fn try_again(what: &str) -> Response {
    page(
        StatusCode::SERVICE_UNAVAILABLE,
        "Try again in a moment",
        &[format!("{what} Nothing was changed; open the link again in a moment.")],
    )
}

fn again(namespace: &str, name: &str) -> String {
    format!(
        "To start again: kubectl annotate mailboxbinding -n {namespace} {name} \
         mailoauth.io/reauthorize-requested=\"$(date +%s)\" --overwrite, then open the link its status shows."
    )
}

/// The headers of every response.
async fn secured(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    response
}

/// Refuses a request target longer than [`MAX_TARGET`] before any handler runs.
async fn bounded_target(request: Request, next: Next) -> Response {
    let uri = request.uri();
    if uri.path().len().saturating_add(uri.query().map_or(0, str::len)) > MAX_TARGET {
        return page(StatusCode::URI_TOO_LONG, "This link cannot be used", &["The address is too long.".into()]);
    }
    next.run(request).await
}

/// The answer when the concurrency limit sheds a request or a request runs out of time.
async fn refused_by_bounds(error: tower::BoxError) -> Response {
    if error.is::<tower::timeout::error::Elapsed>() {
        return page(
            StatusCode::SERVICE_UNAVAILABLE,
            "This took too long",
            &["kubectl get mbx -n <namespace> <name> -o wide shows where the mailbox stands.".into()],
        );
    }
    let mut response =
        page(StatusCode::SERVICE_UNAVAILABLE, "Busy", &["Too many requests at once; try again in a moment.".into()]);
    response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
    response
}

// ---------- the grant-state Secret ----------

/// Why a write of the grant state did not happen.
enum WriteError {
    /// The Secret changed since it was read (or was created meanwhile).
    Changed,
    /// Anything else (logged, never shown).
    Failed(kube::Error),
}

impl From<kube::Error> for WriteError {
    fn from(e: kube::Error) -> Self {
        match e {
            kube::Error::Api(ref s) if s.code == 409 => WriteError::Changed,
            e => WriteError::Failed(e),
        }
    }
}

/// Writes `pending` as the whole grant state, as `persist_pending` does, but only over the
/// version read (`read`: its `resourceVersion`, `None` when it was absent). An absent Secret is
/// created empty first (which fails if someone created it meanwhile), then written over that
/// version: a concurrent writer makes this fail instead of being overwritten.
async fn write_pending(
    api: &Api<Secret>,
    binding: &MailboxBinding,
    pending: &PendingAuthorization,
    read: Option<String>,
    relay: Option<&crate::policy::relay::RelayCredentials>,
) -> Result<(), WriteError> {
    let name = grant_secret_name(&binding.name_any());
    // Relay credentials stored beside an authorization stay (devices keep their password).
    let mut data = pending.encode();
    data.extend(crate::policy::relay::RelayCredentials::encoded(relay));
    let mut want = desired(binding, &name, Role::Grant, data);
    let version = match read {
        Some(version) => version,
        None => {
            let empty = Secret { data: None, ..want.clone() };
            let params = PostParams { field_manager: Some(FIELD_MANAGER.to_owned()), ..PostParams::default() };
            api.create(&params, &empty).await?.metadata.resource_version.unwrap_or_default()
        }
    };
    want.metadata.resource_version = Some(version);
    let mut body = serde_json::to_value(&want).map_err(|e| WriteError::Failed(kube::Error::SerdeError(e)))?;
    if let Some(obj) = body.as_object_mut() {
        obj.insert("apiVersion".into(), "v1".into());
        obj.insert("kind".into(), "Secret".into());
    }
    api.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(body)).await?;
    Ok(())
}

/// Whether a grant-state Secret holds a grant (not only an authorization in progress).
fn stored_grant(secret: &Secret) -> bool {
    let data: Option<std::collections::BTreeMap<String, Vec<u8>>> =
        secret.data.as_ref().map(|d| d.iter().map(|(k, v)| (k.clone(), v.0.clone())).collect());
    data.as_ref().and_then(crate::policy::grant_state::GrantState::decode).is_some()
}

/// The redirect to the provider: `url` only when it is at the provider's resolved authorization
/// endpoint (same scheme, host, port and path), so that the listener never redirects elsewhere.
fn provider_redirect(url: &str, authorization_endpoint: &str) -> Option<String> {
    let target = url::Url::parse(url).ok()?;
    let endpoint = url::Url::parse(authorization_endpoint).ok()?;
    let same = target.scheme() == endpoint.scheme()
        && target.host_str() == endpoint.host_str()
        && target.port_or_known_default() == endpoint.port_or_known_default()
        && target.path() == endpoint.path()
        && target.username().is_empty()
        && target.password().is_none()
        && matches!(target.scheme(), "https" | "http");
    same.then(|| target.to_string())
}

// ---------- the handlers ----------

async fn authorize(
    State(contexts): State<Contexts>,
    path: Result<Path<(String, String)>, axum::extract::rejection::PathRejection>,
    RawQuery(query): RawQuery,
) -> Response {
    let Ok(Path((namespace, name))) = path else {
        return invalid_link("<namespace>", "<name>");
    };
    // The start token before anything else; every way of not matching gives the same page.
    let presented = query_value(query.as_deref(), "start");
    let Some(Waiting { ctx, binding, start, link }) = with_start(&contexts, &namespace, &name)
        .filter(|w| presented.as_deref().is_some_and(|p| same_state(p, &w.start)))
        .filter(|w| awaits_code(&w.binding))
    else {
        return invalid_link(&namespace, &name);
    };
    let flow = flow_for(&binding.spec.grant);
    let usable = match provider_for(&binding, flow.as_deref(), &ctx).await {
        Ok((_, Some(usable))) => usable,
        Ok((_, None)) => {
            return page(
                StatusCode::SERVICE_UNAVAILABLE,
                "The provider is not ready",
                &[format!("kubectl get mbx -n {namespace} {name} -o wide shows what to fix.")],
            );
        }
        Err(e) => {
            tracing::warn!(binding = %name, namespace = %namespace, error = %e, "finding the provider failed");
            return try_again("The provider could not be looked up.");
        }
    };
    let redirect_uri = ctx.authorization.redirect_uri.clone();
    let made = authorization_request(&usable.spec, &usable.endpoints, &usable.scopes, &binding, &redirect_uri);
    let endpoint = usable.endpoints.authorization.as_deref().unwrap_or_default();
    let Some((request, redirect)) =
        made.ok().and_then(|r| provider_redirect(&r.url, endpoint).map(|redirect| (r, redirect)))
    else {
        tracing::warn!(binding = %name, namespace = %namespace, "no authorization request could be made");
        return page(
            StatusCode::SERVICE_UNAVAILABLE,
            "Cannot start",
            &[format!("kubectl get mbx -n {namespace} {name} -o wide shows what to fix.")],
        );
    };
    let Some(cookie) = set_cookie(&request.state, &start, &redirect_uri) else {
        return try_again("The request could not be made.");
    };
    let pending = request_pending(&binding, &usable, ctx.now(), Some((request, redirect_uri)), link);
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let read = match secrets.get_opt(&grant_secret_name(&name)).await {
        // A grant is stored already (the cache still showed the binding waiting): the
        // authorization is done, and a visit of the link never replaces a grant.
        Ok(Some(s)) if stored_grant(&s) => {
            return page(
                StatusCode::CONFLICT,
                "Already authorized",
                &[format!("kubectl get mbx -n {namespace} {name} -o wide shows the binding's state.")],
            );
        }
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(binding = %name, namespace = %namespace, error = %e, "reading the grant state failed");
            return try_again("The request could not be stored.");
        }
    };
    let relay = read.as_ref().and_then(crate::controller::grant_store::decode_relay);
    let read = read.and_then(|s| s.metadata.resource_version);
    match write_pending(&secrets, &binding, &pending, read, relay.as_ref()).await {
        Ok(()) => {}
        Err(WriteError::Changed) => {
            return try_again("The authorization changed while this request was made (another visit of the link?).");
        }
        Err(WriteError::Failed(e)) => {
            tracing::warn!(binding = %name, namespace = %namespace, error = %e, "storing an authorization request failed");
            return try_again("The request could not be stored.");
        }
    }
    tracing::info!(binding = %name, namespace = %namespace, "sending a browser to the provider");
    let mut response = (StatusCode::SEE_OTHER, [(header::LOCATION, redirect)]).into_response();
    response.headers_mut().append(header::SET_COOKIE, cookie);
    response
}

async fn callback(State(contexts): State<Contexts>, headers: HeaderMap, RawQuery(query): RawQuery) -> Response {
    let Some(answer) = query.as_deref().and_then(parse_response) else {
        return refused_callback();
    };
    let state = match &answer {
        Answer::Code { state, .. } => Some(state.clone()),
        Answer::Error { state, .. } => state.clone(),
    };
    // The browser before anything else: it must hold the cookie /authorize set for this state
    // with the binding's current start token. Checked from the cache alone.
    let Some((state, namespace, name)) = state.and_then(|s| binding_of(&s).map(|(ns, n)| (s, ns, n))) else {
        return refused_callback();
    };
    let Some(Waiting { ctx, binding, .. }) =
        with_start(&contexts, &namespace, &name).filter(|w| browser_holds(&headers, &state, &w.start))
    else {
        return refused_callback();
    };
    let code = match answer {
        Answer::Code { code, .. } => code,
        Answer::Error { error, .. } => {
            let what = if error == "access_denied" {
                "You declined the request, so the operator has no access to the mailbox. Nothing was changed."
                    .to_owned()
            } else {
                format!("The provider answered with the error {error} instead of an authorization.")
            };
            return page(StatusCode::OK, "Not authorized", &[what, again(&namespace, &name)]);
        }
    };
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let (stored, read) = match secrets.get_opt(&grant_secret_name(&name)).await {
        Ok(Some(s)) => {
            let data = s.data.map(|d| d.into_iter().map(|(k, v)| (k, v.0)).collect());
            (data, s.metadata.resource_version)
        }
        Ok(None) => (None, None),
        Err(e) => {
            tracing::warn!(binding = %name, namespace = %namespace, error = %e, "reading the grant state failed");
            return try_again("The authorization could not be read.");
        }
    };
    let pending = stored.as_ref().and_then(PendingAuthorization::decode).filter(|p| p.method == METHOD);
    let now = ctx.now();
    let Some((pending, read)) = pending
        .filter(|p| {
            p.state.as_deref().is_some_and(|s| same_state(s, &state))
                && p.code.is_none()
                && now < p.expires_at
                && p.binding_uid == binding.uid()
                && p.generation == binding.metadata.generation
        })
        .zip(read)
    else {
        return page(
            StatusCode::BAD_REQUEST,
            "This link cannot be used",
            &[
                "This sign-in was already used, has expired, or belongs to an older request: nothing was changed."
                    .into(),
                again(&namespace, &name),
            ],
        );
    };
    let with_code = PendingAuthorization { code: Some(code), ..pending };
    let relay = stored.as_ref().and_then(crate::policy::relay::RelayCredentials::decode);
    match write_pending(&secrets, &binding, &with_code, Some(read), relay.as_ref()).await {
        Ok(()) => {}
        Err(WriteError::Changed) => {
            return page(
                StatusCode::CONFLICT,
                "Try again",
                &[
                    "The authorization changed while this answer arrived (the link was opened again?): nothing was \
                     stored."
                        .into(),
                    again(&namespace, &name),
                ],
            );
        }
        Err(WriteError::Failed(e)) => {
            tracing::warn!(binding = %name, namespace = %namespace, error = %e, "storing an authorization code failed");
            return try_again("The code could not be stored.");
        }
    }
    tracing::info!(binding = %name, namespace = %namespace, "authorization code received");
    let mut response = outcome(&ctx, &namespace, &name, &binding.spec.mailbox).await;
    if let Some(clear) = clear_cookie(&state, &ctx.authorization.redirect_uri) {
        response.headers_mut().append(header::SET_COOKIE, clear);
    }
    response
}

/// Waits for the reconciler to exchange the code, then says how it went.
async fn outcome(ctx: &Context, namespace: &str, name: &str, mailbox: &str) -> Response {
    let key = ObjectRef::new(name).within(namespace);
    let deadline = tokio::time::Instant::now().checked_add(RESULT_WAIT).unwrap_or_else(tokio::time::Instant::now);
    while tokio::time::Instant::now() < deadline {
        // The binding waited for a person when the request was made; once its status no longer
        // shows an authorization to do, the code has been dealt with, one way or the other.
        let status = ctx.bindings.get(&key).and_then(|b| b.status.clone());
        let authorized = status
            .as_ref()
            .filter(|s| s.authorization.is_none() && s.phase != Some(Phase::AwaitingAuthorization))
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Authorized"))
            .filter(|c| c.reason != "AwaitingAuthorization")
            .cloned();
        if let Some(c) = authorized {
            return if c.is_true() {
                page(
                    StatusCode::OK,
                    "Done",
                    &[
                        format!(
                            "The operator now has access to {mailbox}; its token is published and renewed from now on."
                        ),
                        "You can close this window.".into(),
                    ],
                )
            } else {
                // An InvalidSpec message may quote the apiserver: not shown here.
                let what = if c.reason == crate::policy::Reason::InvalidSpec.as_str() {
                    format!("The mailbox could not be set up: kubectl get mbx -n {namespace} {name} -o wide shows why.")
                } else {
                    c.message
                };
                page(StatusCode::OK, "Not authorized", &[what, again(namespace, name)])
            };
        }
        tokio::time::sleep(StdDuration::from_millis(250)).await;
    }
    page(
        StatusCode::ACCEPTED,
        "Received",
        &[
            "The authorization was received and is being completed.".into(),
            format!("kubectl get mailboxbinding -n {namespace} {name} -o wide shows the result."),
        ],
    )
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use base64::Engine;
    use chrono::{DateTime, Utc};
    use http::Method;
    use kube::Client;

    use kube::runtime::reflector::store;
    use kube::runtime::watcher;
    use serde_json::{Value, json};
    use tower::ServiceExt;
    use tower_test::mock::{self, Handle, SendResponse};

    use super::*;
    use crate::api::{Condition, ConditionStatus, Endpoints, MailProvider, MailProviderStatus};

    const NS: &str = "mail";
    const BASE: &str = "https://mail-auth.example";
    const ENDPOINT: &str = "https://login.example/contoso/oauth2/v2.0/authorize";
    /// A start token as the reconciler makes them (43 characters, 256 bits).
    const START: &str = "q2gC0VYvC1Sx3hN7c5kS9xQmJ4pL8rT6wZ1aB3dE5fG";

    type KubeBody = kube::client::Body;
    type ApiServer = Handle<http::Request<KubeBody>, http::Response<KubeBody>>;

    fn now() -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).unwrap_or_default()
    }

    struct Fixed;

    impl crate::controller::Clock for Fixed {
        fn now(&self) -> DateTime<Utc> {
            now()
        }
    }

    fn link(name: &str) -> String {
        format!("{BASE}/authorize/{NS}/{name}?start={START}")
    }

    fn provider() -> MailProvider {
        let spec = serde_json::from_value(json!({"microsoft": {"tenant": "contoso.com"}, "clientId": "app-id"}))
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
                token: Some("https://login.example/contoso/oauth2/v2.0/token".into()),
                authorization: Some(ENDPOINT.into()),
                ..Default::default()
            }),
            client_secret_expires_at: None,
            observed_generation: Some(1),
        });
        p
    }

    /// A binding of the authorization code grant; waiting for a person with `shown` as its link
    /// when given, else Ready.
    fn binding(name: &str, shown: Option<String>) -> MailboxBinding {
        let spec = serde_json::from_value(json!({
            "providerRef": {"name": "contoso"}, "mailbox": format!("{name}@contoso.com"),
            "grant": {"authorizationCode": {}}, "secretName": format!("{name}-mail-token"),
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        let mut b = MailboxBinding::new(name, spec);
        b.metadata.namespace = Some(NS.into());
        b.metadata.uid = Some(format!("uid-{name}"));
        b.metadata.generation = Some(1);
        let status = match shown {
            Some(url) => json!({"phase": "AwaitingAuthorization",
                                "authorization": {"method": "authorizationCode", "url": url}}),
            None => json!({"phase": "Ready"}),
        };
        b.status = Some(serde_json::from_value(status).unwrap_or_else(|e| panic!("{e}")));
        b
    }

    /// The listener's contexts over `bindings`, with a mocked apiserver.
    fn listener(bindings: &[MailboxBinding]) -> (Contexts, ApiServer) {
        let (service, handle) = mock::pair::<http::Request<KubeBody>, http::Response<KubeBody>>();
        let client = Client::new(service, "default");
        let (providers, mut pw) = store();
        pw.apply_watcher_event(&watcher::Event::Apply(provider()));
        let (cluster_providers, _cw) = store();
        let (binding_store, mut bw) = store();
        for b in bindings {
            bw.apply_watcher_event(&watcher::Event::Apply(b.clone()));
        }
        let ctx = Context {
            providers,
            cluster_providers,
            bindings: binding_store,
            clock: Arc::new(Fixed),
            authorization: crate::controller::AuthorizationSettings {
                redirect_uri: format!("{BASE}/callback"),
                link_base: Some(BASE.into()),
            },
            ..Context::test(client)
        };
        (Arc::new(std::sync::Mutex::new(vec![Arc::new(ctx)])), handle)
    }

    /// One GET through the router: status, headers, body.
    async fn get(app: &Router, uri: &str, cookie: Option<&str>) -> (StatusCode, HeaderMap, String) {
        let mut request = http::Request::builder().method(Method::GET).uri(uri);
        if let Some(c) = cookie {
            request = request.header(header::COOKIE, c);
        }
        let request = request.body(Body::empty()).unwrap_or_else(|e| panic!("{e}"));
        let response = app.clone().oneshot(request).await.unwrap_or_else(|e| match e {});
        let (parts, body) = response.into_parts();
        let bytes = axum::body::to_bytes(body, 1 << 20).await.unwrap_or_default();
        (parts.status, parts.headers, String::from_utf8_lossy(&bytes).into_owned())
    }

    fn assert_secured(headers: &HeaderMap) {
        let h = |name: header::HeaderName| headers.get(&name).and_then(|v| v.to_str().ok()).map(str::to_owned);
        assert_eq!(h(header::CONTENT_SECURITY_POLICY).as_deref(), Some(CSP));
        assert!(CSP.contains("frame-ancestors 'none'") && CSP.contains("default-src 'none'"));
        assert_eq!(h(header::X_FRAME_OPTIONS).as_deref(), Some("DENY"));
        assert_eq!(h(header::REFERRER_POLICY).as_deref(), Some("no-referrer"));
        assert_eq!(h(header::CACHE_CONTROL).as_deref(), Some("no-store"));
        assert_eq!(h(header::X_CONTENT_TYPE_OPTIONS).as_deref(), Some("nosniff"));
    }

    /// The apiserver received nothing (within a moment).
    async fn untouched(api: &mut ApiServer) {
        let next = tokio::time::timeout(StdDuration::from_millis(200), api.next_request()).await;
        if let Ok(Some((request, _))) = next {
            panic!("unexpected apiserver request {} {}", request.method(), request.uri());
        }
    }

    async fn expect(
        api: &mut ApiServer,
        method: Method,
        path: &str,
    ) -> (Value, SendResponse<http::Response<KubeBody>>) {
        let (request, send) = tokio::time::timeout(StdDuration::from_secs(5), api.next_request())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {method} {path}"))
            .unwrap_or_else(|| panic!("no request: expected {method} {path}"));
        assert_eq!((request.method(), request.uri().path()), (&method, path));
        let bytes = request.into_body().collect_bytes().await.unwrap_or_default();
        (serde_json::from_slice(&bytes).unwrap_or(Value::Null), send)
    }

    fn answer(status: u16, v: &Value) -> http::Response<KubeBody> {
        http::Response::builder()
            .status(status)
            .body(KubeBody::from(serde_json::to_vec(v).unwrap_or_default()))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn api_status(code: u16, reason: &str) -> Value {
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code,
               "message": format!("internal detail {reason}")})
    }

    #[test]
    fn text_on_pages_is_escaped() {
        assert_eq!(escape("<b>&\"'"), "&lt;b&gt;&amp;&quot;&#39;");
    }

    #[test]
    fn a_start_link_keeps_its_token_while_shown_and_gets_a_new_random_one_otherwise() {
        use crate::oauth::authorize::start_link;
        let fresh = start_link(BASE, NS, "web", None);
        let token = fresh.strip_prefix(&format!("{BASE}/authorize/{NS}/web?start=")).unwrap_or_default();
        assert_eq!(token.len(), 43, "256 bits, base64url: {fresh}");
        assert_ne!(start_link(BASE, NS, "web", None), fresh, "random each time");
        assert_eq!(start_link(BASE, NS, "web", Some(&fresh)), fresh, "kept while the status shows it");
        assert_ne!(start_link(BASE, NS, "other", Some(&fresh)), link("other"), "another binding's token is not taken");
        assert!(!start_link(BASE, NS, "other", Some(&fresh)).ends_with(token));
        let weak = format!("{BASE}/authorize/{NS}/web?start=abc");
        assert!(!start_link(BASE, NS, "web", Some(&weak)).ends_with("=abc"), "a short token is replaced");
        let odd = format!("{BASE}/authorize/{NS}/web?start={START}&x=1");
        assert!(!start_link(BASE, NS, "web", Some(&odd)).contains("&x=1"));
    }

    #[test]
    fn the_redirect_goes_to_the_providers_authorization_endpoint_and_nowhere_else() {
        let at = format!("{ENDPOINT}?client_id=a&state=s");
        assert_eq!(provider_redirect(&at, ENDPOINT).as_deref(), Some(at.as_str()));
        for elsewhere in [
            "https://evil.example/contoso/oauth2/v2.0/authorize?client_id=a",
            "https://login.example/other/authorize?client_id=a",
            "http://login.example/contoso/oauth2/v2.0/authorize?client_id=a",
            "https://login.example:8443/contoso/oauth2/v2.0/authorize?client_id=a",
            "https://user@login.example/contoso/oauth2/v2.0/authorize",
            "javascript:alert(1)",
            "//evil.example/x",
        ] {
            assert_eq!(provider_redirect(elsewhere, ENDPOINT), None, "{elsewhere}");
        }
        assert_eq!(provider_redirect(&at, ""), None, "no endpoint, no redirect");
    }

    #[test]
    fn the_cookie_is_compared_with_the_state_and_the_start_token() {
        let state = "bWFpbC93ZWI.r4nd0m";
        let mut headers = HeaderMap::new();
        let cookie = set_cookie(state, START, &format!("{BASE}/callback")).unwrap_or_else(|| panic!("cookie"));
        let text = cookie.to_str().unwrap_or_default();
        assert!(text.starts_with(&format!("mailoauth_bWFpbC93ZWI={state}~{START};")), "{text}");
        for part in ["Path=/callback", "Max-Age=900", "HttpOnly", "SameSite=Lax", "Secure"] {
            assert!(text.contains(part), "{part} in {text}");
        }
        let plain = set_cookie(state, START, "http://localhost:8400/prefix/callback").unwrap_or_else(|| panic!("c"));
        assert!(!plain.to_str().unwrap_or_default().contains("Secure"));
        assert!(plain.to_str().unwrap_or_default().contains("Path=/prefix/callback"));
        assert!(!browser_holds(&headers, state, START), "no cookie");
        let sent = |v: &str| HeaderValue::from_str(v).unwrap_or_else(|e| panic!("{e}"));
        headers.insert(header::COOKIE, sent(&format!("a=b; mailoauth_bWFpbC93ZWI={state}~{START}; c=d")));
        assert!(browser_holds(&headers, state, START));
        assert!(!browser_holds(&headers, state, "another-start-token-of-the-same-length-xxxx"));
        assert!(!browser_holds(&headers, "bWFpbC93ZWI.other", START), "another state of the same binding");
        headers.insert(header::COOKIE, sent(&format!("mailoauth_bWFpbC93ZWI={state}")));
        assert!(!browser_holds(&headers, state, START), "the state alone is not enough");
        assert_eq!(cookie_name("no-dot"), None);
        assert_eq!(cookie_name("bad key;x.y"), None);
    }

    #[tokio::test]
    async fn a_missing_or_wrong_start_gets_one_page_for_every_binding_and_never_reaches_the_apiserver() {
        let (contexts, mut api) = listener(&[binding("web", Some(link("web"))), binding("ready", None)]);
        let app = router(contexts);
        let mut wrong = START.to_owned();
        wrong.replace_range(..1, "X");
        let mut pages = Vec::new();
        for (name, query) in [
            ("web", String::new()),
            ("web", "?start=".into()),
            ("web", "?start=abc".into()),
            ("web", format!("?start={wrong}")),
            ("web", format!("?begin={START}")),
            ("nope", format!("?start={START}")),
            ("ready", format!("?start={START}")),
        ] {
            let (status, headers, body) = get(&app, &format!("/authorize/{NS}/{name}{query}"), None).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{name}{query}: {body}");
            assert_secured(&headers);
            assert!(headers.get(header::SET_COOKIE).is_none());
            assert!(!body.contains("contoso.com"), "no mailbox: {body}");
            pages.push(body.replace(name, "NAME"));
        }
        let (status, _, body) = get(&app, &format!("/authorize/elsewhere/web?start={START}"), None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        pages.push(body.replace("elsewhere", NS).replace("web", "NAME"));
        assert!(pages.windows(2).all(|w| w.first() == w.last()), "one page for all: {pages:#?}");
        assert!(pages.first().is_some_and(|p| p.contains("kubectl get mbx -n mail NAME -o wide")));
        untouched(&mut api).await;
    }

    #[tokio::test]
    async fn the_start_link_stores_a_request_over_the_version_read_sets_the_cookie_and_redirects_to_the_provider() {
        let (contexts, mut api) = listener(&[binding("web", Some(link("web")))]);
        let app = router(contexts);
        let visit = tokio::spawn({
            let app = app.clone();
            async move { get(&app, &format!("/authorize/{NS}/web?start={START}"), None).await }
        });
        let grant_path = format!("/api/v1/namespaces/{NS}/secrets/{}", grant_secret_name("web"));
        let (_, send) = expect(&mut api, Method::GET, &grant_path).await;
        send.send_response(answer(404, &api_status(404, "NotFound")));
        // Absent: created empty (fails if someone else created it meanwhile) ...
        let (created, send) = expect(&mut api, Method::POST, &format!("/api/v1/namespaces/{NS}/secrets")).await;
        assert!(created.get("data").is_none_or(Value::is_null), "{created}");
        assert_eq!(created["metadata"]["ownerReferences"][0]["uid"], "uid-web");
        let mut stored = created.clone();
        stored["metadata"]["resourceVersion"] = "7".into();
        send.send_response(answer(201, &stored));
        // ... then the request written over exactly that version.
        let (applied, send) = expect(&mut api, Method::PATCH, &grant_path).await;
        assert_eq!(applied["metadata"]["resourceVersion"], "7", "{applied}");
        send.send_response(answer(200, &applied));
        let (status, headers, _) = visit.await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(status, StatusCode::SEE_OTHER);
        assert_secured(&headers);
        let location = headers.get(header::LOCATION).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
        assert!(location.starts_with(&format!("{ENDPOINT}?")), "{location}");
        let data = |key: &str| {
            let text = applied["data"][key].as_str().unwrap_or_default();
            String::from_utf8(base64::engine::general_purpose::STANDARD.decode(text).unwrap_or_default())
                .unwrap_or_default()
        };
        let state = data("pending_state");
        assert!(location.contains(&format!("state={state}")), "{location}");
        assert_eq!(data("pending_url"), link("web"), "the status keeps the start link");
        let cookie = headers.get(header::SET_COOKIE).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
        let pair = cookie.split(';').next().unwrap_or_default().to_owned();
        assert_eq!(pair, format!("{}={state}~{START}", cookie_name(&state).unwrap_or_default()));
        assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Lax") && cookie.contains("Path=/callback"));
        untouched(&mut api).await;

        // The callback: without the cookie, with another browser's cookie or with a forged one,
        // nothing reaches the apiserver and the page is the same.
        let callback = format!("/callback?code=the-code&state={state}");
        let name = cookie_name(&state).unwrap_or_default();
        let forged = format!("{name}={state}~{}", "A".repeat(43));
        let mut refusals = Vec::new();
        for cookie in [None, Some(forged.as_str()), Some("mailoauth_x=y"), Some(&format!("{name}={state}"))] {
            let (status, headers, body) = get(&app, &callback, cookie).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{cookie:?}: {body}");
            assert_secured(&headers);
            assert!(!body.contains("contoso.com") && !body.contains("web"), "{body}");
            refusals.push(body);
        }
        let (status, _, other) = get(&app, "/callback?code=c&state=bm9wZS9ub3Bl.x", Some(&pair)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        refusals.push(other);
        let (status, _, none) = get(&app, "/callback", None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        refusals.push(none);
        assert!(refusals.windows(2).all(|w| w.first() == w.last()), "{refusals:#?}");
        untouched(&mut api).await;

        // With this browser's cookie: the stored request is read, and the code is written over
        // the version read; a concurrent write (409) is reported, not overwritten.
        let finish = tokio::spawn({
            let app = app.clone();
            async move { get(&app, &callback, Some(&pair)).await }
        });
        let (_, send) = expect(&mut api, Method::GET, &grant_path).await;
        let mut current = applied.clone();
        current["metadata"]["resourceVersion"] = "8".into();
        send.send_response(answer(200, &current));
        let (written, send) = expect(&mut api, Method::PATCH, &grant_path).await;
        assert_eq!(written["metadata"]["resourceVersion"], "8");
        assert!(written["data"]["pending_code"].is_string(), "{written}");
        send.send_response(answer(409, &api_status(409, "Conflict")));
        let (status, headers, body) = finish.await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(status, StatusCode::CONFLICT, "{body}");
        assert_secured(&headers);
        assert!(body.contains("nothing was") && !body.contains("internal detail"), "{body}");
        untouched(&mut api).await;
    }

    #[tokio::test]
    async fn an_apiserver_failure_is_not_shown() {
        let (contexts, mut api) = listener(&[binding("web", Some(link("web")))]);
        let app = router(contexts);
        let visit = tokio::spawn({
            let app = app.clone();
            async move { get(&app, &format!("/authorize/{NS}/web?start={START}"), None).await }
        });
        let grant_path = format!("/api/v1/namespaces/{NS}/secrets/{}", grant_secret_name("web"));
        let (_, send) = expect(&mut api, Method::GET, &grant_path).await;
        send.send_response(answer(500, &api_status(500, "InternalError")));
        let (status, _, body) = visit.await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(!body.contains("internal detail") && !body.contains("InternalError"), "{body}");
    }

    #[tokio::test]
    async fn requests_beyond_the_limit_are_shed_at_once_and_a_slow_one_times_out() {
        let (contexts, mut api) = listener(&[binding("web", Some(link("web")))]);
        let app = router_with(contexts, Bounds { in_flight: 1, timeout: StdDuration::from_millis(700) });
        let slow = tokio::spawn({
            let app = app.clone();
            async move { get(&app, &format!("/authorize/{NS}/web?start={START}"), None).await }
        });
        // The first request waits for the apiserver, which does not answer.
        let grant_path = format!("/api/v1/namespaces/{NS}/secrets/{}", grant_secret_name("web"));
        let (_, _held) = expect(&mut api, Method::GET, &grant_path).await;
        let started = std::time::Instant::now();
        let (status, headers, body) = get(&app, &format!("/authorize/{NS}/nope?start={START}"), None).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(started.elapsed() < StdDuration::from_millis(300), "shed at once, not queued");
        assert_eq!(headers.get(header::RETRY_AFTER).and_then(|v| v.to_str().ok()), Some("5"));
        assert_secured(&headers);
        let (status, headers, body) = slow.await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("took too long"), "{body}");
        assert_secured(&headers);
        // The slot is free again.
        let (status, _, _) = get(&app, &format!("/authorize/{NS}/nope?start={START}"), None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn connections_beyond_the_cap_wait_and_an_idle_one_is_closed() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (contexts, _api) = listener(&[binding("web", Some(link("web")))]);
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap_or_else(|e| panic!("{e}"));
        let address = tcp.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let bounded = Connections::new(tcp, 1, StdDuration::from_millis(500));
        tokio::spawn(async move { axum::serve(bounded, router(contexts)).await });
        let ask = |mut s: tokio::net::TcpStream| async move {
            s.write_all(b"GET /authorize/mail/web HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap_or_else(|e| panic!("{e}"));
            out
        };
        // The first connection sends nothing and holds the only slot ...
        let mut idle = tokio::net::TcpStream::connect(address).await.unwrap_or_else(|e| panic!("{e}"));
        let second = tokio::net::TcpStream::connect(address).await.unwrap_or_else(|e| panic!("{e}"));
        let started = std::time::Instant::now();
        // ... until its idle time closes it; then the second is served.
        let answer = ask(second).await;
        assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
        assert!(started.elapsed() >= StdDuration::from_millis(400), "served only once the slot was free");
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(StdDuration::from_secs(2), idle.read_to_end(&mut rest)).await;
        assert!(closed.is_ok(), "the idle connection was closed");
    }

    #[tokio::test]
    async fn every_response_carries_the_headers_and_long_targets_are_refused() {
        let (contexts, mut api) = listener(&[]);
        let app = router(contexts);
        let (status, headers, _) = get(&app, "/elsewhere", None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_secured(&headers);
        let long = format!("/callback?code=c&state={}", "a".repeat(MAX_TARGET));
        let (status, headers, _) = get(&app, &long, None).await;
        assert_eq!(status, StatusCode::URI_TOO_LONG);
        assert_secured(&headers);
        let request = http::Request::builder()
            .method(Method::POST)
            .uri("/callback")
            .body(Body::from(vec![b'x'; 100_000]))
            .unwrap_or_else(|e| panic!("{e}"));
        let response = app.clone().oneshot(request).await.unwrap_or_else(|e| match e {});
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
        untouched(&mut api).await;
    }
}
