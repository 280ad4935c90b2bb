//! End-to-end tests of the NATS front door: a real nats-server (tests/common/nats.rs), the
//! engine and `pagoda::gateway::serve` in this process, and `pagoda::client` (or raw NATS
//! messages) on the other side.

mod common;
#[path = "common/nats.rs"]
mod nats_server;

use std::time::Duration;

use async_nats::HeaderMap;
use futures_util::StreamExt;
use nats_server::NatsServer;
use pagoda::client::{Client, ClientError, Completion};
use pagoda::config::NatsConfig;
use pagoda::gateway::{GatewayConfig, GatewayStats};
use pagoda_actors::engine::Engine;
use pagoda_actors::messages::FinishReason;
use pagoda_actors::protocol::{decode_reply, Chunk, ErrorCode, Reply, WireFormat, WireRequest};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const PREFIX: &str = "pagoda.v1";
const T: Duration = Duration::from_secs(60);

/// An engine served on a test nats-server.
struct Served {
    engine: Engine,
    client: Client,
    /// A plain NATS connection for raw messages.
    raw: async_nats::Client,
    stop: Option<oneshot::Sender<()>>,
    gateway: JoinHandle<std::sync::Arc<GatewayStats>>,
}

fn nats_config(url: &str) -> NatsConfig {
    NatsConfig {
        url: url.to_owned(),
        max_reconnect_delay_ms: 200,
        drain_timeout_ms: 5000,
        ..NatsConfig::default()
    }
}

/// Starts the engine and the gateway (inside `common::run`), and waits until the generate
/// endpoint is listed by `$SRV.INFO.pagoda`.
async fn serve(url: &str) -> Served {
    let engine = common::start(&common::test_config());
    let cfg = nats_config(url);
    let nats = pagoda::nats::connect(&cfg, pagoda::nats::InitialConnect::FailFast)
        .await
        .expect("gateway connects");
    let (stop, stopped) = oneshot::channel::<()>();
    let gateway = tokio::task::spawn_local(pagoda::gateway::serve(
        engine.clone(),
        nats,
        GatewayConfig::from(&cfg),
        async move {
            let _ = stopped.await;
        },
    ));
    let gateway = tokio::task::spawn_local(async move {
        gateway
            .await
            .expect("gateway task")
            .expect("gateway serves")
    });
    let raw = async_nats::connect(url).await.expect("raw client connects");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(Ok(msg)) = tokio::time::timeout(
            Duration::from_secs(1),
            raw.request("$SRV.INFO.pagoda", "".into()),
        )
        .await
        {
            let info: serde_json::Value = serde_json::from_slice(&msg.payload).unwrap();
            if info["endpoints"].as_array().is_some_and(|e| !e.is_empty()) {
                break;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the gateway did not come up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let client = Client::connect_with(&cfg)
        .await
        .expect("client connects")
        .with_idle_timeout(Duration::from_secs(20));
    Served {
        engine,
        client,
        raw,
        stop: Some(stop),
        gateway,
    }
}

impl Served {
    async fn shutdown(mut self) -> std::sync::Arc<GatewayStats> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(T, self.gateway)
            .await
            .expect("the gateway stops")
            .expect("gateway task")
    }
}

fn greedy(prompt: &str, max_tokens: u32) -> WireRequest {
    let mut req = WireRequest::text(prompt);
    req.params = common::greedy(max_tokens);
    req
}

/// Reads a generation to its end, checking the chunk order: seq 0, 1, 2, … and exactly one
/// final chunk, last.
async fn read_all(
    client: &Client,
    req: WireRequest,
) -> Result<(Vec<Chunk>, Completion), ClientError> {
    let mut answer = client.generate(req).await?;
    let mut chunks = Vec::new();
    while let Some(c) = tokio::time::timeout(T, answer.next())
        .await
        .expect("a generation hung")
    {
        chunks.push(c?);
    }
    for (i, c) in chunks.iter().enumerate() {
        assert_eq!(
            c.seq, i as u64,
            "seq out of order or with a gap: {chunks:?}"
        );
        assert_eq!(c.attempt, 1);
        assert_eq!(
            c.is_final(),
            i + 1 == chunks.len(),
            "one final chunk, last: {chunks:?}"
        );
    }
    let last = chunks.last().expect("at least one chunk").clone();
    let completion = Completion {
        id: last.id.clone(),
        text: chunks.iter().map(|c| c.text.as_str()).collect(),
        token_ids: chunks.iter().flat_map(|c| c.token_ids.clone()).collect(),
        finish_reason: last.finish_reason.expect("final"),
        usage: last.usage.expect("usage on the final chunk"),
        timings: last.timings.expect("timings on the final chunk"),
        num_chunks: chunks.len() as u64,
        attempt: last.attempt,
        logprobs: None,
        prompt_logprobs: None,
        cumulative_logprob: None,
        index: 0,
    };
    Ok((chunks, completion))
}

/// Publishes a raw body (optionally with headers) and returns the replies up to the final
/// one.
async fn raw_request(
    raw: &async_nats::Client,
    body: Vec<u8>,
    headers: Option<HeaderMap>,
) -> Vec<(Reply, WireFormat)> {
    let inbox = raw.new_inbox();
    let mut sub = raw.subscribe(inbox.clone()).await.unwrap();
    let subject = format!("{PREFIX}.generate");
    match headers {
        Some(h) => {
            raw.publish_with_reply_and_headers(subject, inbox, h, body.into())
                .await
        }
        None => raw.publish_with_reply(subject, inbox, body.into()).await,
    }
    .unwrap();
    let mut out = Vec::new();
    loop {
        let msg = tokio::time::timeout(T, sub.next())
            .await
            .expect("no reply (hang?)")
            .expect("subscription open");
        let format = pagoda::gateway::message_format(msg.headers.as_ref(), &msg.payload);
        let reply = decode_reply(&msg.payload, format).expect("a well-formed reply");
        let last = reply.is_final();
        out.push((reply, format));
        if last {
            return out;
        }
    }
}

fn json_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("Content-Type", "application/json");
    h
}

