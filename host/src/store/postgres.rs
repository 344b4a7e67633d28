//! The shared [`MetaStore`] and [`BlobStore`]: one PostgreSQL database that
//! several hosts use at once.
//!
//! The schema lives in `host/migrations/` and is applied at connect by
//! refinery, in order and once (its history table records what ran), so
//! hosts of different builds agree on it or the newer one upgrades it.
//!
//! The store traits are synchronous (the embedded sled store answers from
//! memory); this one runs every query on a small tokio runtime of its own,
//! through a `deadpool` connection pool, and the calling thread waits for
//! the answer. The service calls stores from blocking threads (the
//! blocking pool, the record writer), never from its async workers.
//!
//! Multi-row changes run in one transaction each; a deploy or a delete
//! locks the function's row (`FOR UPDATE`), so concurrent deploys of one
//! name on several hosts get consecutive versions.

use std::future::Future;
use std::sync::Arc;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::Row;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{Json, ToSql};

use super::{
    ApiKeyRecord, BackendError, BlobStore, DeployRequest, Deployed, ExpiredJobs, FsBlobStore,
    FunctionRecord, FunctionWorld, InvocationRecord, JobCancel, JobCaps, JobClaim, JobError,
    JobRecord, JobStatus, MetaStore, ScheduleRecord, SecretPut, SecretRecord, SharedStore,
    StoreError, TenantRecord, UnixMillis, now_millis,
};
use crate::digest::Digest;

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// Connections a host keeps open at most.
const POOL_SIZE: usize = 16;

/// How long a call waits for a connection (to make one, or for one of the
/// pool's to come free) before it fails.
const STORE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// How long a readiness check waits for the database: a database that
/// answers slowly under load is not out of reach.
const READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Columns of `functions` in the order [`function`] reads them.
const FUNCTION_COLUMNS: &str = "tenant, name, version, digest, size, world, public, retryable, created_at, updated_at, incarnation, secrets, config";

/// A PostgreSQL-backed store; cheap to clone (the pool and runtime are
/// shared).
#[derive(Clone)]
pub struct PgStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    /// Bumped on other hosts' (and this one's) changes: see [`listen`].
    changes: Arc<Changes>,
    /// Runs the pool's connections and every query; `None` only while
    /// dropping.
    runtime: Option<tokio::runtime::Runtime>,
    retention: usize,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Without waiting: the last handle may be dropped on an async
        // thread, where a blocking shutdown would panic.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("retention_per_function", &self.inner.retention)
            .finish_non_exhaustive()
    }
}

impl PgStore {
    /// Connects to the database at `url` (a `postgres://` URL or a libpq
    /// key-value string; TLS as its `sslmode` says, see [`tls`]), applies
    /// the migrations this build has and the database lacks, and keeps at
    /// most `retention_per_function` records per function.
    ///
    /// # Errors
    /// When the URL or its TLS settings are malformed, the database cannot
    /// be reached, or a migration fails.
    pub fn connect(url: &str, retention_per_function: usize) -> Result<Self, StoreError> {
        let (config, tls) = tls::configure(url)?;
        Self::open(config, tls, retention_per_function)
    }

    fn open(
        mut config: tokio_postgres::Config,
        tls: tls::Tls,
        retention_per_function: usize,
    ) -> Result<Self, StoreError> {
        // A database that does not answer fails calls in seconds instead of
        // holding them for the operating system's TCP timeout.
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(STORE_TIMEOUT);
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("gust-postgres")
            .enable_all()
            .build()
            .map_err(BackendError::Runtime)?;
        let changes = Arc::new(Changes::default());
        let listener = (config.clone(), tls.clone(), Arc::clone(&changes));
        let manager = Manager::from_config(
            config,
            tls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .wait_timeout(Some(STORE_TIMEOUT))
            .create_timeout(Some(STORE_TIMEOUT))
            .recycle_timeout(Some(STORE_TIMEOUT))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|e| BackendError::Pool(e.to_string()))?;
        let store = Self {
            inner: Arc::new(Inner {
                pool,
                changes,
                runtime: Some(runtime),
                retention: retention_per_function,
            }),
        };
        store.run(|pool| async move {
            let mut client = pool.get().await.map_err(pool_error)?;
            embedded::migrations::runner()
                .run_async(&mut **client)
                .await
                .map_err(|e| BackendError::Migration(Box::new(e)))?;
            Ok(())
        })?;
        if let Some(runtime) = &store.inner.runtime {
            runtime.spawn(listen(listener.0, listener.1, listener.2));
        }
        Ok(store)
    }

