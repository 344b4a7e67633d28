//! Tenants' key-value buckets: the grant a call gets for `wasi:keyvalue`
//! and the operations of `/v1/kv`, both over the store's [`KvStore`] with
//! the tenant's quotas (its policy's `kv_max_*`).
//!
//! [`KvStore`]: crate::store::KvStore

use std::sync::Arc;

use super::{Service, ServiceError};
use crate::runtime::{KeyValue, KvFailure};
use crate::store::{KvBucket, KvLimits, KvRefused, KvWrite, MetaStore, StoreError};
use crate::tenancy::Policy;

/// The longest key, in bytes.
pub const MAX_KV_KEY_BYTES: usize = 1024;

/// The longest bucket name.
pub const MAX_BUCKET_NAME_LEN: usize = 64;

/// Keys one `GET /v1/kv/{bucket}` lists at most.
pub const MAX_KEYS_PAGE: usize = 1000;

/// Whether `name` may name a bucket: 1 to [`MAX_BUCKET_NAME_LEN`] ASCII
/// letters, digits, `_`, `.` and `-`.
pub fn valid_bucket_name(name: &str) -> bool {
    (1..=MAX_BUCKET_NAME_LEN).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

fn check_bucket(name: &str) -> Result<(), String> {
    if valid_bucket_name(name) {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a valid bucket name: use 1-{MAX_BUCKET_NAME_LEN} of A-Z, a-z, 0-9, `_`, `.` and `-`"
        ))
    }
}

fn check_key(key: &str) -> Result<(), String> {
    if key.is_empty() || key.len() > MAX_KV_KEY_BYTES {
        return Err(format!(
            "a key is 1 to {MAX_KV_KEY_BYTES} bytes of UTF-8 ({} given)",
            key.len()
        ));
    }
    Ok(())
}

/// The quotas of `policy`.
fn limits(policy: &Policy) -> KvLimits {
    KvLimits {
        max_buckets: policy.kv_max_buckets,
        max_keys: policy.kv_max_keys,
        max_bytes: policy.kv_max_bytes,
    }
}

/// One tenant's buckets, as its calls reach them (`wasi:keyvalue`).
#[derive(Clone)]
pub(crate) struct TenantKv {
    store: Arc<dyn MetaStore>,
    tenant: Arc<str>,
    limits: KvLimits,
}

impl std::fmt::Debug for TenantKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantKv")
            .field("tenant", &self.tenant)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// What a guest is told of a store failure: that it failed, not how (the
/// host's log has the error).
fn store_failure(error: &StoreError) -> KvFailure {
    tracing::error!(%error, "a key-value operation of a call failed in the store");
    KvFailure::Other(if error.is_unavailable() {
        "the host's store is out of reach; try again later".to_owned()
    } else {
        "the host's store failed".to_owned()
    })
}

fn refused(refused: &KvRefused) -> KvFailure {
    let kind = if refused.is_quota() {
        "quota exceeded"
    } else {
        "refused"
    };
    KvFailure::Other(format!("{kind}: {refused}"))
}

impl TenantKv {
    fn keys_ok<'a>(
        &self,
        bucket: &str,
        keys: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), KvFailure> {
        check_bucket(bucket).map_err(KvFailure::Denied)?;
        for key in keys {
            check_key(key).map_err(KvFailure::Other)?;
        }
        Ok(())
    }

    fn write(&self, bucket: &str, writes: &[KvWrite]) -> Result<(), KvFailure> {
        self.keys_ok(bucket, writes.iter().map(KvWrite::key))?;
        match self
            .store
            .kv()
            .kv_write(&self.tenant, bucket, writes, self.limits)
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(why)) => Err(refused(&why)),
            Err(error) => Err(store_failure(&error)),
        }
    }
}

impl KeyValue for TenantKv {
    fn open(&self, bucket: &str) -> Result<(), KvFailure> {
        check_bucket(bucket).map_err(KvFailure::Denied)
    }

    fn get(&self, bucket: &str, key: &str) -> Result<Option<Vec<u8>>, KvFailure> {
        self.keys_ok(bucket, [key])?;
        self.store
            .kv()
            .kv_get(&self.tenant, bucket, key)
            .map_err(|e| store_failure(&e))
    }

    fn get_many(&self, bucket: &str, keys: &[String]) -> Result<Vec<Option<Vec<u8>>>, KvFailure> {
        self.keys_ok(bucket, keys.iter().map(String::as_str))?;
        self.store
            .kv()
            .kv_get_many(&self.tenant, bucket, keys)
            .map_err(|e| store_failure(&e))
    }

    fn set_many(&self, bucket: &str, entries: Vec<(String, Vec<u8>)>) -> Result<(), KvFailure> {
        let writes: Vec<KvWrite> = entries
            .into_iter()
            .map(|(key, value)| KvWrite::Set(key, value))
            .collect();
        self.write(bucket, &writes)
    }

    fn delete_many(&self, bucket: &str, keys: Vec<String>) -> Result<(), KvFailure> {
        let writes: Vec<KvWrite> = keys.into_iter().map(KvWrite::Delete).collect();
        self.write(bucket, &writes)
    }

