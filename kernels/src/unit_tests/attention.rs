use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use super::{rand_vec, rng};
use crate::attention::{attention_with, paged_attention, write_kv, AttnSeq, KvElem, KvShape};
use crate::simd::{available_levels, Level};
use crate::KernelError;

/// One sequence of a test batch: its contiguous K/V and its paged layout.
struct SeqData {
    context_len: usize,
    query_len: usize,
    query_start: usize,
    k: Vec<f32>,
    v: Vec<f32>,
    table: Vec<u32>,
}

struct Batch {
    shape: KvShape,
    num_heads: usize,
    seqs: Vec<SeqData>,
    k_cache: Vec<f32>,
    v_cache: Vec<f32>,
    q: Vec<f32>,
    total_tokens: usize,
}

/// Build a batch: each sequence gets random K/V for `context_len` positions,
/// written through `write_kv` into shuffled, non-contiguous blocks of a
/// NaN-filled pool (so any read of an unwritten slot poisons the result).
/// `gap` leaves one uncovered token row between consecutive sequences.
#[allow(clippy::too_many_arguments)]
fn build(
    rng: &mut StdRng,
    block_size: usize,
    num_kv_heads: usize,
    group: usize,
    head_dim: usize,
    lens: &[(usize, usize)],
    q_scale: f32,
    gap: bool,
) -> Batch {
    let blocks_needed: usize = lens.iter().map(|&(c, _)| c.div_ceil(block_size)).sum();
    let num_blocks = blocks_needed + 3;
    let shape = KvShape {
        num_blocks,
        block_size,
        num_kv_heads,
        head_dim,
    };
    let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
    ids.shuffle(rng);
    let mut k_cache = vec![f32::NAN; shape.layer_len()];
    let mut v_cache = vec![f32::NAN; shape.layer_len()];
    let slot_len = num_kv_heads * head_dim;
    let mut seqs = Vec::new();
    let mut next_row = 0;
    let mut next_id = 0;
    for &(context_len, query_len) in lens {
        let nb = context_len.div_ceil(block_size);
        let table = ids[next_id..next_id + nb].to_vec();
        next_id += nb;
        let k = rand_vec(rng, context_len * slot_len, 1.0);
        let v = rand_vec(rng, context_len * slot_len, 1.0);
        let slots: Vec<usize> = (0..context_len)
            .map(|p| table[p / block_size] as usize * block_size + p % block_size)
            .collect();
        write_kv(&shape, &mut k_cache, &mut v_cache, &k, &v, &slots).unwrap();
        seqs.push(SeqData {
            context_len,
            query_len,
            query_start: next_row,
            k,
            v,
            table,
        });
        next_row += query_len + usize::from(gap);
    }
    let num_heads = num_kv_heads * group;
    let q = rand_vec(rng, next_row * num_heads * head_dim, q_scale);
    Batch {
        shape,
        num_heads,
        seqs,
        k_cache,
        v_cache,
        q,
        total_tokens: next_row,
    }
}

/// Full-softmax causal attention over each sequence's contiguous K/V, in f64.
fn naive(b: &Batch) -> Vec<f64> {
    naive_window(b, None)
}

/// [`naive`] where position `pos` sees only `pos + 1 − window ..= pos`.
fn naive_window(b: &Batch, window: Option<usize>) -> Vec<f64> {
    let (hd, nkv, h) = (b.shape.head_dim, b.shape.num_kv_heads, b.num_heads);
    let group = h / nkv;
    let scale = 1.0 / (hd as f64).sqrt();
    let mut out = vec![0f64; b.total_tokens * h * hd];
    for s in &b.seqs {
        for i in 0..s.query_len {
            let pos = s.context_len - s.query_len + i;
            let t = s.query_start + i;
            for head in 0..h {
                let kvh = head / group;
                let q = &b.q[(t * h + head) * hd..(t * h + head + 1) * hd];
                let first = window.map_or(0, |w| (pos + 1).saturating_sub(w));
                let scores: Vec<f64> = (first..=pos)
                    .map(|p| {
                        let k = &s.k[(p * nkv + kvh) * hd..(p * nkv + kvh + 1) * hd];
                        q.iter()
                            .zip(k)
                            .map(|(&a, &b)| a as f64 * b as f64)
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f64 = weights.iter().sum();
                let o = &mut out[(t * h + head) * hd..(t * h + head + 1) * hd];
                for (p, w) in (first..=pos).zip(weights.iter()) {
                    let v = &s.v[(p * nkv + kvh) * hd..(p * nkv + kvh + 1) * hd];
                    for (od, &vd) in o.iter_mut().zip(v) {
                        *od += w / total * vd as f64;
                    }
                }
            }
        }
    }
    out
}

fn run(b: &Batch, level: Level) -> Result<Vec<f32>, KernelError> {
    run_on(b, level, &b.k_cache, &b.v_cache)
}

/// Attention of `b`'s queries over the caches `k` / `v` (laid out as `b.shape`).
fn run_on<E: KvElem>(b: &Batch, level: Level, k: &[E], v: &[E]) -> Result<Vec<f32>, KernelError> {
    let seqs: Vec<AttnSeq<'_>> = b
        .seqs
        .iter()
        .map(|s| AttnSeq {
            query_start: s.query_start,
            query_len: s.query_len,
            context_len: s.context_len,
            block_table: &s.table,
        })
        .collect();
    let mut out = vec![f32::NAN; b.q.len()];
    let scale = 1.0 / (b.shape.head_dim as f32).sqrt();
    attention_with(
        level,
        &b.shape,
        k,
        v,
        &b.q,
        b.num_heads,
        &seqs,
        scale,
        None,
        &mut out,
    )?;
    Ok(out)
}

fn check(b: &Batch, ctx: &str) {
    let want = naive(b);
    for level in available_levels() {
        let got = run(b, level).unwrap();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (*g as f64 - w).abs() <= 1e-4,
                "{ctx} {level:?}: index {i}: got {g}, want {w}"
            );
        }
    }
}

