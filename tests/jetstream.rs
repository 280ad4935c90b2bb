//! Durable intake end to end: a real nats-server with JetStream, real `pagoda serve
//! --intake jetstream` processes, and requests through `pagoda::client`'s durable publish.
//!
//! - restart: jobs published while no engine runs are all answered once one starts;
//! - crash: two engines, 64 requests in flight, one engine SIGKILLed → every request is
//!   answered exactly once (the client drops the partial output of the killed attempt)
//!   and the stream is empty afterwards. Prints the recovery time from the kill to the
//!   first chunk of a redelivered job;
//! - poison: with `max_deliver = 1`, the engine running a job is killed → the client gets
//!   error code `failed`, the job lands on `<prefix>.dead`, and the stream is empty;
//! - invalid jobs: a job without `reply_to`, an unreadable one, and a malformed one with a
//!   readable `reply_to` are terminated (never redelivered, even after `ack_wait`), counted,
//!   not dead-lettered; the malformed one gets `invalid_request`; a good job after them is
//!   answered.

mod common;
#[path = "common/nats.rs"]
mod nats_server;
#[path = "common/process.rs"]
mod serve_process;

use std::collections::HashMap;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use nats_server::NatsServer;
use pagoda::client::{Client, Completion};
use pagoda::config::IntakeConfig;
use pagoda_actors::protocol::WireRequest;
use serve_process::Serve;

/// How long all requests of a test may take.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(120);
/// Short, so that the jobs of a killed engine come back fast.
const ACK_WAIT_MS: u64 = 2000;
const MAX_TOKENS: u32 = 16;
const PREFIX: &str = "pagoda.v1";

/// The engines load a model each: run the tests one at a time on small machines.
static SERIAL: Mutex<()> = Mutex::new(());

/// A `pagoda serve --intake jetstream` process (see `common/process.rs`).
type Engine = Serve;

/// Engine `name` with a small KV pool, this file's `ack_wait`, `max_in_flight`
/// concurrent jobs and `env` on top.
fn spawn_engine(
    name: &str,
    url: &str,
    dir: &std::path::Path,
    max_in_flight: usize,
    env: &[(&str, &str)],
) -> Engine {
    let ack_wait = ACK_WAIT_MS.to_string();
    let in_flight = max_in_flight.to_string();
    let mut all = vec![
        ("PAGODA_CACHE__NUM_BLOCKS", "128"),
        ("PAGODA_INTAKE__ACK_WAIT_MS", ack_wait.as_str()),
        ("PAGODA_INTAKE__MAX_IN_FLIGHT", in_flight.as_str()),
    ];
    all.extend_from_slice(env);
    Serve::spawn(name, url, dir, &["--intake", "jetstream"], &all)
}

