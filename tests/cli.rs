//! End-to-end tests of the `pagoda` binary: a real completion on stdout (and nothing else
//! there), and a clean `error: …` with a non-zero exit — never a panic — for a missing,
//! corrupt, truncated or unsupported model file, bad sampling values and a prompt longer
//! than the context.

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Output};

use candle_core::quantized::gguf_file;
use common::{model_path, repo_root};

/// Runs `pagoda ARGS…` from the repository root, with logs enabled (`RUST_LOG=info`) and
/// backtraces on, so a log line on stdout or a leaked backtrace would show.
fn pagoda(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pagoda"))
        .args(args)
        .current_dir(repo_root())
        .env("RUST_LOG", "info")
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("the pagoda binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs a command that must fail cleanly: exit code 1, `error: …` on stderr containing
/// every one of `words` (case-insensitive), no panic, no backtrace, nothing on stdout.
fn assert_fails(args: &[&str], words: &[&str]) -> String {
    let out = pagoda(args);
    let stderr = text(&out.stderr);
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{args:?}: status {:?}\nstderr: {stderr}",
        out.status
    );
    assert!(!stderr.contains("panicked"), "{args:?} panicked:\n{stderr}");
    assert!(
        !stderr.contains("stack backtrace") && !stderr.contains(" 0: "),
        "{args:?} printed a backtrace:\n{stderr}"
    );
    assert!(
        stdout.trim().is_empty(),
        "{args:?} printed to stdout: {stdout:?}"
    );
    let error_line = stderr
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("{args:?}: no `error: ` line on stderr:\n{stderr}"));
    for w in words {
        assert!(
            error_line.to_lowercase().contains(&w.to_lowercase()),
            "{args:?}: the error line does not mention {w:?}: {error_line}"
        );
    }
    stderr
}

#[test]
fn generate_prints_only_the_completion_on_stdout() {
    let model = model_path();
    let out = pagoda(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--temperature",
        "0",
        "--max-tokens",
        "16",
        "The capital of France is",
    ]);
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    assert!(
        out.status.success(),
        "status {:?}\nstderr: {stderr}",
        out.status
    );
    assert!(stdout.contains("Paris"), "stdout: {stdout:?}");
    for level in ["INFO", "WARN", "ERROR", "DEBUG"] {
        assert!(!stdout.contains(level), "a log line on stdout: {stdout:?}");
    }
    // The logs exist (RUST_LOG=info), on stderr.
    assert!(
        stderr.contains("INFO"),
        "no log on stderr with RUST_LOG=info: {stderr:?}"
    );
}

#[test]
fn missing_model_file_is_named() {
    assert_fails(
        &["generate", "--model", "/nonexistent.gguf", "hello"],
        &["/nonexistent.gguf"],
    );
}

#[test]
fn corrupt_gguf_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("random.gguf");
    // Deterministic garbage (an LCG), 64 KiB.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let bytes: Vec<u8> = (0..65536)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 56) as u8
        })
        .collect();
    std::fs::write(&path, bytes).unwrap();
    assert_fails(
        &["generate", "--model", path.to_str().unwrap(), "hello"],
        &[path.to_str().unwrap(), "not a valid gguf"],
    );
}

#[test]
fn truncated_gguf_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("truncated.gguf");
    let mut head = Vec::new();
    std::fs::File::open(model_path())
        .unwrap()
        .take(10 * 1024 * 1024)
        .read_to_end(&mut head)
        .unwrap();
    std::fs::File::create(&path)
        .unwrap()
        .write_all(&head)
        .unwrap();
    assert_fails(
        &["generate", "--model", path.to_str().unwrap(), "hello"],
        &[path.to_str().unwrap(), "truncated"],
    );
}

/// Writes a minimal GGUF whose only content is `general.architecture = arch`.
fn write_gguf_with_architecture(path: &Path, arch: &str) {
    let mut file = std::fs::File::create(path).unwrap();
    let value = gguf_file::Value::String(arch.to_string());
    gguf_file::write(&mut file, &[("general.architecture", &value)], &[]).unwrap();
}

#[test]
fn unsupported_architecture_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gpt2.gguf");
    write_gguf_with_architecture(&path, "gpt2");
    assert_fails(
        &["generate", "--model", path.to_str().unwrap(), "hello"],
        &["unsupported", "gpt2"],
    );
}

#[test]
fn bad_sampling_values_are_named() {
    let model = model_path();
    let model = model.to_str().unwrap();
    assert_fails(
        &["generate", "--model", model, "--temperature", "-1", "hi"],
        &["temperature"],
    );
    assert_fails(
        &["generate", "--model", model, "--top-p", "0", "hi"],
        &["top_p"],
    );
    assert_fails(
        &["generate", "--model", model, "--max-tokens", "0", "hi"],
        &["max_tokens"],
    );
    // Valid negative values parse as values, not as flags.
    let out = pagoda(&[
        "generate",
        "--model",
        model,
        "--presence-penalty",
        "-0.5",
        "--frequency-penalty",
        "-0.1",
        "--max-tokens",
        "2",
        "hi",
    ]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
}

#[test]
fn prompt_longer_than_the_context_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("short.toml");
    std::fs::write(&config, "[model]\nmax_model_len = 64\n").unwrap();
    let prompt = "The weather was sunny and people stayed outside. ".repeat(20);
    let model = model_path();
    assert_fails(
        &[
            "--config",
            config.to_str().unwrap(),
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--max-tokens",
            "8",
            &prompt,
        ],
        &["prompt", "64"],
    );
}
