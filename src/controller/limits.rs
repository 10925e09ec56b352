//! Token requests per provider are rate-limited, and when more are due than the rate allows, the
//! binding whose token expires first goes first (a deadline queue, not FIFO): after an outage the
//! herd is spread and whoever can still be saved is served first. A provider that answers 429 or
//! sends `Retry-After` is paused; other providers are not.
//!
//! Nobody waits here while holding a reconcile slot for longer than [`MAX_WAIT`]: a provider
//! paused for longer, a queue longer than that, or a namespace that already has
//! [`RateLimits::lane_cap`] slow requests in flight (a slow endpoint of one tenant), or all the
//! reconcile slots but a few, is answered [`Admission::Later`], and the reconcile gives its slot
//! back and comes back then. So one tenant's
//! throttled or slow endpoint cannot hold the slots every other tenant's renewals need.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use tokio::sync::oneshot;
use tokio::time::{Duration, Instant};

/// The longest a reconcile waits for a slot before it gives its reconcile slot back.
pub const MAX_WAIT: Duration = Duration::from_secs(2);

/// Rate limits for every provider of the process.
#[derive(Debug)]
pub struct RateLimits {
    interval: Duration,
    queues: Mutex<HashMap<String, Arc<Mutex<Queue>>>>,
    lanes: Arc<Mutex<HashMap<String, Lane>>>,
    /// Requests of one namespace in flight for longer than [`SLOW_AFTER`] at most.
    lane_cap: usize,
    /// Requests of one namespace in flight at most, slow or not (the reconcile slots always left
    /// to other namespaces).
    lane_hard_cap: usize,
    arrivals: std::sync::atomic::AtomicU64,
    /// Requests sent away in a row, by who asked: each comes back twice as late (up to
    /// [`MAX_DEFERRAL`]), so that bindings stuck behind a full lane do not poll the apiserver.
    deferrals: Mutex<HashMap<String, u32>>,
}

/// The longest a request sent away in a row waits before it asks again (a paused provider's own
/// pause may be longer).
pub const MAX_DEFERRAL: Duration = Duration::from_secs(60);

/// Whether a request may go now.
#[derive(Debug)]
pub enum Admission {
    /// Go; the lane's place is held until the guard is dropped.
    Go(LaneGuard),
    /// No room now: try again after this long.
    Later(Duration),
}

/// A request in flight counts as slow after this long.
pub const SLOW_AFTER: Duration = Duration::from_secs(1);

/// The requests of one namespace in flight: when each started.
type Lane = HashMap<u64, Instant>;

/// A request in flight in its lane (the requesting namespace); dropped when it is answered.
#[derive(Debug)]
pub struct LaneGuard {
    lanes: Arc<Mutex<HashMap<String, Lane>>>,
    lane: String,
    id: u64,
}

