//! Generation parameters, token sampling and stop sequences, shared by the
//! decoder families: everything about `generate` that is not the model.

use std::ops::ControlFlow;

use rand::Rng;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

use crate::error::{BridgeError, Result};

/// The most tokens one `generate` call may produce, whatever the model's
/// context: a guest asking for `u32::MAX` gets a clear error instead of an
/// hours-long call.
pub const MAX_GENERATE_TOKENS: u32 = 8192;

/// The most stop sequences, and the longest one, a call may give.
const MAX_STOP_SEQUENCES: usize = 16;
const MAX_STOP_BYTES: usize = 256;

/// How to generate; mirrors the WIT record `generate-params`.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateParams {
    /// Generate at most this many tokens (1 to [`MAX_GENERATE_TOKENS`]).
    pub max_tokens: u32,
    /// Softmax temperature; 0 picks the most likely token (greedy).
    pub temperature: f32,
    /// Sample only among the `k` most likely tokens.
    pub top_k: Option<u32>,
    /// Sample only among the most likely tokens whose probabilities add up
    /// to at least `p` (nucleus sampling), in (0, 1].
    pub top_p: Option<f32>,
    /// Seed for reproducible sampling; without one, each call draws its own.
    pub seed: Option<u64>,
    /// Stop before the first occurrence of any of these; the stop string is
    /// not part of the output.
    pub stop: Vec<String>,
}

impl Default for GenerateParams {
    fn default() -> Self {
        Self {
            max_tokens: 64,
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: None,
            stop: Vec::new(),
        }
    }
}

impl GenerateParams {
    /// Check every field, with an `invalid-argument` error naming the
    /// first bad one.
    pub fn validate(&self) -> Result<()> {
        if self.max_tokens == 0 || self.max_tokens > MAX_GENERATE_TOKENS {
            return Err(BridgeError::invalid(format!(
                "generate: max-tokens must be between 1 and {MAX_GENERATE_TOKENS}, got {}",
                self.max_tokens
            )));
        }
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(BridgeError::invalid(format!(
                "generate: temperature must be a finite number >= 0, got {}",
                self.temperature
            )));
        }
        if self.top_k == Some(0) {
            return Err(BridgeError::invalid("generate: top-k must be at least 1"));
        }
        if let Some(p) = self.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            return Err(BridgeError::invalid(format!(
                "generate: top-p must be in (0, 1], got {p}"
            )));
        }
        if self.stop.len() > MAX_STOP_SEQUENCES {
            return Err(BridgeError::invalid(format!(
                "generate: at most {MAX_STOP_SEQUENCES} stop sequences, got {}",
                self.stop.len()
            )));
        }
        for stop in &self.stop {
            if stop.is_empty() || stop.len() > MAX_STOP_BYTES {
                return Err(BridgeError::invalid(format!(
                    "generate: a stop sequence must hold 1 to {MAX_STOP_BYTES} bytes, got {}",
                    stop.len()
                )));
            }
        }
        Ok(())
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FinishReason {
    /// The model produced its end-of-sequence token.
    Eos,
    /// A stop sequence appeared (and was cut from the text).
    Stop,
    /// `max_tokens` were generated, or the model's context is full.
    Length,
    /// The streaming callback asked to stop.
    Cancelled,
}

/// What `generate` produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// The generated text, without the prompt and without a stop sequence.
    pub text: String,
    /// The generated token ids (the end-of-sequence token excluded).
    pub tokens: Vec<u32>,
    /// Why it ended.
    pub finish_reason: FinishReason,
}

/// Picks the next token from a row of logits.
pub(crate) struct Sampler {
    temperature: f32,
    top_k: Option<usize>,
    top_p: Option<f32>,
    rng: ChaCha20Rng,
}

impl Sampler {
    pub(crate) fn new(params: &GenerateParams) -> Self {
        // Without a seed each call samples differently: the clock and a
        // process-wide counter are enough (this is not cryptography, and
        // rand's OS entropy source is not among the crate's features).
        let seed = params.seed.unwrap_or_else(|| {
            use std::sync::atomic::{AtomicU64, Ordering};
            static CALLS: AtomicU64 = AtomicU64::new(0);
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            nanos
                ^ CALLS
                    .fetch_add(1, Ordering::Relaxed)
                    .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        });
        Self {
            temperature: params.temperature,
            top_k: params.top_k.map(|k| k as usize),
            top_p: params.top_p,
            rng: ChaCha20Rng::seed_from_u64(seed),
        }
    }

    /// The next token id. Greedy picks the first maximum; sampling keeps the
    /// top-k, then the top-p nucleus, of the tempered softmax.
    /// Whether [`sample`](Self::sample) takes the largest logit (the first
    /// of equals), which the device can find without reading the logits
    /// back.
    pub(crate) fn greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// The error for logits that hold a NaN (or nothing).
    pub(crate) fn bad_logits() -> BridgeError {
        BridgeError::backend("generate: the model produced empty or NaN logits")
    }

