//! `kubectl mailoauth`: a kubectl plugin, in the style of cert-manager's cmctl, over the same
//! API types as the operator. `status` shows every binding with its expiry, verification and
//! the fix for a failing reason; `authorize` takes a person through a device code or an
//! authorization code (through a port-forward to the operator's listener of its own); `refresh`,
//! `reauthorize`, `verify` and `rotate-relay-password` set their annotation and wait until the
//! operator has acted on it; `inspect` shows a published Secret's keys (values only when asked);
//! `check` says whether the CRDs and the operator are there and of this version.
//!
//! The binary is `src/bin/kubectl-mailoauth.rs`; kubectl finds it on the `PATH` as a plugin.
//! Connection flags follow kubectl's: `--kubeconfig` (else `KUBECONFIG`, else
//! `~/.kube/config`, else the in-cluster configuration), `--context`, `-n`/`--namespace`.

pub mod authorize;
pub mod check;
pub mod inspect;
pub mod request;
pub mod status;
pub mod view;
pub mod wait;

use std::path::PathBuf;

use clap::{ArgAction, Parser, Subcommand, ValueEnum};
use kube::config::{KubeConfigOptions, Kubeconfig};

/// The operator's namespace when the chart is installed as the README says.
pub const DEFAULT_OPERATOR_NAMESPACE: &str = "mail-oauth-operator";

/// `kubectl mailoauth`: see and act on mailbox bindings of mail-oauth-operator.
#[derive(Debug, Parser)]
#[command(name = "kubectl-mailoauth", bin_name = "kubectl mailoauth", version, about)]
pub struct PluginCli {
    /// How to reach the cluster.
    #[command(flatten)]
    pub kube: KubeFlags,
    /// What to do.
    #[command(subcommand)]
    pub command: PluginCommand,
}

/// kubectl's connection flags.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct KubeFlags {
    /// Path to the kubeconfig file (default: $KUBECONFIG, then ~/.kube/config).
    #[arg(long, global = true, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use (default: the current context).
    #[arg(long, global = true)]
    pub context: Option<String>,
    /// The namespace of the bindings (default: the context's namespace, else `default`).
    #[arg(short = 'n', long, global = true)]
    pub namespace: Option<String>,
}

/// The plugin's commands.
#[derive(Debug, Subcommand)]
pub enum PluginCommand {
    /// All bindings in one table: expiry, verification, and the fix for each failing reason.
    Status(status::StatusArgs),
    /// A binding's published Secret: its keys and sizes, its expiry, whether a grant state
    /// exists. Values only with --show-values.
    Inspect(inspect::InspectArgs),
    /// Take a binding to Ready through its interactive grant: shows the device code and waits,
    /// or opens the operator's authorize link (through a port-forward of its own) and waits.
    Authorize(authorize::AuthorizeArgs),
    /// Ask for a new token now (mailoauth.io/refresh-requested) and wait until it is handled.
    Refresh(request::RequestArgs),
    /// Drop the grant and start it again (mailoauth.io/reauthorize-requested).
    Reauthorize(request::RequestArgs),
    /// Check the mailbox now (mailoauth.io/verify-requested) and show each protocol's result.
    Verify(request::RequestArgs),
    /// Ask for a new relay password (mailoauth.io/rotate-relay-password).
    RotateRelayPassword(request::RequestArgs),
    /// Whether the CRDs are installed and served, the operator is running, and their versions
    /// fit this plugin's.
    Check(check::CheckArgs),
    /// The plugin's version and the API version it speaks.
    Version,
}

/// How `status` and `inspect` print.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned columns.
    #[default]
    Table,
    /// Aligned columns with more of them.
    Wide,
    /// JSON.
    Json,
    /// YAML.
    Yaml,
}

/// `--wait` and `--timeout`, shared by the commands that wait for the operator.
#[derive(Clone, Debug, clap::Args)]
pub struct WaitFlags {
    /// Wait until the operator has acted (`--wait=false` returns once the request is set).
    #[arg(long, default_value_t = true, num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set)]
    pub wait: bool,
    /// How long to wait (a Go duration: 90s, 2m, 1h).
    #[arg(long, default_value = "2m", value_parser = parse_timeout)]
    pub timeout: std::time::Duration,
}

/// A wait's bound: a Go duration from 1s to 24h.
pub fn parse_timeout(text: &str) -> Result<std::time::Duration, String> {
    let d = crate::policy::duration::parse(text).map_err(|e| e.to_string())?;
    if d < chrono::Duration::seconds(1) || d > chrono::Duration::hours(24) {
        return Err("must be between 1s and 24h".into());
    }
    d.to_std().map_err(|e| e.to_string())
}

