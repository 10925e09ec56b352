//! A provider resolved for use: the spec's preset turned into endpoints, scopes and servers.

use std::collections::BTreeMap;

use crate::api::{
    ClientAuthMethod, ClientSecretRef, Endpoints, MailProviderSpec, MailboxBindingSpec, Preset, Protocol, ServerAddress,
};

use super::presets::{GOOGLE, MICROSOFT, PresetData};

/// Endpoints known without any request: presets and explicit generic URLs.
/// `None` for a generic provider that needs discovery for its token endpoint.
pub fn static_endpoints(spec: &MailProviderSpec) -> Option<Endpoints> {
    match &spec.preset {
        Preset::Microsoft(m) => Some(preset_endpoints(&MICROSOFT, &m.tenant)),
        Preset::Google(_) => Some(preset_endpoints(&GOOGLE, "")),
        Preset::Generic(g) => g.token_url.as_ref().map(|token| Endpoints {
            authorization: g.authorization_url.clone(),
            token: Some(token.clone()),
            device_authorization: g.device_authorization_url.clone(),
            revocation: g.revocation_url.clone(),
            userinfo: None,
        }),
    }
}

/// Explicit generic URLs override what discovery found.
pub fn merge_explicit(spec: &MailProviderSpec, discovered: Endpoints) -> Endpoints {
    let Preset::Generic(g) = &spec.preset else { return discovered };
    Endpoints {
        authorization: g.authorization_url.clone().or(discovered.authorization),
        token: g.token_url.clone().or(discovered.token),
        device_authorization: g.device_authorization_url.clone().or(discovered.device_authorization),
        revocation: g.revocation_url.clone().or(discovered.revocation),
        userinfo: discovered.userinfo,
    }
}

fn preset_endpoints(p: &PresetData, tenant: &str) -> Endpoints {
    Endpoints {
        authorization: Some(PresetData::url(p.authorization_url, tenant)),
        token: Some(PresetData::url(p.token_url, tenant)),
        device_authorization: p.device_authorization_url.map(|u| PresetData::url(u, tenant)),
        revocation: p.revocation_url.map(str::to_owned),
        userinfo: p.userinfo_url.map(str::to_owned),
    }
}

fn preset_of(spec: &MailProviderSpec) -> Option<&'static PresetData> {
    match &spec.preset {
        Preset::Microsoft(_) => Some(&MICROSOFT),
        Preset::Google(_) => Some(&GOOGLE),
        Preset::Generic(_) => None,
    }
}

/// `microsoft` or `google` for a preset, `None` for a generic provider.
pub fn preset_name(spec: &MailProviderSpec) -> Option<&'static str> {
    preset_of(spec).map(|p| p.name)
}

/// Extra authorize parameters: the preset's (Google: `access_type=offline`, `prompt=consent`, so
/// that a refresh token is issued every time), or `prompt=consent` for a generic provider asked
/// for `offline_access`.
pub fn authorize_params(spec: &MailProviderSpec, scopes: &[String]) -> &'static [(&'static str, &'static str)] {
    match preset_of(spec) {
        Some(p) => p.authorize_params,
        // OpenID Connect servers grant offline_access only with prompt=consent (Core §11).
        None if scopes.iter().any(|s| s == "offline_access") => &[("prompt", "consent")],
        None => &[],
    }
}

/// Whether the provider's device flow may ask for mail scopes (a generic provider's may).
pub fn device_flow_for_mail(spec: &MailProviderSpec) -> bool {
    preset_of(spec).is_none_or(|p| p.device_flow_for_mail)
}

/// The client authentication method in effect.
pub fn auth_method(spec: &MailProviderSpec) -> Option<ClientAuthMethod> {
    let auth = spec.client_authentication.as_ref()?;
    auth.method.or(if !auth.client_secret_refs.is_empty() {
        Some(ClientAuthMethod::ClientSecretPost)
    } else if auth.certificate_ref.is_some() {
        Some(ClientAuthMethod::PrivateKeyJwt)
    } else {
        None
    })
}

