//! Jobs: invocations that run later.
//!
//! A job is written to the store as `pending` before its spawn is answered,
//! waits in its tenant's bounded queue, runs through the same path as an
//! invoke (the tenant's concurrency, the policy's limits, an invocation
//! record) and keeps its result or error in the store until the host's job
//! retention has passed.
//!
//! On a store only this host writes (sled), the queues and the set of
//! running jobs live in memory; the store has every job's state, so a start
//! rebuilds the queues from it. A job that was running when the host stopped
//! is failed with a reason, or queued once more if its function is deployed
//! `retryable`. The dispatcher sleeps until a job is queued or a concurrency
//! slot is released: it never polls.
//!
//! On a store several hosts share (PostgreSQL), the queue is the store's:
//! a host with room claims the oldest pending job of a tenant (see
//! [`SharedStore`]) and holds it with a lease that it renews while the job
//! runs. A host that dies stops renewing; once the lease lapses any host
//! queues the job again (its function `retryable`, first retry) or fails it
//! with `host-lost`. Hosts wake on the store's notifications, and look again
//! every [`JOBS_RECHECK`] in case one was missed.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::Instrument as _;

use super::{Failure, Permit, Service, ServiceError, Started};
use crate::runtime::{CallControl, Cancel, Outcome, Request as CallRequest, new_invocation_id};
use crate::store::{
    JobCancel, JobCaps, JobClaim, JobError, JobRecord, JobResult, JobStatus, SharedStore,
    StoreError, UnixMillis, now_millis,
};

/// The status recorded for an invocation that was cancelled (nginx's
/// "client closed request": nobody got an answer).
pub const CANCELLED_STATUS: u16 = 499;

/// How often a host on a shared store looks for pending jobs even without
/// a notification.
const JOBS_RECHECK: Duration = Duration::from_secs(2);

/// A job being run.
struct Running {
    /// Its tenant: a cancel names the job by tenant and id.
    tenant: String,
    cancel: Cancel,
    task: Option<JoinHandle<()>>,
    /// When this host took it: a lease renewal that began earlier cannot
    /// have seen it.
    since: Instant,
}

#[derive(Default)]
struct Inner {
    /// Pending job ids per tenant, oldest first.
    queues: HashMap<String, VecDeque<String>>,
    /// Running jobs by id.
    running: HashMap<String, Running>,
    /// Per tenant, queue places taken by spawns still being stored: counted
    /// with the queue, so two spawns at once cannot both take the last one.
    reserved: HashMap<String, usize>,
    /// Finished jobs kept per tenant, in the order they finished: what
    /// retention and the policy's caps remove, oldest first, without
    /// reading the records.
    finished: HashMap<String, VecDeque<Finished>>,
    /// Set at shutdown: nothing more is started.
    stopping: bool,
}

/// A finished job as retention sees it.
struct Finished {
    id: String,
    finished_at: u64,
    /// What its record holds: input, result body, error.
    bytes: u64,
}

impl Finished {
    fn of(job: &JobRecord) -> Self {
        Self {
            id: job.id.clone(),
            finished_at: job.finished_at.unwrap_or(job.created_at),
            bytes: job.stored_bytes(),
        }
    }
}

/// A place in a tenant's queue, held while its job is stored; dropped
/// without [`Reservation::enqueue`], the place is given back.
struct Reservation<'a> {
    jobs: &'a Jobs,
    tenant: &'a str,
    placed: bool,
}

impl Reservation<'_> {
    /// Puts the stored job `id` in the place: the queue takes it and the
    /// reservation ends in one step, so the count never passes the limit.
    fn enqueue(mut self, id: String) {
        let mut inner = self.jobs.lock();
        inner
            .queues
            .entry(self.tenant.to_owned())
            .or_default()
            .push_back(id);
        Jobs::unreserve(&mut inner, self.tenant);
        self.placed = true;
        drop(inner);
        self.jobs.wake.notify_one();
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if !self.placed {
            Jobs::unreserve(&mut self.jobs.lock(), self.tenant);
        }
    }
}

/// The host's job queues, running jobs and background tasks.
#[derive(Default)]
pub(super) struct Jobs {
    inner: Mutex<Inner>,
    wake: Notify,
    background: Mutex<Vec<JoinHandle<()>>>,
}

/// A new job id, `job_<12 hex: ms><16 hex: random>`: sorts by creation.
fn new_job_id(now: UnixMillis) -> String {
    // Same shape and uniqueness argument as invocation ids.
    let invocation = new_invocation_id(now);
    format!("job_{}", invocation.trim_start_matches("inv_"))
}

