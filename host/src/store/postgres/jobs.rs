//! [`SharedStore`] on PostgreSQL: the job queue every host takes from, job
//! leases, and schedule fires claimed by compare-and-set (migration V3).
//!
//! Each operation is one transaction. A claim locks the oldest pending row
//! with `FOR UPDATE SKIP LOCKED`, so hosts claiming at once take different
//! jobs and never wait for each other; a finish only lands while the host
//! still holds the job (`host = $me AND status = 'running'`), so a job whose
//! lease lapsed and was taken over is stored by its new host only.

use tokio_postgres::Transaction;

use super::{
    ExpiredJobs, JobCancel, JobCaps, JobClaim, JobError, JobRecord, JobStatus, Param, PgStore,
    SharedStore, StoreError, UnixMillis, i64_of, json, pool_error, postgres,
};

/// Serialises queue-limit checks per tenant (with `hashtextextended`):
/// a number of its own, so that it never meets another advisory lock.
const QUEUE_LOCK_SEED: i64 = 0x6775_7374_6a6f_6273; // "gustjobs"

/// Removes the tenant's oldest finished jobs beyond `caps`, newest kept
/// first: a job goes when it is past the `caps.jobs` newest, or when it and
/// the newer ones hold more than `caps.bytes`.
async fn apply_caps(
    tx: &Transaction<'_>,
    tenant: &str,
    caps: JobCaps,
) -> Result<u64, tokio_postgres::Error> {
    tx.execute(
        "DELETE FROM jobs WHERE tenant = $1 AND id IN (
                 SELECT id FROM (
                     SELECT id,
                            row_number() OVER newest AS n,
                            sum(bytes) OVER newest AS kept
                     FROM jobs
                     WHERE tenant = $1 AND finished_at IS NOT NULL
                     WINDOW newest AS (ORDER BY finished_at DESC, id COLLATE \"C\" DESC)
                 ) ranked
                 WHERE n > $2 OR kept > $3::BIGINT)",
        &[&tenant, &i64_of(caps.jobs), &i64_of(caps.bytes)],
    )
    .await
}

/// Writes `job`'s record and state columns; `holder` is the host that now
/// runs it (none unless it is running). The rows changed.
async fn write(
    tx: &Transaction<'_>,
    job: &JobRecord,
    holder: Option<&str>,
    lease_ms: i64,
) -> Result<u64, tokio_postgres::Error> {
    tx.execute(
        "UPDATE jobs SET record = $3, status = $4, finished_at = $5, bytes = $6,
                 host = $7,
                 lease_until = CASE WHEN $7::TEXT IS NULL THEN NULL ELSE gust_now_ms() + $8 END,
                 cancel_requested = FALSE
             WHERE tenant = $1 AND id = $2",
        &[
            &job.tenant,
            &job.id,
            &tokio_postgres::types::Json(job),
            &job.status.as_str(),
            &job.finished_at.map(i64_of),
            &i64_of(job.stored_bytes()),
            &holder,
            &lease_ms,
        ],
    )
    .await
}

fn millis(duration: std::time::Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

impl PgStore {
    /// Runs `work` in one transaction on a pooled connection; commits what
    /// it returns `Ok` for.
    fn transaction<T, W>(&self, work: W) -> Result<T, StoreError>
    where
        T: Send + 'static,
        W: for<'t> FnOnce(
                &'t Transaction<'t>,
            ) -> futures::future::BoxFuture<'t, Result<T, StoreError>>
            + Send
            + 'static,
    {
        self.run(move |pool| async move {
            let mut client = pool.get().await.map_err(pool_error)?;
            let tx = client.transaction().await.map_err(postgres)?;
            let value = work(&tx).await?;
            tx.commit().await.map_err(postgres)?;
            Ok(value)
        })
    }
}

impl SharedStore for PgStore {
    fn functions_changed(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.changes.functions.subscribe()
    }
    fn schedules_changed(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.changes.schedules.subscribe()
    }
    fn jobs_queued(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.changes.jobs.subscribe()
    }
    fn cancels_requested(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.changes.cancels.subscribe()
    }

