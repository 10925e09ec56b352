//! Saturating time arithmetic. chrono's `+` and `-` panic when a result leaves the calendar's
//! range, and the operands here can come from a token endpoint (`expires_in`, `Retry-After`) or a
//! spec, so every sum saturates at the ends of time instead.

use chrono::{DateTime, Duration, Utc};

/// `t + d`, saturating.
pub fn plus(t: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    t.checked_add_signed(d).unwrap_or(if d < Duration::zero() {
        DateTime::<Utc>::MIN_UTC
    } else {
        DateTime::<Utc>::MAX_UTC
    })
}

/// `t - d`, saturating.
pub fn minus(t: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    t.checked_sub_signed(d).unwrap_or(if d < Duration::zero() {
        DateTime::<Utc>::MAX_UTC
    } else {
        DateTime::<Utc>::MIN_UTC
    })
}

/// `later - earlier` (never overflows: durations span more than the calendar).
pub fn between(earlier: DateTime<Utc>, later: DateTime<Utc>) -> Duration {
    later.signed_duration_since(earlier)
}

/// `d / n`, zero for `n == 0`.
pub fn div(d: Duration, n: i32) -> Duration {
    d.checked_div(n).unwrap_or_default()
}

/// `a - b`, saturating.
pub fn sub(a: Duration, b: Duration) -> Duration {
    a.checked_sub(&b).unwrap_or(if b < Duration::zero() { Duration::MAX } else { Duration::MIN })
}

/// `a + b`, saturating.
pub fn add(a: Duration, b: Duration) -> Duration {
    a.checked_add(&b).unwrap_or(if b < Duration::zero() { Duration::MIN } else { Duration::MAX })
}

/// RFC 3339 in UTC with whole seconds and `Z`, as every time the operator writes.
pub fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_saturate_at_the_ends_of_time() {
        let now = Utc::now();
        assert_eq!(plus(now, Duration::MAX), DateTime::<Utc>::MAX_UTC);
        assert_eq!(minus(now, Duration::MAX), DateTime::<Utc>::MIN_UTC);
        assert_eq!(plus(now, Duration::seconds(1)), now + Duration::seconds(1));
        assert_eq!(add(Duration::MAX, Duration::MAX), Duration::MAX);
        assert_eq!(sub(Duration::MIN, Duration::MAX), Duration::MIN);
        assert_eq!(div(Duration::seconds(9), 0), Duration::zero());
        assert!(between(DateTime::<Utc>::MIN_UTC, DateTime::<Utc>::MAX_UTC) > Duration::zero());
    }
}
