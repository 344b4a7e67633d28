//! What the web console asks of the host beyond the JSON API's own
//! operations: signing sessions in with a key, the MAC their cookies carry,
//! a function's call statistics, a tenant's jobs and schedules, and a quick
//! call from the page. The console's handlers (`api::console`) only parse
//! and answer; everything they read comes from here or from the operations
//! the JSON API uses.

use std::collections::BTreeMap;
use std::time::Duration;

use super::Admit;
use super::invoke::invocation_status;
use super::tenants::Caller;
use super::{Service, ServiceError};
use crate::runtime::{Invocation, Request as CallRequest};
use crate::store::{InvocationRecord, JobRecord, ScheduleRecord, UnixMillis};
use crate::tenancy::keys;

/// A key that signed in: who it acts for and which key it is, so that a
/// session ends when its key is revoked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedIn {
    /// Who the key acts for.
    pub caller: Caller,
    /// The key's public id (`key_…`), or for the admin key a fingerprint
    /// of it prefixed with [`ADMIN_KEY_ID`].
    pub key_id: String,
}

/// What a session signed in with the admin key names as its key: the
/// prefix of a fingerprint of the admin key (never the key), so that a new
/// admin key ends the old one's sessions.
pub const ADMIN_KEY_ID: &str = "admin-";

/// A model resident on a device, as the console shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resident {
    /// The model's name.
    pub name: String,
    /// The device's backend (`cpu`, `wgpu`, `cuda`) and name.
    pub device: String,
    /// Device memory its weights hold.
    pub bytes: u64,
    /// Forward passes its batcher ran, and the calls they answered (`None`
    /// for a model that does not batch).
    pub batches: Option<(u64, u64)>,
}

/// One minute of a function's calls.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Minute {
    /// The minute's start.
    pub at: UnixMillis,
    /// Calls that started in it.
    pub calls: u64,
    /// Of which failed (status ≥ 500 or a failed outcome).
    pub errors: u64,
    /// Median total duration, in milliseconds.
    pub p50_ms: f64,
    /// 95th percentile total duration, in milliseconds.
    pub p95_ms: f64,
}

/// A function's calls over a window, from its kept invocation records.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CallStats {
    /// Calls in the window.
    pub calls: u64,
    /// Of which failed.
    pub errors: u64,
    /// Median total duration, in milliseconds (`None` without calls).
    pub p50_ms: Option<f64>,
    /// 95th percentile total duration, in milliseconds.
    pub p95_ms: Option<f64>,
    /// When the newest kept call started, in or before the window.
    pub last_call: Option<UnixMillis>,
    /// Calls by outcome code.
    pub outcomes: BTreeMap<String, u64>,
    /// Minute by minute, oldest first, covering the whole window.
    pub minutes: Vec<Minute>,
    /// True when the window holds more calls than the host keeps records
    /// of (`retention_per_function`): the figures cover the newest only.
    pub truncated: bool,
}

impl CallStats {
    /// The share of calls that failed, 0.0 without calls.
    pub fn error_rate(&self) -> f64 {
        if self.calls == 0 {
            0.0
        } else {
            self.errors as f64 / self.calls as f64
        }
    }
}

/// Whether a record counts as a failed call.
fn failed(record: &InvocationRecord) -> bool {
    record.outcome != "ok" || record.status >= 500
}

/// The `q`-quantile (0..=1) of sorted `values`, nearest rank.
fn quantile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

/// The statistics of `records` (newest first, as the store gives them)
/// over the `window` ending at `now`.
pub fn call_stats(
    records: &[InvocationRecord],
    now: UnixMillis,
    window: Duration,
    kept_all: bool,
) -> CallStats {
    const MINUTE: u64 = 60_000;
    let window_ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
    let since = now.saturating_sub(window_ms);
    let first_minute = since - since % MINUTE;
    let slots = usize::try_from((now - first_minute) / MINUTE + 1).unwrap_or(1);
    let mut per_minute: Vec<Vec<f64>> = vec![Vec::new(); slots];
    let mut minutes: Vec<Minute> = (0..slots)
        .map(|i| Minute {
            at: first_minute + i as u64 * MINUTE,
            ..Minute::default()
        })
        .collect();
    let mut stats = CallStats {
        last_call: records.first().map(|r| r.started_at),
        ..CallStats::default()
    };
    let mut durations = Vec::new();
    let mut reached_start = false;
    for record in records {
        if record.started_at < since {
            reached_start = true;
            break;
        }
        let ms = record.timings.total_us as f64 / 1000.0;
        let failed = failed(record);
        stats.calls += 1;
        stats.errors += u64::from(failed);
        *stats.outcomes.entry(record.outcome.clone()).or_default() += 1;
        durations.push(ms);
        let slot = usize::try_from((record.started_at.min(now) - first_minute) / MINUTE)
            .unwrap_or(0)
            .min(slots - 1);
        minutes[slot].calls += 1;
        minutes[slot].errors += u64::from(failed);
        per_minute[slot].push(ms);
    }
    // Every kept record was in the window and the store dropped older ones:
    // the window may hold calls the host no longer has.
    stats.truncated = !reached_start && !kept_all;
    let sort = |v: &mut Vec<f64>| v.sort_by(f64::total_cmp);
    sort(&mut durations);
    stats.p50_ms = quantile(&durations, 0.5);
    stats.p95_ms = quantile(&durations, 0.95);
    for (minute, mut values) in minutes.iter_mut().zip(per_minute) {
        sort(&mut values);
        minute.p50_ms = quantile(&values, 0.5).unwrap_or(0.0);
        minute.p95_ms = quantile(&values, 0.95).unwrap_or(0.0);
    }
    stats.minutes = minutes;
    stats
}

