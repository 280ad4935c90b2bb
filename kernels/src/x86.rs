//! AVX2 + FMA + F16C implementations, selected at run time by
//! [`crate::simd::level`]. Every function here mirrors a portable one
//! elsewhere in the crate, which the tests use as its reference.

use std::arch::x86_64::*;

use crate::attention::{KvElem, VecOps};
use crate::gemm::{self, OutWriter, Tile};
use crate::quant::{QuantFormat, BLOCK_WEIGHTS};

/// Horizontal sum of eight lanes.
#[inline(always)]
unsafe fn hsum(v: __m256) -> f32 {
    // SAFETY: plain register arithmetic; the caller runs with AVX enabled.
    unsafe {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }
}

/// The AVX2 register tile: `R × T` accumulators of eight lanes each.
pub(crate) struct Avx2Tile;

impl Tile for Avx2Tile {
    #[inline(always)]
    unsafe fn tile<const R: usize, const T: usize>(
        w: [*const f32; R],
        x: [*const f32; T],
        k: usize,
    ) -> [[f32; T]; R] {
        // SAFETY: the trait contract gives `k` readable floats per pointer
        // and AVX2/FMA availability.
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); T]; R];
            let full = k - k % 8;
            let mut i = 0;
            while i < full {
                let xv: [__m256; T] = std::array::from_fn(|j| _mm256_loadu_ps(x[j].add(i)));
                for r in 0..R {
                    let wv = _mm256_loadu_ps(w[r].add(i));
                    for j in 0..T {
                        acc[r][j] = _mm256_fmadd_ps(wv, xv[j], acc[r][j]);
                    }
                }
                i += 8;
            }
            let mut res = [[0f32; T]; R];
            for r in 0..R {
                for j in 0..T {
                    let mut s = hsum(acc[r][j]);
                    for c in full..k {
                        s += *w[r].add(c) * *x[j].add(c);
                    }
                    res[r][j] = s;
                }
            }
            res
        }
    }
}

/// AVX2 instance of [`gemm::gemm_rows_generic`].
///
/// # Safety
/// Same contract as [`gemm::gemm_rows`], plus AVX2/FMA support.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn gemm_rows_avx2(
    w: &[f32],
    prow: usize,
    cols: usize,
    x: &[f32],
    n: usize,
    r0: usize,
    out: &OutWriter<'_>,
) {
    // SAFETY: forwarded contract.
    unsafe { gemm::gemm_rows_generic::<Avx2Tile>(w, prow, cols, x, n, r0, out) }
}

/// Decoding of one quantized block into four vectors of levels plus the
/// affine parameters: weight = level · d + m.
trait Block {
    const BYTES: usize;
    const HAS_MIN: bool;
    /// # Safety
    /// `p` must be valid for `BYTES` reads; AVX2/F16C must be available.
    unsafe fn load(p: *const u8) -> ([__m256; 4], f32, f32);
}

#[inline(always)]
unsafe fn f16_pair(p: *const u8) -> (f32, f32) {
    // SAFETY: the caller guarantees 4 readable bytes at `p` and F16C.
    unsafe {
        let bits = std::ptr::read_unaligned(p as *const i32);
        let v = _mm_cvtph_ps(_mm_cvtsi32_si128(bits));
        (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_movehdup_ps(v)))
    }
}

#[inline(always)]
unsafe fn f16_one(p: *const u8) -> f32 {
    // SAFETY: the caller guarantees 2 readable bytes at `p` and F16C.
    unsafe {
        let bits = std::ptr::read_unaligned(p as *const u16);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }
}

/// Split 16 bytes of packed nibbles into weights 0..16 (low nibbles) and
/// 16..32 (high nibbles), subtract `offset`, and widen to four f32 vectors.
#[inline(always)]
unsafe fn nibbles(qs: __m128i, offset: i8) -> [__m256; 4] {
    // SAFETY: register arithmetic under AVX2.
    unsafe {
        let mask = _mm_set1_epi8(0x0F);
        let off = _mm_set1_epi8(offset);
        let lo = _mm_sub_epi8(_mm_and_si128(qs, mask), off);
        let hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16::<4>(qs), mask), off);
        let widen = |v: __m128i| _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
        [
            widen(lo),
            widen(_mm_srli_si128::<8>(lo)),
            widen(hi),
            widen(_mm_srli_si128::<8>(hi)),
        ]
    }
}

