//! One side of a relayed session: a stream with a bounded line reader, and the two copies that
//! carry a message without reading it as lines (`DATA` up to its `CRLF . CRLF`, `BDAT` by its
//! count). Hand-written (a buffer, the end-of-data scan over `memchr`): every read has a
//! deadline, a line is bounded, a message goes through a read at a time and is never held whole.

use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::mail::Io;

/// Why a read or write stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Nothing came in time.
    #[error("no data in time")]
    Timeout,
    /// The peer closed the connection or it broke.
    #[error("the connection closed")]
    Closed,
    /// A line longer than the bound.
    #[error("a line longer than the limit")]
    LineTooLong,
}

/// The room a line read makes before each read (an idle connection's buffer: the pages it never
/// touches are never resident).
const CHUNK: usize = 16 * 1024;

/// The room a message body's copy makes before each read: fewer reads, writes and wake-ups per
/// megabyte. Only a session that sends a message grows its buffer to it.
const BODY_CHUNK: usize = 64 * 1024;

/// A stream and the bytes read from it but not consumed yet.
pub struct Wire {
    io: Box<dyn Io>,
    buf: BytesMut,
    max_line: usize,
}

impl Wire {
    /// `io`, with `pending` bytes already read from it, lines bounded by `max_line`.
    pub fn new(io: Box<dyn Io>, pending: Vec<u8>, max_line: usize) -> Self {
        Self { io, buf: BytesMut::from(pending.as_slice()), max_line }
    }

    /// The stream, for a TLS handshake; `None` when bytes are pending (they were sent before
    /// the handshake and must not be taken as if they came under TLS).
    pub fn into_stream(self) -> Option<Box<dyn Io>> {
        self.buf.is_empty().then_some(self.io)
    }

    /// The stream and the bytes read from it but not consumed (a client's pipelined command),
    /// for a caller that copies the rest as it is.
    pub fn into_parts(self) -> (Box<dyn Io>, Vec<u8>) {
        (self.io, self.buf.to_vec())
    }

    /// Exactly `count` bytes (an IMAP literal; the caller bounds `count`), each read within
    /// `wait`.
    pub async fn read_exact(&mut self, count: usize, wait: Duration) -> Result<Vec<u8>, WireError> {
        while self.buf.len() < count {
            self.fill(CHUNK, wait).await?;
        }
        Ok(self.buf.split_to(count).to_vec())
    }

    /// Reads what is there into the buffer's spare room (at least `room`; the buffer holds at
    /// most a line or a few held-back bytes of a message before this, so it stays bounded): no
    /// scratch buffer to zero and copy from.
    async fn fill(&mut self, room: usize, wait: Duration) -> Result<(), WireError> {
        self.buf.reserve(room);
        let n = tokio::time::timeout(wait, self.io.read_buf(&mut self.buf))
            .await
            .map_err(|_| WireError::Timeout)?
            .map_err(|_| WireError::Closed)?;
        if n == 0 {
            return Err(WireError::Closed);
        }
        Ok(())
    }

    /// The next line without its line end.
    pub async fn read_line(&mut self, wait: Duration) -> Result<Vec<u8>, WireError> {
        let mut searched = 0;
        loop {
            let unsearched = self.buf.get(searched..).unwrap_or_default();
            if let Some(at) = memchr::memchr(b'\n', unsearched) {
                let end = searched.saturating_add(at);
                if end > self.max_line {
                    return Err(WireError::LineTooLong);
                }
                let line = self.buf.split_to(end.saturating_add(1));
                let mut keep = line.len();
                while keep > 0 && matches!(line.get(keep.saturating_sub(1)), Some(b'\n' | b'\r')) {
                    keep = keep.saturating_sub(1);
                }
                return Ok(line.get(..keep).unwrap_or_default().to_vec());
            }
            if self.buf.len() > self.max_line {
                return Err(WireError::LineTooLong);
            }
            searched = self.buf.len();
            self.fill(CHUNK, wait).await?;
        }
    }

