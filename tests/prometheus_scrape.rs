//! A real Prometheus scrapes a real `pagoda serve`.
//!
//! The test starts a nats-server (tests/common/nats.rs), runs the `pagoda` binary as
//! `pagoda serve --nats-url URL --metrics-listen 127.0.0.1:PORT`, waits for `GET /health`
//! to answer 200, sends a known workload through NATS with `pagoda::client`, then starts
//! Prometheus (`$PAGODA_PROMETHEUS`, else the path printed by scripts/prometheus.sh, which
//! unpacks Debian's package into .tools/) on a free port with a generated config scraping
//! pagoda every second, and polls Prometheus' HTTP API until it returns
//! `vllm:generation_tokens_total` (equal to the workload's generated tokens) and
//! `vllm:num_requests_running` for the pagoda target. Every wait is bounded and says what
//! it waited for; the test never skips.

mod common;
#[path = "common/nats.rs"]
mod nats_server;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nats_server::{free_port, NatsServer};
use pagoda::client::Client;
use pagoda_actors::protocol::WireRequest;

/// How long pagoda may take to load the model and answer /health with 200.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(120);
/// How long Prometheus may take to become ready, and then to have the samples.
const PROMETHEUS_TIMEOUT: Duration = Duration::from_secs(60);

const PROMPTS: &[&str] = &[
    "The capital of France is",
    "Once upon a time",
    "The three primary colors are",
];
const MAX_TOKENS: u32 = 8;