fn error_code(replies: &[(Reply, WireFormat)]) -> ErrorCode {
    match replies.last() {
        Some((Reply::Error(e), _)) => e.error.code,
        other => panic!("expected an error reply, got {other:?}"),
    }
}

#[test]
fn concurrent_requests_match_in_process_generation() {
    let server = NatsServer::start();
    common::run(async {
        let s = serve(&server.url()).await;
        let prompts: Vec<String> = (0..32)
            .map(|i| format!("Question {i}: what is {i} plus {i}?"))
            .collect();
        let max_tokens = 16;
        // In-process reference, one request at a time.
        let mut expected = Vec::new();
        for (i, p) in prompts.iter().enumerate() {
            let req = common::text_request(format!("ref-{i}"), p, common::greedy(max_tokens));
            expected.push(common::generate(&s.engine, req).await);
        }
        // 32 at once over NATS.
        let results = futures_util::future::join_all(
            prompts
                .iter()
                .map(|p| read_all(&s.client, greedy(p, max_tokens))),
        )
        .await;
        for ((res, want), p) in results.into_iter().zip(&expected).zip(&prompts) {
            let (chunks, got) = res.unwrap_or_else(|e| panic!("{p}: {e}"));
            assert!(chunks.len() > 1, "streamed in several chunks");
            assert_eq!(got.finish_reason, FinishReason::Length);
            assert_eq!(got.usage.completion_tokens, max_tokens);
            assert_eq!(got.token_ids, want.token_ids, "{p}");
            assert_eq!(got.text, want.text, "{p}");
        }

        // stream: false → one message with the whole answer; JSON in, JSON out.
        let mut req = greedy(&prompts[3], max_tokens);
        req.stream = false;
        let (chunks, got) = read_all(&s.client, req.clone()).await.unwrap();
        assert_eq!(chunks.len(), 1);
        assert_eq!(got.text, expected[3].text);
        let json_client = s.client.clone().with_format(WireFormat::Json);
        let (_, got) = read_all(&json_client, greedy(&prompts[5], max_tokens))
            .await
            .unwrap();
        assert_eq!(got.text, expected[5].text);
        let replies = raw_request(
            &s.raw,
            serde_json::to_vec(&req).unwrap(),
            Some(json_headers()),
        )
        .await;
        assert_eq!(replies.len(), 1);
        assert_eq!(replies[0].1, WireFormat::Json, "answered in JSON");
        // The id is echoed; a chat request works.
        let mut chat = WireRequest::chat(vec![pagoda_actors::protocol::ChatMessage::new(
            "user",
            "What is the capital of France?",
        )]);
        chat.id = Some("chat-1".into());
        chat.params = common::greedy(8);
        let (_, got) = read_all(&s.client, chat).await.unwrap();
        assert_eq!(got.id, "chat-1");
        common::assert_pool_drained(&s.engine).await;
        let stats = s.shutdown().await;
        assert_eq!(
            stats.completed.load(std::sync::atomic::Ordering::Relaxed),
            36
        );
    });
}

