//! `revokeOnDelete`: a finalizer on the binding while the field is set; when the binding is
//! deleted, the stored refresh token (or, without one, the access token) is revoked at the
//! provider's revocation endpoint (RFC 7009) before the binding and its Secrets go. A revocation
//! that keeps failing holds the deletion for at most [`MAX_HOLD`]; then the binding goes anyway,
//! with a Warning Event saying the token may still be valid.

use std::time::Duration as StdDuration;

use chrono::Duration;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Api, Resource, ResourceExt};
use secrecy::SecretString;
use tracing::{info, warn};

use super::Context;
use super::obtain::admit;
use super::resolve::{client_of, provider_for};
use super::secrets::grant_secret_name;
use crate::api::{MailboxBinding, ProviderKind};
use crate::error::{Error, Result};
use crate::oauth::RevokeRequest;
use crate::oauth::exchange::Requester;
use crate::oauth::grants::flow_for;
use crate::policy::binding::grant_matches;
use crate::policy::grant_state::GrantState;
use crate::policy::time::between;

/// The finalizer.
pub const FINALIZER: &str = "mailoauth.io/revoke-on-delete";

/// The longest a failing revocation holds up a deletion.
pub const MAX_HOLD: Duration = Duration::minutes(2);

/// Keeps the finalizer in line with `spec.revokeOnDelete`, and handles a deletion. `Some(action)`
/// ends the reconcile (the binding is being deleted); `None` goes on as usual.
pub async fn handle(ctx: &Context, binding: &MailboxBinding) -> Result<Option<Action>> {
    let has = binding.finalizers().iter().any(|f| f == FINALIZER);
    if let Some(deleted) = binding.meta().deletion_timestamp.as_ref() {
        if !has {
            return Ok(Some(Action::await_change()));
        }
        let held = chrono::DateTime::<chrono::Utc>::from_timestamp(deleted.0.as_second(), 0)
            .map(|d| between(d, ctx.now()))
            .unwrap_or_default();
        return match revoke(ctx, binding).await {
            Ok(()) => {
                set_finalizer(ctx, binding, false).await?;
                Ok(Some(Action::await_change()))
            }
            Err(Refusal::Never(why)) => {
                warn!(reason = %why, "not revoking: the grant's issuer is not the binding's provider any more");
                let note = format!(
                    "the token was not revoked: {why}; nothing was sent anywhere, and the refresh token may still be \
                     valid until its issuer expires it (revoke it there)"
                );
                publish(ctx, binding, EventType::Warning, "RevocationFailed", note).await;
                set_finalizer(ctx, binding, false).await?;
                Ok(Some(Action::await_change()))
            }
            Err(Refusal::Retry(why)) if held >= MAX_HOLD => {
                warn!(reason = %why, "revocation kept failing; letting the binding go");
                let note = format!(
                    "the token could not be revoked ({why}); the binding was deleted anyway after {} minutes, and \
                     the refresh token may still be valid until the provider expires it",
                    MAX_HOLD.num_minutes()
                );
                publish(ctx, binding, EventType::Warning, "RevocationFailed", note).await;
                set_finalizer(ctx, binding, false).await?;
                Ok(Some(Action::await_change()))
            }
            Err(Refusal::Retry(why)) => {
                warn!(reason = %why, "revocation failed; retrying");
                Ok(Some(Action::requeue(StdDuration::from_secs(10))))
            }
        };
    }
    if binding.spec.revoke_on_delete != has {
        set_finalizer(ctx, binding, binding.spec.revoke_on_delete).await?;
    }
    Ok(None)
}

/// Why a token was not revoked.
enum Refusal {
    /// Worth another try (the provider or the apiserver failed).
    Retry(String),
    /// Never: no provider the operator knows matches the issuer recorded in the grant, and the
    /// token goes to its issuer or nowhere.
    Never(String),
}

