use rand::Rng;

use super::{rand_vec, rng};
use crate::ops::{apply_rope, argmax, rms_norm, silu_mul, silu_mul_halves, RopeStyle, RopeTable};
use crate::KernelError;

#[test]
fn rms_norm_matches_naive() {
    let mut rng = rng(30);
    for dim in [1, 7, 64, 576] {
        let n = 5;
        let x = rand_vec(&mut rng, n * dim, 3.0);
        let w = rand_vec(&mut rng, dim, 1.0);
        let eps = 1e-5f32;
        let mut got = x.clone();
        rms_norm(&mut got, &w, eps);
        for t in 0..n {
            let row = &x[t * dim..(t + 1) * dim];
            let ms = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / dim as f64;
            let inv = 1.0 / (ms + eps as f64).sqrt();
            for c in 0..dim {
                let want = row[c] as f64 * inv * w[c] as f64;
                let g = got[t * dim + c] as f64;
                assert!(
                    (g - want).abs() <= 1e-5 * (1.0 + want.abs()),
                    "dim {dim}: {g} vs {want}"
                );
            }
        }
    }
}

#[test]
fn rms_norm_edge_cases() {
    // A trailing partial row is left alone; an empty weight is a no-op.
    let mut x = vec![3.0, 4.0, 5.0];
    rms_norm(&mut x, &[1.0, 1.0], 0.0);
    let inv = 1.0 / 12.5f32.sqrt();
    assert!((x[0] - 3.0 * inv).abs() < 1e-6 && (x[1] - 4.0 * inv).abs() < 1e-6);
    assert_eq!(x[2], 5.0);
    let mut y = vec![1.0, 2.0];
    rms_norm(&mut y, &[], 1e-5);
    assert_eq!(y, vec![1.0, 2.0]);
    // All zeros stay finite thanks to eps.
    let mut z = vec![0.0; 4];
    rms_norm(&mut z, &[1.0; 4], 1e-6);
    assert!(z.iter().all(|v| *v == 0.0));
}

fn naive_rope(
    x: &[f32],
    positions: &[usize],
    heads: usize,
    hd: usize,
    rot: usize,
    theta: f64,
    style: RopeStyle,
) -> Vec<f64> {
    let mut out: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    let half = rot / 2;
    for (t, &p) in positions.iter().enumerate() {
        for h in 0..heads {
            let base = (t * heads + h) * hd;
            for i in 0..half {
                let angle = p as f64 * theta.powf(-2.0 * i as f64 / rot as f64);
                let (a, b) = match style {
                    RopeStyle::Interleaved => (base + 2 * i, base + 2 * i + 1),
                    RopeStyle::Neox => (base + i, base + i + half),
                };
                let (x0, x1) = (x[a] as f64, x[b] as f64);
                out[a] = x0 * angle.cos() - x1 * angle.sin();
                out[b] = x0 * angle.sin() + x1 * angle.cos();
            }
        }
    }
    out
}

#[test]
fn rope_matches_naive_both_styles() {
    let mut rng = rng(31);
    let (heads, hd, theta) = (9, 64, 100_000.0f32);
    let table = RopeTable::new(hd, 4096, theta);
    assert_eq!(table.max_positions(), 4096);
    let positions: Vec<usize> = (0..13)
        .map(|_| rng.gen_range(0..4096))
        .chain([0, 4095])
        .collect();
    for style in [RopeStyle::Interleaved, RopeStyle::Neox] {
        let x = rand_vec(&mut rng, positions.len() * heads * hd, 1.0);
        let mut got = x.clone();
        apply_rope(&mut got, &positions, heads, hd, &table, style).unwrap();
        let want = naive_rope(&x, &positions, heads, hd, hd, theta as f64, style);
        for (g, w) in got.iter().zip(&want) {
            assert!((*g as f64 - w).abs() <= 1e-5, "{style:?}: {g} vs {w}");
        }
    }
}

#[test]
fn rope_partial_rotary_dim() {
    let mut rng = rng(32);
    let (heads, hd, rot) = (2, 16, 8);
    let table = RopeTable::new(rot, 64, 10_000.0);
    let positions = [3, 17, 63];
    for style in [RopeStyle::Interleaved, RopeStyle::Neox] {
        let x = rand_vec(&mut rng, positions.len() * heads * hd, 1.0);
        let mut got = x.clone();
        apply_rope(&mut got, &positions, heads, hd, &table, style).unwrap();
        let want = naive_rope(&x, &positions, heads, hd, rot, 10_000.0, style);
        for (g, w) in got.iter().zip(&want) {
            assert!((*g as f64 - w).abs() <= 1e-5);
        }
    }
}

