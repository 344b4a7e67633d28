//! [`KvStore`] on PostgreSQL (tables `kv` and `kv_buckets`, migration V5).
//!
//! A write locks its tenant's `tenants` row for the length of its
//! transaction, reads the tenant's bucket counts, checks the quotas with
//! the same rules as the embedded store ([`KvUsage::after`]), and writes
//! entries and counts together: hosts writing one tenant's buckets at once
//! take turns, and what they commit never breaks a quota.

use std::collections::BTreeMap;

use deadpool_postgres::Transaction;

use super::{PgStore, StoreError, i64_of, pool_error, postgres, u64_of};
use crate::store::kv::{KvBucket, KvLimits, KvRefused, KvStore, KvUsage, KvWrite, entry_bytes};

/// Locks `tenant` for a key-value write and reads what its buckets hold.
async fn lock_usage(tx: &Transaction<'_>, tenant: &str) -> Result<KvUsage, StoreError> {
    let found = tx
        .query_opt(
            "SELECT 1 FROM tenants WHERE name = $1 FOR NO KEY UPDATE",
            &[&tenant],
        )
        .await
        .map_err(postgres)?;
    if found.is_none() {
        return Err(StoreError::Missing(format!("tenant {tenant:?}")));
    }
    let rows = tx
        .query(
            "SELECT bucket, keys, bytes FROM kv_buckets WHERE tenant = $1",
            &[&tenant],
        )
        .await
        .map_err(postgres)?;
    let mut buckets = BTreeMap::new();
    for row in rows {
        let name: String = row.try_get(0).map_err(postgres)?;
        let keys: i64 = row.try_get(1).map_err(postgres)?;
        let bytes: i64 = row.try_get(2).map_err(postgres)?;
        buckets.insert(name, (u64_of(keys), u64_of(bytes)));
    }
    Ok(KvUsage { buckets })
}

/// Stores the counts of `bucket` from `usage` (removing an emptied one).
async fn save_usage(
    tx: &Transaction<'_>,
    tenant: &str,
    bucket: &str,
    usage: &KvUsage,
) -> Result<(), StoreError> {
    match usage.buckets.get(bucket) {
        Some(&(keys, bytes)) => {
            tx.execute(
                "INSERT INTO kv_buckets (tenant, bucket, keys, bytes) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (tenant, bucket) DO UPDATE SET keys = $3, bytes = $4",
                &[&tenant, &bucket, &i64_of(keys), &i64_of(bytes)],
            )
            .await
            .map_err(postgres)?;
        }
        None => {
            tx.execute(
                "DELETE FROM kv_buckets WHERE tenant = $1 AND bucket = $2",
                &[&tenant, &bucket],
            )
            .await
            .map_err(postgres)?;
        }
    }
    Ok(())
}

/// The sizes (key and value) of `keys` in the bucket now.
async fn sizes(
    tx: &Transaction<'_>,
    tenant: &str,
    bucket: &str,
    keys: &[&str],
) -> Result<Vec<Option<u64>>, StoreError> {
    let rows = tx
        .query(
            "SELECT key, length(value) FROM kv WHERE tenant = $1 AND bucket = $2 AND key = ANY($3)",
            &[&tenant, &bucket, &keys],
        )
        .await
        .map_err(postgres)?;
    let mut found = BTreeMap::new();
    for row in rows {
        let key: String = row.try_get(0).map_err(postgres)?;
        let len: i32 = row.try_get(1).map_err(postgres)?;
        found.insert(key, usize::try_from(len).unwrap_or(0));
    }
    Ok(keys
        .iter()
        .map(|key| found.get(*key).map(|len| entry_bytes(key, *len)))
        .collect())
}

async fn apply(
    tx: &Transaction<'_>,
    tenant: &str,
    bucket: &str,
    writes: &[KvWrite],
) -> Result<(), StoreError> {
    for write in writes {
        match write {
            KvWrite::Set(key, value) => {
                tx.execute(
                    "INSERT INTO kv (tenant, bucket, key, value) VALUES ($1, $2, $3, $4)
                     ON CONFLICT (tenant, bucket, key) DO UPDATE SET value = $4",
                    &[&tenant, &bucket, key, value],
                )
                .await
                .map_err(postgres)?;
            }
            KvWrite::Delete(key) => {
                tx.execute(
                    "DELETE FROM kv WHERE tenant = $1 AND bucket = $2 AND key = $3",
                    &[&tenant, &bucket, key],
                )
                .await
                .map_err(postgres)?;
            }
        }
    }
    Ok(())
}

