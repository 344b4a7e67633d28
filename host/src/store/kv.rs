//! Tenants' key-value buckets: what `wasi:keyvalue` and `/v1/kv` read and
//! write.
//!
//! A bucket belongs to one tenant and holds keys (UTF-8) with byte values.
//! Quotas ([`KvLimits`]) are checked by the store inside the write that
//! would break them, so that concurrent writers (threads, or hosts sharing a
//! database) cannot overshoot them together. A write that makes nothing
//! bigger (a delete, a smaller value) is never refused, so that a tenant
//! over a lowered quota can always get back under it.
//!
//! Counters (`wasi:keyvalue/atomics`) are values holding a decimal `u64` in
//! ASCII, as Wasmtime's own implementation keeps them: readable through
//! `GET /v1/kv/…` and settable by hand.

use std::collections::BTreeMap;

use super::StoreError;

/// What one tenant may keep in its buckets (its policy's `kv_*` keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLimits {
    /// Buckets holding at least one key.
    pub max_buckets: u64,
    /// Keys in one bucket.
    pub max_keys: u64,
    /// Bytes of all keys and values of all buckets together.
    pub max_bytes: u64,
}

/// One change of a [`KvStore::kv_write`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvWrite {
    /// Sets `key` to the value, creating it if needed.
    Set(String, Vec<u8>),
    /// Removes `key` (nothing if it is absent).
    Delete(String),
}

impl KvWrite {
    /// The key it changes.
    pub fn key(&self) -> &str {
        match self {
            Self::Set(key, _) | Self::Delete(key) => key,
        }
    }

    /// The bytes the key holds afterwards (key and value), `None` when
    /// it is gone.
    fn size(&self) -> Option<u64> {
        match self {
            Self::Set(key, value) => Some(entry_bytes(key, value.len())),
            Self::Delete(_) => None,
        }
    }
}

/// Why a write was not made. Nothing of it was stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvRefused {
    /// The tenant has `max` buckets with keys already.
    #[error("the tenant has {max} buckets, its limit (kv_max_buckets)")]
    Buckets {
        /// The limit.
        max: u64,
    },
    /// The bucket holds `max` keys already.
    #[error("bucket {bucket:?} would hold more than {max} keys (kv_max_keys)")]
    Keys {
        /// The bucket.
        bucket: String,
        /// The limit.
        max: u64,
    },
    /// The tenant's buckets would hold more than `max` bytes.
    #[error(
        "the tenant's buckets would hold {needed} bytes, over its limit of {max} (kv_max_bytes)"
    )]
    Bytes {
        /// What the write would make it.
        needed: u64,
        /// The limit.
        max: u64,
    },
    /// An increment of a value that is not a decimal `u64`.
    #[error("key {key:?} does not hold a decimal u64, so it cannot be incremented")]
    NotANumber {
        /// The key.
        key: String,
    },
    /// An increment past `u64::MAX`.
    #[error("incrementing key {key:?} would overflow a u64")]
    Overflow {
        /// The key.
        key: String,
    },
}

impl KvRefused {
    /// Whether it is a quota (507) rather than a bad request.
    pub fn is_quota(&self) -> bool {
        matches!(
            self,
            Self::Buckets { .. } | Self::Keys { .. } | Self::Bytes { .. }
        )
    }
}

/// One bucket of a tenant, as [`KvStore::kv_buckets`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvBucket {
    /// Its name.
    pub name: String,
    /// Keys it holds.
    pub keys: u64,
    /// Bytes of its keys and values.
    pub bytes: u64,
}

/// The bytes an entry counts for: its key and its value.
pub(crate) fn entry_bytes(key: &str, value_len: usize) -> u64 {
    (key.len() as u64).saturating_add(value_len as u64)
}

/// What a tenant holds, per bucket: what the quota checks look at.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct KvUsage {
    /// Keys and bytes per non-empty bucket.
    pub(crate) buckets: BTreeMap<String, (u64, u64)>,
}

impl KvUsage {
    /// Bytes of all buckets.
    pub(crate) fn bytes(&self) -> u64 {
        self.buckets
            .values()
            .fold(0u64, |sum, (_, bytes)| sum.saturating_add(*bytes))
    }

