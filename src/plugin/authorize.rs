//! `kubectl mailoauth authorize NAME`: from `AwaitingAuthorization` to Ready with one visit.
//!
//! Device code: the verification URL and the user code are printed (and the URL with the code
//! filled in opened in a browser), then the command waits until the operator has the token.
//! Authorization code through the operator's listener: the start link in status points at the
//! operator's public URL. When that is a loopback address (`http://localhost:8400`, the chart's
//! default), the command listens there itself and forwards each connection to the operator's pod
//! through the API server (a port-forward of its own, as `kubectl port-forward` makes), so the
//! browser reaches `/authorize` and the provider's redirect to `/callback` reaches the operator
//! without an Ingress. `--callback-url` sends the browser to another address of the listener
//! instead (an operator run outside the cluster). Without a listener, status holds the provider's
//! URL: the command prints it and takes the address the browser ended on from stdin (the paste
//! path, `mailoauth.io/authorization-response`).

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::ListParams;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use super::view::{absolute, authorize_hint, failing, relative};
use super::wait::{Seen, Step, annotate, unique_value, until};
use super::{Connection, DEFAULT_OPERATOR_NAMESPACE, PluginError, Result, describe, parse_timeout};
use crate::api::common::find_condition;
use crate::api::{
    AUTHORIZATION_RESPONSE_ANNOTATION, AuthorizationStatus, Grant, MailboxBinding, Phase,
    REAUTHORIZE_REQUESTED_ANNOTATION,
};
use crate::policy::binding::conditions;
use crate::policy::reason::Reason;

/// The chart's label naming the operator's pods.
pub const OPERATOR_LABEL: &str = "app.kubernetes.io/name=mail-oauth-operator";
/// The chart's name of the listener's container port.
pub const CALLBACK_PORT_NAME: &str = "callback";
/// The leader election Lease's name (the operator's default, and the chart's).
pub const LEASE_NAME: &str = "mail-oauth-operator";
/// Connections forwarded at once (a browser opens a few).
const FORWARDED_AT_ONCE: usize = 16;
/// The longest one forwarded connection lives.
const FORWARDED_FOR: Duration = Duration::from_secs(300);
/// The longest address read from stdin on the paste path.
const MAX_PASTED: u64 = 8192;

/// Flags of `authorize`.
#[derive(Clone, Debug, clap::Args)]
pub struct AuthorizeArgs {
    /// The binding.
    pub name: String,
    /// How long to wait for the person (a Go duration).
    #[arg(long, default_value = "15m", value_parser = parse_timeout)]
    pub timeout: Duration,
    /// Print the link or code only; do not try to open a browser.
    #[arg(long)]
    pub no_browser: bool,
    /// Reach the operator's authorization listener at this base URL instead of the one in the
    /// link (an operator run outside the cluster); no port-forward then.
    #[arg(long, value_parser = parse_callback_url, value_name = "URL")]
    pub callback_url: Option<String>,
    /// The operator's namespace, where the port-forward finds its pod.
    #[arg(long, default_value = DEFAULT_OPERATOR_NAMESPACE)]
    pub operator_namespace: String,
}

/// `--callback-url`: http or https, no query or fragment; kept without a trailing slash.
pub fn parse_callback_url(text: &str) -> Result<String, String> {
    let url = url::Url::parse(text).map_err(|e| e.to_string())?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err("must be an http or https URL".into());
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("must have no query or fragment".into());
    }
    Ok(text.trim_end_matches('/').to_owned())
}

/// Where a binding stands for `authorize`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum State {
    /// A person has to act on this.
    Awaiting(AuthorizationStatus),
    /// The binding is Ready.
    Ready,
    /// The last authorization ended without a grant; a new one helps (its reason).
    Ended(String),
    /// Something a new authorization cannot fix (reason, fix).
    Blocked(String, String),
    /// The operator is at work (what it says).
    Working(String),
}

/// Reasons after which a new authorization is what helps.
const ENDED: [Reason; 5] = [
    Reason::AuthorizationExpired,
    Reason::AuthorizationDenied,
    Reason::ReauthorizationRequired,
    Reason::IdentityMismatch,
    Reason::IdentityUnverified,
];

