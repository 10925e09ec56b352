//! The provider a binding uses, resolved from the caches and checked (readiness, the cluster
//! admin's limits, what the grant needs), and the client credentials read from Secrets.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, ResourceExt};
use secrecy::SecretString;

use super::Context;
use crate::api::common::find_condition;
use crate::api::{
    ClientAuthMethod, Endpoints, MailProviderSpec, MailProviderStatus, MailboxBinding, Protocol, ProviderKind,
    ServerAddress,
};
use crate::error::{Error, Result};
use crate::oauth::exchange::{Requester, client_for};
use crate::oauth::grants::{Flow, ProviderFacts};
use crate::oauth::provider::{auth_method, device_flow_for_mail, preset_name, scopes_for, secret_refs, servers};
use crate::oauth::{Client, ClientAuth};
use crate::policy::Reason;
use crate::policy::binding::ProviderState;
use crate::policy::classify::Failure;
use crate::policy::provider::{mailbox_allowed, scopes_not_allowed};
use crate::policy::reference::{may_read, not_allowed};

use super::grant_store::get_secret;

/// What a usable provider offers this binding.
#[derive(Clone, Debug)]
pub struct ProviderUse {
    /// `Kind/name`.
    pub key: String,
    /// The registration.
    pub spec: MailProviderSpec,
    /// Resolved endpoints.
    pub endpoints: Endpoints,
    /// Where its Secrets live.
    pub secrets_namespace: String,
    /// Scopes this binding requests.
    pub scopes: Vec<String>,
    /// Mail servers.
    pub servers: BTreeMap<Protocol, ServerAddress>,
    /// The cluster admin's limits, for a `ClusterMailProvider`: what a token may carry (granted
    /// scopes, the identity that consented) is checked against them too.
    pub cluster: Option<crate::api::ClusterMailProviderSpec>,
}

