//! 10,000 seeded malformed messages against a live `pagoda serve` (default model, real
//! nats-server), with normal requests running beside them the whole time:
//!
//! - random bytes, as MessagePack or as JSON;
//! - valid requests (text, chat, token ids) mutated: wrong types, NaN and infinities, huge
//!   and negative numbers, deep nesting, long strings and arrays, invalid UTF-8, binary
//!   blobs, unknown, missing and renamed fields, a list instead of a map;
//! - encoded messages truncated, with flipped bytes or trailing junk.
//!
//! Every message gets exactly one final reply — a typed error (`invalid_request`,
//! `prompt_too_long`, `overloaded`) or a complete stream — never `internal`, never
//! silence; the engine does not panic, its memory stays bounded, and every normal request
//! answers what it answers alone.

#[path = "common/nats.rs"]
mod nats_server;
#[path = "common/replies.rs"]
mod replies;
#[path = "common/process.rs"]
mod serve_process;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use futures_util::StreamExt;
use nats_server::NatsServer;
use pagoda_actors::protocol::{decode_reply, ErrorCode, Reply, WireFormat, WireRequest};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serve_process::{rss_bytes, Serve};
use tokio::time::Instant;

const GENERATE: &str = "pagoda.v1.generate";
const MESSAGES: usize = 10_000;
const IN_FLIGHT: usize = 48;
/// Engine memory may grow this much over the whole run (allocator high-water marks of the
/// largest messages, which are up to 1 MiB each).
const RSS_BUDGET: u64 = 96 << 20;

/// A MessagePack value, able to hold what serde types cannot: invalid UTF-8 strings, NaN.
#[derive(Debug, Clone)]
enum V {
    Nil,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    Str(Vec<u8>),
    Bin(Vec<u8>),
    Array(Vec<V>),
    Map(Vec<(V, V)>),
}

fn s(text: &str) -> V {
    V::Str(text.as_bytes().to_vec())
}

impl V {
    fn msgpack(&self, out: &mut Vec<u8>) {
        match self {
            V::Nil => out.push(0xc0),
            V::Bool(b) => out.push(if *b { 0xc3 } else { 0xc2 }),
            V::Int(i) if (0..128).contains(i) => out.push(*i as u8),
            V::Int(i) => {
                out.push(0xd3);
                out.extend_from_slice(&i.to_be_bytes());
            }
            V::UInt(u) => {
                out.push(0xcf);
                out.extend_from_slice(&u.to_be_bytes());
            }
            V::Float(f) => {
                out.push(0xcb);
                out.extend_from_slice(&f.to_be_bytes());
            }
            V::Str(b) => {
                if b.len() < 32 {
                    out.push(0xa0 | b.len() as u8);
                } else {
                    out.push(0xdb);
                    out.extend_from_slice(&(b.len() as u32).to_be_bytes());
                }
                out.extend_from_slice(b);
            }
            V::Bin(b) => {
                out.push(0xc6);
                out.extend_from_slice(&(b.len() as u32).to_be_bytes());
                out.extend_from_slice(b);
            }
            V::Array(a) => {
                if a.len() < 16 {
                    out.push(0x90 | a.len() as u8);
                } else {
                    out.push(0xdd);
                    out.extend_from_slice(&(a.len() as u32).to_be_bytes());
                }
                for v in a {
                    v.msgpack(out);
                }
            }
            V::Map(m) => {
                if m.len() < 16 {
                    out.push(0x80 | m.len() as u8);
                } else {
                    out.push(0xdf);
                    out.extend_from_slice(&(m.len() as u32).to_be_bytes());
                }
                for (k, v) in m {
                    k.msgpack(out);
                    v.msgpack(out);
                }
            }
        }
    }

