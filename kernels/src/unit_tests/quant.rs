use proptest::prelude::*;

use super::{assert_close, naive_matmul, rand_vec, rng};
use crate::quant::{quantize, QMatrix, QuantFormat, BLOCK_WEIGHTS};
use crate::simd::available_levels;
use crate::KernelError;

const FORMATS: [QuantFormat; 3] = [QuantFormat::Q4_0, QuantFormat::Q4_1, QuantFormat::Q8_0];

fn f16_bytes(v: f32) -> [u8; 2] {
    half::f16::from_f32(v).to_bits().to_le_bytes()
}

fn dequantize_all(m: &QMatrix) -> Vec<f32> {
    let mut w = vec![0f32; m.rows() * m.cols()];
    for r in 0..m.rows() {
        m.dequantize_row(r, &mut w[r * m.cols()..(r + 1) * m.cols()]);
    }
    w
}

#[test]
fn block_sizes() {
    assert_eq!(QuantFormat::Q4_0.block_bytes(), 18);
    assert_eq!(QuantFormat::Q4_1.block_bytes(), 20);
    assert_eq!(QuantFormat::Q8_0.block_bytes(), 34);
    assert_eq!(QuantFormat::BLOCK_WEIGHTS, 32);
    assert_eq!(BLOCK_WEIGHTS, 32);
}

#[test]
fn new_validates_shape_and_length() {
    let err = QMatrix::new(QuantFormat::Q4_0, 2, 33, vec![]).unwrap_err();
    assert!(matches!(err, KernelError::InvalidShape { .. }));
    let err = QMatrix::new(QuantFormat::Q4_1, 2, 64, vec![0; 79]).unwrap_err();
    assert_eq!(
        err,
        KernelError::LengthMismatch {
            what: "QMatrix data",
            expected: 80,
            actual: 79
        }
    );
    assert!(QMatrix::new(QuantFormat::Q8_0, 3, 64, vec![0; 3 * 2 * 34]).is_ok());
    assert!(QMatrix::new(QuantFormat::Q8_0, usize::MAX, 64, vec![]).is_err());
    // Errors render as text.
    assert!(err.to_string().contains("QMatrix data"));
}

/// Hand-built blocks decode exactly as the ggml layout specifies.
#[test]
fn decode_matches_layout() {
    let qs: Vec<u8> = (0..16u8).map(|j| (j % 16) | ((15 - j) << 4)).collect();

    let mut b40 = f16_bytes(0.5).to_vec();
    b40.extend(&qs);
    let m40 = QMatrix::new(QuantFormat::Q4_0, 1, 32, b40).unwrap();
    let mut b41 = f16_bytes(0.25).to_vec();
    b41.extend(f16_bytes(-1.5));
    b41.extend(&qs);
    let m41 = QMatrix::new(QuantFormat::Q4_1, 1, 32, b41).unwrap();
    let mut b80 = f16_bytes(0.125).to_vec();
    b80.extend((0..32i32).map(|j| ((j * 9 - 128).clamp(-128, 127) as i8) as u8));
    let m80 = QMatrix::new(QuantFormat::Q8_0, 1, 32, b80).unwrap();

    let mut w = [0f32; 32];
    m40.dequantize_row(0, &mut w);
    for j in 0..16 {
        assert_eq!(w[j], ((qs[j] & 0xF) as f32 - 8.0) * 0.5);
        assert_eq!(w[j + 16], ((qs[j] >> 4) as f32 - 8.0) * 0.5);
    }
    m41.dequantize_row(0, &mut w);
    for j in 0..16 {
        assert_eq!(w[j], (qs[j] & 0xF) as f32 * 0.25 - 1.5);
        assert_eq!(w[j + 16], (qs[j] >> 4) as f32 * 0.25 - 1.5);
    }
    m80.dequantize_row(0, &mut w);
    for (j, &v) in w.iter().enumerate() {
        let q = (j as i32 * 9 - 128).clamp(-128, 127) as f32;
        assert_eq!(v, q * 0.125);
    }
}

