//! Cron schedules.
//!
//! A schedule is stored with its function (one per function) and kept in
//! memory with its next fire time. One task sleeps until the earliest fire
//! time; each run is an invocation through the same path as an invoke (the
//! tenant's concurrency, waiting for a slot rather than failing; the
//! policy's limits; an invocation record). Fires missed while the host was
//! down are not caught up: after a start, a schedule next fires at its next
//! time from then.
//!
//! Hosts sharing a store each keep every schedule (following each other's
//! changes) and each wake at every fire time; the one that claims the fire
//! in the store ([`SharedStore::claim_fire`]) runs it, so a schedule fires
//! once per time whatever the number of hosts, and keeps firing while any
//! host is up.

use std::collections::HashMap;
use std::str::FromStr as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};
use croner::Cron;
use tokio::sync::Notify;
use tracing::Instrument as _;

use super::{Admit, Service, ServiceError, json_input};
use crate::runtime::Request as CallRequest;
use crate::store::{ScheduleRecord, SharedStore, StoreError, UnixMillis, now_millis};

/// A schedule and when it fires next.
struct Entry {
    cron: Cron,
    /// Which setting of the schedule this is: a replaced one starts over.
    text: String,
    created_at: UnixMillis,
    next: Option<UnixMillis>,
    /// Set while a run is in progress: a fire that finds it set is skipped,
    /// so a run slower than its schedule never piles up waiting runs.
    running: Arc<AtomicBool>,
}

/// A schedule to fire now: (tenant, function), its running flag, and the
/// cron time it fires for.
type Due = ((String, String), Arc<AtomicBool>, UnixMillis);

/// The host's schedules, by (tenant, function).
#[derive(Default)]
pub(super) struct Schedules {
    entries: Mutex<HashMap<(String, String), Entry>>,
    changed: Notify,
}

/// Parses a cron expression: 5 fields (minute to day of week), or 6 with
/// seconds first, evaluated in UTC.
fn parse_cron(text: &str) -> Result<Cron, String> {
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

impl Entry {
    fn new(schedule: &ScheduleRecord, cron: Cron, now: UnixMillis) -> Self {
        Self {
            next: next_after(&cron, now),
            cron,
            text: schedule.cron.clone(),
            created_at: schedule.created_at,
            running: Arc::new(AtomicBool::new(false)),
        }
    }
}

impl Schedules {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Entry>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set(&self, schedule: &ScheduleRecord, cron: Cron, now: UnixMillis) {
        self.lock().insert(
            (schedule.tenant.clone(), schedule.function.clone()),
            Entry::new(schedule, cron, now),
        );
        self.changed.notify_one();
    }

    /// Makes the schedules `stored` (every schedule of the store) the ones
    /// kept: an unchanged one keeps its next time and running flag, a new or
    /// replaced one starts from `now`, one no longer stored goes. Whether
    /// anything changed.
    fn sync(&self, stored: Vec<ScheduleRecord>, now: UnixMillis) -> bool {
        let mut entries = self.lock();
        let mut kept = HashMap::with_capacity(stored.len());
        let mut changed = false;
        for schedule in stored {
            let key = (schedule.tenant.clone(), schedule.function.clone());
            let entry = match entries.remove(&key) {
                Some(entry)
                    if entry.text == schedule.cron && entry.created_at == schedule.created_at =>
                {
                    entry
                }
                _ => match parse_cron(&schedule.cron) {
                    Ok(cron) => {
                        changed = true;
                        Entry::new(&schedule, cron, now)
                    }
                    Err(e) => {
                        tracing::error!(tenant = %schedule.tenant, function = %schedule.function, error = %e, "a stored schedule is invalid; it does not run");
                        continue;
                    }
                },
            };
            kept.insert(key, entry);
        }
        changed |= !entries.is_empty();
        *entries = kept;
        drop(entries);
        if changed {
            self.changed.notify_one();
        }
        changed
    }

    /// Forgets a function's schedule (it was deleted).
    pub(super) fn remove(&self, tenant: &str, function: &str) {
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
            if let Some(tick) = entry.next.filter(|next| *next <= now) {
                due.push((key.clone(), Arc::clone(&entry.running), tick));
                entry.next = next_after(&entry.cron, now);
            }
            if let Some(next) = entry.next {
                earliest = Some(earliest.map_or(next, |e| e.min(next)));
            }
        }
        (due, earliest)
    }
}

impl Service {
    /// Loads every stored schedule.
    pub(super) fn load_schedules(&self) -> Result<(), StoreError> {
        let now = now_millis();
        for schedule in self.store.all_schedules()? {
            match parse_cron(&schedule.cron) {
                Ok(cron) => self.schedules.set(&schedule, cron, now),
                Err(e) => {
                    tracing::error!(tenant = %schedule.tenant, function = %schedule.function, error = %e, "a stored schedule is invalid; it does not run")
                }
            }
        }
        Ok(())
    }

