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

/// Bindings listed per request: a cluster of 10,000 bindings is read in pages, each made into
/// rows before the next is read.
const PAGE: u32 = 500;

/// The rows of the bindings asked for, sorted by namespace and name.
async fn rows(conn: &Connection, args: &StatusArgs, now: chrono::DateTime<chrono::Utc>) -> Result<Vec<Row>> {
    let client = conn.client.clone();
    let mut rows = Vec::new();
    if args.names.is_empty() {
        let (api, scope) = if args.all_namespaces {
            (Api::<MailboxBinding>::all(client), "all namespaces".to_owned())
        } else {
            (Api::<MailboxBinding>::namespaced(client, &conn.namespace), format!("namespace {}", conn.namespace))
        };
        let mut params = ListParams::default().limit(PAGE);
        loop {
            let page = api
                .list(&params)
                .await
                .map_err(|e| PluginError::api(format!("listing mailbox bindings in {scope}"), &e))?;
            rows.extend(page.items.iter().map(|b| row(b, now)));
            match page.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(token) => params = params.continue_token(&token),
                None => break,
            }
        }
    } else {
        let api = Api::<MailboxBinding>::namespaced(client, &conn.namespace);
        for name in &args.names {
            rows.push(row(&super::wait::read(&api, &conn.namespace, name).await?.binding, now));
        }
    }
    rows.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    Ok(rows)
}

/// Runs `status`.
pub async fn run(conn: &Connection, args: &StatusArgs) -> Result<()> {
    let now = chrono::Utc::now();
    let rows = rows(conn, args, now).await?;
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
