//! `kubectl mailoauth inspect NAME`: the binding's published Secret, its keys with their sizes
//! and its expiry, and whether the operator's grant state exists. Values are printed only with
//! `--show-values` (with a warning on stderr); grant-state values never.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use serde::Serialize;

use super::view::{absolute, aligned, relative};
use super::{Connection, Output, PluginError, Result, print_structured};
use crate::api::MailboxBinding;
use crate::controller::secrets::grant_secret_name;

/// Flags of `inspect`.
#[derive(Clone, Debug, clap::Args)]
pub struct InspectArgs {
    /// The binding.
    pub name: String,
    /// Print the values too (the access token among them): for debugging only.
    #[arg(long)]
    pub show_values: bool,
    /// Output format (`wide` is `table`).
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    pub output: Output,
}

/// One key of the published Secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Key {
    /// The key.
    pub name: String,
    /// Its value's length in bytes.
    pub bytes: usize,
    /// The value, only with `--show-values`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

/// What `inspect` shows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Inspection {
    /// `<namespace>/<binding>`.
    pub binding: String,
    /// The published Secret's name.
    pub secret: String,
    /// Whether it exists.
    pub published: bool,
    /// When the operator last wrote it (its creation, else nothing known).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created_at: Option<DateTime<Utc>>,
    /// The token's expiry, from the Secret's `expires_at`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
    /// The keys, sorted.
    pub keys: Vec<Key>,
    /// The grant-state Secret's name.
    pub grant_state: String,
    /// Whether it exists.
    pub grant_state_exists: bool,
    /// Its keys (never its values).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub grant_state_keys: Vec<String>,
}

/// The inspection of a binding's Secrets; values only when `show_values`.
pub fn inspection(
    binding: &MailboxBinding,
    published: Option<&Secret>,
    grant: Option<&Secret>,
    show_values: bool,
) -> Inspection {
    let namespace = binding.metadata.namespace.clone().unwrap_or_default();
    let name = binding.metadata.name.clone().unwrap_or_default();
    let data: BTreeMap<String, Vec<u8>> =
        published.and_then(|s| s.data.clone()).unwrap_or_default().into_iter().map(|(k, v)| (k, v.0)).collect();
    let expires_at = data
        .get("expires_at")
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|t| DateTime::parse_from_rfc3339(t.trim()).ok())
        .map(|t| t.with_timezone(&Utc));
    let keys = data
        .iter()
        .map(|(k, v)| Key {
            name: k.clone(),
            bytes: v.len(),
            value: show_values.then(|| String::from_utf8_lossy(v).into_owned()),
        })
        .collect();
    let mut grant_state_keys: Vec<String> =
        grant.and_then(|g| g.data.as_ref()).map(|d| d.keys().cloned().collect()).unwrap_or_default();
    grant_state_keys.sort();
    Inspection {
        binding: format!("{namespace}/{name}"),
        secret: published
            .and_then(|s| s.metadata.name.clone())
            .or_else(|| binding.status.as_ref().and_then(|s| s.secret_name.clone()))
            .unwrap_or_else(|| binding.spec.secret_name.clone()),
        published: published.is_some(),
        created_at: published
            .and_then(|s| s.metadata.creation_timestamp.as_ref())
            .and_then(|t| DateTime::from_timestamp(t.0.as_second(), 0)),
        expires_at,
        keys,
        grant_state: grant_secret_name(&name),
        grant_state_exists: grant.is_some(),
        grant_state_keys,
    }
}

/// The inspection as text.
pub fn render(i: &Inspection, now: DateTime<Utc>) -> String {
    let mut out = format!("Binding:      {}\n", i.binding);
    if i.published {
        out.push_str(&format!("Secret:       {}\n", i.secret));
    } else {
        out.push_str(&format!("Secret:       {} (not published yet)\n", i.secret));
    }
    if let Some(at) = i.expires_at {
        out.push_str(&format!("Expires:      {} ({})\n", absolute(at), relative(at, now)));
    }
    if i.published {
        out.push_str("Keys:\n");
        let mut lines = vec![vec!["  KEY".to_owned(), "BYTES".to_owned()]];
        if i.keys.iter().any(|k| k.value.is_some())
            && let Some(h) = lines.first_mut()
        {
            h.push("VALUE".to_owned());
        }
        for k in &i.keys {
            let mut line = vec![format!("  {}", k.name), k.bytes.to_string()];
            if let Some(v) = &k.value {
                line.push(v.clone());
            }
            lines.push(line);
        }
        out.push_str(&aligned(&lines));
    }
    if i.grant_state_exists {
        out.push_str(&format!(
            "Grant state:  {} exists ({} keys{})\n",
            i.grant_state,
            i.grant_state_keys.len(),
            if i.grant_state_keys.iter().any(|k| k == "refresh_token") { ", holds a refresh token" } else { "" }
        ));
    } else {
        out.push_str(&format!("Grant state:  {} does not exist\n", i.grant_state));
    }
    out
}

