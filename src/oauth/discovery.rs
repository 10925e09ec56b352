//! Discovery for generic providers: OpenID Connect's `<issuer>/.well-known/openid-configuration`,
//! and, when a server has none (it answers 404 or 410), RFC 8414's OAuth 2.0 authorization server
//! metadata at `/.well-known/oauth-authorization-server` inserted before the issuer's path. The
//! body is read with the same cap as token responses, its `issuer` must be the one asked for
//! (OpenID Connect Discovery §4.3, RFC 8414 §3.3), every endpoint it names must pass the outbound
//! policy, and messages quote nothing of the body but a shortened issuer.

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

/// Where OpenID Connect Discovery 1.0 §4 puts the metadata: appended to the issuer.
pub fn openid_configuration_url(issuer: &str) -> String {
    format!("{}/.well-known/openid-configuration", issuer.trim_end_matches('/'))
}

/// Where RFC 8414 §3.1 puts the metadata: the well-known segment between the host and the
/// issuer's path (`https://h/tenant` → `https://h/.well-known/oauth-authorization-server/tenant`).
pub fn authorization_server_metadata_url(issuer: &str) -> Result<String, String> {
    let mut url = url::Url::parse(issuer).map_err(|_| format!("{issuer} is not a URL"))?;
    let path = url.path().trim_end_matches('/').to_owned();
    url.set_path(&format!("/.well-known/oauth-authorization-server{path}"));
    url.set_query(None);
    url.set_fragment(None);
    Ok(url.to_string())
}

/// Fetches the issuer's metadata (OpenID Connect discovery, else RFC 8414) and returns its
/// endpoints; every endpoint must be https and allowed by `policy`.
pub async fn discover(client: &reqwest::Client, policy: OutboundPolicy, issuer: &str) -> Result<Endpoints, String> {
    policy.check_endpoint(issuer)?;
    let oidc = openid_configuration_url(issuer);
    let (url, response) = match fetch(client, &oidc).await? {
        // No OpenID Connect discovery: a plain OAuth 2.0 server may publish RFC 8414 metadata.
        r if matches!(r.status().as_u16(), 404 | 410) => {
            let rfc8414 = authorization_server_metadata_url(issuer)?;
            policy.check_endpoint(&rfc8414)?;
            let r = fetch(client, &rfc8414).await?;
            if !r.status().is_success() {
                return Err(format!(
                    "discovery: {oidc} answered HTTP 404 and {rfc8414} HTTP {}; give tokenUrl explicitly",
                    r.status().as_u16()
                ));
            }
            (rfc8414, r)
        }
        r => (oidc, r),
    };
    if !response.status().is_success() {
        return Err(format!("discovery at {url} answered HTTP {}", response.status().as_u16()));
    }
    let body = read_capped(response).await.map_err(|e| format!("discovery at {url}: {e}"))?;
    let meta: Metadata = serde_json::from_slice(&body)
        .map_err(|_| format!("discovery at {url} did not return authorization server metadata"))?;
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

async fn fetch(client: &reqwest::Client, url: &str) -> Result<reqwest::Response, String> {
    client.get(url).send().await.map_err(|e| format!("discovery at {url}: {}", describe(&e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc8414_puts_the_well_known_segment_before_the_issuers_path() {
        assert_eq!(
            authorization_server_metadata_url("https://idp.example.com").unwrap(),
            "https://idp.example.com/.well-known/oauth-authorization-server"
        );
        assert_eq!(
            authorization_server_metadata_url("https://idp.example.com/tenant/v2/").unwrap(),
            "https://idp.example.com/.well-known/oauth-authorization-server/tenant/v2"
        );
        assert_eq!(
            openid_configuration_url("https://idp.example.com/tenant/"),
            "https://idp.example.com/tenant/.well-known/openid-configuration"
        );
    }
}