    fn enqueue_job(&self, job: &JobRecord, limit: u64) -> Result<bool, StoreError> {
        let job = job.clone();
        self.transaction(move |tx| {
            Box::pin(async move {
                // Two spawns at once on two hosts cannot both take the last
                // place: the count and the insert are one step per tenant.
                tx.execute(
                    "SELECT pg_advisory_xact_lock(hashtextextended($1, $2))",
                    &[&job.tenant, &QUEUE_LOCK_SEED],
                )
                .await
                .map_err(postgres)?;
                let pending: i64 = tx
                    .query_one(
                        "SELECT count(*) FROM jobs WHERE tenant = $1 AND status = 'pending'",
                        &[&job.tenant],
                    )
                    .await
                    .and_then(|row| row.try_get(0))
                    .map_err(postgres)?;
                if u64::try_from(pending).unwrap_or(0) >= limit {
                    return Ok(false);
                }
                tx.execute(
                    "INSERT INTO jobs (tenant, id, record, status, bytes)
                     VALUES ($1, $2, $3, 'pending', $4)",
                    &[
                        &job.tenant,
                        &job.id,
                        &tokio_postgres::types::Json(&job),
                        &i64_of(job.stored_bytes()),
                    ],
                )
                .await
                .map_err(postgres)?;
                // Delivered at commit: every host with room looks.
                tx.execute("SELECT pg_notify('gust_jobs', '')", &[])
                    .await
                    .map_err(postgres)?;
                Ok(true)
            })
        })
    }

    fn pending_job_tenants(&self) -> Result<Vec<String>, StoreError> {
        self.rows(
            "SELECT DISTINCT tenant FROM jobs WHERE status = 'pending'",
            Vec::<Param>::new(),
            |row| row.try_get(0).map_err(postgres),
        )
    }

    fn claim_job(&self, tenant: &str, claim: &JobClaim) -> Result<Option<JobRecord>, StoreError> {
        let (tenant, claim) = (tenant.to_owned(), claim.clone());
        self.transaction(move |tx| {
            Box::pin(async move {
                let Some(row) = tx
                    .query_opt(
                        "SELECT record FROM jobs WHERE tenant = $1 AND status = 'pending'
                         ORDER BY id COLLATE \"C\" LIMIT 1
                         FOR UPDATE SKIP LOCKED",
                        &[&tenant],
                    )
                    .await
                    .map_err(postgres)?
                else {
                    return Ok(None);
                };
                let mut job: JobRecord = json(&row, 0)?;
                job.status = JobStatus::Running;
                job.started_at = Some(claim.started_at);
                job.attempts = job.attempts.saturating_add(1);
                job.invocation_id = Some(claim.invocation_id.clone());
                write(tx, &job, Some(&claim.host), millis(claim.lease))
                    .await
                    .map_err(postgres)?;
                Ok(Some(job))
            })
        })
    }

    fn renew_jobs(
        &self,
        host: &str,
        lease: std::time::Duration,
    ) -> Result<Vec<(String, bool)>, StoreError> {
        self.rows(
            "UPDATE jobs SET lease_until = gust_now_ms() + $2
             WHERE host = $1 AND status = 'running'
             RETURNING id, cancel_requested",
            params![host.to_owned(), millis(lease)],
            |row| {
                Ok((
                    row.try_get(0).map_err(postgres)?,
                    row.try_get(1).map_err(postgres)?,
                ))
            },
        )
    }

    fn finish_job(&self, job: &JobRecord, host: &str, caps: JobCaps) -> Result<bool, StoreError> {
        let (job, host) = (job.clone(), host.to_owned());
        self.transaction(move |tx| {
            Box::pin(async move {
                let held = tx
                    .query_opt(
                        "SELECT 1 FROM jobs
                         WHERE tenant = $1 AND id = $2 AND host = $3 AND status = 'running'
                         FOR UPDATE",
                        &[&job.tenant, &job.id, &host],
                    )
                    .await
                    .map_err(postgres)?
                    .is_some();
                if !held {
                    return Ok(false);
                }
                write(tx, &job, None, 0).await.map_err(postgres)?;
                apply_caps(tx, &job.tenant, caps).await.map_err(postgres)?;
                Ok(true)
            })
        })
    }

