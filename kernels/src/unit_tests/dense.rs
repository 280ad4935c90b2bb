use super::{assert_close, naive_matmul, rand_vec, rng};
use crate::dense::{matmul_f32, matmul_f32_with};
use crate::simd::available_levels;
use crate::KernelError;

#[test]
fn matmul_f32_matches_naive() {
    let mut rng = rng(20);
    for &(rows, cols) in &[(1, 1), (3, 7), (4, 8), (9, 33), (64, 100), (130, 576)] {
        for n in [1, 2, 3, 4, 5, 17, 64] {
            let w = rand_vec(&mut rng, rows * cols, 1.0);
            let x = rand_vec(&mut rng, n * cols, 1.0);
            let (want, mag) = naive_matmul(&w, rows, cols, &x, n);
            for level in available_levels() {
                let mut out = vec![f32::NAN; n * rows];
                matmul_f32_with(level, &w, rows, cols, &x, n, &mut out).unwrap();
                assert_close(
                    &out,
                    &want,
                    &mag,
                    1e-5,
                    &format!("{rows}x{cols} n={n} {level:?}"),
                );
            }
        }
    }
}

#[test]
fn matmul_f32_validates() {
    let mut out = vec![0f32; 4];
    assert!(matches!(
        matmul_f32(&[0.0; 5], 2, 3, &[0.0; 6], 2, &mut out),
        Err(KernelError::LengthMismatch {
            what: "matmul_f32 w",
            ..
        })
    ));
    assert!(matches!(
        matmul_f32(&[0.0; 6], 2, 3, &[0.0; 5], 2, &mut out),
        Err(KernelError::LengthMismatch {
            what: "matmul_f32 x",
            ..
        })
    ));
    assert!(matches!(
        matmul_f32(&[0.0; 6], 2, 3, &[0.0; 6], 2, &mut out[..3]),
        Err(KernelError::LengthMismatch {
            what: "matmul_f32 out",
            ..
        })
    ));
    // Zero columns: every dot product is empty.
    let mut out = vec![1f32; 4];
    matmul_f32(&[], 2, 0, &[], 2, &mut out).unwrap();
    assert!(out.iter().all(|&v| v == 0.0));
}
