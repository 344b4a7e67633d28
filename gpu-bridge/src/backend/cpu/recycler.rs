//! Freed buffers kept for the next allocation of about their size.
//!
//! Every op allocates its output. From the allocator a large one is fresh
//! memory: mapped and zeroed a page at a time on first touch, which cost
//! more than the kernel itself for GELU over a batch's feed-forward
//! activations (2 MB, 512 page faults). Reused memory is already mapped.
//! Buffers are grouped in size classes (eight per power of two, so at most
//! an eighth is slack) and the pool holds at most a fixed number of bytes;
//! past that a freed buffer goes back to the allocator.
//!
//! A recycled buffer is zeroed before it is handed out again: it held an
//! earlier tensor, possibly another tenant's, and a kernel that leaves part
//! of its output alone, or a read of a buffer's padding, would show it.
//! Zeroing memory that is already mapped costs a fraction of the page
//! faults recycling saves; uploads, which overwrite every byte, skip it
//! ([`Recycler::take_for_overwrite`]). Measured on the 2-core machine
//! (best of five, under load): about 45 µs per 2 MB (600-1000 µs per 16
//! MB), which is 5-6 % of an alloc plus GELU over those bytes but 1.3-1.6×
//! an alloc plus ReLU, whose kernel is itself one memory pass.

use std::collections::HashMap;
use std::sync::Mutex;

/// Buffers below this many words come from the allocator every time: small
/// blocks are cheap there and already recycled by it.
const MIN_WORDS: usize = 16 * 1024;

/// Size classes per power of two.
const CLASSES_PER_DOUBLING_LOG2: u32 = 3;

/// Freed buffers by size class, up to a byte limit.
#[derive(Debug)]
pub(super) struct Recycler {
    max_bytes: usize,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Every buffer under key `class` has a capacity of exactly `class`
    /// words.
    free: HashMap<usize, Vec<Vec<u32>>>,
    bytes: usize,
}

/// The size class for `words`: `words` rounded up to the next of eight
/// steps between consecutive powers of two, or `None` below [`MIN_WORDS`].
fn class_of(words: usize) -> Option<usize> {
    if words < MIN_WORDS {
        return None;
    }
    let step = 1usize << (words.ilog2() - CLASSES_PER_DOUBLING_LOG2);
    words.checked_next_multiple_of(step)
}

impl Recycler {
    /// A pool holding at most `max_bytes` of freed buffers.
    pub(super) fn new(max_bytes: usize) -> Self {
        Self {
            max_bytes,
            state: Mutex::default(),
        }
    }

    /// A buffer of `words` zeroed words: a recycled one when its class has
    /// one, else a fresh one. `None` when the allocator refuses.
    pub(super) fn take(&self, words: usize) -> Option<Vec<u32>> {
        let (mut buffer, recycled) = self.take_any(words)?;
        if recycled {
            // Fresh memory is zero already.
            buffer.fill(0);
        }
        Some(buffer)
    }

    /// A buffer of `words` words holding anything (an earlier tensor's
    /// bytes), for a caller that overwrites every word before anything
    /// reads it. `None` when the allocator refuses.
    pub(super) fn take_for_overwrite(&self, words: usize) -> Option<Vec<u32>> {
        self.take_any(words).map(|(buffer, _)| buffer)
    }

    /// A buffer of `words` words, and whether it was recycled (its words
    /// are stale) rather than fresh (zeroed).
    fn take_any(&self, words: usize) -> Option<(Vec<u32>, bool)> {
        let Some(class) = class_of(words) else {
            return zeroed(words, words).map(|b| (b, false));
        };
        let recycled = self.state.lock().ok().and_then(|mut state| {
            let buffer = state.free.get_mut(&class)?.pop()?;
            state.bytes -= class * 4;
            Some(buffer)
        });
        match recycled {
            Some(mut buffer) => {
                // Words never initialised are zeroed here; the rest keep
                // what they held.
                buffer.resize(words, 0);
                Some((buffer, true))
            }
            None => zeroed(words, class).map(|b| (b, false)),
        }
    }

