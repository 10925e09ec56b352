//! The shared relay's trust in a published Secret: the operator signs what the relay takes from
//! each published Secret with relay keys (an HMAC-SHA256 with a key only the operator and the
//! relay can read, in a Secret of the operator's namespace) and writes the signature in the
//! annotation [`SIGNATURE_ANNOTATION`]; the shared relay serves only Secrets whose signature
//! verifies. A tenant who may create Secrets in a served namespace can still label one as
//! published, but cannot sign it: it cannot claim another tenant's mailbox, add senders or
//! servers, nor move a signed Secret to another namespace or name.
//!
//! What is signed ([`message`]): the Secret's namespace and name, then every key the relay trusts,
//! each as the relay reads it (trimmed; empty counts as absent): the mailbox (`username`),
//! `relay_username`, the SHA-256 of `relay_password`, `relay_previous_sha256`,
//! `relay_previous_until`, `relay_senders`, and the host, port and TLS mode of SMTP, IMAP and
//! POP3. Every field is length-prefixed and named, so no two different Secrets give the same
//! bytes. The access token and its expiry are not signed: they change at every renewal, and who
//! can write the Secret can read it, holds the token already and could present it to the signed
//! server for the signed mailbox without the relay; a token swapped in gains nothing the
//! signature protects (the user name, the password, the senders and the servers stay signed).
//! The signature is deterministic: the same Secret and key give the same annotation, so an
//! unchanged Secret is not written again.

use ring::hmac;
use sha2::{Digest, Sha256};

/// The annotation on a published Secret that carries the signature:
/// `v1.<key id>.<HMAC-SHA256, hex>`.
pub const SIGNATURE_ANNOTATION: &str = "mailoauth.io/relay-signature";

/// The data key of the signing key's Secret.
pub const KEY_DATA: &str = "key";

/// The signing key's length (bytes): the length of SHA-256's output, as RFC 2104 advises.
pub const KEY_LEN: usize = 32;

/// The default name of the signing key's Secret (in the operator's namespace).
pub const DEFAULT_KEY_SECRET: &str = "mail-oauth-operator-relay-signing";

/// The signature's version prefix.
const VERSION: &str = "v1";

/// What every signed message starts with (so that no other use of the key can give the same
/// bytes).
const DOMAIN: &[u8] = b"mailoauth.io relay-signature v1\0";

/// The keys signed (besides the namespace, the name and the password's digest), in this order.
pub const SIGNED_KEYS: [&str; 14] = [
    "username",
    "relay_username",
    "relay_previous_sha256",
    "relay_previous_until",
    "relay_senders",
    "smtp_host",
    "smtp_port",
    "smtp_tls",
    "imap_host",
    "imap_port",
    "imap_tls",
    "pop3_host",
    "pop3_port",
    "pop3_tls",
];

/// The key that signs: HMAC-SHA256 with [`KEY_LEN`] random bytes. `Debug` shows only its id.
#[derive(Clone)]
pub struct SigningKey {
    key: hmac::Key,
    id: String,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey").field("id", &self.id).finish_non_exhaustive()
    }
}

impl PartialEq for SigningKey {
    fn eq(&self, other: &Self) -> bool {
        // The id is a digest of the whole key.
        self.id == other.id
    }
}

/// Why a key's bytes cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("the relay signing key must be {KEY_LEN} to 1024 bytes, not {0}")]
pub struct BadKey(pub usize);

impl SigningKey {
    /// A key from its bytes (at least [`KEY_LEN`]).
    pub fn new(bytes: &[u8]) -> Result<Self, BadKey> {
        if bytes.len() < KEY_LEN || bytes.len() > 1024 {
            return Err(BadKey(bytes.len()));
        }
        // The id tells keys apart (in a signature, to say "another key" rather than "forged");
        // 8 bytes of a digest under a domain of its own say nothing about the key.
        let mut id = Sha256::new();
        id.update(b"mailoauth.io relay-signing-key id\0");
        id.update(bytes);
        let id = hex(id.finalize().get(..8).unwrap_or_default());
        Ok(Self { key: hmac::Key::new(hmac::HMAC_SHA256, bytes), id })
    }

    /// The key's id: 16 hex digits of a digest of it.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The signature of `message`: `v1.<key id>.<HMAC, hex>`.
    pub fn sign(&self, message: &[u8]) -> String {
        format!("{VERSION}.{}.{}", self.id, hex(hmac::sign(&self.key, message).as_ref()))
    }

