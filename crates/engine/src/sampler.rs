//! Token sampling: greedy, temperature, top-k, top-p and min-p, with ds4's exact
//! algorithm (../shared/spec/chat.md §8) and its own seeded RNG.
//!
//! The RNG is a hand-written xorshift64* (the one ds4 uses), not a library
//! generator, so a `--seed` reproduces the same tokens across runs, platforms
//! and versions of this crate: nothing outside this file can change the stream.
//! Sampling is O(vocab) per token: the common path (no top-p) walks the vocab
//! in order; the top-p / top-k path sorts only a partially selected head of the
//! distribution (`select_nth_unstable`), growing it only when top-p needs more.

use crate::error::{EngineError, Result};

/// ds4 defaults for every API and the CLI (chat.md §8).
pub const DEFAULT_TEMPERATURE: f32 = 1.0;
pub const DEFAULT_TOP_P: f32 = 1.0;
pub const DEFAULT_MIN_P: f32 = 0.05;
/// Upper bound of top-k (ds4 caps it at 1024).
pub const MAX_TOP_K: usize = 1024;

/// Sampling knobs. `temperature <= 0` means greedy (first maximal logit).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplerConfig {
    pub temperature: f32,
    /// 0 = off; values above 1024 are clamped.
    pub top_k: usize,
    /// outside (0, 1] means 1 (off).
    pub top_p: f32,
    /// relative to the most likely token; negative means 0 (off).
    pub min_p: f32,
    pub seed: u64,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig { temperature: DEFAULT_TEMPERATURE, top_k: 0, top_p: DEFAULT_TOP_P, min_p: DEFAULT_MIN_P, seed: 0 }
    }
}

impl SamplerConfig {
    pub fn greedy() -> Self {
        SamplerConfig { temperature: 0.0, ..Default::default() }
    }
    pub fn is_greedy(&self) -> bool {
        !(self.temperature > 0.0)
    }
}

/// xorshift64* with ds4's constants; `uniform` gives 24-bit floats in [0, 1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        // state 0 is a fixed point of xorshift: replace it as ds4 does
        Rng(if seed == 0 { 0x9E37_79B9_7F4A_7C15 } else { seed })
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) & 0xFF_FFFF) as f32 / (1u32 << 24) as f32
    }
    /// Internal state, for saving a generation mid-way.
    pub fn state(&self) -> u64 {
        self.0
    }
}

/// A sampler: configuration plus its RNG stream.
#[derive(Clone, Debug)]
pub struct Sampler {
    pub cfg: SamplerConfig,
    rng: Rng,
    /// scratch for the sorted path, kept to avoid an allocation per token
    idx: Vec<u32>,
}

/// First index of the maximal finite logit (greedy); `None` if none is finite.
pub fn argmax(logits: &[f32]) -> Option<u32> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &v) in logits.iter().enumerate() {
        if v.is_finite() && best.map_or(true, |(_, b)| v > b) {
            best = Some((i, v));
        }
    }
    best.map(|(i, _)| i as u32)
}

/// The `k` largest finite logits as (id, logit), sorted by logit descending then id ascending.
pub fn top_k_logits(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut idx: Vec<u32> = (0..logits.len() as u32).filter(|&i| logits[i as usize].is_finite()).collect();
    partial_sort_desc(logits, &mut idx, k);
    idx.truncate(k);
    idx.into_iter().map(|i| (i, logits[i as usize])).collect()
}

/// Order: larger logit first, ties by smaller id (deterministic).
fn cmp_desc(logits: &[f32], a: u32, b: u32) -> std::cmp::Ordering {
    logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b))
}

/// Puts the `k` best of `idx` first, sorted; the rest unordered.
fn partial_sort_desc(logits: &[f32], idx: &mut [u32], k: usize) {
    let k = k.min(idx.len());
    if k == 0 {
        return;
    }
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, |&a, &b| cmp_desc(logits, a, b));
    }
    idx[..k].sort_unstable_by(|&a, &b| cmp_desc(logits, a, b));
}

impl Sampler {
    pub fn new(cfg: SamplerConfig) -> Sampler {
        Sampler { cfg, rng: Rng::new(cfg.seed), idx: Vec::new() }
    }

    pub fn rng(&self) -> &Rng {
        &self.rng
    }

