//! Relay credentials (`spec.relay`): the password the operator generates for password-only apps
//! and devices, kept in the grant-state Secret beside the grant (so that it survives restarts
//! and renewals, and is covered by the grant digest a restart judges by), rotated on
//! `mailoauth.io/rotate-relay-password` with the previous one accepted for a grace period, and
//! published as `relay_username` / `relay_password` (plus `relay_senders`, and the previous
//! password's SHA-256 and its end while it still works: the relay needs only to verify it).

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, Utc};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

use super::time::rfc3339;
use crate::api::{MailboxBinding, ROTATE_RELAY_PASSWORD_ANNOTATION, RelaySpec, RelayStatus};

/// Keys in the grant-state Secret.
pub mod keys {
    /// The current relay password (secret).
    pub const PASSWORD: &str = "relay_password";
    /// When it was generated (RFC 3339).
    pub const ISSUED_AT: &str = "relay_issued_at";
    /// The `rotate-relay-password` value it was generated for.
    pub const ROTATION: &str = "relay_rotation";
    /// SHA-256 (hex) of the password before the last rotation.
    pub const PREVIOUS_SHA256: &str = "relay_previous_sha256";
    /// Until when that one still works (RFC 3339).
    pub const PREVIOUS_UNTIL: &str = "relay_previous_until";
}

/// Keys in the published Secret.
pub mod published_keys {
    /// The user name clients log in with: the mailbox.
    pub const USERNAME: &str = "relay_username";
    /// The password clients log in with.
    pub const PASSWORD: &str = "relay_password";
    /// Envelope senders accepted besides the mailbox, comma separated (when any).
    pub const SENDERS: &str = "relay_senders";
    /// SHA-256 (hex) of the previous password, during its grace period.
    pub const PREVIOUS_SHA256: &str = "relay_previous_sha256";
    /// The end of that grace period (RFC 3339).
    pub const PREVIOUS_UNTIL: &str = "relay_previous_until";
    /// Every key above: reserved, a template never writes them.
    pub const ALL: [&str; 5] = [USERNAME, PASSWORD, SENDERS, PREVIOUS_SHA256, PREVIOUS_UNTIL];
}

/// Length of a generated password: letters and digits only (every device's settings screen takes
/// them), 32 of them: about 190 bits.
pub const PASSWORD_LENGTH: usize = 32;

/// The default grace period of the previous password after a rotation.
pub const DEFAULT_GRACE: Duration = Duration::hours(24);

/// The longest grace period.
pub const MAX_GRACE: Duration = Duration::hours(168);

const ALPHABET: &[u8; 62] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

/// Random bytes below this (4 × 62) map onto [`ALPHABET`] evenly; the rest are skipped.
const UNBIASED: usize = 248;

/// The relay credentials stored for a binding. `Debug` never shows the password.
#[derive(Clone)]
pub struct RelayCredentials {
    /// The current password.
    pub password: SecretString,
    /// When it was generated.
    pub issued_at: DateTime<Utc>,
    /// The `rotate-relay-password` value it was generated for (the annotation's value when it was
    /// first generated, so that an annotation already set is not taken for a request).
    pub rotation: Option<String>,
    /// The previous password's SHA-256 (hex) and until when it works.
    pub previous: Option<(String, DateTime<Utc>)>,
}

impl std::fmt::Debug for RelayCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayCredentials")
            .field("issued_at", &self.issued_at)
            .field("rotation", &self.rotation)
            .field("previous_until", &self.previous.as_ref().map(|p| p.1))
            .finish_non_exhaustive()
    }
}

impl PartialEq for RelayCredentials {
    fn eq(&self, other: &Self) -> bool {
        self.password.expose_secret() == other.password.expose_secret()
            && self.issued_at == other.issued_at
            && self.rotation == other.rotation
            && self.previous == other.previous
    }
}

