//! The register tile every x86 int8 level runs: eight packed rows (one 256-bit register
//! per four columns) against up to `T` tokens, over all blocks of a row. Generic over the
//! instruction that turns four u8 × i8 products into one i32 lane ([`Dot`]);
//! [`crate::packed::groups_portable`] is its reference.

use std::arch::x86_64::*;

use super::Product;
use crate::gemm::OutWriter;
use crate::packed::{self, Acts, GROUP};
use crate::quant::{QuantFormat, BLOCK_WEIGHTS};

/// One instruction set's u8 × i8 dot product.
pub(super) trait Dot {
    /// Most tokens per tile with one activation plane and with two: weight registers,
    /// `T` accumulators and `T` partial sums per plane must fit the register file.
    const MAX_TOKENS_FAST: usize;
    fn max_tokens_precise() -> usize;
    /// Whether Q8_0 weights are used signed (`code ^ 0x80`, no bias correction): an
    /// unsigned code up to 255 times an i8 would overflow `vpmaddubsw`'s i16 pairs.
    const SIGNED_Q8: bool;

    /// `acc + Σ` over each group of four bytes of `w` (unsigned) × `x` (signed), per
    /// i32 lane. With `SIGNED`, `w` is `|ws|` and the product takes the sign of `ws`.
    ///
    /// # Safety
    /// The CPU features of the implementation must be enabled in the caller.
    unsafe fn dot<const SIGNED: bool>(acc: __m256i, w: __m256i, ws: __m256i, x: __m256i)
        -> __m256i;

    /// Whether 4-bit blocks run as [`Dot::pairs`] summed in i16 over the block's eight
    /// weight registers, then one [`Dot::widen`] (4-bit codes keep the i16 sums below
    /// 8 · 2 · 15 · 127 = 30 480): one instruction per product instead of two.
    const PAIRS: bool = false;

    /// Per i16 lane, the sum of two u8 × i8 products (unsigned `w`, signed `x`).
    ///
    /// # Safety
    /// As [`Dot::dot`]; called only when [`Dot::PAIRS`].
    #[inline(always)]
    unsafe fn pairs(_w: __m256i, _x: __m256i) -> __m256i {
        unreachable!("pairs without PAIRS")
    }

    /// Pairs of i16 lanes summed into i32 lanes.
    ///
    /// # Safety
    /// As [`Dot::dot`]; called only when [`Dot::PAIRS`].
    #[inline(always)]
    unsafe fn widen(_p: __m256i) -> __m256i {
        unreachable!("widen without PAIRS")
    }
}

trait Fmt {
    const FORMAT: QuantFormat;
    const NIBBLES: bool;
    const HAS_MIN: bool;
}
struct Q40;
struct Q41;
struct Q80;
impl Fmt for Q40 {
    const FORMAT: QuantFormat = QuantFormat::Q4_0;
    const NIBBLES: bool = true;
    const HAS_MIN: bool = false;
}
impl Fmt for Q41 {
    const FORMAT: QuantFormat = QuantFormat::Q4_1;
    const NIBBLES: bool = true;
    const HAS_MIN: bool = true;
}
impl Fmt for Q80 {
    const FORMAT: QuantFormat = QuantFormat::Q8_0;
    const NIBBLES: bool = false;
    const HAS_MIN: bool = false;
}

/// Groups `g0..g1` of `p` (see [`super::groups`]).
///
/// # Safety
/// `D`'s CPU features must be enabled in the (inlining) caller and present; the rest as
/// [`super::groups`].
#[inline(always)]
pub(super) unsafe fn groups<D: Dot>(p: &Product<'_, '_>, g0: usize, g1: usize) {
    let precise = p.acts.precise;
    // SAFETY: forwarded.
    unsafe {
        match p.format {
            QuantFormat::Q4_0 if precise => groups_fmt::<D, Q40, true>(p, g0, g1),
            QuantFormat::Q4_1 if precise => groups_fmt::<D, Q41, true>(p, g0, g1),
            QuantFormat::Q8_0 if precise => groups_fmt::<D, Q80, true>(p, g0, g1),
            QuantFormat::Q4_0 => groups_fmt::<D, Q40, false>(p, g0, g1),
            QuantFormat::Q4_1 => groups_fmt::<D, Q41, false>(p, g0, g1),
            QuantFormat::Q8_0 => groups_fmt::<D, Q80, false>(p, g0, g1),
        }
    }
}