/// Waits until the engine pulls jobs; panics with its log when it exits or hangs.
fn wait_ready(engine: &mut Engine) {
    engine.wait_for_log("pulling jobs");
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

fn intake_config() -> IntakeConfig {
    IntakeConfig {
        ack_wait_ms: ACK_WAIT_MS,
        ..IntakeConfig::default()
    }
}

fn job(i: usize) -> WireRequest {
    let mut req = WireRequest::text(format!("Request number {i}: the capital of France is"));
    req.id = Some(format!("job-{i}"));
    req.params.max_tokens = MAX_TOKENS;
    req.params.temperature = 0.0;
    req.params.ignore_eos = true;
    req
}

/// Messages left in the jobs stream, once it settles (acks are asynchronous).
async fn wait_stream_empty(nats: &async_nats::Client) -> u64 {
    let js = async_nats::jetstream::new(nats.clone());
    let name = IntakeConfig::default().stream.name;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut stream = js.get_stream(&name).await.expect("the jobs stream exists");
        let left = stream.info().await.expect("stream info").state.messages;
        if left == 0 || Instant::now() > deadline {
            return left;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn check_completion(c: &Completion, id: &str) {
    assert_eq!(c.id, id);
    assert_eq!(
        c.token_ids.len(),
        MAX_TOKENS as usize,
        "{id}: exactly one attempt's tokens: {c:?}"
    );
    assert_eq!(c.usage.completion_tokens, MAX_TOKENS, "{id}: {c:?}");
}

#[test]
fn jobs_published_before_any_engine_are_all_answered() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let rt = runtime();
    let client = rt.block_on(async {
        let client = Client::connect(&nats.url()).await.expect("connect");
        // The stream outlives engines; here no engine ever ran, so create it as one would.
        pagoda::intake::setup(client.nats(), PREFIX, &intake_config())
            .await
            .expect("create the jobs stream");
        client
    });
    let generations = rt.block_on(async {
        let mut gens = Vec::new();
        for i in 0..20 {
            gens.push(client.generate_durable(job(i)).await.expect("publish"));
        }
        gens
    });

    let mut engine = spawn_engine("engine", &nats.url(), dir.path(), 64, &[]);
    wait_ready(&mut engine);
    rt.block_on(async {
        let answers = futures_util::future::join_all(
            generations
                .into_iter()
                .map(|g| tokio::time::timeout(ANSWER_TIMEOUT, g.collect_text())),
        )
        .await;
        for (i, a) in answers.into_iter().enumerate() {
            let c = a
                .unwrap_or_else(|_| panic!("job {i} not answered; log:\n{}", engine.log()))
                .unwrap_or_else(|e| panic!("job {i}: {e}; log:\n{}", engine.log()));
            check_completion(&c, &format!("job-{i}"));
            assert_eq!(c.attempt, 1);
        }
        assert_eq!(wait_stream_empty(client.nats()).await, 0, "jobs left");
    });
}

#[test]
fn killing_an_engine_loses_no_request() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().expect("a temporary directory");
    // 16 jobs each at most, so both engines hold work when one dies.
    let mut a = spawn_engine("engine-a", &nats.url(), dir.path(), 16, &[]);
    let mut b = spawn_engine("engine-b", &nats.url(), dir.path(), 16, &[]);
    wait_ready(&mut a);
    wait_ready(&mut b);
    let rt = runtime();
    let client = rt.block_on(async {
        Client::connect(&nats.url())
            .await
            .expect("connect")
            .with_idle_timeout(Duration::from_secs(60))
    });

    const N: usize = 64;
    let first_chunk = Arc::new(tokio::sync::Notify::new());
    let first_redelivered: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
    let tasks: Vec<_> = rt.block_on(async {
        let mut tasks = Vec::new();
        for i in 0..N {
            let mut gen = client.generate_durable(job(i)).await.expect("publish");
            let first_chunk = first_chunk.clone();
            let first_redelivered = first_redelivered.clone();
            tasks.push(tokio::spawn(async move {
                // What the application sees, attempt by attempt (collect_text does the same).
                let mut text = String::new();
                let mut ids = Vec::new();
                let mut attempt = 0;
                let mut attempts_seen = Vec::new();
                while let Some(chunk) = gen.next().await {
                    let chunk = chunk?;
                    first_chunk.notify_one();
                    if chunk.attempt != attempt {
                        attempt = chunk.attempt;
                        attempts_seen.push(attempt);
                        text.clear();
                        ids.clear();
                        if attempt > 1 {
                            let mut t = first_redelivered.lock().expect("lock");
                            t.get_or_insert_with(Instant::now);
                        }
                    }
                    text.push_str(&chunk.text);
                    ids.extend_from_slice(&chunk.token_ids);
                    if chunk.finish_reason.is_some() {
                        return Ok::<_, pagoda::client::ClientError>((
                            chunk.id,
                            ids,
                            chunk.usage.unwrap_or_default().completion_tokens,
                            attempts_seen,
                        ));
                    }
                }
                Err(pagoda::client::ClientError::Closed)
            }));
        }
        tasks
    });

    // Kill one engine once generation is under way.
    rt.block_on(async {
        tokio::time::timeout(ANSWER_TIMEOUT, first_chunk.notified())
            .await
            .expect("a first chunk");
    });
    let killed_at = Instant::now();
    a.kill();

    rt.block_on(async {
        let mut answered: HashMap<String, usize> = HashMap::new();
        let mut redelivered = 0;
        for (i, t) in tasks.into_iter().enumerate() {
            let r = tokio::time::timeout(ANSWER_TIMEOUT, t)
                .await
                .unwrap_or_else(|_| panic!("job {i} not answered; b's log:\n{}", b.log()))
                .expect("the task")
                .unwrap_or_else(|e| panic!("job {i}: {e}; b's log:\n{}", b.log()));
            let (id, ids, completion_tokens, attempts) = r;
            assert_eq!(id, format!("job-{i}"));
            assert_eq!(ids.len(), MAX_TOKENS as usize, "{id}: one attempt's tokens");
            assert_eq!(completion_tokens, MAX_TOKENS);
            if attempts.last().copied().unwrap_or(1) > 1 {
                redelivered += 1;
            }
            *answered.entry(id).or_default() += 1;
        }
        assert_eq!(answered.len(), N);
        assert!(answered.values().all(|&n| n == 1));
        assert!(
            redelivered > 0,
            "the killed engine held jobs; some must have been redelivered"
        );
        let recovery = first_redelivered
            .lock()
            .expect("lock")
            .map(|t| t.duration_since(killed_at));
        eprintln!(
            "crash test: {N} answered once each, {redelivered} after a redelivery; \
             engine kill → first chunk of a redelivered job: {recovery:?} (ack_wait {ACK_WAIT_MS} ms)"
        );
        assert_eq!(wait_stream_empty(client.nats()).await, 0, "jobs left");
    });
}

#[test]
fn a_job_whose_engines_all_die_is_a_dead_letter() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let env = [
        ("PAGODA_INTAKE__MAX_DELIVER", "1"),
        ("RUST_LOG", "info,pagoda::request=debug"),
    ];
    let mut engines = [
        spawn_engine("engine-a", &nats.url(), dir.path(), 16, &env),
        spawn_engine("engine-b", &nats.url(), dir.path(), 16, &env),
    ];
    for e in engines.iter_mut() {
        wait_ready(e);
    }
    let rt = runtime();
    rt.block_on(async {
        let client = Client::connect(&nats.url())
            .await
            .expect("connect")
            .with_idle_timeout(Duration::from_secs(30));
        let mut dead = client
            .nats()
            .subscribe(IntakeConfig::dead_subject(PREFIX))
            .await
            .expect("subscribe to the dead letters");
        let mut req = job(0);
        req.id = Some("poison".into());
        req.params.max_tokens = 1500;
        let mut gen = client.generate_durable(req).await.expect("publish");
        let first = tokio::time::timeout(ANSWER_TIMEOUT, gen.next())
            .await
            .expect("a first chunk")
            .expect("a chunk")
            .expect("not an error");
        assert_eq!(first.attempt, 1);
        // Kill the engine that runs it.
        let holder = engines
            .iter()
            .position(|e| e.log().contains("poison"))
            .expect("an engine logged the job");
        engines[holder].kill();
        let end = loop {
            match tokio::time::timeout(ANSWER_TIMEOUT, gen.next()).await {
                Ok(Some(Ok(c))) => assert_eq!(c.attempt, 1, "no redelivery with max_deliver 1"),
                Ok(Some(Err(e))) => break e,
                Ok(None) => panic!("the stream ended without an error"),
                Err(_) => panic!("no answer; logs:\n{}", engines[1 - holder].log()),
            }
        };
        match end {
            pagoda::client::ClientError::Server { code, .. } => {
                assert_eq!(code, pagoda_actors::protocol::ErrorCode::Failed, "{end}")
            }
            other => panic!(
                "expected a failed error, got {other}; log:\n{}",
                engines[1 - holder].log()
            ),
        }
        let letter = tokio::time::timeout(Duration::from_secs(10), dead.next())
            .await
            .expect("a dead letter")
            .expect("the subscription");
        let headers = letter.headers.expect("dead letter headers");
        assert!(headers.get(pagoda::intake::DEAD_REASON_HEADER).is_some());
        assert_eq!(
            headers
                .get(pagoda::client::MSG_ID_HEADER)
                .map(|v| v.as_str().to_owned()),
            Some("poison".to_owned())
        );
        assert_eq!(wait_stream_empty(client.nats()).await, 0, "jobs left");
    });
}

