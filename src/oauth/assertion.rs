//! Signed JWT assertions (RFC 7523): client authentication with a private key (`private_key_jwt`,
//! with the certificate's `x5t#S256` thumbprint in the header, as Entra expects), and the JWT
//! bearer grant's assertion (a Google service account acting for a mailbox). With an RSA key a
//! client assertion is PS256 (RSASSA-PSS: Entra's certificate credentials say "alg: Should be
//! PS256") and a bearer assertion RS256 (Google's service accounts sign with RS256); a P-256 key
//! signs ES256 either way. Assertions live five minutes from a minute back (clock skew) and carry
//! a unique `jti`. They are signed with the wall clock, which is what the server checks them
//! against.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Duration, Utc};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use secrecy::SecretString;
use sha2::{Digest, Sha256};

/// How long an assertion is valid.
pub const ASSERTION_LIFETIME: Duration = Duration::minutes(5);

/// How far `iat`/`nbf` are put back, so that a server whose clock is a little behind still takes
/// the assertion (AADSTS700024, Google's "invalid JWT": clock skew).
pub const CLOCK_SKEW: Duration = Duration::seconds(60);

/// A private key to sign assertions with, and what identifies it.
#[derive(Clone)]
pub struct SigningKey {
    key: EncodingKey,
    /// The key's family: RSA or P-256.
    family: Family,
    /// `x5t#S256`: base64url of the certificate's SHA-256, when a certificate is known.
    x5t_s256: Option<String>,
    /// `kid`, when the key has an id (a service account's `private_key_id`).
    kid: Option<String>,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("family", &self.family)
            .field("x5t_s256", &self.x5t_s256)
            .finish_non_exhaustive()
    }
}

/// What kind of key signs, and so which algorithms it can use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    Rsa,
    P256,
}

/// What an assertion is for; it decides the algorithm an RSA key signs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// `private_key_jwt` client authentication: PS256 (Entra's certificate credentials).
    ClientAssertion,
    /// A JWT bearer grant (RFC 7523 §2.1): RS256 (Google's service accounts).
    BearerGrant,
}

impl Family {
    fn algorithm(self, purpose: Purpose) -> Algorithm {
        match (self, purpose) {
            (Family::Rsa, Purpose::ClientAssertion) => Algorithm::PS256,
            (Family::Rsa, Purpose::BearerGrant) => Algorithm::RS256,
            (Family::P256, _) => Algorithm::ES256,
        }
    }
}

impl SigningKey {
    /// A key from PEM (PKCS#1 or PKCS#8 RSA, SEC1 or PKCS#8 P-256), with its certificate's PEM
    /// for the thumbprint, and a key id.
    pub fn from_pem(key_pem: &[u8], certificate_pem: Option<&[u8]>, kid: Option<String>) -> Result<Self, String> {
        let (key, family) = match EncodingKey::from_rsa_pem(key_pem) {
            Ok(k) => (k, Family::Rsa),
            Err(_) => match EncodingKey::from_ec_pem(key_pem) {
                Ok(k) => (k, Family::P256),
                Err(_) => return Err("the private key is not an RSA or P-256 key in PEM".into()),
            },
        };
        let x5t_s256 = match certificate_pem {
            Some(pem) => Some(thumbprint(pem)?),
            None => None,
        };
        let signer = Self { key, family, x5t_s256, kid };
        // A key that cannot sign (a P-384 key read as EC, a truncated PEM) is refused now, for
        // either purpose.
        for purpose in [Purpose::ClientAssertion, Purpose::BearerGrant] {
            signer.sign(purpose, &serde_json::json!({"probe": true}))?;
        }
        Ok(signer)
    }

    /// The algorithm an assertion for `purpose` is signed with.
    pub fn algorithm(&self, purpose: Purpose) -> Algorithm {
        self.family.algorithm(purpose)
    }

    /// Signs `claims` for `purpose`.
    pub fn sign(&self, purpose: Purpose, claims: &serde_json::Value) -> Result<SecretString, String> {
        let mut header = Header::new(self.algorithm(purpose));
        header.x5t_s256.clone_from(&self.x5t_s256);
        header.kid.clone_from(&self.kid);
        jsonwebtoken::encode(&header, claims, &self.key)
            .map(SecretString::from)
            .map_err(|_| "the private key could not sign (an unsupported key type or curve)".to_owned())
    }
}

/// A fresh unique id.
fn jti() -> String {
    oauth2::CsrfToken::new_random().secret().clone()
}

/// A `private_key_jwt` client assertion for `audience` (the endpoint it is sent to).
pub fn client_assertion(
    key: &SigningKey,
    client_id: &str,
    audience: &str,
    now: DateTime<Utc>,
) -> Result<SecretString, String> {
    let iat = now.timestamp().saturating_sub(CLOCK_SKEW.num_seconds());
    key.sign(
        Purpose::ClientAssertion,
        &serde_json::json!({
            "iss": client_id,
            "sub": client_id,
            "aud": audience,
            "jti": jti(),
            "iat": iat,
            "nbf": iat,
            "exp": iat.saturating_add(ASSERTION_LIFETIME.num_seconds()),
        }),
    )
}

/// A JWT bearer grant assertion (RFC 7523 §2.1; Google's service accounts: `iss` the account,
/// `sub` the mailbox it acts for, `scope`, `aud` the token endpoint).
pub fn bearer_assertion(
    key: &SigningKey,
    issuer: &str,
    subject: &str,
    scopes: &[String],
    audience: &str,
    now: DateTime<Utc>,
) -> Result<SecretString, String> {
    let iat = now.timestamp().saturating_sub(CLOCK_SKEW.num_seconds());
    key.sign(
        Purpose::BearerGrant,
        &serde_json::json!({
            "iss": issuer,
            "sub": subject,
            "scope": scopes.join(" "),
            "aud": audience,
            "jti": jti(),
            "iat": iat,
            "exp": iat.saturating_add(ASSERTION_LIFETIME.num_seconds()),
        }),
    )
}

