//! Content-addressed component blobs.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use super::StoreError;
use crate::digest::Digest;

/// Component bytes by sha256. Writes are atomic and idempotent.
pub trait BlobStore: Send + Sync + 'static {
    /// Stores `bytes` under `digest` (which must be their sha256), durably,
    /// so that a crash leaves either no blob or the complete blob.
    fn put(&self, digest: &Digest, bytes: &[u8]) -> Result<(), StoreError>;
    /// The blob's bytes, if present.
    fn get(&self, digest: &Digest) -> Result<Option<Vec<u8>>, StoreError>;
    /// Whether the blob is present.
    fn contains(&self, digest: &Digest) -> Result<bool, StoreError>;
    /// Removes the blob; false if it was absent.
    fn remove(&self, digest: &Digest) -> Result<bool, StoreError>;
    /// Every stored blob's digest (for garbage collection).
    fn list(&self) -> Result<Vec<Digest>, StoreError>;
}

/// Names of files being written start with this; only [`FsBlobStore::put`]
/// creates such names, so any found at open are leftovers of a crash.
const TEMP_PREFIX: &str = crate::fsutil::TEMP_PREFIX;

/// Blobs as files `<dir>/<hex sha256>.wasm`.
///
/// `put` writes a temp file in the same directory, fsyncs it, renames it
/// into place and fsyncs the directory, so a blob file is either absent or
/// complete. One host owns a directory: `open` deletes temp files it finds,
/// which would break a `put` running in another process on the same
/// directory.
#[derive(Debug, Clone)]
pub struct FsBlobStore {
    dir: PathBuf,
}

impl FsBlobStore {
    /// Opens (creating) the blob directory and deletes the temp files an
    /// interrupted `put` left behind.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        fs::create_dir_all(dir).map_err(io_error(dir))?;
        let store = Self {
            dir: dir.to_owned(),
        };
        store.remove_temp_files()?;
        Ok(store)
    }

    /// The blob directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the blob with this digest lives.
    pub fn path_of(&self, digest: &Digest) -> PathBuf {
        self.dir.join(format!("{}.wasm", digest.hex()))
    }

    fn remove_temp_files(&self) -> Result<(), StoreError> {
        let mut removed = false;
        for entry in fs::read_dir(&self.dir).map_err(io_error(&self.dir))? {
            let entry = entry.map_err(io_error(&self.dir))?;
            let is_temp = entry
                .file_name()
                .to_str()
                .is_some_and(|name| name.starts_with(TEMP_PREFIX));
            if !is_temp {
                continue;
            }
            let path = entry.path();
            match fs::remove_file(&path) {
                Ok(()) => {
                    tracing::debug!(path = %path.display(), "removed an interrupted blob write");
                    removed = true;
                }
                Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                Err(error) => {
                    return Err(StoreError::Io {
                        path,
                        source: error,
                    });
                }
            }
        }
        if removed {
            self.sync_dir()?;
        }
        Ok(())
    }

    /// Creates a fresh temp file for `digest`; `create_new` guarantees it is
    /// ours alone.
    /// Makes renames and removals in the directory durable.
    fn sync_dir(&self) -> Result<(), StoreError> {
        #[cfg(unix)]
        {
            File::open(&self.dir)
                .and_then(|dir| dir.sync_all())
                .map_err(io_error(&self.dir))?;
        }
        Ok(())
    }
}

impl BlobStore for FsBlobStore {
    fn put(&self, digest: &Digest, bytes: &[u8]) -> Result<(), StoreError> {
        super::check_digest(digest, bytes)?;
        let path = self.path_of(digest);
        match fs::metadata(&path) {
            // Files only appear by rename, complete; the length check
            // catches one damaged since, which is then replaced.
            Ok(meta) if meta.is_file() && meta.len() == bytes.len() as u64 => return Ok(()),
            Ok(_) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => {
                return Err(StoreError::Io {
                    path,
                    source: error,
                });
            }
        }
        // A temp file a crash leaves behind is removed at the next open.
        crate::fsutil::write_atomically(&path, bytes).map_err(io_error(&path))
    }