/// The gateway's counters, from the micro service's `$SRV.STATS` (one engine).
async fn gateway_stats(nats: &async_nats::Client) -> serde_json::Value {
    let msg = tokio::time::timeout(
        Duration::from_secs(10),
        nats.request("$SRV.STATS.pagoda", "".into()),
    )
    .await
    .expect("$SRV.STATS answered in time")
    .expect("$SRV.STATS");
    let v: serde_json::Value = serde_json::from_slice(&msg.payload).expect("stats JSON");
    v["endpoints"][0]["data"].clone()
}

fn counter(stats: &serde_json::Value, key: &str) -> u64 {
    stats[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {key} in {stats}"))
}

#[test]
fn jobs_without_reply_to_or_unreadable_are_terminated_not_redelivered() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let mut engine = spawn_engine("engine", &nats.url(), dir.path(), 16, &[]);
    wait_ready(&mut engine);
    let rt = runtime();
    rt.block_on(async {
        let client = Client::connect(&nats.url())
            .await
            .expect("connect")
            .with_idle_timeout(Duration::from_secs(30));
        let raw = client.nats().clone();
        let js = async_nats::jetstream::new(raw.clone());
        let mut dead = raw
            .subscribe(IntakeConfig::dead_subject(PREFIX))
            .await
            .expect("subscribe to the dead letters");
        // The server announces each terminated message (AckKind::Term) in an advisory.
        let mut terminated = raw
            .subscribe(format!(
                "$JS.EVENT.ADVISORY.CONSUMER.MSG_TERMINATED.{}.{}",
                IntakeConfig::default().stream.name,
                IntakeConfig::default().durable_name
            ))
            .await
            .expect("subscribe to the terminated advisories");
        raw.flush().await.expect("flush");
        let before = gateway_stats(&raw).await;
        let publish = |id: &'static str, body: Vec<u8>, content_type: &'static str| {
            let js = js.clone();
            async move {
                let mut headers = async_nats::HeaderMap::new();
                headers.insert(pagoda::client::MSG_ID_HEADER, id);
                headers.insert("Content-Type", content_type);
                js.publish_with_headers(IntakeConfig::jobs_subject(PREFIX), headers, body.into())
                    .await
                    .expect("publish")
                    .await
                    .expect("the stream stored the job")
            }
        };

        // 1. A valid request, but no reply_to: nothing can be answered.
        let mut no_reply = job(0);
        no_reply.id = Some("no-reply-to".into());
        assert!(no_reply.reply_to.is_none());
        let body = pagoda_actors::protocol::WireFormat::MsgPack
            .encode(&no_reply)
            .expect("encode");
        publish("no-reply-to", body, "application/msgpack").await;
        // 2. Not MessagePack at all (0xc1 is never used): unreadable, no reply_to.
        publish(
            "unreadable",
            vec![0xc1, 0xc1, 0x00, 0xff],
            "application/msgpack",
        )
        .await;
        // 3. Malformed (a number as the prompt), with a reply_to that can still be read:
        //    the typed error goes there.
        let inbox = raw.new_inbox();
        let mut errors = raw.subscribe(inbox.clone()).await.expect("subscribe");
        let body = serde_json::to_vec(&serde_json::json!({
            "id": "malformed",
            "prompt": 42,
            "reply_to": inbox,
        }))
        .expect("json");
        publish("malformed", body, "application/json").await;
        let msg = tokio::time::timeout(ANSWER_TIMEOUT, errors.next())
            .await
            .expect("an error reply to the malformed job")
            .expect("the subscription");
        let reply = pagoda_actors::protocol::decode_reply(
            &msg.payload,
            pagoda_actors::protocol::WireFormat::Json,
        )
        .expect("a reply");
        match reply {
            pagoda_actors::protocol::Reply::Error(e) => {
                assert_eq!(
                    e.error.code,
                    pagoda_actors::protocol::ErrorCode::InvalidRequest,
                    "{e:?}"
                );
                assert_eq!(e.id.as_deref(), Some("malformed"));
                assert_eq!(e.attempt, 1);
            }
            other => panic!("expected invalid_request, got {other:?}"),
        }

        // 4. The engine keeps serving: a good job after them is answered.
        let good = client
            .generate_durable(job(1))
            .await
            .expect("publish a good job");
        let c = tokio::time::timeout(ANSWER_TIMEOUT, good.collect_text())
            .await
            .unwrap_or_else(|_| panic!("the good job was not answered; log:\n{}", engine.log()))
            .unwrap_or_else(|e| panic!("the good job: {e}; log:\n{}", engine.log()));
        check_completion(&c, "job-1");
        assert_eq!(c.attempt, 1);

        // 5. Past ack_wait (and then some), nothing came back: a job that was not
        //    terminated would have been redelivered by now, and counted again.
        tokio::time::sleep(Duration::from_millis(ACK_WAIT_MS * 2 + 500)).await;
        let mut consumer: async_nats::jetstream::consumer::PullConsumer = js
            .get_stream(IntakeConfig::default().stream.name)
            .await
            .expect("the jobs stream")
            .get_consumer(&IntakeConfig::default().durable_name)
            .await
            .expect("the durable consumer");
        let info = consumer.info().await.expect("consumer info").clone();
        assert_eq!(
            info.delivered.stream_sequence, 4,
            "all four jobs delivered: {info:?}"
        );
        assert_eq!(info.num_redelivered, 0, "a job came back: {info:?}");
        assert_eq!(
            info.num_ack_pending, 0,
            "a job is still unsettled: {info:?}"
        );
        assert_eq!(info.num_pending, 0, "a job was not delivered: {info:?}");
        assert_eq!(info.ack_floor.stream_sequence, 4, "{info:?}");
        assert_eq!(wait_stream_empty(&raw).await, 0, "jobs left in the stream");

        // Counted as documented: the two without a reply subject in no_reply_subject, each
        // job received once (no redelivery), the unreadable and the malformed as
        // invalid_request errors.
        let after = gateway_stats(&raw).await;
        assert_eq!(
            counter(&after, "no_reply_subject") - counter(&before, "no_reply_subject"),
            2,
            "before {before}, after {after}"
        );
        assert_eq!(
            counter(&after, "received") - counter(&before, "received"),
            4,
            "each job once: before {before}, after {after}"
        );
        assert_eq!(
            after["errors_by_code"]["invalid_request"]
                .as_u64()
                .unwrap_or(0)
                - before["errors_by_code"]["invalid_request"]
                    .as_u64()
                    .unwrap_or(0),
            2,
            "before {before}, after {after}"
        );
        // Terminated, not merely acked: one advisory for each of the three invalid jobs
        // (stream sequences 1, 2, 3), none for the good one.
        let mut terms = Vec::new();
        while let Ok(Some(msg)) =
            tokio::time::timeout(Duration::from_millis(500), terminated.next()).await
        {
            let adv: serde_json::Value =
                serde_json::from_slice(&msg.payload).expect("advisory JSON");
            terms.push(adv["stream_seq"].as_u64().expect("stream_seq"));
        }
        terms.sort_unstable();
        assert_eq!(terms, vec![1, 2, 3], "terminated jobs (stream sequences)");
        // Invalid jobs are not dead letters (those are jobs that failed every delivery).
        let letter = tokio::time::timeout(Duration::from_millis(200), dead.next()).await;
        assert!(
            letter.is_err(),
            "an invalid job was dead-lettered: {letter:?}"
        );
        let log = engine.log();
        assert!(
            log.contains("neither a reply subject nor reply_to"),
            "the job without reply_to was not logged:\n{log}"
        );
        assert!(
            log.contains("an unreadable request without a reply subject"),
            "the unreadable job was not logged:\n{log}"
        );
    });
    engine.kill();
}

