//! A device's run queue: one FIFO lane per tenant, served in turn by
//! deficit round robin.
//!
//! One FIFO per device let a tenant with thousands of queued ops delay
//! every other tenant's next op behind all of them. Here each tenant (top
//! level [`crate::Account`]) has a lane; lanes with work take turns, and a
//! turn runs jobs until their estimated cost uses up the lane's credit
//! (one [`QUANTUM_NANOS`] a turn, saved up while it is not enough), so
//! tenants get about equal device time however many ops each has queued,
//! and a tenant with one op waits for about one turn of each other busy
//! tenant rather than for their backlogs.
//!
//! Jobs keep their order within a lane. Across lanes a job may read a
//! tensor another lane's job computes (a resident model's weights, loaded
//! on the registry's account): such a job waits, and its lane passes its
//! turn, until the producer has run. That never deadlocks: the oldest
//! queued job's producers were queued before it, so they have all run, and
//! the oldest job heads its lane and is ready. Should a job wait on
//! something that never comes (a bug), the oldest job runs anyway when no
//! lane is ready, and fails on its missing input instead of stalling the
//! device.

use std::collections::{HashMap, VecDeque};

/// Credit a lane gets each turn, in estimated nanoseconds of device time:
/// small enough that another tenant waits at most about this long per busy
/// tenant, large enough that a turn runs several small ops in a row.
pub(super) const QUANTUM_NANOS: u64 = 200_000;

/// The least a job counts as, whatever its estimate: reads, uploads and
/// ops of unknown cost still take turns rather than run free.
pub(super) const MIN_COST_NANOS: u64 = 1_000;

/// The most a job counts as: past this a lane would save credit for many
/// turns before its job runs, while each turn still costs a pass over the
/// lanes. The job runs after a few turns of saving and overruns its share
/// once, which the tenant's time quota charges anyway.
const MAX_COST_NANOS: u64 = 16 * QUANTUM_NANOS;

struct Queued<T> {
    item: T,
    cost: u64,
    /// Submission order across lanes.
    seq: u64,
}

struct Lane<T> {
    jobs: VecDeque<Queued<T>>,
    /// Credit saved from earlier turns.
    deficit: u64,
}

/// Lanes of jobs keyed by tenant, and whose turn it is.
pub(super) struct Lanes<T> {
    lanes: HashMap<u64, Lane<T>>,
    /// Lanes with jobs, the one whose turn it is first.
    turns: VecDeque<u64>,
    /// Whether the first lane in `turns` has had this turn's credit.
    credited: bool,
    next_seq: u64,
    len: usize,
}

impl<T> Default for Lanes<T> {
    fn default() -> Self {
        Self {
            lanes: HashMap::new(),
            turns: VecDeque::new(),
            credited: false,
            next_seq: 0,
            len: 0,
        }
    }
}

