//! The published Secret as kubelet mounts it (one file per key; an update swaps the `..data`
//! symlink): read whole, from one resolved version of the directory, each file bounded, every time
//! a client authenticates, so a renewed token or a rotated password is used by the next session.

use std::io::Read;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Largest file read from the directory (a token is a few KiB).
const MAX_FILE: u64 = 64 * 1024;

/// Why the mounted Secret cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// A key the relay needs is not there.
    #[error(
        "{dir}: the key {key} is missing (the binding needs spec.relay.enabled, and the Secret must be mounted as a volume)"
    )]
    Missing {
        /// The directory.
        dir: String,
        /// The key.
        key: &'static str,
    },
    /// A file could not be read.
    #[error("{dir}: reading the key {key} failed: {why}")]
    Read {
        /// The directory.
        dir: String,
        /// The key.
        key: &'static str,
        /// The I/O error.
        why: String,
    },
    /// A file is larger than the bound.
    #[error("{dir}: the key {key} is larger than {MAX_FILE} bytes")]
    TooLarge {
        /// The directory.
        dir: String,
        /// The key.
        key: &'static str,
    },
}

/// One reading of the mounted Secret. `Debug` shows neither the password nor the token.
pub struct Mounted {
    /// The mailbox (`username`): the only envelope sender accepted for now.
    pub mailbox: String,
    /// The user name clients log in with (`relay_username`, else `username`).
    pub relay_username: String,
    /// SHA-256 of `relay_password`: only digests are compared, in constant time.
    password_digest: [u8; 32],
    /// SHA-256 of the password before the last rotation (`relay_previous_sha256`) and the end of
    /// its grace period (`relay_previous_until`), while one runs.
    previous: Option<([u8; 32], DateTime<Utc>)>,
    /// Envelope senders accepted besides the mailbox (`relay_senders`, comma separated).
    pub extra_senders: Vec<String>,
    /// The access token, when published.
    pub token: Option<SecretString>,
    /// When the token expires, when published and readable.
    pub expires_at: Option<DateTime<Utc>>,
    /// `smtp_host`, when published.
    pub smtp_host: Option<String>,
    /// `smtp_port`, when published and a port.
    pub smtp_port: Option<u16>,
    /// `smtp_tls`, when published (else the port decides).
    pub smtp_tls: Option<crate::mail::TlsMode>,
}

impl std::fmt::Debug for Mounted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mounted")
            .field("mailbox", &self.mailbox)
            .field("relay_username", &self.relay_username)
            .field("expires_at", &self.expires_at)
            .field("smtp_host", &self.smtp_host)
            .field("smtp_port", &self.smtp_port)
            .finish_non_exhaustive()
    }
}

impl Mounted {
    /// Whether `user` and `password` are the relay credentials: the user name compared without
    /// case (it is no secret), the password's SHA-256 digest compared in constant time
    /// (`subtle`), so neither the time taken nor the digest's length tells how much matched.
    pub fn accepts(&self, user: &str, password: &[u8]) -> bool {
        self.accepts_at(user, password, Utc::now())
    }

    /// [`Self::accepts`] at `now`: the current password, or the previous one before the end of
    /// its grace period (both digests are compared, always, so the time taken tells nothing).
    pub fn accepts_at(&self, user: &str, password: &[u8], now: DateTime<Utc>) -> bool {
        self.accepts_digest_at(user, &Sha256::digest(password).into(), now)
    }

    /// [`Self::accepts_at`] with the password's SHA-256 digest computed already (the shared
    /// relay checks one password against every binding of a name).
    pub fn accepts_digest_at(&self, user: &str, given: &[u8; 32], now: DateTime<Utc>) -> bool {
        let current: bool = given.ct_eq(&self.password_digest).into();
        let (previous_digest, until) = self.previous.unwrap_or(([0; 32], DateTime::<Utc>::MIN_UTC));
        let previous: bool = given.ct_eq(&previous_digest).into();
        (current | (previous & (now < until))) & user.eq_ignore_ascii_case(&self.relay_username)
    }

    /// The envelope senders accepted: the mailbox, then `relay_senders`.
    pub fn senders(&self) -> Vec<String> {
        std::iter::once(self.mailbox.clone()).chain(self.extra_senders.iter().cloned()).collect()
    }

    /// The token, when there is one that is still valid `margin` after `now` (an unknown expiry
    /// counts as valid: the upstream decides).
    pub fn current_token(&self, now: DateTime<Utc>, margin: chrono::Duration) -> Option<&SecretString> {
        let token = self.token.as_ref().filter(|t| !t.expose_secret().is_empty())?;
        match self.expires_at {
            Some(at) if at <= now.checked_add_signed(margin).unwrap_or(now) => None,
            _ => Some(token),
        }
    }
}

