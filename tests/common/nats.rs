//! A real nats-server for the end-to-end tests, one per test that asks for it.
//!
//! [`NatsServer::start`] finds the binary (`$PAGODA_NATS_SERVER`, else the path printed by
//! `scripts/nats-server.sh`, which installs a pinned nats-server into `.tools/` when
//! missing), starts it on a free port of 127.0.0.1 with JetStream enabled and a private
//! store directory, and waits until it answers with its `INFO` line. The process is killed
//! and the store removed when the value is dropped. Tests never skip: a missing binary or a
//! server that does not come up is a panic that says what to do.
//!
//! Only std (and the `tempfile` dev-dependency) is used, so the module compiles in any test
//! binary; the calls block for at most a few hundred milliseconds (wrap `restart` in
//! `tokio::task::spawn_blocking` if a test needs its runtime to make progress meanwhile).
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How long a server may take to accept connections before the harness gives up.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// How long [`NatsServer::stop`] waits after SIGTERM before it kills the process.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// The nats-server binary: `$PAGODA_NATS_SERVER` when set, else the path printed by
/// `scripts/nats-server.sh` (run once per test process). Panics with instructions when
/// neither gives one.
pub fn nats_server_binary() -> PathBuf {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match BIN.get_or_init(find_binary) {
        Ok(path) => path.clone(),
        Err(msg) => panic!("{msg}"),
    }
}

fn find_binary() -> Result<PathBuf, String> {
    if let Some(bin) = std::env::var_os("PAGODA_NATS_SERVER").filter(|v| !v.is_empty()) {
        let path = PathBuf::from(bin);
        // A bare name is looked up on PATH by Command; a path must exist.
        if path.components().count() > 1 && !path.is_file() {
            return Err(format!(
                "PAGODA_NATS_SERVER={} is not a file: run scripts/nats-server.sh \
                 (or point PAGODA_NATS_SERVER at a nats-server binary)",
                path.display()
            ));
        }
        return Ok(path);
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/nats-server.sh");
    let out = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            format!(
                "cannot run {}: {e}; run scripts/nats-server.sh and set PAGODA_NATS_SERVER",
                script.display()
            )
        })?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let path = stdout.lines().last().unwrap_or("").trim();
    if !out.status.success() || path.is_empty() {
        return Err(format!(
            "no nats-server binary: run scripts/nats-server.sh (it exited with {}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(PathBuf::from(path))
}

/// A TCP port on 127.0.0.1 that was free a moment ago (bound to port 0, then released).
/// Another process may take it before it is used; [`NatsServer::start`] retries on a fresh
/// port when that happens.
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("cannot bind 127.0.0.1:0 to find a free port")
        .port()
}

/// A running nats-server (JetStream on), owned by the test. Killed on drop.
pub struct NatsServer {
    bin: PathBuf,
    name: String,
    port: u16,
    extra_args: Vec<String>,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl NatsServer {
    /// Starts a server on a free port with JetStream (`-js -sd <tempdir>/store`) and waits
    /// until it accepts clients. Panics (with the server's log) when it cannot.
    pub fn start() -> Self {
        Self::start_with_args(&[])
    }

    /// Like [`start`](Self::start), with extra command-line arguments for nats-server
    /// (e.g. `["-c", "server.conf"]` for settings without a flag, such as
    /// `max_payload`; `-DV` for protocol tracing into the log).
    pub fn start_with_args(extra_args: &[&str]) -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = tempfile::Builder::new()
            .prefix("pagoda-nats-")
            .tempdir()
            .expect("cannot create a temporary directory for nats-server");
        let mut server = NatsServer {
            bin: nats_server_binary(),
            name: format!("pagoda-test-{}-{n}", std::process::id()),
            port: 0,
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            dir,
            child: None,
        };
        std::fs::create_dir_all(server.store_dir()).expect("cannot create the JetStream store dir");
        // A free port can be taken between free_port() and the server's bind: try a few.
        let mut last_err = String::new();
        for _ in 0..5 {
            server.port = free_port();
            match server.spawn_and_wait(READY_TIMEOUT) {
                Ok(()) => return server,
                Err(e) => last_err = e,
            }
        }
        panic!("nats-server did not start: {last_err}");
    }

    /// The server's name (`-n`), as JetStream reports it (e.g. a stream's leader).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The client port (on 127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:PORT`, for raw TCP clients.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// The JetStream store directory (kept across [`restart`](Self::restart)).
    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    /// The server's log file (stdout and stderr of every run, appended).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("nats-server.log")
    }

    /// The server's log so far (for assertion messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The process id while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Whether the process is alive.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Stops the server gracefully (SIGTERM, then SIGKILL after [`STOP_TIMEOUT`]) and waits
    /// for it to exit. Clients see the connection drop. No-op when already stopped.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        let termed = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if termed {
            let deadline = Instant::now() + STOP_TIMEOUT;
            while Instant::now() < deadline {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Kills the server at once (SIGKILL, like a crash) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the server and starts it again on the same port with the same store dir (so
    /// JetStream streams and consumers survive), waiting until it accepts clients again.
    pub fn restart(&mut self) {
        self.stop();
        self.start_again();
    }

    /// Starts a stopped server again (same port, same store). Panics if it is running.
    pub fn start_again(&mut self) {
        assert!(
            !self.is_running(),
            "nats-server on port {} is already running",
            self.port
        );
        // The port is ours only by convention now; retry while something else holds it
        // (e.g. a connection in a state that still blocks the bind), up to READY_TIMEOUT.
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.spawn_and_wait(left.max(Duration::from_millis(500))) {
                Ok(()) => return,
                Err(e) if Instant::now() >= deadline => {
                    panic!("nats-server did not restart on port {}: {e}", self.port)
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    fn spawn_and_wait(&mut self, timeout: Duration) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(|e| format!("cannot open {}: {e}", self.log_path().display()))?;
        let log_err = log.try_clone().map_err(|e| e.to_string())?;
        let child = Command::new(&self.bin)
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-n",
                &self.name,
                "-js",
                "-sd",
            ])
            .arg(self.store_dir())
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(|e| {
                format!(
                    "cannot run {}: {e}; run scripts/nats-server.sh",
                    self.bin.display()
                )
            })?;
        self.child = Some(child);
        match self.wait_ready(timeout) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.kill();
                Err(format!(
                    "{e} ({} on port {}); its log:\n{}",
                    self.bin.display(),
                    self.port,
                    self.log()
                ))
            }
        }
    }

    /// Waits until the server on our port answers with an INFO line naming *this* server
    /// (so a different process that grabbed the port is not mistaken for ours).
    fn wait_ready(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let want_name = format!("\"server_name\":\"{}\"", self.name);
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(format!("nats-server exited early with {status}"));
                }
            }
            if let Ok(info) = read_info(self.addr(), Duration::from_millis(500)) {
                if info.contains(&want_name) {
                    if !info.contains("\"jetstream\":true") {
                        return Err(format!("nats-server is up without JetStream: {info}"));
                    }
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "nats-server did not accept connections within {timeout:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Connects to `addr` and returns the server's first protocol line (`INFO {...}`).
pub fn read_info(addr: SocketAddr, timeout: Duration) -> std::io::Result<String> {
    let stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    if line.starts_with("INFO ") {
        Ok(line.trim_end().to_string())
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("not a NATS INFO line: {line:?}"),
        ))
    }
}