struct BQ4_0;
impl Block for BQ4_0 {
    const BYTES: usize = 18;
    const HAS_MIN: bool = false;
    #[inline(always)]
    unsafe fn load(p: *const u8) -> ([__m256; 4], f32, f32) {
        // SAFETY: 18 readable bytes per the contract.
        unsafe {
            let d = f16_one(p);
            let qs = _mm_loadu_si128(p.add(2) as *const __m128i);
            (nibbles(qs, 8), d, 0.0)
        }
    }
}

struct BQ4_1;
impl Block for BQ4_1 {
    const BYTES: usize = 20;
    const HAS_MIN: bool = true;
    #[inline(always)]
    unsafe fn load(p: *const u8) -> ([__m256; 4], f32, f32) {
        // SAFETY: 20 readable bytes per the contract.
        unsafe {
            let (d, m) = f16_pair(p);
            let qs = _mm_loadu_si128(p.add(4) as *const __m128i);
            (nibbles(qs, 0), d, m)
        }
    }
}

struct BQ8_0;
impl Block for BQ8_0 {
    const BYTES: usize = 34;
    const HAS_MIN: bool = false;
    #[inline(always)]
    unsafe fn load(p: *const u8) -> ([__m256; 4], f32, f32) {
        // SAFETY: 34 readable bytes per the contract.
        unsafe {
            let d = f16_one(p);
            let q = p.add(2);
            let widen = |i: usize| {
                let v = _mm_loadl_epi64(q.add(8 * i) as *const __m128i);
                _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v))
            };
            ([widen(0), widen(1), widen(2), widen(3)], d, 0.0)
        }
    }
}

/// Dequantize consecutive blocks of `bytes` into `w` (32 weights per block).
///
/// # Safety
/// AVX2/FMA/F16C must be available.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dequantize_rows_avx2(format: QuantFormat, bytes: &[u8], w: &mut [f32]) {
    // SAFETY: features enabled on this function.
    unsafe {
        match format {
            QuantFormat::Q4_0 => dequantize_rows_fmt::<BQ4_0>(bytes, w),
            QuantFormat::Q4_1 => dequantize_rows_fmt::<BQ4_1>(bytes, w),
            QuantFormat::Q8_0 => dequantize_rows_fmt::<BQ8_0>(bytes, w),
        }
    }
}

#[inline(always)]
unsafe fn dequantize_rows_fmt<B: Block>(bytes: &[u8], w: &mut [f32]) {
    let blocks = (bytes.len() / B::BYTES).min(w.len() / BLOCK_WEIGHTS);
    // SAFETY: `blocks` bounds both the source bytes and the destination.
    unsafe {
        let src = bytes.as_ptr();
        let dst = w.as_mut_ptr();
        for b in 0..blocks {
            let (q, d, m) = B::load(src.add(b * B::BYTES));
            let dv = _mm256_set1_ps(d);
            let o = dst.add(b * BLOCK_WEIGHTS);
            if B::HAS_MIN {
                let mv = _mm256_set1_ps(m);
                for (i, qi) in q.iter().enumerate() {
                    _mm256_storeu_ps(o.add(8 * i), _mm256_fmadd_ps(*qi, dv, mv));
                }
            } else {
                for (i, qi) in q.iter().enumerate() {
                    _mm256_storeu_ps(o.add(8 * i), _mm256_mul_ps(*qi, dv));
                }
            }
        }
    }
}

/// Fused decode-and-dot over the rows in `bytes` (global rows starting at
/// `r0`) for `n` (1..=4) tokens of `x`.
///
/// # Safety
/// AVX2/FMA/F16C must be available, `x` must hold `n × cols` values, and the
/// caller must own the rows it covers in `out`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn fused_rows_avx2(
    format: QuantFormat,
    bytes: &[u8],
    cols: usize,
    r0: usize,
    x: &[f32],
    n: usize,
    out: &OutWriter<'_>,
) {
    // SAFETY: features enabled on this function; the rest is forwarded.
    unsafe {
        match format {
            QuantFormat::Q4_0 => fused_rows_fmt::<BQ4_0>(bytes, cols, r0, x, n, out),
            QuantFormat::Q4_1 => fused_rows_fmt::<BQ4_1>(bytes, cols, r0, x, n, out),
            QuantFormat::Q8_0 => fused_rows_fmt::<BQ8_0>(bytes, cols, r0, x, n, out),
        }
    }
}

