//! Every model family against Hugging Face transformers: a tiny checkpoint with random
//! weights per family (`tools/reference/make_families.py` made it, and its goldens), loaded
//! from its Hugging Face directory and from a GGUF file of the same weights where llama.cpp
//! reads the family from GGUF:
//!
//! - float32 logits at the first and the last position within 1e-3 of transformers;
//! - 64 greedy tokens identical, through the whole engine, each prompt alone and all of
//!   them batched with other requests;
//! - the fixture's tokenizer encodes as transformers' does, from either file.

mod common;

use std::path::{Path, PathBuf};

use pagoda_actors::config::KvCacheDtype;
use pagoda_actors::executor::backend::Cpu;
use pagoda_actors::executor::models::{self, sequence_logits};
use pagoda_actors::executor::open_model;
use pagoda_actors::protocol::{GenerateRequest, Prompt};
use serde::Deserialize;

const TOLERANCE: f32 = 1e-3;

#[derive(Deserialize)]
struct Goldens {
    meta: Meta,
    tokenizer_cases: Vec<TokCase>,
    prompts: Vec<Case>,
}

#[derive(Deserialize)]
struct Meta {
    fixture_dir: String,
    gguf: Option<String>,
}

#[derive(Deserialize)]
struct TokCase {
    text: String,
    ids: Vec<u32>,
}

#[derive(Deserialize)]
struct Case {
    ids: Vec<u32>,
    logits_pos0: Vec<f32>,
    logits_last: Vec<f32>,
    greedy64: Vec<u32>,
}