fn certificate_der(pem: &[u8]) -> Result<Vec<u8>, String> {
    let parsed = ::pem::parse_many(pem).map_err(|_| "the certificate is not PEM".to_owned())?;
    parsed
        .into_iter()
        .find(|p| p.tag() == "CERTIFICATE")
        .map(|p| p.into_contents())
        .ok_or_else(|| "no CERTIFICATE block in the certificate PEM".to_owned())
}

/// `x5t#S256` of the first certificate in `pem`.
pub fn thumbprint(pem: &[u8]) -> Result<String, String> {
    Ok(URL_SAFE_NO_PAD.encode(Sha256::digest(certificate_der(pem)?)))
}

/// When the first certificate in `pem` stops being valid.
pub fn certificate_expiry(pem: &[u8]) -> Result<DateTime<Utc>, String> {
    let der = certificate_der(pem)?;
    let (_, cert) =
        x509_parser::parse_x509_certificate(&der).map_err(|_| "the certificate cannot be parsed".to_owned())?;
    DateTime::from_timestamp(cert.validity().not_after.timestamp(), 0)
        .ok_or_else(|| "the certificate's expiry is out of range".to_owned())
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret;

    use super::*;

    fn claims_of(jwt: &str) -> (serde_json::Value, serde_json::Value) {
        let part = |i: usize| {
            let text = jwt.split('.').nth(i).unwrap();
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(text).unwrap()).unwrap()
        };
        (part(0), part(1))
    }

    #[test]
    fn a_client_assertion_is_short_lived_unique_and_names_the_certificate() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["client".to_owned()]).unwrap().self_signed(&key).unwrap();
        let signer = SigningKey::from_pem(key.serialize_pem().as_bytes(), Some(cert.pem().as_bytes()), None).unwrap();
        let now = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let a = client_assertion(&signer, "app", "https://idp/token", now).unwrap();
        let b = client_assertion(&signer, "app", "https://idp/token", now).unwrap();
        let (header, claims) = claims_of(a.expose_secret());
        assert_eq!(header["alg"], "ES256");
        assert_eq!(header["x5t#S256"], thumbprint(cert.pem().as_bytes()).unwrap());
        assert_eq!(
            (claims["iss"].as_str(), claims["sub"].as_str(), claims["aud"].as_str()),
            (Some("app"), Some("app"), Some("https://idp/token"))
        );
        assert_eq!(claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(), 300);
        assert_eq!(claims["iat"].as_i64().unwrap(), now.timestamp() - 60, "put back for clock skew");
        assert_ne!(claims_of(b.expose_secret()).1["jti"], claims["jti"], "a unique jti each time");
        assert!(!format!("{signer:?}").contains("PRIVATE"));
        let expiry = certificate_expiry(cert.pem().as_bytes()).unwrap();
        assert!(expiry > now, "{expiry}");
    }

    /// An RSA key pair (PKCS#8 private, SPKI public), made by openssl: ring cannot generate RSA
    /// keys, and Entra's certificates are RSA.
    pub(crate) fn rsa_key_pair() -> (String, String) {
        let run = |args: &[&str], input: Option<&[u8]>| {
            use std::io::Write;
            let mut child = std::process::Command::new("openssl")
                .args(args)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("openssl runs");
            if let Some(input) = input {
                child.stdin.take().unwrap().write_all(input).unwrap();
            }
            drop(child.stdin.take());
            let out = child.wait_with_output().unwrap();
            assert!(out.status.success());
            String::from_utf8(out.stdout).unwrap()
        };
        let private = run(&["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"], None);
        let public = run(&["pkey", "-pubout"], Some(private.as_bytes()));
        (private, public)
    }

    #[test]
    fn an_rsa_key_signs_client_assertions_ps256_for_entra_and_bearer_assertions_rs256_for_google() {
        let (private, public) = rsa_key_pair();
        let signer = SigningKey::from_pem(private.as_bytes(), None, None).unwrap();
        let now = chrono::Utc::now();
        let verify = |jwt: &str, alg: Algorithm| {
            let key = jsonwebtoken::DecodingKey::from_rsa_pem(public.as_bytes()).unwrap();
            let mut v = jsonwebtoken::Validation::new(alg);
            v.set_audience(&["https://idp/token"]);
            jsonwebtoken::decode::<serde_json::Value>(jwt, &key, &v).map(|d| d.header.alg)
        };
        let client = client_assertion(&signer, "app", "https://idp/token", now).unwrap();
        assert_eq!(claims_of(client.expose_secret()).0["alg"], "PS256");
        assert_eq!(verify(client.expose_secret(), Algorithm::PS256).unwrap(), Algorithm::PS256);
        assert!(verify(client.expose_secret(), Algorithm::RS256).is_err(), "not RS256");
        let bearer =
            bearer_assertion(&signer, "sa@p.iam.gserviceaccount.com", "m@x", &[], "https://idp/token", now).unwrap();
        assert_eq!(claims_of(bearer.expose_secret()).0["alg"], "RS256");
        assert_eq!(verify(bearer.expose_secret(), Algorithm::RS256).unwrap(), Algorithm::RS256);
    }

    #[test]
    fn something_that_is_no_key_or_certificate_is_refused() {
        assert!(
            SigningKey::from_pem(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", None, None)
                .is_err()
        );
        assert!(thumbprint(b"not pem").is_err());
        assert!(certificate_expiry(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").is_err());
    }
}