/// Revokes the stored token, if any, at the issuer recorded in the grant state: through the
/// binding's provider when it still is that issuer, else through the provider the grant was
/// obtained with when that one still is, else nowhere. The revocation endpoint is the one
/// recorded when the grant was obtained (a provider edited since cannot redirect it).
async fn revoke(ctx: &Context, binding: &MailboxBinding) -> std::result::Result<(), Refusal> {
    let ns = binding.namespace().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let stored = secrets
        .get_opt(&grant_secret_name(&binding.name_any()))
        .await
        .map_err(|_| Refusal::Retry("the grant state could not be read".to_owned()))?;
    let state =
        stored.and_then(|s| s.data).and_then(|d| GrantState::decode(&d.into_iter().map(|(k, v)| (k, v.0)).collect()));
    let Some(state) = state else {
        info!("nothing to revoke");
        return Ok(());
    };
    let flow = flow_for(&binding.spec.grant);
    let mut usable = None;
    let mut not_ready = false;
    for candidate in [Some(binding.clone()), recorded_provider(binding, &state)].into_iter().flatten() {
        match provider_for(&candidate, flow.as_deref(), ctx).await {
            Ok((_, Some(u))) if grant_matches(&u.key, &u.spec.client_id, u.endpoints.token.as_deref(), &state) => {
                usable = Some(u);
                break;
            }
            Ok((_, Some(_))) => {}
            Ok((_, None)) => not_ready = true,
            Err(e) => return Err(Refusal::Retry(e.to_string())),
        }
    }
    let Some(usable) = usable else {
        if not_ready {
            return Err(Refusal::Retry("the provider is not usable".into()));
        }
        return Err(Refusal::Never(format!(
            "neither the binding's provider nor {} still is the issuer of its grant",
            state.provider.chars().take(200).collect::<String>()
        )));
    };
    let (token, hint): (SecretString, &'static str) = match state.refresh_token.clone() {
        Some(rt) => (rt, "refresh_token"),
        None => (state.access_token.clone(), "access_token"),
    };
    let url = match &state.issuer {
        Some(issuer) => issuer.revocation_url.clone(),
        None => usable.endpoints.revocation.clone(),
    }
    .ok_or(Refusal::Never("the grant's issuer has no revocation endpoint".to_owned()))?;
    let who = Requester {
        provider_key: &usable.key,
        provider: &usable.spec,
        endpoints: &usable.endpoints,
        scopes: &usable.scopes,
        mailbox: &binding.spec.mailbox,
    };
    let client = match client_of(ctx, &usable, &who).await {
        Ok(Ok(c)) => c,
        Ok(Err(_)) => return Err(Refusal::Retry("the client credentials could not be read".into())),
        Err(e) => return Err(Refusal::Retry(e.to_string())),
    };
    let request = RevokeRequest { url, client, token, hint };
    // In the namespace's lane, like a token request: a hanging revocation endpoint holds only it.
    let key = format!("{ns}/{}", binding.name_any());
    let deadline = crate::policy::time::plus(ctx.now(), chrono::Duration::hours(1));
    let _lane = admit(ctx, &ns, &key, &who, deadline).await.map_err(|e| Refusal::Retry(e.to_string()))?;
    ctx.tokens
        .revoke(&request)
        .await
        .map_err(|r| Refusal::Retry(crate::policy::classify::classify(&r.error).message))?;
    info!(hint, "token revoked at the provider");
    publish(ctx, binding, EventType::Normal, "Revoked", format!("the {hint} was revoked at the provider")).await;
    Ok(())
}

/// The binding as it was when its grant was obtained: pointing at the provider recorded in the
/// grant state (`Kind/name`), when that differs from the one it points at now.
fn recorded_provider(binding: &MailboxBinding, state: &GrantState) -> Option<MailboxBinding> {
    let (kind, name) = state.provider.split_once('/')?;
    let kind = match kind {
        "MailProvider" => ProviderKind::MailProvider,
        "ClusterMailProvider" => ProviderKind::ClusterMailProvider,
        _ => return None,
    };
    let current = &binding.spec.provider_ref;
    if current.kind == kind && current.name == name {
        return None;
    }
    let mut then = binding.clone();
    then.spec.provider_ref.kind = kind;
    then.spec.provider_ref.name = name.to_owned();
    Some(then)
}

/// Adds or removes the finalizer, from the copy the reconcile started with (a conflict retries).
async fn set_finalizer(ctx: &Context, binding: &MailboxBinding, present: bool) -> Result<()> {
    let mut finalizers: Vec<String> = binding.finalizers().iter().filter(|f| *f != FINALIZER).cloned().collect();
    if present {
        finalizers.push(FINALIZER.to_owned());
    }
    let patch = serde_json::json!({"metadata": {
        "finalizers": finalizers,
        "resourceVersion": binding.meta().resource_version,
    }});
    let api: Api<MailboxBinding> = Api::namespaced(ctx.client.clone(), &binding.namespace().unwrap_or_default());
    api.patch(&binding.name_any(), &PatchParams::default(), &Patch::Merge(patch))
        .await
        .map_err(|source| Error::WriteStatus { kind: "MailboxBinding", name: binding.name_any(), source })?;
    Ok(())
}

async fn publish(ctx: &Context, binding: &MailboxBinding, type_: EventType, reason: &str, note: String) {
    let event = Event { type_, reason: reason.into(), note: Some(note), action: "Delete".into(), secondary: None };
    if let Err(e) = ctx.recorder.publish(&event, &binding.object_ref(&())).await {
        warn!(error = %e, "publishing event failed");
    }
}
