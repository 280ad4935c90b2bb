//! Split placement over NATS (`pagoda serve --role frontend|engine`), with real processes,
//! a real nats-server and the default model:
//!
//! - one frontend and one engine give greedy output identical to `--role all` on the
//!   fidelity goldens' prompts;
//! - two engines behind one frontend both take load, and their pools are all free after;
//! - SIGKILL of an engine with requests in flight ends exactly those requests with a typed
//!   error within 2 s; the others finish, and the frontend keeps serving;
//! - durable (JetStream) jobs that ran on a killed engine are redelivered and completed by
//!   the other one.

#[path = "common/nats.rs"]
mod nats_server;
#[path = "common/replies.rs"]
mod replies;
#[path = "common/process.rs"]
mod serve_process;

use replies::runtime;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use nats_server::NatsServer;
use pagoda::client::Client;
use pagoda_actors::messages::FinishReason;
use pagoda_actors::protocol::{ErrorCode, Reply, WireRequest};
use serde::Deserialize;
use serve_process::Serve;
use tokio::time::Instant;

const GENERATE: &str = "pagoda.v1.generate";

/// Each test runs several model-loading processes: one test at a time on small machines.
static SERIAL: Mutex<()> = Mutex::new(());

fn frontend(url: &str, dir: &std::path::Path, extra: &[&str]) -> Serve {
    let mut args = vec!["--role", "frontend"];
    args.extend_from_slice(extra);
    let mut s = Serve::spawn("frontend", url, dir, &args, &[]);
    s.wait_for_log("frontend routing to engines");
    s
}

fn engine(name: &str, url: &str, dir: &std::path::Path) -> Serve {
    let mut s = Serve::spawn(name, url, dir, &["--role", "engine"], &[]);
    s.wait_for_log("serving as an engine");
    s
}

/// `$SRV.STATS.pagoda-engine` of every engine, by engine id.
async fn engine_stats(nats: &async_nats::Client) -> HashMap<String, serde_json::Value> {
    replies::service_stats(nats, "pagoda-engine", Duration::from_millis(400))
        .await
        .into_values()
        .map(|d| (d["engine"].as_str().unwrap_or("").to_owned(), d))
        .collect()
}