/// The client secret references, in the order they are tried.
pub fn secret_refs(spec: &MailProviderSpec) -> &[ClientSecretRef] {
    spec.client_authentication.as_ref().map(|a| a.client_secret_refs.as_slice()).unwrap_or_default()
}

/// Extra trust roots for the provider's endpoints.
pub fn ca_bundle(spec: &MailProviderSpec) -> Option<&str> {
    match &spec.preset {
        Preset::Generic(g) => g.ca_bundle.as_deref(),
        _ => None,
    }
}

/// Mail servers the provider knows.
pub fn servers(spec: &MailProviderSpec) -> BTreeMap<Protocol, ServerAddress> {
    match (&spec.preset, preset_of(spec)) {
        (_, Some(p)) => p
            .servers
            .iter()
            .map(|(proto, host, port)| (*proto, ServerAddress { host: (*host).to_owned(), port: *port, tls: None }))
            .collect(),
        (Preset::Generic(g), None) => {
            let s = g.servers.clone().unwrap_or_default();
            [(Protocol::Imap, s.imap), (Protocol::Smtp, s.smtp), (Protocol::Pop3, s.pop3)]
                .into_iter()
                .filter_map(|(p, a)| a.map(|a| (p, a)))
                .collect()
        }
        _ => BTreeMap::new(),
    }
}

/// Whose token a grant gets, as far as scopes go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScopeKind {
    /// The application's own (client credentials: the provider's `.default`-style scopes).
    AppOnly,
    /// A person's, through a refresh token obtained elsewhere or a service account.
    Delegated,
    /// A person's, who consents through the operator: the preset's identity scopes are added,
    /// so that the provider says who consented.
    Consent,
}

/// The scopes a binding requests from this provider, or why it cannot; `app_only` for a grant
/// that gets an app-only token (see [`crate::oauth::grants::Flow::app_only`]).
pub fn scopes_for(
    provider: &MailProviderSpec,
    binding: &MailboxBindingSpec,
    kind: ScopeKind,
) -> Result<Vec<String>, String> {
    if !binding.scopes.is_empty() {
        return Ok(dedup(binding.scopes.iter().cloned()));
    }
    let preset = preset_of(provider);
    if kind == ScopeKind::AppOnly {
        return match (preset, &provider.preset) {
            (Some(p), _) => p.client_credentials_scopes.map(|s| s.iter().map(|s| (*s).to_owned()).collect()).ok_or_else(|| {
                format!("the {} provider offers no client credentials grant for mail; use the jwtBearer grant (service account)", p.name)
            }),
            (None, _) => Ok(generic_scopes(provider, &binding.protocols)),
        };
    }
    Ok(match preset {
        Some(p) => {
            let per_protocol = binding.protocols.iter().flat_map(|proto| {
                p.scopes.iter().filter(move |(q, _)| q == proto).flat_map(|(_, s)| s.iter().map(|s| (*s).to_owned()))
            });
            let identity = p.identity_scopes.iter().filter(|_| kind == ScopeKind::Consent).map(|s| (*s).to_owned());
            dedup(per_protocol.chain(p.offline_scope.map(str::to_owned)).chain(identity))
        }
        None => generic_scopes(provider, &binding.protocols),
    })
}

fn generic_scopes(provider: &MailProviderSpec, protocols: &[Protocol]) -> Vec<String> {
    let Preset::Generic(g) = &provider.preset else { return Vec::new() };
    let s = g.scopes.clone().unwrap_or_default();
    dedup(protocols.iter().flat_map(|p| match p {
        Protocol::Imap => s.imap.clone(),
        Protocol::Smtp => s.smtp.clone(),
        Protocol::Pop3 => s.pop3.clone(),
    }))
}

