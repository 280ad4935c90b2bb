//! Manual timing probe, ignored by default. Run with:
//! `cargo test -p pagoda-kernels --release --test timing -- --ignored --nocapture`
//!
//! Reports the best wall time over many short trials and, on Linux, the CPU
//! time of the calling thread per call (meaningful with `PAGODA_KERNEL_THREADS=1`,
//! where small jobs run on the caller), which sees through load from other
//! processes on a shared machine.

use std::time::Instant;

use pagoda_kernels::quant::{Precision, QMatrix, QuantFormat};

/// Nanoseconds this thread has spent on a CPU, if the kernel exposes it.
fn thread_cpu_ns() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    s.split_whitespace().next()?.parse().ok()
}

fn time_matmul(m: &QMatrix, n: usize, iters: usize) -> (f64, f64) {
    let x: Vec<f32> = (0..n * m.cols())
        .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
        .collect();
    let mut out = vec![0f32; n * m.rows()];
    let mut best = f64::INFINITY;
    let cpu0 = thread_cpu_ns();
    for _ in 0..30 {
        let start = Instant::now();
        for _ in 0..iters {
            m.matmul(&x, n, &mut out).unwrap();
        }
        best = best.min(start.elapsed().as_secs_f64() / iters as f64);
    }
    // The scheduler's run-time counter is coarse, so average over all trials.
    let cpu = match (cpu0, thread_cpu_ns()) {
        (Some(a), Some(b)) => (b - a) as f64 * 1e-9 / (30 * iters) as f64,
        _ => f64::NAN,
    };
    (best, cpu)
}

#[test]
#[ignore = "timing probe; run manually"]
fn timing_q4_1_matmul() {
    let shapes: &[(usize, usize)] = &[(576, 1536), (1536, 576)];
    let ns: Vec<usize> = std::env::var("TIMING_N")
        .ok()
        .map(|v| v.split(',').filter_map(|s| s.parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 2, 4, 5, 8, 32, 128]);
    for &(rows, cols) in shapes {
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 31) % 97) as f32 / 97.0 - 0.5)
            .collect();
        let m = QMatrix::from_f32(QuantFormat::Q4_1, rows, cols, &w).unwrap();
        for &n in &ns {
            let iters = (1_000 / n).max(2);
            let (wall, cpu) = time_matmul(&m, n, iters);
            eprintln!(
                "Q4_1 {rows}x{cols} n={n:4}: wall {:8.1} us  thread-cpu {:8.1} us",
                wall * 1e6,
                cpu * 1e6
            );
        }
    }
}

/// The ggml layout (f32 activations) against the packed int8 layout, per model matrix
/// (SmolLM2-135M's stacked qkv, o, stacked gate/up, down, and the Q8_0 output head).
#[test]
#[ignore = "timing probe; run manually"]
fn timing_packed_vs_ggml() {
    let shapes: &[(QuantFormat, usize, usize)] = &[
        (QuantFormat::Q4_1, 960, 576),
        (QuantFormat::Q4_1, 576, 576),
        (QuantFormat::Q4_1, 3072, 576),
        (QuantFormat::Q4_1, 576, 1536),
        (QuantFormat::Q8_0, 49152, 576),
    ];
    let ns: Vec<usize> = std::env::var("TIMING_N")
        .ok()
        .map(|v| v.split(',').filter_map(|s| s.parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 8, 32, 128]);
    for &(format, rows, cols) in shapes {
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 31) % 97) as f32 / 97.0 - 0.5)
            .collect();
        let ggml = QMatrix::from_f32(format, rows, cols, &w).unwrap();
        let precise = ggml.clone().into_packed();
        let fast = precise.clone().with_precision(Precision::Fast);
        for &n in &ns {
            let iters = (200_000_000 / (rows * cols * n)).clamp(1, 1000);
            let (a, _) = time_matmul(&ggml, n, iters);
            let (b, _) = time_matmul(&precise, n, iters);
            let (c, _) = time_matmul(&fast, n, iters);
            let gmacs = |t: f64| (rows * cols * n) as f64 / t * 1e-9;
            eprintln!(
                "{format:?} {rows:5}x{cols:4} n={n:4}: ggml {:6.1}  packed precise {:6.1} ({:.2}x)  fast {:6.1} ({:.2}x) GMAC/s",
                gmacs(a),
                gmacs(b),
                a / b,
                gmacs(c),
                a / c
            );
        }
    }
}

#[test]
#[ignore = "timing probe; run manually"]
fn timing_paged_attention() {
    use pagoda_kernels::attention::{paged_attention, AttnSeq, KvShape};
    // SmolLM2-135M: 9 query heads over 3 KV heads of 64, 16-token blocks.
    let shape = KvShape {
        num_blocks: 1100,
        block_size: 16,
        num_kv_heads: 3,
        head_dim: 64,
    };
    let kc: Vec<f32> = (0..shape.layer_len())
        .map(|i| ((i * 13) % 101) as f32 / 101.0 - 0.5)
        .collect();
    let vc = kc.clone();
    // The engine's default KV cache is f16.
    let kh: Vec<half::f16> = kc.iter().map(|&x| half::f16::from_f32(x)).collect();
    let vh = kh.clone();
    let table: Vec<u32> = (0..1100u32).rev().collect();
    // (label, sequences, query_len, context_len)
    for &(label, seqs, qlen, ctx) in &[
        ("decode 32 seqs x ctx 512", 32usize, 1usize, 512usize),
        ("decode 1 seq x ctx 4096", 1, 1, 4096),
        ("prefill 512 tokens", 1, 512, 512),
    ] {
        let specs: Vec<AttnSeq<'_>> = (0..seqs)
            .map(|s| AttnSeq {
                query_start: s * qlen,
                query_len: qlen,
                context_len: ctx,
                block_table: &table[(s * 32) % 500..],
            })
            .collect();
        let q: Vec<f32> = (0..seqs * qlen * 9 * 64)
            .map(|i| ((i * 7) % 13) as f32 / 13.0 - 0.5)
            .collect();
        let mut out = vec![0f32; q.len()];
        for kv in ["f32", "f16"] {
            let mut best = f64::INFINITY;
            let cpu0 = thread_cpu_ns();
            for _ in 0..20 {
                let start = Instant::now();
                if kv == "f32" {
                    paged_attention(&shape, &kc, &vc, &q, 9, &specs, &mut out).unwrap();
                } else {
                    paged_attention(&shape, &kh, &vh, &q, 9, &specs, &mut out).unwrap();
                }
                best = best.min(start.elapsed().as_secs_f64());
            }
            let best_cpu = match (cpu0, thread_cpu_ns()) {
                (Some(a), Some(b)) => (b - a) as f64 * 1e-9 / 20.0,
                _ => f64::NAN,
            };
            eprintln!(
                "attention {label} ({kv} cache): wall {:8.1} us  thread-cpu {:8.1} us",
                best * 1e6,
                best_cpu * 1e6
            );
        }
    }
}