#[test]
fn cancel_and_timeout_end_with_abort_and_free_the_blocks() {
    let server = NatsServer::start();
    common::run(async {
        let s = serve(&server.url()).await;
        // Cancel after a few chunks.
        let mut answer = s
            .client
            .generate(greedy("Tell me a very long story about dragons.", 1000))
            .await
            .unwrap();
        let mut n = 0;
        let mut last = None;
        while let Some(c) = tokio::time::timeout(T, answer.next()).await.expect("hang") {
            let c = c.unwrap();
            n += 1;
            if n == 3 {
                s.client.cancel(answer.id()).await.unwrap();
            }
            if c.is_final() {
                last = Some(c);
            }
        }
        let last = last.expect("a final chunk");
        assert_eq!(last.finish_reason, Some(FinishReason::Abort));
        let done = last.usage.unwrap().completion_tokens;
        assert!(
            (3..100).contains(&done),
            "stopped soon after the cancel: {done}"
        );
        common::assert_pool_drained(&s.engine).await;

        // A cancel with a reply subject is answered by the engine that had the request.
        let mut answer = s
            .client
            .generate(greedy("Another long story, please.", 1000))
            .await
            .unwrap();
        answer.next().await.unwrap().unwrap();
        let body = serde_json::json!({ "id": answer.id() }).to_string();
        let ack = s
            .raw
            .request_with_headers(format!("{PREFIX}.cancel"), json_headers(), body.into())
            .await
            .unwrap();
        let ack: serde_json::Value = serde_json::from_slice(&ack.payload).unwrap();
        assert_eq!(ack["cancelled"], true);
        let end = answer.collect_text().await.unwrap();
        assert_eq!(end.finish_reason, FinishReason::Abort);

        // timeout_ms: the same abort on expiry.
        let mut req = greedy("Tell me about the sea.", 1000);
        req.timeout_ms = Some(300);
        let (_, got) = read_all(&s.client, req).await.unwrap();
        assert_eq!(got.finish_reason, FinishReason::Abort);
        assert!(got.usage.completion_tokens < 1000);

        // A cancel that overtakes its request still aborts it.
        let mut req = greedy("Too late.", 50);
        req.id = Some("cancelled-first".into());
        s.client.cancel("cancelled-first").await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (_, got) = read_all(&s.client, req).await.unwrap();
        assert_eq!(got.finish_reason, FinishReason::Abort);
        assert_eq!(got.usage.completion_tokens, 0);

        common::assert_pool_drained(&s.engine).await;
        s.shutdown().await;
    });
}