    /// The retention bound this store was opened with.
    pub fn retention_per_function(&self) -> usize {
        self.inner.retention
    }

    /// Runs `work` on the store's runtime with a handle to the pool and
    /// waits for it on this thread.
    fn run<T, F>(&self, work: impl FnOnce(Pool) -> F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        let Some(runtime) = &self.inner.runtime else {
            return Err(BackendError::Closed.into());
        };
        let task = runtime.spawn(work(self.inner.pool.clone()));
        futures::executor::block_on(task)
            .map_err(|e| StoreError::from(BackendError::Task(e.to_string())))?
    }
}

/// Query parameters, owned so that a query can run on the store's runtime.
type Param = Box<dyn ToSql + Sync + Send>;

/// `params![a, b]`: owned query parameters.
macro_rules! params {
    ($($param:expr),* $(,)?) => {
        vec![$(Box::new($param) as $crate::store::postgres::Param),*]
    };
}

/// `params` as tokio-postgres takes them.
fn param_refs(params: &[Param]) -> Vec<&(dyn ToSql + Sync)> {
    params
        .iter()
        .map(|param| param.as_ref() as &(dyn ToSql + Sync))
        .collect()
}

impl PgStore {
    /// Every row `sql` returns, each read by `read`.
    fn rows<T: Send + 'static>(
        &self,
        sql: impl Into<String>,
        params: Vec<Param>,
        read: impl Fn(&Row) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<Vec<T>, StoreError> {
        let sql = sql.into();
        self.run(move |pool| async move {
            let client = pool.get().await.map_err(pool_error)?;
            client
                .query(&sql, &param_refs(&params))
                .await
                .map_err(postgres)?
                .iter()
                .map(read)
                .collect()
        })
    }

    /// The one row `sql` returns, if any, read by `read`.
    fn row<T: Send + 'static>(
        &self,
        sql: impl Into<String>,
        params: Vec<Param>,
        read: impl Fn(&Row) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<Option<T>, StoreError> {
        let sql = sql.into();
        self.run(move |pool| async move {
            let client = pool.get().await.map_err(pool_error)?;
            client
                .query_opt(&sql, &param_refs(&params))
                .await
                .map_err(postgres)?
                .as_ref()
                .map(read)
                .transpose()
        })
    }

    /// The boolean `sql` (a `SELECT EXISTS …`) returns.
    fn exists(&self, sql: &'static str, params: Vec<Param>) -> Result<bool, StoreError> {
        Ok(self
            .row(sql, params, |row| row.try_get(0).map_err(postgres))?
            .unwrap_or(false))
    }

    /// Runs `sql`; the rows it changed.
    fn execute(&self, sql: &'static str, params: Vec<Param>) -> Result<u64, StoreError> {
        self.run(move |pool| async move {
            let client = pool.get().await.map_err(pool_error)?;
            client
                .execute(sql, &param_refs(&params))
                .await
                .map_err(postgres)
        })
    }
}

/// How long a lost listening connection waits before it connects again.
const RELISTEN_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// What other hosts changed, one counter per notification channel.
#[derive(Default)]
struct Changes {
    /// `gust_functions` (migration V2).
    functions: tokio::sync::watch::Sender<u64>,
    /// `gust_schedules` (migration V3).
    schedules: tokio::sync::watch::Sender<u64>,
    /// `gust_jobs`: a job was queued.
    jobs: tokio::sync::watch::Sender<u64>,
    /// `gust_job_cancels`: a running job's cancellation was asked for.
    cancels: tokio::sync::watch::Sender<u64>,
    /// `gust_secrets` (migration V4): a tenant's secrets changed.
    secrets: tokio::sync::watch::Sender<u64>,
}

/// The channels [`listen`] follows.
const CHANNELS: &str = "LISTEN gust_functions; LISTEN gust_schedules; LISTEN gust_jobs; \
                        LISTEN gust_job_cancels; LISTEN gust_secrets";

