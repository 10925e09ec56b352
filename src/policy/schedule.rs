//! When to renew a token: `expiresAt − clamp(max(lifetime/3, refreshBefore), 0, lifetime/2)`,
//! minus a one-second lead (so that a renewal scheduled at the margin's edge is sent before it,
//! not a few milliseconds after), minus a small per-binding jitter so bindings issued together
//! do not renew together, and never
//! sooner than [`MIN_RENEW_INTERVAL`] after issue, so no token endpoint can drive a tight loop.
//! All arithmetic saturates (see [`super::time`]).

use chrono::{DateTime, Duration, Utc};

use super::time::{between, div, minus, plus, sub};

/// Default minimum margin before expiry (Exchange rejects tokens within 10 minutes of expiry).
pub const DEFAULT_REFRESH_BEFORE: Duration = Duration::minutes(10);

/// The largest `refreshBefore` accepted.
pub const MAX_REFRESH_BEFORE: Duration = Duration::hours(24);

/// How much earlier than the margin a renewal is scheduled, for the time the reconcile itself takes.
pub const LEAD: Duration = Duration::seconds(1);

/// The largest jitter, whatever the lifetime.
pub const MAX_JITTER: Duration = Duration::seconds(60);

/// A token is never renewed sooner than this after it was issued, whatever its lifetime.
pub const MIN_RENEW_INTERVAL: Duration = Duration::seconds(15);

/// First backoff after a transient failure.
pub const BACKOFF_BASE: Duration = Duration::seconds(30);

/// Longest backoff.
pub const BACKOFF_MAX: Duration = Duration::minutes(30);

/// The margin before expiry at which a token of `lifetime` is renewed, without jitter.
pub fn margin(lifetime: Duration, refresh_before: Duration) -> Duration {
    let wanted = std::cmp::max(div(lifetime, 3), refresh_before);
    wanted.clamp(Duration::zero(), std::cmp::max(div(lifetime, 2), Duration::zero()))
}

/// The jitter bound for a lifetime: a twentieth of it, at most [`MAX_JITTER`].
pub fn jitter_bound(lifetime: Duration) -> Duration {
    std::cmp::min(std::cmp::max(div(lifetime, 20), Duration::zero()), MAX_JITTER)
}

/// A value in `[0, bound]` whole seconds derived from `seed`.
fn spread(bound: Duration, seed: u64) -> Duration {
    let bound = u64::try_from(bound.num_seconds()).unwrap_or(0);
    match seed.checked_rem(bound.saturating_add(1)) {
        Some(v) if bound > 0 => Duration::seconds(i64::try_from(v).unwrap_or(0)),
        _ => Duration::zero(),
    }
}

/// Jitter in whole seconds in `[0, jitter_bound(lifetime)]`, derived from `seed` (a hash of the
/// binding's uid). Whole seconds keep `renewAt` in the precision Kubernetes shows.
pub fn jitter(lifetime: Duration, seed: u64) -> Duration {
    spread(jitter_bound(lifetime), seed)
}

/// When to renew a token issued at `issued_at` that expires at `expires_at`.
pub fn renew_at(
    issued_at: DateTime<Utc>,
    expires_at: DateTime<Utc>,
    refresh_before: Duration,
    seed: u64,
) -> DateTime<Utc> {
    let lifetime = between(issued_at, expires_at);
    let margin = margin(lifetime, refresh_before);
    let renew = minus(minus(minus(expires_at, margin), LEAD), jitter(lifetime, seed));
    std::cmp::max(renew, plus(issued_at, MIN_RENEW_INTERVAL))
}

