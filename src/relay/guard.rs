//! Failed authentications per source address: each failure delays the answer a little more, and
//! a source with too many recent failures is refused at connect until they are forgotten. The
//! table holds at most `max_sources` addresses (expired ones go first, then the oldest), so a
//! flood of sources costs bounded memory. Hand-written: a map and a mutex.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The bounds of the failure table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FailureLimits {
    /// Added to the answer's delay per failure.
    pub delay_per_failure: Duration,
    /// Longest delay.
    pub max_delay: Duration,
    /// Failures after which the source is refused.
    pub refuse_after: u32,
    /// How long a source's failures are remembered after its last one.
    pub forget_after: Duration,
    /// Most sources remembered.
    pub max_sources: usize,
}

impl Default for FailureLimits {
    fn default() -> Self {
        Self {
            delay_per_failure: Duration::from_secs(1),
            max_delay: Duration::from_secs(8),
            refuse_after: 10,
            forget_after: Duration::from_secs(15 * 60),
            max_sources: 4096,
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    failures: u32,
    last: Instant,
}

/// The table.
#[derive(Debug)]
pub struct Failures {
    limits: FailureLimits,
    table: Mutex<HashMap<IpAddr, Entry>>,
}

impl Failures {
    /// An empty table.
    pub fn new(limits: FailureLimits) -> Self {
        Self { limits, table: Mutex::new(HashMap::new()) }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Entry>> {
        self.table.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether `source` is refused now.
    pub fn refused(&self, source: IpAddr) -> bool {
        let now = Instant::now();
        self.table().get(&source).is_some_and(|e| {
            e.failures >= self.limits.refuse_after && now.saturating_duration_since(e.last) < self.limits.forget_after
        })
    }

    /// Records a failure of `source`; how long to wait before answering it.
    pub fn fail(&self, source: IpAddr) -> Duration {
        let now = Instant::now();
        let forget = self.limits.forget_after;
        let mut table = self.table();
        if !table.contains_key(&source) && table.len() >= self.limits.max_sources {
            table.retain(|_, e| now.saturating_duration_since(e.last) < forget);
            if table.len() >= self.limits.max_sources
                && let Some(oldest) = table.iter().min_by_key(|(_, e)| e.last).map(|(ip, _)| *ip)
            {
                table.remove(&oldest);
            }
        }
        let entry = table.entry(source).or_insert(Entry { failures: 0, last: now });
        if now.saturating_duration_since(entry.last) >= forget {
            entry.failures = 0;
        }
        entry.failures = entry.failures.saturating_add(1);
        entry.last = now;
        self.limits.delay_per_failure.saturating_mul(entry.failures).min(self.limits.max_delay)
    }

    /// Forgets `source`'s failures (it authenticated).
    pub fn succeed(&self, source: IpAddr) {
        self.table().remove(&source);
    }

    /// How many sources are remembered.
    pub fn len(&self) -> usize {
        self.table().len()
    }

    /// Whether no source is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> FailureLimits {
        FailureLimits {
            delay_per_failure: Duration::from_millis(10),
            max_delay: Duration::from_millis(30),
            refuse_after: 3,
            forget_after: Duration::from_secs(60),
            max_sources: 2,
        }
    }

    #[test]
    fn failures_slow_then_refuse_a_source_and_a_success_forgets_them() {
        let f = Failures::new(limits());
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!(f.fail(ip), Duration::from_millis(10));
        assert_eq!(f.fail(ip), Duration::from_millis(20));
        assert!(!f.refused(ip));
        assert_eq!(f.fail(ip), Duration::from_millis(30));
        assert_eq!(f.fail(ip), Duration::from_millis(30));
        assert!(f.refused(ip));
        f.succeed(ip);
        assert!(!f.refused(ip));
    }

    #[test]
    fn the_table_never_holds_more_than_its_bound() {
        let f = Failures::new(limits());
        for i in 0..50_u8 {
            f.fail(IpAddr::from([198, 51, 100, i]));
        }
        assert_eq!(f.len(), 2);
    }
}
