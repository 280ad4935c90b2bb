//! The engine's Prometheus series: names, descriptions, bucket boundaries, and the metric
//! handles the scheduler and the detokenizer record into.
//!
//! Names, types, labels and buckets follow vLLM (`vllm/v1/metrics/loggers.py`) so that
//! dashboards and autoscalers built for vLLM read pagoda unchanged; pagoda's own series
//! use the `pagoda_` prefix. Recording goes through the `metrics` facade: with no recorder
//! installed (tests, `pagoda generate`) every call is a no-op. Handles are built once per
//! actor with their labels, so the hot path does no per-token allocation.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram, Unit};

use crate::messages::FinishReason;
use crate::messages::SchedulerStats;

/// Label on every `vllm:` series.
pub const MODEL_NAME_LABEL: &str = "model_name";

pub const NUM_REQUESTS_RUNNING: &str = "vllm:num_requests_running";
pub const NUM_REQUESTS_WAITING: &str = "vllm:num_requests_waiting";
pub const KV_CACHE_USAGE_PERC: &str = "vllm:kv_cache_usage_perc";
pub const PROMPT_TOKENS_TOTAL: &str = "vllm:prompt_tokens_total";
pub const GENERATION_TOKENS_TOTAL: &str = "vllm:generation_tokens_total";
pub const REQUEST_SUCCESS_TOTAL: &str = "vllm:request_success_total";
pub const NUM_PREEMPTIONS_TOTAL: &str = "vllm:num_preemptions_total";
pub const PREFIX_CACHE_QUERIES_TOTAL: &str = "vllm:prefix_cache_queries_total";
pub const PREFIX_CACHE_HITS_TOTAL: &str = "vllm:prefix_cache_hits_total";
pub const TIME_TO_FIRST_TOKEN: &str = "vllm:time_to_first_token_seconds";
pub const INTER_TOKEN_LATENCY: &str = "vllm:inter_token_latency_seconds";
pub const TIME_PER_OUTPUT_TOKEN: &str = "vllm:time_per_output_token_seconds";
pub const E2E_REQUEST_LATENCY: &str = "vllm:e2e_request_latency_seconds";
pub const REQUEST_QUEUE_TIME: &str = "vllm:request_queue_time_seconds";
pub const REQUEST_INFERENCE_TIME: &str = "vllm:request_inference_time_seconds";
pub const REQUEST_PREFILL_TIME: &str = "vllm:request_prefill_time_seconds";
pub const REQUEST_DECODE_TIME: &str = "vllm:request_decode_time_seconds";
pub const REQUEST_PROMPT_TOKENS: &str = "vllm:request_prompt_tokens";
pub const REQUEST_GENERATION_TOKENS: &str = "vllm:request_generation_tokens";
pub const ITERATION_TOKENS: &str = "vllm:iteration_tokens_total";
pub const CACHE_CONFIG_INFO: &str = "vllm:cache_config_info";

pub const STEP_DURATION: &str = "pagoda_step_duration_seconds";
/// Per step with guided sequences: the time their token masks took (computed while the
/// forward pass runs).
pub const GUIDE_MASK_DURATION: &str = "pagoda_guided_mask_seconds";
pub const BATCH_SIZE: &str = "pagoda_batch_size";
pub const KV_FREE_BLOCKS: &str = "pagoda_kv_free_blocks";
pub const SPEC_DECODE_NUM_DRAFTS: &str = "vllm:spec_decode_num_drafts_total";
pub const SPEC_DECODE_NUM_DRAFT_TOKENS: &str = "vllm:spec_decode_num_draft_tokens_total";
pub const SPEC_DECODE_NUM_ACCEPTED_TOKENS: &str = "vllm:spec_decode_num_accepted_tokens_total";
pub const SPEC_DECODE_ACCEPTANCE_RATE: &str = "vllm:spec_decode_draft_acceptance_rate";