/// Blocks per row whose per-block activation sums fit on the stack.
const XSUM_STACK_BLOCKS: usize = 512;

#[inline(always)]
unsafe fn fused_rows_fmt<B: Block>(
    bytes: &[u8],
    cols: usize,
    r0: usize,
    x: &[f32],
    n: usize,
    out: &OutWriter<'_>,
) {
    let nb = cols / BLOCK_WEIGHTS;
    let row_bytes = nb * B::BYTES;
    assert!(x.len() >= n * cols && (1..=4).contains(&n));
    if row_bytes == 0 {
        return;
    }
    let rows = bytes.len() / row_bytes;

    // Q4_1 folds its offset in as m · Σx over each block.
    let mut stack = [0f32; XSUM_STACK_BLOCKS];
    let mut heap = Vec::new();
    let xsum: &mut [f32] = if !B::HAS_MIN {
        &mut stack[..0]
    } else if n * nb <= XSUM_STACK_BLOCKS {
        &mut stack[..n * nb]
    } else {
        heap.resize(n * nb, 0.0);
        &mut heap
    };
    for (i, s) in xsum.iter_mut().enumerate() {
        let v = &x[i * BLOCK_WEIGHTS..(i + 1) * BLOCK_WEIGHTS];
        // SAFETY: `v` has 32 elements.
        *s = unsafe {
            let p = v.as_ptr();
            let a = _mm256_add_ps(_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)));
            let b = _mm256_add_ps(_mm256_loadu_ps(p.add(16)), _mm256_loadu_ps(p.add(24)));
            hsum(_mm256_add_ps(a, b))
        };
    }
    let xsum: &[f32] = xsum;

    let xp = |t: usize| x[t * cols..].as_ptr();
    let sp = |t: usize| {
        if B::HAS_MIN {
            xsum[t * nb..].as_ptr()
        } else {
            std::ptr::null()
        }
    };
    for r in 0..rows {
        let row = bytes[r * row_bytes..(r + 1) * row_bytes].as_ptr();
        // SAFETY: `row` covers nb blocks, each x pointer nb × 32 floats and
        // each xsum pointer nb floats (only read when HAS_MIN).
        unsafe {
            match n {
                1 => gemm::store(
                    out,
                    &[fused_row::<B, 1>(row, nb, [xp(0)], [sp(0)])],
                    0,
                    r0 + r,
                ),
                2 => gemm::store(
                    out,
                    &[fused_row::<B, 2>(row, nb, [xp(0), xp(1)], [sp(0), sp(1)])],
                    0,
                    r0 + r,
                ),
                3 => gemm::store(
                    out,
                    &[fused_row::<B, 3>(
                        row,
                        nb,
                        [xp(0), xp(1), xp(2)],
                        [sp(0), sp(1), sp(2)],
                    )],
                    0,
                    r0 + r,
                ),
                _ => gemm::store(
                    out,
                    &[fused_row::<B, 4>(
                        row,
                        nb,
                        [xp(0), xp(1), xp(2), xp(3)],
                        [sp(0), sp(1), sp(2), sp(3)],
                    )],
                    0,
                    r0 + r,
                ),
            }
        }
    }
}

