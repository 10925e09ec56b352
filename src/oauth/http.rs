//! HTTP for token and discovery endpoints: one reqwest client per trust configuration (system
//! roots plus a provider's CA bundle, a bounded cache), https only, no redirects, timeouts, an
//! outbound address policy enforced where connections are made, response bodies read with a
//! small cap, and one client-authenticated form POST (token, device authorization and revocation
//! endpoints all take one) that keeps what the operator needs of a response: status,
//! `Retry-After`, and the token, device or error fields read leniently.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration as StdDuration;

use chrono::{DateTime, Duration, Utc};
use url::Url;

use super::response::{DeviceFields, ErrorFields, TokenFields, parse_device, parse_error, parse_token};

/// Largest response body read from a token or discovery endpoint.
pub const MAX_BODY: usize = 64 * 1024;

/// Most HTTP clients kept (one per distinct CA bundle); the cache starts over when full.
pub const MAX_CLIENTS: usize = 32;

/// Where the operator may send requests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OutboundPolicy {
    /// Allow loopback and private (RFC 1918, unique-local, CGNAT, benchmarking, local-use NAT64)
    /// addresses. Link-local, cloud metadata, reserved, multicast and documentation addresses are
    /// refused whatever this says.
    pub allow_private: bool,
}

/// Names that always mean a cloud metadata service.
const METADATA_NAMES: [&str; 3] = ["metadata.google.internal", "metadata", "instance-data.ec2.internal"];

/// How an address is treated, from least to most refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Class {
    /// A global address.
    Public,
    /// Loopback or private: allowed only with `allow_private`.
    Private,
    /// Never connected to.
    Always,
}

impl OutboundPolicy {
    /// Why `ip` may not be connected to, if it may not. An IPv6 address that carries an IPv4
    /// address (IPv4-mapped, IPv4-compatible, IPv4-translated, NAT64, 6to4, Teredo) is judged by
    /// the IPv4 address it leads to as well.
    pub fn refuse_ip(&self, ip: IpAddr) -> Option<&'static str> {
        let class = match ip {
            IpAddr::V4(v4) => v4_class(v4),
            IpAddr::V6(v6) => v6_class(v6),
        };
        match class {
            Class::Always => Some("a link-local, metadata, reserved, multicast, documentation or unspecified address"),
            Class::Private if !self.allow_private => {
                Some("a loopback or private address (allowed only with --allow-private-endpoints)")
            }
            _ => None,
        }
    }

    /// Checks that `url` is https and names no refused host; returns it parsed.
    pub fn check_endpoint(&self, url: &str) -> Result<Url, String> {
        let shown: String = url.chars().take(200).collect();
        let parsed = Url::parse(url).map_err(|_| format!("{shown} is not a URL"))?;
        if parsed.scheme() != "https" {
            return Err(format!("{shown} is not https; credentials are only sent over https"));
        }
        let refused = match parsed.host() {
            Some(url::Host::Ipv4(ip)) => self.refuse_ip(IpAddr::V4(ip)),
            Some(url::Host::Ipv6(ip)) => self.refuse_ip(IpAddr::V6(ip)),
            Some(url::Host::Domain(name)) => {
                let name = name.trim_end_matches('.').to_ascii_lowercase();
                if METADATA_NAMES.contains(&name.as_str()) {
                    Some("a cloud metadata service")
                } else if !self.allow_private && (name == "localhost" || name.ends_with(".localhost")) {
                    Some("a loopback address (allowed only with --allow-private-endpoints)")
                } else {
                    None
                }
            }
            None => Some("no host"),
        };
        match refused {
            Some(why) => Err(format!("{shown} points at {why}, which is refused")),
            None => Ok(parsed),
        }
    }
}

/// Whether `ip` lies in `prefix/len`.
fn in_v4(ip: Ipv4Addr, prefix: [u8; 4], len: u32) -> bool {
    let mask = u32::MAX.checked_shl(32_u32.saturating_sub(len)).unwrap_or(0);
    u32::from(ip) & mask == u32::from(Ipv4Addr::from(prefix)) & mask
}

