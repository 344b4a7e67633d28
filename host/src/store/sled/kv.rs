//! [`KvStore`] on sled: tree `kv`, keyed `part(tenant) part(bucket)
//! part(key)`, so that a bucket is one prefix scan in key order.
//!
//! Like every write of several entries here (see "No transactions" in the
//! parent module), a write runs under the store's `writes` lock, which also
//! guards the per-tenant usage the quota checks read: counted from the
//! tenant's entries at its first write after opening, then kept up to date
//! by each write. A batch of several entries is first written whole to
//! `kv_journal` (its commit point), then applied, then dropped from the
//! journal; [`SledStore::open`] applies what a crash left there, so a batch
//! is all or nothing. Sets and deletes can be applied twice to the same
//! effect.

use serde::{Deserialize, Serialize};

use super::{SledStore, backend, decode, encode, part, push_part, split_parts};
use crate::store::StoreError;
use crate::store::kv::{KvBucket, KvLimits, KvRefused, KvStore, KvUsage, KvWrite, entry_bytes};

/// A batch of writes as the journal keeps it.
#[derive(Serialize, Deserialize)]
struct Journaled {
    tenant: String,
    bucket: String,
    writes: Vec<JournaledWrite>,
}

#[derive(Serialize, Deserialize)]
enum JournaledWrite {
    Set {
        key: String,
        #[serde(with = "crate::store::base64_bytes")]
        value: Vec<u8>,
    },
    Delete {
        key: String,
    },
}

impl From<&KvWrite> for JournaledWrite {
    fn from(write: &KvWrite) -> Self {
        match write {
            KvWrite::Set(key, value) => Self::Set {
                key: key.clone(),
                value: value.clone(),
            },
            KvWrite::Delete(key) => Self::Delete { key: key.clone() },
        }
    }
}

impl From<JournaledWrite> for KvWrite {
    fn from(write: JournaledWrite) -> Self {
        match write {
            JournaledWrite::Set { key, value } => Self::Set(key, value),
            JournaledWrite::Delete { key } => Self::Delete(key),
        }
    }
}

fn bucket_prefix(tenant: &str, bucket: &str) -> Vec<u8> {
    let mut prefix = part(tenant);
    push_part(&mut prefix, bucket);
    prefix
}

fn kv_key(tenant: &str, bucket: &str, key: &str) -> Vec<u8> {
    let mut full = bucket_prefix(tenant, bucket);
    push_part(&mut full, key);
    full
}

impl SledStore {
    /// What `tenant`'s buckets hold; the caller holds `writes`.
    fn kv_usage_of(&self, tenant: &str) -> Result<KvUsage, StoreError> {
        let mut cache = self
            .kv_usage
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(usage) = cache.get(tenant) {
            return Ok(usage.clone());
        }
        let mut usage = KvUsage::default();
        for entry in self.kv.scan_prefix(part(tenant)) {
            let (key, value) = entry.map_err(backend)?;
            let Some(parts) = split_parts(&key) else {
                continue;
            };
            let [_, bucket, key] = parts.as_slice() else {
                continue;
            };
            let (keys, bytes) = usage.buckets.entry(bucket.clone()).or_default();
            *keys += 1;
            *bytes = bytes.saturating_add(entry_bytes(key, value.len()));
        }
        cache.insert(tenant.to_owned(), usage.clone());
        Ok(usage)
    }

    /// Sets `tenant`'s usage after a write, or forgets it (`None`) when a
    /// write failed part way, so that the next write counts it again.
    fn remember_usage(&self, tenant: &str, usage: Option<KvUsage>) {
        let mut cache = self
            .kv_usage
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match usage {
            Some(usage) => cache.insert(tenant.to_owned(), usage),
            None => cache.remove(tenant),
        };
    }

    fn apply_kv(&self, tenant: &str, bucket: &str, writes: &[KvWrite]) -> Result<(), StoreError> {
        for write in writes {
            let key = kv_key(tenant, bucket, write.key());
            match write {
                KvWrite::Set(_, value) => {
                    self.kv.insert(key, value.as_slice()).map_err(backend)?;
                }
                KvWrite::Delete(_) => {
                    self.kv.remove(key).map_err(backend)?;
                }
            }
        }
        Ok(())
    }

    /// Makes `writes` with the journal as the commit point of a batch; the
    /// caller holds `writes` and has checked the quotas.
    fn commit_kv(&self, tenant: &str, bucket: &str, writes: &[KvWrite]) -> Result<(), StoreError> {
        if writes.len() < 2 {
            return self.apply_kv(tenant, bucket, writes);
        }
        let id = self.db.generate_id().map_err(backend)?.to_be_bytes();
        let journaled = Journaled {
            tenant: tenant.to_owned(),
            bucket: bucket.to_owned(),
            writes: writes.iter().map(JournaledWrite::from).collect(),
        };
        self.kv_journal
            .insert(id, encode(&journaled)?)
            .map_err(backend)?;
        self.sync()?;
        self.apply_kv(tenant, bucket, writes)?;
        self.kv_journal.remove(id).map_err(backend)?;
        Ok(())
    }

