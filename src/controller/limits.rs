//! Token requests per provider are rate-limited, and when more are due than the rate allows, the
//! binding whose token expires first goes first (a deadline queue, not FIFO): after an outage the
//! herd is spread and whoever can still be saved is served first. A provider that answers 429 or
//! sends `Retry-After` is paused; other providers are not.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use tokio::sync::oneshot;
use tokio::time::{Duration, Instant};

/// Rate limits for every provider of the process.
#[derive(Debug)]
pub struct RateLimits {
    interval: Duration,
    queues: Mutex<HashMap<String, Arc<Mutex<Queue>>>>,
}

#[derive(Debug, Default)]
struct Queue {
    /// Waiters by (deadline, arrival).
    waiting: BinaryHeap<Reverse<(DateTime<Utc>, u64)>>,
    senders: HashMap<u64, oneshot::Sender<()>>,
    arrivals: u64,
    next_slot: Option<Instant>,
    paused_until: Option<Instant>,
    dispatching: bool,
}

impl RateLimits {
    /// At most `per_second` token requests per second per provider (at least one per hour).
    pub fn new(per_second: f64) -> Self {
        let per_second = if per_second.is_finite() && per_second > 0.0 { per_second } else { 1.0 };
        let interval = Duration::from_secs_f64((1.0 / per_second).min(3600.0));
        Self { interval, queues: Mutex::default() }
    }

    fn queue(&self, provider: &str) -> Option<Arc<Mutex<Queue>>> {
        let mut queues = self.queues.lock().ok()?;
        Some(Arc::clone(queues.entry(provider.to_owned()).or_default()))
    }

    /// Waits for `provider`'s next free slot; among waiters, the earliest `deadline` (the token's
    /// expiry) goes first.
    pub async fn acquire(self: &Arc<Self>, provider: &str, deadline: DateTime<Utc>) {
        let Some(queue) = self.queue(provider) else { return };
        let (tx, rx) = oneshot::channel();
        let start = {
            let Ok(mut q) = queue.lock() else { return };
            let id = q.arrivals;
            q.arrivals = q.arrivals.wrapping_add(1);
            q.waiting.push(Reverse((deadline, id)));
            q.senders.insert(id, tx);
            !std::mem::replace(&mut q.dispatching, true)
        };
        if start {
            tokio::spawn(dispatch(queue, self.interval));
        }
        let _ = rx.await;
    }

    /// Holds `provider`'s requests until `until` (a 429, a `Retry-After`).
    pub fn pause(&self, provider: &str, until: Instant) {
        if let Some(queue) = self.queue(provider)
            && let Ok(mut q) = queue.lock()
        {
            q.paused_until = Some(q.paused_until.map_or(until, |p| p.max(until)));
        }
    }

    /// How many requests wait, over all providers.
    pub fn waiting(&self) -> usize {
        let queues: Vec<_> = self.queues.lock().map(|q| q.values().cloned().collect()).unwrap_or_default();
        queues.iter().filter_map(|q| q.lock().ok().map(|q| q.waiting.len())).sum()
    }
}

/// Hands out slots, earliest deadline first, one per interval, until nobody waits.
async fn dispatch(queue: Arc<Mutex<Queue>>, interval: Duration) {
    loop {
        let wait = {
            let Ok(mut q) = queue.lock() else { return };
            let now = Instant::now();
            let free_at = [q.next_slot, q.paused_until].into_iter().flatten().max().unwrap_or(now);
            if free_at > now {
                free_at.saturating_duration_since(now)
            } else {
                match q.waiting.pop() {
                    None => {
                        q.dispatching = false;
                        return;
                    }
                    Some(Reverse((_, id))) => {
                        // A waiter that went away (its reconcile ended) does not use the slot.
                        if let Some(tx) = q.senders.remove(&id)
                            && tx.send(()).is_ok()
                        {
                            q.next_slot = now.checked_add(interval);
                        }
                        Duration::ZERO
                    }
                }
            }
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap_or_default()
    }

    #[tokio::test(start_paused = true)]
    async fn requests_are_spaced_by_the_rate_and_the_earliest_expiry_goes_first() {
        let limits = Arc::new(RateLimits::new(2.0));
        let order = Arc::new(Mutex::new(Vec::new()));
        let started = Instant::now();
        // The first takes the free slot at once; the others wait and go by deadline.
        let mut tasks = Vec::new();
        for (name, deadline) in [("first", at(0)), ("late", at(900)), ("soon", at(60)), ("middle", at(300))] {
            let (limits, order) = (Arc::clone(&limits), Arc::clone(&order));
            tasks.push(tokio::spawn(async move {
                limits.acquire("MailProvider/p", deadline).await;
                order.lock().unwrap().push((name, started.elapsed()));
            }));
            tokio::task::yield_now().await;
        }
        for t in tasks {
            t.await.unwrap();
        }
        let order = order.lock().unwrap().clone();
        let names: Vec<_> = order.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, ["first", "soon", "middle", "late"]);
        assert!(order[3].1 >= Duration::from_millis(1500), "{order:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_paused_provider_waits_and_others_do_not() {
        let limits = Arc::new(RateLimits::new(100.0));
        limits.pause("MailProvider/throttled", Instant::now() + Duration::from_secs(120));
        let started = Instant::now();
        limits.acquire("MailProvider/other", at(0)).await;
        assert!(started.elapsed() < Duration::from_secs(1));
        limits.acquire("MailProvider/throttled", at(0)).await;
        assert!(started.elapsed() >= Duration::from_secs(120));
    }
}
