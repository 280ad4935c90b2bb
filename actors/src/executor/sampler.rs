//! Token sampling: logits of one sequence in, one token id out.
//!
//! A [`Sampler`] belongs to one sequence for its whole life. It owns that sequence's random
//! number generator (seeded from `SamplingParams::seed`), so a seeded request draws the same
//! tokens whether it runs alone or inside any batch: nothing random is shared between
//! sequences. It also keeps the token statistics the penalties need, updated one token at a
//! time, so a step never rescans the prompt or the output.
//!
//! Order of processing, as in vLLM:
//! 1. repetition penalty over prompt + output tokens (positive logits divided by the
//!    penalty, negative ones multiplied),
//! 2. frequency and presence penalties over output tokens,
//! 3. suppressed tokens (e.g. EOS while `min_tokens` is not reached) set to −∞,
//! 4. temperature 0 → argmax (ties go to the lowest index); otherwise logits / temperature →
//!    softmax → top-k → top-p → min-p → renormalise → one draw.
//!
//! The hot path never sorts the vocabulary. The passes over the whole row (max, softmax
//! numerators, sums) are written in 8-wide lanes so the compiler vectorises them, with an
//! `exp` of our own that also gives the same bits on every platform. Top-k streams the row
//! through a small buffer compacted by partial selection (then top-p within those k is a
//! mass-weighted quickselect). Top-p alone first tries the 64 most likely tokens; a wider
//! nucleus is found with a histogram of mass per weight bucket, sorting one bucket only.
//! Draws over the whole row skip blocks of 256 tokens by their sums. Scratch space lives
//! in the struct and is reused, so a step allocates nothing once warm.

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::messages::{SamplingParams, TokenId};

/// Temperatures below this are treated as greedy decoding (as vLLM does).
pub const GREEDY_TEMPERATURE: f32 = 1e-5;

/// How many of the most likely tokens top-p looks at first, before it considers them all.
const TOP_P_FIRST_CHUNK: usize = 64;

/// Tokens per block of the dense draw (one partial sum each).
const BLOCK: usize = 256;

/// Lanes of the vectorised passes.
const LANES: usize = 8;

pub use crate::messages::request::{validate_params, SamplingError};

/// A candidate token with its unnormalised probability (always > 0).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Candidate {
    weight: f32,
    token: TokenId,
}

impl Candidate {
    /// Sort key: most likely first, equal weights to the lower token id, so the order is
    /// total and every selection is deterministic. Positive floats order like their bits.
    fn key(&self) -> u64 {
        (u64::from(!self.weight.to_bits()) << 32) | u64::from(self.token)
    }
}

/// What is left to draw from once all filters ran.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Prepared {
    /// The answer is already known (greedy, or a single candidate).
    Token(TokenId),
    /// Draw from the whole row, now holding unnormalised probabilities (0 for tokens that
    /// were filtered out), with per-block sums in `self.block_sums`.
    Dense { total: f64 },
    /// Draw from `self.candidates`; `total` is the sum of their weights.
    Sparse { total: f64 },
}

/// The per-sequence sampler. Build one with [`Sampler::new`] when a sequence starts and keep
/// it until the sequence ends (preemption included: its RNG state is part of the sequence).
#[derive(Debug, Clone)]
pub struct Sampler {
    rng: StdRng,
    temperature: f32,
    top_p: f32,
    top_k: u32,
    min_p: f32,
    repetition_penalty: f32,
    presence_penalty: f32,
    frequency_penalty: f32,
    vocab_size: usize,
    /// Distinct prompt + output tokens (kept only when the repetition penalty is active).
    seen: Vec<TokenId>,
    /// Bitset over the vocabulary, membership of `seen`.
    seen_bits: Vec<u64>,
    /// How often each token was generated (kept only when frequency/presence is active).
    output_counts: HashMap<TokenId, u32>,
    /// Scratch: candidates of top-k / top-p.
    candidates: Vec<Candidate>,
    /// Scratch: sums of the kept weights per block of `BLOCK` tokens.
    block_sums: Vec<f64>,
    /// Scratch: mass per weight bucket, for a wide top-p nucleus.
    histogram: Vec<f64>,
}

