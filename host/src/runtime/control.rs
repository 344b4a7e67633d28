//! What a caller can do to a call while it runs: cancel it, and receive the
//! output the function streams (`gust:function/output`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};

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
    /// The trace the call belongs to: its outgoing requests carry it on
    /// (`traceparent`), so that the APIs a function calls join the
    /// caller's trace.
    pub trace: Option<crate::trace::TraceContext>,
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
        /// Bytes emitted but not yet written out (see
        /// [`STREAM_BUFFER_BYTES`]): each chunk holds permits until the
        /// caller's side drops it.
        unsent: Arc<Semaphore>,
    },
    /// A `wasi:http` call: its answer is the response it writes through
    /// `wasi:http`, and nothing would ever read emitted output, so an emit
    /// (or a streaming `generate`) fails the call rather than piling bytes
    /// up on the host.
    Refused,
}

/// Emitted bytes a streaming call may have on their way to its caller (in
/// the channel, in the connection's buffers) before its next emit waits.
/// Counted in bytes, not chunks: eight chunks of a guest's whole memory
/// would otherwise sit on the host per stream. A chunk larger than this
/// waits until nothing else is in flight, then goes alone.
pub(crate) const STREAM_BUFFER_BYTES: usize = 1 << 20;

/// A chunk on its way to the caller, holding its share of the stream's
/// buffer until it is dropped (written out, or dropped with the caller).
struct InFlight {
    data: Vec<u8>,
    _permit: OwnedSemaphorePermit,
}

impl AsRef<[u8]> for InFlight {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

impl OutputSink {
    /// A sink that sends to `sender` as the guest emits.
    pub(crate) fn stream(sender: mpsc::Sender<Bytes>, cancel: Cancel) -> Self {
        Self::Stream {
            sender,
            cancel,
            unsent: Arc::new(Semaphore::new(STREAM_BUFFER_BYTES)),
        }
    }
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
            Self::Stream {
                sender,
                cancel,
                unsent,
            } => {
                // At least one permit, so that empty chunks queue too; at
                // most the whole buffer, so that a big chunk can go at all.
                let share = chunk.len().clamp(1, STREAM_BUFFER_BYTES);
                let share = u32::try_from(share).unwrap_or(u32::MAX);
                // Never closed: the semaphore lives as long as the sink.
                let Ok(permit) = Arc::clone(unsent).acquire_many_owned(share).await else {
                    return Err(wasmtime::format_err!("the stream's buffer was closed"));
                };
                let held = Bytes::from_owner(InFlight {
                    data: chunk,
                    _permit: permit,
                });
                if sender.send(held).await.is_err() {
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A streaming caller that does not read holds up the guest after
    /// [`STREAM_BUFFER_BYTES`] of output, whatever the chunks' count; what
    /// it drops frees room again.
    #[tokio::test]
    async fn streamed_output_in_flight_is_bounded_in_bytes() {
        let (sender, mut receiver) = mpsc::channel(1000);
        let mut sink = OutputSink::stream(sender, Cancel::new());
        let half = STREAM_BUFFER_BYTES / 2;
        sink.emit(vec![1; half]).await.unwrap();
        sink.emit(vec![2; half]).await.unwrap();
        let blocked = tokio::time::timeout(Duration::from_millis(50), sink.emit(vec![3; 10])).await;
        assert!(blocked.is_err(), "a third chunk waits for room");
        let first = receiver.recv().await.unwrap();
        assert_eq!(first.len(), half);
        drop(first);
        tokio::time::timeout(Duration::from_secs(5), sink.emit(vec![3; 10]))
            .await
            .expect("room again once the caller took a chunk")
            .unwrap();
        // A chunk bigger than the whole buffer still goes, alone.
        drop(receiver.recv().await);
        drop(receiver.recv().await);
        sink.emit(vec![4; STREAM_BUFFER_BYTES * 2]).await.unwrap();
        assert_eq!(
            receiver.recv().await.unwrap().len(),
            STREAM_BUFFER_BYTES * 2
        );
    }

    /// A wasi:http call has no caller for emitted output: refused, with
    /// the outcome that says so.
    #[tokio::test]
    async fn a_refusing_sink_refuses() {
        let error = OutputSink::Refused.emit(b"x".to_vec()).await.unwrap_err();
        assert!(error.downcast_ref::<LimitExceeded>().is_some(), "{error:#}");
    }
}
