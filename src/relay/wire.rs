//! One side of a relayed session: a stream with a bounded line reader, and the two copies that
//! carry a message without reading it as lines (`DATA` up to its `CRLF . CRLF`, `BDAT` by its
//! count). Hand-written (a buffer, a five-state matcher): every read has a deadline, a line is
//! bounded, a message goes through in chunks and is never held whole.

use std::time::Duration;

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

const CHUNK: usize = 16 * 1024;

/// A stream and the bytes read from it but not consumed yet.
pub struct Wire {
    io: Box<dyn Io>,
    buf: Vec<u8>,
    max_line: usize,
}

impl Wire {
    /// `io`, with `pending` bytes already read from it, lines bounded by `max_line`.
    pub fn new(io: Box<dyn Io>, pending: Vec<u8>, max_line: usize) -> Self {
        Self { io, buf: pending, max_line }
    }

    /// The stream, for a TLS handshake; `None` when bytes are pending (they were sent before
    /// the handshake and must not be taken as if they came under TLS).
    pub fn into_stream(self) -> Option<Box<dyn Io>> {
        self.buf.is_empty().then_some(self.io)
    }

    /// The stream and the bytes read from it but not consumed (a client's pipelined command),
    /// for a caller that copies the rest as it is.
    pub fn into_parts(self) -> (Box<dyn Io>, Vec<u8>) {
        (self.io, self.buf)
    }

    /// Exactly `count` bytes (an IMAP literal; the caller bounds `count`), each read within
    /// `wait`.
    pub async fn read_exact(&mut self, count: usize, wait: Duration) -> Result<Vec<u8>, WireError> {
        while self.buf.len() < count {
            self.fill(wait).await?;
        }
        let rest = self.buf.split_off(count);
        Ok(std::mem::replace(&mut self.buf, rest))
    }

    /// Reads what is there into the buffer's spare room (at least a chunk; the buffer is at most
    /// a line and a chunk before this, so its room is bounded too): no scratch buffer to zero and
    /// copy from.
    async fn fill(&mut self, wait: Duration) -> Result<(), WireError> {
        self.buf.reserve(CHUNK);
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
        loop {
            if let Some(end) = self.buf.iter().position(|b| *b == b'\n') {
                if end > self.max_line {
                    return Err(WireError::LineTooLong);
                }
                let rest = self.buf.split_off(end.saturating_add(1));
                let mut line = std::mem::replace(&mut self.buf, rest);
                while line.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                    line.pop();
                }
                return Ok(line);
            }
            if self.buf.len() > self.max_line {
                return Err(WireError::LineTooLong);
            }
            self.fill(wait).await?;
        }
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
    /// is: dot-stuffing stays), in chunks; bytes after the terminator stay here (a pipelined
    /// next command). `Err((side_is_to, e))` names which side failed.
    pub async fn copy_data(&mut self, to: &mut Wire, wait: Duration) -> Result<u64, (bool, WireError)> {
        let mut matcher = EndOfData::default();
        let mut copied: u64 = 0;
        let mut pending_cr = false;
        loop {
            if self.buf.is_empty() {
                self.fill(wait).await.map_err(|e| (false, e))?;
            }
            // Line ends as the relay reads them are the line ends the upstream gets: a bare LF or
            // CR becomes CRLF (as Postfix's `smtpd_forbid_bare_newline = normalize`), so no
            // upstream can find an end of data (`\n.\n`) where the relay found none and read what
            // follows as commands (SMTP smuggling past the sender check).
            self.buf = crlf(&self.buf, &mut pending_cr);
            let end = matcher.scan(&self.buf);
            let rest = match end {
                Some(n) => self.buf.split_off(n),
                None => Vec::new(),
            };
            let chunk = std::mem::replace(&mut self.buf, rest);
            to.write(&chunk, wait).await.map_err(|e| (true, e))?;
            copied = copied.saturating_add(u64::try_from(chunk.len()).unwrap_or(u64::MAX));
            if end.is_some() {
                return Ok(copied);
            }
        }
    }

