//! End-to-end tests of the in-process engine (all five actors, the real default model):
//! batching and preemption do not change greedy outputs, chunked prefill is exact, seeds
//! reproduce, stop conditions cut where they should, streamed text is UTF-8 safe, bad
//! requests get typed errors while the engine keeps serving, and every test ends with the
//! whole KV pool free and its invariants intact.

mod common;

use common::*;
use pagoda_actors::engine::Engine;
use pagoda_actors::messages::{FinishReason, SamplingParams, TokenId};
use pagoda_actors::protocol::{ChatMessage, ErrorCode, GenerateRequest, Prompt};
use pagoda_actors::tokenizer::{tokenizer_from_gguf_file, TokenizerParts};

/// Sixteen prompts of different lengths (so prefill chunks and blocks fall differently).
const PROMPTS: [&str; 16] = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived",
    "def fibonacci(n):",
    "The three primary colors are",
    "Water boils at",
    "My favourite recipe for a rainy Sunday afternoon starts with",
    "In 1969, astronauts",
    "The quick brown fox",
    "A list of prime numbers: 2, 3, 5,",
    "Photosynthesis is the process by which plants",
    "Dear hiring manager, I am writing to apply for",
    "The best way to learn a new language is",
    "SELECT name FROM users WHERE",
    "Mount Everest is located in",
    "Roses are red, violets are blue,",
    "To be or not to be,",
];

fn tokenizer() -> TokenizerParts {
    tokenizer_from_gguf_file(&model_path()).expect("the model's tokenizer loads")
}

fn decode(tok: &TokenizerParts, ids: &[TokenId]) -> String {
    tok.decode(ids).expect("decode")
}

