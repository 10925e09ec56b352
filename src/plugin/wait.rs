//! Waiting for the operator: the binding is read once a second until a check says it is done,
//! with progress on stderr (one line rewritten in place at a terminal, a line per change
//! elsewhere), bounded by a timeout.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use kube::Api;
use kube::api::{ApiResource, DynamicObject, Patch, PatchParams};
use serde_json::Value;

use super::{PluginError, Result};
use crate::api::MailboxBinding;

/// How often the binding is read while waiting.
pub const POLL: Duration = Duration::from_secs(1);

/// A binding as read: typed, and as the apiserver sent it (fields a newer operator writes too).
#[derive(Clone, Debug)]
pub struct Seen {
    /// The typed object.
    pub binding: MailboxBinding,
    /// The object as JSON.
    pub raw: Value,
}

/// Reads one binding, as JSON first (fields a newer operator writes are kept), then typed.
pub async fn read(api: &Api<MailboxBinding>, namespace: &str, name: &str) -> Result<Seen> {
    let dynamic: Api<DynamicObject> =
        Api::namespaced_with(api.clone().into_client(), namespace, &ApiResource::erase::<MailboxBinding>(&()));
    let object = dynamic
        .get_opt(name)
        .await
        .map_err(|e| PluginError::api(format!("reading mailboxbinding {namespace}/{name}"), &e))?
        .ok_or_else(|| {
            PluginError::Refused(format!(
                "mailboxbinding {name} not found in namespace {namespace} (kubectl get mbx -A lists them all)"
            ))
        })?;
    let raw = serde_json::to_value(object).map_err(|e| PluginError::Output(e.to_string()))?;
    let binding = serde_json::from_value(raw.clone()).map_err(|e| {
        PluginError::Refused(format!("mailboxbinding {namespace}/{name} cannot be read by this plugin's version: {e}"))
    })?;
    Ok(Seen { binding, raw })
}

/// Sets `annotation` to `value` on the binding (a merge patch: nothing else changes).
pub async fn annotate(api: &Api<MailboxBinding>, name: &str, annotation: &str, value: &str) -> Result<()> {
    let patch = serde_json::json!({"metadata": {"annotations": {annotation: value}}});
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|e| PluginError::api(format!("setting {annotation} on {name}"), &e))?;
    Ok(())
}

/// A value no earlier request used: the time to the nanosecond and the process id.
pub fn unique_value() -> String {
    let now = chrono::Utc::now();
    format!("{}-{}", now.format("%Y%m%dT%H%M%S%.9fZ"), std::process::id())
}

/// Progress on stderr.
pub struct Progress {
    started: Instant,
    terminal: bool,
    last: String,
    drawn: bool,
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}

impl Progress {
    /// Progress from now.
    pub fn new() -> Self {
        Self { started: Instant::now(), terminal: std::io::stderr().is_terminal(), last: String::new(), drawn: false }
    }

    /// Shows `what` (with the time waited at a terminal; elsewhere only when it changed).
    pub fn update(&mut self, what: &str) {
        let mut err = std::io::stderr().lock();
        if self.terminal {
            let waited = self.started.elapsed().as_secs();
            let _ = write!(err, "\r\x1b[2K{what} ({waited}s)");
            let _ = err.flush();
            self.drawn = true;
        } else if what != self.last {
            let _ = writeln!(err, "{what}");
        }
        what.clone_into(&mut self.last);
    }

    /// Ends the progress line.
    pub fn finish(&mut self) {
        if self.terminal && self.drawn {
            let _ = write!(std::io::stderr().lock(), "\r\x1b[2K");
            self.drawn = false;
        }
    }

    /// How long it has waited.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
}

/// What a check makes of one read of the binding.
pub enum Step<T> {
    /// Done, with this.
    Done(T),
    /// Not yet; the progress line says this.
    Waiting(String),
}

/// Reads the binding every [`POLL`] until `check` is done, at most `timeout`.
pub async fn until<T>(
    api: &Api<MailboxBinding>,
    namespace: &str,
    name: &str,
    timeout: Duration,
    mut check: impl FnMut(&Seen) -> Result<Step<T>>,
) -> Result<T> {
    let mut progress = Progress::new();
    loop {
        let seen = read(api, namespace, name).await;
        match seen.and_then(|s| check(&s)) {
            Ok(Step::Done(value)) => {
                progress.finish();
                return Ok(value);
            }
            Ok(Step::Waiting(what)) => {
                progress.update(&what);
                if progress.elapsed() >= timeout {
                    progress.finish();
                    return Err(PluginError::Timeout { after: super::view::human(chrono_of(timeout)), what });
                }
            }
            Err(e) => {
                progress.finish();
                return Err(e);
            }
        }
        tokio::time::sleep(POLL).await;
    }
}

/// A std duration as a chrono one (saturating).
pub fn chrono_of(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_values_differ_and_fit_an_annotation() {
        let a = unique_value();
        std::thread::sleep(Duration::from_millis(1));
        let b = unique_value();
        assert_ne!(a, b);
        assert!(a.len() < 64 && a.ends_with(&format!("Z-{}", std::process::id())), "{a}");
    }
}
