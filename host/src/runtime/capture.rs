//! Bounded capture of a guest's stdout and stderr.
//!
//! A guest that writes more than the bound is not failed: writes keep
//! succeeding, the excess is dropped and counted. Failing the write would make
//! Rust's `println!` panic and turn a chatty function into a crashed one.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

#[derive(Debug, Default)]
struct Buffer {
    kept: Vec<u8>,
    dropped: u64,
}

/// A cloneable handle to one bounded capture buffer.
#[derive(Debug, Clone)]
pub struct BoundedCapture {
    limit: usize,
    buffer: Arc<Mutex<Buffer>>,
}

/// What a guest wrote to one stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CapturedOutput {
    /// The first bytes written, up to the limit.
    pub bytes: Vec<u8>,
    /// How many further bytes were written and dropped.
    pub dropped_bytes: u64,
}

impl CapturedOutput {
    /// The captured bytes as text (invalid UTF-8 replaced).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }

    /// True when the guest wrote more than the limit.
    pub fn truncated(&self) -> bool {
        self.dropped_bytes > 0
    }
}

impl BoundedCapture {
    /// A capture that keeps at most `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            buffer: Arc::new(Mutex::new(Buffer::default())),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Buffer> {
        // A poisoned buffer still holds valid bytes; a panic elsewhere must not
        // lose the guest's output.
        self.buffer.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn append(&self, data: &[u8]) {
        let mut buffer = self.lock();
        let room = self.limit.saturating_sub(buffer.kept.len());
        let kept = room.min(data.len());
        buffer.kept.extend_from_slice(&data[..kept]);
        buffer.dropped += (data.len() - kept) as u64;
    }

    /// Take what was captured so far, leaving the buffer empty.
    pub fn take(&self) -> CapturedOutput {
        let mut buffer = self.lock();
        CapturedOutput {
            bytes: std::mem::take(&mut buffer.kept),
            dropped_bytes: std::mem::take(&mut buffer.dropped),
        }
    }
}

impl IsTerminal for BoundedCapture {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for BoundedCapture {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }

    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
}

/// Permit size handed to the guest per `check-write`; the capture never blocks.
const WRITE_PERMIT: usize = 64 << 10;

#[wasmtime_wasi::async_trait]
impl Pollable for BoundedCapture {
    async fn ready(&mut self) {}
}

#[wasmtime_wasi::async_trait]
impl OutputStream for BoundedCapture {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.append(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(WRITE_PERMIT)
    }
}

impl AsyncWrite for BoundedCapture {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.append(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_up_to_the_limit_and_counts_the_rest() {
        let capture = BoundedCapture::new(5);
        capture.append(b"abc");
        capture.append(b"defg");
        let out = capture.take();
        assert_eq!(out.bytes, b"abcde");
        assert_eq!(out.dropped_bytes, 2);
        assert!(out.truncated());
        assert_eq!(capture.take(), CapturedOutput::default());
    }

    #[test]
    fn writes_through_the_wasi_stream_never_fail() {
        let capture = BoundedCapture::new(2);
        let mut stream = capture.p2_stream();
        for _ in 0..3 {
            assert!(stream.check_write().is_ok());
            assert!(stream.write(Bytes::from_static(b"xyz")).is_ok());
        }
        assert_eq!(capture.take().dropped_bytes, 7);
    }
}
