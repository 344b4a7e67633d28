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
//! directory, and what is loaded is the very file that was checked. A
//! corrupt, truncated or foreign file fails the check and is recompiled,
//! never loaded.
//!
//! The MAC is keyed BLAKE3 over the whole artifact, checked at every load
//! (a restart included): a 35 MB Python artifact hashes in a few
//! milliseconds, where HMAC-SHA256 over a copy read into memory took ~80 ms.
//! Nothing is sampled or skipped: a single flipped byte anywhere fails it.
//! The file is read once, in small chunks, through one open descriptor, and
//! Wasmtime then maps that same open file (`/proc/self/fd/N`), not the path
//! again, so a file renamed over the entry after the check is never what
//! gets mapped. Entries are written once, by rename, and never rewritten in
//! place; whoever could rewrite one in place could read the key beside it.

use std::fs::{self, File};
use std::hash::{Hash, Hasher};
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

use crate::digest::Digest;

const KEY_FILE: &str = "cache.key";
const KEY_LEN: usize = 32;
/// Separates this MAC from any other use of the key (and from the HMAC-SHA256
/// tags of earlier releases, which fail the check once and are rewritten).
const MAC_DOMAIN: &[u8] = b"gust compiled-cache entry v2\0";
/// The chunk an artifact is read and hashed in: small enough to stay in
/// cache, large enough that the syscalls do not show.
const READ_CHUNK: usize = 256 << 10;

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

    /// The keyed hash an entry's MAC is, fed with what it binds besides the
    /// artifact: the component's digest and the engine's fingerprint.
    fn mac(&self, digest: &Digest) -> blake3::Hasher {
        let mut mac = blake3::Hasher::new_keyed(&self.key);
        mac.update(MAC_DOMAIN);
        mac.update(digest.as_bytes());
        mac.update(&self.fingerprint);
        mac
    }

    /// Path of the entry for `digest` (whether or not it exists).
    pub(crate) fn path_for(&self, digest: &Digest) -> PathBuf {
        self.entry_path(digest)
    }

    /// Looks up and, if verified, deserializes the entry for `digest`.
    pub(crate) fn load(&self, engine: &Engine, digest: &Digest) -> Lookup {
        let entry = self.entry_path(digest);
        let mut file = match File::open(&entry) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Lookup::Miss,
            Err(e) => return Lookup::Rejected(format!("unreadable: {e}")),
        };
        let tag = match fs::read(Self::mac_path(&entry)) {
            Ok(tag) => tag,
            Err(e) => return Lookup::Rejected(format!("no valid MAC file: {e}")),
        };
        let Ok(tag) = <[u8; blake3::OUT_LEN]>::try_from(tag.as_slice()) else {
            return Lookup::Rejected("MAC file of the wrong length".into());
        };
        let mut mac = self.mac(digest);
        // Without /proc (not Linux, or not mounted) the checked bytes are
        // read into memory and deserialized from there: slower, as safe.
        let checked = match open_file_path(&file) {
            Some(path) => hash_file(&mut file, &mut mac).map(|()| Checked::File(path)),
            None => read_file(&mut file).map(|bytes| {
                mac.update(&bytes);
                Checked::Bytes(bytes)
            }),
        };
        let checked = match checked {
            Ok(checked) => checked,
            Err(e) => return Lookup::Rejected(format!("unreadable: {e}")),
        };
        // `Hash`'s equality is constant-time.
        if mac.finalize() != blake3::Hash::from_bytes(tag) {
            return Lookup::Rejected("MAC mismatch (corrupt or not written by this host)".into());
        }
        // SAFETY: the file's MAC was made with this host's secret key over its
        // exact contents, so it is an artifact this host serialized itself
        // with a compatible engine (the fingerprint is part of the MAC).
        // Wasmtime maps the file through the descriptor just checked, not the
        // entry's path (a file renamed over the entry since is not what
        // loads), or takes the very bytes checked.
        let component = match checked {
            Checked::File(path) => unsafe { Component::deserialize_file(engine, path) },
            Checked::Bytes(bytes) => unsafe { Component::deserialize(engine, &bytes) },
        };
        match component {
            Ok(component) => Lookup::Hit(component),
            Err(e) => Lookup::Rejected(format!("deserialization failed: {e:#}")),
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
        let mut mac = self.mac(digest);
        mac.update(artifact);
        let tag = mac.finalize();
        // The artifact goes first: a crash between the two renames leaves an
        // entry whose MAC is missing or stale, which is rejected and rebuilt.
        write_atomically(&entry, artifact)?;
        write_atomically(&Self::mac_path(&entry), tag.as_bytes())
    }
}

/// Feeds the rest of `file` into `mac`, a chunk at a time.
fn hash_file(file: &mut File, mac: &mut blake3::Hasher) -> io::Result<()> {
    let mut chunk = vec![0u8; READ_CHUNK];
    loop {
        match file.read(&mut chunk) {
            Ok(0) => return Ok(()),
            Ok(n) => {
                mac.update(&chunk[..n]);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// What a cache entry's MAC was checked over.
enum Checked {
    /// The open file, by a path that reopens the same inode.
    File(PathBuf),
    /// The file's bytes, read into memory.
    Bytes(Vec<u8>),
}

/// All of the rest of `file`.
fn read_file(file: &mut File) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// A path that opens the very file `file` has open (the same inode, whatever
/// its name now points to), where the system has one.
fn open_file_path(file: &File) -> Option<PathBuf> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd as _;
        let path = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
        path.exists().then_some(path)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = file;
        None
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
