//! Paged attention on the CPU.
//!
//! The KV cache of one layer is a pool of fixed-size blocks; a sequence owns a
//! list of block ids (its block table) and its position `p` lives in block
//! `block_table[p / block_size]` at offset `p % block_size`. Attention walks
//! the table block by block with an online (running max / running sum)
//! softmax, so no score buffer larger than one block per head is ever
//! materialised, whatever the context length.

use crate::error::{check_len, checked_product, KernelError};
use crate::simd::{Level, LANES};

/// An element type of the KV cache: `f32`, or `half::f16` (half the memory and half the
/// bytes each decode step reads; values are rounded to f16 when written, and attention
/// computes in f32).
pub trait KvElem: Copy + Default + Send + Sync + 'static {
    /// Round an f32 to this type.
    fn from_f32(v: f32) -> Self;
    /// Widen to f32.
    fn to_f32(self) -> f32;
    /// Eight consecutive elements at `p`, widened to f32.
    ///
    /// # Safety
    /// `p` must be valid for eight reads; AVX2/F16C must be available.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl KvElem for f32 {
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        // SAFETY: the caller guarantees eight readable floats and AVX.
        unsafe { std::arch::x86_64::_mm256_loadu_ps(p) }
    }
}

impl KvElem for half::f16 {
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        half::f16::from_f32(v)
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller guarantees eight readable halves (16 bytes) and F16C.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
    }
}

/// Portable `Σ a[i] · b[i]` over f32 queries and cache rows of any element type.
#[inline(always)]
pub(crate) fn dot_elems<E: KvElem>(a: &[f32], b: &[E]) -> f32 {
    let len = a.len().min(b.len());
    let (a, b) = (&a[..len], &b[..len]);
    let mut acc = [0f32; LANES];
    let mut ca = a.chunks_exact(LANES);
    let mut cb = b.chunks_exact(LANES);
    for (xa, xb) in (&mut ca).zip(&mut cb) {
        for l in 0..LANES {
            acc[l] += xa[l] * xb[l].to_f32();
        }
    }
    let mut tail = 0f32;
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        tail += x * y.to_f32();
    }
    crate::simd::hsum_lanes(&acc) + tail
}

/// Shape of one layer's K (or V) cache:
/// `[num_blocks][block_size][num_kv_heads][head_dim]` elements, row-major.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvShape {
    /// Blocks in the pool.
    pub num_blocks: usize,
    /// Token slots per block.
    pub block_size: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Dimension of each head.
    pub head_dim: usize,
}

impl KvShape {
    /// Elements in one layer's K (or V) cache:
    /// `num_blocks × block_size × num_kv_heads × head_dim` (saturating).
    pub fn layer_len(&self) -> usize {
        self.num_blocks
            .saturating_mul(self.block_size)
            .saturating_mul(self.num_kv_heads)
            .saturating_mul(self.head_dim)
    }

    /// Elements per token slot: `num_kv_heads × head_dim`.
    pub fn slot_len(&self) -> usize {
        self.num_kv_heads.saturating_mul(self.head_dim)
    }

    /// Token slots in the pool: `num_blocks × block_size`.
    pub fn num_slots(&self) -> usize {
        self.num_blocks.saturating_mul(self.block_size)
    }

    /// Check every dimension is non-zero and the total fits in `usize`;
    /// returns the layer length.
    fn validate(&self) -> Result<usize, KernelError> {
        for (what, v) in [
            ("KvShape.block_size", self.block_size),
            ("KvShape.num_kv_heads", self.num_kv_heads),
            ("KvShape.head_dim", self.head_dim),
        ] {
            if v == 0 {
                return Err(KernelError::InvalidShape {
                    what,
                    reason: "must be non-zero".into(),
                });
            }
        }
        checked_product(
            "KvShape",
            &[
                self.num_blocks,
                self.block_size,
                self.num_kv_heads,
                self.head_dim,
            ],
        )
    }
}

/// Write `n = slots.len()` tokens' keys and values (each `n × num_kv_heads ×
/// head_dim`) into the cache; token `i` goes to slot `slots[i]`, where
/// `slot = block_id × block_size + offset`.
pub fn write_kv<E: KvElem>(
    shape: &KvShape,
    k_cache: &mut [E],
    v_cache: &mut [E],
    k: &[f32],
    v: &[f32],
    slots: &[usize],
) -> Result<(), KernelError> {
    // Check both before writing either, so a bad V leaves K untouched.
    check_rows(shape, v_cache, v, slots)?;
    write_rows(shape, k_cache, k, slots)?;
    write_rows(shape, v_cache, v, slots)
}

