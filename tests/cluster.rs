//! A real distributed bus: three nats-servers routed together on loopback, the jobs stream
//! with three replicas, two `pagoda serve --intake jetstream` engines, 64 durable jobs in
//! flight — and the stream leader's server SIGKILLed. Every job completes exactly once as
//! the client sees it (an attempt whose replies may have been cut short is run again and
//! the client starts over), and the engines reconnect.

#[path = "common/nats.rs"]
mod nats_server;
#[path = "common/process.rs"]
mod serve_process;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use nats_server::{free_port, NatsServer};
use pagoda::client::{Client, ClientError};
use pagoda::config::{IntakeConfig, NatsConfig};
use pagoda_actors::protocol::WireRequest;
use serve_process::Serve;
use tokio::time::Instant;

const JOBS: usize = 64;
const MAX_TOKENS: u32 = 48;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Three servers, each routing to the other two.
fn cluster() -> Vec<NatsServer> {
    let routes: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let all = routes
        .iter()
        .map(|p| format!("nats://127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    routes
        .iter()
        .map(|p| {
            let listen = format!("nats://127.0.0.1:{p}");
            NatsServer::start_with_args(&[
                "--cluster_name",
                "pagoda",
                "--cluster",
                &listen,
                "--routes",
                &all,
            ])
        })
        .collect()
}

fn job(i: usize) -> WireRequest {
    let mut r = WireRequest::text(format!("Job {i}: write about the sea."));
    r.id = Some(format!("job-{i}"));
    r.params.temperature = 0.0;
    r.params.max_tokens = MAX_TOKENS;
    r.params.ignore_eos = true;
    r
}

#[test]
fn killing_the_stream_leader_loses_no_job() {
    let servers = cluster();
    let urls: Vec<String> = servers.iter().map(NatsServer::url).collect();
    let rt = runtime();
    // The jobs stream, replicated on all three, as the engines would create it; waiting
    // for it also waits for the cluster to form and elect a meta leader.
    let intake = IntakeConfig {
        stream: pagoda::config::StreamSettings {
            replicas: 3,
            ..Default::default()
        },
        ack_wait_ms: 3000,
        ..IntakeConfig::default()
    };
    let leader = rt.block_on(async {
        let addrs: Vec<async_nats::ServerAddr> = urls
            .iter()
            .map(|u| u.parse().expect("a server address"))
            .collect();
        let admin = async_nats::connect(addrs).await.expect("connect");
        let js = async_nats::jetstream::new(admin);
        let want = pagoda::intake::stream_config("pagoda.v1", &intake);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match js.get_or_create_stream(want.clone()).await {
                Ok(mut s) => {
                    let info = s.info().await.expect("stream info");
                    if let Some(l) = info.cluster.as_ref().and_then(|c| c.leader.clone()) {
                        break l;
                    }
                }
                Err(e) if Instant::now() > deadline => panic!("no replicated stream: {e}"),
                Err(_) => {}
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let leader_ix = servers
        .iter()
        .position(|s| s.name() == leader)
        .unwrap_or_else(|| panic!("leader {leader} is none of ours"));
    let others: Vec<String> = (0..3)
        .filter(|&i| i != leader_ix)
        .map(|i| urls[i].clone())
        .collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let env = [
        ("PAGODA_INTAKE__STREAM__REPLICAS", "3"),
        ("PAGODA_INTAKE__ACK_WAIT_MS", "3000"),
        ("PAGODA_INTAKE__MAX_IN_FLIGHT", "32"),
        ("PAGODA_NATS__MAX_RECONNECT_DELAY_MS", "200"),
    ];
    // Engine a sits on the leader's server (it learns the others from the cluster);
    // engine b on the other two.
    let mut a = Serve::spawn(
        "engine-a",
        &urls[leader_ix],
        dir.path(),
        &["--intake", "jetstream"],
        &env,
    );
    let mut b = Serve::spawn(
        "engine-b",
        &others.join(","),
        dir.path(),
        &["--intake", "jetstream"],
        &env,
    );
    a.wait_for_log("pulling jobs");
    b.wait_for_log("pulling jobs");
    let mut servers = servers;
    rt.block_on(async {
        // The client's own server stays up (what a client loses when its own server dies is
        // in docs/reliability.md).
        let cfg = NatsConfig {
            url: others.join(","),
            ..NatsConfig::default()
        };
        let client = Client::connect_with(&cfg)
            .await
            .expect("the client connects")
            .with_idle_timeout(Duration::from_secs(60));
        let first_after_kill: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
        let killed_at: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
        let started = Arc::new(tokio::sync::Notify::new());
        let mut tasks = Vec::new();
        for i in 0..JOBS {
            let mut gen = client.generate_durable(job(i)).await.expect("publish a job");
            let (first_after_kill, killed_at, started) =
                (first_after_kill.clone(), killed_at.clone(), started.clone());
            tasks.push(tokio::spawn(async move {
                // As the application sees it: one answer, the last attempt's.
                let mut ids = Vec::new();
                let mut attempt = 0;
                let mut attempts = 0;
                while let Some(chunk) = gen.next().await {
                    let chunk = chunk?;
                    started.notify_one();
                    if killed_at.lock().expect("lock").is_some() {
                        first_after_kill
                            .lock()
                            .expect("lock")
                            .get_or_insert_with(Instant::now);
                    }
                    if chunk.attempt != attempt {
                        attempt = chunk.attempt;
                        attempts += 1;
                        ids.clear();
                    }
                    ids.extend_from_slice(&chunk.token_ids);
                    if chunk.finish_reason.is_some() {
                        return Ok::<_, ClientError>((chunk.id, ids, attempt, attempts));
                    }
                }
                Err(ClientError::Closed)
            }));
        }
        tokio::time::timeout(Duration::from_secs(60), started.notified())
            .await
            .expect("generation starts");
        tokio::time::sleep(Duration::from_millis(300)).await;
        *killed_at.lock().expect("lock") = Some(Instant::now());
        tokio::task::block_in_place(|| servers[leader_ix].kill());
        let kill = killed_at.lock().expect("lock").expect("set");
        let mut answered: HashMap<String, usize> = HashMap::new();
        let mut rerun = 0;
        for (i, t) in tasks.into_iter().enumerate() {
            let (id, ids, attempt, attempts) = tokio::time::timeout(Duration::from_secs(180), t)
                .await
                .unwrap_or_else(|_| panic!("job-{i} not answered; a:\n{}\nb:\n{}", a.log(), b.log()))
                .expect("task")
                .unwrap_or_else(|e| panic!("job-{i}: {e}; a:\n{}\nb:\n{}", a.log(), b.log()));
            assert_eq!(id, format!("job-{i}"));
            assert_eq!(ids.len(), MAX_TOKENS as usize, "{id}: one attempt's tokens");
            if attempt > 1 || attempts > 1 {
                rerun += 1;
            }
            *answered.entry(id).or_default() += 1;
        }
        assert_eq!(answered.len(), JOBS);
        assert!(answered.values().all(|&n| n == 1), "{answered:?}");
        let recovery = first_after_kill
            .lock()
            .expect("lock")
            .map(|t| t.duration_since(kill));
        eprintln!(
            "cluster: {JOBS} jobs, 0 lost, each answered once as the client sees it; {rerun} ran again after the kill; \
             leader's death → next chunk {recovery:?}"
        );
        // The jobs stream drains on the surviving servers.
        let js = async_nats::jetstream::new(client.nats().clone());
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            // The JetStream API may time out while the cluster elects new leaders.
            let left = match js.get_stream("PAGODA_JOBS").await {
                Ok(mut stream) => stream.info().await.map(|i| i.state.messages).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            if left == Ok(0) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the jobs stream did not drain: {left:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    a.assert_alive();
    b.assert_alive();
    let log_a = a.log();
    assert!(
        log_a.contains("NATS connection lost"),
        "engine a was on the killed server:\n{log_a}"
    );
    assert!(
        log_a.matches("NATS connected").count() >= 2,
        "engine a reconnected:\n{log_a}"
    );
}