    /// The usage after `writes` to `bucket`, given each written key's
    /// current size (`before[i]` for `writes[i]`; `None`: absent), or why
    /// the writes are refused. A limit only refuses what makes its figure
    /// grow past it.
    pub(crate) fn after(
        &self,
        bucket: &str,
        writes: &[KvWrite],
        before: &[Option<u64>],
        limits: KvLimits,
    ) -> Result<KvUsage, KvRefused> {
        let (old_keys, old_bytes) = self.buckets.get(bucket).copied().unwrap_or((0, 0));
        // A key written twice in one batch: only its last write counts,
        // against its size before the batch.
        let mut last: BTreeMap<&str, (Option<u64>, Option<u64>)> = BTreeMap::new();
        for (write, before) in writes.iter().zip(before) {
            last.entry(write.key())
                .and_modify(|(_, after)| *after = write.size())
                .or_insert((*before, write.size()));
        }
        let (mut keys, mut bytes) = (i128::from(old_keys), i128::from(old_bytes));
        for (before, after) in last.values() {
            keys += i128::from(after.is_some()) - i128::from(before.is_some());
            bytes += i128::from(after.unwrap_or(0)) - i128::from(before.unwrap_or(0));
        }
        let keys = u64::try_from(keys.max(0)).unwrap_or(u64::MAX);
        let bucket_bytes = u64::try_from(bytes.max(0)).unwrap_or(u64::MAX);
        let total_before = self.bytes();
        let total = total_before
            .saturating_sub(old_bytes)
            .saturating_add(bucket_bytes);
        if old_keys == 0 && keys > 0 {
            let held = self.buckets.len() as u64;
            if held >= limits.max_buckets {
                return Err(KvRefused::Buckets {
                    max: limits.max_buckets,
                });
            }
        }
        if keys > limits.max_keys && keys > old_keys {
            return Err(KvRefused::Keys {
                bucket: bucket.to_owned(),
                max: limits.max_keys,
            });
        }
        if total > limits.max_bytes && total > total_before {
            return Err(KvRefused::Bytes {
                needed: total,
                max: limits.max_bytes,
            });
        }
        let mut usage = self.clone();
        if keys == 0 {
            usage.buckets.remove(bucket);
        } else {
            usage
                .buckets
                .insert(bucket.to_owned(), (keys, bucket_bytes));
        }
        Ok(usage)
    }

    /// An increment of the counter `key` of `bucket`, which holds `current`
    /// (absent: 0), by `delta`: its new value, the write that stores it and
    /// the usage after that write; or why it is refused.
    pub(crate) fn increment(
        &self,
        bucket: &str,
        key: &str,
        current: Option<&[u8]>,
        delta: u64,
        limits: KvLimits,
    ) -> Result<(u64, KvWrite, KvUsage), KvRefused> {
        let (value, bytes) = incremented(key, current, delta)?;
        let before = current.map(|value| entry_bytes(key, value.len()));
        let write = KvWrite::Set(key.to_owned(), bytes);
        let after = self.after(bucket, std::slice::from_ref(&write), &[before], limits)?;
        Ok((value, write, after))
    }
}

/// The value after adding `delta` to the counter `current` holds (absent:
/// 0), as its stored bytes.
fn incremented(key: &str, current: Option<&[u8]>, delta: u64) -> Result<(u64, Vec<u8>), KvRefused> {
    let value = match current {
        None => 0,
        Some(bytes) => std::str::from_utf8(bytes)
            .ok()
            .and_then(|text| text.parse::<u64>().ok())
            .ok_or_else(|| KvRefused::NotANumber {
                key: key.to_owned(),
            })?,
    };
    let value = value
        .checked_add(delta)
        .ok_or_else(|| KvRefused::Overflow {
            key: key.to_owned(),
        })?;
    Ok((value, value.to_string().into_bytes()))
}