impl Changes {
    fn bump(sender: &tokio::sync::watch::Sender<u64>) {
        sender.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn notified(&self, channel: &str) {
        match channel {
            "gust_functions" => Self::bump(&self.functions),
            "gust_schedules" => Self::bump(&self.schedules),
            "gust_jobs" => Self::bump(&self.jobs),
            "gust_job_cancels" => Self::bump(&self.cancels),
            "gust_secrets" => Self::bump(&self.secrets),
            _ => {}
        }
    }

    /// Every counter: after (re)connecting, since notifications sent while
    /// not listening are lost.
    fn all(&self) {
        for sender in [
            &self.functions,
            &self.schedules,
            &self.jobs,
            &self.cancels,
            &self.secrets,
        ] {
            Self::bump(sender);
        }
    }
}

/// Follows the notification channels on a connection of its own, bumping
/// the matching counter of `changes` for each notification, and every
/// counter whenever it (re)starts listening. Runs until the store's
/// runtime stops.
async fn listen(config: tokio_postgres::Config, tls: tls::Tls, changes: Arc<Changes>) {
    use futures::StreamExt as _;
    loop {
        match config.connect(tls.clone()).await {
            Ok((client, mut connection)) => {
                let (notified, mut notifications) = tokio::sync::mpsc::unbounded_channel();
                let driver = tokio::spawn(async move {
                    let mut messages =
                        futures::stream::poll_fn(move |cx| connection.poll_message(cx));
                    while let Some(Ok(message)) = messages.next().await {
                        if let tokio_postgres::AsyncMessage::Notification(note) = message {
                            let _ = notified.send(note.channel().to_owned());
                        }
                    }
                });
                match client.batch_execute(CHANNELS).await {
                    Ok(()) => {
                        changes.all();
                        while let Some(channel) = notifications.recv().await {
                            changes.notified(&channel);
                        }
                        tracing::warn!(
                            "lost the connection that follows other hosts' deploys; reconnecting"
                        );
                    }
                    Err(error) => {
                        tracing::warn!(%error, "could not listen for other hosts' deploys")
                    }
                }
                drop(client);
                let _ = driver.await;
            }
            Err(error) => {
                tracing::warn!(%error, "could not connect to follow other hosts' deploys")
            }
        }
        tokio::time::sleep(RELISTEN_AFTER).await;
    }
}

fn postgres(error: tokio_postgres::Error) -> StoreError {
    BackendError::Postgres(error).into()
}

fn pool_error(error: deadpool_postgres::PoolError) -> StoreError {
    match error {
        deadpool_postgres::PoolError::Backend(error) => postgres(error),
        other => BackendError::Pool(other.to_string()).into(),
    }
}

/// The SQLSTATE and constraint of a database error, if it is one.
fn violated(error: &tokio_postgres::Error) -> Option<(&SqlState, Option<&str>)> {
    let db = error.as_db_error()?;
    Some((db.code(), db.constraint()))
}

fn u64_of(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

fn i64_of(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn world_name(world: FunctionWorld) -> &'static str {
    world.as_str()
}

/// A `functions` row read with [`FUNCTION_COLUMNS`], and its incarnation.
fn function(row: &Row) -> Result<(FunctionRecord, i64), StoreError> {
    let world: String = row.try_get(5).map_err(postgres)?;
    let world = match world.as_str() {
        "handler" => FunctionWorld::Handler,
        "http" => FunctionWorld::Http,
        "http-p3" => FunctionWorld::HttpP3,
        other => {
            return Err(StoreError::Corrupt {
                key: "functions".into(),
                message: format!("unknown world {other:?}"),
                source: None,
            });
        }
    };
    let record = FunctionRecord {
        tenant: row.try_get(0).map_err(postgres)?,
        name: row.try_get(1).map_err(postgres)?,
        version: u64_of(row.try_get(2).map_err(postgres)?),
        digest: row.try_get(3).map_err(postgres)?,
        size: u64_of(row.try_get(4).map_err(postgres)?),
        world,
        public: row.try_get(6).map_err(postgres)?,
        retryable: row.try_get(7).map_err(postgres)?,
        secrets: row.try_get(11).map_err(postgres)?,
        config: json(row, 12)?,
        created_at: u64_of(row.try_get(8).map_err(postgres)?),
        updated_at: u64_of(row.try_get(9).map_err(postgres)?),
    };
    Ok((record, row.try_get(10).map_err(postgres)?))
}

/// A `functions` row read with [`FUNCTION_COLUMNS`], without its
/// incarnation.
fn function_record(row: &Row) -> Result<FunctionRecord, StoreError> {
    function(row).map(|(record, _)| record)
}

fn tenant(row: &Row) -> Result<TenantRecord, StoreError> {
    Ok(TenantRecord {
        name: row.try_get(0).map_err(postgres)?,
        created_at: u64_of(row.try_get(1).map_err(postgres)?),
    })
}

fn key(row: &Row) -> Result<ApiKeyRecord, StoreError> {
    let hash: Vec<u8> = row.try_get(2).map_err(postgres)?;
    let hash = <[u8; 32]>::try_from(hash.as_slice()).map_err(|_| StoreError::Corrupt {
        key: "api_keys".into(),
        message: format!("a key hash of {} bytes", hash.len()),
        source: None,
    })?;
    Ok(ApiKeyRecord {
        id: row.try_get(0).map_err(postgres)?,
        tenant: row.try_get(1).map_err(postgres)?,
        hash,
        created_at: u64_of(row.try_get(3).map_err(postgres)?),
    })
}

/// The JSON record in column `index`.
fn json<T: serde::de::DeserializeOwned>(row: &Row, index: usize) -> Result<T, StoreError> {
    let Json(value) = row.try_get::<_, Json<T>>(index).map_err(postgres)?;
    Ok(value)
}

/// Transactions that lose a serialization race are retried this often.
const DEPLOY_ATTEMPTS: usize = 3;

impl MetaStore for PgStore {
    fn create_tenant(&self, name: &str) -> Result<TenantRecord, StoreError> {
        let record = TenantRecord {
            name: name.to_owned(),
            created_at: now_millis(),
        };
        let inserted = self.execute(
            "INSERT INTO tenants (name, created_at) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            params![record.name.clone(), i64_of(record.created_at)],
        )?;
        if inserted == 0 {
            return Err(StoreError::Conflict(format!("tenant {name:?}")));
        }
        Ok(record)
    }

    fn tenant(&self, name: &str) -> Result<Option<TenantRecord>, StoreError> {
        self.row(
            "SELECT name, created_at FROM tenants WHERE name = $1",
            params![name.to_owned()],
            tenant,
        )
    }
    fn tenants(&self) -> Result<Vec<TenantRecord>, StoreError> {
        self.rows(
            r#"SELECT name, created_at FROM tenants ORDER BY name COLLATE "C""#,
            params![],
            tenant,
        )
    }
    fn add_key(&self, key: &ApiKeyRecord) -> Result<(), StoreError> {
        let record = key.clone();
        self.run(|pool| async move {
            let client = pool.get().await.map_err(pool_error)?;
            let inserted = client
                .execute(
                    "INSERT INTO api_keys (id, tenant, hash, created_at) VALUES ($1, $2, $3, $4)",
                    &[
                        &record.id,
                        &record.tenant,
                        &&record.hash[..],
                        &i64_of(record.created_at),
                    ],
                )
                .await;
            match inserted {
                Ok(_) => Ok(()),
                Err(error) => Err(match violated(&error) {
                    Some((&SqlState::FOREIGN_KEY_VIOLATION, _)) => {
                        StoreError::Missing(format!("tenant {:?}", record.tenant))
                    }
                    Some((&SqlState::UNIQUE_VIOLATION, Some("api_keys_pkey"))) => {
                        StoreError::Conflict(format!("key {:?}", record.id))
                    }
                    Some((&SqlState::UNIQUE_VIOLATION, _)) => {
                        StoreError::Conflict("a key with this hash".into())
                    }
                    _ => postgres(error),
                }),
            }
        })
    }

    fn key_by_hash(&self, hash: &[u8; 32]) -> Result<Option<ApiKeyRecord>, StoreError> {
        self.row(
            "SELECT id, tenant, hash, created_at FROM api_keys WHERE hash = $1",
            params![hash.to_vec()],
            key,
        )
    }
    fn keys(&self, tenant: &str) -> Result<Vec<ApiKeyRecord>, StoreError> {
        self.rows(
            r#"SELECT id, tenant, hash, created_at FROM api_keys WHERE tenant = $1
               ORDER BY id COLLATE "C""#,
            params![tenant.to_owned()],
            key,
        )
    }
    fn revoke_key(&self, tenant: &str, id: &str) -> Result<bool, StoreError> {
        let removed = self.execute(
            "DELETE FROM api_keys WHERE tenant = $1 AND id = $2",
            params![tenant.to_owned(), id.to_owned()],
        )?;
        Ok(removed > 0)
    }
    fn deploy(&self, request: &DeployRequest) -> Result<Deployed, StoreError> {
        let request = request.clone();
        self.run(|pool| async move {
            let mut client = pool.get().await.map_err(pool_error)?;
            let mut attempt = 0;
            loop {
                attempt += 1;
                match deploy_once(&mut client, &request).await {
                    // Two first deploys of one name raced: the loser sees the
                    // winner's row on its next try.
                    Err(error)
                        if attempt < DEPLOY_ATTEMPTS
                            && violated(&error)
                                .is_some_and(|(code, _)| *code == SqlState::UNIQUE_VIOLATION) => {}
                    Err(error) => {
                        return Err(match violated(&error) {
                            Some((&SqlState::FOREIGN_KEY_VIOLATION, _)) => {
                                StoreError::Missing(format!("tenant {:?}", request.tenant))
                            }
                            _ => postgres(error),
                        });
                    }
                    Ok(deployed) => return deployed,
                }
            }
        })
    }

    fn function(&self, tenant: &str, name: &str) -> Result<Option<FunctionRecord>, StoreError> {
        self.row(
            format!("SELECT {FUNCTION_COLUMNS} FROM functions WHERE tenant = $1 AND name = $2"),
            params![tenant.to_owned(), name.to_owned()],
            function_record,
        )
    }
    fn functions(&self, tenant: &str) -> Result<Vec<FunctionRecord>, StoreError> {
        self.rows(
            format!(
                r#"SELECT {FUNCTION_COLUMNS} FROM functions WHERE tenant = $1
                   ORDER BY name COLLATE "C""#
            ),
            params![tenant.to_owned()],
            function_record,
        )
    }
    fn all_functions(&self) -> Result<Vec<FunctionRecord>, StoreError> {
        self.rows(
            format!(
                r#"SELECT {FUNCTION_COLUMNS} FROM functions
                   ORDER BY tenant COLLATE "C", name COLLATE "C""#
            ),
            params![],
            function_record,
        )
    }
    fn delete_function(
        &self,
        tenant: &str,
        name: &str,
    ) -> Result<Option<FunctionRecord>, StoreError> {
        let (tenant, name) = (tenant.to_owned(), name.to_owned());
        self.run(|pool| async move {
            let mut client = pool.get().await.map_err(pool_error)?;
            let tx = client.transaction().await.map_err(postgres)?;
            let Some(row) = tx
                .query_opt(
                    &format!(
                        "DELETE FROM functions WHERE tenant = $1 AND name = $2
                         RETURNING {FUNCTION_COLUMNS}"
                    ),
                    &[&tenant, &name],
                )
                .await
                .map_err(postgres)?
            else {
                return Ok(None);
            };
            let (record, incarnation) = function(&row)?;
            for sql in [
                "DELETE FROM invocations WHERE tenant = $1 AND function = $2 AND incarnation = $3",
                "DELETE FROM record_counts WHERE tenant = $1 AND function = $2 AND incarnation = $3",
            ] {
                tx.execute(sql, &[&tenant, &name, &incarnation])
                    .await
                    .map_err(postgres)?;
            }
            tx.commit().await.map_err(postgres)?;
            Ok(Some(record))
        })
    }

    fn digest_in_use(&self, digest: &str) -> Result<bool, StoreError> {
        self.exists(
            "SELECT EXISTS (SELECT 1 FROM functions WHERE digest = $1)",
            params![digest.to_owned()],
        )
    }
    fn record_invocation(&self, record: &InvocationRecord) -> Result<u64, StoreError> {
        self.record_one(record)
    }

    fn record_invocations(&self, records: &[InvocationRecord]) -> Vec<Result<u64, StoreError>> {
        match records {
            [one] => vec![self.record_invocation(one)],
            _ => self.record_batch(records),
        }
    }

    fn invocation(&self, tenant: &str, id: &str) -> Result<Option<InvocationRecord>, StoreError> {
        // Only records of a function's current incarnation exist for
        // readers.
        self.row(
            "SELECT i.record FROM invocations i JOIN functions f
               ON f.tenant = i.tenant AND f.name = i.function
              AND f.incarnation = i.incarnation
             WHERE i.tenant = $1 AND i.id = $2",
            params![tenant.to_owned(), id.to_owned()],
            |row| json(row, 0),
        )
    }
    fn invocations_before(
        &self,
        tenant: &str,
        function: &str,
        limit: usize,
        before: Option<u64>,
    ) -> Result<Vec<(u64, InvocationRecord)>, StoreError> {
        self.rows(
            "SELECT i.seq, i.record FROM invocations i JOIN functions f
               ON f.tenant = i.tenant AND f.name = i.function
              AND f.incarnation = i.incarnation
             WHERE i.tenant = $1 AND i.function = $2
               AND ($3::BIGINT IS NULL OR i.seq < $3)
             ORDER BY i.seq DESC LIMIT $4",
            params![
                tenant.to_owned(),
                function.to_owned(),
                before.map(i64_of),
                i64_of(limit as u64)
            ],
            |row| Ok((u64_of(row.try_get(0).map_err(postgres)?), json(row, 1)?)),
        )
    }
    fn put_job(&self, job: &JobRecord) -> Result<(), StoreError> {
        // Who runs it stays as it was: this is a plain write, not a claim.
        self.execute(
            "INSERT INTO jobs (tenant, id, record, status, finished_at, bytes)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (tenant, id) DO UPDATE SET record = EXCLUDED.record,
                 status = EXCLUDED.status, finished_at = EXCLUDED.finished_at,
                 bytes = EXCLUDED.bytes",
            params![
                job.tenant.clone(),
                job.id.clone(),
                Json(job.clone()),
                job.status.as_str(),
                job.finished_at.map(i64_of),
                i64_of(job.stored_bytes())
            ],
        )?;
        Ok(())
    }
    fn job(&self, tenant: &str, id: &str) -> Result<Option<JobRecord>, StoreError> {
        self.row(
            "SELECT record FROM jobs WHERE tenant = $1 AND id = $2",
            params![tenant.to_owned(), id.to_owned()],
            |row| json(row, 0),
        )
    }
    fn delete_job(&self, tenant: &str, id: &str) -> Result<bool, StoreError> {
        let removed = self.execute(
            "DELETE FROM jobs WHERE tenant = $1 AND id = $2",
            params![tenant.to_owned(), id.to_owned()],
        )?;
        Ok(removed > 0)
    }
    fn all_jobs(&self) -> Result<Vec<JobRecord>, StoreError> {
        // Ids are time-ordered.
        self.rows(
            r#"SELECT record FROM jobs ORDER BY id COLLATE "C""#,
            params![],
            |row| json(row, 0),
        )
    }
    fn jobs(&self, tenant: &str) -> Result<Vec<JobRecord>, StoreError> {
        self.rows(
            r#"SELECT record FROM jobs WHERE tenant = $1 ORDER BY id COLLATE "C""#,
            params![tenant.to_owned()],
            |row| json(row, 0),
        )
    }
    fn put_schedule(&self, schedule: &ScheduleRecord) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO schedules (tenant, function, record) VALUES ($1, $2, $3)
             ON CONFLICT (tenant, function) DO UPDATE SET record = EXCLUDED.record",
            params![
                schedule.tenant.clone(),
                schedule.function.clone(),
                Json(schedule.clone())
            ],
        )?;
        Ok(())
    }
    fn schedule(&self, tenant: &str, function: &str) -> Result<Option<ScheduleRecord>, StoreError> {
        self.row(
            "SELECT record FROM schedules WHERE tenant = $1 AND function = $2",
            params![tenant.to_owned(), function.to_owned()],
            |row| json(row, 0),
        )
    }
    fn delete_schedule(&self, tenant: &str, function: &str) -> Result<bool, StoreError> {
        let removed = self.execute(
            "DELETE FROM schedules WHERE tenant = $1 AND function = $2",
            params![tenant.to_owned(), function.to_owned()],
        )?;
        Ok(removed > 0)
    }
    fn all_schedules(&self) -> Result<Vec<ScheduleRecord>, StoreError> {
        self.rows(
            r#"SELECT record FROM schedules ORDER BY tenant COLLATE "C", function COLLATE "C""#,
            params![],
            |row| json(row, 0),
        )
    }
    fn schedules(&self, tenant: &str) -> Result<Vec<ScheduleRecord>, StoreError> {
        self.rows(
            r#"SELECT record FROM schedules WHERE tenant = $1 ORDER BY function COLLATE "C""#,
            params![tenant.to_owned()],
            |row| json(row, 0),
        )
    }
    fn put_secret(&self, secret: &SecretRecord, max: u64) -> Result<SecretPut, StoreError> {
        self.put_secret_row(secret, max)
    }
    fn secrets(&self, tenant: &str) -> Result<Vec<SecretRecord>, StoreError> {
        self.secret_rows(Some(tenant))
    }
    fn all_secrets(&self) -> Result<Vec<SecretRecord>, StoreError> {
        self.secret_rows(None)
    }
    fn delete_secret(&self, tenant: &str, name: &str) -> Result<bool, StoreError> {
        self.delete_secret_row(tenant, name)
    }
    fn secrets_changed(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.changes.secrets.subscribe()
    }
    fn check_ready(&self) -> Result<(), StoreError> {
        let needed = embedded::migrations::runner()
            .get_migrations()
            .iter()
            .map(|migration| i64::from(migration.version()))
            .max()
            .unwrap_or(0);
        let applied = self.run(|pool| async move {
            let ask = async {
                let client = pool.get().await.map_err(pool_error)?;
                client
                    .query_one(
                        "SELECT coalesce(max(version), 0)::BIGINT FROM refinery_schema_history",
                        &[],
                    )
                    .await
                    .and_then(|row| row.try_get::<_, i64>(0))
                    .map_err(postgres)
            };
            tokio::time::timeout(READY_TIMEOUT, ask)
                .await
                .map_err(|_| {
                    StoreError::from(BackendError::Pool(format!(
                        "the database did not answer within {READY_TIMEOUT:?}"
                    )))
                })?
        })?;
        if applied < needed {
            return Err(BackendError::Schema { applied, needed }.into());
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), StoreError> {
        // Every write is a committed statement: nothing is buffered here.
        Ok(())
    }

    fn kv(&self) -> &dyn super::KvStore {
        self
    }

    fn shared(&self) -> Option<&dyn SharedStore> {
        Some(self)
    }
}

/// One try of a deploy, in a transaction that locks the function's row.
async fn deploy_once(
    client: &mut deadpool_postgres::Object,
    request: &DeployRequest,
) -> Result<Result<Deployed, StoreError>, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    let current = tx
        .query_opt(
            &format!(
                "SELECT {FUNCTION_COLUMNS} FROM functions WHERE tenant = $1 AND name = $2
                 FOR UPDATE"
            ),
            &[&request.tenant, &request.name],
        )
        .await?;
    let current = match current.as_ref().map(function).transpose() {
        Ok(current) => current,
        Err(error) => return Ok(Err(error)),
    };
    let now = now_millis();
    let first = current.is_none();
    let (record, incarnation) = match current {
        Some((current, _)) if request.unchanged(&current) => {
            return Ok(Ok(Deployed {
                function: current,
                changed: false,
            }));
        }
        Some((current, incarnation)) => {
            let Some(version) = current.version.checked_add(1) else {
                return Ok(Err(StoreError::Backend(BackendError::VersionOverflow {
                    tenant: request.tenant.clone(),
                    name: request.name.clone(),
                })));
            };
            (
                request.function(version, current.created_at, now),
                incarnation,
            )
        }
        None => {
            let row = tx.query_one("SELECT nextval('incarnations')", &[]).await?;
            (request.function(1, now, now), row.try_get(0)?)
        }
    };
    let config = Json(&record.config);
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 13] = [
        &record.tenant,
        &record.name,
        &incarnation,
        &i64_of(record.version),
        &record.digest,
        &i64_of(record.size),
        &world_name(record.world),
        &record.public,
        &record.retryable,
        &i64_of(record.created_at),
        &i64_of(record.updated_at),
        &record.secrets,
        &config,
    ];
    if first {
        // A first deploy racing another of the same name fails here with a
        // unique violation and is retried (it then finds the other's row).
        tx.execute(
            "INSERT INTO functions (tenant, name, incarnation, version, digest, size, world,
                                    public, retryable, created_at, updated_at, secrets, config)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
            &params,
        )
        .await?;
    } else {
        // The row is locked (`FOR UPDATE` above).
        tx.execute(
            "UPDATE functions SET version = $4, digest = $5, size = $6, world = $7,
                    public = $8, retryable = $9, updated_at = $11, secrets = $12,
                    config = $13
              WHERE tenant = $1 AND name = $2 AND incarnation = $3 AND created_at = $10",
            &params,
        )
        .await?;
    }
    tx.commit().await?;
    Ok(Ok(Deployed {
        function: record,
        changed: true,
    }))
}