    fn get(&self, digest: &Digest) -> Result<Option<Vec<u8>>, StoreError> {
        let path = self.path_of(digest);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(error) => {
                return Err(StoreError::Io {
                    path,
                    source: error,
                });
            }
        };
        // Cheap next to compiling the component, and it keeps disk damage
        // from reaching the runtime as a different component.
        let actual = Digest::of(&bytes);
        if actual != *digest {
            return Err(StoreError::Corrupt {
                key: path.display().to_string(),
                message: format!("the file's bytes hash to {actual}"),
                source: None,
            });
        }
        Ok(Some(bytes))
    }

    fn contains(&self, digest: &Digest) -> Result<bool, StoreError> {
        let path = self.path_of(digest);
        match fs::metadata(&path) {
            Ok(meta) => Ok(meta.is_file()),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(error) => Err(StoreError::Io {
                path,
                source: error,
            }),
        }
    }

    fn remove(&self, digest: &Digest) -> Result<bool, StoreError> {
        let path = self.path_of(digest);
        match fs::remove_file(&path) {
            Ok(()) => {
                self.sync_dir()?;
                Ok(true)
            }
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(error) => Err(StoreError::Io {
                path,
                source: error,
            }),
        }
    }

    fn list(&self) -> Result<Vec<Digest>, StoreError> {
        let mut digests = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io_error(&self.dir))? {
            let entry = entry.map_err(io_error(&self.dir))?;
            // Only `<hex>.wasm` names are blobs; anything else is left alone.
            let digest = entry
                .file_name()
                .to_str()
                .and_then(|name| name.strip_suffix(".wasm"))
                .and_then(|hex| Digest::parse(&format!("sha256:{hex}")));
            digests.extend(digest);
        }
        Ok(digests)
    }
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn put_get_contains_remove() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsBlobStore::open(dir.path()).unwrap();
        let bytes = b"\0asm component bytes".to_vec();
        let digest = Digest::of(&bytes);

        assert!(!store.contains(&digest).unwrap());
        assert_eq!(store.get(&digest).unwrap(), None);

        store.put(&digest, &bytes).unwrap();
        assert!(store.contains(&digest).unwrap());
        assert_eq!(store.get(&digest).unwrap(), Some(bytes));
        assert_eq!(files(dir.path()), vec![format!("{}.wasm", digest.hex())]);

        assert!(store.remove(&digest).unwrap());
        assert!(!store.remove(&digest).unwrap());
        assert!(!store.contains(&digest).unwrap());
        assert_eq!(store.get(&digest).unwrap(), None);
        assert!(files(dir.path()).is_empty());
    }

    #[test]
    fn open_creates_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("a/b/blobs");
        let store = FsBlobStore::open(&nested).unwrap();
        assert_eq!(store.dir(), nested);
        assert!(nested.is_dir());
    }

    #[test]
    fn digest_mismatch_is_refused_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsBlobStore::open(dir.path()).unwrap();
        let wrong = Digest::of(b"other bytes");
        let error = store.put(&wrong, b"these bytes").unwrap_err();
        match error {
            StoreError::DigestMismatch { expected, actual } => {
                assert_eq!(expected, wrong.to_string());
                assert_eq!(actual, Digest::of(b"these bytes").to_string());
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(files(dir.path()).is_empty());
    }

    #[test]
    fn put_twice_is_idempotent_and_leaves_no_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsBlobStore::open(dir.path()).unwrap();
        let bytes = vec![7u8; 100_000];
        let digest = Digest::of(&bytes);
        store.put(&digest, &bytes).unwrap();
        let modified = fs::metadata(store.path_of(&digest))
            .unwrap()
            .modified()
            .unwrap();
        store.put(&digest, &bytes).unwrap();
        // Left alone, not rewritten.
        assert_eq!(
            fs::metadata(store.path_of(&digest))
                .unwrap()
                .modified()
                .unwrap(),
            modified
        );
        assert_eq!(store.get(&digest).unwrap(), Some(bytes));
        assert_eq!(files(dir.path()), vec![format!("{}.wasm", digest.hex())]);
    }

    #[test]
    fn a_truncated_blob_is_replaced_by_put() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsBlobStore::open(dir.path()).unwrap();
        let bytes = b"complete component".to_vec();
        let digest = Digest::of(&bytes);
        fs::write(store.path_of(&digest), &bytes[..5]).unwrap();
        assert!(matches!(
            store.get(&digest),
            Err(StoreError::Corrupt { .. })
        ));
        store.put(&digest, &bytes).unwrap();
        assert_eq!(store.get(&digest).unwrap(), Some(bytes));
    }

    #[test]
    fn damaged_blob_is_reported_as_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsBlobStore::open(dir.path()).unwrap();
        let bytes = b"abcdef".to_vec();
        let digest = Digest::of(&bytes);
        store.put(&digest, &bytes).unwrap();
        fs::write(store.path_of(&digest), b"abcxyz").unwrap();
        match store.get(&digest) {
            Err(StoreError::Corrupt { key, .. }) => assert!(key.contains(&digest.hex())),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn open_removes_leftover_temp_files_only() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = b"kept".to_vec();
        let digest = Digest::of(&bytes);
        {
            let store = FsBlobStore::open(dir.path()).unwrap();
            store.put(&digest, &bytes).unwrap();
        }
        // What a crash between create and rename leaves.
        let leftover = dir
            .path()
            .join(format!("{TEMP_PREFIX}{}-1-0", digest.hex()));
        fs::write(&leftover, b"half a compo").unwrap();
        fs::write(dir.path().join("unrelated.txt"), b"x").unwrap();

        let store = FsBlobStore::open(dir.path()).unwrap();
        assert!(!leftover.exists());
        assert_eq!(
            files(dir.path()),
            vec![format!("{}.wasm", digest.hex()), "unrelated.txt".to_owned()]
        );
        assert_eq!(store.get(&digest).unwrap(), Some(bytes));
    }

    #[test]
    fn concurrent_puts_of_one_blob_agree() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsBlobStore::open(dir.path()).unwrap();
        let bytes = vec![42u8; 1 << 20];
        let digest = Digest::of(&bytes);
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| store.put(&digest, &bytes).unwrap());
            }
        });
        assert_eq!(store.get(&digest).unwrap(), Some(bytes));
        assert_eq!(files(dir.path()), vec![format!("{}.wasm", digest.hex())]);
    }
}
