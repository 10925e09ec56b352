//! Text from a token endpoint (`error`, `error_description`) is the provider's, not ours: it may
//! echo the request, and so a client secret or a token. Before such text reaches status, an
//! Event, a log line or a metric it is reduced to printable characters, scrubbed of every
//! credential the operator holds for the request (as sent, form-encoded and percent-encoded) and
//! shortened. Scrubbing comes before shortening, so a cut cannot leave half a secret behind.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

/// What replaces a credential.
pub const REDACTED: &str = "[redacted]";

/// Longest provider text kept.
pub const MAX_TEXT: usize = 200;

/// Credentials shorter than this are not searched for (they would match ordinary words).
const MIN_SECRET: usize = 6;

/// The forms in which a credential may be echoed back.
fn forms(secret: &str) -> Vec<String> {
    let form: String = url::form_urlencoded::byte_serialize(secret.as_bytes()).collect();
    let percent = form.replace('+', "%20");
    let mut out = vec![secret.to_owned(), form, percent, STANDARD.encode(secret)];
    out.retain(|f| f.len() >= MIN_SECRET);
    out.sort_by_key(|f| std::cmp::Reverse(f.len()));
    out.dedup();
    out
}

/// `text` without any of `secrets`, in any of the forms they travel in.
pub fn scrub(text: &str, secrets: &[&str]) -> String {
    let mut out = text.to_owned();
    for secret in secrets.iter().filter(|s| s.len() >= MIN_SECRET) {
        for form in forms(secret) {
            if out.contains(&form) {
                out = out.replace(&form, REDACTED);
            }
        }
    }
    out
}

/// Provider text made safe to show: its first line, printable ASCII only, scrubbed of `secrets`,
/// at most [`MAX_TEXT`] characters.
pub fn provider_text(text: &str, secrets: &[&str]) -> String {
    let first = text.lines().next().unwrap_or_default();
    // Bound the work before scrubbing: a line far longer than anything shown is cut first, with
    // room for the longest credential form to be recognised across the cut.
    let bounded: String = first.chars().take(MAX_TEXT.saturating_mul(64)).collect();
    let printable: String = bounded.chars().map(|c| if c.is_ascii_graphic() || c == ' ' { c } else { '?' }).collect();
    let clean = scrub(&printable, secrets);
    let trimmed = clean.trim();
    let mut shown: String = trimmed.chars().take(MAX_TEXT).collect();
    // A credential cut by the limit may leave its head behind: drop any tail that starts one.
    for secret in secrets.iter().filter(|s| s.len() >= MIN_SECRET) {
        for form in forms(secret) {
            // Only a head shorter than the shown text can be left behind: bounded work.
            for n in (MIN_SECRET..form.len().min(MAX_TEXT.saturating_add(1))).rev() {
                let head: String = form.chars().take(n).collect();
                if shown.ends_with(&head) {
                    let keep = shown.len().saturating_sub(head.len());
                    shown = shown.chars().take(keep).collect();
                    shown.push_str(REDACTED);
                    break;
                }
            }
        }
    }
    shown
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn an_echoed_client_secret_is_removed_in_every_form() {
        let secret = "s3cr3t+/=value";
        for echo in [
            format!("invalid client_secret {secret}"),
            "invalid client_secret s3cr3t%2B%2F%3Dvalue".to_owned(),
            format!("basic {}", STANDARD.encode(secret)),
        ] {
            let shown = provider_text(&echo, &[secret]);
            assert!(!shown.contains("s3cr3t"), "{shown}");
            assert!(shown.contains(REDACTED), "{shown}");
        }
    }

    #[test]
    fn a_secret_cut_by_the_length_limit_leaves_no_head_behind() {
        let secret = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
        let text = format!("{}{secret}", "x".repeat(MAX_TEXT - 10));
        let shown = provider_text(&text, &[secret]);
        assert!(!shown.contains("ABCDEF"), "{shown}");
    }

    #[test]
    fn control_characters_and_later_lines_are_dropped() {
        assert_eq!(provider_text("AADSTS70008: expired\r\nTrace ID: 1", &[]), "AADSTS70008: expired");
        assert_eq!(provider_text("bell\u{7} é", &[]), "bell? ?");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(crate::policy::fuzz_cases()))]
        #[test]
        fn no_secret_survives_in_provider_text(
            before in "\\PC{0,300}", after in "\\PC{0,300}", secret in "[!-~]{6,64}"
        ) {
            let shown = provider_text(&format!("{before}{secret}{after}"), &[&secret]);
            prop_assert!(!shown.contains(&secret), "{shown}");
            prop_assert!(shown.chars().count() <= MAX_TEXT + REDACTED.len());
        }
    }
}