    /// Keep `buffer` for reuse if it came from [`Recycler::take`]'s classes
    /// and the pool has room; otherwise free it.
    pub(super) fn give(&self, buffer: Vec<u32>) {
        let capacity = buffer.capacity();
        if class_of(capacity) != Some(capacity) {
            return;
        }
        if let Ok(mut state) = self.state.lock()
            && state.bytes + capacity * 4 <= self.max_bytes
        {
            state.bytes += capacity * 4;
            state.free.entry(capacity).or_default().push(buffer);
        }
    }

    /// Bytes held for reuse.
    #[cfg(test)]
    fn held_bytes(&self) -> usize {
        self.state.lock().map_or(0, |state| state.bytes)
    }
}

/// `words` zeroed words with room for `capacity`.
fn zeroed(words: usize, capacity: usize) -> Option<Vec<u32>> {
    let mut buffer = Vec::new();
    buffer.try_reserve_exact(capacity).ok()?;
    buffer.resize(words, 0);
    Some(buffer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_round_up_by_at_most_an_eighth() {
        assert_eq!(class_of(MIN_WORDS - 1), None);
        assert_eq!(class_of(MIN_WORDS), Some(MIN_WORDS));
        for words in [MIN_WORDS + 1, 100_000, 1 << 20, (1 << 20) + 1, 3_000_017] {
            let class = class_of(words).unwrap_or(0);
            assert!(
                class >= words && class - words <= words / 8,
                "{words} -> {class}"
            );
            // A class is its own class, so `give` recognises it.
            assert_eq!(class_of(class), Some(class));
        }
    }

    #[test]
    fn a_freed_buffer_is_reused_for_its_class() {
        let recycler = Recycler::new(64 << 20);
        let mut first = recycler.take(100_000).unwrap_or_default();
        assert_eq!(first.len(), 100_000);
        first[0] = 7;
        let address = first.as_ptr();
        recycler.give(first);
        assert!(recycler.held_bytes() > 0);
        // A slightly smaller request of the same class gets the same memory.
        let second = recycler.take(99_000).unwrap_or_default();
        assert_eq!(second.len(), 99_000);
        assert_eq!(second.as_ptr(), address);
        assert_eq!(recycler.held_bytes(), 0);
        // A larger one of the same class gets its new words zeroed.
        recycler.give(second);
        let third = recycler.take(100_500).unwrap_or_default();
        assert_eq!(third.as_ptr(), address);
        assert!(third[99_000..].iter().all(|&w| w == 0));
    }

    #[test]
    fn a_recycled_buffer_is_zeroed_unless_it_will_be_overwritten() {
        let recycler = Recycler::new(64 << 20);
        let mut first = recycler.take(100_000).unwrap_or_default();
        first.fill(0xDEAD_BEEF);
        let address = first.as_ptr();
        recycler.give(first);
        let second = recycler.take(100_000).unwrap_or_default();
        assert_eq!(second.as_ptr(), address, "recycled");
        assert!(second.iter().all(|&w| w == 0), "an earlier owner's words");
        let mut second = second;
        second.fill(0xDEAD_BEEF);
        recycler.give(second);
        // For an upload: the same memory, not zeroed (it is overwritten).
        let third = recycler.take_for_overwrite(100_000).unwrap_or_default();
        assert_eq!(third.as_ptr(), address);
        assert_eq!(third[0], 0xDEAD_BEEF);
    }

    #[test]
    fn the_pool_stays_under_its_limit() {
        let recycler = Recycler::new(MIN_WORDS * 4 * 3);
        let buffers: Vec<_> = (0..5)
            .map(|_| recycler.take(MIN_WORDS).unwrap_or_default())
            .collect();
        for buffer in buffers {
            recycler.give(buffer);
        }
        assert_eq!(recycler.held_bytes(), MIN_WORDS * 4 * 3);
        // Small and foreign buffers are not kept.
        recycler.give(vec![0; 10]);
        recycler.give(Vec::with_capacity(MIN_WORDS + 3));
        assert_eq!(recycler.held_bytes(), MIN_WORDS * 4 * 3);
    }
}
