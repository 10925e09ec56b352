//! The grant-state Secret: read, decode, write. A new grant state is kept in memory before its
//! write, written with the version read as a precondition ([`super::Fence`]), and flushed at
//! shutdown when a write failed.

use std::collections::BTreeMap;
use std::time::Duration as StdDuration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use secrecy::{ExposeSecret, SecretString};
use tracing::{debug, info, warn};

use super::secrets::{Role, desired, grant_secret_name};
use super::{Context, Pending};
use crate::api::{FIELD_MANAGER, GRANT_DIGEST_ANNOTATION, GRANT_FOR_ANNOTATION, MailboxBinding, OWNED_KEYS_ANNOTATION};
use crate::error::{Error, Result};
use crate::policy::at_rest::{grant_digest, grant_for};
use crate::policy::grant_state::{Fenced, GrantState, PendingAuthorization, after_conflict};
use crate::policy::ownership::{existing_conflict, from_predecessor};

/// Writes of a grant state tried in one reconcile before it is kept in memory for the next.
const GRANT_WRITE_ATTEMPTS: u64 = 3;

pub(crate) async fn get_secret(api: &Api<Secret>, ns: &str, name: &str) -> Result<Option<Secret>> {
    debug!(namespace = %ns, secret = %name, "reading Secret");
    api.get_opt(name).await.map_err(|source| Error::ReadSecret {
        namespace: ns.to_owned(),
        name: name.to_owned(),
        source,
    })
}

/// Writes a published or grant-state Secret, so that the watch event of this write triggers no
/// reconcile.
pub(crate) async fn apply_owned(ctx: &Context, api: &Api<Secret>, secret: &Secret) -> Result<Secret, kube::Error> {
    let ns = secret.metadata.namespace.clone().unwrap_or_default();
    let name = secret.metadata.name.clone().unwrap_or_default();
    ctx.own_writes.begin(&ns, &name);
    let result = apply_secret(api, secret).await;
    match &result {
        Ok(written) => ctx.own_writes.record(written),
        Err(_) => ctx.own_writes.abandon(&ns, &name),
    }
    result
}

/// Creates a Secret the cache says is absent, so that a Secret of someone else of that name is
/// never written over (the create fails with 409; see [`created_or_foreign`]).
pub(crate) async fn create_owned(ctx: &Context, api: &Api<Secret>, secret: &Secret) -> Result<Secret, kube::Error> {
    let ns = secret.metadata.namespace.clone().unwrap_or_default();
    let name = secret.metadata.name.clone().unwrap_or_default();
    ctx.own_writes.begin(&ns, &name);
    let params = PostParams { dry_run: false, field_manager: Some(FIELD_MANAGER.to_owned()) };
    let result = api.create(&params, secret).await;
    match &result {
        Ok(written) => ctx.own_writes.record(written),
        Err(_) => ctx.own_writes.abandon(&ns, &name),
    }
    result
}

/// After a create met an existing Secret: that Secret, and whether it is someone else's (then it
/// is read from now on, and never written).
pub(crate) async fn created_or_foreign(
    ctx: &Context,
    api: &Api<Secret>,
    binding: &MailboxBinding,
    ns: &str,
    name: &str,
) -> Result<(Option<Secret>, bool)> {
    let current = get_secret(api, ns, name).await?;
    let uid = binding.uid().unwrap_or_default();
    let binding_name = binding.name_any();
    let label = super::secrets::binding_label(&binding_name);
    // An earlier binding's of this name (its owner reference gone with `--cascade=orphan`, or
    // restored from a backup) is ours to adopt, not foreign.
    let foreign = current.as_ref().is_some_and(|s| {
        existing_conflict(&uid, &s.metadata).is_some() && !from_predecessor(&uid, &binding_name, &label, &s.metadata)
    });
    if foreign {
        ctx.owned.found_foreign(ns, name);
    }
    Ok((current, foreign))
}

/// The grant-state Secret for `state`, with the digests a later reconcile judges it by without
/// reading it ([`crate::policy::at_rest`]).
pub(crate) fn grant_secret(binding: &MailboxBinding, name: &str, state: &GrantState) -> Secret {
    let data = state.encode();
    let spec = serde_json::to_string(&binding.spec.grant).unwrap_or_default();
    let token_url = state.issuer.as_ref().map(|i| i.token_url.as_str());
    let annotations = [
        (OWNED_KEYS_ANNOTATION.to_owned(), data.keys().cloned().collect::<Vec<_>>().join(",")),
        (GRANT_DIGEST_ANNOTATION.to_owned(), grant_digest(&data)),
        (
            GRANT_FOR_ANNOTATION.to_owned(),
            grant_for(&spec, &state.provider, &state.client_id, token_url, &state.requested_scopes),
        ),
    ];
    let mut secret = desired(binding, name, Role::Grant, data);
    secret.metadata.annotations.get_or_insert_with(BTreeMap::new).extend(annotations);
    secret
}

