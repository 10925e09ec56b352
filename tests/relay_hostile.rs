//! The relay binary (`mail-oauth-operator relay --secret-dir`) against hostile clients, measured
//! on the real process (its `VmRSS` and `VmHWM` from `/proc`): a client sending a line of 100 MB
//! before the login, over SMTP and IMAP, is answered and closed and the relay's peak memory does
//! not move by more than a few MiB; 1,000 connections that never speak hold every slot
//! (`--max-connections 1000`), the next one is refused with a one-line answer, each of the 1,000
//! is closed after the pre-login idle bound (`--login-idle-timeout`), and another client is
//! served once the slots are free. From the machine's own non-loopback address (the listeners on
//! `0.0.0.0`, no TLS): no login is offered and the password is refused before the relay would
//! look at it. No upstream is needed: nobody logs in.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects,
    clippy::cast_precision_loss
)]

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The relay process, killed on drop.
struct Relay(Child);

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Relay {
    /// `VmRSS` and `VmHWM` (peak) in KiB.
    fn memory(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.0.id())).unwrap();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .unwrap()
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    fn alive(&mut self) -> bool {
        self.0.try_wait().unwrap().is_none()
    }
}

/// Connects and reads the greeting line.
async fn greeted(port: u16) -> BufReader<TcpStream> {
    let mut c = BufReader::new(TcpStream::connect(("127.0.0.1", port)).await.unwrap());
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(10), c.read_line(&mut line)).await.unwrap().unwrap();
    assert!(line.starts_with("220 ") || line.starts_with("* OK"), "{line}");
    c
}

/// Writes `prefix` then 100 MB without a line end, in 1 MiB pieces, until the relay stops taking
/// them; then what the relay answered before it closed.
async fn hundred_megabyte_line(port: u16, prefix: &[u8]) -> (usize, String) {
    let mut c = greeted(port).await;
    c.get_mut().write_all(prefix).await.unwrap();
    let piece = vec![b'a'; 1024 * 1024];
    let mut sent = 0;
    while sent < 100 {
        match tokio::time::timeout(Duration::from_secs(10), c.get_mut().write_all(&piece)).await {
            Ok(Ok(())) => sent += 1,
            Ok(Err(_)) => break,
            Err(_) => panic!("the relay neither read nor closed for 10 s"),
        }
    }
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut answer)).await;
    (sent, String::from_utf8_lossy(&answer).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_mb_line_and_1000_silent_connections_are_bounded_on_the_real_relay() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::create_dir_all(&secret).unwrap();
    for (key, value) in [
        ("username", "box@example.com"),
        ("relay_password", "a relay password that nobody sends here"),
        ("smtp_host", "127.0.0.1"),
        ("smtp_port", "9"),
        ("imap_host", "127.0.0.1"),
        ("imap_port", "9"),
    ] {
        std::fs::write(secret.join(key), value).unwrap();
    }
    let (smtp, imap, admin) = (free_port(), free_port(), free_port());
    let idle = Duration::from_secs(3);
    let child = Command::new(env!("CARGO_BIN_EXE_mail-oauth-operator"))
        .arg("relay")
        .arg("--secret-dir")
        .arg(&secret)
        .args(["--smtp-address", &format!("0.0.0.0:{smtp}"), "--imap-address", &format!("0.0.0.0:{imap}")])
        .args(["--listen-address", &format!("127.0.0.1:{admin}")])
        .args(["--max-connections", "1000", "--login-idle-timeout", "3s", "--allow-private-endpoints"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut relay = Relay(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", smtp)).is_err() {
        assert!(relay.alive(), "the relay exited");
        assert!(Instant::now() < deadline, "the relay did not listen within 20 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Warm up: a whole short session on each listener, so the runtime's and the allocator's
    // first allocations are in the baseline.
    for port in [smtp, imap] {
        let mut c = greeted(port).await;
        c.get_mut()
            .write_all(if port == smtp { b"EHLO warm\r\nQUIT\r\n" } else { b"a CAPABILITY\r\na LOGOUT\r\n" })
            .await
            .unwrap();
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut rest)).await.unwrap().unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (base_rss, base_peak) = relay.memory();

    // A line of 100 MB before the login: an answer, the connection closed, memory flat.
    let (sent, answer) = hundred_megabyte_line(smtp, b"EHLO ").await;
    assert!(answer.contains("500 5.5.6 Line too long"), "{sent} MiB taken: {answer}");
    assert!(sent < 100, "the relay took all 100 MiB of one line");
    let (sent, answer) = hundred_megabyte_line(imap, b"a1 LOGIN ").await;
    assert!(sent < 100, "the relay took all 100 MiB of one line: {answer}");
    let (_, peak) = relay.memory();
    assert!(relay.alive());
    assert!(peak < base_peak + 4 * 1024, "peak {peak} KiB after two 100 MB lines, {base_peak} KiB before");

    // 1,000 connections that never speak: every slot taken.
    let started = Instant::now();
    let mut silent = Vec::new();
    for _ in 0..1000 {
        silent.push(TcpStream::connect(("127.0.0.1", smtp)).await.unwrap());
    }
    // The 1,001st: the one-line refusal, then closed.
    let mut extra = TcpStream::connect(("127.0.0.1", imap)).await.unwrap();
    let mut refusal = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), extra.read_to_end(&mut refusal)).await.unwrap().unwrap();
    assert_eq!(String::from_utf8_lossy(&refusal), "* BYE [UNAVAILABLE] Too many connections, try again later\r\n");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (rss, _) = relay.memory();
    let per_connection = (rss.saturating_sub(base_rss)) as f64 / 1000.0;
    eprintln!("1,000 silent connections: {rss} KiB, {base_rss} KiB before: {per_connection:.1} KiB each");
    assert!(per_connection < 32.0, "{per_connection:.1} KiB per silent connection");
    // Each is greeted, then closed with a word after the idle bound, not before.
    let closes = silent.into_iter().map(|tcp| {
        tokio::spawn(async move {
            let mut heard = Vec::new();
            tokio::time::timeout(Duration::from_secs(20), BufReader::new(tcp).read_to_end(&mut heard))
                .await
                .unwrap()
                .unwrap();
            (String::from_utf8_lossy(&heard).into_owned(), Instant::now())
        })
    });
    for close in futures::future::join_all(closes).await {
        let (heard, at) = close.unwrap();
        assert!(heard.starts_with("220 ") && heard.ends_with("421 4.4.2 Idle timeout, closing\r\n"), "{heard}");
        assert!(at.duration_since(started) >= idle - Duration::from_millis(100), "closed early");
    }
    eprintln!("all 1,000 closed within {:?} of the first connect", started.elapsed());
    // The slots are free again: a client is served.
    let mut c = greeted(smtp).await;
    c.get_mut().write_all(b"EHLO after\r\n").await.unwrap();
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(10), c.read_line(&mut line)).await.unwrap().unwrap();
    assert!(line.starts_with("250"), "{line}");
    let (rss, peak) = relay.memory();
    eprintln!("after: {rss} KiB (peak {peak} KiB)");
    assert!(relay.alive());
    no_login_in_clear_from_the_network(smtp, imap).await;
}

