//! The bridge's one error type, shaped like `gust:gpu/types.error`.

use std::fmt;

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
/// person can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct BridgeError {
    /// What kind of failure this is.
    pub code: ErrorCode,
    /// What went wrong, naming the operand or limit involved.
    pub message: String,
}

impl BridgeError {
    /// An error with `code` and `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
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