async fn apply_secret(api: &Api<Secret>, secret: &Secret) -> Result<Secret, kube::Error> {
    let name = secret.metadata.name.clone().unwrap_or_default();
    let mut body = serde_json::to_value(secret).map_err(kube::Error::SerdeError)?;
    if let Some(obj) = body.as_object_mut() {
        obj.insert("apiVersion".into(), "v1".into());
        obj.insert("kind".into(), "Secret".into());
    }
    api.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(body)).await
}

/// Writes the grant state (always new after a token request). It is kept in memory *before* the
/// write, so that neither a failed write nor a cancelled reconcile loses it: written before
/// anything else on the next reconcile, and flushed at shutdown. The write is conditioned on the
/// version read ([`super::Fence`]): a deposed leader's late result never overwrites a newer grant.
pub(crate) async fn persist_grant(
    ctx: &Context,
    api: &Api<Secret>,
    binding: &MailboxBinding,
    state: GrantState,
    fence: &mut super::Fence,
) -> Result<()> {
    write_grant(ctx, api, binding, state, fence, true).await
}

/// Writes the grant state as stored again (adopted, its issuer or digests recorded): the same
/// credentials, so nothing is kept in memory for it; a failure is retried by the next reconcile
/// from the Secret, and is never taken for a token obtained.
pub(crate) async fn rewrite_grant(
    ctx: &Context,
    api: &Api<Secret>,
    binding: &MailboxBinding,
    state: GrantState,
    fence: &mut super::Fence,
) -> Result<()> {
    write_grant(ctx, api, binding, state, fence, false).await
}

async fn write_grant(
    ctx: &Context,
    api: &Api<Secret>,
    binding: &MailboxBinding,
    state: GrantState,
    fence: &mut super::Fence,
    keep: bool,
) -> Result<()> {
    let ns = binding.namespace().unwrap_or_default();
    let binding_name = binding.name_any();
    let name = grant_secret_name(&binding_name);
    let mut want = grant_secret(binding, &name, &state);
    let forget = |ctx: &Context| {
        if keep {
            ctx.take_pending(&ns, &binding_name);
        }
    };
    if keep {
        ctx.keep_pending(
            &ns,
            &binding_name,
            Pending { state: state.clone(), secret: want.clone(), fence: fence.clone() },
        );
    }
    let mut attempt = 0_u64;
    let source = loop {
        want.metadata.resource_version = fence.version.clone();
        // Absent when read (or as the cache says): created, never applied over a Secret someone
        // else made meanwhile.
        let written =
            if fence.absent { create_owned(ctx, api, &want).await } else { apply_owned(ctx, api, &want).await };
        match written {
            Ok(written) => {
                fence.version = written.resource_version();
                fence.basis = state.refresh_token.clone();
                fence.absent = false;
                prune(ctx, api, &want, fence).await;
                forget(ctx);
                return Ok(());
            }
            Err(kube::Error::Api(e)) if e.code == 409 => {
                let (current, foreign) = created_or_foreign(ctx, api, binding, &ns, &name).await?;
                if foreign {
                    warn!("a Secret of someone else has the grant state's name; nothing is written over it");
                    // A refresh token is never dropped: it stays in memory until the name is free.
                    if keep && state.refresh_token.is_some() {
                        return Err(Error::GrantStateTaken { namespace: ns, name });
                    }
                    forget(ctx);
                    return Err(Error::StaleGrantState { namespace: ns, name });
                }
                match after_conflict(
                    current.as_ref().and_then(decode_grant).as_ref(),
                    current.as_ref().and_then(decode_pending).is_some(),
                    fence.basis.as_ref().map(ExposeSecret::expose_secret),
                    &state,
                ) {
                    Fenced::Written => {
                        fence.absent = false;
                        fence.keys = current.as_ref().map(data_keys);
                        fence.version = current.and_then(|s| s.resource_version());
                        fence.basis = state.refresh_token.clone();
                        forget(ctx);
                        return Ok(());
                    }
                    Fenced::Stale => {
                        warn!("the grant state was replaced by a newer one since it was read; this result is dropped");
                        forget(ctx);
                        return Err(Error::StaleGrantState { namespace: ns, name });
                    }
                    Fenced::Retry => {
                        fence.absent = current.is_none();
                        fence.keys = current.as_ref().map(data_keys);
                        fence.version = current.and_then(|s| s.resource_version());
                    }
                }
            }
            Err(e) => {
                warn!(attempt, error = %e, "writing grant state failed");
                attempt = attempt.saturating_add(1);
                if attempt >= GRANT_WRITE_ATTEMPTS {
                    break e;
                }
                tokio::time::sleep(StdDuration::from_millis(attempt.saturating_mul(250))).await;
                continue;
            }
        }
        attempt = attempt.saturating_add(1);
        if attempt >= GRANT_WRITE_ATTEMPTS {
            return Err(Error::StaleGrantState { namespace: ns, name });
        }
    };
    if keep {
        ctx.keep_pending(&ns, &binding_name, Pending { state, secret: want, fence: fence.clone() });
    }
    Err(Error::WriteGrantState { namespace: ns, name, source })
}

