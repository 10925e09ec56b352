//! The authorization listener for the authorizationCode grant, on its own address (off unless
//! `--callback-address` is set). `/authorize/<namespace>/<name>` makes a fresh PKCE request for a
//! binding that is waiting for a person and sends the browser to the provider; `/callback` takes
//! the code back, checks it answers that request (state, expiry, binding uid and generation, used
//! once), stores it for the binding's reconciler to exchange, waits a moment for the result, and
//! tells the person in plain words what happened and what to do next. No token is ever shown.

use std::sync::Arc;
use std::time::Duration as StdDuration;

use axum::Router;
use axum::extract::{Path, RawQuery, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, ResourceExt};

use crate::api::{Grant, MailboxBinding, Phase};
use crate::controller::binding::{authorization_request, persist_pending, provider_for, request_pending};
use crate::controller::secrets::grant_secret_name;
use crate::controller::{Context, Contexts};
use crate::oauth::authorize::{Response as Answer, binding_of, parse_response, same_state};
use crate::oauth::grants::authorization_code::METHOD;
use crate::oauth::grants::flow_for;
use crate::policy::grant_state::PendingAuthorization;

/// How long `/callback` waits for the reconciler's result before answering.
const RESULT_WAIT: StdDuration = StdDuration::from_secs(20);

/// The router.
pub fn router(contexts: Contexts) -> Router {
    Router::new()
        .route("/authorize/{namespace}/{name}", get(authorize))
        .route("/callback", get(callback))
        .with_state(contexts)
}

