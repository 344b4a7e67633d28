//! The bridge's one error type, shaped like `gust:gpu/types.error`.

use std::fmt;
use std::sync::Arc;

/// Why a bridge call failed; mirrors the WIT `error-code` enum one to one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    /// An argument is out of range or malformed (bad dim, bad bytes).
    InvalidArgument,
    /// Operand shapes or dtypes do not fit the operation.
    ShapeMismatch,
    /// No such model or device.
    NotFound,
    /// The caller's policy does not allow this.
    Forbidden,
    /// The device has no memory left for this request.
    OutOfMemory,
    /// A device-memory or device-time quota is used up, or a queue is full.
    QuotaExceeded,
    /// The caller's deadline passed while waiting for the device.
    Timeout,
    /// The backend failed (driver error, kernel failure).
    Backend,
    /// The backend does not offer this operation, dtype or capability
    /// (including a backend this build was not compiled with).
    Unsupported,
    /// The bridge itself failed: a kernel or another step of an op
    /// panicked on the device. That op failed (its source is a
    /// [`KernelPanicked`]); the device caught the panic and keeps serving
    /// other ops and tenants. Not in the WIT `error-code` enum: the host
    /// reports it to guests as `backend`.
    Internal,
}

impl ErrorCode {
    /// The WIT spelling of the code, for logs and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidArgument => "invalid-argument",
            Self::ShapeMismatch => "shape-mismatch",
            Self::NotFound => "not-found",
            Self::Forbidden => "forbidden",
            Self::OutOfMemory => "out-of-memory",
            Self::QuotaExceeded => "quota-exceeded",
            Self::Timeout => "timeout",
            Self::Backend => "backend",
            Self::Unsupported => "unsupported",
            Self::Internal => "internal",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed bridge call: a code a program can branch on and a message a
/// person can act on, and the lower-level error behind it where there is
/// one (a driver or library error), as its [`std::error::Error::source`].
///
/// Equality compares code and message only: the source is already spelled
/// out in the message, and library errors rarely compare.
#[derive(Debug, Clone)]
pub struct BridgeError {
    /// What kind of failure this is.
    pub code: ErrorCode,
    /// What went wrong, naming the operand or limit involved.
    pub message: String,
    /// The typed error this one was made from. An `Arc` keeps the error
    /// `Clone`, which callers that fan one failure out to several waiters
    /// rely on.
    source: Option<Arc<dyn std::error::Error + Send + Sync + 'static>>,
}

impl fmt::Display for BridgeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

// By hand rather than derived: thiserror's `#[source]` on an `Arc<dyn
// Error>` hands out the `Arc` itself (it implements `Error`), so callers
// could not downcast the source to its type ([`KernelPanicked`], a driver
// error). This hands out the error inside.
impl std::error::Error for BridgeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|source| source as &(dyn std::error::Error + 'static))
    }
}

impl PartialEq for BridgeError {
    fn eq(&self, other: &Self) -> bool {
        self.code == other.code && self.message == other.message
    }
}

impl Eq for BridgeError {}

impl BridgeError {
    /// An error with `code` and `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            source: None,
        }
    }

    /// This error, caused by `source` (which its message should already
    /// describe; the source is kept for programs that walk the chain).
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Arc::new(source));
        self
    }

    /// `invalid-argument`.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidArgument, message)
    }

    /// `shape-mismatch`.
    pub fn shape(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::ShapeMismatch, message)
    }

    /// `backend`.
    pub fn backend(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Backend, message)
    }

    /// `unsupported`.
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unsupported, message)
    }

    /// The stand-in answer of a backend this build does not include.
    pub fn not_compiled(backend: &str) -> Self {
        Self::unsupported(format!(
            "this host was not compiled with the {backend} backend (cargo feature `{backend}`)"
        ))
    }
}

/// The typed cause of an [`ErrorCode::Internal`] error: a panic caught on
/// the device (in a kernel, an allocation or a copy) instead of letting it
/// unwind through the device's worker, which would stop the device for
/// every tenant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{step} panicked: {message}")]
pub struct KernelPanicked {
    /// What was running: a kernel's name, or the step (`upload`, `read`).
    pub step: String,
    /// The panic's message, where it carried one.
    pub message: String,
}

impl KernelPanicked {
    /// Describe a panic caught while `step` ran, from its payload.
    pub fn new(step: impl Into<String>, payload: &(dyn std::any::Any + Send)) -> Self {
        // `panic!` carries a `&str` or a `String`; anything else (a payload
        // from `panic_any`) has no message to show.
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".to_owned());
        Self {
            step: step.into(),
            message,
        }
    }
}

impl From<KernelPanicked> for BridgeError {
    fn from(panic: KernelPanicked) -> Self {
        Self::new(
            ErrorCode::Internal,
            format!(
                "{panic}; the op failed, the device keeps serving (a bug in the bridge: please report it)"
            ),
        )
        .with_source(panic)
    }
}

/// Run `f`, turning a panic inside it into an [`ErrorCode::Internal`] error
/// about `step`. Device code is shared by every tenant, so a bug one input
/// reaches must fail that op, not the device.
pub(crate) fn contain<T>(step: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    // The state a panicking op leaves half-written is its own output (never
    // handed out) and the backend's scratch, which every op overwrites
    // before it reads; nothing else is observed across the unwind.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .unwrap_or_else(|payload| Err(KernelPanicked::new(step, payload.as_ref()).into()))
}

/// Shorthand for results of bridge calls.
pub type Result<T, E = BridgeError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_source_is_kept_but_not_compared() {
        let io = std::io::Error::other("disk on fire");
        let with = BridgeError::backend("reading weights: disk on fire").with_source(io);
        let without = BridgeError::backend("reading weights: disk on fire");
        assert_eq!(with, without);
        assert_eq!(with.to_string(), "backend: reading weights: disk on fire");
        let source = std::error::Error::source(&with).map(ToString::to_string);
        assert_eq!(source.as_deref(), Some("disk on fire"));
        assert!(std::error::Error::source(&without).is_none());
        assert!(std::error::Error::source(&with.clone()).is_some());
    }

    #[test]
    fn a_contained_panic_is_an_internal_error_with_a_typed_source() {
        let err = contain::<()>("exp", || panic!("index out of bounds")).unwrap_err();
        assert_eq!(err.code, ErrorCode::Internal);
        assert!(
            err.message.contains("exp panicked: index out of bounds"),
            "{err}"
        );
        let source = std::error::Error::source(&err)
            .and_then(|s| s.downcast_ref::<KernelPanicked>())
            .cloned();
        assert_eq!(
            source,
            Some(KernelPanicked {
                step: "exp".into(),
                message: "index out of bounds".into()
            })
        );
        let formatted = contain::<()>("read", || panic!("{} bytes", 3)).unwrap_err();
        assert!(
            formatted.message.contains("read panicked: 3 bytes"),
            "{formatted}"
        );
        assert_eq!(contain("relu", || Ok(7)), Ok(7));
    }
}
