//! What a caller can do to a call while it runs: cancel it, and receive the
//! output the function streams (`gust:function/output`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use tokio::sync::{Notify, mpsc};

use super::bindings::gust::function::output;

/// Cancels a running call: the guest is interrupted at its next epoch tick
/// (the same mechanism as its deadline) and the call ends as
/// [`Outcome::Cancelled`](super::Outcome::Cancelled). Clones share one flag.
#[derive(Debug, Clone, Default)]
pub struct Cancel(Arc<CancelInner>);

#[derive(Debug, Default)]
struct CancelInner {
    flag: AtomicBool,
    notify: Notify,
}

impl Cancel {
    /// A token that is not cancelled yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks the call to stop. Idempotent.
    pub fn cancel(&self) {
        self.0.flag.store(true, Ordering::Release);
        self.0.notify.notify_waiters();
    }

    /// Whether [`Cancel::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.0.flag.load(Ordering::Acquire)
    }

    /// Resolves once the token is cancelled.
    pub async fn cancelled(&self) {
        loop {
            let notified = self.0.notify.notified();
            tokio::pin!(notified);
            // Registered before the flag is read, so a `cancel` in between
            // still wakes this waiter.
            notified.as_mut().enable();
            if self.is_cancelled() {
                return;
            }
            notified.await;
        }
    }
}

/// Per-call controls beyond the policy's limits.
#[derive(Debug, Clone, Default)]
pub struct CallControl {
    /// Lets the caller stop the call.
    pub cancel: Option<Cancel>,
    /// Where emitted chunks go as they are emitted. Without it they are kept
    /// (up to `output_limit`) and put in front of the response body.
    pub stream: Option<mpsc::Sender<Bytes>>,
    /// The most bytes a non-streaming call may emit (0: as many as the
    /// call's memory limit; emitted output is held on the host, so it is
    /// never unbounded).
    pub output_limit: usize,
}

/// A host API refused the guest more of a bounded resource (emitted
/// output, say); the call ends as [`Outcome::LimitExceeded`](super::Outcome::LimitExceeded).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub(crate) struct LimitExceeded {
    /// What was refused and which limit it hit.
    pub(crate) message: String,
}

impl LimitExceeded {
    fn trap(message: String) -> wasmtime::Error {
        wasmtime::Error::new(Self { message })
    }
}

/// Where a call's emitted output goes.
#[derive(Debug)]
pub(crate) enum OutputSink {
    /// Kept, to be prepended to the response body.
    Buffer { data: Vec<u8>, limit: usize },
    /// Sent to the caller as it comes.
    Stream {
        sender: mpsc::Sender<Bytes>,
        cancel: Cancel,
    },
    /// A `wasi:http` call: its answer is the response it writes through
    /// `wasi:http`, and nothing would ever read emitted output, so an emit
    /// (or a streaming `generate`) fails the call rather than piling bytes
    /// up on the host.
    Refused,
}

impl Default for OutputSink {
    /// What a store holds between calls: no caller to emit to.
    fn default() -> Self {
        Self::Refused
    }
}

impl OutputSink {
    /// The kept output, if any (empty for a streaming sink).
    pub(crate) fn take_buffer(&mut self) -> Vec<u8> {
        match self {
            Self::Buffer { data, .. } => std::mem::take(data),
            Self::Stream { .. } | Self::Refused => Vec::new(),
        }
    }

    /// Sends `chunk` to the call's caller (see `gust:function/output`).
    /// Host imports may use it too: a model's `generate` can stream each
    /// token to a streaming caller as it is produced, without a round trip
    /// through the guest.
    pub(crate) async fn emit(&mut self, chunk: Vec<u8>) -> wasmtime::Result<()> {
        match self {
            Self::Buffer { data, limit } => {
                if data.len().saturating_add(chunk.len()) > *limit {
                    return Err(LimitExceeded::trap(format!(
                        "the function's emitted output exceeds the limit of {limit} bytes"
                    )));
                }
                data.extend_from_slice(&chunk);
                Ok(())
            }
            Self::Stream { sender, cancel } => {
                if sender.send(Bytes::from(chunk)).await.is_err() {
                    // Nobody will read what comes next: stop the guest
                    // rather than let it run to its deadline.
                    cancel.cancel();
                    return Err(wasmtime::format_err!("the caller went away"));
                }
                Ok(())
            }
            Self::Refused => Err(LimitExceeded::trap(
                "a wasi:http function may emit no output (it answers with its wasi:http \
                 response): `gust:function/output` and a streaming `generate` are for handler \
                 functions"
                    .to_owned(),
            )),
        }
    }
}

impl output::Host for OutputSink {
    async fn emit(&mut self, chunk: Vec<u8>) -> wasmtime::Result<()> {
        OutputSink::emit(self, chunk).await
    }
}
