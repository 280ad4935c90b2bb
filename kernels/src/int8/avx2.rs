//! AVX2: `vpmaddubsw` (u8 × i8 pairs summed into i16, saturating) then `vpmaddwd` against
//! ones (pairs of i16 into i32) — the four-product lane `vpdpbusd` computes, in two
//! instructions. 4-bit codes (≤ 15) cannot saturate the i16 pairs; Q8_0 codes can
//! (255 · 127 · 2 > 32767), so Q8_0 runs signed: `|w|` times `x` with `w`'s sign
//! (`vpsignb`), |w| ≤ 128, as llama.cpp does.
//!
//! Q8_0 with precise activations has its own kernel ([`wide_tile`]): the signed path would
//! cost `vpsignb`, `vpmaddubsw`, `vpmaddwd` and an add per plane, two planes per four
//! columns; instead the codes are zero-extended to i16 and multiplied by the combined
//! activation `256 · q + q2` (an i16, [`crate::packed::Acts::widen`]) with one `vpmaddwd`
//! per four rows — half the instructions, the same exact integer sum.

use std::arch::x86_64::*;
#[cfg(test)]
use std::sync::atomic::{AtomicUsize, Ordering};

use super::tile::{self, Dot};
use super::Product;
use crate::packed::{self, Acts};
use crate::quant::{QuantFormat, BLOCK_WEIGHTS};

pub(super) fn available() -> bool {
    use std::sync::OnceLock;
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    })
}

struct Avx2;

/// Tokens per precise tile. The best width depends on the core, not the instruction set:
/// on an AMD Zen 4 (AVX2 forced) 4 tokens ran the model's Q4_1 matrices 4–5 % faster
/// than 2 at 8 and 32 tokens, while on an Intel Xeon (Sapphire Rapids class) 3 or 4 were
/// slower than 2 (docs/performance.md). So: 4 on AMD, 2 elsewhere.
pub(super) fn precise_tile() -> usize {
    use std::sync::OnceLock;
    static BY_VENDOR: OnceLock<usize> = OnceLock::new();
    #[cfg(test)]
    if let t @ 1.. = FORCED_TILE.load(Ordering::Relaxed) {
        return t;
    }
    *BY_VENDOR.get_or_init(|| if super::cpu_is_amd() { 4 } else { 2 })
}

/// A width forced by the tests (0: none).
#[cfg(test)]
static FORCED_TILE: AtomicUsize = AtomicUsize::new(0);

/// Forces the precise tile width (1..=8; 0 goes back to the vendor's), so tests cover
/// every width on any CPU. Any width computes the same sums.
#[cfg(test)]
pub(crate) fn force_precise_tile(tokens: usize) {
    FORCED_TILE.store(tokens.min(8), Ordering::Relaxed);
}

impl Dot for Avx2 {
    const MAX_TOKENS_FAST: usize = 4;

    fn max_tokens_precise() -> usize {
        precise_tile()
    }
    const SIGNED_Q8: bool = true;

    #[inline(always)]
    unsafe fn dot<const SIGNED: bool>(
        acc: __m256i,
        w: __m256i,
        ws: __m256i,
        x: __m256i,
    ) -> __m256i {
        // SAFETY: the caller enables the features.
        unsafe {
            let x = if SIGNED { _mm256_sign_epi8(x, ws) } else { x };
            let pairs = _mm256_maddubs_epi16(w, x);
            _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
        }
    }

    const PAIRS: bool = true;

    #[inline(always)]
    unsafe fn pairs(w: __m256i, x: __m256i) -> __m256i {
        // SAFETY: the caller enables the features.
        unsafe { _mm256_maddubs_epi16(w, x) }
    }

    #[inline(always)]
    unsafe fn widen(p: __m256i) -> __m256i {
        // SAFETY: the caller enables the features.
        unsafe { _mm256_madd_epi16(p, _mm256_set1_epi16(1)) }
    }
}

/// See [`super::groups`].
///
/// # Safety
/// [`available`] must be true; the rest as [`super::groups`].
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn groups(p: &Product<'_, '_>, g0: usize, g1: usize) {
    // SAFETY: features enabled on this function; the rest is forwarded.
    unsafe {
        if wide(p.format, p.acts.precise) {
            wide_groups(p, g0, g1)
        } else {
            tile::groups::<Avx2>(p, g0, g1)
        }
    }
}

/// Whether a product of `format` runs [`wide_tile`] (and needs [`Acts::widen`]).
pub(super) fn wide(format: QuantFormat, precise: bool) -> bool {
    format == QuantFormat::Q8_0 && precise
}

/// Tokens per [`wide_tile`]: two i32 and one f32 accumulator each, beside the two weight
/// registers, the broadcast, the scales and the lane order, fit the 16 registers with
/// three (four spill: 89–92 GMAC/s against 96–102 on the output head at 32 tokens).
const WIDE_TOKENS: usize = 3;

