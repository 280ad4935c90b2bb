//! A dead actor is noticed: with the test-only fault hook (`pagoda-fault:panic:<actor>`
//! request ids, in a `pagoda serve` started with `PAGODA_FAULT_INJECTION=1`), each of the
//! five actors is made to panic under load. Every request in flight ends with one
//! `internal` error within a second, `/health` answers 503, and the process exits with
//! status 70 for its supervisor to replace it. A JetStream job running on the dying engine
//! is not acked: another engine completes it.

#[path = "common/nats.rs"]
mod nats_server;
#[path = "common/replies.rs"]
mod replies;
#[path = "common/process.rs"]
mod serve_process;

use replies::runtime;
use std::net::SocketAddr;
use std::time::Duration;

use nats_server::{free_port, NatsServer};
use pagoda::client::Client;
use pagoda_actors::protocol::{ErrorCode, Reply, WireRequest};
use serve_process::Serve;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

const GENERATE: &str = "pagoda.v1.generate";
/// Each test runs engines that load a model: one test at a time on small machines, so that
/// the timings measured are the engine's, not the machine's.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Exit status of `pagoda serve` after an actor died.
const EXIT_ENGINE_FAILED: i32 = 70;

fn long_request(id: &str) -> WireRequest {
    let mut req = WireRequest::text("Write a long story about a lighthouse keeper.");
    req.id = Some(id.to_owned());
    req.params.temperature = 0.0;
    req.params.max_tokens = 400;
    req.params.ignore_eos = true;
    req
}

async fn health(addr: SocketAddr) -> Option<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(b"GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split(' ').nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n")?.1.to_owned();
    Some((status, body))
}

