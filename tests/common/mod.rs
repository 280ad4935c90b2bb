//! Helpers shared by the end-to-end tests: the model path, engine configurations, running
//! async code inside an actix `System`, and collecting a request's stream.
//!
//! Each test binary uses a different subset of these, hence the `dead_code` allowance.
#![allow(dead_code)]

use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use pagoda_actors::config::EngineConfig;
use pagoda_actors::engine::Engine;
use pagoda_actors::messages::{FinishReason, SamplingParams, TokenId};
use pagoda_actors::protocol::{ErrorBody, GenerateRequest, Prompt, StreamEvent, Timings, Usage};
use pagoda_actors::streams::Generation;

/// How long one request may take before the test calls it a hang.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// The repository root (the `pagoda` package's manifest directory).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The default model. Tests never skip: a missing model is a failure.
pub fn model_path() -> PathBuf {
    let path = repo_root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.is_file(),
        "the test model {} is missing: run scripts/fetch-model.sh",
        path.display()
    );
    path
}

/// An engine configuration for tests: the default model and a modest KV pool (128 blocks
/// of 16 tokens), so several engines can live in one test process.
pub fn test_config() -> EngineConfig {
    let mut cfg = EngineConfig::default();
    cfg.model.path = model_path().display().to_string();
    cfg.cache.num_blocks = 128;
    cfg
}

/// Runs `fut` to completion inside a fresh actix `System`.
pub fn run<F: Future>(fut: F) -> F::Output {
    actix::System::new().block_on(fut)
}

/// Starts an engine (must be called inside [`run`]).
pub fn start(cfg: &EngineConfig) -> Engine {
    Engine::start(cfg).unwrap_or_else(|e| panic!("engine failed to start: {e}"))
}

/// Greedy decoding that ignores EOS: always exactly `max_tokens` tokens.
pub fn greedy(max_tokens: u32) -> SamplingParams {
    SamplingParams {
        temperature: 0.0,
        max_tokens,
        ignore_eos: true,
        ..SamplingParams::default()
    }
}

pub fn text_request(
    id: impl Into<String>,
    prompt: &str,
    params: SamplingParams,
) -> GenerateRequest {
    GenerateRequest {
        id: id.into(),
        prompt: Prompt::Text(prompt.to_string()),
        params,
    }
}

/// How a request ended.
#[derive(Debug, Clone, PartialEq)]
pub enum End {
    Finished {
        reason: FinishReason,
        usage: Usage,
        timings: Timings,
    },
    Error(ErrorBody),
}

/// Everything a request's stream carried.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The `Delta` events, in order.
    pub deltas: Vec<(String, Vec<TokenId>)>,
    /// The `Finished` event's own text (the tail after the last delta).
    pub final_text: String,
    /// Concatenation of every delta's text and the final text.
    pub text: String,
    /// Concatenation of every delta's and the final event's token ids.
    pub token_ids: Vec<TokenId>,
    pub end: End,
}

impl Outcome {
    /// The finish reason and usage; panics (with the outcome) on an error.
    pub fn finished(&self) -> (FinishReason, Usage) {
        match &self.end {
            End::Finished { reason, usage, .. } => (*reason, *usage),
            End::Error(e) => panic!("request failed: {e}"),
        }
    }

    /// The error; panics if the request finished.
    pub fn error(&self) -> &ErrorBody {
        match &self.end {
            End::Error(e) => e,
            End::Finished { .. } => panic!("expected an error, got {self:?}"),
        }
    }
}

