//! Pure policy: what to do now, given a clock and the objects. No I/O; every function here is
//! deterministic in its inputs, so each decision is unit-tested without a cluster or a server.

pub mod at_rest;
pub mod binding;
pub mod classify;
pub mod condition;
pub mod duration;
pub mod events;
pub mod grant_state;
pub mod identity;
pub mod leader;
pub mod ownership;
pub mod provider;
pub mod publish;
pub mod reason;
pub mod reference;
pub mod relay;
pub mod relay_signature;
pub mod schedule;
pub mod scrub;
pub mod time;
pub mod validate;
pub mod verification;
pub mod verify;

pub use reason::Reason;

/// Cases per property in the property (fuzz) tests: `FUZZ_CASES`, default 2,000.
#[cfg(test)]
pub(crate) fn fuzz_cases() -> u32 {
    std::env::var("FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2_000)
}
