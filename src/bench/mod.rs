//! `pagoda bench`: drives a target — the engine in-process, a pagoda over NATS through
//! `pagoda::client`, or llama.cpp's `llama-server` over HTTP — with the same requests, and
//! reports throughput and latency as the client sees them (from the arrival times of the
//! stream's own events).

pub mod llama;
pub mod plot;
pub mod workload;

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use pagoda_actors::engine::Engine;
use pagoda_actors::messages::SamplingParams;
use pagoda_actors::protocol::{GenerateRequest, Prompt, StreamEvent, WireRequest};
use serde::{Deserialize, Serialize};

use crate::client::Client;
use workload::{BenchRequest, Dataset, PromptInput};

/// What the benchmark drives.
#[derive(Clone)]
pub enum Target {
    /// The engine in this process, through `Engine::generate`.
    InProcess(Engine),
    /// A pagoda engine behind NATS, through the client module.
    Nats(Client),
    /// llama.cpp's llama-server, through its `/completion` streaming endpoint.
    LlamaServer(llama::LlamaServer),
}

/// The speculative-decoding counters of an in-process engine (`None` for other targets).
pub async fn spec_counts(target: &Target) -> Option<pagoda_actors::messages::SpecCounts> {
    match target {
        Target::InProcess(engine) => engine.scheduler_stats().await.ok().map(|s| s.spec),
        _ => None,
    }
}

impl Target {
    pub fn name(&self) -> &'static str {
        match self {
            Target::InProcess(_) => "in-process",
            Target::Nats(_) => "nats",
            Target::LlamaServer(_) => LLAMA_SERVER,
        }
    }
}

/// The target name of llama-server rows (reports and plots).
pub const LLAMA_SERVER: &str = "llama-server";

/// What one benchmark run does.
#[derive(Debug, Clone)]
pub struct BenchSpec {
    pub dataset: Dataset,
    pub num_prompts: usize,
    pub max_concurrency: usize,
    /// Requests per second of the Poisson arrivals; infinite: all at once.
    pub request_rate: f64,
    /// Output length of random prompts (and of file prompts without their own).
    pub output_len: usize,
    pub ignore_eos: bool,
    /// Ask llama-server to reuse its cached prompt prefix (`cache_prompt`); pagoda's prefix
    /// cache is a setting of the engine, not of the request.
    pub cache_prompt: bool,
    pub seed: u64,
    /// Sampling temperature (0: greedy); above 0 request i is seeded with `seed + i`.
    pub temperature: f32,
    /// Draw a progress bar on stderr (only ever when stderr is a terminal).
    pub progress: bool,
    /// Every pagoda request under this JSON schema (`guided_json`).
    pub guided_json: Option<serde_json::Value>,
}

/// One request as the client saw it.
#[derive(Debug, Clone, Default)]
struct RequestTrace {
    ok: bool,
    error: Option<String>,
    output_tokens: usize,
    /// The prompt's length as the target counted it, or as sent.
    prompt_tokens: usize,
    ttft: Duration,
    e2e: Duration,
    /// Gaps between consecutive token arrivals.
    itl: Vec<Duration>,
}

/// Summary statistics of a distribution, in milliseconds. Percentiles interpolate
/// linearly between the closest ranks (as numpy's default, which vLLM's bench uses).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

impl Stats {
    pub fn of(mut xs: Vec<f64>) -> Self {
        if xs.is_empty() {
            return Self::default();
        }
        xs.sort_by(|a, b| a.total_cmp(b));
        Self {
            mean: xs.iter().sum::<f64>() / xs.len() as f64,
            p50: percentile(&xs, 50.0),
            p90: percentile(&xs, 90.0),
            p99: percentile(&xs, 99.0),
        }
    }
}

/// The `p`-th percentile of sorted, non-empty `xs`, linearly interpolated.
fn percentile(xs: &[f64], p: f64) -> f64 {
    let rank = (p / 100.0) * (xs.len() - 1) as f64;
    let lo = rank.floor() as usize;
    let hi = rank.ceil() as usize;
    xs[lo] + (xs[hi] - xs[lo]) * (rank - lo as f64)
}

