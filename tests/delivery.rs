//! The message layer's guarantees, end to end: a real `pagoda serve` process on the default
//! model, a real nats-server, raw NATS requests.
//!
//! - Under a storm (hundreds of requests at once, half of them cancelled at random moments,
//!   stop strings, timeouts) every stream ends exactly once, its chunks numbered without
//!   gaps, and the KV pool is all free afterwards.
//! - A request that cannot be sampled (every token suppressed) fails alone: its neighbours
//!   produce exactly what they produce alone.

#[path = "common/nats.rs"]
mod nats_server;
#[path = "common/replies.rs"]
mod replies;
#[path = "common/process.rs"]
mod serve_process;

use std::collections::HashMap;
use std::time::Duration;

use nats_server::NatsServer;
use pagoda_actors::messages::FinishReason;
use pagoda_actors::protocol::{ErrorCode, Reply, WireRequest};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use replies::{runtime, Collected};
use serve_process::Serve;
use tokio::time::Instant;

const GENERATE: &str = "pagoda.v1.generate";
const CANCEL: &str = "pagoda.v1.cancel";

const WORDS: &[&str] = &[
    "the",
    "river",
    "quietly",
    "crossed",
    "a",
    "mountain",
    "of",
    "glass",
    "while",
    "seven",
    "engineers",
    "argued",
    "about",
    "bread",
    "and",
    "distant",
    "stars",
    "under",
    "rain",
];

fn random_prompt(rng: &mut StdRng) -> String {
    let n = rng.gen_range(3..24);
    (0..n)
        .map(|_| WORDS[rng.gen_range(0..WORDS.len())])
        .collect::<Vec<_>>()
        .join(" ")
}

fn greedy(id: &str, prompt: &str, max_tokens: u32) -> WireRequest {
    let mut req = WireRequest::text(prompt);
    req.id = Some(id.to_owned());
    req.params.temperature = 0.0;
    req.params.max_tokens = max_tokens;
    req
}

