//! API keys: generation, hashing, comparison, `Authorization` parsing and the
//! on-disk secret files (`<data-dir>/admin.key`, `<data-dir>/demo.key`).
//!
//! A key is `gust_` followed by 32 random bytes in unpadded base64url (43
//! characters). The host stores only its SHA-256 ([`hash`]) and compares
//! digests with [`constant_time_eq`]. A fast hash is the right tool here:
//! slow, salted password hashes (argon2, bcrypt) exist to make guessing
//! low-entropy human passwords expensive, but a 256-bit random key cannot be
//! guessed however fast the hash is, and hashing on every request must be
//! cheap.

use std::fmt;
use std::fs::File;
use std::io::{self, Read as _};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;

/// Every secret starts with this, so leaked keys are recognisable by secret
/// scanners and a key pasted into the wrong place is obvious.
pub const SECRET_PREFIX: &str = "gust_";
/// Every key id starts with this.
pub const ID_PREFIX: &str = "key_";
/// Random bytes in a secret.
pub const SECRET_BYTES: usize = 32;
/// Length of a secret: the prefix plus 43 base64url characters.
pub const SECRET_LEN: usize = SECRET_PREFIX.len() + 43;

/// Secret files hold one key and a newline; anything much larger is not ours.
const MAX_SECRET_FILE_BYTES: u64 = 1024;

/// Errors from generating keys and reading or writing secret files.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The operating system's random number generator failed.
    #[error("cannot get random bytes from the operating system: {0}")]
    Random(getrandom::Error),
    /// Reading or writing a secret file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The secret file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A secret file exists but does not hold a key.
    #[error("{}: does not hold a Gust key (`gust_` and 43 base64url characters)", path.display())]
    Malformed {
        /// The secret file.
        path: PathBuf,
    },
}

/// A freshly generated API key. The secret is shown to its owner once and
/// never stored; only [`hash`] of it is.
#[derive(Clone, PartialEq, Eq)]
pub struct GeneratedKey {
    /// Public identifier, `key_<8 hex digits>`: safe to log and list.
    pub id: String,
    /// The bearer secret, `gust_<43 base64url characters>`.
    pub secret: String,
}

impl GeneratedKey {
    /// The SHA-256 of the secret: what the store keeps.
    pub fn hash(&self) -> [u8; 32] {
        hash(&self.secret)
    }
}

// Hand-written so that logging a key (or a struct holding one) never leaks
// the secret.
impl fmt::Debug for GeneratedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GeneratedKey")
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// Generates a new key: a random id and a random 256-bit secret.
///
/// Ids are only 32 bits, enough to tell a tenant's keys apart in listings
/// but not globally unique by construction: whoever stores them must reject
/// (and regenerate on) a collision.
pub fn generate() -> Result<GeneratedKey, KeyError> {
    let mut id = [0u8; 4];
    getrandom::fill(&mut id).map_err(KeyError::Random)?;
    let mut secret = [0u8; SECRET_BYTES];
    getrandom::fill(&mut secret).map_err(KeyError::Random)?;
    Ok(GeneratedKey {
        id: format!("{ID_PREFIX}{}", hex::encode(id)),
        secret: format!("{SECRET_PREFIX}{}", URL_SAFE_NO_PAD.encode(secret)),
    })
}

/// The SHA-256 of a secret (all of it, prefix included).
pub fn hash(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Compares two digests in time independent of where they differ, so
/// response timing reveals nothing about a stored hash.
pub fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.ct_eq(b).into()
}

/// The token of an `Authorization: Bearer <token>` header value, or `None`
/// if the scheme is not `Bearer` (compared case-insensitively, as RFC 9110
/// requires) or the token is empty or contains whitespace.
pub fn parse_bearer(header_value: &str) -> Option<&str> {
    let value = header_value.trim();
    let (scheme, token) = value.split_once(|c: char| c.is_ascii_whitespace())?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = token.trim();
    if token.is_empty() || token.chars().any(char::is_whitespace) {
        return None;
    }
    Some(token)
}

/// Whether `s` has the shape of a Gust secret: the prefix, the length and a
/// canonical base64url encoding of 32 bytes. Lets the server answer `401`
/// for obvious garbage without touching the store.
pub fn looks_like_key(s: &str) -> bool {
    let Some(encoded) = s.strip_prefix(SECRET_PREFIX) else {
        return false;
    };
    if s.len() != SECRET_LEN
        || !encoded
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return false;
    }
    // Decoding also rejects a last character with non-zero padding bits,
    // which no generated key has.
    let mut out = [0u8; SECRET_BYTES + 3];
    matches!(
        URL_SAFE_NO_PAD.decode_slice(encoded, &mut out),
        Ok(SECRET_BYTES)
    )
}

