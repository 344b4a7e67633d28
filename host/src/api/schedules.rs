//! Cron schedules: `PUT`, `GET` and `DELETE /v1/functions/{name}/schedule`.
//!
//! A schedule is stored with its function (one per function) and kept in
//! memory with its next fire time. One task sleeps until the earliest fire
//! time; each run is an invocation through the same path as an invoke (the
//! tenant's concurrency, waiting for a slot rather than failing; the
//! policy's limits; an invocation record). Fires missed while the host was
//! down are not caught up: after a start, a schedule next fires at its next
//! time from then.

use std::collections::HashMap;
use std::str::FromStr as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use croner::Cron;
use http::StatusCode;
use hyper::body::Incoming;
use serde_json::json;
use tokio::sync::Notify;

use super::handlers::{
    Handled, call_limits, empty, found_handler, json_response, read_capped, record, rfc3339,
};
use super::problem::Problem;
use super::state::AppState;
use crate::runtime::{Request as CallRequest, new_invocation_id};
use crate::store::{ScheduleRecord, UnixMillis, now_millis};

/// A schedule and when it fires next.
struct Entry {
    cron: Cron,
    next: Option<UnixMillis>,
    /// Set while a run is in progress: a fire that finds it set is skipped,
    /// so a run slower than its schedule never piles up waiting runs.
    running: Arc<AtomicBool>,
}

/// A schedule to fire now: (tenant, function) and its running flag.
type Due = ((String, String), Arc<AtomicBool>);

/// The host's schedules, by (tenant, function).
#[derive(Default)]
pub(crate) struct Schedules {
    entries: Mutex<HashMap<(String, String), Entry>>,
    changed: Notify,
}

/// Parses a cron expression: 5 fields (minute to day of week), or 6 with
/// seconds first, evaluated in UTC.
pub(crate) fn parse_cron(text: &str) -> Result<Cron, String> {
    let fields = text.split_whitespace().count();
    if !(5..=6).contains(&fields) {
        return Err(format!(
            "`{text}` has {fields} fields; a cron expression has 5 (minute hour day-of-month month day-of-week) or 6 (seconds first)"
        ));
    }
    Cron::from_str(text).map_err(|e| format!("`{text}` is not a valid cron expression: {e}"))
}

fn next_after(cron: &Cron, after: UnixMillis) -> Option<UnixMillis> {
    let start: DateTime<Utc> = DateTime::from_timestamp_millis(i64::try_from(after).ok()?)?;
    let next = cron.find_next_occurrence(&start, false).ok()?;
    u64::try_from(next.timestamp_millis()).ok()
}

impl Schedules {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Entry>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Loads every stored schedule.
    pub(crate) fn load(&self, state: &AppState) -> Result<(), crate::store::StoreError> {
        let now = now_millis();
        for schedule in state.store.all_schedules()? {
            match parse_cron(&schedule.cron) {
                Ok(cron) => self.set(&schedule, cron, now),
                Err(e) => {
                    tracing::error!(tenant = %schedule.tenant, function = %schedule.function, error = %e, "a stored schedule is invalid; it does not run")
                }
            }
        }
        Ok(())
    }

    fn set(&self, schedule: &ScheduleRecord, cron: Cron, now: UnixMillis) {
        let next = next_after(&cron, now);
        self.lock().insert(
            (schedule.tenant.clone(), schedule.function.clone()),
            Entry {
                cron,
                next,
                running: Arc::new(AtomicBool::new(false)),
            },
        );
        self.changed.notify_one();
    }

    /// Forgets a function's schedule (it was deleted).
    pub(crate) fn remove(&self, tenant: &str, function: &str) {
        self.lock()
            .remove(&(tenant.to_owned(), function.to_owned()));
        self.changed.notify_one();
    }

    fn next_run(&self, tenant: &str, function: &str) -> Option<UnixMillis> {
        self.lock()
            .get(&(tenant.to_owned(), function.to_owned()))
            .and_then(|e| e.next)
    }

