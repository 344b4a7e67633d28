//! The embedded [`MetaStore`]: one [`sled`] database on local disk.
//!
//! # Layout
//!
//! Composite keys join their parts with `push_part`, an escaping that keeps
//! byte order equal to the order of the parts and makes no encoded key a
//! prefix of another, so a prefix scan over `part(tenant)` never catches
//! tenant `acme2` when asked for `acme`. `seq` and `inc` are big-endian
//! `u64`s from [`sled::Db::generate_id`]. An invocation record's `seq` is
//! drawn with its id where the store drew that (at the call's start), else
//! when the record is written; a function's records list and age in `seq`
//! order.
//!
//! | tree                | key                                       | value                              |
//! |---------------------|-------------------------------------------|------------------------------------|
//! | `tenants`           | tenant name (raw)                         | [`TenantRecord`] (JSON)            |
//! | `keys`              | part(tenant) part(key id)                 | [`ApiKeyRecord`] (JSON)            |
//! | `key_ids`           | key id (raw)                              | tenant name (raw)                  |
//! | `key_hashes`        | SHA-256 (32 bytes)                        | the key's `keys` key               |
//! | `functions`         | part(tenant) part(name)                   | stored function (JSON, see below)  |
//! | `digests`           | part(digest) part(tenant) part(name)      | empty                              |
//! | `invocations`       | part(tenant) part(function) inc seq       | [`InvocationRecord`] (JSON)        |
//! | `invocation_ids`    | part(tenant) invocation id (raw)          | the record's `invocations` key (*) |
//! | `invocation_counts` | part(tenant) part(function)               | live records of the function (u64) |
//! | `purges`            | part(tenant) part(function) inc           | empty                              |
//! | `jobs`              | part(tenant) job id (raw)                 | [`JobRecord`] (JSON)               |
//! | `schedules`         | part(tenant) part(function)               | [`ScheduleRecord`] (JSON)          |
//! | `secrets`           | part(tenant) part(name)                   | [`SecretRecord`] (JSON, sealed)    |
//! | `kv`                | part(tenant) part(bucket) part(key)       | the value (raw)                    |
//! | `kv_journal`        | seq                                       | a batch of `kv` writes (JSON)      |
//!
//! The default tree holds `gust_meta_format` = `2`, the layout's version,
//! and `gust_invocation_tag`, 4 random bytes drawn when the database was
//! made (see below).
//!
//! (*) Only for records whose id the store did not draw. An id drawn by
//! [`MetaStore::invocation_id`] is `inv_` + 12 hex digits (start, ms) + 8
//! (the tag) + 8 (the first 4 bytes of the function name's SHA-256) + 16
//! (a `seq`, drawn then, hidden by a keyed permutation whose key the
//! default tree keeps as `gust_invocation_mask`): its record's key is the function's prefix and
//! that `seq`, so a read finds it from the id by looking among the tenant's
//! functions whose name hash matches, and the record costs one entry to
//! write and one to prune instead of two each (records are the store's
//! busiest writes). The tag keeps ids of another database, which could
//! repeat a `seq`, on the indexed path. Layout `1` differs only in having
//! no such records, and is taken as it is.
//!
//! A stored function carries, besides its [`FunctionRecord`], an
//! *incarnation*: an id drawn at its first deploy and kept across versions.
//! Invocation keys include it, and reads only show records of the current
//! incarnation. That is what lets `delete_function` drop an unbounded
//! number of records: it queues the incarnation in `purges` and removes the
//! function; the records are then invisible (a re-deploy under the same
//! name gets a new incarnation) and are removed in batches, right away or,
//! after a crash, at the next [`SledStore::open`].
//!
//! # No transactions
//!
//! The store uses no sled transactions (nor batches): the first one a
//! process runs switches sled 0.34's global concurrency control from an
//! atomic counter to a reader-writer lock for every later operation, and
//! with that lock sled can deadlock under load (a transaction holds it for
//! writing while it waits for log space that the flusher frees only after
//! taking it for reading; upstream issues #1412 and #1301). That stopped
//! the whole host under sustained invoke load.
//!
//! Instead, every write of several entries runs under one process-wide
//! lock (`writes`; sled allows one process per database) and writes its
//! entries in an order chosen so that a crash between any two of them
//! leaves a state that readers already treat correctly and that
//! [`SledStore::open`] finishes or undoes (`repair`): each such method
//! says which entry is its commit point.

use std::fmt::{self, Write as _};
use std::path::Path;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sled::{Db, IVec, Tree};

mod kv;

use super::{
    ApiKeyRecord, BackendError, DeployRequest, Deployed, FunctionRecord, InvocationRecord,
    JobRecord, MetaStore, ScheduleRecord, SecretPut, SecretRecord, StoreError, TenantRecord,
    UnixMillis, now_millis,
};

/// Version of the layout above, kept in the default tree; a database written
/// with another layout is refused rather than misread.
const FORMAT_VERSION: &[u8] = b"2";
const FORMAT_KEY: &[u8] = b"gust_meta_format";
/// The layout before drawn invocation ids, opened as it is.
const FORMAT_UNDRAWN_IDS: &[u8] = b"1";
/// Where the database's tag is kept (see the layout).
const TAG_KEY: &[u8] = b"gust_invocation_tag";
/// Where the key of [`SeqMask`] is kept.
const MASK_KEY: &[u8] = b"gust_invocation_mask";

/// Invocation records a purge scans for at a time: bounded so that purging
/// a deleted function's records never holds them all in memory.
const PURGE_BATCH: usize = 256;

/// sled's page cache, in bytes.
const CACHE_BYTES: u64 = 64 << 20;

const INVOCATIONS: &str = "invocations";

/// The sled-backed [`MetaStore`].
///
/// Writes of tenants, keys and functions are flushed to disk before the
/// method returns; invocation records are flushed by sled's background
/// flusher (every 500 ms) or by [`MetaStore::flush`], which keeps the
/// invocation path free of fsyncs.
#[derive(Clone)]
pub struct SledStore {
    db: Db,
    tenants: Tree,
    keys: Tree,
    key_ids: Tree,
    key_hashes: Tree,
    functions: Tree,
    digests: Tree,
    invocations: Tree,
    invocation_ids: Tree,
    invocation_counts: Tree,
    purges: Tree,
    jobs: Tree,
    schedules: Tree,
    secrets: Tree,
    /// Bumped at every secret write (see [`MetaStore::secrets_changed`]).
    secrets_changed: Arc<tokio::sync::watch::Sender<u64>>,
    /// Tenants' buckets (see `kv`).
    kv: Tree,
    /// Batches of `kv` writes being made (see `kv`).
    kv_journal: Tree,
    /// What each tenant's buckets hold, counted at its first write since
    /// the store was opened; read and changed only under `writes`.
    kv_usage: Arc<std::sync::Mutex<std::collections::HashMap<String, super::kv::KvUsage>>>,
    /// Records that did not decode, moved aside (key `<tree>\0<key>`) so
    /// that one bad record does not stop the host from starting.
    quarantine: Tree,
    retention: usize,
    /// This database's tag, in the ids it draws.
    tag: u32,
    /// How the ids it draws hold their `seq`.
    mask: SeqMask,
    /// Serialises every write of several entries (records, deploys,
    /// deletes, keys) within this process: see "No transactions" above.
    writes: Arc<std::sync::Mutex<()>>,
}

impl fmt::Debug for SledStore {
    // sled's own `Debug` dumps the tree internals.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SledStore")
            .field("retention_per_function", &self.retention)
            .finish_non_exhaustive()
    }
}

/// A function as stored: the record plus its incarnation (see the module
/// docs).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredFunction {
    function: FunctionRecord,
    incarnation: u64,
}

/// The parts of an invocation record that a purge needs; decoding only these
/// still works for a record whose other fields are damaged.
#[derive(Deserialize)]
struct InvocationIdentity {
    id: String,
    tenant: String,
    /// Tells a drawn id (see the layout) from a look-alike.
    #[serde(default)]
    function: String,
}

/// The error of a record whose function is not (or no longer) deployed.
fn missing_function(record: &InvocationRecord) -> StoreError {
    StoreError::Missing(format!("function {}/{}", record.tenant, record.function))
}

/// A function's records being written in one batch.
struct Batched {
    /// Where its current incarnation's records go.
    prefix: Vec<u8>,
    /// Its records, those of this batch included.
    count: u64,
    /// Records this batch wrote.
    added: u64,
}

/// An `invocations` key and, where the record decodes, its
/// `invocation_ids` key.
type RecordKeys = (IVec, Option<Vec<u8>>);

impl SledStore {
    /// Opens (creating) the database at `path`, keeping at most
    /// `retention_per_function` invocation records per function (0 keeps
    /// none), and finishes the purges a crash interrupted.
    pub fn open(path: &Path, retention_per_function: usize) -> Result<Self, StoreError> {
        // sled caches up to 1 GiB of pages by default; invocation records
        // are write-mostly logs, so a small cache bounds the host's memory
        // without slowing reads that matter.
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(CACHE_BYTES)
            .open()
            .map_err(backend)?;
        let tag = u32::from_be_bytes(kept_random(&db, TAG_KEY)?);
        let mask = SeqMask(kept_random(&db, MASK_KEY)?);
        match db.get(FORMAT_KEY).map_err(backend)? {
            // The tag and mask are written first: a database marked `2` has
            // them.
            None => {
                db.insert(FORMAT_KEY, FORMAT_VERSION).map_err(backend)?;
            }
            Some(found) if found.as_ref() == FORMAT_VERSION => {}
            Some(found) if found.as_ref() == FORMAT_UNDRAWN_IDS => {
                db.insert(FORMAT_KEY, FORMAT_VERSION).map_err(backend)?;
            }
            Some(found) => {
                return Err(StoreError::Backend(BackendError::Format {
                    path: path.to_owned(),
                    found: String::from_utf8_lossy(&found).into_owned(),
                    expected: String::from_utf8_lossy(FORMAT_VERSION).into_owned(),
                }));
            }
        }
        let tree = |name: &str| db.open_tree(name).map_err(backend);
        let store = Self {
            tenants: tree("tenants")?,
            keys: tree("keys")?,
            key_ids: tree("key_ids")?,
            key_hashes: tree("key_hashes")?,
            functions: tree("functions")?,
            digests: tree("digests")?,
            invocations: tree(INVOCATIONS)?,
            invocation_ids: tree("invocation_ids")?,
            invocation_counts: tree("invocation_counts")?,
            purges: tree("purges")?,
            jobs: tree("jobs")?,
            schedules: tree("schedules")?,
            secrets: tree("secrets")?,
            secrets_changed: Arc::new(tokio::sync::watch::Sender::new(0)),
            kv: tree("kv")?,
            kv_journal: tree("kv_journal")?,
            kv_usage: Arc::default(),
            quarantine: tree("quarantine")?,
            db,
            retention: retention_per_function,
            tag,
            mask,
            writes: Arc::new(std::sync::Mutex::new(())),
        };
        store.repair()?;
        store.replay_kv_journal()?;
        store.finish_purges()?;
        Ok(store)
    }