    /// The next line without its line end when the whole of it (within the bound) was read
    /// already: a client's pipelined command, looked at before it is taken with `read_line`.
    pub fn buffered_line(&self) -> Option<&[u8]> {
        let end = memchr::memchr(b'\n', &self.buf).filter(|end| *end <= self.max_line)?;
        let mut line = self.buf.get(..end)?;
        while let Some(shorter) = line.strip_suffix(b"\r") {
            line = shorter;
        }
        Some(line)
    }

    /// Writes `bytes` (and flushes) within `wait`.
    pub async fn write(&mut self, bytes: &[u8], wait: Duration) -> Result<(), WireError> {
        let send = async {
            self.io.write_all(bytes).await?;
            self.io.flush().await
        };
        tokio::time::timeout(wait, send).await.map_err(|_| WireError::Timeout)?.map_err(|_| WireError::Closed)
    }

    /// Writes `line` and CRLF.
    pub async fn write_line(&mut self, line: &str, wait: Duration) -> Result<(), WireError> {
        let mut bytes = Vec::with_capacity(line.len().saturating_add(2));
        bytes.extend_from_slice(line.as_bytes());
        bytes.extend_from_slice(b"\r\n");
        self.write(&bytes, wait).await
    }

    /// Copies the message after `DATA` to `to`, up to and including its `CRLF . CRLF` (as it
    /// is: dot-stuffing stays), a read at a time (one write per read); bytes after the
    /// terminator stay here (a pipelined next command). `Err((side_is_to, e))` names which side
    /// failed.
    pub async fn copy_data(&mut self, to: &mut Wire, wait: Duration) -> Result<u64, (bool, WireError)> {
        let mut scan = DataScan::default();
        let mut copied: u64 = 0;
        loop {
            if !self.buf.is_empty() {
                let scanned = scan.scan(&self.buf);
                let out = match &scanned.normalized {
                    Some(bytes) => bytes.as_slice(),
                    None => self.buf.get(..scanned.consumed).unwrap_or_default(),
                };
                if !out.is_empty() {
                    to.write(out, wait).await.map_err(|e| (true, e))?;
                    copied = copied.saturating_add(u64::try_from(out.len()).unwrap_or(u64::MAX));
                }
                self.buf.advance(scanned.consumed);
                if scanned.end {
                    return Ok(copied);
                }
            }
            self.fill(BODY_CHUNK, wait).await.map_err(|e| (false, e))?;
        }
    }

    /// Copies exactly `count` bytes (a `BDAT` chunk) to `to`.
    pub async fn copy_exact(&mut self, to: &mut Wire, count: u64, wait: Duration) -> Result<(), (bool, WireError)> {
        let mut left = count;
        while left > 0 {
            if self.buf.is_empty() {
                self.fill(BODY_CHUNK, wait).await.map_err(|e| (false, e))?;
            }
            let take = usize::try_from(left).unwrap_or(usize::MAX).min(self.buf.len());
            to.write(self.buf.get(..take).unwrap_or_default(), wait).await.map_err(|e| (true, e))?;
            self.buf.advance(take);
            left = left.saturating_sub(u64::try_from(take).unwrap_or(u64::MAX));
        }
        Ok(())
    }

    /// Shuts the stream down within a second.
    pub async fn close(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(1), self.io.shutdown()).await;
    }
}

/// What one [`DataScan::scan`] found.
#[derive(Debug, PartialEq, Eq)]
struct Scanned {
    /// How many bytes of the input are done with (sent on); the rest (at most a CR, or a dot and
    /// a CR at the start of a line) is held back until the next byte tells what it is.
    consumed: usize,
    /// The terminator ends the consumed bytes.
    end: bool,
    /// The consumed bytes with bare line ends made CRLF, when there were any (else they go on as
    /// they are, uncopied).
    normalized: Option<Vec<u8>>,
}

