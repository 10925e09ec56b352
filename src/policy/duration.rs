//! Go `time.Duration` strings (`10m`, `1h30m`, `1.5h`) parsed with checked arithmetic.
//!
//! Written by hand: kube's `Duration` parser multiplies floats into a `std::time::Duration` and
//! panics on overflow (`99999999999999999999h`), and it runs while the watcher decodes objects,
//! so one binding could crash the process. Here every value is a plain `Result`.

use chrono::Duration;

/// Longest accepted duration string (the schema enforces the same).
pub const MAX_LEN: usize = 32;

/// Why a duration string was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// Empty, or not of the form `<number><unit>...`.
    #[error("{0:?} is not a Go duration such as 10m or 1h30m")]
    Syntax(String),
    /// Longer than [`MAX_LEN`] characters.
    #[error("a duration is at most {MAX_LEN} characters")]
    TooLong,
    /// The value does not fit.
    #[error("{0:?} is out of range")]
    OutOfRange(String),
}

/// Nanoseconds per unit.
fn unit_nanos(unit: &str) -> Option<i128> {
    Some(match unit {
        "ns" => 1,
        "us" | "\u{00b5}s" | "\u{03bc}s" => 1_000,
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        "m" => 60_000_000_000,
        "h" => 3_600_000_000_000,
        _ => return None,
    })
}

/// Parses a non-negative Go duration. Fractions are kept to the nanosecond.
pub fn parse(text: &str) -> Result<Duration, DurationError> {
    if text.chars().count() > MAX_LEN {
        return Err(DurationError::TooLong);
    }
    let syntax = || DurationError::Syntax(text.to_owned());
    let range = || DurationError::OutOfRange(text.to_owned());
    if text == "0" {
        return Ok(Duration::zero());
    }
    let mut rest = text;
    let mut total: i128 = 0;
    if rest.is_empty() {
        return Err(syntax());
    }
    while !rest.is_empty() {
        let digits_end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).ok_or_else(syntax)?;
        let (number, tail) = rest.split_at(digits_end);
        let unit_end = tail.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(tail.len());
        let (unit, next) = tail.split_at(unit_end);
        let per = unit_nanos(unit).ok_or_else(syntax)?;
        let (whole, fraction) = match number.split_once('.') {
            Some((w, f)) => (w, f),
            None => (number, ""),
        };
        if (whole.is_empty() && fraction.is_empty()) || !fraction.chars().all(|c| c.is_ascii_digit()) {
            return Err(syntax());
        }
        let whole: i128 = if whole.is_empty() { 0 } else { whole.parse().map_err(|_| range())? };
        let mut part = whole.checked_mul(per).ok_or_else(range)?;
        // Each fractional digit adds digit * per / 10^k; precision beyond the nanosecond is dropped.
        let mut scale: i128 = 1;
        for d in fraction.chars() {
            let digit = i128::from(d.to_digit(10).ok_or_else(syntax)?);
            scale = match scale.checked_mul(10) {
                Some(s) if s <= per => s,
                _ => break,
            };
            let add = digit.checked_mul(per).and_then(|v| v.checked_div(scale)).ok_or_else(range)?;
            part = part.checked_add(add).ok_or_else(range)?;
        }
        total = total.checked_add(part).ok_or_else(range)?;
        rest = next;
    }
    let nanos = i64::try_from(total).map_err(|_| range())?;
    Ok(Duration::nanoseconds(nanos))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn go_durations_parse_as_go_parses_them() {
        assert_eq!(parse("10m"), Ok(Duration::minutes(10)));
        assert_eq!(parse("1h30m"), Ok(Duration::minutes(90)));
        assert_eq!(parse("1.5h"), Ok(Duration::minutes(90)));
        assert_eq!(parse(".5s"), Ok(Duration::milliseconds(500)));
        assert_eq!(parse("300ms"), Ok(Duration::milliseconds(300)));
        assert_eq!(parse("2h45m10.5s"), Ok(Duration::milliseconds(9_910_500)));
        assert_eq!(parse("0"), Ok(Duration::zero()));
        assert_eq!(parse("1\u{00b5}s"), Ok(Duration::microseconds(1)));
    }

    #[test]
    fn absurd_and_malformed_durations_are_errors_not_panics() {
        assert!(matches!(parse("99999999999999999999h"), Err(DurationError::OutOfRange(_))));
        assert!(matches!(parse("2562048h"), Err(DurationError::OutOfRange(_))));
        assert_eq!(parse(&"9".repeat(40)), Err(DurationError::TooLong));
        for bad in ["", "m", "10", "10x", "-5m", "1..5m", ".m", "1h 5m", "h10"] {
            assert!(parse(bad).is_err(), "{bad:?} was accepted");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(crate::policy::fuzz_cases()))]
        #[test]
        fn any_string_parses_or_errs_without_panicking(s in "\\PC{0,40}") {
            let _ = parse(&s);
        }

        #[test]
        fn duration_shaped_strings_parse_or_report_range(s in "([0-9]{1,12}(\\.[0-9]{1,12})?(ns|us|ms|s|m|h)){1,4}") {
            match parse(&s) {
                Ok(d) => prop_assert!(d >= Duration::zero()),
                Err(e) => prop_assert!(matches!(e, DurationError::OutOfRange(_) | DurationError::TooLong), "{e}"),
            }
        }

        #[test]
        fn whole_minutes_round_trip(m in 0_i64..1_000_000) {
            prop_assert_eq!(parse(&format!("{m}m")), Ok(Duration::minutes(m)));
        }
    }
}