    /// Applies the batches a crash left in the journal (at open).
    pub(super) fn replay_kv_journal(&self) -> Result<(), StoreError> {
        let mut replayed = 0usize;
        for entry in self.kv_journal.iter() {
            let (id, value) = entry.map_err(backend)?;
            match decode::<Journaled>("kv_journal", &id, &value) {
                Ok(batch) => {
                    let writes: Vec<KvWrite> = batch.writes.into_iter().map(Into::into).collect();
                    self.apply_kv(&batch.tenant, &batch.bucket, &writes)?;
                    replayed += 1;
                }
                Err(error) => {
                    // Written whole before any of it was applied: an entry
                    // that does not decode was never acted on.
                    tracing::error!(%error, "a key-value batch in the journal does not decode; dropped");
                }
            }
            self.kv_journal.remove(id).map_err(backend)?;
        }
        if replayed > 0 {
            tracing::warn!(
                batches = replayed,
                "finished key-value batches a crash interrupted"
            );
            self.sync()?;
        }
        Ok(())
    }

    /// The size of `key` in the bucket now, `None` when absent.
    fn kv_size(&self, tenant: &str, bucket: &str, key: &str) -> Result<Option<u64>, StoreError> {
        Ok(self
            .kv
            .get(kv_key(tenant, bucket, key))
            .map_err(backend)?
            .map(|value| entry_bytes(key, value.len())))
    }
}

impl KvStore for SledStore {
    fn kv_get(&self, tenant: &str, bucket: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .kv
            .get(kv_key(tenant, bucket, key))
            .map_err(backend)?
            .map(|value| value.to_vec()))
    }

    fn kv_get_many(
        &self,
        tenant: &str,
        bucket: &str,
        keys: &[String],
    ) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        keys.iter()
            .map(|key| self.kv_get(tenant, bucket, key))
            .collect()
    }

    fn kv_write(
        &self,
        tenant: &str,
        bucket: &str,
        writes: &[KvWrite],
        limits: KvLimits,
    ) -> Result<Result<(), KvRefused>, StoreError> {
        let _writes = self.exclusive();
        let before = writes
            .iter()
            .map(|write| self.kv_size(tenant, bucket, write.key()))
            .collect::<Result<Vec<_>, _>>()?;
        let usage = self.kv_usage_of(tenant)?;
        let after = match usage.after(bucket, writes, &before, limits) {
            Ok(after) => after,
            Err(refused) => return Ok(Err(refused)),
        };
        let done = self
            .commit_kv(tenant, bucket, writes)
            .and_then(|()| self.sync());
        self.remember_usage(tenant, done.is_ok().then_some(after));
        done.map(Ok)
    }

    fn kv_increment(
        &self,
        tenant: &str,
        bucket: &str,
        key: &str,
        delta: u64,
        limits: KvLimits,
    ) -> Result<Result<u64, KvRefused>, StoreError> {
        let _writes = self.exclusive();
        let current = self.kv.get(kv_key(tenant, bucket, key)).map_err(backend)?;
        let usage = self.kv_usage_of(tenant)?;
        let (value, write, after) =
            match usage.increment(bucket, key, current.as_deref(), delta, limits) {
                Ok(increment) => increment,
                Err(refused) => return Ok(Err(refused)),
            };
        let done = self
            .apply_kv(tenant, bucket, &[write])
            .and_then(|()| self.sync());
        self.remember_usage(tenant, done.is_ok().then_some(after));
        done.map(|()| Ok(value))
    }

    fn kv_keys(
        &self,
        tenant: &str,
        bucket: &str,
        offset: u64,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let offset = usize::try_from(offset).unwrap_or(usize::MAX);
        let mut keys = Vec::new();
        for entry in self
            .kv
            .scan_prefix(bucket_prefix(tenant, bucket))
            .keys()
            .skip(offset)
            .take(limit)
        {
            let full = entry.map_err(backend)?;
            if let Some(key) = split_parts(&full).and_then(|mut parts| parts.pop()) {
                keys.push(key);
            }
        }
        Ok(keys)
    }

    fn kv_buckets(&self, tenant: &str) -> Result<Vec<KvBucket>, StoreError> {
        let _writes = self.exclusive();
        let usage = self.kv_usage_of(tenant)?;
        Ok(usage
            .buckets
            .into_iter()
            .map(|(name, (keys, bytes))| KvBucket { name, keys, bytes })
            .collect())
    }
}
