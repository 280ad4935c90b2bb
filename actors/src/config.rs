//! Engine configuration: the `[model]`, `[cache]`, `[scheduler]`, `[speculative]` and
//! `[limits]` sections of `configs/default.toml`. Every field has a default, so a partial
//! file is fine.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    pub model: ModelConfig,
    pub cache: CacheConfig,
    pub scheduler: SchedulerConfig,
    pub speculative: SpeculativeConfig,
    pub limits: LimitsConfig,
}

/// How draft tokens are proposed (`[speculative] method`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SpecMethod {
    #[default]
    Off,
    /// Prompt lookup: n-grams of the sequence found earlier in it.
    Ngram,
    /// A smaller draft model with the target's tokenizer (`draft_model`).
    Draft,
}

/// The `[speculative]` section: speculative decoding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SpeculativeConfig {
    pub method: SpecMethod,
    /// Draft tokens verified per sequence and step at most.
    pub num_speculative_tokens: usize,
    /// N-gram sizes tried, longest first (`ngram`).
    pub prompt_lookup_min: usize,
    pub prompt_lookup_max: usize,
    /// Speculate only while at most this many sequences run.
    pub max_num_seqs: usize,
    /// The draft model's path (`draft`).
    pub draft_model: String,
}

impl Default for SpeculativeConfig {
    fn default() -> Self {
        Self {
            method: SpecMethod::Off,
            num_speculative_tokens: 4,
            prompt_lookup_min: 2,
            prompt_lookup_max: 4,
            max_num_seqs: 2,
            draft_model: String::new(),
        }
    }
}

/// How the text of chat messages is tokenized.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChatContent {
    /// As text: a special token's spelling inside a message (`<|im_end|>`) is just text;
    /// special tokens come only from the chat template.
    #[default]
    Literal,
    /// The spelling of a special token inside a message becomes that token (what
    /// transformers' `apply_chat_template` does): only for trusted callers.
    Parse,
}

/// The `[limits]` section: what one request may ask for. Each refusal is a typed error
/// that names the limit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Stop strings per request.
    pub max_stop: usize,
    /// Bytes of one stop string.
    pub max_stop_bytes: usize,
    /// Stop token ids per request.
    pub max_stop_token_ids: usize,
    /// Messages of a chat request.
    pub max_messages: usize,
    /// The roles a chat message may have.
    pub roles: Vec<String>,
    /// Bytes of prompt text (a text prompt, or all messages' contents and roles), checked
    /// before the chat template renders and before encoding.
    pub max_prompt_bytes: usize,
    pub chat_content: ChatContent,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_stop: 16,
            max_stop_bytes: 256,
            max_stop_token_ids: 1024,
            max_messages: 256,
            roles: ["system", "user", "assistant", "tool"]
                .map(String::from)
                .to_vec(),
            max_prompt_bytes: 1 << 20,
            chat_content: ChatContent::Literal,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// A `.gguf` file or a Hugging Face model directory.
    pub path: String,
    /// Name in metrics (`model_name` label); empty = the file stem of `path`.
    pub name: String,
    /// Context length to serve; 0 = the model's own (capped by the KV pool).
    pub max_model_len: usize,
    /// How quantized matmuls treat activations where an int8 kernel runs (AVX2, AVX-VNNI
    /// or AVX-512 VNNI; `PAGODA_KERNELS_INT8`): `precise` (two 8-bit planes, matches f32
    /// activations) or `fast` (one
    /// 8-bit plane as in llama.cpp: faster at large batches, slightly different logits).
    pub activations: Activations,
}

/// See [`ModelConfig::activations`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Activations {
    #[default]
    Precise,
    Fast,
}