    pub(crate) fn sample(&mut self, logits: &[f32]) -> Result<u32> {
        if logits.is_empty() || logits.iter().any(|v| v.is_nan()) {
            return Err(Self::bad_logits());
        }
        if self.temperature == 0.0 {
            let mut best = 0;
            for (i, &v) in logits.iter().enumerate() {
                if v > logits[best] {
                    best = i;
                }
            }
            return Ok(best as u32);
        }
        let mut order: Vec<u32> = (0..logits.len() as u32).collect();
        // Descending by logit, ties by id, so a seed always gives the same
        // token.
        order.sort_unstable_by(|&a, &b| {
            logits[b as usize]
                .total_cmp(&logits[a as usize])
                .then(a.cmp(&b))
        });
        if let Some(k) = self.top_k {
            order.truncate(k.max(1));
        }
        let max = f64::from(logits[order[0] as usize]);
        let t = f64::from(self.temperature);
        let mut probs: Vec<f64> = order
            .iter()
            .map(|&i| ((f64::from(logits[i as usize]) - max) / t).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if let Some(top_p) = self.top_p {
            let mut cumulative = 0.0;
            let mut keep = probs.len();
            for (i, p) in probs.iter().enumerate() {
                cumulative += p;
                if cumulative >= f64::from(top_p) {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
        }
        let total: f64 = probs.iter().sum();
        let mut draw = self.rng.random::<f64>() * total;
        for (i, p) in probs.iter().enumerate() {
            draw -= p;
            if draw < 0.0 {
                return Ok(order[i]);
            }
        }
        Ok(order[probs.len() - 1])
    }
}

/// Turns the decoded text so far into streamed pieces, holding back what
/// could still become a stop sequence.
pub(crate) struct StopScanner<'a> {
    stop: &'a [String],
    /// Bytes of the text already handed to the callback.
    emitted: usize,
}

/// What the scanner decided about the text so far.
pub(crate) enum Scan {
    /// Keep generating.
    Continue,
    /// A stop sequence starts at this byte: the text ends there.
    Stopped(usize),
    /// The callback asked to stop.
    Cancelled,
}

impl<'a> StopScanner<'a> {
    pub(crate) fn new(stop: &'a [String]) -> Self {
        Self { stop, emitted: 0 }
    }

    /// Look at the whole text generated so far (`complete` once no more
    /// text will follow), and stream what is settled.
    pub(crate) fn scan(
        &mut self,
        text: &str,
        complete: bool,
        on_piece: &mut (dyn FnMut(&str) -> ControlFlow<()> + Send),
    ) -> Scan {
        // A stop sequence may begin in text that was held back, never in
        // text already streamed (that would have been held back).
        let from = self.emitted;
        let found = self
            .stop
            .iter()
            .filter_map(|s| text.get(from..)?.find(s.as_str()).map(|i| from + i))
            .min();
        let (end, result) = match found {
            Some(at) => (at, Scan::Stopped(at)),
            None if complete => (text.len(), Scan::Continue),
            None => (settled_end(text, self.stop), Scan::Continue),
        };
        if end > self.emitted
            && let Some(piece) = text.get(self.emitted..end)
        {
            self.emitted = end;
            if on_piece(piece).is_break() {
                return match result {
                    Scan::Stopped(at) => Scan::Stopped(at),
                    _ => Scan::Cancelled,
                };
            }
        }
        result
    }

    /// Bytes streamed so far.
    pub(crate) fn emitted(&self) -> usize {
        self.emitted
    }
}

/// The end of the text that cannot be the start of a stop sequence: the
/// longest suffix that is a proper prefix of one is held back. Text ending
/// in an incomplete UTF-8 sequence (decoded as U+FFFD) is held back too.
fn settled_end(text: &str, stop: &[String]) -> usize {
    let mut end = text.len();
    for s in stop {
        for len in (1..s.len()).rev() {
            if s.is_char_boundary(len) && text.ends_with(&s[..len]) {
                end = end.min(text.len() - len);
                break;
            }
        }
    }
    if text[..end].ends_with('\u{FFFD}') {
        end -= '\u{FFFD}'.len_utf8();
    }
    end
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(stop: &[&str], steps: &[&str]) -> (Vec<String>, Option<usize>) {
        let stop: Vec<String> = stop.iter().map(|s| s.to_string()).collect();
        let mut scanner = StopScanner::new(&stop);
        let mut pieces = Vec::new();
        for (i, text) in steps.iter().enumerate() {
            let complete = i + 1 == steps.len();
            let mut on = |p: &str| {
                pieces.push(p.to_owned());
                ControlFlow::Continue(())
            };
            if let Scan::Stopped(at) = scanner.scan(text, complete, &mut on) {
                return (pieces, Some(at));
            }
        }
        (pieces, None)
    }

    #[test]
    fn a_stop_sequence_spanning_pieces_is_held_back_and_cut() {
        let (pieces, at) = collect(&["END"], &["ab", "abE", "abEN", "abENDx"]);
        assert_eq!(pieces, ["ab"]);
        assert_eq!(at, Some(2));
        let (pieces, at) = collect(&["END"], &["ab", "abE", "abEx"]);
        assert_eq!(pieces.concat(), "abEx");
        assert_eq!(at, None);
    }

    #[test]
    fn an_incomplete_utf8_character_is_held_back_until_complete() {
        let (pieces, at) = collect(&[], &["ab", "ab\u{FFFD}", "ab\u{e9}c"]);
        assert_eq!(pieces, ["ab", "\u{e9}c"]);
        assert_eq!(at, None);
    }

    #[test]
    fn sampling_is_seeded_and_respects_top_k() {
        let logits = [0.0, 1.0, 2.0, 3.0];
        let params = GenerateParams {
            temperature: 1.0,
            top_k: Some(2),
            seed: Some(7),
            ..GenerateParams::default()
        };
        let draw = |params: &GenerateParams| {
            let mut s = Sampler::new(params);
            (0..50)
                .map(|_| s.sample(&logits).unwrap())
                .collect::<Vec<_>>()
        };
        let a = draw(&params);
        assert_eq!(a, draw(&params));
        assert!(a.iter().all(|&t| t == 2 || t == 3), "{a:?}");
        assert!(a.contains(&2) && a.contains(&3), "{a:?}");
    }
}