fn v4_class(ip: Ipv4Addr) -> Class {
    let always = [
        ([0, 0, 0, 0], 8),          // "this network"; 0.0.0.0 reaches the host itself on Linux
        ([169, 254, 0, 0], 16),     // link-local, cloud metadata (169.254.169.254)
        ([192, 0, 0, 0], 24),       // IETF protocol assignments (Oracle Cloud metadata 192.0.0.192)
        ([192, 0, 2, 0], 24),       // TEST-NET-1 (documentation)
        ([198, 51, 100, 0], 24),    // TEST-NET-2
        ([203, 0, 113, 0], 24),     // TEST-NET-3
        ([224, 0, 0, 0], 4),        // multicast
        ([240, 0, 0, 0], 4),        // reserved, and the limited broadcast 255.255.255.255
        ([100, 100, 100, 200], 32), // Alibaba Cloud metadata
    ];
    let private = [
        ([127, 0, 0, 0], 8),    // loopback
        ([10, 0, 0, 0], 8),     // RFC 1918
        ([172, 16, 0, 0], 12),  // RFC 1918
        ([192, 168, 0, 0], 16), // RFC 1918
        ([100, 64, 0, 0], 10),  // carrier-grade NAT (RFC 6598)
        ([198, 18, 0, 0], 15),  // benchmarking (RFC 2544)
    ];
    if always.iter().any(|(p, len)| in_v4(ip, *p, *len)) {
        Class::Always
    } else if private.iter().any(|(p, len)| in_v4(ip, *p, *len)) {
        Class::Private
    } else {
        Class::Public
    }
}

/// The IPv4 address in the low 32 bits of `ip`.
fn low_v4(ip: Ipv6Addr) -> Ipv4Addr {
    Ipv4Addr::from(u32::try_from(u128::from(ip) & 0xffff_ffff).unwrap_or_default())
}

fn v6_class(ip: Ipv6Addr) -> Class {
    let bits = u128::from(ip);
    let prefix = |p: u128, len: u32| {
        let mask = u128::MAX.checked_shl(128_u32.saturating_sub(len)).unwrap_or(0);
        bits & mask == p & mask
    };
    let first = ip.segments().first().copied().unwrap_or_default();
    if ip.is_unspecified()
        || ip.is_multicast()
        || (first & 0xffc0) == 0xfe80 // link-local
        || prefix(0x0100_0000_0000_0000_0000_0000_0000_0000, 64) // discard-only (RFC 6666)
        || prefix(0x2001_0db8_0000_0000_0000_0000_0000_0000, 32) // documentation
        || ip == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)
    // AWS metadata
    {
        return Class::Always;
    }
    if ip.is_loopback() || (first & 0xfe00) == 0xfc00 || (first & 0xffc0) == 0xfec0 {
        // loopback, unique-local, the deprecated site-local
        return Class::Private;
    }
    if prefix(0xffff_0000_0000, 96) // IPv4-mapped ::ffff:a.b.c.d
        || prefix(0xffff_0000_0000_0000, 96) // IPv4-translated ::ffff:0:a.b.c.d (SIIT)
        || prefix(0, 96) // IPv4-compatible ::a.b.c.d (deprecated; :: and ::1 handled above)
        || prefix(0x0064_ff9b_0000_0000_0000_0000_0000_0000, 96)
    // NAT64 well-known prefix
    {
        return v4_class(low_v4(ip));
    }
    if prefix(0x0064_ff9b_0001_0000_0000_0000_0000_0000, 48) {
        // Local-use NAT64 (RFC 8215): a network's own translator, so private at least; the
        // IPv4 address is judged where the common /96 layout puts it.
        return std::cmp::max(Class::Private, v4_class(low_v4(ip)));
    }
    if prefix(0x2002_0000_0000_0000_0000_0000_0000_0000, 16) {
        // 6to4: the IPv4 address follows the prefix.
        let embedded = u32::try_from((bits >> 80) & 0xffff_ffff).unwrap_or_default();
        return v4_class(Ipv4Addr::from(embedded));
    }
    if prefix(0x2001_0000_0000_0000_0000_0000_0000_0000, 32) {
        // Teredo: the client's IPv4 address, inverted, in the low 32 bits.
        return v4_class(Ipv4Addr::from(!u32::from(low_v4(ip))));
    }
    Class::Public
}

/// Resolves names and keeps only the addresses the policy allows, so that a name cannot lead the
/// operator where an address could not (DNS rebinding included: the check is on what is
/// connected to).
#[derive(Clone, Debug)]
struct PolicyResolver(OutboundPolicy);

/// A resolution refused by the outbound policy.
#[derive(Debug, thiserror::Error)]
#[error("every address of this name is refused by the outbound policy")]
pub(crate) struct Refused;

