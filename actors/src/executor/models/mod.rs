//! Model families behind one interface.
//!
//! Each family is one file laid out as config → layers with `load` and `forward` → model,
//! and implements [`CausalLm`]. Models are generic over the compute [`Backend`]: every
//! weight is the backend's, every operation a backend call. The KV cache is never inside
//! a model: `forward` receives the batch's slots and block tables and the executor's KV
//! pool, whose per-token shape ([`KvLayout`]) the model declares. The executor and the
//! engine see only [`CausalLm`] and the [`Family`] registry: a new family is a new file,
//! one line in [`FAMILIES`] and one arm in [`load`].

pub mod deepseek;
pub mod layers;
pub mod llama;
pub mod mixtral;

use pagoda_kernels::attention::AttnSeq;

use crate::executor::backend::{Backend, ForwardError};
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
/// many for V — or, with `values_are_keys`, for K only (latent attention reads its values
/// from the same rows). The pool's block shape comes from here, not from one fixed layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    pub num_layers: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub values_are_keys: bool,
}

impl KvLayout {
    /// Buffers per layer: K and V, or one.
    pub fn buffers(&self) -> usize {
        if self.values_are_keys {
            1
        } else {
            2
        }
    }
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

/// A loaded model of any family, on backend `B`.
pub trait CausalLm<B: Backend>: Send + Sync {
    fn spec(&self) -> &ModelSpec;

    /// Runs the batch through the model, writing its K/V into the pool, and returns the
    /// logits of `input.logit_rows` (row-major, `logit_rows.len() × vocab_size`) in host
    /// memory, for the samplers.
    fn forward(
        &self,
        b: &B,
        input: &BatchInput<'_>,
        kv: &mut B::Kv,
    ) -> Result<Vec<f32>, ForwardError>;
}

/// Which model code a family runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// [`llama::Llama`]: Llama, Mistral, Qwen2.
    Llama,
    /// [`mixtral::Mixtral`].
    Mixtral,
    /// [`deepseek::Deepseek`].
    Deepseek,
}

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
    /// The model code that loads and runs it.
    pub kind: Kind,
}

/// Loads a family's weights onto backend `b` (quantized matrices keep their format where
/// the backend runs them so).
pub fn load<B: Backend>(
    b: &B,
    family: &Family,
    src: &mut WeightSource,
) -> Result<Box<dyn CausalLm<B>>, LoadError> {
    Ok(match family.kind {
        Kind::Llama => Box::new(llama::load(b, src)?),
        Kind::Mixtral => Box::new(mixtral::load(b, src)?),
        Kind::Deepseek => Box::new(deepseek::load(b, src)?),
    })
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
pub fn sequence_logits<B: Backend>(
    b: &B,
    model: &dyn CausalLm<B>,
    tokens: &[u32],
    rows: &[usize],
    dtype: crate::config::KvCacheDtype,
) -> Result<Vec<f32>, ForwardError> {
    const BS: usize = 16;
    let num_blocks = tokens.len().div_ceil(BS).max(1);
    let mut kv = b.kv_pool(model.spec().kv, num_blocks, BS, dtype)?;
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
    model.forward(b, &input, &mut kv)
}

/// Checks a batch's index arrays agree and its positions fit the model's context.
pub(crate) fn check_input(
    input: &BatchInput<'_>,
    max_positions: usize,
) -> Result<(), ForwardError> {
    let n = input.tokens.len();
    if input.positions.len() != n || input.slots.len() != n {
        return Err(ForwardError::Shape(
            "tokens/positions/slots differ in length".into(),
        ));
    }
    if let Some(p) = input.positions.iter().find(|&&p| p >= max_positions) {
        return Err(ForwardError::Shape(format!(
            "position {p} is beyond the model's context ({max_positions})"
        )));
    }
    if let Some(r) = input.logit_rows.iter().find(|&&r| r >= n) {
        return Err(ForwardError::Shape(format!("logit row {r} of {n}")));
    }
    Ok(())
}
