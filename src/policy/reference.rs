//! Which referenced Secrets the operator may read. A namespaced `MailProvider` names both a token
//! URL and the Secrets whose values are sent there, so anyone who may create one in a namespace
//! could have any Secret of that namespace sent anywhere. In strict mode a Secret referenced from
//! a namespace must say it may be used, with the label `mailoauth.io/allow-reference: "true"`;
//! Secrets of `ClusterMailProvider`s live in the operator's own namespace and need no label.
//!
//! In every mode, a Secret the operator writes itself (labelled
//! `app.kubernetes.io/managed-by: mail-oauth-operator`: a binding's grant state or published token)
//! is never read by reference: naming another binding's grant state as a "client secret" of a
//! provider of one's own would otherwise send its refresh token, device code or PKCE verifier
//! wherever that provider points.

use std::collections::BTreeMap;

use crate::api::{ALLOW_REFERENCE_LABEL, MANAGED_BY_LABEL, MANAGED_BY_VALUE};

/// Whether referenced Secrets must carry the opt-in label.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ReferencePolicy {
    /// Any Secret in the referring object's namespace may be read.
    #[default]
    Any,
    /// Only Secrets labelled `mailoauth.io/allow-reference: "true"` (strict mode).
    Labelled,
}

/// Whether a Secret with `labels` in `namespace` may be read by reference; Secrets in
/// `cluster_namespace` (set up by the cluster admin for `ClusterMailProvider`s) always may.
pub fn may_read(
    policy: ReferencePolicy,
    namespace: &str,
    cluster_namespace: &str,
    labels: Option<&BTreeMap<String, String>>,
) -> bool {
    if operator_written(labels) {
        return false;
    }
    match policy {
        ReferencePolicy::Any => true,
        ReferencePolicy::Labelled => {
            namespace == cluster_namespace
                || labels.and_then(|l| l.get(ALLOW_REFERENCE_LABEL)).is_some_and(|v| v == "true")
        }
    }
}

/// Whether the operator wrote this Secret itself.
fn operator_written(labels: Option<&BTreeMap<String, String>>) -> bool {
    labels.and_then(|l| l.get(MANAGED_BY_LABEL)).is_some_and(|v| v == MANAGED_BY_VALUE)
}

/// What to say of a Secret that may not be read (the reason `SecretReferenceNotAllowed` adds the
/// fix).
pub fn not_allowed(namespace: &str, name: &str, labels: Option<&BTreeMap<String, String>>) -> String {
    if operator_written(labels) {
        return format!(
            "Secret {namespace}/{name} is written by the operator itself (a binding's grant state or published \
             token) and is never read by reference: name a Secret of your own"
        );
    }
    format!(
        "Secret {namespace}/{name} is not labelled {ALLOW_REFERENCE_LABEL}=true, and in strict mode the operator \
         reads only Secrets labelled for it"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn without_strict_mode_any_secret_may_be_read() {
        assert!(may_read(ReferencePolicy::Any, "team", "ops", None));
    }

    #[test]
    fn in_strict_mode_a_tenant_secret_needs_the_label_set_to_true() {
        let p = ReferencePolicy::Labelled;
        assert!(!may_read(p, "team", "ops", None));
        assert!(!may_read(p, "team", "ops", Some(&labels(&[("app", "x")]))));
        assert!(!may_read(p, "team", "ops", Some(&labels(&[(ALLOW_REFERENCE_LABEL, "True")]))));
        assert!(!may_read(p, "team", "ops", Some(&labels(&[(ALLOW_REFERENCE_LABEL, "yes")]))));
        assert!(may_read(p, "team", "ops", Some(&labels(&[(ALLOW_REFERENCE_LABEL, "true")]))));
    }

    #[test]
    fn a_secret_the_operator_writes_is_never_read_by_reference_in_any_mode_or_namespace() {
        let owned = labels(&[(MANAGED_BY_LABEL, MANAGED_BY_VALUE), (ALLOW_REFERENCE_LABEL, "true")]);
        for policy in [ReferencePolicy::Any, ReferencePolicy::Labelled] {
            assert!(!may_read(policy, "team", "ops", Some(&owned)));
            assert!(!may_read(policy, "ops", "ops", Some(&owned)));
        }
        assert!(not_allowed("team", "victim.mailoauth-grant", Some(&owned)).contains("written by the operator"));
    }

    #[test]
    fn in_strict_mode_the_cluster_resource_namespace_needs_no_label() {
        assert!(may_read(ReferencePolicy::Labelled, "ops", "ops", None));
    }

    #[test]
    fn the_refusal_says_which_secret_and_how_to_allow_it() {
        let m = crate::policy::Reason::SecretReferenceNotAllowed.message(not_allowed("team", "client", None));
        assert!(m.contains("Secret team/client"), "{m}");
        assert!(m.contains("not labelled mailoauth.io/allow-reference=true"), "{m}");
        assert!(m.contains("fix: if this Secret is meant for the operator, label it"), "{m}");
    }
}
