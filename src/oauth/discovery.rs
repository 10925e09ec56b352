//! OIDC discovery (`/.well-known/openid-configuration`) for generic providers. The body is read
//! with the same cap as token responses, every endpoint it names must pass the outbound policy,
//! and messages quote nothing of the body but a shortened issuer.

use serde::Deserialize;

use super::http::{OutboundPolicy, describe, read_capped};
use crate::api::Endpoints;

#[derive(Deserialize)]
struct Metadata {
    issuer: String,
    authorization_endpoint: Option<String>,
    token_endpoint: Option<String>,
    device_authorization_endpoint: Option<String>,
    revocation_endpoint: Option<String>,
    userinfo_endpoint: Option<String>,
}

/// Longest endpoint URL accepted from discovery.
const MAX_URL: usize = 2048;

/// Fetches the issuer's metadata and returns its endpoints; every endpoint must be https and
/// allowed by `policy`.
pub async fn discover(client: &reqwest::Client, policy: OutboundPolicy, issuer: &str) -> Result<Endpoints, String> {
    policy.check_endpoint(issuer)?;
    let url = format!("{}/.well-known/openid-configuration", issuer.trim_end_matches('/'));
    let response = client.get(&url).send().await.map_err(|e| format!("discovery at {url}: {}", describe(&e)))?;
    if !response.status().is_success() {
        return Err(format!("discovery at {url} answered HTTP {}", response.status().as_u16()));
    }
    let body = read_capped(response).await.map_err(|e| format!("discovery at {url}: {e}"))?;
    let meta: Metadata = serde_json::from_slice(&body)
        .map_err(|_| format!("discovery at {url} did not return OpenID provider metadata"))?;
    if meta.issuer.trim_end_matches('/') != issuer.trim_end_matches('/') {
        let shown: String = meta.issuer.chars().take(200).collect();
        return Err(format!("discovery at {url} names issuer {shown:?}, not {issuer}"));
    }
    let token = meta.token_endpoint.ok_or_else(|| format!("discovery at {url} names no token_endpoint"))?;
    for u in [
        Some(&token),
        meta.authorization_endpoint.as_ref(),
        meta.device_authorization_endpoint.as_ref(),
        meta.revocation_endpoint.as_ref(),
        meta.userinfo_endpoint.as_ref(),
    ]
    .into_iter()
    .flatten()
    {
        if u.len() > MAX_URL {
            return Err(format!("discovery at {url} names an endpoint longer than {MAX_URL} characters"));
        }
        policy.check_endpoint(u).map_err(|e| format!("discovery at {url}: {e}"))?;
    }
    Ok(Endpoints {
        authorization: meta.authorization_endpoint,
        token: Some(token),
        device_authorization: meta.device_authorization_endpoint,
        revocation: meta.revocation_endpoint,
        userinfo: meta.userinfo_endpoint,
    })
}
