//! Whether this replica may act: it holds the leader Lease, as last seen, and the lease has not
//! run out. Leadership is judged from the Lease object itself rather than from what the election
//! task believes, so that a replica cut off from the API server stops requesting tokens when its
//! lease runs out, before another replica may take over.

use chrono::{DateTime, Duration, Utc};

/// What this replica last saw of the leader Lease.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeaseView {
    /// `spec.holderIdentity`.
    pub holder: Option<String>,
    /// `spec.renewTime`.
    pub renewed: Option<DateTime<Utc>>,
    /// `spec.leaseDurationSeconds`.
    pub duration_seconds: Option<i32>,
}

/// Whether `identity` holds the lease at `now`: it is the holder, and the lease runs out no sooner
/// than `margin` from now. The margin keeps this replica's last act ahead of the moment another
/// replica, whose clock may run a little ahead, sees the lease expired.
pub fn holds(view: &LeaseView, identity: &str, now: DateTime<Utc>, margin: Duration) -> bool {
    let (Some(holder), Some(renewed), Some(seconds)) = (&view.holder, view.renewed, view.duration_seconds) else {
        return false;
    };
    if holder != identity || seconds <= 0 {
        return false;
    }
    let runs_out = crate::policy::time::plus(renewed, Duration::seconds(i64::from(seconds)));
    now < crate::policy::time::minus(runs_out, margin)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::testing::t as at;

    fn view(holder: &str, renewed: i64, seconds: i32) -> LeaseView {
        LeaseView { holder: Some(holder.into()), renewed: Some(at(renewed)), duration_seconds: Some(seconds) }
    }

    #[test]
    fn the_holder_of_a_fresh_lease_leads() {
        assert!(holds(&view("a", 0, 15), "a", at(5), Duration::seconds(2)));
    }

    #[test]
    fn another_replica_does_not_lead() {
        assert!(!holds(&view("a", 0, 15), "b", at(5), Duration::seconds(2)));
    }

    #[test]
    fn a_holder_stops_leading_the_margin_before_its_lease_runs_out() {
        let v = view("a", 0, 15);
        assert!(holds(&v, "a", at(12), Duration::seconds(2)));
        assert!(!holds(&v, "a", at(13), Duration::seconds(2)));
        assert!(!holds(&v, "a", at(60), Duration::seconds(2)));
    }

    #[test]
    fn a_released_or_incomplete_lease_is_held_by_nobody() {
        assert!(!holds(&LeaseView::default(), "a", at(0), Duration::zero()));
        let no_renew = LeaseView { renewed: None, ..view("a", 0, 15) };
        assert!(!holds(&no_renew, "a", at(0), Duration::zero()));
        assert!(!holds(&view("a", 0, 0), "a", at(0), Duration::zero()));
        assert!(!holds(&view("a", 0, -5), "a", at(0), Duration::zero()));
    }

    #[test]
    fn an_extreme_renew_time_does_not_overflow() {
        let v = LeaseView { renewed: Some(DateTime::<Utc>::MAX_UTC), ..view("a", 0, i32::MAX) };
        assert!(holds(&v, "a", at(0), Duration::seconds(2)));
    }
}