    /// Decodes `entries` of `tree` (called `name`); a record that does not
    /// decode is logged and moved to the quarantine tree instead of failing
    /// the listing: these are the listings a start reads, and one corrupt
    /// record must not keep the host (and every other tenant) down. The
    /// bytes are kept there for an operator to inspect.
    fn decode_or_quarantine<T: DeserializeOwned>(
        &self,
        name: &str,
        tree: &Tree,
        entries: impl Iterator<Item = sled::Result<(IVec, IVec)>>,
    ) -> Result<Vec<T>, StoreError> {
        let mut decoded = Vec::new();
        for entry in entries {
            let (key, value) = entry.map_err(backend)?;
            match decode(name, &key, &value) {
                Ok(record) => decoded.push(record),
                Err(error) => {
                    tracing::error!(%error, "a stored record does not decode; moved to the quarantine tree");
                    let mut moved = name.as_bytes().to_vec();
                    moved.push(0);
                    moved.extend_from_slice(&key);
                    self.quarantine.insert(moved, value).map_err(backend)?;
                    tree.remove(&key).map_err(backend)?;
                }
            }
        }
        Ok(decoded)
    }

    /// Records moved to the quarantine tree so far.
    pub fn quarantined(&self) -> usize {
        self.quarantine.len()
    }

    /// The retention bound this store was opened with.
    pub fn retention_per_function(&self) -> usize {
        self.retention
    }

    /// Makes the writes so far durable.
    fn sync(&self) -> Result<(), StoreError> {
        self.db.flush().map(|_| ()).map_err(backend)
    }

    fn load_function(&self, key: &[u8]) -> Result<Option<StoredFunction>, StoreError> {
        match self.functions.get(key).map_err(backend)? {
            Some(value) => decode("functions", key, &value).map(Some),
            None => Ok(None),
        }
    }

    fn count(&self, function_key: &[u8]) -> Result<u64, StoreError> {
        decode_count(
            function_key,
            self.invocation_counts.get(function_key).map_err(backend)?,
        )
    }

    /// The `limit` oldest records under `prefix`: their keys and, where the
    /// record decodes, their `invocation_ids` key.
    fn oldest(&self, prefix: &[u8], limit: u64) -> Result<Vec<RecordKeys>, StoreError> {
        let mut found = Vec::new();
        if limit == 0 {
            return Ok(found);
        }
        for entry in self.invocations.scan_prefix(prefix) {
            let (key, value) = entry.map_err(backend)?;
            // A damaged record must still be prunable, or it would pin the
            // retention window forever; its id entry is left dangling,
            // which reads treat as absent.
            let id_key = serde_json::from_slice::<InvocationIdentity>(&value)
                .ok()
                .filter(|who| self.drawn(&who.id, &who.function).is_none())
                .map(|who| invocation_id_key(&who.tenant, &who.id));
            found.push((key, id_key));
            if found.len() as u64 >= limit {
                break;
            }
        }
        Ok(found)
    }

    /// A function about to get records: where they go and how many it has.
    fn batched(
        &self,
        function_key: &[u8],
        record: &InvocationRecord,
    ) -> Result<Batched, StoreError> {
        let Some(stored) = self.load_function(function_key)? else {
            return Err(missing_function(record));
        };
        Ok(Batched {
            prefix: invocation_prefix(&record.tenant, &record.function, stored.incarnation),
            count: self.count(function_key)?,
            added: 0,
        })
    }

    /// The parts of `id` when this store drew it for a record of
    /// `function` (see the layout).
    fn drawn(&self, id: &str, function: &str) -> Option<DrawnId> {
        DrawnId::parse(id)
            .filter(|drawn| drawn.tag == self.tag && drawn.name == name_hash(function))
    }

    /// The `seq` of `id` when this store drew it for a record of `function`.
    fn drawn_seq(&self, id: &str, function: &str) -> Option<u64> {
        self.drawn(id, function)
            .map(|drawn| self.mask.reveal(drawn.seq))
    }

    /// The record of an id this store drew: looked for under each of the
    /// tenant's functions whose name has the id's hash (its current
    /// incarnation only, as for every read).
    fn drawn_invocation(
        &self,
        tenant: &str,
        id: &str,
        drawn: &DrawnId,
    ) -> Result<Option<InvocationRecord>, StoreError> {
        let tenant_part = part(tenant);
        for key in self.functions.scan_prefix(&tenant_part).keys() {
            let key = key.map_err(backend)?;
            let matches = split_parts(&key).is_some_and(
                |parts| matches!(parts.as_slice(), [_, name] if name_hash(name) == drawn.name),
            );
            if !matches {
                continue;
            }
            let Some(stored) = self.load_function(&key)? else {
                continue;
            };
            let mut record_key =
                invocation_prefix(tenant, &stored.function.name, stored.incarnation);
            record_key.extend_from_slice(&self.mask.reveal(drawn.seq).to_be_bytes());
            let Some(value) = self.invocations.get(&record_key).map_err(backend)? else {
                continue;
            };
            let record: InvocationRecord = decode(INVOCATIONS, &record_key, &value)?;
            if record.id == id && record.tenant == tenant {
                return Ok(Some(record));
            }
        }
        Ok(None)
    }

    /// Writes one record and, unless the store drew its id, its id entry
    /// (the caller holds `writes`).
    fn insert_record(
        &self,
        record: &InvocationRecord,
        function: &mut Batched,
    ) -> Result<u64, StoreError> {
        let value = encode(record)?;
        if let Some(seq) = self.drawn_seq(&record.id, &record.function) {
            let mut record_key = function.prefix.clone();
            record_key.extend_from_slice(&seq.to_be_bytes());
            // A `seq` is drawn once, so a record there is this one, written
            // before (a retried write), unless it differs.
            if let Some(current) = self.invocations.get(&record_key).map_err(backend)? {
                return if current.as_ref() == value.as_slice() {
                    Ok(0)
                } else {
                    Err(StoreError::Conflict(format!("invocation {:?}", record.id)))
                };
            }
            self.invocations
                .insert(record_key, value)
                .map_err(backend)?;
            function.count = function.count.saturating_add(1);
            function.added += 1;
            return Ok(0);
        }
        let id_key = invocation_id_key(&record.tenant, &record.id);
        if let Some(existing) = self.invocation_ids.get(&id_key).map_err(backend)? {
            // Ids are unique, so an existing one is a retried write: fine if
            // it is the same record.
            return match self.invocations.get(&existing).map_err(backend)? {
                Some(current) if current.as_ref() == value.as_slice() => Ok(0),
                _ => Err(StoreError::Conflict(format!("invocation {:?}", record.id))),
            };
        }
        let seq = self.db.generate_id().map_err(backend)?;
        let mut record_key = function.prefix.clone();
        record_key.extend_from_slice(&seq.to_be_bytes());
        self.invocations
            .insert(&record_key, value.as_slice())
            .map_err(backend)?;
        self.invocation_ids
            .insert(&id_key, record_key.as_slice())
            .map_err(backend)?;
        function.count = function.count.saturating_add(1);
        function.added += 1;
        Ok(0)
    }

    /// Removes a function's records beyond the retention, oldest first, and
    /// writes its count (the caller holds `writes`). Returns how many went.
    fn prune(&self, function_key: &[u8], function: Batched) -> Result<u64, StoreError> {
        let retention = self.retention as u64;
        let mut count = function.count;
        let mut pruned = 0;
        if count > retention {
            for (key, id_key) in self.oldest(&function.prefix, count - retention)? {
                if self.invocations.remove(&key).map_err(backend)?.is_some() {
                    count = count.saturating_sub(1);
                    pruned += 1;
                    if let Some(id_key) = id_key
                        && self
                            .invocation_ids
                            .get(&id_key)
                            .map_err(backend)?
                            .is_some_and(|current| current.as_ref() == AsRef::<[u8]>::as_ref(&key))
                    {
                        self.invocation_ids.remove(&id_key).map_err(backend)?;
                    }
                }
            }
        }
        self.invocation_counts
            .insert(function_key, &count.to_be_bytes()[..])
            .map_err(backend)?;
        Ok(pruned)
    }

    /// The store's write lock (see `writes`).
    fn exclusive(&self) -> std::sync::MutexGuard<'_, ()> {
        self.writes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The committed part of `delete_function` (the caller holds `writes`):
    /// queues the function's records for purging and removes it with its
    /// index entries.
    fn remove_function(
        &self,
        tenant: &str,
        name: &str,
    ) -> Result<Option<StoredFunction>, StoreError> {
        let function_key = function_key(tenant, name);
        let Some(stored) = self.load_function(&function_key)? else {
            return Ok(None);
        };
        // The purge entry first: while the function still has this
        // incarnation, `finish_purges` drops the entry instead of the
        // records (the delete never happened).
        self.purges
            .insert(invocation_prefix(tenant, name, stored.incarnation), &[][..])
            .map_err(backend)?;
        // The commit point.
        self.functions.remove(&function_key).map_err(backend)?;
        // Index entries: a stray digest reference only keeps a blob until
        // `repair` drops it; a stray count is dropped there too, and by the
        // next first deploy under this name.
        self.digests
            .remove(digest_key(&stored.function.digest, tenant, name))
            .map_err(backend)?;
        self.invocation_counts
            .remove(&function_key)
            .map_err(backend)?;
        self.sync()?;
        Ok(Some(stored))
    }

    /// Removes every record under `prefix` (a deleted incarnation), in
    /// batches, then the purge entry itself. Each record's id entry goes
    /// before the record, so an interrupted purge, which `finish_purges`
    /// resumes from the records, leaves no id entry behind.
    fn purge(&self, prefix: &[u8]) -> Result<(), StoreError> {
        loop {
            let batch = self.oldest(prefix, PURGE_BATCH as u64)?;
            if batch.is_empty() {
                break;
            }
            for (key, id_key) in &batch {
                if let Some(id_key) = id_key {
                    remove_if_points_to(&self.invocation_ids, id_key, key)?;
                }
                self.invocations.remove(key).map_err(backend)?;
            }
        }
        self.purges.remove(prefix).map_err(backend)?;
        Ok(())
    }

