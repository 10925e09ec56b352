//! `spec.refreshBefore` and the operator's duration flags: Go durations of any shape.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mail_oauth_operator::policy::duration::parse;

fuzz_target!(|text: &str| {
    let _ = parse(text);
});