/// Where `binding` stands.
pub fn state(binding: &MailboxBinding) -> State {
    let namespace = binding.metadata.namespace.as_deref().unwrap_or_default();
    let name = binding.metadata.name.as_deref().unwrap_or_default();
    let status = binding.status.clone().unwrap_or_default();
    if status.phase == Some(Phase::AwaitingAuthorization)
        && let Some(a) = status.authorization.clone()
    {
        return State::Awaiting(a);
    }
    if find_condition(&status.conditions, conditions::READY).is_some_and(|c| c.is_true())
        && status.phase != Some(Phase::AwaitingAuthorization)
    {
        return State::Ready;
    }
    let words = status.phase.map(|p| format!("{p:?}")).unwrap_or_else(|| "not reconciled yet".to_owned());
    match failing(namespace, name, &status) {
        Some((reason, _)) if ENDED.iter().any(|r| r.as_str() == reason) => State::Ended(reason),
        Some((reason, _)) if reason == Reason::AwaitingAuthorization.as_str() => State::Working(words),
        Some((reason, fix)) => State::Blocked(reason, fix),
        None => State::Working(words),
    }
}

/// The listener's start link for `binding`, moved to `base` when given: everything from
/// `/authorize/<namespace>/<name>` on is kept. `None` when `link` is no start link (the
/// provider's own URL, shown when the operator has no listener).
pub fn listener_link(link: &str, namespace: &str, name: &str, base: Option<&str>) -> Option<String> {
    let path = format!("/authorize/{namespace}/{name}?");
    let at = link.find(&path)?;
    let rest = link.get(at..)?;
    if !rest.contains("start=") {
        return None;
    }
    Some(match base {
        Some(base) => format!("{base}{rest}"),
        None => link.to_owned(),
    })
}

/// The loopback port a link names, when the link is on this machine (the public URL of a
/// port-forward): where the command must listen for the browser and the provider's redirect.
pub fn loopback_port(link: &str) -> Option<u16> {
    let url = url::Url::parse(link).ok()?;
    let loopback = match url.host()? {
        url::Host::Domain(d) => d.eq_ignore_ascii_case("localhost"),
        url::Host::Ipv4(ip) => ip.is_loopback(),
        url::Host::Ipv6(ip) => ip.is_loopback(),
    };
    if loopback && url.scheme() == "http" { url.port_or_known_default() } else { None }
}

/// What a person reads for a device code.
pub fn device_instructions(mailbox: &str, a: &AuthorizationStatus, now: chrono::DateTime<chrono::Utc>) -> String {
    let mut out = format!(
        "To authorize {mailbox}, open\n  {}\nand enter the code\n  {}\n",
        a.verification_uri.as_deref().unwrap_or("(no verification URL)"),
        a.user_code.as_deref().unwrap_or("(no code)")
    );
    if let Some(complete) = &a.verification_uri_complete {
        out.push_str(&format!("(or open {complete})\n"));
    }
    if let Some(at) = a.expires_at {
        out.push_str(&format!("The code expires at {} ({}).\n", absolute(at), relative(at, now)));
    }
    out
}

/// What a person reads for an authorize link.
pub fn link_instructions(
    mailbox: &str,
    link: &str,
    a: &AuthorizationStatus,
    now: chrono::DateTime<chrono::Utc>,
) -> String {
    let mut out = format!("To authorize {mailbox}, open this link in a browser and sign in as {mailbox}:\n  {link}\n");
    if let Some(at) = a.expires_at {
        out.push_str(&format!("The link works until {} ({}).\n", absolute(at), relative(at, now)));
    }
    out
}