fn goldens(family: &str) -> Goldens {
    let path = common::repo_root().join(format!("tests/goldens/tiny_{family}.json"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (tools/reference/make_families.py)", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The fixture's files: the Hugging Face directory, and the GGUF when there is one.
fn sources(g: &Goldens) -> Vec<PathBuf> {
    let root = common::repo_root();
    let mut out = vec![root.join(&g.meta.fixture_dir)];
    if let Some(gguf) = &g.meta.gguf {
        out.push(root.join(gguf));
    }
    out
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn check_logits(family: &str, path: &Path, g: &Goldens) {
    let (mut src, fam, spec) = open_model(path).unwrap_or_else(|e| panic!("{family}: {e}"));
    let cpu = Cpu::default();
    let model = models::load(&cpu, fam, &mut src).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(model.spec(), &spec);
    let vocab = spec.vocab_size;
    for (i, case) in g.prompts.iter().enumerate() {
        let rows = [0, case.ids.len() - 1];
        let logits = sequence_logits(&cpu, model.as_ref(), &case.ids, &rows, KvCacheDtype::F32)
            .unwrap_or_else(|e| panic!("{family} prompt {i}: {e}"));
        let d0 = max_diff(&logits[..vocab], &case.logits_pos0);
        let dl = max_diff(&logits[vocab..], &case.logits_last);
        eprintln!(
            "{family} {} prompt {i}: max |Δlogit| first {d0:.2e}, last {dl:.2e}",
            path.file_name().unwrap_or_default().to_string_lossy()
        );
        assert!(
            d0 <= TOLERANCE && dl <= TOLERANCE,
            "{family} {}: prompt {i} logits differ by {d0} / {dl}",
            path.display()
        );
    }
}

fn request(id: String, ids: &[u32], n: u32) -> GenerateRequest {
    GenerateRequest {
        id,
        prompt: Prompt::TokenIds(ids.to_vec()),
        params: common::greedy(n),
    }
}

fn check_greedy(family: &str, path: &Path, g: &Goldens) {
    let mut cfg = common::test_config();
    cfg.model.path = path.display().to_string();
    cfg.cache.kv_cache_dtype = KvCacheDtype::F32;
    let prompts: Vec<Vec<u32>> = g.prompts.iter().map(|c| c.ids.clone()).collect();
    let (alone, batched) = common::run(async move {
        let engine = common::start(&cfg);
        let mut alone = Vec::new();
        for (i, ids) in prompts.iter().enumerate() {
            let out = common::generate(&engine, request(format!("alone-{i}"), ids, 64)).await;
            alone.push(out.token_ids);
        }
        // All golden prompts at once, among other requests of other lengths.
        let mut reqs = Vec::new();
        for (i, ids) in prompts.iter().enumerate() {
            reqs.push(request(format!("batched-{i}"), ids, 64));
            let mut other = ids.clone();
            other.rotate_left(i + 1);
            reqs.push(request(
                format!("other-{i}"),
                &other[..other.len() - i],
                7 + i as u32,
            ));
        }
        let outs = common::generate_all(&engine, reqs).await;
        common::assert_pool_drained(&engine).await;
        let batched: Vec<Vec<u32>> = outs.into_iter().step_by(2).map(|o| o.token_ids).collect();
        (alone, batched)
    });
    for (i, case) in g.prompts.iter().enumerate() {
        assert_eq!(
            alone[i],
            case.greedy64,
            "{family} {}: prompt {i} alone",
            path.display()
        );
        assert_eq!(
            batched[i],
            case.greedy64,
            "{family} {}: prompt {i} batched",
            path.display()
        );
    }
}

fn check_tokenizer(family: &str, path: &Path, g: &Goldens) {
    let parts = if path.is_dir() {
        pagoda_actors::tokenizer::tokenizer_from_hf_dir(path)
    } else {
        pagoda_actors::tokenizer::tokenizer_from_gguf_file(path)
    }
    .unwrap_or_else(|e| panic!("{family} tokenizer {}: {e}", path.display()));
    for c in &g.tokenizer_cases {
        let ids = parts
            .tokenizer
            .encode(c.text.as_str(), false)
            .unwrap_or_else(|e| panic!("{e}"))
            .get_ids()
            .to_vec();
        assert_eq!(ids, c.ids, "{family} {}: {:?}", path.display(), c.text);
    }
}

fn family(name: &str) {
    let g = goldens(name);
    for path in sources(&g) {
        check_tokenizer(name, &path, &g);
        check_logits(name, &path, &g);
        check_greedy(name, &path, &g);
    }
}

#[test]
fn qwen2_matches_transformers() {
    family("qwen2");
}

#[test]
fn an_unsupported_architecture_is_a_typed_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = common::repo_root().join("tests/fixtures/tiny-qwen2");
    for f in [
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(src.join(f), dir.path().join(f)).expect("copy");
    }
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).expect("read"))
            .expect("json");
    cfg["architectures"] = serde_json::json!(["GPTNeoXForCausalLM"]);
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).expect("write");
    let err = match open_model(dir.path()) {
        Ok(_) => panic!("an unsupported architecture must not load"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("GPTNeoXForCausalLM"), "{err}");
    assert!(err.contains("supported"), "{err}");
}

#[test]
fn mistral_with_a_sliding_window_matches_transformers() {
    family("mistral");
}

/// Mistral's window lets a sequence run in a pool far smaller than its length: blocks
/// before the window are given back as it goes (with preemption too: two sequences do not
/// fit at once), and the output is still transformers'.
#[test]
fn mistral_runs_sequences_longer_than_its_pool() {
    let g = goldens("mistral");
    for path in sources(&g) {
        let mut cfg = common::test_config();
        cfg.model.path = path.display().to_string();
        cfg.cache.kv_cache_dtype = KvCacheDtype::F32;
        cfg.cache.block_size = 4;
        cfg.cache.num_blocks = 8; // 32 token slots; each sequence is 80 to 91 tokens long
        cfg.scheduler.max_num_batched_tokens = 8;
        cfg.scheduler.max_num_seqs = 2;
        let reqs: Vec<GenerateRequest> = g
            .prompts
            .iter()
            .enumerate()
            .map(|(i, c)| request(format!("long-{i}"), &c.ids, 64))
            .collect();
        let outs = common::run(async move {
            let engine = common::start(&cfg);
            let outs = common::generate_all(&engine, reqs).await;
            common::assert_pool_drained(&engine).await;
            outs
        });
        for (i, (out, case)) in outs.iter().zip(&g.prompts).enumerate() {
            assert!(
                case.ids.len() + 64 > 32,
                "the test needs sequences longer than the pool"
            );
            assert_eq!(
                out.token_ids,
                case.greedy64,
                "{}: prompt {i} in a pool smaller than itself",
                path.display()
            );
        }
    }
}

#[test]
fn mixtral_matches_transformers() {
    family("mixtral");
}

#[test]
fn deepseek_v2_with_latent_attention_matches_transformers() {
    family("deepseek2");
}

#[test]
fn deepseek_v2_with_low_rank_queries_matches_transformers() {
    family("deepseek2_qlora");
}
