//! Reconciles `MailProvider` and `ClusterMailProvider`: resolve endpoints (preset, explicit URLs
//! or OIDC discovery), check the referenced Secrets, write status when it changed.

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration as StdDuration;

use k8s_openapi::api::core::v1::Secret;
use kube::runtime::controller::Action;
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::warn;

use super::Context;
use crate::api::{
    ClientAuthMethod, ClusterMailProvider, Endpoints, MailProvider, MailProviderSpec, MailProviderStatus,
};
use crate::error::{Error, Result};
use crate::oauth::discovery::discover;
use crate::oauth::provider::{auth_method, ca_bundle, merge_explicit, secret_refs, static_endpoints};
use crate::policy::Reason;
use crate::policy::provider::{Observed, requeue_after, status};
use crate::policy::reference::{may_read, not_allowed};

/// The two provider kinds, seen alike.
pub trait ProviderObject:
    Resource<DynamicType = ()> + Clone + Debug + Serialize + DeserializeOwned + Send + Sync + 'static
{
    /// Kind name for messages.
    const KIND: &'static str;
    /// The registration.
    fn registration(&self) -> &MailProviderSpec;
    /// The status.
    fn observed(&self) -> Option<&MailProviderStatus>;
    /// The API its status is written through.
    fn api(&self, client: Client) -> Api<Self>;
    /// Why the admin's limits make this provider unusable, if they do.
    fn refused(&self) -> Option<String> {
        None
    }
}

impl ProviderObject for MailProvider {
    const KIND: &'static str = "MailProvider";
    fn registration(&self) -> &MailProviderSpec {
        &self.spec
    }
    fn observed(&self) -> Option<&MailProviderStatus> {
        self.status.as_ref()
    }
    fn api(&self, client: Client) -> Api<Self> {
        Api::namespaced(client, &self.namespace().unwrap_or_default())
    }
}

impl ProviderObject for ClusterMailProvider {
    const KIND: &'static str = "ClusterMailProvider";
    fn registration(&self) -> &MailProviderSpec {
        &self.spec.provider
    }
    fn observed(&self) -> Option<&MailProviderStatus> {
        self.status.as_ref()
    }
    fn api(&self, client: Client) -> Api<Self> {
        Api::all(client)
    }
    fn refused(&self) -> Option<String> {
        // Domain-wide delegation lets whoever binds impersonate any user of the domain.
        (self.spec.provider.service_account_key_ref.is_some() && self.spec.allowed_mailboxes.is_empty()).then(|| {
            "serviceAccountKeyRef (domain-wide delegation) on a ClusterMailProvider needs allowedMailboxes: without \
             it, any allowed namespace could impersonate any user of the domain"
                .to_owned()
        })
    }
}

/// Reconciles one provider.
pub async fn reconcile<K: ProviderObject>(provider: Arc<K>, ctx: Arc<Context>) -> Result<Action> {
    if !ctx.leader.is_leader() {
        return Ok(Action::await_change());
    }
    let spec = provider.registration();
    let secrets_namespace = provider.namespace().unwrap_or_else(|| ctx.cluster_namespace.clone());
    let endpoints = resolve(&ctx, spec).await;
    // Checked before any Secret is read: refs beyond the schema's bounds (objects stored before
    // them), duplicates, and what the admin's limits refuse.
    let invalid = crate::policy::validate::provider(spec).err().or_else(|| provider.refused());
    let mut secret_problem = match invalid {
        Some(why) => Some((Reason::InvalidSpec, why)),
        None => check_secrets(&ctx, spec, &secrets_namespace).await?,
    };
    let certificate = super::certificate::read(&ctx, spec, &secrets_namespace).await?;
    let certificate_expires_at = match certificate {
        Some(Ok(c)) => Some(c.expires_at),
        Some(Err(problem)) => {
            secret_problem = secret_problem.or(Some(problem));
            None
        }
        None if auth_method(spec) == Some(ClientAuthMethod::PrivateKeyJwt) => {
            secret_problem = secret_problem.or(Some((
                Reason::InvalidSpec,
                "clientAuthentication.method is privateKeyJwt but no certificateRef is given".into(),
            )));
            None
        }
        None => None,
    };
    let now = ctx.now();
    let refs = secret_refs(spec);
    let observed = Observed { endpoints, secret_problem, certificate_expires_at };
    let next = status(now, provider.meta().generation, provider.observed(), refs, &observed);
    if provider.observed() != Some(&next) {
        super::apply_status(&provider.api(ctx.client.clone()), &*provider, &next).await?;
    }
    let ready = next.conditions.first().is_some_and(crate::api::Condition::is_true);
    let wait = requeue_after(now, ready, refs, certificate_expires_at);
    Ok(Action::requeue(wait.to_std().unwrap_or(StdDuration::from_secs(60))))
}