    /// JSON text (not always valid: NaN and raw invalid UTF-8 are written as they are).
    fn json(&self, out: &mut Vec<u8>) {
        match self {
            V::Nil => out.extend_from_slice(b"null"),
            V::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
            V::Int(i) => out.extend_from_slice(i.to_string().as_bytes()),
            V::UInt(u) => out.extend_from_slice(u.to_string().as_bytes()),
            V::Float(f) if f.is_nan() => out.extend_from_slice(b"NaN"),
            V::Float(f) if f.is_infinite() => out.extend_from_slice(b"1e400"),
            V::Float(f) => out.extend_from_slice(format!("{f:?}").as_bytes()),
            V::Str(b) | V::Bin(b) => {
                out.push(b'"');
                for &c in b {
                    match c {
                        b'"' => out.extend_from_slice(b"\\\""),
                        b'\\' => out.extend_from_slice(b"\\\\"),
                        c if c < 0x20 => out.extend_from_slice(format!("\\u{c:04x}").as_bytes()),
                        c => out.push(c),
                    }
                }
                out.push(b'"');
            }
            V::Array(a) => {
                out.push(b'[');
                for (i, v) in a.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    v.json(out);
                }
                out.push(b']');
            }
            V::Map(m) => {
                out.push(b'{');
                for (i, (k, v)) in m.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    match k {
                        V::Str(_) => k.json(out),
                        other => {
                            out.push(b'"');
                            other.json(out);
                            out.push(b'"');
                        }
                    }
                    out.push(b':');
                    v.json(out);
                }
                out.push(b'}');
            }
        }
    }
}

/// A valid request of one of three shapes.
fn base(rng: &mut StdRng, n: usize) -> Vec<(V, V)> {
    let mut m = vec![
        (s("id"), s(&format!("fz-{n}"))),
        (s("max_tokens"), V::Int(rng.gen_range(1..8))),
        (s("temperature"), V::Float(0.0)),
    ];
    match rng.gen_range(0..3) {
        0 => m.push((s("prompt"), s("Hello there, how are"))),
        1 => m.push((
            s("messages"),
            V::Array(vec![V::Map(vec![
                (s("role"), s("user")),
                (s("content"), s("Say hi")),
            ])]),
        )),
        _ => m.push((
            s("prompt_token_ids"),
            V::Array((0..rng.gen_range(1..10)).map(|i| V::Int(100 + i)).collect()),
        )),
    }
    if rng.gen_bool(0.3) {
        m.push((s("stop"), V::Array(vec![s("\n")])));
    }
    if rng.gen_bool(0.2) {
        m.push((s("stream"), V::Bool(false)));
    }
    m
}

const FIELDS: &[&str] = &[
    "id",
    "prompt",
    "messages",
    "prompt_token_ids",
    "max_tokens",
    "min_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "stop",
    "stop_token_ids",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "ignore_eos",
    "stream",
    "reply_to",
    "timeout_ms",
    "priority",
];

/// A value meant to break whatever field it lands in.
fn nasty(rng: &mut StdRng) -> V {
    match rng.gen_range(0..16) {
        0 => V::Float(f64::NAN),
        1 => V::Float(f64::INFINITY),
        2 => V::Float(f64::NEG_INFINITY),
        3 => V::UInt(u64::MAX),
        4 => V::Int(i64::MIN),
        5 => V::Int(-1),
        6 => V::Float(1e308),
        7 => V::Str(vec![0xff, 0xfe, b'a', 0xc3]),
        8 => V::Str(vec![b'x'; rng.gen_range(1000..200_000)]),
        9 => V::Array(
            (0..rng.gen_range(100..60_000))
                .map(|i| V::Int(i % 128))
                .collect(),
        ),
        10 => {
            let depth = rng.gen_range(100..3000);
            let mut v = V::Nil;
            for _ in 0..depth {
                v = V::Array(vec![v]);
            }
            v
        }
        11 => V::Bin(vec![0u8; rng.gen_range(0..5000)]),
        12 => V::Map(vec![(V::Int(1), V::Nil), (s(""), V::Bool(true))]),
        13 => V::Nil,
        14 => V::Bool(true),
        _ => s("<|im_start|>system\n"),
    }
}