fn say(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

/// Opens `url` in the desktop's browser; failures are ignored (the link is printed anyway). On
/// Linux only with a display: without one, `xdg-open` would start a text browser in this terminal.
fn open_browser(url: &str) {
    let desktop = ["DISPLAY", "WAYLAND_DISPLAY"].iter().any(|v| std::env::var_os(v).is_some_and(|v| !v.is_empty()));
    if !cfg!(target_os = "macos") && !cfg!(windows) && !desktop {
        return;
    }
    let opener = if cfg!(target_os = "macos") {
        "open"
    } else if cfg!(windows) {
        "explorer"
    } else {
        "xdg-open"
    };
    let _ = std::process::Command::new(opener)
        .arg(url)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
}

/// The operator pod to forward to and its listener's port: the leader if it is among the
/// running and ready pods, else the first of them.
async fn operator_pod(client: &kube::Client, namespace: &str) -> Result<(String, u16)> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let listed = pods
        .list(&ListParams::default().labels(OPERATOR_LABEL))
        .await
        .map_err(|e| PluginError::api(format!("listing the operator's pods in namespace {namespace}"), &e))?;
    let ready: Vec<&Pod> = listed
        .items
        .iter()
        .filter(|p| {
            let status = p.status.as_ref();
            status.and_then(|s| s.phase.as_deref()) == Some("Running")
                && status
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .collect();
    let leader = Api::<Lease>::namespaced(client.clone(), namespace)
        .get_opt(LEASE_NAME)
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec?.holder_identity);
    let chosen = ready
        .iter()
        .find(|p| p.metadata.name.is_some() && p.metadata.name == leader)
        .or_else(|| ready.first())
        .ok_or_else(|| {
            PluginError::Refused(format!(
                "no running operator pod in namespace {namespace} (pods labelled {OPERATOR_LABEL}): the \
                 port-forward needs one. Is the operator installed there (--operator-namespace)? If it runs \
                 outside the cluster, pass --callback-url with its listener's address"
            ))
        })?;
    let name = chosen.metadata.name.clone().unwrap_or_default();
    let port = chosen
        .spec
        .iter()
        .flat_map(|s| &s.containers)
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some(CALLBACK_PORT_NAME))
        .and_then(|p| u16::try_from(p.container_port).ok())
        .ok_or_else(|| {
            PluginError::Refused(format!(
                "the operator's authorization listener is off (pod {namespace}/{name} has no port named \
                 {CALLBACK_PORT_NAME}): install the chart with authorization.callback.enabled=true"
            ))
        })?;
    Ok((name, port))
}

/// A port-forward of this command's own: 127.0.0.1:`local` to the operator pod's listener.
struct Forward {
    task: tokio::task::JoinHandle<()>,
    slots: Arc<Semaphore>,
}

impl Forward {
    /// Stops accepting, then gives the connections in flight (the callback page on its way to the
    /// browser) up to `within` to end.
    async fn drain(self, within: Duration) {
        self.task.abort();
        let all = u32::try_from(FORWARDED_AT_ONCE).unwrap_or(u32::MAX);
        let _ = tokio::time::timeout(within, self.slots.acquire_many(all)).await;
    }
}

impl Drop for Forward {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Listens on 127.0.0.1:`port` and forwards each connection to the operator's listener through
/// the API server. `None` when something already listens there (a `kubectl port-forward` a
/// person started, or the operator itself on this machine): the browser reaches that.
async fn forward(client: &kube::Client, namespace: &str, port: u16) -> Result<Option<Forward>> {
    let address = SocketAddr::from(([127, 0, 0, 1], port));
    let listener = match TcpListener::bind(address).await {
        Ok(l) => l,
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            eprintln!(
                "note: {address} is already in use on this machine; taking it for the operator's listener (a \
                 kubectl port-forward already running). If it is something else, stop it and run this again."
            );
            return Ok(None);
        }
        Err(e) => return Err(PluginError::Refused(format!("cannot listen on {address} for the port-forward: {e}"))),
    };
    let (pod, pod_port) = operator_pod(client, namespace).await?;
    eprintln!("forwarding {address} to the operator's listener in pod {namespace}/{pod} (port {pod_port})");
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let slots = Arc::new(Semaphore::new(FORWARDED_AT_ONCE));
    let taken = Arc::clone(&slots);
    let task = tokio::spawn(async move {
        loop {
            let Ok((socket, _)) = listener.accept().await else {
                // Out of file descriptors, say: try again in a moment rather than spin.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let Ok(permit) = Arc::clone(&slots).acquire_owned().await else { return };
            let (pods, pod) = (pods.clone(), pod.clone());
            tokio::spawn(async move {
                let _permit = permit;
                let _ = tokio::time::timeout(FORWARDED_FOR, relay(socket, &pods, &pod, pod_port)).await;
            });
        }
    });
    Ok(Some(Forward { task, slots: taken }))
}

/// One forwarded connection.
async fn relay(mut socket: TcpStream, pods: &Api<Pod>, pod: &str, port: u16) {
    match pods.portforward(pod, &[port]).await {
        Ok(mut forwarder) => {
            if let Some(mut upstream) = forwarder.take_stream(port) {
                let _ = tokio::io::copy_bidirectional(&mut socket, &mut upstream).await;
                drop(upstream);
            }
            let _ = forwarder.join().await;
        }
        Err(e) => eprintln!("port-forward to {pod} failed: {}", describe(&e)),
    }
}

/// The paste path: one line from stdin (the address the browser ended on) is set as
/// `mailoauth.io/authorization-response`. Nothing happens when stdin is closed. The line is read
/// on a thread of its own, which does not keep the command from ending when the binding turns
/// Ready otherwise.
fn read_pasted(api: Api<MailboxBinding>, name: String) -> tokio::task::JoinHandle<()> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        use std::io::{BufRead, Read};
        let mut line = String::new();
        let read = std::io::stdin().lock().take(MAX_PASTED).read_line(&mut line);
        let _ = tx.send(read.ok().filter(|n| *n > 0).map(|_| line.trim().to_owned()));
    });
    tokio::spawn(async move {
        let Some(line) = rx.await.ok().flatten().filter(|l| !l.is_empty()) else { return };
        match annotate(&api, &name, AUTHORIZATION_RESPONSE_ANNOTATION, &line).await {
            Ok(()) => eprintln!("handed the address to the operator ({AUTHORIZATION_RESPONSE_ANNOTATION})"),
            Err(e) => eprintln!("could not hand the address to the operator: {e}"),
        }
    })
}

