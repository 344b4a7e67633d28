//! `gust store migrate`: copies what a single host kept in its embedded
//! store to a PostgreSQL database that several hosts can then share.
//!
//! What is copied: tenants, API keys (their hashes: the keys themselves
//! were never stored), secrets (sealed, as they are: the hosts sharing the
//! database need the same `GUST_SECRETS_KEY`), key-value entries,
//! functions with their versions, configuration and component blobs,
//! schedules, and jobs not yet finished. Invocation records and finished
//! jobs stay behind (they are history, and retention would soon drop
//! them). Every step is idempotent: a migration that stopped half-way is
//! finished by running it again, and what the database has already is
//! never overwritten.

use super::postgres::{Imported, PgStore};
use super::{BlobStore, KvStore as _, MetaStore, StoreError};
use crate::digest::Digest;

/// How many of each kind were copied, and how many were there already.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Copied {
    /// Tenants (copied, present).
    pub tenants: (u64, u64),
    /// API keys.
    pub keys: (u64, u64),
    /// Secrets.
    pub secrets: (u64, u64),
    /// Key-value entries (a key already in the database is left as it is).
    pub kv: (u64, u64),
    /// Functions.
    pub functions: (u64, u64),
    /// Component blobs.
    pub blobs: (u64, u64),
    /// Schedules.
    pub schedules: (u64, u64),
    /// Jobs not yet finished.
    pub jobs: (u64, u64),
}

/// Entries read from the embedded store at a time.
const KV_PAGE: usize = 1000;

/// Copies `tenant`'s key-value entries, leaving any key the database has
/// already as it is. Quotas are not applied: what was stored was within
/// the tenant's quotas when it was written.
fn copy_kv(
    from: &dyn MetaStore,
    to: &PgStore,
    tenant: &str,
    counts: &mut (u64, u64),
) -> Result<(), StoreError> {
    let unlimited = super::KvLimits {
        max_buckets: u64::MAX,
        max_keys: u64::MAX,
        max_bytes: u64::MAX,
    };
    for bucket in from.kv().kv_buckets(tenant)? {
        let mut offset = 0u64;
        loop {
            let keys = from.kv().kv_keys(tenant, &bucket.name, offset, KV_PAGE)?;
            let values = from.kv().kv_get_many(tenant, &bucket.name, &keys)?;
            let there = to.kv_get_many(tenant, &bucket.name, &keys)?;
            let mut writes = Vec::new();
            for ((key, value), there) in keys.iter().zip(values).zip(there) {
                match (value, there) {
                    (_, Some(_)) => count(counts, Imported::Present),
                    (Some(value), None) => {
                        writes.push(super::KvWrite::Set(key.clone(), value));
                        count(counts, Imported::Copied);
                    }
                    // Gone since it was listed: nothing to copy.
                    (None, None) => {}
                }
            }
            if !writes.is_empty()
                && let Err(refused) = to.kv_write(tenant, &bucket.name, &writes, unlimited)?
            {
                return Err(StoreError::Conflict(format!(
                    "key-value entries of {tenant}/{}: {refused}",
                    bucket.name
                )));
            }
            if keys.len() < KV_PAGE {
                break;
            }
            offset += KV_PAGE as u64;
        }
    }
    Ok(())
}

fn count(pair: &mut (u64, u64), imported: Imported) {
    match imported {
        Imported::Copied => pair.0 += 1,
        Imported::Present => pair.1 += 1,
    }
}

/// Copies everything listed in the module's documentation from `from`
/// (with its blobs `from_blobs`) to `to` (with `to_blobs`).
///
/// # Errors
/// A read or write failure; `Conflict` when the database holds a different
/// function under a name being copied; `Missing` when a function's blob is
/// not in `from_blobs`.
pub fn copy(
    from: &dyn MetaStore,
    from_blobs: &dyn BlobStore,
    to: &PgStore,
    to_blobs: &dyn BlobStore,
) -> Result<Copied, StoreError> {
    let mut copied = Copied::default();
    for tenant in from.tenants()? {
        let imported = match to.create_tenant(&tenant.name) {
            Ok(_) => Imported::Copied,
            Err(StoreError::Conflict(_)) => Imported::Present,
            Err(other) => return Err(other),
        };
        count(&mut copied.tenants, imported);
        let present = to.keys(&tenant.name)?;
        for key in from.keys(&tenant.name)? {
            if present.iter().any(|there| there.hash == key.hash) {
                count(&mut copied.keys, Imported::Present);
                continue;
            }
            to.add_key(&key)?;
            count(&mut copied.keys, Imported::Copied);
        }
        for secret in from.secrets(&tenant.name)? {
            count(&mut copied.secrets, to.import_secret(&secret)?);
        }
        copy_kv(from, to, &tenant.name, &mut copied.kv)?;
    }
    for function in from.all_functions()? {
        // The blob first: a function is never stored without its component.
        let digest = Digest::parse(&function.digest).ok_or_else(|| StoreError::Corrupt {
            key: format!("function {}/{}", function.tenant, function.name),
            message: format!("digest {:?} is malformed", function.digest),
            source: None,
        })?;
        if to_blobs.contains(&digest)? {
            count(&mut copied.blobs, Imported::Present);
        } else {
            let bytes = from_blobs.get(&digest)?.ok_or_else(|| {
                StoreError::Missing(format!(
                    "the component {digest} of function {}/{}",
                    function.tenant, function.name
                ))
            })?;
            to_blobs.put(&digest, &bytes)?;
            count(&mut copied.blobs, Imported::Copied);
        }
        count(&mut copied.functions, to.import_function(&function)?);
    }
    for schedule in from.all_schedules()? {
        let there = to.schedule(&schedule.tenant, &schedule.function)?;
        if there.is_some_and(|there| there.created_at >= schedule.created_at) {
            count(&mut copied.schedules, Imported::Present);
            continue;
        }
        to.put_schedule(&schedule)?;
        count(&mut copied.schedules, Imported::Copied);
    }
    for job in from.all_jobs()? {
        if job.status.is_finished() {
            continue;
        }
        count(&mut copied.jobs, to.import_job(&job)?);
    }
    Ok(copied)
}
