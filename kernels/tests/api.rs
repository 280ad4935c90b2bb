//! Public-API tests: a miniature transformer layer step wired the way the
//! model code uses the kernels, checked against straightforward references.

use pagoda_kernels::attention::{paged_attention, write_kv, AttnSeq, KvShape};
use pagoda_kernels::dense::matmul_f32;
use pagoda_kernels::ops::{apply_rope, argmax, rms_norm, silu_mul, RopeStyle, RopeTable};
use pagoda_kernels::quant::{quantize, QMatrix, QuantFormat};
use pagoda_kernels::KernelError;
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn rand_vec(rng: &mut StdRng, len: usize) -> Vec<f32> {
    (0..len).map(|_| rng.gen_range(-1.0f32..1.0)).collect()
}

/// The quantized matmul equals a dense matmul over the dequantized weights.
#[test]
fn quant_matmul_equals_dense_on_dequantized() {
    let mut rng = StdRng::seed_from_u64(7);
    let (rows, cols) = (192, 576);
    for format in [QuantFormat::Q4_0, QuantFormat::Q4_1, QuantFormat::Q8_0] {
        let w = rand_vec(&mut rng, rows * cols);
        let bytes = quantize(format, &w).unwrap();
        assert_eq!(bytes.len(), rows * cols / 32 * format.block_bytes());
        let m = QMatrix::new(format, rows, cols, bytes).unwrap();
        assert_eq!((m.rows(), m.cols(), m.format()), (rows, cols, format));
        let mut dense = vec![0f32; rows * cols];
        for r in 0..rows {
            m.dequantize_row(r, &mut dense[r * cols..(r + 1) * cols]);
        }
        for n in [1, 3, 17, 64] {
            let x = rand_vec(&mut rng, n * cols);
            let mut a = vec![0f32; n * rows];
            let mut b = vec![0f32; n * rows];
            m.matmul(&x, n, &mut a).unwrap();
            matmul_f32(&dense, rows, cols, &x, n, &mut b).unwrap();
            for (p, q) in a.iter().zip(&b) {
                assert!(
                    (p - q).abs() <= 1e-4 * (1.0 + q.abs()),
                    "{format:?} n={n}: {p} vs {q}"
                );
            }
        }
    }
}

/// One attention step: project, rope, write KV, attend — prefill of a prompt
/// in two chunks must give the same last-token output as a one-shot prefill.
#[test]
fn chunked_prefill_equals_one_shot() {
    let mut rng = StdRng::seed_from_u64(8);
    let (hidden, heads, kv_heads, hd) = (96, 6, 2, 16);
    let wq = QMatrix::from_f32(
        QuantFormat::Q4_1,
        heads * hd,
        hidden,
        &rand_vec(&mut rng, heads * hd * hidden),
    )
    .unwrap();
    let wk = QMatrix::from_f32(
        QuantFormat::Q4_1,
        kv_heads * hd,
        hidden,
        &rand_vec(&mut rng, kv_heads * hd * hidden),
    )
    .unwrap();
    let wv = QMatrix::from_f32(
        QuantFormat::Q4_1,
        kv_heads * hd,
        hidden,
        &rand_vec(&mut rng, kv_heads * hd * hidden),
    )
    .unwrap();
    let norm_w = rand_vec(&mut rng, hidden);
    let rope = RopeTable::new(hd, 256, 10_000.0);
    let prompt_len = 37;
    let mut xs = rand_vec(&mut rng, prompt_len * hidden);
    rms_norm(&mut xs, &norm_w, 1e-5);

    let shape = KvShape {
        num_blocks: 8,
        block_size: 8,
        num_kv_heads: kv_heads,
        head_dim: hd,
    };
    let table: Vec<u32> = vec![6, 1, 4, 0, 3];

    let run = |chunks: &[usize]| -> Vec<f32> {
        let mut kc = vec![0f32; shape.layer_len()];
        let mut vc = vec![0f32; shape.layer_len()];
        let mut last = Vec::new();
        let mut done = 0;
        for &len in chunks {
            let x = &xs[done * hidden..(done + len) * hidden];
            let mut q = vec![0f32; len * heads * hd];
            let mut k = vec![0f32; len * kv_heads * hd];
            let mut v = vec![0f32; len * kv_heads * hd];
            wq.matmul(x, len, &mut q).unwrap();
            wk.matmul(x, len, &mut k).unwrap();
            wv.matmul(x, len, &mut v).unwrap();
            let positions: Vec<usize> = (done..done + len).collect();
            apply_rope(&mut q, &positions, heads, hd, &rope, RopeStyle::Interleaved).unwrap();
            apply_rope(
                &mut k,
                &positions,
                kv_heads,
                hd,
                &rope,
                RopeStyle::Interleaved,
            )
            .unwrap();
            let slots: Vec<usize> = positions
                .iter()
                .map(|&p| table[p / 8] as usize * 8 + p % 8)
                .collect();
            write_kv(&shape, &mut kc, &mut vc, &k, &v, &slots).unwrap();
            let seq = AttnSeq {
                query_start: 0,
                query_len: len,
                context_len: done + len,
                block_table: &table,
            };
            let mut out = vec![0f32; q.len()];
            paged_attention(&shape, &kc, &vc, &q, heads, &[seq], &mut out).unwrap();
            last = out[(len - 1) * heads * hd..].to_vec();
            done += len;
        }
        last
    };
    let one_shot = run(&[prompt_len]);
    let chunked = run(&[20, 16, 1]);
    for (a, b) in one_shot.iter().zip(&chunked) {
        assert!((a - b).abs() <= 1e-5, "{a} vs {b}");
    }
}

