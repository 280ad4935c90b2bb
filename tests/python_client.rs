//! The Python example client (`examples/python/client.py`) in the test suite:
//! `examples/python/test_client.py` runs with the interpreter that `scripts/python-env.sh`
//! prints (it installs `examples/python/requirements.txt` into `.tools/python/` when
//! missing; `$PAGODA_PYTHON` overrides), against a real nats-server with JetStream:
//!
//! - with its fake engine and fake job worker (core requests, chunk order, redelivery,
//!   errors, cancel, no responders; durable publish with `Nats-Msg-Id` and `reply_to`, a
//!   real JetStream redelivery with attempt 2, deduplication of a repeated publish);
//! - `--pagoda-jetstream`: against a real `pagoda serve --intake jetstream` with the real
//!   model (durable jobs answered like core requests, JSON, concurrency, deduplication, an
//!   invalid job's typed error, and an empty jobs stream afterwards).
//!
//! Nothing skips: a missing Python, pip or package is a failure that says what to run.

mod common;
#[path = "common/nats.rs"]
mod nats_server;
#[path = "common/process.rs"]
mod serve_process;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use nats_server::NatsServer;
use serve_process::Serve;

/// How long one run of test_client.py may take.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(180);

/// The engine test loads a model: one test at a time on small machines.
static SERIAL: Mutex<()> = Mutex::new(());

/// The interpreter printed by `scripts/python-env.sh` (run once per test process).
fn python() -> PathBuf {
    static PY: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let found = PY.get_or_init(|| {
        let script = common::repo_root().join("scripts/python-env.sh");
        let out = Command::new("bash")
            .arg(&script)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let path = stdout.lines().last().unwrap_or("").trim().to_owned();
        if !out.status.success() || path.is_empty() {
            return Err(format!(
                "scripts/python-env.sh found no Python for the example (exit {}); \
                 install python3-pip, or set PAGODA_PYTHON to an interpreter that imports \
                 nats and msgpack (pip install -r examples/python/requirements.txt):\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(PathBuf::from(path))
    });
    match found {
        Ok(p) => p.clone(),
        Err(msg) => panic!("{msg}"),
    }
}

/// Runs test_client.py with `args`; returns its exit status and output (stdout + stderr).
fn run_test_client(args: &[&str], dir: &std::path::Path) -> (std::process::ExitStatus, String) {
    let log = dir.join("test_client.log");
    let out = std::fs::File::create(&log).expect("create a log file");
    let err = out.try_clone().expect("clone the log file");
    let mut child = Command::new(python())
        .arg(common::repo_root().join("examples/python/test_client.py"))
        .args(args)
        .current_dir(common::repo_root())
        .env("PYTHONUNBUFFERED", "1")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python().display()));
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for test_client.py") {
            break s;
        }
        if t0.elapsed() > SCRIPT_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "test_client.py {args:?} did not finish within {SCRIPT_TIMEOUT:?}; output:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (status, std::fs::read_to_string(&log).unwrap_or_default())
}

#[test]
fn python_client_against_its_fake_engine_and_job_worker() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let t0 = Instant::now();
    let (status, output) = run_test_client(&["--url", &nats.url()], dir.path());
    assert!(
        status.success(),
        "test_client.py failed ({status}):\n{output}"
    );
    // The durable checks ran (a script that stopped early would not print these).
    for line in [
        "ok: durable job (Nats-Msg-Id, reply_to), redelivered by JetStream as attempt 2",
        "ok: complete(durable=True) drops the earlier attempt",
        "answered once",
        "ok: durable publish without a stream -> no_stream",
        "all client checks passed",
    ] {
        assert!(output.contains(line), "missing {line:?} in:\n{output}");
    }
    eprintln!("test_client.py (fake engine) passed in {:?}", t0.elapsed());
}

#[test]
fn python_durable_jobs_are_answered_by_pagoda_serve_jetstream() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().expect("a temporary directory");
    // Resolve the interpreter (and install its packages) before the engine loads.
    python();
    let mut engine = Serve::spawn(
        "engine",
        &nats.url(),
        dir.path(),
        &["--intake", "jetstream"],
        &[("PAGODA_CACHE__NUM_BLOCKS", "128")],
    );
    engine.wait_for_log("pulling jobs");
    let t0 = Instant::now();
    let (status, output) =
        run_test_client(&["--url", &nats.url(), "--pagoda-jetstream"], dir.path());
    assert!(
        status.success(),
        "test_client.py --pagoda-jetstream failed ({status}):\n{output}\nengine log:\n{}",
        engine.log()
    );
    assert!(
        output.contains("all pagoda jetstream checks passed"),
        "{output}"
    );
    engine.assert_alive();
    eprintln!(
        "test_client.py --pagoda-jetstream passed in {:?}:\n{output}",
        t0.elapsed()
    );
}
