//! Unit tests that reach into crate internals (to run every SIMD level),
//! plus helpers: seeded random data and naive references.

mod attention;
mod dense;
mod ops;
mod packed;
mod quant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub(crate) fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

pub(crate) fn rand_vec(rng: &mut StdRng, len: usize, scale: f32) -> Vec<f32> {
    (0..len)
        .map(|_| rng.gen_range(-1.0f32..1.0) * scale)
        .collect()
}

/// Naive `out[t][r] = Σ_c w[r][c] x[t][c]` in f64, plus the matching
/// `Σ_c |w[r][c] x[t][c]|` used to scale tolerances.
pub(crate) fn naive_matmul(
    w: &[f32],
    rows: usize,
    cols: usize,
    x: &[f32],
    n: usize,
) -> (Vec<f64>, Vec<f64>) {
    let mut out = vec![0f64; n * rows];
    let mut mag = vec![0f64; n * rows];
    for t in 0..n {
        for r in 0..rows {
            let mut s = 0f64;
            let mut a = 0f64;
            for c in 0..cols {
                let p = w[r * cols + c] as f64 * x[t * cols + c] as f64;
                s += p;
                a += p.abs();
            }
            out[t * rows + r] = s;
            mag[t * rows + r] = a;
        }
    }
    (out, mag)
}

/// Assert `got` matches `want` to `rel` relative to the magnitude `mag`.
pub(crate) fn assert_close(got: &[f32], want: &[f64], mag: &[f64], rel: f64, ctx: &str) {
    assert_eq!(got.len(), want.len(), "{ctx}: length");
    for (i, ((&g, &w), &m)) in got.iter().zip(want).zip(mag).enumerate() {
        let tol = rel * m.max(w.abs()) + 1e-6;
        assert!(
            (g as f64 - w).abs() <= tol,
            "{ctx}: index {i}: got {g}, want {w} (tol {tol})"
        );
    }
}