/// The addresses of `found` the policy allows, or [`Refused`] when there are none.
pub(crate) fn allowed_addresses(
    policy: OutboundPolicy,
    found: impl IntoIterator<Item = SocketAddr>,
) -> Result<Vec<SocketAddr>, Refused> {
    let allowed: Vec<SocketAddr> = found.into_iter().filter(|a| policy.refuse_ip(a.ip()).is_none()).collect();
    if allowed.is_empty() { Err(Refused) } else { Ok(allowed) }
}

impl reqwest::dns::Resolve for PolicyResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.0;
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let found = tokio::net::lookup_host((host.as_str(), 0)).await?;
            let allowed = allowed_addresses(policy, found)
                .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)?;
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// Builds and caches HTTP clients by CA bundle.
#[derive(Clone, Default)]
pub struct HttpClients {
    policy: OutboundPolicy,
    cache: Arc<Mutex<HashMap<Option<String>, reqwest::Client>>>,
}

impl std::fmt::Debug for HttpClients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpClients").field("policy", &self.policy).finish_non_exhaustive()
    }
}

/// Why no HTTP client could be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The CA bundle is not PEM.
    #[error("caBundle is not a PEM certificate bundle")]
    CaBundle,
    /// reqwest refused the configuration.
    #[error("the HTTP client could not be built")]
    Build,
}

impl HttpClients {
    /// Clients that connect only where `policy` allows.
    pub fn new(policy: OutboundPolicy) -> Self {
        Self { policy, cache: Arc::default() }
    }

    /// The outbound policy.
    pub fn policy(&self) -> OutboundPolicy {
        self.policy
    }

    /// The client trusting the web roots plus `ca_bundle`.
    pub fn get(&self, ca_bundle: Option<&str>) -> Result<reqwest::Client, ClientError> {
        let key = ca_bundle.map(str::to_owned);
        if let Some(c) = self.cache.lock().ok().and_then(|m| m.get(&key).cloned()) {
            return Ok(c);
        }
        let mut builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(StdDuration::from_secs(10))
            .timeout(StdDuration::from_secs(30))
            .https_only(true)
            .dns_resolver(Arc::new(PolicyResolver(self.policy)))
            .user_agent(concat!("mail-oauth-operator/", env!("CARGO_PKG_VERSION")));
        if let Some(pem) = ca_bundle {
            let certs = reqwest::Certificate::from_pem_bundle(pem.as_bytes()).map_err(|_| ClientError::CaBundle)?;
            if certs.is_empty() {
                return Err(ClientError::CaBundle);
            }
            for c in certs {
                builder = builder.add_root_certificate(c);
            }
        }
        let client = builder.build().map_err(|_| ClientError::Build)?;
        if let Ok(mut m) = self.cache.lock() {
            if m.len() >= MAX_CLIENTS {
                m.clear();
            }
            m.insert(key, client.clone());
        }
        Ok(client)
    }

    /// How many clients are cached.
    pub fn cached(&self) -> usize {
        self.cache.lock().map(|m| m.len()).unwrap_or(0)
    }
}

/// What the operator keeps of a response to a form POST.
#[derive(Clone, Debug, Default)]
pub struct Recorded {
    /// HTTP status.
    pub status: Option<u16>,
    /// `Retry-After`, as a duration from when the response arrived (never negative).
    pub retry_after: Option<Duration>,
    /// A transport failure, as a fixed sentence.
    pub transport: Option<String>,
    /// The token fields of a 2xx body, read leniently.
    pub token: Option<TokenFields>,
    /// The device authorization fields of a 2xx body, read leniently.
    pub device: Option<DeviceFields>,
    /// The error fields of a non-2xx body, raw (scrub them before use).
    pub error: Option<ErrorFields>,
}

/// A transport error, described without the request.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TransportError(pub String);

/// HTTP Basic client authentication (RFC 6749 §2.3.1: id and secret form-encoded first).
pub struct Basic<'a> {
    /// The client id.
    pub id: &'a str,
    /// The client secret.
    pub secret: &'a str,
}

/// POSTs `form` to `url` (a token, device authorization or revocation endpoint) and keeps what
/// the operator needs of the answer. Never fails: a transport failure is recorded as such.
pub async fn post_form(
    client: &reqwest::Client,
    url: Url,
    form: &[(&str, &str)],
    basic: Option<Basic<'_>>,
) -> Recorded {
    match send(client, url, form, basic).await {
        Ok(r) => r,
        Err(e) => Recorded { transport: Some(e.0), ..Default::default() },
    }
}

