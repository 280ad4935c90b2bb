//! Observability of `pagoda serve`: the Prometheus recorder (vLLM's histogram buckets), the
//! HTTP listener with `GET /metrics` and `GET /health`, and the periodic engine stats line.
//!
//! The engine's series are named and recorded in `pagoda_actors::metrics`; the gateway's
//! (`pagoda_nats_*`) are named here. The recorder is process-global: [`install_recorder`]
//! installs it once and returns the same handle afterwards.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use pagoda_actors::engine::Engine;
use pagoda_actors::metrics as m;

pub const NATS_MESSAGES_RECEIVED: &str = "pagoda_nats_messages_received_total";
pub const NATS_MESSAGES_PUBLISHED: &str = "pagoda_nats_messages_published_total";
pub const NATS_ERRORS: &str = "pagoda_nats_errors_total";
pub const NATS_REFUSED_REPLY_SUBJECTS: &str = "pagoda_nats_refused_reply_subjects_total";
pub const JETSTREAM_REDELIVERIES: &str = "pagoda_jetstream_redeliveries_total";

/// Errors of the metrics listener.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("metrics.listen {addr:?}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("installing the Prometheus recorder: {0}")]
    Recorder(String),
}

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the global Prometheus recorder with vLLM's bucket boundaries and describes
/// every series. `max_model_len` bounds the 1-2-5 token-count buckets
/// (`vllm:request_prompt_tokens`, `vllm:request_generation_tokens`) as vLLM does; pass 0
/// when unknown (the buckets then go up to 1M tokens). Later calls return the first handle.
pub fn install_recorder(max_model_len: usize) -> Result<PrometheusHandle, MetricsError> {
    if let Some(h) = HANDLE.get() {
        return Ok(h.clone());
    }
    let token_buckets = m::buckets_1_2_5(match max_model_len {
        0 => 1_000_000,
        n => n as u64,
    });
    let full = |name: &str| Matcher::Full(name.to_owned());
    let mut builder = PrometheusBuilder::new();
    // Every histogram needs buckets here, or the exporter renders it as a summary.
    let table: [(&str, &[f64]); 14] = [
        (m::TIME_TO_FIRST_TOKEN, m::TTFT_BUCKETS),
        (m::INTER_TOKEN_LATENCY, m::TOKEN_LATENCY_BUCKETS),
        (m::TIME_PER_OUTPUT_TOKEN, m::TOKEN_LATENCY_BUCKETS),
        (m::E2E_REQUEST_LATENCY, m::REQUEST_LATENCY_BUCKETS),
        (m::REQUEST_QUEUE_TIME, m::REQUEST_LATENCY_BUCKETS),
        (m::REQUEST_INFERENCE_TIME, m::REQUEST_LATENCY_BUCKETS),
        (m::REQUEST_PREFILL_TIME, m::REQUEST_LATENCY_BUCKETS),
        (m::REQUEST_DECODE_TIME, m::REQUEST_LATENCY_BUCKETS),
        (m::REQUEST_PROMPT_TOKENS, &token_buckets),
        (m::REQUEST_GENERATION_TOKENS, &token_buckets),
        (m::ITERATION_TOKENS, m::ITERATION_TOKENS_BUCKETS),
        (m::STEP_DURATION, m::STEP_DURATION_BUCKETS),
        (m::GUIDE_MASK_DURATION, m::STEP_DURATION_BUCKETS),
        (m::BATCH_SIZE, m::BATCH_SIZE_BUCKETS),
    ];
    for (name, buckets) in table {
        builder = builder
            .set_buckets_for_metric(full(name), buckets)
            .map_err(|e| MetricsError::Recorder(e.to_string()))?;
    }
    let handle = builder
        .install_recorder()
        .map_err(|e| MetricsError::Recorder(e.to_string()))?;
    m::describe();
    describe_gateway();
    Ok(HANDLE.get_or_init(|| handle).clone())
}

fn describe_gateway() {
    use metrics::{counter, describe_counter};
    describe_counter!(
        NATS_MESSAGES_RECEIVED,
        "NATS messages received by the gateway (generate requests and cancels)."
    );
    describe_counter!(
        NATS_MESSAGES_PUBLISHED,
        "NATS messages published by the gateway (reply chunks and error replies)."
    );
    describe_counter!(
        NATS_ERRORS,
        "Error replies sent by the gateway, by error code."
    );
    describe_counter!(
        JETSTREAM_REDELIVERIES,
        "Requests received again from JetStream after an engine failed to finish them."
    );
    describe_counter!(
        NATS_REFUSED_REPLY_SUBJECTS,
        "Requests not answered because their reply subject broke the reply-subject policy."
    );
    // Present from the start (at 0) so that dashboards and alerts see the series.
    counter!(NATS_REFUSED_REPLY_SUBJECTS).absolute(0);
    counter!(NATS_MESSAGES_RECEIVED).absolute(0);
    counter!(NATS_MESSAGES_PUBLISHED).absolute(0);
    counter!(JETSTREAM_REDELIVERIES).absolute(0);
}

/// Whether the engine can serve: what `GET /health` answers.
#[derive(Debug, Clone, Default)]
pub struct Health(Arc<AtomicU8>);