impl Sampler {
    /// A sampler for one sequence. `vocab_size` bounds the token ids tracked for penalties
    /// (ids at or above it are ignored); `prompt_tokens` feed the repetition penalty. The
    /// RNG is seeded from `params.seed`, or from OS entropy when there is none.
    pub fn new(params: &SamplingParams, vocab_size: usize, prompt_tokens: &[TokenId]) -> Self {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_entropy(),
        };
        let mut sampler = Sampler {
            rng,
            temperature: params.temperature,
            top_p: params.top_p,
            top_k: params.top_k,
            min_p: params.min_p,
            repetition_penalty: params.repetition_penalty,
            presence_penalty: params.presence_penalty,
            frequency_penalty: params.frequency_penalty,
            vocab_size,
            seen: Vec::new(),
            seen_bits: Vec::new(),
            output_counts: HashMap::new(),
            candidates: Vec::new(),
            block_sums: Vec::new(),
            histogram: Vec::new(),
        };
        if sampler.tracks_seen() {
            sampler.seen_bits = vec![0; vocab_size.div_ceil(64)];
            for &t in prompt_tokens {
                sampler.mark_seen(t);
            }
        }
        sampler
    }

    /// Whether this sampler decodes greedily (temperature 0).
    pub fn is_greedy(&self) -> bool {
        self.temperature.is_nan() || self.temperature < GREEDY_TEMPERATURE
    }

    fn tracks_seen(&self) -> bool {
        self.repetition_penalty != 1.0
    }

    fn tracks_counts(&self) -> bool {
        self.presence_penalty != 0.0 || self.frequency_penalty != 0.0
    }

    fn mark_seen(&mut self, token: TokenId) {
        let t = token as usize;
        if t >= self.vocab_size {
            return;
        }
        if let Some(word) = self.seen_bits.get_mut(t / 64) {
            let bit = 1u64 << (t % 64);
            if *word & bit == 0 {
                *word |= bit;
                self.seen.push(token);
            }
        }
    }

    /// Records a generated token for the penalties. [`Sampler::sample`] records what it
    /// returns, so call this only for tokens chosen elsewhere (e.g. output restored after a
    /// restart).
    pub fn record(&mut self, token: TokenId) {
        if token as usize >= self.vocab_size {
            return;
        }
        if self.tracks_seen() {
            self.mark_seen(token);
        }
        if self.tracks_counts() {
            *self.output_counts.entry(token).or_insert(0) += 1;
        }
    }

    /// Picks the next token from one row of logits and records it.
    ///
    /// `logits` is used as scratch: on return it holds unspecified values. `suppress` lists
    /// tokens that must not be chosen this step (the scheduler passes EOS and the stop token
    /// ids while fewer than `min_tokens` were generated); ids outside the row are ignored.
    /// Greedy steps consume no randomness; every other step consumes exactly one draw.
    pub fn sample(
        &mut self,
        logits: &mut [f32],
        suppress: &[TokenId],
    ) -> Result<TokenId, SamplingError> {
        let token = match self.prepare(logits, suppress)? {
            Prepared::Token(t) => {
                if !self.is_greedy() {
                    // Keep the random stream aligned whatever the filters left.
                    let _: f64 = self.rng.gen();
                }
                t
            }
            Prepared::Dense { total } => {
                let target = self.rng.gen::<f64>() * total;
                draw_dense(logits, &self.block_sums, target)
            }
            Prepared::Sparse { total } => {
                let target = self.rng.gen::<f64>() * total;
                draw_sparse(&self.candidates, target)
            }
        };
        self.record(token);
        Ok(token)
    }

    /// The distribution [`Sampler::sample`] draws from, normalised, written over `logits`
    /// (every token's probability, 0 for those the filters removed). Consumes no
    /// randomness and records nothing.
    pub fn probabilities(
        &mut self,
        logits: &mut [f32],
        suppress: &[TokenId],
    ) -> Result<(), SamplingError> {
        match self.prepare(logits, suppress)? {
            Prepared::Token(t) => {
                logits.fill(0.0);
                if let Some(p) = logits.get_mut(t as usize) {
                    *p = 1.0;
                }
            }
            Prepared::Dense { total } => {
                let inv = (1.0 / total) as f32;
                logits.iter_mut().for_each(|w| *w *= inv);
            }
            Prepared::Sparse { total } => {
                logits.fill(0.0);
                for c in &self.candidates {
                    if let Some(p) = logits.get_mut(c.token as usize) {
                        *p = (c.weight as f64 / total) as f32;
                    }
                }
            }
        }
        Ok(())
    }

    /// A draw from [`Sampler::probabilities`] (left in `logits`), with one draw of this
    /// sampler's randomness; records nothing. What a draft model proposes with.
    pub fn draw(&mut self, logits: &mut [f32]) -> Result<TokenId, SamplingError> {
        self.probabilities(logits, &[])?;
        let target = self.rng.gen::<f64>();
        Ok(draw_weighted(logits, target))
    }

    /// Speculative decoding with a sampled draft: `draft` was drawn from `q` (a
    /// distribution over the vocabulary, a draft model's). The standard rejection sampling
    /// keeps it with probability min(1, p(draft) / q(draft)), where p is the distribution
    /// [`Sampler::sample`] would draw from for this row, and otherwise draws from
    /// max(0, p − q) renormalised — so the token follows p exactly, whatever q is. Returns
    /// the token and whether it is the draft, and records it. `logits` is scratch.
    pub fn verify_draft(
        &mut self,
        logits: &mut [f32],
        suppress: &[TokenId],
        draft: TokenId,
        q: &[f32],
    ) -> Result<(TokenId, bool), SamplingError> {
        self.probabilities(logits, suppress)?;
        let p_draft = logits.get(draft as usize).copied().unwrap_or(0.0) as f64;
        let q_draft = q.get(draft as usize).copied().unwrap_or(0.0) as f64;
        let u = self.rng.gen::<f64>();
        if q_draft > 0.0 && u * q_draft < p_draft {
            self.record(draft);
            return Ok((draft, true));
        }
        // The residual: where p exceeds q. Its mass is 0 only when p ≤ q everywhere, i.e.
        // p = q, where every draft is kept; rounding can still get here, and p itself is
        // the right distribution then.
        let mut residual = 0f64;
        for (w, &qi) in logits
            .iter_mut()
            .zip(q.iter().chain(std::iter::repeat(&0.0)))
        {
            let r = (*w - qi).max(0.0);
            residual += r as f64;
            *w = r;
        }
        let target = self.rng.gen::<f64>();
        let token = if residual > 0.0 {
            draw_weighted(logits, target * residual)
        } else {
            self.probabilities(logits, suppress)?;
            draw_weighted(logits, target)
        };
        self.record(token);
        Ok((token, token == draft))
    }

    /// Applies the penalties to `logits` in place.
    fn apply_penalties(&self, logits: &mut [f32]) {
        if self.tracks_seen() {
            let r = self.repetition_penalty;
            for &t in &self.seen {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 { *l / r } else { *l * r };
                }
            }
        }
        if self.tracks_counts() {
            for (&t, &n) in &self.output_counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= self.frequency_penalty * n as f32 + self.presence_penalty;
                }
            }
        }
    }

    /// Everything but the final draw: penalties, suppression, then greedy or the filtered
    /// distribution.
    fn prepare(
        &mut self,
        logits: &mut [f32],
        suppress: &[TokenId],
    ) -> Result<Prepared, SamplingError> {
        if logits.is_empty() {
            return Err(SamplingError::EmptyLogits);
        }
        self.apply_penalties(logits);
        for &t in suppress {
            if let Some(l) = logits.get_mut(t as usize) {
                *l = f32::NEG_INFINITY;
            }
        }

        let max_logit = max_logit(logits);
        if max_logit == f32::NEG_INFINITY {
            return Err(SamplingError::NoCandidate);
        }
        // The argmax: the first index holding the maximum (NaN never equals it).
        let best = logits
            .iter()
            .position(|&l| l == max_logit)
            .unwrap_or_default() as TokenId;
        // A +inf logit takes all the mass; several share it, first index wins.
        if self.is_greedy() || self.top_k == 1 || max_logit == f32::INFINITY {
            return Ok(Prepared::Token(best));
        }

        let total = softmax_numerators(logits, max_logit, 1.0 / self.temperature);
        let top_k = self.top_k as usize;
        let use_top_k = top_k > 0 && top_k < logits.len();
        let use_top_p = self.top_p < 1.0;
        let min_p = if self.min_p > 0.0 { self.min_p } else { 0.0 };
        // The top token has weight exactly 1, so min-p is the threshold `w >= min_p`. It is
        // applied last and only removes a tail: it never changes the top-k / top-p verdict
        // on the tokens it keeps.
        let cands = &mut self.candidates;
        if use_top_k {
            collect_top(logits, top_k, cands);
            if use_top_p {
                let mass: f64 = cands.iter().map(|c| c.weight as f64).sum();
                let keep = nucleus_len(cands, self.top_p as f64 * mass);
                cands.truncate(keep);
            }
        } else if use_top_p {
            let limit = self.top_p as f64 * total;
            // The nucleus of a peaked distribution is small: try the head first.
            collect_top(logits, TOP_P_FIRST_CHUNK, cands);
            cands.sort_unstable_by_key(Candidate::key);
            match closed_prefix(cands, limit) {
                Some(keep) => cands.truncate(keep),
                None if cands.len() < TOP_P_FIRST_CHUNK => {}
                None => {
                    let cut = nucleus_cut(logits, limit, &mut self.histogram, cands);
                    let threshold = cut.map_or(min_p, |w| w.max(min_p));
                    let total = filter_dense(logits, threshold, &mut self.block_sums);
                    let total = total - drop_tokens(logits, &mut self.block_sums, cands);
                    return Ok(Prepared::Dense { total });
                }
            }
        } else {
            let total = filter_dense(logits, min_p, &mut self.block_sums);
            return Ok(Prepared::Dense { total });
        }
        if min_p > 0.0 {
            cands.retain(|c| c.weight >= min_p);
        }
        match cands.as_slice() {
            [] => Ok(Prepared::Token(best)),
            [only] => Ok(Prepared::Token(only.token)),
            rest => Ok(Prepared::Sparse {
                total: rest.iter().map(|c| c.weight as f64).sum(),
            }),
        }
    }
}

