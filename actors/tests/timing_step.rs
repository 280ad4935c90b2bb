//! Manual timing probe of whole engine steps, ignored by default. Run with:
//! `cargo test -p pagoda-actors --release --test timing_step -- --ignored --nocapture`
//!
//! Drives the executor directly (no actors, no NATS) on the default model: prefills
//! `n` sequences of 128 tokens, then times decode steps of all `n` at once, with the
//! kernels' parallel calls capped at one thread and at every core (the calling thread is
//! one of them, as the executor's is). The median step is robust to a noisy machine;
//! the two pool sizes give the step's serial share by Amdahl's law,
//! `s = (p·T_p / T_1 − 1) / (p − 1)`, the part of a step the other cores cannot help with.
//!
//! `TIMING_N` (default `1,8,32`): batch sizes; `TIMING_POOLS` (default `1,<cores>`):
//! kernel pool sizes; `TIMING_STEPS` (default 48): timed decode steps per batch size;
//! `PAGODA_MODEL`: another GGUF file.

use std::path::PathBuf;
use std::time::Instant;

use pagoda_actors::config::KvCacheDtype;
use pagoda_actors::executor::backend::Cpu;
use pagoda_actors::executor::{models, open_model, Executor};
use pagoda_actors::messages::{NewSeqData, RunBatch, SamplingParams, ScheduledBatch, ScheduledSeq};

const PROMPT: usize = 128;
const BLOCK: usize = 16;

fn model_path() -> PathBuf {
    std::env::var_os("PAGODA_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../models/SmolLM2-135M-Instruct.Q4_1.gguf")
        })
}

fn executor(num_blocks: usize) -> Executor {
    let path = model_path();
    let (mut src, family, _) = open_model(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run ./scripts/fetch-model.sh first)",
            path.display()
        )
    });
    let backend = Cpu::new(Default::default());
    let model = models::load(&backend, family, &mut src).expect("loading the model");
    let kv = KvCacheDtype::Auto.resolve(src.stores_f32());
    Executor::new(backend, model, num_blocks, BLOCK, kv, vec![]).expect("the executor")
}

/// Median and mean decode-step seconds for `n` sequences, `steps` timed steps.
fn time_decode(ex: &mut Executor, n: usize, steps: usize, first_id: u64) -> (f64, f64) {
    let blocks_per_seq = (PROMPT + steps + 8).div_ceil(BLOCK);
    let tables: Vec<Vec<u32>> = (0..n)
        .map(|i| ((i * blocks_per_seq) as u32..((i + 1) * blocks_per_seq) as u32).collect())
        .collect();
    let params = SamplingParams {
        temperature: 0.0,
        ignore_eos: true,
        ..Default::default()
    };
    let ids = |i: usize| first_id + i as u64;
    // Prefill all sequences in one step.
    let seqs = (0..n)
        .map(|i| {
            let prompt: Vec<u32> = (0..PROMPT)
                .map(|t| ((t * 31 + i * 7) % 4000 + 100) as u32)
                .collect();
            ScheduledSeq {
                seq_id: ids(i),
                token_ids: prompt.clone(),
                start_pos: 0,
                block_table: tables[i].clone(),
                context_len: PROMPT,
                sample: true,
                new_seq: Some(NewSeqData {
                    prompt_token_ids: prompt,
                    output_token_ids: vec![],
                    params: params.clone(),
                }),
                num_draft: 0,
            }
        })
        .collect();
    let mut last = run(ex, seqs, vec![]);
    let mut times = Vec::with_capacity(steps);
    for s in 0..steps {
        let pos = PROMPT + s;
        let seqs = (0..n)
            .map(|i| ScheduledSeq {
                seq_id: ids(i),
                token_ids: vec![last[i]],
                start_pos: pos,
                block_table: tables[i].clone(),
                context_len: pos + 1,
                sample: true,
                new_seq: None,
                num_draft: 0,
            })
            .collect();
        let t = Instant::now();
        last = run(ex, seqs, vec![]);
        times.push(t.elapsed().as_secs_f64());
    }
    // Forget the sequences (their state in the executor).
    run(ex, vec![], (0..n).map(ids).collect());
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    times.sort_by(f64::total_cmp);
    (times[times.len() / 2], mean)
}

fn run(ex: &mut Executor, seqs: Vec<ScheduledSeq>, released: Vec<u64>) -> Vec<u32> {
    let n = seqs.len();
    let num_batched_tokens = seqs.iter().map(|s| s.token_ids.len()).sum();
    let ids: Vec<u64> = seqs.iter().map(|s| s.seq_id).collect();
    let out = ex
        .execute(RunBatch {
            batch: ScheduledBatch {
                step: 1,
                seqs,
                num_batched_tokens,
                ..Default::default()
            },
            released,
        })
        .expect("a step");
    assert!(out.failed.is_empty(), "{:?}", out.failed);
    assert_eq!(out.sampled.len(), n);
    ids.iter()
        .map(|id| {
            out.sampled
                .iter()
                .find(|t| t.seq_id == *id)
                .map(|t| t.token_id)
                .expect("a token per sequence")
        })
        .collect()
}

#[test]
#[ignore = "timing probe; run manually"]
fn timing_decode_step() {
    let list = |var: &str, default: Vec<usize>| -> Vec<usize> {
        std::env::var(var)
            .ok()
            .map(|v| v.split(',').filter_map(|s| s.parse().ok()).collect())
            .unwrap_or(default)
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let ns = list("TIMING_N", vec![1, 8, 32]);
    let pools = list("TIMING_POOLS", vec![1, cores]);
    let steps = list("TIMING_STEPS", vec![48])
        .first()
        .copied()
        .unwrap_or(48);
    let max_n = ns.iter().copied().max().unwrap_or(1);
    let num_blocks = max_n * (PROMPT + steps + 8).div_ceil(BLOCK);
    eprintln!(
        "int8 kernel {}, {cores} cores, {steps} decode steps after a {PROMPT}-token prompt",
        pagoda_kernels::int8::setting().expect("int8 level")
    );
    // Each pool size on a fresh thread (the caller is one of the threads of its calls).
    let results: Vec<Vec<f64>> = pools
        .iter()
        .map(|&threads| {
            let ns = ns.clone();
            std::thread::spawn(move || {
                let mut ex = executor(num_blocks);
                pagoda_kernels::pool::with_threads(threads, || {
                    // One warm-up round touches the KV pool and the weights.
                    time_decode(&mut ex, max_n, 4, 1_000_000);
                    ns.iter()
                        .enumerate()
                        .map(|(k, &n)| {
                            let (median, mean) = time_decode(&mut ex, n, steps, (k as u64) << 20);
                            eprintln!(
                                "n={n:3} pool {threads}: {:8.2} ms/step (mean {:8.2}) {:7.1} tok/s",
                                median * 1e3,
                                mean * 1e3,
                                n as f64 / median
                            );
                            median
                        })
                        .collect()
                })
            })
            .join()
            .expect("timing thread")
        })
        .collect();
    // Amdahl's law between a one-thread pool and each larger one.
    let Some(one) = pools.iter().position(|&p| p == 1) else {
        return;
    };
    for (i, &p) in pools.iter().enumerate().filter(|&(_, &p)| p > 1) {
        for (k, &n) in ns.iter().enumerate() {
            let (t1, tp) = (results[one][k], results[i][k]);
            let p = p as f64;
            eprintln!(
                "n={n:3}: speed-up {:.2}x on {p} threads, serial share {:.1} %",
                t1 / tp,
                100.0 * (p * tp / t1 - 1.0) / (p - 1.0)
            );
        }
    }
}
