//! On-disk cache of compiled components.
//!
//! Entries are keyed by (component sha256, engine fingerprint); the engine
//! fingerprint covers the Wasmtime version and every compiler and tunable
//! setting (`Engine::precompile_compatibility_hash`), so a host with another
//! configuration never picks up an incompatible artifact.
//!
//! Deserializing compiled code is `unsafe`: the bytes are mapped and executed
//! as machine code. So an entry is loaded only if it carries a MAC made with a
//! secret key that this host generated and keeps (mode 0600) in the cache
//! directory, and what is loaded is the very bytes that were checked. A
//! corrupt, truncated or foreign file fails the check and is recompiled,
//! never loaded.

use std::fs::{self, File};
use std::hash::{Hash, Hasher};
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::{Digest as _, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

use crate::digest::Digest;

type HmacSha256 = Hmac<Sha256>;

const KEY_FILE: &str = "cache.key";
const KEY_LEN: usize = 32;

/// Errors of the compiled-component cache.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CacheError {
    /// The cache directory or a file in it could not be read or written.
    #[error("compiled-component cache at {path}: {source}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The operating system's random source failed.
    #[error("could not generate the cache key: {0}")]
    Random(#[source] getrandom::Error),
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> CacheError + '_ {
    move |source| CacheError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The result of looking a component up in the cache.
pub(crate) enum Lookup {
    /// A verified entry, deserialized.
    Hit(Component),
    /// No entry.
    Miss,
    /// An entry exists but failed verification or deserialization; it must
    /// be recompiled.
    Rejected(String),
}

/// The compiled-component cache of one engine.
pub(crate) struct CompileCache {
    dir: PathBuf,
    key: [u8; KEY_LEN],
    fingerprint: [u8; 32],
}

/// Feeds `Hash` output into SHA-256, to turn the engine's compatibility hash
/// into a stable fingerprint (std's `DefaultHasher` is not stable across
/// Rust releases).
struct Sha256Hasher(Sha256);

impl Hasher for Sha256Hasher {
    fn finish(&self) -> u64 {
        let digest = self.0.clone().finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        u64::from_le_bytes(first)
    }

    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

impl CompileCache {
    /// Opens (creating if needed) the cache directory of `engine`.
    pub(crate) fn open(dir: &Path, engine: &Engine) -> Result<Self, CacheError> {
        fs::create_dir_all(dir).map_err(io_error(dir))?;
        let key = load_or_create_key(dir)?;
        let mut hasher = Sha256Hasher(Sha256::new());
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let fingerprint: [u8; 32] = hasher.0.finalize().into();
        Ok(Self {
            dir: dir.to_owned(),
            key,
            fingerprint,
        })
    }

    fn entry_path(&self, digest: &Digest) -> PathBuf {
        let mut name = Sha256::new();
        name.update(digest.as_bytes());
        name.update(self.fingerprint);
        self.dir
            .join(format!("{}.cwasm", hex::encode(name.finalize())))
    }

    fn mac_path(entry: &Path) -> PathBuf {
        entry.with_extension("cwasm.mac")
    }

    fn mac(&self, digest: &Digest, artifact: &[u8]) -> HmacSha256 {
        // new_from_slice only fails for invalid key lengths, and HMAC takes any.
        let mut mac = <HmacSha256 as Mac>::new_from_slice(&self.key)
            .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
        mac.update(digest.as_bytes());
        mac.update(&self.fingerprint);
        mac.update(artifact);
        mac
    }

    /// Path of the entry for `digest` (whether or not it exists).
    pub(crate) fn path_for(&self, digest: &Digest) -> PathBuf {
        self.entry_path(digest)
    }

    /// Looks up and, if verified, deserializes the entry for `digest`.
    pub(crate) fn load(&self, engine: &Engine, digest: &Digest) -> Lookup {
        let entry = self.entry_path(digest);
        let artifact = match fs::read(&entry) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Lookup::Miss,
            Err(e) => return Lookup::Rejected(format!("unreadable: {e}")),
        };
        let tag = match fs::read(Self::mac_path(&entry)) {
            Ok(tag) => tag,
            Err(e) => return Lookup::Rejected(format!("no valid MAC file: {e}")),
        };
        if self.mac(digest, &artifact).verify_slice(&tag).is_err() {
            return Lookup::Rejected("MAC mismatch (corrupt or not written by this host)".into());
        }
        // SAFETY: the file's MAC was made with this host's secret key over these
        // exact bytes, so it is an artifact this host serialized itself with a
        // compatible engine (the fingerprint is part of the MAC). The code is
        // loaded from the bytes just verified, not from the file again: a file
        // swapped or rewritten after the check never reaches the engine.
        match unsafe { Component::deserialize(engine, &artifact) } {
            Ok(component) => Lookup::Hit(component),
            Err(e) => Lookup::Rejected(format!("deserialization failed: {e}")),
        }
    }

    /// Removes the entry for `digest`, if any (its component is gone).
    pub(crate) fn remove(&self, digest: &Digest) -> Result<(), CacheError> {
        let entry = self.entry_path(digest);
        for path in [Self::mac_path(&entry), entry] {
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_error(&path)(e)),
            }
        }
        Ok(())
    }

    /// Removes every entry but those of `keep` for this engine: artifacts of
    /// components no longer deployed, and of engines this host no longer
    /// runs (a Wasmtime upgrade changes the fingerprint). Returns how many
    /// files went.
    pub(crate) fn retain(&self, keep: &[Digest]) -> Result<usize, CacheError> {
        let kept: std::collections::HashSet<PathBuf> =
            keep.iter().map(|d| self.entry_path(d)).collect();
        let mut removed = 0;
        for entry in fs::read_dir(&self.dir).map_err(io_error(&self.dir))? {
            let entry = entry.map_err(io_error(&self.dir))?;
            let path = entry.path();
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            // The MAC file goes with its artifact; the key and anything
            // else stay.
            let artifact = match name.strip_suffix(".mac") {
                Some(artifact) => self.dir.join(artifact),
                None => path.clone(),
            };
            let is_entry = artifact
                .extension()
                .is_some_and(|extension| extension == "cwasm");
            if !is_entry || kept.contains(&artifact) {
                continue;
            }
            match fs::remove_file(&path) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_error(&path)(e)),
            }
        }
        Ok(removed)
    }

    /// Stores a serialized artifact for `digest`, atomically.
    pub(crate) fn store(&self, digest: &Digest, artifact: &[u8]) -> Result<(), CacheError> {
        let entry = self.entry_path(digest);
        let tag = self.mac(digest, artifact).finalize().into_bytes();
        // The artifact goes first: a crash between the two renames leaves an
        // entry whose MAC is missing or stale, which is rejected and rebuilt.
        write_atomically(&entry, artifact)?;
        write_atomically(&Self::mac_path(&entry), &tag)
    }
}

fn load_or_create_key(dir: &Path) -> Result<[u8; KEY_LEN], CacheError> {
    let path = dir.join(KEY_FILE);
    match File::open(&path) {
        Ok(mut file) => {
            let mut key = [0u8; KEY_LEN];
            let mut extra = [0u8; 1];
            let complete =
                file.read_exact(&mut key).is_ok() && file.read(&mut extra).ok() == Some(0);
            if complete {
                return Ok(key);
            }
            tracing::warn!(path = %path.display(), "cache key is malformed; replacing it (all cached artifacts will be recompiled)");
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_error(&path)(e)),
    }
    let mut key = [0u8; KEY_LEN];
    getrandom::fill(&mut key).map_err(CacheError::Random)?;
    write_atomically(&path, &key)?;
    Ok(key)
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), CacheError> {
    crate::fsutil::write_atomically(path, bytes).map_err(io_error(path))
}