/// Waits for the process to exit; its status code.
fn wait_exit(serve: &mut Serve, limit: Duration) -> Option<i32> {
    let t0 = std::time::Instant::now();
    while t0.elapsed() < limit {
        if let Ok(Some(status)) = serve.child.try_wait() {
            return status.code();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// One actor panics while 4 requests stream: everything in flight ends with `internal`
/// within a second, /health turns 503, the process exits 70.
fn panic_in(actor: &str) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut serve = Serve::spawn(
        actor,
        &nats.url(),
        dir.path(),
        &[],
        &[
            ("PAGODA_FAULT_INJECTION", "1"),
            ("PAGODA_METRICS__LISTEN", &listen),
        ],
    );
    serve.wait_for_log("serving");
    let addr: SocketAddr = listen.parse().expect("addr");
    let rt = runtime();
    let (results, fault_sent) = rt.block_on(async {
        let client = async_nats::connect(nats.url()).await.expect("connect");
        assert_eq!(health(addr).await.map(|h| h.0), Some(200));
        let mut tasks = Vec::new();
        for i in 0..4 {
            let c = client.clone();
            let req = long_request(&format!("bystander-{i}"));
            tasks.push(tokio::spawn(async move {
                replies::request(&c, GENERATE, &req, Duration::from_secs(60), Duration::ZERO).await
            }));
        }
        // Let them stream a little, then send the fault, watching /health meanwhile.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let watcher = tokio::spawn(async move {
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(10) {
                if let Some((503, body)) = health(addr).await {
                    return Some(body);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            None
        });
        let fault_sent = Instant::now();
        let c = client.clone();
        let req = long_request(&format!("pagoda-fault:panic:{actor}"));
        tasks.push(tokio::spawn(async move {
            replies::request(&c, GENERATE, &req, Duration::from_secs(60), Duration::ZERO).await
        }));
        let mut results = Vec::new();
        for t in tasks {
            results.push(t.await.expect("task"));
        }
        let body = watcher.await.expect("watcher");
        assert!(
            body.as_deref().is_some_and(|b| b.contains("failed")),
            "{actor}: /health never answered 503 failed: {body:?}"
        );
        (results, fault_sent)
    });
    for r in &results {
        r.check_one_final()
            .unwrap_or_else(|e| panic!("{actor}: {e}; log:\n{}", serve.log()));
        match r.last() {
            Some(Reply::Error(e)) => {
                assert_eq!(e.error.code, ErrorCode::Internal, "{actor}: {e:?}");
                assert!(e.error.message.contains(actor), "{actor}: {e:?}");
            }
            other => panic!("{actor}: {} should have failed: {other:?}", r.id),
        }
        let ended = r.final_at.expect("final").duration_since(fault_sent);
        assert!(
            ended < Duration::from_secs(1),
            "{actor}: {} ended {ended:?} after the fault",
            r.id
        );
    }
    let code = wait_exit(&mut serve, Duration::from_secs(10));
    assert_eq!(
        code,
        Some(EXIT_ENGINE_FAILED),
        "{actor}: exit status; log:\n{}",
        serve.log()
    );
    let log = serve.log();
    assert!(log.contains("an actor died"), "{actor}: log:\n{log}");
}

#[test]
fn a_panicking_tokenizer_is_noticed() {
    panic_in("tokenizer");
}

#[test]
fn a_panicking_detokenizer_is_noticed() {
    panic_in("detokenizer");
}

#[test]
fn a_panicking_scheduler_is_noticed() {
    panic_in("scheduler");
}

#[test]
fn a_panicking_block_manager_is_noticed() {
    panic_in("block_manager");
}

#[test]
fn a_panicking_executor_is_noticed() {
    panic_in("executor");
}

/// Engine A (faults on) takes 4 durable jobs and then one that makes its scheduler panic;
/// none of them is acked there. Engine B (no faults) starts afterwards and completes all
/// five, each seen exactly once by the client.
#[test]
fn jobs_on_a_dying_engine_are_redelivered_to_a_healthy_one() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let env = [
        ("PAGODA_INTAKE__ACK_WAIT_MS", "2000"),
        ("PAGODA_FAULT_INJECTION", "1"),
    ];
    let mut a = Serve::spawn(
        "engine-a",
        &nats.url(),
        dir.path(),
        &["--intake", "jetstream"],
        &env,
    );
    a.wait_for_log("pulling jobs");
    let rt = runtime();
    let client = rt.block_on(async {
        Client::connect(&nats.url())
            .await
            .expect("connect")
            .with_idle_timeout(Duration::from_secs(60))
    });
    let mut ids: Vec<String> = (0..4).map(|i| format!("job-{i}")).collect();
    ids.push("pagoda-fault:panic:scheduler".into());
    let gens = rt.block_on(async {
        let mut gens = Vec::new();
        for id in &ids {
            let mut req = long_request(id);
            req.params.max_tokens = 200;
            gens.push(client.generate_durable(req).await.expect("publish"));
            // The bystanders first, so they are running when the fault arrives.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        gens
    });
    let code = wait_exit(&mut a, Duration::from_secs(20));
    assert_eq!(
        code,
        Some(EXIT_ENGINE_FAILED),
        "engine a should die; log:\n{}",
        a.log()
    );
    let mut b = Serve::spawn(
        "engine-b",
        &nats.url(),
        dir.path(),
        &["--intake", "jetstream"],
        &[("PAGODA_INTAKE__ACK_WAIT_MS", "2000")],
    );
    b.wait_for_log("pulling jobs");
    rt.block_on(async {
        for (id, gen) in ids.iter().zip(gens) {
            let done = tokio::time::timeout(Duration::from_secs(120), gen.collect_text())
                .await
                .unwrap_or_else(|_| panic!("{id} not answered; b's log:\n{}", b.log()))
                .unwrap_or_else(|e| panic!("{id}: {e}; b's log:\n{}", b.log()));
            assert_eq!(&done.id, id);
            assert_eq!(
                done.token_ids.len(),
                200,
                "{id}: one attempt's tokens: {done:?}"
            );
            assert!(
                done.attempt >= 2,
                "{id} was answered by the dying engine: {done:?}"
            );
        }
    });
    b.assert_alive();
}
