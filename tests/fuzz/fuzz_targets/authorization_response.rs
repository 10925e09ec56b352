//! What a browser brings back or a person pastes: redirect URLs, queries, states.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mail_oauth_operator::oauth::authorize::{binding_of, parse_response, same_state};

fuzz_target!(|text: &str| {
    let _ = parse_response(text);
    let _ = binding_of(text);
    let _ = same_state(text, "bWFpbC9h.state");
});
