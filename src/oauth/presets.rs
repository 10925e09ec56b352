//! Provider presets as data: endpoints, scopes per protocol, mail servers and authorize
//! parameters for Microsoft and Google. Adding a provider means adding a row, not a branch.

use crate::api::Protocol;

/// What the operator knows about a well-known provider.
#[derive(Debug)]
pub struct PresetData {
    /// Name as in the spec.
    pub name: &'static str,
    /// Authorization endpoint; `{tenant}` is replaced.
    pub authorization_url: &'static str,
    /// Token endpoint; `{tenant}` is replaced.
    pub token_url: &'static str,
    /// Device authorization endpoint; `{tenant}` is replaced.
    pub device_authorization_url: Option<&'static str>,
    /// Revocation endpoint.
    pub revocation_url: Option<&'static str>,
    /// Userinfo endpoint, when it accepts the mail access token (Microsoft's Graph userinfo does
    /// not take an Exchange-audience token).
    pub userinfo_url: Option<&'static str>,
    /// Delegated scopes per protocol.
    pub scopes: &'static [(Protocol, &'static [&'static str])],
    /// Scope that asks for a refresh token, added to delegated requests.
    pub offline_scope: Option<&'static str>,
    /// Scopes that make the provider say who consented (an id_token), added when a person
    /// consents through the operator (device code, authorization code): identity pinning.
    pub identity_scopes: &'static [&'static str],
    /// Scopes for the client credentials grant; `None` when the provider has none for mail.
    pub client_credentials_scopes: Option<&'static [&'static str]>,
    /// Mail servers per protocol.
    pub servers: &'static [(Protocol, &'static str, u16)],
    /// Whether the device flow may request mail scopes.
    pub device_flow_for_mail: bool,
    /// Extra authorize parameters.
    pub authorize_params: &'static [(&'static str, &'static str)],
}

/// Microsoft identity platform v2.0 for Exchange Online.
pub static MICROSOFT: PresetData = PresetData {
    name: "microsoft",
    authorization_url: "https://login.microsoftonline.com/{tenant}/oauth2/v2.0/authorize",
    token_url: "https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token",
    device_authorization_url: Some("https://login.microsoftonline.com/{tenant}/oauth2/v2.0/devicecode"),
    revocation_url: None,
    userinfo_url: None,
    scopes: &[
        (Protocol::Imap, &["https://outlook.office365.com/IMAP.AccessAsUser.All"]),
        (Protocol::Smtp, &["https://outlook.office365.com/SMTP.Send"]),
        (Protocol::Pop3, &["https://outlook.office365.com/POP.AccessAsUser.All"]),
    ],
    offline_scope: Some("offline_access"),
    // id_token with preferred_username (the UPN) and email; allowed beside any resource's scopes.
    identity_scopes: &["openid", "email"],
    client_credentials_scopes: Some(&["https://outlook.office365.com/.default"]),
    servers: &[
        (Protocol::Imap, "outlook.office365.com", 993),
        (Protocol::Smtp, "smtp.office365.com", 587),
        (Protocol::Pop3, "outlook.office365.com", 995),
    ],
    device_flow_for_mail: true,
    authorize_params: &[],
};

/// Google (Gmail / Workspace).
pub static GOOGLE: PresetData = PresetData {
    name: "google",
    authorization_url: "https://accounts.google.com/o/oauth2/v2/auth",
    token_url: "https://oauth2.googleapis.com/token",
    device_authorization_url: Some("https://oauth2.googleapis.com/device/code"),
    revocation_url: Some("https://oauth2.googleapis.com/revoke"),
    userinfo_url: Some("https://openidconnect.googleapis.com/v1/userinfo"),
    scopes: &[
        (Protocol::Imap, &["https://mail.google.com/"]),
        (Protocol::Smtp, &["https://mail.google.com/"]),
        (Protocol::Pop3, &["https://mail.google.com/"]),
    ],
    offline_scope: None,
    identity_scopes: &["openid", "email"],
    client_credentials_scopes: None,
    servers: &[
        (Protocol::Imap, "imap.gmail.com", 993),
        (Protocol::Smtp, "smtp.gmail.com", 587),
        (Protocol::Pop3, "pop.gmail.com", 995),
    ],
    // Google's device flow does not allow the https://mail.google.com/ scope.
    device_flow_for_mail: false,
    authorize_params: &[("access_type", "offline"), ("prompt", "consent")],
};

impl PresetData {
    /// Fills `{tenant}` into an endpoint template.
    pub fn url(template: &str, tenant: &str) -> String {
        template.replace("{tenant}", tenant)
    }
}