/// The largest logit, NaN ignored (−∞ if there is none).
fn max_logit(logits: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = logits.chunks_exact(LANES);
    for c in &mut chunks {
        if let Ok(c) = <&[f32; LANES]>::try_from(c) {
            for j in 0..LANES {
                lanes[j] = if c[j] > lanes[j] { c[j] } else { lanes[j] };
            }
        }
    }
    for (m, &x) in lanes.iter_mut().zip(chunks.remainder()) {
        *m = if x > *m { x } else { *m };
    }
    lanes
        .into_iter()
        .fold(f32::NEG_INFINITY, |a, b| if b > a { b } else { a })
}

/// `exp(x)` for `x <= 0`, with relative error below 2e-7; NaN and `x < -87` give 0 (the
/// true value is below 2e-38, i.e. nothing next to the top token's weight of 1). Built
/// from plain arithmetic so that it vectorises and gives the same bits everywhere.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in a part exact in few bits and the rest (Cody–Waite reduction).
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 × 2^23: adding it rounds to an integer held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let in_range = x >= -87.0; // false for NaN
    let x = if in_range { x.min(0.0) } else { 0.0 };
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    // Minimax polynomial for exp on [-ln2/2, ln2/2] (Cephes expf).
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let p = p * r * r + r + 1.0;
    // 2^n from n + 127 in the exponent field; n is in [-126, 0].
    let biased = t.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127);
    let scale = f32::from_bits(biased << 23);
    if in_range {
        p * scale
    } else {
        0.0
    }
}

/// Overwrites the logits with softmax numerators `exp((l - max) * inv_t)`, so the top token
/// has weight 1, and returns their sum.
fn softmax_numerators(logits: &mut [f32], max: f32, inv_t: f32) -> f64 {
    // Two simple passes vectorise; one fused pass does not.
    for l in logits.iter_mut() {
        *l = exp_nonpositive((*l - max) * inv_t);
    }
    let mut total = 0f64;
    for block in logits.chunks(BLOCK) {
        let mut lanes = [0f32; LANES];
        let mut chunks = block.chunks_exact(LANES);
        for c in &mut chunks {
            if let Ok(c) = <&[f32; LANES]>::try_from(c) {
                for j in 0..LANES {
                    lanes[j] += c[j];
                }
            }
        }
        for (s, &w) in lanes.iter_mut().zip(chunks.remainder()) {
            *s += w;
        }
        total += lanes.iter().map(|&s| s as f64).sum::<f64>();
    }
    total
}

/// Zeroes the weights below `threshold`, fills `block_sums` with the per-block sums of the
/// rest and returns their total.
fn filter_dense(weights: &mut [f32], threshold: f32, block_sums: &mut Vec<f64>) -> f64 {
    block_sums.clear();
    for block in weights.chunks_mut(BLOCK) {
        let mut lanes = [0f32; LANES];
        let mut chunks = block.chunks_exact_mut(LANES);
        for c in &mut chunks {
            if let Ok(c) = <&mut [f32; LANES]>::try_from(c) {
                for j in 0..LANES {
                    c[j] = if c[j] >= threshold { c[j] } else { 0.0 };
                    lanes[j] += c[j];
                }
            }
        }
        for (s, w) in lanes.iter_mut().zip(chunks.into_remainder()) {
            *w = if *w >= threshold { *w } else { 0.0 };
            *s += *w;
        }
        block_sums.push(lanes.iter().map(|&s| s as f64).sum());
    }
    block_sums.iter().sum()
}