/// Why a command did not do what was asked; the binary prints it and exits non-zero.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// The cluster could not be reached or the kubeconfig not read.
    #[error("cannot connect to the cluster: {0}")]
    Connect(String),
    /// An apiserver request failed; `what` names it.
    #[error("{what}: {message}")]
    Api {
        /// What was asked.
        what: String,
        /// What the apiserver (or the connection) said.
        message: String,
    },
    /// What was asked cannot be done as things are; the text says why and what to do.
    #[error("{0}")]
    Refused(String),
    /// The operator acted, and the outcome is a failure; the text says which and the fix.
    #[error("{0}")]
    Failed(String),
    /// The wait ran out.
    #[error("timed out after {after}: {what}")]
    Timeout {
        /// How long it waited.
        after: String,
        /// What it waited for and what it last saw.
        what: String,
    },
    /// Writing the output failed.
    #[error("cannot write the output: {0}")]
    Output(String),
}

/// The plugin's result.
pub type Result<T, E = PluginError> = std::result::Result<T, E>;

impl PluginError {
    /// An apiserver error, said the way kubectl says it (`not found`, `forbidden`).
    pub fn api(what: impl Into<String>, e: &kube::Error) -> Self {
        PluginError::Api { what: what.into(), message: describe(e) }
    }
}

/// A kube error in one line: the apiserver's own message for a status error.
pub fn describe(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => {
            let reason = s.reason.as_str();
            match s.code {
                404 => format!("not found ({})", s.message),
                403 => format!("forbidden ({})", s.message),
                401 => "unauthorized: the kubeconfig's credentials were refused".to_owned(),
                _ if reason.is_empty() => s.message.clone(),
                _ => format!("{reason}: {}", s.message),
            }
        }
        other => {
            // The causes too: "client error (Connect)" alone does not say that the connection
            // was refused, or that the certificate was not trusted.
            let mut text = other.to_string();
            let mut source = std::error::Error::source(other);
            while let Some(cause) = source {
                let said = cause.to_string();
                if !text.contains(&said) {
                    text.push_str(": ");
                    text.push_str(&said);
                }
                source = cause.source();
            }
            text
        }
    }
}

/// Whether a kube error is the apiserver's 404.
pub fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

/// A client and the namespace the flags (or the kubeconfig context) name.
pub struct Connection {
    /// The client.
    pub client: kube::Client,
    /// `-n`, else the context's namespace, else `default`.
    pub namespace: String,
}

/// Connects as kubectl would with these flags.
pub async fn connect(flags: &KubeFlags) -> Result<Connection> {
    let options = KubeConfigOptions { context: flags.context.clone(), cluster: None, user: None };
    let connect_error = |e: &dyn std::fmt::Display| PluginError::Connect(e.to_string());
    let mut config = match (&flags.kubeconfig, &flags.context) {
        (Some(path), _) => {
            let kubeconfig = Kubeconfig::read_from(path)
                .map_err(|e| PluginError::Connect(format!("reading {}: {e}", path.display())))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &options).await.map_err(|e| connect_error(&e))?
        }
        (None, Some(_)) => kube::Config::from_kubeconfig(&options).await.map_err(|e| connect_error(&e))?,
        (None, None) => kube::Config::infer().await.map_err(|e| connect_error(&e))?,
    };
    // A person waits for each request: no request hangs for the default five minutes.
    config.read_timeout = Some(std::time::Duration::from_secs(30));
    let namespace = flags.namespace.clone().unwrap_or_else(|| config.default_namespace.clone());
    let client = kube::Client::try_from(config).map_err(|e| connect_error(&e))?;
    Ok(Connection { client, namespace })
}

/// The plugin's version line.
pub fn version_line() -> String {
    format!("kubectl-mailoauth {} (API {}/v1alpha1)", env!("CARGO_PKG_VERSION"), crate::api::GROUP)
}

/// Runs a parsed command line; what it prints goes to `out` (stdout), progress to stderr.
pub async fn execute(cli: PluginCli) -> Result<()> {
    if matches!(cli.command, PluginCommand::Version) {
        println!("{}", version_line());
        return Ok(());
    }
    let conn = connect(&cli.kube).await?;
    match cli.command {
        PluginCommand::Status(args) => status::run(&conn, &args).await,
        PluginCommand::Inspect(args) => inspect::run(&conn, &args).await,
        PluginCommand::Authorize(args) => authorize::run(&conn, &args).await,
        PluginCommand::Refresh(args) => request::run(&conn, request::Request::Refresh, &args).await,
        PluginCommand::Reauthorize(args) => request::run(&conn, request::Request::Reauthorize, &args).await,
        PluginCommand::Verify(args) => request::run(&conn, request::Request::Verify, &args).await,
        PluginCommand::RotateRelayPassword(args) => {
            request::run(&conn, request::Request::RotateRelayPassword, &args).await
        }
        PluginCommand::Check(args) => check::run(&conn, &args).await,
        PluginCommand::Version => Ok(()),
    }
}