    /// Copies exactly `count` bytes (a `BDAT` chunk) to `to`.
    pub async fn copy_exact(&mut self, to: &mut Wire, count: u64, wait: Duration) -> Result<(), (bool, WireError)> {
        let mut left = count;
        while left > 0 {
            if self.buf.is_empty() {
                self.fill(wait).await.map_err(|e| (false, e))?;
            }
            let take = usize::try_from(left).unwrap_or(usize::MAX).min(self.buf.len());
            let rest = self.buf.split_off(take);
            let chunk = std::mem::replace(&mut self.buf, rest);
            to.write(&chunk, wait).await.map_err(|e| (true, e))?;
            left = left.saturating_sub(u64::try_from(take).unwrap_or(u64::MAX));
        }
        Ok(())
    }

    /// Shuts the stream down within a second.
    pub async fn close(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(1), self.io.shutdown()).await;
    }
}

/// `input` with every bare LF and bare CR made CRLF; `pending_cr`: the bytes before ended with a
/// CR (whose LF, if any, comes first in `input`).
fn crlf(input: &[u8], pending_cr: &mut bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(input.len().saturating_add(input.len() / 16));
    for &b in input {
        match (b, *pending_cr) {
            (b'\n', true) => out.push(b'\n'),
            (b'\n', false) => out.extend_from_slice(b"\r\n"),
            (b'\r', true) => out.extend_from_slice(b"\n\r"),
            (b'\r', false) => out.push(b'\r'),
            (other, true) => out.extend_from_slice(&[b'\n', other]),
            (other, false) => out.push(other),
        }
        *pending_cr = b == b'\r';
    }
    out
}

/// Finds `CRLF . CRLF` across chunks; the message starts as if after a CRLF (the `DATA` line's),
/// so an empty message is `.` CRLF.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct EndOfData {
    matched: usize,
}

impl Default for EndOfData {
    fn default() -> Self {
        Self { matched: 2 }
    }
}

const TERMINATOR: &[u8; 5] = b"\r\n.\r\n";

impl EndOfData {
    /// The length of `bytes` up to and including the terminator, when it ends in them.
    fn scan(&mut self, bytes: &[u8]) -> Option<usize> {
        for (i, b) in bytes.iter().enumerate() {
            if TERMINATOR.get(self.matched) == Some(b) {
                self.matched = self.matched.saturating_add(1);
            } else {
                self.matched = usize::from(*b == b'\r');
            }
            if self.matched == TERMINATOR.len() {
                self.matched = 2;
                return Some(i.saturating_add(1));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_line_ends_become_crlf_across_chunks() {
        let mut cr = false;
        assert_eq!(super::crlf(b"a\nb\r\nc\rd", &mut cr), b"a\r\nb\r\nc\r\nd");
        assert!(!cr);
        assert_eq!(super::crlf(b"x\r", &mut cr), b"x\r");
        assert!(cr);
        assert_eq!(super::crlf(b"\n.\n", &mut cr), b"\n.\r\n", "the CR's LF came in the next chunk");
        let mut cr = false;
        assert_eq!(super::crlf(b"\r\r", &mut cr), b"\r\n\r");
        assert_eq!(super::crlf(b"z", &mut cr), b"\nz");
    }

    #[test]
    fn the_end_of_data_is_found_across_chunks_and_not_inside_stuffed_dots() {
        let mut m = EndOfData::default();
        assert_eq!(m.scan(b".\r\n"), Some(3));
        let mut m = EndOfData::default();
        assert_eq!(m.scan(b"Subject: x\r\n\r\n..stuffed\r\n.."), None);
        assert_eq!(m.scan(b"\r\nbody\r"), None);
        assert_eq!(m.scan(b"\n.\r"), None);
        assert_eq!(m.scan(b"\nQUIT\r\n"), Some(1));
        let mut m = EndOfData::default();
        assert_eq!(m.scan(b"a\r\r\n.\r\nb"), Some(7));
        let mut m = EndOfData::default();
        assert_eq!(m.scan(b"a\n.\n"), None);
    }
}