/// Zeroes the weights of `tokens` after [`filter_dense`], keeping `block_sums` in step;
/// returns the weight removed.
fn drop_tokens(weights: &mut [f32], block_sums: &mut [f64], tokens: &[Candidate]) -> f64 {
    let mut removed = 0f64;
    for c in tokens {
        let t = c.token as usize;
        if let (Some(w), Some(sum)) = (weights.get_mut(t), block_sums.get_mut(t / BLOCK)) {
            *sum -= *w as f64;
            removed += *w as f64;
            *w = 0.0;
        }
    }
    removed
}

/// The `k` heaviest positive weights (fewer if fewer are positive), in no particular order.
/// Streams the row through a buffer of about 2k that is cut back to k by partial selection,
/// after which only weights above the current k-th are admitted.
fn collect_top(weights: &[f32], k: usize, out: &mut Vec<Candidate>) {
    out.clear();
    if k == 0 {
        return;
    }
    let cap = 2 * k + 256;
    let mut threshold = 0f32;
    for (i, &w) in weights.iter().enumerate() {
        // Scanning in index order, a later token equal to the k-th ranks below it.
        if w > threshold {
            out.push(Candidate {
                weight: w,
                token: i as TokenId,
            });
            if out.len() >= cap {
                out.select_nth_unstable_by_key(k - 1, Candidate::key);
                out.truncate(k);
                threshold = out[k - 1].weight;
            }
        }
    }
    if out.len() > k {
        out.select_nth_unstable_by_key(k - 1, Candidate::key);
        out.truncate(k);
    }
}

/// For candidates sorted most likely first: how many top-p keeps, i.e. the first index at
/// which the mass before it reaches `limit` (never 0); `None` if the list ends first.
fn closed_prefix(sorted: &[Candidate], limit: f64) -> Option<usize> {
    let mut cumulative = 0f64;
    for (i, c) in sorted.iter().enumerate() {
        if i > 0 && cumulative >= limit {
            return Some(i);
        }
        cumulative += c.weight as f64;
    }
    None
}

/// How many candidates top-p keeps (as [`closed_prefix`] on the sorted list), rearranging
/// `cands` so that those come first. A quickselect weighted by mass: split at the median,
/// go left if the heavier half already reaches `limit`, else right; sort only the last
/// small range.
fn nucleus_len(cands: &mut [Candidate], limit: f64) -> usize {
    const SMALL: usize = 64;
    let (mut lo, mut hi) = (0, cands.len());
    let mut before = 0f64; // mass of cands[..lo], all heavier than the rest
    while hi - lo > SMALL {
        let mid = lo + (hi - lo) / 2;
        cands[lo..hi].select_nth_unstable_by_key(mid - lo, Candidate::key);
        let left: f64 = cands[lo..mid].iter().map(|c| c.weight as f64).sum();
        if before + left >= limit {
            hi = mid;
        } else {
            before += left;
            lo = mid;
        }
    }
    cands[lo..hi].sort_unstable_by_key(Candidate::key);
    let mut cumulative = before;
    for (i, c) in cands.iter().enumerate().take(hi).skip(lo) {
        if i > 0 && cumulative >= limit {
            return i;
        }
        cumulative += c.weight as f64;
    }
    hi
}

/// Buckets of the top-p histogram: the weight's exponent and 4 mantissa bits (1/16 of an
/// octave). Weights are in (0, 1], so the bucket of 1.0 is the largest.
const BUCKET_SHIFT: u32 = 19;
const BUCKETS: usize = (0x3F80_0000 >> BUCKET_SHIFT) + 1;

fn bucket(weight: f32) -> usize {
    (weight.to_bits() >> BUCKET_SHIFT) as usize
}

/// Top-p over the whole row in linear time. A histogram of mass per weight bucket finds the
/// bucket where the cumulative mass reaches `limit`; only that bucket's tokens are sorted.
/// Returns the weight of the last token kept (every heavier token is kept too) and leaves
/// in `scratch` the tokens of that same weight that rank after it (ties by index), which
/// must be dropped as well. `None`: everything is kept.
fn nucleus_cut(
    weights: &[f32],
    limit: f64,
    histogram: &mut Vec<f64>,
    scratch: &mut Vec<Candidate>,
) -> Option<f32> {
    histogram.clear();
    histogram.resize(BUCKETS, 0.0);
    for &w in weights {
        // Zero weights land in bucket 0 and add nothing.
        histogram[bucket(w).min(BUCKETS - 1)] += w as f64;
    }
    let mut before = 0f64;
    let mut boundary = None;
    for (b, &mass) in histogram.iter().enumerate().rev() {
        if mass > 0.0 && before + mass >= limit {
            boundary = Some(b);
            break;
        }
        before += mass;
    }
    let boundary = boundary?;
    scratch.clear();
    scratch.extend(
        weights
            .iter()
            .enumerate()
            .filter(|&(_, &w)| w > 0.0 && bucket(w) == boundary)
            .map(|(i, &w)| Candidate {
                weight: w,
                token: i as TokenId,
            }),
    );
    scratch.sort_unstable_by_key(Candidate::key);
    // Every heavier bucket is kept, and so is the boundary's first token (the mass before
    // it is below `limit`); keep going while the mass before stays below `limit`.
    let mut cumulative = before;
    let mut keep = 0usize;
    for c in scratch.iter() {
        if keep > 0 && cumulative >= limit {
            break;
        }
        cumulative += c.weight as f64;
        keep += 1;
    }
    let cut = scratch.get(keep.checked_sub(1)?)?.weight;
    // What remains after the cut with the cut's own weight: same weight, higher index.
    scratch.drain(..keep);
    scratch.retain(|c| c.weight == cut);
    Some(cut)
}

/// The token at which the running sum of weights passes `target`: whole blocks are skipped
/// by their sums, then one block is scanned. Rounding can leave the target unreached; the
/// last eligible token is taken then.
fn draw_dense(weights: &[f32], block_sums: &[f64], target: f64) -> TokenId {
    let mut cumulative = 0f64;
    for (b, &sum) in block_sums.iter().enumerate() {
        if cumulative + sum > target {
            let start = b * BLOCK;
            let block = weights.get(start..).unwrap_or_default();
            let mut last = None;
            for (i, &w) in block.iter().enumerate().take(BLOCK) {
                if w > 0.0 {
                    cumulative += w as f64;
                    last = Some(start + i);
                    if cumulative > target {
                        break;
                    }
                }
            }
            if let Some(i) = last {
                return i as TokenId;
            }
        }
        cumulative += sum;
    }
    weights.iter().rposition(|&w| w > 0.0).unwrap_or_default() as TokenId
}