/// Tenants' buckets in a store. Every method is atomic; writes are durable
/// when it returns.
pub trait KvStore: Send + Sync {
    /// The value of `key` in the tenant's `bucket`.
    fn kv_get(&self, tenant: &str, bucket: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// The values of `keys`, in their order.
    fn kv_get_many(
        &self,
        tenant: &str,
        bucket: &str,
        keys: &[String],
    ) -> Result<Vec<Option<Vec<u8>>>, StoreError>;
    /// Makes `writes` (in order) to the tenant's `bucket`, all or none,
    /// within `limits`.
    fn kv_write(
        &self,
        tenant: &str,
        bucket: &str,
        writes: &[KvWrite],
        limits: KvLimits,
    ) -> Result<Result<(), KvRefused>, StoreError>;
    /// Adds `delta` to the counter `key` (absent: 0), within `limits`;
    /// the new value.
    fn kv_increment(
        &self,
        tenant: &str,
        bucket: &str,
        key: &str,
        delta: u64,
        limits: KvLimits,
    ) -> Result<Result<u64, KvRefused>, StoreError>;
    /// Up to `limit` keys of the bucket in byte order, from the
    /// `offset`-th on.
    fn kv_keys(
        &self,
        tenant: &str,
        bucket: &str,
        offset: u64,
        limit: usize,
    ) -> Result<Vec<String>, StoreError>;
    /// The tenant's non-empty buckets, by name.
    fn kv_buckets(&self, tenant: &str) -> Result<Vec<KvBucket>, StoreError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: KvLimits = KvLimits {
        max_buckets: 2,
        max_keys: 3,
        max_bytes: 100,
    };

    fn set(key: &str, len: usize) -> KvWrite {
        KvWrite::Set(key.to_owned(), vec![0; len])
    }

    #[test]
    fn usage_counts_keys_and_bytes_of_the_last_write_of_each_key() {
        let usage = KvUsage::default();
        let writes = [
            set("a", 9),
            set("b", 1),
            set("a", 4),
            KvWrite::Delete("c".into()),
        ];
        let after = usage
            .after("x", &writes, &[None, None, None, None], LIMITS)
            .unwrap();
        assert_eq!(after.buckets.get("x"), Some(&(2, 5 + 2)));
        assert_eq!(after.bytes(), 7);
        let emptied = after
            .after(
                "x",
                &[KvWrite::Delete("a".into()), KvWrite::Delete("b".into())],
                &[Some(5), Some(2)],
                LIMITS,
            )
            .unwrap();
        assert!(emptied.buckets.is_empty());
    }

    #[test]
    fn limits_refuse_growth_only() {
        let usage = KvUsage {
            buckets: BTreeMap::from([("x".into(), (3, 60)), ("y".into(), (1, 39))]),
        };
        assert_eq!(
            usage.after("z", &[set("k", 0)], &[None], LIMITS),
            Err(KvRefused::Buckets { max: 2 })
        );
        assert_eq!(
            usage.after("x", &[set("k", 0)], &[None], LIMITS),
            Err(KvRefused::Keys {
                bucket: "x".into(),
                max: 3
            })
        );
        assert_eq!(
            usage.after("y", &[set("k", 2)], &[Some(1)], LIMITS),
            Err(KvRefused::Bytes {
                needed: 101,
                max: 100
            })
        );
        // Same size: allowed at the limit.
        assert!(usage.after("y", &[set("k", 0)], &[Some(1)], LIMITS).is_ok());
        // Over lowered limits, shrinking still works.
        let tight = KvLimits {
            max_buckets: 0,
            max_keys: 0,
            max_bytes: 0,
        };
        let after = usage
            .after("x", &[KvWrite::Delete("k".into())], &[Some(20)], tight)
            .unwrap();
        assert_eq!(after.buckets.get("x"), Some(&(2, 40)));
    }

    #[test]
    fn counters_are_decimal_and_refuse_overflow_and_non_numbers() {
        assert_eq!(incremented("c", None, 5).unwrap(), (5, b"5".to_vec()));
        assert_eq!(incremented("c", Some(b"41"), 1).unwrap().0, 42);
        assert_eq!(
            incremented("c", Some(b"18446744073709551615"), 1),
            Err(KvRefused::Overflow { key: "c".into() })
        );
        assert_eq!(
            incremented("c", Some(b"x1"), 1),
            Err(KvRefused::NotANumber { key: "c".into() })
        );
    }
}
