//! The command line: `run` starts the operator, `relay` the mail relay, `crds` prints the CRDs.
//! Every flag of `run` and `relay` has an environment variable, as the Helm chart sets them.

use std::net::SocketAddr;
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};
use futures::FutureExt;
use tracing_subscriber::EnvFilter;

use crate::controller::leader::ElectionSettings;
use crate::controller::{AuthorizationSettings, Contexts, SystemClock};
use crate::error::{Error, Result};
use crate::oauth::HttpTokenEndpoint;
use crate::oauth::http::{HttpClients, OutboundPolicy};
use crate::policy::reference::ReferencePolicy;
use crate::runtime::{Runtime, Settings};

/// mail-oauth-operator: OAuth 2.0 tokens for mailboxes, published into Kubernetes Secrets.
#[derive(Debug, Parser)]
#[command(name = "mail-oauth-operator", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the operator.
    Run(Box<RunArgs>),
    /// Run the mail relay: password-only clients submit mail and read the mailbox (SMTP, IMAP,
    /// POP3); the relay logs in upstream with XOAUTH2.
    Relay(Box<RelayArgs>),
    /// Print the CustomResourceDefinitions as YAML.
    Crds {
        /// Write one file per CRD into this folder instead of printing.
        #[arg(long)]
        output_dir: Option<std::path::PathBuf>,
    },
}

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Flags of `run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Namespaces to watch (comma separated or repeated); empty watches all.
    #[arg(long = "namespace", env = "WATCH_NAMESPACES", value_delimiter = ',')]
    pub namespaces: Vec<String>,
    /// Namespace holding the Secrets of ClusterMailProviders.
    #[arg(long, env = "CLUSTER_RESOURCE_NAMESPACE", default_value = "mail-oauth-operator")]
    pub cluster_resource_namespace: String,
    /// Address for /healthz and /readyz.
    #[arg(long, env = "LISTEN_ADDRESS", default_value = "0.0.0.0:8080")]
    pub listen_address: SocketAddr,
    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Lifetime assumed for a token whose response gives no usable `expires_in` (absent, zero or
    /// negative); a Go duration between 1m and 24h.
    #[arg(long, env = "DEFAULT_TOKEN_LIFETIME", default_value = "1h", value_parser = parse_lifetime)]
    pub default_token_lifetime: chrono::Duration,
    /// Allow token and discovery endpoints on loopback and private addresses (a lab or an
    /// in-cluster identity provider). Link-local and metadata addresses stay refused.
    #[arg(long, env = "ALLOW_PRIVATE_ENDPOINTS")]
    pub allow_private_endpoints: bool,
    /// How long shutdown may spend writing grant states that could not be written before
    /// (keep it below the pod's terminationGracePeriodSeconds).
    #[arg(long, env = "SHUTDOWN_FLUSH_TIMEOUT", default_value = "20s", value_parser = parse_flush)]
    pub shutdown_flush_timeout: std::time::Duration,
    /// Read a Secret referenced from a `MailProvider` or `MailboxBinding` only when it is labelled
    /// `mailoauth.io/allow-reference: "true"` (the chart turns this on). Without it, whoever may
    /// create a `MailProvider` in a namespace can have any Secret of that namespace sent to a URL
    /// of their choice. Secrets of `ClusterMailProvider`s never need the label.
    #[arg(long, env = "STRICT_SECRET_REFERENCES")]
    pub strict_secret_references: bool,
    /// Address of the authorization listener (`/authorize/<namespace>/<name>` and `/callback`
    /// for the authorizationCode grant), separate from /healthz and /readyz; off when not set.
    #[arg(long, env = "CALLBACK_ADDRESS")]
    pub callback_address: Option<SocketAddr>,
    /// The base URL people's browsers use to reach the authorization listener (an Ingress URL,
    /// or http://localhost:8400 behind `kubectl port-forward`); the redirect URI registered at
    /// providers is `<public URL>/callback`.
    #[arg(long, env = "PUBLIC_URL", default_value = "http://localhost:8400", value_parser = parse_public_url)]
    pub public_url: String,
    /// Token requests per second to each provider (all its bindings together); when more are
    /// due, the binding whose token expires first goes first.
    #[arg(long, env = "PROVIDER_TOKEN_RATE", default_value = "10", value_parser = parse_rate)]
    pub provider_token_rate: f64,
    /// Mailbox checks (log in to a mail server and out) running at once, outside the reconciles.
    #[arg(long, env = "VERIFY_CONCURRENCY", default_value = "4", value_parser = clap::value_parser!(u16).range(1..=256))]
    pub verify_concurrency: u16,
    /// Mailbox checks started per second at each mail server (host and port): 10,000 mailboxes
    /// on one server at 1/s are checked within 3 hours of a start, then spread over the interval.
    #[arg(long, env = "VERIFY_SERVER_RATE", default_value = "1", value_parser = parse_rate)]
    pub verify_server_rate: f64,
    /// Requests per second to the Kubernetes API server (client side).
    #[arg(long, env = "API_QPS", default_value = "50", value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub api_qps: u32,
    /// Requests per second to the Kubernetes API server from the authorization listener, on a
    /// client of its own: however many browsers call it, the main client's budget (lease
    /// renewals, reconciles) is untouched.
    #[arg(long, env = "LISTENER_API_QPS", default_value = "5", value_parser = clap::value_parser!(u32).range(1..=1_000))]
    pub listener_api_qps: u32,
    /// Reconciles running at once, per controller.
    #[arg(long, env = "MAX_CONCURRENT_RECONCILES", default_value = "16", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub max_concurrent_reconciles: u16,
    /// Take part in leader election (a Lease in the operator's namespace): only the leading
    /// replica requests tokens and writes; the others keep their caches warm and take over when
    /// its lease runs out (or at once when it shuts down). Needed with more than one replica.
    #[arg(long, env = "LEADER_ELECT")]
    pub leader_elect: bool,
    /// Name of the leader election Lease.
    #[arg(long, env = "LEADER_ELECTION_LEASE", default_value = "mail-oauth-operator")]
    pub leader_election_lease: String,
    /// Namespace of the leader election Lease; the cluster resource namespace when not set.
    #[arg(long, env = "LEADER_ELECTION_NAMESPACE")]
    pub leader_election_namespace: Option<String>,
    /// How long the leader's lease lasts unrenewed: the longest a failover takes when the leader
    /// dies without releasing it. A Go duration between 3s and 5m.
    #[arg(long, env = "LEADER_LEASE_DURATION", default_value = "15s", value_parser = parse_lease)]
    pub leader_lease_duration: std::time::Duration,
    /// The Secret holding the key that signs published Secrets with relay keys for the shared
    /// relay (made on first need when absent; delete it to rotate); empty: nothing is signed (the
    /// shared relay then serves nothing; sidecars need no signature).
    #[arg(long, env = "RELAY_SIGNING_KEY", default_value = crate::policy::relay_signature::DEFAULT_KEY_SECRET)]
    pub relay_signing_key: String,
    /// Namespace of that Secret; the cluster resource namespace when not set.
    #[arg(long, env = "RELAY_SIGNING_NAMESPACE")]
    pub relay_signing_namespace: Option<String>,
}

/// Flags of `relay`: exactly one of `--secret-dir` (a sidecar) and `--shared` (the shared relay).
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("credentials").required(true).args(["secret_dir", "shared"])))]
pub struct RelayArgs {
    /// The published Secret mounted as a volume (a sidecar next to one app).
    #[arg(long, env = "SECRET_DIR")]
    pub secret_dir: Option<std::path::PathBuf>,
    /// The shared relay: serve every binding with relay credentials in the --namespace list (all
    /// namespaces the RBAC allows when empty), reading the published Secrets through the API
    /// (kubeconfig or the in-cluster ServiceAccount).
    #[arg(long)]
    pub shared: bool,
    /// Namespaces the shared relay serves (comma separated; empty: all).
    #[arg(long = "namespace", env = "WATCH_NAMESPACES", value_delimiter = ',')]
    pub namespaces: Vec<String>,
    /// SMTP submission with STARTTLS.
    #[arg(long, env = "SMTP_ADDRESS")]
    pub smtp_address: Option<SocketAddr>,
    /// SMTP submission with implicit TLS.
    #[arg(long, env = "SMTPS_ADDRESS")]
    pub smtps_address: Option<SocketAddr>,
    /// IMAP with STARTTLS (clients log in with the relay credentials; the relay reads the
    /// mailbox upstream with XOAUTH2).
    #[arg(long, env = "IMAP_ADDRESS")]
    pub imap_address: Option<SocketAddr>,
    /// IMAP with implicit TLS.
    #[arg(long, env = "IMAPS_ADDRESS")]
    pub imaps_address: Option<SocketAddr>,
    /// POP3 with STLS.
    #[arg(long, env = "POP3_ADDRESS")]
    pub pop3_address: Option<SocketAddr>,
    /// POP3 with implicit TLS.
    #[arg(long, env = "POP3S_ADDRESS")]
    pub pop3s_address: Option<SocketAddr>,
    /// `tls.crt` and `tls.key` for the listeners (reloaded when they change).
    #[arg(long, env = "TLS_CERT_DIR")]
    pub tls_cert_dir: Option<std::path::PathBuf>,
    /// Accept AUTH without TLS from addresses other than loopback (old devices on a trusted
    /// segment: the password crosses that segment in clear).
    #[arg(long, env = "ALLOW_PLAINTEXT_AUTH")]
    pub allow_plaintext_auth: bool,
    /// Address for /healthz, /readyz and /metrics.
    #[arg(long, env = "LISTEN_ADDRESS", default_value = "0.0.0.0:8080")]
    pub listen_address: SocketAddr,
    /// Allow an upstream mail server on a loopback or private address (a lab).
    #[arg(long, env = "ALLOW_PRIVATE_ENDPOINTS")]
    pub allow_private_endpoints: bool,
    /// PEM certificates trusted for the upstream mail server besides the web roots.
    #[arg(long, env = "UPSTREAM_CA_FILE")]
    pub upstream_ca_file: Option<std::path::PathBuf>,
    /// Client connections at once.
    #[arg(long, env = "RELAY_MAX_CONNECTIONS", default_value = "256", value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_connections: u32,
    /// How long the relay waits for each client line before the login (1s to 10m): a connection
    /// that says nothing is closed after it.
    #[arg(long, env = "RELAY_LOGIN_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_login_idle)]
    pub login_idle_timeout: std::time::Duration,
    /// With --shared: the Secret holding the operator's relay signing key; only published
    /// Secrets signed with it are served.
    #[arg(long, env = "RELAY_SIGNING_KEY", default_value = crate::policy::relay_signature::DEFAULT_KEY_SECRET)]
    pub relay_signing_key: String,
    /// With --shared: namespace of that Secret (the operator's).
    #[arg(long, env = "RELAY_SIGNING_NAMESPACE", default_value = "mail-oauth-operator")]
    pub relay_signing_namespace: String,
    /// The name in the greeting and EHLO.
    #[arg(long, env = "RELAY_NAME", default_value = "mail-oauth-operator-relay")]
    pub name: String,
    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

fn parse_rate(text: &str) -> Result<f64, String> {
    let rate: f64 = text.parse().map_err(|_| "must be a number of requests per second".to_owned())?;
    if !(0.01..=10_000.0).contains(&rate) {
        return Err("must be between 0.01 and 10000 requests per second".into());
    }
    Ok(rate)
}

fn parse_public_url(text: &str) -> Result<String, String> {
    let url = url::Url::parse(text).map_err(|e| e.to_string())?;
    let loopback = matches!(url.host_str(), Some("localhost" | "127.0.0.1" | "[::1]"));
    if url.scheme() != "https" && !(url.scheme() == "http" && loopback) {
        return Err("must be https (http only for localhost)".into());
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("must have no query or fragment".into());
    }
    Ok(text.trim_end_matches('/').to_owned())
}

fn parse_bounded(text: &str, min: chrono::Duration, max: chrono::Duration) -> Result<chrono::Duration, String> {
    let d = crate::policy::duration::parse(text).map_err(|e| e.to_string())?;
    if d < min || d > max {
        return Err(format!("must be between {}s and {}s", min.num_seconds(), max.num_seconds()));
    }
    Ok(d)
}

fn parse_lifetime(text: &str) -> Result<chrono::Duration, String> {
    parse_bounded(text, chrono::Duration::minutes(1), chrono::Duration::hours(24))
}

fn parse_lease(text: &str) -> Result<std::time::Duration, String> {
    parse_bounded(text, chrono::Duration::seconds(3), chrono::Duration::minutes(5))?.to_std().map_err(|e| e.to_string())
}

fn parse_login_idle(text: &str) -> Result<std::time::Duration, String> {
    parse_bounded(text, chrono::Duration::seconds(1), chrono::Duration::minutes(10))?
        .to_std()
        .map_err(|e| e.to_string())
}

fn parse_flush(text: &str) -> Result<std::time::Duration, String> {
    parse_bounded(text, chrono::Duration::zero(), chrono::Duration::minutes(10))?.to_std().map_err(|e| e.to_string())
}

/// Runs a parsed command line.
pub async fn execute(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Crds { output_dir: None } => {
            print!("{}", crate::api::crds::to_yaml().map_err(Error::Crds)?);
            Ok(())
        }
        Command::Crds { output_dir: Some(dir) } => {
            for (name, yaml) in crate::api::crds::files().map_err(Error::Crds)? {
                let path = dir.join(name);
                std::fs::write(&path, yaml)
                    .map_err(|source| Error::WriteFile { path: path.display().to_string(), source })?;
            }
            Ok(())
        }
        Command::Run(args) => run_operator(*args).await,
        Command::Relay(args) => run_relay(*args).await,
    }
}

async fn run_relay(args: RelayArgs) -> Result<()> {
    use crate::relay::metrics::RelayMetrics;
    use crate::relay::source::{Index, Source};
    use crate::relay::{Relay, RelayConfig};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    init_logging(args.log_format);
    let relay_error = |e: &dyn std::fmt::Display| Error::Relay(e.to_string());
    let roots = match &args.upstream_ca_file {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).map_err(|e| Error::Relay(format!("reading {}: {e}", path.display())))?;
            crate::mail::certificates_from_pem(&text).map_err(|e| relay_error(&e))?
        }
        None => Vec::new(),
    };
    let mut mail = crate::mail::Settings::new(OutboundPolicy { allow_private: args.allow_private_endpoints }, &roots)
        .map_err(|e| relay_error(&e))?;
    mail.client_name.clone_from(&args.name);
    let namespaces = watched(args.namespaces);
    let ready = Arc::new(AtomicBool::new(true));
    let (source, watch) = match args.secret_dir {
        Some(_) if !namespaces.is_empty() => {
            return Err(Error::Relay(
                "--namespace is for the shared relay (--shared); a sidecar (--secret-dir) serves its mounted Secret"
                    .into(),
            ));
        }
        Some(dir) => (Source::Mounted(dir), None),
        None => {
            let client = kube::Client::try_default()
                .await
                .map_err(|e| Error::Relay(format!("the shared relay needs the Kubernetes API: {e}")))?;
            let index = Arc::new(Index::default());
            ready.store(false, Ordering::SeqCst);
            let signing = (args.relay_signing_namespace.clone(), args.relay_signing_key.trim().to_owned());
            if signing.1.is_empty() {
                return Err(Error::Relay(
                    "--relay-signing-key is empty: the shared relay serves only Secrets signed with the operator's key"
                        .into(),
                ));
            }
            let watch = crate::relay::watch::run(client, namespaces.clone(), signing, index.clone(), ready.clone());
            tracing::info!(namespaces = ?namespaces, "the shared relay watches the published Secrets");
            (Source::Api(index), Some(watch))
        }
    };
    let metrics = RelayMetrics::default();
    let mut registry = prometheus_client::registry::Registry::default();
    metrics.register(&mut registry);
    if let Source::Api(index) = &source {
        index.register(&mut registry);
    }
    let config = RelayConfig {
        source,
        metrics,
        smtp: args.smtp_address,
        smtps: args.smtps_address,
        imap: args.imap_address,
        imaps: args.imaps_address,
        pop3: args.pop3_address,
        pop3s: args.pop3s_address,
        cert_dir: args.tls_cert_dir,
        allow_plaintext_auth: args.allow_plaintext_auth,
        mail,
        limits: crate::relay::SessionLimits {
            idle_before_auth: args.login_idle_timeout,
            ..crate::relay::SessionLimits::default()
        },
        failures: crate::relay::guard::FailureLimits::default(),
        max_connections: usize::try_from(args.max_connections).unwrap_or(256),
        name: args.name,
    };
    let relay = Relay::bind(config).await.map_err(|e| relay_error(&e))?;
    let shutdown = shutdown_signal().boxed().shared();
    let admin = tokio::spawn(crate::relay::serve_admin(args.listen_address, ready, registry, shutdown.clone()));
    let watch = watch.map(tokio::spawn);
    relay.serve(shutdown).await;
    admin.abort();
    if let Some(watch) = watch {
        watch.abort();
    }
    tracing::info!("stopped");
    Ok(())
}

fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour only for a person at a terminal: a log written to a file or read by a collector
    // carries no ANSI escape codes; NO_COLOR (https://no-color.org) turns it off there too.
    let ansi = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

async fn run_operator(args: RunArgs) -> Result<()> {
    init_logging(args.log_format);
    // A client-side limit on requests to the apiserver (watches count once each); the
    // authorization listener has a client and a limit of its own.
    let config = kube::Config::infer().await.map_err(|e| Error::Connect(kube::Error::InferConfig(e)))?;
    let client = rate_limited_client(config.clone(), args.api_qps)?;
    let listener_client = rate_limited_client(config.clone(), args.listener_api_qps)?;
    // The Lease has a budget of its own (a renewal every few seconds, and its watch).
    let lease_client = rate_limited_client(config, 10)?;
    let shutdown = shutdown_signal().boxed().shared();
    let http = HttpClients::new(OutboundPolicy { allow_private: args.allow_private_endpoints });
    let election = args.leader_elect.then(|| ElectionSettings {
        namespace: args.leader_election_namespace.clone().unwrap_or_else(|| args.cluster_resource_namespace.clone()),
        name: args.leader_election_lease.clone(),
        identity: election_identity(),
        duration: args.leader_lease_duration,
        client: Some(lease_client),
    });
    let relay_signing_key = (!args.relay_signing_key.trim().is_empty()).then(|| {
        let namespace = args.relay_signing_namespace.clone().unwrap_or_else(|| args.cluster_resource_namespace.clone());
        (namespace, args.relay_signing_key.trim().to_owned())
    });
    let settings = Settings {
        namespaces: watched(args.namespaces),
        cluster_namespace: args.cluster_resource_namespace,
        instance: std::env::var("POD_NAME").unwrap_or_else(|_| "mail-oauth-operator".into()),
        default_lifetime: args.default_token_lifetime,
        flush_timeout: args.shutdown_flush_timeout,
        references: if args.strict_secret_references { ReferencePolicy::Labelled } else { ReferencePolicy::Any },
        authorization: AuthorizationSettings {
            redirect_uri: format!("{}/callback", args.public_url),
            link_base: args.callback_address.map(|_| args.public_url.clone()),
        },
        contexts: Contexts::default(),
        metrics: Arc::default(),
        // One namespace may have 4 slow requests in flight, and never more than all the reconcile
        // slots but 4: whatever one tenant's endpoints do, others keep 4 slots.
        limits: Arc::new(
            crate::controller::limits::RateLimits::new(args.provider_token_rate)
                .with_lanes(4, usize::from(args.max_concurrent_reconciles.saturating_sub(4).max(4))),
        ),
        concurrency: args.max_concurrent_reconciles,
        verify: crate::controller::verify::VerifySettings {
            concurrency: usize::from(args.verify_concurrency),
            per_server_rate: args.verify_server_rate,
            ..Default::default()
        },
        relay_signing_key,
    };
    let tokens = Arc::new(HttpTokenEndpoint::new(http.clone()));
    let result = Runtime::new(client, settings, tokens, http, Arc::new(SystemClock), shutdown)
        .admin(args.listen_address)
        .callback(args.callback_address, listener_client)
        .election(election)
        .run()
        .await;
    tracing::info!("stopped");
    result
}

/// A client whose requests to the apiserver are limited to `qps` per second.
fn rate_limited_client(config: kube::Config, qps: u32) -> Result<kube::Client> {
    let per = std::time::Duration::from_secs(1);
    Ok(kube::client::ClientBuilder::try_from(config)
        .map_err(Error::Connect)?
        .with_layer(&tower::limit::RateLimitLayer::new(u64::from(qps), per))
        .build())
}

/// The namespaces to watch, without blanks: the chart renders `WATCH_NAMESPACES=""` for an empty
/// list, and `a,,b` or `a, b` are typing slips, not a namespace named "".
fn watched(namespaces: Vec<String>) -> Vec<String> {
    let mut out: Vec<String> = namespaces.iter().map(|n| n.trim().to_owned()).filter(|n| !n.is_empty()).collect();
    out.dedup();
    out
}

/// This replica's identity in the election: the pod name, else a name unique to this process.
fn election_identity() -> String {
    std::env::var("POD_NAME").unwrap_or_else(|_| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        format!("mail-oauth-operator-{}-{nanos}", std::process::id())
    })
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { () = ctrl_c => {}, () = term => {} }
    tracing::info!("shutdown signal received");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn namespaces_of(args: &[&str]) -> Vec<String> {
        let mut argv = vec!["mail-oauth-operator", "run"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv).map(|c| c.command) {
            Ok(Command::Run(run)) => watched(run.namespaces),
            other => panic!("not a run command: {other:?}"),
        }
    }

    #[test]
    fn an_empty_namespace_list_watches_all_namespaces() {
        assert_eq!(namespaces_of(&["--namespace", ""]), Vec::<String>::new());
        assert_eq!(namespaces_of(&[]), Vec::<String>::new());
    }

    #[test]
    fn blanks_in_a_namespace_list_are_dropped() {
        assert_eq!(namespaces_of(&["--namespace", "a,, b ,"]), vec!["a".to_owned(), "b".to_owned()]);
        assert_eq!(namespaces_of(&["--namespace", "a", "--namespace", "c"]), vec!["a".to_owned(), "c".to_owned()]);
    }

    #[test]
    fn the_relay_takes_either_a_mounted_secret_or_the_shared_mode() {
        let parse = |args: &[&str]| {
            let mut argv = vec!["mail-oauth-operator", "relay", "--smtp-address", "127.0.0.1:2587"];
            argv.extend_from_slice(args);
            Cli::try_parse_from(argv).map(|c| c.command)
        };
        assert!(matches!(parse(&["--secret-dir", "/s"]), Ok(Command::Relay(r)) if r.secret_dir.is_some() && !r.shared));
        assert!(matches!(
            parse(&["--shared", "--namespace", "a,b"]),
            Ok(Command::Relay(r)) if r.shared && watched(r.namespaces.clone()) == ["a", "b"]
        ));
        let both = parse(&["--secret-dir", "/s", "--shared"]).map(|_| ()).unwrap_err().to_string();
        assert!(both.contains("--shared") && both.contains("cannot be used with"), "{both}");
        let neither = parse(&[]).map(|_| ()).unwrap_err().to_string();
        assert!(neither.contains("--secret-dir") && neither.contains("--shared"), "{neither}");
    }
}
