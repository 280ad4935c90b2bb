//! `pagoda bench`: drives the engine with synthetic requests — in-process, or over NATS
//! through `pagoda::client` — and reports throughput and latency as the client sees them
//! (from the arrival times of the stream's own events).

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use pagoda_actors::engine::Engine;
use pagoda_actors::messages::SamplingParams;
use pagoda_actors::protocol::{GenerateRequest, Prompt, StreamEvent, WireRequest};

use crate::client::Client;

/// What the benchmark drives.
#[derive(Clone)]
pub enum Target {
    /// The engine in this process, through `Engine::generate`.
    InProcess(Engine),
    /// A pagoda engine behind NATS, through the client module.
    Nats(Client),
}

impl Target {
    pub fn name(&self) -> &'static str {
        match self {
            Target::InProcess(_) => "in-process",
            Target::Nats(_) => "nats",
        }
    }
}
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::Serialize;

/// What one benchmark run does.
#[derive(Debug, Clone)]
pub struct BenchSpec {
    pub num_prompts: usize,
    pub max_concurrency: usize,
    pub input_len: usize,
    pub output_len: usize,
    pub seed: u64,
}

/// One request as the client saw it.
#[derive(Debug, Clone, Default)]
struct RequestTrace {
    ok: bool,
    output_tokens: usize,
    ttft: Duration,
    e2e: Duration,
    /// Gaps between consecutive token arrivals.
    itl: Vec<Duration>,
}

/// Summary statistics of a distribution, in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Stats {
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

impl Stats {
    fn of(mut xs: Vec<f64>) -> Self {
        if xs.is_empty() {
            return Self::default();
        }
        xs.sort_by(|a, b| a.total_cmp(b));
        let pct = |p: f64| xs[((p / 100.0) * (xs.len() - 1) as f64).round() as usize];
        Self {
            mean: xs.iter().sum::<f64>() / xs.len() as f64,
            p50: pct(50.0),
            p90: pct(90.0),
            p99: pct(99.0),
        }
    }
}

/// The result of one run.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub target: String,
    pub max_concurrency: usize,
    pub num_prompts: usize,
    pub successful: usize,
    pub failed: usize,
    pub duration_s: f64,
    pub request_throughput: f64,
    pub output_throughput: f64,
    pub total_token_throughput: f64,
    /// Output tokens per second of one stream while decoding (1 / mean TPOT).
    pub per_stream_decode_tok_s: f64,
    pub ttft_ms: Stats,
    pub tpot_ms: Stats,
    pub itl_ms: Stats,
    pub e2e_ms: Stats,
}

impl BenchReport {
    pub fn print(&self) {
        println!(
            "---------- {} | concurrency {} ----------",
            self.target, self.max_concurrency
        );
        println!("successful requests:        {}", self.successful);
        println!("failed requests:            {}", self.failed);
        println!("duration (s):               {:.2}", self.duration_s);
        println!("request throughput (req/s): {:.2}", self.request_throughput);
        println!("output throughput (tok/s):  {:.1}", self.output_throughput);
        println!(
            "total throughput (tok/s):   {:.1}",
            self.total_token_throughput
        );
        println!(
            "per-stream decode (tok/s):  {:.1}",
            self.per_stream_decode_tok_s
        );
        for (name, s) in [
            ("TTFT", &self.ttft_ms),
            ("TPOT", &self.tpot_ms),
            ("ITL", &self.itl_ms),
            ("E2E", &self.e2e_ms),
        ] {
            println!(
                "{name:<5} ms  mean {:>9.1}  p50 {:>9.1}  p90 {:>9.1}  p99 {:>9.1}",
                s.mean, s.p50, s.p90, s.p99
            );
        }
    }
}

/// Token ids the synthetic prompts draw from: ordinary tokens of any vocabulary of at
/// least 30 000 entries, so both targets get the same prompts.
const PROMPT_IDS: std::ops::Range<u32> = 100..30_000;

/// Random prompts of exactly `input_len` token ids.
fn prompts(spec: &BenchSpec) -> Vec<Vec<u32>> {
    let mut rng = StdRng::seed_from_u64(spec.seed);
    (0..spec.num_prompts)
        .map(|_| {
            (0..spec.input_len)
                .map(|_| rng.gen_range(PROMPT_IDS))
                .collect()
        })
        .collect()
}

/// Records token arrivals of one request.
struct Recorder {
    start: Instant,
    last: Option<Instant>,
    trace: RequestTrace,
}

