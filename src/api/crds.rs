//! The CustomResourceDefinitions generated from the types, as `mail-oauth-operator crds` prints them.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

use super::{ClusterMailProvider, MailProvider, MailboxBinding};

/// Every CRD of the API, in a stable order.
pub fn all() -> Vec<CustomResourceDefinition> {
    vec![MailProvider::crd(), ClusterMailProvider::crd(), MailboxBinding::crd()]
}

/// The CRDs as one multi-document YAML stream.
pub fn to_yaml() -> Result<String, serde_yaml::Error> {
    let mut out = String::new();
    for crd in all() {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd)?);
    }
    Ok(out)
}

/// One `(file name, YAML)` per CRD, named `<plural>.<group>.yaml`.
pub fn files() -> Result<Vec<(String, String)>, serde_yaml::Error> {
    all()
        .into_iter()
        .map(|crd| {
            let name = format!("{}.yaml", crd.metadata.name.clone().unwrap_or_default());
            serde_yaml::to_string(&crd).map(|y| (name, y))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_crds_carry_names_categories_printer_columns_and_a_status_subresource() {
        let crds = all();
        let names: Vec<_> = crds.iter().map(|c| c.spec.names.short_names.clone().unwrap_or_default()).collect();
        assert_eq!(names, [vec!["mprov".to_owned()], vec!["cmprov".to_owned()], vec!["mbx".to_owned()]]);
        for crd in &crds {
            assert_eq!(crd.spec.names.categories, Some(vec!["mailoauth".to_owned()]));
            let version = &crd.spec.versions[0];
            assert!(version.subresources.as_ref().and_then(|s| s.status.as_ref()).is_some());
        }
        assert_eq!(crds[1].spec.scope, "Cluster");
        let columns: Vec<_> = crds[2].spec.versions[0]
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| (c.name.as_str(), c.priority.unwrap_or(0)))
            .collect();
        assert_eq!(
            columns,
            [
                ("READY", 0),
                ("MAILBOX", 0),
                ("PROVIDER", 0),
                ("STATUS", 0),
                ("EXPIRES", 0),
                ("AGE", 0),
                ("RENEW", 1),
                ("SECRET", 1),
                ("IDENTITY", 1),
                ("VERIFIED", 1),
                ("IMAP", 1),
                ("SMTP", 1),
                ("POP3", 1),
                ("MESSAGE", 1)
            ]
        );
    }

    /// The `spec` schema of each CRD, in [`all`]'s order.
    fn specs() -> Vec<serde_json::Value> {
        all()
            .into_iter()
            .map(|crd| {
                let v = serde_json::to_value(&crd.spec.versions[0].schema).unwrap_or_default();
                v["openAPIV3Schema"]["properties"]["spec"].clone()
            })
            .collect()
    }

    #[test]
    fn every_list_map_and_free_string_of_a_spec_is_bounded() {
        // Walks a schema: every string has a maxLength (or an enum), every array a maxItems,
        // every map (additionalProperties) a maxProperties.
        fn walk(path: &str, s: &serde_json::Value, unbounded: &mut Vec<String>) {
            match s["type"].as_str() {
                Some("string") if s["maxLength"].is_null() && s["enum"].is_null() => unbounded.push(path.to_owned()),
                Some("array") if s["maxItems"].is_null() => unbounded.push(path.to_owned()),
                Some("object") if s["additionalProperties"].is_object() && s["maxProperties"].is_null() => {
                    unbounded.push(path.to_owned())
                }
                _ => {}
            }
            for (name, p) in s["properties"].as_object().into_iter().flatten() {
                walk(&format!("{path}.{name}"), p, unbounded);
            }
            walk_children(path, s, unbounded);
        }
        fn walk_children(path: &str, s: &serde_json::Value, unbounded: &mut Vec<String>) {
            if s["items"].is_object() {
                walk(&format!("{path}[]"), &s["items"], unbounded);
            }
            if s["additionalProperties"].is_object() {
                walk(&format!("{path}{{}}"), &s["additionalProperties"], unbounded);
            }
            for branch in ["oneOf", "anyOf", "allOf"] {
                for b in s[branch].as_array().into_iter().flatten() {
                    walk(path, b, unbounded);
                }
            }
        }
        for (spec, kind) in specs().iter().zip(["MailProvider", "ClusterMailProvider", "MailboxBinding"]) {
            let mut unbounded = Vec::new();
            walk("spec", spec, &mut unbounded);
            assert!(unbounded.is_empty(), "{kind}: unbounded {unbounded:?}");
        }
    }

    #[test]
    fn template_values_refs_and_lists_carry_their_bounds_and_refuse_duplicates() {
        let specs = specs();
        let (provider, cluster, binding) = (&specs[0], &specs[1], &specs[2]);
        let template = &binding["properties"]["secretTemplate"]["properties"];
        assert_eq!(template["labels"]["maxProperties"], 64);
        assert_eq!(template["labels"]["additionalProperties"]["maxLength"], 63);
        assert!(template["labels"]["additionalProperties"]["pattern"].is_string());
        assert_eq!(template["annotations"]["maxProperties"], 64);
        assert_eq!(template["annotations"]["additionalProperties"]["maxLength"], 4096);
        assert_eq!(template["data"]["maxProperties"], 16);
        assert_eq!(template["data"]["additionalProperties"]["maxLength"], 16384);

        let refs = &provider["properties"]["clientAuthentication"]["properties"]["clientSecretRefs"];
        assert_eq!(refs["maxItems"], 8);
        assert_eq!(refs["x-kubernetes-list-type"], "map");
        assert_eq!(refs["x-kubernetes-list-map-keys"], serde_json::json!(["name", "key"]));
        // A list-map key must be required or defaulted (the apiserver refuses the CRD otherwise).
        assert_eq!(refs["items"]["required"], serde_json::json!(["name"]));
        assert_eq!(refs["items"]["properties"]["key"]["default"], "client-secret");
        let cluster_refs = &cluster["properties"]["clientAuthentication"]["properties"]["clientSecretRefs"];
        assert_eq!(cluster_refs, refs);

        let set = |v: &serde_json::Value, max: u64| {
            assert_eq!(v["x-kubernetes-list-type"], "set", "{v}");
            assert_eq!(v["maxItems"], max, "{v}");
        };
        let b = &binding["properties"];
        set(&b["identityAliases"], 16);
        set(&b["scopes"], 64);
        set(&b["protocols"], 3);
        let c = &cluster["properties"];
        set(&c["allowedScopes"], 64);
        set(&c["allowedMailboxes"], 256);
        set(&c["allowedNamespaces"]["properties"]["names"], 1024);
        let selector = &c["allowedNamespaces"]["properties"]["selector"]["properties"];
        assert_eq!(selector["matchLabels"]["maxProperties"], 64);
        assert_eq!(selector["matchExpressions"]["maxItems"], 64);
        set(&selector["matchExpressions"]["items"]["properties"]["values"], 256);
        assert_eq!(c["allowUncheckedIdentity"]["default"], false);
        assert_eq!(c["allowIdentityAliases"]["default"], false);
        assert_eq!(b["identity"]["enum"], serde_json::json!(["verified", "unchecked"]));
        assert_eq!(b["identity"]["default"], "verified");
    }

    #[test]
    fn the_identity_field_reads_as_verified_when_absent() {
        let spec: crate::api::MailboxBindingSpec = serde_json::from_value(serde_json::json!({
            "providerRef": {"name": "p"}, "mailbox": "a@example.com", "secretName": "s",
            "grant": {"clientCredentials": {}},
        }))
        .unwrap();
        assert_eq!(spec.identity, crate::api::IdentityCheck::Verified);
        let unchecked: crate::api::IdentityCheck = serde_json::from_value(serde_json::json!("unchecked")).unwrap();
        assert_eq!(unchecked, crate::api::IdentityCheck::Unchecked);
        assert!(serde_json::from_value::<crate::api::IdentityCheck>(serde_json::json!("Unchecked")).is_err());
        let cluster: crate::api::ClusterMailProviderSpec =
            serde_json::from_value(serde_json::json!({"google": {}, "clientId": "c"})).unwrap();
        assert!(!cluster.allow_unchecked_identity && !cluster.allow_identity_aliases);
    }

    #[test]
    fn exactly_one_preset_and_one_grant_are_required_by_the_schema() {
        let yaml = to_yaml().unwrap_or_default();
        let docs: Vec<serde_json::Value> = yaml
            .split("---\n")
            .filter(|d| !d.trim().is_empty())
            .map(|d| serde_yaml::from_str(d).unwrap_or_default())
            .collect();
        let spec = |i: usize| docs[i]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"].clone();
        let one_of = |v: &serde_json::Value| v["oneOf"].as_array().map(Vec::len).unwrap_or(0);
        assert_eq!(one_of(&spec(0)), 3, "google | microsoft | generic");
        assert_eq!(one_of(&spec(1)), 3);
        assert_eq!(one_of(&spec(2)["properties"]["grant"]), 5);
        assert!(!yaml.contains("x-kubernetes-validations"), "CEL is refused by Kubernetes 1.20");
    }
}