/// This machine's address on its default route (no packet is sent: a UDP socket is connected).
fn network_address() -> std::net::IpAddr {
    let probe = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    probe.connect("192.0.2.1:9").expect("a default route (the test needs a non-loopback address)");
    let ip = probe.local_addr().unwrap().ip();
    assert!(!ip.is_loopback() && !ip.is_unspecified(), "{ip}");
    ip
}

/// Over the network without TLS (and the relay has no certificate to offer STARTTLS): SMTP
/// offers no `AUTH` and answers one with 538; IMAP says `LOGINDISABLED` and refuses `LOGIN` with
/// `[PRIVACYREQUIRED]`.
async fn no_login_in_clear_from_the_network(smtp: u16, imap: u16) {
    let ip = network_address();
    let mut c = BufReader::new(TcpStream::connect((ip, smtp)).await.unwrap());
    let mut heard = String::new();
    c.get_mut()
        .write_all(b"EHLO network\r\nAUTH PLAIN AGJveEBleGFtcGxlLmNvbQBwYXNzd29yZA==\r\nQUIT\r\n")
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), c.read_to_string(&mut heard)).await.unwrap().unwrap();
    assert!(!heard.contains("AUTH") && !heard.contains("STARTTLS"), "{heard}");
    assert!(heard.contains("538 5.7.11 "), "{heard}");
    let mut c = BufReader::new(TcpStream::connect((ip, imap)).await.unwrap());
    let mut heard = String::new();
    c.get_mut().write_all(b"a CAPABILITY\r\nb LOGIN box@example.com password\r\nc LOGOUT\r\n").await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), c.read_to_string(&mut heard)).await.unwrap().unwrap();
    assert!(heard.contains("LOGINDISABLED") && !heard.contains("AUTH=PLAIN"), "{heard}");
    assert!(heard.contains("b NO [PRIVACYREQUIRED]"), "{heard}");
}