/// vLLM's time-to-first-token buckets (seconds).
pub const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
/// vLLM's per-output-token buckets (seconds): time per output token and inter-token latency.
pub const TOKEN_LATENCY_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];
/// vLLM's request latency buckets (seconds): e2e, queue, inference, prefill, decode.
pub const REQUEST_LATENCY_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];
/// vLLM's tokens-per-step buckets.
pub const ITERATION_TOKENS_BUCKETS: &[f64] = &[
    1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0,
];
/// Engine step duration buckets (seconds), pagoda's own.
pub const STEP_DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Sequences-per-step buckets, pagoda's own.
pub const BATCH_SIZE_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

/// vLLM's `build_1_2_5_buckets(max_value)`: 1, 2, 5, 10, 20, 50, … up to `max_value`.
pub fn buckets_1_2_5(max_value: u64) -> Vec<f64> {
    let mut out = Vec::new();
    let mut exponent = 1u64;
    loop {
        for m in [1u64, 2, 5] {
            let v = m.saturating_mul(exponent);
            if v > max_value {
                return out;
            }
            out.push(v as f64);
        }
        exponent = match exponent.checked_mul(10) {
            Some(e) => e,
            None => return out,
        };
    }
}

/// Describes every engine series (help text and unit). Call once after installing a
/// recorder; harmless without one.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_gauge!(
        NUM_REQUESTS_RUNNING,
        "Number of requests in model execution batches."
    );
    describe_gauge!(
        NUM_REQUESTS_WAITING,
        "Number of requests waiting to be processed."
    );
    describe_gauge!(
        KV_CACHE_USAGE_PERC,
        "KV-cache usage. 1 means 100 percent usage."
    );
    describe_counter!(PROMPT_TOKENS_TOTAL, "Number of prefill tokens processed.");
    describe_counter!(
        GENERATION_TOKENS_TOTAL,
        "Number of generation tokens processed."
    );
    describe_counter!(
        REQUEST_SUCCESS_TOTAL,
        "Count of successfully processed requests."
    );
    describe_counter!(
        NUM_PREEMPTIONS_TOTAL,
        "Cumulative number of preemption from the engine."
    );
    describe_counter!(
        PREFIX_CACHE_QUERIES_TOTAL,
        "Prefix cache queries, in terms of number of queried tokens."
    );
    describe_counter!(
        PREFIX_CACHE_HITS_TOTAL,
        "Prefix cache hits, in terms of number of cached tokens."
    );
    describe_counter!(
        SPEC_DECODE_NUM_DRAFTS,
        "Speculative decoding: sequence-steps that verified draft tokens."
    );
    describe_counter!(
        SPEC_DECODE_NUM_DRAFT_TOKENS,
        "Speculative decoding: draft tokens proposed."
    );
    describe_counter!(
        SPEC_DECODE_NUM_ACCEPTED_TOKENS,
        "Speculative decoding: draft tokens accepted (the acceptance rate is accepted / proposed)."
    );
    describe_gauge!(
        SPEC_DECODE_ACCEPTANCE_RATE,
        "Speculative decoding: draft tokens accepted / proposed since start."
    );
    describe_histogram!(
        GUIDE_MASK_DURATION,
        Unit::Seconds,
        "Per step with guided (structured output) sequences: time spent computing their token masks, in parallel with the forward pass."
    );
    describe_histogram!(
        TIME_TO_FIRST_TOKEN,
        Unit::Seconds,
        "Histogram of time to first token in seconds."
    );
    describe_histogram!(
        INTER_TOKEN_LATENCY,
        Unit::Seconds,
        "Histogram of inter-token latency in seconds."
    );
    describe_histogram!(
        TIME_PER_OUTPUT_TOKEN,
        Unit::Seconds,
        "Histogram of time per output token in seconds."
    );
    describe_histogram!(
        E2E_REQUEST_LATENCY,
        Unit::Seconds,
        "Histogram of e2e request latency in seconds."
    );
    describe_histogram!(
        REQUEST_QUEUE_TIME,
        Unit::Seconds,
        "Histogram of time spent in WAITING phase for request."
    );
    describe_histogram!(
        REQUEST_INFERENCE_TIME,
        Unit::Seconds,
        "Histogram of time spent in RUNNING phase for request."
    );
    describe_histogram!(
        REQUEST_PREFILL_TIME,
        Unit::Seconds,
        "Histogram of time spent in PREFILL phase for request."
    );
    describe_histogram!(
        REQUEST_DECODE_TIME,
        Unit::Seconds,
        "Histogram of time spent in DECODE phase for request."
    );
    describe_histogram!(REQUEST_PROMPT_TOKENS, "Number of prefill tokens processed.");
    describe_histogram!(
        REQUEST_GENERATION_TOKENS,
        "Number of generation tokens processed."
    );
    describe_histogram!(
        ITERATION_TOKENS,
        "Histogram of number of tokens per engine_step."
    );
    describe_gauge!(
        CACHE_CONFIG_INFO,
        "Information of the LLMEngine CacheConfig"
    );
    describe_histogram!(
        STEP_DURATION,
        Unit::Seconds,
        "Wall time of one engine step (block bookkeeping, forward pass, sampling)."
    );
    describe_histogram!(BATCH_SIZE, "Sequences scheduled in one engine step.");
    describe_gauge!(KV_FREE_BLOCKS, "KV blocks free (or evictable) in the pool.");
}