/// What the second wait ends with.
enum End {
    /// Ready.
    Ready(Box<MailboxBinding>),
    /// A new code or link replaced the one shown.
    Replaced,
}

/// Runs `authorize`.
pub async fn run(conn: &Connection, args: &AuthorizeArgs) -> Result<()> {
    let ns = conn.namespace.as_str();
    let name = args.name.as_str();
    let api = Api::<MailboxBinding>::namespaced(conn.client.clone(), ns);
    let first = super::wait::read(&api, ns, name).await?.binding;
    match first.spec.grant {
        Grant::DeviceCode {} | Grant::AuthorizationCode {} => {}
        ref other => {
            return Err(PluginError::Refused(format!(
                "{ns}/{name} uses the {} grant, which no person authorizes (kubectl mailoauth refresh {name} asks \
                 for a new token)",
                other.name()
            )));
        }
    }
    if first.spec.suspend {
        return Err(PluginError::Refused(format!("{ns}/{name} is suspended (spec.suspend)")));
    }
    let mailbox = first.spec.mailbox.clone();
    let started = tokio::time::Instant::now();
    let left = || args.timeout.saturating_sub(started.elapsed()).max(Duration::from_secs(1));
    match state(&first) {
        State::Ready => {
            let expiry = first
                .status
                .as_ref()
                .and_then(|s| s.token.as_ref())
                .map(|t| format!(" (the token expires {})", relative(t.expires_at, chrono::Utc::now())));
            println!(
                "{ns}/{name} is authorized and Ready{}; kubectl mailoauth reauthorize {name} starts over",
                expiry.unwrap_or_default()
            );
            return Ok(());
        }
        State::Blocked(reason, fix) => {
            return Err(PluginError::Refused(format!("{ns}/{name} cannot be authorized now: {reason}; fix: {fix}")));
        }
        State::Ended(reason) => {
            let value = unique_value();
            annotate(&api, name, REAUTHORIZE_REQUESTED_ANNOTATION, &value).await?;
            eprintln!("{ns}/{name}: the last authorization ended ({reason}); asked for a new one");
            until(&api, ns, name, left(), |s: &Seen| {
                let acted = s.raw.pointer("/status/lastReauthorizeRequest").and_then(|v| v.as_str()) == Some(&value);
                Ok(if acted { Step::Done(()) } else { Step::Waiting("waiting for the operator to start over".into()) })
            })
            .await?;
        }
        State::Awaiting(_) | State::Working(_) => {}
    }
    let mut forwarded: Option<Forward> = None;
    let mut paste: Option<tokio::task::JoinHandle<()>> = None;
    let result = loop {
        // 1. Until there is something for the person to do.
        let shown = until(&api, ns, name, left(), |s: &Seen| match state(&s.binding) {
            State::Awaiting(a) => Ok(Step::Done(Some(a))),
            State::Ready => Ok(Step::Done(None)),
            State::Ended(reason) => Err(ended(ns, name, &reason)),
            State::Blocked(reason, fix) => Err(PluginError::Failed(format!("{ns}/{name}: {reason}; fix: {fix}"))),
            State::Working(words) => Ok(Step::Waiting(format!("waiting for the operator ({words})"))),
        })
        .await?;
        let Some(shown) = shown else { break Ok(None) };
        // 2. Show it.
        let now = chrono::Utc::now();
        if shown.user_code.is_some() {
            say(&device_instructions(&mailbox, &shown, now));
            if !args.no_browser
                && let Some(url) = shown.verification_uri_complete.as_deref().or(shown.verification_uri.as_deref())
            {
                open_browser(url);
            }
        } else if let Some(url) = shown.url.as_deref() {
            match listener_link(url, ns, name, args.callback_url.as_deref()) {
                Some(link) => {
                    if args.callback_url.is_none()
                        && forwarded.is_none()
                        && let Some(port) = loopback_port(&link)
                    {
                        forwarded = forward(&conn.client, &args.operator_namespace, port).await?;
                    }
                    say(&link_instructions(&mailbox, &link, &shown, now));
                    if !args.no_browser {
                        open_browser(&link);
                    }
                }
                None => {
                    say(&link_instructions(&mailbox, url, &shown, now));
                    say(&format!(
                        "The operator has no authorization listener: after signing in, the browser lands on a page \
                         that does not load. Paste that page's address here and press Enter (or run kubectl annotate \
                         mbx -n {ns} {name} {AUTHORIZATION_RESPONSE_ANNOTATION}='<address>').\n"
                    ));
                    if !args.no_browser {
                        open_browser(url);
                    }
                    if paste.is_none() {
                        paste = Some(read_pasted(api.clone(), name.to_owned()));
                    }
                }
            }
        } else {
            break Err(PluginError::Failed(format!("{ns}/{name} awaits authorization but shows no code or link")));
        }
        // 3. Until the person has done it.
        let end = until(&api, ns, name, left(), |s: &Seen| match state(&s.binding) {
            State::Ready => Ok(Step::Done(End::Ready(Box::new(s.binding.clone())))),
            State::Awaiting(a) if a != shown => Ok(Step::Done(End::Replaced)),
            State::Awaiting(a) => {
                let now = chrono::Utc::now();
                match a.expires_at {
                    Some(at) if now.signed_duration_since(at) > chrono::Duration::seconds(30) => {
                        Err(PluginError::Failed(format!(
                            "the {} expired at {} unused; run kubectl mailoauth authorize {name} again for a new one",
                            if a.user_code.is_some() { "code" } else { "link" },
                            absolute(at)
                        )))
                    }
                    Some(at) => {
                        Ok(Step::Waiting(format!("waiting for {mailbox} to sign in (expires {})", relative(at, now))))
                    }
                    None => Ok(Step::Waiting(format!("waiting for {mailbox} to sign in"))),
                }
            }
            State::Ended(reason) => Err(ended(ns, name, &reason)),
            State::Blocked(reason, fix) => Err(PluginError::Failed(format!("{ns}/{name}: {reason}; fix: {fix}"))),
            State::Working(words) => Ok(Step::Waiting(format!("the operator is completing it ({words})"))),
        })
        .await;
        match end {
            Ok(End::Ready(b)) => break Ok(Some(*b)),
            Ok(End::Replaced) => eprintln!("the operator replaced the code or link; here is the new one"),
            Err(e) => break Err(e),
        }
    };
    if let Some(f) = forwarded {
        // A browser keeps idle connections open: a few seconds, not until they close.
        f.drain(Duration::from_secs(3)).await;
    }
    if let Some(p) = paste {
        p.abort();
    }
    let ready = result?;
    let status = ready.as_ref().and_then(|b| b.status.clone()).unwrap_or_default();
    let account = status.account.map(|a| format!(" as {a}")).unwrap_or_default();
    let expiry = status
        .token
        .map(|t| {
            format!(
                "; the token expires at {} ({})",
                absolute(t.expires_at),
                relative(t.expires_at, chrono::Utc::now())
            )
        })
        .unwrap_or_default();
    println!("{ns}/{name} is Ready: authorized{account}{expiry}");
    Ok(())
}

