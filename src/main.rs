//! Entry point: parse the command line and hand over to the library.

use std::process::ExitCode;

use clap::Parser;
use mail_oauth_operator::cli::{Cli, execute};

#[tokio::main]
async fn main() -> ExitCode {
    match execute(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mail-oauth-operator: {e}");
            ExitCode::FAILURE
        }
    }
}