/// Finds the provider and says whether this binding can use it.
pub async fn provider_for(
    binding: &MailboxBinding,
    flow: Option<&dyn Flow>,
    ctx: &Context,
) -> Result<(ProviderState, Option<ProviderUse>)> {
    let r = &binding.spec.provider_ref;
    let ns = binding.namespace().unwrap_or_default();
    let unusable =
        |reason: Reason, what: String| Ok((ProviderState::Unusable { reason, message: reason.message(what) }, None));
    let (key, spec, status, generation, secrets_namespace, cluster_limits) = match r.kind {
        ProviderKind::MailProvider => {
            let Some(p) = ctx.providers.get(&ObjectRef::new(&r.name).within(&ns)) else {
                return unusable(
                    Reason::ProviderNotFound,
                    format!("MailProvider {} not found in namespace {ns}", r.name),
                );
            };
            (
                format!("MailProvider/{}", r.name),
                p.spec.clone(),
                p.status.clone(),
                p.metadata.generation,
                ns.clone(),
                None,
            )
        }
        ProviderKind::ClusterMailProvider => {
            let Some(p) = ctx.cluster_providers.get(&ObjectRef::new(&r.name)) else {
                return unusable(Reason::ProviderNotFound, format!("ClusterMailProvider {} not found", r.name));
            };
            if !namespace_allowed(ctx, &p.spec.allowed_namespaces, &ns).await? {
                return unusable(
                    Reason::ProviderNotAllowed,
                    format!("ClusterMailProvider {} does not allow namespace {ns}", r.name),
                );
            }
            let spec = p.spec.provider.clone();
            (
                format!("ClusterMailProvider/{}", r.name),
                spec,
                p.status.clone(),
                p.metadata.generation,
                ctx.cluster_namespace.clone(),
                Some(p.spec.clone()),
            )
        }
    };
    let kind_name = key.replace('/', " ");
    if let Err(why) = crate::policy::validate::provider(&spec) {
        return unusable(Reason::InvalidSpec, format!("{kind_name}: {why}"));
    }
    let Some(endpoints) = ready_endpoints(status.as_ref(), generation) else {
        let current = status.as_ref().is_some_and(|s| s.observed_generation == generation);
        return match status.as_ref().and_then(|s| find_condition(&s.conditions, "Ready")).filter(|_| current) {
            Some(c) => {
                unusable(Reason::ProviderNotReady, format!("{kind_name} is not ready ({}: {})", c.reason, c.message))
            }
            // Not a failure: the provider's controller has not looked at this generation yet.
            None => Ok((
                ProviderState::Unusable {
                    reason: Reason::ProviderPending,
                    message: format!("waiting for {kind_name} to be reconciled"),
                },
                None,
            )),
        };
    };
    let facts = ProviderFacts {
        preset: preset_name(&spec),
        confidential: !secret_refs(&spec).is_empty()
            || spec.client_authentication.as_ref().is_some_and(|a| a.certificate_ref.is_some()),
        device_endpoint: endpoints.device_authorization.is_some(),
        device_flow_for_mail: device_flow_for_mail(&spec),
        authorization_endpoint: endpoints.authorization.is_some(),
        service_account: spec.service_account_key_ref.is_some(),
    };
    if binding.spec.revoke_on_delete && endpoints.revocation.is_none() {
        return unusable(
            Reason::InvalidSpec,
            format!(
                "spec.revokeOnDelete: {kind_name} has no revocation endpoint (Microsoft offers none; a generic \
                 provider needs revocationUrl or an issuer whose discovery lists revocation_endpoint); set \
                 revokeOnDelete: false"
            ),
        );
    }
    if let Some(why) = flow.and_then(|f| f.unusable(&facts)) {
        return unusable(Reason::InvalidSpec, format!("{kind_name}: {why}"));
    }
    let kind = flow.map_or(crate::oauth::grants::ScopeKind::Delegated, |f| f.scope_kind());
    let scopes = match scopes_for(&spec, &binding.spec, kind) {
        Ok(s) => s,
        Err(why) => return unusable(Reason::InvalidSpec, why),
    };
    if let Some(limits) = &cluster_limits {
        let refused = scopes_not_allowed(&limits.allowed_scopes, &scopes);
        if !refused.is_empty() {
            let shown: Vec<String> = refused.iter().take(5).map(|s| s.chars().take(100).collect()).collect();
            return unusable(
                Reason::ProviderNotAllowed,
                format!("{kind_name} does not allow the scopes {} (allowedScopes)", shown.join(" ")),
            );
        }
        if !mailbox_allowed(&limits.allowed_mailboxes, &binding.spec.mailbox) {
            return unusable(
                Reason::ProviderNotAllowed,
                format!("{kind_name} does not allow the mailbox {} (allowedMailboxes)", binding.spec.mailbox),
            );
        }
        if let Some(why) = crate::policy::provider::cluster_refuses(
            limits,
            &binding.spec,
            kind == crate::oauth::grants::ScopeKind::AppOnly,
        ) {
            return unusable(Reason::ProviderNotAllowed, format!("{kind_name} {why}"));
        }
    }
    let state = ProviderState::Usable {
        key: key.clone(),
        client_id: spec.client_id.clone(),
        scopes: scopes.clone(),
        token_url: endpoints.token.clone(),
    };
    let servers = servers(&spec);
    let cluster = cluster_limits;
    Ok((state, Some(ProviderUse { key, spec, endpoints, secrets_namespace, scopes, servers, cluster })))
}

fn ready_endpoints(status: Option<&MailProviderStatus>, generation: Option<i64>) -> Option<Endpoints> {
    let status = status?;
    let ready = find_condition(&status.conditions, "Ready")?;
    let current = ready.is_true() && status.observed_generation == generation;
    current.then(|| status.endpoints.clone()).flatten().filter(|e| e.token.is_some())
}

async fn namespace_allowed(ctx: &Context, allowed: &Option<crate::api::AllowedNamespaces>, ns: &str) -> Result<bool> {
    let needs_labels = allowed.as_ref().is_some_and(|a| a.selector.is_some() && !a.names.iter().any(|n| n == ns));
    let labels = if needs_labels {
        match ctx.namespace_labels.get(ns) {
            Some(labels) => labels,
            None => {
                let api: Api<Namespace> = Api::all(ctx.client.clone());
                let namespace =
                    api.get_opt(ns).await.map_err(|source| Error::ReadNamespace { name: ns.to_owned(), source })?;
                let labels = namespace.map(|n| n.labels().clone()).unwrap_or_default();
                ctx.namespace_labels.put(ns, labels.clone());
                labels
            }
        }
    } else {
        BTreeMap::new()
    };
    Ok(crate::policy::provider::namespace_allowed(allowed.as_ref(), ns, &labels))
}

