//! AVX-512 VNNI: the EVEX `vpdpbusd` on 256-bit registers (`avx512vl`), so all 32 vector
//! registers hold the tile.

use std::arch::x86_64::*;

use super::tile::{self, Dot};
use super::Product;

pub(super) fn available() -> bool {
    use std::sync::OnceLock;
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        super::avx2::available()
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni")
    })
}

struct Avx512Vnni;

impl Dot for Avx512Vnni {
    const MAX_TOKENS_FAST: usize = 8;

    fn max_tokens_precise() -> usize {
        6
    }
    const SIGNED_Q8: bool = false;

    #[inline(always)]
    unsafe fn dot<const SIGNED: bool>(
        acc: __m256i,
        w: __m256i,
        _ws: __m256i,
        x: __m256i,
    ) -> __m256i {
        // SAFETY: the caller enables the features.
        unsafe { _mm256_dpbusd_epi32(acc, w, x) }
    }
}

/// See [`super::groups`].
///
/// # Safety
/// [`available`] must be true; the rest as [`super::groups`].
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(super) unsafe fn groups(p: &Product<'_, '_>, g0: usize, g1: usize) {
    // SAFETY: features enabled on this function; the rest is forwarded.
    unsafe { tile::groups::<Avx512Vnni>(p, g0, g1) }
}
