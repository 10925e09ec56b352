//! The shared relay's index: Secrets as the API gives them, the user name forms, ambiguity,
//! the previous password's grace, relay keys removed, oversize Secrets, relists, and the
//! operator's signature (unsigned, forged, copied and edited Secrets are refused).

use std::collections::{BTreeMap, HashSet};

use chrono::{Duration, Utc};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use sha2::{Digest, Sha256};

use super::source::{Applied, Check, Index, MAX_SECRET};
use crate::api::Protocol;
use crate::policy::relay_signature::{KEY_LEN, Refusal, SIGNATURE_ANNOTATION, SigningKey, message};

/// The operator's key in these tests.
fn key() -> SigningKey {
    SigningKey::new(&[7; KEY_LEN]).unwrap()
}

/// `s` signed with `with`, as the operator signs it (over its namespace, name and data).
fn signed_with(with: &SigningKey, mut s: Secret) -> Secret {
    let (ns, name) = super::source::key_of(&s);
    let data = s.data.clone().unwrap_or_default();
    let m = message(&ns, &name, |k| data.get(k).map(|v| String::from_utf8_lossy(&v.0).into_owned()));
    s.metadata.annotations.get_or_insert_with(BTreeMap::new).insert(SIGNATURE_ANNOTATION.into(), with.sign(&m));
    s
}

fn signed(s: Secret) -> Secret {
    signed_with(&key(), s)
}

/// A Secret with these keys, signed with the operator's key.
fn secret(namespace: &str, name: &str, keys: &[(&str, &str)]) -> Secret {
    let mut s = Secret::default();
    s.metadata.namespace = Some(namespace.to_owned());
    s.metadata.name = Some(name.to_owned());
    s.data = Some(keys.iter().map(|(k, v)| ((*k).to_owned(), ByteString(v.as_bytes().to_vec()))).collect());
    signed(s)
}

fn relay(namespace: &str, name: &str, mailbox: &str, password: &str) -> Secret {
    let expires = (Utc::now() + Duration::hours(1)).to_rfc3339();
    secret(
        namespace,
        name,
        &[
            ("username", mailbox),
            ("access_token", "token"),
            ("expires_at", &expires),
            ("relay_username", mailbox),
            ("relay_password", password),
            ("smtp_host", "smtp.example.com"),
            ("smtp_port", "587"),
            ("imap_host", "imap.example.com"),
            ("imap_port", "993"),
        ],
    )
}

fn mailbox_of(check: Check) -> Option<String> {
    match check {
        Check::Accepted(entry) => Some(entry.mounted.mailbox.clone()),
        Check::Wrong | Check::Unreadable => None,
    }
}

fn listed() -> Index {
    let index = Index::default();
    index.set_key(Some(key()));
    index.set_listed();
    index
}

#[test]
fn before_the_first_list_a_login_is_a_temporary_failure() {
    let index = Index::default();
    index.set_key(Some(key()));
    index.apply(&relay("team", "a-token", "a@example.com", "pw-a"));
    assert!(matches!(index.check("a@example.com", b"pw-a", Utc::now()), Check::Unreadable));
    assert!(matches!(index.check("b@example.com", b"pw-a", Utc::now()), Check::Unreadable));
    index.set_listed();
    assert!(matches!(index.check("a@example.com", b"pw-a", Utc::now()), Check::Accepted(_)));
}

#[test]
fn a_unique_mailbox_logs_in_by_itself_and_with_its_namespace() {
    let index = listed();
    assert_eq!(index.apply(&relay("team", "a-token", "a@example.com", "pw-a")), Applied::Kept);
    let now = Utc::now();
    assert_eq!(mailbox_of(index.check("a@example.com", b"pw-a", now)).as_deref(), Some("a@example.com"));
    assert_eq!(mailbox_of(index.check("A@Example.com", b"pw-a", now)).as_deref(), Some("a@example.com"));
    assert_eq!(mailbox_of(index.check("team/a@example.com", b"pw-a", now)).as_deref(), Some("a@example.com"));
    assert!(mailbox_of(index.check("other/a@example.com", b"pw-a", now)).is_none());
    assert!(mailbox_of(index.check("a@example.com", b"pw-b", now)).is_none());
    assert!(mailbox_of(index.check("b@example.com", b"pw-a", now)).is_none());
    assert!(mailbox_of(index.check("", b"", now)).is_none());
    let Check::Accepted(entry) = index.check("a@example.com", b"pw-a", now) else { panic!("refused") };
    assert_eq!(
        entry.server(Protocol::Smtp),
        Some(("smtp.example.com".to_owned(), 587, crate::mail::TlsMode::Starttls))
    );
    assert_eq!(entry.server(Protocol::Imap).map(|s| s.1), Some(993));
    assert_eq!(entry.server(Protocol::Pop3), None);
    // Debug shows no secret.
    let shown = format!("{entry:?}");
    assert!(!shown.contains("pw-a") && !shown.contains("token\""), "{shown}");
}