#[test]
fn try_dequantize_row_reports_errors() {
    let m = QMatrix::from_f32(QuantFormat::Q8_0, 2, 32, &[0.5; 64]).unwrap();
    let mut out = vec![0f32; 32];
    assert!(matches!(
        m.try_dequantize_row(2, &mut out),
        Err(KernelError::OutOfRange {
            index: 2,
            bound: 2,
            ..
        })
    ));
    assert!(matches!(
        m.try_dequantize_row(0, &mut out[..31]),
        Err(KernelError::LengthMismatch { .. })
    ));
    m.try_dequantize_row(1, &mut out).unwrap();
    assert!(out.iter().all(|&v| (v - 0.5).abs() < 1e-3));
}

#[test]
fn quantize_rejects_bad_input() {
    assert!(quantize(QuantFormat::Q4_0, &[0.0; 31]).is_err());
    let mut v = vec![0f32; 32];
    v[3] = f32::NAN;
    assert!(quantize(QuantFormat::Q8_0, &v).is_err());
    assert!(quantize(QuantFormat::Q4_1, &[]).unwrap().is_empty());
    for format in FORMATS {
        assert!(quantize(format, &[1e9; 32]).is_err(), "{format:?}");
    }
}

/// Quantize → dequantize stays within one quantization step (plus the f16
/// rounding of the stored scale/minimum) of the input.
#[test]
fn round_trip_error_bounds() {
    let mut rng = rng(1);
    for format in FORMATS {
        for scale in [1e-3f32, 0.02, 1.0, 300.0] {
            let v = rand_vec(&mut rng, 32 * 64, scale);
            let m = QMatrix::from_f32(format, 64, 32, &v).unwrap();
            let w = dequantize_all(&m);
            for (bv, bw) in v.chunks(32).zip(w.chunks(32)) {
                let lo = bv.iter().copied().fold(f32::INFINITY, f32::min);
                let hi = bv.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let amax = lo.abs().max(hi.abs());
                let step = match format {
                    QuantFormat::Q4_0 => amax / 8.0,
                    QuantFormat::Q4_1 => (hi - lo) / 15.0,
                    QuantFormat::Q8_0 => amax / 127.0,
                };
                // Q4_0 clamps the top level (+8 → 7), which can cost a whole step.
                let half_steps = if format == QuantFormat::Q4_0 {
                    1.0
                } else {
                    0.5
                };
                let bound = half_steps * step + 2e-3 * amax + 1e-7;
                for (a, b) in bv.iter().zip(bw) {
                    assert!(
                        (a - b).abs() <= bound,
                        "{format:?} scale {scale}: {a} vs {b} (bound {bound})"
                    );
                }
            }
        }
    }
}

#[test]
fn round_trip_special_blocks() {
    for format in FORMATS {
        let zeros = QMatrix::from_f32(format, 1, 32, &[0.0; 32]).unwrap();
        assert!(
            dequantize_all(&zeros).iter().all(|&v| v == 0.0),
            "{format:?}"
        );
        let constant = QMatrix::from_f32(format, 1, 32, &[0.75; 32]).unwrap();
        assert!(
            dequantize_all(&constant)
                .iter()
                .all(|&v| (v - 0.75).abs() < 1e-3),
            "{format:?}"
        );
    }
    // Exactly representable levels survive unchanged.
    let levels: Vec<f32> = (0..32).map(|j| (j % 16) as f32 * 0.5 - 4.0).collect();
    let m = QMatrix::from_f32(QuantFormat::Q4_0, 1, 32, &levels).unwrap();
    assert_eq!(dequantize_all(&m), levels);
    let m = QMatrix::from_f32(QuantFormat::Q4_1, 1, 32, &levels).unwrap();
    assert_eq!(dequantize_all(&m), levels);
}

fn check_matmul(format: QuantFormat, rows: usize, cols: usize, n: usize, seed: u64) {
    let mut rng = rng(seed);
    let v = rand_vec(&mut rng, rows * cols, 0.1);
    let m = QMatrix::from_f32(format, rows, cols, &v).unwrap();
    let w = dequantize_all(&m);
    let x = rand_vec(&mut rng, n * cols, 1.0);
    let (want, mag) = naive_matmul(&w, rows, cols, &x, n);
    for level in available_levels() {
        let mut out = vec![f32::NAN; n * rows];
        m.matmul_with(level, &x, n, &mut out).unwrap();
        assert_close(
            &out,
            &want,
            &mag,
            1e-5,
            &format!("{format:?} {rows}x{cols} n={n} {level:?}"),
        );
    }
}

