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

/// The device-time share a tenant should get when its policy names none:
/// 15 000 ms per minute, a quarter of one device.
///
/// The whole device (60 000 ms) let one tenant keep a device busy for good,
/// queueing behind it everyone else's work; fair queueing now takes turns
/// between tenants, but a quota of the whole device would still let one
/// tenant's sustained load take every turn nobody else claims and burst a
/// full minute of work at once. A quarter leaves three quarters of each
/// device to others under any one tenant's sustained load, while its burst
/// (the bucket holds a full quota) still covers seconds of work: loading
/// and warming a model, or a batch of long generations. Hosts give tenants
/// that need more a larger `time_ms_per_minute` in their policy.
pub const DEFAULT_TIME_PER_MINUTE: Duration = Duration::from_millis(15_000);

/// Numbers accounts by creation, so a device can tell tenants apart by a
/// key that is never reused (an address would be, once an account is gone).
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

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
    /// How long until `needed` nanoseconds are available, at the refill
    /// rate.
    fn wait_for(&self, needed: i128) -> Duration {
        let missing = needed.saturating_sub(self.available_nanos).max(0);
        let nanos =
            missing.saturating_mul(60_000_000_000) / self.per_minute.as_nanos().max(1) as i128;
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

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
    id: u64,
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
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
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
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            label: label.into(),
            memory_limit,
            used: AtomicU64::new(0),
            peak: AtomicU64::new(0),
            device_nanos: AtomicU64::new(0),
            time: None,
            parent: Some(Arc::clone(self)),
        })
    }

    /// A key naming this account's top-level account (its tenant), unique
    /// for the life of the process: devices queue work per tenant by it.
    pub(crate) fn tenant_key(&self) -> u64 {
        match &self.parent {
            Some(parent) => parent.tenant_key(),
            None => self.id,
        }
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

    /// How much of the device time quota is in use now: the quota's bucket
    /// holds a minute's allowance and refills at that rate, so this is the
    /// device time of roughly the last minute. `None` without a quota.
    pub fn time_quota_in_use(&self) -> Option<(Duration, Duration)> {
        let bucket = self.time.as_ref()?;
        let mut bucket = bucket
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        bucket.refill(Instant::now());
        let capacity = bucket.per_minute.as_nanos() as i128;
        let used = (capacity - bucket.available_nanos).clamp(0, capacity);
        Some((
            Duration::from_nanos(u64::try_from(used).unwrap_or(u64::MAX)),
            bucket.per_minute,
        ))
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
        // Nothing is set aside: any time left lets the work start.
        self.take_time(0)
    }

    /// Set aside `estimate` of device time for an op about to be queued,
    /// here and in every parent, or nothing at all: `quota-exceeded` unless
    /// every budget up the chain has time left and the estimate fits in
    /// it. Reserving at submission, not charging after the run, keeps a
    /// tenant from queueing far more work than its budget: each queued
    /// op's estimate is already spent. Settle the reservation with the
    /// time the op took ([`TimeReservation::settle`]).
    pub(crate) fn reserve_time(self: &Arc<Self>, estimate: Duration) -> Result<TimeReservation> {
        let nanos = i128::try_from(estimate.as_nanos()).unwrap_or(i128::MAX);
        self.take_time(nanos)?;
        Ok(TimeReservation {
            account: Arc::clone(self),
            reserved: estimate,
            settled: false,
        })
    }

    fn take_time(&self, nanos: i128) -> Result<()> {
        if let Some(bucket) = &self.time {
            let mut bucket = bucket
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            bucket.refill(Instant::now());
            let capacity = bucket.per_minute.as_nanos() as i128;
            if nanos > capacity {
                return Err(BridgeError::new(
                    ErrorCode::QuotaExceeded,
                    format!(
                        "{}: an op estimated at {} ms of device time does not fit the device time quota of {} ms per minute",
                        self.label,
                        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX)).as_millis(),
                        bucket.per_minute.as_millis(),
                    ),
                ));
            }
            if bucket.available_nanos <= 0 || bucket.available_nanos < nanos {
                // Nothing left, or not enough for this op: it would overrun
                // the budget, so it does not start (as if it were spent).
                let wait = bucket.wait_for(nanos.max(1));
                return Err(BridgeError::new(
                    ErrorCode::QuotaExceeded,
                    format!(
                        "{}: device time quota of {} ms per minute used up (this op needs about {} ms); retry in {} ms",
                        self.label,
                        bucket.per_minute.as_millis(),
                        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX)).as_millis(),
                        wait.as_millis().max(1)
                    ),
                ));
            }
            bucket.available_nanos -= nanos;
        }
        if let Some(parent) = &self.parent
            && let Err(e) = parent.take_time(nanos)
        {
            self.return_time(nanos);
            return Err(e);
        }
        Ok(())
    }

    /// Put `nanos` taken by [`Account::take_time`] back, here only.
    fn return_time(&self, nanos: i128) {
        if let Some(bucket) = &self.time {
            let mut bucket = bucket
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            bucket.available_nanos += nanos;
        }
    }

    /// Charge `spent` device time here and in every parent.
    pub(crate) fn charge_time(&self, spent: Duration) {
        self.settle_time(Duration::ZERO, spent);
    }

    /// Charge `spent` for work that had `reserved` set aside, here and in
    /// every parent.
    fn settle_time(&self, reserved: Duration, spent: Duration) {
        let nanos = u64::try_from(spent.as_nanos()).unwrap_or(u64::MAX);
        self.device_nanos.fetch_add(nanos, Ordering::AcqRel);
        if let Some(bucket) = &self.time {
            let mut bucket = bucket
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let reserved = i128::try_from(reserved.as_nanos()).unwrap_or(i128::MAX);
            bucket.available_nanos += reserved - i128::from(nanos);
        }
        if let Some(parent) = &self.parent {
            parent.settle_time(reserved, spent);
        }
    }
}

