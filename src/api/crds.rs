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
                ("MESSAGE", 1)
            ]
        );
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
