//! Pure policy: what to do now, given a clock and the objects. No I/O; every function here is
//! deterministic in its inputs, so each decision is unit-tested without a cluster or a server.

pub mod binding;
pub mod classify;
pub mod condition;
pub mod grant_state;
pub mod ownership;
pub mod provider;
pub mod publish;
pub mod reason;
pub mod schedule;

pub use reason::Reason;