#[test]
fn small_ops_compose() {
    let mut gate = vec![1.0f32, -2.0, 3.0];
    silu_mul(&mut gate, &[1.0, 1.0, 0.5]);
    assert_eq!(argmax(&gate), 2);
    let e = KernelError::OutOfRange {
        what: "block id",
        index: 9,
        bound: 4,
    };
    let dynerr: Box<dyn std::error::Error> = Box::new(e);
    assert_eq!(dynerr.to_string(), "block id 9 out of range (must be < 4)");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Decode steps through the public API agree with a dense softmax.
    #[test]
    fn prop_decode_matches_dense_softmax(ctx in 1usize..80, bs in 1usize..20, seed in any::<u64>()) {
        let mut rng = StdRng::seed_from_u64(seed);
        let (heads, kv_heads, hd) = (9, 3, 64);
        let shape = KvShape { num_blocks: ctx.div_ceil(bs) + 2, block_size: bs, num_kv_heads: kv_heads, head_dim: hd };
        let mut table: Vec<u32> = (0..shape.num_blocks as u32).rev().collect();
        table.rotate_left(1);
        let k = rand_vec(&mut rng, ctx * kv_heads * hd);
        let v = rand_vec(&mut rng, ctx * kv_heads * hd);
        let slots: Vec<usize> = (0..ctx).map(|p| table[p / bs] as usize * bs + p % bs).collect();
        let mut kc = vec![0f32; shape.layer_len()];
        let mut vc = vec![0f32; shape.layer_len()];
        write_kv(&shape, &mut kc, &mut vc, &k, &v, &slots).unwrap();
        let q = rand_vec(&mut rng, heads * hd);
        let mut out = vec![0f32; heads * hd];
        let seq = AttnSeq { query_start: 0, query_len: 1, context_len: ctx, block_table: &table };
        paged_attention(&shape, &kc, &vc, &q, heads, &[seq], &mut out).unwrap();
        for h in 0..heads {
            let kvh = h / 3;
            let qh = &q[h * hd..(h + 1) * hd];
            let s: Vec<f64> = (0..ctx).map(|p| {
                qh.iter().zip(&k[(p * kv_heads + kvh) * hd..]).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>() / 8.0
            }).collect();
            let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
            for d in 0..hd {
                let want: f64 = (0..ctx).map(|p| (s[p] - m).exp() / z * v[(p * kv_heads + kvh) * hd + d] as f64).sum();
                prop_assert!((out[h * hd + d] as f64 - want).abs() <= 1e-4);
            }
        }
    }

    /// Quantized matmul through the public API against an f64 reference.
    #[test]
    fn prop_quant_matmul(rows in 1usize..70, blocks in 1usize..8, n in 1usize..40, fmt in 0usize..3, seed in any::<u64>()) {
        let format = [QuantFormat::Q4_0, QuantFormat::Q4_1, QuantFormat::Q8_0][fmt];
        let cols = blocks * 32;
        let mut rng = StdRng::seed_from_u64(seed);
        let m = QMatrix::from_f32(format, rows, cols, &rand_vec(&mut rng, rows * cols)).unwrap();
        let x = rand_vec(&mut rng, n * cols);
        let mut out = vec![0f32; n * rows];
        m.matmul(&x, n, &mut out).unwrap();
        let mut w = vec![0f32; cols];
        for r in 0..rows {
            m.dequantize_row(r, &mut w);
            for t in 0..n {
                let (s, a) = w.iter().zip(&x[t * cols..]).fold((0f64, 0f64), |(s, a), (&wi, &xi)| {
                    let p = wi as f64 * xi as f64;
                    (s + p, a + p.abs())
                });
                prop_assert!((out[t * rows + r] as f64 - s).abs() <= 1e-5 * a + 1e-6);
            }
        }
    }
}