/// Publishes `vllm:cache_config_info` (a gauge fixed at 1 whose labels carry the cache
/// configuration, as vLLM does).
pub fn record_cache_config(
    model_name: &str,
    block_size: usize,
    num_blocks: usize,
    enable_prefix_caching: bool,
    cache_dtype: &str,
) {
    gauge!(
        CACHE_CONFIG_INFO,
        MODEL_NAME_LABEL => model_name.to_owned(),
        "block_size" => block_size.to_string(),
        "num_gpu_blocks" => num_blocks.to_string(),
        "num_cpu_blocks" => "0",
        "cache_dtype" => cache_dtype.to_owned(),
        "enable_prefix_caching" => if enable_prefix_caching { "True" } else { "False" },
    )
    .set(1.0);
}

/// What one engine step did, for [`SchedulerMetrics::record_step`].
#[derive(Debug, Clone, Copy, Default)]
pub struct StepSample {
    pub num_seqs: usize,
    pub num_tokens: usize,
    pub duration_s: f64,
}

/// Series the scheduler owns: updated once per engine step.
#[derive(Clone)]
pub struct SchedulerMetrics {
    running: Gauge,
    waiting: Gauge,
    kv_usage: Gauge,
    free_blocks: Gauge,
    preemptions: Counter,
    prefix_queries: Counter,
    prefix_hits: Counter,
    spec_drafts: Counter,
    spec_draft_tokens: Counter,
    spec_accepted_tokens: Counter,
    spec_acceptance: Gauge,
    iteration_tokens: Histogram,
    batch_size: Histogram,
    step_duration: Histogram,
}

impl SchedulerMetrics {
    pub fn new(model_name: &str) -> Self {
        let l = || [(MODEL_NAME_LABEL, model_name.to_owned())];
        Self {
            running: gauge!(NUM_REQUESTS_RUNNING, &l()),
            waiting: gauge!(NUM_REQUESTS_WAITING, &l()),
            kv_usage: gauge!(KV_CACHE_USAGE_PERC, &l()),
            free_blocks: gauge!(KV_FREE_BLOCKS, &l()),
            preemptions: counter!(NUM_PREEMPTIONS_TOTAL, &l()),
            prefix_queries: counter!(PREFIX_CACHE_QUERIES_TOTAL, &l()),
            prefix_hits: counter!(PREFIX_CACHE_HITS_TOTAL, &l()),
            spec_drafts: counter!(SPEC_DECODE_NUM_DRAFTS, &l()),
            spec_draft_tokens: counter!(SPEC_DECODE_NUM_DRAFT_TOKENS, &l()),
            spec_accepted_tokens: counter!(SPEC_DECODE_NUM_ACCEPTED_TOKENS, &l()),
            spec_acceptance: gauge!(SPEC_DECODE_ACCEPTANCE_RATE, &l()),
            iteration_tokens: histogram!(ITERATION_TOKENS, &l()),
            batch_size: histogram!(BATCH_SIZE, &l()),
            step_duration: histogram!(STEP_DURATION, &l()),
        }
    }