/// Interleaved rope on a head equals Neox rope on the head with its pairs
/// de-interleaved (the permutation GGUF converters apply to Q/K weights).
#[test]
fn rope_styles_are_permutations_of_each_other() {
    let mut rng = rng(33);
    let hd = 64;
    let table = RopeTable::new(hd, 128, 10_000.0);
    let x = rand_vec(&mut rng, hd, 1.0);
    let mut inter = x.clone();
    apply_rope(&mut inter, &[77], 1, hd, &table, RopeStyle::Interleaved).unwrap();
    let perm: Vec<f32> = (0..hd / 2)
        .map(|i| x[2 * i])
        .chain((0..hd / 2).map(|i| x[2 * i + 1]))
        .collect();
    let mut neox = perm.clone();
    apply_rope(&mut neox, &[77], 1, hd, &table, RopeStyle::Neox).unwrap();
    for i in 0..hd / 2 {
        assert_eq!(inter[2 * i], neox[i]);
        assert_eq!(inter[2 * i + 1], neox[i + hd / 2]);
    }
}

#[test]
fn rope_position_zero_is_identity_and_errors() {
    let table = RopeTable::new(8, 4, 10_000.0);
    let x: Vec<f32> = (0..16).map(|v| v as f32).collect();
    let mut y = x.clone();
    apply_rope(&mut y, &[0, 0], 1, 8, &table, RopeStyle::Neox).unwrap();
    assert_eq!(x, y);
    assert!(matches!(
        apply_rope(&mut y, &[0, 4], 1, 8, &table, RopeStyle::Neox),
        Err(KernelError::OutOfRange {
            index: 4,
            bound: 4,
            ..
        })
    ));
    assert!(matches!(
        apply_rope(&mut y, &[0], 1, 8, &table, RopeStyle::Neox),
        Err(KernelError::LengthMismatch { .. })
    ));
    assert!(matches!(
        apply_rope(&mut y, &[0, 0, 0, 0], 1, 4, &table, RopeStyle::Neox),
        Err(KernelError::InvalidShape { .. })
    ));
}

/// Gating rows of `[gate | up]` where they lie equals splitting them and gating in place,
/// bit for bit, with and without a tail of fewer than eight lanes.
#[test]
fn silu_mul_halves_equals_split_then_gate() {
    let mut rng = rng(35);
    for half in [1usize, 8, 13, 64, 1536] {
        let rows = 3;
        let x = rand_vec(&mut rng, rows * 2 * half, 6.0);
        let mut want = Vec::new();
        for row in x.chunks_exact(2 * half) {
            let mut gate = row[..half].to_vec();
            silu_mul(&mut gate, &row[half..]);
            want.extend(gate);
        }
        let mut got = vec![f32::NAN; rows * half];
        silu_mul_halves(&x, half, &mut got).unwrap();
        assert_eq!(got, want, "half {half}");
    }
    let mut out = vec![0.0; 4];
    assert!(silu_mul_halves(&[0.0; 10], 4, &mut out).is_err());
    assert!(silu_mul_halves(&[0.0; 16], 4, &mut out).is_err());
    assert!(silu_mul_halves(&[0.0; 8], 0, &mut out).is_err());
}

#[test]
fn silu_mul_matches_naive() {
    let mut rng = rng(34);
    let gate = rand_vec(&mut rng, 1000, 8.0);
    let up = rand_vec(&mut rng, 1000, 2.0);
    let mut got = gate.clone();
    silu_mul(&mut got, &up);
    for i in 0..gate.len() {
        let g = gate[i] as f64;
        let want = g / (1.0 + (-g).exp()) * up[i] as f64;
        assert!((got[i] as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()));
    }
    // Extreme inputs stay finite.
    let mut ext = vec![-1000.0; 9];
    ext[3] = 1000.0;
    silu_mul(&mut ext, &[1.0; 9]);
    for (i, v) in ext.iter().enumerate() {
        let want = if i == 3 { 1000.0 } else { 0.0 };
        assert!((v - want).abs() < 1e-30, "{i}: {v}");
    }
}

#[test]
fn argmax_cases() {
    assert_eq!(argmax(&[]), 0);
    assert_eq!(argmax(&[f32::NAN, f32::NAN]), 0);
    assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
    assert_eq!(argmax(&[f32::NAN, -5.0, f32::NAN, -1.0]), 3);
    assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY]), 0);
    let mut v = vec![0.0f32; 49152];
    v[40000] = 0.5;
    assert_eq!(argmax(&v), 40000);
}