    /// Takes the schedules due at `now` (moving each to its next time) and
    /// says how long until the next one.
    fn due(&self, now: UnixMillis) -> (Vec<Due>, Option<UnixMillis>) {
        let mut due = Vec::new();
        let mut earliest: Option<UnixMillis> = None;
        for (key, entry) in self.lock().iter_mut() {
            if entry.next.is_some_and(|next| next <= now) {
                due.push((key.clone(), Arc::clone(&entry.running)));
                entry.next = next_after(&entry.cron, now);
            }
            if let Some(next) = entry.next {
                earliest = Some(earliest.map_or(next, |e| e.min(next)));
            }
        }
        (due, earliest)
    }

    /// Starts the task that fires schedules.
    pub(crate) fn start(state: &Arc<AppState>) {
        let task = tokio::spawn(fire_loop(Arc::clone(state)));
        state.jobs.track(task);
    }
}

async fn fire_loop(state: Arc<AppState>) {
    loop {
        let (due, earliest) = state.schedules.due(now_millis());
        for ((tenant, function), running) in due {
            if running.swap(true, Ordering::AcqRel) {
                tracing::info!(%tenant, %function, "the previous scheduled run is still going; this one is skipped");
                continue;
            }
            // A run that waits for a concurrency slot must not delay others.
            let run = {
                let state = Arc::clone(&state);
                tokio::spawn(async move {
                    fire(&state, &tenant, &function).await;
                    running.store(false, Ordering::Release);
                })
            };
            state.jobs.track(run);
        }
        let wait = earliest.map_or(Duration::from_secs(3600), |at| {
            Duration::from_millis(at.saturating_sub(now_millis()))
        });
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = state.schedules.changed.notified() => {}
        }
    }
}

/// One run of a schedule: an invocation with its record.
async fn fire(state: &AppState, tenant: &str, function: &str) {
    let Ok(Some(mut schedule)) = state.store.schedule(tenant, function) else {
        return;
    };
    let Some(deployment) = state.deployment(tenant, function) else {
        return;
    };
    let Ok(component) = deployment.component.clone() else {
        tracing::warn!(%tenant, %function, "scheduled function is not loaded; run skipped");
        return;
    };
    let policy = state.policies.for_tenant(tenant);
    let limits = match call_limits(state, tenant, function, policy) {
        Ok(limits) => limits,
        Err(problem) => {
            tracing::warn!(%tenant, %function, detail = problem.detail(), "scheduled run skipped");
            return;
        }
    };
    let input = serde_json::to_vec(&schedule.input).unwrap_or_default();
    let (body, content_type) = match super::map::input_body(&input) {
        Ok(parts) => parts,
        Err(_) => (Vec::new(), "application/octet-stream"),
    };
    let permits = super::map::admit_waiting(state, tenant, policy.max_concurrency as usize).await;
    let started_at = now_millis();
    let started = Instant::now();
    let id = new_invocation_id(started_at);
    let call = CallRequest {
        body,
        content_type: content_type.to_owned(),
        headers: vec![("gust-schedule".to_owned(), schedule.cron.clone())],
        invocation_id: id.clone(),
    };
    let invocation = state
        .runtime
        .invoke_with(&component, call, &limits, super::handlers::buffered(policy))
        .await;
    drop(permits);
    let status = super::jobs::invocation_status(&invocation);
    record(
        state,
        &deployment.record,
        &id,
        started_at,
        started,
        status,
        &invocation,
    );
    // Re-read: the schedule may have been replaced or removed meanwhile.
    if let Ok(Some(current)) = state.store.schedule(tenant, function)
        && current.cron == schedule.cron
        && current.created_at == schedule.created_at
    {
        schedule = current;
        schedule.last_run_at = Some(started_at);
        schedule.last_invocation_id = Some(id);
        schedule.last_outcome = Some(invocation.outcome.code().to_owned());
        if let Err(e) = state.store.put_schedule(&schedule) {
            tracing::warn!(%tenant, %function, error = %e, "could not note a scheduled run");
        }
    }
}