/// Write `n = slots.len()` tokens' rows (`n × num_kv_heads × head_dim`) into one cache
/// buffer (`write_kv` is this for K and for V; a model whose values are its keys, as
/// latent attention's, keeps one buffer).
pub fn write_rows<E: KvElem>(
    shape: &KvShape,
    cache: &mut [E],
    x: &[f32],
    slots: &[usize],
) -> Result<(), KernelError> {
    check_rows(shape, cache, x, slots)?;
    let tok = shape.slot_len();
    for (&slot, xs) in slots.iter().zip(x.chunks_exact(tok)) {
        let at = slot * tok;
        for (d, &s) in cache[at..at + tok].iter_mut().zip(xs) {
            *d = E::from_f32(s);
        }
    }
    Ok(())
}

fn check_rows<E>(
    shape: &KvShape,
    cache: &[E],
    x: &[f32],
    slots: &[usize],
) -> Result<(), KernelError> {
    let layer_len = shape.validate()?;
    check_len("KV cache", layer_len, cache.len())?;
    let expected = checked_product("KV rows", &[slots.len(), shape.slot_len()])?;
    check_len("KV rows", expected, x.len())?;
    let num_slots = shape.num_slots();
    if let Some(&bad) = slots.iter().find(|&&s| s >= num_slots) {
        return Err(KernelError::OutOfRange {
            what: "KV slot",
            index: bad,
            bound: num_slots,
        });
    }
    Ok(())
}

/// One sequence's share of an attention batch.
#[derive(Debug, Clone, Copy)]
pub struct AttnSeq<'a> {
    /// First token row of this sequence in `q` / `out`.
    pub query_start: usize,
    /// Number of query rows (1 for decode, the chunk length for prefill).
    pub query_len: usize,
    /// Positions `0..context_len` are in the cache, including this chunk.
    pub context_len: usize,
    /// Block ids holding positions `0..context_len`, in order.
    pub block_table: &'a [u32],
}

