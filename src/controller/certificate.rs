//! The client certificate of a provider using `privateKeyJwt`: the Secret `certificateRef`
//! names (`tls.crt`, `tls.key`, as cert-manager writes them), read under the reference policy and
//! turned into a signing key and an expiry.

use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::Secret;
use kube::Api;

use super::Context;
use crate::api::MailProviderSpec;
use crate::error::{Error, Result};
use crate::oauth::assertion::{SigningKey, certificate_expiry};
use crate::policy::Reason;
use crate::policy::reference::{may_read, not_allowed};

/// A usable client certificate.
#[derive(Clone, Debug)]
pub struct ClientCertificate {
    /// The key that signs client assertions.
    pub key: SigningKey,
    /// When the certificate expires.
    pub expires_at: DateTime<Utc>,
}

/// The provider's client certificate, `Ok(None)` when it names none, or why it cannot be used.
pub async fn read(
    ctx: &Context,
    spec: &MailProviderSpec,
    ns: &str,
) -> Result<Option<std::result::Result<ClientCertificate, (Reason, String)>>> {
    let Some(r) = spec.client_authentication.as_ref().and_then(|a| a.certificate_ref.as_ref()) else {
        return Ok(None);
    };
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let secret = api.get_opt(&r.name).await.map_err(|source| Error::ReadSecret {
        namespace: ns.to_owned(),
        name: r.name.clone(),
        source,
    })?;
    let Some(secret) = secret else {
        return Ok(Some(Err((Reason::ClientSecretNotFound, format!("certificate Secret {ns}/{} not found", r.name)))));
    };
    if !may_read(ctx.references, ns, &ctx.cluster_namespace, secret.metadata.labels.as_ref()) {
        return Ok(Some(Err((
            Reason::SecretReferenceNotAllowed,
            not_allowed(ns, &r.name, secret.metadata.labels.as_ref()),
        ))));
    }
    let data = secret.data.unwrap_or_default();
    let (Some(crt), Some(key)) = (data.get("tls.crt"), data.get("tls.key")) else {
        return Ok(Some(Err((
            Reason::ClientSecretNotFound,
            format!("certificate Secret {ns}/{} needs the keys tls.crt and tls.key", r.name),
        ))));
    };
    let invalid = |why: String| {
        Ok(Some(Err((Reason::InvalidSpec, format!("clientAuthentication.certificateRef ({ns}/{}): {why}", r.name)))))
    };
    let expires_at = match certificate_expiry(&crt.0) {
        Ok(t) => t,
        Err(why) => return invalid(why),
    };
    match SigningKey::from_pem(&key.0, Some(&crt.0), None) {
        Ok(key) => Ok(Some(Ok(ClientCertificate { key, expires_at }))),
        Err(why) => invalid(why),
    }
}