    /// Whether `signature` is this key's over `message` (the HMAC compared in constant time).
    pub fn verify(&self, signature: Option<&str>, message: &[u8]) -> Result<(), Refusal> {
        let signature = signature.ok_or(Refusal::Unsigned)?;
        let mut parts = signature.trim().splitn(3, '.');
        let (Some(VERSION), Some(id), Some(tag)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(Refusal::Malformed);
        };
        let tag = unhex(tag).filter(|t| t.len() == 32).ok_or(Refusal::Malformed)?;
        if id != self.id {
            return Err(Refusal::OtherKey);
        }
        hmac::verify(&self.key, message, &tag).map_err(|_| Refusal::BadSignature)
    }
}

/// Why the shared relay does not serve a Secret.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No signature annotation.
    Unsigned,
    /// The annotation is not a signature.
    Malformed,
    /// Signed with another key (one rotated away, or one never the operator's).
    OtherKey,
    /// The signature does not match the Secret (changed, copied from another namespace or name,
    /// or forged).
    BadSignature,
    /// The relay has no signing key (its Secret is absent or unreadable).
    NoKey,
}

impl Refusal {
    /// A fixed word for a metric label.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Unsigned => "unsigned",
            Refusal::Malformed => "malformed",
            Refusal::OtherKey => "other_key",
            Refusal::BadSignature => "bad_signature",
            Refusal::NoKey => "no_key",
        }
    }

    /// The reason in words, for a log line.
    pub fn describe(self) -> &'static str {
        match self {
            Refusal::Unsigned => {
                "it carries no relay signature (not written by the operator, or by a version before it)"
            }
            Refusal::Malformed => "its relay signature annotation is not a signature",
            Refusal::OtherKey => "it is signed with another key (rotated away, or never the operator's)",
            Refusal::BadSignature => {
                "its relay signature does not match it (changed, copied from another namespace or name, or forged)"
            }
            Refusal::NoKey => "the relay has no signing key yet",
        }
    }
}

/// The bytes signed for the Secret `namespace`/`name` whose data `get` gives (raw values; each is
/// trimmed, and empty counts as absent, as the relay reads them).
pub fn message(namespace: &str, name: &str, mut get: impl FnMut(&str) -> Option<String>) -> Vec<u8> {
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(DOMAIN);
    field(&mut out, Some(namespace.as_bytes()));
    field(&mut out, Some(name.as_bytes()));
    let value = |v: Option<String>| v.map(|v| v.trim().to_owned()).filter(|v| !v.is_empty());
    let password = value(get("relay_password")).map(|p| Sha256::digest(p.as_bytes()));
    field(&mut out, Some(b"relay_password sha256"));
    field(&mut out, password.as_ref().map(|d| d.as_slice()));
    for key in SIGNED_KEYS {
        field(&mut out, Some(key.as_bytes()));
        field(&mut out, value(get(key)).as_deref().map(str::as_bytes));
    }
    out
}

