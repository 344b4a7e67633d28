//! Writes that keep a record as it was in another store (`gust store
//! migrate`): a function with its version and times, a job with its state.
//! Each is idempotent, so a migration that stopped half-way can be run
//! again.

use tokio_postgres::types::Json;

use super::{
    FunctionRecord, JobRecord, JobStatus, PgStore, SecretRecord, StoreError, i64_of, world_name,
};

/// What an import found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Imported {
    /// Written.
    Copied,
    /// The same was there already.
    Present,
}

impl PgStore {
    /// Stores `function` as it is (version, digest, flags, times), with a
    /// new incarnation; `Present` if the same version of it is there
    /// already.
    ///
    /// # Errors
    /// `Missing` without its tenant; `Conflict` if the database has another
    /// function of that name (it is not overwritten).
    pub fn import_function(&self, function: &FunctionRecord) -> Result<Imported, StoreError> {
        let f = function.clone();
        let inserted = self.execute(
            "INSERT INTO functions (tenant, name, incarnation, version, digest, size, world,
                                    public, retryable, created_at, updated_at, secrets, config)
             SELECT $1, $2, nextval('incarnations'), $3, $4, $5, $6, $7, $8, $9, $10, $11, $12
             WHERE EXISTS (SELECT 1 FROM tenants WHERE name = $1)
             ON CONFLICT (tenant, name) DO NOTHING",
            params![
                f.tenant.clone(),
                f.name.clone(),
                i64_of(f.version),
                f.digest.clone(),
                i64_of(f.size),
                world_name(f.world),
                f.public,
                f.retryable,
                i64_of(f.created_at),
                i64_of(f.updated_at),
                f.secrets.clone(),
                tokio_postgres::types::Json(f.config.clone())
            ],
        )?;
        if inserted == 1 {
            return Ok(Imported::Copied);
        }
        use super::MetaStore as _;
        match self.function(&function.tenant, &function.name)? {
            None => Err(StoreError::Missing(format!("tenant {:?}", function.tenant))),
            Some(there) if there == *function => Ok(Imported::Present),
            Some(there) => Err(StoreError::Conflict(format!(
                "function {}/{} is already in the database as version {} ({}); it is left as it is",
                there.tenant, there.name, there.version, there.digest
            ))),
        }
    }

    /// Stores `secret` as it is (sealed: the hosts sharing the database
    /// need the same secrets key as the host it came from) unless the
    /// tenant has a secret of that name already.
    ///
    /// # Errors
    /// A database failure.
    pub fn import_secret(&self, secret: &SecretRecord) -> Result<Imported, StoreError> {
        let inserted = self.execute(
            "INSERT INTO secrets (tenant, name, key_id, sealed, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (tenant, name) DO NOTHING",
            params![
                secret.tenant.clone(),
                secret.name.clone(),
                secret.key_id.clone(),
                secret.sealed.clone(),
                i64_of(secret.created_at),
                i64_of(secret.updated_at)
            ],
        )?;
        Ok(if inserted == 1 {
            Imported::Copied
        } else {
            Imported::Present
        })
    }

    /// Stores `job` as it is unless a job of that id is there already. A
    /// running one (its host stopped with it) is stored with a lapsed
    /// lease, for the first host to retry or fail as if its host had died.
    ///
    /// # Errors
    /// A database failure.
    pub fn import_job(&self, job: &JobRecord) -> Result<Imported, StoreError> {
        let running = job.status == JobStatus::Running;
        let inserted = self.execute(
            "INSERT INTO jobs (tenant, id, record, status, finished_at, bytes, host, lease_until)
             VALUES ($1, $2, $3, $4, $5, $6,
                     CASE WHEN $7 THEN 'migrated' END, CASE WHEN $7 THEN 0::BIGINT END)
             ON CONFLICT (tenant, id) DO NOTHING",
            params![
                job.tenant.clone(),
                job.id.clone(),
                Json(job.clone()),
                job.status.as_str(),
                job.finished_at.map(i64_of),
                i64_of(job.stored_bytes()),
                running
            ],
        )?;
        Ok(if inserted == 1 {
            Imported::Copied
        } else {
            Imported::Present
        })
    }
}
