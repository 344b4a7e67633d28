//! Host side of `wasi:keyvalue` (0.2.0-draft: `store`, `atomics`, `batch`,
//! the version Wasmtime's `wasmtime-wasi-keyvalue` serves) over the calling
//! tenant's buckets.
//!
//! The runtime knows nothing of stores or tenants: a call is given a
//! [`KeyValue`] (by the service) that scopes bucket names to its tenant,
//! checks names and enforces quotas. Its methods block on the store, so
//! they run on the blocking pool, never on an async worker.

use std::sync::Arc;

use wasmtime::component::{HasData, Linker, Resource, ResourceTable};

use crate::runtime::bindings::wasi::keyvalue::store::{self, Error, KeyResponse};
use crate::runtime::bindings::wasi::keyvalue::{atomics, batch};

/// Keys one `list-keys` answers at most; its cursor goes on from there.
pub(crate) const KEYS_PAGE: usize = 1000;

/// Why a key-value operation failed; the guest gets the message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvFailure {
    /// The bucket may not be used (a bad name, or none allowed).
    #[error("{0}")]
    Denied(String),
    /// The operation was refused (a bad key, a quota, a counter that is
    /// not one) or the store failed.
    #[error("{0}")]
    Other(String),
}

/// A tenant's buckets, as its calls reach them. Bucket names are the
/// guest's; the implementation maps them to the tenant's, checks names and
/// keys, and enforces its quotas. Every method may block on a store.
pub trait KeyValue: Send + Sync + std::fmt::Debug + 'static {
    /// Whether `bucket` may be opened (its name is valid).
    fn open(&self, bucket: &str) -> Result<(), KvFailure>;
    /// The value of `key`.
    fn get(&self, bucket: &str, key: &str) -> Result<Option<Vec<u8>>, KvFailure>;
    /// The values of `keys`, in their order.
    fn get_many(&self, bucket: &str, keys: &[String]) -> Result<Vec<Option<Vec<u8>>>, KvFailure>;
    /// Sets every pair, all or none.
    fn set_many(&self, bucket: &str, entries: Vec<(String, Vec<u8>)>) -> Result<(), KvFailure>;
    /// Removes every key, all or none.
    fn delete_many(&self, bucket: &str, keys: Vec<String>) -> Result<(), KvFailure>;
    /// Adds `delta` to the counter `key`; its new value.
    fn increment(&self, bucket: &str, key: &str, delta: u64) -> Result<u64, KvFailure>;
    /// Up to `limit` keys in byte order, from the `offset`-th on.
    fn keys(&self, bucket: &str, offset: u64, limit: usize) -> Result<Vec<String>, KvFailure>;
}

/// An open bucket: its name (the grant is the call's).
#[derive(Debug)]
#[allow(unreachable_pub)] // re-exported by `bindgen!` (`with`)
pub struct KvBucket {
    name: Arc<str>,
}

/// What of a call's state `wasi:keyvalue` uses.
pub(crate) struct KvCtxView<'a> {
    /// The tenant's buckets; `None`: the call may use none.
    pub(crate) kv: Option<&'a Arc<dyn KeyValue>>,
    /// The store's resource table (open buckets).
    pub(crate) table: &'a mut ResourceTable,
}

/// Store data that can lend a [`KvCtxView`].
pub(crate) trait KvView: Send {
    /// The parts of the state `wasi:keyvalue` uses.
    fn kv(&mut self) -> KvCtxView<'_>;
}

struct HasKv;

impl HasData for HasKv {
    type Data<'a> = KvCtxView<'a>;
}

/// Adds `wasi:keyvalue` (`store`, `atomics`, `batch`) to `linker`.
pub(crate) fn add_to_linker<T: KvView + 'static>(linker: &mut Linker<T>) -> wasmtime::Result<()> {
    store::add_to_linker::<T, HasKv>(linker, T::kv)?;
    atomics::add_to_linker::<T, HasKv>(linker, T::kv)?;
    batch::add_to_linker::<T, HasKv>(linker, T::kv)?;
    Ok(())
}

type KvResult<T> = wasmtime::Result<Result<T, Error>>;

fn to_wit(failure: KvFailure) -> Error {
    match failure {
        KvFailure::Denied(_) => Error::AccessDenied,
        KvFailure::Other(message) => Error::Other(message),
    }
}