/// One quantized row against `T` tokens: Σ_b d_b (q_b · x_b) + m_b Σ x_b.
#[inline(always)]
unsafe fn fused_row<B: Block, const T: usize>(
    row: *const u8,
    nb: usize,
    x: [*const f32; T],
    xsum: [*const f32; T],
) -> [f32; T] {
    // SAFETY: see `fused_rows_fmt`.
    unsafe {
        let mut acc = [_mm256_setzero_ps(); T];
        let mut macc = [0f32; T];
        for b in 0..nb {
            let (q, d, m) = B::load(row.add(b * B::BYTES));
            let dv = _mm256_set1_ps(d);
            for t in 0..T {
                let p = x[t].add(b * BLOCK_WEIGHTS);
                let s0 = _mm256_mul_ps(q[0], _mm256_loadu_ps(p));
                let s1 = _mm256_mul_ps(q[1], _mm256_loadu_ps(p.add(8)));
                let s0 = _mm256_fmadd_ps(q[2], _mm256_loadu_ps(p.add(16)), s0);
                let s1 = _mm256_fmadd_ps(q[3], _mm256_loadu_ps(p.add(24)), s1);
                acc[t] = _mm256_fmadd_ps(_mm256_add_ps(s0, s1), dv, acc[t]);
                if B::HAS_MIN {
                    macc[t] += m * *xsum[t].add(b);
                }
            }
        }
        std::array::from_fn(|t| hsum(acc[t]) + macc[t])
    }
}

/// `e^x` for eight lanes, accurate to a few ulp over the range that matters
/// for softmax. Inputs are clamped to [−87.3, 88.7] (so very negative scores
/// give a tiny positive weight instead of zero) and NaN propagates.
///
/// Method: `x = n·ln2 + r` with `|r| ≤ ln2/2`, a degree-6 Taylor polynomial
/// for `e^r`, and `2^n` assembled directly in the exponent bits.
#[inline(always)]
unsafe fn exp256(x: __m256) -> __m256 {
    // SAFETY: register arithmetic under AVX2/FMA.
    unsafe {
        // max/min return their second operand when either is NaN, so a NaN
        // `x` survives the clamp.
        let x = _mm256_max_ps(_mm256_set1_ps(-87.3), x);
        let x = _mm256_min_ps(_mm256_set1_ps(88.7), x);
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        );
        // ln 2 split into a high part exact in f32 and a small remainder.
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_145_75), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428_606_8e-6), r);
        let mut p = _mm256_set1_ps(1.0 / 720.0);
        for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        _mm256_mul_ps(p, _mm256_castsi256_ps(bits))
    }
}

/// AVX2 version of `packed::quantize_blocks`: per 32-value block, the scale
/// `amax / 127`, the i8 codes (and with `precise` the codes of the remainder, the scale
/// then divided by 256), the sum of the combined codes and the exact sum of the values.
///
/// # Safety
/// AVX2/FMA must be available.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn quantize_acts_avx2(
    x: &[f32],
    out: crate::packed::BlockOut<'_>,
    precise: bool,
) {
    let crate::packed::BlockOut { q, q2, d, sq, xs } = out;
    let blocks = d.len();
    assert!(x.len() >= blocks * 32 && q.len() >= blocks * 32);
    assert!(sq.len() >= blocks && xs.len() >= blocks);
    assert!(!precise || q2.len() >= blocks * 32);
    // SAFETY: every pointer stays inside the lengths asserted above.
    unsafe {
        let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        let hi = _mm256_set1_ps(127.0);
        let lo = _mm256_set1_ps(-127.0);
        let fine = _mm256_set1_ps(256.0);
        // packs_epi32 / packs_epi16 interleave 128-bit lanes; this puts bytes back in order.
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        let pack = |c: [__m256i; 4]| {
            let a = _mm256_packs_epi32(c[0], c[1]);
            let b = _mm256_packs_epi32(c[2], c[3]);
            _mm256_permutevar8x32_epi32(_mm256_packs_epi16(a, b), order)
        };
        for i in 0..blocks {
            let p = x.as_ptr().add(i * 32);
            let v: [__m256; 4] = std::array::from_fn(|k| _mm256_loadu_ps(p.add(8 * k)));
            let m = _mm256_max_ps(
                _mm256_max_ps(_mm256_and_ps(v[0], abs), _mm256_and_ps(v[1], abs)),
                _mm256_max_ps(_mm256_and_ps(v[2], abs), _mm256_and_ps(v[3], abs)),
            );
            let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
            let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            let amax = _mm_cvtss_f32(_mm_max_ss(m2, _mm_movehdup_ps(m2)));
            let sum = hsum(_mm256_add_ps(
                _mm256_add_ps(v[0], v[1]),
                _mm256_add_ps(v[2], v[3]),
            ));
            let (scale, inv) = if amax > 0.0 && amax.is_finite() {
                (amax / 127.0, 127.0 / amax)
            } else {
                (0.0, 0.0)
            };
            let iv = _mm256_set1_ps(inv);
            let mut codes = [_mm256_setzero_si256(); 4];
            let mut rest = [_mm256_setzero_si256(); 4];
            for k in 0..4 {
                let y = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(v[k], iv), lo), hi);
                let c = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(y);
                codes[k] = _mm256_cvtps_epi32(c);
                if precise {
                    let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                        _mm256_mul_ps(_mm256_sub_ps(y, c), fine),
                    );
                    rest[k] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi));
                }
            }
            _mm256_storeu_si256(q.as_mut_ptr().add(i * 32) as *mut __m256i, pack(codes));
            let mut total = _mm256_add_epi32(
                _mm256_add_epi32(codes[0], codes[1]),
                _mm256_add_epi32(codes[2], codes[3]),
            );
            if precise {
                _mm256_storeu_si256(q2.as_mut_ptr().add(i * 32) as *mut __m256i, pack(rest));
                let r = _mm256_add_epi32(
                    _mm256_add_epi32(rest[0], rest[1]),
                    _mm256_add_epi32(rest[2], rest[3]),
                );
                total = _mm256_add_epi32(_mm256_slli_epi32::<8>(total), r);
                d[i] = scale / 256.0;
            } else {
                d[i] = scale;
            }
            let t4 = _mm_add_epi32(
                _mm256_castsi256_si128(total),
                _mm256_extracti128_si256::<1>(total),
            );
            let t2 = _mm_add_epi32(t4, _mm_shuffle_epi32::<0b01_00_11_10>(t4));
            let t1 = _mm_add_epi32(t2, _mm_shuffle_epi32::<0b10_11_00_01>(t2));
            sq[i] = _mm_cvtsi128_si32(t1);
            xs[i] = sum;
        }
    }
}