    /// Picks the next token from `logits` (ds4_session_sample).
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32> {
        let c = self.cfg;
        let none = || EngineError::Input("no finite logit to sample from".into());
        let lmax = logits.iter().copied().filter(|v| v.is_finite()).fold(f32::NEG_INFINITY, f32::max);
        if !lmax.is_finite() {
            return Err(none());
        }
        if c.is_greedy() {
            return argmax(logits).ok_or_else(none);
        }
        let top_p = if c.top_p > 0.0 && c.top_p <= 1.0 { c.top_p } else { 1.0 };
        let min_p = if c.min_p > 0.0 { c.min_p } else { 0.0 };
        let inv_t = 1.0 / c.temperature;
        let weight = |v: f32| ((v - lmax) * inv_t).exp();
        if c.top_k == 0 && top_p >= 1.0 {
            // vocab order: weights relative to the top token (w_max = 1)
            let mut total = 0.0f64;
            for &v in logits {
                if v.is_finite() {
                    let w = weight(v);
                    if w >= min_p {
                        total += w as f64;
                    }
                }
            }
            let r = self.rng.uniform() as f64 * total;
            let mut cum = 0.0f64;
            let mut last = None;
            for (i, &v) in logits.iter().enumerate() {
                if v.is_finite() {
                    let w = weight(v);
                    if w >= min_p {
                        cum += w as f64;
                        last = Some(i as u32);
                        if cum >= r {
                            return Ok(i as u32);
                        }
                    }
                }
            }
            return last.ok_or_else(none);
        }

        // sorted path: candidates = the finite logits (or the top k of them)
        self.idx.clear();
        self.idx.extend((0..logits.len() as u32).filter(|&i| logits[i as usize].is_finite()));
        let limit = if c.top_k > 0 { c.top_k.min(MAX_TOP_K).min(self.idx.len()) } else { self.idx.len() };
        // normaliser: over the top-k set, or the whole vocab
        let total: f64 = if c.top_k > 0 {
            partial_sort_desc(logits, &mut self.idx, limit);
            self.idx[..limit].iter().map(|&i| weight(logits[i as usize]) as f64).sum()
        } else {
            self.idx.iter().map(|&i| weight(logits[i as usize]) as f64).sum()
        };
        // grow the sorted head until the prefix rule stops inside it
        let mut sorted = if c.top_k > 0 { limit } else { 64.min(limit) };
        if c.top_k == 0 {
            partial_sort_desc(logits, &mut self.idx, sorted);
        }
        let kept = loop {
            let p0 = weight(logits[self.idx[0] as usize]) as f64 / total;
            let mut cum = 0.0f64;
            let mut n = 0;
            let mut stopped = false;
            for (i, &id) in self.idx[..sorted].iter().enumerate() {
                let p = weight(logits[id as usize]) as f64 / total;
                if i > 0 && p < min_p as f64 * p0 {
                    stopped = true;
                    break;
                }
                cum += p;
                n = i + 1;
                if cum >= top_p as f64 {
                    stopped = true;
                    break;
                }
            }
            if stopped || sorted == limit {
                break n;
            }
            // the whole head passed: sort a larger head (it stays a prefix of the full order)
            sorted = (sorted * 4).min(limit);
            partial_sort_desc(logits, &mut self.idx, sorted);
        };
        let kept = kept.max(1);
        let sum: f64 = self.idx[..kept].iter().map(|&i| weight(logits[i as usize]) as f64).sum();
        let r = self.rng.uniform() as f64 * sum;
        let mut cum = 0.0f64;
        for &id in &self.idx[..kept] {
            cum += weight(logits[id as usize]) as f64;
            if cum >= r {
                return Ok(id);
            }
        }
        Ok(self.idx[kept - 1])
    }
}

/// Text-level stop sequences over a stream of decoded pieces. `push` returns the
/// text that is safe to show (holding back a tail that could still become a stop
/// sequence) and whether a stop sequence completed; the stop text itself is never
/// returned.
#[derive(Clone, Debug, Default)]
pub struct StopSequences {
    stops: Vec<String>,
    pending: String,
}

impl StopSequences {
    pub fn new(stops: Vec<String>) -> Self {
        StopSequences { stops: stops.into_iter().filter(|s| !s.is_empty()).collect(), pending: String::new() }
    }

