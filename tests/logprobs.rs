//! `logprobs` and `prompt_logprobs` through a real `pagoda serve` on a real nats-server,
//! against Hugging Face transformers (`tests/goldens/logprobs.json`, written by
//! `tools/reference/make_logprobs.py`):
//! - the tiny random f32 llama (safetensors): every logprob within 1e-4 of transformers'
//!   float64 log-softmax, the top-5 ids in the same order, the greedy tokens identical;
//! - the default GGUF (Q4_1, reference dequantized to f32): within 2e-2, top-1 identical;
//! - values are raw (before penalties and temperature), chunked prefill and the prefix
//!   cache change nothing, `stream: false` gathers them, bad values are `invalid_request`.

#[path = "common/nats.rs"]
mod nats_server;
#[path = "common/replies.rs"]
mod replies;
#[path = "common/process.rs"]
mod serve_process;

use std::time::Duration;

use nats_server::NatsServer;
use pagoda::client::{Client, Completion};
use pagoda_actors::protocol::{Reply, TokenLogprobs, WireRequest};
use serde::Deserialize;
use serve_process::Serve;

const GENERATE: &str = "pagoda.v1.generate";
/// Each test runs an engine: one at a time on small machines.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[derive(Deserialize)]
struct Goldens {
    models: std::collections::HashMap<String, ModelGoldens>,
}

#[derive(Deserialize)]
struct ModelGoldens {
    prompts: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    prompt_ids: Vec<u32>,
    prompt_logprobs: Vec<Option<Entry>>,
    generated: Vec<Entry>,
}

#[derive(Deserialize)]
struct Entry {
    token_id: u32,
    logprob: f32,
    top_ids: Vec<u32>,
    top_logprobs: Vec<f32>,
}

fn goldens(model: &str) -> Vec<Case> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/goldens/logprobs.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let mut g: Goldens = serde_json::from_str(&text).expect("logprobs goldens");
    g.models
        .remove(model)
        .unwrap_or_else(|| panic!("no goldens for {model}"))
        .prompts
}

fn request(case: &Case, k: u32) -> WireRequest {
    let mut req = WireRequest {
        prompt_token_ids: Some(case.prompt_ids.clone()),
        ..WireRequest::default()
    };
    req.params.temperature = 0.0;
    req.params.max_tokens = case.generated.len() as u32;
    req.params.ignore_eos = true;
    req.params.logprobs = Some(k);
    req.params.prompt_logprobs = Some(k);
    req
}

/// How far `got` is from the golden entry; panics when the top ids differ in a way the
/// tolerance cannot explain (`strict_order`: the order must be the reference's wherever
/// neighbours differ by more than `tol`).
fn compare(what: &str, got: &TokenLogprobs, want: &Entry, tol: f32, strict_order: bool) -> f32 {
    let mut worst = (got.logprob - want.logprob).abs();
    assert_eq!(
        got.top_logprobs.len(),
        want.top_ids.len(),
        "{what}: top-k size"
    );
    for (i, &(id, lp)) in got.top_logprobs.iter().enumerate() {
        match want.top_ids.iter().position(|&w| w == id) {
            Some(j) => {
                worst = worst.max((lp - want.top_logprobs[j]).abs());
                if strict_order && i != j {
                    let gap = (want.top_logprobs[i] - want.top_logprobs[j]).abs();
                    assert!(
                        gap <= tol,
                        "{what}: top id {id} at rank {i}, reference rank {j}"
                    );
                }
            }
            // A token at the edge of the reference's top-k may trade places with the next.
            None => {
                let last = *want.top_logprobs.last().expect("top-k");
                assert!(
                    (lp - last).abs() <= tol,
                    "{what}: top id {id} ({lp}) is not in the reference's top-k {:?}",
                    want.top_ids
                );
            }
        }
    }
    // Most likely first.
    for w in got.top_logprobs.windows(2) {
        assert!(w[0].1 >= w[1].1, "{what}: top_logprobs not sorted: {w:?}");
    }
    worst
}

