//! The Secrets the operator writes for a binding, as server-side-apply bodies, and whether an
//! existing Secret already says what they say (so that no write is made when nothing changed).

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Resource, ResourceExt};

use crate::api::{BINDING_LABEL, MANAGED_BY_LABEL, MANAGED_BY_VALUE, MailboxBinding, SECRET_ROLE_LABEL};
use crate::policy::validate::{GRANT_SECRET_SUFFIX, MAX_LABEL};

pub use crate::api::OWNED_KEYS_ANNOTATION;

/// Longest Secret name.
const MAX_NAME: usize = 253;

/// Name of a binding's grant-state Secret: `<binding>.mailoauth-grant` (shortened with a hash
/// when the binding's name is very long).
pub fn grant_secret_name(binding: &str) -> String {
    const SUFFIX: &str = GRANT_SECRET_SUFFIX;
    if binding.len().saturating_add(SUFFIX.len()) <= MAX_NAME {
        return format!("{binding}{SUFFIX}");
    }
    let keep = MAX_NAME.saturating_sub(SUFFIX.len()).saturating_sub(17);
    format!("{}-{}{SUFFIX}", shortened(binding, keep), hash(binding))
}

/// The `mailoauth.io/binding` label value for a binding: its name when that fits a label value
/// (63 characters), else a prefix and a hash of the whole name.
pub fn binding_label(binding: &str) -> String {
    if binding.len() <= MAX_LABEL {
        return binding.to_owned();
    }
    format!("{}-{}", shortened(binding, MAX_LABEL.saturating_sub(17)), hash(binding))
}

/// At most `max` characters of a name, without a trailing `-` or `.`.
fn shortened(name: &str, max: usize) -> String {
    let head: String = name.chars().take(max).collect();
    head.trim_end_matches(['-', '.']).to_owned()
}

fn hash(name: &str) -> String {
    format!("{:016x}", crate::policy::schedule::seed(name))
}

/// Which of the binding's Secrets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The Secret workloads mount.
    Published,
    /// The grant state.
    Grant,
}

impl Role {
    fn label(self) -> &'static str {
        match self {
            Role::Published => "published",
            Role::Grant => "grant",
        }
    }
}

/// The Secret the operator applies.
pub fn desired(binding: &MailboxBinding, name: &str, role: Role, data: BTreeMap<String, String>) -> Secret {
    let mut labels = BTreeMap::from([
        (MANAGED_BY_LABEL.to_owned(), MANAGED_BY_VALUE.to_owned()),
        (BINDING_LABEL.to_owned(), binding_label(&binding.name_any())),
        (SECRET_ROLE_LABEL.to_owned(), role.label().to_owned()),
    ]);
    let mut annotations = BTreeMap::new();
    if role == Role::Published {
        if let Some(t) = &binding.spec.secret_template {
            for (k, v) in &t.labels {
                labels.entry(k.clone()).or_insert_with(|| v.clone());
            }
            annotations.extend(t.annotations.clone());
        }
        annotations.insert(OWNED_KEYS_ANNOTATION.to_owned(), data.keys().cloned().collect::<Vec<_>>().join(","));
    }
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: binding.namespace(),
            labels: Some(labels),
            annotations: (!annotations.is_empty()).then_some(annotations),
            owner_references: binding.controller_owner_ref(&()).map(|o| vec![o]),
            ..Default::default()
        },
        type_: Some("Opaque".to_owned()),
        data: Some(data.into_iter().map(|(k, v)| (k, ByteString(v.into_bytes()))).collect()),
        ..Default::default()
    }
}

/// Whether `actual` already holds everything `desired` says (other owners' keys are ignored).
pub fn up_to_date(actual: &Secret, desired: &Secret) -> bool {
    let subset = |want: &Option<BTreeMap<String, String>>, have: &Option<BTreeMap<String, String>>| {
        want.iter().flatten().all(|(k, v)| have.as_ref().and_then(|h| h.get(k)) == Some(v))
    };
    let data_ok = desired.data.iter().flatten().all(|(k, v)| actual.data.as_ref().and_then(|d| d.get(k)) == Some(v));
    let owner_ok = desired.metadata.owner_references.iter().flatten().all(|want| {
        actual.metadata.owner_references.iter().flatten().any(|o| o.uid == want.uid && o.controller == want.controller)
    });
    data_ok
        && owner_ok
        && subset(&desired.metadata.labels, &actual.metadata.labels)
        && subset(&desired.metadata.annotations, &actual.metadata.annotations)
        && actual.type_ == desired.type_
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::validate::is_label_value;

    #[test]
    fn grant_secret_names_are_valid_for_any_binding_name() {
        assert_eq!(grant_secret_name("helpdesk"), "helpdesk.mailoauth-grant");
        let long = "a".repeat(253);
        let name = grant_secret_name(&long);
        assert!(name.len() <= 253, "{}", name.len());
        assert!(name.ends_with(".mailoauth-grant"));
        assert_ne!(grant_secret_name(&long), grant_secret_name(&"a".repeat(252)));
        let dotted = format!("{}.b", "a-".repeat(126));
        assert!(
            crate::policy::validate::is_dns_subdomain(&grant_secret_name(&dotted)),
            "{}",
            grant_secret_name(&dotted)
        );
    }

    #[test]
    fn binding_labels_fit_a_label_value_for_any_binding_name() {
        assert_eq!(binding_label("helpdesk"), "helpdesk");
        for name in ["a".repeat(64), "a-".repeat(100) + "b", format!("{}.x", "b.".repeat(100)), "c".repeat(253)] {
            let label = binding_label(&name);
            assert!(is_label_value(&label), "{label}");
            assert_ne!(label, binding_label(&format!("{name}z")), "distinct names get distinct labels");
        }
    }
}