/// The token at which the running sum of `weights` passes `target` (the last positive one
/// when rounding leaves it unreached).
fn draw_weighted(weights: &[f32], target: f64) -> TokenId {
    let mut cumulative = 0f64;
    for (i, &w) in weights.iter().enumerate() {
        if w > 0.0 {
            cumulative += w as f64;
            if cumulative > target {
                return i as TokenId;
            }
        }
    }
    weights.iter().rposition(|&w| w > 0.0).unwrap_or_default() as TokenId
}

fn draw_sparse(candidates: &[Candidate], target: f64) -> TokenId {
    let mut cumulative = 0f64;
    for c in candidates {
        cumulative += c.weight as f64;
        if cumulative > target {
            return c.token;
        }
    }
    candidates.last().map_or(0, |c| c.token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> SamplingParams {
        SamplingParams {
            seed: Some(7),
            ..SamplingParams::default()
        }
    }

    fn greedy() -> SamplingParams {
        SamplingParams {
            temperature: 0.0,
            ..params()
        }
    }

    fn ln_probs(p: &[f64]) -> Vec<f32> {
        p.iter().map(|&x| x.ln() as f32).collect()
    }

    /// Draw `n` tokens from fixed logits (the logits are copied each step).
    fn draws(sampler: &mut Sampler, logits: &[f32], n: usize) -> Vec<TokenId> {
        let mut row = logits.to_vec();
        (0..n)
            .map(|_| {
                row.copy_from_slice(logits);
                sampler.sample(&mut row, &[]).expect("sample")
            })
            .collect()
    }

    fn frequencies(tokens: &[TokenId], vocab: usize) -> Vec<f64> {
        let mut f = vec![0f64; vocab];
        for &t in tokens {
            f[t as usize] += 1.0;
        }
        f.iter().map(|c| c / tokens.len() as f64).collect()
    }

    fn assert_close(got: &[f64], want: &[f64], tol: f64) {
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= tol,
                "token {i}: got {g}, want {w} (±{tol}); {got:?}"
            );
        }
    }

    /// The filtered, normalised distribution `prepare` leaves, for comparison.
    fn distribution(sampler: &mut Sampler, logits: &[f32]) -> Vec<f64> {
        let mut row = logits.to_vec();
        let mut out = vec![0f64; logits.len()];
        match sampler.prepare(&mut row, &[]).expect("prepare") {
            Prepared::Token(t) => out[t as usize] = 1.0,
            Prepared::Dense { total } => {
                for (i, &w) in row.iter().enumerate() {
                    out[i] = w as f64 / total;
                }
            }
            Prepared::Sparse { total } => {
                for c in &sampler.candidates {
                    out[c.token as usize] = c.weight as f64 / total;
                }
            }
        }
        out
    }

    /// A straightforward full-sort implementation of temperature → top-k → top-p → min-p.
    fn reference(logits: &[f32], p: &SamplingParams) -> Vec<f64> {
        let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<(f64, usize)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| ((((l - max) / p.temperature).exp()) as f64, i))
            .collect();
        let z: f64 = probs.iter().map(|x| x.0).sum();
        for x in probs.iter_mut() {
            x.0 /= z;
        }
        probs.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        if p.top_k > 0 && (p.top_k as usize) < probs.len() {
            probs.truncate(p.top_k as usize);
        }
        let z: f64 = probs.iter().map(|x| x.0).sum();
        let mut cum = 0.0;
        let mut keep = probs.len();
        for (i, x) in probs.iter().enumerate() {
            if i > 0 && cum >= p.top_p as f64 * z {
                keep = i;
                break;
            }
            cum += x.0;
        }
        probs.truncate(keep);
        let top = probs[0].0;
        probs.retain(|x| x.0 >= p.min_p as f64 * top);
        let z: f64 = probs.iter().map(|x| x.0).sum();
        let mut out = vec![0f64; logits.len()];
        for (q, i) in probs {
            out[i] = q / z;
        }
        out
    }

    #[test]
    fn fast_exp_is_accurate() {
        let mut worst = 0f64;
        let mut x = 0f32;
        while x > -87.0 {
            let got = exp_nonpositive(x) as f64;
            let want = (x as f64).exp();
            worst = worst.max((got - want).abs() / want);
            x -= 0.000_731;
        }
        assert!(worst < 2e-7, "worst relative error {worst}");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_nonpositive(-0.0), 1.0);
        assert_eq!(exp_nonpositive(-88.0), 0.0);
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_nonpositive(f32::NAN), 0.0);
    }

    #[test]
    fn dense_draws_cover_every_block() {
        // A distribution spread over many blocks, ragged last block included.
        let vocab = 10 * BLOCK + 5;
        let hot = |i: usize| i.is_multiple_of(397) || i == vocab - 1;
        let logits: Vec<f32> = (0..vocab)
            .map(|i| if hot(i) { 2.0 } else { -30.0 })
            .collect();
        let mut s = Sampler::new(&params(), vocab, &[]);
        let got = draws(&mut s, &logits, 5000);
        assert!(got.iter().all(|&t| hot(t as usize)));
        let f = frequencies(&got, vocab);
        let n_hot = (0..vocab).filter(|&i| hot(i)).count();
        for i in (0..vocab).filter(|&i| hot(i)) {
            let want = 1.0 / n_hot as f64;
            assert!((f[i] - want).abs() < 0.03, "token {i}: {} vs {want}", f[i]);
        }
    }

    #[test]
    fn greedy_is_argmax_with_lowest_index_on_ties() {
        let mut s = Sampler::new(&greedy(), 6, &[]);
        assert_eq!(s.sample(&mut [0.1, 2.0, -1.0, 1.5, 0.0, 1.9], &[]), Ok(1));
        assert_eq!(s.sample(&mut [0.1, 3.0, -1.0, 3.0, 0.0, 3.0], &[]), Ok(1));
        assert_eq!(
            s.sample(
                &mut [f32::NAN, -5.0, f32::NAN, -4.0, f32::NEG_INFINITY, -9.0],
                &[]
            ),
            Ok(3)
        );
        assert!(s.is_greedy());
    }

    #[test]
    fn tiny_temperature_is_greedy_and_consumes_no_randomness() {
        let p = SamplingParams {
            temperature: 1e-7,
            ..params()
        };
        let mut s = Sampler::new(&p, 3, &[]);
        let before = s.rng.clone();
        assert_eq!(s.sample(&mut [1.0, 1.2, 1.1], &[]), Ok(1));
        assert_eq!(s.rng.clone().gen::<u64>(), before.clone().gen::<u64>());
    }

    #[test]
    fn same_seed_gives_same_draws() {
        let logits: Vec<f32> = (0..500).map(|i| ((i * 37) % 101) as f32 / 20.0).collect();
        let p = SamplingParams {
            seed: Some(1234),
            top_k: 50,
            top_p: 0.9,
            ..SamplingParams::default()
        };
        let a = draws(&mut Sampler::new(&p, 500, &[]), &logits, 200);
        let b = draws(&mut Sampler::new(&p, 500, &[]), &logits, 200);
        assert_eq!(a, b);
    }

    #[test]
    fn different_seeds_differ() {
        let logits = vec![0.0f32; 1000];
        let a = draws(&mut Sampler::new(&params(), 1000, &[]), &logits, 50);
        let p = SamplingParams {
            seed: Some(8),
            ..params()
        };
        let b = draws(&mut Sampler::new(&p, 1000, &[]), &logits, 50);
        assert_ne!(a, b);
        // Unseeded samplers come from entropy and differ from each other.
        let p = SamplingParams {
            seed: None,
            ..params()
        };
        let c = draws(&mut Sampler::new(&p, 1000, &[]), &logits, 50);
        let d = draws(&mut Sampler::new(&p, 1000, &[]), &logits, 50);
        assert_ne!(c, d);
    }

    #[test]
    fn a_sequence_draws_the_same_alone_or_interleaved_with_others() {
        let logits: Vec<f32> = (0..300).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let p = SamplingParams {
            seed: Some(99),
            top_p: 0.95,
            ..SamplingParams::default()
        };
        let alone = draws(&mut Sampler::new(&p, 300, &[]), &logits, 100);

        let mut mine = Sampler::new(&p, 300, &[]);
        let mut others: Vec<Sampler> = (0..3)
            .map(|k| {
                let q = SamplingParams {
                    seed: Some(k),
                    ..SamplingParams::default()
                };
                Sampler::new(&q, 300, &[])
            })
            .collect();
        let mut batched = Vec::new();
        for step in 0..100 {
            for (k, other) in others.iter_mut().enumerate() {
                if (step + k) % 2 == 0 {
                    draws(other, &logits, 1);
                }
            }
            batched.extend(draws(&mut mine, &logits, 1));
        }
        assert_eq!(alone, batched);
    }

    #[test]
    fn top_k_one_is_greedy() {
        let logits: Vec<f32> = (0..1000)
            .map(|i| ((i * 7919) % 1000) as f32 / 100.0)
            .collect();
        let argmax = logits
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i as TokenId);
        let p = SamplingParams {
            top_k: 1,
            temperature: 5.0,
            ..params()
        };
        let got = draws(&mut Sampler::new(&p, 1000, &[]), &logits, 50);
        assert!(got.iter().all(|&t| Some(t) == argmax));
    }

    #[test]
    fn tiny_top_p_is_greedy() {
        let logits = ln_probs(&[0.2, 0.35, 0.3, 0.15]);
        let p = SamplingParams {
            top_p: 1e-6,
            ..params()
        };
        let got = draws(&mut Sampler::new(&p, 4, &[]), &logits, 200);
        assert!(got.iter().all(|&t| t == 1));
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        let logits = ln_probs(&[0.5, 0.3, 0.15, 0.05]);
        let p = SamplingParams {
            top_p: 0.7,
            ..params()
        };
        let got = draws(&mut Sampler::new(&p, 4, &[]), &logits, 4000);
        assert_close(&frequencies(&got, 4), &[0.625, 0.375, 0.0, 0.0], 0.03);
    }

    #[test]
    fn min_p_drops_unlikely_tokens() {
        let logits = ln_probs(&[0.6, 0.3, 0.1]);
        let p = SamplingParams {
            min_p: 0.25,
            ..params()
        };
        let got = draws(&mut Sampler::new(&p, 3, &[]), &logits, 4000);
        assert_close(&frequencies(&got, 3), &[2.0 / 3.0, 1.0 / 3.0, 0.0], 0.03);
        // min_p = 1 keeps only the top token.
        let p = SamplingParams {
            min_p: 1.0,
            ..params()
        };
        let got = draws(&mut Sampler::new(&p, 3, &[]), &logits, 100);
        assert!(got.iter().all(|&t| t == 0));
    }

    #[test]
    fn temperature_one_matches_the_distribution() {
        let probs = [0.5, 0.3, 0.2];
        let got = draws(
            &mut Sampler::new(&params(), 3, &[]),
            &ln_probs(&probs),
            20_000,
        );
        assert_close(&frequencies(&got, 3), &probs, 0.02);
    }

    #[test]
    fn verified_drafts_follow_the_target_distribution_whatever_the_draft_proposes() {
        // Target p (temperature 0.7 of these logits, top-k 3 cuts token 3), draft q.
        let target = SamplingParams {
            temperature: 0.7,
            top_k: 3,
            ..params()
        };
        let logits = ln_probs(&[0.4, 0.3, 0.2, 0.1]);
        let p = distribution(&mut Sampler::new(&target, 4, &[]), &logits);
        assert_eq!(p[3], 0.0, "top-k cut the last token");
        let mut row = logits.clone();
        Sampler::new(&target, 4, &[])
            .probabilities(&mut row, &[])
            .expect("probabilities");
        let row64: Vec<f64> = row.iter().map(|&x| x as f64).collect();
        assert_close(&row64, &p, 1e-6);

        for q in [
            vec![0.1f32, 0.1, 0.1, 0.7],           // mostly a token p never takes
            vec![0.7, 0.1, 0.1, 0.1],              // over-proposes the likeliest
            p.iter().map(|&x| x as f32).collect(), // q = p: every draft kept
        ] {
            let mut draft_rng = Sampler::new(&params(), 4, &[]);
            let mut sampler = Sampler::new(&target, 4, &[]);
            let (mut got, mut kept) = (Vec::new(), 0usize);
            for _ in 0..60_000 {
                let mut qrow = q.iter().map(|&x| x.ln()).collect::<Vec<f32>>();
                let d = draft_rng.draw(&mut qrow).expect("draft");
                let mut row = logits.clone();
                let (t, is_draft) = sampler.verify_draft(&mut row, &[], d, &q).expect("verify");
                assert_eq!(is_draft, t == d);
                kept += usize::from(is_draft && t == d);
                got.push(t);
            }
            assert_close(&frequencies(&got, 4), &p, 0.01);
            // The keep rate is Σ min(p, q).
            let want: f64 = p.iter().zip(&q).map(|(&a, &b)| a.min(b as f64)).sum();
            let rate = kept as f64 / 60_000.0;
            assert!(
                (rate - want).abs() < 0.01,
                "q {q:?}: kept {rate}, want {want}"
            );
        }
    }

    #[test]
    fn draws_follow_the_probabilities_left_in_the_row() {
        let mut s = Sampler::new(&params(), 3, &[]);
        let probs = [0.6, 0.3, 0.1];
        let mut got = Vec::new();
        for _ in 0..20_000 {
            let mut row = ln_probs(&probs);
            got.push(s.draw(&mut row).expect("draw"));
            let sum: f32 = row.iter().sum();
            assert!((sum - 1.0).abs() < 1e-5, "{row:?}");
        }
        assert_close(&frequencies(&got, 3), &probs, 0.02);
    }

    #[test]
    fn temperature_sharpens_and_flattens() {
        let probs = [0.5, 0.3, 0.2];
        // T = 0.5 squares the probabilities before renormalising.
        let p = SamplingParams {
            temperature: 0.5,
            ..params()
        };
        let got = draws(&mut Sampler::new(&p, 3, &[]), &ln_probs(&probs), 20_000);
        let sq: Vec<f64> = probs.iter().map(|x| x * x / 0.38).collect();
        assert_close(&frequencies(&got, 3), &sq, 0.02);
        // A huge temperature is nearly uniform.
        let p = SamplingParams {
            temperature: 1000.0,
            ..params()
        };
        let got = draws(&mut Sampler::new(&p, 3, &[]), &ln_probs(&probs), 20_000);
        assert_close(&frequencies(&got, 3), &[1.0 / 3.0; 3], 0.02);
    }

    #[test]
    fn top_k_renormalises_over_the_k_best() {
        let p = SamplingParams {
            top_k: 2,
            ..params()
        };
        let got = draws(
            &mut Sampler::new(&p, 3, &[]),
            &ln_probs(&[0.3, 0.5, 0.2]),
            20_000,
        );
        assert_close(&frequencies(&got, 3), &[0.375, 0.625, 0.0], 0.02);
    }

    #[test]
    fn filters_match_a_full_sort_reference() {
        // Pseudo-random logits over a large vocabulary; many parameter combinations.
        let mut rng = StdRng::seed_from_u64(5);
        let vocab = 5000;
        let logits: Vec<f32> = (0..vocab).map(|_| rng.gen_range(-8.0f32..8.0)).collect();
        let mut with_ties = logits.clone();
        for l in with_ties.iter_mut().step_by(3) {
            *l = 7.5;
        }
        for row in [&logits, &with_ties] {
            for &temperature in &[0.3f32, 1.0, 2.5] {
                for &top_k in &[0u32, 1, 40, 700, 5000, 9000] {
                    for &top_p in &[1.0f32, 0.95, 0.5, 0.05] {
                        for &min_p in &[0.0f32, 0.01, 0.3] {
                            let p = SamplingParams {
                                temperature,
                                top_k,
                                top_p,
                                min_p,
                                ..params()
                            };
                            let want = reference(row, &p);
                            let got = distribution(&mut Sampler::new(&p, vocab, &[]), row);
                            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                                assert!(
                                    (g - w).abs() < 1e-5,
                                    "{p:?}: token {i}: got {g}, want {w}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative_logits() {
        let p = SamplingParams {
            repetition_penalty: 2.0,
            ..greedy()
        };
        let s = Sampler::new(&p, 4, &[0, 2, 2]);
        let mut logits = [4.0, 3.0, -1.0, -1.5];
        s.apply_penalties(&mut logits);
        assert_eq!(logits, [2.0, 3.0, -2.0, -1.5]);

        // The penalty turns the argmax from token 0 (in the prompt) to token 1.
        let mut s = Sampler::new(&p, 4, &[0]);
        assert_eq!(s.sample(&mut [4.0, 3.0, -1.0, -1.5], &[]), Ok(1));
        // Token 1 is now in the output too: both are penalised, token 0 wins again.
        assert_eq!(s.sample(&mut [4.0, 3.0, -1.0, -1.5], &[]), Ok(0));
    }

    #[test]
    fn frequency_and_presence_penalties_change_the_argmax() {
        // Frequency: subtracted once per occurrence.
        let p = SamplingParams {
            frequency_penalty: 0.4,
            ..greedy()
        };
        let mut s = Sampler::new(&p, 3, &[1, 1, 1]); // the prompt does not count
        let row = [2.0, 1.0, 0.0];
        let got: Vec<TokenId> = (0..5)
            .map(|_| s.sample(&mut row.clone(), &[]).expect("sample"))
            .collect();
        // 0 (2.0) → 0 (1.6) → 0 (1.2) → 1 vs 0.8 → 0 (0.8) vs 1 (0.6)
        assert_eq!(got, vec![0, 0, 0, 1, 0]);

        // Presence: subtracted once, however often.
        let p = SamplingParams {
            presence_penalty: 1.5,
            ..greedy()
        };
        let mut s = Sampler::new(&p, 3, &[]);
        s.record(0);
        s.record(0);
        assert_eq!(s.sample(&mut [2.0, 1.0, 0.0], &[]), Ok(1));
        assert_eq!(s.sample(&mut [2.0, 1.0, 0.0], &[]), Ok(0));
    }

    #[test]
    fn penalties_ignore_out_of_range_tokens() {
        let p = SamplingParams {
            repetition_penalty: 1.3,
            frequency_penalty: 0.5,
            ..greedy()
        };
        let mut s = Sampler::new(&p, 4, &[3, 9, u32::MAX]);
        s.record(u32::MAX);
        s.record(2);
        // Logits shorter than the vocabulary: ids past the row are skipped too.
        assert_eq!(s.sample(&mut [0.0, 1.0, 5.0], &[]), Ok(2));
    }

    #[test]
    fn suppressed_tokens_are_never_chosen() {
        let mut s = Sampler::new(&greedy(), 4, &[]);
        assert_eq!(s.sample(&mut [9.0, 1.0, 8.0, 0.0], &[0, 7]), Ok(2));
        let mut s = Sampler::new(&params(), 4, &[]);
        let logits = [9.0, 1.0, 8.0, 0.0];
        for _ in 0..500 {
            let t = s.sample(&mut logits.clone(), &[0, 2]).expect("sample");
            assert!(t == 1 || t == 3);
        }
    }

    #[test]
    fn unsampleable_logits_are_errors() {
        let mut s = Sampler::new(&params(), 4, &[]);
        assert_eq!(s.sample(&mut [], &[]), Err(SamplingError::EmptyLogits));
        assert_eq!(
            s.sample(&mut [1.0, 2.0], &[0, 1]),
            Err(SamplingError::NoCandidate)
        );
        assert_eq!(
            s.sample(&mut [f32::NAN, f32::NEG_INFINITY], &[]),
            Err(SamplingError::NoCandidate)
        );
        // NaN logits are skipped when others are usable.
        for _ in 0..50 {
            assert_eq!(s.sample(&mut [f32::NAN, 0.0, f32::NAN], &[]), Ok(1));
        }
        // A +inf logit takes everything.
        assert_eq!(s.sample(&mut [0.0, f32::INFINITY, 3.0], &[]), Ok(1));
    }

    #[test]
    fn default_params_are_valid() {
        assert_eq!(validate_params(&SamplingParams::default(), 10), Ok(()));
        let edge = SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            min_p: 1.0,
            repetition_penalty: 0.01,
            presence_penalty: -2.0,
            frequency_penalty: 2.0,
            max_tokens: 1,
            min_tokens: 1,
            stop_token_ids: vec![9],
            stop: vec!["x".into()],
            ..SamplingParams::default()
        };
        assert_eq!(validate_params(&edge, 10), Ok(()));
    }

    #[test]
    fn each_bad_field_is_named() {
        let base = SamplingParams::default();
        let cases: Vec<(SamplingParams, &str)> = vec![
            (
                SamplingParams {
                    temperature: -0.1,
                    ..base.clone()
                },
                "temperature",
            ),
            (
                SamplingParams {
                    temperature: f32::NAN,
                    ..base.clone()
                },
                "temperature",
            ),
            (
                SamplingParams {
                    temperature: f32::INFINITY,
                    ..base.clone()
                },
                "temperature",
            ),
            (
                SamplingParams {
                    top_p: 0.0,
                    ..base.clone()
                },
                "top_p",
            ),
            (
                SamplingParams {
                    top_p: 1.01,
                    ..base.clone()
                },
                "top_p",
            ),
            (
                SamplingParams {
                    top_p: f32::NAN,
                    ..base.clone()
                },
                "top_p",
            ),
            (
                SamplingParams {
                    min_p: -0.01,
                    ..base.clone()
                },
                "min_p",
            ),
            (
                SamplingParams {
                    min_p: 1.5,
                    ..base.clone()
                },
                "min_p",
            ),
            (
                SamplingParams {
                    min_p: f32::NAN,
                    ..base.clone()
                },
                "min_p",
            ),
            (
                SamplingParams {
                    repetition_penalty: 0.0,
                    ..base.clone()
                },
                "repetition_penalty",
            ),
            (
                SamplingParams {
                    repetition_penalty: -1.0,
                    ..base.clone()
                },
                "repetition_penalty",
            ),
            (
                SamplingParams {
                    repetition_penalty: f32::INFINITY,
                    ..base.clone()
                },
                "repetition_penalty",
            ),
            (
                SamplingParams {
                    presence_penalty: f32::NAN,
                    ..base.clone()
                },
                "presence_penalty",
            ),
            (
                SamplingParams {
                    frequency_penalty: f32::NEG_INFINITY,
                    ..base.clone()
                },
                "frequency_penalty",
            ),
            (
                SamplingParams {
                    max_tokens: 0,
                    min_tokens: 0,
                    ..base.clone()
                },
                "max_tokens",
            ),
            (
                SamplingParams {
                    max_tokens: 4,
                    min_tokens: 5,
                    ..base.clone()
                },
                "min_tokens",
            ),
            (
                SamplingParams {
                    stop_token_ids: vec![3, 10],
                    ..base.clone()
                },
                "stop_token_ids",
            ),
            (
                SamplingParams {
                    stop: vec!["a".into(), String::new()],
                    ..base.clone()
                },
                "stop",
            ),
        ];
        for (p, field) in cases {
            let err = validate_params(&p, 10).expect_err(field);
            assert_eq!(err.field(), Some(field), "{err}");
            assert!(err.to_string().contains(field) || field == "stop", "{err}");
        }
        let err = validate_params(
            &SamplingParams {
                stop_token_ids: vec![10],
                ..base
            },
            10,
        );
        assert_eq!(
            err,
            Err(SamplingError::StopTokenId {
                token: 10,
                vocab_size: 10
            })
        );
    }
}