/// One field: `0` when absent; `1`, the length (8 bytes, big endian) and the bytes when present.
fn field(out: &mut Vec<u8>, value: Option<&[u8]>) {
    match value {
        None => out.push(0),
        Some(v) => {
            out.push(1);
            out.extend_from_slice(&u64::try_from(v.len()).unwrap_or(u64::MAX).to_be_bytes());
            out.extend_from_slice(v);
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || !text.is_ascii() || text.len() > 128 {
        return None;
    }
    text.as_bytes()
        .chunks(2)
        .map(|pair| std::str::from_utf8(pair).ok().and_then(|p| u8::from_str_radix(p, 16).ok()))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn data(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    fn msg(ns: &str, name: &str, d: &BTreeMap<String, String>) -> Vec<u8> {
        message(ns, name, |k| d.get(k).cloned())
    }

    fn key(byte: u8) -> SigningKey {
        SigningKey::new(&[byte; KEY_LEN]).unwrap()
    }

    fn base() -> BTreeMap<String, String> {
        data(&[
            ("username", "a@example.com"),
            ("relay_username", "a@example.com"),
            ("relay_password", "pw"),
            ("relay_senders", "x@example.com"),
            ("smtp_host", "smtp.example.com"),
            ("smtp_port", "587"),
            ("access_token", "token-1"),
        ])
    }

    #[test]
    fn the_message_is_length_prefixed_so_moving_bytes_between_fields_changes_it() {
        let d = base();
        // The namespace and name cannot trade characters.
        assert_ne!(msg("ab", "c", &d), msg("a", "bc", &d));
        // Nor two keys.
        let mut moved = d.clone();
        moved.insert("smtp_host".into(), "smtp.example.com5".into());
        moved.insert("smtp_port".into(), "87".into());
        assert_ne!(msg("n", "s", &d), msg("n", "s", &moved));
        // Absent and empty are the same (the relay reads both as absent); absent and a value differ.
        let mut empty = d.clone();
        empty.insert("imap_host".into(), " ".into());
        assert_eq!(msg("n", "s", &d), msg("n", "s", &empty));
        let mut senders = d.clone();
        senders.remove("relay_senders");
        assert_ne!(msg("n", "s", &d), msg("n", "s", &senders));
        // Surrounding white space is not part of a value (the relay trims it).
        let mut spaced = d.clone();
        spaced.insert("relay_username".into(), " a@example.com\n".into());
        assert_eq!(msg("n", "s", &d), msg("n", "s", &spaced));
        // The exact bytes of a small message: domain, then (flag, length, bytes) per field.
        let only = data(&[("username", "u")]);
        let m = msg("n", "s", &only);
        let mut want = DOMAIN.to_vec();
        for f in [&b"n"[..], b"s", b"relay_password sha256"] {
            want.push(1);
            want.extend_from_slice(&(f.len() as u64).to_be_bytes());
            want.extend_from_slice(f);
        }
        want.push(0);
        for k in SIGNED_KEYS {
            want.push(1);
            want.extend_from_slice(&(k.len() as u64).to_be_bytes());
            want.extend_from_slice(k.as_bytes());
            if k == "username" {
                want.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0, 1, b'u']);
            } else {
                want.push(0);
            }
        }
        assert_eq!(m, want);
    }

    #[test]
    fn every_trusted_key_is_covered_and_the_token_is_not() {
        let d = base();
        let signed = msg("n", "s", &d);
        for k in ["relay_password", "relay_previous_until", "pop3_tls", "imap_port", "username"] {
            let mut changed = d.clone();
            changed.insert(k.into(), "other".into());
            assert_ne!(msg("n", "s", &changed), signed, "{k} is signed");
        }
        for k in ["access_token", "expires_at", "xoauth2", "token_type", "template_key"] {
            let mut changed = d.clone();
            changed.insert(k.into(), "other".into());
            assert_eq!(msg("n", "s", &changed), signed, "{k} is not signed");
        }
        // The password only as its digest: the message never holds it.
        assert!(!signed.windows(2).any(|w| w == b"pw"));
    }

    #[test]
    fn a_signature_verifies_only_for_the_same_message_and_key() {
        let k = key(1);
        let m = msg("team-a", "box-mail-token", &base());
        let sig = k.sign(&m);
        assert_eq!(sig, k.sign(&m), "deterministic");
        assert!(sig.starts_with(&format!("v1.{}.", k.id())));
        assert_eq!(k.verify(Some(&sig), &m), Ok(()));
        // Copied to another namespace or name.
        assert_eq!(k.verify(Some(&sig), &msg("team-b", "box-mail-token", &base())), Err(Refusal::BadSignature));
        assert_eq!(k.verify(Some(&sig), &msg("team-a", "other", &base())), Err(Refusal::BadSignature));
        // Another key: said as such.
        assert_eq!(key(2).verify(Some(&sig), &m), Err(Refusal::OtherKey));
        // Another key's id with this key's format: the HMAC decides.
        let forged = format!("v1.{}.{}", k.id(), "00".repeat(32));
        assert_eq!(k.verify(Some(&forged), &m), Err(Refusal::BadSignature));
        assert_eq!(k.verify(None, &m), Err(Refusal::Unsigned));
        for bad in ["", "v1", "v1.x", "v2.a.b", &format!("v1.{}.zz", k.id()), &format!("v1.{}.00", k.id())] {
            assert_eq!(k.verify(Some(bad), &m), Err(Refusal::Malformed), "{bad:?}");
        }
        assert_eq!(SigningKey::new(&[0; 16]).err(), Some(BadKey(16)));
        assert!(!format!("{k:?}").contains("[1"), "Debug shows the id only");
        assert_ne!(key(1).id(), key(2).id());
    }
}
