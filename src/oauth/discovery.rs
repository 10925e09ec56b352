//! OIDC discovery (`/.well-known/openid-configuration`) for generic providers.

use serde::Deserialize;

use super::http::{check_endpoint, describe};
use crate::api::Endpoints;

#[derive(Deserialize)]
struct Metadata {
    issuer: String,
    authorization_endpoint: Option<String>,
    token_endpoint: Option<String>,
    device_authorization_endpoint: Option<String>,
    revocation_endpoint: Option<String>,
}

/// Fetches the issuer's metadata and returns its endpoints; every endpoint must be https.
pub async fn discover(client: &reqwest::Client, issuer: &str) -> Result<Endpoints, String> {
    check_endpoint(issuer)?;
    let url = format!("{}/.well-known/openid-configuration", issuer.trim_end_matches('/'));
    let response = client.get(&url).send().await.map_err(|e| format!("discovery at {url}: {}", describe(&e)))?;
    if !response.status().is_success() {
        return Err(format!("discovery at {url} answered HTTP {}", response.status().as_u16()));
    }
    let body = response.bytes().await.map_err(|e| format!("discovery at {url}: {}", describe(&e)))?;
    let meta: Metadata = serde_json::from_slice(&body)
        .map_err(|_| format!("discovery at {url} did not return OpenID provider metadata"))?;
    if meta.issuer.trim_end_matches('/') != issuer.trim_end_matches('/') {
        return Err(format!("discovery at {url} names issuer {}, not {issuer}", meta.issuer));
    }
    let token = meta.token_endpoint.ok_or_else(|| format!("discovery at {url} names no token_endpoint"))?;
    for u in [
        Some(&token),
        meta.authorization_endpoint.as_ref(),
        meta.device_authorization_endpoint.as_ref(),
        meta.revocation_endpoint.as_ref(),
    ]
    .into_iter()
    .flatten()
    {
        check_endpoint(u)?;
    }
    Ok(Endpoints {
        authorization: meta.authorization_endpoint,
        token: Some(token),
        device_authorization: meta.device_authorization_endpoint,
        revocation: meta.revocation_endpoint,
    })
}