#[inline(always)]
unsafe fn groups_fmt<D: Dot, F: Fmt, const P: bool>(p: &Product<'_, '_>, g0: usize, g1: usize) {
    let Product {
        data,
        cols,
        acts,
        n,
        out,
        ..
    } = *p;
    let nb = cols / BLOCK_WEIGHTS;
    let rec = packed::record_bytes(F::FORMAT);
    assert!(data.len() >= g1 * nb * rec, "packed data too short");
    assert!(acts.q.len() >= n * cols && acts.d.len() >= n * nb);
    assert!(!P || acts.q2.len() >= n * cols);
    assert!(acts.sq.len() >= n * nb && acts.xs.len() >= n * nb);
    let max = if P {
        D::max_tokens_precise()
    } else {
        D::MAX_TOKENS_FAST
    }
    .clamp(1, 8);
    for g in g0..g1 {
        let recs = data[g * nb * rec..].as_ptr();
        let mut t0 = 0;
        while t0 < n {
            let t = (n - t0).min(max);
            // SAFETY: the asserts above cover every pointer the tile reads; row
            // ownership is this function's contract.
            unsafe {
                match t {
                    1 => store(out, t0, g, tile::<D, F, P, 1>(recs, nb, cols, acts, t0)),
                    2 => store(out, t0, g, tile::<D, F, P, 2>(recs, nb, cols, acts, t0)),
                    3 => store(out, t0, g, tile::<D, F, P, 3>(recs, nb, cols, acts, t0)),
                    4 => store(out, t0, g, tile::<D, F, P, 4>(recs, nb, cols, acts, t0)),
                    5 => store(out, t0, g, tile::<D, F, P, 5>(recs, nb, cols, acts, t0)),
                    6 => store(out, t0, g, tile::<D, F, P, 6>(recs, nb, cols, acts, t0)),
                    7 => store(out, t0, g, tile::<D, F, P, 7>(recs, nb, cols, acts, t0)),
                    _ => store(out, t0, g, tile::<D, F, P, 8>(recs, nb, cols, acts, t0)),
                }
            }
            t0 += t;
        }
    }
}

/// Write a tile's eight consecutive rows for each of its tokens.
#[inline(always)]
pub(super) unsafe fn store<const T: usize>(
    out: &OutWriter<'_>,
    t0: usize,
    g: usize,
    acc: [__m256; T],
) {
    for (t, a) in acc.iter().enumerate() {
        let mut v = [0f32; GROUP];
        // SAFETY: `v` has eight floats.
        unsafe { _mm256_storeu_ps(v.as_mut_ptr(), *a) };
        for (j, &x) in v.iter().enumerate() {
            // SAFETY: row ownership is the caller's contract.
            unsafe { out.put(t0 + t, g * GROUP + j, x) };
        }
    }
}

/// `D::dot`, signed or not (a constant at every call site).
#[inline(always)]
unsafe fn dot<D: Dot>(signed: bool, acc: __m256i, w: __m256i, ws: __m256i, x: __m256i) -> __m256i {
    // SAFETY: the caller enables `D`'s features.
    unsafe {
        if signed {
            D::dot::<true>(acc, w, ws, x)
        } else {
            D::dot::<false>(acc, w, ws, x)
        }
    }
}

