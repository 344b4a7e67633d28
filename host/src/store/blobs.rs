//! Content-addressed component blobs.

use std::path::{Path, PathBuf};

use super::StoreError;
use crate::runtime::Digest;

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
}

/// Blobs as files `<dir>/<hex sha256>.wasm`.
#[derive(Debug, Clone)]
pub struct FsBlobStore {
    dir: PathBuf,
}

impl FsBlobStore {
    /// Opens (creating) the blob directory.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let _ = dir;
        Err(StoreError::Backend("FsBlobStore: not written yet".into()))
    }
}

impl BlobStore for FsBlobStore {
    fn put(&self, _digest: &Digest, _bytes: &[u8]) -> Result<(), StoreError> {
        Err(StoreError::Backend(format!("{}: not written yet", self.dir.display())))
    }
    fn get(&self, _digest: &Digest) -> Result<Option<Vec<u8>>, StoreError> {
        Err(StoreError::Backend("not written yet".into()))
    }
    fn contains(&self, _digest: &Digest) -> Result<bool, StoreError> {
        Err(StoreError::Backend("not written yet".into()))
    }
    fn remove(&self, _digest: &Digest) -> Result<bool, StoreError> {
        Err(StoreError::Backend("not written yet".into()))
    }
}