#[test]
fn decode_batch_of_different_lengths() {
    let mut rng = rng(40);
    let lens = [(1, 1), (15, 1), (16, 1), (17, 1), (100, 1), (333, 1)];
    let b = build(&mut rng, 16, 3, 3, 64, &lens, 2.0, false);
    check(&b, "decode");
}

#[test]
fn chunked_prefill_and_mixed_batch() {
    let mut rng = rng(41);
    // A fresh prefill, a later prefill chunk, and decodes in one batch.
    let lens = [(40, 40), (90, 25), (7, 1), (64, 16), (200, 1)];
    let b = build(&mut rng, 16, 3, 3, 64, &lens, 3.0, false);
    check(&b, "mixed");
}

#[test]
fn gqa_mha_mqa_and_odd_sizes() {
    let mut rng = rng(42);
    for &(bs, nkv, group, hd) in &[
        (1, 2, 1, 8),
        (7, 1, 4, 12),
        (16, 4, 1, 64),
        (5, 3, 3, 20),
        (32, 2, 2, 3),
        // Groups of more than three heads (fused three at a time, then the rest) and head
        // sizes with 32-, 8- and 1-wide column remainders.
        (16, 2, 7, 40),
        (4, 1, 5, 75),
    ] {
        let lens = [(23, 5), (1, 1), (50, 50), (31, 2)];
        let b = build(&mut rng, bs, nkv, group, hd, &lens, 4.0, false);
        check(&b, &format!("bs={bs} nkv={nkv} group={group} hd={hd}"));
    }
}

#[test]
fn long_context_sharp_softmax() {
    let mut rng = rng(43);
    // Large query scale makes the softmax peaky so the running max changes
    // between blocks and the rescaling path is exercised.
    let b = build(&mut rng, 16, 3, 3, 64, &[(1500, 3)], 30.0, false);
    check(&b, "long");
}

#[test]
fn uncovered_rows_are_zeroed() {
    let mut rng = rng(44);
    let b = build(&mut rng, 4, 1, 2, 8, &[(5, 2), (9, 3)], 1.0, true);
    let row = b.num_heads * b.shape.head_dim;
    for level in available_levels() {
        let got = run(&b, level).unwrap();
        for gap_row in [2, 6] {
            assert!(got[gap_row * row..(gap_row + 1) * row]
                .iter()
                .all(|&v| v == 0.0));
        }
    }
    check(&b, "gaps");
}

