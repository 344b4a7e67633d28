//! What an invocation produced, classified.

use std::fmt;
use std::time::Duration;

use super::capture::CapturedOutput;

/// The input of one invocation of a `gust:function/handler` component.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Request {
    /// The body, as the caller sent it.
    pub body: Vec<u8>,
    /// The body's media type.
    pub content_type: String,
    /// Headers passed through to the function.
    pub headers: Vec<(String, String)>,
    /// The host's id of this invocation.
    pub invocation_id: String,
}

/// A function's successful response.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Response {
    /// HTTP status.
    pub status: u16,
    /// Media type of `body`.
    pub content_type: String,
    /// Extra headers.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

/// An error a function returned on purpose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestError {
    /// The function's machine-readable code.
    pub code: String,
    /// The function's explanation.
    pub message: String,
    /// The HTTP status the function asked for.
    pub status: Option<u16>,
}

impl GuestError {
    /// The status to answer with: the function's own if it is an error
    /// status, else 500.
    pub fn http_status(&self) -> u16 {
        self.status
            .filter(|s| (400..=599).contains(s))
            .unwrap_or(500)
    }
}

/// How an invocation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// The function returned a response.
    Ok(Response),
    /// The function returned its own error.
    GuestError(GuestError),
    /// The deadline passed; the guest was interrupted.
    Timeout {
        /// The deadline that was exceeded.
        limit: Duration,
    },
    /// The guest asked for more memory than its limit: linear memory, or
    /// host memory held for it (wasi-nn tensors), which count together.
    OutOfMemory {
        /// The limit, in bytes.
        limit_bytes: u64,
        /// The total the guest asked to grow to.
        requested_bytes: u64,
    },
    /// The guest exhausted its WebAssembly stack.
    StackOverflow {
        /// The guest backtrace at the overflow (innermost frames first).
        backtrace: String,
    },
    /// The guest trapped: a panic, an `unreachable`, an out-of-bounds access.
    Trap {
        /// The trap, e.g. "wasm `unreachable` instruction executed".
        message: String,
        /// The guest's panic message, if its stderr has one.
        panic_message: Option<String>,
        /// The guest backtrace (innermost frames first).
        backtrace: String,
    },
    /// A host API refused the guest more of a bounded resource than its
    /// limits allow (emitted output beyond its limit, say).
    LimitExceeded {
        /// What was refused and which limit it hit.
        message: String,
    },
    /// The caller cancelled the call (or went away while it streamed); the
    /// guest was interrupted.
    Cancelled,
    /// The host had no capacity for another instance right now; retry later.
    Overloaded {
        /// Which limit was reached.
        reason: String,
    },
    /// The host failed for a reason that is not the guest's fault.
    HostError {
        /// What went wrong.
        message: String,
    },
}

impl Outcome {
    /// A stable, machine-readable name of the outcome's kind.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Ok(_) => "ok",
            Self::GuestError(_) => "guest-error",
            Self::Timeout { .. } => "timeout",
            Self::OutOfMemory { .. } => "out-of-memory",
            Self::StackOverflow { .. } => "stack-overflow",
            Self::Trap { .. } => "trap",
            Self::LimitExceeded { .. } => "limit-exceeded",
            Self::Cancelled => "cancelled",
            Self::Overloaded { .. } => "overloaded",
            Self::HostError { .. } => "host-error",
        }
    }

    /// True for [`Outcome::Ok`].
    pub fn is_ok(&self) -> bool {
        matches!(self, Self::Ok(_))
    }
}

impl fmt::Display for Outcome {
    /// A one-line summary, suitable for a CLI error or a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ok(response) => write!(f, "ok ({})", response.status),
            Self::GuestError(e) => write!(
                f,
                "the function returned error `{}` ({}): {}",
                e.code,
                e.http_status(),
                e.message
            ),
            Self::Timeout { limit } => {
                write!(f, "timed out after {}", humantime::format_duration(*limit))
            }
            Self::OutOfMemory {
                limit_bytes,
                requested_bytes,
            } => write!(
                f,
                "out of memory: asked for {} (linear memory and host-held tensors together), limit is {}",
                bytesize::ByteSize::b(*requested_bytes).display().iec(),
                bytesize::ByteSize::b(*limit_bytes).display().iec()
            ),
            Self::StackOverflow { .. } => write!(f, "stack overflow (call stack exhausted)"),
            Self::Trap {
                message,
                panic_message,
                ..
            } => match panic_message {
                Some(panic) => write!(f, "panicked: {panic}"),
                None => write!(f, "trapped: {message}"),
            },
            Self::LimitExceeded { message } => write!(f, "limit exceeded: {message}"),
            Self::Cancelled => write!(f, "cancelled"),
            Self::Overloaded { reason } => write!(f, "host overloaded: {reason}"),
            Self::HostError { message } => write!(f, "host error: {message}"),
        }
    }
}