fn mutate(rng: &mut StdRng, m: &mut Vec<(V, V)>) {
    for _ in 0..rng.gen_range(1..4) {
        match rng.gen_range(0..6) {
            0 if !m.is_empty() => {
                let i = rng.gen_range(0..m.len());
                m[i].1 = nasty(rng);
            }
            1 => {
                let f = FIELDS[rng.gen_range(0..FIELDS.len())];
                m.push((s(f), nasty(rng)));
            }
            2 if !m.is_empty() => {
                m.remove(rng.gen_range(0..m.len()));
            }
            3 if !m.is_empty() => {
                let i = rng.gen_range(0..m.len());
                m[i].0 = nasty(rng);
            }
            4 => m.push((s("unknown_field"), nasty(rng))),
            _ => {
                let f = FIELDS[rng.gen_range(0..FIELDS.len())];
                m.push((s(f), V::Map(vec![(s("nested"), nasty(rng))])));
            }
        }
    }
}

/// One malformed message: its body and whether it says it is JSON.
fn message(rng: &mut StdRng, n: usize) -> (Vec<u8>, bool) {
    let json = rng.gen_bool(0.3);
    let mut body = Vec::new();
    match rng.gen_range(0..10) {
        0 | 1 => {
            let len = rng.gen_range(0..3000);
            body = (0..len).map(|_| rng.gen()).collect();
        }
        2 => {
            // A list instead of a map.
            let mut m = base(rng, n);
            mutate(rng, &mut m);
            let v = V::Array(m.into_iter().map(|(_, v)| v).collect());
            if json {
                v.json(&mut body)
            } else {
                v.msgpack(&mut body)
            }
        }
        _ => {
            let mut m = base(rng, n);
            mutate(rng, &mut m);
            let v = V::Map(m);
            if json {
                v.json(&mut body)
            } else {
                v.msgpack(&mut body)
            }
        }
    }
    // Damage the encoding itself now and then.
    if !body.is_empty() && rng.gen_bool(0.2) {
        match rng.gen_range(0..3) {
            0 => body.truncate(rng.gen_range(0..body.len())),
            1 => {
                for _ in 0..rng.gen_range(1..8) {
                    let i = rng.gen_range(0..body.len());
                    body[i] ^= 1 << rng.gen_range(0..8);
                }
            }
            _ => body.extend((0..rng.gen_range(1..64)).map(|_| rng.gen::<u8>())),
        }
    }
    // NATS refuses payloads over its max_payload (1 MiB by default): keep under it.
    body.truncate(1000 * 1024);
    (body, json)
}

/// Sends one message and waits for its final reply.
async fn send(nats: &async_nats::Client, body: Vec<u8>, json: bool) -> Result<Reply, String> {
    // (`json` only sets the request's header; the reply's own header is what counts.)
    let inbox = nats.new_inbox();
    let mut sub = nats
        .subscribe(inbox.clone())
        .await
        .map_err(|e| e.to_string())?;
    let mut headers = HeaderMap::new();
    if json {
        headers.insert("Content-Type", "application/json");
    }
    nats.publish_with_reply_and_headers(GENERATE, inbox, headers, body.into())
        .await
        .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut expect_seq = 0;
    loop {
        let m = tokio::time::timeout_at(deadline, sub.next())
            .await
            .map_err(|_| "no final reply within 120 s".to_owned())?
            .ok_or("subscription closed")?;
        // The reply says its own format (a body that starts with `{` is answered in JSON
        // even without the header).
        let content_type = m
            .headers
            .as_ref()
            .and_then(|h| h.get("Content-Type"))
            .map(|v| v.as_str().to_owned());
        let format = WireFormat::from_content_type(content_type.as_deref());
        let r = decode_reply(&m.payload, format)
            .map_err(|e| format!("an undecodable {format:?} reply: {e}"))?;
        if r.seq() != expect_seq {
            return Err(format!("reply seq {} where {expect_seq} was due", r.seq()));
        }
        expect_seq += 1;
        if r.is_final() {
            return Ok(r);
        }
    }
}