impl Jobs {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Jobs waiting and running, host-wide.
    pub(super) fn counts(&self) -> (usize, usize) {
        let inner = self.lock();
        (
            inner.queues.values().map(VecDeque::len).sum(),
            inner.running.len(),
        )
    }

    /// Takes a place in `tenant`'s queue if fewer than `limit` are taken
    /// (queued or reserved), in one step under the lock.
    fn reserve<'a>(&'a self, tenant: &'a str, limit: usize) -> Option<Reservation<'a>> {
        let mut inner = self.lock();
        let queued = inner.queues.get(tenant).map_or(0, VecDeque::len);
        let reserved = inner.reserved.get(tenant).copied().unwrap_or(0);
        if queued.saturating_add(reserved) >= limit {
            return None;
        }
        *inner.reserved.entry(tenant.to_owned()).or_default() += 1;
        Some(Reservation {
            jobs: self,
            tenant,
            placed: false,
        })
    }

    fn enqueue(&self, tenant: &str, id: String) {
        self.lock()
            .queues
            .entry(tenant.to_owned())
            .or_default()
            .push_back(id);
        self.wake.notify_one();
    }

    /// Gives a reserved place back (the job went into the queue, or was
    /// never stored).
    fn unreserve(inner: &mut Inner, tenant: &str) {
        if let Some(n) = inner.reserved.get_mut(tenant) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                inner.reserved.remove(tenant);
            }
        }
    }

    /// Keeps a background task to stop at shutdown.
    pub(super) fn track(&self, task: JoinHandle<()>) {
        let mut background = self
            .background
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        background.retain(|t| !t.is_finished());
        background.push(task);
    }

    /// Stops every background task and running job. Running jobs stay
    /// `running` in the store, which the next start resolves.
    pub(super) async fn shutdown(&self) {
        self.lock().stopping = true;
        // Again until none are left: a task being stopped may have started
        // another (a schedule's run).
        loop {
            let mut tasks: Vec<JoinHandle<()>> = std::mem::take(
                &mut *self
                    .background
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner),
            );
            tasks.extend(
                self.lock()
                    .running
                    .values_mut()
                    .filter_map(|r| r.task.take()),
            );
            if tasks.is_empty() {
                break;
            }
            for task in &tasks {
                task.abort();
            }
            for task in tasks {
                // Waited for so that nothing holds the store once this returns.
                let _ = task.await;
            }
        }
    }
}

fn job_error(failure: &Failure) -> JobError {
    JobError {
        code: failure.code.clone(),
        status: failure.status.as_u16(),
        message: failure.detail.clone(),
    }
}

fn finish_with_error(job: &mut JobRecord, status: JobStatus, failure: &Failure) {
    job.settle(status, job_error(failure), now_millis());
}

/// Why a job whose host stopped renewing its lease did not finish.
fn host_lost(retryable: bool) -> JobError {
    let message = if retryable {
        "the host running the job stopped answering, for the second time; it is not retried again"
    } else {
        "the host running the job stopped answering; deploy the function with `retryable` to have such a job run once more"
    };
    JobError {
        code: "host-lost".into(),
        status: 500,
        message: message.into(),
    }
}

fn cancelled(message: &str) -> Failure {
    Failure {
        status: http::StatusCode::from_u16(CANCELLED_STATUS)
            .unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR),
        code: "cancelled".into(),
        detail: message.to_owned(),
        retry: false,
    }
}

/// What `DELETE /v1/jobs/{id}` did.
#[derive(Debug, Clone)]
pub enum Cancelled {
    /// The job was pending or running and is (being) cancelled.
    Cancelled(Box<JobRecord>),
    /// The job had finished and is deleted.
    Deleted,
}