#[test]
fn attention_validates_arguments() {
    let mut rng = rng(45);
    let b = build(&mut rng, 4, 2, 2, 8, &[(10, 2)], 1.0, false);
    let table = b.seqs[0].table.clone();
    let mut out = vec![0f32; b.q.len()];
    let call = |seqs: &[AttnSeq<'_>], num_heads: usize, out: &mut [f32]| {
        paged_attention(&b.shape, &b.k_cache, &b.v_cache, &b.q, num_heads, seqs, out)
    };
    let good = AttnSeq {
        query_start: 0,
        query_len: 2,
        context_len: 10,
        block_table: &table,
    };
    call(&[good], 4, &mut out).unwrap();
    assert!(call(&[good], 3, &mut out).is_err());
    assert!(call(&[good], 4, &mut out[1..]).is_err());
    let short = AttnSeq {
        block_table: &table[..2],
        ..good
    };
    assert!(matches!(
        call(&[short], 4, &mut out),
        Err(KernelError::LengthMismatch {
            what: "block_table",
            ..
        })
    ));
    let bad_ids = [0u32, 1, 99];
    let bad = AttnSeq {
        block_table: &bad_ids,
        ..good
    };
    assert!(matches!(
        call(&[bad], 4, &mut out),
        Err(KernelError::OutOfRange {
            what: "block id",
            ..
        })
    ));
    let too_long = AttnSeq {
        query_len: 11,
        context_len: 10,
        ..good
    };
    assert!(call(&[too_long], 4, &mut out).is_err());
    let past_end = AttnSeq {
        query_start: 1,
        ..good
    };
    assert!(call(&[past_end], 4, &mut out).is_err());
    let overlap = AttnSeq {
        query_start: 1,
        query_len: 1,
        ..good
    };
    assert!(call(&[good, overlap], 4, &mut out).is_err());
    let bad_shape = KvShape {
        head_dim: 0,
        ..b.shape
    };
    assert!(paged_attention(
        &bad_shape,
        &b.k_cache,
        &b.v_cache,
        &b.q,
        4,
        &[good],
        &mut out
    )
    .is_err());
    assert!(paged_attention(
        &b.shape,
        &b.k_cache[1..],
        &b.v_cache,
        &b.q,
        4,
        &[good],
        &mut out
    )
    .is_err());
}

#[test]
fn write_kv_round_trip_and_errors() {
    let mut rng = rng(46);
    let shape = KvShape {
        num_blocks: 5,
        block_size: 4,
        num_kv_heads: 3,
        head_dim: 8,
    };
    assert_eq!(shape.layer_len(), 5 * 4 * 3 * 8);
    let mut kc = vec![0f32; shape.layer_len()];
    let mut vc = vec![0f32; shape.layer_len()];
    let mut slots: Vec<usize> = (0..20).collect();
    slots.shuffle(&mut rng);
    slots.truncate(11);
    let k = rand_vec(&mut rng, 11 * 24, 1.0);
    let v = rand_vec(&mut rng, 11 * 24, 1.0);
    write_kv(&shape, &mut kc, &mut vc, &k, &v, &slots).unwrap();
    for (i, &slot) in slots.iter().enumerate() {
        let (block, off) = (slot / 4, slot % 4);
        for h in 0..3 {
            for d in 0..8 {
                let at = ((block * 4 + off) * 3 + h) * 8 + d;
                assert_eq!(kc[at], k[(i * 3 + h) * 8 + d]);
                assert_eq!(vc[at], v[(i * 3 + h) * 8 + d]);
            }
        }
    }
    let written: usize = kc.iter().filter(|&&x| x != 0.0).count();
    assert_eq!(written, 11 * 24);
    assert!(matches!(
        write_kv(&shape, &mut kc, &mut vc, &k[..24], &v[..24], &[20]),
        Err(KernelError::OutOfRange {
            index: 20,
            bound: 20,
            ..
        })
    ));
    assert!(write_kv(&shape, &mut kc, &mut vc, &k[..23], &v[..24], &[0]).is_err());
    assert!(write_kv(&shape, &mut kc[1..], &mut vc, &k[..24], &v[..24], &[0]).is_err());
    write_kv(&shape, &mut kc, &mut vc, &[], &[], &[]).unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]

    #[test]
    fn prop_paged_attention_matches_naive(
        block_size in prop_oneof![Just(1usize), Just(2), Just(3), Just(7), Just(16)],
        num_kv_heads in 1usize..4,
        group in 1usize..4,
        head_dim in prop_oneof![Just(4usize), Just(8), Just(12), Just(16), Just(64)],
        seq_specs in prop::collection::vec((1usize..60, 0.0f64..1.0), 1..5),
        q_scale in 0.1f32..20.0,
        seed in any::<u64>(),
    ) {
        let lens: Vec<(usize, usize)> = seq_specs
            .iter()
            .map(|&(ctx, frac)| (ctx, 1 + ((ctx - 1) as f64 * frac) as usize))
            .collect();
        let mut rng = rng(seed);
        let b = build(&mut rng, block_size, num_kv_heads, group, head_dim, &lens, q_scale, false);
        let want = naive(&b);
        for level in available_levels() {
            let got = run(&b, level).unwrap();
            for i in 0..got.len() {
                prop_assert!((got[i] as f64 - want[i]).abs() <= 1e-4,
                    "{:?} index {}: got {} want {}", level, i, got[i], want[i]);
            }
        }
    }
}