/// Every engine idle with an all-free pool and no sequence of any frontend left.
async fn assert_engines_idle(nats: &async_nats::Client, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stats = engine_stats(nats).await;
        let idle = stats.len() == n
            && stats.values().all(|d| {
                d["num_running"] == 0
                    && d["num_waiting"] == 0
                    && d["sequences_mapped"] == 0
                    && d["num_free_blocks"] == d["num_blocks"]
            });
        if idle {
            return;
        }
        assert!(Instant::now() < deadline, "engines not idle: {stats:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[derive(Deserialize)]
struct Goldens {
    prompts: Vec<GoldenCase>,
}

#[derive(Deserialize)]
struct GoldenCase {
    name: String,
    prompt_ids: Vec<u32>,
    greedy32: Vec<u32>,
}

fn golden_requests() -> (Vec<WireRequest>, Vec<Vec<u32>>) {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/goldens/smollm2_q4_1.json"
    );
    let g: Goldens =
        serde_json::from_str(&std::fs::read_to_string(path).expect("goldens")).expect("json");
    let reqs = g
        .prompts
        .iter()
        .map(|c| WireRequest {
            id: Some(c.name.clone()),
            prompt_token_ids: Some(c.prompt_ids.clone()),
            params: pagoda_actors::messages::SamplingParams {
                temperature: 0.0,
                max_tokens: 32,
                ignore_eos: true,
                ..Default::default()
            },
            ..WireRequest::default()
        })
        .collect();
    (reqs, g.prompts.into_iter().map(|c| c.greedy32).collect())
}

/// All requests at once; their token ids, in order.
async fn run_all(nats: &async_nats::Client, reqs: &[WireRequest]) -> Vec<Vec<u32>> {
    let mut tasks = Vec::new();
    for r in reqs {
        let c = nats.clone();
        let r = r.clone();
        tasks.push(tokio::spawn(async move {
            replies::request(
                &c,
                GENERATE,
                &r,
                Duration::from_secs(120),
                Duration::from_millis(200),
            )
            .await
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        let got = t.await.expect("task");
        got.check_one_final().expect("one final reply");
        assert!(
            matches!(got.last(), Some(Reply::Chunk(c)) if c.finish_reason == Some(FinishReason::Length)),
            "{}: {:?}",
            got.id,
            got.last()
        );
        out.push(got.token_ids());
    }
    out
}

#[test]
fn a_frontend_and_an_engine_give_the_same_greedy_output_as_one_process() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (reqs, goldens) = golden_requests();
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");

    let nats = NatsServer::start();
    let mut all = Serve::spawn("all", &nats.url(), dir.path(), &[], &[]);
    all.wait_for_log("serving");
    let one_process = rt.block_on(async {
        let c = async_nats::connect(nats.url()).await.expect("connect");
        run_all(&c, &reqs).await
    });
    all.kill();
    drop(nats);

    let nats = NatsServer::start();
    let mut e = engine("engine", &nats.url(), dir.path());
    let mut f = frontend(&nats.url(), dir.path(), &[]);
    let split = rt.block_on(async {
        let c = async_nats::connect(nats.url()).await.expect("connect");
        replies::wait_engines(&c, 1).await;
        let out = run_all(&c, &reqs).await;
        // n = 3 across the split: the completions' sequences are mapped like any other,
        // each ends once, and index 1 samples as a lone request seeded seed + 1.
        let client = Client::new(c.clone(), "pagoda.v1");
        let sampled = |n: u32, seed: u64| {
            let mut r = WireRequest::text("Name a colour:");
            r.params.temperature = 0.9;
            r.params.seed = Some(seed);
            r.params.max_tokens = 8;
            r.params.ignore_eos = true;
            r.params.n = n;
            r
        };
        let three = client
            .generate(sampled(3, 21))
            .await
            .expect("sent")
            .collect_all()
            .await
            .expect("answered");
        let lone = client
            .generate(sampled(1, 22))
            .await
            .expect("sent")
            .collect_text()
            .await
            .expect("answered");
        assert_eq!(three.len(), 3);
        let three: Vec<_> = three
            .into_iter()
            .map(|c| c.expect("a completion"))
            .collect();
        for (i, c) in three.iter().enumerate() {
            assert_eq!((c.index as usize, c.usage.completion_tokens), (i, 8));
        }
        assert_eq!(three[1].token_ids, lone.token_ids);
        assert_engines_idle(&c, 1).await;
        out
    });
    e.assert_alive();
    f.assert_alive();
    assert_eq!(
        split, one_process,
        "split placement changed the greedy output"
    );
    let identical = split.iter().zip(&goldens).filter(|(a, b)| a == b).count();
    eprintln!("split placement: greedy 32 identical to transformers on {identical}/10 prompts, identical to --role all on 10/10");
    assert!(
        identical >= 9,
        "only {identical}/10 prompts match the goldens"
    );
}

#[test]
fn two_engines_behind_one_frontend_both_take_load() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let _a = engine("engine-a", &nats.url(), dir.path());
    let _b = engine("engine-b", &nats.url(), dir.path());
    let _f = frontend(&nats.url(), dir.path(), &[]);
    let rt = runtime();
    rt.block_on(async {
        let c = async_nats::connect(nats.url()).await.expect("connect");
        replies::wait_engines(&c, 2).await;
        let reqs: Vec<WireRequest> = (0..16)
            .map(|i| {
                let mut r = WireRequest::text(format!("Request {i}: tell me about rivers."));
                r.id = Some(format!("r{i}"));
                r.params.temperature = 0.0;
                r.params.max_tokens = 24;
                r.params.ignore_eos = true;
                r
            })
            .collect();
        run_all(&c, &reqs).await;
        assert_engines_idle(&c, 2).await;
        let stats = engine_stats(&c).await;
        let taken: Vec<u64> = stats
            .values()
            .map(|d| d["sequences_total"].as_u64().unwrap_or(0))
            .collect();
        eprintln!("sequences per engine: {taken:?}");
        assert_eq!(taken.iter().sum::<u64>(), 16, "{stats:?}");
        assert!(
            taken.iter().all(|&n| n >= 4),
            "both engines take load: {taken:?}"
        );
    });
}

#[test]
fn two_frontends_share_one_engine() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let _e = engine("engine", &nats.url(), dir.path());
    let mut f1 = frontend(&nats.url(), dir.path(), &[]);
    let mut f2 = frontend(&nats.url(), dir.path(), &[]);
    let rt = runtime();
    rt.block_on(async {
        let c = async_nats::connect(nats.url()).await.expect("connect");
        // Both frontends see the engine.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let stats = replies::service_stats(&c, "pagoda", Duration::from_millis(300)).await;
            let ready = stats
                .values()
                .filter(|d| d["engine"]["num_engines"].as_u64() == Some(1))
                .count();
            if ready == 2 {
                break;
            }
            assert!(Instant::now() < deadline, "frontends not ready: {stats:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let reqs: Vec<WireRequest> = (0..16)
            .map(|i| {
                let mut r = WireRequest::text(format!("Request {i}: name a colour."));
                r.id = Some(format!("r{i}"));
                r.params.temperature = 0.0;
                r.params.max_tokens = 16;
                r.params.ignore_eos = true;
                r
            })
            .collect();
        run_all(&c, &reqs).await;
        // The queue group spread the requests over both frontends; one engine ran them all.
        let stats = replies::service_stats(&c, "pagoda", Duration::from_millis(300)).await;
        let received: Vec<u64> = stats
            .values()
            .map(|d| d["received"].as_u64().unwrap_or(0))
            .collect();
        eprintln!("requests per frontend: {received:?}");
        assert_eq!(received.iter().sum::<u64>(), 16, "{stats:?}");
        assert!(
            received.iter().all(|&n| n > 0),
            "both frontends take requests: {received:?}"
        );
        let engines = engine_stats(&c).await;
        let taken: u64 = engines
            .values()
            .map(|d| d["sequences_total"].as_u64().unwrap_or(0))
            .sum();
        assert_eq!(taken, 16);
        assert_engines_idle(&c, 1).await;
    });
    f1.assert_alive();
    f2.assert_alive();
}

#[test]
fn killing_an_engine_ends_its_requests_within_two_seconds() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut a = engine("engine-a", &nats.url(), dir.path());
    let mut b = engine("engine-b", &nats.url(), dir.path());
    let mut f = frontend(&nats.url(), dir.path(), &[]);
    let rt = runtime();
    rt.block_on(async {
        let c = async_nats::connect(nats.url()).await.expect("connect");
        replies::wait_engines(&c, 2).await;
        let mut tasks = Vec::new();
        for i in 0..12 {
            let mut r = WireRequest::text(format!("Story {i}: once upon a time"));
            r.id = Some(format!("s{i}"));
            r.params.temperature = 0.0;
            r.params.max_tokens = 300;
            r.params.ignore_eos = true;
            let c = c.clone();
            tasks.push(tokio::spawn(async move {
                replies::request(&c, GENERATE, &r, Duration::from_secs(120), Duration::from_millis(200))
                    .await
            }));
        }
        // Kill one engine once both are generating.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let on_a = engine_stats(&c).await.values().map(|d| d["num_running"].as_u64().unwrap_or(0)).collect::<Vec<_>>();
        assert!(on_a.iter().all(|&n| n > 0), "both engines run requests: {on_a:?}");
        let killed_at = Instant::now();
        tokio::task::block_in_place(|| a.kill());
        let mut failed = 0;
        let mut finished = 0;
        let mut slowest_failure = Duration::ZERO;
        for t in tasks {
            let got = t.await.expect("task");
            got.check_one_final().expect("one final reply");
            match got.last() {
                Some(Reply::Error(e)) => {
                    assert_eq!(e.error.code, ErrorCode::Internal, "{e:?}");
                    assert!(e.error.message.contains("stopped responding"), "{e:?}");
                    let after = got.final_at.expect("final").duration_since(killed_at);
                    slowest_failure = slowest_failure.max(after);
                    failed += 1;
                }
                Some(Reply::Chunk(ch)) => {
                    assert_eq!(ch.finish_reason, Some(FinishReason::Length), "{ch:?}");
                    assert_eq!(got.token_ids().len(), 300);
                    finished += 1;
                }
                None => unreachable!("checked above"),
            }
        }
        eprintln!("engine killed: {failed} requests ended with internal (slowest {slowest_failure:?} after the kill), {finished} finished on the other engine");
        assert!(failed > 0 && finished > 0, "failed {failed}, finished {finished}");
        assert!(
            slowest_failure < Duration::from_secs(2),
            "a request of the killed engine ended {slowest_failure:?} after the kill"
        );
        // The frontend goes on with the engine that is left.
        replies::wait_engines(&c, 1).await;
        let mut r = WireRequest::text("After the crash,");
        r.id = Some("after".into());
        r.params.temperature = 0.0;
        r.params.max_tokens = 8;
        let got = replies::request(&c, GENERATE, &r, Duration::from_secs(30), Duration::from_millis(200)).await;
        got.check_one_final().expect("one final reply");
        assert!(matches!(got.last(), Some(Reply::Chunk(_))), "{:?}", got.last());
        assert_engines_idle(&c, 1).await;
    });
    b.assert_alive();
    f.assert_alive();
}

#[test]
fn durable_jobs_of_a_killed_engine_are_redelivered_through_the_frontend() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut a = engine("engine-a", &nats.url(), dir.path());
    let mut b = engine("engine-b", &nats.url(), dir.path());
    let mut f = frontend(&nats.url(), dir.path(), &["--intake", "jetstream"]);
    f.wait_for_log("pulling jobs");
    let rt = runtime();
    rt.block_on(async {
        let raw = async_nats::connect(nats.url()).await.expect("connect");
        replies::wait_engines(&raw, 2).await;
        let client = Client::connect(&nats.url())
            .await
            .expect("connect")
            .with_idle_timeout(Duration::from_secs(60));
        let mut gens = Vec::new();
        for i in 0..8 {
            let mut r = WireRequest::text(format!("Job {i}: describe a harbour."));
            r.id = Some(format!("job-{i}"));
            r.params.temperature = 0.0;
            r.params.max_tokens = 200;
            r.params.ignore_eos = true;
            gens.push(client.generate_durable(r).await.expect("publish"));
        }
        tokio::time::sleep(Duration::from_millis(1200)).await;
        tokio::task::block_in_place(|| a.kill());
        let mut redelivered = 0;
        for (i, g) in gens.into_iter().enumerate() {
            let done = tokio::time::timeout(Duration::from_secs(120), g.collect_text())
                .await
                .unwrap_or_else(|_| panic!("job-{i} not answered"))
                .unwrap_or_else(|e| panic!("job-{i}: {e}"));
            assert_eq!(done.id, format!("job-{i}"));
            assert_eq!(done.token_ids.len(), 200, "one attempt's tokens");
            if done.attempt > 1 {
                redelivered += 1;
            }
        }
        eprintln!("durable through a frontend: 8 jobs answered once each, {redelivered} after a redelivery");
        assert!(redelivered > 0, "the killed engine held jobs");
        assert_engines_idle(&raw, 1).await;
    });
    b.assert_alive();
    f.assert_alive();
}
