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
use super::binding::{client_of, provider_for};
use super::secrets::grant_secret_name;
use crate::api::MailboxBinding;
use crate::error::{Error, Result};
use crate::oauth::RevokeRequest;
use crate::oauth::exchange::Requester;
use crate::oauth::grants::flow_for;
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
            Err(why) if held >= MAX_HOLD => {
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
            Err(why) => {
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

/// Revokes the stored token, if any; `Err` says why it could not.
async fn revoke(ctx: &Context, binding: &MailboxBinding) -> std::result::Result<(), String> {
    let ns = binding.namespace().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let stored = secrets
        .get_opt(&grant_secret_name(&binding.name_any()))
        .await
        .map_err(|_| "the grant state could not be read".to_owned())?;
    let state =
        stored.and_then(|s| s.data).and_then(|d| GrantState::decode(&d.into_iter().map(|(k, v)| (k, v.0)).collect()));
    let Some(state) = state else {
        info!("nothing to revoke");
        return Ok(());
    };
    let (token, hint): (SecretString, &'static str) = match state.refresh_token {
        Some(rt) => (rt, "refresh_token"),
        None => (state.access_token, "access_token"),
    };
    let flow = flow_for(&binding.spec.grant);
    let usable = match provider_for(binding, flow.as_deref(), ctx).await {
        Ok((_, Some(usable))) => usable,
        Ok((_, None)) => return Err("the provider is not usable".into()),
        Err(e) => return Err(e.to_string()),
    };
    let url = usable.endpoints.revocation.clone().ok_or("the provider has no revocation endpoint")?;
    let who = Requester {
        provider_key: &usable.key,
        provider: &usable.spec,
        endpoints: &usable.endpoints,
        scopes: &usable.scopes,
        mailbox: &binding.spec.mailbox,
    };
    let client = match client_of(ctx, &usable, &who).await {
        Ok(Ok(c)) => c,
        Ok(Err(_)) => return Err("the client credentials could not be read".into()),
        Err(e) => return Err(e.to_string()),
    };
    let request = RevokeRequest { url, client, token, hint };
    ctx.leading().map_err(|e| e.to_string())?;
    ctx.tokens.revoke(&request).await.map_err(|r| crate::policy::classify::classify(&r.error).message)?;
    info!(hint, "token revoked at the provider");
    publish(ctx, binding, EventType::Normal, "Revoked", format!("the {hint} was revoked at the provider")).await;
    Ok(())
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