/// Reads a message after `DATA` as the upstream will: every bare LF and bare CR is taken (and
/// sent on) as CRLF, as Postfix's `smtpd_forbid_bare_newline = normalize` does, so no upstream
/// can find an end of data (`\n.\n`) where the relay found none and read what follows as
/// commands (SMTP smuggling past the sender check). The end is `CRLF . CRLF` of that normalized
/// stream; the message starts as if after a CRLF (the `DATA` line's), so an empty message is
/// `.` CRLF. A line at a time with `memchr` (the bytes between line ends are neither looked at
/// one by one nor copied).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct DataScan {
    /// The bytes so far end with a line end (or none came yet).
    line_start: bool,
}

impl Default for DataScan {
    fn default() -> Self {
        Self { line_start: true }
    }
}

/// Moves `input[*from..upto]` and then `extra` into `out` (made with room on first use).
fn normalize(out: &mut Option<Vec<u8>>, input: &[u8], from: &mut usize, upto: usize, extra: &[u8]) {
    let out = out.get_or_insert_with(|| Vec::with_capacity(input.len().saturating_add(input.len() / 16)));
    out.extend_from_slice(input.get(*from..upto).unwrap_or_default());
    out.extend_from_slice(extra);
    *from = upto;
}

impl DataScan {
    /// Scans `input` (the held-back bytes of the last scan first).
    fn scan(&mut self, input: &[u8]) -> Scanned {
        let mut out = None;
        // `input[..moved]` is in `out` already (when there is one).
        let mut moved = 0;
        let mut at = 0;
        let mut end = false;
        loop {
            if self.line_start && input.get(at) == Some(&b'.') {
                let dot = at;
                match (input.get(dot.saturating_add(1)), input.get(dot.saturating_add(2))) {
                    (None, _) | (Some(b'\r'), None) => break,
                    (Some(b'\n'), _) => {
                        // `.` LF: the end, sent on as `.` CRLF.
                        normalize(&mut out, input, &mut moved, dot.saturating_add(1), b"\r\n");
                        moved = dot.saturating_add(2);
                        at = moved;
                        end = true;
                        break;
                    }
                    (Some(b'\r'), Some(b'\n')) => {
                        at = dot.saturating_add(3);
                        end = true;
                        break;
                    }
                    (Some(b'\r'), Some(_)) => {
                        // `.` and a bare CR: the end, sent on as `.` CRLF.
                        normalize(&mut out, input, &mut moved, dot.saturating_add(2), b"\n");
                        at = moved;
                        end = true;
                        break;
                    }
                    _ => {}
                }
            }
            let rest = input.get(at..).unwrap_or_default();
            let Some(found) = memchr::memchr2(b'\r', b'\n', rest) else {
                if !rest.is_empty() {
                    self.line_start = false;
                }
                at = input.len();
                break;
            };
            let hit = at.saturating_add(found);
            let next = hit.saturating_add(1);
            if input.get(hit) == Some(&b'\r') {
                match input.get(next) {
                    None => {
                        // A CR last: whether it is bare, the next byte tells.
                        self.line_start = false;
                        at = hit;
                        break;
                    }
                    Some(b'\n') => at = next.saturating_add(1),
                    Some(_) => {
                        normalize(&mut out, input, &mut moved, next, b"\n");
                        at = next;
                    }
                }
            } else {
                normalize(&mut out, input, &mut moved, hit, b"\r\n");
                moved = next;
                at = next;
            }
            self.line_start = true;
        }
        if let Some(out) = out.as_mut() {
            out.extend_from_slice(input.get(moved..at).unwrap_or_default());
        }
        if end {
            self.line_start = true;
        }
        Scanned { consumed: at, end, normalized: out }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The model the scan is checked against: a byte at a time, bare LF and CR made CRLF, then
    /// the first `CRLF . CRLF` (after the `DATA` line's CRLF); what goes on, and how many input
    /// bytes it took.
    fn model(input: &[u8]) -> Option<(Vec<u8>, usize)> {
        let mut out = Vec::new();
        let mut pending_cr = false;
        let mut seen = b"\r\n".to_vec();
        for (i, &b) in input.iter().enumerate() {
            let emitted: &[u8] = match (b, pending_cr) {
                (b'\n', true) => b"\n",
                (b'\n', false) => b"\r\n",
                (b'\r', true) => b"\n\r",
                (b'\r', false) => b"\r",
                (_, true) => &[b'\n', b],
                (_, false) => std::slice::from_ref(&input[i]),
            };
            pending_cr = b == b'\r';
            for &e in emitted {
                out.push(e);
                seen.push(e);
                if seen.ends_with(b"\r\n.\r\n") {
                    // The terminator's LF was made for a bare CR: the byte after it stays.
                    let took = if e == b'\n' && b != b'\n' { i } else { i + 1 };
                    return Some((out, took));
                }
            }
        }
        None
    }

    /// Scans `input` in pieces of `step` bytes, as reads would bring them.
    fn scanned(input: &[u8], step: usize) -> Option<(Vec<u8>, usize)> {
        let mut scan = DataScan::default();
        let mut buf = Vec::new();
        let mut out = Vec::new();
        let mut taken = 0;
        for piece in input.chunks(step) {
            buf.extend_from_slice(piece);
            let s = scan.scan(&buf);
            out.extend_from_slice(s.normalized.as_deref().unwrap_or(&buf[..s.consumed]));
            buf.drain(..s.consumed);
            taken += s.consumed;
            if s.end {
                return Some((out, taken));
            }
            assert!(buf.len() <= 2, "at most a dot and a CR held back");
        }
        None
    }

    #[test]
    fn the_end_of_data_is_found_across_reads_and_not_inside_stuffed_dots() {
        let cases: &[&[u8]] = &[
            b".\r\n",
            b"Subject: x\r\n\r\n..stuffed\r\n..\r\nbody\r\n.\r\nQUIT\r\n",
            b"a\r\r\n.\r\nb",
            b"a\n.\n",
            b"a\n.\nQUIT\r\n",
            b"a\r.\rQUIT\r\n",
            b"a\r\n.\rX",
            b"a\r\n.\r\r\n",
            b"\r\r",
            b"no end\r\n. \r\n.x\r\n",
            b"x\r\n.",
        ];
        for input in cases {
            for step in 1..=input.len() {
                assert_eq!(
                    scanned(input, step),
                    model(input),
                    "{:?} read {step} at a time",
                    String::from_utf8_lossy(input)
                );
            }
        }
        assert_eq!(scanned(b"a\n.\n", 4), Some((b"a\r\n.\r\n".to_vec(), 4)));
        assert_eq!(scanned(b"x\r\n.\r\nQUIT\r\n", 64), Some((b"x\r\n.\r\n".to_vec(), 6)));
        assert_eq!(scanned(b"x\r\n.\rQUIT", 64), Some((b"x\r\n.\r\n".to_vec(), 5)), "the Q stays");
    }

    #[test]
    fn a_clean_message_goes_on_uncopied() {
        let mut scan = DataScan::default();
        let s = scan.scan(b"line one\r\nline two\r\n..dot\r\n.\r\nRSET\r\n");
        assert_eq!((s.consumed, s.end, s.normalized), (30, true, None));
    }

    #[test]
    fn the_scan_agrees_with_the_byte_model_on_random_line_ends() {
        // A small fixed generator: the same bytes on every run.
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..3000 {
            let len = (next() % 40) as usize;
            let input: Vec<u8> =
                (0..len).map(|_| [b'a', b'.', b'\r', b'\n', b'\r', b'\n'][(next() % 6) as usize]).collect();
            for step in [1, 2, 3, 7, 64] {
                assert_eq!(
                    scanned(&input, step),
                    model(&input),
                    "{:?} read {step} at a time",
                    String::from_utf8_lossy(&input)
                );
            }
        }
    }
}
