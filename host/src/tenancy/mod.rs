//! Tenants, API keys and policies.
//!
//! A tenant is a name (see [`valid_name`]) that owns functions, invocations
//! and API keys. What a tenant's functions may use — time, memory,
//! concurrency, body sizes, environment variables, volumes, outbound HTTP and
//! the GPU bridge — is its [`Policy`], loaded from a policy directory by
//! [`PolicySet::load`]. API keys are random 256-bit secrets of which the host
//! keeps only the SHA-256 ([`keys`]). The tenants' GPU accounts are kept by
//! [`GpuHost`].
//!
//! Tenancy builds on the runtime (a policy becomes a call's `CallLimits` and
//! `GpuGrant`); the runtime knows nothing of tenants.

mod gpu;
pub mod keys;
pub mod policy;

pub use self::gpu::GpuHost;
pub use self::keys::{GeneratedKey, KeyError};
pub use self::policy::{
    DEFAULT_FILE, GpuBackend, GpuPolicy, InvalidPolicy, Location, Policy, PolicyError, PolicySet,
    ResolvedVolume, Volume, VolumeError, volume_root,
};
pub use crate::runtime::{InvalidOutboundRule, OutboundRule};

/// The longest tenant or function name.
pub const MAX_NAME_LEN: usize = 63;

/// Whether `name` is a valid tenant or function name:
/// `^[a-z0-9][a-z0-9-]{0,62}$`.
///
/// Names appear in URLs, file names (`<tenant>.toml`, volume roots) and
/// store keys, so the alphabet is kept to what is safe in all of them without
/// escaping; no dots means no `.`/`..` path components either.
pub fn valid_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    match bytes.first() {
        Some(first) if first.is_ascii_lowercase() || first.is_ascii_digit() => {}
        _ => return false,
    }
    bytes.len() <= MAX_NAME_LEN
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_names() {
        for name in [
            "a",
            "0",
            "hello",
            "my-func",
            "a-",
            "9lives",
            &"a".repeat(63),
        ] {
            assert!(valid_name(name), "{name:?} should be valid");
        }
    }

    #[test]
    fn invalid_names() {
        for name in [
            "",
            "-a",
            "A",
            "hello_world",
            "héllo",
            "a.b",
            "..",
            "a/b",
            "a b",
            " a",
            &"a".repeat(64),
        ] {
            assert!(!valid_name(name), "{name:?} should be invalid");
        }
    }
}