/// Device time set aside for one queued op by [`Account::reserve_time`].
/// Settled with the time the op took; dropped unsettled (the op never ran:
/// the device stopped, or the op was refused after reserving), it gives
/// the time back.
#[derive(Debug)]
pub(crate) struct TimeReservation {
    account: Arc<Account>,
    reserved: Duration,
    settled: bool,
}

impl TimeReservation {
    /// The account the time is reserved in.
    pub(crate) fn account(&self) -> &Arc<Account> {
        &self.account
    }

    /// Charge `spent` in place of the reservation.
    pub(crate) fn settle(mut self, spent: Duration) {
        self.settled = true;
        self.account.settle_time(self.reserved, spent);
    }
}

impl Drop for TimeReservation {
    fn drop(&mut self) {
        if !self.settled {
            self.account.settle_time(self.reserved, Duration::ZERO);
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

    #[test]
    fn the_quota_in_use_is_what_the_bucket_lacks() {
        assert_eq!(Account::new("free", None, None).time_quota_in_use(), None);
        // A minute's allowance of 60 s refills 1 ms per ms: slow next to
        // the charges, so the figures are the charges to within the test's
        // own run time.
        let tenant = Account::new("tenant", None, Some(Duration::from_secs(60)));
        let (used, quota) = tenant.time_quota_in_use().unwrap();
        assert_eq!((used, quota), (Duration::ZERO, Duration::from_secs(60)));
        tenant
            .child("call", None)
            .charge_time(Duration::from_secs(20));
        let (used, _) = tenant.time_quota_in_use().unwrap();
        assert!(
            used <= Duration::from_secs(20) && used > Duration::from_secs(19),
            "{used:?}"
        );
        // Overspent, it reports the whole quota.
        tenant.charge_time(Duration::from_secs(100));
        assert_eq!(
            tenant.time_quota_in_use().unwrap().0,
            Duration::from_secs(60)
        );
    }

    #[test]
    fn an_op_that_cannot_fit_the_remaining_time_is_refused_before_it_runs() {
        let tenant = Account::new("tenant", None, Some(Duration::from_millis(10)));
        let call = tenant.child("call", None);
        // Bigger than the whole quota: never fits, and says so.
        let err = call.reserve_time(Duration::from_millis(11)).unwrap_err();
        assert_eq!(err.code, ErrorCode::QuotaExceeded);
        assert!(err.message.contains("does not fit"), "{err}");
        // Reservations add up: two of 4 ms fit, a third does not, though
        // nothing has been charged yet.
        let first = call.reserve_time(Duration::from_millis(4)).unwrap();
        let second = call.reserve_time(Duration::from_millis(4)).unwrap();
        let err = call.reserve_time(Duration::from_millis(4)).unwrap_err();
        assert_eq!(err.code, ErrorCode::QuotaExceeded);
        assert!(err.message.contains("retry in"), "{err}");
        assert_eq!(tenant.device_time(), Duration::ZERO);
        // Settling charges what was spent and returns the rest; an unsettled
        // reservation gives all of it back.
        first.settle(Duration::from_millis(1));
        drop(second);
        assert_eq!(tenant.device_time(), Duration::from_millis(1));
        call.reserve_time(Duration::from_millis(8))
            .unwrap()
            .settle(Duration::ZERO);
    }

    #[test]
    fn a_tenant_key_names_the_top_level_account() {
        let tenant = Account::new("tenant", None, None);
        let other = Account::new("tenant", None, None);
        let call = tenant.child("call", None).child("nested", None);
        assert_eq!(call.tenant_key(), tenant.tenant_key());
        assert_ne!(other.tenant_key(), tenant.tenant_key());
    }
}