impl Service {
    /// Rebuilds the queues from the store: pending jobs wait again, jobs
    /// that were running fail (or, for a retryable function, wait again).
    pub(super) fn recover_jobs(&self) -> Result<(), StoreError> {
        if self.store.shared().is_some() {
            // The queue is the store's, and a job that was running is
            // another host's until its lease lapses: nothing to rebuild.
            return Ok(());
        }
        let mut requeued = 0usize;
        let mut failed = 0usize;
        let mut finished = Vec::new();
        for mut job in self.store.all_jobs()? {
            match job.status {
                JobStatus::Pending => {
                    self.jobs.enqueue(&job.tenant, job.id.clone());
                    requeued += 1;
                }
                JobStatus::Running => {
                    let retryable = self
                        .deployment(&job.tenant, &job.function)
                        .is_some_and(|d| d.record.retryable);
                    if retryable && job.attempts < 2 {
                        job.status = JobStatus::Pending;
                        self.store.put_job(&job)?;
                        self.jobs.enqueue(&job.tenant, job.id.clone());
                        requeued += 1;
                    } else {
                        let message = if retryable {
                            "the host stopped while the job was running, for the second time; it is not retried again"
                        } else {
                            "the host stopped while the job was running; deploy the function with `retryable` to have such a job run once more"
                        };
                        let failure = Failure {
                            status: http::StatusCode::INTERNAL_SERVER_ERROR,
                            code: "host-restarted".into(),
                            detail: message.into(),
                            retry: false,
                        };
                        finish_with_error(&mut job, JobStatus::Failed, &failure);
                        self.store.put_job(&job)?;
                        finished.push(job);
                        failed += 1;
                    }
                }
                _ => finished.push(job),
            }
        }
        // Retention's index, in the order the jobs finished; the caps apply
        // at once (a policy may have been lowered since).
        finished.sort_by_key(|job| job.finished_at.unwrap_or(job.created_at));
        for job in &finished {
            self.keep_finished(job);
        }
        if requeued + failed > 0 {
            tracing::info!(requeued, failed, "jobs recovered from the store");
        }
        Ok(())
    }

    /// Starts the dispatcher and the retention sweeper.
    pub(super) fn start_jobs(self: &Arc<Self>) {
        if self.store.shared().is_some() {
            self.track(tokio::spawn(dispatch_shared(Arc::clone(self))));
            self.track(tokio::spawn(keep_leases(Arc::clone(self))));
            self.track(tokio::spawn(sweep_shared(Arc::clone(self))));
        } else {
            self.track(tokio::spawn(dispatch(Arc::clone(self))));
            self.track(tokio::spawn(sweep(Arc::clone(self))));
        }
    }

    /// The caps on the tenant's finished jobs.
    fn job_caps(&self, tenant: &str) -> JobCaps {
        let policy = self.policy(tenant);
        JobCaps {
            jobs: policy.max_stored_jobs,
            bytes: policy.max_stored_job_bytes,
        }
    }

    /// Queues an invocation of the tenant's handler `name` with `input`,
    /// to run in `trace` (the spawning request's); the job is stored (and
    /// flushed) before this returns.
    ///
    /// # Errors
    /// [`ServiceError::NotFound`], [`ServiceError::WrongWorld`],
    /// [`ServiceError::QueueFull`], or a store failure.
    pub fn spawn_job(
        &self,
        tenant: &str,
        name: &str,
        content_type: String,
        input: Vec<u8>,
        trace: crate::trace::TraceContext,
    ) -> Result<JobRecord, ServiceError> {
        self.handler_function(tenant, name, "only handler functions run as jobs")?;
        let limit = self.policy(tenant).max_queued_jobs;
        if let Some(shared) = self.store.shared() {
            let job = pending_job(tenant, name, content_type, input, trace);
            // Counted and stored in one step in the store, across hosts.
            if !shared.enqueue_job(&job, limit)? {
                self.metrics.rejected("job-queue-full");
                return Err(ServiceError::QueueFull { limit });
            }
            return Ok(job);
        }
        let Some(place) = self
            .jobs
            .reserve(tenant, usize::try_from(limit).unwrap_or(usize::MAX))
        else {
            self.metrics.rejected("job-queue-full");
            return Err(ServiceError::QueueFull { limit });
        };
        let job = pending_job(tenant, name, content_type, input, trace);
        self.store.put_job(&job)?;
        // Accepted means it survives a crash from here on.
        if let Err(e) = self.store.flush() {
            // Refused means it never runs: not even when the disk has room
            // again and the buffered record reaches it after all.
            if let Err(removal) = self.store.delete_job(tenant, &job.id) {
                tracing::warn!(job = %job.id, error = %removal, "could not withdraw a refused job");
            }
            return Err(e.into());
        }
        place.enqueue(job.id.clone());
        Ok(job)
    }