/// The vectorised exp used by the AVX2 softmax against f64 `exp`.
#[cfg(target_arch = "x86_64")]
#[test]
fn avx2_exp_accuracy() {
    use crate::attention::VecOps;
    if crate::simd::level() != Level::Avx2 {
        return;
    }
    let xs: Vec<f32> = (0..20_000).map(|i| -100.0 + i as f32 * 0.0055).collect();
    // The whole range, and a short slice that exercises the padded tail.
    for range in [0..xs.len(), 17_000..17_013] {
        let xs = &xs[range];
        let mut s = xs.to_vec();
        // SAFETY: AVX2 availability checked above.
        let sum = unsafe { crate::x86::Avx2Ops::exp_shift_sum(&mut s, 0.0) };
        let mut want_sum = 0f64;
        for (&x, &e) in xs.iter().zip(&s) {
            let want = (x as f64).exp();
            want_sum += want;
            if x > -87.0 {
                assert!(
                    ((e as f64) - want).abs() <= 1e-6 * want,
                    "exp({x}) = {e}, want {want}"
                );
            } else {
                assert!((0.0..1e-37).contains(&e), "exp({x}) = {e}");
            }
        }
        assert!((sum as f64 - want_sum).abs() <= 1e-4 * want_sum);
    }
    let mut nan = [f32::NAN, 0.0];
    // SAFETY: as above.
    unsafe { crate::x86::Avx2Ops::exp_shift_sum(&mut nan, 0.0) };
    assert!(nan[0].is_nan() && nan[1] == 1.0);
}

/// An f16 cache, written through `write_kv`, gives the attention of the f16-rounded keys
/// and values, on every level.
#[test]
fn f16_cache_matches_naive_on_rounded_values() {
    use half::f16;
    let mut rng = rng(44);
    let lens = [(1, 1), (17, 1), (90, 25), (333, 1), (40, 40), (7, 1)];
    let mut b = build(&mut rng, 16, 3, 3, 64, &lens, 3.0, false);
    let bs = b.shape.block_size;
    let mut kc = vec![f16::NAN; b.shape.layer_len()];
    let mut vc = vec![f16::NAN; b.shape.layer_len()];
    for s in &mut b.seqs {
        let slots: Vec<usize> = (0..s.context_len)
            .map(|p| s.table[p / bs] as usize * bs + p % bs)
            .collect();
        write_kv(&b.shape, &mut kc, &mut vc, &s.k, &s.v, &slots).unwrap();
        for x in s.k.iter_mut().chain(s.v.iter_mut()) {
            *x = f16::from_f32(*x).to_f32();
        }
    }
    let want = naive(&b);
    for level in available_levels() {
        let out = run_on(&b, level, &kc, &vc).unwrap();
        for (i, (g, w)) in out.iter().zip(&want).enumerate() {
            assert!(
                (*g as f64 - w).abs() <= 1e-4,
                "f16 {level:?}: index {i}: got {g}, want {w}"
            );
        }
    }
}

/// Sliding windows of every size against the naive reference, on every level; blocks
/// wholly before every window are poisoned (NaN, and a table entry out of range) to show
/// they are never read.
#[test]
fn sliding_window_matches_the_reference_and_skips_old_blocks() {
    let mut rng = rng(41);
    for window in [1, 3, 5, 16, 17, 40, 1000] {
        let mut b = build(
            &mut rng,
            4,
            2,
            2,
            8,
            &[(37, 1), (29, 7), (12, 12)],
            1.0,
            false,
        );
        let want = naive_window(&b, Some(window));
        // Poison what no window reaches.
        for s in &mut b.seqs {
            let first = (s.context_len - s.query_len + 1).saturating_sub(window);
            for bi in 0..first / b.shape.block_size {
                let block = s.table[bi] as usize;
                let len = b.shape.block_size * b.shape.slot_len();
                b.k_cache[block * len..(block + 1) * len].fill(f32::NAN);
                b.v_cache[block * len..(block + 1) * len].fill(f32::NAN);
                s.table[bi] = u32::MAX;
            }
        }
        for level in available_levels() {
            let seqs: Vec<AttnSeq<'_>> = b
                .seqs
                .iter()
                .map(|s| AttnSeq {
                    query_start: s.query_start,
                    query_len: s.query_len,
                    context_len: s.context_len,
                    block_table: &s.table,
                })
                .collect();
            let mut out = vec![f32::NAN; b.q.len()];
            let scale = 1.0 / (b.shape.head_dim as f32).sqrt();
            attention_with(
                level,
                &b.shape,
                &b.k_cache,
                &b.v_cache,
                &b.q,
                b.num_heads,
                &seqs,
                scale,
                Some(window),
                &mut out,
            )
            .unwrap();
            for (i, (g, w)) in out.iter().zip(&want).enumerate() {
                assert!(
                    (*g as f64 - w).abs() <= 1e-4,
                    "window {window} {level:?}: index {i}: got {g}, want {w}"
                );
            }
        }
    }
}