    /// Feeds a piece; returns (text to emit, stopped).
    pub fn push(&mut self, piece: &str) -> (String, bool) {
        self.pending.push_str(piece);
        if let Some(at) = self.stops.iter().filter_map(|s| self.pending.find(s.as_str())).min() {
            let out = self.pending[..at].to_string();
            self.pending.clear();
            return (out, true);
        }
        // hold back the longest suffix that is a proper prefix of some stop sequence
        let mut hold = 0;
        for s in &self.stops {
            for (k, _) in s.char_indices().skip(1) {
                if k > hold && self.pending.ends_with(&s[..k]) {
                    hold = k;
                }
            }
        }
        let cut = self.pending.len() - hold;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        (out, false)
    }

    /// End of stream: whatever was held back.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_stream_is_fixed() {
        // first outputs for seed 1, computed by hand from the xorshift64* definition
        let mut r = Rng::new(1);
        let a = r.next_u64();
        let mut x: u64 = 1;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        assert_eq!(a, x.wrapping_mul(0x2545F4914F6CDD1D));
        assert_eq!(Rng::new(0).state(), 0x9E3779B97F4A7C15);
    }

    #[test]
    fn greedy_picks_first_max_and_skips_nan() {
        let l = [1.0, f32::NAN, 3.0, 3.0, f32::INFINITY];
        let mut s = Sampler::new(SamplerConfig::greedy());
        assert_eq!(s.sample(&l).unwrap(), 2);
        assert!(s.sample(&[f32::NAN]).is_err());
    }

    #[test]
    fn top_k_one_is_greedy_and_min_p_prunes() {
        let l: Vec<f32> = (0..1000).map(|i| ((i * 7919) % 1000) as f32 / 100.0).collect();
        let best = argmax(&l).unwrap();
        for seed in 0..20 {
            let mut s = Sampler::new(SamplerConfig { top_k: 1, seed, ..Default::default() });
            assert_eq!(s.sample(&l).unwrap(), best);
            // min_p = 1 keeps only the top token on both paths
            let mut s = Sampler::new(SamplerConfig { min_p: 1.0, seed, ..Default::default() });
            assert_eq!(s.sample(&l).unwrap(), best);
            let mut s = Sampler::new(SamplerConfig { min_p: 1.0, top_p: 0.5, seed, ..Default::default() });
            assert_eq!(s.sample(&l).unwrap(), best);
        }
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        // two dominant tokens (~0.5 each) and many tiny ones
        let mut l = vec![-20.0f32; 5000];
        l[10] = 5.0;
        l[4000] = 5.0;
        let mut seen = std::collections::BTreeSet::new();
        for seed in 1..200 {
            let mut s = Sampler::new(SamplerConfig { top_p: 0.9, min_p: 0.0, seed, ..Default::default() });
            seen.insert(s.sample(&l).unwrap());
        }
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), vec![10, 4000]);
    }

    #[test]
    fn sorted_path_grows_past_the_first_head() {
        // flat distribution: top_p 0.9 needs ~90% of 1000 tokens, beyond the 64 head
        let l = vec![0.0f32; 1000];
        let mut hi = 0;
        for seed in 1..300 {
            let mut s = Sampler::new(SamplerConfig { top_p: 0.9, min_p: 0.0, seed, ..Default::default() });
            hi = hi.max(s.sample(&l).unwrap());
        }
        assert!(hi > 500, "sampled only from a short head: max id {hi}");
    }

    #[test]
    fn same_seed_same_stream() {
        let l: Vec<f32> = (0..512).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let run = |seed| {
            let mut s = Sampler::new(SamplerConfig { seed, top_k: 40, top_p: 0.95, ..Default::default() });
            (0..50).map(|_| s.sample(&l).unwrap()).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn stop_sequences_hold_back_partial_matches() {
        let mut s = StopSequences::new(vec!["STOP".into()]);
        assert_eq!(s.push("abc ST"), ("abc ".to_string(), false));
        assert_eq!(s.push("O"), (String::new(), false));
        assert_eq!(s.push("x"), ("STOx".to_string(), false));
        assert_eq!(s.push("yy ST"), ("yy ".to_string(), false));
        assert_eq!(s.push("OP tail"), (String::new(), true));
        let mut s = StopSequences::new(vec![]);
        assert_eq!(s.push("a"), ("a".to_string(), false));
    }
}