impl Recorder {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            last: None,
            trace: RequestTrace::default(),
        }
    }

    fn tokens(&mut self, n: usize) {
        if n == 0 {
            return;
        }
        let now = Instant::now();
        match self.last {
            None => self.trace.ttft = now - self.start,
            Some(prev) => self.trace.itl.push(now - prev),
        }
        self.last = Some(now);
        self.trace.output_tokens += n;
    }

    fn done(mut self) -> RequestTrace {
        self.trace.ok = true;
        self.trace.e2e = self.start.elapsed();
        self.trace
    }
}

async fn one(target: Target, id: usize, prompt: Vec<u32>, output_len: usize) -> RequestTrace {
    let params = SamplingParams {
        temperature: 0.0,
        max_tokens: output_len as u32,
        ignore_eos: true,
        ..Default::default()
    };
    let mut rec = Recorder::new();
    match target {
        Target::InProcess(engine) => {
            let mut rx = engine.generate(GenerateRequest {
                id: format!("bench-{id}"),
                prompt: Prompt::TokenIds(prompt),
                params,
            });
            while let Some(ev) = rx.recv().await {
                match &ev {
                    StreamEvent::Delta { token_ids, .. }
                    | StreamEvent::Finished { token_ids, .. } => rec.tokens(token_ids.len()),
                    StreamEvent::Error(e) => {
                        tracing::warn!(error = %e.message, "bench request failed");
                        return rec.trace;
                    }
                }
                if ev.is_final() {
                    return rec.done();
                }
            }
            rec.trace
        }
        Target::Nats(client) => {
            let req = WireRequest {
                prompt_token_ids: Some(prompt),
                params,
                ..WireRequest::default()
            };
            let mut stream = match client.generate(req).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "bench request failed");
                    return rec.trace;
                }
            };
            while let Some(item) = stream.next().await {
                match item {
                    Ok(chunk) => {
                        rec.tokens(chunk.token_ids.len());
                        if chunk.is_final() {
                            return rec.done();
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "bench request failed");
                        return rec.trace;
                    }
                }
            }
            rec.trace
        }
    }
}

/// Runs `spec` against `target`: at most `max_concurrency` requests in flight.
pub async fn run(target: &Target, spec: &BenchSpec) -> BenchReport {
    let prompts = prompts(spec);
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(spec.max_concurrency.max(1)));
    let started = Instant::now();
    let mut handles = Vec::new();
    for (i, p) in prompts.into_iter().enumerate() {
        let permit = sem.clone().acquire_owned().await;
        let target = target.clone();
        let out = spec.output_len;
        handles.push(tokio::spawn(async move {
            let t = one(target, i, p, out).await;
            drop(permit);
            t
        }));
    }
    let mut traces = Vec::new();
    for h in handles {
        traces.push(h.await.unwrap_or_default());
    }
    let duration = started.elapsed().as_secs_f64();
    let ok: Vec<&RequestTrace> = traces.iter().filter(|t| t.ok).collect();
    let out_tokens: usize = ok.iter().map(|t| t.output_tokens).sum();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let tpot: Vec<f64> = ok
        .iter()
        .filter(|t| t.output_tokens > 1)
        .map(|t| ms(t.e2e - t.ttft) / (t.output_tokens - 1) as f64)
        .collect();
    let tpot_stats = Stats::of(tpot);
    BenchReport {
        target: target.name().to_string(),
        max_concurrency: spec.max_concurrency,
        num_prompts: spec.num_prompts,
        successful: ok.len(),
        failed: traces.len() - ok.len(),
        duration_s: duration,
        request_throughput: ok.len() as f64 / duration,
        output_throughput: out_tokens as f64 / duration,
        total_token_throughput: (out_tokens + ok.len() * spec.input_len) as f64 / duration,
        per_stream_decode_tok_s: if tpot_stats.mean > 0.0 {
            1e3 / tpot_stats.mean
        } else {
            0.0
        },
        ttft_ms: Stats::of(ok.iter().map(|t| ms(t.ttft)).collect()),
        tpot_ms: tpot_stats,
        itl_ms: Stats::of(
            ok.iter()
                .flat_map(|t| t.itl.iter().map(|d| ms(*d)))
                .collect(),
        ),
        e2e_ms: Stats::of(ok.iter().map(|t| ms(t.e2e)).collect()),
    }
}
