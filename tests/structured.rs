//! Structured output (`guided_choice`, `guided_regex`, `guided_json`, `guided_grammar`,
//! `response_format`) through a real `pagoda serve` of the default model on a real
//! nats-server, sampled at temperature 1 with seeds (so the grammar, not the model's
//! preference, is what keeps the output in shape):
//! - 200 answers under a JSON schema all parse and validate with Python's `jsonschema`
//!   (an implementation independent of llguidance), via `tests/support/validate_json.py`;
//! - regex answers fully match, choice answers are one of the choices, Lark and
//!   `response_format` work;
//! - bad schemas and patterns are `invalid_request` naming the field; a request whose
//!   grammar cannot continue ends with its own typed error while its neighbours finish.

#[path = "common/nats.rs"]
mod nats_server;
#[path = "common/replies.rs"]
mod replies;
#[path = "common/process.rs"]
mod serve_process;

use std::time::Duration;

use futures_util::future::join_all;
use nats_server::NatsServer;
use pagoda::client::{Client, ClientError, Completion};
use pagoda_actors::messages::{FinishReason, ResponseFormat};
use pagoda_actors::protocol::{ChatMessage, ErrorCode, WireRequest};
use serve_process::Serve;

fn python() -> String {
    std::env::var("PAGODA_PYTHON").unwrap_or_else(|_| {
        panic!(
            "PAGODA_PYTHON is not set: run the tests with ./scripts/test.sh, or set it to the \
             interpreter ./scripts/python-env.sh prints (it imports jsonschema)"
        )
    })
}

fn event(i: usize) -> String {
    let merchants = [
        "grocery store",
        "online casino",
        "airline",
        "gas station",
        "jeweller",
    ];
    let countries = [
        "home country",
        "a country never visited before",
        "a neighbouring country",
    ];
    format!(
        "Card event {i}: a payment of ${} at a {} in {}, {} minutes after the previous one. \
         Is it fraud?",
        (i * 37) % 2000 + 3,
        merchants[i % merchants.len()],
        countries[i % countries.len()],
        (i * 13) % 300
    )
}

fn chat(i: usize, seed: u64) -> WireRequest {
    let mut req = WireRequest::chat(vec![ChatMessage::new("user", event(i))]);
    req.params.temperature = 1.0;
    req.params.seed = Some(seed);
    req.params.max_tokens = 160;
    req
}

async fn run(client: &Client, req: WireRequest) -> Result<Completion, ClientError> {
    client.generate(req).await?.collect_text().await
}

async fn all(client: &Client, reqs: Vec<WireRequest>) -> Vec<Completion> {
    join_all(reqs.into_iter().map(|r| run(client, r)))
        .await
        .into_iter()
        .enumerate()
        .map(|(i, r)| r.unwrap_or_else(|e| panic!("request {i}: {e}")))
        .collect()
}