/// Component blobs in the database (one dependency to run), read through a
/// cache of files on this host: a blob is immutable under its digest, so a
/// cached copy is never stale, and a host reads each blob from the database
/// at most once (and not at all after a restart that kept the cache).
#[derive(Debug, Clone)]
pub struct PgBlobStore {
    store: PgStore,
    cache: FsBlobStore,
}

impl PgBlobStore {
    /// Blobs in `store`'s database, cached under `cache_dir`.
    ///
    /// # Errors
    /// When the cache directory cannot be made.
    pub fn new(store: PgStore, cache_dir: &std::path::Path) -> Result<Self, StoreError> {
        Ok(Self {
            store,
            cache: FsBlobStore::open(cache_dir)?,
        })
    }
}

impl BlobStore for PgBlobStore {
    fn put(&self, digest: &Digest, bytes: &[u8]) -> Result<(), StoreError> {
        super::check_digest(digest, bytes)?;
        self.store.execute(
            "INSERT INTO blobs (digest, bytes) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            params![digest.to_string(), bytes.to_vec()],
        )?;
        // The database has it; a failed cache write only costs a later read.
        if let Err(error) = self.cache.put(digest, bytes) {
            tracing::warn!(%error, %digest, "caching a blob on this host failed");
        }
        Ok(())
    }