    /// Resumes the purges a crash interrupted. A purge entry whose function
    /// still has that incarnation is one whose delete stopped before its
    /// commit point: the entry goes, the records stay.
    fn finish_purges(&self) -> Result<(), StoreError> {
        // Collected first: `purge` removes entries of the tree being read.
        let pending = self
            .purges
            .iter()
            .keys()
            .collect::<Result<Vec<_>, _>>()
            .map_err(backend)?;
        for prefix in pending {
            let live = prefix
                .len()
                .checked_sub(8)
                .and_then(|at| {
                    let incarnation = u64::from_be_bytes(prefix[at..].try_into().ok()?);
                    let stored = self.load_function(&prefix[..at]).ok()??;
                    Some(stored.incarnation == incarnation)
                })
                .unwrap_or(false);
            if live {
                self.purges.remove(&prefix).map_err(backend)?;
            } else {
                self.purge(&prefix)?;
            }
        }
        Ok(())
    }

    /// Finishes or undoes the multi-entry writes a crash interrupted (see
    /// "No transactions"): keys whose hash index was never written are
    /// removed (the add did not commit, so nobody was shown the secret),
    /// index entries of removed keys go (the revoke committed), digest
    /// references and counts of functions that no longer hold them go.
    /// Entries that do not decode are left for the listings to quarantine.
    fn repair(&self) -> Result<(), StoreError> {
        let mut repaired = 0usize;
        for entry in self.keys.iter() {
            let (record_key, value) = entry.map_err(backend)?;
            let Ok(record) = serde_json::from_slice::<ApiKeyRecord>(&value) else {
                continue;
            };
            let indexed = self
                .key_hashes
                .get(record.hash)
                .map_err(backend)?
                .is_some_and(|target| target == record_key);
            if !indexed {
                self.keys.remove(&record_key).map_err(backend)?;
                repaired += 1;
            }
        }
        for entry in self.key_hashes.iter() {
            let (hash, record_key) = entry.map_err(backend)?;
            if !self.keys.contains_key(&record_key).map_err(backend)? {
                self.key_hashes.remove(&hash).map_err(backend)?;
                repaired += 1;
            }
        }
        for entry in self.key_ids.iter() {
            let (id, tenant) = entry.map_err(backend)?;
            let record_key = key_key(
                &String::from_utf8_lossy(&tenant),
                &String::from_utf8_lossy(&id),
            );
            if !self.keys.contains_key(&record_key).map_err(backend)? {
                self.key_ids.remove(&id).map_err(backend)?;
                repaired += 1;
            }
        }
        for entry in self.digests.iter() {
            let (reference, _) = entry.map_err(backend)?;
            let held = match split_parts(&reference).as_deref() {
                Some([digest, tenant, name]) => {
                    match self
                        .functions
                        .get(function_key(tenant, name))
                        .map_err(backend)?
                    {
                        Some(value) => serde_json::from_slice::<StoredFunction>(&value)
                            // Undecodable: keep its blob, to be safe.
                            .map_or(true, |stored| stored.function.digest == *digest),
                        None => false,
                    }
                }
                _ => true,
            };
            if !held {
                self.digests.remove(&reference).map_err(backend)?;
                repaired += 1;
            }
        }
        for entry in self.invocation_counts.iter() {
            let (function_key, _) = entry.map_err(backend)?;
            if !self
                .functions
                .contains_key(&function_key)
                .map_err(backend)?
            {
                self.invocation_counts
                    .remove(&function_key)
                    .map_err(backend)?;
                repaired += 1;
            }
        }
        if repaired > 0 {
            tracing::warn!(
                entries = repaired,
                "finished or undid writes a crash interrupted"
            );
            self.sync()?;
        }
        Ok(())
    }
}

impl MetaStore for SledStore {
    fn create_tenant(&self, name: &str) -> Result<TenantRecord, StoreError> {
        let record = TenantRecord {
            name: name.to_owned(),
            created_at: now_millis(),
        };
        let value = encode(&record)?;
        let swapped = self
            .tenants
            .compare_and_swap(name.as_bytes(), None::<&[u8]>, Some(value))
            .map_err(backend)?;
        if swapped.is_err() {
            return Err(StoreError::Conflict(format!("tenant {name:?}")));
        }
        self.sync()?;
        Ok(record)
    }

    fn tenant(&self, name: &str) -> Result<Option<TenantRecord>, StoreError> {
        match self.tenants.get(name.as_bytes()).map_err(backend)? {
            Some(value) => decode("tenants", name.as_bytes(), &value).map(Some),
            None => Ok(None),
        }
    }

    fn tenants(&self) -> Result<Vec<TenantRecord>, StoreError> {
        self.decode_or_quarantine("tenants", &self.tenants, self.tenants.iter())
    }

    fn add_key(&self, key: &ApiKeyRecord) -> Result<(), StoreError> {
        let record_key = key_key(&key.tenant, &key.id);
        let value = encode(key)?;
        let _writes = self.exclusive();
        if self
            .tenants
            .get(key.tenant.as_bytes())
            .map_err(backend)?
            .is_none()
        {
            return Err(StoreError::Missing(format!("tenant {:?}", key.tenant)));
        }
        if self
            .key_ids
            .contains_key(key.id.as_bytes())
            .map_err(backend)?
        {
            return Err(StoreError::Conflict(format!("key {:?}", key.id)));
        }
        if self.key_hashes.contains_key(key.hash).map_err(backend)? {
            return Err(StoreError::Conflict("a key with this hash".into()));
        }
        self.keys
            .insert(record_key.as_slice(), value.as_slice())
            .map_err(backend)?;
        self.key_ids
            .insert(key.id.as_bytes(), key.tenant.as_bytes())
            .map_err(backend)?;
        // The commit point: `key_by_hash` finds the key from here on, and
        // `repair` keeps only keys that have this entry.
        self.key_hashes
            .insert(&key.hash[..], record_key.as_slice())
            .map_err(backend)?;
        self.sync()
    }

    fn key_by_hash(&self, hash: &[u8; 32]) -> Result<Option<ApiKeyRecord>, StoreError> {
        let Some(record_key) = self.key_hashes.get(hash).map_err(backend)? else {
            return Ok(None);
        };
        // Absent here means revoked between the two reads.
        match self.keys.get(&record_key).map_err(backend)? {
            Some(value) => decode("keys", &record_key, &value).map(Some),
            None => Ok(None),
        }
    }

    fn keys(&self, tenant: &str) -> Result<Vec<ApiKeyRecord>, StoreError> {
        decode_all("keys", self.keys.scan_prefix(part(tenant)))
    }

    fn revoke_key(&self, tenant: &str, id: &str) -> Result<bool, StoreError> {
        let record_key = key_key(tenant, id);
        let _writes = self.exclusive();
        let Some(value) = self.keys.get(&record_key).map_err(backend)? else {
            return Ok(false);
        };
        let record: ApiKeyRecord = decode("keys", &record_key, &value)?;
        // The commit point: `key_by_hash` treats a hash whose record is
        // gone as no key, and `repair` drops the index entries left.
        self.keys.remove(&record_key).map_err(backend)?;
        remove_if_points_to(&self.key_ids, id.as_bytes(), tenant.as_bytes())?;
        remove_if_points_to(&self.key_hashes, &record.hash, &record_key)?;
        self.sync()?;
        Ok(true)
    }

    fn deploy(&self, request: &DeployRequest) -> Result<Deployed, StoreError> {
        let function_key = function_key(&request.tenant, &request.name);
        let new_ref = digest_key(&request.digest, &request.tenant, &request.name);
        let now = now_millis();
        let _writes = self.exclusive();
        let (stored, old_ref) = match self.load_function(&function_key)? {
            Some(current) if request.unchanged(&current.function) => {
                return Ok(Deployed {
                    function: current.function,
                    changed: false,
                });
            }
            Some(current) => {
                let Some(version) = current.function.version.checked_add(1) else {
                    return Err(StoreError::Backend(BackendError::VersionOverflow {
                        tenant: request.tenant.clone(),
                        name: request.name.clone(),
                    }));
                };
                let old_ref = (current.function.digest != request.digest)
                    .then(|| digest_key(&current.function.digest, &request.tenant, &request.name));
                let stored = StoredFunction {
                    function: request.function(version, current.function.created_at, now),
                    incarnation: current.incarnation,
                };
                (stored, old_ref)
            }
            None => {
                // A count left by a delete that failed after its commit
                // point belongs to no incarnation of this one.
                self.invocation_counts
                    .remove(&function_key)
                    .map_err(backend)?;
                let stored = StoredFunction {
                    function: request.function(1, now, now),
                    incarnation: self.db.generate_id().map_err(backend)?,
                };
                (stored, None)
            }
        };
        let value = encode(&stored)?;
        // The new reference before the function, the old one after it: the
        // blob a stored function names is always referenced, so garbage
        // collection never takes it; a crash leaves at most a stray
        // reference, which `repair` drops.
        self.digests
            .insert(new_ref.as_slice(), &[][..])
            .map_err(backend)?;
        // The commit point.
        self.functions
            .insert(function_key.as_slice(), value)
            .map_err(backend)?;
        if let Some(old_ref) = old_ref {
            self.digests.remove(old_ref).map_err(backend)?;
        }
        self.sync()?;
        Ok(Deployed {
            function: stored.function,
            changed: true,
        })
    }

    fn function(&self, tenant: &str, name: &str) -> Result<Option<FunctionRecord>, StoreError> {
        Ok(self
            .load_function(&function_key(tenant, name))?
            .map(|stored| stored.function))
    }

    fn functions(&self, tenant: &str) -> Result<Vec<FunctionRecord>, StoreError> {
        let stored: Vec<StoredFunction> =
            decode_all("functions", self.functions.scan_prefix(part(tenant)))?;
        Ok(stored.into_iter().map(|stored| stored.function).collect())
    }

    fn all_functions(&self) -> Result<Vec<FunctionRecord>, StoreError> {
        let stored: Vec<StoredFunction> =
            self.decode_or_quarantine("functions", &self.functions, self.functions.iter())?;
        Ok(stored.into_iter().map(|stored| stored.function).collect())
    }

    fn delete_function(
        &self,
        tenant: &str,
        name: &str,
    ) -> Result<Option<FunctionRecord>, StoreError> {
        let _writes = self.exclusive();
        let Some(stored) = self.remove_function(tenant, name)? else {
            return Ok(None);
        };
        // The function is gone and its records invisible whatever happens
        // now; a failed purge is retried at the next open.
        let prefix = invocation_prefix(tenant, name, stored.incarnation);
        if let Err(error) = self.purge(&prefix) {
            tracing::warn!(%error, tenant, function = name, "purging invocation records failed; retried at next open");
        }
        Ok(Some(stored.function))
    }

    fn digest_in_use(&self, digest: &str) -> Result<bool, StoreError> {
        match self.digests.scan_prefix(part(digest)).keys().next() {
            Some(entry) => entry.map(|_| true).map_err(backend),
            None => Ok(false),
        }
    }