/// Writes `secret` (and a newline) to `path`, readable and writable by the
/// owner only (mode 0600), replacing any existing file atomically: readers see
/// the old file or the complete new one, never a partial key.
///
/// The file is created with mode 0600 from the start (never widened and then
/// narrowed), in the same directory as `path` so the final rename cannot
/// cross file systems.
pub fn write_secret_file(path: &Path, secret: &str) -> Result<(), KeyError> {
    crate::fsutil::write_atomically(path, format!("{secret}\n").as_bytes()).map_err(|source| {
        KeyError::Io {
            path: path.to_path_buf(),
            source,
        }
    })
}

/// Reads a secret written by [`write_secret_file`] (or by hand), ignoring
/// surrounding whitespace. A file that does not hold a well-formed key is an
/// error: a truncated or hand-mangled key file should stop the host rather
/// than lock everyone out. A file readable by group or others is accepted
/// with a warning (the operator may have chosen that), like a key left in
/// the environment.
pub fn read_secret_file(path: &Path) -> Result<String, KeyError> {
    let io_err = |source| KeyError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io_err)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = file.metadata().map_err(io_err)?.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format_args!("{:o}", mode & 0o777),
                "secret file is accessible to other users; it should be mode 0600"
            );
        }
    }
    let mut contents = String::new();
    file.take(MAX_SECRET_FILE_BYTES + 1)
        .read_to_string(&mut contents)
        .map_err(|e| match e.kind() {
            io::ErrorKind::InvalidData => KeyError::Malformed {
                path: path.to_path_buf(),
            },
            _ => io_err(e),
        })?;
    let secret = contents.trim();
    if !looks_like_key(secret) {
        return Err(KeyError::Malformed {
            path: path.to_path_buf(),
        });
    }
    Ok(secret.to_owned())
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    #[test]
    fn generated_keys_have_the_documented_shape() {
        let key = generate().unwrap();
        assert_eq!(key.id.len(), 12);
        assert!(key.id.starts_with("key_"));
        assert!(
            key.id[4..]
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        );
        assert_eq!(key.secret.len(), 48);
        assert!(key.secret.starts_with("gust_"));
        assert!(looks_like_key(&key.secret));
        let decoded = URL_SAFE_NO_PAD.decode(&key.secret[5..]).unwrap();
        assert_eq!(decoded.len(), 32);
    }

    #[test]
    fn generated_keys_differ() {
        let a = generate().unwrap();
        let b = generate().unwrap();
        assert_ne!(a.secret, b.secret);
        assert_ne!(a.hash(), b.hash());
    }

    #[test]
    fn debug_hides_the_secret() {
        let key = generate().unwrap();
        let shown = format!("{key:?}");
        assert!(shown.contains(&key.id));
        assert!(!shown.contains(&key.secret));
        assert!(!shown.contains(&key.secret[5..]));
    }

    #[test]
    fn hash_is_sha256_of_the_whole_secret() {
        // sha256("abc"), FIPS 180-2 test vector.
        assert_eq!(
            hex::encode(hash("abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let key = generate().unwrap();
        assert_eq!(key.hash(), hash(&key.secret));
        assert_ne!(hash(&key.secret), hash(&key.secret[5..]));
    }

    #[test]
    fn constant_time_eq_compares() {
        let a = hash("one");
        let b = hash("two");
        assert!(constant_time_eq(&a, &a));
        assert!(constant_time_eq(&a, &hash("one")));
        assert!(!constant_time_eq(&a, &b));
        let mut c = a;
        c[31] ^= 1;
        assert!(!constant_time_eq(&a, &c));
    }

    #[test]
    fn parse_bearer_accepts() {
        assert_eq!(parse_bearer("Bearer abc"), Some("abc"));
        assert_eq!(parse_bearer("bearer abc"), Some("abc"));
        assert_eq!(parse_bearer("BEARER abc"), Some("abc"));
        assert_eq!(parse_bearer("  Bearer   abc  "), Some("abc"));
        assert_eq!(parse_bearer("Bearer\tabc"), Some("abc"));
        let key = generate().unwrap();
        assert_eq!(
            parse_bearer(&format!("Bearer {}", key.secret)),
            Some(key.secret.as_str())
        );
    }

    #[test]
    fn parse_bearer_rejects() {
        for value in [
            "",
            "   ",
            "Bearer",
            "Bearer ",
            "Bearer    ",
            "Bearerabc",
            "Basic abc",
            "Token abc",
            "abc",
            "Bearer abc def",
            "Bearer abc\tdef",
        ] {
            assert_eq!(parse_bearer(value), None, "{value:?}");
        }
    }

    #[test]
    fn looks_like_key_checks_prefix_length_and_alphabet() {
        let key = generate().unwrap().secret;
        assert!(looks_like_key(&key));
        assert!(looks_like_key(&format!("gust_{}", "A".repeat(43))));
        // Wrong prefix.
        assert!(!looks_like_key(&format!("gost_{}", &key[5..])));
        assert!(!looks_like_key(&key[5..]));
        // Wrong length.
        assert!(!looks_like_key(&key[..47]));
        assert!(!looks_like_key(&format!("{key}A")));
        assert!(!looks_like_key("gust_"));
        assert!(!looks_like_key(""));
        // Wrong alphabet: standard base64, padding, whitespace, non-ASCII.
        assert!(!looks_like_key(&format!("gust_{}+", &"A".repeat(42))));
        assert!(!looks_like_key(&format!("gust_{}/", &"A".repeat(42))));
        assert!(!looks_like_key(&format!("gust_{}=", &"A".repeat(42))));
        assert!(!looks_like_key(&format!("gust_{} ", &"A".repeat(42))));
        assert!(!looks_like_key(&format!("gust_{}é", &"A".repeat(41))));
        // Non-canonical final character (its low padding bits are set).
        assert!(!looks_like_key(&format!("gust_{}B", &"A".repeat(42))));
    }

    #[cfg(unix)]
    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt as _;
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn secret_file_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.key");
        let key = generate().unwrap();
        write_secret_file(&path, &key.secret).unwrap();
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            format!("{}\n", key.secret)
        );
        #[cfg(unix)]
        assert_eq!(mode(&path), 0o600);
        assert_eq!(read_secret_file(&path).unwrap(), key.secret);
        // No temporary files are left behind.
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["admin.key"]);
    }

    #[test]
    fn write_secret_file_replaces_and_narrows_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("demo.key");
        fs::write(&path, "old contents").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        }
        let key = generate().unwrap();
        write_secret_file(&path, &key.secret).unwrap();
        assert_eq!(read_secret_file(&path).unwrap(), key.secret);
        #[cfg(unix)]
        assert_eq!(mode(&path), 0o600);
    }

    #[test]
    fn write_secret_file_reports_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing").join("admin.key");
        let err = write_secret_file(&path, "gust_x").unwrap_err();
        assert!(matches!(err, KeyError::Io { .. }));
        assert!(err.to_string().contains("admin.key"), "{err}");
    }

    #[test]
    fn read_secret_file_trims_whitespace() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.key");
        let key = generate().unwrap();
        fs::write(&path, format!("  {}\r\n\n", key.secret)).unwrap();
        assert_eq!(read_secret_file(&path).unwrap(), key.secret);
    }

    #[test]
    fn read_secret_file_rejects_bad_contents() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.key");
        let key = generate().unwrap();
        for contents in [
            String::new(),
            "not a key".to_owned(),
            key.secret[..40].to_owned(),
            format!("{0}\n{0}\n", key.secret),
            "x".repeat(5000),
        ] {
            fs::write(&path, &contents).unwrap();
            let err = read_secret_file(&path).unwrap_err();
            assert!(matches!(err, KeyError::Malformed { .. }), "{contents:?}");
            assert!(err.to_string().contains("admin.key"));
        }
        fs::write(&path, [0xff, 0xfe, 0x00]).unwrap();
        assert!(matches!(
            read_secret_file(&path),
            Err(KeyError::Malformed { .. })
        ));
    }

    #[test]
    fn read_secret_file_missing_is_io_not_found() {
        let dir = tempfile::tempdir().unwrap();
        match read_secret_file(&dir.path().join("nope.key")) {
            Err(KeyError::Io { source, .. }) => assert_eq!(source.kind(), io::ErrorKind::NotFound),
            other => panic!("unexpected {other:?}"),
        }
    }
}