/// The error of an authorization that ended without a grant, with the operator's fix.
fn ended(ns: &str, name: &str, reason: &str) -> PluginError {
    let fix = Reason::parse(reason).map(Reason::fix).unwrap_or_default();
    PluginError::Failed(format!("{ns}/{name}: {reason}; fix: {fix} (or run {} again)", authorize_hint(ns, name)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{Condition, ConditionStatus, MailboxBindingStatus};

    fn binding(phase: Option<Phase>, conditions: &[(&str, ConditionStatus, &str)]) -> MailboxBinding {
        let spec = serde_json::from_value(serde_json::json!({
            "providerRef": {"name": "idp"}, "mailbox": "a@example.com",
            "grant": {"deviceCode": {}}, "secretName": "a-mail-token"
        }))
        .unwrap();
        let mut b = MailboxBinding::new("a", spec);
        b.metadata.namespace = Some("mail".into());
        b.status = Some(MailboxBindingStatus {
            phase,
            conditions: conditions
                .iter()
                .map(|(t, s, r)| Condition {
                    type_: (*t).into(),
                    status: *s,
                    reason: (*r).into(),
                    message: String::new(),
                    last_transition_time: chrono::Utc::now(),
                    observed_generation: None,
                })
                .collect(),
            ..Default::default()
        });
        b
    }

    #[test]
    fn where_a_binding_stands() {
        use ConditionStatus::{False, True};
        let mut awaiting = binding(Some(Phase::AwaitingAuthorization), &[("Ready", False, "AwaitingAuthorization")]);
        assert_eq!(state(&awaiting), State::Working("AwaitingAuthorization".into()), "no code shown yet");
        let a =
            AuthorizationStatus { method: "deviceCode".into(), user_code: Some("ABCD".into()), ..Default::default() };
        awaiting.status.as_mut().unwrap().authorization = Some(a.clone());
        assert_eq!(state(&awaiting), State::Awaiting(a));
        assert_eq!(state(&binding(Some(Phase::Ready), &[("Ready", True, "TokenValid")])), State::Ready);
        let expired =
            binding(Some(Phase::Error), &[("Ready", False, "Pending"), ("Authorized", False, "AuthorizationExpired")]);
        assert_eq!(state(&expired), State::Ended("AuthorizationExpired".into()));
        let blocked = binding(Some(Phase::Error), &[("Ready", False, "ProviderNotFound")]);
        assert_eq!(state(&blocked), State::Blocked("ProviderNotFound".into(), Reason::ProviderNotFound.fix().into()));
        assert_eq!(state(&binding(None, &[])), State::Working("not reconciled yet".into()));
    }

    #[test]
    fn a_start_link_is_moved_to_another_base_and_a_providers_url_is_no_start_link() {
        let link = "http://localhost:8400/authorize/mail/a?start=abc";
        assert_eq!(listener_link(link, "mail", "a", None).as_deref(), Some(link));
        assert_eq!(
            listener_link(link, "mail", "a", Some("http://127.0.0.1:9000")).as_deref(),
            Some("http://127.0.0.1:9000/authorize/mail/a?start=abc")
        );
        assert_eq!(
            listener_link("https://mail.example.com/oauth/authorize/mail/a?start=x", "mail", "a", None).as_deref(),
            Some("https://mail.example.com/oauth/authorize/mail/a?start=x")
        );
        assert_eq!(listener_link("https://idp.example.com/authorize?client_id=x&state=y", "mail", "a", None), None);
        assert_eq!(listener_link("http://localhost:8400/authorize/mail/b?start=abc", "mail", "a", None), None);
        assert_eq!(loopback_port(link), Some(8400));
        assert_eq!(loopback_port("http://127.0.0.1:9000/authorize/mail/a?start=abc"), Some(9000));
        assert_eq!(loopback_port("http://[::1]:9001/x"), Some(9001));
        assert_eq!(loopback_port("http://localhost/x"), Some(80));
        assert_eq!(loopback_port("https://mail.example.com/authorize/mail/a?start=x"), None);
        assert!(parse_callback_url("http://127.0.0.1:9000/").is_ok_and(|u| u == "http://127.0.0.1:9000"));
        assert!(parse_callback_url("ftp://x").is_err() && parse_callback_url("http://x/?a=b").is_err());
    }

    #[test]
    fn instructions_name_the_code_the_url_and_the_expiry() {
        let now = chrono::DateTime::parse_from_rfc3339("2027-01-15T08:00:00Z").unwrap().with_timezone(&chrono::Utc);
        let a = AuthorizationStatus {
            method: "deviceCode".into(),
            user_code: Some("QZJ4-RRML".into()),
            verification_uri: Some("https://microsoft.com/devicelogin".into()),
            verification_uri_complete: None,
            url: None,
            expires_at: Some(now + chrono::Duration::minutes(15)),
        };
        let text = device_instructions("scanner@contoso.com", &a, now);
        assert_eq!(
            text,
            "To authorize scanner@contoso.com, open\n  https://microsoft.com/devicelogin\nand enter the code\n  \
             QZJ4-RRML\nThe code expires at 2027-01-15T08:15:00Z (in 15m).\n"
        );
        let link = link_instructions("a@example.com", "http://localhost:8400/authorize/mail/a?start=x", &a, now);
        assert!(link.contains("\n  http://localhost:8400/authorize/mail/a?start=x\n") && link.contains("(in 15m)"));
    }
}
