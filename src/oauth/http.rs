//! HTTP for the token endpoint: one reqwest client per trust configuration (system roots plus a
//! provider's CA bundle), https only, no redirects, timeouts, and a recorder that keeps the status
//! and `Retry-After` of the last response (oauth2 hides them), never the body.

use std::collections::HashMap;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration as StdDuration;

use chrono::Duration;
use url::Url;

/// Builds and caches HTTP clients by CA bundle.
#[derive(Clone, Default)]
pub struct HttpClients {
    cache: Arc<Mutex<HashMap<u64, reqwest::Client>>>,
}

impl std::fmt::Debug for HttpClients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HttpClients")
    }
}

/// Why no HTTP client could be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The CA bundle is not PEM.
    #[error("caBundle is not a PEM certificate bundle: {0}")]
    CaBundle(String),
    /// reqwest refused the configuration.
    #[error("HTTP client: {0}")]
    Build(String),
}

impl HttpClients {
    /// The client trusting the web roots plus `ca_bundle`.
    pub fn get(&self, ca_bundle: Option<&str>) -> Result<reqwest::Client, ClientError> {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        ca_bundle.hash(&mut hasher);
        let key = hasher.finish();
        if let Some(c) = self.cache.lock().ok().and_then(|m| m.get(&key).cloned()) {
            return Ok(c);
        }
        let mut builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(StdDuration::from_secs(10))
            .timeout(StdDuration::from_secs(30))
            .https_only(true)
            .user_agent(concat!("mail-oauth-operator/", env!("CARGO_PKG_VERSION")));
        if let Some(pem) = ca_bundle {
            let certs = reqwest::Certificate::from_pem_bundle(pem.as_bytes())
                .map_err(|e| ClientError::CaBundle(e.to_string()))?;
            if certs.is_empty() {
                return Err(ClientError::CaBundle("no certificate found".into()));
            }
            for c in certs {
                builder = builder.add_root_certificate(c);
            }
        }
        let client = builder.build().map_err(|e| ClientError::Build(e.to_string()))?;
        if let Ok(mut m) = self.cache.lock() {
            m.insert(key, client.clone());
        }
        Ok(client)
    }
}

/// Checks that an endpoint is https and not a link-local or cloud metadata address.
pub fn check_endpoint(url: &str) -> Result<Url, String> {
    let parsed = Url::parse(url).map_err(|e| format!("{url} is not a URL: {e}"))?;
    if parsed.scheme() != "https" {
        return Err(format!("{url} is not https; credentials are only sent over https"));
    }
    let host = parsed.host_str().unwrap_or_default().trim_start_matches('[').trim_end_matches(']');
    let forbidden = match host.parse::<IpAddr>() {
        Ok(IpAddr::V4(ip)) => ip.is_link_local() || ip.is_unspecified() || ip.octets() == [100, 100, 100, 200],
        Ok(IpAddr::V6(ip)) => (ip.segments()[0] & 0xffc0) == 0xfe80 || ip.is_unspecified(),
        Err(_) => host.eq_ignore_ascii_case("metadata.google.internal") || host.eq_ignore_ascii_case("metadata"),
    };
    if forbidden {
        return Err(format!("{url} points at a link-local or metadata address, which is refused"));
    }
    Ok(parsed)
}

/// What the recorder kept of the last response.
#[derive(Clone, Debug, Default)]
pub struct Recorded {
    /// HTTP status.
    pub status: Option<u16>,
    /// `Retry-After` in seconds.
    pub retry_after: Option<Duration>,
}

/// A transport error, described without the request.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TransportError(pub String);

/// The HTTP function oauth2 calls: a client plus the recorder of the last response.
#[derive(Clone, Debug)]
pub struct Http {
    client: reqwest::Client,
    record: Arc<Mutex<Recorded>>,
}

impl Http {
    /// Wraps a client with a fresh recorder.
    pub fn new(client: reqwest::Client) -> Self {
        Self { client, record: Arc::default() }
    }

    /// What was recorded of the last response.
    pub fn recorded(&self) -> Recorded {
        self.record.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

impl<'c> oauth2::AsyncHttpClient<'c> for Http {
    type Error = TransportError;
    type Future = Pin<Box<dyn Future<Output = Result<oauth2::HttpResponse, TransportError>> + Send + 'c>>;

    fn call(&'c self, request: oauth2::HttpRequest) -> Self::Future {
        Box::pin(send(self.client.clone(), Arc::clone(&self.record), request))
    }
}

/// Sends one oauth2 request with `client`, recording status and `Retry-After` into `record`.
async fn send(
    client: reqwest::Client,
    record: Arc<Mutex<Recorded>>,
    request: oauth2::HttpRequest,
) -> Result<oauth2::HttpResponse, TransportError> {
    let request = reqwest::Request::try_from(request).map_err(|e| TransportError(describe(&e)))?;
    let response = client.execute(request).await.map_err(|e| TransportError(describe(&e)))?;
    let status = response.status();
    let retry_after = response
        .headers()
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<i64>().ok())
        .map(Duration::seconds);
    if let Ok(mut r) = record.lock() {
        *r = Recorded { status: Some(status.as_u16()), retry_after };
    }
    let headers = response.headers().clone();
    let body = response.bytes().await.map_err(|e| TransportError(describe(&e)))?;
    let mut out = http::Response::builder().status(status);
    if let Some(h) = out.headers_mut() {
        *h = headers;
    }
    out.body(body.to_vec()).map_err(|e| TransportError(e.to_string()))
}

/// A reqwest error as a short sentence: the kind and the innermost cause, no body.
pub fn describe(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else if e.is_body() || e.is_decode() {
        "bad response body"
    } else {
        "request failed"
    };
    let mut cause: &dyn std::error::Error = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    format!("{kind}: {cause}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_https_endpoints_away_from_metadata_addresses_are_accepted() {
        assert!(check_endpoint("https://login.microsoftonline.com/x/oauth2/v2.0/token").is_ok());
        assert!(check_endpoint("https://127.0.0.1:8443/token").is_ok());
        assert!(check_endpoint("http://idp.example.com/token").is_err());
        assert!(check_endpoint("https://169.254.169.254/latest").is_err());
        assert!(check_endpoint("https://[fe80::1]/token").is_err());
        assert!(check_endpoint("https://metadata.google.internal/x").is_err());
        assert!(check_endpoint("not a url").is_err());
    }

    #[test]
    fn a_ca_bundle_that_is_not_pem_is_refused() {
        let clients = HttpClients::default();
        assert!(matches!(clients.get(Some("garbage")), Err(ClientError::CaBundle(_))));
        assert!(clients.get(None).is_ok());
    }
}
