//! A real `pagoda serve` process for the end-to-end tests: started with the test binary's
//! `pagoda`, its stdout and stderr in a log file, killed (SIGKILL) when dropped.
//!
//! Use it with `#[path = "common/process.rs"] mod serve_process;` (std only, plus the
//! `tempfile` dev-dependency through the caller's directory).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long an engine may take to load the model and start serving.
pub const READY_TIMEOUT: Duration = Duration::from_secs(120);

pub struct Serve {
    pub name: String,
    pub child: Child,
    log: PathBuf,
}

impl Serve {
    /// Runs `pagoda serve --nats-url URL --metrics-listen "" EXTRA_ARGS` (no metrics
    /// listener unless EXTRA_ARGS or `env` set one) in the repository root with `RUST_LOG=info`, no periodic stats line, and `env` on top; logs to
    /// `dir/NAME.log`.
    pub fn spawn(
        name: &str,
        url: &str,
        dir: &Path,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).expect("create a log file");
        let err = out.try_clone().expect("clone the log file");
        // No metrics listener unless the caller asks for one.
        let metrics_off: &[&str] = if extra_args.contains(&"--metrics-listen")
            || env.iter().any(|(k, _)| *k == "PAGODA_METRICS__LISTEN")
        {
            &[]
        } else {
            &["--metrics-listen", ""]
        };
        let child = Command::new(env!("CARGO_BIN_EXE_pagoda"))
            .args(["serve", "--nats-url", url])
            .args(metrics_off)
            .args(extra_args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("RUST_LOG", "info")
            .env("PAGODA_LOG__STATS_INTERVAL_S", "0")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start pagoda serve: {e}"));
        Serve {
            name: name.to_owned(),
            child,
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle` ("serving" for the core intake, "pulling
    /// jobs" for the JetStream intake); panics with the log when the process exits or
    /// [`READY_TIMEOUT`] passes.
    pub fn wait_for_log(&mut self, needle: &str) {
        let t0 = Instant::now();
        loop {
            if self.log().contains(needle) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("{} exited ({status}); its log:\n{}", self.name, self.log());
            }
            assert!(
                t0.elapsed() < READY_TIMEOUT,
                "{} did not log {needle:?} within {READY_TIMEOUT:?}; its log:\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Panics with the log when the process is no longer running.
    pub fn assert_alive(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("{} exited ({status}); its log:\n{}", self.name, self.log());
        }
    }

    /// SIGKILL, and wait for the exit.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The resident set size of process `pid` in bytes (`VmRSS` of `/proc/PID/status`).
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    // "VmRSS:	  123456 kB"
    let kb: u64 = line
        .trim_start_matches("VmRSS:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}