/// The result of one run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchReport {
    pub target: String,
    pub max_concurrency: usize,
    /// Requests per second of the Poisson arrivals; null: all at once (`inf`).
    #[serde(default)]
    pub request_rate: Option<f64>,
    pub num_prompts: usize,
    /// `random` or the dataset file.
    #[serde(default)]
    pub dataset: String,
    /// Prompt and shared-prefix length of random prompts (absent for a dataset file).
    #[serde(default)]
    pub input_len: Option<usize>,
    #[serde(default)]
    pub prefix_len: Option<usize>,
    /// Output length asked for (dataset lines may ask for their own).
    #[serde(default)]
    pub output_len: usize,
    #[serde(default)]
    pub ignore_eos: bool,
    /// Every request was under a JSON schema (`--guided-json`).
    #[serde(default)]
    pub guided_json: bool,
    pub successful: usize,
    pub failed: usize,
    /// The first failure's message, when a request failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
    pub duration_s: f64,
    #[serde(default)]
    pub total_input_tokens: usize,
    #[serde(default)]
    pub total_output_tokens: usize,
    pub request_throughput: f64,
    pub output_throughput: f64,
    pub total_token_throughput: f64,
    /// Output tokens per second of one stream while decoding (1 / mean TPOT).
    pub per_stream_decode_tok_s: f64,
    pub ttft_ms: Stats,
    pub tpot_ms: Stats,
    pub itl_ms: Stats,
    pub e2e_ms: Stats,
    /// The x86 features that decide the kernels (`avx2`, `avx_vnni`, `avx512_vnni`) of the
    /// machine that ran the bench (and, for `in-process`, the engine).
    #[serde(default)]
    pub cpu_features: String,
    /// The int8 kernel of an in-process engine (empty for other targets).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub int8_kernel: String,
    /// Which pass of `--rounds` ran it, from 0.
    #[serde(default)]
    pub round: usize,
}