    /// Starts the task that fires schedules, and on a shared store the one
    /// that follows other hosts' schedule changes.
    pub(super) fn start_schedules(self: &Arc<Self>) {
        self.track(tokio::spawn(fire_loop(Arc::clone(self))));
        if let Some(changes) = self.store.shared().map(SharedStore::schedules_changed) {
            self.track(tokio::spawn(follow_schedules(Arc::clone(self), changes)));
        }
    }

    /// When the tenant's schedule of `function` fires next.
    pub fn next_run(&self, tenant: &str, function: &str) -> Option<UnixMillis> {
        self.schedules.next_run(tenant, function)
    }

    /// Sets (or replaces) the schedule of the tenant's handler `name`;
    /// returns it and whether one existed before.
    ///
    /// # Errors
    /// [`ServiceError::NotFound`], [`ServiceError::WrongWorld`],
    /// [`ServiceError::InvalidCron`], or a store failure.
    pub fn put_schedule(
        &self,
        tenant: &str,
        name: &str,
        cron: &str,
        input: serde_json::Value,
    ) -> Result<(ScheduleRecord, bool), ServiceError> {
        self.handler_function(tenant, name, "only handler functions can be scheduled")?;
        let cron_text = cron.trim();
        let cron = parse_cron(cron_text).map_err(ServiceError::InvalidCron)?;
        let existed = self.store.schedule(tenant, name)?.is_some();
        let schedule = ScheduleRecord {
            tenant: tenant.to_owned(),
            function: name.to_owned(),
            cron: cron_text.to_owned(),
            input,
            created_at: now_millis(),
            last_run_at: None,
            last_invocation_id: None,
            last_outcome: None,
        };
        self.store.put_schedule(&schedule)?;
        self.schedules.set(&schedule, cron, now_millis());
        Ok((schedule, existed))
    }

    /// The schedule of the tenant's function `name`.
    ///
    /// # Errors
    /// [`ServiceError::NotFound`], or a store failure.
    pub fn schedule(&self, tenant: &str, name: &str) -> Result<ScheduleRecord, ServiceError> {
        self.store
            .schedule(tenant, name)?
            .ok_or_else(|| ServiceError::NotFound(format!("`{name}` has no schedule")))
    }

    /// Removes the schedule of the tenant's function `name`.
    ///
    /// # Errors
    /// [`ServiceError::NotFound`], or a store failure.
    pub fn delete_schedule(&self, tenant: &str, name: &str) -> Result<(), ServiceError> {
        if !self.store.delete_schedule(tenant, name)? {
            return Err(ServiceError::NotFound(format!("`{name}` has no schedule")));
        }
        self.schedules.remove(tenant, name);
        Ok(())
    }
}

async fn fire_loop(service: Arc<Service>) {
    loop {
        let (due, earliest) = service.schedules.due(now_millis());
        for ((tenant, function), running, tick) in due {
            if running.swap(true, Ordering::AcqRel) {
                tracing::info!(%tenant, %function, "the previous scheduled run is still going; this one is skipped");
                continue;
            }
            // A run that waits for a concurrency slot must not delay others.
            let run = {
                let service = Arc::clone(&service);
                let span = tracing::debug_span!("schedule", %tenant, %function);
                tokio::spawn(
                    async move {
                        fire(&service, &tenant, &function, tick).await;
                        running.store(false, Ordering::Release);
                    }
                    .instrument(span),
                )
            };
            service.track(run);
        }
        let wait = earliest.map_or(Duration::from_secs(3600), |at| {
            Duration::from_millis(at.saturating_sub(now_millis()))
        });
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = service.schedules.changed.notified() => {}
        }
    }
}

/// How often a host on a shared store reads the schedules again even
/// without a notification.
const SCHEDULES_RECHECK: Duration = Duration::from_secs(5);

/// Keeps this host's schedules in step with the shared store's: on every
/// change notification, and every [`SCHEDULES_RECHECK`].
async fn follow_schedules(service: Arc<Service>, mut changes: tokio::sync::watch::Receiver<u64>) {
    loop {
        tokio::select! {
            changed = changes.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            () = tokio::time::sleep(SCHEDULES_RECHECK) => {}
        }
        changes.mark_unchanged();
        match service.blocking(|s| Ok(s.store.all_schedules()?)).await {
            Ok(stored) => {
                if service.schedules.sync(stored, now_millis()) {
                    tracing::debug!("schedules brought in step with the store");
                }
            }
            Err(error) => tracing::warn!(%error, "could not follow other hosts' schedules"),
        }
    }
}