fn dedup(items: impl Iterator<Item = String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for i in items {
        if !out.contains(&i) {
            out.push(i);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Grant;
    use crate::api::{GenericPreset, GooglePreset, MicrosoftPreset, ProtocolScopes};

    fn provider(preset: Preset) -> MailProviderSpec {
        MailProviderSpec { preset, client_id: "c".into(), client_authentication: None, service_account_key_ref: None }
    }

    fn binding(grant: Grant, protocols: Vec<Protocol>) -> MailboxBindingSpec {
        crate::api::MailboxBinding::test().grant(grant).protocols(&protocols).spec
    }

    fn kind(b: &MailboxBindingSpec) -> ScopeKind {
        match b.grant {
            Grant::ClientCredentials {} => ScopeKind::AppOnly,
            Grant::DeviceCode {} | Grant::AuthorizationCode {} => ScopeKind::Consent,
            _ => ScopeKind::Delegated,
        }
    }

    #[test]
    fn a_person_consenting_through_the_operator_is_also_asked_who_they_are() {
        let p = provider(Preset::Microsoft(MicrosoftPreset { tenant: "contoso.com".into() }));
        let b = binding(Grant::DeviceCode {}, vec![Protocol::Smtp]);
        assert_eq!(
            scopes_for(&p, &b, kind(&b)),
            Ok(vec![
                "https://outlook.office365.com/SMTP.Send".to_owned(),
                "offline_access".to_owned(),
                "openid".to_owned(),
                "email".to_owned()
            ])
        );
    }

    #[test]
    fn microsoft_delegated_scopes_follow_the_protocols_and_ask_for_offline_access() {
        let p = provider(Preset::Microsoft(MicrosoftPreset { tenant: "contoso.com".into() }));
        let b = binding(
            Grant::RefreshToken { secret_ref: crate::api::SecretKeySelector { name: "x".into(), key: "y".into() } },
            vec![Protocol::Imap, Protocol::Smtp],
        );
        assert_eq!(
            scopes_for(&p, &b, kind(&b)),
            Ok(vec![
                "https://outlook.office365.com/IMAP.AccessAsUser.All".to_owned(),
                "https://outlook.office365.com/SMTP.Send".to_owned(),
                "offline_access".to_owned()
            ])
        );
        let e = static_endpoints(&p).unwrap_or_default();
        assert_eq!(e.token.as_deref(), Some("https://login.microsoftonline.com/contoso.com/oauth2/v2.0/token"));
    }

    #[test]
    fn microsoft_client_credentials_use_the_default_scope() {
        let p = provider(Preset::Microsoft(MicrosoftPreset::default()));
        let b = binding(Grant::ClientCredentials {}, vec![Protocol::Imap]);
        assert_eq!(scopes_for(&p, &b, kind(&b)), Ok(vec!["https://outlook.office365.com/.default".to_owned()]));
    }

    #[test]
    fn google_refuses_client_credentials_with_a_hint() {
        let p = provider(Preset::Google(GooglePreset {}));
        let b = binding(Grant::ClientCredentials {}, vec![Protocol::Imap]);
        let err = scopes_for(&p, &b, kind(&b)).err().unwrap_or_default();
        assert!(err.contains("jwtBearer"), "{err}");
        assert_eq!(servers(&p)[&Protocol::Imap], ServerAddress { host: "imap.gmail.com".into(), port: 993, tls: None });
    }

    #[test]
    fn generic_scopes_and_servers_come_from_the_spec() {
        let p = provider(Preset::Generic(Box::new(GenericPreset {
            token_url: Some("https://idp/token".into()),
            scopes: Some(ProtocolScopes {
                imap: vec!["mail".into()],
                smtp: vec!["mail".into(), "send".into()],
                pop3: vec![],
            }),
            ..Default::default()
        })));
        let b = binding(Grant::ClientCredentials {}, vec![Protocol::Imap, Protocol::Smtp]);
        assert_eq!(scopes_for(&p, &b, kind(&b)), Ok(vec!["mail".to_owned(), "send".to_owned()]));
        assert!(servers(&p).is_empty());
        let discovery_only = provider(Preset::Generic(Box::new(GenericPreset {
            issuer_url: Some("https://idp".into()),
            ..Default::default()
        })));
        assert_eq!(static_endpoints(&discovery_only), None);
    }
}