/// `out[i] = gate[i] / (1 + e^(−gate[i])) · up[i]` for `i < len`, eight lanes at a time.
/// `out` may be `gate` (each element is read before it is written).
///
/// # Safety
/// AVX2/FMA must be available; `len` is a multiple of 8 and every pointer addresses `len`
/// floats.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn silu_mul_avx2(out: *mut f32, gate: *const f32, up: *const f32, len: usize) {
    assert!(len.is_multiple_of(8));
    // SAFETY: the caller's contract; features enabled on this function.
    unsafe {
        let one = _mm256_set1_ps(1.0);
        for i in (0..len).step_by(8) {
            let g = _mm256_loadu_ps(gate.add(i));
            let u = _mm256_loadu_ps(up.add(i));
            let e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), g));
            let y = _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), u);
            _mm256_storeu_ps(out.add(i), y);
        }
    }
}

/// AVX2 vector helpers for attention.
pub(crate) struct Avx2Ops;

impl VecOps for Avx2Ops {
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
        if count == 0 {
            return;
        }
        let group = q.len() / hd;
        assert!(rows.len() >= (count - 1) * stride + hd);
        assert!(out.len() >= group * bs && count <= bs);
        // Up to three heads at a time, so each key row is loaded (and widened from f16)
        // once for them all: 4 keys × 3 heads accumulators fit the 16 registers.
        let mut g = 0;
        while g < group {
            let heads = (group - g).min(3);
            // SAFETY: heads g..g + heads exist in `q` and `out` (asserts above); AVX2/FMA
            // per the trait contract.
            unsafe {
                let (qg, og) = (q.as_ptr().add(g * hd), out.as_mut_ptr().add(g * bs));
                match heads {
                    1 => scores_heads::<1, E>(qg, hd, rows, stride, scale, og, bs, count),
                    2 => scores_heads::<2, E>(qg, hd, rows, stride, scale, og, bs, count),
                    _ => scores_heads::<3, E>(qg, hd, rows, stride, scale, og, bs, count),
                }
            }
            g += heads;
        }
    }

    #[inline(always)]
    unsafe fn exp_shift_sum(s: &mut [f32], shift: f32) -> f32 {
        let len = s.len();
        let full = len - len % 8;
        // SAFETY: indices stay below `len`; AVX2/FMA per the trait contract.
        unsafe {
            let p = s.as_mut_ptr();
            let sh = _mm256_set1_ps(shift);
            let mut acc = _mm256_setzero_ps();
            let mut i = 0;
            while i < full {
                let e = exp256(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), sh));
                _mm256_storeu_ps(p.add(i), e);
                acc = _mm256_add_ps(acc, e);
                i += 8;
            }
            let mut sum = hsum(acc);
            if i < len {
                // Pad the tail into a full vector so it uses the same exp.
                let mut tail = [shift; 8];
                tail[..len - i].copy_from_slice(&s[i..]);
                let mut e = [0f32; 8];
                _mm256_storeu_ps(
                    e.as_mut_ptr(),
                    exp256(_mm256_sub_ps(_mm256_loadu_ps(tail.as_ptr()), sh)),
                );
                for (k, v) in s[i..].iter_mut().enumerate() {
                    *v = e[k];
                    sum += e[k];
                }
            }
            sum
        }
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
        let group = out.len() / hd;
        if count > 0 {
            assert!(rows.len() >= (count - 1) * stride + hd);
        }
        assert!(p.len() >= group * bs && corr.len() >= group && count <= bs);
        // As in `scores`: up to three heads share each value row's loads.
        let mut g = 0;
        while g < group {
            let heads = (group - g).min(3);
            // SAFETY: heads g..g + heads exist in `out`, `corr` and `p` (asserts above);
            // AVX2/FMA per the trait contract.
            unsafe {
                let (o, c, pg) = (
                    out.as_mut_ptr().add(g * hd),
                    corr.as_ptr().add(g),
                    p.as_ptr().add(g * bs),
                );
                match heads {
                    1 => accumulate_heads::<1, E>(o, hd, c, pg, bs, count, rows, stride),
                    2 => accumulate_heads::<2, E>(o, hd, c, pg, bs, count, rows, stride),
                    _ => accumulate_heads::<3, E>(o, hd, c, pg, bs, count, rows, stride),
                }
            }
            g += heads;
        }
    }

    #[inline(always)]
    unsafe fn scale(y: &mut [f32], a: f32) {
        for v in y.iter_mut() {
            *v *= a;
        }
    }

    #[inline(always)]
    fn prefetch_rows<E>(rows: *const E, count: usize, stride: usize, hd: usize) {
        let bytes = hd * std::mem::size_of::<E>();
        if bytes == 0 {
            return;
        }
        for j in 0..count {
            let row = rows.wrapping_add(j * stride) as *const i8;
            let mut at = 0;
            while at < bytes {
                // SAFETY: a prefetch never faults, whatever the address.
                unsafe { _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(at)) };
                at += 64;
            }
            // The row's last line, when it does not start on a line.
            // SAFETY: as above.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(bytes - 1)) };
        }
    }
}