#[test]
fn sigterm_hands_unfinished_jobs_to_the_other_engine() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().expect("a temporary directory");
    // A short drain, so that the stopping engine gives jobs back rather than finishing all.
    let env = [("PAGODA_NATS__DRAIN_TIMEOUT_MS", "300")];
    let mut a = spawn_engine("engine-a", &nats.url(), dir.path(), 16, &env);
    let mut b = spawn_engine("engine-b", &nats.url(), dir.path(), 16, &env);
    wait_ready(&mut a);
    wait_ready(&mut b);
    const N: usize = 32;
    const LONG: u32 = 64;
    let rt = runtime();
    rt.block_on(async {
        let client = Client::connect(&nats.url())
            .await
            .expect("connect")
            .with_idle_timeout(Duration::from_secs(60));
        let mut gens = Vec::new();
        for i in 0..N {
            let mut req = job(i);
            req.params.max_tokens = LONG;
            gens.push(client.generate_durable(req).await.expect("publish"));
        }
        // Wait for the first chunk of any job, then SIGTERM engine a.
        let mut first = gens.remove(0);
        let head = tokio::time::timeout(ANSWER_TIMEOUT, first.next())
            .await
            .expect("a first chunk")
            .expect("a chunk")
            .expect("not an error");
        let pid = a.child.id().to_string();
        let status = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("run kill");
        assert!(status.success());
        // The first generation continues where it is (or restarts on a higher attempt).
        let mut rest = vec![tokio::spawn(async move {
            let mut ids = head.token_ids.clone();
            let mut attempt = head.attempt;
            while let Some(c) = first.next().await {
                let c = c?;
                if c.attempt != attempt {
                    attempt = c.attempt;
                    ids.clear();
                }
                ids.extend_from_slice(&c.token_ids);
                if c.finish_reason.is_some() {
                    return Ok((c.id, ids.len()));
                }
            }
            Err(pagoda::client::ClientError::Closed)
        })];
        for g in gens {
            rest.push(tokio::spawn(async move {
                let c = g.collect_text().await?;
                Ok((c.id, c.token_ids.len()))
            }));
        }
        let mut seen = HashMap::new();
        for t in rest {
            let (id, n) = tokio::time::timeout(ANSWER_TIMEOUT, t)
                .await
                .expect("answered in time")
                .expect("the task")
                .unwrap_or_else(|e| panic!("{e}; a's log:\n{}", a.log()));
            assert_eq!(n, LONG as usize, "{id}: one attempt's tokens");
            *seen.entry(id).or_insert(0) += 1;
        }
        assert_eq!(seen.len(), N);
        assert_eq!(wait_stream_empty(client.nats()).await, 0, "jobs left");
    });
    let t0 = Instant::now();
    let status = loop {
        if let Ok(Some(s)) = a.child.try_wait() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "engine a did not exit after SIGTERM; log:\n{}",
            a.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        status.success(),
        "engine a exited with {status}; log:\n{}",
        a.log()
    );
    let log = a.log();
    assert!(log.contains("stopped pulling jobs"), "{log}");
    eprintln!(
        "sigterm test: engine a gave back {} running jobs after its drain timeout",
        log.matches("giving it back for another attempt").count()
    );
}