/// 32 bytes from 64 hex digits.
fn hex32(text: &str) -> Option<[u8; 32]> {
    let mut out = [0_u8; 32];
    if text.len() != 64 || !text.is_ascii() {
        return None;
    }
    for (slot, pair) in out.iter_mut().zip(text.as_bytes().chunks(2)) {
        *slot = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(out)
}

/// The directory's current version: `..data` resolved when kubelet made it, so every key comes
/// from the same update.
fn version(dir: &Path) -> PathBuf {
    std::fs::canonicalize(dir.join("..data")).unwrap_or_else(|_| dir.to_owned())
}

fn read_key(base: &Path, shown: &str, key: &'static str) -> Result<Option<String>, SecretError> {
    let file = match std::fs::File::open(base.join(key)) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(SecretError::Read { dir: shown.to_owned(), key, why: e.to_string() }),
    };
    let mut bytes = Vec::new();
    file.take(MAX_FILE.saturating_add(1)).read_to_end(&mut bytes).map_err(|e| SecretError::Read {
        dir: shown.to_owned(),
        key,
        why: e.to_string(),
    })?;
    if u64::try_from(bytes.len()).unwrap_or(u64::MAX) > MAX_FILE {
        return Err(SecretError::TooLarge { dir: shown.to_owned(), key });
    }
    // Values end where their text ends: a hand-written file's final newline is not part of it.
    Ok(Some(String::from_utf8_lossy(&bytes).trim().to_owned()).filter(|v| !v.is_empty()))
}

/// Reads the mounted Secret at `dir` (blocking: small files; callers on the runtime use
/// [`read_async`]). `username` and `relay_password` are required.
pub fn read(dir: &Path) -> Result<Mounted, SecretError> {
    let shown = dir.display().to_string();
    let base = version(dir);
    parse(&shown, |key| read_key(&base, &shown, key))
}

/// A published Secret's relay keys as `get` gives them (trimmed, empty as absent): the mounted
/// directory's files, or the data of a Secret read through the API. Only the password's digest
/// is kept.
pub(crate) fn parse(
    shown: &str,
    mut get: impl FnMut(&'static str) -> Result<Option<String>, SecretError>,
) -> Result<Mounted, SecretError> {
    let missing = |key| SecretError::Missing { dir: shown.to_owned(), key };
    let time = |t: Option<String>| t.and_then(|t| DateTime::parse_from_rfc3339(&t).ok()).map(|t| t.with_timezone(&Utc));
    let mailbox = get("username")?.ok_or_else(|| missing("username"))?;
    let password = get("relay_password")?.ok_or_else(|| missing("relay_password"))?;
    let relay_username = get("relay_username")?.unwrap_or_else(|| mailbox.clone());
    let token = get("access_token")?.map(SecretString::from);
    let expires_at = time(get("expires_at")?);
    let smtp_host = get("smtp_host")?;
    let smtp_port = get("smtp_port")?.and_then(|p| p.parse().ok());
    let smtp_tls = get("smtp_tls")?.and_then(|t| crate::mail::TlsMode::parse(&t));
    let previous_digest = get("relay_previous_sha256")?.and_then(|h| hex32(&h));
    let previous_until = time(get("relay_previous_until")?);
    let extra_senders = get("relay_senders")?
        .map(|s| s.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect())
        .unwrap_or_default();
    Ok(Mounted {
        mailbox,
        relay_username,
        password_digest: Sha256::digest(password.as_bytes()).into(),
        previous: previous_digest.zip(previous_until),
        extra_senders,
        token,
        expires_at,
        smtp_host,
        smtp_port,
        smtp_tls,
    })
}

/// [`read`] off the runtime's threads.
pub async fn read_async(dir: PathBuf) -> Result<Mounted, SecretError> {
    match tokio::task::spawn_blocking(move || read(&dir)).await {
        Ok(r) => r,
        Err(e) => Err(SecretError::Read { dir: String::new(), key: "username", why: e.to_string() }),
    }
}

/// `<protocol>_host`, `<protocol>_port` and the TLS mode (`<protocol>_tls`, else the port's) of the
/// Secret mounted at `dir`, when host and port are published
/// and the port is a port (IMAP and POP3; SMTP's are in [`Mounted`]); read like [`read`], from
/// the directory's current version.
pub fn server(
    dir: &Path,
    protocol: crate::api::Protocol,
) -> Result<Option<(String, u16, crate::mail::TlsMode)>, SecretError> {
    let shown = dir.display().to_string();
    let base = version(dir);
    server_of(protocol, |key| read_key(&base, &shown, key))
}

/// `<protocol>_host`, `<protocol>_port` and the TLS mode as `get` gives them (see [`server`]).
pub(crate) fn server_of(
    protocol: crate::api::Protocol,
    mut get: impl FnMut(&'static str) -> Result<Option<String>, SecretError>,
) -> Result<Option<(String, u16, crate::mail::TlsMode)>, SecretError> {
    let (host, port, tls) = match protocol {
        crate::api::Protocol::Imap => ("imap_host", "imap_port", "imap_tls"),
        crate::api::Protocol::Pop3 => ("pop3_host", "pop3_port", "pop3_tls"),
        crate::api::Protocol::Smtp => ("smtp_host", "smtp_port", "smtp_tls"),
    };
    let host = get(host)?;
    let port = get(port)?.and_then(|p| p.parse::<u16>().ok()).filter(|p| *p != 0);
    // The provider's TLS mode when published, else the port's.
    let tls = get(tls)?.and_then(|t| crate::mail::TlsMode::parse(&t));
    Ok(host.zip(port).map(|(h, p)| (h, p, tls.unwrap_or_else(|| crate::mail::TlsMode::for_port(p)))))
}