/// Checks a completion against the goldens; the worst difference seen.
fn check(name: &str, c: &Completion, case: &Case, tol: f32, strict: bool) -> f32 {
    let mut worst = 0f32;
    let prompt = c.prompt_logprobs.as_ref().expect("prompt_logprobs");
    assert_eq!(
        prompt.len(),
        case.prompt_ids.len(),
        "{name}: prompt entries"
    );
    assert!(
        prompt[0].is_none(),
        "{name}: the first prompt token has no logprob"
    );
    for (i, (got, want)) in prompt.iter().zip(&case.prompt_logprobs).enumerate().skip(1) {
        let (got, want) = (got.as_ref().expect("entry"), want.as_ref().expect("golden"));
        assert_eq!(want.token_id, case.prompt_ids[i]);
        worst = worst.max(compare(
            &format!("{name} prompt[{i}]"),
            got,
            want,
            tol,
            strict,
        ));
    }
    let lps = c.logprobs.as_ref().expect("logprobs");
    assert_eq!(
        lps.len(),
        c.token_ids.len(),
        "{name}: one entry per token id"
    );
    let mut sum = 0f64;
    for (j, (lp, &id)) in lps.iter().zip(&c.token_ids).enumerate() {
        sum += f64::from(lp.logprob);
        // Greedy: the sampled token is the most likely one.
        assert_eq!(
            lp.top_logprobs[0].0, id,
            "{name}: token {j} is not the argmax"
        );
        assert_eq!(lp.top_logprobs[0].1, lp.logprob, "{name}: token {j}");
        let Some(want) = case.generated.get(j) else {
            break;
        };
        if want.token_id != id {
            // The GGUF may leave the reference's greedy path at a near-tie: compare up to
            // there (the caller asserts how far that was).
            assert!(
                !strict,
                "{name}: token {j} is {id}, transformers chose {}",
                want.token_id
            );
            break;
        }
        worst = worst.max(compare(&format!("{name} token {j}"), lp, want, tol, strict));
    }
    let cumulative = c.cumulative_logprob.expect("cumulative_logprob");
    assert!(
        (cumulative - sum).abs() < 1e-3,
        "{name}: cumulative {cumulative} vs {sum}"
    );
    worst
}

fn serve(
    name: &str,
    nats: &NatsServer,
    dir: &std::path::Path,
    model: &str,
    env: &[(&str, &str)],
) -> Serve {
    let mut s = Serve::spawn(name, &nats.url(), dir, &["--model", model], env);
    s.wait_for_log("serving");
    s
}

async fn complete(client: &Client, req: WireRequest) -> Completion {
    client
        .generate(req)
        .await
        .expect("publish")
        .collect_text()
        .await
        .expect("an answer")
}

#[test]
fn f32_logprobs_match_transformers_within_1e_4() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let cases = goldens("tiny_llama");
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    // Prefill in chunks of 8 tokens: prompt log-probabilities come from several steps.
    let engine = serve(
        "tiny",
        &nats,
        dir.path(),
        "tests/fixtures/tiny-llama",
        &[
            ("PAGODA_SCHEDULER__MAX_NUM_BATCHED_TOKENS", "8"),
            ("PAGODA_SCHEDULER__MAX_NUM_SEQS", "8"),
        ],
    );
    let rt = replies::runtime();
    rt.block_on(async {
        let client = Client::connect(&nats.url()).await.expect("connect");
        // All prompts at once (batched), then each alone again: the prefix cache now
        // holds them, yet the prompt log-probabilities are computed in full.
        for round in 0..2 {
            let answers = futures_util::future::join_all(
                cases.iter().map(|case| complete(&client, request(case, 5))),
            )
            .await;
            let mut worst = 0f32;
            for (i, (c, case)) in answers.iter().zip(&cases).enumerate() {
                let want: Vec<u32> = case.generated.iter().map(|e| e.token_id).collect();
                assert_eq!(c.token_ids, want, "prompt {i}: greedy tokens");
                worst = worst.max(check(
                    &format!("round {round} prompt {i}"),
                    c,
                    case,
                    1e-4,
                    true,
                ));
            }
            eprintln!("tiny llama f32, round {round}: max |logprob - transformers| = {worst:e}");
            assert!(worst <= 1e-4, "{worst}");
        }
    });
    drop(engine);
}

#[test]
fn gguf_logprobs_match_transformers_within_2e_2() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let cases = goldens("smollm2_q4_1");
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = serve(
        "gguf",
        &nats,
        dir.path(),
        "models/SmolLM2-135M-Instruct.Q4_1.gguf",
        &[],
    );
    let rt = replies::runtime();
    rt.block_on(async {
        let client = Client::connect(&nats.url()).await.expect("connect");
        let answers = futures_util::future::join_all(
            cases.iter().map(|case| complete(&client, request(case, 5))),
        )
        .await;
        let mut worst = 0f32;
        for (i, (c, case)) in answers.iter().zip(&cases).enumerate() {
            let same = c
                .token_ids
                .iter()
                .zip(&case.generated)
                .take_while(|(a, b)| **a == b.token_id)
                .count();
            assert!(
                same >= 8,
                "prompt {i}: only {same} greedy tokens agree with transformers"
            );
            worst = worst.max(check(&format!("prompt {i}"), c, case, 2e-2, false));
        }
        eprintln!("SmolLM2 Q4_1: max |logprob - transformers| = {worst:e}");
        assert!(worst <= 2e-2, "{worst}");
    });
    drop(engine);
}