#[test]
fn matmul_matches_naive() {
    let mut seed = 10;
    for format in FORMATS {
        for &(rows, cols) in &[(1, 32), (37, 96), (64, 256), (5, 576)] {
            for n in [1, 2, 3, 4, 5, 17, 64] {
                seed += 1;
                check_matmul(format, rows, cols, n, seed);
            }
        }
    }
}

#[test]
fn matmul_model_shapes() {
    // SmolLM2-135M projections: q/o (576×576), k/v (192×576), gate/up
    // (1536×576), down (576×1536).
    for &(rows, cols) in &[(576, 576), (192, 576), (1536, 576), (576, 1536)] {
        for n in [1, 7] {
            check_matmul(QuantFormat::Q4_1, rows, cols, n, (rows * cols + n) as u64);
        }
    }
    check_matmul(QuantFormat::Q8_0, 1000, 576, 1, 99);
}

#[test]
fn matmul_validates_lengths() {
    let m = QMatrix::from_f32(QuantFormat::Q4_1, 3, 64, &[0.1; 192]).unwrap();
    let mut out = vec![0f32; 6];
    assert!(matches!(
        m.matmul(&[0.0; 127], 2, &mut out),
        Err(KernelError::LengthMismatch {
            what: "matmul x",
            ..
        })
    ));
    assert!(matches!(
        m.matmul(&[0.0; 128], 2, &mut out[..5]),
        Err(KernelError::LengthMismatch {
            what: "matmul out",
            ..
        })
    ));
    m.matmul(&[], 0, &mut []).unwrap();
    m.matmul(&[0.0; 128], 2, &mut out).unwrap();
    assert!(out.iter().all(|&v| v == 0.0));
    let empty = QMatrix::new(QuantFormat::Q4_0, 4, 0, vec![]).unwrap();
    let mut out = vec![1f32; 8];
    empty.matmul(&[], 2, &mut out).unwrap();
    assert!(out.iter().all(|&v| v == 0.0));
}

/// The SIMD and portable paths agree closely with each other, not just with
/// the reference.
#[test]
fn levels_agree() {
    let levels = available_levels();
    let mut rng = rng(5);
    for format in FORMATS {
        let v = rand_vec(&mut rng, 50 * 320, 1.0);
        let m = QMatrix::from_f32(format, 50, 320, &v).unwrap();
        for n in [1, 4, 9] {
            let x = rand_vec(&mut rng, n * 320, 1.0);
            let results: Vec<Vec<f32>> = levels
                .iter()
                .map(|&l| {
                    let mut out = vec![0f32; n * 50];
                    m.matmul_with(l, &x, n, &mut out).unwrap();
                    out
                })
                .collect();
            for r in &results[1..] {
                for (a, b) in r.iter().zip(&results[0]) {
                    assert!(
                        (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                        "{format:?} n={n}: {a} vs {b}"
                    );
                }
            }
        }
    }
}

fn format_strategy() -> impl Strategy<Value = QuantFormat> {
    prop_oneof![
        Just(QuantFormat::Q4_0),
        Just(QuantFormat::Q4_1),
        Just(QuantFormat::Q8_0)
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn prop_matmul_matches_naive(
        format in format_strategy(),
        rows in 1usize..40,
        blocks in 1usize..6,
        n in 1usize..20,
        wscale in 0.001f32..10.0,
        seed in any::<u64>(),
    ) {
        let cols = blocks * 32;
        let mut rng = rng(seed);
        let v = rand_vec(&mut rng, rows * cols, wscale);
        let m = QMatrix::from_f32(format, rows, cols, &v).unwrap();
        let w = dequantize_all(&m);
        let x = rand_vec(&mut rng, n * cols, 1.0);
        let (want, mag) = naive_matmul(&w, rows, cols, &x, n);
        for level in available_levels() {
            let mut out = vec![0f32; n * rows];
            m.matmul_with(level, &x, n, &mut out).unwrap();
            for i in 0..out.len() {
                let tol = 1e-5 * mag[i].max(want[i].abs()) + 1e-6;
                prop_assert!((out[i] as f64 - want[i]).abs() <= tol,
                    "{:?} {:?} i={} got {} want {}", format, level, i, out[i], want[i]);
            }
        }
    }
}
