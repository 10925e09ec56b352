//! The operator process: `crds` prints the CRDs; `run` serves /healthz at once, keeps /readyz at
//! 503 while its caches cannot sync (here the API server is unreachable), and exits cleanly on
//! SIGTERM.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Kills the child if the test fails before it has exited.
struct Reaper(std::process::Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

fn http_status(port: u16, path: &str) -> Option<u16> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").ok()?;
    let mut out = String::new();
    stream.read_to_string(&mut out).ok()?;
    out.split_whitespace().nth(1)?.parse().ok()
}

#[test]
fn crds_prints_the_three_definitions() {
    let out = Command::new(env!("CARGO_BIN_EXE_mail-oauth-operator")).arg("crds").output().expect("runs");
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).expect("utf-8");
    for name in ["mailproviders.mailoauth.io", "clustermailproviders.mailoauth.io", "mailboxbindings.mailoauth.io"] {
        assert!(text.contains(&format!("name: {name}")), "{name} missing");
    }
}

#[test]
fn run_is_live_at_once_not_ready_without_synced_caches_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://127.0.0.1:1\n    insecure-skip-tls-verify: true\nusers:\n- name: u\n  user:\n    token: not-a-real-token\ncontexts:\n- name: x\n  context:\n    cluster: c\n    user: u\ncurrent-context: x\n",
    )
    .expect("write kubeconfig");
    let port = free_port();
    let mut child = Reaper(
        Command::new(env!("CARGO_BIN_EXE_mail-oauth-operator"))
            .args(["run", "--listen-address", &format!("127.0.0.1:{port}"), "--log-format", "json"])
            .env("KUBECONFIG", &kubeconfig)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starts"),
    );

    let deadline = Instant::now() + Duration::from_secs(20);
    while http_status(port, "/healthz") != Some(200) {
        assert!(Instant::now() < deadline, "/healthz did not answer 200 within 20 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(http_status(port, "/readyz"), Some(503));

    let killed = Command::new("kill").args(["-TERM", &child.0.id().to_string()]).status().expect("kill");
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.0.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "the operator did not stop within 20 s of SIGTERM");
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut log = String::new();
    child.0.stdout.take().expect("stdout").read_to_string(&mut log).expect("read");
    assert!(status.success(), "exit {status}; log:\n{log}");
    assert!(log.contains("shutdown signal received"), "log:\n{log}");
    assert!(log.lines().all(|l| l.starts_with('{')), "--log-format json writes JSON lines:\n{log}");
    assert!(!log.contains("not-a-real-token"), "the credential leaked into the log");
}