#[test]
fn a_mailbox_bound_in_two_namespaces_is_told_apart_by_its_password() {
    let index = listed();
    index.apply(&relay("team", "a-token", "a@example.com", "pw-team"));
    index.apply(&relay("ops", "a-token", "a@example.com", "pw-ops"));
    let now = Utc::now();
    // The bare name: each binding by its own password.
    assert!(mailbox_of(index.check("a@example.com", b"pw-team", now)).is_some());
    assert!(mailbox_of(index.check("a@example.com", b"pw-ops", now)).is_some());
    assert!(mailbox_of(index.check("a@example.com", b"pw-other", now)).is_none());
    assert!(mailbox_of(index.check("team/a@example.com", b"pw-team", now)).is_some());
    assert!(mailbox_of(index.check("ops/a@example.com", b"pw-ops", now)).is_some());
    // Each namespace's password is its own.
    assert!(mailbox_of(index.check("team/a@example.com", b"pw-ops", now)).is_none());
    // Two bindings of the mailbox in one namespace: each by its own password, with the namespace.
    index.apply(&relay("team", "b-token", "a@example.com", "pw-team-2"));
    assert!(mailbox_of(index.check("team/a@example.com", b"pw-team", now)).is_some());
    assert!(mailbox_of(index.check("team/a@example.com", b"pw-team-2", now)).is_some());
    assert!(mailbox_of(index.check("team/a@example.com", b"pw-ops", now)).is_none());
    index.delete(&relay("team", "b-token", "", ""));
    assert!(mailbox_of(index.check("team/a@example.com", b"pw-team-2", now)).is_none());
    assert!(mailbox_of(index.check("team/a@example.com", b"pw-team", now)).is_some());
    // The other namespace's binding gone: the bare mailbox works.
    index.delete(&relay("ops", "a-token", "", ""));
    assert!(mailbox_of(index.check("a@example.com", b"pw-team", now)).is_some());
}

#[test]
fn the_previous_password_works_until_its_grace_ends() {
    let index = listed();
    let now = Utc::now();
    let until = (now + Duration::minutes(10)).to_rfc3339();
    let digest: String = Sha256::digest(b"old").iter().map(|b| format!("{b:02x}")).collect();
    let mut s = relay("team", "a-token", "a@example.com", "new");
    let data = s.data.get_or_insert_with(BTreeMap::new);
    data.insert("relay_previous_sha256".into(), ByteString(digest.into_bytes()));
    data.insert("relay_previous_until".into(), ByteString(until.into_bytes()));
    assert_eq!(index.apply(&s), Applied::Refused(Refusal::BadSignature), "changed after signing");
    assert_eq!(index.apply(&signed(s)), Applied::Kept);
    assert!(mailbox_of(index.check("a@example.com", b"new", now)).is_some());
    assert!(mailbox_of(index.check("a@example.com", b"old", now)).is_some());
    assert!(mailbox_of(index.check("a@example.com", b"old", now + Duration::minutes(11))).is_none());
    assert!(mailbox_of(index.check("a@example.com", b"new", now + Duration::minutes(11))).is_some());
}