impl Service {
    /// Who `token` signs in as, and with which key; `None` when it is no
    /// key of this host.
    ///
    /// # Errors
    /// A store failure.
    pub fn sign_in(&self, token: &str) -> Result<Option<SignedIn>, ServiceError> {
        let hash = keys::hash(token);
        if keys::constant_time_eq(&hash, &self.admin_key_hash) {
            return Ok(Some(SignedIn {
                caller: Caller::Admin,
                key_id: self.admin_key_id(),
            }));
        }
        Ok(self
            .store
            .key_by_hash(&hash)?
            .filter(|record| keys::constant_time_eq(&record.hash, &hash))
            .map(|record| SignedIn {
                caller: Caller::Tenant(record.tenant),
                key_id: record.id,
            }))
    }

    /// Whether the key a session signed in with still acts for its caller:
    /// a revoked key (or a replaced admin key) ends its sessions.
    ///
    /// # Errors
    /// A store failure.
    pub fn session_key_valid(&self, signed: &SignedIn) -> Result<bool, ServiceError> {
        Ok(match &signed.caller {
            Caller::Admin => {
                use subtle::ConstantTimeEq as _;
                bool::from(
                    signed
                        .key_id
                        .as_bytes()
                        .ct_eq(self.admin_key_id().as_bytes()),
                )
            }
            Caller::Tenant(tenant) => self
                .store
                .keys(tenant)?
                .iter()
                .any(|key| key.id == signed.key_id),
        })
    }

    /// The admin key's id in sessions: a short fingerprint of its hash.
    fn admin_key_id(&self) -> String {
        let print = blake3::derive_key("gust console admin key id v1", &self.admin_key_hash);
        format!("{ADMIN_KEY_ID}{}", hex::encode(&print[..8]))
    }

    /// A MAC of `data` under the host's session key (derived from the
    /// secrets key, so hosts sharing a store accept each other's sessions).
    pub fn session_mac(&self, data: &[u8]) -> [u8; 32] {
        self.secrets.key().session_mac(data)
    }

    /// The statistics of `name`'s calls over the `window` ending now, from
    /// its kept invocation records (those of calls answered before it
    /// included, see [`Service::settle_records`]).
    ///
    /// # Errors
    /// [`ServiceError::NotFound`] for an unknown function, or a store failure.
    pub fn call_stats(
        &self,
        tenant: &str,
        name: &str,
        window: Duration,
    ) -> Result<CallStats, ServiceError> {
        if self.store.function(tenant, name)?.is_none() {
            return Err(ServiceError::NotFound(format!("no function `{name}`")));
        }
        let kept = self.config.retention_per_function;
        self.settle_records();
        let records: Vec<InvocationRecord> = self
            .store
            .invocations_before(tenant, name, kept, None)?
            .into_iter()
            .map(|(_, record)| record)
            .collect();
        let kept_all = records.len() < kept;
        Ok(call_stats(
            &records,
            crate::store::now_millis(),
            window,
            kept_all,
        ))
    }

    /// The models resident on the host's devices that `tenant` may load
    /// (others' residency is other tenants' business).
    pub fn residents(&self, tenant: &str) -> Vec<Resident> {
        let policy = self.policy(tenant);
        self.gpu
            .models()
            .residents()
            .iter()
            .filter(|model| policy.gpu.allows_model(model.name()))
            .map(|model| {
                let info = model.device().description();
                Resident {
                    name: model.name().to_owned(),
                    device: format!("{} ({})", info.kind.as_str(), info.name),
                    bytes: model.bytes(),
                    batches: model.batch_stats().map(|b| (b.batches, b.requests)),
                }
            })
            .collect()
    }

    /// How much of the tenant's device time quota is in use (about the
    /// last minute's device time), and the quota; `None` without a quota
    /// or before its first use of the bridge.
    pub fn gpu_time_in_use(&self, tenant: &str) -> Option<(Duration, Duration)> {
        self.gpu.existing_account(tenant)?.time_quota_in_use()
    }