async fn send(
    client: &reqwest::Client,
    url: Url,
    form: &[(&str, &str)],
    basic: Option<Basic<'_>>,
) -> Result<Recorded, TransportError> {
    let body: String = url::form_urlencoded::Serializer::new(String::new()).extend_pairs(form).finish();
    let mut request = client
        .post(url)
        .header(http::header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .header(http::header::ACCEPT, "application/json")
        .body(body);
    if let Some(b) = basic {
        let encode = |v: &str| url::form_urlencoded::byte_serialize(v.as_bytes()).collect::<String>();
        request = request.basic_auth(encode(b.id), Some(encode(b.secret)));
    }
    let response = request.send().await.map_err(|e| TransportError(describe(&e)))?;
    let status = response.status();
    let retry_after = response
        .headers()
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| retry_after(v, Utc::now()));
    let body = read_capped(response).await?;
    let ok = status.is_success();
    Ok(Recorded {
        status: Some(status.as_u16()),
        retry_after,
        transport: None,
        token: ok.then(|| parse_token(&body)).flatten(),
        device: ok.then(|| parse_device(&body)).flatten(),
        error: (!ok).then(|| parse_error(&body)).flatten(),
    })
}

/// Reads a body of at most [`MAX_BODY`] bytes; a longer one is an error, and what was read of it
/// is dropped.
pub async fn read_capped(mut response: reqwest::Response) -> Result<Vec<u8>, TransportError> {
    let too_large = || TransportError(format!("the response body is larger than {} KiB", MAX_BODY / 1024));
    if response.content_length().is_some_and(|n| n > MAX_BODY as u64) {
        return Err(too_large());
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| TransportError(describe(&e)))? {
        if body.len().saturating_add(chunk.len()) > MAX_BODY {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// `Retry-After` as delay-seconds or an HTTP-date, relative to `now`; never negative.
pub fn retry_after(value: &str, now: DateTime<Utc>) -> Option<Duration> {
    let value = value.trim();
    let wait = match value.parse::<u64>() {
        Ok(secs) => Duration::try_seconds(i64::try_from(secs).unwrap_or(i64::MAX)).unwrap_or(Duration::MAX),
        Err(_) => {
            let at = DateTime::parse_from_rfc2822(value).ok()?.with_timezone(&Utc);
            crate::policy::time::between(now, at)
        }
    };
    Some(std::cmp::max(wait, Duration::zero()))
}

/// A reqwest error as a fixed sentence naming its kind, never its inner text (which would tell
/// a tenant whether a port is open). The full error is logged at debug level.
pub fn describe(e: &reqwest::Error) -> String {
    tracing::debug!(error = %e, "HTTP request failed");
    let mut cause: Option<&dyn std::error::Error> = Some(e);
    while let Some(c) = cause {
        if c.is::<Refused>() {
            return "the endpoint's addresses are refused by the outbound policy (private, loopback, link-local or metadata)"
                .into();
        }
        cause = c.source();
    }
    if e.is_timeout() {
        "the endpoint did not answer in time".into()
    } else if e.is_connect() {
        "could not connect to the endpoint (refused, unreachable, or TLS failed)".into()
    } else if e.is_body() || e.is_decode() {
        "the response body could not be read".into()
    } else {
        "the request to the endpoint failed".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_https_endpoints_away_from_metadata_and_private_addresses_are_accepted() {
        let strict = OutboundPolicy::default();
        assert!(strict.check_endpoint("https://login.microsoftonline.com/x/oauth2/v2.0/token").is_ok());
        for bad in [
            "https://127.0.0.1:8443/token",
            "https://10.0.0.1/token",
            "https://[::1]/token",
            "https://[::ffff:127.0.0.1]/token",
            "https://[::ffff:169.254.169.254]/latest",
            "https://localhost/token",
            "https://169.254.169.254/latest",
            "https://[fe80::1]/token",
            "https://[fd00:ec2::254]/",
            "https://metadata.google.internal/x",
            "https://metadata.google.internal./x",
            "https://METADATA.google.internal/x",
            "https://100.100.100.200/",
            "https://0.0.0.0/",
            "http://idp.example.com/token",
            "not a url",
        ] {
            assert!(strict.check_endpoint(bad).is_err(), "{bad} was accepted");
        }
        let lab = OutboundPolicy { allow_private: true };
        assert!(lab.check_endpoint("https://127.0.0.1:8443/token").is_ok());
        assert!(lab.check_endpoint("https://10.1.2.3/token").is_ok());
        assert!(lab.check_endpoint("https://169.254.169.254/latest").is_err(), "metadata stays refused");
        assert!(lab.check_endpoint("https://[::ffff:169.254.169.254]/").is_err());
    }

    /// Whether (strict, with private endpoints allowed) refuse `ip`.
    fn refused(ip: &str) -> (bool, bool) {
        let ip: IpAddr = ip.parse().unwrap_or_else(|e| panic!("{ip}: {e}"));
        let lab = OutboundPolicy { allow_private: true };
        (OutboundPolicy::default().refuse_ip(ip).is_some(), lab.refuse_ip(ip).is_some())
    }

    #[test]
    fn every_special_range_is_refused_and_an_embedded_ipv4_address_is_judged_as_itself() {
        let public = [
            "8.8.8.8",
            "20.190.160.1",
            "198.17.255.255",
            "198.20.0.1",
            "223.255.255.255",
            "2606:4700::1111",
            "64:ff9b::808:808", // NAT64 of 8.8.8.8 (an IPv6-only cluster's way out)
            "2002:808:808::1",  // 6to4 of 8.8.8.8
            "::ffff:8.8.8.8",   // IPv4-mapped
            "2001:0:4136:e378:8000:63bf:f7f7:f7f7", // Teredo client 8.8.8.8
        ];
        let private = [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "100.64.0.1",
            "198.18.0.1",     // benchmarking
            "198.19.255.255", // benchmarking
            "::1",
            "fd12:3456::1",
            "fec0::1",
            "64:ff9b::7f00:1",    // NAT64 of 127.0.0.1
            "64:ff9b::a00:1",     // NAT64 of 10.0.0.1
            "64:ff9b::c612:1",    // NAT64 of 198.18.0.1
            "::7f00:1",           // IPv4-compatible 127.0.0.1
            "::ffff:127.0.0.1",   // IPv4-mapped
            "::ffff:0:7f00:1",    // IPv4-translated 127.0.0.1
            "2002:7f00:1::1",     // 6to4 of 127.0.0.1
            "2002:c612:1::",      // 6to4 of 198.18.0.1
            "64:ff9b:1::808:808", // local-use NAT64: the network's own translator
        ];
        let always = [
            "0.0.0.0",
            "0.1.2.3",
            "169.254.169.254",
            "192.0.0.192",     // IETF protocol assignments (Oracle Cloud metadata)
            "192.0.2.1",       // documentation
            "198.51.100.7",    // documentation
            "203.0.113.9",     // documentation
            "224.0.0.1",       // multicast
            "239.255.255.250", // multicast
            "240.0.0.1",       // reserved
            "255.255.255.255", // broadcast
            "100.100.100.200", // Alibaba Cloud metadata
            "::",
            "fe80::1",
            "ff02::1",
            "100::1",                 // discard-only
            "2001:db8::1",            // documentation
            "fd00:ec2::254",          // AWS metadata
            "64:ff9b::a9fe:a9fe",     // NAT64 of 169.254.169.254
            "64:ff9b::f000:1",        // NAT64 of 240.0.0.1
            "64:ff9b::ffff:ffff",     // NAT64 of the broadcast address
            "64:ff9b::e000:1",        // NAT64 of multicast
            "64:ff9b::1",             // NAT64 of 0.0.0.1
            "64:ff9b:1::a9fe:a9fe",   // local-use NAT64 of 169.254.169.254
            "::a9fe:a9fe",            // IPv4-compatible 169.254.169.254
            "::ffff:169.254.169.254", // IPv4-mapped
            "::ffff:0:a9fe:a9fe",     // IPv4-translated
            "::ffff:240.0.0.1",
            "2002:a9fe:a9fe::1",                    // 6to4 of 169.254.169.254
            "2002:c000:2ff::1",                     // 6to4 of 192.0.2.255
            "2001:0:4136:e378:8000:63bf:5601:5601", // Teredo client 169.254.169.254
        ];
        for ip in public {
            assert_eq!(refused(ip), (false, false), "{ip} is public");
        }
        for ip in private {
            assert_eq!(refused(ip), (true, false), "{ip} is private");
        }
        for ip in always {
            assert_eq!(refused(ip), (true, true), "{ip} is always refused");
        }
        let strict = OutboundPolicy::default();
        assert!(strict.check_endpoint("https://[64:ff9b::a9fe:a9fe]/latest").is_err());
        assert!(strict.check_endpoint("https://198.18.0.1/token").is_err());
        assert!(strict.check_endpoint("https://240.0.0.1/token").is_err());
        assert!(strict.check_endpoint("https://[64:ff9b::808:808]/token").is_ok());
    }

    #[test]
    fn a_name_resolving_to_a_mix_keeps_only_the_allowed_addresses() {
        let strict = OutboundPolicy::default();
        let at = |ip: &str| SocketAddr::new(ip.parse().unwrap(), 443);
        let found = [at("127.0.0.1"), at("8.8.8.8"), at("169.254.169.254"), at("::ffff:127.0.0.1"), at("2606:4700::1")];
        assert_eq!(allowed_addresses(strict, found).unwrap(), [at("8.8.8.8"), at("2606:4700::1")]);
        assert!(allowed_addresses(strict, [at("127.0.0.1"), at("::1")]).is_err());
        let lab = OutboundPolicy { allow_private: true };
        assert!(allowed_addresses(lab, [at("169.254.169.254"), at("64:ff9b::a9fe:a9fe")]).is_err());
    }

    #[tokio::test]
    async fn the_resolver_refuses_names_leading_to_loopback_link_local_and_mapped_loopback() {
        use reqwest::dns::Resolve;
        let strict = PolicyResolver(OutboundPolicy::default());
        let lab = PolicyResolver(OutboundPolicy { allow_private: true });
        // lookup_host answers an address literal as itself, so these are names resolving there.
        for name in ["localhost", "127.0.0.1", "169.254.169.254", "::ffff:127.0.0.1", "64:ff9b::7f00:1"] {
            let resolved = strict.resolve(name.parse().unwrap()).await;
            assert!(resolved.is_err(), "{name} resolved to an allowed address");
        }
        assert!(lab.resolve("169.254.169.254".parse().unwrap()).await.is_err());
        assert!(lab.resolve("::ffff:169.254.169.254".parse().unwrap()).await.is_err());
        let allowed: Vec<SocketAddr> = lab.resolve("127.0.0.1".parse().unwrap()).await.unwrap().collect();
        assert_eq!(allowed, [SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 0)]);
        // Through the client: a request to a name that resolves to loopback is never sent.
        let client = HttpClients::default().get(None).unwrap();
        let url = Url::parse("https://localhost:9/token").unwrap();
        let recorded = post_form(&client, url, &[("grant_type", "refresh_token")], None).await;
        let transport = recorded.transport.unwrap_or_default();
        assert!(transport.contains("refused by the outbound policy"), "{transport}");
    }

    #[test]
    fn a_ca_bundle_that_is_not_pem_is_refused_and_the_cache_is_bounded() {
        let clients = HttpClients::default();
        assert!(matches!(clients.get(Some("garbage")), Err(ClientError::CaBundle)));
        assert!(clients.get(None).is_ok());
        let pem = rcgen::generate_simple_self_signed(vec!["x".to_owned()]).map(|c| c.cert.pem()).unwrap();
        for i in 0..(MAX_CLIENTS * 2) {
            // The same certificate with different trailing text is a different cache key.
            assert!(clients.get(Some(&format!("{pem}\n# {i}\n"))).is_ok());
        }
        assert!(clients.cached() <= MAX_CLIENTS);
    }

    #[test]
    fn retry_after_reads_seconds_and_http_dates_and_never_goes_negative() {
        let now = DateTime::parse_from_rfc3339("2026-11-23T12:00:00Z").unwrap().with_timezone(&Utc);
        assert_eq!(retry_after("120", now), Some(Duration::seconds(120)));
        assert_eq!(retry_after("Mon, 23 Nov 2026 12:05:00 GMT", now), Some(Duration::minutes(5)));
        assert_eq!(retry_after("Mon, 23 Nov 2026 11:00:00 GMT", now), Some(Duration::zero()));
        assert_eq!(retry_after("99999999999999999999", now), None);
        assert_eq!(retry_after("18446744073709551615", now), Some(Duration::MAX));
        assert_eq!(retry_after("soon", now), None);
    }

    /// What a name's DNS records may hold, class by class, and whether (strict, with private
    /// endpoints allowed) leave nothing to connect to. `PolicyResolver` hands every name's
    /// `lookup_host` answer to `allowed_addresses`, so this is what a name resolving there gets;
    /// the wiring itself is run through a real name (`localhost`) below.
    #[test]
    fn a_name_resolving_to_loopback_link_local_metadata_or_mapped_loopback_gets_no_address() {
        let at = |ip: &str| SocketAddr::new(ip.parse().unwrap(), 443);
        let cases: [(&[&str], bool, bool); 12] = [
            (&["127.0.0.1"], true, false),         // loopback (localhost, or a rebinding attack)
            (&["127.0.0.53", "::1"], true, false), // loopback, A and AAAA
            (&["::ffff:127.0.0.1"], true, false),  // IPv4-mapped loopback in an AAAA record
            (&["::ffff:0:7f00:1"], true, false),   // IPv4-translated loopback
            (&["10.0.0.5"], true, false),          // private
            (&["169.254.169.254"], true, true),    // link-local: the cloud metadata service
            (&["169.254.0.1"], true, true),        // link-local
            (&["fe80::a9fe:a9fe"], true, true),    // IPv6 link-local
            (&["fd00:ec2::254"], true, true),      // AWS metadata over IPv6
            (&["100.100.100.200", "192.0.0.192"], true, true), // Alibaba and Oracle metadata
            (&["::ffff:169.254.169.254"], true, true), // IPv4-mapped metadata
            (&["169.254.169.254", "::ffff:127.0.0.1"], true, false), // metadata and mapped loopback
        ];
        let strict = OutboundPolicy::default();
        let lab = OutboundPolicy { allow_private: true };
        for (records, refused_strict, refused_lab) in cases {
            let found: Vec<SocketAddr> = records.iter().map(|ip| at(ip)).collect();
            assert_eq!(allowed_addresses(strict, found.clone()).is_err(), refused_strict, "strict: {records:?}");
            match allowed_addresses(lab, found.clone()) {
                Err(Refused) => assert!(refused_lab, "with private endpoints allowed: {records:?} refused"),
                Ok(kept) => {
                    assert!(!refused_lab, "with private endpoints allowed: {records:?} kept {kept:?}");
                    // Only the allowed records are kept: never the link-local or metadata ones.
                    let expected: Vec<SocketAddr> =
                        found.into_iter().filter(|a| lab.refuse_ip(a.ip()).is_none()).collect();
                    assert_eq!(kept, expected);
                    assert!(kept.iter().all(|a| !matches!(v4_or_mapped(a.ip()), Some(v4) if v4.is_link_local())));
                }
            }
        }
    }

    /// The IPv4 address of `ip`, mapped or not.
    fn v4_or_mapped(ip: IpAddr) -> Option<Ipv4Addr> {
        match ip {
            IpAddr::V4(v4) => Some(v4),
            IpAddr::V6(v6) => v6.to_ipv4_mapped(),
        }
    }

    #[tokio::test]
    async fn a_request_to_a_name_resolving_to_loopback_never_connects_without_private_endpoints_allowed() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let url = Url::parse(&format!("https://localhost:{port}/token")).unwrap();
        let strict = HttpClients::default().get(None).unwrap();
        let recorded = post_form(&strict, url.clone(), &[("grant_type", "client_credentials")], None).await;
        let transport = recorded.transport.unwrap_or_default();
        assert!(transport.contains("refused by the outbound policy"), "{transport}");
        let accepted = tokio::time::timeout(StdDuration::from_millis(300), listener.accept()).await;
        assert!(accepted.is_err(), "the refused request reached the listener");
        // Allowed, the same name is connected to (the TLS handshake with a plain listener fails).
        let lab = HttpClients::new(OutboundPolicy { allow_private: true }).get(None).unwrap();
        let (recorded, accepted) = tokio::join!(
            post_form(&lab, url, &[("grant_type", "client_credentials")], None),
            tokio::time::timeout(StdDuration::from_secs(10), async {
                let (socket, _) = listener.accept().await.unwrap();
                drop(socket);
            })
        );
        assert!(accepted.is_ok(), "the allowed request never reached the listener");
        let transport = recorded.transport.unwrap_or_default();
        assert!(!transport.contains("outbound policy"), "{transport}");
    }
}
