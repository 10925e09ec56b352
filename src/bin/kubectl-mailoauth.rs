//! `kubectl-mailoauth`: the kubectl plugin (`kubectl mailoauth ...`); see `src/plugin`.

use std::process::ExitCode;

use clap::Parser;
use mail_oauth_operator::plugin::{PluginCli, execute};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    match execute(PluginCli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