impl RelayCredentials {
    /// Adds this to a grant-state Secret's data.
    pub fn encode_into(&self, data: &mut BTreeMap<String, String>) {
        data.insert(keys::PASSWORD.into(), self.password.expose_secret().to_owned());
        data.insert(keys::ISSUED_AT.into(), rfc3339(self.issued_at));
        if let Some(r) = &self.rotation {
            data.insert(keys::ROTATION.into(), r.clone());
        }
        if let Some((digest, until)) = &self.previous {
            data.insert(keys::PREVIOUS_SHA256.into(), digest.clone());
            data.insert(keys::PREVIOUS_UNTIL.into(), rfc3339(*until));
        }
    }

    /// Reads the relay credentials of a grant-state Secret's data, if it holds any.
    pub fn decode(data: &BTreeMap<String, Vec<u8>>) -> Option<Self> {
        let text = |k: &str| data.get(k).and_then(|v| String::from_utf8(v.clone()).ok()).filter(|v| !v.is_empty());
        let time = |k: &str| text(k).and_then(|t| DateTime::parse_from_rfc3339(&t).ok()).map(|t| t.with_timezone(&Utc));
        let password = text(keys::PASSWORD)?;
        let issued_at = time(keys::ISSUED_AT).unwrap_or_default();
        // A grace end never lies beyond the longest grace after the rotation (a hand-edited
        // end does not keep an old password alive).
        let latest = super::time::plus(issued_at, MAX_GRACE);
        Some(Self {
            password: SecretString::from(password),
            issued_at,
            rotation: text(keys::ROTATION),
            previous: text(keys::PREVIOUS_SHA256).zip(time(keys::PREVIOUS_UNTIL).map(|u| std::cmp::min(u, latest))),
        })
    }

    /// These credentials' keys of a grant-state Secret, for a write that carries them unchanged.
    pub fn encoded(this: Option<&Self>) -> BTreeMap<String, String> {
        let mut data = BTreeMap::new();
        if let Some(c) = this {
            c.encode_into(&mut data);
        }
        data
    }
}