/// One run of a schedule, for the cron time `tick`: an invocation with its
/// record. On a shared store, only the host that claims the tick runs it.
async fn fire(service: &Arc<Service>, tenant: &str, function: &str, tick: UnixMillis) {
    // Store calls on a blocking thread: this is an async task.
    let read = || {
        let service = Arc::clone(service);
        let (tenant, function) = (tenant.to_owned(), function.to_owned());
        async move {
            service
                .blocking(move |s| Ok(s.store.schedule(&tenant, &function)?))
                .await
        }
    };
    let Ok(Some(mut schedule)) = read().await else {
        return;
    };
    if service.store.shared().is_some() {
        let (of, name, created_at) = (tenant.to_owned(), function.to_owned(), schedule.created_at);
        let claimed = service
            .on_shared(move |_, shared| shared.claim_fire(&of, &name, created_at, tick))
            .await;
        match claimed {
            Ok(true) => {}
            // Another host runs this one.
            Ok(false) => return,
            Err(e) => {
                tracing::warn!(%tenant, %function, error = %e, "could not claim a scheduled run; skipped");
                return;
            }
        }
    }
    let Some(deployment) = service.deployment(tenant, function) else {
        return;
    };
    let target = match service.target(deployment) {
        Ok(target) => target,
        Err(ServiceError::Unloadable { .. }) => {
            tracing::warn!(%tenant, %function, "scheduled function is not loaded; run skipped");
            return;
        }
        Err(e) => {
            tracing::warn!(%tenant, %function, detail = %e, "scheduled run skipped");
            return;
        }
    };
    let input = serde_json::to_vec(&schedule.input).unwrap_or_default();
    let (body, content_type) =
        json_input(&input).unwrap_or_else(|_| (Vec::new(), "application/octet-stream"));
    // Waiting never fails: the semaphores are never closed.
    let Ok(permit) = service.admit(tenant, Admit::Wait).await else {
        return;
    };
    let started = service.started(&target.function);
    let call = CallRequest {
        body,
        content_type: content_type.to_owned(),
        headers: vec![("gust-schedule".to_owned(), schedule.cron.clone())],
        invocation_id: started.id.clone(),
    };
    let control = started.control(service.buffered(tenant));
    let invocation = service.run(&target, call, control).await;
    drop(permit);
    service
        .record_outcome(&target.function, &started, &invocation)
        .await;
    // Re-read: the schedule may have been replaced or removed meanwhile.
    if let Ok(Some(current)) = read().await
        && current.cron == schedule.cron
        && current.created_at == schedule.created_at
    {
        schedule = current;
        schedule.last_run_at = Some(started.at);
        schedule.last_invocation_id = Some(started.id);
        schedule.last_outcome = Some(invocation.outcome.code().to_owned());
        let noted = service
            .blocking(move |s| Ok(s.store.put_schedule(&schedule)?))
            .await;
        if let Err(e) = noted {
            tracing::warn!(%tenant, %function, error = %e, "could not note a scheduled run");
        }
    }
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

    fn record(function: &str, cron: &str, created_at: UnixMillis) -> ScheduleRecord {
        ScheduleRecord {
            tenant: "acme".into(),
            function: function.into(),
            cron: cron.into(),
            input: serde_json::Value::Null,
            created_at,
            last_run_at: None,
            last_invocation_id: None,
            last_outcome: None,
        }
    }

    /// Following another host's changes keeps what did not change (its
    /// next time and running flag), restarts what was replaced, drops what
    /// was removed.
    #[test]
    fn syncing_with_the_store_keeps_unchanged_schedules() {
        let start = 1_767_225_600_000;
        let schedules = Schedules::default();
        assert!(schedules.sync(
            vec![record("a", "* * * * * *", 1), record("b", "0 * * * * *", 1)],
            start,
        ));
        let (due, _) = schedules.due(start + 1000);
        assert_eq!(due.len(), 1, "a fires at the next second");
        let running = Arc::clone(&due[0].1);
        running.store(true, Ordering::Release);
        // Nothing changed: same entries, a's flag and next time kept.
        assert!(!schedules.sync(
            vec![record("a", "* * * * * *", 1), record("b", "0 * * * * *", 1)],
            start + 1500,
        ));
        assert_eq!(schedules.next_run("acme", "a"), Some(start + 2000));
        let (due, _) = schedules.due(start + 2000);
        assert!(due[0].1.load(Ordering::Acquire), "the same running flag");
        // b replaced (set again), a removed.
        assert!(schedules.sync(vec![record("b", "*/5 * * * * *", 2)], start + 2100));
        assert_eq!(schedules.next_run("acme", "a"), None);
        assert_eq!(schedules.next_run("acme", "b"), Some(start + 5000));
        // A stored schedule that does not parse is left out, not fatal.
        schedules.sync(vec![record("c", "not cron", 3)], start);
        assert_eq!(schedules.next_run("acme", "c"), None);
    }
}