/// The CPU features that decide which kernels run, as `/proc/cpuinfo` spells them.
pub fn cpu_features() -> String {
    #[cfg(target_arch = "x86_64")]
    {
        let mut have = Vec::new();
        if std::arch::is_x86_feature_detected!("avx2") {
            have.push("avx2");
        }
        if std::arch::is_x86_feature_detected!("avx512vnni") {
            have.push("avx512_vnni");
        }
        if std::arch::is_x86_feature_detected!("avxvnni") {
            have.push("avx_vnni");
        }
        if have.is_empty() {
            "none of avx2, avx_vnni, avx512_vnni".into()
        } else {
            have.join(" ")
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        std::env::consts::ARCH.into()
    }
}

impl BenchReport {
    pub fn print(&self) {
        let rate = match self.request_rate {
            Some(r) => format!("{r} req/s (Poisson)"),
            None => "inf (all at once)".into(),
        };
        println!(
            "---------- {} | concurrency {} | request rate {} ----------",
            self.target, self.max_concurrency, rate
        );
        if !self.cpu_features.is_empty() {
            let kernel = if self.int8_kernel.is_empty() {
                String::new()
            } else {
                format!(", int8 kernel {}", self.int8_kernel)
            };
            println!("cpu features:               {}{kernel}", self.cpu_features);
        }
        println!("successful requests:        {}", self.successful);
        println!("failed requests:            {}", self.failed);
        if let Some(e) = &self.first_error {
            println!("first error:                {e}");
        }
        println!("duration (s):               {:.2}", self.duration_s);
        println!("total input tokens:         {}", self.total_input_tokens);
        println!("total output tokens:        {}", self.total_output_tokens);
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

/// Records token arrivals of one request.
struct Recorder {
    start: Instant,
    last: Option<Instant>,
    trace: RequestTrace,
}

impl Recorder {
    fn new(known_prompt_tokens: usize) -> Self {
        Self {
            start: Instant::now(),
            last: None,
            trace: RequestTrace {
                prompt_tokens: known_prompt_tokens,
                ..RequestTrace::default()
            },
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

    fn prompt_tokens(&mut self, n: usize) {
        if n > 0 {
            self.trace.prompt_tokens = n;
        }
    }

    fn done(mut self) -> RequestTrace {
        self.trace.ok = true;
        self.trace.e2e = self.start.elapsed();
        self.trace
    }

    fn fail(mut self, target: &str, error: impl std::fmt::Display) -> RequestTrace {
        tracing::warn!(target = target, error = %error, "bench request failed");
        self.trace.error = Some(error.to_string());
        self.trace
    }
}

async fn one(target: Target, id: usize, req: BenchRequest, spec: Arc<BenchSpec>) -> RequestTrace {
    let params = SamplingParams {
        temperature: spec.temperature,
        seed: (spec.temperature > 0.0).then(|| spec.seed.wrapping_add(id as u64)),
        max_tokens: req.output_len as u32,
        ignore_eos: spec.ignore_eos,
        guided_json: spec.guided_json.clone(),
        ..Default::default()
    };
    let mut rec = Recorder::new(req.known_input_len().unwrap_or(0));
    let name = target.name();
    match target {
        Target::InProcess(engine) => {
            let prompt = match req.prompt {
                PromptInput::TokenIds(ids) => Prompt::TokenIds(ids),
                PromptInput::Text(text) => Prompt::Text(text),
            };
            let mut rx = engine.generate(GenerateRequest {
                id: format!("bench-{id}"),
                prompt,
                params,
            });
            while let Some(ev) = rx.next_event().await {
                match ev {
                    StreamEvent::Delta { token_ids, .. } => rec.tokens(token_ids.len()),
                    StreamEvent::Finished {
                        token_ids, usage, ..
                    } => {
                        rec.tokens(token_ids.len());
                        rec.prompt_tokens(usage.prompt_tokens as usize);
                        return rec.done();
                    }
                    StreamEvent::Error(e) => return rec.fail(name, e.message),
                }
            }
            rec.fail(name, "the engine stopped before the request finished")
        }
        Target::Nats(client) => {
            let (prompt, prompt_token_ids) = match req.prompt {
                PromptInput::TokenIds(ids) => (None, Some(ids)),
                PromptInput::Text(text) => (Some(text), None),
            };
            let wire = WireRequest {
                prompt,
                prompt_token_ids,
                params,
                ..WireRequest::default()
            };
            let mut stream = match client.generate(wire).await {
                Ok(s) => s,
                Err(e) => return rec.fail(name, e),
            };
            while let Some(item) = stream.next().await {
                match item {
                    Ok(chunk) => {
                        rec.tokens(chunk.token_ids.len());
                        if chunk.is_final() {
                            if let Some(u) = chunk.usage {
                                rec.prompt_tokens(u.prompt_tokens as usize);
                            }
                            return rec.done();
                        }
                    }
                    Err(e) => return rec.fail(name, e),
                }
            }
            rec.fail(name, "the stream ended before the last chunk")
        }
        Target::LlamaServer(server) => {
            let prompt = match req.prompt {
                PromptInput::TokenIds(ids) => serde_json::json!(ids),
                PromptInput::Text(text) => serde_json::json!(text),
            };
            let body = llama::completion_body(
                prompt,
                req.output_len,
                spec.ignore_eos,
                spec.cache_prompt,
                spec.temperature,
            );
            match server.completion(&body, |n| rec.tokens(n)).await {
                Ok(prompt_tokens) => {
                    rec.prompt_tokens(prompt_tokens.unwrap_or(0));
                    rec.done()
                }
                Err(e) => rec.fail(name, e),
            }
        }
    }
}

fn progress_bar(spec: &BenchSpec, target: &str) -> indicatif::ProgressBar {
    if !spec.progress || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::with_draw_target(
        Some(spec.num_prompts as u64),
        indicatif::ProgressDrawTarget::stderr(),
    );
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{elapsed_precise}] {wide_bar} {pos}/{len} requests (eta {eta})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    pb.set_message(format!("{target} c={}", spec.max_concurrency));
    pb
}

/// Runs `spec` against `target`: requests arrive on the Poisson schedule (or all at once),
/// at most `max_concurrency` in flight; a request's clock starts when it is sent.
pub async fn run(target: &Target, spec: &BenchSpec) -> BenchReport {
    let requests =
        workload::build_requests(&spec.dataset, spec.num_prompts, spec.output_len, spec.seed);
    let offsets = workload::arrival_offsets(requests.len(), spec.request_rate, spec.seed);
    let shared = Arc::new(spec.clone());
    let sem = Arc::new(tokio::sync::Semaphore::new(spec.max_concurrency.max(1)));
    let pb = progress_bar(spec, target.name());
    let started = Instant::now();
    let mut handles = Vec::with_capacity(requests.len());
    for (i, (req, offset)) in requests.into_iter().zip(offsets).enumerate() {
        tokio::time::sleep_until((started + offset).into()).await;
        let Ok(permit) = sem.clone().acquire_owned().await else {
            break; // never closed
        };
        let target = target.clone();
        let spec = shared.clone();
        let pb = pb.clone();
        handles.push(tokio::spawn(async move {
            let t = one(target, i, req, spec).await;
            drop(permit);
            pb.inc(1);
            t
        }));
    }
    let mut traces = Vec::new();
    for h in handles {
        traces.push(h.await.unwrap_or_else(|e| RequestTrace {
            error: Some(format!("the request task failed: {e}")),
            ..RequestTrace::default()
        }));
    }
    let duration = started.elapsed().as_secs_f64();
    pb.finish_and_clear();
    let mut report = summarize(target.name(), spec, &traces, duration);
    if matches!(target, Target::InProcess(_)) {
        report.int8_kernel = pagoda_kernels::int8::level().to_string();
    }
    report
}

fn summarize(
    target: &str,
    spec: &BenchSpec,
    traces: &[RequestTrace],
    duration: f64,
) -> BenchReport {
    let ok: Vec<&RequestTrace> = traces.iter().filter(|t| t.ok).collect();
    let out_tokens: usize = ok.iter().map(|t| t.output_tokens).sum();
    let in_tokens: usize = ok.iter().map(|t| t.prompt_tokens).sum();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let tpot: Vec<f64> = ok
        .iter()
        .filter(|t| t.output_tokens > 1)
        .map(|t| ms(t.e2e - t.ttft) / (t.output_tokens - 1) as f64)
        .collect();
    let tpot_stats = Stats::of(tpot);
    let per_s = |x: f64| if duration > 0.0 { x / duration } else { 0.0 };
    let (input_len, prefix_len) = match &spec.dataset {
        Dataset::Random {
            input_len,
            prefix_len,
            ..
        } => (Some(*input_len), Some(*prefix_len)),
        Dataset::File { .. } => (None, None),
    };
    BenchReport {
        target: target.to_string(),
        max_concurrency: spec.max_concurrency,
        request_rate: spec.request_rate.is_finite().then_some(spec.request_rate),
        num_prompts: spec.num_prompts,
        dataset: spec.dataset.name(),
        input_len,
        prefix_len,
        output_len: spec.output_len,
        ignore_eos: spec.ignore_eos,
        guided_json: spec.guided_json.is_some(),
        successful: ok.len(),
        failed: traces.len() - ok.len(),
        first_error: traces.iter().find_map(|t| t.error.clone()),
        duration_s: duration,
        total_input_tokens: in_tokens,
        total_output_tokens: out_tokens,
        request_throughput: per_s(ok.len() as f64),
        output_throughput: per_s(out_tokens as f64),
        total_token_throughput: per_s((out_tokens + in_tokens) as f64),
        per_stream_decode_tok_s: if tpot_stats.mean > 0.0 {
            1e3 / tpot_stats.mean
        } else {
            0.0
        },
        cpu_features: cpu_features(),
        int8_kernel: String::new(),
        round: 0,
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

/// pagoda against llama.cpp at one concurrency.
#[derive(Debug, Clone, PartialEq)]
pub struct RatioRow {
    pub concurrency: usize,
    /// The pagoda target (`in-process`, `nats`).
    pub target: String,
    pub output_tok_s: f64,
    pub llama_output_tok_s: f64,
    pub ttft_p50_ms: f64,
    pub llama_ttft_p50_ms: f64,
}

impl RatioRow {
    /// pagoda / llama.cpp output throughput (higher is better for pagoda).
    pub fn output_ratio(&self) -> f64 {
        self.output_tok_s / self.llama_output_tok_s.max(f64::MIN_POSITIVE)
    }

    /// pagoda / llama.cpp TTFT p50 (lower is better for pagoda).
    pub fn ttft_ratio(&self) -> f64 {
        self.ttft_p50_ms / self.llama_ttft_p50_ms.max(f64::MIN_POSITIVE)
    }
}

/// Every pagoda report that has a llama-server report at the same concurrency (the first
/// such), in the order of the reports.
pub fn ratio_rows(reports: &[BenchReport]) -> Vec<RatioRow> {
    reports
        .iter()
        .filter(|r| r.target != LLAMA_SERVER && r.successful > 0)
        .filter_map(|r| {
            let l = reports.iter().find(|l| {
                l.target == LLAMA_SERVER
                    && l.max_concurrency == r.max_concurrency
                    && l.successful > 0
            })?;
            Some(RatioRow {
                concurrency: r.max_concurrency,
                target: r.target.clone(),
                output_tok_s: r.output_throughput,
                llama_output_tok_s: l.output_throughput,
                ttft_p50_ms: r.ttft_ms.p50,
                llama_ttft_p50_ms: l.ttft_ms.p50,
            })
        })
        .collect()
}

/// Prints the ratio table (nothing when no pagoda report has a llama-server counterpart).
pub fn print_ratios(reports: &[BenchReport]) {
    let rows = ratio_rows(reports);
    if rows.is_empty() {
        return;
    }
    println!("========== pagoda / llama.cpp (llama-server) ==========");
    println!(
        "{:>11}  {:<10}  {:>10} {:>10} {:>7}  {:>12} {:>12} {:>7}",
        "concurrency", "target", "out tok/s", "llama", "ratio", "TTFT p50 ms", "llama", "ratio"
    );
    for r in rows {
        println!(
            "{:>11}  {:<10}  {:>10.1} {:>10.1} {:>6.2}x  {:>12.1} {:>12.1} {:>6.2}x",
            r.concurrency,
            r.target,
            r.output_tok_s,
            r.llama_output_tok_s,
            r.output_ratio(),
            r.ttft_p50_ms,
            r.llama_ttft_p50_ms,
            r.ttft_ratio()
        );
    }
}

/// The order in which `targets` targets run in pass `round` (from 0) of `--rounds`: as
/// given in even passes, reversed in odd ones (A B, B A, A B, …), so that a path's share
/// of a slow phase of the machine, or of the first touches of the KV pool, does not
/// depend on its place in the list.
pub fn round_order(targets: usize, round: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..targets).collect();
    if round % 2 == 1 {
        order.reverse();
    }
    order
}

/// NATS against in-process at one concurrency: output throughput nats / in-process of
/// every pass that measured both successfully, in pass order.
pub fn nats_ratios(reports: &[BenchReport], concurrency: usize) -> Vec<f64> {
    let find = |target: &str, round: usize| {
        reports.iter().find(|r| {
            r.target == target
                && r.round == round
                && r.max_concurrency == concurrency
                && r.successful > 0
        })
    };
    let last = reports.iter().map(|r| r.round).max().unwrap_or(0);
    (0..=last)
        .filter_map(|round| {
            let (a, b) = (find("in-process", round)?, find("nats", round)?);
            Some(b.output_throughput / a.output_throughput.max(f64::MIN_POSITIVE))
        })
        .collect()
}

/// The median of `xs` (None when empty).
pub fn median(xs: &[f64]) -> Option<f64> {
    (!xs.is_empty()).then(|| Stats::of(xs.to_vec()).p50)
}

/// One line per report: the numbers to compare at a glance.
pub fn print_summary(reports: &[BenchReport]) {
    println!("========== summary ==========");
    println!(
        "{:<13} {:>5} {:>6} {:>10} {:>10} {:>12} {:>10} {:>10} {:>12}",
        "target",
        "conc",
        "ok",
        "out tok/s",
        "tot tok/s",
        "TTFT p50 ms",
        "TPOT p50",
        "ITL p50",
        "E2E p50 ms"
    );
    for r in reports {
        println!(
            "{:<13} {:>5} {:>6} {:>10.1} {:>10.1} {:>12.1} {:>10.1} {:>10.1} {:>12.1}",
            r.target,
            r.max_concurrency,
            format!("{}/{}", r.successful, r.successful + r.failed),
            r.output_throughput,
            r.total_token_throughput,
            r.ttft_ms.p50,
            r.tpot_ms.p50,
            r.itl_ms.p50,
            r.e2e_ms.p50
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate_like_numpy() {
        let s = Stats::of((1..=100).map(f64::from).rev().collect());
        assert_eq!(s.mean, 50.5);
        assert!((s.p50 - 50.5).abs() < 1e-9);
        assert!((s.p90 - 90.1).abs() < 1e-9);
        assert!((s.p99 - 99.01).abs() < 1e-9);
        let one = Stats::of(vec![7.0]);
        assert_eq!((one.p50, one.p90, one.p99, one.mean), (7.0, 7.0, 7.0, 7.0));
        let two = Stats::of(vec![10.0, 0.0]);
        assert_eq!((two.p50, two.p90), (5.0, 9.0));
        assert_eq!(Stats::of(vec![]), Stats::default());
    }

    fn spec() -> BenchSpec {
        BenchSpec {
            dataset: Dataset::random(16, 4).unwrap(),
            num_prompts: 3,
            max_concurrency: 2,
            request_rate: f64::INFINITY,
            output_len: 4,
            ignore_eos: true,
            cache_prompt: false,
            seed: 0,
            temperature: 0.0,
            progress: false,
            guided_json: None,
        }
    }

    #[test]
    fn summary_of_traces() {
        let ms = Duration::from_millis;
        let good = |ttft: u64, gaps: &[u64]| RequestTrace {
            ok: true,
            error: None,
            output_tokens: gaps.len() + 1,
            prompt_tokens: 16,
            ttft: ms(ttft),
            e2e: ms(ttft + gaps.iter().sum::<u64>()),
            itl: gaps.iter().map(|g| ms(*g)).collect(),
        };
        let traces = vec![
            good(100, &[10, 10, 10]),
            good(300, &[30, 30, 30]),
            RequestTrace {
                error: Some("boom".into()),
                ..RequestTrace::default()
            },
        ];
        let r = summarize("in-process", &spec(), &traces, 2.0);
        assert_eq!((r.successful, r.failed), (2, 1));
        assert_eq!(r.first_error.as_deref(), Some("boom"));
        assert_eq!((r.total_input_tokens, r.total_output_tokens), (32, 8));
        assert_eq!(r.output_throughput, 4.0);
        assert_eq!(r.total_token_throughput, 20.0);
        assert_eq!(r.request_throughput, 1.0);
        assert!((r.ttft_ms.p50 - 200.0).abs() < 1e-6);
        assert!((r.tpot_ms.mean - 20.0).abs() < 1e-6);
        assert!((r.itl_ms.p50 - 20.0).abs() < 1e-6);
        assert!((r.e2e_ms.p99 - 387.4).abs() < 1e-6); // 130 + 0.99 × 260
        assert_eq!(r.request_rate, None);
        assert_eq!((r.input_len, r.prefix_len), (Some(16), Some(4)));
        // The JSON round-trips (for --baseline) and says null for an infinite rate.
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains("\"request_rate\":null"), "{json}");
        let back: BenchReport = serde_json::from_str(&json).unwrap();
        assert_eq!(back.ttft_ms, r.ttft_ms);
        // Every report says which CPU features ran it; reports saved before that field
        // existed still load.
        assert!(!r.cpu_features.is_empty());
        assert_eq!(back.cpu_features, r.cpu_features);
        let mut old: serde_json::Value = serde_json::from_str(&json).unwrap();
        old.as_object_mut().unwrap().remove("cpu_features");
        let old: BenchReport = serde_json::from_value(old).unwrap();
        assert_eq!(
            (old.cpu_features.as_str(), old.int8_kernel.as_str()),
            ("", "")
        );
    }

    fn report(target: &str, c: usize, tok_s: f64, ttft: f64) -> BenchReport {
        let mut r = summarize(target, &spec(), &[], 1.0);
        r.max_concurrency = c;
        r.successful = 1;
        r.output_throughput = tok_s;
        r.ttft_ms.p50 = ttft;
        r
    }

    #[test]
    fn rounds_alternate_the_order_of_the_targets() {
        assert_eq!(round_order(2, 0), [0, 1]);
        assert_eq!(round_order(2, 1), [1, 0]);
        assert_eq!(round_order(3, 2), [0, 1, 2]);
        assert_eq!(round_order(3, 3), [2, 1, 0]);
        assert!(round_order(0, 1).is_empty());
    }

    #[test]
    fn nats_ratios_pair_the_paths_of_each_round() {
        let at = |target: &str, c: usize, round: usize, tok_s: f64| {
            let mut r = report(target, c, tok_s, 1.0);
            r.round = round;
            r
        };
        let mut failed = at("nats", 8, 2, 50.0);
        failed.successful = 0;
        let reports = vec![
            at("in-process", 8, 0, 100.0),
            at("nats", 8, 0, 97.0),
            at("in-process", 32, 0, 300.0),
            at("nats", 32, 0, 330.0),
            at("nats", 8, 1, 104.0),
            at("in-process", 8, 1, 100.0),
            at("in-process", 8, 2, 100.0),
            failed,
            at("nats", 8, 3, 90.0),
            at("in-process", 8, 3, 100.0),
        ];
        let r8 = nats_ratios(&reports, 8);
        assert_eq!(r8.len(), 3, "{r8:?}");
        for (got, want) in r8.iter().zip([0.97, 1.04, 0.90]) {
            assert!((got - want).abs() < 1e-9, "{r8:?}");
        }
        let r32 = nats_ratios(&reports, 32);
        assert!(r32.len() == 1 && (r32[0] - 1.1).abs() < 1e-9, "{r32:?}");
        assert!(nats_ratios(&reports, 1).is_empty());
        assert_eq!(median(&r8), Some(0.97));
        assert_eq!(median(&[1.0, 2.0]), Some(1.5));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn ratios_pair_pagoda_with_llama_server_at_the_same_concurrency() {
        let reports = vec![
            report("in-process", 1, 60.0, 100.0),
            report("nats", 1, 57.0, 110.0),
            report("in-process", 8, 200.0, 400.0),
            report(LLAMA_SERVER, 1, 50.0, 800.0),
            report(LLAMA_SERVER, 32, 50.0, 800.0),
        ];
        let rows = ratio_rows(&reports);
        assert_eq!(rows.len(), 2, "{rows:?}");
        assert_eq!(
            (rows[0].target.as_str(), rows[0].concurrency),
            ("in-process", 1)
        );
        assert!((rows[0].output_ratio() - 1.2).abs() < 1e-9);
        assert!((rows[0].ttft_ratio() - 0.125).abs() < 1e-9);
        assert_eq!(rows[1].target, "nats");
        assert!(ratio_rows(&reports[..3]).is_empty());
    }

    #[test]
    fn plot_renders_a_png() {
        let reports = vec![
            report("in-process", 1, 60.0, 100.0),
            report("in-process", 8, 200.0, 400.0),
            report("in-process", 32, 400.0, 900.0),
            report("nats", 1, 57.0, 110.0),
            report("nats", 8, 190.0, 420.0),
            report(LLAMA_SERVER, 1, 50.0, 800.0),
            report(LLAMA_SERVER, 8, 58.0, 6600.0),
            report(LLAMA_SERVER, 32, 56.0, 21800.0),
        ];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.png");
        plot::plot(&reports, &path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        assert!(bytes.len() > 10_000, "{} bytes", bytes.len());
        // A single concurrency still plots.
        plot::plot(&reports[..1], &path).unwrap();
        let e = plot::plot(&[], &path).unwrap_err();
        assert!(e.to_string().contains("nothing to plot"), "{e}");
    }
}