/// A prompt of roughly `sentences` × 12 tokens of varied text.
fn long_prompt(sentences: usize) -> String {
    const CITIES: [&str; 8] = [
        "Paris", "Lima", "Oslo", "Kyoto", "Nairobi", "Quito", "Dublin", "Hanoi",
    ];
    const WEATHER: [&str; 5] = ["sunny", "rainy", "windy", "foggy", "snowy"];
    (0..sentences)
        .map(|i| {
            format!(
                "On day {} the weather in {} was {} and people stayed {}.",
                i + 1,
                CITIES[i % CITIES.len()],
                WEATHER[i % WEATHER.len()],
                if i % 3 == 0 { "inside" } else { "outside" }
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Greedy outputs of `PROMPTS`, one request at a time.
async fn solo_outputs(engine: &Engine, max_tokens: u32) -> Vec<Vec<TokenId>> {
    let mut out = Vec::new();
    for (i, p) in PROMPTS.iter().enumerate() {
        let o = generate(
            engine,
            text_request(format!("solo-{i}"), p, greedy(max_tokens)),
        )
        .await;
        let (reason, usage) = o.finished();
        assert_eq!(reason, FinishReason::Length, "prompt {i}");
        assert_eq!(usage.completion_tokens, max_tokens, "prompt {i}");
        assert_eq!(o.token_ids.len(), max_tokens as usize, "prompt {i}");
        out.push(o.token_ids);
    }
    out
}

async fn batched_outputs(engine: &Engine, max_tokens: u32) -> Vec<Vec<TokenId>> {
    let requests = PROMPTS
        .iter()
        .enumerate()
        .map(|(i, p)| text_request(format!("batch-{i}"), p, greedy(max_tokens)))
        .collect();
    generate_all(engine, requests)
        .await
        .into_iter()
        .enumerate()
        .map(|(i, o)| {
            let (reason, usage) = o.finished();
            assert_eq!(reason, FinishReason::Length, "prompt {i}");
            assert_eq!(usage.completion_tokens, max_tokens, "prompt {i}");
            o.token_ids
        })
        .collect()
}

fn assert_same_outputs(what: &str, expected: &[Vec<TokenId>], got: &[Vec<TokenId>]) {
    let tok = tokenizer();
    for (i, (e, g)) in expected.iter().zip(got).enumerate() {
        assert_eq!(
            e,
            g,
            "{what}: prompt {i} ({:?}) differs from its solo run:\n solo:    {:?}\n {what}: {:?}",
            PROMPTS[i],
            decode(&tok, e),
            decode(&tok, g)
        );
    }
}

#[test]
fn batching_and_preemption_do_not_change_greedy_outputs() {
    run(async {
        const MAX_TOKENS: u32 = 24;
        // Prefix caching off: the batched run must recompute every prompt, not reuse the
        // KV blocks the solo runs left behind.
        let mut cfg = test_config();
        cfg.cache.enable_prefix_caching = false;
        let engine = start(&cfg);
        let solo = solo_outputs(&engine, MAX_TOKENS).await;
        let distinct: std::collections::HashSet<_> = solo.iter().collect();
        assert_eq!(
            distinct.len(),
            PROMPTS.len(),
            "prompts should give distinct outputs"
        );
        assert_pool_drained(&engine).await;

        let batched = batched_outputs(&engine, MAX_TOKENS).await;
        assert_same_outputs("batched", &solo, &batched);
        assert_pool_drained(&engine).await;
        assert_eq!(engine.scheduler_stats().await.unwrap().num_preemptions, 0);

        // A pool for about four of these sequences (prompt + 24 tokens ≈ 3 blocks each) and
        // a 64-token step budget: prompts are prefilled in chunks, and running sequences
        // are preempted (and recomputed) when decode needs blocks. Prefix caching is on,
        // so recomputation may also come from cached blocks.
        let mut small = test_config();
        small.cache.num_blocks = 12;
        small.scheduler.max_num_batched_tokens = 64;
        let small = start(&small);
        let squeezed = batched_outputs(&small, MAX_TOKENS).await;
        assert_same_outputs("preempted", &solo, &squeezed);
        let stats = small.scheduler_stats().await.unwrap();
        assert!(
            stats.num_preemptions > 0,
            "no preemption happened: {stats:?}"
        );
        assert_pool_drained(&small).await;
        assert_pool_drained(&engine).await;
    });
}

#[test]
fn chunked_prefill_matches_whole_prefill() {
    run(async {
        let prompt = long_prompt(19);
        let mut whole_cfg = test_config();
        whole_cfg.scheduler.max_num_batched_tokens = 512;
        let mut chunked_cfg = test_config();
        chunked_cfg.scheduler.max_num_batched_tokens = 32;
        chunked_cfg.scheduler.max_num_seqs = 8;
        let whole = start(&whole_cfg);
        let chunked = start(&chunked_cfg);

        let a = generate(&whole, text_request("whole", &prompt, greedy(24))).await;
        let (_, usage) = a.finished();
        assert!(
            (250..=400).contains(&usage.prompt_tokens),
            "the long prompt has {} tokens",
            usage.prompt_tokens
        );
        let b = generate(&chunked, text_request("chunked", &prompt, greedy(24))).await;
        assert_eq!(b.finished().1.prompt_tokens, usage.prompt_tokens);
        assert_eq!(
            a.token_ids, b.token_ids,
            "chunked: {:?}\nwhole: {:?}",
            b.text, a.text
        );
        assert_eq!(a.text, b.text);

        // Again on the chunked engine: the prompt's full blocks now come from the prefix
        // cache, and the output must not change.
        let before = chunked.scheduler_stats().await.unwrap().prefix_cache_hits;
        let c = generate(&chunked, text_request("cached", &prompt, greedy(24))).await;
        let after = chunked.scheduler_stats().await.unwrap().prefix_cache_hits;
        assert!(after > before, "no prefix cache hit ({before} → {after})");
        let (_, usage) = c.finished();
        assert!(
            usage.cached_tokens >= 16 && usage.cached_tokens < usage.prompt_tokens,
            "usage.cached_tokens {} of {} prompt tokens",
            usage.cached_tokens,
            usage.prompt_tokens
        );
        assert_eq!(a.finished().1.cached_tokens, 0);
        assert_eq!(
            a.token_ids, c.token_ids,
            "cached: {:?}\nwhole: {:?}",
            c.text, a.text
        );

        assert_pool_drained(&whole).await;
        assert_pool_drained(&chunked).await;
    });
}

#[test]
fn seeded_sampling_reproduces_alone_and_in_a_batch() {
    run(async {
        let engine = start(&test_config());
        let prompt = "Write a short poem about the ocean:";
        let seeded = |seed: Option<u64>| SamplingParams {
            temperature: 0.8,
            seed,
            max_tokens: 32,
            ignore_eos: true,
            ..SamplingParams::default()
        };
        let a = generate(&engine, text_request("a", prompt, seeded(Some(7)))).await;
        let b = generate(&engine, text_request("b", prompt, seeded(Some(7)))).await;
        assert_eq!(a.finished().1.completion_tokens, 32);
        assert_eq!(
            a.token_ids, b.token_ids,
            "same seed, alone, twice: {:?} vs {:?}",
            a.text, b.text
        );

        // The same request in the middle of a batch of eight others: seeded with other
        // seeds, unseeded, other prompts, the same prompt.
        let mut requests: Vec<GenerateRequest> = (0..8)
            .map(|i| {
                let seed = if i % 2 == 0 {
                    Some(100 + i as u64)
                } else {
                    None
                };
                let p = if i % 3 == 0 { prompt } else { PROMPTS[i] };
                text_request(format!("other-{i}"), p, seeded(seed))
            })
            .collect();
        requests.insert(4, text_request("c", prompt, seeded(Some(7))));
        let outcomes = generate_all(&engine, requests).await;
        for o in &outcomes {
            assert_eq!(o.finished().1.completion_tokens, 32);
        }
        assert_eq!(
            a.token_ids, outcomes[4].token_ids,
            "same seed inside a batch: {:?} vs {:?}",
            a.text, outcomes[4].text
        );

        let d = generate(&engine, text_request("d", prompt, seeded(Some(8)))).await;
        assert_ne!(
            a.token_ids, d.token_ids,
            "seeds 7 and 8 gave the same output {:?}",
            a.text
        );
        assert_pool_drained(&engine).await;
    });
}

#[test]
fn stop_strings_stop_tokens_max_tokens_and_min_tokens() {
    run(async {
        let engine = start(&test_config());
        let tok = tokenizer();
        let prompt = "Once upon a time, in a small village by the sea, there lived";
        let full = generate(&engine, text_request("full", prompt, greedy(32))).await;
        assert_eq!(full.finished().0, FinishReason::Length);
        let text = full.text.clone();

        // A stop string taken from the middle of the text (starting mid-word, so it is
        // likely to span a token boundary); the output must be the text before its first
        // occurrence.
        let chars: Vec<(usize, char)> = text.char_indices().collect();
        assert!(chars.len() > 20, "continuation too short: {text:?}");
        let start = chars[chars.len() / 2].0 + 1;
        let start = (start..text.len())
            .find(|&i| text.is_char_boundary(i))
            .unwrap();
        let end = (start + 5..=text.len())
            .find(|&i| text.is_char_boundary(i))
            .unwrap();
        let stop = text[start..end].to_string();
        let first = text.find(&stop).unwrap();
        assert!(first > 0, "stop string {stop:?} starts the text {text:?}");
        let params = SamplingParams {
            stop: vec!["NEVER-APPEARS".into(), stop.clone()],
            ..greedy(32)
        };
        let cut = generate(&engine, text_request("stop", prompt, params)).await;
        let (reason, usage) = cut.finished();
        assert_eq!(reason, FinishReason::Stop, "stop {stop:?} in {text:?}");
        assert_eq!(cut.text, text[..first], "stop string {stop:?}");
        assert!(!cut.text.contains(&stop));
        assert!(usage.completion_tokens < 32);
        assert_eq!(
            cut.token_ids,
            full.token_ids[..usage.completion_tokens as usize]
        );

        // max_tokens ends with Length after exactly that many tokens.
        let short = generate(&engine, text_request("short", prompt, greedy(5))).await;
        let (reason, usage) = short.finished();
        assert_eq!(reason, FinishReason::Length);
        assert_eq!(usage.completion_tokens, 5);
        assert_eq!(short.token_ids, full.token_ids[..5]);

        // A stop token id: the first token (from the fifth on) not generated before.
        let ids = &full.token_ids;
        let k = (4..ids.len())
            .find(|&k| !ids[..k].contains(&ids[k]))
            .expect("a fresh token");
        let params = SamplingParams {
            stop_token_ids: vec![ids[k]],
            ..greedy(32)
        };
        let st = generate(&engine, text_request("stop-id", prompt, params)).await;
        let (reason, usage) = st.finished();
        assert_eq!(
            reason,
            FinishReason::Stop,
            "stop token {} at step {k}",
            ids[k]
        );
        assert_eq!(usage.completion_tokens as usize, k + 1);
        assert_eq!(st.token_ids, ids[..=k], "the stop token ends the ids");
        assert_eq!(
            st.text,
            decode(&tok, &ids[..k]),
            "the stop token is not in the text"
        );

        // min_tokens holds EOS back. First a request that ends early on EOS by itself ...
        let chat = Prompt::Messages(vec![ChatMessage::new("user", "What is 2 + 2?")]);
        let natural_params = SamplingParams {
            temperature: 0.0,
            max_tokens: 96,
            ..SamplingParams::default()
        };
        let natural = generate(
            &engine,
            GenerateRequest {
                id: "natural".into(),
                prompt: chat.clone(),
                params: natural_params.clone(),
            },
        )
        .await;
        let (reason, usage) = natural.finished();
        assert_eq!(reason, FinishReason::Stop, "{:?}", natural.text);
        let n = usage.completion_tokens;
        assert!(n + 10 <= 96, "the natural answer is too long ({n} tokens)");
        // ... then the same with min_tokens beyond its natural length.
        let min_tokens = n + 10;
        let forced = generate(
            &engine,
            GenerateRequest {
                id: "min-tokens".into(),
                prompt: chat,
                params: SamplingParams {
                    min_tokens,
                    ..natural_params
                },
            },
        )
        .await;
        let (_, usage) = forced.finished();
        assert!(
            usage.completion_tokens >= min_tokens,
            "min_tokens {min_tokens}, got {} ({:?})",
            usage.completion_tokens,
            forced.text
        );
        assert_pool_drained(&engine).await;
    });
}

#[test]
fn streamed_text_is_utf8_safe_and_matches_the_full_decode() {
    run(async {
        let engine = start(&test_config());
        let tok = tokenizer();
        let prompts = [
            "日本の首都は",
            "Here are some emojis: 😀😃😄",
            "Привет, как дела?",
            "Le café est très",
            "中文：我爱你。English: I love you. 中文：",
        ];
        let requests = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| text_request(format!("utf8-{i}"), p, greedy(32)))
            .collect();
        let outcomes = generate_all(&engine, requests).await;
        let mut split_chars = 0;
        for (p, o) in prompts.iter().zip(&outcomes) {
            o.finished();
            let full = decode(&tok, &o.token_ids);
            assert_eq!(
                o.text, full,
                "prompt {p:?}: streamed text differs from the full decode"
            );
            let replacement = |s: &str| s.matches('\u{FFFD}').count();
            let streamed: usize = o.deltas.iter().map(|(t, _)| replacement(t)).sum::<usize>()
                + replacement(&o.final_text);
            assert_eq!(
                streamed,
                replacement(&full),
                "prompt {p:?}: the stream holds U+FFFD the full decode has not: {:?}",
                o.deltas
            );
            // Count generated tokens that are not whole characters by themselves: the
            // stream must have glued them to their neighbours.
            split_chars += o
                .token_ids
                .iter()
                .filter(|&&id| decode(&tok, &[id]).contains('\u{FFFD}'))
                .count();
        }
        assert!(
            split_chars > 0,
            "no generated token split a character: the test did not exercise UTF-8 joining"
        );
        assert_pool_drained(&engine).await;
    });
}

#[test]
fn bad_requests_get_typed_errors_and_the_engine_keeps_serving() {
    run(async {
        let mut cfg = test_config();
        cfg.model.max_model_len = 256;
        let engine = start(&cfg);
        assert_eq!(engine.info.max_model_len, 256);
        let vocab = engine.info.vocab_size as TokenId;
        let ok = greedy(8);
        let with = |f: fn(&mut SamplingParams)| {
            let mut p = greedy(8);
            f(&mut p);
            p
        };
        use ErrorCode::{InvalidRequest, PromptTooLong};
        let text = |p: &str| Prompt::Text(p.to_string());
        let hi = text("Hello, my name is");
        // (name, prompt, params, expected code, a word the message must contain)
        let bad: Vec<(&str, Prompt, SamplingParams, ErrorCode, &str)> = vec![
            (
                "temperature -1",
                hi.clone(),
                with(|p| p.temperature = -1.0),
                InvalidRequest,
                "temperature",
            ),
            (
                "temperature NaN",
                hi.clone(),
                with(|p| p.temperature = f32::NAN),
                InvalidRequest,
                "temperature",
            ),
            (
                "top_p 0",
                hi.clone(),
                with(|p| p.top_p = 0.0),
                InvalidRequest,
                "top_p",
            ),
            (
                "top_p 1.5",
                hi.clone(),
                with(|p| p.top_p = 1.5),
                InvalidRequest,
                "top_p",
            ),
            (
                "max_tokens 0",
                hi.clone(),
                with(|p| p.max_tokens = 0),
                InvalidRequest,
                "max_tokens",
            ),
            (
                "max_tokens 1e9",
                hi.clone(),
                with(|p| p.max_tokens = 1_000_000_000),
                InvalidRequest,
                "max_tokens",
            ),
            (
                "min_tokens > max_tokens",
                hi.clone(),
                with(|p| p.min_tokens = 9),
                InvalidRequest,
                "min_tokens",
            ),
            (
                "empty stop string",
                hi.clone(),
                with(|p| p.stop = vec![String::new()]),
                InvalidRequest,
                "stop",
            ),
            (
                "stop token id outside the vocabulary",
                hi.clone(),
                with(|p| p.stop_token_ids = vec![u32::MAX]),
                InvalidRequest,
                "stop",
            ),
            (
                "prompt longer than the context",
                text(&long_prompt(35)),
                ok.clone(),
                PromptTooLong,
                "256",
            ),
            (
                "token id outside the vocabulary",
                Prompt::TokenIds(vec![1, 2, vocab + 5]),
                ok.clone(),
                InvalidRequest,
                "vocabulary",
            ),
            (
                "empty text prompt",
                text(""),
                ok.clone(),
                InvalidRequest,
                "empty",
            ),
            (
                "empty token prompt",
                Prompt::TokenIds(vec![]),
                ok.clone(),
                InvalidRequest,
                "empty",
            ),
            (
                "no messages",
                Prompt::Messages(vec![]),
                ok.clone(),
                InvalidRequest,
                "empty",
            ),
        ];
        // Every bad request sits between good ones, all submitted at once.
        let mut requests = Vec::new();
        let mut expected = Vec::new();
        for (i, (name, prompt, params, code, word)) in bad.into_iter().enumerate() {
            requests.push(text_request(format!("good-{i}"), PROMPTS[i], ok.clone()));
            expected.push(None);
            requests.push(GenerateRequest {
                id: format!("bad-{i}"),
                prompt,
                params,
            });
            expected.push(Some((name, code, word)));
        }
        requests.push(GenerateRequest {
            id: "good-ids".into(),
            prompt: Prompt::TokenIds(vec![1, 504, 3575, 282]),
            params: ok.clone(),
        });
        expected.push(None);
        let outcomes = generate_all(&engine, requests).await;
        for (o, want) in outcomes.iter().zip(&expected) {
            match want {
                None => {
                    let (reason, usage) = o.finished();
                    assert_eq!(reason, FinishReason::Length);
                    assert_eq!(usage.completion_tokens, 8);
                }
                Some((name, code, word)) => {
                    let e = o.error();
                    assert_eq!(e.code, *code, "{name}: {e}");
                    assert!(
                        e.message.contains(word),
                        "{name}: message {:?} lacks {word:?}",
                        e.message
                    );
                    assert!(o.deltas.is_empty(), "{name}: deltas before the error");
                }
            }
        }
        // Still serving afterwards.
        let after = generate(&engine, text_request("after", PROMPTS[0], ok)).await;
        assert_eq!(after.token_ids, outcomes[0].token_ids);
        assert_pool_drained(&engine).await;
    });
}

#[test]
fn chat_prompt_answers_the_capital_of_france() {
    run(async {
        let engine = start(&test_config());
        let o = generate(
            &engine,
            GenerateRequest {
                id: "chat".into(),
                prompt: Prompt::Messages(vec![ChatMessage::new(
                    "user",
                    "What is the capital of France?",
                )]),
                params: SamplingParams {
                    temperature: 0.0,
                    max_tokens: 32,
                    ..SamplingParams::default()
                },
            },
        )
        .await;
        o.finished();
        assert!(o.text.contains("Paris"), "answer: {:?}", o.text);
        assert_pool_drained(&engine).await;
    });
}

/// A burst beyond `scheduler.max_waiting` gets `overloaded` at once for the excess; the
/// rest completes, and the engine serves normally afterwards.
#[test]
fn a_burst_beyond_max_waiting_is_answered_overloaded() {
    let mut cfg = test_config();
    cfg.scheduler.max_num_seqs = 1;
    cfg.scheduler.max_waiting = 2;
    run(async move {
        let engine = start(&cfg);
        let burst: Vec<GenerateRequest> = (0..12)
            .map(|i| {
                text_request(
                    format!("burst-{i}"),
                    &format!("Burst request {i}."),
                    greedy(8),
                )
            })
            .collect();
        let outcomes = generate_all(&engine, burst).await;
        let mut completed = 0;
        let mut overloaded = 0;
        for o in &outcomes {
            match &o.end {
                End::Finished { .. } => {
                    assert_eq!(o.token_ids.len(), 8);
                    completed += 1;
                }
                End::Error(e) => {
                    assert_eq!(e.code, ErrorCode::Overloaded, "{e}");
                    assert!(e.message.contains("max_waiting"), "{}", e.message);
                    assert!(o.deltas.is_empty(), "an overloaded request streamed text");
                    overloaded += 1;
                }
            }
        }
        // One running seat and two waiting places: at most three requests (plus one that
        // the scheduler admitted between two arrivals) are taken; the rest are refused.
        assert_eq!(completed + overloaded, 12);
        assert!(completed >= 2, "only {completed} completed");
        assert!(overloaded >= 12 - 4, "only {overloaded} overloaded of 12");
        let after = generate(
            &engine,
            text_request("after", "After the burst.", greedy(8)),
        )
        .await;
        assert_eq!(after.finished().0, FinishReason::Length);
        assert_pool_drained(&engine).await;
    });
}

#[test]
fn n_completions_share_the_prompt_and_each_matches_its_own_seed() {
    run(async {
        let engine = start(&test_config());
        let ids = tokenizer()
            .encode(&long_prompt(4))
            .expect("the prompt encodes");
        let sampled = |n: u32, seed: u64| SamplingParams {
            temperature: 0.9,
            seed: Some(seed),
            max_tokens: 20,
            ignore_eos: true,
            n,
            ..SamplingParams::default()
        };
        // 32 prompt tokens: the forks' last prompt token sits in a full shared block;
        // 37: in a partial one. Either way it is recomputed into a copy of that block.
        for len in [32usize, 37] {
            let request = |id: String, params| GenerateRequest {
                id,
                prompt: Prompt::TokenIds(ids[..len].to_vec()),
                params,
            };
            let first =
                collect_n(engine.generate(request(format!("n4-{len}"), sampled(4, 42)))).await;
            let again =
                collect_n(engine.generate(request(format!("n4-again-{len}"), sampled(4, 42))))
                    .await;
            assert_eq!(first.len(), 4);
            for (i, (a, b)) in first.iter().zip(&again).enumerate() {
                let (reason, usage) = a.finished();
                assert_eq!(reason, FinishReason::Length, "index {i}");
                assert_eq!(usage.completion_tokens, 20, "index {i}");
                assert_eq!(usage.prompt_tokens as usize, len, "index {i}");
                if i > 0 {
                    // A fork computed only the last prompt token itself.
                    assert_eq!(usage.cached_tokens as usize, len - 1, "index {i}");
                    assert_eq!(b.finished().1.cached_tokens as usize, len - 1, "index {i}");
                }
                assert_eq!(a.token_ids, b.token_ids, "index {i}, same seed twice");
                // Completion i samples exactly as a request of its own seeded 42 + i: the
                // shared prompt blocks and the copied one hold what its own prefill would.
                let alone = generate(
                    &engine,
                    request(format!("alone-{len}-{i}"), sampled(1, 42 + i as u64)),
                )
                .await;
                assert_eq!(
                    a.token_ids,
                    alone.token_ids,
                    "index {i} vs a lone request with seed {}: {:?} vs {:?}",
                    42 + i,
                    a.text,
                    alone.text
                );
            }
            let distinct: std::collections::HashSet<_> =
                first.iter().map(|o| o.token_ids.clone()).collect();
            assert!(
                distinct.len() >= 3,
                "four seeds gave {} distinct samples",
                distinct.len()
            );
            assert_pool_drained(&engine).await;
        }

        // Greedy: four identical completions.
        let greedy4 = SamplingParams { n: 4, ..greedy(12) };
        let outs = collect_n(engine.generate(text_request("g4", PROMPTS[0], greedy4))).await;
        let solo = generate(&engine, text_request("g1", PROMPTS[0], greedy(12))).await;
        for o in &outs {
            assert_eq!(o.token_ids, solo.token_ids);
        }

        // A cancel ends every completion with abort, and their blocks go back.
        let long = SamplingParams {
            max_tokens: 400,
            ..sampled(3, 1)
        };
        let mut rx = engine.generate(text_request("n3-cancel", PROMPTS[1], long));
        let (index, first_event) = rx.recv().await.expect("a first event");
        assert!(index < 3 && !first_event.is_final(), "{first_event:?}");
        assert!(engine.cancel("n3-cancel").await);
        let outs = collect_n(rx).await;
        assert_eq!(outs.len(), 3);
        for o in &outs {
            assert_eq!(o.finished().0, FinishReason::Abort);
        }

        // Bad n values are refused naming the field; n above max_num_seqs too.
        for n in [0, 33] {
            let o = generate(&engine, text_request("bad-n", PROMPTS[0], sampled(n, 1))).await;
            let e = o.error();
            assert_eq!(e.code, ErrorCode::InvalidRequest);
            assert!(e.message.contains("n must be"), "{}", e.message);
        }
        assert_pool_drained(&engine).await;
    });

    // A pool too small for all four: completions are preempted (some before their first
    // token, while copying their block), recomputed, and still sample as alone.
    run(async {
        let mut cfg = test_config();
        cfg.cache.num_blocks = 8;
        let engine = start(&cfg);
        let ids = tokenizer()
            .encode(&long_prompt(4))
            .expect("the prompt encodes");
        let request = |id: String, n: u32, seed: u64| GenerateRequest {
            id,
            prompt: Prompt::TokenIds(ids[..37].to_vec()),
            params: SamplingParams {
                temperature: 0.9,
                seed: Some(seed),
                max_tokens: 40,
                ignore_eos: true,
                n,
                ..SamplingParams::default()
            },
        };
        let four = collect_n(engine.generate(request("small-n4".into(), 4, 5))).await;
        let stats = engine.scheduler_stats().await.expect("stats");
        assert!(
            stats.num_preemptions > 0,
            "the pool was big enough: {stats:?}"
        );
        for (i, o) in four.iter().enumerate() {
            assert_eq!(o.finished().1.completion_tokens, 40);
            let alone = generate(&engine, request(format!("small-{i}"), 1, 5 + i as u64)).await;
            assert_eq!(o.token_ids, alone.token_ids, "index {i} after preemption");
        }
        assert_pool_drained(&engine).await;
    });

    run(async {
        let mut cfg = test_config();
        cfg.scheduler.max_num_seqs = 2;
        let engine = start(&cfg);
        let params = SamplingParams { n: 3, ..greedy(4) };
        let outs = collect_n(engine.generate(text_request("too-many", PROMPTS[0], params))).await;
        assert_eq!(outs.len(), 3);
        for o in &outs {
            let e = o.error();
            assert_eq!(e.code, ErrorCode::InvalidRequest);
            assert!(e.message.contains("max_num_seqs"), "{}", e.message);
        }
        assert_pool_drained(&engine).await;
    });
}
