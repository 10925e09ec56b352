//! Identity pinning: when the provider says who consented, it must be the mailbox's owner.
//! Whoever completes an interactive grant could otherwise sign in as someone else (their own
//! account, a shared one) and the binding would publish a token for the wrong mailbox.

/// What the provider vouched for, checked against `mailbox` and its declared aliases (without
/// case). `Ok(None)`: the provider said nothing; `Ok(Some(identity))`: the matching identity;
/// `Err(message)`: another identity, named with the mailbox.
pub fn pinned(vouched: &[String], mailbox: &str, aliases: &[String]) -> Result<Option<String>, String> {
    if vouched.is_empty() {
        return Ok(None);
    }
    let expected = || std::iter::once(mailbox).chain(aliases.iter().map(String::as_str));
    if let Some(v) = vouched.iter().find(|v| expected().any(|e| e.eq_ignore_ascii_case(v))) {
        return Ok(Some(v.clone()));
    }
    let shown: Vec<&str> = vouched.iter().take(3).map(String::as_str).collect();
    let mut message = format!("the provider says {} consented, not {mailbox}; nothing was stored", shown.join(" / "));
    if !aliases.is_empty() {
        message.push_str(" (nor any of spec.identityAliases)");
    }
    Err(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn a_provider_that_says_nothing_is_not_checked() {
        assert_eq!(pinned(&[], "a@x.com", &[]), Ok(None));
    }

    #[test]
    fn the_mailbox_or_an_alias_matches_without_case() {
        assert_eq!(pinned(&v(&["A@X.com"]), "a@x.com", &[]), Ok(Some("A@X.com".into())));
        let aliases = v(&["hd@x.onmicrosoft.com"]);
        assert_eq!(
            pinned(&v(&["other@x.com", "HD@x.onmicrosoft.com"]), "a@x.com", &aliases),
            Ok(Some("HD@x.onmicrosoft.com".into()))
        );
    }

    #[test]
    fn another_identity_is_refused_naming_both() {
        let e = pinned(&v(&["mallory@x.com"]), "a@x.com", &[]).unwrap_err();
        assert!(e.contains("mallory@x.com") && e.contains("a@x.com"), "{e}");
    }
}