    /// Notes a finished job (just stored) for retention, then removes the
    /// tenant's oldest finished jobs while it keeps more than its policy's
    /// `max_stored_jobs` or `max_stored_job_bytes`.
    fn keep_finished(&self, job: &JobRecord) {
        let policy = self.policy(&job.tenant);
        let evicted: Vec<String> = {
            let mut inner = self.jobs.lock();
            let kept = inner.finished.entry(job.tenant.clone()).or_default();
            kept.retain(|f| f.id != job.id);
            kept.push_back(Finished::of(job));
            let mut bytes: u64 = kept.iter().map(|f| f.bytes).sum();
            let mut evicted = Vec::new();
            while kept.len() as u64 > policy.max_stored_jobs || bytes > policy.max_stored_job_bytes
            {
                let Some(oldest) = kept.pop_front() else {
                    break;
                };
                bytes = bytes.saturating_sub(oldest.bytes);
                evicted.push(oldest.id);
            }
            evicted
        };
        for id in evicted {
            if let Err(e) = self.store.delete_job(&job.tenant, &id) {
                tracing::warn!(job = %id, error = %e, "could not remove a job beyond the tenant's caps");
            }
        }
    }

    /// One job of the tenant.
    ///
    /// # Errors
    /// [`ServiceError::NotFound`], or a store failure.
    pub fn job(&self, tenant: &str, id: &str) -> Result<JobRecord, ServiceError> {
        self.store
            .job(tenant, id)?
            .ok_or_else(|| ServiceError::NotFound(format!("no job `{id}`")))
    }

    /// Cancels a pending or running job, deletes a finished one.
    ///
    /// # Errors
    /// [`ServiceError::NotFound`], or a store failure.
    pub fn cancel_job(&self, tenant: &str, id: &str) -> Result<Cancelled, ServiceError> {
        let not_found = || ServiceError::NotFound(format!("no job `{id}`"));
        if let Some(shared) = self.store.shared() {
            return self.cancel_shared_job(shared, tenant, id);
        }
        let settled = |job: JobRecord| -> Result<Cancelled, ServiceError> {
            self.store.put_job(&job)?;
            self.keep_finished(&job);
            Ok(Cancelled::Cancelled(Box::new(job)))
        };
        {
            // Read under the lock: see `run`.
            let mut inner = self.jobs.lock();
            let mut job = self.store.job(tenant, id)?.ok_or_else(not_found)?;
            let queued = inner
                .queues
                .get_mut(tenant)
                .and_then(|q| q.iter().position(|j| j == id).map(|at| q.remove(at)))
                .is_some();
            if queued {
                drop(inner);
                let failure = cancelled("the job was cancelled before it ran");
                finish_with_error(&mut job, JobStatus::Cancelled, &failure);
                return settled(job);
            }
            if let Some(running) = inner.running.get(id) {
                // Interrupted at its next epoch tick; the job's task then
                // stores it as cancelled.
                running.cancel.cancel();
                return Ok(Cancelled::Cancelled(Box::new(job)));
            }
            if !job.status.is_finished() {
                // Neither queued nor running here, yet not finished: the
                // host is stopping. Settle it as cancelled.
                finish_with_error(
                    &mut job,
                    JobStatus::Cancelled,
                    &cancelled("the job was cancelled"),
                );
                drop(inner);
                return settled(job);
            }
        }
        if self.store.delete_job(tenant, id)? {
            let mut inner = self.jobs.lock();
            if let Some(kept) = inner.finished.get_mut(tenant) {
                kept.retain(|f| f.id != id);
            }
            Ok(Cancelled::Deleted)
        } else {
            Err(not_found())
        }
    }

    /// [`Service::cancel_job`] on a shared store: a job this host runs is
    /// interrupted here; a pending one is settled in the store; one that
    /// another host runs is flagged there, and that host (told by a
    /// notification, or at its next lease renewal) interrupts it.
    fn cancel_shared_job(
        &self,
        shared: &dyn SharedStore,
        tenant: &str,
        id: &str,
    ) -> Result<Cancelled, ServiceError> {
        let not_found = || ServiceError::NotFound(format!("no job `{id}`"));
        let here = {
            let inner = self.jobs.lock();
            inner
                .running
                .get(id)
                .filter(|running| running.tenant == tenant)
                .map(|running| running.cancel.clone())
        };
        if let Some(cancel) = here {
            cancel.cancel();
            let job = self.store.job(tenant, id)?.ok_or_else(not_found)?;
            return Ok(Cancelled::Cancelled(Box::new(job)));
        }
        let error = job_error(&cancelled("the job was cancelled before it ran"));
        match shared.cancel_job(tenant, id, &error, now_millis(), self.job_caps(tenant))? {
            JobCancel::Settled(job) | JobCancel::Requested(job) => {
                Ok(Cancelled::Cancelled(Box::new(job)))
            }
            JobCancel::Deleted => Ok(Cancelled::Deleted),
            JobCancel::Missing => Err(not_found()),
        }
    }