/// The data keys of a Secret.
pub(crate) fn data_keys(secret: &Secret) -> std::collections::BTreeSet<String> {
    secret.data.iter().flatten().map(|(k, _)| k.clone()).collect()
}

/// After a write of `want` at `fence.version`: removes the keys the Secret held before that `want`
/// no longer has (a merge patch conditioned on that version; best effort: a key left behind is
/// removed by the next write). Records the keys now held.
pub(crate) async fn prune(ctx: &Context, api: &Api<Secret>, want: &Secret, fence: &mut super::Fence) {
    let now = data_keys(want);
    let stale: Vec<String> = fence.keys.iter().flatten().filter(|k| !now.contains(*k)).cloned().collect();
    fence.keys = Some(now);
    if stale.is_empty() {
        return;
    }
    let name = want.metadata.name.clone().unwrap_or_default();
    match remove_keys(ctx, api, &name, &stale, fence.version.clone()).await {
        Ok(written) => fence.version = written.resource_version(),
        Err(e) => warn!(error = %e, "removing keys no longer written failed; the next write removes them"),
    }
}

/// Removes `keys` from a Secret's data (a JSON merge patch, conditioned on `version`), so that
/// the watch event of this write triggers no reconcile.
pub(crate) async fn remove_keys(
    ctx: &Context,
    api: &Api<Secret>,
    name: &str,
    keys: &[String],
    version: Option<String>,
) -> Result<Secret, kube::Error> {
    let ns = api.namespace().map(str::to_owned).unwrap_or_default();
    ctx.own_writes.begin(&ns, name);
    let result = merge_remove(api, name, keys, version).await;
    match &result {
        Ok(written) => ctx.own_writes.record(written),
        Err(_) => ctx.own_writes.abandon(&ns, name),
    }
    result
}

/// The merge patch of [`remove_keys`].
async fn merge_remove(
    api: &Api<Secret>,
    name: &str,
    keys: &[String],
    version: Option<String>,
) -> Result<Secret, kube::Error> {
    let gone: serde_json::Map<String, serde_json::Value> =
        keys.iter().map(|k| (k.clone(), serde_json::Value::Null)).collect();
    let patch = serde_json::json!({"metadata": {"resourceVersion": version}, "data": gone});
    api.patch(name, &PatchParams::default(), &Patch::Merge(patch)).await
}

/// Writes every grant state still waiting, retrying until `deadline`; called at shutdown so that
/// a rotated refresh token outlives the process. Returns how many could not be written. A write
/// that meets a newer grant (409, and the Secret holds another grant than the one it started
/// from) is dropped, as in [`persist_grant`].
pub async fn flush_pending(
    client: &kube::Client,
    pending: &super::PendingGrants,
    deadline: tokio::time::Instant,
) -> usize {
    let waiting: Vec<((String, String), Pending)> = pending.lock().map(|mut p| p.drain().collect()).unwrap_or_default();
    let mut lost = 0_usize;
    for ((ns, binding), p) in waiting {
        let api: Api<Secret> = Api::namespaced(client.clone(), &ns);
        let mut wait = StdDuration::from_millis(200);
        let mut secret = p.secret.clone();
        secret.metadata.resource_version = p.fence.version.clone();
        let owner = secret.metadata.owner_references.iter().flatten().map(|o| o.uid.clone()).next().unwrap_or_default();
        let mut absent = p.fence.absent;
        loop {
            let result = if absent {
                let params = PostParams { dry_run: false, field_manager: Some(FIELD_MANAGER.to_owned()) };
                api.create(&params, &secret).await
            } else {
                apply_secret(&api, &secret).await
            };
            let retry = match result {
                Ok(_) => {
                    info!(%binding, namespace = %ns, "grant state written at shutdown");
                    break;
                }
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    let name = secret.metadata.name.clone().unwrap_or_default();
                    let current = api.get_opt(&name).await.ok().flatten();
                    if current.as_ref().is_some_and(|s| existing_conflict(&owner, &s.metadata).is_some()) {
                        warn!(%binding, namespace = %ns, "a Secret of someone else has the grant state's name; not written");
                        break;
                    }
                    let basis = p.fence.basis.as_ref().map(ExposeSecret::expose_secret);
                    let pending_now = current.as_ref().and_then(decode_pending).is_some();
                    match after_conflict(current.as_ref().and_then(decode_grant).as_ref(), pending_now, basis, &p.state)
                    {
                        Fenced::Written => break,
                        Fenced::Stale => {
                            warn!(%binding, namespace = %ns, "a newer grant state was stored meanwhile; this one is dropped");
                            break;
                        }
                        Fenced::Retry => {
                            absent = current.is_none();
                            secret.metadata.resource_version = current.and_then(|s| s.resource_version());
                            "the grant state changed since it was read".to_owned()
                        }
                    }
                }
                Err(e) => e.to_string(),
            };
            if tokio::time::Instant::now().checked_add(wait).is_some_and(|t| t < deadline) {
                warn!(%binding, namespace = %ns, error = %retry, "writing grant state at shutdown failed; retrying");
                tokio::time::sleep(wait).await;
                wait = std::cmp::min(wait.saturating_mul(2), StdDuration::from_secs(2));
            } else {
                tracing::error!(%binding, namespace = %ns, error = %retry, "grant state could not be written before shutdown");
                lost = lost.saturating_add(1);
                break;
            }
        }
    }
    lost
}