#[test]
fn bad_input_gets_typed_errors_while_good_requests_are_served() {
    let conf = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(conf.path(), "max_payload: 8MB\n").unwrap();
    let server = NatsServer::start_with_args(&["-c", conf.path().to_str().unwrap()]);
    common::run(async {
        let s = serve(&server.url()).await;
        let mp = |v: serde_json::Value| rmp_serde::to_vec_named(&v).unwrap();
        let mut truncated = mp(serde_json::json!({"prompt": "hello", "max_tokens": 5}));
        truncated.truncate(truncated.len() - 3);
        let mut bad_utf8 = vec![0x81, 0xa6];
        bad_utf8.extend_from_slice(b"prompt");
        bad_utf8.extend_from_slice(&[0xa2, 0xff, 0xfe]);
        let random: Vec<u8> = (0..512u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let huge = "hello world ".repeat(5 * 1024 * 1024 / 12);
        let cases: Vec<(&str, Vec<u8>, Option<HeaderMap>, ErrorCode)> = vec![
            ("random bytes", random, None, ErrorCode::InvalidRequest),
            (
                "truncated msgpack",
                truncated,
                None,
                ErrorCode::InvalidRequest,
            ),
            (
                "msgpack array",
                mp(serde_json::json!([1, 2, 3])),
                None,
                ErrorCode::InvalidRequest,
            ),
            (
                "wrong shape",
                mp(serde_json::json!({"messages": "hi"})),
                None,
                ErrorCode::InvalidRequest,
            ),
            (
                "wrong type",
                mp(serde_json::json!({"prompt": "x", "max_tokens": "ten"})),
                None,
                ErrorCode::InvalidRequest,
            ),
            (
                "missing prompt",
                mp(serde_json::json!({"max_tokens": 3})),
                None,
                ErrorCode::InvalidRequest,
            ),
            (
                "max_tokens 0",
                mp(serde_json::json!({"prompt": "x", "max_tokens": 0})),
                None,
                ErrorCode::InvalidRequest,
            ),
            (
                "max_tokens 1e9",
                mp(serde_json::json!({"prompt": "x", "max_tokens": 1_000_000_000})),
                None,
                ErrorCode::InvalidRequest,
            ),
            (
                "temperature -1",
                mp(serde_json::json!({"prompt": "x", "temperature": -1.0})),
                None,
                ErrorCode::InvalidRequest,
            ),
            (
                "long prompt",
                mp(serde_json::json!({"prompt": "hello ".repeat(3000)})),
                None,
                ErrorCode::PromptTooLong,
            ),
            ("invalid utf-8", bad_utf8, None, ErrorCode::InvalidRequest),
            (
                "5 MB payload",
                mp(serde_json::json!({"prompt": huge})),
                None,
                ErrorCode::PromptTooLong,
            ),
            (
                "bad json",
                b"{\"prompt\": ".to_vec(),
                Some(json_headers()),
                ErrorCode::InvalidRequest,
            ),
            (
                "json wrong type",
                br#"{"prompt": "x", "top_k": -3}"#.to_vec(),
                Some(json_headers()),
                ErrorCode::InvalidRequest,
            ),
        ];
        // Each bad request is interleaved with a good one; all are in flight together.
        let good = |i: usize| read_all(&s.client, greedy(&format!("Good request {i}."), 8));
        let raw = &s.raw;
        let bad = cases
            .into_iter()
            .map(|(name, body, headers, code)| async move {
                let replies = raw_request(raw, body, headers.clone()).await;
                assert_eq!(error_code(&replies), code, "{name}: {replies:?}");
                if headers.is_some() {
                    assert_eq!(replies[0].1, WireFormat::Json, "{name}: answered in JSON");
                }
            });
        let goods = futures_util::future::join_all((0..14).map(good));
        let (goods, _) =
            futures_util::future::join(goods, futures_util::future::join_all(bad)).await;
        for g in goods {
            let (_, c) = g.expect("good requests are served");
            assert_eq!(c.finish_reason, FinishReason::Length);
        }
        // The id and reply_to of a malformed request are still used for its error.
        let inbox = "answers.bad-1";
        let mut sub = s.raw.subscribe(inbox).await.unwrap();
        let body = mp(serde_json::json!({"id": "bad-1", "reply_to": inbox, "prompt": 7}));
        s.raw
            .publish(format!("{PREFIX}.generate"), body.into())
            .await
            .unwrap();
        let msg = tokio::time::timeout(T, sub.next()).await.unwrap().unwrap();
        match decode_reply(&msg.payload, WireFormat::MsgPack).unwrap() {
            Reply::Error(e) => {
                assert_eq!(e.id.as_deref(), Some("bad-1"));
                assert_eq!(e.error.code, ErrorCode::InvalidRequest);
                assert!(e.error.message.contains("prompt"), "{}", e.error.message);
            }
            other => panic!("{other:?}"),
        }
        common::assert_pool_drained(&s.engine).await;
        s.shutdown().await;
    });
}

#[test]
fn micro_service_endpoints_answer() {
    let server = NatsServer::start();
    common::run(async {
        let s = serve(&server.url()).await;
        read_all(&s.client, greedy("Hello", 4)).await.unwrap();
        for subject in ["$SRV.PING", "$SRV.PING.pagoda"] {
            let msg = s.raw.request(subject, "".into()).await.unwrap();
            let v: serde_json::Value = serde_json::from_slice(&msg.payload).unwrap();
            assert_eq!(v["type"], "io.nats.micro.v1.ping_response");
            assert_eq!(v["name"], "pagoda");
            assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
        }
        let msg = s.raw.request("$SRV.INFO.pagoda", "".into()).await.unwrap();
        let v: serde_json::Value = serde_json::from_slice(&msg.payload).unwrap();
        assert_eq!(v["endpoints"][0]["name"], "generate");
        assert_eq!(v["endpoints"][0]["subject"], format!("{PREFIX}.generate"));
        assert_eq!(v["endpoints"][0]["queue_group"], "pagoda");
        assert!(!v["description"].as_str().unwrap_or("").is_empty());
        let msg = s.raw.request("$SRV.STATS.pagoda", "".into()).await.unwrap();
        let v: serde_json::Value = serde_json::from_slice(&msg.payload).unwrap();
        assert_eq!(v["endpoints"][0]["num_requests"], 1);
        assert_eq!(v["endpoints"][0]["data"]["completed"], 1);
        assert_eq!(v["endpoints"][0]["data"]["in_flight"], 0);
        s.shutdown().await;
    });
}

#[test]
fn server_restart_mid_load_every_request_ends_and_later_ones_succeed() {
    let server = NatsServer::start();
    common::run(async {
        let s = serve(&server.url()).await;
        let client = s.client.clone().with_idle_timeout(Duration::from_secs(5));
        let load = futures_util::future::join_all((0..8).map(|i| {
            let client = client.clone();
            async move {
                let answer = client
                    .generate(greedy(&format!("Story number {i}:"), 96))
                    .await;
                match answer {
                    Ok(a) => a.collect_text().await,
                    Err(e) => Err(e),
                }
            }
        }));
        let restart = async {
            tokio::time::sleep(Duration::from_millis(400)).await;
            tokio::task::spawn_blocking(move || {
                let mut server = server;
                server.restart();
                server
            })
            .await
            .expect("restart")
        };
        let (results, server) = tokio::time::timeout(Duration::from_secs(120), async {
            futures_util::future::join(load, restart).await
        })
        .await
        .expect("every request ends (final chunk or error), none hangs");
        for r in &results {
            match r {
                Ok(c) => assert!(matches!(
                    c.finish_reason,
                    FinishReason::Length | FinishReason::Abort
                )),
                Err(e) => assert!(
                    matches!(
                        e,
                        ClientError::Timeout(_)
                            | ClientError::Gap(_)
                            | ClientError::Closed
                            | ClientError::Nats(_)
                            | ClientError::NoResponders(_)
                    ),
                    "{e}"
                ),
            }
        }
        // After the reconnect, requests succeed again (retry while the connections come back).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            match read_all(&client, greedy("After the restart", 4)).await {
                Ok((_, c)) => {
                    assert_eq!(c.finish_reason, FinishReason::Length);
                    break;
                }
                Err(e) => {
                    assert!(tokio::time::Instant::now() < deadline, "no recovery: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        common::assert_pool_drained(&s.engine).await;
        s.shutdown().await;
        drop(server);
    });
}

#[test]
fn shutdown_lets_in_flight_requests_finish() {
    let server = NatsServer::start();
    common::run(async {
        let s = serve(&server.url()).await;
        let client = s.client.clone();
        let running = tokio::task::spawn_local(async move {
            let answers = futures_util::future::join_all(
                (0..4).map(|i| read_all(&client, greedy(&format!("Shutdown {i}"), 48))),
            )
            .await;
            answers
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        let Served {
            engine,
            client,
            stop,
            gateway,
            ..
        } = s;
        let _ = stop.expect("stop").send(());
        let answers = tokio::time::timeout(T, running)
            .await
            .expect("hang")
            .unwrap();
        for a in answers {
            let (_, c) = a.expect("in-flight requests finish");
            assert_eq!(c.finish_reason, FinishReason::Length);
            assert_eq!(c.usage.completion_tokens, 48);
        }
        tokio::time::timeout(T, gateway)
            .await
            .expect("gateway stops")
            .unwrap();
        // Nobody serves the subject any more.
        let err = read_all(&client, greedy("Too late", 4)).await.unwrap_err();
        assert!(matches!(err, ClientError::NoResponders(_)), "{err}");
        common::assert_pool_drained(&engine).await;
    });
}

#[test]
fn n_completions_are_streamed_with_their_index_and_gathered_per_index() {
    let server = NatsServer::start();
    common::run(async {
        let s = serve(&server.url()).await;
        let request = |stream: bool| {
            let mut req = WireRequest::text("List three colours:");
            req.params.temperature = 0.9;
            req.params.seed = Some(3);
            req.params.max_tokens = 10;
            req.params.ignore_eos = true;
            req.params.n = 3;
            req.stream = stream;
            req
        };
        // Streamed: one seq order across the request, every chunk names its completion,
        // each completion ends once, and the last chunk ends the request.
        let mut answer = s.client.generate(request(true)).await.expect("sent");
        let mut chunks = Vec::new();
        while let Some(c) = tokio::time::timeout(T, answer.next()).await.expect("hang") {
            chunks.push(c.expect("a chunk"));
        }
        let mut streamed: Vec<Vec<u32>> = vec![Vec::new(); 3];
        let mut finals = Vec::new();
        for (i, c) in chunks.iter().enumerate() {
            assert_eq!(c.seq, i as u64, "{chunks:?}");
            let index = c.index.expect("with n > 1 every chunk has an index") as usize;
            assert!(
                !finals.contains(&index),
                "a chunk after completion {index} ended"
            );
            streamed[index].extend_from_slice(&c.token_ids);
            if c.is_final() {
                assert_eq!(c.finish_reason, Some(FinishReason::Length));
                assert_eq!(c.usage.expect("usage").completion_tokens, 10);
                finals.push(index);
            }
        }
        finals.sort();
        assert_eq!(finals, vec![0, 1, 2]);
        assert!(chunks.last().expect("chunks").is_final());

        // Gathered (stream: false): one final chunk per completion, the same tokens (the
        // seeds make each index reproducible).
        let all = s
            .client
            .generate(request(false))
            .await
            .expect("sent")
            .collect_all()
            .await
            .expect("answered");
        assert_eq!(all.len(), 3);
        for (i, c) in all.into_iter().enumerate() {
            let c = c.expect("a completion");
            assert_eq!((c.index as usize, c.num_chunks), (i, 1));
            assert_eq!(c.token_ids, streamed[i], "index {i}");
        }
        assert!(streamed[0] != streamed[1] || streamed[1] != streamed[2]);

        // A bad n is one typed error for the whole request.
        let mut bad = request(true);
        bad.params.n = 0;
        match s
            .client
            .generate(bad)
            .await
            .expect("sent")
            .collect_all()
            .await
        {
            Err(ClientError::Server { code, message }) => {
                assert_eq!(code, ErrorCode::InvalidRequest);
                assert!(message.contains("n must be"), "{message}");
            }
            other => panic!("expected invalid_request, got {other:?}"),
        }
        common::assert_pool_drained(&s.engine).await;
        s.shutdown().await;
    });
}
