//! Reading from a server with the bounds every such read has: a deadline on each read, a cap on
//! a line, and a buffer that grows while a long response streams in and shrinks between
//! responses. One reader serves the IMAP connection, the POP3 client and the STARTTLS/STLS
//! dialogues.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Why a read from the server failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("server did not answer within {0:?}")]
    Timeout(Duration),
    #[error("server closed the connection")]
    Closed,
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("server sent a line over {0} octets")]
    LineTooLong(usize),
}

/// Read at least this much free space into while a long response streams in ...
pub const LARGE_READ: usize = 128 * 1024;
/// ... and this much otherwise.
pub const SMALL_READ: usize = 8 * 1024;

/// Bytes read from a server and not consumed yet.
#[derive(Debug)]
pub struct Reader {
    buf: BytesMut,
    /// How much of the buffer was already searched for a line end.
    scan: usize,
    /// How much to read at a time (grows while reads come back full).
    read_size: usize,
    max_line: usize,
}

impl Reader {
    /// A reader refusing lines longer than `max_line`.
    pub fn new(max_line: usize) -> Reader {
        Reader {
            buf: BytesMut::new(),
            scan: 0,
            read_size: SMALL_READ,
            max_line,
        }
    }

    pub fn buffered(&self) -> &[u8] {
        &self.buf
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Reads more into the buffer (at least `at_least` of free space is offered), with the
    /// deadline; the count read. Reads grow (up to [`LARGE_READ`]) while they come back full,
    /// so a long response costs few reads.
    pub async fn fill<R: AsyncRead + Unpin + ?Sized>(
        &mut self,
        io: &mut R,
        at_least: usize,
        timeout: Duration,
    ) -> Result<usize, ReadError> {
        let want = at_least.max(self.read_size);
        if self.buf.capacity() - self.buf.len() < want / 2 {
            self.buf.reserve(want.max(self.buf.len()));
        }
        let spare = self.buf.capacity() - self.buf.len();
        match tokio::time::timeout(timeout, io.read_buf(&mut self.buf)).await {
            Ok(Ok(0)) => Err(ReadError::Closed),
            Ok(Ok(n)) => {
                if n >= spare {
                    self.read_size = (self.read_size * 2).min(LARGE_READ);
                }
                Ok(n)
            }
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(ReadError::Timeout(timeout)),
        }
    }

    /// A complete line (through its LF) out of the buffer, if there is one.
    pub fn take_line(&mut self) -> Result<Option<BytesMut>, ReadError> {
        match memchr::memchr(b'\n', &self.buf[self.scan..]) {
            Some(i) => {
                let end = self.scan + i + 1;
                self.scan = 0;
                Ok(Some(self.buf.split_to(end)))
            }
            None => {
                self.scan = self.buf.len();
                if self.scan > self.max_line {
                    return Err(ReadError::LineTooLong(self.max_line));
                }
                Ok(None)
            }
        }
    }

    /// The next line, through its LF, reading as needed.
    pub async fn read_line<R: AsyncRead + Unpin + ?Sized>(
        &mut self,
        io: &mut R,
        timeout: Duration,
    ) -> Result<BytesMut, ReadError> {
        loop {
            if let Some(line) = self.take_line()? {
                return Ok(line);
            }
            self.fill(io, SMALL_READ, timeout).await?;
        }
    }

    /// Exactly `n` bytes, reading as needed (`n` is bounded by the caller).
    pub async fn take_exact<R: AsyncRead + Unpin + ?Sized>(
        &mut self,
        io: &mut R,
        n: usize,
        timeout: Duration,
    ) -> Result<Bytes, ReadError> {
        while self.buf.len() < n {
            self.fill(io, n - self.buf.len(), timeout).await?;
        }
        Ok(self.split_to(n).freeze())
    }

    /// Reads and drops `n` bytes.
    pub async fn skip<R: AsyncRead + Unpin + ?Sized>(
        &mut self,
        io: &mut R,
        mut n: u64,
        timeout: Duration,
    ) -> Result<(), ReadError> {
        loop {
            let k = usize::try_from(n).unwrap_or(usize::MAX).min(self.buf.len());
            let _ = self.split_to(k);
            n -= k as u64;
            if n == 0 {
                return Ok(());
            }
            self.fill(io, LARGE_READ, timeout).await?;
        }
    }

    /// The first `n` buffered bytes (`n` at most [`Self::len`]).
    pub fn split_to(&mut self, n: usize) -> BytesMut {
        self.scan = self.scan.saturating_sub(n);
        self.buf.split_to(n)
    }

    /// Between responses, give a grown buffer back (idle connections stay small).
    pub fn shrink_idle(&mut self) {
        if self.buf.is_empty() && self.buf.capacity() > 2 * SMALL_READ {
            self.buf = BytesMut::new();
            self.read_size = SMALL_READ;
            self.scan = 0;
        }
    }

    /// What was read and not consumed, for whoever takes the stream over.
    pub fn into_leftover(self) -> Vec<u8> {
        self.buf.to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn lines_exact_counts_and_bounds() {
        let (mut ours, mut theirs) = tokio::io::duplex(64);
        tokio::spawn(async move {
            for piece in [
                &b"+OK he"[..],
                b"llo\r\nab",
                b"cdef\nrest",
                b"x".repeat(100).as_slice(),
            ] {
                theirs.write_all(piece).await.unwrap();
            }
        });
        let t = Duration::from_secs(5);
        let mut r = Reader::new(50);
        assert_eq!(
            &r.read_line(&mut ours, t).await.unwrap()[..],
            b"+OK hello\r\n"
        );
        assert_eq!(&r.take_exact(&mut ours, 3, t).await.unwrap()[..], b"abc");
        assert_eq!(&r.read_line(&mut ours, t).await.unwrap()[..], b"def\n");
        r.skip(&mut ours, 4, t).await.unwrap();
        assert!(matches!(
            r.read_line(&mut ours, t).await,
            Err(ReadError::LineTooLong(50))
        ));
    }

    #[tokio::test]
    async fn silence_and_close_are_errors() {
        let (mut ours, theirs) = tokio::io::duplex(64);
        let mut r = Reader::new(100);
        assert!(matches!(
            r.read_line(&mut ours, Duration::from_millis(50)).await,
            Err(ReadError::Timeout(_))
        ));
        drop(theirs);
        assert!(matches!(
            r.read_line(&mut ours, Duration::from_secs(1)).await,
            Err(ReadError::Closed)
        ));
    }
}