impl KvCtxView<'_> {
    /// Runs `work` with the call's buckets and bucket `name`, on the
    /// blocking pool.
    async fn with<T: Send + 'static>(
        &mut self,
        bucket: &Resource<KvBucket>,
        work: impl FnOnce(&dyn KeyValue, &str) -> Result<T, KvFailure> + Send + 'static,
    ) -> KvResult<T> {
        let name = Arc::clone(&self.table.get(bucket)?.name);
        let Some(kv) = self.kv.map(Arc::clone) else {
            return Ok(Err(Error::AccessDenied));
        };
        let done = tokio::task::spawn_blocking(move || work(kv.as_ref(), &name))
            .await
            .map_err(|e| wasmtime::format_err!("a key-value operation panicked: {e}"))?;
        Ok(done.map_err(to_wit))
    }
}

impl store::Host for KvCtxView<'_> {
    async fn open(&mut self, identifier: String) -> KvResult<Resource<KvBucket>> {
        let Some(kv) = self.kv.map(Arc::clone) else {
            return Ok(Err(Error::AccessDenied));
        };
        // The empty name is Wasmtime's (and many guests') default bucket.
        let name = if identifier.is_empty() {
            "default".to_owned()
        } else {
            identifier
        };
        if let Err(failure) = kv.open(&name) {
            return Ok(Err(to_wit(failure)));
        }
        let bucket = self.table.push(KvBucket { name: name.into() })?;
        Ok(Ok(bucket))
    }
}

impl store::HostBucket for KvCtxView<'_> {
    async fn get(&mut self, bucket: Resource<KvBucket>, key: String) -> KvResult<Option<Vec<u8>>> {
        self.with(&bucket, move |kv, name| kv.get(name, &key)).await
    }

    async fn set(
        &mut self,
        bucket: Resource<KvBucket>,
        key: String,
        value: Vec<u8>,
    ) -> KvResult<()> {
        self.with(&bucket, move |kv, name| {
            kv.set_many(name, vec![(key, value)])
        })
        .await
    }

    async fn delete(&mut self, bucket: Resource<KvBucket>, key: String) -> KvResult<()> {
        self.with(&bucket, move |kv, name| kv.delete_many(name, vec![key]))
            .await
    }

    async fn exists(&mut self, bucket: Resource<KvBucket>, key: String) -> KvResult<bool> {
        self.with(&bucket, move |kv, name| {
            kv.get(name, &key).map(|value| value.is_some())
        })
        .await
    }

    async fn list_keys(
        &mut self,
        bucket: Resource<KvBucket>,
        cursor: Option<u64>,
    ) -> KvResult<KeyResponse> {
        let offset = cursor.unwrap_or(0);
        self.with(&bucket, move |kv, name| {
            let keys = kv.keys(name, offset, KEYS_PAGE)?;
            let cursor = (keys.len() == KEYS_PAGE).then(|| offset.saturating_add(KEYS_PAGE as u64));
            Ok(KeyResponse { keys, cursor })
        })
        .await
    }

    async fn drop(&mut self, bucket: Resource<KvBucket>) -> wasmtime::Result<()> {
        self.table.delete(bucket)?;
        Ok(())
    }
}

impl atomics::Host for KvCtxView<'_> {
    async fn increment(
        &mut self,
        bucket: Resource<KvBucket>,
        key: String,
        delta: u64,
    ) -> KvResult<u64> {
        self.with(&bucket, move |kv, name| kv.increment(name, &key, delta))
            .await
    }
}

impl batch::Host for KvCtxView<'_> {
    async fn get_many(
        &mut self,
        bucket: Resource<KvBucket>,
        keys: Vec<String>,
    ) -> KvResult<Vec<Option<(String, Vec<u8>)>>> {
        self.with(&bucket, move |kv, name| {
            let values = kv.get_many(name, &keys)?;
            Ok(keys
                .into_iter()
                .zip(values)
                .map(|(key, value)| value.map(|value| (key, value)))
                .collect())
        })
        .await
    }

    async fn set_many(
        &mut self,
        bucket: Resource<KvBucket>,
        key_values: Vec<(String, Vec<u8>)>,
    ) -> KvResult<()> {
        self.with(&bucket, move |kv, name| kv.set_many(name, key_values))
            .await
    }

    async fn delete_many(&mut self, bucket: Resource<KvBucket>, keys: Vec<String>) -> KvResult<()> {
        self.with(&bucket, move |kv, name| kv.delete_many(name, keys))
            .await
    }
}