    /// Host-wide model counters: loads, hits, failures, evictions.
    pub fn model_counters(&self) -> gust_gpu_bridge::models::RegistryStats {
        self.gpu.models().stats()
    }

    /// The tenant's kept jobs, newest first.
    ///
    /// # Errors
    /// A store failure.
    pub fn jobs(&self, tenant: &str) -> Result<Vec<JobRecord>, ServiceError> {
        let mut jobs = self.store.jobs(tenant)?;
        jobs.reverse();
        Ok(jobs)
    }

    /// The tenant's schedules, by function name.
    ///
    /// # Errors
    /// A store failure.
    pub fn schedules(&self, tenant: &str) -> Result<Vec<ScheduleRecord>, ServiceError> {
        Ok(self.store.schedules(tenant)?)
    }

    /// One call of the handler function `name` with `body`, admitted,
    /// run and recorded as an invoke is; returns its id and what it did.
    ///
    /// # Errors
    /// No such function, one of another world, or no free slot.
    pub async fn invoke_now(
        &self,
        tenant: &str,
        name: &str,
        body: Vec<u8>,
        content_type: String,
    ) -> Result<(String, Invocation), ServiceError> {
        let target =
            self.handler_target(tenant, name, &format!("call it at /http/{tenant}/{name}/"))?;
        let permit = self.admit(tenant, Admit::Fail).await?;
        let started = self.started(&target.function);
        let call = CallRequest {
            body,
            content_type,
            headers: Vec::new(),
            invocation_id: started.id.clone(),
        };
        let control = started.control(self.buffered(tenant));
        let invocation = self.run(&target, call, control).await;
        drop(permit);
        let status = invocation_status(&invocation);
        self.record(&target.function, &started, status, &invocation)
            .await;
        Ok((started.id, invocation))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::TimingsRecord;

    fn record(at: UnixMillis, total_ms: u64, outcome: &str, status: u16) -> InvocationRecord {
        InvocationRecord {
            id: format!("inv_{at}"),
            tenant: "t".into(),
            function: "f".into(),
            version: 1,
            started_at: at,
            status,
            outcome: outcome.into(),
            message: None,
            timings: TimingsRecord {
                total_us: total_ms * 1000,
                ..TimingsRecord::default()
            },
            peak_memory_bytes: 0,
            stdout: String::new(),
            stderr: String::new(),
            stdout_dropped_bytes: 0,
            stderr_dropped_bytes: 0,
            egress_denied: Vec::new(),
            trace_id: None,
        }
    }

    #[test]
    fn stats_cover_the_window_only_and_count_failures_by_outcome() {
        let now = 10 * 3_600_000 + 30_000;
        let hour = std::time::Duration::from_secs(3600);
        // Newest first, as the store gives them; the last is too old.
        let records: Vec<_> = (1..=20)
            .map(|i| record(now - i * 60_000, i, "ok", 200))
            .chain([
                record(now - 61_000, 100, "trap", 500),
                record(now - 62_000, 100, "ok", 503),
                record(now - 2 * 3_600_000, 1, "ok", 200),
            ])
            .collect();
        let stats = call_stats(&records, now, hour, true);
        assert_eq!(stats.calls, 22);
        assert_eq!(stats.errors, 2);
        assert_eq!(stats.outcomes.get("trap"), Some(&1));
        assert_eq!(stats.outcomes.get("ok"), Some(&21));
        assert_eq!(stats.last_call, Some(now - 60_000));
        // Nearest rank over 1..=20 ms and two of 100 ms.
        assert_eq!(stats.p50_ms, Some(11.0));
        assert_eq!(stats.p95_ms, Some(100.0));
        assert!(!stats.truncated);
        assert_eq!(stats.minutes.len(), 61);
        assert_eq!(stats.minutes.iter().map(|m| m.calls).sum::<u64>(), 22);
        let minute = stats
            .minutes
            .iter()
            .find(|m| m.calls == 3)
            .expect("the minute with the two failures");
        assert_eq!(minute.errors, 2);
        assert!((stats.error_rate() - 2.0 / 22.0).abs() < 1e-12);
    }

    #[test]
    fn stats_say_when_the_kept_records_do_not_reach_back_over_the_window() {
        let now = 3_600_000 * 5;
        let records: Vec<_> = (0..5).map(|i| record(now - i, 1, "ok", 200)).collect();
        let hour = std::time::Duration::from_secs(3600);
        assert!(call_stats(&records, now, hour, false).truncated);
        assert!(!call_stats(&records, now, hour, true).truncated);
        let empty = call_stats(&[], now, hour, true);
        assert_eq!(
            (empty.calls, empty.p50_ms, empty.last_call),
            (0, None, None)
        );
        assert_eq!(empty.error_rate(), 0.0);
    }
}
