//! `kubectl mailoauth check`: the CRDs installed and served in this plugin's version (and
//! whether their schema is this plugin's), the operator's Deployment and pods running and ready
//! (by the chart's labels), the leader Lease's holder, and the version skew between the plugin
//! and the operator. Exits non-zero when a CRD is missing or no operator runs.

use chrono::{DateTime, Utc};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Api;
use kube::api::ListParams;

use super::authorize::{LEASE_NAME, OPERATOR_LABEL};
use super::view::relative;
use super::{Connection, DEFAULT_OPERATOR_NAMESPACE, PluginError, Result, is_not_found};

/// Flags of `check`.
#[derive(Clone, Debug, clap::Args)]
pub struct CheckArgs {
    /// The operator's namespace.
    #[arg(long, default_value = DEFAULT_OPERATOR_NAMESPACE)]
    pub operator_namespace: String,
}

/// One finding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    /// Good, a warning, or a failure.
    pub level: Level,
    /// What was found.
    pub text: String,
}

/// How bad a finding is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// As it should be.
    Ok,
    /// Works, but worth a look.
    Warning,
    /// Does not work.
    Failure,
}

impl Level {
    fn mark(self) -> &'static str {
        match self {
            Level::Ok => "ok  ",
            Level::Warning => "warn",
            Level::Failure => "FAIL",
        }
    }
}

fn finding(level: Level, text: impl Into<String>) -> Finding {
    Finding { level, text: text.into() }
}

/// What the installed CRD named like `ours` says, against the plugin's own.
pub fn crd_finding(ours: &CustomResourceDefinition, installed: Option<&CustomResourceDefinition>) -> Finding {
    let name = ours.metadata.name.clone().unwrap_or_default();
    let Some(installed) = installed else {
        return finding(
            Level::Failure,
            format!("CRD {name} is not installed: install the chart (or kubectl apply -f crds/)"),
        );
    };
    let served: Vec<&str> = installed.spec.versions.iter().filter(|v| v.served).map(|v| v.name.as_str()).collect();
    let Some(mine) = ours.spec.versions.first() else { return finding(Level::Failure, format!("{name}: no version")) };
    if !served.contains(&mine.name.as_str()) {
        return finding(
            Level::Failure,
            format!(
                "CRD {name} serves {} but this plugin speaks {}: upgrade the chart or use the plugin of its version",
                served.join(", "),
                mine.name
            ),
        );
    }
    let established = installed
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Established" && c.status == "True"));
    if !established {
        return finding(Level::Failure, format!("CRD {name} is installed but not established yet"));
    }
    let theirs = installed.spec.versions.iter().find(|v| v.name == mine.name).and_then(|v| v.schema.as_ref());
    let same = |s: Option<
        &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceValidation,
    >| { s.and_then(|s| serde_json::to_value(&s.open_api_v3_schema).ok()) };
    if same(theirs) != same(mine.schema.as_ref()) {
        return finding(
            Level::Warning,
            format!(
                "CRD {name} serves {} with another schema than this plugin's (another release of the chart: fields \
                 may be missing on one side)",
                mine.name
            ),
        );
    }
    finding(Level::Ok, format!("CRD {name} installed, serves {} (this plugin's schema)", served.join(", ")))
}

/// The version in an image reference (`repo:1.2.3`, `repo:1.2.3@sha256:...`).
pub fn image_tag(image: &str) -> Option<&str> {
    let name = image.split('@').next()?;
    let (_, tag) = name.rsplit_once(':')?;
    (!tag.contains('/')).then_some(tag)
}

/// Whether two versions differ in their major or minor number (`v` prefixes ignored).
pub fn skewed(a: &str, b: &str) -> bool {
    let minor = |v: &str| -> Vec<String> {
        v.trim_start_matches('v').split(['.', '-', '+']).take(2).map(str::to_owned).collect()
    };
    minor(a) != minor(b)
}