/// Time spent in the phases of an invocation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timings {
    /// Creating the store and instantiating the component.
    pub instantiate: Duration,
    /// Running the handler.
    pub call: Duration,
    /// The call ran in an instance an earlier call left behind (see
    /// [`Reuse`](super::Reuse)); `instantiate` was then only the store's
    /// preparation.
    pub reused: bool,
    /// The call ran in a fresh instance made ready before it came (see
    /// [`Ready`](super::Ready)); `instantiate` was then only the store's
    /// preparation.
    pub ready: bool,
}

/// Everything known about one finished invocation.
#[derive(Debug, Clone)]
pub struct Invocation {
    /// How it ended.
    pub outcome: Outcome,
    /// What the guest wrote to stdout (bounded).
    pub stdout: CapturedOutput,
    /// What the guest wrote to stderr (bounded).
    pub stderr: CapturedOutput,
    /// Phase timings.
    pub timings: Timings,
    /// The most linear memory the instance held at once, in bytes.
    pub peak_memory_bytes: u64,
    /// Why outgoing requests were refused (the egress policy's reasons),
    /// a bounded list.
    pub egress_denied: Vec<String>,
}

impl Invocation {
    /// An invocation that never reached the guest.
    pub fn host_error(message: &str) -> Self {
        Self {
            outcome: Outcome::HostError {
                message: message.to_owned(),
            },
            stdout: CapturedOutput::default(),
            stderr: CapturedOutput::default(),
            timings: Timings::default(),
            peak_memory_bytes: 0,
            egress_denied: Vec::new(),
        }
    }
}

/// A new invocation id, `inv_<12 hex: start time in ms><16 hex: random>`:
/// ids sort by start time and do not repeat.
pub fn new_invocation_id(started_at_millis: u64) -> String {
    // The thread's CSPRNG (seeded from the OS, reseeded as it goes): a
    // getrandom syscall per call showed in the request path's profile.
    let random: [u8; 8] = rand::random();
    format!("inv_{started_at_millis:012x}{}", hex::encode(random))
}

/// Finds the panic message Rust's default hook writes to stderr:
/// `thread '…' panicked at src/lib.rs:3:5:\nthe message`.
pub(crate) fn panic_message(stderr: &str) -> Option<String> {
    let mut lines = stderr.lines();
    while let Some(line) = lines.next() {
        if line.contains("panicked at") {
            let message: Vec<&str> = lines
                .by_ref()
                .take_while(|l| !l.starts_with("note:") && !l.is_empty())
                .collect();
            let location = line
                .split_once("panicked at ")
                .map(|(_, at)| at.trim_end_matches(':'))
                .unwrap_or_default();
            return Some(if message.is_empty() {
                line.to_owned()
            } else {
                format!("{} (at {location})", message.join("\n"))
            });
        }
        if let Some(alloc) = line.strip_prefix("memory allocation of ") {
            return Some(format!("memory allocation of {alloc}"));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extracts_the_panic_message_and_location() {
        let stderr = "\nthread '<unnamed>' panicked at src/lib.rs:4:5:\nboom\nnote: run with `RUST_BACKTRACE=1`\n";
        assert_eq!(
            panic_message(stderr).as_deref(),
            Some("boom (at src/lib.rs:4:5)")
        );
        assert_eq!(panic_message("nothing here"), None);
    }

    #[test]
    fn guest_error_status_falls_back_to_500() {
        let mut e = GuestError {
            code: "x".into(),
            message: "y".into(),
            status: Some(422),
        };
        assert_eq!(e.http_status(), 422);
        e.status = Some(200);
        assert_eq!(e.http_status(), 500);
        e.status = None;
        assert_eq!(e.http_status(), 500);
    }
}
