//! AVX2: `vpmaddubsw` (u8 × i8 pairs summed into i16, saturating) then `vpmaddwd` against
//! ones (pairs of i16 into i32) — the four-product lane `vpdpbusd` computes, in two
//! instructions. 4-bit codes (≤ 15) cannot saturate the i16 pairs; Q8_0 codes can
//! (255 · 127 · 2 > 32767), so Q8_0 runs signed: `|w|` times `x` with `w`'s sign
//! (`vpsignb`), |w| ≤ 128, as llama.cpp does.

use std::arch::x86_64::*;

use super::tile::{self, Dot};
use super::Product;

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

impl Dot for Avx2 {
    const MAX_TOKENS_FAST: usize = 4;
    const MAX_TOKENS_PRECISE: usize = 2;
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
    unsafe { tile::groups::<Avx2>(p, g0, g1) }
}