    fn record_invocation(&self, record: &InvocationRecord) -> Result<u64, StoreError> {
        let mut answers = self.record_invocations(std::slice::from_ref(record));
        answers.pop().unwrap_or(Ok(0))
    }

    /// Writes the records in order under one hold of the write lock, reading
    /// each function once and pruning each function once, after its last
    /// record: under load the writer thread hands over hundreds of records
    /// at a time, and per record this leaves two inserts, the id check and
    /// the pruning of one old record.
    fn record_invocations(&self, records: &[InvocationRecord]) -> Vec<Result<u64, StoreError>> {
        if self.retention == 0 {
            // Nothing is kept (each record counts as pruned at once), but
            // the caller still learns of a missing function, as with any
            // other retention.
            return records
                .iter()
                .map(|record| {
                    match self.load_function(&function_key(&record.tenant, &record.function))? {
                        Some(_) => Ok(1),
                        None => Err(missing_function(record)),
                    }
                })
                .collect();
        }
        let mut answers: Vec<Result<u64, StoreError>> = Vec::with_capacity(records.len());
        // Per function written to: its state, and which answer is its last.
        let mut touched: std::collections::HashMap<Vec<u8>, (Option<Batched>, usize)> =
            std::collections::HashMap::new();
        // One writer at a time (see "No transactions"). Each record is its
        // own commit point; a crash after it leaves at worst a record
        // without its id entry or a count off, both of which retention and
        // reads already tolerate.
        let _writes = self.exclusive();
        for (index, record) in records.iter().enumerate() {
            let function_key = function_key(&record.tenant, &record.function);
            let (function, last) = match touched.entry(function_key) {
                std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
                std::collections::hash_map::Entry::Vacant(entry) => {
                    match self.batched(entry.key(), record) {
                        Ok(function) => entry.insert((Some(function), index)),
                        Err(e) => {
                            entry.insert((None, index));
                            answers.push(Err(e));
                            continue;
                        }
                    }
                }
            };
            *last = index;
            answers.push(match function {
                Some(function) => self.insert_record(record, function),
                // Its function was missing (or unreadable) for an earlier
                // record of this batch, and the lock is still held.
                None => Err(missing_function(record)),
            });
        }
        for (function_key, (function, last)) in touched {
            let Some(function) = function.filter(|function| function.added > 0) else {
                continue;
            };
            match self.prune(&function_key, function) {
                Ok(pruned) => {
                    if let Some(Ok(answer)) = answers.get_mut(last) {
                        *answer = pruned;
                    }
                }
                Err(e) => {
                    if let Some(answer) = answers.get_mut(last) {
                        *answer = Err(e);
                    }
                }
            }
        }
        answers
    }

    fn invocation_id(&self, _tenant: &str, function: &str, at: UnixMillis) -> Option<String> {
        // Without a `seq` the caller draws a random id, which the indexed
        // path keeps as before.
        let seq = self.mask.hide(self.db.generate_id().ok()?);
        let name = name_hash(function);
        Some(format!("inv_{at:012x}{:08x}{name:08x}{seq:016x}", self.tag))
    }

    fn invocation(&self, tenant: &str, id: &str) -> Result<Option<InvocationRecord>, StoreError> {
        if let Some(drawn) = DrawnId::parse(id).filter(|drawn| drawn.tag == self.tag)
            && let Some(record) = self.drawn_invocation(tenant, id, &drawn)?
        {
            return Ok(Some(record));
        }
        let Some(record_key) = self
            .invocation_ids
            .get(invocation_id_key(tenant, id))
            .map_err(backend)?
        else {
            return Ok(None);
        };
        // Absent: pruned between the two reads, or a dangling id entry.
        let Some(value) = self.invocations.get(&record_key).map_err(backend)? else {
            return Ok(None);
        };
        let record: InvocationRecord = decode(INVOCATIONS, &record_key, &value)?;
        if record.tenant != tenant {
            return Ok(None);
        }
        // Only records of the function's current incarnation exist for
        // readers; older ones belong to a deleted function awaiting purge.
        let incarnation = incarnation_of(&record_key);
        let live = self
            .load_function(&function_key(tenant, &record.function))?
            .is_some_and(|stored| Some(stored.incarnation) == incarnation);
        Ok(live.then_some(record))
    }

    fn invocations_before(
        &self,
        tenant: &str,
        function: &str,
        limit: usize,
        before: Option<u64>,
    ) -> Result<Vec<(u64, InvocationRecord)>, StoreError> {
        let Some(stored) = self.load_function(&function_key(tenant, function))? else {
            return Ok(Vec::new());
        };
        let prefix = invocation_prefix(tenant, function, stored.incarnation);
        // Keys end in the big-endian `seq`: those before `prefix seq` are
        // exactly the older records.
        let entries: Box<dyn DoubleEndedIterator<Item = sled::Result<(IVec, IVec)>>> = match before
        {
            Some(seq) => {
                let mut upper = prefix.clone();
                upper.extend_from_slice(&seq.to_be_bytes());
                Box::new(self.invocations.range(prefix..upper))
            }
            None => Box::new(self.invocations.scan_prefix(prefix)),
        };
        entries
            .rev()
            .take(limit)
            .map(|entry| {
                let (key, value) = entry.map_err(backend)?;
                let seq = key
                    .len()
                    .checked_sub(8)
                    .and_then(|at| <[u8; 8]>::try_from(&key[at..]).ok())
                    .map_or(0, u64::from_be_bytes);
                Ok((seq, decode(INVOCATIONS, &key, &value)?))
            })
            .collect()
    }

    fn put_job(&self, job: &JobRecord) -> Result<(), StoreError> {
        self.jobs
            .insert(job_key(&job.tenant, &job.id), encode(job)?)
            .map_err(backend)?;
        Ok(())
    }

    fn job(&self, tenant: &str, id: &str) -> Result<Option<JobRecord>, StoreError> {
        let key = job_key(tenant, id);
        match self.jobs.get(&key).map_err(backend)? {
            Some(value) => decode("jobs", &key, &value).map(Some),
            None => Ok(None),
        }
    }

    fn delete_job(&self, tenant: &str, id: &str) -> Result<bool, StoreError> {
        Ok(self
            .jobs
            .remove(job_key(tenant, id))
            .map_err(backend)?
            .is_some())
    }

    fn all_jobs(&self) -> Result<Vec<JobRecord>, StoreError> {
        let mut jobs: Vec<JobRecord> =
            self.decode_or_quarantine("jobs", &self.jobs, self.jobs.iter())?;
        // Keys group by tenant; ids are time-ordered.
        jobs.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(jobs)
    }

    fn jobs(&self, tenant: &str) -> Result<Vec<JobRecord>, StoreError> {
        // Keyed by tenant, then time-ordered id.
        decode_all("jobs", self.jobs.scan_prefix(part(tenant)))
    }

    fn put_schedule(&self, schedule: &ScheduleRecord) -> Result<(), StoreError> {
        self.schedules
            .insert(
                function_key(&schedule.tenant, &schedule.function),
                encode(schedule)?,
            )
            .map_err(backend)?;
        self.sync()
    }

    fn schedule(&self, tenant: &str, function: &str) -> Result<Option<ScheduleRecord>, StoreError> {
        let key = function_key(tenant, function);
        match self.schedules.get(&key).map_err(backend)? {
            Some(value) => decode("schedules", &key, &value).map(Some),
            None => Ok(None),
        }
    }

    fn delete_schedule(&self, tenant: &str, function: &str) -> Result<bool, StoreError> {
        let removed = self
            .schedules
            .remove(function_key(tenant, function))
            .map_err(backend)?
            .is_some();
        if removed {
            self.sync()?;
        }
        Ok(removed)
    }

    fn all_schedules(&self) -> Result<Vec<ScheduleRecord>, StoreError> {
        self.decode_or_quarantine("schedules", &self.schedules, self.schedules.iter())
    }

    fn schedules(&self, tenant: &str) -> Result<Vec<ScheduleRecord>, StoreError> {
        decode_all("schedules", self.schedules.scan_prefix(part(tenant)))
    }

    fn put_secret(&self, secret: &SecretRecord, max: u64) -> Result<SecretPut, StoreError> {
        let key = parts(&secret.tenant, &secret.name);
        let _writes = self.exclusive();
        if self
            .tenants
            .get(secret.tenant.as_bytes())
            .map_err(backend)?
            .is_none()
        {
            return Err(StoreError::Missing(format!("tenant {:?}", secret.tenant)));
        }
        let (put, stored) = match self.secrets.get(&key).map_err(backend)? {
            Some(value) => {
                let current: SecretRecord = decode("secrets", &key, &value)?;
                let replaced = SecretRecord {
                    created_at: current.created_at,
                    ..secret.clone()
                };
                (SecretPut::Replaced, replaced)
            }
            None => {
                let held = self.secrets.scan_prefix(part(&secret.tenant)).count() as u64;
                if held >= max {
                    return Ok(SecretPut::AtLimit);
                }
                (SecretPut::Created, secret.clone())
            }
        };
        self.secrets
            .insert(key.as_slice(), encode(&stored)?)
            .map_err(backend)?;
        self.sync()?;
        self.secrets_changed.send_modify(|n| *n = n.wrapping_add(1));
        Ok(put)
    }

    fn secrets(&self, tenant: &str) -> Result<Vec<SecretRecord>, StoreError> {
        decode_all("secrets", self.secrets.scan_prefix(part(tenant)))
    }

    fn all_secrets(&self) -> Result<Vec<SecretRecord>, StoreError> {
        self.decode_or_quarantine("secrets", &self.secrets, self.secrets.iter())
    }

    fn delete_secret(&self, tenant: &str, name: &str) -> Result<bool, StoreError> {
        let removed = self
            .secrets
            .remove(parts(tenant, name))
            .map_err(backend)?
            .is_some();
        if removed {
            self.sync()?;
            self.secrets_changed.send_modify(|n| *n = n.wrapping_add(1));
        }
        Ok(removed)
    }

    fn secrets_changed(&self) -> tokio::sync::watch::Receiver<u64> {
        self.secrets_changed.subscribe()
    }

    fn kv(&self) -> &dyn super::KvStore {
        self
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.sync()
    }
}

/// Appends one key part: `0x00` is escaped as `00 FF` and the part ends with
/// `00 01`. That keeps byte order equal to part order and makes the encoding
/// prefix-free, whatever bytes the part holds.
fn push_part(key: &mut Vec<u8>, part: &str) {
    for &byte in part.as_bytes() {
        key.push(byte);
        if byte == 0 {
            key.push(0xFF);
        }
    }
    key.extend_from_slice(&[0x00, 0x01]);
}

fn part(a: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(a.len() + 2);
    push_part(&mut key, a);
    key
}