/// What to do when a provider reconcile fails.
pub fn error_policy<K: ProviderObject>(provider: Arc<K>, error: &Error, _ctx: Arc<Context>) -> Action {
    if error.is_conflict() {
        return Action::requeue(StdDuration::from_secs(1));
    }
    warn!(kind = K::KIND, provider = %provider.name_any(), %error, "reconcile failed");
    Action::requeue(StdDuration::from_secs(if matches!(error, Error::Panicked) { 300 } else { 30 }))
}

/// The provider's endpoints, or why they are unknown.
async fn resolve(ctx: &Context, spec: &MailProviderSpec) -> Result<Endpoints, String> {
    let ca = ca_bundle(spec);
    let client = ctx.http.get(ca).map_err(|e| e.to_string())?;
    let endpoints = match static_endpoints(spec) {
        Some(e) => e,
        None => match &spec.preset {
            crate::api::Preset::Generic(g) => match &g.issuer_url {
                Some(issuer) => merge_explicit(spec, discover(&client, ctx.http.policy(), issuer).await?),
                None => return Err("a generic provider needs issuerUrl or tokenUrl".into()),
            },
            _ => return Err("no endpoints known".into()),
        },
    };
    for url in [
        &endpoints.token,
        &endpoints.authorization,
        &endpoints.device_authorization,
        &endpoints.revocation,
        &endpoints.userinfo,
    ]
    .into_iter()
    .flatten()
    {
        ctx.http.policy().check_endpoint(url)?;
    }
    Ok(endpoints)
}

/// The first problem with a referenced Secret, if any.
async fn check_secrets(ctx: &Context, spec: &MailProviderSpec, ns: &str) -> Result<Option<(Reason, String)>> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let service_account = spec.service_account_key_ref.as_ref().map(|r| (&r.name, &r.key));
    for (name, key) in secret_refs(spec).iter().map(|r| (&r.name, &r.key)).chain(service_account) {
        let r = crate::api::SecretKeySelector { name: name.clone(), key: key.clone() };
        let secret = api.get_opt(&r.name).await.map_err(|source| Error::ReadSecret {
            namespace: ns.to_owned(),
            name: r.name.clone(),
            source,
        })?;
        if let Some(s) = &secret
            && !may_read(ctx.references, ns, &ctx.cluster_namespace, s.metadata.labels.as_ref())
        {
            return Ok(Some((Reason::SecretReferenceNotAllowed, not_allowed(ns, &r.name, s.metadata.labels.as_ref()))));
        }
        let value = secret.as_ref().and_then(|s| s.data.as_ref()).and_then(|d| d.get(&r.key));
        match (secret.is_some(), value) {
            (false, _) => return Ok(Some((Reason::ClientSecretNotFound, format!("Secret {ns}/{} not found", r.name)))),
            (true, None) => {
                return Ok(Some((
                    Reason::ClientSecretNotFound,
                    format!("Secret {ns}/{} has no key {}", r.name, r.key),
                )));
            }
            (true, Some(v)) if String::from_utf8_lossy(&v.0).trim().is_empty() => {
                return Ok(Some((
                    Reason::ClientSecretNotFound,
                    format!("key {} of Secret {ns}/{} is empty", r.key, r.name),
                )));
            }
            _ => {}
        }
    }
    Ok(None)
}