    /// Lets another host take the jobs this one runs at once (their leases
    /// lapse now), instead of after the lease: at shutdown, when they have
    /// been stopped.
    pub(super) fn abandon_jobs(&self) {
        if let Some(shared) = self.store.shared()
            && let Err(error) = shared.abandon_jobs(&self.host_id)
        {
            tracing::warn!(%error, "could not hand this host's running jobs over; they lapse with their leases");
        }
    }
}

/// A new pending job, whose runs join `trace`.
fn pending_job(
    tenant: &str,
    name: &str,
    content_type: String,
    input: Vec<u8>,
    trace: crate::trace::TraceContext,
) -> JobRecord {
    let now = now_millis();
    JobRecord {
        id: new_job_id(now),
        tenant: tenant.to_owned(),
        function: name.to_owned(),
        status: JobStatus::Pending,
        created_at: now,
        started_at: None,
        finished_at: None,
        attempts: 0,
        invocation_id: None,
        content_type,
        input,
        result: None,
        error: None,
        traceparent: Some(trace.traceparent()),
    }
}

/// Starts queued jobs as the tenants' and the host's concurrency allow,
/// taking the tenants in turn; sleeps until a job is queued or a slot is
/// released.
async fn dispatch(service: Arc<Service>) {
    loop {
        // Registered before looking, so that a release in between is not lost.
        let released = service.admission.released().notified();
        let queued = service.jobs.wake.notified();
        let waiting = start_ready(&service);
        if waiting {
            tokio::select! {
                () = released => {}
                () = queued => {}
            }
        } else {
            queued.await;
        }
    }
}

/// One pass over the queues; returns whether any jobs are still waiting.
fn start_ready(service: &Arc<Service>) -> bool {
    let mut inner = service.jobs.lock();
    if inner.stopping {
        return false;
    }
    let tenants: Vec<String> = inner.queues.keys().cloned().collect();
    for tenant in tenants {
        let limit = service.policy(&tenant).max_concurrency as usize;
        while let Some(queue) = inner.queues.get_mut(&tenant) {
            if queue.is_empty() {
                inner.queues.remove(&tenant);
                break;
            }
            let Some(permit) = service.admission.try_admit(&tenant, limit) else {
                break;
            };
            let Some(id) = queue.pop_front() else { break };
            start(service, &mut inner, &tenant, id, None, permit);
        }
    }
    inner.queues.values().any(|q| !q.is_empty())
}

/// Starts the task that runs job `id`, already claimed in the store when
/// `claimed` (a shared store) and to be marked running by the task when not.
fn start(
    service: &Arc<Service>,
    inner: &mut Inner,
    tenant: &str,
    id: String,
    claimed: Option<(JobRecord, Started)>,
    permit: Permit,
) {
    let cancel = Cancel::new();
    let span = tracing::debug_span!("job", %tenant, job = %id);
    let task = tokio::spawn(
        run(
            Arc::clone(service),
            tenant.to_owned(),
            id.clone(),
            claimed,
            cancel.clone(),
            permit,
        )
        .instrument(span),
    );
    inner.running.insert(
        id,
        Running {
            tenant: tenant.to_owned(),
            cancel,
            task: Some(task),
            since: Instant::now(),
        },
    );
}