fn parts(a: &str, b: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(a.len() + b.len() + 4);
    push_part(&mut key, a);
    push_part(&mut key, b);
    key
}

fn key_key(tenant: &str, id: &str) -> Vec<u8> {
    parts(tenant, id)
}

fn function_key(tenant: &str, name: &str) -> Vec<u8> {
    parts(tenant, name)
}

fn digest_key(digest: &str, tenant: &str, name: &str) -> Vec<u8> {
    let mut key = part(digest);
    push_part(&mut key, tenant);
    push_part(&mut key, name);
    key
}

fn invocation_prefix(tenant: &str, function: &str, incarnation: u64) -> Vec<u8> {
    let mut key = parts(tenant, function);
    key.extend_from_slice(&incarnation.to_be_bytes());
    key
}

fn job_key(tenant: &str, id: &str) -> Vec<u8> {
    let mut key = part(tenant);
    key.extend_from_slice(id.as_bytes());
    key
}

fn invocation_id_key(tenant: &str, id: &str) -> Vec<u8> {
    let mut key = part(tenant);
    key.extend_from_slice(id.as_bytes());
    key
}

/// `N` random bytes kept in the default tree under `key`: drawn and
/// written at the first open, read back at every later one.
fn kept_random<const N: usize>(db: &Db, key: &[u8]) -> Result<[u8; N], StoreError> {
    match db.get(key).map_err(backend)? {
        Some(kept) => <[u8; N]>::try_from(kept.as_ref()).map_err(|_| StoreError::Corrupt {
            key: String::from_utf8_lossy(key).into_owned(),
            message: format!("{} bytes, not {N}", kept.len()),
            source: None,
        }),
        None => {
            let drawn: [u8; N] = rand::random();
            db.insert(key, &drawn[..]).map_err(backend)?;
            Ok(drawn)
        }
    }
}

/// How a drawn id holds its `seq`: through a keyed permutation (4 Feistel
/// rounds over its 32-bit halves, each BLAKE3 keyed with the database's
/// random key), so that ids do not tell how many the database drew. In the
/// plain, two ids of a public function would tell an anonymous caller the
/// host's call rate across every tenant.
#[derive(Clone, Copy)]
struct SeqMask([u8; 32]);

impl SeqMask {
    const ROUNDS: u8 = 4;

    fn round(&self, round: u8, half: u32) -> u32 {
        let [a, b, c, d] = half.to_be_bytes();
        let hash = blake3::keyed_hash(&self.0, &[round, a, b, c, d]);
        let bytes = hash.as_bytes();
        u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
    }

    fn hide(&self, seq: u64) -> u64 {
        let (mut left, mut right) = ((seq >> 32) as u32, seq as u32);
        for round in 0..Self::ROUNDS {
            (left, right) = (right, left ^ self.round(round, right));
        }
        (u64::from(left) << 32) | u64::from(right)
    }

    fn reveal(&self, hidden: u64) -> u64 {
        let (mut left, mut right) = ((hidden >> 32) as u32, hidden as u32);
        for round in (0..Self::ROUNDS).rev() {
            (left, right) = (right ^ self.round(round, left), left);
        }
        (u64::from(left) << 32) | u64::from(right)
    }
}

/// The parts of an invocation id a store drew (see the layout).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DrawnId {
    tag: u32,
    /// The function name's hash (`name_hash`).
    name: u32,
    /// The `seq`, hidden (see [`SeqMask`]).
    seq: u64,
}

impl DrawnId {
    /// `inv_` + 12 + 8 + 8 + 16 lowercase hex digits; `None` for any other
    /// id (random ones have 16 digits after the time).
    fn parse(id: &str) -> Option<Self> {
        let digits = id.strip_prefix("inv_")?;
        if digits.len() != 44
            || !digits
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            return None;
        }
        Some(Self {
            tag: u32::from_str_radix(digits.get(12..20)?, 16).ok()?,
            name: u32::from_str_radix(digits.get(20..28)?, 16).ok()?,
            seq: u64::from_str_radix(digits.get(28..44)?, 16).ok()?,
        })
    }
}

/// The first 4 bytes of a function name's SHA-256: enough to pick the
/// function of a drawn id among a tenant's few (a repeat only costs one
/// more read), and the same in every build.
fn name_hash(function: &str) -> u32 {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(function.as_bytes());
    u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]])
}

/// The incarnation inside an `invocations` key (the 8 bytes before `seq`).
fn incarnation_of(record_key: &[u8]) -> Option<u64> {
    let end = record_key.len().checked_sub(8)?;
    let start = end.checked_sub(8)?;
    let bytes: [u8; 8] = record_key.get(start..end)?.try_into().ok()?;
    Some(u64::from_be_bytes(bytes))
}

fn decode_count(function_key: &[u8], value: Option<IVec>) -> Result<u64, StoreError> {
    let Some(value) = value else {
        return Ok(0);
    };
    let bytes: [u8; 8] = value.as_ref().try_into().map_err(|_| StoreError::Corrupt {
        key: describe_key("invocation_counts", function_key),
        message: format!("expected 8 bytes, found {}", value.len()),
        source: None,
    })?;
    Ok(u64::from_be_bytes(bytes))
}

/// Removes `key` from `tree` if it still maps to `target` (an index entry
/// that a later write may have re-pointed).
fn remove_if_points_to(tree: &Tree, key: &[u8], target: &[u8]) -> Result<(), StoreError> {
    if tree
        .get(key)
        .map_err(backend)?
        .is_some_and(|current| current.as_ref() == target)
    {
        tree.remove(key).map_err(backend)?;
    }
    Ok(())
}

/// The parts of a key made by `push_part` alone (no binary suffix); `None`
/// for bytes it cannot have made.
fn split_parts(key: &[u8]) -> Option<Vec<String>> {
    let mut parts = Vec::new();
    let mut current = Vec::new();
    let mut bytes = key.iter().copied();
    while let Some(byte) = bytes.next() {
        if byte != 0 {
            current.push(byte);
            continue;
        }
        match bytes.next()? {
            0x01 => parts.push(String::from_utf8(std::mem::take(&mut current)).ok()?),
            0xFF => current.push(0),
            _ => return None,
        }
    }
    current.is_empty().then_some(parts)
}

fn encode<T: Serialize>(record: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(record).map_err(|error| StoreError::Backend(BackendError::Encode(error)))
}

fn decode<T: DeserializeOwned>(tree: &str, key: &[u8], value: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(value).map_err(|error| StoreError::Corrupt {
        key: describe_key(tree, key),
        message: error.to_string(),
        source: Some(error),
    })
}

fn decode_all<T: DeserializeOwned>(
    tree: &str,
    entries: impl Iterator<Item = sled::Result<(IVec, IVec)>>,
) -> Result<Vec<T>, StoreError> {
    entries
        .map(|entry| {
            let (key, value) = entry.map_err(backend)?;
            decode(tree, &key, &value)
        })
        .collect()
}

/// A readable name for a key in error messages: `tree/part/part…`, with the
/// binary `inc`/`seq` suffix of invocation keys as numbers.
fn describe_key(tree: &str, key: &[u8]) -> String {
    let (text, numbers) = match tree {
        INVOCATIONS if key.len() >= 16 => key.split_at(key.len() - 16),
        _ => (key, &[][..]),
    };
    let mut out = String::from(tree);
    out.push('/');
    let mut current = Vec::new();
    let mut bytes = text.iter().copied().peekable();
    while let Some(byte) = bytes.next() {
        match (byte, bytes.peek()) {
            (0x00, Some(0x01)) => {
                bytes.next();
                push_readable(&mut out, &current);
                out.push('/');
                current.clear();
            }
            (0x00, Some(0xFF)) => {
                bytes.next();
                current.push(0);
            }
            _ => current.push(byte),
        }
    }
    push_readable(&mut out, &current);
    for chunk in numbers.chunks_exact(8) {
        let mut be = [0u8; 8];
        be.copy_from_slice(chunk);
        let _ = write!(out, "#{}", u64::from_be_bytes(be));
    }
    out.trim_end_matches('/').to_owned()
}

/// Appends a key part as text, with control characters escaped.
fn push_readable(out: &mut String, part: &[u8]) {
    out.extend(
        String::from_utf8_lossy(part)
            .chars()
            .flat_map(char::escape_debug),
    );
}

fn backend(error: sled::Error) -> StoreError {
    StoreError::from(error)
}

#[cfg(test)]
/// Behaviour every store shares is tested once for all of them, in
/// `host/tests/all/store.rs`; these are sled's own: its layout, its repair
/// of interrupted writes, its handling of damaged records.
mod tests {
    use std::sync::Arc;

    use tempfile::TempDir;

    use super::*;
    use crate::store::{FunctionWorld, TimingsRecord};

    const DIGEST_A: &str = "sha256:aaaa";
    const DIGEST_B: &str = "sha256:bbbb";

    fn open(retention: usize) -> (TempDir, SledStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(&dir.path().join("meta"), retention).unwrap();
        (dir, store)
    }