/// Causal paged attention for a batch of sequences, with the usual
/// `1 / sqrt(head_dim)` scale.
///
/// `q` and `out` are `total_tokens × num_heads × head_dim`. Query `i` of a
/// sequence sits at position `context_len − query_len + i` and attends to
/// positions `0..=` that one. With grouped-query attention, head `h` reads KV
/// head `h / (num_heads / num_kv_heads)`. Token rows not covered by any
/// sequence are set to zero. Work is split over (token, KV head) pairs.
pub fn paged_attention<E: KvElem>(
    shape: &KvShape,
    k_cache: &[E],
    v_cache: &[E],
    q: &[f32],
    num_heads: usize,
    seqs: &[AttnSeq<'_>],
    out: &mut [f32],
) -> Result<(), KernelError> {
    paged_attention_ext(shape, k_cache, v_cache, q, num_heads, seqs, None, None, out)
}

/// The general form of [`paged_attention`]: a softmax scale of the caller's choosing
/// (`None`: `1 / sqrt(head_dim)`; multi-head latent attention scales by its full query
/// head, not by the cached width) and an optional sliding window: with `Some(w)` the
/// query at position `p` attends only to the `w` positions `p + 1 − w ..= p` (Mistral's
/// `sliding_window`, as transformers masks it). Blocks wholly before every query's
/// window are never read, so their table entries may name freed blocks.
#[allow(clippy::too_many_arguments)]
pub fn paged_attention_ext<E: KvElem>(
    shape: &KvShape,
    k_cache: &[E],
    v_cache: &[E],
    q: &[f32],
    num_heads: usize,
    seqs: &[AttnSeq<'_>],
    scale: Option<f32>,
    window: Option<usize>,
    out: &mut [f32],
) -> Result<(), KernelError> {
    let scale = scale.unwrap_or_else(|| 1.0 / (shape.head_dim.max(1) as f32).sqrt());
    attention_with(
        crate::simd::level(),
        shape,
        k_cache,
        v_cache,
        q,
        num_heads,
        seqs,
        scale,
        window,
        out,
    )
}

/// The first position the query at `pos` attends to.
fn first_key(pos: usize, window: Option<usize>) -> usize {
    match window {
        Some(w) => (pos + 1).saturating_sub(w.max(1)),
        None => 0,
    }
}

const NO_SEQ: usize = usize::MAX;

#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_with<E: KvElem>(
    level: Level,
    shape: &KvShape,
    k_cache: &[E],
    v_cache: &[E],
    q: &[f32],
    num_heads: usize,
    seqs: &[AttnSeq<'_>],
    scale: f32,
    window: Option<usize>,
    out: &mut [f32],
) -> Result<(), KernelError> {
    let layer_len = shape.validate()?;
    check_len("k_cache", layer_len, k_cache.len())?;
    check_len("v_cache", layer_len, v_cache.len())?;
    if num_heads == 0 || !num_heads.is_multiple_of(shape.num_kv_heads) {
        return Err(KernelError::InvalidShape {
            what: "num_heads",
            reason: format!(
                "{num_heads} query heads cannot be grouped over {} KV heads",
                shape.num_kv_heads
            ),
        });
    }
    let hd = shape.head_dim;
    let row = checked_product("attention q row", &[num_heads, hd])?;
    if !q.len().is_multiple_of(row) {
        return Err(KernelError::InvalidShape {
            what: "attention q",
            reason: format!(
                "length {} is not a multiple of num_heads × head_dim = {row}",
                q.len()
            ),
        });
    }
    check_len("attention out", q.len(), out.len())?;
    let total_tokens = q.len() / row;

    // Map each token row to the sequence that owns it, validating as we go.
    let mut owner = vec![NO_SEQ; total_tokens];
    let mut work = 0usize;
    for (si, s) in seqs.iter().enumerate() {
        let end = s.query_start.saturating_add(s.query_len);
        if end > total_tokens {
            return Err(KernelError::OutOfRange {
                what: "sequence query end",
                index: end,
                bound: total_tokens + 1,
            });
        }
        if s.query_len > s.context_len {
            return Err(KernelError::InvalidShape {
                what: "AttnSeq",
                reason: format!(
                    "query_len {} exceeds context_len {}",
                    s.query_len, s.context_len
                ),
            });
        }
        if s.query_len == 0 {
            continue;
        }
        let blocks = s.context_len.div_ceil(shape.block_size);
        if s.block_table.len() < blocks {
            return Err(KernelError::LengthMismatch {
                what: "block_table",
                expected: blocks,
                actual: s.block_table.len(),
            });
        }
        // Only the blocks some query's window reaches are read.
        let first_block = first_key(s.context_len - s.query_len, window) / shape.block_size;
        if let Some(&bad) = s.block_table[first_block..blocks]
            .iter()
            .find(|&&b| b as usize >= shape.num_blocks)
        {
            return Err(KernelError::OutOfRange {
                what: "block id",
                index: bad as usize,
                bound: shape.num_blocks,
            });
        }
        for o in &mut owner[s.query_start..end] {
            if *o != NO_SEQ {
                return Err(KernelError::InvalidShape {
                    what: "AttnSeq",
                    reason: format!("sequences {} and {si} share query rows", *o),
                });
            }
            *o = si;
        }
        work = work.saturating_add(s.query_len.saturating_mul(s.context_len));
    }

    let nkv = shape.num_kv_heads;
    let group = num_heads / nkv;
    let chunk = group * hd;
    let task = |scratch: &mut Vec<f32>, (c, out_g): (usize, &mut [f32])| {
        let (t, kv_head) = (c / nkv, c % nkv);
        let si = owner[t];
        if si == NO_SEQ {
            out_g.fill(0.0);
            return;
        }
        let s = &seqs[si];
        let pos = s.context_len - s.query_len + (t - s.query_start);
        let job = GroupJob {
            shape,
            k_cache,
            v_cache,
            q: &q[t * row + kv_head * chunk..t * row + (kv_head + 1) * chunk],
            block_table: s.block_table,
            first_key: first_key(pos, window),
            n_keys: pos + 1,
            kv_head,
            scale,
        };
        match level {
            // SAFETY: the portable ops need no target features.
            Level::Scalar => unsafe { attend_group::<PortableOps, E>(&job, out_g, scratch) },
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => {
                // SAFETY: Avx2 is only selected when the CPU supports it.
                unsafe { crate::x86::attend_group_avx2(&job, out_g, scratch) }
            }
        }
    };
    let macs = work.saturating_mul(num_heads).saturating_mul(hd);
    let threads = crate::pool::threads();
    if macs < crate::gemm::PARALLEL_MIN_MACS || threads <= 1 {
        let mut scratch = Vec::new();
        out.chunks_mut(chunk)
            .enumerate()
            .for_each(|item| task(&mut scratch, item));
    } else {
        // Runs of (token, KV head) items, about eight per thread: their costs differ
        // with each sequence's context.
        let items = out.len() / chunk;
        let per = items.div_ceil((threads * 8).min(items).max(1));
        let parts: Vec<(usize, &mut [f32])> = out.chunks_mut(per * chunk).enumerate().collect();
        crate::pool::for_each(parts, |(p, part)| {
            let mut scratch = Vec::new();
            for (j, out_g) in part.chunks_mut(chunk).enumerate() {
                task(&mut scratch, (p * per + j, out_g));
            }
        });
    }
    Ok(())
}

/// Vector primitives the attention loop is generic over, so each
/// instruction-set variant is compiled as one inlined unit.
pub(crate) trait VecOps {
    /// For every query head `g` of a group (`q` holds `group × hd` values):
    /// `out[g · bs + j] = scale · q_g · rows[j]` for `j < count`, where row `j` is
    /// `rows[j * stride..j * stride + hd]`. An implementation may read each row once for
    /// all the group's heads.
    ///
    /// # Safety
    /// The implementation's target features must be available; `rows` must hold every
    /// row addressed and `out` `group × bs` values, `count ≤ bs`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn scores<E: KvElem>(
        q: &[f32],
        hd: usize,
        rows: &[E],
        stride: usize,
        scale: f32,
        out: &mut [f32],
        bs: usize,
        count: usize,
    );
    /// `s[i] ← exp(s[i] − shift)` for every element; returns the new sum.
    ///
    /// # Safety
    /// As for `scores`.
    unsafe fn exp_shift_sum(s: &mut [f32], shift: f32) -> f32;
    /// For every head `g` of a group (`out` holds `group × hd` values):
    /// `out_g ← out_g · corr[g] + Σ_j p[g · bs + j] · rows[j]` over `j < count`, where
    /// row `j` is `rows[j * stride..j * stride + hd]`.
    ///
    /// # Safety
    /// As for `scores`; `p` must hold `group × bs` values.
    #[allow(clippy::too_many_arguments)]
    unsafe fn rescale_accumulate<E: KvElem>(
        out: &mut [f32],
        hd: usize,
        corr: &[f32],
        p: &[f32],
        bs: usize,
        count: usize,
        rows: &[E],
        stride: usize,
    );
    /// `y ← y · a`.
    ///
    /// # Safety
    /// As for `scores`.
    unsafe fn scale(y: &mut [f32], a: f32);

    /// A hint that `count` rows of `hd` elements, `stride` apart from `rows`, are read
    /// soon (the next KV block: paged, so the hardware prefetchers cannot guess it). It
    /// only warms the cache: any address is allowed, none is dereferenced.
    #[inline(always)]
    fn prefetch_rows<E>(_rows: *const E, _count: usize, _stride: usize, _hd: usize) {}
}

/// Portable vector primitives.
pub(crate) struct PortableOps;

impl VecOps for PortableOps {
    #[inline(always)]
    unsafe fn scores<E: KvElem>(
        q: &[f32],
        hd: usize,
        rows: &[E],
        stride: usize,
        scale: f32,
        out: &mut [f32],
        bs: usize,
        count: usize,
    ) {
        for (g, qg) in q.chunks_exact(hd).enumerate() {
            for (j, o) in out[g * bs..g * bs + count].iter_mut().enumerate() {
                *o = dot_elems(qg, &rows[j * stride..j * stride + hd]) * scale;
            }
        }
    }

    #[inline(always)]
    unsafe fn exp_shift_sum(s: &mut [f32], shift: f32) -> f32 {
        let mut sum = 0f32;
        for v in s.iter_mut() {
            *v = (*v - shift).exp();
            sum += *v;
        }
        sum
    }

    #[inline(always)]
    unsafe fn rescale_accumulate<E: KvElem>(
        out: &mut [f32],
        hd: usize,
        corr: &[f32],
        p: &[f32],
        bs: usize,
        count: usize,
        rows: &[E],
        stride: usize,
    ) {
        for (g, og) in out.chunks_exact_mut(hd).enumerate() {
            if corr[g] != 1.0 {
                for o in og.iter_mut() {
                    *o *= corr[g];
                }
            }
            for (j, &pj) in p[g * bs..g * bs + count].iter().enumerate() {
                let row = &rows[j * stride..j * stride + hd];
                for (o, &r) in og.iter_mut().zip(row) {
                    *o += pj * r.to_f32();
                }
            }
        }
    }

    #[inline(always)]
    unsafe fn scale(y: &mut [f32], a: f32) {
        for v in y.iter_mut() {
            *v *= a;
        }
    }
}

/// The query heads sharing one KV head, for one token.
pub(crate) struct GroupJob<'a, E> {
    shape: &'a KvShape,
    k_cache: &'a [E],
    v_cache: &'a [E],
    /// `group × head_dim` query values.
    q: &'a [f32],
    block_table: &'a [u32],
    /// Attend to positions `first_key..n_keys`.
    first_key: usize,
    n_keys: usize,
    kv_head: usize,
    scale: f32,
}