const LOADING: u8 = 0;
const READY: u8 = 1;
const DRAINING: u8 = 2;
const FAILED: u8 = 3;

impl Health {
    /// A fresh state: loading (503).
    pub fn new() -> Self {
        Self::default()
    }

    pub fn set_ready(&self) {
        self.0.store(READY, Ordering::Release);
    }

    /// Draining after a shutdown signal (a failed engine stays failed).
    pub fn set_draining(&self) {
        if self.0.load(Ordering::Acquire) != FAILED {
            self.0.store(DRAINING, Ordering::Release);
        }
    }

    /// An actor died: the engine cannot serve any more (503 until the process exits).
    pub fn set_failed(&self) {
        self.0.store(FAILED, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Acquire) == READY
    }

    fn describe(&self) -> &'static str {
        match self.0.load(Ordering::Acquire) {
            READY => "ok",
            DRAINING => "draining",
            LOADING => "loading",
            FAILED => "failed",
            _ => "unknown",
        }
    }
}

/// The HTTP listener serving `/metrics` and `/health`.
pub struct MetricsServer {
    /// The bound address (useful with port 0).
    pub local_addr: SocketAddr,
    pub health: Health,
    task: tokio::task::JoinHandle<()>,
}

impl MetricsServer {
    /// Binds `listen` and serves `/metrics` (from `handle`) and `/health` on the current
    /// tokio runtime. Health starts as loading.
    pub async fn start(listen: &str, handle: PrometheusHandle) -> Result<Self, MetricsError> {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|source| MetricsError::Bind {
                addr: listen.to_owned(),
                source,
            })?;
        let local_addr = listener.local_addr().map_err(|source| MetricsError::Bind {
            addr: listen.to_owned(),
            source,
        })?;
        let health = Health::new();
        let state = Arc::new(HttpState {
            handle,
            health: health.clone(),
        });
        let task = tokio::spawn(accept_loop(listener, state));
        tracing::info!(%local_addr, "metrics and health on http://{local_addr}/metrics, /health");
        Ok(Self {
            local_addr,
            health,
            task,
        })
    }

    /// Stops listening.
    pub fn stop(self) {
        self.task.abort();
    }
}

struct HttpState {
    handle: PrometheusHandle,
    health: Health,
}

async fn accept_loop(listener: tokio::net::TcpListener, state: Arc<HttpState>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "metrics listener: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&state, &req)) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .await
            {
                tracing::debug!(error = %e, "metrics listener: connection ended");
            }
        });
    }
}

fn route(state: &HttpState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, ctype: &'static str, body: String| {
        let mut resp = Response::new(Full::new(Bytes::from(body)));
        *resp.status_mut() = status;
        resp.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static(ctype),
        );
        resp
    };
    const TEXT: &str = "text/plain; charset=utf-8";
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, TEXT, "GET only\n".into());
    }
    match req.uri().path() {
        "/metrics" => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            state.handle.render(),
        ),
        "/health" => {
            let status = if state.health.is_ready() {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            reply(status, TEXT, format!("{}\n", state.health.describe()))
        }
        _ => reply(StatusCode::NOT_FOUND, TEXT, "not found\n".into()),
    }
}

/// Logs a vLLM-style engine line every `interval` while something happens: throughput,
/// queues, KV usage and prefix-cache hit rate since the previous line.
pub fn spawn_stats_logger(engine: Engine, interval: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        let mut last = Instant::now();
        let mut last_prompt = engine.token_counters().prompt_tokens();
        let mut last_gen = engine.token_counters().generation_tokens();
        let (mut last_q, mut last_h) = (0u64, 0u64);
        let mut was_busy = false;
        loop {
            tick.tick().await;
            let Ok(stats) = engine.scheduler_stats().await else {
                return; // the engine stopped
            };
            let prompt = engine.token_counters().prompt_tokens();
            let gen = engine.token_counters().generation_tokens();
            let busy = stats.num_running > 0 || stats.num_waiting > 0;
            let moved = prompt != last_prompt || gen != last_gen;
            if moved || busy || was_busy {
                let secs = last.elapsed().as_secs_f64().max(1e-9);
                let queries = stats.prefix_cache_queries.saturating_sub(last_q);
                let hits = stats.prefix_cache_hits.saturating_sub(last_h);
                let hit_rate = if queries > 0 {
                    100.0 * hits as f64 / queries as f64
                } else {
                    0.0
                };
                tracing::info!(
                    target: "pagoda::stats",
                    "Avg prompt throughput: {:.1} tokens/s, Avg generation throughput: {:.1} tokens/s, Running: {} reqs, Waiting: {} reqs, KV cache usage: {:.1}%, Prefix cache hit rate: {:.1}%",
                    (prompt - last_prompt) as f64 / secs,
                    (gen - last_gen) as f64 / secs,
                    stats.num_running,
                    stats.num_waiting,
                    100.0 * stats.kv_cache_usage,
                    hit_rate,
                );
            }
            was_busy = busy;
            last = Instant::now();
            last_prompt = prompt;
            last_gen = gen;
            last_q = stats.prefix_cache_queries;
            last_h = stats.prefix_cache_hits;
        }
    })
}