#[test]
fn a_secret_whose_relay_keys_disappear_is_forgotten() {
    let index = listed();
    index.apply(&relay("team", "a-token", "a@example.com", "pw"));
    assert_eq!(index.len(), 1);
    let off = secret("team", "a-token", &[("username", "a@example.com"), ("access_token", "t")]);
    assert_eq!(index.apply(&off), Applied::NoRelay);
    assert!(index.is_empty());
    assert!(mailbox_of(index.check("a@example.com", b"pw", Utc::now())).is_none());
    // A Secret without data at all.
    let mut bare = Secret::default();
    bare.metadata.namespace = Some("team".into());
    bare.metadata.name = Some("x".into());
    assert_eq!(index.apply(&bare), Applied::NoRelay);
    // relay_password without username: unusable, not kept, and the reason names the key only.
    let broken = secret("team", "b", &[("relay_password", "secret-value")]);
    match index.apply(&broken) {
        Applied::Invalid(why) => assert!(why.contains("username") && !why.contains("secret-value"), "{why}"),
        other => panic!("{other:?}"),
    }
    assert!(index.is_empty());
}

#[test]
fn an_oversize_secret_is_not_kept() {
    let index = listed();
    index.apply(&relay("team", "a-token", "a@example.com", "pw"));
    let mut big = relay("team", "a-token", "a@example.com", "pw");
    big.data.get_or_insert_with(BTreeMap::new).insert("filler".into(), ByteString(vec![b'x'; MAX_SECRET]));
    assert_eq!(index.apply(&big), Applied::TooLarge);
    // The oversize update replaces the earlier version: nothing is served from it.
    assert!(index.is_empty());
    assert!(mailbox_of(index.check("a@example.com", b"pw", Utc::now())).is_none());
}

#[test]
fn a_relist_forgets_the_secrets_it_no_longer_has_in_its_namespace_only() {
    let index = listed();
    index.apply(&relay("team", "a", "a@example.com", "pw"));
    index.apply(&relay("team", "b", "b@example.com", "pw"));
    index.apply(&relay("ops", "c", "c@example.com", "pw"));
    let listed: HashSet<(String, String)> = [("team".to_owned(), "a".to_owned())].into_iter().collect();
    index.retain_listed(Some("team"), &listed);
    assert_eq!(index.len(), 2);
    assert!(mailbox_of(index.check("b@example.com", b"pw", Utc::now())).is_none());
    assert!(mailbox_of(index.check("c@example.com", b"pw", Utc::now())).is_some());
    index.retain_listed(None, &HashSet::new());
    assert!(index.is_empty());
}

#[test]
fn the_selector_names_the_published_secrets() {
    assert_eq!(
        super::watch::selector(),
        "app.kubernetes.io/managed-by=mail-oauth-operator,mailoauth.io/secret-role=published"
    );
}

#[test]
fn a_user_name_with_a_slash_is_never_kept_so_a_qualified_name_cannot_be_shadowed() {
    let index = listed();
    assert_eq!(index.apply(&relay("victims", "v-token", "victim@contoso.com", "pw-v")), Applied::Kept);
    // Another namespace has the operator sign the victim's bare name and its qualified one as
    // user names (a binding of the victim's mailbox there: the signature says what the operator
    // published, not whose mailbox it is).
    assert_eq!(index.apply(&relay("att", "a1", "victim@contoso.com", "pw-a")), Applied::Kept);
    match index.apply(&relay("att", "a2", "victims/victim@contoso.com", "pw-a")) {
        Applied::Invalid(why) => assert!(why.contains('/'), "{why}"),
        other => panic!("{other:?}"),
    }
    let now = Utc::now();
    // The bare name still takes the victim's password to the victim's entry alone; the qualified
    // one reaches only the victim's entry.
    assert!(mailbox_of(index.check("victim@contoso.com", b"pw-v", now)).is_some());
    assert_eq!(
        mailbox_of(index.check("victims/victim@contoso.com", b"pw-v", now)).as_deref(),
        Some("victim@contoso.com")
    );
    assert!(mailbox_of(index.check("victims/victim@contoso.com", b"pw-a", now)).is_none());
}

#[test]
fn a_namespace_cannot_grow_the_index_past_its_bound_and_long_tokens_are_not_kept() {
    let index = listed();
    for i in 0..super::source::MAX_PER_NAMESPACE {
        assert_eq!(index.apply(&relay("flood", &format!("s{i}"), &format!("u{i}@example.com"), "pw")), Applied::Kept);
    }
    assert_eq!(index.apply(&relay("flood", "one-more", "x@example.com", "pw")), Applied::Full);
    // An update of one already kept still goes through; another namespace is not affected.
    assert_eq!(index.apply(&relay("flood", "s0", "u0@example.com", "pw2")), Applied::Kept);
    assert_eq!(index.apply(&relay("team", "a-token", "a@example.com", "pw-a")), Applied::Kept);
    let mut long = relay("team", "long", "l@example.com", "pw");
    if let Some(d) = long.data.as_mut() {
        d.insert("access_token".into(), k8s_openapi::ByteString(vec![b'a'; super::source::MAX_TOKEN + 1]));
    }
    assert!(matches!(index.apply(&long), Applied::Invalid(_)));
}