/// Reads a stream to its end and checks its shape: deltas, then exactly one final event,
/// then the channel closes.
pub async fn collect(mut rx: Generation) -> Outcome {
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    let mut deltas = Vec::new();
    let mut text = String::new();
    let mut token_ids = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ev = tokio::time::timeout(left, rx.next_event())
            .await
            .unwrap_or_else(|_| panic!("no final event within {REQUEST_TIMEOUT:?} (hang?)"))
            .expect("the stream closed without a Finished or Error event");
        let (final_text, end) = match ev {
            StreamEvent::Delta {
                text: t,
                token_ids: ids,
                ..
            } => {
                assert!(!t.is_empty(), "empty delta (ids {ids:?})");
                text.push_str(&t);
                token_ids.extend_from_slice(&ids);
                deltas.push((t, ids));
                continue;
            }
            StreamEvent::Finished {
                text: t,
                token_ids: ids,
                finish_reason,
                usage,
                timings,
                ..
            } => {
                text.push_str(&t);
                token_ids.extend_from_slice(&ids);
                (
                    t,
                    End::Finished {
                        reason: finish_reason,
                        usage,
                        timings,
                    },
                )
            }
            StreamEvent::Error(e) => (String::new(), End::Error(e)),
        };
        // Exactly one final event: nothing may follow it, and the engine lets go of the
        // stream (the channel closes).
        let after = tokio::time::timeout(Duration::from_secs(10), rx.next_event())
            .await
            .expect("the stream stayed open after its final event");
        assert!(after.is_none(), "an event after the final one: {after:?}");
        return Outcome {
            deltas,
            final_text,
            text,
            token_ids,
            end,
        };
    }
}

/// Reads every completion of a request with `n` > 1 to its end: per index, deltas then
/// exactly one final event, and the generation closes once all have ended. Outcomes in
/// index order.
pub async fn collect_n(mut rx: Generation) -> Vec<Outcome> {
    let n = rx.n() as usize;
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    // Per completion: its deltas, text and token ids so far.
    type Part = (Vec<(String, Vec<TokenId>)>, String, Vec<TokenId>);
    let mut parts: Vec<Part> = vec![Default::default(); n];
    let mut ends: Vec<Option<Outcome>> = (0..n).map(|_| None).collect();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some((index, ev)) = tokio::time::timeout(left, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("not every completion ended within {REQUEST_TIMEOUT:?}"))
        else {
            break;
        };
        let i = index as usize;
        assert!(i < n, "event for completion {i} of {n}");
        assert!(
            ends[i].is_none(),
            "completion {i}: an event after its final one: {ev:?}"
        );
        let (deltas, text, ids) = &mut parts[i];
        let (final_text, end) = match ev {
            StreamEvent::Delta {
                text: t,
                token_ids: d,
                ..
            } => {
                text.push_str(&t);
                ids.extend_from_slice(&d);
                deltas.push((t, d));
                continue;
            }
            StreamEvent::Finished {
                text: t,
                token_ids: d,
                finish_reason,
                usage,
                timings,
                ..
            } => {
                text.push_str(&t);
                ids.extend_from_slice(&d);
                (
                    t,
                    End::Finished {
                        reason: finish_reason,
                        usage,
                        timings,
                    },
                )
            }
            StreamEvent::Error(e) => (String::new(), End::Error(e)),
        };
        ends[i] = Some(Outcome {
            deltas: std::mem::take(deltas),
            final_text,
            text: std::mem::take(text),
            token_ids: std::mem::take(ids),
            end,
        });
    }
    ends.into_iter()
        .enumerate()
        .map(|(i, o)| o.unwrap_or_else(|| panic!("completion {i} closed without a final event")))
        .collect()
}

/// Submits one request and waits for its outcome.
pub async fn generate(engine: &Engine, request: GenerateRequest) -> Outcome {
    collect(engine.generate(request)).await
}

/// Submits all requests at once, then collects every outcome (in request order).
pub async fn generate_all(engine: &Engine, requests: Vec<GenerateRequest>) -> Vec<Outcome> {
    let receivers: Vec<_> = requests.into_iter().map(|r| engine.generate(r)).collect();
    let mut outcomes = Vec::with_capacity(receivers.len());
    for rx in receivers {
        outcomes.push(collect(rx).await);
    }
    outcomes
}

/// Waits (up to a few seconds: finished sequences' blocks go back with the scheduler's
/// next block-manager request) until every block of the pool is free and no sequence
/// holds a block table. `pool_stats` checks the pool's invariants on every call.
pub async fn assert_pool_drained(engine: &Engine) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let stats = engine
            .pool_stats()
            .await
            .unwrap_or_else(|e| panic!("block pool invariants broken: {e}"));
        if stats.num_free_blocks == stats.num_blocks && stats.num_seqs == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "blocks leaked: {stats:?} (expected every block free and no sequence)"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