/// Scores of `G` query heads (`q`: `G × hd`, `out`: head `h` at `h · bs`) against key
/// rows `j < count`: four keys at a time, each 8-wide slice of a key loaded once for the
/// `G` heads, one horizontal reduction per head and four keys.
///
/// # Safety
/// AVX2/FMA/F16C; `q`, `out` and `rows` hold what they address.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn scores_heads<const G: usize, E: KvElem>(
    q: *const f32,
    hd: usize,
    rows: &[E],
    stride: usize,
    scale: f32,
    out: *mut f32,
    bs: usize,
    count: usize,
) {
    let full = hd - hd % 8;
    // SAFETY: the caller's contract.
    unsafe {
        let r = rows.as_ptr();
        let sv = _mm_set1_ps(scale);
        let mut j = 0;
        while j + 4 <= count {
            let kp: [*const E; 4] = std::array::from_fn(|k| r.add((j + k) * stride));
            let mut acc = [[_mm256_setzero_ps(); 4]; G];
            let mut i = 0;
            while i < full {
                for k in 0..4 {
                    let kv = E::load8(kp[k].add(i));
                    for (h, a) in acc.iter_mut().enumerate() {
                        a[k] = _mm256_fmadd_ps(_mm256_loadu_ps(q.add(h * hd + i)), kv, a[k]);
                    }
                }
                i += 8;
            }
            for (h, a) in acc.iter().enumerate() {
                let t0 = _mm256_hadd_ps(a[0], a[1]);
                let t1 = _mm256_hadd_ps(a[2], a[3]);
                let t = _mm256_hadd_ps(t0, t1);
                let mut sums = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps::<1>(t));
                if full < hd {
                    let mut tail = [0f32; 4];
                    for (k, tk) in tail.iter_mut().enumerate() {
                        for c in full..hd {
                            *tk += *q.add(h * hd + c) * (*kp[k].add(c)).to_f32();
                        }
                    }
                    sums = _mm_add_ps(sums, _mm_loadu_ps(tail.as_ptr()));
                }
                _mm_storeu_ps(out.add(h * bs + j), _mm_mul_ps(sums, sv));
            }
            j += 4;
        }
        while j < count {
            let row = &rows[j * stride..j * stride + hd];
            for h in 0..G {
                let qh = std::slice::from_raw_parts(q.add(h * hd), hd);
                *out.add(h * bs + j) = crate::attention::dot_elems(qh, row) * scale;
            }
            j += 1;
        }
    }
}