/// Counts of `mailoauth_relay_secrets_refused_total` by reason, from the registry's text.
fn refused_counts(index: &Index) -> String {
    let mut registry = prometheus_client::registry::Registry::default();
    index.register(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    text
}

#[test]
fn an_unsigned_secret_is_not_served_and_is_counted_without_a_name() {
    let index = listed();
    let mut unsigned = relay("team", "a-token", "a@example.com", "pw");
    unsigned.metadata.annotations = None;
    assert_eq!(index.apply(&unsigned), Applied::Refused(Refusal::Unsigned));
    let mut garbled = relay("team", "b-token", "b@example.com", "pw");
    garbled.metadata.annotations.get_or_insert_with(BTreeMap::new).insert(SIGNATURE_ANNOTATION.into(), "x".into());
    assert_eq!(index.apply(&garbled), Applied::Refused(Refusal::Malformed));
    assert!(index.is_empty());
    assert!(mailbox_of(index.check("a@example.com", b"pw", Utc::now())).is_none());
    let text = refused_counts(&index);
    assert!(text.contains("mailoauth_relay_secrets_refused_total{reason=\"unsigned\"} 1"), "{text}");
    assert!(text.contains("mailoauth_relay_secrets_refused_total{reason=\"malformed\"} 1"), "{text}");
    assert!(!text.contains("team") && !text.contains("example.com"), "{text}");
    // Without the operator's key nothing is served.
    let keyless = Index::default();
    keyless.set_listed();
    assert_eq!(keyless.apply(&relay("team", "a-token", "a@example.com", "pw")), Applied::Refused(Refusal::NoKey));
}

#[test]
fn a_tenants_forged_secret_claiming_another_mailbox_is_refused_and_leaves_the_name_unambiguous() {
    let index = listed();
    assert_eq!(index.apply(&relay("victims", "v-token", "victim@contoso.com", "pw-v")), Applied::Kept);
    // The tenant of `att` labels a Secret of its own as published, signed with a key of its own
    // (it cannot read the operator's), or not at all, or with the victim's signature.
    let own_key = SigningKey::new(&[9; KEY_LEN]).unwrap();
    let forged = signed_with(&own_key, relay("att", "a1", "victim@contoso.com", "pw-a"));
    assert_eq!(index.apply(&forged), Applied::Refused(Refusal::OtherKey));
    let mut stolen = relay("att", "a2", "victim@contoso.com", "pw-a");
    let victims = relay("victims", "v-token", "victim@contoso.com", "pw-v");
    stolen.metadata.annotations.clone_from(&victims.metadata.annotations);
    assert_eq!(index.apply(&stolen), Applied::Refused(Refusal::BadSignature));
    // The bare name still names the victim's binding alone.
    let now = Utc::now();
    assert_eq!(mailbox_of(index.check("victim@contoso.com", b"pw-v", now)).as_deref(), Some("victim@contoso.com"));
    assert!(mailbox_of(index.check("victim@contoso.com", b"pw-a", now)).is_none());
    assert!(mailbox_of(index.check("att/victim@contoso.com", b"pw-a", now)).is_none());
}

#[test]
fn a_signed_secret_copied_to_another_namespace_or_name_or_edited_is_refused() {
    let index = listed();
    let original = relay("team", "a-token", "a@example.com", "pw");
    assert_eq!(index.apply(&original), Applied::Kept);
    // Copied whole (annotation and data) into another namespace, or under another name.
    let mut copied = original.clone();
    copied.metadata.namespace = Some("elsewhere".into());
    assert_eq!(index.apply(&copied), Applied::Refused(Refusal::BadSignature));
    let mut renamed = original.clone();
    renamed.metadata.name = Some("b-token".into());
    assert_eq!(index.apply(&renamed), Applied::Refused(Refusal::BadSignature));
    assert_eq!(index.len(), 1);
    assert!(mailbox_of(index.check("elsewhere/a@example.com", b"pw", Utc::now())).is_none());
    // Edited in place: a sender or a server added. The version kept before is dropped.
    for (k, v) in [("relay_senders", "ceo@example.com"), ("smtp_host", "evil.example.net"), ("relay_password", "mine")]
    {
        let mut edited = original.clone();
        edited.data.get_or_insert_with(BTreeMap::new).insert(k.into(), ByteString(v.as_bytes().to_vec()));
        assert_eq!(index.apply(&edited), Applied::Refused(Refusal::BadSignature), "{k}");
        assert!(index.is_empty(), "{k}");
        assert_eq!(index.apply(&original), Applied::Kept);
    }
    // A renewed token (not signed: see the policy module) keeps it served.
    let mut renewed = original.clone();
    renewed.data.get_or_insert_with(BTreeMap::new).insert("access_token".into(), ByteString(b"token-2".to_vec()));
    assert_eq!(index.apply(&renewed), Applied::Kept);
    // After a rotation of the operator's key, the old signature is another key's.
    index.set_key(Some(SigningKey::new(&[8; KEY_LEN]).unwrap()));
    assert_eq!(index.apply(&original), Applied::Refused(Refusal::OtherKey));
    assert!(index.is_empty());
}

/// A binding of the victim's mailbox in another namespace (the attacker's own provider, whose
/// token endpoint answers anything: the operator signs what it publishes, not whose mailbox it
/// is), with servers of the attacker's choosing.
fn claim(namespace: &str, name: &str, mailbox: &str, password: &str) -> Secret {
    let mut s = relay(namespace, name, mailbox, password);
    let data = s.data.get_or_insert_with(BTreeMap::new);
    data.insert("smtp_host".into(), ByteString(b"evil.example.net".to_vec()));
    signed(s)
}

fn smtp_host_of(check: Check) -> Option<String> {
    match check {
        Check::Accepted(entry) => entry.server(Protocol::Smtp).map(|s| s.0),
        Check::Wrong | Check::Unreadable => None,
    }
}

#[test]
fn another_namespace_binding_the_same_mailbox_cannot_lock_its_devices_out_of_the_bare_name() {
    let index = listed();
    assert_eq!(index.apply(&relay("victims", "v-token", "victim@contoso.com", "pw-v")), Applied::Kept);
    // Many bindings of the victim's mailbox in the attacker's namespace, all signed.
    for i in 0..20 {
        assert_eq!(
            index.apply(&claim("att", &format!("a{i}"), "victim@contoso.com", &format!("pw-a{i}"))),
            Applied::Kept
        );
    }
    let now = Utc::now();
    // The victim's devices keep logging in by the bare name, to the victim's binding (its server).
    assert_eq!(smtp_host_of(index.check("victim@contoso.com", b"pw-v", now)).as_deref(), Some("smtp.example.com"));
    assert_eq!(smtp_host_of(index.check("VICTIM@contoso.com", b"pw-v", now)).as_deref(), Some("smtp.example.com"));
    // The attacker's password reaches only the attacker's own binding, never the victim's.
    assert_eq!(smtp_host_of(index.check("victim@contoso.com", b"pw-a3", now)).as_deref(), Some("evil.example.net"));
    assert!(smtp_host_of(index.check("victims/victim@contoso.com", b"pw-a3", now)).is_none());
    // A wrong password is wrong, whatever the number of bindings of the name.
    assert!(smtp_host_of(index.check("victim@contoso.com", b"pw-x", now)).is_none());
    // Two bindings accepting the same password (a namespace that set it twice): neither is chosen.
    assert_eq!(index.apply(&claim("att", "dup", "victim@contoso.com", "pw-a3")), Applied::Kept);
    assert!(smtp_host_of(index.check("victim@contoso.com", b"pw-a3", now)).is_none());
    assert!(smtp_host_of(index.check("att/victim@contoso.com", b"pw-a3", now)).is_none());
    // The victim's own is still unique by its password.
    assert_eq!(smtp_host_of(index.check("victim@contoso.com", b"pw-v", now)).as_deref(), Some("smtp.example.com"));
}