async fn secret(api: &Api<Secret>, namespace: &str, name: &str) -> Result<Option<Secret>> {
    api.get_opt(name).await.map_err(|e| PluginError::api(format!("reading secret {namespace}/{name}"), &e))
}

/// Runs `inspect`.
pub async fn run(conn: &Connection, args: &InspectArgs) -> Result<()> {
    let ns = conn.namespace.as_str();
    let bindings = Api::<MailboxBinding>::namespaced(conn.client.clone(), ns);
    let binding = super::wait::read(&bindings, ns, &args.name).await?.binding;
    let secrets = Api::<Secret>::namespaced(conn.client.clone(), ns);
    let name = binding.status.as_ref().and_then(|s| s.secret_name.clone()).unwrap_or(binding.spec.secret_name.clone());
    let published = secret(&secrets, ns, &name).await?;
    // Only its existence and key names are shown; a person who may not read it is told so.
    let grant = match secret(&secrets, ns, &grant_secret_name(&args.name)).await {
        Ok(g) => g,
        Err(e) => {
            eprintln!("warning: the grant state cannot be read: {e}");
            None
        }
    };
    if args.show_values {
        eprintln!(
            "warning: printing the Secret's values, the access token among them: keep them out of logs and tickets"
        );
    }
    let inspection = inspection(&binding, published.as_ref(), grant.as_ref(), args.show_values);
    match args.output {
        Output::Json | Output::Yaml => print_structured(&inspection, args.output),
        Output::Table | Output::Wide => {
            print!("{}", render(&inspection, chrono::Utc::now()));
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;

    fn binding() -> MailboxBinding {
        let spec = serde_json::from_value(serde_json::json!({
            "providerRef": {"name": "idp"}, "mailbox": "a@example.com",
            "grant": {"deviceCode": {}}, "secretName": "a-mail-token"
        }))
        .unwrap();
        let mut b = MailboxBinding::new("a", spec);
        b.metadata.namespace = Some("mail".into());
        b
    }

    fn published() -> Secret {
        let mut s = Secret::default();
        s.metadata.name = Some("a-mail-token".into());
        s.data = Some(
            [
                ("access_token".to_owned(), ByteString(b"SECRET-TOKEN-VALUE".to_vec())),
                ("expires_at".to_owned(), ByteString(b"2027-01-15T09:00:00Z".to_vec())),
                ("extra".to_owned(), ByteString(b"x".to_vec())),
            ]
            .into(),
        );
        s
    }

    #[test]
    fn keys_sizes_and_expiry_without_values_unless_asked() {
        let grant = Secret {
            data: Some([("refresh_token".to_owned(), ByteString(b"RT-VALUE".to_vec()))].into()),
            ..Default::default()
        };
        let i = inspection(&binding(), Some(&published()), Some(&grant), false);
        let now = DateTime::parse_from_rfc3339("2027-01-15T08:00:00Z").unwrap().with_timezone(&Utc);
        let text = render(&i, now);
        assert!(!text.contains("SECRET-TOKEN-VALUE") && !text.contains("RT-VALUE"), "{text}");
        assert!(!serde_json::to_string(&i).unwrap().contains("SECRET-TOKEN-VALUE"));
        assert!(text.contains("Expires:      2027-01-15T09:00:00Z (in 60m)"), "{text}");
        assert!(text.contains("  access_token   18\n"), "{text}");
        assert!(text.contains("  extra          1\n"), "{text}");
        assert!(text.contains("a.mailoauth-grant exists (1 keys, holds a refresh token)"), "{text}");
        let shown = inspection(&binding(), Some(&published()), Some(&grant), true);
        let text = render(&shown, now);
        assert!(text.contains("SECRET-TOKEN-VALUE") && !text.contains("RT-VALUE"), "{text}");
    }

    #[test]
    fn nothing_published_yet_says_so() {
        let i = inspection(&binding(), None, None, false);
        let text = render(&i, Utc::now());
        assert!(text.contains("a-mail-token (not published yet)"), "{text}");
        assert!(text.contains("a.mailoauth-grant does not exist"), "{text}");
        assert!(!text.contains("Keys:"));
    }
}