/// Prints `value` as JSON or YAML.
pub fn print_structured<T: serde::Serialize>(value: &T, output: Output) -> Result<()> {
    let text = match output {
        Output::Yaml => serde_yaml::to_string(value).map_err(|e| PluginError::Output(e.to_string()))?,
        _ => {
            let mut text = serde_json::to_string_pretty(value).map_err(|e| PluginError::Output(e.to_string()))?;
            text.push('\n');
            text
        }
    };
    print!("{text}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> PluginCli {
        let mut argv = vec!["kubectl-mailoauth"];
        argv.extend_from_slice(args);
        PluginCli::try_parse_from(argv).unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    #[test]
    fn kubectls_flags_go_anywhere_on_the_line() {
        let cli = parse(&["status", "-A", "-o", "json", "--context", "prod", "--kubeconfig", "/k"]);
        assert_eq!(cli.kube.context.as_deref(), Some("prod"));
        assert_eq!(cli.kube.kubeconfig, Some(PathBuf::from("/k")));
        match cli.command {
            PluginCommand::Status(s) => assert!(s.all_namespaces && s.output == Output::Json),
            other => panic!("{other:?}"),
        }
        let cli = parse(&["-n", "mail", "refresh", "scanner", "--wait=false"]);
        assert_eq!(cli.kube.namespace.as_deref(), Some("mail"));
        match cli.command {
            PluginCommand::Refresh(r) => {
                assert_eq!(r.name, "scanner");
                assert!(!r.wait.wait);
                assert_eq!(r.wait.timeout, std::time::Duration::from_secs(120));
            }
            other => panic!("{other:?}"),
        }
        match parse(&["verify", "scanner", "--wait", "--timeout", "90s"]).command {
            PluginCommand::Verify(r) => assert!(r.wait.wait && r.wait.timeout.as_secs() == 90),
            other => panic!("{other:?}"),
        }
        assert!(matches!(parse(&["rotate-relay-password", "x"]).command, PluginCommand::RotateRelayPassword(_)));
    }

    #[test]
    fn bad_flags_are_refused_with_a_reason() {
        for args in [
            &["status", "-o", "xml"][..],
            &["refresh"],
            &["refresh", "x", "--timeout", "0s"],
            &["refresh", "x", "--timeout", "48h"],
            &["authorize", "x", "--callback-url", "ftp://x"],
            &["inspect"],
        ] {
            let mut argv = vec!["kubectl-mailoauth"];
            argv.extend_from_slice(args);
            assert!(PluginCli::try_parse_from(argv).is_err(), "{args:?}");
        }
    }

    #[test]
    fn the_krew_manifest_names_this_version_and_the_binary() {
        let text = include_str!("../../scripts/krew/mailoauth.yaml");
        let doc: serde_yaml::Value = serde_yaml::from_str(text).unwrap();
        assert_eq!(doc["kind"], "Plugin");
        assert_eq!(doc["metadata"]["name"], "mailoauth", "kubectl mailoauth");
        let version = format!("v{}", env!("CARGO_PKG_VERSION"));
        assert_eq!(doc["spec"]["version"].as_str(), Some(version.as_str()));
        let platforms = doc["spec"]["platforms"].as_sequence().unwrap();
        assert!(!platforms.is_empty());
        for p in platforms {
            assert_eq!(p["bin"], "kubectl-mailoauth");
            let uri = p["uri"].as_str().unwrap();
            assert!(uri.contains(&format!("/download/{version}/kubectl-mailoauth-")), "{uri}");
            assert_eq!(p["sha256"].as_str().map(str::len), Some(64));
        }
    }

    #[test]
    fn apiserver_errors_read_as_kubectl_says_them() {
        let status = |code: u16, reason: &str| {
            kube::Error::Api(
                kube::core::Status::failure(&format!("mailboxbindings.mailoauth.io \"x\" {reason}"), reason)
                    .with_code(code)
                    .boxed(),
            )
        };
        assert_eq!(describe(&status(404, "NotFound")), "not found (mailboxbindings.mailoauth.io \"x\" NotFound)");
        assert!(describe(&status(403, "Forbidden")).starts_with("forbidden ("));
        assert!(is_not_found(&status(404, "NotFound")) && !is_not_found(&status(403, "Forbidden")));
        #[derive(Debug, thiserror::Error)]
        #[error("client error (Connect)")]
        struct Outer(#[source] std::io::Error);
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "Connection refused (os error 111)");
        let e = kube::Error::Service(Box::new(Outer(refused)));
        assert_eq!(describe(&e), "ServiceError: client error (Connect): Connection refused (os error 111)");
    }
}