/// One group (8 rows) against tokens `t0..t0 + T`, over all `nb` blocks.
#[inline(always)]
unsafe fn tile<D: Dot, F: Fmt, const P: bool, const T: usize>(
    recs: *const u8,
    nb: usize,
    cols: usize,
    acts: &Acts,
    t0: usize,
) -> [__m256; T] {
    let rec = packed::record_bytes(F::FORMAT);
    let sb = packed::scale_bytes(F::FORMAT);
    // Q8_0 taken signed needs no bias correction: its codes are the stored i8 weights.
    let signed = D::SIGNED_Q8 && !F::NIBBLES;
    let bias = if signed {
        0
    } else {
        packed::code_bias(F::FORMAT)
    };
    // With one or two tokens, two partial sums per token hide the latency of the
    // dependent dot-product chain (the precise mode has two chains anyway).
    let pairs = D::PAIRS && F::NIBBLES;
    let split = !P && T <= 2 && !pairs;
    // SAFETY: see `groups_fmt`.
    unsafe {
        let mask = _mm256_set1_epi8(0x0F);
        let flip = _mm256_set1_epi8(-128);
        let mut acc = [_mm256_setzero_ps(); T];
        let xq = acts.q.as_ptr();
        let xq2 = acts.q2.as_ptr();
        for b in 0..nb {
            let r = recs.add(b * rec);
            let dv = _mm256_cvtph_ps(_mm_loadu_si128(r as *const __m128i));
            let wp = r.add(sb);
            let raw: [__m256i; 8] = if F::NIBBLES {
                let p: [__m256i; 4] =
                    std::array::from_fn(|k| _mm256_loadu_si256(wp.add(32 * k) as *const __m256i));
                std::array::from_fn(|k| {
                    if k < 4 {
                        _mm256_and_si256(p[k], mask)
                    } else {
                        _mm256_and_si256(_mm256_srli_epi16::<4>(p[k - 4]), mask)
                    }
                })
            } else {
                std::array::from_fn(|k| _mm256_loadu_si256(wp.add(32 * k) as *const __m256i))
            };
            // Signed Q8_0: `ws` the i8 weights, `w` their magnitudes.
            let ws: [__m256i; 8] = if signed {
                std::array::from_fn(|k| _mm256_xor_si256(raw[k], flip))
            } else {
                raw
            };
            let w: [__m256i; 8] = if signed {
                std::array::from_fn(|k| _mm256_abs_epi8(ws[k]))
            } else {
                raw
            };
            let mut s0 = [_mm256_setzero_si256(); T];
            let mut s1 = [_mm256_setzero_si256(); T];
            for k in 0..8 {
                for t in 0..T {
                    let at = (t0 + t) * cols + b * BLOCK_WEIGHTS + 4 * k;
                    let xv = _mm256_set1_epi32(std::ptr::read_unaligned(xq.add(at) as *const i32));
                    if pairs {
                        let p = D::pairs(w[k], xv);
                        if P {
                            let xv2 = _mm256_set1_epi32(std::ptr::read_unaligned(
                                xq2.add(at) as *const i32
                            ));
                            s1[t] = _mm256_add_epi16(s1[t], D::pairs(w[k], xv2));
                            s0[t] = _mm256_add_epi16(s0[t], p);
                        } else {
                            s0[t] = _mm256_add_epi16(s0[t], p);
                        }
                    } else if P {
                        let xv2 =
                            _mm256_set1_epi32(std::ptr::read_unaligned(xq2.add(at) as *const i32));
                        s1[t] = dot::<D>(signed, s1[t], w[k], ws[k], xv2);
                        s0[t] = dot::<D>(signed, s0[t], w[k], ws[k], xv);
                    } else if split && k % 2 == 1 {
                        s1[t] = dot::<D>(signed, s1[t], w[k], ws[k], xv);
                    } else {
                        s0[t] = dot::<D>(signed, s0[t], w[k], ws[k], xv);
                    }
                }
            }
            let mv = if F::HAS_MIN {
                _mm256_cvtph_ps(_mm_loadu_si128(r.add(16) as *const __m128i))
            } else {
                _mm256_setzero_ps()
            };
            for t in 0..T {
                let tb = (t0 + t) * nb + b;
                if pairs {
                    s0[t] = D::widen(s0[t]);
                    if P {
                        s1[t] = D::widen(s1[t]);
                    }
                }
                let mut s = if P {
                    _mm256_add_epi32(_mm256_slli_epi32::<8>(s0[t]), s1[t])
                } else if split {
                    _mm256_add_epi32(s0[t], s1[t])
                } else {
                    s0[t]
                };
                if bias != 0 {
                    s = _mm256_sub_epi32(s, _mm256_set1_epi32(bias * *acts.sq.as_ptr().add(tb)));
                }
                let scale = _mm256_mul_ps(dv, _mm256_set1_ps(*acts.d.as_ptr().add(tb)));
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scale, acc[t]);
                if F::HAS_MIN {
                    acc[t] = _mm256_fmadd_ps(mv, _mm256_set1_ps(*acts.xs.as_ptr().add(tb)), acc[t]);
                }
            }
        }
        acc
    }
}