    fn cancel_job(
        &self,
        tenant: &str,
        id: &str,
        error: &JobError,
        now: UnixMillis,
        caps: JobCaps,
    ) -> Result<JobCancel, StoreError> {
        let (tenant, id, error) = (tenant.to_owned(), id.to_owned(), error.clone());
        self.transaction(move |tx| {
            Box::pin(async move {
                let Some(row) = tx
                    .query_opt(
                        "SELECT record FROM jobs WHERE tenant = $1 AND id = $2 FOR UPDATE",
                        &[&tenant, &id],
                    )
                    .await
                    .map_err(postgres)?
                else {
                    return Ok(JobCancel::Missing);
                };
                let mut job: JobRecord = json(&row, 0)?;
                match job.status {
                    JobStatus::Pending => {
                        job.settle(JobStatus::Cancelled, error, now);
                        write(tx, &job, None, 0).await.map_err(postgres)?;
                        apply_caps(tx, &tenant, caps).await.map_err(postgres)?;
                        Ok(JobCancel::Settled(job))
                    }
                    JobStatus::Running => {
                        tx.execute(
                            "UPDATE jobs SET cancel_requested = TRUE WHERE tenant = $1 AND id = $2",
                            &[&tenant, &id],
                        )
                        .await
                        .map_err(postgres)?;
                        tx.execute("SELECT pg_notify('gust_job_cancels', $1)", &[&id])
                            .await
                            .map_err(postgres)?;
                        Ok(JobCancel::Requested(job))
                    }
                    _ => {
                        tx.execute(
                            "DELETE FROM jobs WHERE tenant = $1 AND id = $2",
                            &[&tenant, &id],
                        )
                        .await
                        .map_err(postgres)?;
                        Ok(JobCancel::Deleted)
                    }
                }
            })
        })
    }

    fn expire_jobs(&self, lost: fn(bool) -> JobError) -> Result<ExpiredJobs, StoreError> {
        self.transaction(move |tx| {
            Box::pin(async move {
                // Skipped if another host is expiring (or its own host
                // finishing) them right now.
                let rows = tx
                    .query(
                        "SELECT j.record, coalesce(f.retryable, FALSE)
                         FROM jobs j
                         LEFT JOIN functions f
                             ON f.tenant = j.tenant AND f.name = j.record ->> 'function'
                         WHERE j.status = 'running' AND j.lease_until < gust_now_ms()
                         FOR UPDATE OF j SKIP LOCKED",
                        &[],
                    )
                    .await
                    .map_err(postgres)?;
                let mut expired = ExpiredJobs::default();
                let now = super::now_millis();
                for row in &rows {
                    let mut job: JobRecord = json(row, 0)?;
                    let retryable: bool = row.try_get(1).map_err(postgres)?;
                    if retryable && job.attempts < 2 {
                        job.status = JobStatus::Pending;
                        expired.requeued += 1;
                    } else {
                        job.settle(JobStatus::Failed, lost(retryable), now);
                        expired.failed += 1;
                    }
                    write(tx, &job, None, 0).await.map_err(postgres)?;
                }
                if expired.requeued > 0 {
                    tx.execute("SELECT pg_notify('gust_jobs', '')", &[])
                        .await
                        .map_err(postgres)?;
                }
                Ok(expired)
            })
        })
    }

    fn abandon_jobs(&self, host: &str) -> Result<u64, StoreError> {
        self.execute(
            "UPDATE jobs SET lease_until = 0 WHERE host = $1 AND status = 'running'",
            params![host.to_owned()],
        )
    }

    fn prune_jobs(&self, cutoff: UnixMillis) -> Result<u64, StoreError> {
        self.execute(
            "DELETE FROM jobs WHERE finished_at IS NOT NULL AND finished_at <= $1",
            params![i64_of(cutoff)],
        )
    }

    fn claim_fire(
        &self,
        tenant: &str,
        function: &str,
        created_at: UnixMillis,
        tick: UnixMillis,
    ) -> Result<bool, StoreError> {
        let claimed = self.execute(
            "UPDATE schedules SET fired_tick = $4
             WHERE tenant = $1 AND function = $2
               AND (record ->> 'created_at')::BIGINT = $3
               AND (fired_tick IS NULL OR fired_tick < $4)",
            params![
                tenant.to_owned(),
                function.to_owned(),
                i64_of(created_at),
                i64_of(tick)
            ],
        )?;
        Ok(claimed == 1)
    }
}