    fn reopen(dir: &TempDir, store: SledStore, retention: usize) -> SledStore {
        drop(store);
        // sled's flusher thread lets go of the database's file lock a
        // moment after the last handle is dropped.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            match SledStore::open(&dir.path().join("meta"), retention) {
                Ok(store) => return store,
                Err(error) if std::time::Instant::now() < deadline => {
                    eprintln!("reopening: {error}; retrying");
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(error) => panic!("reopening the store: {error}"),
            }
        }
    }

    fn request(tenant: &str, name: &str, digest: &str, public: bool) -> DeployRequest {
        DeployRequest {
            secrets: Vec::new(),
            config: std::collections::BTreeMap::new(),
            retryable: false,
            tenant: tenant.into(),
            name: name.into(),
            digest: digest.into(),
            size: 1234,
            world: FunctionWorld::Handler,
            public,
        }
    }

    fn key(tenant: &str, id: &str, hash_byte: u8) -> ApiKeyRecord {
        ApiKeyRecord {
            id: id.into(),
            tenant: tenant.into(),
            hash: [hash_byte; 32],
            created_at: 7,
        }
    }

    fn invocation(tenant: &str, function: &str, id: &str) -> InvocationRecord {
        InvocationRecord {
            id: id.into(),
            tenant: tenant.into(),
            function: function.into(),
            version: 1,
            started_at: 42,
            status: 200,
            outcome: "ok".into(),
            message: None,
            timings: TimingsRecord {
                instantiate_us: 1,
                call_us: 2,
                total_us: 3,
                reused_instance: false,
                ready_instance: false,
            },
            peak_memory_bytes: 65536,
            stdout: "out".into(),
            stderr: String::new(),
            stdout_dropped_bytes: 0,
            stderr_dropped_bytes: 0,
            egress_denied: Vec::new(),
            trace_id: None,
        }
    }

    fn ids(records: &[InvocationRecord]) -> Vec<&str> {
        records.iter().map(|record| record.id.as_str()).collect()
    }

    /// Sets up tenant `acme` with function `hello`.
    fn with_function(retention: usize) -> (TempDir, SledStore) {
        let (dir, store) = open(retention);
        store.create_tenant("acme").unwrap();
        store
            .deploy(&request("acme", "hello", DIGEST_A, false))
            .unwrap();
        (dir, store)
    }

    /// A record that does not decode is moved aside with a log line; the
    /// listings a start reads go on with the others.
    #[test]
    fn undecodable_records_are_quarantined_not_fatal() {
        let (dir, store) = open(10);
        store.create_tenant("alpha").unwrap();
        store.create_tenant("beta").unwrap();
        store.tenants.insert("broken", &b"{not json"[..]).unwrap();
        store.schedules.insert("x\0y", &b"\xff"[..]).unwrap();
        let store = reopen(&dir, store, 10);
        let names: Vec<String> = store
            .tenants()
            .unwrap()
            .into_iter()
            .map(|t| t.name)
            .collect();
        assert_eq!(names, ["alpha", "beta"]);
        assert!(store.all_schedules().unwrap().is_empty());
        assert_eq!(store.quarantined(), 2);
        assert!(store.tenants.get("broken").unwrap().is_none());
        // The bytes are kept for an operator.
        assert_eq!(
            store.quarantine.get(b"tenants\0broken").unwrap().unwrap(),
            &b"{not json"[..]
        );
    }

    #[test]
    fn revoke_removes_the_key_and_its_indexes() {
        let (_dir, store) = open(10);
        store.create_tenant("acme").unwrap();
        store.create_tenant("other").unwrap();
        store.add_key(&key("acme", "key_1", 1)).unwrap();

        // Another tenant cannot revoke it.
        assert!(!store.revoke_key("other", "key_1").unwrap());
        assert!(store.key_by_hash(&[1; 32]).unwrap().is_some());

        assert!(store.revoke_key("acme", "key_1").unwrap());
        assert!(!store.revoke_key("acme", "key_1").unwrap());
        assert_eq!(store.key_by_hash(&[1; 32]).unwrap(), None);
        assert!(store.keys("acme").unwrap().is_empty());
        // Id and hash are free again.
        store.add_key(&key("other", "key_1", 1)).unwrap();
        assert_eq!(
            store.key_by_hash(&[1; 32]).unwrap().unwrap().tenant,
            "other"
        );
    }

    #[test]
    fn digest_in_use_follows_deploys_and_deletes_across_tenants() {
        let (_dir, store) = open(10);
        assert!(!store.digest_in_use(DIGEST_A).unwrap());
        store.deploy(&request("t1", "f", DIGEST_A, false)).unwrap();
        store.deploy(&request("t2", "g", DIGEST_A, false)).unwrap();
        assert!(store.digest_in_use(DIGEST_A).unwrap());

        // Re-deploying t1/f with other bytes drops its reference only.
        store.deploy(&request("t1", "f", DIGEST_B, false)).unwrap();
        assert!(store.digest_in_use(DIGEST_A).unwrap());
        assert!(store.digest_in_use(DIGEST_B).unwrap());

        store.delete_function("t2", "g").unwrap();
        assert!(!store.digest_in_use(DIGEST_A).unwrap());
        // A digest that is a prefix of another is not "in use" by it.
        assert!(!store.digest_in_use("sha256:bb").unwrap());
        store.delete_function("t1", "f").unwrap();
        assert!(!store.digest_in_use(DIGEST_B).unwrap());
    }

    #[test]
    fn a_batch_keeps_the_newest_records_of_each_function_and_fails_only_its_missing_ones() {
        let (_dir, store) = with_function(3);
        store
            .deploy(&request("acme", "other", DIGEST_A, false))
            .unwrap();
        let mut batch: Vec<InvocationRecord> = (0..6)
            .map(|i| invocation("acme", "hello", &format!("inv_h{i}")))
            .collect();
        batch.insert(2, invocation("acme", "other", "inv_o0"));
        batch.insert(4, invocation("acme", "gone", "inv_g0"));
        batch.push(invocation("acme", "gone", "inv_g1"));
        // A retried write of a record already in the batch.
        batch.push(invocation("acme", "hello", "inv_h5"));
        let answers = store.record_invocations(&batch);
        let missing: Vec<usize> = answers
            .iter()
            .enumerate()
            .filter(|(_, answer)| matches!(answer, Err(StoreError::Missing(_))))
            .map(|(index, _)| index)
            .collect();
        assert_eq!(missing, [4, 8]);
        // The pruned count is told once per function, by its last record.
        let pruned: u64 = answers
            .iter()
            .filter_map(|answer| answer.as_ref().ok())
            .sum();
        assert_eq!(pruned, 3);
        assert_eq!(
            ids(&store.invocations("acme", "hello", 100).unwrap()),
            ["inv_h5", "inv_h4", "inv_h3"]
        );
        assert_eq!(
            ids(&store.invocations("acme", "other", 100).unwrap()),
            ["inv_o0"]
        );
        assert_eq!(store.invocation("acme", "inv_h0").unwrap(), None);
        assert_eq!(store.invocations.len(), 4);
        assert_eq!(store.invocation_ids.len(), 4);
        assert_eq!(store.count(&function_key("acme", "hello")).unwrap(), 3);
        assert_eq!(store.count(&function_key("acme", "other")).unwrap(), 1);
    }

    #[test]
    fn retention_keeps_exactly_the_newest_records() {
        let (_dir, store) = with_function(3);
        store
            .deploy(&request("acme", "other", DIGEST_A, false))
            .unwrap();
        store
            .record_invocation(&invocation("acme", "other", "inv_other"))
            .unwrap();
        // Ids deliberately sort opposite to recording order: retention
        // follows the recording order.
        let recorded: Vec<String> = (0..10).map(|i| format!("inv_{}", 9 - i)).collect();
        let pruned: Vec<u64> = recorded
            .iter()
            .map(|id| {
                store
                    .record_invocation(&invocation("acme", "hello", id))
                    .unwrap()
            })
            .collect();
        // Each record past the third pushes exactly one out, and says so:
        // the host's pruned counter is the sum of these.
        assert_eq!(pruned, [0, 0, 0, 1, 1, 1, 1, 1, 1, 1]);
        assert_eq!(
            ids(&store.invocations("acme", "hello", 100).unwrap()),
            ["inv_0", "inv_1", "inv_2"]
        );
        for pruned in &recorded[..7] {
            assert_eq!(store.invocation("acme", pruned).unwrap(), None, "{pruned}");
        }
        // The other function's records are its own business.
        assert_eq!(
            ids(&store.invocations("acme", "other", 100).unwrap()),
            ["inv_other"]
        );
        // Nothing pruned lingers in the trees.
        assert_eq!(store.invocations.len(), 4);
        assert_eq!(store.invocation_ids.len(), 4);
        assert_eq!(store.count(&function_key("acme", "hello")).unwrap(), 3);
    }

    #[test]
    fn concurrent_recording_respects_retention() {
        let (_dir, store) = with_function(5);
        let store = Arc::new(store);
        std::thread::scope(|scope| {
            for thread in 0..4 {
                let store = Arc::clone(&store);
                scope.spawn(move || {
                    for i in 0..25 {
                        let id = format!("inv_{thread}_{i}");
                        store
                            .record_invocation(&invocation("acme", "hello", &id))
                            .unwrap();
                    }
                });
            }
        });
        assert_eq!(store.invocations("acme", "hello", 100).unwrap().len(), 5);
        assert_eq!(store.invocations.len(), 5);
        assert_eq!(store.invocation_ids.len(), 5);
        assert_eq!(store.count(&function_key("acme", "hello")).unwrap(), 5);
    }

    /// Every kind of write at once, with records big enough to keep sled's
    /// log buffers busy, keeps making progress (see "No transactions": the
    /// stall sled transactions can cause did not show here in 8 s runs, so
    /// this guards the lock-plus-ordered-writes scheme, not the proof).
    #[test]
    fn every_kind_of_write_at_once_keeps_making_progress() {
        let (_dir, store) = with_function(50);
        let store = Arc::new(store);
        let progress = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (done, finished) = std::sync::mpsc::channel();
        let worker = |work: Box<dyn Fn(u64) + Send>| {
            let (progress, stop, done) = (Arc::clone(&progress), Arc::clone(&stop), done.clone());
            // Detached, not scoped: a stalled writer must fail the test,
            // not hang it.
            std::thread::spawn(move || {
                let mut i = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    work(i);
                    i += 1;
                    progress.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                let _ = done.send(());
            });
        };
        let big = "x".repeat(512 * 1024);
        for thread in 0..3 {
            let (store, big) = (Arc::clone(&store), big.clone());
            worker(Box::new(move |i| {
                let mut record = invocation("acme", "hello", &format!("inv_{thread}_{i}"));
                record.stdout.clone_from(&big);
                store.record_invocation(&record).unwrap();
            }));
        }
        let keys = Arc::clone(&store);
        worker(Box::new(move |i| {
            let id = format!("key_{i}");
            let mut hash = [0u8; 32];
            hash[..8].copy_from_slice(&i.to_be_bytes());
            keys.add_key(&ApiKeyRecord {
                id: id.clone(),
                tenant: "acme".into(),
                hash,
                created_at: 1,
            })
            .unwrap();
            assert!(keys.revoke_key("acme", &id).unwrap());
        }));
        let functions = Arc::clone(&store);
        worker(Box::new(move |i| {
            let digest = if i % 2 == 0 { DIGEST_A } else { DIGEST_B };
            functions
                .deploy(&request("acme", "other", digest, false))
                .unwrap();
            if i % 3 == 0 {
                functions.delete_function("acme", "other").unwrap();
            }
        }));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(8);
        let mut last = 0;
        while std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_secs(2));
            let now = progress.load(std::sync::atomic::Ordering::Relaxed);
            assert!(now > last, "no write finished in 2 s: the store is stalled");
            last = now;
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for _ in 0..5 {
            finished
                .recv_timeout(std::time::Duration::from_secs(30))
                .expect("a writer did not finish");
        }
    }

    #[test]
    fn delete_function_removes_it_and_its_records() {
        let (_dir, store) = with_function(100);
        store
            .deploy(&request("acme", "keep", DIGEST_B, false))
            .unwrap();
        store
            .record_invocation(&invocation("acme", "keep", "inv_keep"))
            .unwrap();
        for i in 0..(PURGE_BATCH + 10) {
            store
                .record_invocation(&invocation("acme", "hello", &format!("inv_{i}")))
                .unwrap();
        }
        let deleted = store.delete_function("acme", "hello").unwrap().unwrap();
        assert_eq!((deleted.name.as_str(), deleted.version), ("hello", 1));
        assert_eq!(store.delete_function("acme", "hello").unwrap(), None);

        assert_eq!(store.function("acme", "hello").unwrap(), None);
        assert_eq!(store.invocation("acme", "inv_0").unwrap(), None);
        assert!(store.invocations("acme", "hello", 10).unwrap().is_empty());
        assert!(!store.digest_in_use(DIGEST_A).unwrap());
        // Physically gone, not just hidden; the other function untouched.
        assert_eq!(store.invocations.len(), 1);
        assert_eq!(store.invocation_ids.len(), 1);
        assert!(store.purges.is_empty());
        assert_eq!(
            ids(&store.invocations("acme", "keep", 10).unwrap()),
            ["inv_keep"]
        );

        // A new function under the old name starts afresh.
        let again = store
            .deploy(&request("acme", "hello", DIGEST_A, false))
            .unwrap();
        assert_eq!(again.function.version, 1);
        assert!(store.invocations("acme", "hello", 10).unwrap().is_empty());
    }

    #[test]
    fn a_crash_before_the_purge_hides_records_and_open_finishes_it() {
        let (dir, store) = with_function(100);
        store
            .record_invocation(&invocation("acme", "hello", "inv_old"))
            .unwrap();
        // The atomic part of delete_function only, as if the process died
        // right after it.
        store.remove_function("acme", "hello").unwrap().unwrap();
        assert_eq!(store.invocation("acme", "inv_old").unwrap(), None);

        // Re-deployed before any purge: the old record stays invisible.
        store
            .deploy(&request("acme", "hello", DIGEST_A, false))
            .unwrap();
        assert_eq!(store.invocation("acme", "inv_old").unwrap(), None);
        assert!(store.invocations("acme", "hello", 10).unwrap().is_empty());
        store
            .record_invocation(&invocation("acme", "hello", "inv_new"))
            .unwrap();
        assert_eq!(
            ids(&store.invocations("acme", "hello", 10).unwrap()),
            ["inv_new"]
        );
        assert_eq!(store.purges.len(), 1);

        let store = reopen(&dir, store, 100);
        assert!(store.purges.is_empty());
        assert_eq!(store.invocations.len(), 1);
        assert_eq!(store.invocation_ids.len(), 1);
        assert_eq!(
            ids(&store.invocations("acme", "hello", 10).unwrap()),
            ["inv_new"]
        );
    }

    /// A crash inside `add_key` before its commit point (the hash entry)
    /// leaves a key nobody was shown: the next open removes it. A crash
    /// inside `revoke_key` after its commit point (the record) leaves index
    /// entries: the next open removes them. Complete keys stay.
    #[test]
    fn open_undoes_uncommitted_key_adds_and_finishes_revokes() {
        let (dir, store) = open(10);
        store.create_tenant("acme").unwrap();
        store.add_key(&key("acme", "k_kept", 1)).unwrap();
        // An add that stopped after the record and the id entry.
        let half_added = key("acme", "k_half", 2);
        store
            .keys
            .insert(key_key("acme", "k_half"), encode(&half_added).unwrap())
            .unwrap();
        store.key_ids.insert("k_half", "acme").unwrap();
        // A revoke that stopped right after its commit point.
        store.add_key(&key("acme", "k_gone", 3)).unwrap();
        store.keys.remove(key_key("acme", "k_gone")).unwrap();
        assert_eq!(store.key_by_hash(&[3; 32]).unwrap(), None);

        let store = reopen(&dir, store, 10);
        let ids: Vec<String> = store
            .keys("acme")
            .unwrap()
            .into_iter()
            .map(|k| k.id)
            .collect();
        assert_eq!(ids, ["k_kept"]);
        assert_eq!(store.key_ids.len(), 1);
        assert_eq!(store.key_hashes.len(), 1);
        assert_eq!(store.key_by_hash(&[1; 32]).unwrap().unwrap().id, "k_kept");
        assert_eq!(store.key_by_hash(&[2; 32]).unwrap(), None);
        // The ids and hashes of the undone keys are free again.
        store.add_key(&key("acme", "k_half", 2)).unwrap();
        store.add_key(&key("acme", "k_gone", 3)).unwrap();
    }

    /// A delete that stopped before its commit point keeps the function's
    /// records (only the purge entry goes); one that stopped after it
    /// leaves a digest reference and a count, which the next open drops.
    #[test]
    fn open_finishes_or_undoes_interrupted_deletes_and_deploys() {
        let (dir, store) = with_function(10);
        store
            .record_invocation(&invocation("acme", "hello", "inv_kept"))
            .unwrap();
        let stored = store
            .load_function(&function_key("acme", "hello"))
            .unwrap()
            .unwrap();
        store
            .purges
            .insert(
                invocation_prefix("acme", "hello", stored.incarnation),
                &[][..],
            )
            .unwrap();
        // Another function whose delete stopped right after the commit
        // point, and a deploy that stopped after its new reference.
        store
            .deploy(&request("acme", "gone", DIGEST_B, false))
            .unwrap();
        store
            .record_invocation(&invocation("acme", "gone", "inv_gone"))
            .unwrap();
        store
            .functions
            .remove(function_key("acme", "gone"))
            .unwrap();
        store
            .digests
            .insert(digest_key("sha256:cccc", "acme", "hello"), &[][..])
            .unwrap();

        let store = reopen(&dir, store, 10);
        assert!(store.purges.is_empty());
        assert_eq!(
            ids(&store.invocations("acme", "hello", 10).unwrap()),
            ["inv_kept"]
        );
        assert!(store.digest_in_use(DIGEST_A).unwrap());
        assert!(!store.digest_in_use(DIGEST_B).unwrap());
        assert!(!store.digest_in_use("sha256:cccc").unwrap());
        assert!(store.count(&function_key("acme", "gone")).unwrap() == 0);
        assert_eq!(store.invocation_counts.len(), 1);
        // Redeployed under the same name, it starts with no records.
        store
            .deploy(&request("acme", "gone", DIGEST_B, false))
            .unwrap();
        assert!(store.invocations("acme", "gone", 10).unwrap().is_empty());
    }

    #[test]
    fn tenants_are_isolated() {
        let (_dir, store) = open(100);
        for tenant in ["a", "b"] {
            store.create_tenant(tenant).unwrap();
        }
        store.add_key(&key("a", "key_a", 1)).unwrap();
        store.deploy(&request("a", "f", DIGEST_A, false)).unwrap();
        store
            .record_invocation(&invocation("a", "f", "inv_a"))
            .unwrap();

        assert!(store.keys("b").unwrap().is_empty());
        assert!(!store.revoke_key("b", "key_a").unwrap());
        assert_eq!(store.function("b", "f").unwrap(), None);
        assert!(store.functions("b").unwrap().is_empty());
        assert_eq!(store.delete_function("b", "f").unwrap(), None);
        assert_eq!(store.invocation("b", "inv_a").unwrap(), None);
        assert!(store.invocations("b", "f", 10).unwrap().is_empty());
        // B deploying a function of the same name does not reach A's records.
        store.deploy(&request("b", "f", DIGEST_A, false)).unwrap();
        assert_eq!(store.invocation("b", "inv_a").unwrap(), None);
        assert!(store.invocations("b", "f", 10).unwrap().is_empty());

        // A still has everything.
        assert_eq!(store.keys("a").unwrap().len(), 1);
        assert_eq!(store.function("a", "f").unwrap().unwrap().tenant, "a");
        assert!(store.invocation("a", "inv_a").unwrap().is_some());
        assert_eq!(ids(&store.invocations("a", "f", 10).unwrap()), ["inv_a"]);
    }

    #[test]
    fn everything_survives_a_reopen() {
        let (dir, store) = with_function(3);
        store.add_key(&key("acme", "key_1", 1)).unwrap();
        store
            .deploy(&request("acme", "hello", DIGEST_B, true))
            .unwrap();
        for i in 0..3 {
            store
                .record_invocation(&invocation("acme", "hello", &format!("inv_{i}")))
                .unwrap();
        }
        let tenants = store.tenants().unwrap();
        let functions = store.all_functions().unwrap();
        let invocations = store.invocations("acme", "hello", 10).unwrap();

        let store = reopen(&dir, store, 3);
        assert_eq!(store.tenants().unwrap(), tenants);
        assert_eq!(store.keys("acme").unwrap(), vec![key("acme", "key_1", 1)]);
        assert!(store.key_by_hash(&[1; 32]).unwrap().is_some());
        assert_eq!(store.all_functions().unwrap(), functions);
        assert_eq!(store.function("acme", "hello").unwrap().unwrap().version, 2);
        assert!(store.digest_in_use(DIGEST_B).unwrap());
        assert_eq!(store.invocations("acme", "hello", 10).unwrap(), invocations);
        assert!(store.invocation("acme", "inv_1").unwrap().is_some());

        // Sequence numbers keep increasing across the restart, so retention
        // still drops the oldest.
        store
            .record_invocation(&invocation("acme", "hello", "inv_3"))
            .unwrap();
        assert_eq!(
            ids(&store.invocations("acme", "hello", 10).unwrap()),
            ["inv_3", "inv_2", "inv_1"]
        );
        assert_eq!(store.retention_per_function(), 3);
    }

    #[test]
    fn corrupt_records_are_errors() {
        let (_dir, store) = with_function(10);
        store
            .record_invocation(&invocation("acme", "hello", "inv_1"))
            .unwrap();

        store.tenants.insert("acme", &b"{not json"[..]).unwrap();
        assert!(matches!(
            store.tenant("acme"),
            Err(StoreError::Corrupt { .. })
        ));
        // Listings move a corrupt record aside (see
        // `undecodable_records_are_quarantined_not_fatal`).
        assert!(store.tenants().unwrap().is_empty());
        assert_eq!(store.quarantined(), 1);

        let (record_key, _) = store.invocations.iter().next().unwrap().unwrap();
        store.invocations.insert(&record_key, &b"[]"[..]).unwrap();
        match store.invocation("acme", "inv_1") {
            Err(StoreError::Corrupt { key, .. }) => {
                assert!(key.starts_with("invocations/acme/hello/#"), "{key}")
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(
            store.invocations("acme", "hello", 10),
            Err(StoreError::Corrupt { .. })
        ));

        store
            .functions
            .insert(function_key("acme", "hello"), &b"\xff"[..])
            .unwrap();
        match store.function("acme", "hello") {
            Err(StoreError::Corrupt { key, .. }) => assert_eq!(key, "functions/acme/hello"),
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(
            store.functions("acme"),
            Err(StoreError::Corrupt { .. })
        ));
        assert!(matches!(
            store.deploy(&request("acme", "hello", DIGEST_B, false)),
            Err(StoreError::Corrupt { .. })
        ));
        assert!(matches!(
            store.delete_function("acme", "hello"),
            Err(StoreError::Corrupt { .. })
        ));
        assert!(matches!(
            store.record_invocation(&invocation("acme", "hello", "inv_2")),
            Err(StoreError::Corrupt { .. })
        ));
        // The failed writes changed nothing.
        assert_eq!(
            store
                .functions
                .get(function_key("acme", "hello"))
                .unwrap()
                .unwrap()
                .as_ref(),
            b"\xff"
        );
    }

    #[test]
    fn a_damaged_record_does_not_block_retention() {
        let (_dir, store) = with_function(2);
        store
            .record_invocation(&invocation("acme", "hello", "inv_1"))
            .unwrap();
        let (record_key, _) = store.invocations.iter().next().unwrap().unwrap();
        store
            .invocations
            .insert(&record_key, &b"garbage"[..])
            .unwrap();
        store
            .record_invocation(&invocation("acme", "hello", "inv_2"))
            .unwrap();
        store
            .record_invocation(&invocation("acme", "hello", "inv_3"))
            .unwrap();
        assert_eq!(
            ids(&store.invocations("acme", "hello", 10).unwrap()),
            ["inv_3", "inv_2"]
        );
        // Its id entry dangles, which reads as absent.
        assert_eq!(store.invocation("acme", "inv_1").unwrap(), None);
    }

    /// Records whose id the store drew: found by id without an id entry,
    /// pruned like any other, alongside records with random ids, and
    /// confined to their tenant and to the function's current incarnation.
    #[test]
    fn drawn_ids_find_their_records_without_an_id_entry() {
        let (_dir, store) = with_function(3);
        store.create_tenant("rival").unwrap();
        store
            .deploy(&request("rival", "hello", DIGEST_A, false))
            .unwrap();
        let drawn: Vec<String> = (0..5)
            .map(|at| store.invocation_id("acme", "hello", 1000 + at).unwrap())
            .collect();
        for (at, id) in (1000..).zip(&drawn) {
            assert_eq!(id.len(), 48, "{id}");
            assert_eq!(u64::from_str_radix(&id[4..16], 16).ok(), Some(at), "{id}");
        }
        // Ids sort by start time, then by draw.
        let mut sorted = drawn.clone();
        sorted.sort();
        assert_eq!(sorted, drawn);

        // Recorded in an order unlike the draw's, with a random id between.
        for id in [&drawn[1], &drawn[0], &drawn[2]] {
            store
                .record_invocation(&invocation("acme", "hello", id))
                .unwrap();
        }
        store
            .record_invocation(&invocation("acme", "hello", "inv_random"))
            .unwrap();
        assert_eq!(
            store.invocation_ids.len(),
            1,
            "only the random id has an entry"
        );
        for id in [&drawn[1], &drawn[2], "inv_random"] {
            let found = store.invocation("acme", id).unwrap();
            assert_eq!(found.map(|record| record.id), Some(id.to_owned()));
        }
        // A drawn id's record takes its place by when the id was drawn (the
        // start), a random id's by when it was written: retention (3)
        // pushed out `drawn[0]`, which started first though it was written
        // second.
        assert_eq!(store.invocation("acme", &drawn[0]).unwrap(), None);
        assert_eq!(store.invocations.len(), 3);
        assert_eq!(
            ids(&store.invocations("acme", "hello", 10).unwrap()),
            ["inv_random", drawn[2].as_str(), drawn[1].as_str()]
        );

        // The same record again is a retried write; another under its id
        // is refused.
        assert_eq!(
            store
                .record_invocation(&invocation("acme", "hello", &drawn[2]))
                .unwrap(),
            0
        );
        assert_eq!(store.invocations.len(), 3);
        let mut other = invocation("acme", "hello", &drawn[2]);
        other.status = 500;
        assert!(matches!(
            store.record_invocation(&other),
            Err(StoreError::Conflict(_))
        ));

        // Another tenant with a function of the same name finds nothing.
        assert_eq!(store.invocation("rival", &drawn[2]).unwrap(), None);
        // Nor does anyone once the function is deleted and deployed anew.
        store.delete_function("acme", "hello").unwrap();
        store
            .deploy(&request("acme", "hello", DIGEST_A, false))
            .unwrap();
        assert_eq!(store.invocation("acme", &drawn[2]).unwrap(), None);
        assert_eq!(store.invocations.len(), 0, "the purge took them all");
        assert_eq!(store.invocation_ids.len(), 0);

        // A record whose id was drawn before the delete lands in the new
        // incarnation, as a random id's would, and is found.
        store
            .record_invocation(&invocation("acme", "hello", &drawn[3]))
            .unwrap();
        assert_eq!(
            store.invocation("acme", &drawn[3]).unwrap().map(|r| r.id),
            Some(drawn[3].clone())
        );
    }

    /// An id of the drawn shape that this database did not draw (another
    /// tag, or another function's name hash) is kept and found through the
    /// id index: its `seq` could repeat one drawn here.
    #[test]
    fn look_alike_ids_take_the_indexed_path() {
        let (_dir, store) = with_function(10);
        store
            .deploy(&request("acme", "other", DIGEST_A, false))
            .unwrap();
        let drawn = store.invocation_id("acme", "hello", 7).unwrap();
        let foreign_tag = format!("inv_{:012x}{:08x}{}", 7, store.tag ^ 1, &drawn[24..]);
        store
            .record_invocation(&invocation("acme", "hello", &foreign_tag))
            .unwrap();
        // Drawn for `hello`, recorded for `other`.
        store
            .record_invocation(&invocation("acme", "other", &drawn))
            .unwrap();
        assert_eq!(store.invocation_ids.len(), 2);
        for id in [&foreign_tag, &drawn] {
            let found = store.invocation("acme", id).unwrap();
            assert_eq!(found.map(|record| record.id), Some(id.clone()));
        }
        // Pruning and purging take their id entries with them.
        store.delete_function("acme", "other").unwrap();
        assert_eq!(store.invocation_ids.len(), 1);
    }

    #[test]
    fn only_drawn_shapes_parse() {
        let id = format!("inv_{:012x}{:08x}{:08x}{:016x}", 5, 0xdead_beef_u32, 7, 9);
        assert_eq!(
            DrawnId::parse(&id),
            Some(DrawnId {
                tag: 0xdead_beef,
                name: 7,
                seq: 9
            })
        );
        for other in [
            crate::runtime::new_invocation_id(5),
            id.to_uppercase(),
            id.replacen("inv_", "job_", 1),
            format!("{id}0"),
            id[..47].to_owned(),
            format!("inv_{}+{}", &id[4..20], &id[21..]),
        ] {
            assert_eq!(DrawnId::parse(&other), None, "{other}");
        }
        // The same name, the same hash, in every build.
        assert_eq!(name_hash("hello"), 0x2cf2_4dba);
    }

    #[test]
    fn the_mask_hides_the_count_and_gives_it_back() {
        let mask = SeqMask(*b"an example key, 32 bytes long!!!");
        let other = SeqMask(*b"another key, also 32 bytes long!");
        let hidden: Vec<u64> = (1000..1064).map(|seq| mask.hide(seq)).collect();
        for (seq, hidden) in (1000..).zip(&hidden) {
            assert_eq!(mask.reveal(*hidden), seq);
            assert_ne!(other.reveal(*hidden), seq);
        }
        // Consecutive counts look nothing alike.
        for pair in hidden.windows(2) {
            assert!(pair[0].abs_diff(pair[1]) > 1 << 20, "{pair:x?}");
        }
        for seq in [0, 1, u64::from(u32::MAX), u64::MAX] {
            assert_eq!(mask.reveal(mask.hide(seq)), seq);
        }
    }

    /// A database of layout 1 (no drawn ids yet) opens as it is, keeps
    /// finding its records, and draws ids from then on.
    #[test]
    fn a_layout_1_database_opens_and_moves_on() {
        let (dir, store) = with_function(10);
        store
            .record_invocation(&invocation("acme", "hello", "inv_old"))
            .unwrap();
        // What layout 1 left: its marker, and no tag.
        store.db.insert(FORMAT_KEY, FORMAT_UNDRAWN_IDS).unwrap();
        store.db.remove(TAG_KEY).unwrap();
        store.db.remove(MASK_KEY).unwrap();
        store.db.flush().unwrap();
        let store = reopen(&dir, store, 10);
        assert_eq!(
            store.db.get(FORMAT_KEY).unwrap().as_deref(),
            Some(FORMAT_VERSION)
        );
        assert!(store.db.get(TAG_KEY).unwrap().is_some());
        let drawn = store.invocation_id("acme", "hello", 8).unwrap();
        store
            .record_invocation(&invocation("acme", "hello", &drawn))
            .unwrap();
        for id in ["inv_old", drawn.as_str()] {
            let found = store.invocation("acme", id).unwrap();
            assert_eq!(found.map(|record| record.id), Some(id.to_owned()));
        }
        // The tag stays what it was at the next open.
        let tag = store.tag;
        let store = reopen(&dir, store, 10);
        assert_eq!(store.tag, tag);
        assert!(store.invocation("acme", &drawn).unwrap().is_some());
    }

    #[test]
    fn another_format_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta");
        {
            let db = sled::open(&path).unwrap();
            db.insert(FORMAT_KEY, &b"99"[..]).unwrap();
        }
        assert!(matches!(
            SledStore::open(&path, 10),
            Err(StoreError::Backend(_))
        ));
    }

    #[test]
    fn key_parts_keep_order_and_are_prefix_free() {
        let names = ["", "\0", "\0\0", "a", "a\0", "a\0b", "a\u{1}", "ab", "b"];
        let encoded: Vec<Vec<u8>> = names.iter().map(|name| part(name)).collect();
        for (i, x) in encoded.iter().enumerate() {
            for (j, y) in encoded.iter().enumerate() {
                assert_eq!(
                    x.cmp(y),
                    names[i].cmp(names[j]),
                    "{:?} vs {:?}",
                    names[i],
                    names[j]
                );
                if i != j {
                    assert!(
                        !y.starts_with(x),
                        "{:?} is a prefix of {:?}",
                        names[i],
                        names[j]
                    );
                }
            }
        }
        assert_eq!(
            describe_key("functions", &function_key("a\0b", "c")),
            "functions/a\\0b/c"
        );
        for a in names {
            for b in names {
                assert_eq!(
                    split_parts(&digest_key(a, b, "n")),
                    Some(vec![a.to_owned(), b.to_owned(), "n".to_owned()])
                );
            }
        }
        assert_eq!(split_parts(b"a\0\x02"), None);
        assert_eq!(split_parts(b"unterminated"), None);
    }
}