    /// Queue gauges and cumulative counters from the scheduler's statistics.
    pub fn record_stats(&self, stats: &SchedulerStats) {
        self.running.set(stats.num_running as f64);
        self.waiting.set(stats.num_waiting as f64);
        self.kv_usage.set(stats.kv_cache_usage);
        self.free_blocks.set(stats.num_free_blocks as f64);
        self.preemptions.absolute(stats.num_preemptions);
        self.prefix_queries.absolute(stats.prefix_cache_queries);
        self.prefix_hits.absolute(stats.prefix_cache_hits);
        self.spec_drafts.absolute(stats.spec.drafts);
        self.spec_draft_tokens.absolute(stats.spec.draft_tokens);
        self.spec_accepted_tokens
            .absolute(stats.spec.accepted_tokens);
        if stats.spec.draft_tokens > 0 {
            self.spec_acceptance
                .set(stats.spec.accepted_tokens as f64 / stats.spec.draft_tokens as f64);
        }
    }

    /// One step that ran a batch.
    pub fn record_step(&self, step: StepSample) {
        self.iteration_tokens.record(step.num_tokens as f64);
        self.batch_size.record(step.num_seqs as f64);
        self.step_duration.record(step.duration_s);
    }
}

/// Cumulative token counts, readable in-process (the periodic stats log line) whether or
/// not a Prometheus recorder is installed.
#[derive(Debug, Default)]
pub struct TokenCounters {
    prompt: AtomicU64,
    generation: AtomicU64,
}

impl TokenCounters {
    /// Prompt tokens of the sequences that produced their first token.
    pub fn prompt_tokens(&self) -> u64 {
        self.prompt.load(Ordering::Relaxed)
    }

    /// Output tokens generated.
    pub fn generation_tokens(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }
}

/// Per-request series: recorded by the detokenizer, which sees arrival, first token,
/// every token and the finish.
#[derive(Clone)]
pub struct RequestMetrics {
    prompt_tokens: Counter,
    generation_tokens: Counter,
    success_stop: Counter,
    success_length: Counter,
    success_abort: Counter,
    ttft: Histogram,
    itl: Histogram,
    tpot: Histogram,
    e2e: Histogram,
    queue: Histogram,
    inference: Histogram,
    prefill: Histogram,
    decode: Histogram,
    req_prompt_tokens: Histogram,
    req_generation_tokens: Histogram,
    counters: Arc<TokenCounters>,
}

/// Timestamps (µs since the epoch) and counts of one finished sequence.
#[derive(Debug, Clone, Copy, Default)]
pub struct FinishedSample {
    pub reason: Option<FinishReason>,
    pub arrival_us: u64,
    pub queue_us: u64,
    pub scheduled_us: Option<u64>,
    pub first_token_us: Option<u64>,
    pub finished_us: u64,
    pub prompt_tokens: u32,
    pub output_tokens: u32,
}