/// A stable seed from a binding's identity (its uid), for [`jitter`].
pub fn seed(identity: &str) -> u64 {
    // FNV-1a: stable across Rust versions, unlike `DefaultHasher`.
    identity.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// The backoff ceiling after `failed_attempts` transient failures: 30 s, 1 m, 2 m, ... at most 30 m.
pub fn backoff_ceiling(failed_attempts: u32) -> Duration {
    let exp = failed_attempts.saturating_sub(1).min(6);
    let factor = 2_i32.saturating_pow(exp);
    std::cmp::min(BACKOFF_BASE.checked_mul(factor).unwrap_or(BACKOFF_MAX), BACKOFF_MAX)
}

/// The backoff after `failed_attempts` transient failures, with "equal jitter": between half the
/// ceiling and the ceiling, spread by `seed` (the binding) and the attempt, so that bindings
/// failing together do not retry in lockstep, yet each binding's schedule is reproducible.
pub fn backoff(failed_attempts: u32, seed: u64) -> Duration {
    let ceiling = backoff_ceiling(failed_attempts);
    let half = div(ceiling, 2);
    let mixed = seed ^ u64::from(failed_attempts).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    sub(ceiling, spread(half, mixed.rotate_left(17)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(secs, 0).unwrap_or_default()
    }

    #[test]
    fn an_hour_token_with_the_default_margin_renews_twenty_minutes_early() {
        let renew = expires_minus(Duration::hours(1), DEFAULT_REFRESH_BEFORE, 0);
        assert_eq!(renew, Duration::minutes(20) + LEAD);
    }

    #[test]
    fn a_large_refresh_before_is_capped_at_half_the_lifetime() {
        assert_eq!(margin(Duration::minutes(30), Duration::hours(2)), Duration::minutes(15));
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        assert_eq!(backoff_ceiling(1), Duration::seconds(30));
        assert_eq!(backoff_ceiling(2), Duration::seconds(60));
        assert_eq!(backoff_ceiling(3), Duration::seconds(120));
        assert_eq!(backoff_ceiling(40), Duration::minutes(30));
        assert_eq!(backoff_ceiling(u32::MAX), Duration::minutes(30));
    }

    #[test]
    fn backoff_is_jittered_between_half_and_the_whole_ceiling_and_spreads_bindings() {
        let waits: std::collections::BTreeSet<i64> =
            (0..50).map(|i| backoff(4, seed(&format!("uid-{i}"))).num_seconds()).collect();
        assert!(waits.len() > 10, "fifty bindings failing together retry at many times: {waits:?}");
        assert!(waits.iter().all(|w| (120..=240).contains(w)), "{waits:?}");
        assert_eq!(backoff(4, 7), backoff(4, 7), "reproducible");
    }

    #[test]
    fn a_token_is_never_renewed_sooner_than_the_floor_whatever_its_lifetime() {
        assert_eq!(renew_at(at(1000), at(1000), DEFAULT_REFRESH_BEFORE, 7), at(1015));
        assert_eq!(renew_at(at(1000), at(999), DEFAULT_REFRESH_BEFORE, 7), at(1015));
        assert_eq!(renew_at(at(1000), at(1002), Duration::zero(), 7), at(1015));
    }

    #[test]
    fn the_ends_of_time_do_not_panic() {
        let far = DateTime::<Utc>::MAX_UTC;
        let _ = renew_at(DateTime::<Utc>::MIN_UTC, far, Duration::MAX, u64::MAX);
        let _ = renew_at(far, DateTime::<Utc>::MIN_UTC, Duration::MIN, 0);
        assert_eq!(margin(Duration::MAX, Duration::MAX), Duration::MAX / 2);
    }

    #[test]
    fn seeds_are_stable_and_differ_between_bindings() {
        assert_eq!(seed("a"), seed("a"));
        assert_ne!(seed("uid-1"), seed("uid-2"));
    }

    fn expires_minus(lifetime: Duration, refresh_before: Duration, s: u64) -> Duration {
        let issued = at(1_700_000_000);
        let expires = issued + lifetime;
        expires - renew_at(issued, expires, refresh_before, s)
    }

    proptest! {
        #[test]
        fn renewal_falls_after_issue_and_before_expiry(
            lifetime_s in 31_i64..200_000, before_s in 0_i64..100_000, s in any::<u64>()
        ) {
            let issued = at(1_700_000_000);
            let expires = issued + Duration::seconds(lifetime_s);
            let renew = renew_at(issued, expires, Duration::seconds(before_s), s);
            prop_assert!(renew > issued, "renew {renew} not after issue {issued}");
            prop_assert!(renew < expires, "renew {renew} not before expiry {expires}");
        }

        #[test]
        fn renewal_respects_refresh_before_when_the_lifetime_allows(
            lifetime_s in 1_i64..200_000, before_s in 0_i64..100_000, s in any::<u64>()
        ) {
            let lifetime = Duration::seconds(lifetime_s);
            let before = Duration::seconds(before_s);
            prop_assume!(before <= lifetime / 2 && lifetime - before - LEAD >= MIN_RENEW_INTERVAL);
            // Strictly before the margin: a renewal sent at its scheduled time is never late.
            prop_assert!(expires_minus(lifetime, before, s) >= before + LEAD);
        }

        #[test]
        fn renewal_keeps_at_least_a_third_of_the_lifetime_as_margin_when_allowed(
            lifetime_s in 45_i64..200_000, s in any::<u64>()
        ) {
            let lifetime = Duration::seconds(lifetime_s);
            prop_assert!(expires_minus(lifetime, Duration::zero(), s) >= lifetime / 3);
        }

        #[test]
        fn jitter_is_bounded(lifetime_s in 0_i64..1_000_000, s in any::<u64>()) {
            let lifetime = Duration::seconds(lifetime_s);
            let j = jitter(lifetime, s);
            prop_assert!(j >= Duration::zero());
            prop_assert!(j <= jitter_bound(lifetime));
            prop_assert!(j <= MAX_JITTER);
        }
    }
}