    fn increment(&self, bucket: &str, key: &str, delta: u64) -> Result<u64, KvFailure> {
        self.keys_ok(bucket, [key])?;
        match self
            .store
            .kv()
            .kv_increment(&self.tenant, bucket, key, delta, self.limits)
        {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(why)) => Err(refused(&why)),
            Err(error) => Err(store_failure(&error)),
        }
    }

    fn keys(&self, bucket: &str, offset: u64, limit: usize) -> Result<Vec<String>, KvFailure> {
        check_bucket(bucket).map_err(KvFailure::Denied)?;
        self.store
            .kv()
            .kv_keys(&self.tenant, bucket, offset, limit)
            .map_err(|e| store_failure(&e))
    }
}

/// A page of a bucket's keys (`GET /v1/kv/{bucket}`).
#[derive(Debug, Clone)]
pub struct KvKeys {
    /// The keys, in byte order.
    pub keys: Vec<String>,
    /// Where the next page starts, when there may be one.
    pub next_cursor: Option<u64>,
}

impl Service {
    /// The grant of a call of `tenant`'s functions to its buckets; `None`
    /// when its policy allows no bucket.
    pub(crate) fn kv_grant(&self, tenant: &str) -> Option<Arc<dyn KeyValue>> {
        let policy = self.policy(tenant);
        (policy.kv_max_buckets > 0).then(|| {
            Arc::new(TenantKv {
                store: Arc::clone(&self.store),
                tenant: tenant.into(),
                limits: limits(policy),
            }) as Arc<dyn KeyValue>
        })
    }

    /// The tenant's non-empty buckets. Blocks on the store.
    ///
    /// # Errors
    /// [`ServiceError::Store`].
    pub fn kv_buckets(&self, tenant: &str) -> Result<Vec<KvBucket>, ServiceError> {
        Ok(self.store.kv().kv_buckets(tenant)?)
    }

    /// Up to `limit` keys of `bucket` from the `cursor`-th on. Blocks on
    /// the store.
    ///
    /// # Errors
    /// [`ServiceError::InvalidKv`] for a bad name or limit;
    /// [`ServiceError::Store`].
    pub fn kv_keys(
        &self,
        tenant: &str,
        bucket: &str,
        cursor: u64,
        limit: usize,
    ) -> Result<KvKeys, ServiceError> {
        check_bucket(bucket).map_err(ServiceError::InvalidKv)?;
        if !(1..=MAX_KEYS_PAGE).contains(&limit) {
            return Err(ServiceError::InvalidKv(format!(
                "`limit` must be 1 to {MAX_KEYS_PAGE}"
            )));
        }
        let keys = self.store.kv().kv_keys(tenant, bucket, cursor, limit)?;
        let next_cursor = (keys.len() == limit).then(|| cursor.saturating_add(limit as u64));
        Ok(KvKeys { keys, next_cursor })
    }

    /// The value of `key` in `bucket`. Blocks on the store.
    ///
    /// # Errors
    /// [`ServiceError::NotFound`] without it; [`ServiceError::InvalidKv`];
    /// [`ServiceError::Store`].
    pub fn kv_get(&self, tenant: &str, bucket: &str, key: &str) -> Result<Vec<u8>, ServiceError> {
        check_bucket(bucket).map_err(ServiceError::InvalidKv)?;
        check_key(key).map_err(ServiceError::InvalidKv)?;
        self.store
            .kv()
            .kv_get(tenant, bucket, key)?
            .ok_or_else(|| ServiceError::NotFound(format!("no key {key:?} in bucket {bucket:?}")))
    }

    /// Sets `key` in `bucket` to `value`. Blocks on the store.
    ///
    /// # Errors
    /// [`ServiceError::KvQuota`] beyond the tenant's quotas;
    /// [`ServiceError::InvalidKv`]; [`ServiceError::Store`].
    pub fn kv_put(
        &self,
        tenant: &str,
        bucket: &str,
        key: &str,
        value: Vec<u8>,
    ) -> Result<(), ServiceError> {
        self.kv_change(tenant, bucket, KvWrite::Set(key.to_owned(), value))
    }

    /// Removes `key` from `bucket` (nothing if it is absent). Blocks on the
    /// store.
    ///
    /// # Errors
    /// [`ServiceError::InvalidKv`]; [`ServiceError::Store`].
    pub fn kv_delete(&self, tenant: &str, bucket: &str, key: &str) -> Result<(), ServiceError> {
        self.kv_change(tenant, bucket, KvWrite::Delete(key.to_owned()))
    }

    fn kv_change(&self, tenant: &str, bucket: &str, write: KvWrite) -> Result<(), ServiceError> {
        check_bucket(bucket).map_err(ServiceError::InvalidKv)?;
        check_key(write.key()).map_err(ServiceError::InvalidKv)?;
        let limits = limits(self.policy(tenant));
        match self.store.kv().kv_write(tenant, bucket, &[write], limits)? {
            Ok(()) => Ok(()),
            Err(why) if why.is_quota() => Err(ServiceError::KvQuota(why)),
            Err(why) => Err(ServiceError::InvalidKv(why.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_names_and_keys_are_checked() {
        assert!(valid_bucket_name("default"));
        assert!(valid_bucket_name("Cache_v2.eu-1"));
        assert!(!valid_bucket_name(""));
        assert!(!valid_bucket_name("a/b"));
        assert!(!valid_bucket_name(&"b".repeat(MAX_BUCKET_NAME_LEN + 1)));
        assert!(check_key("user:42/name ü").is_ok());
        assert!(check_key("").is_err());
        assert!(check_key(&"k".repeat(MAX_KV_KEY_BYTES + 1)).is_err());
    }
}
