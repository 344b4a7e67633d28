//! Jobs: `POST /v1/functions/{name}/spawn`, `GET` and `DELETE
//! /v1/jobs/{id}`.
//!
//! A job is an invocation that runs later. It is written to the store as
//! `pending` before the spawn is answered, waits in its tenant's bounded
//! queue, runs through the same path as an invoke (the tenant's concurrency,
//! the policy's limits, an invocation record) and keeps its result or error
//! in the store until the host's job retention has passed.
//!
//! The queues and the set of running jobs live in memory; the store has
//! every job's state, so a start rebuilds the queues from it. A job that was
//! running when the host stopped is failed with a reason, or queued once more
//! if its function is deployed `retryable`.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use http::{HeaderValue, StatusCode, header};
use hyper::body::Incoming;
use serde_json::json;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::handlers::{
    Handled, call_limits, found_handler, json_response, outcome_problem, record, rfc3339,
};
use super::problem::Problem;
use super::state::{AppState, Permit};
use crate::runtime::{
    CallControl, Cancel, Invocation, Outcome, Request as CallRequest, World, new_invocation_id,
};
use crate::store::{JobError, JobRecord, JobResult, JobStatus, UnixMillis, now_millis};

/// The status recorded for an invocation that was cancelled (nginx's
/// "client closed request": nobody got an answer).
pub(crate) const CANCELLED_STATUS: u16 = 499;

/// A job being run.
struct Running {
    cancel: Cancel,
    task: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct Inner {
    /// Pending job ids per tenant, oldest first.
    queues: HashMap<String, VecDeque<String>>,
    /// Running jobs by id.
    running: HashMap<String, Running>,
    /// Set at shutdown: nothing more is started.
    stopping: bool,
}

/// The host's job queues, running jobs and background tasks.
#[derive(Default)]
pub(crate) struct Jobs {
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
    pub(crate) fn counts(&self) -> (usize, usize) {
        let inner = self.lock();
        (
            inner.queues.values().map(VecDeque::len).sum(),
            inner.running.len(),
        )
    }

    fn queued(&self, tenant: &str) -> usize {
        self.lock().queues.get(tenant).map_or(0, VecDeque::len)
    }

    fn enqueue(&self, tenant: &str, id: String) {
        self.lock()
            .queues
            .entry(tenant.to_owned())
            .or_default()
            .push_back(id);
        self.wake.notify_one();
    }

    /// Rebuilds the queues from the store: pending jobs wait again, jobs
    /// that were running fail (or, for a retryable function, wait again).
    pub(crate) fn recover(&self, state: &AppState) -> Result<(), crate::store::StoreError> {
        let mut requeued = 0usize;
        let mut failed = 0usize;
        for mut job in state.store.all_jobs()? {
            match job.status {
                JobStatus::Pending => {
                    self.enqueue(&job.tenant, job.id.clone());
                    requeued += 1;
                }
                JobStatus::Running => {
                    let retryable = state
                        .deployment(&job.tenant, &job.function)
                        .is_some_and(|d| d.record.retryable);
                    if retryable && job.attempts < 2 {
                        job.status = JobStatus::Pending;
                        state.store.put_job(&job)?;
                        self.enqueue(&job.tenant, job.id.clone());
                        requeued += 1;
                    } else {
                        let message = if retryable {
                            "the host stopped while the job was running, for the second time; it is not retried again"
                        } else {
                            "the host stopped while the job was running; deploy the function with `retryable` to have such a job run once more"
                        };
                        finish_with_error(
                            &mut job,
                            JobStatus::Failed,
                            "host-restarted",
                            500,
                            message,
                        );
                        state.store.put_job(&job)?;
                        failed += 1;
                    }
                }
                _ => {}
            }
        }
        if requeued + failed > 0 {
            tracing::info!(requeued, failed, "jobs recovered from the store");
        }
        Ok(())
    }

    /// Starts the dispatcher and the retention sweeper.
    pub(crate) fn start(state: &Arc<AppState>) {
        let dispatcher = tokio::spawn(dispatch(Arc::clone(state)));
        let sweeper = tokio::spawn(sweep(Arc::clone(state)));
        state.jobs.track(dispatcher);
        state.jobs.track(sweeper);
    }