/// The API's view of a schedule.
pub(crate) fn schedule_json(state: &AppState, schedule: &ScheduleRecord) -> serde_json::Value {
    json!({
        "function": schedule.function,
        "cron": schedule.cron,
        "input": schedule.input,
        "created_at": rfc3339(schedule.created_at),
        "next_run_at": state.schedules.next_run(&schedule.tenant, &schedule.function).map(rfc3339),
        "last_run_at": schedule.last_run_at.map(rfc3339),
        "last_invocation_id": schedule.last_invocation_id,
        "last_outcome": schedule.last_outcome,
    })
}

/// `PUT /v1/functions/{name}/schedule` `{"cron", "input"}`.
pub(crate) async fn put(
    state: &Arc<AppState>,
    name: &str,
    request: hyper::Request<Incoming>,
) -> Handled {
    let tenant = super::auth::tenant(state, request.headers())?;
    found_handler(
        state,
        &tenant,
        name,
        "only handler functions can be scheduled",
    )?;
    let policy = state.policies.for_tenant(&tenant);
    let (_, body) = read_capped(request, policy.max_body_bytes, "the request body").await?;
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct NewSchedule {
        cron: String,
        #[serde(default)]
        input: serde_json::Value,
    }
    let new: NewSchedule = serde_json::from_slice(&body).map_err(|e| {
        Problem::bad_request(
            "invalid-request",
            format!("expected {{\"cron\": \"*/5 * * * *\", \"input\": …}}: {e}"),
        )
    })?;
    let cron = parse_cron(new.cron.trim()).map_err(|e| Problem::bad_request("invalid-cron", e))?;
    let existed = state.store.schedule(&tenant, name)?.is_some();
    let schedule = ScheduleRecord {
        tenant: tenant.clone(),
        function: name.to_owned(),
        cron: new.cron.trim().to_owned(),
        input: new.input,
        created_at: now_millis(),
        last_run_at: None,
        last_invocation_id: None,
        last_outcome: None,
    };
    state.store.put_schedule(&schedule)?;
    state.schedules.set(&schedule, cron, now_millis());
    let status = if existed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok(json_response(status, &schedule_json(state, &schedule)))
}

/// `GET /v1/functions/{name}/schedule`.
pub(crate) fn get(state: &AppState, headers: &http::HeaderMap, name: &str) -> Handled {
    let tenant = super::auth::tenant(state, headers)?;
    let schedule = state
        .store
        .schedule(&tenant, name)?
        .ok_or_else(|| Problem::not_found(format!("`{name}` has no schedule")))?;
    Ok(json_response(
        StatusCode::OK,
        &schedule_json(state, &schedule),
    ))
}

/// `DELETE /v1/functions/{name}/schedule`.
pub(crate) fn delete(state: &AppState, headers: &http::HeaderMap, name: &str) -> Handled {
    let tenant = super::auth::tenant(state, headers)?;
    if !state.store.delete_schedule(&tenant, name)? {
        return Err(Problem::not_found(format!("`{name}` has no schedule")));
    }
    state.schedules.remove(&tenant, name);
    Ok(empty(StatusCode::NO_CONTENT))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn five_and_six_field_expressions_parse() {
        let every_five = parse_cron("*/5 * * * *").unwrap();
        // 2026-01-01T00:00:00Z plus 1 ms: the next multiple of 5 minutes.
        let start = 1_767_225_600_000;
        assert_eq!(next_after(&every_five, start + 1), Some(start + 300_000));
        let every_second = parse_cron("* * * * * *").unwrap();
        assert_eq!(next_after(&every_second, start), Some(start + 1000));
        assert!(parse_cron("* * *").unwrap_err().contains("3 fields"));
        assert!(parse_cron("61 * * * *").is_err());
        assert!(parse_cron("* * * * * * *").is_err());
    }
}
