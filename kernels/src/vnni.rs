//! AVX-512 VNNI kernel for the packed int8 product (see [`crate::packed`]), using the
//! 256-bit EVEX forms (`avx512vl`) so that 32 vector registers are available.
//! [`crate::packed::groups_portable`] is its reference.

use std::arch::x86_64::*;

use crate::gemm::OutWriter;
use crate::packed::{self, Acts, GROUP};
use crate::quant::{QuantFormat, BLOCK_WEIGHTS};

/// Whether this CPU runs the kernel (checked once).
pub(crate) fn available() -> bool {
    use std::sync::OnceLock;
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni")
    })
}

/// Most tokens one register tile handles: 8 weight registers, T accumulators and T partial
/// sums per activation plane must stay inside the 32 registers.
const fn max_tokens(precise: bool) -> usize {
    if precise {
        6
    } else {
        8
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

/// Groups `g0..g1` of a packed matrix against all `n` tokens of `acts`.
///
/// # Safety
/// [`available`] must be true; `data` must be a packed matrix of `cols` columns holding at
/// least `g1` groups; `acts` must hold `n` tokens of `cols` columns; the caller must be the
/// only writer of rows `g0·8..g1·8` of `out`.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn groups(
    format: QuantFormat,
    data: &[u8],
    cols: usize,
    g0: usize,
    g1: usize,
    acts: &Acts,
    n: usize,
    out: &OutWriter<'_>,
) {
    // SAFETY: features enabled on this function; the rest is forwarded.
    unsafe {
        match format {
            QuantFormat::Q4_0 if acts.precise => {
                groups_fmt::<Q40, true>(data, cols, g0, g1, acts, n, out)
            }
            QuantFormat::Q4_1 if acts.precise => {
                groups_fmt::<Q41, true>(data, cols, g0, g1, acts, n, out)
            }
            QuantFormat::Q8_0 if acts.precise => {
                groups_fmt::<Q80, true>(data, cols, g0, g1, acts, n, out)
            }
            QuantFormat::Q4_0 => groups_fmt::<Q40, false>(data, cols, g0, g1, acts, n, out),
            QuantFormat::Q4_1 => groups_fmt::<Q41, false>(data, cols, g0, g1, acts, n, out),
            QuantFormat::Q8_0 => groups_fmt::<Q80, false>(data, cols, g0, g1, acts, n, out),
        }
    }
}

#[inline(always)]
unsafe fn groups_fmt<F: Fmt, const P: bool>(
    data: &[u8],
    cols: usize,
    g0: usize,
    g1: usize,
    acts: &Acts,
    n: usize,
    out: &OutWriter<'_>,
) {
    let nb = cols / BLOCK_WEIGHTS;
    let rec = packed::record_bytes(F::FORMAT);
    assert!(data.len() >= g1 * nb * rec, "packed data too short");
    assert!(acts.q.len() >= n * cols && acts.d.len() >= n * nb);
    assert!(!P || acts.q2.len() >= n * cols);
    assert!(acts.sq.len() >= n * nb && acts.xs.len() >= n * nb);
    for g in g0..g1 {
        let recs = data[g * nb * rec..].as_ptr();
        let mut t0 = 0;
        while t0 < n {
            let t = (n - t0).min(max_tokens(P));
            // SAFETY: the asserts above cover every pointer the tile reads; row
            // ownership is this function's contract.
            unsafe {
                match t {
                    1 => store(out, t0, g, tile::<F, P, 1>(recs, nb, cols, acts, t0)),
                    2 => store(out, t0, g, tile::<F, P, 2>(recs, nb, cols, acts, t0)),
                    3 => store(out, t0, g, tile::<F, P, 3>(recs, nb, cols, acts, t0)),
                    4 => store(out, t0, g, tile::<F, P, 4>(recs, nb, cols, acts, t0)),
                    5 => store(out, t0, g, tile::<F, P, 5>(recs, nb, cols, acts, t0)),
                    6 => store(out, t0, g, tile::<F, P, 6>(recs, nb, cols, acts, t0)),
                    7 => store(out, t0, g, tile::<F, P, 7>(recs, nb, cols, acts, t0)),
                    _ => store(out, t0, g, tile::<F, P, 8>(recs, nb, cols, acts, t0)),
                }
            }
            t0 += t;
        }
    }
}

/// Write a tile's eight consecutive rows for each of its tokens.
#[inline(always)]
unsafe fn store<const T: usize>(out: &OutWriter<'_>, t0: usize, g: usize, acc: [__m256; T]) {
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

/// One group (8 rows) against tokens `t0..t0 + T`, over all `nb` blocks.
#[inline(always)]
unsafe fn tile<F: Fmt, const P: bool, const T: usize>(
    recs: *const u8,
    nb: usize,
    cols: usize,
    acts: &Acts,
    t0: usize,
) -> [__m256; T] {
    let rec = packed::record_bytes(F::FORMAT);
    let sb = packed::scale_bytes(F::FORMAT);
    let bias = packed::code_bias(F::FORMAT);
    // With one or two tokens, two partial sums per token hide the latency of the
    // dependent dot-product chain (the precise mode has two chains anyway).
    let split = !P && T <= 2;
    // SAFETY: see `groups_fmt`.
    unsafe {
        let mask = _mm256_set1_epi8(0x0F);
        let mut acc = [_mm256_setzero_ps(); T];
        let xq = acts.q.as_ptr();
        let xq2 = acts.q2.as_ptr();
        for b in 0..nb {
            let r = recs.add(b * rec);
            let dv = _mm256_cvtph_ps(_mm_loadu_si128(r as *const __m128i));
            let wp = r.add(sb);
            let w: [__m256i; 8] = if F::NIBBLES {
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
            let mut s0 = [_mm256_setzero_si256(); T];
            let mut s1 = [_mm256_setzero_si256(); T];
            for (k, wk) in w.iter().enumerate() {
                for t in 0..T {
                    let at = (t0 + t) * cols + b * BLOCK_WEIGHTS + 4 * k;
                    let xv = _mm256_set1_epi32(std::ptr::read_unaligned(xq.add(at) as *const i32));
                    if P {
                        let xv2 =
                            _mm256_set1_epi32(std::ptr::read_unaligned(xq2.add(at) as *const i32));
                        s1[t] = _mm256_dpbusd_epi32(s1[t], *wk, xv2);
                        s0[t] = _mm256_dpbusd_epi32(s0[t], *wk, xv);
                    } else if split && k % 2 == 1 {
                        s1[t] = _mm256_dpbusd_epi32(s1[t], *wk, xv);
                    } else {
                        s0[t] = _mm256_dpbusd_epi32(s0[t], *wk, xv);
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