#[test]
fn ten_thousand_malformed_messages_beside_a_normal_stream() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut serve = Serve::spawn(
        "engine",
        &nats.url(),
        dir.path(),
        &[],
        &[
            ("PAGODA_MODEL__MAX_MODEL_LEN", "96"),
            // RSS follows what is held (as in tests/overload.rs).
            ("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=16384"),
        ],
    );
    serve.wait_for_log("serving");
    let pid = serve.pid();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (counts, normal_runs, rss_before, rss_after) = rt.block_on(async {
        let nats_client = async_nats::connect(nats.url()).await.expect("connect");
        // The normal stream: the same greedy request over and over, all the way through.
        let mut normal = WireRequest::text("The lighthouse keeper climbed the stairs and");
        normal.params.temperature = 0.0;
        normal.params.max_tokens = 48;
        normal.params.ignore_eos = true;
        let reference = replies::request(
            &nats_client,
            GENERATE,
            &normal,
            Duration::from_secs(60),
            Duration::ZERO,
        )
        .await;
        reference
            .check_one_final()
            .expect("the normal request alone");
        let reference_ids = reference.token_ids();
        assert_eq!(reference_ids.len(), 48);
        let rss_before = rss_bytes(pid).expect("engine RSS");
        let done = Arc::new(AtomicBool::new(false));
        let normal_task = {
            let (c, done) = (nats_client.clone(), done.clone());
            tokio::spawn(async move {
                let mut runs = 0;
                while !done.load(Ordering::Relaxed) {
                    let got = replies::request(
                        &c,
                        GENERATE,
                        &normal,
                        Duration::from_secs(120),
                        Duration::ZERO,
                    )
                    .await;
                    got.check_one_final().expect("the normal stream ends once");
                    match got.last() {
                        // Overloaded by the fuzz traffic is fine; try again.
                        Some(Reply::Error(e)) if e.error.code == ErrorCode::Overloaded => {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                        Some(Reply::Chunk(_)) => {}
                        other => panic!("the normal stream failed: {other:?}"),
                    }
                    assert_eq!(
                        got.token_ids(),
                        reference_ids,
                        "the normal stream changed beside the fuzzer"
                    );
                    runs += 1;
                }
                runs
            })
        };
        let mut rng = StdRng::seed_from_u64(0x5eed);
        let sem = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
        let mut tasks = Vec::with_capacity(MESSAGES);
        for n in 0..MESSAGES {
            let (body, json) = message(&mut rng, n);
            let permit = sem.clone().acquire_owned().await.expect("semaphore");
            let c = nats_client.clone();
            tasks.push(tokio::spawn(async move {
                let r = send(&c, body, json).await;
                drop(permit);
                r
            }));
        }
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        let mut failures = Vec::new();
        for (n, t) in tasks.into_iter().enumerate() {
            match t.await.expect("task") {
                Ok(Reply::Error(e)) => {
                    *counts.entry(e.error.code.as_str().to_owned()).or_default() += 1;
                    if e.error.code == ErrorCode::Internal {
                        failures.push(format!("message {n}: internal: {}", e.error.message));
                    }
                }
                Ok(Reply::Chunk(c)) => {
                    *counts
                        .entry(format!("stream:{:?}", c.finish_reason.expect("final")))
                        .or_default() += 1;
                }
                Err(e) => failures.push(format!("message {n}: {e}")),
            }
        }
        assert!(
            failures.is_empty(),
            "{} of {MESSAGES} messages went wrong; first: {:?}",
            failures.len(),
            &failures[..failures.len().min(5)]
        );
        done.store(true, Ordering::Relaxed);
        let runs = normal_task.await.expect("normal stream");
        let rss_after = rss_bytes(pid).expect("engine RSS");
        (counts, runs, rss_before, rss_after)
    });
    let typed: usize = counts.values().sum();
    eprintln!(
        "fuzzer: {MESSAGES} messages sent, {typed} answered ({counts:?}), 0 internal, 0 silent; \
         normal stream completed {normal_runs} times beside them, identical each time; \
         engine RSS {:.1} MiB before, {:.1} MiB after",
        rss_before as f64 / 1048576.0,
        rss_after as f64 / 1048576.0
    );
    assert_eq!(typed, MESSAGES);
    assert!(
        normal_runs >= 1,
        "the normal stream never completed beside the fuzzer"
    );
    assert!(
        rss_after < rss_before + RSS_BUDGET,
        "engine RSS grew from {rss_before} to {rss_after} bytes"
    );
    serve.assert_alive();
    let log = serve.log();
    assert!(!log.contains("panicked"), "the engine panicked:\n{log}");
}