/// Waits until the engine reports no running or waiting sequence and every KV block free
/// (`engine` in the `$SRV.STATS.pagoda` data); panics with the last stats otherwise.
async fn assert_idle_pool(nats: &async_nats::Client) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stats = replies::service_stats(nats, "pagoda", Duration::from_millis(300)).await;
        let ok = !stats.is_empty()
            && stats.values().all(|d| {
                let e = &d["engine"];
                e["num_running"] == 0
                    && e["num_waiting"] == 0
                    && e["num_blocks"].as_u64().is_some_and(|n| n > 0)
                    && e["num_free_blocks"] == e["num_blocks"]
            });
        if ok {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the engine did not return to idle with an all-free pool: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn a_storm_of_requests_cancels_stops_and_timeouts_ends_every_stream_exactly_once() {
    storm(false);
}

/// The same storm against a frontend and an engine in two processes: cancels, stop
/// strings and stream ends cross NATS between them.
#[test]
fn the_storm_through_a_frontend_and_an_engine() {
    storm(true);
}

fn storm(split: bool) {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let env = [
        ("PAGODA_SCHEDULER__MAX_WAITING", "1024"),
        ("PAGODA_SCHEDULER__MAX_NUM_SEQS", "64"),
    ];
    let mut procs = Vec::new();
    if split {
        let mut engine = Serve::spawn(
            "engine",
            &nats.url(),
            dir.path(),
            &["--role", "engine"],
            &env,
        );
        engine.wait_for_log("serving as an engine");
        let mut frontend = Serve::spawn(
            "frontend",
            &nats.url(),
            dir.path(),
            &["--role", "frontend"],
            &env,
        );
        frontend.wait_for_log("frontend routing to engines");
        procs.push(engine);
        procs.push(frontend);
    } else {
        let mut serve = Serve::spawn("engine", &nats.url(), dir.path(), &[], &env);
        serve.wait_for_log("serving");
        procs.push(serve);
    }
    let rt = runtime();
    if split {
        rt.block_on(async {
            let client = async_nats::connect(nats.url()).await.expect("connect");
            replies::wait_engines(&client, 1).await;
        });
    }
    let rt = runtime();
    let results: Vec<(Collected, bool)> = rt.block_on(async {
        let client = async_nats::connect(nats.url()).await.expect("connect");
        let mut rng = StdRng::seed_from_u64(10);
        const N: usize = 512;
        let mut cancelled = vec![false; N];
        for i in rand::seq::index::sample(&mut rng, N, N / 2) {
            cancelled[i] = true;
        }
        let mut tasks = Vec::new();
        for (i, &cancel) in cancelled.iter().enumerate() {
            let id = format!("storm-{i}");
            let mut req = greedy(&id, &random_prompt(&mut rng), rng.gen_range(2..24));
            req.params.ignore_eos = rng.gen_bool(0.7);
            if rng.gen_bool(0.25) {
                req.params.stop = vec![WORDS[rng.gen_range(0..WORDS.len())].to_owned()];
            }
            if rng.gen_bool(0.15) {
                req.timeout_ms = Some(rng.gen_range(20..3000));
            }
            if rng.gen_bool(0.1) {
                req.stream = false;
            }
            // Half the cancels come in bursts (all at the same instant, as when a backend
            // gives up on a whole batch), half at random moments.
            let bursts = [300, 1200, 2500];
            let cancel_after = cancel.then(|| {
                Duration::from_millis(if rng.gen_bool(0.5) {
                    bursts[rng.gen_range(0..bursts.len())]
                } else {
                    rng.gen_range(0..4000)
                })
            });
            let client = client.clone();
            tasks.push(tokio::spawn(async move {
                let canceller = cancel_after.map(|after| {
                    let client = client.clone();
                    let id = id.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(after).await;
                        let body = rmp_serde::to_vec_named(&serde_json::json!({ "id": id }))
                            .expect("encode a cancel");
                        client.publish(CANCEL, body.into()).await.expect("cancel");
                    })
                });
                let got = replies::request(
                    &client,
                    GENERATE,
                    &req,
                    Duration::from_secs(180),
                    Duration::from_millis(1500),
                )
                .await;
                if let Some(c) = canceller {
                    c.await.expect("canceller");
                }
                (got, cancel)
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.expect("request task"));
        }
        assert_idle_pool(&client).await;
        if split {
            // The engine forgot every frontend sequence too.
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let stats =
                    replies::service_stats(&client, "pagoda-engine", Duration::from_millis(300))
                        .await;
                if !stats.is_empty() && stats.values().all(|d| d["sequences_mapped"] == 0) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "engine still maps sequences: {stats:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        out
    });
    for p in &mut procs {
        p.assert_alive();
    }
    let mut problems = Vec::new();
    let mut by_outcome: HashMap<String, usize> = HashMap::new();
    for (c, _) in &results {
        if let Err(p) = c.check_one_final() {
            problems.push(p);
            continue;
        }
        let key = match c.last() {
            Some(Reply::Chunk(ch)) => format!("{:?}", ch.finish_reason.expect("final")),
            Some(Reply::Error(e)) => format!("error:{}", e.error.code),
            None => "none".into(),
        };
        *by_outcome.entry(key).or_default() += 1;
    }
    eprintln!("storm outcomes (split: {split}): {by_outcome:?}");
    assert!(
        problems.is_empty(),
        "{} of {} streams broke the one-final rule; first: {:#?}",
        problems.len(),
        results.len(),
        &problems[..problems.len().min(5)]
    );
    // Errors are allowed only where the request asked for them (a timeout the engine could
    // not confirm in time); nothing may fail as `internal`.
    assert_eq!(by_outcome.get("error:internal"), None, "{by_outcome:?}");
    let aborted = by_outcome.get("Abort").copied().unwrap_or(0);
    assert!(
        aborted >= 64,
        "cancels had too little effect: {aborted} aborted of 256 cancelled ({by_outcome:?})"
    );
}

#[test]
fn a_request_that_cannot_be_sampled_fails_alone() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    // The poison's stop list covers the vocabulary: allow that many stop token ids.
    let mut serve = Serve::spawn(
        "engine",
        &nats.url(),
        dir.path(),
        &[],
        &[
            ("PAGODA_FAULT_INJECTION", "1"),
            ("PAGODA_LIMITS__MAX_STOP_TOKEN_IDS", "65536"),
        ],
    );
    serve.wait_for_log("serving");
    let rt = runtime();
    rt.block_on(async {
        let client = async_nats::connect(nats.url()).await.expect("connect");
        let prompts = [
            "The capital of France is",
            "Once upon a time",
            "The best way to learn Rust is",
            "def fibonacci(n):",
            "Water boils at",
            "My favourite colour is",
            "In 1969, astronauts",
            "The quick brown fox",
        ];
        let t = Duration::from_secs(120);
        let linger = Duration::from_millis(300);
        // Alone, one at a time.
        let mut alone = Vec::new();
        for (i, p) in prompts.iter().enumerate() {
            let mut req = greedy(&format!("alone-{i}"), p, 24);
            req.params.ignore_eos = true;
            let c = replies::request(&client, GENERATE, &req, t, linger).await;
            c.check_one_final().expect("a normal request");
            alone.push(c.token_ids());
        }
        // Together, with two poison requests in the middle of the batch: in one, every
        // token id is a stop token and at least one token must be generated, so nothing can
        // be sampled (the request's fault); the other's logits are NaN (the test-only fault
        // hook; the engine's fault).
        let mut poison = greedy("poison", "The capital of France is", 24);
        poison.params.min_tokens = 1;
        poison.params.stop_token_ids = (0..49152).collect();
        let nan = greedy("pagoda-fault:nan_logits", "The capital of France is", 24);
        let mut tasks = Vec::new();
        for (i, p) in prompts.iter().enumerate() {
            let c = client.clone();
            let mut req = greedy(&format!("batched-{i}"), p, 24);
            req.params.ignore_eos = true;
            tasks.push(tokio::spawn(async move {
                replies::request(&c, GENERATE, &req, t, linger).await
            }));
            if i == 3 {
                for bad in [poison.clone(), nan.clone()] {
                    let client = client.clone();
                    tasks.push(tokio::spawn(async move {
                        replies::request(&client, GENERATE, &bad, t, linger).await
                    }));
                }
            }
        }
        let mut got = Vec::new();
        for task in tasks {
            got.push(task.await.expect("task"));
        }
        let nan_poisoned = got.remove(5);
        nan_poisoned
            .check_one_final()
            .expect("the NaN request ends once");
        match nan_poisoned.last() {
            Some(Reply::Error(e)) => {
                assert_eq!(e.error.code, ErrorCode::Internal, "{e:?}");
                assert!(e.error.message.contains("logits"), "{e:?}");
            }
            other => panic!("the NaN request should fail, got {other:?}"),
        }
        let poisoned = got.remove(4);
        poisoned
            .check_one_final()
            .expect("the poison request ends once");
        match poisoned.last() {
            Some(Reply::Error(e)) => {
                assert_eq!(e.error.code, ErrorCode::InvalidRequest, "{e:?}");
                assert!(e.error.message.contains("no token"), "{e:?}");
            }
            other => panic!("the poison request should fail, got {other:?}"),
        }
        for (i, c) in got.iter().enumerate() {
            c.check_one_final().expect("a neighbour ends once");
            match c.last() {
                Some(Reply::Chunk(ch)) => {
                    assert_eq!(ch.finish_reason, Some(FinishReason::Length), "{ch:?}")
                }
                other => panic!("neighbour {i} failed: {other:?}"),
            }
            assert_eq!(
                c.token_ids(),
                alone[i],
                "neighbour {i} differs from its run alone"
            );
        }
        assert_idle_pool(&client).await;
    });
    serve.assert_alive();
}

#[test]
fn a_failed_forward_pass_ends_its_step_and_the_engine_goes_on() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut serve = Serve::spawn(
        "engine",
        &nats.url(),
        dir.path(),
        &[],
        &[("PAGODA_FAULT_INJECTION", "1")],
    );
    serve.wait_for_log("serving");
    let rt = runtime();
    rt.block_on(async {
        let client = async_nats::connect(nats.url()).await.expect("connect");
        let t = Duration::from_secs(60);
        let linger = Duration::from_millis(300);
        let mut tasks = Vec::new();
        for i in 0..3 {
            let c = client.clone();
            let mut req = greedy(&format!("running-{i}"), "Tell me a long story.", 300);
            req.params.ignore_eos = true;
            tasks.push(tokio::spawn(async move {
                replies::request(&c, GENERATE, &req, t, linger).await
            }));
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
        let c = client.clone();
        let bad = greedy("pagoda-fault:forward_error", "Hello", 8);
        tasks.push(tokio::spawn(async move {
            replies::request(&c, GENERATE, &bad, t, linger).await
        }));
        for task in tasks {
            let got = task.await.expect("task");
            got.check_one_final().expect("ends once");
            match got.last() {
                Some(Reply::Error(e)) => {
                    assert_eq!(e.error.code, ErrorCode::Internal, "{}: {e:?}", got.id);
                    assert!(e.error.message.contains("forward pass"), "{e:?}");
                }
                other => panic!("{} should fail with its step: {other:?}", got.id),
            }
        }
        // The engine goes on.
        let after =
            replies::request(&client, GENERATE, &greedy("after", "Hello", 8), t, linger).await;
        after.check_one_final().expect("ends once");
        assert!(
            matches!(after.last(), Some(Reply::Chunk(c)) if c.finish_reason.is_some()),
            "{:?}",
            after.last()
        );
        assert_idle_pool(&client).await;
    });
    serve.assert_alive();
}
