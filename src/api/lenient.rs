//! Lenient reading of what the operator itself writes. The status subresource is not checked by
//! the operator before the apiserver stores it, and a value there that the apiserver's schema lets
//! through but these types cannot read (a number out of range, an unexpected time format, a status
//! written by another tool or an older version) would fail the decoding of the whole watch list,
//! and so stop every binding in the cluster. A status field that cannot be read is taken as
//! absent instead; the next reconcile writes it anew.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};

/// Deserializes `T`, or gives `T::default()` when the value does not fit.
pub fn or_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: DeserializeOwned + Default,
{
    let value = serde_json::Value::deserialize(deserializer)?;
    Ok(serde_json::from_value(value).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use crate::api::{MailProviderStatus, MailboxBinding, MailboxBindingStatus};

    #[test]
    fn an_unreadable_status_field_is_read_as_absent_and_the_rest_is_kept() {
        let status: MailboxBindingStatus = serde_json::from_value(json!({
            "phase": "Ready",
            "failedAttempts": 99_999_999_999_u64,
            "lastRefreshTime": "yesterday",
            "conditions": [{"type": "Ready"}],
            "secretName": "kept",
            "observedGeneration": "two",
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(status.failed_attempts, 0);
        assert_eq!(status.last_refresh_time, None);
        assert!(status.conditions.is_empty());
        assert_eq!(status.secret_name.as_deref(), Some("kept"));
        assert_eq!(status.observed_generation, None);
        assert!(status.phase.is_some());
    }

    #[test]
    fn a_binding_with_a_foreign_status_still_decodes() {
        let binding: Result<MailboxBinding, _> = serde_json::from_value(json!({
            "apiVersion": "mailoauth.io/v1alpha1", "kind": "MailboxBinding",
            "metadata": {"name": "b", "namespace": "n"},
            "spec": {"providerRef": {"name": "p"}, "mailbox": "a@example.com",
                     "grant": {"clientCredentials": {}}, "secretName": "s"},
            "status": {"phase": "Sideways", "token": {"issuedAt": 5}, "failedAttempts": -1},
        }));
        assert!(binding.is_ok(), "{binding:?}");
        let provider: Result<MailProviderStatus, _> =
            serde_json::from_value(json!({"endpoints": "none", "clientSecretExpiresAt": "later"}));
        assert!(provider.is_ok(), "{provider:?}");
    }
}