    /// Keeps a background task to stop at shutdown.
    pub(crate) fn track(&self, task: JoinHandle<()>) {
        let mut background = self
            .background
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        background.retain(|t| !t.is_finished());
        background.push(task);
    }

    /// Stops every background task and running job. Running jobs stay
    /// `running` in the store, which the next start resolves.
    pub(crate) async fn shutdown(&self) {
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

fn finish_with_error(job: &mut JobRecord, status: JobStatus, code: &str, http: u16, message: &str) {
    job.status = status;
    job.finished_at = Some(now_millis());
    job.input = Vec::new();
    job.result = None;
    job.error = Some(JobError {
        code: code.to_owned(),
        status: http,
        message: message.to_owned(),
    });
}

/// Starts queued jobs as the tenants' and the host's concurrency allow,
/// taking the tenants in turn.
async fn dispatch(state: Arc<AppState>) {
    loop {
        let (started, waiting) = start_ready(&state);
        if waiting && started == 0 {
            // Blocked on concurrency: look again shortly (a finishing call
            // does not signal), or at once when a job is spawned.
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(10)) => {}
                () = state.jobs.wake.notified() => {}
            }
        } else if !waiting {
            state.jobs.wake.notified().await;
        }
    }
}

/// One pass over the queues; returns how many jobs started and whether any
/// are still waiting.
fn start_ready(state: &Arc<AppState>) -> (usize, bool) {
    let mut inner = state.jobs.lock();
    if inner.stopping {
        return (0, false);
    }
    let mut started = 0;
    let tenants: Vec<String> = inner.queues.keys().cloned().collect();
    for tenant in tenants {
        let limit = state.policies.for_tenant(&tenant).max_concurrency as usize;
        while let Some(queue) = inner.queues.get_mut(&tenant) {
            if queue.is_empty() {
                inner.queues.remove(&tenant);
                break;
            }
            let Some(tenant_permit) = state.tenant_gate(&tenant).try_acquire(limit) else {
                break;
            };
            let Some(host_permit) = state.host_gate.try_acquire(state.host_capacity) else {
                break;
            };
            let Some(id) = queue.pop_front() else { break };
            let cancel = Cancel::new();
            let task = tokio::spawn(run(
                Arc::clone(state),
                tenant.clone(),
                id.clone(),
                cancel.clone(),
                (tenant_permit, host_permit),
            ));
            inner.running.insert(
                id,
                Running {
                    cancel,
                    task: Some(task),
                },
            );
            started += 1;
        }
    }
    let waiting = inner.queues.values().any(|q| !q.is_empty());
    (started, waiting)
}

/// Runs one job: marks it running, invokes, records and stores the result.
async fn run(
    state: Arc<AppState>,
    tenant: String,
    id: String,
    cancel: Cancel,
    permits: (Permit, Permit),
) {
    let finished = run_job(&state, &tenant, &id, cancel, permits).await;
    // Stored under the lock, so that a concurrent DELETE sees the job either
    // running or finished, never in between.
    let mut inner = state.jobs.lock();
    let stored = finished.and_then(|job| match job {
        Some(job) => state.store.put_job(&job),
        None => Ok(()),
    });
    if let Err(e) = stored {
        tracing::error!(job = %id, error = %e, "a job could not be run");
    }
    inner.running.remove(&id);
}

async fn run_job(
    state: &AppState,
    tenant: &str,
    id: &str,
    cancel: Cancel,
    permits: (Permit, Permit),
) -> Result<Option<JobRecord>, crate::store::StoreError> {
    let Some(mut job) = state.store.job(tenant, id)? else {
        // Deleted while it waited.
        return Ok(None);
    };
    if job.status != JobStatus::Pending {
        return Ok(None);
    }
    let deployment = state.deployment(tenant, &job.function);
    let component = match deployment.as_ref().map(|d| &d.component) {
        None => Err(Problem::not_found(format!(
            "no function `{}` (deleted after the job was spawned)",
            job.function
        ))),
        Some(Err(reason)) => Err(Problem::internal(format!(
            "`{}` could not be loaded: {reason}",
            job.function
        ))),
        Some(Ok(component)) if component.world() != World::Handler => Err(Problem::bad_request(
            "wrong-world",
            format!(
                "`{}` serves wasi:http and cannot run as a job",
                job.function
            ),
        )),
        Some(Ok(component)) => Ok(component.clone()),
    };
    let policy = state.policies.for_tenant(tenant);
    let prepared =
        component.and_then(|c| Ok((c, call_limits(state, tenant, &job.function, policy)?)));
    let (Some(deployment), Ok((component, limits))) = (deployment, prepared.as_ref()) else {
        let problem = prepared
            .err()
            .unwrap_or_else(|| Problem::internal("no deployment"));
        finish_with_error(
            &mut job,
            JobStatus::Failed,
            problem.code(),
            problem.status().as_u16(),
            problem.detail(),
        );
        return Ok(Some(job));
    };

    let started_at = now_millis();
    let started = Instant::now();
    let invocation_id = new_invocation_id(started_at);
    job.status = JobStatus::Running;
    job.started_at = Some(started_at);
    job.attempts = job.attempts.saturating_add(1);
    job.invocation_id = Some(invocation_id.clone());
    state.store.put_job(&job)?;
    // Durable before the guest runs, so that a crash from here on reads as
    // "was running" at the next start, never as a job that never ran. A
    // failed flush only weakens that; the job still runs.
    if let Err(e) = state.store.flush() {
        tracing::warn!(job = %id, error = %e, "could not flush the job's running state");
    }

    let call = CallRequest {
        body: job.input.clone(),
        content_type: job.content_type.clone(),
        headers: Vec::new(),
        invocation_id: invocation_id.clone(),
    };
    let control = CallControl {
        cancel: Some(cancel),
        ..super::handlers::buffered(policy)
    };
    let invocation = state
        .runtime
        .invoke_with(component, call, limits, control)
        .await;
    drop(permits);
    let status = invocation_status(&invocation);
    record(
        state,
        &deployment.record,
        &invocation_id,
        started_at,
        started,
        status,
        &invocation,
    );
    match invocation.outcome {
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
            "cancelled",
            CANCELLED_STATUS,
            "the job was cancelled while it ran",
        ),
        other => {
            let problem = outcome_problem(&other);
            finish_with_error(
                &mut job,
                JobStatus::Failed,
                problem.code(),
                problem.status().as_u16(),
                problem.detail(),
            );
        }
    }
    Ok(Some(job))
}

