//! Metrics and health of `pagoda serve`: after a known workload over NATS, `/metrics`
//! shows vLLM's series with exact token totals and observation counts; `/health` is 503
//! before the model is loaded and 200 after.
//!
//! The Prometheus recorder is process-global, so the in-process checks are one test
//! function (exact counts). The other test runs the `pagoda` binary (its own process).

mod common;
#[path = "common/nats.rs"]
mod nats_server;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nats_server::NatsServer;
use pagoda::client::Client;
use pagoda::config::NatsConfig;
use pagoda::gateway::GatewayConfig;
use pagoda::metrics::{install_recorder, MetricsServer};
use pagoda_actors::messages::FinishReason;
use pagoda_actors::protocol::WireRequest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A minimal HTTP/1.1 GET: (status, body).
async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// The value of the sample `series` (name and exact label set as rendered, e.g.
/// `vllm:request_success_total{model_name="m",finished_reason="length"}`).
fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// The value of a series with the `model_name` label only.
fn value(body: &str, name: &str, model: &str) -> f64 {
    sample(body, &format!("{name}{{model_name=\"{model}\"}}"))
        .unwrap_or_else(|| panic!("{name} for {model} missing from /metrics:\n{body}"))
}

#[test]
fn metrics_after_a_known_workload_and_health() {
    let nats = NatsServer::start();
    let url = nats.url();
    common::run(async move {
        let handle = install_recorder(0).expect("recorder installs");
        let server = MetricsServer::start("127.0.0.1:0", handle)
            .await
            .expect("metrics listener binds");
        let addr = server.local_addr;

        // Before the model is loaded: 503.
        let (status, body) = http_get(addr, "/health").await.expect("GET /health");
        assert_eq!(status, 503, "{body}");
        assert_eq!(body.trim(), "loading");

        let engine = common::start(&common::test_config());
        let model = engine.info.model_name.clone();
        assert_eq!(model, "SmolLM2-135M-Instruct.Q4_1");
        server.health.set_ready();
        let (status, body) = http_get(addr, "/health").await.expect("GET /health");
        assert_eq!((status, body.trim()), (200, "ok"));

        let cfg = NatsConfig {
            url: url.clone(),
            ..NatsConfig::default()
        };
        let conn = pagoda::nats::connect(&cfg, pagoda::nats::InitialConnect::FailFast)
            .await
            .expect("gateway connects");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let gateway = tokio::task::spawn_local(pagoda::gateway::serve(
            engine.clone(),
            conn,
            GatewayConfig::from(&cfg),
            async move {
                let _ = stopped.await;
            },
        ));
        let client = Client::connect_with(&cfg)
            .await
            .expect("client connects")
            .with_idle_timeout(Duration::from_secs(60));

        // The workload: N greedy requests that ignore EOS, so each generates max_tokens.
        let prompts = [
            "The capital of France is",
            "Once upon a time",
            "1, 2, 3, 4,",
        ];
        let max_tokens = [5u32, 9, 3];
        let mut prompt_total = 0u64;
        let mut futs = Vec::new();
        for (p, &n) in prompts.iter().zip(&max_tokens) {
            let mut req = WireRequest::text(*p);
            req.params = common::greedy(n);
            let client = &client;
            futs.push(async move {
                // The gateway may need a moment to subscribe.
                for _ in 0..100 {
                    if let Ok(g) = client.generate(req.clone()).await {
                        if let Ok(c) = g.collect_text().await {
                            return c;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                panic!("request never answered");
            });
        }
        let done = futures_util::future::join_all(futs).await;
        for (c, &n) in done.iter().zip(&max_tokens) {
            assert_eq!(c.finish_reason, FinishReason::Length);
            assert_eq!(c.usage.completion_tokens, n);
            prompt_total += u64::from(c.usage.prompt_tokens);
        }
        let n = prompts.len() as f64;
        let gen_total: u64 = max_tokens.iter().map(|&t| u64::from(t)).sum();

        // Gauges reach 0 at idle within a step or two.
        let mut body = String::new();
        for _ in 0..100 {
            body = http_get(addr, "/metrics").await.expect("GET /metrics").1;
            if value(&body, "vllm:num_requests_running", &model) == 0.0
                && value(&body, "vllm:num_requests_waiting", &model) == 0.0
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(value(&body, "vllm:num_requests_running", &model), 0.0);
        assert_eq!(value(&body, "vllm:num_requests_waiting", &model), 0.0);
        assert_eq!(
            value(&body, "vllm:prompt_tokens_total", &model),
            prompt_total as f64,
            "{body}"
        );
        assert_eq!(
            value(&body, "vllm:generation_tokens_total", &model),
            gen_total as f64
        );
        let success = |reason: &str| {
            sample(
                &body,
                &format!(
                    "vllm:request_success_total{{model_name=\"{model}\",finished_reason=\"{reason}\"}}"
                ),
            )
            .unwrap_or_else(|| panic!("request_success {reason} missing:\n{body}"))
        };
        assert_eq!(success("length"), n);
        assert_eq!(success("stop"), 0.0);
        assert_eq!(success("abort"), 0.0);
        for h in [
            "vllm:time_to_first_token_seconds",
            "vllm:e2e_request_latency_seconds",
            "vllm:request_queue_time_seconds",
            "vllm:request_prefill_time_seconds",
            "vllm:request_decode_time_seconds",
            "vllm:time_per_output_token_seconds",
            "vllm:request_prompt_tokens",
            "vllm:request_generation_tokens",
        ] {
            assert_eq!(value(&body, &format!("{h}_count"), &model), n, "{h}");
            assert!(
                body.contains(&format!("# TYPE {h} histogram")),
                "{h}:\n{body}"
            );
        }
        assert_eq!(
            value(&body, "vllm:request_generation_tokens_sum", &model),
            gen_total as f64
        );
        // One inter-token gap per token after the first.
        assert_eq!(
            value(&body, "vllm:inter_token_latency_seconds_count", &model),
            (gen_total - prompts.len() as u64) as f64
        );
        // vLLM's buckets.
        assert!(body.contains(&format!(
            "vllm:time_to_first_token_seconds_bucket{{model_name=\"{model}\",le=\"0.001\"}}"
        )));
        assert!(body.contains(&format!(
            "vllm:e2e_request_latency_seconds_bucket{{model_name=\"{model}\",le=\"7680\"}}"
        )));
        assert!(value(&body, "vllm:iteration_tokens_total_count", &model) >= 1.0);
        assert!(value(&body, "pagoda_step_duration_seconds_count", &model) >= 1.0);
        assert!(value(&body, "pagoda_batch_size_count", &model) >= 1.0);
        assert!(value(&body, "pagoda_kv_free_blocks", &model) > 0.0);
        assert!(body.contains("vllm:cache_config_info{"), "{body}");
        assert!(body.contains("# TYPE vllm:prompt_tokens_total counter"));
        assert!(body.contains("# HELP vllm:num_requests_running"));
        // The gateway: N requests in, at least N final replies out, no errors.
        let received = sample(&body, "pagoda_nats_messages_received_total").unwrap_or(0.0);
        assert!(received >= n, "{body}");
        assert!(sample(&body, "pagoda_nats_messages_published_total").unwrap_or(0.0) >= n);
        assert_eq!(
            sample(&body, "pagoda_jetstream_redeliveries_total"),
            Some(0.0)
        );

        // Draining: 503 again.
        server.health.set_draining();
        let (status, body) = http_get(addr, "/health").await.expect("GET /health");
        assert_eq!((status, body.trim()), (503, "draining"));
        let (status, _) = http_get(addr, "/nope").await.expect("GET /nope");
        assert_eq!(status, 404);

        let _ = stop.send(());
        let _ = gateway.await;
        server.stop();
    });
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `pagoda serve --metrics-listen` as a process: /health goes from 503 (or not yet bound)
/// to 200, and /metrics carries the vLLM series.
#[test]
fn the_binary_serves_metrics_and_health() {
    let nats = NatsServer::start();
    let port = nats_server::free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_pagoda"))
        .current_dir(common::repo_root())
        .args(["serve", "--model"])
        .arg(common::model_path())
        .args([
            "--nats-url",
            &nats.url(),
            "--metrics-listen",
            &addr.to_string(),
        ])
        .env("PAGODA_CACHE__NUM_BLOCKS", "128")
        .env("PAGODA_LOG__STATS_INTERVAL_S", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("pagoda serve starts");
    let _child = KillOnDrop(child);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let mut seen = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok((status, _)) = http_get(addr, "/health").await {
                seen.push(status);
                if status == 200 {
                    break;
                }
                assert_eq!(status, 503);
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "never healthy: {seen:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (status, body) = http_get(addr, "/metrics").await.expect("GET /metrics");
        assert_eq!(status, 200);
        for name in [
            "vllm:num_requests_running{model_name=\"SmolLM2-135M-Instruct.Q4_1\"} 0",
            "vllm:cache_config_info{",
            "num_gpu_blocks=\"128\"",
        ] {
            assert!(body.contains(name), "{name} missing:\n{body}");
        }
    });
}