impl KvStore for PgStore {
    fn kv_get(&self, tenant: &str, bucket: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.row(
            "SELECT value FROM kv WHERE tenant = $1 AND bucket = $2 AND key = $3",
            params![tenant.to_owned(), bucket.to_owned(), key.to_owned()],
            |row| row.try_get(0).map_err(postgres),
        )
    }

    fn kv_get_many(
        &self,
        tenant: &str,
        bucket: &str,
        keys: &[String],
    ) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        let found: BTreeMap<String, Vec<u8>> = self
            .rows(
                "SELECT key, value FROM kv WHERE tenant = $1 AND bucket = $2 AND key = ANY($3)",
                params![tenant.to_owned(), bucket.to_owned(), keys.to_vec()],
                |row| {
                    Ok((
                        row.try_get(0).map_err(postgres)?,
                        row.try_get(1).map_err(postgres)?,
                    ))
                },
            )?
            .into_iter()
            .collect();
        Ok(keys.iter().map(|key| found.get(key).cloned()).collect())
    }

    fn kv_write(
        &self,
        tenant: &str,
        bucket: &str,
        writes: &[KvWrite],
        limits: KvLimits,
    ) -> Result<Result<(), KvRefused>, StoreError> {
        let (tenant, bucket, writes) = (tenant.to_owned(), bucket.to_owned(), writes.to_vec());
        self.run(move |pool| async move {
            let mut client = pool.get().await.map_err(pool_error)?;
            let tx = client.transaction().await.map_err(postgres)?;
            let usage = lock_usage(&tx, &tenant).await?;
            let keys: Vec<&str> = writes.iter().map(KvWrite::key).collect();
            let before = sizes(&tx, &tenant, &bucket, &keys).await?;
            let after = match usage.after(&bucket, &writes, &before, limits) {
                Ok(after) => after,
                Err(refused) => return Ok(Err(refused)),
            };
            apply(&tx, &tenant, &bucket, &writes).await?;
            save_usage(&tx, &tenant, &bucket, &after).await?;
            tx.commit().await.map_err(postgres)?;
            Ok(Ok(()))
        })
    }

    fn kv_increment(
        &self,
        tenant: &str,
        bucket: &str,
        key: &str,
        delta: u64,
        limits: KvLimits,
    ) -> Result<Result<u64, KvRefused>, StoreError> {
        let (tenant, bucket, key) = (tenant.to_owned(), bucket.to_owned(), key.to_owned());
        self.run(move |pool| async move {
            let mut client = pool.get().await.map_err(pool_error)?;
            let tx = client.transaction().await.map_err(postgres)?;
            let usage = lock_usage(&tx, &tenant).await?;
            let current: Option<Vec<u8>> = tx
                .query_opt(
                    "SELECT value FROM kv WHERE tenant = $1 AND bucket = $2 AND key = $3",
                    &[&tenant, &bucket, &key],
                )
                .await
                .map_err(postgres)?
                .map(|row| row.try_get(0))
                .transpose()
                .map_err(postgres)?;
            let (value, write, after) =
                match usage.increment(&bucket, &key, current.as_deref(), delta, limits) {
                    Ok(increment) => increment,
                    Err(refused) => return Ok(Err(refused)),
                };
            apply(&tx, &tenant, &bucket, &[write]).await?;
            save_usage(&tx, &tenant, &bucket, &after).await?;
            tx.commit().await.map_err(postgres)?;
            Ok(Ok(value))
        })
    }

    fn kv_keys(
        &self,
        tenant: &str,
        bucket: &str,
        offset: u64,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        self.rows(
            "SELECT key FROM kv WHERE tenant = $1 AND bucket = $2 ORDER BY key OFFSET $3 LIMIT $4",
            params![
                tenant.to_owned(),
                bucket.to_owned(),
                i64_of(offset),
                i64_of(limit as u64)
            ],
            |row| row.try_get(0).map_err(postgres),
        )
    }

    fn kv_buckets(&self, tenant: &str) -> Result<Vec<KvBucket>, StoreError> {
        self.rows(
            "SELECT bucket, keys, bytes FROM kv_buckets WHERE tenant = $1 ORDER BY bucket",
            params![tenant.to_owned()],
            |row| {
                Ok(KvBucket {
                    name: row.try_get(0).map_err(postgres)?,
                    keys: u64_of(row.try_get(1).map_err(postgres)?),
                    bytes: u64_of(row.try_get(2).map_err(postgres)?),
                })
            },
        )
    }
}
