//! Building conditions: the transition time moves only when the status flips.

use chrono::{DateTime, Utc};

use super::Reason;
use crate::api::common::find_condition;
use crate::api::{Condition, ConditionStatus};

/// A condition of `type_`, keeping the previous transition time when the status is unchanged.
pub fn condition(
    previous: &[Condition],
    type_: &str,
    status: ConditionStatus,
    reason: Reason,
    message: String,
    now: DateTime<Utc>,
    generation: Option<i64>,
) -> Condition {
    let since = find_condition(previous, type_).filter(|c| c.status == status).map_or(now, |c| c.last_transition_time);
    Condition {
        type_: type_.to_owned(),
        status,
        reason: reason.as_str().to_owned(),
        message,
        last_transition_time: since,
        observed_generation: generation,
    }
}