/// SHA-256 of a password, hex.
pub fn sha256_hex(password: &str) -> String {
    Sha256::digest(password.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// A password from random bytes: letters and digits, [`PASSWORD_LENGTH`] of them, each byte
/// used only below the largest multiple of 62 (no bias). `random` fills a buffer; `None` when it
/// fails (no randomness, no password).
pub fn password_from(mut random: impl FnMut(&mut [u8]) -> bool) -> Option<SecretString> {
    let mut out = String::with_capacity(PASSWORD_LENGTH);
    let mut buf = [0_u8; 64];
    // 64 bytes give 32 usable ones with overwhelming probability; a few rounds at most.
    for _ in 0..16 {
        if !random(&mut buf) {
            return None;
        }
        for b in buf {
            if out.len() == PASSWORD_LENGTH {
                return Some(SecretString::from(out));
            }
            if usize::from(b) < UNBIASED
                && let Some(c) = usize::from(b).checked_rem(ALPHABET.len()).and_then(|i| ALPHABET.get(i))
            {
                out.push(char::from(*c));
            }
        }
    }
    (out.len() == PASSWORD_LENGTH).then(|| SecretString::from(out))
}

/// The binding's relay spec when enabled.
pub fn enabled(binding: &MailboxBinding) -> Option<&RelaySpec> {
    binding.spec.relay.as_ref().filter(|r| r.enabled)
}

/// The longest `rotate-relay-password` value acted on (it is stored in status and the grant state).
pub const MAX_ROTATE_VALUE: usize = 253;

/// The `rotate-relay-password` annotation's value, when it is one the operator acts on: at most
/// [`MAX_ROTATE_VALUE`] printable ASCII characters (a date, a counter, a UUID); anything else is
/// not taken for a request.
pub fn rotate_value(binding: &MailboxBinding) -> Option<&str> {
    binding
        .metadata
        .annotations
        .as_ref()?
        .get(ROTATE_RELAY_PASSWORD_ANNOTATION)
        .map(String::as_str)
        .filter(|v| !v.is_empty() && v.len() <= MAX_ROTATE_VALUE && v.bytes().all(|b| (0x20..0x7f).contains(&b)))
}

/// The grace period of `spec.relay.rotationGracePeriod` (validated elsewhere: at most
/// [`MAX_GRACE`]; anything unreadable counts as the default).
pub fn grace(spec: &RelaySpec) -> Duration {
    spec.rotation_grace_period
        .as_deref()
        .and_then(|d| super::duration::parse(d).ok())
        .map_or(DEFAULT_GRACE, |d| std::cmp::min(d, MAX_GRACE))
}

/// What the binding's relay credentials should be now, from what is stored: none when the relay
/// is off; new ones when there are none or a new `rotate-relay-password` value asks (the
/// previous password then works for the grace period); the previous one dropped once its grace
/// has ended; otherwise as stored. `fresh` makes a new password (`None`: no randomness; the
/// stored credentials stay).
pub fn plan(
    binding: &MailboxBinding,
    stored: Option<&RelayCredentials>,
    now: DateTime<Utc>,
    fresh: impl FnOnce() -> Option<SecretString>,
) -> Option<RelayCredentials> {
    let spec = enabled(binding)?;
    let asked = rotate_value(binding).map(str::to_owned);
    let Some(stored) = stored else {
        return fresh().map(|password| RelayCredentials { password, issued_at: now, rotation: asked, previous: None });
    };
    if asked.is_some() && asked != stored.rotation {
        let Some(password) = fresh() else { return Some(stored.clone()) };
        let grace = grace(spec);
        let previous = (grace > Duration::zero())
            .then(|| (sha256_hex(stored.password.expose_secret()), super::time::plus(now, grace)));
        return Some(RelayCredentials { password, issued_at: now, rotation: asked, previous });
    }
    let mut kept = stored.clone();
    if kept.previous.as_ref().is_some_and(|(_, until)| *until <= now) {
        kept.previous = None;
    }
    Some(kept)
}

/// The published keys of the relay credentials (none when the relay is off or nothing is
/// stored yet). The previous password is published as its digest, and only before its end.
pub fn published(
    binding: &MailboxBinding,
    creds: Option<&RelayCredentials>,
    now: DateTime<Utc>,
) -> BTreeMap<String, String> {
    let mut data = BTreeMap::new();
    let (Some(spec), Some(creds)) = (enabled(binding), creds) else { return data };
    data.insert(published_keys::USERNAME.into(), binding.spec.mailbox.clone());
    data.insert(published_keys::PASSWORD.into(), creds.password.expose_secret().to_owned());
    if !spec.senders.is_empty() {
        data.insert(published_keys::SENDERS.into(), spec.senders.join(","));
    }
    if let Some((digest, until)) = creds.previous.as_ref().filter(|(_, until)| *until > now) {
        data.insert(published_keys::PREVIOUS_SHA256.into(), digest.clone());
        data.insert(published_keys::PREVIOUS_UNTIL.into(), rfc3339(*until));
    }
    data
}

/// The status of the relay credentials (never the password).
pub fn status(binding: &MailboxBinding, creds: Option<&RelayCredentials>, now: DateTime<Utc>) -> Option<RelayStatus> {
    enabled(binding)?;
    let creds = creds?;
    Some(RelayStatus {
        username: binding.spec.mailbox.clone(),
        password_issued_at: Some(creds.issued_at),
        last_rotate_request: creds.rotation.clone(),
        previous_password_valid_until: creds.previous.as_ref().map(|p| p.1).filter(|until| *until > now),
    })
}

/// Whether the relay credentials as the status shows them need nothing now, and if so until when
/// (the end of a grace period, when one runs). `Err(())`: something is asked for or has changed
/// (the relay turned on or off, a rotation asked for, a grace period over).
#[allow(clippy::result_unit_err)]
pub fn settled(binding: &MailboxBinding, now: DateTime<Utc>) -> Result<Option<DateTime<Utc>>, ()> {
    let status = binding.status.as_ref().and_then(|s| s.relay.as_ref());
    match (enabled(binding), status) {
        (None, None) => Ok(None),
        (Some(_), Some(s)) => {
            let asked = rotate_value(binding);
            if asked.is_some() && asked != s.last_rotate_request.as_deref() {
                return Err(());
            }
            match s.previous_password_valid_until {
                Some(until) if until <= now => Err(()),
                until => Ok(until),
            }
        }
        _ => Err(()),
    }
}

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects)]
mod tests {
    use super::*;
    use crate::api::{MailboxBindingStatus, RelaySpec};
    use crate::testing::t;

