//! Speculative decoding, with both proposers (n-gram prompt lookup, and a draft model —
//! here the default model itself), against the same engine without it, on the default
//! model: greedy outputs token-identical alone, batched, under preemption and with stop
//! strings; seeded sampling identical too (so the token frequencies over many samples are
//! the same); the drafts really were proposed and accepted — every one of them, greedy,
//! when the draft model is the target; and a draft model that cannot serve is refused.

mod common;

use std::collections::HashMap;

use common::*;
use pagoda_actors::config::{EngineConfig, SpecMethod};
use pagoda_actors::engine::Engine;
use pagoda_actors::messages::{SamplingParams, TokenId};
use pagoda_actors::protocol::{GenerateRequest, Prompt};

/// Prompts whose continuations copy from them (extraction, repetition) and ordinary ones.
const PROMPTS: [&str; 8] = [
    "Copy the list exactly.\nList: apples, pears, plums, cherries, grapes, melons.\nCopy: apples, pears,",
    "Name: Ada Lovelace. Born: 1815. Field: mathematics.\nName: Ada Lovelace. Born:",
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16,",
    "The order id is XK-2291-B. Please confirm the order id: XK-",
    "Repeat after me: the quick brown fox jumps over the lazy dog. The quick brown fox",
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived",
    "def fibonacci(n):",
];

fn speculating(mut cfg: EngineConfig, method: SpecMethod) -> EngineConfig {
    cfg.speculative.method = method;
    if method == SpecMethod::Draft {
        cfg.speculative.draft_model = cfg.model.path.clone();
    }
    cfg.speculative.num_speculative_tokens = 4;
    // Speculate at every batch size here: the point is exactness, not speed.
    cfg.speculative.max_num_seqs = 64;
    cfg
}

fn request(i: usize, prompt: &str, params: SamplingParams) -> GenerateRequest {
    GenerateRequest {
        id: format!("r{i}"),
        prompt: Prompt::Text(prompt.to_owned()),
        params,
    }
}

async fn solo(engine: &Engine, params: &SamplingParams) -> Vec<Vec<TokenId>> {
    let mut out = Vec::new();
    for (i, p) in PROMPTS.iter().enumerate() {
        out.push(
            generate(engine, request(i, p, params.clone()))
                .await
                .token_ids,
        );
    }
    out
}

async fn batched(engine: &Engine, params: &SamplingParams) -> Vec<Vec<TokenId>> {
    let reqs = PROMPTS
        .iter()
        .enumerate()
        .map(|(i, p)| request(i, p, params.clone()))
        .collect();
    generate_all(engine, reqs)
        .await
        .into_iter()
        .map(|o| o.token_ids)
        .collect()
}

fn sampled(seed: u64, max_tokens: u32) -> SamplingParams {
    SamplingParams {
        temperature: 0.8,
        seed: Some(seed),
        max_tokens,
        ignore_eos: true,
        ..SamplingParams::default()
    }
}

/// The distribution (prompt, token) of each prompt's second output token — the first one a
/// draft decides — over `seeds`, as frequencies.
async fn second_tokens(
    engine: &Engine,
    seeds: std::ops::Range<u64>,
) -> HashMap<(usize, TokenId), f64> {
    let mut counts: HashMap<(usize, TokenId), f64> = HashMap::new();
    let mut n = 0.0;
    for seed in seeds {
        for (i, out) in batched(engine, &sampled(seed, 3)).await.iter().enumerate() {
            *counts.entry((i, out[1])).or_default() += 1.0;
            n += 1.0;
        }
    }
    counts.values_mut().for_each(|c| *c /= n);
    counts
}

/// Total variation distance of two distributions.
fn tv(a: &HashMap<(usize, TokenId), f64>, b: &HashMap<(usize, TokenId), f64>) -> f64 {
    let keys: std::collections::HashSet<_> = a.keys().chain(b.keys()).collect();
    keys.into_iter()
        .map(|k| (a.get(k).unwrap_or(&0.0) - b.get(k).unwrap_or(&0.0)).abs())
        .sum::<f64>()
        / 2.0
}