    fn get(&self, digest: &Digest) -> Result<Option<Vec<u8>>, StoreError> {
        if let Ok(Some(bytes)) = self.cache.get(digest) {
            return Ok(Some(bytes));
        }
        let bytes: Option<Vec<u8>> = self.store.row(
            "SELECT bytes FROM blobs WHERE digest = $1",
            params![digest.to_string()],
            |row| row.try_get(0).map_err(postgres),
        )?;
        let Some(bytes) = bytes else {
            return Ok(None);
        };
        let actual = Digest::of(&bytes);
        if actual != *digest {
            return Err(StoreError::Corrupt {
                key: format!("blobs/{digest}"),
                message: format!("the stored bytes hash to {actual}"),
                source: None,
            });
        }
        if let Err(error) = self.cache.put(digest, &bytes) {
            tracing::warn!(%error, %digest, "caching a blob on this host failed");
        }
        Ok(Some(bytes))
    }

    fn contains(&self, digest: &Digest) -> Result<bool, StoreError> {
        self.store.exists(
            "SELECT EXISTS (SELECT 1 FROM blobs WHERE digest = $1)",
            params![digest.to_string()],
        )
    }
    fn remove(&self, digest: &Digest) -> Result<bool, StoreError> {
        let removed = self.store.execute(
            "DELETE FROM blobs WHERE digest = $1",
            params![digest.to_string()],
        )?;
        self.cache.remove(digest)?;
        Ok(removed > 0)
    }
    fn list(&self) -> Result<Vec<Digest>, StoreError> {
        let digests: Vec<String> = self.store.rows(
            "SELECT digest FROM blobs ORDER BY digest",
            params![],
            |row| row.try_get(0).map_err(postgres),
        )?;
        Ok(digests.iter().filter_map(|d| Digest::parse(d)).collect())
    }
}

// Last: they use the helpers above, `params!` among them.
mod import;
mod jobs;
mod kv;
mod records;
mod secrets;
pub mod tls;

pub use self::import::Imported;
