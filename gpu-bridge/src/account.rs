//! Who pays for device memory and device time.
//!
//! An [`Account`] counts the device bytes its tensors hold and the device
//! time its ops take, against optional quotas. Accounts nest: an
//! invocation's account is a child of its tenant's, so a reservation must fit
//! every quota up the chain, and freeing an invocation's tensors returns the
//! bytes to all of them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::{BridgeError, ErrorCode, Result};

/// Device-time budget as a token bucket: `per_minute` refills evenly over a
/// minute and is also the burst size, so a tenant may spend its minute's
/// worth at once and then waits for the refill.
#[derive(Debug)]
struct TimeBucket {
    per_minute: Duration,
    available_nanos: i128,
    refilled_at: Instant,
}

impl TimeBucket {
    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.refilled_at).as_nanos() as i128;
        let capacity = self.per_minute.as_nanos() as i128;
        let gained = elapsed.saturating_mul(capacity) / 60_000_000_000;
        self.available_nanos = (self.available_nanos + gained).min(capacity);
        self.refilled_at = now;
    }
}

/// Device bytes and device time charged to one owner.
#[derive(Debug)]
pub struct Account {
    label: String,
    memory_limit: Option<u64>,
    used: AtomicU64,
    peak: AtomicU64,
    device_nanos: AtomicU64,
    time: Option<Mutex<TimeBucket>>,
    parent: Option<Arc<Account>>,
}

impl Account {
    /// A top-level account (a tenant) with optional quotas.
    pub fn new(
        label: impl Into<String>,
        memory_limit: Option<u64>,
        time_per_minute: Option<Duration>,
    ) -> Arc<Self> {
        Arc::new(Self {
            label: label.into(),
            memory_limit,
            used: AtomicU64::new(0),
            peak: AtomicU64::new(0),
            device_nanos: AtomicU64::new(0),
            time: time_per_minute.map(|per_minute| {
                Mutex::new(TimeBucket {
                    per_minute,
                    available_nanos: per_minute.as_nanos() as i128,
                    refilled_at: Instant::now(),
                })
            }),
            parent: None,
        })
    }

    /// An account nested in this one (an invocation in its tenant), with
    /// an optional quota of its own.
    pub fn child(
        self: &Arc<Self>,
        label: impl Into<String>,
        memory_limit: Option<u64>,
    ) -> Arc<Self> {
        Arc::new(Self {
            label: label.into(),
            memory_limit,
            used: AtomicU64::new(0),
            peak: AtomicU64::new(0),
            device_nanos: AtomicU64::new(0),
            time: None,
            parent: Some(Arc::clone(self)),
        })
    }

    /// The name used in errors.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Device bytes held by this account's live tensors (children included).
    pub fn used_bytes(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }

    /// The most device bytes this account has held at once.
    pub fn peak_bytes(&self) -> u64 {
        self.peak.load(Ordering::Acquire)
    }

    /// The memory quota, if any.
    pub fn memory_limit(&self) -> Option<u64> {
        self.memory_limit
    }

    /// Bytes this account (and every parent) can still reserve.
    pub fn available_bytes(&self) -> Option<u64> {
        let mine = self
            .memory_limit
            .map(|l| l.saturating_sub(self.used_bytes()));
        let parents = self.parent.as_ref().and_then(|p| p.available_bytes());
        match (mine, parents) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Device time charged to this account (children included).
    pub fn device_time(&self) -> Duration {
        Duration::from_nanos(self.device_nanos.load(Ordering::Acquire))
    }

    /// Reserve `bytes` here and in every parent, or nothing at all.
    pub(crate) fn reserve(&self, bytes: u64) -> Result<()> {
        let reserved = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                let next = used.checked_add(bytes)?;
                match self.memory_limit {
                    Some(limit) if next > limit => None,
                    _ => Some(next),
                }
            });
        let before = reserved.map_err(|used| {
            BridgeError::new(
                ErrorCode::QuotaExceeded,
                format!(
                    "{}: device memory quota of {} bytes exceeded ({used} in use, {bytes} requested)",
                    self.label,
                    self.memory_limit.unwrap_or(u64::MAX)
                ),
            )
        })?;
        if let Some(parent) = &self.parent
            && let Err(e) = parent.reserve(bytes)
        {
            self.used.fetch_sub(bytes, Ordering::AcqRel);
            return Err(e);
        }
        self.peak.fetch_max(before + bytes, Ordering::AcqRel);
        Ok(())
    }

    /// Return `bytes` reserved earlier, here and in every parent.
    pub(crate) fn release(&self, bytes: u64) {
        self.used.fetch_sub(bytes, Ordering::AcqRel);
        if let Some(parent) = &self.parent {
            parent.release(bytes);
        }
    }

    /// Fail with `quota-exceeded` if this account or a parent has spent its
    /// device time for now.
    pub(crate) fn check_time(&self) -> Result<()> {
        if let Some(bucket) = &self.time {
            let mut bucket = bucket
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            bucket.refill(Instant::now());
            if bucket.available_nanos <= 0 {
                let wait = Duration::from_nanos(
                    u64::try_from(
                        -bucket.available_nanos * 60_000_000_000
                            / bucket.per_minute.as_nanos().max(1) as i128,
                    )
                    .unwrap_or(u64::MAX),
                );
                return Err(BridgeError::new(
                    ErrorCode::QuotaExceeded,
                    format!(
                        "{}: device time quota of {} ms per minute used up; retry in {} ms",
                        self.label,
                        bucket.per_minute.as_millis(),
                        wait.as_millis().max(1)
                    ),
                ));
            }
        }
        match &self.parent {
            Some(parent) => parent.check_time(),
            None => Ok(()),
        }
    }

    /// Charge `spent` device time here and in every parent.
    pub(crate) fn charge_time(&self, spent: Duration) {
        let nanos = u64::try_from(spent.as_nanos()).unwrap_or(u64::MAX);
        self.device_nanos.fetch_add(nanos, Ordering::AcqRel);
        if let Some(bucket) = &self.time {
            let mut bucket = bucket
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            bucket.available_nanos -= i128::from(nanos);
        }
        if let Some(parent) = &self.parent {
            parent.charge_time(spent);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_nest_and_roll_back() {
        let tenant = Account::new("tenant", Some(100), None);
        let a = tenant.child("a", Some(80));
        let b = tenant.child("b", None);
        a.reserve(60).unwrap();
        assert_eq!(a.reserve(30).unwrap_err().code, ErrorCode::QuotaExceeded);
        assert_eq!(b.reserve(50).unwrap_err().code, ErrorCode::QuotaExceeded);
        assert_eq!(
            b.used_bytes(),
            0,
            "a refused reservation leaves nothing behind"
        );
        b.reserve(40).unwrap();
        assert_eq!(tenant.used_bytes(), 100);
        assert_eq!(tenant.available_bytes(), Some(0));
        a.release(60);
        b.release(40);
        assert_eq!(tenant.used_bytes(), 0);
        assert_eq!(tenant.peak_bytes(), 100);
    }

    #[test]
    fn time_quota_refuses_once_spent_and_counts_children() {
        let tenant = Account::new("tenant", None, Some(Duration::from_millis(10)));
        let call = tenant.child("call", None);
        call.check_time().unwrap();
        call.charge_time(Duration::from_millis(15));
        assert_eq!(tenant.device_time(), Duration::from_millis(15));
        let err = call.check_time().unwrap_err();
        assert_eq!(err.code, ErrorCode::QuotaExceeded);
        assert!(err.message.contains("retry in"), "{err}");
    }
}