    fn binding(relay: Option<RelaySpec>, rotate: Option<&str>) -> MailboxBinding {
        let b = MailboxBinding::test().spec_with(|s| s.relay = relay);
        match rotate {
            Some(v) => b.annotated(ROTATE_RELAY_PASSWORD_ANNOTATION, v),
            None => b,
        }
    }

    fn on() -> Option<RelaySpec> {
        Some(RelaySpec { enabled: true, ..RelaySpec::default() })
    }

    fn counter() -> impl FnMut() -> Option<SecretString> {
        let mut n = 0;
        move || {
            n += 1;
            Some(SecretString::from(format!("pw{n}")))
        }
    }

    #[test]
    fn a_password_is_32_letters_or_digits_and_random_bytes_above_the_last_multiple_are_skipped() {
        let mut round = 0;
        let pw = password_from(|buf| {
            round += 1;
            // First round: only bytes a modulo would bias (248..=255); then 0, 1, 2, ...
            for (i, b) in buf.iter_mut().enumerate() {
                *b = if round == 1 { 250 } else { u8::try_from(i % 62).unwrap() };
            }
            true
        })
        .unwrap();
        let pw = pw.expose_secret();
        assert_eq!(pw.len(), PASSWORD_LENGTH);
        assert!(pw.bytes().all(|b| b.is_ascii_alphanumeric()));
        assert!(pw.starts_with("ABCDEF"), "{pw}");
        assert_eq!(round, 2);
        assert!(password_from(|_| false).is_none(), "no randomness, no password");
    }

    #[test]
    fn first_credentials_take_the_annotation_already_set_as_handled() {
        let b = binding(on(), Some("x"));
        let c = plan(&b, None, t(0), || Some("pw".to_owned().into())).unwrap();
        assert_eq!(c.rotation.as_deref(), Some("x"));
        assert!(c.previous.is_none());
        assert!(plan(&binding(None, None), None, t(0), || Some("pw".to_owned().into())).is_none());
        let long = "x".repeat(MAX_ROTATE_VALUE + 1);
        assert_eq!(rotate_value(&binding(on(), Some(&long))), None, "too long: not a request");
        assert_eq!(rotate_value(&binding(on(), Some("a\nb"))), None, "a control character: not a request");
        let off = binding(Some(RelaySpec { enabled: false, ..RelaySpec::default() }), None);
        assert!(plan(&off, Some(&c), t(0), || None).is_none(), "turned off: forgotten");
    }

    #[test]
    fn a_new_rotate_value_issues_a_new_password_and_keeps_the_old_ones_digest_for_the_grace() {
        let mut fresh = counter();
        let b = binding(on(), None);
        let first = plan(&b, None, t(0), &mut fresh).unwrap();
        assert_eq!(plan(&b, Some(&first), t(10), &mut fresh).as_ref(), Some(&first), "nothing asked: kept");
        let asked = binding(on(), Some("1"));
        let second = plan(&asked, Some(&first), t(20), &mut fresh).unwrap();
        assert_eq!(second.password.expose_secret(), "pw2");
        assert_eq!(second.rotation.as_deref(), Some("1"));
        assert_eq!(second.previous, Some((sha256_hex("pw1"), t(20) + DEFAULT_GRACE)));
        assert_eq!(plan(&asked, Some(&second), t(30), &mut fresh).as_ref(), Some(&second), "handled once");
        let later = plan(&asked, Some(&second), t(20) + DEFAULT_GRACE, &mut fresh).unwrap();
        assert!(later.previous.is_none(), "grace over");
        assert_eq!(later.password.expose_secret(), "pw2");
        let now = binding(Some(RelaySpec { rotation_grace_period: Some("0s".into()), ..on().unwrap() }), Some("2"));
        assert!(plan(&now, Some(&second), t(40), &mut fresh).unwrap().previous.is_none(), "0s: at once");
        assert_eq!(plan(&asked, Some(&first), t(20), || None).as_ref(), Some(&first), "no randomness: kept");
    }