#[test]
fn structured_output_through_the_engine() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut serve = Serve::spawn("engine", &nats.url(), dir.path(), &[], &[]);
    serve.wait_for_log("serving");
    let rt = replies::runtime();
    rt.block_on(async {
        let client = Client::connect(&nats.url())
            .await
            .expect("connect")
            .with_idle_timeout(Duration::from_secs(120));

        // 200 seeded answers under a JSON schema.
        let schema = serde_json::json!({
            "type": "object",
            "properties": {
                "verdict": {"enum": ["fraud", "legit"]},
                "risk": {"type": "integer", "minimum": 0, "maximum": 100},
                "reason": {"type": "string", "minLength": 1, "maxLength": 60}
            },
            "required": ["verdict", "risk", "reason"],
            "additionalProperties": false
        });
        let reqs = (0..200)
            .map(|i| {
                let mut r = chat(i, i as u64);
                r.params.guided_json = Some(schema.clone());
                r
            })
            .collect();
        let answers = all(&client, reqs).await;
        let schema_path = dir.path().join("schema.json");
        let answers_path = dir.path().join("answers.jsonl");
        std::fs::write(&schema_path, schema.to_string()).expect("write schema");
        let lines: Vec<String> = answers
            .iter()
            .map(|c| serde_json::to_string(&c.text).expect("json string"))
            .collect();
        std::fs::write(&answers_path, lines.join("\n") + "\n").expect("write answers");
        for (i, c) in answers.iter().enumerate() {
            assert_eq!(
                c.finish_reason,
                FinishReason::Stop,
                "answer {i}: {:?}",
                c.text
            );
        }
        let script =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/validate_json.py");
        let out = std::process::Command::new(python())
            .arg(&script)
            .arg(&schema_path)
            .arg(&answers_path)
            .output()
            .expect("run the validator");
        let report = String::from_utf8_lossy(&out.stdout);
        eprintln!("{report}");
        assert!(
            out.status.success(),
            "answers that do not validate:\n{report}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let distinct: std::collections::HashSet<&str> =
            answers.iter().map(|c| c.text.as_str()).collect();
        assert!(
            distinct.len() > 50,
            "seeds should vary the answers: {}",
            distinct.len()
        );

        // Choices, with logprobs: the probability of the verdict.
        let reqs = (0..24)
            .map(|i| {
                let mut r = chat(i, 1000 + i as u64);
                r.params.guided_choice = Some(vec!["fraud".into(), "legit".into()]);
                r.params.logprobs = Some(2);
                r
            })
            .collect();
        for (i, c) in all(&client, reqs).await.iter().enumerate() {
            assert!(
                c.text == "fraud" || c.text == "legit",
                "choice {i}: {:?}",
                c.text
            );
            assert_eq!(c.finish_reason, FinishReason::Stop);
            let lps = c.logprobs.as_ref().expect("logprobs");
            assert_eq!(lps.len(), c.token_ids.len());
        }

        // A regular expression, fully matched.
        let reqs = (0..24)
            .map(|i| {
                let mut r = chat(i, 2000 + i as u64);
                r.params.guided_regex = Some("(GB|US|FR)-[0-9]{4}-[a-z]{2,3}".into());
                r
            })
            .collect();
        for (i, c) in all(&client, reqs).await.iter().enumerate() {
            let t = &c.text;
            let parts: Vec<&str> = t.split('-').collect();
            let ok = parts.len() == 3
                && ["GB", "US", "FR"].contains(&parts[0])
                && parts[1].len() == 4
                && parts[1].bytes().all(|b| b.is_ascii_digit())
                && (2..=3).contains(&parts[2].len())
                && parts[2].bytes().all(|b| b.is_ascii_lowercase());
            assert!(ok, "regex {i}: {t:?}");
            assert_eq!(c.finish_reason, FinishReason::Stop);
        }

        // A Lark grammar and OpenAI's response_format.
        let mut r = chat(1, 7);
        r.params.guided_grammar = Some(
            r#"start: ("yes" | "no") "," " " NUMBER
NUMBER: /[1-9][0-9]?/"#
                .into(),
        );
        let c = run(&client, r).await.expect("lark");
        let (word, n) = c
            .text
            .split_once(", ")
            .unwrap_or_else(|| panic!("{:?}", c.text));
        assert!(["yes", "no"].contains(&word), "{:?}", c.text);
        assert!(
            n.parse::<u32>().is_ok_and(|n| (1..100).contains(&n)),
            "{:?}",
            c.text
        );
        let mut r = chat(2, 8);
        r.params.response_format = Some(ResponseFormat::JsonObject);
        r.params.max_tokens = 400;
        let c = run(&client, r).await.expect("json_object");
        if c.finish_reason == FinishReason::Stop {
            let v: serde_json::Value = serde_json::from_str(&c.text).expect(&c.text);
            assert!(v.is_object(), "{}", c.text);
        } else {
            // A free-form object may run to max_tokens; what came is still its prefix.
            assert!(c.text.starts_with('{'), "{:?}", c.text);
        }

        // Bad fields: invalid_request naming the field.
        for (field, f) in [
            (
                "guided_regex",
                Box::new(|r: &mut WireRequest| r.params.guided_regex = Some("([a-z".into()))
                    as Box<dyn Fn(&mut WireRequest)>,
            ),
            (
                "guided_json",
                Box::new(|r: &mut WireRequest| {
                    r.params.guided_json = Some(serde_json::json!({"type": "nonsense"}))
                }),
            ),
            (
                "guided_grammar",
                Box::new(|r: &mut WireRequest| {
                    r.params.guided_grammar = Some("start: missing".into())
                }),
            ),
            (
                "guided_choice",
                Box::new(|r: &mut WireRequest| r.params.guided_choice = Some(vec![])),
            ),
        ] {
            let mut r = chat(0, 1);
            f(&mut r);
            match run(&client, r).await {
                Err(ClientError::Server { code, message }) => {
                    assert_eq!(code, ErrorCode::InvalidRequest, "{field}: {message}");
                    assert!(message.contains(field), "{field}: {message}");
                }
                other => panic!("{field}: expected invalid_request, got {other:?}"),
            }
        }

        // A grammar that cannot continue (the choice is complete, but min_tokens keeps
        // EOS out) ends that request alone; its neighbours in the same batch finish.
        let mut stuck = chat(3, 3);
        stuck.params.guided_choice = Some(vec!["ok".into()]);
        stuck.params.min_tokens = 20;
        let neighbours: Vec<WireRequest> = (0..4)
            .map(|i| {
                let mut r = chat(10 + i, 10 + i as u64);
                r.params.max_tokens = 40;
                r
            })
            .collect();
        let (stuck, done) = tokio::join!(run(&client, stuck), all(&client, neighbours));
        match stuck {
            Err(ClientError::Server { code, message }) => {
                assert_eq!(code, ErrorCode::InvalidRequest, "{message}");
            }
            other => panic!("the stuck request should fail alone: {other:?}"),
        }
        for c in done {
            assert!(matches!(
                c.finish_reason,
                FinishReason::Stop | FinishReason::Length
            ));
        }
    });

    // The Python examples: a probability per fraud event, recommendations that validate.
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/python");
    for (script, expect, lines) in [
        ("fraud_check.py", "P(fraud) = ", 5),
        ("recommend.py", "  sku-", 3),
    ] {
        let out = std::process::Command::new(python())
            .arg(examples.join(script))
            .args(["--url", &nats.url()])
            .output()
            .expect("run the example");
        let stdout = String::from_utf8_lossy(&out.stdout);
        eprintln!("{script}:\n{stdout}");
        assert!(
            out.status.success(),
            "{script} failed:\n{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let n = stdout.lines().filter(|l| l.contains(expect)).count();
        assert!(n >= lines, "{script}: {n} lines with {expect:?}:\n{stdout}");
    }
    drop(serve);
}