impl RequestMetrics {
    pub fn new(model_name: &str, counters: Arc<TokenCounters>) -> Self {
        let l = || [(MODEL_NAME_LABEL, model_name.to_owned())];
        let success = |reason: FinishReason| {
            counter!(
                REQUEST_SUCCESS_TOTAL,
                MODEL_NAME_LABEL => model_name.to_owned(),
                "finished_reason" => reason.as_str(),
            )
        };
        Self {
            prompt_tokens: counter!(PROMPT_TOKENS_TOTAL, &l()),
            generation_tokens: counter!(GENERATION_TOKENS_TOTAL, &l()),
            success_stop: success(FinishReason::Stop),
            success_length: success(FinishReason::Length),
            success_abort: success(FinishReason::Abort),
            ttft: histogram!(TIME_TO_FIRST_TOKEN, &l()),
            itl: histogram!(INTER_TOKEN_LATENCY, &l()),
            tpot: histogram!(TIME_PER_OUTPUT_TOKEN, &l()),
            e2e: histogram!(E2E_REQUEST_LATENCY, &l()),
            queue: histogram!(REQUEST_QUEUE_TIME, &l()),
            inference: histogram!(REQUEST_INFERENCE_TIME, &l()),
            prefill: histogram!(REQUEST_PREFILL_TIME, &l()),
            decode: histogram!(REQUEST_DECODE_TIME, &l()),
            req_prompt_tokens: histogram!(REQUEST_PROMPT_TOKENS, &l()),
            req_generation_tokens: histogram!(REQUEST_GENERATION_TOKENS, &l()),
            counters,
        }
    }

    /// The first output token of a sequence: its prompt counts as processed (as in vLLM,
    /// once per request however often it is recomputed).
    pub fn first_token(&self, prompt_tokens: u32, ttft_us: u64) {
        self.prompt_tokens.increment(u64::from(prompt_tokens));
        self.counters
            .prompt
            .fetch_add(u64::from(prompt_tokens), Ordering::Relaxed);
        self.ttft.record(secs(ttft_us));
    }

    /// A later output token, `gap_us` after the previous one.
    pub fn next_token(&self, gap_us: u64) {
        self.itl.record(secs(gap_us));
    }

    /// Output tokens of one step (one increment per step, not per token).
    pub fn generated(&self, n: u64) {
        if n > 0 {
            self.generation_tokens.increment(n);
            self.counters.generation.fetch_add(n, Ordering::Relaxed);
        }
    }

    pub fn finished(&self, f: &FinishedSample) {
        match f.reason {
            Some(FinishReason::Stop) => self.success_stop.increment(1),
            Some(FinishReason::Length) => self.success_length.increment(1),
            Some(FinishReason::Abort) => self.success_abort.increment(1),
            None => {}
        }
        self.e2e
            .record(secs(f.finished_us.saturating_sub(f.arrival_us)));
        self.req_prompt_tokens.record(f64::from(f.prompt_tokens));
        self.req_generation_tokens
            .record(f64::from(f.output_tokens));
        if let Some(scheduled) = f.scheduled_us {
            self.queue.record(secs(f.queue_us));
            self.inference
                .record(secs(f.finished_us.saturating_sub(scheduled)));
            if let Some(first) = f.first_token_us {
                self.prefill.record(secs(first.saturating_sub(scheduled)));
                self.decode
                    .record(secs(f.finished_us.saturating_sub(first)));
            }
        }
        if let Some(first) = f.first_token_us {
            if f.output_tokens > 1 {
                let decode_us = f.finished_us.saturating_sub(first);
                self.tpot
                    .record(secs(decode_us) / f64::from(f.output_tokens - 1));
            }
        }
    }
}

fn secs(us: u64) -> f64 {
    us as f64 / 1e6
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_two_five_buckets_like_vllm() {
        assert_eq!(
            buckets_1_2_5(100),
            vec![1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0]
        );
        assert_eq!(buckets_1_2_5(4), vec![1.0, 2.0]);
        assert!(buckets_1_2_5(u64::MAX).len() > 50);
    }

    #[test]
    fn recording_without_a_recorder_is_a_no_op() {
        let s = SchedulerMetrics::new("m");
        s.record_step(StepSample::default());
        let counters = Arc::new(TokenCounters::default());
        let r = RequestMetrics::new("m", counters.clone());
        r.first_token(3, 10);
        r.generated(2);
        r.finished(&FinishedSample::default());
        assert_eq!(counters.prompt_tokens(), 3);
        assert_eq!(counters.generation_tokens(), 2);
    }
}