/// Q8_0 groups `g0..g1` against the combined i16 activations.
///
/// # Safety
/// As [`groups`]; `p.acts.wide` must hold `p.n × p.cols` codes.
#[inline(always)]
unsafe fn wide_groups(p: &Product<'_, '_>, g0: usize, g1: usize) {
    let Product {
        data,
        cols,
        acts,
        n,
        out,
        ..
    } = *p;
    let nb = cols / BLOCK_WEIGHTS;
    let rec = packed::record_bytes(QuantFormat::Q8_0);
    assert!(data.len() >= g1 * nb * rec, "packed data too short");
    assert!(acts.wide.len() >= n * cols, "activations not widened");
    assert!(acts.sq.len() >= n * nb && acts.d.len() >= n * nb);
    for g in g0..g1 {
        let recs = data[g * nb * rec..].as_ptr();
        let mut t0 = 0;
        while t0 < n {
            let t = (n - t0).min(WIDE_TOKENS);
            // SAFETY: the asserts above cover every pointer the tile reads; row
            // ownership is this function's contract.
            unsafe {
                match t {
                    1 => tile::store(out, t0, g, wide_tile::<1>(recs, nb, cols, acts, t0)),
                    2 => tile::store(out, t0, g, wide_tile::<2>(recs, nb, cols, acts, t0)),
                    _ => tile::store(out, t0, g, wide_tile::<3>(recs, nb, cols, acts, t0)),
                }
            }
            t0 += t;
        }
    }
}

/// The lane order `vphaddd` of the two half-accumulators leaves the rows in
/// (0 1 4 5 | 2 3 6 7); the permutation is its own inverse.
#[inline(always)]
unsafe fn hadd_order() -> __m256i {
    // SAFETY: the caller enables AVX.
    unsafe { _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7) }
}

/// One Q8_0 group (8 rows) against tokens `t0..t0 + T`, over all `nb` blocks.
///
/// Weight register `k` of a record holds four columns of each row (row `j` at bytes
/// `4j..4j+4`); zero-extended, its low half is rows 0–3 and its high half rows 4–7 as
/// i16, and `vpmaddwd` against the token's four combined codes (broadcast as one 64-bit
/// lane) sums two columns per i32 lane: lanes `2j`, `2j + 1` of a half are row `j`'s.
/// Per block, `vphaddd` joins the lane pairs, `128 · Σ codes` removes the code bias
/// (`c = w + 128`), and the row and token scales apply. Bounds: `|Σ c · x|` over a block
/// is at most 32 · 255 · 32 639 < 2³¹.
#[inline(always)]
unsafe fn wide_tile<const T: usize>(
    recs: *const u8,
    nb: usize,
    cols: usize,
    acts: &Acts,
    t0: usize,
) -> [__m256; T] {
    let rec = packed::record_bytes(QuantFormat::Q8_0);
    let sb = packed::scale_bytes(QuantFormat::Q8_0);
    let bias = packed::code_bias(QuantFormat::Q8_0);
    // SAFETY: see `wide_groups`.
    unsafe {
        let order = hadd_order();
        let mut acc = [_mm256_setzero_ps(); T];
        let xw = acts.wide.as_ptr();
        for b in 0..nb {
            let r = recs.add(b * rec);
            let dv = _mm256_permutevar8x32_ps(
                _mm256_cvtph_ps(_mm_loadu_si128(r as *const __m128i)),
                order,
            );
            let wp = r.add(sb);
            let mut lo = [_mm256_setzero_si256(); T];
            let mut hi = [_mm256_setzero_si256(); T];
            for k in 0..8 {
                let wl = _mm256_cvtepu8_epi16(_mm_loadu_si128(wp.add(32 * k) as *const __m128i));
                let wh =
                    _mm256_cvtepu8_epi16(_mm_loadu_si128(wp.add(32 * k + 16) as *const __m128i));
                for t in 0..T {
                    let at = (t0 + t) * cols + b * BLOCK_WEIGHTS + 4 * k;
                    let xv = _mm256_set1_epi64x(std::ptr::read_unaligned(xw.add(at) as *const i64));
                    lo[t] = _mm256_add_epi32(lo[t], _mm256_madd_epi16(wl, xv));
                    hi[t] = _mm256_add_epi32(hi[t], _mm256_madd_epi16(wh, xv));
                }
            }
            for t in 0..T {
                let tb = (t0 + t) * nb + b;
                let s = _mm256_sub_epi32(
                    _mm256_hadd_epi32(lo[t], hi[t]),
                    _mm256_set1_epi32(bias * *acts.sq.as_ptr().add(tb)),
                );
                let scale = _mm256_mul_ps(dv, _mm256_set1_ps(*acts.d.as_ptr().add(tb)));
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scale, acc[t]);
            }
        }
        // Back to row order.
        for a in &mut acc {
            *a = _mm256_permutevar8x32_ps(*a, order);
        }
        acc
    }
}