impl Activations {
    pub fn precision(self) -> pagoda_kernels::quant::Precision {
        match self {
            Activations::Precise => pagoda_kernels::quant::Precision::Precise,
            Activations::Fast => pagoda_kernels::quant::Precision::Fast,
        }
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            path: "models/SmolLM2-135M-Instruct.Q4_1.gguf".into(),
            name: String::new(),
            max_model_len: 0,
            activations: Activations::Precise,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// Token slots per KV block.
    pub block_size: usize,
    /// Size the pool by bytes (all layers, K and V) ...
    pub kv_cache_bytes: u64,
    /// ... or by block count (wins when > 0).
    pub num_blocks: usize,
    /// Share full prompt blocks between requests with the same prefix.
    pub enable_prefix_caching: bool,
    /// Element type of the KV cache: `auto` (f32 for f32 safetensors models, f16 for
    /// everything else), `f16` or `f32`.
    pub kv_cache_dtype: KvCacheDtype,
}

/// See [`CacheConfig::kv_cache_dtype`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvCacheDtype {
    /// The model's own precision: f32 for f32 weights, f16 otherwise.
    #[default]
    Auto,
    /// Half the memory and memory traffic of f32; values rounded to f16 when stored.
    F16,
    F32,
}

impl KvCacheDtype {
    /// `Auto` made concrete for a model whose weights are (`model_f32`) or are not f32.
    pub fn resolve(self, model_f32: bool) -> Self {
        match self {
            KvCacheDtype::Auto if model_f32 => KvCacheDtype::F32,
            KvCacheDtype::Auto => KvCacheDtype::F16,
            other => other,
        }
    }

    /// Bytes per element (`Auto` counts as f16: resolve it first).
    pub fn bytes(self) -> usize {
        match self {
            KvCacheDtype::Auto | KvCacheDtype::F16 => 2,
            KvCacheDtype::F32 => 4,
        }
    }

    /// The name used in logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            KvCacheDtype::Auto => "auto",
            KvCacheDtype::F16 => "f16",
            KvCacheDtype::F32 => "f32",
        }
    }
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            block_size: 16,
            kv_cache_bytes: 512 * 1024 * 1024,
            num_blocks: 0,
            enable_prefix_caching: true,
            kv_cache_dtype: KvCacheDtype::Auto,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulerConfig {
    /// Sequences running at once.
    pub max_num_seqs: usize,
    /// Tokens computed in one step (decode tokens + prefill chunks).
    pub max_num_batched_tokens: usize,
    /// Requests queued for a seat at most; a request beyond it is answered `overloaded`
    /// at once, so memory stays bounded under a burst. 0 = no bound.
    pub max_waiting: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_num_seqs: 64,
            max_num_batched_tokens: 512,
            max_waiting: 256,
        }
    }
}

/// A configuration value that cannot work.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

impl ModelConfig {
    /// The served model's name: `name`, or the file stem of `path` (the directory name
    /// for a Hugging Face directory).
    pub fn served_name(&self) -> String {
        if !self.name.is_empty() {
            return self.name.clone();
        }
        let path = std::path::Path::new(self.path.trim_end_matches('/'));
        path.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| self.path.clone())
    }
}

impl EngineConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |m: &str| Err(ConfigError(m.to_string()));
        if self.cache.block_size == 0 || self.cache.block_size > 1024 {
            return err("cache.block_size must be in 1..=1024");
        }
        if self.cache.num_blocks == 0 && self.cache.kv_cache_bytes == 0 {
            return err("set cache.kv_cache_bytes or cache.num_blocks");
        }
        if self.scheduler.max_num_seqs == 0 {
            return err("scheduler.max_num_seqs must be at least 1");
        }
        if self.scheduler.max_num_batched_tokens < self.scheduler.max_num_seqs {
            return err("scheduler.max_num_batched_tokens must be >= scheduler.max_num_seqs");
        }
        let sp = &self.speculative;
        if sp.method == SpecMethod::Draft && sp.draft_model.trim().is_empty() {
            return err(
                "speculative.method = \"draft\" needs speculative.draft_model (a GGUF file or a Hugging Face directory with the target's tokenizer)",
            );
        }
        if sp.method != SpecMethod::Off {
            if !(1..=16).contains(&sp.num_speculative_tokens) {
                return err("speculative.num_speculative_tokens must be in 1..=16");
            }
            if sp.prompt_lookup_min == 0 || sp.prompt_lookup_min > sp.prompt_lookup_max {
                return err("speculative.prompt_lookup_min must be in 1..=prompt_lookup_max");
            }
        }
        if self.limits.roles.is_empty() {
            return err("limits.roles must allow at least one role");
        }
        if self.limits.max_prompt_bytes == 0 {
            return err("limits.max_prompt_bytes must be at least 1");
        }
        Ok(())
    }
}
