//! `kubectl mailoauth status`: every binding of a namespace (or of all, `-A`) in one table.

use kube::Api;
use kube::api::ListParams;

use super::view::{Columns, Row, row, table};
use super::{Connection, Output, PluginError, Result, print_structured};
use crate::api::MailboxBinding;

/// Flags of `status`.
#[derive(Clone, Debug, clap::Args)]
pub struct StatusArgs {
    /// Only these bindings (default: all of the namespace).
    pub names: Vec<String>,
    /// The bindings of every namespace.
    #[arg(short = 'A', long, conflicts_with = "names")]
    pub all_namespaces: bool,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    pub output: Output,
}

/// The bindings asked for, sorted by namespace and name.
async fn bindings(conn: &Connection, args: &StatusArgs) -> Result<Vec<MailboxBinding>> {
    let client = conn.client.clone();
    let mut found = if args.all_namespaces {
        Api::<MailboxBinding>::all(client)
            .list(&ListParams::default())
            .await
            .map_err(|e| PluginError::api("listing mailbox bindings in all namespaces", &e))?
            .items
    } else if args.names.is_empty() {
        Api::<MailboxBinding>::namespaced(client, &conn.namespace)
            .list(&ListParams::default())
            .await
            .map_err(|e| PluginError::api(format!("listing mailbox bindings in namespace {}", conn.namespace), &e))?
            .items
    } else {
        let api = Api::<MailboxBinding>::namespaced(client, &conn.namespace);
        let mut found = Vec::new();
        for name in &args.names {
            found.push(super::wait::read(&api, &conn.namespace, name).await?.binding);
        }
        found
    };
    found.sort_by(|a, b| (&a.metadata.namespace, &a.metadata.name).cmp(&(&b.metadata.namespace, &b.metadata.name)));
    Ok(found)
}

/// Runs `status`.
pub async fn run(conn: &Connection, args: &StatusArgs) -> Result<()> {
    let now = chrono::Utc::now();
    let rows: Vec<Row> = bindings(conn, args).await?.iter().map(|b| row(b, now)).collect();
    match args.output {
        Output::Json | Output::Yaml => print_structured(&rows, args.output),
        Output::Table | Output::Wide => {
            if rows.is_empty() {
                let scope = if args.all_namespaces {
                    "any namespace".to_owned()
                } else {
                    format!("namespace {}", conn.namespace)
                };
                eprintln!("No mailbox bindings found in {scope}.");
                return Ok(());
            }
            let columns = Columns { namespace: args.all_namespaces, wide: args.output == Output::Wide };
            print!("{}", table(&rows, columns));
            Ok(())
        }
    }
}