/// A draft model's sampled proposals go through rejection sampling: the tokens differ from
/// non-speculative sampling with the same seed (the random streams are used differently),
/// but their distribution is the target's. Checked on the token a draft decides first,
/// over 8 prompts × 48 seeds (384 samples): the total variation distance between
/// speculative and plain sampling must be within the sampling noise, measured alongside as
/// the distance between plain sampling and plain sampling with other seeds: at most
/// 1.25 × that + 0.02 (a draft taken without verification — always the likeliest token —
/// is several times farther). The exact check, with distributions that differ, is the
/// sampler's unit test `verified_drafts_follow_the_target_distribution_whatever_the_draft_proposes`.
async fn sampled_drafts_follow_the_target_distribution(off: &Engine, on: &Engine) {
    let before = on.scheduler_stats().await.expect("stats").spec;
    let plain = second_tokens(off, 0..48).await;
    let plain_again = second_tokens(off, 1000..1048).await;
    let speculative = second_tokens(on, 0..48).await;
    let spec = on.scheduler_stats().await.expect("stats").spec;
    let (proposed, kept) = (
        spec.draft_tokens - before.draft_tokens,
        spec.accepted_tokens - before.accepted_tokens,
    );
    let (noise, distance) = (tv(&plain, &plain_again), tv(&plain, &speculative));
    eprintln!(
        "sampled drafts: {kept} of {proposed} kept; TV(plain, speculative) = {distance:.3}, TV(plain, plain with other seeds) = {noise:.3}"
    );
    assert!(
        distance <= 1.25 * noise + 0.02,
        "speculative sampling drifted from the target's distribution: TV {distance:.3} (plain vs plain: {noise:.3})"
    );
    // What the tolerance rules out: always the likeliest token.
    let greedy = {
        let mut g: HashMap<(usize, TokenId), f64> = HashMap::new();
        for (i, out) in batched(off, &greedy(3)).await.iter().enumerate() {
            g.insert((i, out[1]), 1.0 / PROMPTS.len() as f64);
        }
        g
    };
    let biased = tv(&plain, &greedy);
    assert!(
        biased > 1.25 * noise + 0.02,
        "the test cannot tell: TV(plain, greedy) {biased:.3}, noise {noise:.3}"
    );
    // The draft is the target: its sampled proposals are nearly always kept (a greedy
    // proposal would be kept only with the probability of the likeliest token).
    assert!(
        kept as f64 >= 0.9 * proposed as f64,
        "sampled drafts: {kept} of {proposed} kept"
    );
    // Reproducible with a seed.
    let params = sampled(3, 16);
    same(
        "draft model, seed 3, twice",
        &batched(on, &params).await,
        &batched(on, &params).await,
    );
}

fn same(what: &str, expected: &[Vec<TokenId>], got: &[Vec<TokenId>]) {
    for (i, (e, g)) in expected.iter().zip(got).enumerate() {
        assert_eq!(e, g, "{what}: prompt {i} ({:?}) differs", PROMPTS[i]);
    }
}

#[test]
fn ngram_speculation_changes_nothing_but_the_number_of_steps() {
    changes_nothing_but_the_number_of_steps(SpecMethod::Ngram);
}

#[test]
fn draft_model_speculation_changes_nothing_but_the_number_of_steps() {
    changes_nothing_but_the_number_of_steps(SpecMethod::Draft);
}