/// `out_h ← out_h · corr[h] + Σ_j p[h · bs + j] · rows[j]` for `G` heads: 32 columns at
/// a time (then 8, then single ones), each value slice loaded once for the `G` heads,
/// their accumulators in registers across the rows.
///
/// # Safety
/// AVX2/FMA/F16C; `out`, `corr`, `p` and `rows` hold what they address.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn accumulate_heads<const G: usize, E: KvElem>(
    out: *mut f32,
    hd: usize,
    corr: *const f32,
    p: *const f32,
    bs: usize,
    count: usize,
    rows: &[E],
    stride: usize,
) {
    // SAFETY: the caller's contract.
    unsafe {
        let r = rows.as_ptr();
        let cv: [__m256; G] = std::array::from_fn(|h| _mm256_set1_ps(*corr.add(h)));
        let mut c = 0;
        while c + 32 <= hd {
            let mut acc: [[__m256; 4]; G] = std::array::from_fn(|h| {
                std::array::from_fn(|k| {
                    _mm256_mul_ps(_mm256_loadu_ps(out.add(h * hd + c + 8 * k)), cv[h])
                })
            });
            for j in 0..count {
                let row = r.add(j * stride + c);
                for k in 0..4 {
                    let v = E::load8(row.add(8 * k));
                    for (h, a) in acc.iter_mut().enumerate() {
                        a[k] = _mm256_fmadd_ps(_mm256_set1_ps(*p.add(h * bs + j)), v, a[k]);
                    }
                }
            }
            for (h, a) in acc.iter().enumerate() {
                for (k, v) in a.iter().enumerate() {
                    _mm256_storeu_ps(out.add(h * hd + c + 8 * k), *v);
                }
            }
            c += 32;
        }
        while c + 8 <= hd {
            let mut acc: [__m256; G] =
                std::array::from_fn(|h| _mm256_mul_ps(_mm256_loadu_ps(out.add(h * hd + c)), cv[h]));
            for j in 0..count {
                let v = E::load8(r.add(j * stride + c));
                for (h, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(_mm256_set1_ps(*p.add(h * bs + j)), v, *a);
                }
            }
            for (h, a) in acc.iter().enumerate() {
                _mm256_storeu_ps(out.add(h * hd + c), *a);
            }
            c += 8;
        }
        while c < hd {
            for h in 0..G {
                let mut acc = *out.add(h * hd + c) * *corr.add(h);
                for j in 0..count {
                    acc += *p.add(h * bs + j) * (*r.add(j * stride + c)).to_f32();
                }
                *out.add(h * hd + c) = acc;
            }
            c += 1;
        }
    }
}

/// AVX2 instance of the attention inner loop.
///
/// # Safety
/// AVX2/FMA must be available.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn attend_group_avx2<E: KvElem>(
    job: &crate::attention::GroupJob<'_, E>,
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    // SAFETY: features enabled on this function.
    unsafe { crate::attention::attend_group::<Avx2Ops, E>(job, out, scratch) }
}