/// Runs one job: marks it running (unless it was claimed so), invokes,
/// records and stores the result.
async fn run(
    service: Arc<Service>,
    tenant: String,
    id: String,
    claimed: Option<(JobRecord, Started)>,
    cancel: Cancel,
    permit: Permit,
) {
    let finished = match claimed {
        Some((job, started)) => Ok(Some(execute(&service, job, started, cancel, permit).await)),
        None => run_job(&service, &tenant, &id, cancel, permit).await,
    };
    let finished = match finished {
        Ok(finished) => finished,
        Err(e) => {
            tracing::error!(job = %id, error = %e, "a job could not be run");
            service.jobs.lock().running.remove(&id);
            return;
        }
    };
    let Some(job) = finished else {
        service.jobs.lock().running.remove(&id);
        return;
    };
    // A final write that fails would leave the job `running` (until the
    // next start, or its lease lapses): try again, a few times, waiting
    // longer each time.
    let mut wait = Duration::from_millis(50);
    let job = Arc::new(job);
    for attempt in 1..=5 {
        let (written, job_id) = (Arc::clone(&job), id.clone());
        // The store call on a blocking thread: this is an async task.
        let stored = service
            .blocking(move |service| {
                if let Some(shared) = service.store.shared() {
                    // Not under the lock: a database round trip. A cancel
                    // meanwhile is a cancel of a job that is finishing.
                    let caps = service.job_caps(&written.tenant);
                    let held = shared.finish_job(&written, &service.host_id, caps)?;
                    service.jobs.lock().running.remove(&job_id);
                    return Ok(held);
                }
                // Stored under the lock, so that a concurrent DELETE sees
                // the job either running or finished, never in between.
                let mut inner = service.jobs.lock();
                service.store.put_job(&written)?;
                inner.running.remove(&job_id);
                Ok(true)
            })
            .await;
        match stored {
            Ok(true) => {
                if service.store.shared().is_none() {
                    service.keep_finished(&job);
                }
                return;
            }
            Ok(false) => {
                tracing::warn!(job = %id, "the job's lease lapsed while it ran and another host took it over; this run's result is dropped");
                return;
            }
            Err(e) if attempt < 5 => {
                tracing::warn!(job = %id, attempt, error = %e, "storing a finished job failed; retrying");
                tokio::time::sleep(wait).await;
                wait = wait.saturating_mul(4);
            }
            Err(e) => {
                tracing::error!(job = %id, error = %e, "a finished job could not be stored; it reads as running until the next start (or its lease lapses)");
            }
        }
    }
    service.jobs.lock().running.remove(&id);
}

/// The job's function, ready to run; why it cannot run otherwise.
fn resolve(service: &Service, job: &JobRecord) -> Result<super::Target, ServiceError> {
    match service.deployment(&job.tenant, &job.function) {
        None => Err(ServiceError::NotFound(format!(
            "no function `{}` (deleted after the job was spawned)",
            job.function
        ))),
        Some(d) if d.record.world != crate::store::FunctionWorld::Handler => {
            Err(ServiceError::WrongWorld {
                name: job.function.clone(),
                instead: "it cannot run as a job".into(),
            })
        }
        Some(deployment) => service.target(deployment),
    }
}

/// A job of a store only this host writes: reads it, marks it running
/// (durably) and runs it; `None` if it was deleted or is no longer pending.
async fn run_job(
    service: &Arc<Service>,
    tenant: &str,
    id: &str,
    cancel: Cancel,
    permit: Permit,
) -> Result<Option<JobRecord>, ServiceError> {
    // Store calls on blocking threads: the runner is an async task.
    let (job_tenant, job_id) = (tenant.to_owned(), id.to_owned());
    let Some(mut job) = service
        .blocking(move |s| Ok(s.store.job(&job_tenant, &job_id)?))
        .await?
    else {
        // Deleted while it waited.
        return Ok(None);
    };
    if job.status != JobStatus::Pending {
        return Ok(None);
    }
    if let Err(error) = resolve(service, &job) {
        finish_with_error(&mut job, JobStatus::Failed, &error.failure());
        return Ok(Some(job));
    }

    let started = Started::now();
    job.status = JobStatus::Running;
    job.started_at = Some(started.at);
    job.attempts = job.attempts.saturating_add(1);
    job.invocation_id = Some(started.id.clone());
    let running = job.clone();
    let job_id = id.to_owned();
    service
        .blocking(move |s| {
            s.store.put_job(&running)?;
            // Durable before the guest runs, so that a crash from here on
            // reads as "was running" at the next start, never as a job that
            // never ran. A failed flush only weakens that; the job still
            // runs.
            if let Err(e) = s.store.flush() {
                tracing::warn!(
                    job = %job_id,
                    error = %e,
                    "could not flush the job's running state"
                );
            }
            Ok(())
        })
        .await?;
    Ok(Some(execute(service, job, started, cancel, permit).await))
}