/// A child process killed (and reaped) on drop; its output goes to `log`.
struct Proc {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &'static str, cmd: &mut Command, log: PathBuf) -> Proc {
        let out = std::fs::File::create(&log).expect("create a log file");
        let err = out.try_clone().unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        Proc { name, child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Panics with the log when the process has exited.
    fn assert_running(&mut self, waiting_for: &str) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "{} exited ({status}) while waiting for {waiting_for}; its log:\n{}",
                self.name,
                self.log()
            );
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP response: status code and body.
struct Response {
    status: u16,
    body: String,
}

/// `GET path` on 127.0.0.1:port with HTTP/1.1 and `Connection: close` (std only).
fn http_get(port: u16, path: &str) -> std::io::Result<Response> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_owned());
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of headers"))?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut body = raw[split + 4..].to_vec();
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| bad("no status line"))?;
    if head
        .lines()
        .any(|l| l.to_ascii_lowercase().replace(' ', "") == "transfer-encoding:chunked")
    {
        body = dechunk(&body).ok_or_else(|| bad("bad chunked body"))?;
    }
    Ok(Response {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn dechunk(mut b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = b.windows(2).position(|w| w == b"\r\n")?;
        let size_str = std::str::from_utf8(&b[..eol]).ok()?;
        let size = usize::from_str_radix(size_str.split(';').next()?.trim(), 16).ok()?;
        b = &b[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(b.get(..size)?);
        b = b.get(size + 2..)?;
    }
}

/// Percent-encodes a PromQL query for a URL's query string.
fn encode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The Prometheus binary: `$PAGODA_PROMETHEUS` when set, else what scripts/prometheus.sh
/// prints (installing it into .tools/prometheus/ when missing).
fn prometheus_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("PAGODA_PROMETHEUS").filter(|v| !v.is_empty()) {
        let path = PathBuf::from(bin);
        assert!(
            path.components().count() == 1 || path.is_file(),
            "PAGODA_PROMETHEUS={} is not a file: run scripts/prometheus.sh",
            path.display()
        );
        return path;
    }
    let script = common::repo_root().join("scripts/prometheus.sh");
    let out = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    let path = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or("")
        .trim()
        .to_owned();
    assert!(
        out.status.success() && !path.is_empty(),
        "no Prometheus binary: scripts/prometheus.sh exited with {}:\n{}\n(install Prometheus \
         and set PAGODA_PROMETHEUS=/path/to/prometheus)",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(path)
}

/// Polls `check` every 250 ms until it returns `Some`, or panics after `timeout` with
/// `what` and the last observation.
fn wait_for<T>(timeout: Duration, what: &str, mut check: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match check() {
            Ok(v) => return v,
            Err(last) => {
                if Instant::now() >= deadline {
                    panic!("timed out after {timeout:?} waiting for {what}; last: {last}");
                }
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// One sample of an instant query: its labels and value.
struct Sample {
    labels: serde_json::Map<String, serde_json::Value>,
    value: f64,
}

/// Runs an instant query; the samples, or why there are none.
fn query(prom_port: u16, promql: &str) -> Result<Vec<Sample>, String> {
    let resp = http_get(
        prom_port,
        &format!("/api/v1/query?query={}", encode(promql)),
    )
    .map_err(|e| format!("GET /api/v1/query: {e}"))?;
    if resp.status != 200 {
        return Err(format!(
            "query {promql}: HTTP {}: {}",
            resp.status, resp.body
        ));
    }
    let v: serde_json::Value = serde_json::from_str(&resp.body)
        .map_err(|e| format!("query {promql}: not JSON ({e}): {}", resp.body))?;
    if v["status"] != "success" {
        return Err(format!("query {promql}: {}", resp.body));
    }
    let result = v["data"]["result"]
        .as_array()
        .ok_or_else(|| format!("query {promql}: no data.result: {}", resp.body))?;
    result
        .iter()
        .map(|r| {
            let labels = r["metric"].as_object().cloned().unwrap_or_default();
            let value = r["value"][1]
                .as_str()
                .and_then(|s| s.parse::<f64>().ok())
                .ok_or_else(|| format!("query {promql}: bad sample {r}"))?;
            Ok(Sample { labels, value })
        })
        .collect()
}

/// The pagoda target's health as Prometheus sees it (for failure messages).
fn targets(prom_port: u16) -> String {
    http_get(prom_port, "/api/v1/targets")
        .map(|r| r.body)
        .unwrap_or_else(|e| format!("GET /api/v1/targets: {e}"))
}

fn write_prometheus_config(dir: &Path, metrics_port: u16) -> PathBuf {
    let path = dir.join("prometheus.yml");
    std::fs::write(
        &path,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: pagoda\n    scrape_interval: 1s\n    \
             scrape_timeout: 1s\n    metrics_path: /metrics\n    static_configs:\n      \
             - targets: [\"127.0.0.1:{metrics_port}\"]\n"
        ),
    )
    .expect("write prometheus.yml");
    path
}

#[test]
fn prometheus_scrapes_vllm_metrics_from_pagoda_serve() {
    let tmp = tempfile::Builder::new()
        .prefix("pagoda-prom-")
        .tempdir()
        .expect("a temporary directory");
    let prometheus = prometheus_binary();
    let nats = NatsServer::start();

    // --- pagoda serve, with metrics ---------------------------------------------------
    let metrics_port = free_port();
    let mut pagoda = Proc::spawn(
        "pagoda serve",
        Command::new(env!("CARGO_BIN_EXE_pagoda"))
            .current_dir(common::repo_root())
            .env("RUST_LOG", "info")
            // One request at a time: speculation runs, and the token counts must not care.
            .env("PAGODA_SPECULATIVE__METHOD", "ngram")
            .args(["serve", "--model"])
            .arg(common::model_path())
            .args(["--nats-url", &nats.url()])
            .args(["--metrics-listen", &format!("127.0.0.1:{metrics_port}")]),
        tmp.path().join("pagoda.log"),
    );
    wait_for(HEALTH_TIMEOUT, "pagoda's GET /health to answer 200", || {
        pagoda.assert_running("GET /health == 200");
        match http_get(metrics_port, "/health") {
            Ok(r) if r.status == 200 => Ok(()),
            Ok(r) => Err(format!("HTTP {}: {}", r.status, r.body)),
            Err(e) => Err(e.to_string()),
        }
    });

    // --- a known workload through NATS ------------------------------------------------
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (prompt_tokens, generated_tokens) = rt.block_on(async {
        let client = Client::connect(&nats.url())
            .await
            .expect("the client connects");
        let mut prompt_tokens = 0u64;
        let mut generated = 0u64;
        for prompt in PROMPTS {
            let mut req = WireRequest::text(*prompt);
            req.params = common::greedy(MAX_TOKENS);
            let done = tokio::time::timeout(Duration::from_secs(60), async {
                client
                    .generate(req)
                    .await
                    .expect("the request is sent")
                    .collect_text()
                    .await
            })
            .await
            .unwrap_or_else(|_| panic!("no answer to {prompt:?} within 60 s"))
            .unwrap_or_else(|e| panic!("request {prompt:?} failed: {e}"));
            assert_eq!(
                done.usage.completion_tokens, MAX_TOKENS,
                "{prompt:?}: ignore_eos with max_tokens {MAX_TOKENS} generated {:?}",
                done.usage
            );
            prompt_tokens += u64::from(done.usage.prompt_tokens);
            generated += u64::from(done.usage.completion_tokens);
        }
        (prompt_tokens, generated)
    });
    drop(rt);
    assert!(prompt_tokens > 0 && generated_tokens > 0);

    // --- Prometheus, scraping pagoda every second ------------------------------------
    let config = write_prometheus_config(tmp.path(), metrics_port);
    let prom_port = free_port();
    let mut prom = Proc::spawn(
        "prometheus",
        Command::new(&prometheus)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                tmp.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
            .current_dir(tmp.path()),
        tmp.path().join("prometheus.log"),
    );
    wait_for(
        PROMETHEUS_TIMEOUT,
        "Prometheus' /-/ready to answer 200",
        || {
            prom.assert_running("/-/ready");
            match http_get(prom_port, "/-/ready") {
                Ok(r) if r.status == 200 => Ok(()),
                Ok(r) => Err(format!("HTTP {}: {}", r.status, r.body)),
                Err(e) => Err(e.to_string()),
            }
        },
    );

    let instance = format!("127.0.0.1:{metrics_port}");
    let for_pagoda = |samples: Vec<Sample>| -> Vec<Sample> {
        samples
            .into_iter()
            .filter(|s| s.labels.get("job").and_then(|v| v.as_str()) == Some("pagoda"))
            .filter(|s| s.labels.get("instance").and_then(|v| v.as_str()) == Some(&*instance))
            .collect()
    };
    let mut last_targets = String::new();
    let generated = wait_for(
        PROMETHEUS_TIMEOUT,
        "Prometheus to return vllm:generation_tokens_total > 0 for the pagoda target",
        || {
            prom.assert_running("the first scrape");
            pagoda.assert_running("the first scrape");
            let samples = for_pagoda(query(prom_port, "vllm:generation_tokens_total")?);
            match samples.iter().find(|s| s.value > 0.0) {
                Some(s) => Ok((s.value, s.labels.clone())),
                None => {
                    last_targets = targets(prom_port);
                    Err(format!(
                        "{} samples for {instance}, none > 0; targets: {last_targets}",
                        samples.len()
                    ))
                }
            }
        },
    );
    assert_eq!(
        generated.0, generated_tokens as f64,
        "vllm:generation_tokens_total in Prometheus is not the workload's generated tokens"
    );
    assert!(
        generated.1.contains_key("model_name"),
        "vllm:generation_tokens_total has no model_name label: {:?}",
        generated.1
    );

    let prompt = for_pagoda(query(prom_port, "vllm:prompt_tokens_total").expect("query"));
    assert_eq!(
        prompt.iter().map(|s| s.value).sum::<f64>(),
        prompt_tokens as f64,
        "vllm:prompt_tokens_total in Prometheus is not the workload's prompt tokens"
    );

    let running = wait_for(
        PROMETHEUS_TIMEOUT,
        "Prometheus to return vllm:num_requests_running for the pagoda target",
        || {
            let samples = for_pagoda(query(prom_port, "vllm:num_requests_running")?);
            if samples.is_empty() {
                Err(format!(
                    "no sample for {instance}; targets: {}",
                    targets(prom_port)
                ))
            } else {
                Ok(samples)
            }
        },
    );
    assert!(
        running.iter().all(|s| s.value == 0.0),
        "vllm:num_requests_running is not 0 with no request in flight: {:?}",
        running.iter().map(|s| s.value).collect::<Vec<_>>()
    );

    // Speculative decoding's counters: drafts were proposed, at most all of them kept.
    let draft =
        for_pagoda(query(prom_port, "vllm:spec_decode_num_draft_tokens_total").expect("query"));
    let accepted =
        for_pagoda(query(prom_port, "vllm:spec_decode_num_accepted_tokens_total").expect("query"));
    let (draft, accepted) = (
        draft.iter().map(|s| s.value).sum::<f64>(),
        accepted.iter().map(|s| s.value).sum::<f64>(),
    );
    assert!(
        draft > 0.0 && (0.0..=draft).contains(&accepted),
        "spec decode counters: {draft} draft tokens, {accepted} accepted"
    );
    eprintln!("Prometheus: {draft} draft tokens, {accepted} accepted");
    let rate =
        for_pagoda(query(prom_port, "vllm:spec_decode_draft_acceptance_rate").expect("query"));
    assert!(
        rate.iter()
            .any(|s| (s.value - accepted / draft).abs() < 1e-9),
        "vllm:spec_decode_draft_acceptance_rate is not {accepted} / {draft}: {:?}",
        rate.iter().map(|s| s.value).collect::<Vec<_>>()
    );

    // The target is up and nothing went wrong on the way.
    let up = for_pagoda(query(prom_port, "up").expect("query up"));
    assert!(
        up.iter().any(|s| s.value == 1.0),
        "up{{job=\"pagoda\"}} is not 1; targets: {}",
        targets(prom_port)
    );
    drop(prom);
    drop(pagoda);
}