fn changes_nothing_but_the_number_of_steps(method: SpecMethod) {
    run(async {
        let off = start(&test_config());
        let on = start(&speculating(test_config(), method));
        let greedy = greedy(48);

        let reference = solo(&off, &greedy).await;
        same("greedy, alone", &reference, &solo(&on, &greedy).await);
        same("greedy, batched", &reference, &batched(&on, &greedy).await);
        let spec = on.scheduler_stats().await.expect("stats").spec;
        assert!(
            spec.accepted_tokens > 20,
            "hardly any draft was accepted on copy-heavy prompts: {spec:?}"
        );
        if method == SpecMethod::Draft {
            // The draft is the target: its greedy proposals are the target's greedy tokens.
            assert_eq!(
                spec.accepted_tokens, spec.draft_tokens,
                "a draft model equal to the target accepts every greedy proposal: {spec:?}"
            );
        }
        eprintln!(
            "greedy: {} verification runs, {} draft tokens, {} accepted ({:.0} %)",
            spec.drafts,
            spec.draft_tokens,
            spec.accepted_tokens,
            100.0 * spec.accepted_tokens as f64 / spec.draft_tokens.max(1) as f64
        );

        // Stop strings: cut where the reference output has them, speculating or not.
        for (i, p) in PROMPTS.iter().enumerate().take(5) {
            let tokens = generate(&off, request(i, p, greedy.clone())).await;
            let Some(stop) = tokens.text.get(6..12).filter(|s| !s.trim().is_empty()) else {
                continue;
            };
            let params = SamplingParams {
                stop: vec![stop.to_owned()],
                ..greedy.clone()
            };
            let a = generate(&off, request(i, p, params.clone())).await;
            let b = generate(&on, request(i, p, params)).await;
            assert_eq!(a.text, b.text, "stop string {stop:?} on prompt {i}");
            assert_eq!(
                a.token_ids, b.token_ids,
                "stop string {stop:?} on prompt {i}"
            );
            assert_eq!(a.finished().0, b.finished().0);
        }

        if method == SpecMethod::Ngram {
            // Seeded sampling at temperature 0.8: the same samples, so over 8 prompts × 6
            // seeds the token frequencies are the same (tolerance: none).
            let mut freq_off: HashMap<TokenId, usize> = HashMap::new();
            let mut freq_on: HashMap<TokenId, usize> = HashMap::new();
            for seed in 0..6u64 {
                let params = sampled(seed, 32);
                let a = batched(&off, &params).await;
                let b = batched(&on, &params).await;
                same(&format!("seed {seed}, temperature 0.8"), &a, &b);
                for t in a.iter().flatten() {
                    *freq_off.entry(*t).or_default() += 1;
                }
                for t in b.iter().flatten() {
                    *freq_on.entry(*t).or_default() += 1;
                }
            }
            assert_eq!(freq_off, freq_on);
        } else {
            sampled_drafts_follow_the_target_distribution(&off, &on).await;
        }
        assert_pool_drained(&off).await;
        assert_pool_drained(&on).await;
    });

    // A pool too small for the batch: sequences are preempted (drafts and all) and
    // recomputed, and the outputs still equal those without speculation.
    run(async {
        let mut small = test_config();
        small.cache.num_blocks = 14;
        let off = start(&test_config());
        let on = start(&speculating(small, method));
        let greedy = greedy(64);
        let reference = solo(&off, &greedy).await;
        same(
            "greedy, small pool",
            &reference,
            &batched(&on, &greedy).await,
        );
        let stats = on.scheduler_stats().await.expect("stats");
        assert!(stats.num_preemptions > 0, "no preemption: {stats:?}");
        assert!(stats.spec.accepted_tokens > 0, "{stats:?}");
        assert_pool_drained(&on).await;
    });
}

#[test]
fn a_draft_model_that_cannot_serve_is_refused_with_a_reason() {
    run(async {
        let refused = |path: &str| {
            let mut cfg = speculating(test_config(), SpecMethod::Draft);
            cfg.speculative.draft_model = path.to_owned();
            match Engine::start(&cfg) {
                Ok(_) => panic!("a draft model at {path} was accepted"),
                Err(e) => e.to_string(),
            }
        };
        // Another tokenizer: the tiny Qwen2 fixture's.
        let qwen = format!("{}/tests/fixtures/tiny-qwen2", env!("CARGO_MANIFEST_DIR"));
        let e = refused(&qwen);
        assert!(
            e.contains("speculative.draft_model") && e.contains("tokenizer differs"),
            "{e}"
        );
        let e = refused("/nonexistent/draft.gguf");
        assert!(e.contains("/nonexistent/draft.gguf"), "{e}");
        // No path at all.
        let mut cfg = speculating(test_config(), SpecMethod::Draft);
        cfg.speculative.draft_model.clear();
        let e = Engine::start(&cfg).err().map(|e| e.to_string());
        assert!(
            e.as_deref()
                .is_some_and(|e| e.contains("needs speculative.draft_model")),
            "{e:?}"
        );
    });
}
