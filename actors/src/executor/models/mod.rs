//! Model families behind one interface.
//!
//! Each family is one file laid out as config → layers with `load` and `forward` → model,
//! and implements [`CausalLm`]. The KV cache is never inside a model: `forward` receives
//! the batch's slots and block tables and the executor's KV pool, whose per-token shape
//! ([`KvLayout`]) the model declares. The executor and the engine see only [`CausalLm`]
//! and the [`Family`] registry: a new family is a new file plus one line in [`FAMILIES`].

pub mod deepseek;
pub mod llama;
pub mod mixtral;

use pagoda_kernels::attention::AttnSeq;
use pagoda_kernels::quant::Precision;

use crate::executor::kv_pool::KvPool;
use crate::executor::linear::ForwardError;
use crate::executor::weights::{LoadError, WeightSource};

/// One step's worth of token rows, sequence after sequence.
pub struct BatchInput<'a> {
    /// Token id of every row.
    pub tokens: &'a [u32],
    /// Position of every row in its sequence.
    pub positions: &'a [usize],
    /// KV-pool slot of every row (`block * block_size + offset`).
    pub slots: &'a [usize],
    /// The sequences, each owning a contiguous range of rows.
    pub seqs: &'a [AttnSeq<'a>],
    /// Rows whose logits are wanted (the last row of each sequence that samples).
    pub logit_rows: &'a [usize],
}

/// What one layer keeps per token in the KV pool: `heads × head_dim` values for K and as
/// many for V. The pool's block shape comes from here, not from one fixed layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    pub num_layers: usize,
    pub heads: usize,
    pub head_dim: usize,
}

/// What the engine needs to know of a model, whatever its family.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    /// The family's name (`llama`, `mistral`, `qwen2`, …).
    pub architecture: String,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub kv: KvLayout,
    /// Every layer attends only to the last this many positions: blocks wholly before a
    /// sequence's window can be freed.
    pub sliding_window: Option<usize>,
}

/// A loaded model of any family.
pub trait CausalLm: Send {
    fn spec(&self) -> &ModelSpec;

    /// Runs the batch through the model, writing its K/V into the pool, and returns the
    /// logits of `input.logit_rows` (row-major, `logit_rows.len() × vocab_size`).
    fn forward(&self, input: &BatchInput<'_>, kv: &mut KvPool) -> Result<Vec<f32>, ForwardError>;
}

/// A loaded model, or why it could not be.
pub type LoadResult = Result<Box<dyn CausalLm>, LoadError>;

/// A model family: the architecture names it answers to, how to read its description,
/// and how to load it.
pub struct Family {
    pub name: &'static str,
    /// GGUF `general.architecture` values.
    pub gguf_names: &'static [&'static str],
    /// Hugging Face `config.json` `architectures[0]` or `model_type` values.
    pub hf_names: &'static [&'static str],
    /// Whether a source with one of those names is this family's (llama.cpp stores
    /// Mixtral under `llama`: the expert count tells them apart).
    pub accepts: fn(&WeightSource) -> bool,
    /// The model's description, without loading any weight.
    pub spec: fn(&WeightSource) -> Result<ModelSpec, LoadError>,
    /// Loads the weights (quantized matrices keep their format; activations of the
    /// int8 kernel at `precision`).
    pub load: fn(&mut WeightSource, Precision) -> LoadResult,
}

/// Every family pagoda serves, most specific first.
pub const FAMILIES: &[&Family] = &[&mixtral::FAMILY, &llama::FAMILY, &deepseek::FAMILY];

/// The architecture name a weight source declares: GGUF `general.architecture`, or
/// `architectures[0]` (else `model_type`) of a Hugging Face `config.json`.
pub fn architecture_of(src: &WeightSource) -> Result<String, LoadError> {
    if let Some(md) = src.gguf_metadata() {
        return md
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .ok_or_else(|| LoadError::MissingMetadata("general.architecture".into()));
    }
    let cfg = src
        .hf_config()
        .ok_or_else(|| LoadError::Unsupported("no model description".into()))?;
    cfg.get("architectures")
        .and_then(|a| a.get(0))
        .and_then(|a| a.as_str())
        .or_else(|| cfg.get("model_type").and_then(|a| a.as_str()))
        .map(str::to_owned)
        .ok_or_else(|| LoadError::MissingMetadata("architectures".into()))
}

/// The family of a weight source, or a typed error naming its architecture.
pub fn family_of(src: &WeightSource) -> Result<&'static Family, LoadError> {
    let arch = architecture_of(src)?;
    let gguf = src.gguf_metadata().is_some();
    FAMILIES
        .iter()
        .copied()
        .find(|f| {
            let names = if gguf { f.gguf_names } else { f.hf_names };
            names.contains(&arch.as_str()) && (f.accepts)(src)
        })
        .ok_or(LoadError::UnsupportedArchitecture(arch))
}

/// The architecture names pagoda serves, for error messages.
pub fn supported_names() -> String {
    FAMILIES
        .iter()
        .flat_map(|f| f.gguf_names.iter().chain(f.hf_names))
        .copied()
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect::<Vec<_>>()
        .join(", ")
}

/// Runs one whole sequence through `model` in a single prefill on a private KV pool of
/// `dtype` and returns the logits after each of `rows` (row i = after `tokens[..=i]`). For
/// scoring and fidelity checks; serving goes through the executor's shared pool.
pub fn sequence_logits(
    model: &dyn CausalLm,
    tokens: &[u32],
    rows: &[usize],
    dtype: crate::config::KvCacheDtype,
) -> Result<Vec<f32>, ForwardError> {
    const BS: usize = 16;
    let kv_layout = model.spec().kv;
    let num_blocks = tokens.len().div_ceil(BS).max(1);
    let mut kv = KvPool::new(
        kv_layout.num_layers,
        pagoda_kernels::attention::KvShape {
            num_blocks,
            block_size: BS,
            num_kv_heads: kv_layout.heads,
            head_dim: kv_layout.head_dim,
        },
        dtype,
    );
    let table: Vec<u32> = (0..num_blocks as u32).collect();
    let positions: Vec<usize> = (0..tokens.len()).collect();
    let seqs = [AttnSeq {
        query_start: 0,
        query_len: tokens.len(),
        context_len: tokens.len(),
        block_table: &table,
    }];
    let input = BatchInput {
        tokens,
        positions: &positions,
        slots: &positions,
        seqs: &seqs,
        logit_rows: rows,
    };
    model.forward(&input, &mut kv)
}
