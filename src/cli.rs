//! The command line: `run` starts the operator, `crds` prints the CRDs. Every flag of `run` has an
//! environment variable, as the Helm chart sets them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use clap::{Parser, Subcommand, ValueEnum};
use futures::FutureExt;
use tracing_subscriber::EnvFilter;

use crate::controller::SystemClock;
use crate::controller::run::{Settings, run};
use crate::error::{Error, Result};
use crate::oauth::HttpTokenEndpoint;
use crate::oauth::http::HttpClients;

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
    Run(RunArgs),
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
        Command::Run(args) => run_operator(args).await,
    }
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

async fn run_operator(args: RunArgs) -> Result<()> {
    init_logging(args.log_format);
    let client = kube::Client::try_default().await.map_err(Error::Connect)?;
    let shutdown = shutdown_signal().boxed().shared();
    let ready = Arc::new(AtomicBool::new(false));
    let http = HttpClients::default();
    let settings = Settings {
        namespaces: args.namespaces,
        cluster_namespace: args.cluster_resource_namespace,
        instance: std::env::var("POD_NAME").unwrap_or_else(|_| "mail-oauth-operator".into()),
    };
    tracing::info!(namespaces = ?settings.namespaces, cluster_namespace = %settings.cluster_namespace, "starting");
    let server = crate::server::serve(args.listen_address, Arc::clone(&ready), shutdown.clone());
    let controllers = run(
        client,
        settings,
        Arc::new(HttpTokenEndpoint::new(http.clone())),
        http,
        Arc::new(SystemClock),
        ready,
        shutdown,
    );
    let (served, ()) = tokio::join!(server, controllers);
    tracing::info!("stopped");
    served
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