/// Runs a job marked running as `started`: invokes, records, and returns
/// the job as it finished.
async fn execute(
    service: &Arc<Service>,
    mut job: JobRecord,
    started: Started,
    cancel: Cancel,
    permit: Permit,
) -> JobRecord {
    let target = match resolve(service, &job) {
        Ok(target) => target,
        Err(error) => {
            finish_with_error(&mut job, JobStatus::Failed, &error.failure());
            return job;
        }
    };
    let tenant = job.tenant.clone();
    let trace = job
        .traceparent
        .as_deref()
        .and_then(crate::trace::TraceContext::parse);
    // Under the spawning request's span.
    let started = Started {
        trace: trace.unwrap_or(started.trace),
        ..started
    };
    let call = CallRequest {
        body: job.input.clone(),
        content_type: job.content_type.clone(),
        headers: Vec::new(),
        invocation_id: started.id.clone(),
    };
    let control = started.control(CallControl {
        cancel: Some(cancel),
        ..service.buffered(&tenant)
    });
    let invocation = service.run(&target, call, control).await;
    drop(permit);
    service
        .record_outcome(&target.function, &started, &invocation)
        .await;
    match invocation.outcome {
        // A job keeps its result for everyone to read later: at most what
        // a request may carry, like an invocation's input.
        Outcome::Ok(reply) if reply.body.len() as u64 > service.policy(&tenant).max_body_bytes => {
            let limit = service.policy(&tenant).max_body_bytes;
            finish_with_error(
                &mut job,
                JobStatus::Failed,
                &Failure {
                    status: http::StatusCode::INTERNAL_SERVER_ERROR,
                    code: "result-too-large".into(),
                    detail: format!(
                        "the function answered {} bytes; a job keeps at most max_body_bytes ({limit})",
                        reply.body.len()
                    ),
                    retry: false,
                },
            );
        }
        Outcome::Ok(reply) => {
            job.status = JobStatus::Succeeded;
            job.finished_at = Some(now_millis());
            job.input = Vec::new();
            job.error = None;
            job.result = Some(JobResult {
                status: reply.status,
                content_type: reply.content_type,
                body: reply.body,
            });
        }
        Outcome::Cancelled => finish_with_error(
            &mut job,
            JobStatus::Cancelled,
            &cancelled("the job was cancelled while it ran"),
        ),
        other => finish_with_error(&mut job, JobStatus::Failed, &Failure::of(&other)),
    }
    job
}

/// The dispatcher on a shared store: claims pending jobs of the tenants
/// this host has room for; sleeps until a job is queued (any host), a slot
/// is released, or [`JOBS_RECHECK`] has passed.
async fn dispatch_shared(service: Arc<Service>) {
    let Some(mut queued) = service.store.shared().map(SharedStore::jobs_queued) else {
        return;
    };
    loop {
        queued.mark_unchanged();
        // Registered before looking, so that a release in between is not lost.
        let released = service.admission.released().notified();
        let waiting = match claim_ready(&service).await {
            Ok(waiting) => waiting,
            Err(error) => {
                tracing::warn!(%error, "could not claim jobs from the shared store");
                false
            }
        };
        tokio::select! {
            () = released, if waiting => {}
            changed = queued.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            () = tokio::time::sleep(JOBS_RECHECK) => {}
        }
    }
}

/// One pass over the tenants with pending jobs, claiming as many as this
/// host has room for; returns whether some had to wait for room.
async fn claim_ready(service: &Arc<Service>) -> Result<bool, ServiceError> {
    let tenants = service
        .on_shared(|_, shared| shared.pending_job_tenants())
        .await?;
    let mut waiting = false;
    for tenant in tenants {
        let limit = service.policy(&tenant).max_concurrency as usize;
        loop {
            if service.jobs.lock().stopping {
                return Ok(false);
            }
            let Some(permit) = service.admission.try_admit(&tenant, limit) else {
                waiting = true;
                break;
            };
            let started = Started::now();
            let claim = JobClaim {
                host: service.host_id.clone(),
                lease: service.config.job_lease,
                started_at: started.at,
                invocation_id: started.id.clone(),
            };
            let of = tenant.clone();
            let claimed = service
                .on_shared(move |_, shared| shared.claim_job(&of, &claim))
                .await?;
            // None left (or other hosts took them): the permit goes back.
            let Some(job) = claimed else { break };
            let id = job.id.clone();
            start(
                service,
                &mut service.jobs.lock(),
                &tenant,
                id,
                Some((job, started)),
                permit,
            );
        }
    }
    Ok(waiting)
}