/// Durable vs core throughput at 32 concurrent requests on one engine (which serves both
/// intakes). A measurement, not a check: `cargo test --release --test jetstream --
/// --ignored --nocapture`.
#[test]
#[ignore]
fn durable_vs_core_throughput() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let mut engine = spawn_engine(
        "engine",
        &nats.url(),
        dir.path(),
        64,
        &[("PAGODA_CACHE__NUM_BLOCKS", "1024")],
    );
    wait_ready(&mut engine);
    const C: usize = 32;
    const TOKENS: u32 = 64;
    let rt = runtime();
    rt.block_on(async {
        let client = Client::connect(&nats.url()).await.expect("connect");
        for (round, durable) in [(0, false), (1, false), (2, true), (3, false), (4, true)] {
            let t0 = Instant::now();
            let mut tasks = Vec::new();
            for i in 0..C {
                let mut req = job(i);
                req.id = Some(format!("r{round}-{i}"));
                req.params.max_tokens = TOKENS;
                let client = client.clone();
                tasks.push(tokio::spawn(async move {
                    let g = if durable {
                        client.generate_durable(req).await?
                    } else {
                        client.generate(req).await?
                    };
                    g.collect_text().await
                }));
            }
            let mut tokens = 0;
            for t in tasks {
                tokens += t.await.expect("task").expect("answer").token_ids.len();
            }
            let secs = t0.elapsed().as_secs_f64();
            eprintln!(
                "round {round} ({}): {tokens} tokens in {secs:.2} s = {:.0} tok/s",
                if durable { "jetstream" } else { "core" },
                tokens as f64 / secs
            );
        }
    });
}