impl Drop for LaneGuard {
    fn drop(&mut self) {
        if let Ok(mut lanes) = self.lanes.lock()
            && let Some(lane) = lanes.get_mut(&self.lane)
        {
            lane.remove(&self.id);
            if lane.is_empty() {
                lanes.remove(&self.lane);
            }
        }
    }
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
        Self {
            interval,
            queues: Mutex::default(),
            lanes: Arc::default(),
            lane_cap: 4,
            lane_hard_cap: 12,
            arrivals: std::sync::atomic::AtomicU64::new(0),
            deferrals: Mutex::default(),
        }
    }

    /// At most `slow` requests of one namespace in flight for longer than [`SLOW_AFTER`], and at
    /// most `all` in flight at all (each at least one; `all` at least `slow`). With reconcile
    /// concurrency C, `all` = C − `slow` leaves other namespaces `slow` slots whatever one does.
    pub fn with_lanes(mut self, slow: usize, all: usize) -> Self {
        self.lane_cap = slow.max(1);
        self.lane_hard_cap = all.max(self.lane_cap);
        self
    }

    /// The most slow requests one namespace may have in flight.
    pub fn lane_cap(&self) -> usize {
        self.lane_cap
    }

    /// A place in `lane` for a request, when it has one free: fast requests (answered within
    /// [`SLOW_AFTER`]) are bounded only by the hard cap, slow ones by the lane cap.
    /// `Err(true)`: full of fast requests, worth a short wait; `Err(false)`: slow ones are in
    /// flight, no use waiting.
    fn enter(&self, lane: &str) -> Result<LaneGuard, bool> {
        let mut lanes = self.lanes.lock().map_err(|_| false)?;
        let now = Instant::now();
        let in_flight = lanes.entry(lane.to_owned()).or_default();
        let slow = in_flight.values().filter(|started| now.saturating_duration_since(**started) >= SLOW_AFTER).count();
        if in_flight.len() >= self.lane_hard_cap || slow >= self.lane_cap {
            return Err(slow == 0);
        }
        let id = self.arrivals.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        in_flight.insert(id, now);
        Ok(LaneGuard { lanes: Arc::clone(&self.lanes), lane: lane.to_owned(), id })
    }

    /// A place in `lane`, waiting up to [`MAX_WAIT`] for one while the lane is full of fast
    /// requests (they free theirs soon); at once `None` when slow ones fill it.
    async fn enter_within(&self, lane: &str) -> Option<LaneGuard> {
        let until = Instant::now().checked_add(MAX_WAIT)?;
        loop {
            match self.enter(lane) {
                Ok(guard) => return Some(guard),
                Err(false) => return None,
                Err(true) if Instant::now() >= until => return None,
                Err(true) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    /// Admits a request of namespace `lane` to `provider` for `who` (a binding) now or within
    /// [`MAX_WAIT`] (earliest `deadline` first), or says when to come back: never a long wait in a
    /// reconcile slot, and later each time `who` is sent away in a row.
    pub async fn admit(self: &Arc<Self>, provider: &str, lane: &str, who: &str, deadline: DateTime<Utc>) -> Admission {
        let (admission, lane_full) = self.admit_now(provider, lane, deadline).await;
        let Ok(mut deferrals) = self.deferrals.lock() else { return admission };
        match admission {
            Admission::Go(guard) => {
                deferrals.remove(who);
                Admission::Go(guard)
            }
            // A pause or a queue says itself when there is room; a full lane (slow requests in
            // flight) does not, so those come back later each time.
            Admission::Later(wait) if !lane_full => Admission::Later(wait),
            Admission::Later(wait) => {
                if deferrals.len() >= 65_536 && !deferrals.contains_key(who) {
                    deferrals.clear();
                }
                let n = deferrals.entry(who.to_owned()).or_insert(0);
                let backoff = Duration::from_secs(1_u64.checked_shl(*n).unwrap_or(u64::MAX)).min(MAX_DEFERRAL);
                *n = n.saturating_add(1).min(16);
                Admission::Later(wait.max(backoff))
            }
        }
    }

    /// An admission now or within the bounded wait, and whether a refusal was for a full lane.
    async fn admit_now(self: &Arc<Self>, provider: &str, lane: &str, deadline: DateTime<Utc>) -> (Admission, bool) {
        let Some(guard) = self.enter_within(lane).await else {
            return (Admission::Later(Duration::from_secs(2)), true);
        };
        let paused_for = self
            .queue(provider)
            .and_then(|q| q.lock().ok().and_then(|q| q.paused_until))
            .map(|until| until.saturating_duration_since(Instant::now()))
            .unwrap_or_default();
        if paused_for > MAX_WAIT {
            return (Admission::Later(paused_for), false);
        }
        match tokio::time::timeout(MAX_WAIT.saturating_add(paused_for), self.acquire(provider, deadline)).await {
            Ok(()) => (Admission::Go(guard), false),
            Err(_) => {
                // Our sender is dropped with the future: the dispatcher skips it. Come back about
                // when the queue ahead has drained.
                let queued = self.queue(provider).and_then(|q| q.lock().ok().map(|q| q.waiting.len())).unwrap_or(1);
                let wait = self.interval.saturating_mul(u32::try_from(queued).unwrap_or(u32::MAX));
                (Admission::Later(wait.clamp(Duration::from_secs(1), Duration::from_secs(300))), false)
            }
        }
    }

    fn queue(&self, provider: &str) -> Option<Arc<Mutex<Queue>>> {
        let mut queues = self.queues.lock().ok()?;
        // Queues of providers nobody uses any more (deleted, renamed) go once there are many.
        if queues.len() > 256 && !queues.contains_key(provider) {
            let now = Instant::now();
            queues.retain(|_, q| {
                Arc::strong_count(q) > 1
                    || q.lock().map_or(true, |q| {
                        !q.waiting.is_empty() || [q.paused_until, q.next_slot].into_iter().flatten().any(|t| t > now)
                    })
            });
        }
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

    use crate::testing::t as at;

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
    async fn a_long_pause_or_a_full_lane_sends_the_reconcile_away_instead_of_holding_it() {
        let limits = Arc::new(RateLimits::new(100.0).with_lanes(2, 2));
        limits.pause("a/MailProvider/throttled", Instant::now() + Duration::from_secs(3600));
        let started = Instant::now();
        let Admission::Later(wait) = limits.admit("a/MailProvider/throttled", "a", "a/x", at(0)).await else {
            panic!("a provider paused for an hour admitted a request")
        };
        assert!(wait > Duration::from_secs(3500), "{wait:?}");
        assert!(started.elapsed() < Duration::from_millis(10), "it waited");
        // Two in flight in namespace b: a third of b comes back later; namespace c goes.
        let (Admission::Go(g1), Admission::Go(_g2)) = (
            limits.admit("b/MailProvider/slow", "b", "b/x", at(0)).await,
            limits.admit("b/MailProvider/slow", "b", "b/x", at(0)).await,
        ) else {
            panic!("the lane's first two were not admitted")
        };
        assert!(matches!(limits.admit("b/MailProvider/other", "b", "b/y", at(0)).await, Admission::Later(_)));
        assert!(matches!(limits.admit("/ClusterMailProvider/shared", "c", "c/x", at(0)).await, Admission::Go(_)));
        drop(g1);
        assert!(matches!(limits.admit("b/MailProvider/slow", "b", "b/x", at(0)).await, Admission::Go(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_long_queue_sends_the_latest_deadline_away_within_the_bounded_wait() {
        let limits = Arc::new(RateLimits::new(1.0).with_lanes(100, 100));
        let mut admitted = 0;
        let mut later = 0;
        let started = Instant::now();
        let mut tasks = Vec::new();
        for i in 0..10 {
            let limits = Arc::clone(&limits);
            tasks.push(tokio::spawn(async move { limits.admit("p", "ns", &format!("ns/b{i}"), at(i)).await }));
        }
        for t in tasks {
            match t.await.unwrap() {
                Admission::Go(_) => admitted += 1,
                Admission::Later(wait) => {
                    later += 1;
                    assert!(wait >= Duration::from_secs(1), "{wait:?}");
                }
            }
        }
        assert!(admitted <= 3 && later >= 7, "{admitted} admitted, {later} later");
        assert!(started.elapsed() <= MAX_WAIT + Duration::from_millis(10), "{:?}", started.elapsed());
    }

    #[tokio::test(start_paused = true)]
    async fn a_binding_sent_away_again_and_again_comes_back_later_each_time() {
        let limits = Arc::new(RateLimits::new(100.0).with_lanes(1, 1));
        let Admission::Go(_held) = limits.admit("p", "ns", "ns/holder", at(0)).await else { panic!("first") };
        let mut waits = Vec::new();
        for _ in 0..8 {
            let Admission::Later(w) = limits.admit("p", "ns", "ns/stuck", at(0)).await else { panic!("admitted") };
            waits.push(w.as_secs());
        }
        assert_eq!(waits, [2, 2, 4, 8, 16, 32, 60, 60]);
        drop(_held);
        assert!(matches!(limits.admit("p", "ns", "ns/stuck", at(0)).await, Admission::Go(_)));
        let Admission::Go(_again) = limits.admit("p", "ns", "ns/other", at(0)).await else { panic!("other") };
        let Admission::Later(w) = limits.admit("p", "ns", "ns/stuck", at(0)).await else { panic!("admitted") };
        assert_eq!(w.as_secs(), 2, "admitted once, its count starts over");
    }

    #[tokio::test(start_paused = true)]
    async fn fast_requests_share_the_lane_up_to_the_hard_cap_and_slow_ones_up_to_the_lane_cap() {
        let limits = Arc::new(RateLimits::new(1000.0).with_lanes(2, 6));
        let mut held = Vec::new();
        for i in 0..6 {
            let Admission::Go(g) = limits.admit("p", "ns", &format!("ns/{i}"), at(0)).await else {
                panic!("fast request {i} refused")
            };
            held.push(g);
        }
        // The hard cap: a seventh waits the bounded wait, then is sent away.
        assert!(matches!(limits.admit("p", "ns", "ns/7", at(0)).await, Admission::Later(_)));
        // Two answered, and the rest in flight for more than a second are slow: only two may be
        // slow at once, so with four slow in flight nobody else goes.
        held.truncate(4);
        tokio::time::sleep(SLOW_AFTER).await;
        assert!(matches!(limits.admit("p", "ns", "ns/8", at(0)).await, Admission::Later(_)));
        held.truncate(1);
        let Admission::Go(_g) = limits.admit("p", "ns", "ns/9", at(0)).await else { panic!("one slow, one free") };
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