/// One key of a referenced Secret.
pub(crate) enum Read {
    /// The trimmed, non-empty value.
    Value(SecretString),
    /// The Secret or key is missing or empty.
    Missing,
    /// The Secret lacks the opt-in label strict mode asks for.
    NotAllowed(String),
}

/// Reads one key of a referenced Secret, if the reference policy lets it be read.
/// A client secret: from memory while the referable-Secret watch shows the version it was read
/// from, else read (and kept, when the watch covers its Secret).
async fn read_client_secret(ctx: &Context, ns: &str, name: &str, key: &str) -> Result<Read> {
    let id = (ns.to_owned(), name.to_owned(), key.to_owned());
    let seen = ctx.referable.version(ns, name);
    if let Ok(mut cache) = ctx.client_secrets.lock() {
        match (cache.get(&id), seen.as_ref()) {
            (Some((rv, value)), Some(seen)) if rv == seen => return Ok(Read::Value(value.clone())),
            // Changed, unlabelled or deleted: forgotten, and read again below.
            (Some(_), _) => {
                cache.remove(&id);
            }
            (None, _) => {}
        }
    }
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let Some(secret) = get_secret(&api, ns, name).await? else {
        return Ok(Read::Missing);
    };
    let read = value_of(ctx, ns, name, key, secret.clone());
    if let (Read::Value(value), Some(rv), Some(_)) = (&read, secret.metadata.resource_version, seen)
        && let Ok(mut cache) = ctx.client_secrets.lock()
    {
        cache.insert(id, (rv, value.clone()));
    }
    Ok(read)
}

pub(crate) async fn read_key(ctx: &Context, ns: &str, name: &str, key: &str) -> Result<Read> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let Some(secret) = get_secret(&api, ns, name).await? else {
        return Ok(Read::Missing);
    };
    Ok(value_of(ctx, ns, name, key, secret))
}

/// A key of a Secret read, if the reference policy lets it be read.
fn value_of(ctx: &Context, ns: &str, name: &str, key: &str, secret: Secret) -> Read {
    if !may_read(ctx.references, ns, &ctx.cluster_namespace, secret.metadata.labels.as_ref()) {
        return Read::NotAllowed(not_allowed(ns, name, secret.metadata.labels.as_ref()));
    }
    secret
        .data
        .and_then(|mut d| d.remove(key))
        .and_then(|v| String::from_utf8(v.0).ok())
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
        .map_or(Read::Missing, |v| Read::Value(SecretString::from(v)))
}

/// A transient failure before any request (a Secret missing or not labelled for the operator).
pub(crate) fn not_ready(reason: Reason, what: String) -> Failure {
    Failure { reason, transient: true, message: what, retry_after: None }
}

/// The client as the provider registers it, with the client secrets found, or why not.
pub(crate) async fn client_of(
    ctx: &Context,
    usable: &ProviderUse,
    who: &Requester<'_>,
) -> Result<Result<Client, Failure>> {
    if auth_method(&usable.spec) == Some(ClientAuthMethod::PrivateKeyJwt) {
        return Ok(match super::certificate::read(ctx, &usable.spec, &usable.secrets_namespace).await? {
            Some(Ok(cert)) => Ok(Client {
                client_id: usable.spec.client_id.clone(),
                auth: ClientAuth::PrivateKey(Arc::new(cert.key)),
                ca_bundle: crate::oauth::provider::ca_bundle(&usable.spec).map(str::to_owned),
            }),
            Some(Err((reason, what))) => Err(not_ready(reason, what)),
            None => Err(not_ready(
                Reason::InvalidSpec,
                "clientAuthentication.method is privateKeyJwt but no certificateRef is given".into(),
            )),
        });
    }
    let mut client_secrets = Vec::new();
    for r in secret_refs(&usable.spec) {
        match read_client_secret(ctx, &usable.secrets_namespace, &r.name, &r.key).await? {
            Read::Value(s) => client_secrets.push(s),
            Read::Missing => {}
            Read::NotAllowed(what) => return Ok(Err(not_ready(Reason::SecretReferenceNotAllowed, what))),
        }
    }
    if auth_method(&usable.spec).is_some() && client_secrets.is_empty() {
        return Ok(Err(not_ready(
            Reason::ClientSecretNotFound,
            format!(
                "no client secret found in the Secrets {} names in namespace {}",
                usable.key, usable.secrets_namespace
            ),
        )));
    }
    Ok(Ok(client_for(who, client_secrets)))
}