/// Serves until `shutdown`.
pub async fn serve(
    address: std::net::SocketAddr,
    contexts: Contexts,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> crate::Result<()> {
    let serve_error = |source| crate::Error::Serve { address: address.to_string(), source };
    let listener = tokio::net::TcpListener::bind(address).await.map_err(serve_error)?;
    tracing::info!(%address, "serving /authorize and /callback");
    axum::serve(listener, router(contexts)).with_graceful_shutdown(shutdown).await.map_err(serve_error)
}

/// The binding and the context that serves it.
fn find(contexts: &Contexts, namespace: &str, name: &str) -> Option<(Arc<Context>, Arc<MailboxBinding>)> {
    let all = contexts.lock().ok()?.clone();
    all.into_iter().find_map(|ctx| {
        let b = ctx.bindings.get(&ObjectRef::new(name).within(namespace))?;
        Some((ctx, b))
    })
}

fn page(status: StatusCode, title: &str, lines: &[String]) -> Response {
    let body: String = lines.iter().map(|l| format!("<p>{}</p>", escape(l))).collect();
    let html = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{t}</title></head>\
         <body style=\"font-family:sans-serif;max-width:40em;margin:3em auto\"><h1>{t}</h1>{body}</body></html>",
        t = escape(title)
    );
    (status, [(header::CACHE_CONTROL, "no-store")], Html(html)).into_response()
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

fn again(namespace: &str, name: &str) -> String {
    format!(
        "To start again: kubectl annotate mailboxbinding -n {namespace} {name} \
         mailoauth.io/reauthorize-requested=\"$(date +%s)\" --overwrite, then open the link its status shows."
    )
}

async fn authorize(State(contexts): State<Contexts>, Path((namespace, name)): Path<(String, String)>) -> Response {
    let Some((ctx, binding)) = find(&contexts, &namespace, &name) else {
        return page(
            StatusCode::NOT_FOUND,
            "Unknown mailbox",
            &[format!("There is no MailboxBinding {namespace}/{name}.")],
        );
    };
    let waiting = binding.status.as_ref().is_some_and(|s| {
        s.phase == Some(Phase::AwaitingAuthorization) && s.authorization.as_ref().is_some_and(|a| a.method == METHOD)
    });
    if !matches!(binding.spec.grant, Grant::AuthorizationCode {}) || !waiting {
        return page(
            StatusCode::CONFLICT,
            "Nothing to authorize",
            &[
                format!("The mailbox {} is not waiting for an authorization right now.", binding.spec.mailbox),
                again(&namespace, &name),
            ],
        );
    }
    let flow = flow_for(&binding.spec.grant);
    let usable = match provider_for(&binding, flow.as_deref(), &ctx).await {
        Ok((_, Some(usable))) => usable,
        Ok((state, None)) => {
            return page(
                StatusCode::SERVICE_UNAVAILABLE,
                "The provider is not ready",
                &[format!("{state:?}"), "Look at kubectl get mbx -o wide for what to fix.".into()],
            );
        }
        Err(e) => return page(StatusCode::SERVICE_UNAVAILABLE, "Try again in a moment", &[e.to_string()]),
    };
    let request = match authorization_request(
        &usable.spec,
        &usable.endpoints,
        &usable.scopes,
        &binding,
        &ctx.authorization.redirect_uri,
    ) {
        Ok(r) => r,
        Err(why) => return page(StatusCode::SERVICE_UNAVAILABLE, "Cannot start", &[why]),
    };
    let redirect = request.url.clone();
    let link = binding.status.as_ref().and_then(|s| s.authorization.as_ref()).and_then(|a| a.url.clone());
    let made = Some((request, ctx.authorization.redirect_uri.clone()));
    let pending = request_pending(&binding, &usable, ctx.now(), made, link.unwrap_or_else(|| redirect.clone()));
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    if let Err(e) = persist_pending(&secrets, &binding, &pending).await {
        tracing::warn!(binding = %name, namespace = %namespace, error = %e, "storing an authorization request failed");
        return page(
            StatusCode::SERVICE_UNAVAILABLE,
            "Try again in a moment",
            &["The request could not be stored.".into()],
        );
    }
    tracing::info!(binding = %name, namespace = %namespace, "sending a browser to the provider");
    (StatusCode::SEE_OTHER, [(header::LOCATION, redirect), (header::CACHE_CONTROL, "no-store".into())]).into_response()
}

async fn callback(State(contexts): State<Contexts>, RawQuery(query): RawQuery) -> Response {
    let bad = |lines: &[String]| page(StatusCode::BAD_REQUEST, "This link cannot be used", lines);
    let Some(answer) = query.as_deref().and_then(parse_response) else {
        return bad(&["The address carries no authorization response (code and state).".into()]);
    };
    let state = match &answer {
        Answer::Code { state, .. } => Some(state.clone()),
        Answer::Error { state, .. } => state.clone(),
    };
    let Some((namespace, name)) = state.as_deref().and_then(binding_of) else {
        return bad(&["The response does not name a mailbox this operator asked for.".into()]);
    };
    let Some((ctx, binding)) = find(&contexts, &namespace, &name) else {
        return bad(&[format!("There is no MailboxBinding {namespace}/{name} any more.")]);
    };
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let stored = match secrets.get_opt(&grant_secret_name(&name)).await {
        Ok(s) => s.and_then(|s| s.data).map(|d| d.into_iter().map(|(k, v)| (k, v.0)).collect()),
        Err(e) => return page(StatusCode::SERVICE_UNAVAILABLE, "Try again in a moment", &[e.to_string()]),
    };
    let pending = stored.as_ref().and_then(PendingAuthorization::decode).filter(|p| p.method == METHOD);
    let now = ctx.now();
    let Some(pending) = pending.filter(|p| {
        p.state.as_deref().zip(state.as_deref()).is_some_and(|(a, b)| same_state(a, b))
            && p.code.is_none()
            && now < p.expires_at
            && p.binding_uid == binding.uid()
            && p.generation == binding.metadata.generation
    }) else {
        return bad(&[
            "This sign-in was already used, has expired, or belongs to an older request: nothing was changed.".into(),
            again(&namespace, &name),
        ]);
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
    let with_code = PendingAuthorization { code: Some(code), ..pending };
    if let Err(e) = persist_pending(&secrets, &binding, &with_code).await {
        tracing::warn!(binding = %name, namespace = %namespace, error = %e, "storing an authorization code failed");
        return page(
            StatusCode::SERVICE_UNAVAILABLE,
            "Try again in a moment",
            &["The code could not be stored.".into()],
        );
    }
    tracing::info!(binding = %name, namespace = %namespace, "authorization code received");
    outcome(&ctx, &namespace, &name, &binding.spec.mailbox).await
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
                page(StatusCode::OK, "Not authorized", &[c.message, again(namespace, name)])
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
    use super::*;

    #[test]
    fn text_on_pages_is_escaped() {
        assert_eq!(escape("<b>&\"'"), "&lt;b&gt;&amp;&quot;&#39;");
    }
}