fn secret_bytes(secret: &Secret) -> Option<BTreeMap<String, Vec<u8>>> {
    secret.data.as_ref().map(|d| d.iter().map(|(k, v)| (k.clone(), v.0.clone())).collect())
}

/// The grant state a Secret holds, if it holds one.
pub(crate) fn decode_grant(secret: &Secret) -> Option<GrantState> {
    secret_bytes(secret).and_then(|d| GrantState::decode(&d))
}

/// The relay credentials a grant-state Secret holds, if any (also with no grant beside them).
pub(crate) fn decode_relay(secret: &Secret) -> Option<crate::policy::relay::RelayCredentials> {
    secret_bytes(secret).as_ref().and_then(crate::policy::relay::RelayCredentials::decode)
}

/// The authorization in progress a grant-state Secret holds, if any.
pub(crate) fn decode_pending(secret: &Secret) -> Option<PendingAuthorization> {
    secret_bytes(secret).and_then(|d| PendingAuthorization::decode(&d))
}

/// Writes an authorization in progress as the whole grant state: a new authorization replaces
/// whatever grant was stored (a person asked for it, or there was none). Losing this write loses
/// no token: the next reconcile starts a new authorization.
pub async fn persist_pending(
    api: &Api<Secret>,
    binding: &MailboxBinding,
    pending: &PendingAuthorization,
) -> Result<()> {
    persist_pending_data(api, binding, pending.encode(), &mut super::Fence::default(), None).await
}

/// Writes `data` as the whole grant-state Secret's content.
/// Conditioned on the version read: a Secret changed meanwhile (a newer grant, the listener's
/// write) is not overwritten; the reconcile starts again from it.
pub(crate) async fn persist_pending_data(
    api: &Api<Secret>,
    binding: &MailboxBinding,
    data: BTreeMap<String, String>,
    fence: &mut super::Fence,
    basis: Option<SecretString>,
) -> Result<()> {
    let name = grant_secret_name(&binding.name_any());
    let namespace = binding.namespace().unwrap_or_default();
    let mut want = desired(binding, &name, Role::Grant, data);
    want.metadata.resource_version = fence.version.clone();
    match apply_secret(api, &want).await {
        Ok(written) => {
            fence.version = written.resource_version();
            fence.basis = basis;
            fence.absent = false;
            // The keys of what this replaces (a grant) go: a Secret created by a create keeps
            // them through an apply. Best effort; conditioned on the version just written.
            let now = data_keys(&want);
            let stale: Vec<String> = fence.keys.iter().flatten().filter(|k| !now.contains(*k)).cloned().collect();
            fence.keys = Some(now);
            if !stale.is_empty() {
                match merge_remove(api, &name, &stale, fence.version.clone()).await {
                    Ok(written) => fence.version = written.resource_version(),
                    Err(e) => warn!(error = %e, "removing the replaced grant's keys failed"),
                }
            }
            Ok(())
        }
        Err(kube::Error::Api(e)) if e.code == 409 => Err(Error::StaleGrantState { namespace, name }),
        Err(source) => Err(Error::WriteGrantState { namespace, name, source }),
    }
}
