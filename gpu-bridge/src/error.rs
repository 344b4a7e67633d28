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
#[derive(Debug, Clone, thiserror::Error)]
#[error("{code}: {message}")]
pub struct BridgeError {
    /// What kind of failure this is.
    pub code: ErrorCode,
    /// What went wrong, naming the operand or limit involved.
    pub message: String,
    /// The typed error this one was made from. An `Arc` keeps the error
    /// `Clone`, which callers that fan one failure out to several waiters
    /// rely on.
    #[source]
    source: Option<Arc<dyn std::error::Error + Send + Sync + 'static>>,
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
}
