//! End-to-end tests of `pagoda bench` on the real model, in-process, with tiny workloads:
//! the saved JSON, the plot, the dataset file, and clean errors for bad input. The
//! llama-server target is exercised by `benches/compare_llamacpp.sh` only (it needs a
//! llama.cpp build), never faked here.

mod common;
#[path = "common/nats.rs"]
mod nats_server;

use std::path::Path;
use std::process::{Command, Output};

use common::{model_path, repo_root};
use nats_server::NatsServer;
use serde_json::Value;

fn pagoda(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pagoda"))
        .args(args)
        .current_dir(repo_root())
        .env("RUST_LOG", "warn")
        .output()
        .expect("the pagoda binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn read_json(path: &Path) -> Vec<Value> {
    let s = std::fs::read_to_string(path).expect("the result file exists");
    serde_json::from_str(&s).expect("the result file is a JSON array")
}

/// Width and height from a PNG's IHDR, after checking the signature.
fn png_size(bytes: &[u8]) -> (u32, u32) {
    assert!(bytes.len() > 33, "too short for a PNG");
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    assert_eq!(&bytes[12..16], b"IHDR");
    let be = |i: usize| u32::from_be_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
    (be(16), be(20))
}

#[test]
fn bench_sweep_with_poisson_arrivals_and_a_shared_prefix() {
    let model = model_path();
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("x.json");
    let png = dir.path().join("x.png");
    let out = pagoda(&[
        "bench",
        "--model",
        model.to_str().unwrap(),
        "--num-prompts",
        "4",
        "--input-len",
        "16",
        "--output-len",
        "8",
        "--sweep",
        "1,2",
        "--request-rate",
        "50",
        "--prefix-len",
        "8",
        "--save-result",
        json.to_str().unwrap(),
        "--plot",
        png.to_str().unwrap(),
    ]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "stdout: {stdout}\nstderr: {stderr}");
    // stderr is not a terminal here: no progress bar.
    assert!(
        !stderr.contains("eta "),
        "a progress bar was drawn:\n{stderr}"
    );
    for want in [
        "successful requests:",
        "request throughput (req/s):",
        "TTFT  ms",
        "TPOT  ms",
        "ITL   ms",
        "E2E   ms",
        "========== summary",
    ] {
        assert!(stdout.contains(want), "stdout lacks {want:?}:\n{stdout}");
    }
    assert!(stderr.contains("prefix caching off"), "{stderr}");

    let reports = read_json(&json);
    assert_eq!(reports.len(), 2, "{reports:?}");
    for (r, c) in reports.iter().zip([1, 2]) {
        assert_eq!(r["target"], "in-process");
        assert_eq!(r["max_concurrency"], c);
        assert_eq!(r["num_prompts"], 4);
        assert_eq!(r["successful"], 4, "{r}");
        assert_eq!(r["failed"], 0, "{r}");
        assert_eq!(r["total_input_tokens"], 4 * 16, "{r}");
        assert_eq!(r["total_output_tokens"], 4 * 8, "{r}");
        assert_eq!(r["request_rate"], 50.0);
        assert_eq!(r["prefix_len"], 8);
        assert_eq!(r["input_len"], 16);
        assert_eq!(r["dataset"], "random");
        assert_eq!(r["ignore_eos"], true);
        for key in ["output_throughput", "total_token_throughput", "duration_s"] {
            assert!(r[key].as_f64().unwrap() > 0.0, "{key}: {r}");
        }
        let ttft = &r["ttft_ms"];
        let (p50, p90, p99) = (
            ttft["p50"].as_f64().unwrap(),
            ttft["p90"].as_f64().unwrap(),
            ttft["p99"].as_f64().unwrap(),
        );
        assert!(0.0 < p50 && p50 <= p90 && p90 <= p99, "{ttft}");
        assert!(r["tpot_ms"]["mean"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["itl_ms"]["p50"].as_f64().unwrap() > 0.0, "{r}");
        assert!(
            r["e2e_ms"]["p50"].as_f64().unwrap() >= p50,
            "end-to-end shorter than TTFT: {r}"
        );
    }

    let bytes = std::fs::read(&png).expect("the plot exists");
    assert_eq!(png_size(&bytes), (1400, 600));
    assert!(
        bytes.len() > 10_000,
        "a near-empty plot: {} bytes",
        bytes.len()
    );
}

#[test]
fn bench_dataset_file_with_text_and_token_prompts() {
    let model = model_path();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("prompts.jsonl");
    std::fs::write(
        &data,
        concat!(
            "{\"prompt\": \"The capital of France is\", \"output_len\": 3}\n",
            "{\"prompt_token_ids\": [504, 3575, 282, 4649, 314]}\n",
        ),
    )
    .unwrap();
    let baseline = dir.path().join("base.json");
    let base = serde_json::json!([{
        "target": "llama-server", "max_concurrency": 1, "num_prompts": 3,
        "successful": 3, "failed": 0, "duration_s": 1.0,
        "request_throughput": 3.0, "output_throughput": 10.0, "total_token_throughput": 30.0,
        "per_stream_decode_tok_s": 20.0,
        "ttft_ms": {"mean": 500.0, "p50": 500.0, "p90": 500.0, "p99": 500.0},
        "tpot_ms": {"mean": 50.0, "p50": 50.0, "p90": 50.0, "p99": 50.0},
        "itl_ms": {"mean": 50.0, "p50": 50.0, "p90": 50.0, "p99": 50.0},
        "e2e_ms": {"mean": 700.0, "p50": 700.0, "p90": 700.0, "p99": 700.0}
    }]);
    std::fs::write(&baseline, base.to_string()).unwrap();
    let json = dir.path().join("d.json");
    let out = pagoda(&[
        "bench",
        "--model",
        model.to_str().unwrap(),
        "--dataset",
        data.to_str().unwrap(),
        "--num-prompts",
        "3",
        "--output-len",
        "4",
        "--max-concurrency",
        "1",
        "--ignore-eos=false",
        "--baseline",
        baseline.to_str().unwrap(),
        "--save-result",
        json.to_str().unwrap(),
    ]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "stdout: {stdout}\nstderr: {stderr}");
    // The baseline is shown and compared.
    assert!(
        stdout.contains("pagoda / llama.cpp"),
        "no ratio table:\n{stdout}"
    );
    let reports = read_json(&json);
    assert_eq!(reports.len(), 2, "{reports:?}");
    assert_eq!(reports[0]["target"], "llama-server");
    let r = &reports[1];
    assert_eq!(r["target"], "in-process");
    assert_eq!(r["successful"], 3, "{r}");
    assert_eq!(r["dataset"], data.to_str().unwrap());
    assert_eq!(r["ignore_eos"], false);
    assert_eq!(r["input_len"], Value::Null);
    // Text prompts are counted by the engine's tokenizer; the ids line has 5 tokens.
    let input = r["total_input_tokens"].as_u64().unwrap();
    assert!(input > 5 + 5, "{r}");
    // At most 3 + 4 + 3 tokens (EOS may stop a request early).
    let output = r["total_output_tokens"].as_u64().unwrap();
    assert!((3..=10).contains(&output), "{r}");
}

/// `--compare-nats-url` with `--rounds`: the engine serves on a real nats-server, each pass
/// measures both paths (the order reversed every other pass), and the report prints every
/// pass's nats / in-process ratio and their median.
#[test]
fn bench_compares_nats_and_in_process_in_alternating_passes() {
    let nats = NatsServer::start();
    let model = model_path();
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("x.json");
    let out = pagoda(&[
        "bench",
        "--model",
        model.to_str().unwrap(),
        "--compare-nats-url",
        &nats.url(),
        "--num-prompts",
        "2",
        "--input-len",
        "8",
        "--output-len",
        "4",
        "--sweep",
        "2",
        "--rounds",
        "3",
        "--save-result",
        json.to_str().unwrap(),
    ]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "stdout: {stdout}\nstderr: {stderr}");
    let reports = read_json(&json);
    let order: Vec<(String, u64)> = reports
        .iter()
        .map(|r| {
            assert_eq!(r["successful"], 2, "{r}");
            assert_eq!(r["total_output_tokens"], 2 * 4, "{r}");
            (
                r["target"].as_str().unwrap().to_string(),
                r["round"].as_u64().unwrap(),
            )
        })
        .collect();
    let want: Vec<(String, u64)> = [
        ("in-process", 0),
        ("nats", 0),
        ("nats", 1),
        ("in-process", 1),
        ("in-process", 2),
        ("nats", 2),
    ]
    .iter()
    .map(|(t, r)| (t.to_string(), *r))
    .collect();
    assert_eq!(order, want);
    for pass in 1..=3 {
        let line = format!("ratio nats / in-process at concurrency 2, pass {pass}: ");
        assert!(stdout.contains(&line), "no {line:?}:\n{stdout}");
    }
    let median = stdout
        .lines()
        .find(|l| l.starts_with("ratio nats / in-process at concurrency 2, median of 3 passes: "))
        .unwrap_or_else(|| panic!("no median line:\n{stdout}"));
    // The median is one of the three ratios listed after it.
    let (value, listed) = median
        .rsplit_once(": ")
        .map(|(_, rest)| rest.split_once(" (").unwrap())
        .unwrap();
    let listed: Vec<&str> = listed.trim_end_matches(')').split(", ").collect();
    assert_eq!(listed.len(), 3, "{median}");
    assert!(listed.contains(&value), "{median}");

    let zero = pagoda(&["bench", "--rounds", "0"]);
    assert_eq!(zero.status.code(), Some(2));
    assert!(
        text(&zero.stderr).contains("--rounds"),
        "{}",
        text(&zero.stderr)
    );
}

/// Bad input fails before any work with `error: …` naming the problem.
#[test]
fn bench_rejects_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"prompt\": \"ok\"}\n{\"prompt\": 3}\n").unwrap();
    let bad = bad.to_str().unwrap().to_string();
    let cases: Vec<(Vec<&str>, &[&str])> = vec![
        (vec!["--dataset", &bad], &["line 2"]),
        (
            vec!["--dataset", "/nonexistent.jsonl"],
            &["/nonexistent.jsonl"],
        ),
        (
            vec!["--input-len", "8", "--prefix-len", "9"],
            &["--prefix-len"],
        ),
        (vec!["--request-rate", "0"], &["--request-rate"]),
        (vec!["--sweep", "1,0"], &["at least 1"]),
        (
            vec!["--llama-server-url", "https://127.0.0.1:1"],
            &["http://"],
        ),
        (
            vec!["--llama-server-url", "http://127.0.0.1:1"],
            &["llama-server", "not ready"],
        ),
    ];
    for (args, words) in cases {
        let mut all = vec!["bench"];
        all.extend(&args);
        let out = pagoda(&all);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        let line = stderr
            .lines()
            .find(|l| l.starts_with("error: "))
            .unwrap_or_else(|| panic!("{args:?}: no error line: {stderr}"));
        for w in words {
            assert!(line.contains(w), "{args:?}: {line}");
        }
    }
}
