//! Runtime selection of the instruction set used by the hot loops.
//!
//! Every kernel has a portable implementation written with plain loops over
//! small fixed-size lane arrays (which the compiler vectorises for whatever
//! baseline the target has, e.g. SSE2 or NEON). On x86-64 machines that
//! report AVX2, FMA and F16C at run time, hand-written AVX2 versions are used
//! instead. Setting the environment variable `PAGODA_KERNELS_SCALAR=1` forces
//! the portable path, which is handy when chasing a numerical difference.

use std::sync::OnceLock;

/// Which implementation family a kernel call dispatches to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Level {
    /// Portable Rust, no target-specific intrinsics.
    Scalar,
    /// x86-64 AVX2 + FMA + F16C intrinsics.
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

/// The best level supported by this machine (detected once, then cached).
pub(crate) fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(detect)
}

fn detect() -> Level {
    if std::env::var_os("PAGODA_KERNELS_SCALAR").is_some_and(|v| v == "1") {
        return Level::Scalar;
    }
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            return Level::Avx2;
        }
    }
    Level::Scalar
}

/// All levels this machine can run; tests use it to check every path.
#[cfg(test)]
pub(crate) fn available_levels() -> Vec<Level> {
    let mut levels = vec![Level::Scalar];
    if level() != Level::Scalar {
        levels.push(level());
    }
    levels
}

/// Number of lanes in the portable accumulators.
pub(crate) const LANES: usize = 8;

/// Pairwise sum of a lane array.
#[inline(always)]
pub(crate) fn hsum_lanes(acc: &[f32; LANES]) -> f32 {
    let s4 = [
        acc[0] + acc[4],
        acc[1] + acc[5],
        acc[2] + acc[6],
        acc[3] + acc[7],
    ];
    (s4[0] + s4[2]) + (s4[1] + s4[3])
}