/// The status an invocation record carries: what an invoke would have
/// answered.
pub(crate) fn invocation_status(invocation: &Invocation) -> u16 {
    match &invocation.outcome {
        Outcome::Ok(reply) => reply.status,
        Outcome::Cancelled => CANCELLED_STATUS,
        other => outcome_problem(other).status().as_u16(),
    }
}

/// Deletes finished jobs older than the retention, periodically.
async fn sweep(state: Arc<AppState>) {
    let retention = state.config.job_retention;
    let every = (retention / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
    loop {
        tokio::time::sleep(every).await;
        let cutoff =
            now_millis().saturating_sub(u64::try_from(retention.as_millis()).unwrap_or(u64::MAX));
        let jobs = match state.store.all_jobs() {
            Ok(jobs) => jobs,
            Err(e) => {
                tracing::warn!(error = %e, "listing jobs for retention failed");
                continue;
            }
        };
        let mut removed = 0usize;
        for job in jobs {
            if job.status.is_finished()
                && job.finished_at.is_some_and(|at| at <= cutoff)
                && state.store.delete_job(&job.tenant, &job.id).is_ok()
            {
                removed += 1;
            }
        }
        if removed > 0 {
            tracing::debug!(removed, "expired job results removed");
        }
    }
}

/// The API's view of a job.
pub(crate) fn job_json(job: &JobRecord) -> serde_json::Value {
    json!({
        "id": job.id,
        "function": job.function,
        "status": job.status.as_str(),
        "created_at": rfc3339(job.created_at),
        "started_at": job.started_at.map(rfc3339),
        "finished_at": job.finished_at.map(rfc3339),
        "attempts": job.attempts,
        "invocation_id": job.invocation_id,
        "result": job.result.as_ref().map(|r| json!({
            "status": r.status,
            "content_type": r.content_type,
            "output": super::map::output_value(&r.content_type, &r.body),
        })),
        "error": job.error.as_ref().map(|e| json!({
            "code": e.code, "status": e.status, "message": e.message,
        })),
    })
}

/// `POST /v1/functions/{name}/spawn`: queue an invocation; `202` with the
/// job's id and URL.
pub(crate) async fn spawn(
    state: &Arc<AppState>,
    name: &str,
    request: hyper::Request<Incoming>,
) -> Handled {
    let tenant = super::auth::tenant(state, request.headers())?;
    found_handler(state, &tenant, name, "only handler functions run as jobs")?;
    let policy = state.policies.for_tenant(&tenant);
    let (parts, body) =
        super::handlers::read_capped(request, policy.max_body_bytes, "the request body").await?;
    let limit = usize::try_from(policy.max_queued_jobs).unwrap_or(usize::MAX);
    if state.jobs.queued(&tenant) >= limit {
        state.metrics.rejected("job-queue-full");
        return Err(Problem::new(
            StatusCode::TOO_MANY_REQUESTS,
            "queue-full",
            format!(
                "the tenant's job queue is full ({} jobs waiting)",
                policy.max_queued_jobs
            ),
        )
        .retry_after(1));
    }
    let now = now_millis();
    let job = JobRecord {
        id: new_job_id(now),
        tenant: tenant.clone(),
        function: name.to_owned(),
        status: JobStatus::Pending,
        created_at: now,
        started_at: None,
        finished_at: None,
        attempts: 0,
        invocation_id: None,
        content_type: parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("application/octet-stream")
            .to_owned(),
        input: body.to_vec(),
        result: None,
        error: None,
    };
    state.store.put_job(&job)?;
    // Accepted means it survives a crash from here on.
    state.store.flush()?;
    state.jobs.enqueue(&tenant, job.id.clone());
    let url = format!("/v1/jobs/{}", job.id);
    let mut response = json_response(
        StatusCode::ACCEPTED,
        &json!({"job_id": job.id, "url": url, "status": "pending"}),
    );
    if let Ok(location) = HeaderValue::from_str(&url) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

/// `GET /v1/jobs/{id}`.
pub(crate) fn get(state: &AppState, headers: &http::HeaderMap, id: &str) -> Handled {
    let tenant = super::auth::tenant(state, headers)?;
    let job = state
        .store
        .job(&tenant, id)?
        .ok_or_else(|| Problem::not_found(format!("no job `{id}`")))?;
    Ok(json_response(StatusCode::OK, &job_json(&job)))
}

/// `DELETE /v1/jobs/{id}`: cancels a pending or running job (`202` with the
/// job), removes a finished one (`204`).
pub(crate) fn delete(state: &AppState, headers: &http::HeaderMap, id: &str) -> Handled {
    let tenant = super::auth::tenant(state, headers)?;
    let not_found = || Problem::not_found(format!("no job `{id}`"));
    {
        // Read under the lock: see `run`.
        let mut inner = state.jobs.lock();
        let mut job = state.store.job(&tenant, id)?.ok_or_else(not_found)?;
        let queued = inner
            .queues
            .get_mut(&tenant)
            .and_then(|q| q.iter().position(|j| j == id).map(|at| q.remove(at)))
            .is_some();
        if queued {
            drop(inner);
            finish_with_error(
                &mut job,
                JobStatus::Cancelled,
                "cancelled",
                CANCELLED_STATUS,
                "the job was cancelled before it ran",
            );
            state.store.put_job(&job)?;
            return Ok(json_response(StatusCode::ACCEPTED, &job_json(&job)));
        }
        if let Some(running) = inner.running.get(id) {
            // Interrupted at its next epoch tick; the job's task then
            // stores it as cancelled.
            running.cancel.cancel();
            return Ok(json_response(StatusCode::ACCEPTED, &job_json(&job)));
        }
        if !job.status.is_finished() {
            // Neither queued nor running here, yet not finished: the host
            // is stopping. Settle it as cancelled.
            finish_with_error(
                &mut job,
                JobStatus::Cancelled,
                "cancelled",
                CANCELLED_STATUS,
                "the job was cancelled",
            );
            state.store.put_job(&job)?;
            return Ok(json_response(StatusCode::ACCEPTED, &job_json(&job)));
        }
    }
    if state.store.delete_job(&tenant, id)? {
        Ok(super::handlers::empty(StatusCode::NO_CONTENT))
    } else {
        Err(not_found())
    }
}