/// Renews the leases of the jobs this host runs, every third of a lease;
/// interrupts those whose cancellation another host asked for (at once on
/// its notification) and those this host no longer holds; and expires the
/// leases of hosts that stopped renewing theirs.
async fn keep_leases(service: Arc<Service>) {
    let Some(mut cancels) = service.store.shared().map(SharedStore::cancels_requested) else {
        return;
    };
    let lease = service.config.job_lease;
    let every = (lease / 3).max(Duration::from_millis(100));
    let mut renewed = Instant::now();
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            changed = cancels.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
        cancels.mark_unchanged();
        let began = Instant::now();
        let held = service
            .on_shared(move |s, shared| shared.renew_jobs(&s.host_id, lease))
            .await;
        match held {
            Ok(held) => {
                renewed = began;
                let held: HashMap<String, bool> = held.into_iter().collect();
                let inner = service.jobs.lock();
                for (id, running) in &inner.running {
                    match held.get(id) {
                        Some(true) => running.cancel.cancel(),
                        Some(false) => {}
                        // Taken over by another host after its lease
                        // lapsed: its result would not be kept.
                        None if running.since < began => running.cancel.cancel(),
                        None => {}
                    }
                }
            }
            Err(error) => {
                tracing::warn!(%error, "could not renew the leases of this host's jobs");
                if renewed.elapsed() >= lease {
                    // Other hosts may run them already: stop, so that each
                    // runs once.
                    let inner = service.jobs.lock();
                    tracing::warn!(
                        jobs = inner.running.len(),
                        "the leases of this host's jobs lapsed; they are stopped here"
                    );
                    for running in inner.running.values() {
                        running.cancel.cancel();
                    }
                }
            }
        }
        let expired = service
            .on_shared(|_, shared| shared.expire_jobs(host_lost))
            .await;
        match expired {
            Ok(expired) if expired.requeued + expired.failed > 0 => {
                tracing::info!(
                    requeued = expired.requeued,
                    failed = expired.failed,
                    "jobs of a host that stopped answering were taken over"
                );
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "could not expire lapsed job leases"),
        }
    }
}

/// Deletes finished jobs older than the retention from a shared store,
/// periodically (any host may; deleting twice is harmless).
async fn sweep_shared(service: Arc<Service>) {
    let retention = service.config.job_retention;
    let every = (retention / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
    loop {
        tokio::time::sleep(every).await;
        let cutoff =
            now_millis().saturating_sub(u64::try_from(retention.as_millis()).unwrap_or(u64::MAX));
        let pruned = service
            .on_shared(move |_, shared| shared.prune_jobs(cutoff))
            .await;
        match pruned {
            Ok(0) => {}
            Ok(removed) => tracing::debug!(removed, "expired job results removed"),
            Err(error) => tracing::warn!(%error, "could not remove expired jobs"),
        }
    }
}

/// Deletes finished jobs older than the retention, periodically.
async fn sweep(service: Arc<Service>) {
    let retention = service.config.job_retention;
    let every = (retention / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
    loop {
        tokio::time::sleep(every).await;
        let cutoff =
            now_millis().saturating_sub(u64::try_from(retention.as_millis()).unwrap_or(u64::MAX));
        // From the index, oldest first: no record is read.
        let expired: Vec<(String, String)> = {
            let mut inner = service.jobs.lock();
            let mut expired = Vec::new();
            for (tenant, kept) in &mut inner.finished {
                while kept.front().is_some_and(|f| f.finished_at <= cutoff) {
                    if let Some(job) = kept.pop_front() {
                        expired.push((tenant.clone(), job.id));
                    }
                }
            }
            inner.finished.retain(|_, kept| !kept.is_empty());
            expired
        };
        if expired.is_empty() {
            continue;
        }
        let removed = service.blocking(move |service| {
            let mut removed = 0usize;
            for (tenant, id) in expired {
                match service.store.delete_job(&tenant, &id) {
                    Ok(_) => removed += 1,
                    Err(e) => {
                        tracing::warn!(job = %id, error = %e, "could not remove an expired job");
                    }
                }
            }
            Ok(removed)
        })
        .await
        .unwrap_or(0);
        if removed > 0 {
            tracing::debug!(removed, "expired job results removed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The check against `max_queued_jobs` and the enqueue are one step:
    /// places being stored count, so concurrent spawns cannot overshoot.
    #[test]
    fn queue_places_are_reserved_atomically() {
        let jobs = Jobs::default();
        let first = jobs.reserve("acme", 2).expect("room for two");
        let second = jobs.reserve("acme", 2).expect("room for two");
        assert!(jobs.reserve("acme", 2).is_none(), "both places are taken");
        assert!(jobs.reserve("other", 2).is_some(), "per tenant");
        // A spawn whose store write failed gives its place back.
        drop(second);
        let again = jobs.reserve("acme", 2).expect("a place came back");
        first.enqueue("job_1".into());
        again.enqueue("job_2".into());
        assert_eq!(jobs.counts().0, 2);
        assert!(jobs.reserve("acme", 2).is_none(), "the queue holds two");
        assert!(jobs.lock().reserved.is_empty());
    }
}
