//! Token, error and device authorization bodies, and id_tokens, as a token endpoint could send them.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mail_oauth_operator::oauth::response::{identities, parse_device, parse_error, parse_token};

fuzz_target!(|body: &[u8]| {
    let _ = parse_token(body);
    let _ = parse_error(body);
    let _ = parse_device(body);
    let _ = identities(&String::from_utf8_lossy(body));
});