    #[test]
    fn published_keys_carry_the_previous_digest_only_during_its_grace() {
        let mut spec = on().unwrap();
        spec.senders = vec!["noreply@example.com".into(), "info@example.com".into()];
        let b = binding(Some(spec), None);
        let c = RelayCredentials {
            password: "pw".to_owned().into(),
            issued_at: t(0),
            rotation: None,
            previous: Some(("abc".into(), t(100))),
        };
        let data = published(&b, Some(&c), t(50));
        assert_eq!(data.get("relay_username").map(String::as_str), Some("a@example.com"));
        assert_eq!(data.get("relay_password").map(String::as_str), Some("pw"));
        assert_eq!(data.get("relay_senders").map(String::as_str), Some("noreply@example.com,info@example.com"));
        assert_eq!(data.get("relay_previous_sha256").map(String::as_str), Some("abc"));
        assert!(!published(&b, Some(&c), t(100)).contains_key("relay_previous_sha256"));
        assert!(published(&binding(None, None), Some(&c), t(0)).is_empty());
        assert!(published(&b, None, t(0)).is_empty());
        assert!(!format!("{c:?}").contains("pw\""), "Debug shows no password");
    }

    #[test]
    fn stored_credentials_round_trip_through_the_secret_data() {
        let c = RelayCredentials {
            password: "pw".to_owned().into(),
            issued_at: t(0),
            rotation: Some("r".into()),
            previous: Some(("abc".into(), t(100))),
        };
        let bytes = RelayCredentials::encoded(Some(&c)).into_iter().map(|(k, v)| (k, v.into_bytes())).collect();
        assert_eq!(RelayCredentials::decode(&bytes), Some(c.clone()));
        assert_eq!(RelayCredentials::decode(&BTreeMap::new()), None);
        // A grace end beyond the longest grace is cut to it.
        let mut far = RelayCredentials::encoded(Some(&c));
        far.insert(keys::PREVIOUS_UNTIL.into(), "2999-01-01T00:00:00Z".into());
        let far = far.into_iter().map(|(k, v)| (k, v.into_bytes())).collect();
        assert_eq!(RelayCredentials::decode(&far).and_then(|c| c.previous).map(|p| p.1), Some(t(0) + MAX_GRACE));
    }

    #[test]
    fn settled_asks_for_a_reconcile_when_turned_on_or_off_rotated_or_a_grace_ends() {
        let relay = RelayStatus {
            username: "a@example.com".into(),
            password_issued_at: Some(t(0)),
            last_rotate_request: Some("1".into()),
            previous_password_valid_until: Some(t(100)),
        };
        let with = |mut b: MailboxBinding, s: Option<RelayStatus>| {
            b.status = Some(MailboxBindingStatus { relay: s, ..MailboxBindingStatus::default() });
            b
        };
        assert_eq!(settled(&with(binding(None, None), None), t(0)), Ok(None));
        assert_eq!(settled(&with(binding(on(), Some("1")), Some(relay.clone())), t(50)), Ok(Some(t(100))));
        assert_eq!(settled(&with(binding(on(), Some("1")), Some(relay.clone())), t(100)), Err(()));
        assert_eq!(settled(&with(binding(on(), Some("2")), Some(relay.clone())), t(50)), Err(()));
        assert_eq!(settled(&with(binding(on(), None), None), t(0)), Err(()), "turned on");
        assert_eq!(settled(&with(binding(None, None), Some(relay)), t(0)), Err(()), "turned off");
    }
}