/// Chunks carry one entry per token id, the prompt's on the first chunk only; the values
/// are the model's own (raw): temperature and penalties do not change them; `stream:
/// false` gathers them; bad values are refused and the engine keeps serving.
#[test]
fn logprobs_are_raw_per_chunk_and_validated() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let cases = goldens("tiny_llama");
    let case = &cases[0];
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = serve("tiny", &nats, dir.path(), "tests/fixtures/tiny-llama", &[]);
    let rt = replies::runtime();
    rt.block_on(async {
        let nc = async_nats::connect(nats.url()).await.expect("connect");
        // Sampling with a hot temperature and heavy penalties: the first token's entry is
        // still the model's distribution after the prompt.
        let mut req = request(case, 3);
        req.id = Some("hot".into());
        req.params.temperature = 1.7;
        req.params.seed = Some(11);
        req.params.repetition_penalty = 1.8;
        req.params.presence_penalty = 1.5;
        let r =
            replies::request(&nc, GENERATE, &req, Duration::from_secs(60), Duration::ZERO).await;
        r.check_one_final().expect("one final chunk");
        let mut n_tokens = 0;
        for (i, reply) in r.replies.iter().enumerate() {
            let Reply::Chunk(c) = reply else {
                panic!("error reply: {reply:?}");
            };
            let lps = c.logprobs.as_ref().expect("every chunk carries logprobs");
            assert_eq!(lps.len(), c.token_ids.len(), "chunk {i}");
            assert_eq!(
                c.prompt_logprobs.is_some(),
                i == 0,
                "chunk {i}: prompt_logprobs"
            );
            assert_eq!(
                c.cumulative_logprob.is_some(),
                c.finish_reason.is_some(),
                "chunk {i}"
            );
            for (lp, &id) in lps.iter().zip(&c.token_ids) {
                if let Some(&(_, v)) = lp.top_logprobs.iter().find(|(t, _)| *t == id) {
                    assert_eq!(v, lp.logprob, "a token's own logprob and its top entry");
                }
            }
            if n_tokens == 0 && !c.token_ids.is_empty() {
                let first = &lps[0];
                let want = &case.generated[0];
                for (k, &(id, v)) in first.top_logprobs.iter().enumerate() {
                    assert_eq!(id, want.top_ids[k], "first step's top ids are the model's");
                    assert!(
                        (v - want.top_logprobs[k]).abs() <= 1e-4,
                        "{v} vs {}",
                        want.top_logprobs[k]
                    );
                }
            }
            n_tokens += c.token_ids.len();
        }
        assert_eq!(n_tokens, case.generated.len());

        // stream: false — one message with everything.
        let mut req = request(case, 2);
        req.id = Some("whole".into());
        req.stream = false;
        let r =
            replies::request(&nc, GENERATE, &req, Duration::from_secs(60), Duration::ZERO).await;
        r.check_one_final().expect("one final chunk");
        assert_eq!(r.replies.len(), 1);
        let Some(Reply::Chunk(c)) = r.last() else {
            panic!("{:?}", r.last());
        };
        let want: Vec<u32> = case.generated.iter().map(|e| e.token_id).collect();
        assert_eq!(c.token_ids, want);
        let lps = c.logprobs.as_ref().expect("logprobs");
        assert_eq!(lps.len(), want.len());
        for (lp, g) in lps.iter().zip(&case.generated) {
            assert!((lp.logprob - g.logprob).abs() <= 1e-4);
            assert_eq!(lp.top_logprobs.len(), 2);
        }
        assert_eq!(
            c.prompt_logprobs.as_ref().map(Vec::len),
            Some(case.prompt_ids.len())
        );

        // Bad values: invalid_request naming the field; the engine keeps serving.
        for (field, body) in [
            ("logprobs", r#"{"prompt":"hi","logprobs":21}"#),
            (
                "prompt_logprobs",
                r#"{"prompt":"hi","prompt_logprobs":1000}"#,
            ),
            ("logprobs", r#"{"prompt":"hi","logprobs":"five"}"#),
            ("logprobs", r#"{"prompt":"hi","logprobs":-1}"#),
        ] {
            let inbox = nc.new_inbox();
            let mut sub = nc.subscribe(inbox.clone()).await.expect("subscribe");
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Content-Type", "application/json");
            nc.publish_with_reply_and_headers(GENERATE.to_owned(), inbox, headers, body.into())
                .await
                .expect("publish");
            let msg = tokio::time::timeout(
                Duration::from_secs(10),
                futures_util::StreamExt::next(&mut sub),
            )
            .await
            .expect("an answer")
            .expect("a message");
            let v: serde_json::Value = serde_json::from_slice(&msg.payload).expect("json");
            assert_eq!(v["error"]["code"], "invalid_request", "{body}: {v}");
            let message = v["error"]["message"].as_str().unwrap_or_default();
            assert!(message.contains(field), "{body}: {message}");
        }
        let mut req = request(case, 0);
        req.id = Some("after".into());
        let r =
            replies::request(&nc, GENERATE, &req, Duration::from_secs(60), Duration::ZERO).await;
        r.check_one_final().expect("still serving");
        // logprobs: 0 — the token's own logprob, no alternatives.
        let mut n = 0;
        for reply in &r.replies {
            let Reply::Chunk(c) = reply else {
                panic!("error reply: {reply:?}");
            };
            let lps = c.logprobs.as_ref().expect("logprobs");
            assert!(lps.iter().all(|e| e.top_logprobs.is_empty()), "{lps:?}");
            n += lps.len();
        }
        assert_eq!(n, case.generated.len());
    });
    drop(engine);
}