/// Online-softmax attention of one query-head group over its KV blocks,
/// writing `group × head_dim` outputs.
///
/// Scores for one block are kept per head; after each block the running
/// maximum is updated, the partial output and sum are rescaled by
/// `exp(old_max − new_max)`, and the block's values are accumulated.
///
/// # Safety
/// `O`'s target features must be available.
#[inline(always)]
pub(crate) unsafe fn attend_group<O: VecOps, E: KvElem>(
    job: &GroupJob<'_, E>,
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    let shape = job.shape;
    let (hd, bs) = (shape.head_dim, shape.block_size);
    let group = job.q.len() / hd;
    let stride = shape.slot_len();
    scratch.clear();
    scratch.resize(group * bs + 3 * group, 0.0);
    let (scores, stats) = scratch.split_at_mut(group * bs);
    let (run_max, stats) = stats.split_at_mut(group);
    let (run_sum, corr) = stats.split_at_mut(group);
    run_max.fill(f32::NEG_INFINITY);
    out.fill(0.0);

    let last_block = job.n_keys.div_ceil(bs);
    for bi in job.first_key / bs..last_block {
        let block = job.block_table[bi] as usize;
        if bi + 1 < last_block {
            // The next block's rows for this KV head load while this one computes.
            let next = job.block_table[bi + 1] as usize;
            let rows = bs.min(job.n_keys - (bi + 1) * bs);
            let at = next * bs * stride + job.kv_head * hd;
            O::prefetch_rows(job.k_cache.as_ptr().wrapping_add(at), rows, stride, hd);
            O::prefetch_rows(job.v_cache.as_ptr().wrapping_add(at), rows, stride, hd);
        }
        // The window may start inside this block.
        let lo = job.first_key.saturating_sub(bi * bs);
        let count = bs.min(job.n_keys - bi * bs) - lo;
        let base = (block * bs + lo) * stride + job.kv_head * hd;
        // Rows j < count of this block, for this KV head, `stride` apart.
        let rows_end = base + (count - 1) * stride + hd;
        let k_rows = &job.k_cache[base..rows_end];
        let v_rows = &job.v_cache[base..rows_end];

        // SAFETY: the caller runs this with `O`'s features available; `k_rows` holds
        // `count` rows of `hd`, `scores` `group × bs` values.
        unsafe { O::scores(job.q, hd, k_rows, stride, job.scale, scores, bs, count) };

        for g in 0..group {
            let s = &mut scores[g * bs..g * bs + count];
            let block_max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let new_max = run_max[g].max(block_max);
            if new_max == f32::NEG_INFINITY {
                // Every score so far is −inf: nothing carries weight yet.
                s.fill(0.0);
                corr[g] = 1.0;
                continue;
            }
            corr[g] = if run_max[g] == f32::NEG_INFINITY {
                0.0
            } else {
                (run_max[g] - new_max).exp()
            };
            run_max[g] = new_max;
            // SAFETY: as above.
            run_sum[g] = run_sum[g] * corr[g] + unsafe { O::exp_shift_sum(s, new_max) };
        }
        // SAFETY: as above; `v_rows` holds `count` rows of `hd`.
        unsafe { O::rescale_accumulate(out, hd, corr, scores, bs, count, v_rows, stride) };
    }

    for g in 0..group {
        let inv = if run_sum[g] > 0.0 {
            1.0 / run_sum[g]
        } else {
            0.0
        };
        // SAFETY: as above.
        unsafe { O::scale(&mut out[g * hd..(g + 1) * hd], inv) };
    }
}