/// Whether a Lease is held now: renewed within its duration.
pub fn lease_fresh(lease: &Lease, now: DateTime<Utc>) -> Option<(String, DateTime<Utc>)> {
    let spec = lease.spec.as_ref()?;
    let holder = spec.holder_identity.clone().filter(|h| !h.is_empty())?;
    let renewed = spec.renew_time.as_ref()?.0;
    let renewed =
        DateTime::from_timestamp(renewed.as_second(), u32::try_from(renewed.subsec_nanosecond()).unwrap_or(0))?;
    let duration = i64::from(spec.lease_duration_seconds.unwrap_or(15));
    (now.signed_duration_since(renewed) < chrono::Duration::seconds(duration)).then_some((holder, renewed))
}

/// Runs `check`.
pub async fn run(conn: &Connection, args: &CheckArgs) -> Result<()> {
    let now = Utc::now();
    let mut findings = Vec::new();
    let crds: Api<CustomResourceDefinition> = Api::all(conn.client.clone());
    for ours in crate::api::crds::all() {
        let name = ours.metadata.name.clone().unwrap_or_default();
        match crds.get_opt(&name).await {
            Ok(installed) => findings.push(crd_finding(&ours, installed.as_ref())),
            Err(e) => {
                findings.push(finding(Level::Failure, format!("cannot read CRD {name}: {}", super::describe(&e))))
            }
        }
    }
    let ns = args.operator_namespace.as_str();
    let client = conn.client.clone();
    let mut running = false;
    let mut versions: Vec<String> = Vec::new();
    match Api::<Deployment>::namespaced(client.clone(), ns).list(&ListParams::default().labels(OPERATOR_LABEL)).await {
        Ok(list) if list.items.is_empty() => {
            findings
                .push(finding(Level::Warning, format!("no operator Deployment in namespace {ns} ({OPERATOR_LABEL})")));
        }
        Ok(list) => {
            for d in &list.items {
                let name = d.metadata.name.clone().unwrap_or_default();
                let wanted = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
                let ready = d.status.as_ref().and_then(|s| s.ready_replicas).unwrap_or(0);
                let image = d
                    .spec
                    .as_ref()
                    .and_then(|s| s.template.spec.as_ref())
                    .and_then(|p| p.containers.first())
                    .and_then(|c| c.image.clone())
                    .unwrap_or_default();
                if let Some(tag) = image_tag(&image) {
                    versions.push(tag.to_owned());
                }
                let level = if ready > 0 { Level::Ok } else { Level::Warning };
                running |= ready > 0;
                findings.push(finding(level, format!("Deployment {ns}/{name}: {ready}/{wanted} ready, image {image}")));
            }
        }
        Err(e) => findings.push(finding(
            Level::Warning,
            format!("cannot list Deployments in namespace {ns}: {}", super::describe(&e)),
        )),
    }
    match Api::<Pod>::namespaced(client.clone(), ns).list(&ListParams::default().labels(OPERATOR_LABEL)).await {
        Ok(list) => {
            for p in &list.items {
                let name = p.metadata.name.clone().unwrap_or_default();
                let status = p.status.as_ref();
                let phase = status.and_then(|s| s.phase.clone()).unwrap_or_else(|| "Unknown".into());
                let ready = status
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
                let restarts: i32 = status
                    .and_then(|s| s.container_statuses.as_ref())
                    .map(|c| c.iter().map(|c| c.restart_count).sum())
                    .unwrap_or(0);
                running |= ready;
                findings.push(finding(
                    if ready { Level::Ok } else { Level::Warning },
                    format!(
                        "pod {ns}/{name}: {phase}, {}, {restarts} restarts",
                        if ready { "ready" } else { "not ready" }
                    ),
                ));
            }
        }
        Err(e) => findings
            .push(finding(Level::Warning, format!("cannot list pods in namespace {ns}: {}", super::describe(&e)))),
    }
    match Api::<Lease>::namespaced(client, ns).get_opt(LEASE_NAME).await {
        Ok(Some(lease)) => match lease_fresh(&lease, now) {
            Some((holder, renewed)) => {
                running = true;
                findings.push(finding(
                    Level::Ok,
                    format!("leader: {holder} (Lease {ns}/{LEASE_NAME} renewed {})", relative(renewed, now)),
                ));
            }
            None => {
                findings.push(finding(Level::Warning, format!("Lease {ns}/{LEASE_NAME} is not held: no leader now")))
            }
        },
        Ok(None) => findings.push(finding(
            Level::Ok,
            format!("no leader election Lease {ns}/{LEASE_NAME} (one replica without --leader-elect)"),
        )),
        Err(e) if is_not_found(&e) => {}
        Err(e) => findings
            .push(finding(Level::Warning, format!("cannot read Lease {ns}/{LEASE_NAME}: {}", super::describe(&e)))),
    }
    if !running {
        findings.push(finding(
            Level::Failure,
            format!(
                "no operator is running in namespace {ns}: no ready pod and no held Lease (installed elsewhere? \
                 --operator-namespace)"
            ),
        ));
    }
    let mine = env!("CARGO_PKG_VERSION");
    versions.sort();
    versions.dedup();
    for v in &versions {
        if skewed(mine, v) {
            findings.push(finding(
                Level::Warning,
                format!("version skew: plugin {mine}, operator {v}: use the plugin of the operator's version"),
            ));
        } else {
            findings.push(finding(Level::Ok, format!("versions: plugin {mine}, operator {v}")));
        }
    }
    for f in &findings {
        println!("{} {}", f.level.mark(), f.text);
    }
    let failures = findings.iter().filter(|f| f.level == Level::Failure).count();
    if failures > 0 {
        return Err(PluginError::Failed(format!("{failures} problem(s) found")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;

    #[test]
    fn versions_and_image_tags() {
        assert_eq!(image_tag("ghcr.io/x/mail-oauth-operator:0.1.0"), Some("0.1.0"));
        assert_eq!(image_tag("registry:5000/x/op:1.2.3@sha256:abc"), Some("1.2.3"));
        assert_eq!(image_tag("registry:5000/x/op"), None);
        assert!(!skewed("0.1.0", "v0.1.7") && skewed("0.1.0", "0.2.0") && skewed("1.0.0", "2.0.0"));
    }

    #[test]
    fn a_lease_is_held_while_renewed_within_its_duration() {
        let now = Utc::now();
        let lease = |renewed: DateTime<Utc>| Lease {
            spec: Some(LeaseSpec {
                holder_identity: Some("pod-a".into()),
                renew_time: Some(MicroTime(k8s_openapi::jiff::Timestamp::from_second(renewed.timestamp()).unwrap())),
                lease_duration_seconds: Some(15),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(lease_fresh(&lease(now), now).map(|(h, _)| h).as_deref(), Some("pod-a"));
        assert_eq!(lease_fresh(&lease(now - chrono::Duration::seconds(20)), now), None);
    }

    #[test]
    fn the_crds_are_compared_with_the_plugins_own() {
        let ours = crate::api::crds::all().remove(2);
        let missing = crd_finding(&ours, None);
        assert_eq!(missing.level, Level::Failure);
        assert!(missing.text.contains("mailboxbindings.mailoauth.io is not installed"), "{}", missing.text);
        let mut installed = ours.clone();
        installed.status = Some(
            serde_json::from_value(serde_json::json!({
                "conditions": [{"type": "Established", "status": "True"}]
            }))
            .unwrap(),
        );
        assert_eq!(crd_finding(&ours, Some(&installed)).level, Level::Ok);
        let mut other = installed.clone();
        other.spec.versions[0].name = "v1beta1".into();
        let f = crd_finding(&ours, Some(&other));
        assert!(
            f.level == Level::Failure && f.text.contains("serves v1beta1 but this plugin speaks v1alpha1"),
            "{}",
            f.text
        );
        let mut changed = installed.clone();
        changed.spec.versions[0].schema = None;
        assert_eq!(crd_finding(&ours, Some(&changed)).level, Level::Warning);
    }
}
