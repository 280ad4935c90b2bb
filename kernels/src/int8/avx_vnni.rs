//! AVX-VNNI: the VEX-encoded `vpdpbusd` of CPUs with VNNI but without (or besides)
//! AVX-512 — 16 vector registers, so smaller tiles than AVX-512's.

use std::arch::x86_64::*;

use super::tile::{self, Dot};
use super::Product;

pub(super) fn available() -> bool {
    use std::sync::OnceLock;
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| super::avx2::available() && is_x86_feature_detected!("avxvnni"))
}

struct AvxVnni;

impl Dot for AvxVnni {
    const MAX_TOKENS_FAST: usize = 4;

    fn max_tokens_precise() -> usize {
        2
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
        unsafe { _mm256_dpbusd_avx_epi32(acc, w, x) }
    }
}

/// See [`super::groups`].
///
/// # Safety
/// [`available`] must be true; the rest as [`super::groups`].
#[target_feature(enable = "avx2,fma,f16c,avxvnni")]
pub(super) unsafe fn groups(p: &Product<'_, '_>, g0: usize, g1: usize) {
    // SAFETY: features enabled on this function; the rest is forwarded.
    unsafe { tile::groups::<AvxVnni>(p, g0, g1) }
}