impl<T> Lanes<T> {
    /// Jobs queued in all lanes.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.len
    }

    /// Queue `item`, estimated at `cost` nanoseconds, at the back of
    /// `lane`.
    pub(super) fn push(&mut self, lane: u64, item: T, cost: u64) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let entry = self.lanes.entry(lane).or_insert_with(|| Lane {
            jobs: VecDeque::new(),
            deficit: 0,
        });
        if entry.jobs.is_empty() {
            // A lane that was idle joins the end of the round with no
            // saved credit, as deficit round robin has it.
            entry.deficit = 0;
            self.turns.push_back(lane);
        }
        entry.jobs.push_back(Queued {
            item,
            cost: cost.clamp(MIN_COST_NANOS, MAX_COST_NANOS),
            seq,
        });
        self.len += 1;
    }

    /// The next job to run and its lane: the first of the lane whose turn
    /// it is, if it is `ready` and the lane's credit covers it; `None` only
    /// when nothing is queued.
    pub(super) fn pop(&mut self, ready: impl Fn(&T) -> bool) -> Option<(u64, T)> {
        // Lanes passed over in a row because their first job waits on
        // another lane; a whole round of them means none is ready.
        let mut waiting = 0;
        loop {
            let key = *self.turns.front()?;
            let Some(lane) = self.lanes.get_mut(&key) else {
                // Not reachable: a lane leaves `turns` when it empties.
                self.turns.pop_front();
                self.credited = false;
                continue;
            };
            let Some(head) = lane.jobs.front() else {
                self.lanes.remove(&key);
                self.turns.pop_front();
                self.credited = false;
                continue;
            };
            if !ready(&head.item) {
                waiting += 1;
                if waiting >= self.turns.len() {
                    return self.pop_oldest();
                }
                self.next_turn();
                continue;
            }
            waiting = 0;
            if !self.credited {
                lane.deficit += QUANTUM_NANOS;
                self.credited = true;
            }
            if head.cost > lane.deficit {
                self.next_turn();
                continue;
            }
            lane.deficit -= head.cost;
            return self.take_front(key);
        }
    }

    /// End the current lane's turn: it goes to the back of the round.
    fn next_turn(&mut self) {
        self.turns.rotate_left(1);
        self.credited = false;
    }

    /// Take the first job of `key`, which is the lane whose turn it is.
    fn take_front(&mut self, key: u64) -> Option<(u64, T)> {
        let lane = self.lanes.get_mut(&key)?;
        let job = lane.jobs.pop_front()?;
        self.len -= 1;
        if lane.jobs.is_empty() {
            self.lanes.remove(&key);
            if let Some(at) = self.turns.iter().position(|&k| k == key) {
                self.turns.remove(at);
            }
            self.credited = false;
        }
        Some((key, job.item))
    }

    /// The oldest job of any lane, ready or not (see the module docs).
    fn pop_oldest(&mut self) -> Option<(u64, T)> {
        let key = self
            .lanes
            .iter()
            .filter_map(|(&key, lane)| lane.jobs.front().map(|job| (job.seq, key)))
            .min()
            .map(|(_, key)| key)?;
        // Its lane takes this turn.
        if let Some(at) = self.turns.iter().position(|&k| k == key) {
            self.turns.rotate_left(at);
        }
        self.credited = true;
        self.take_front(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(lanes: &mut Lanes<(u64, u32)>) -> Vec<(u64, u32)> {
        std::iter::from_fn(|| lanes.pop(|_| true).map(|(_, item)| item)).collect()
    }

    #[test]
    fn lanes_take_turns_whatever_their_backlog() {
        let mut lanes = Lanes::default();
        for i in 0..1000 {
            lanes.push(1, (1, i), QUANTUM_NANOS / 4);
        }
        lanes.push(2, (2, 0), QUANTUM_NANOS / 4);
        let order = drain(&mut lanes);
        let position = order.iter().position(|&(lane, _)| lane == 2);
        // Lane 1's first turn (four jobs of a quarter quantum each), then
        // lane 2's only job.
        assert_eq!(position, Some(4), "{:?}", &order[..8]);
        // Lane 1's jobs kept their order.
        let ones: Vec<u32> = order.iter().filter(|j| j.0 == 1).map(|j| j.1).collect();
        assert_eq!(ones, (0..1000).collect::<Vec<_>>());
        assert_eq!(lanes.len(), 0);
    }

    #[test]
    fn turns_share_estimated_time_not_job_counts() {
        let mut lanes = Lanes::default();
        // Lane 1: big jobs of two quanta; lane 2: small ones of a tenth.
        for i in 0..20 {
            lanes.push(1, (1, i), 2 * QUANTUM_NANOS);
        }
        for i in 0..200 {
            lanes.push(2, (2, i), QUANTUM_NANOS / 10);
        }
        let first: Vec<(u64, u32)> = std::iter::from_fn(|| lanes.pop(|_| true).map(|j| j.1))
            .take(110)
            .collect();
        let cost =
            |lane: u64, each: u64| first.iter().filter(|j| j.0 == lane).count() as u64 * each;
        let (big, small) = (cost(1, 2 * QUANTUM_NANOS), cost(2, QUANTUM_NANOS / 10));
        // Equal shares of the time, give or take one big job.
        assert!(
            big.abs_diff(small) <= 2 * QUANTUM_NANOS,
            "lane 1 got {big} ns, lane 2 {small} ns"
        );
    }

    #[test]
    fn a_job_waits_for_its_input_from_another_lane() {
        let mut lanes: Lanes<&str> = Lanes::default();
        lanes.push(1, "weights", MIN_COST_NANOS);
        lanes.push(2, "uses weights", MIN_COST_NANOS);
        lanes.push(2, "more", MIN_COST_NANOS);
        // Lane 2 comes first but its job waits on lane 1's.
        lanes.next_turn();
        let mut done = Vec::new();
        loop {
            let next = lanes.pop(|job| *job != "uses weights" || done.contains(&"weights"));
            let Some((_, job)) = next else { break };
            done.push(job);
        }
        assert_eq!(done, ["weights", "uses weights", "more"]);
    }

    #[test]
    fn when_nothing_is_ready_the_oldest_job_runs() {
        let mut lanes: Lanes<u32> = Lanes::default();
        lanes.push(7, 1, MIN_COST_NANOS);
        lanes.push(3, 2, MIN_COST_NANOS);
        lanes.next_turn();
        assert_eq!(lanes.pop(|_| false), Some((7, 1)));
        assert_eq!(lanes.pop(|_| false), Some((3, 2)));
        assert_eq!(lanes.pop(|_| false), None);
    }
}
