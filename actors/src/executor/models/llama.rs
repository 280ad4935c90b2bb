//! The Llama family (Llama 1/2/3, Mistral, Qwen2, SmolLM): pre-norm decoder layers with
//! RMSNorm, grouped-query attention with rotary embeddings, and a SwiGLU MLP. Covers GGUF
//! files (weights kept quantized) and Hugging Face safetensors directories.

use std::path::Path;

use candle_core::quantized::gguf_file;
use pagoda_kernels::attention::AttnSeq;
use pagoda_kernels::ops::{apply_rope, rms_norm, silu_mul, RopeStyle, RopeTable};
use pagoda_kernels::quant::Precision;

use super::{BatchInput, CausalLm, Family, KvLayout, ModelSpec};
use crate::executor::kv_pool::KvPool;
use crate::executor::linear::{ForwardError, Linear, Projections};
use crate::executor::weights::{read_text, LoadError, WeightSource};

/// The family: Llama 1/2/3, Mistral (without a sliding window), Qwen2, SmolLM.
pub const FAMILY: Family = Family {
    name: "llama",
    gguf_names: &["llama", "mistral", "qwen2"],
    hf_names: &[
        "LlamaForCausalLM",
        "llama",
        "MistralForCausalLM",
        "mistral",
        "Qwen2ForCausalLM",
        "qwen2",
    ],
    accepts: |_| true,
    spec: |src| Ok(LlamaConfig::from_source(src)?.spec()),
    load: |src, xp| {
        let cfg = LlamaConfig::from_source(src)?;
        Ok(Box::new(Llama::load_with(src, cfg, xp)?))
    },
};

/// Hyper-parameters of a Llama-family model.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub architecture: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub max_position_embeddings: usize,
    pub rope_style: RopeStyle,
    /// Mistral's sliding window: each position attends to the last this many positions
    /// (itself included). None: the whole context.
    pub sliding_window: Option<usize>,
}

fn md<'a>(
    m: &'a std::collections::HashMap<String, gguf_file::Value>,
    key: &str,
) -> Result<&'a gguf_file::Value, LoadError> {
    m.get(key)
        .ok_or_else(|| LoadError::MissingMetadata(key.to_string()))
}

fn md_usize(
    m: &std::collections::HashMap<String, gguf_file::Value>,
    key: &str,
) -> Result<usize, LoadError> {
    let v = md(m, key)?;
    v.to_u64()
        .map(|x| x as usize)
        .or_else(|_| v.to_u32().map(|x| x as usize))
        .or_else(|_| v.to_i32().map(|x| x as usize))
        .map_err(|_| LoadError::MissingMetadata(key.to_string()))
}

fn md_f32(
    m: &std::collections::HashMap<String, gguf_file::Value>,
    key: &str,
) -> Result<f32, LoadError> {
    let v = md(m, key)?;
    v.to_f32()
        .or_else(|_| v.to_f64().map(|x| x as f32))
        .map_err(|_| LoadError::MissingMetadata(key.to_string()))
}

impl LlamaConfig {
    /// From GGUF metadata (`general.architecture` and the `<arch>.*` keys).
    pub fn from_gguf(
        m: &std::collections::HashMap<String, gguf_file::Value>,
    ) -> Result<Self, LoadError> {
        let arch = md(m, "general.architecture")?
            .to_string()
            .map_err(|_| LoadError::MissingMetadata("general.architecture".into()))?
            .clone();
        // llama.cpp's converter permutes Q/K rows of llama-style models so that rotary
        // pairs are adjacent; Qwen2 files keep the Hugging Face (half-split) layout.
        let rope_style = match arch.as_str() {
            "llama" | "mistral" => RopeStyle::Interleaved,
            "qwen2" => RopeStyle::Neox,
            other => return Err(LoadError::UnsupportedArchitecture(other.to_string())),
        };
        let k = |s: &str| format!("{arch}.{s}");
        let hidden_size = md_usize(m, &k("embedding_length"))?;
        let num_heads = md_usize(m, &k("attention.head_count"))?;
        let num_kv_heads = md_usize(m, &k("attention.head_count_kv")).unwrap_or(num_heads);
        let head_dim = md_usize(m, &k("attention.key_length"))
            .or_else(|_| md_usize(m, &k("rope.dimension_count")))
            .unwrap_or(hidden_size / num_heads.max(1));
        let vocab_size = match md_usize(m, &k("vocab_size")) {
            Ok(v) => v,
            Err(_) => md(m, "tokenizer.ggml.tokens")?
                .to_vec()
                .map_err(|_| LoadError::MissingMetadata("tokenizer.ggml.tokens".into()))?
                .len(),
        };
        let cfg = Self {
            hidden_size,
            intermediate_size: md_usize(m, &k("feed_forward_length"))?,
            num_layers: md_usize(m, &k("block_count"))?,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size,
            rms_norm_eps: md_f32(m, &k("attention.layer_norm_rms_epsilon"))?,
            rope_theta: md_f32(m, &k("rope.freq_base")).unwrap_or(10_000.0),
            max_position_embeddings: md_usize(m, &k("context_length"))?,
            rope_style,
            sliding_window: md_usize(m, &k("attention.sliding_window"))
                .ok()
                .filter(|&w| w > 0),
            architecture: arch,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// From a Hugging Face `config.json`.
    pub fn from_hf_config(path: &Path) -> Result<Self, LoadError> {
        let text = read_text(path)?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| LoadError::BadConfig {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        Self::from_hf_value(&v, path)
    }

    /// From the parsed `config.json` at `path` (the path is for error messages).
    pub fn from_hf_value(v: &serde_json::Value, path: &Path) -> Result<Self, LoadError> {
        let bad = |msg: String| LoadError::BadConfig {
            path: path.to_path_buf(),
            message: msg,
        };
        let arch = v
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(|a| a.as_str())
            .or_else(|| v.get("model_type").and_then(|a| a.as_str()))
            .ok_or_else(|| bad("no 'architectures' or 'model_type'".into()))?
            .to_string();
        let arch_name = match arch.as_str() {
            "LlamaForCausalLM" | "llama" => "llama",
            "MistralForCausalLM" | "mistral" => "mistral",
            "Qwen2ForCausalLM" | "qwen2" => "qwen2",
            "MixtralForCausalLM" | "mixtral" => "mixtral",
            other => return Err(LoadError::UnsupportedArchitecture(other.to_string())),
        };
        if let Some(rs) = v.get("rope_scaling").filter(|r| !r.is_null()) {
            return Err(LoadError::Unsupported(format!(
                "rope_scaling {rs} is not implemented yet"
            )));
        }
        let get = |key: &str| -> Result<usize, LoadError> {
            v.get(key)
                .and_then(|x| x.as_u64())
                .map(|x| x as usize)
                .ok_or_else(|| bad(format!("missing integer '{key}'")))
        };
        let hidden_size = get("hidden_size")?;
        let num_heads = get("num_attention_heads")?;
        let cfg = Self {
            architecture: arch_name.to_string(),
            hidden_size,
            intermediate_size: get("intermediate_size")?,
            num_layers: get("num_hidden_layers")?,
            num_heads,
            num_kv_heads: get("num_key_value_heads").unwrap_or(num_heads),
            head_dim: get("head_dim").unwrap_or(hidden_size / num_heads.max(1)),
            vocab_size: get("vocab_size")?,
            rms_norm_eps: v
                .get("rms_norm_eps")
                .and_then(|x| x.as_f64())
                .unwrap_or(1e-6) as f32,
            rope_theta: v
                .get("rope_theta")
                .and_then(|x| x.as_f64())
                .unwrap_or(10_000.0) as f32,
            max_position_embeddings: get("max_position_embeddings")?,
            rope_style: RopeStyle::Neox,
            // Mistral declares `sliding_window` (null: none); Qwen2 also needs
            // `use_sliding_window` (its layers then use the window from
            // `max_window_layers` on, not modelled: refused below).
            sliding_window: v
                .get("sliding_window")
                .and_then(|x| x.as_u64())
                .map(|x| x as usize)
                .filter(|_| {
                    arch_name != "qwen2"
                        || v.get("use_sliding_window").and_then(|x| x.as_bool()) == Some(true)
                }),
        };
        if arch_name == "qwen2" && cfg.sliding_window.is_some() {
            return Err(LoadError::Unsupported(
                "Qwen2 with use_sliding_window = true is not implemented yet".into(),
            ));
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// From whatever describes `src`: GGUF metadata or the directory's `config.json`.
    pub fn from_source(src: &WeightSource) -> Result<Self, LoadError> {
        match (src.gguf_metadata(), src.hf_config()) {
            (Some(md), _) => Self::from_gguf(md),
            (None, Some(v)) => Self::from_hf_value(v, &src.hf_config_path().unwrap_or_default()),
            (None, None) => Err(LoadError::Unsupported("no model description".into())),
        }
    }

    /// The engine's view of this configuration.
    pub fn spec(&self) -> ModelSpec {
        ModelSpec {
            architecture: self.architecture.clone(),
            vocab_size: self.vocab_size,
            max_position_embeddings: self.max_position_embeddings,
            kv: KvLayout {
                num_layers: self.num_layers,
                heads: self.num_kv_heads,
                head_dim: self.head_dim,
            },
            sliding_window: self.sliding_window,
        }
    }

    fn validate(&self) -> Result<(), LoadError> {
        let ok = self.num_heads > 0
            && self.num_kv_heads > 0
            && self.num_heads.is_multiple_of(self.num_kv_heads)
            && self.head_dim > 0
            && self.head_dim.is_multiple_of(2)
            && self.num_layers > 0
            && self.vocab_size > 0;
        if ok {
            Ok(())
        } else {
            Err(LoadError::Unsupported(format!(
                "inconsistent model config {self:?}"
            )))
        }
    }
}

/// Grouped-query attention with rotary embeddings: Q, K and V in one stacked product,
/// K/V written to the pool, paged attention (within the sliding window, if any), output
/// projection.
pub struct Attention {
    /// Q, K and V.
    qkv: Projections,
    wo: Linear,
    /// Storage format of the projections, for the load log.
    format: String,
}

impl Attention {
    pub fn load(
        src: &mut WeightSource,
        i: usize,
        cfg: &LlamaConfig,
        xp: Precision,
    ) -> Result<Self, LoadError> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let wq = layer_linear(src, i, "attn_q", cfg.num_heads * hd, h)?;
        let wk = layer_linear(src, i, "attn_k", cfg.num_kv_heads * hd, h)?;
        let wv = layer_linear(src, i, "attn_v", cfg.num_kv_heads * hd, h)?;
        let wo = layer_linear(src, i, "attn_output", h, cfg.num_heads * hd)?;
        Ok(Self {
            format: wq.format_name(),
            qkv: Projections::new(vec![wq, wk, wv], xp),
            wo: wo.prepare(xp),
        })
    }

    /// Attention of the `n` normed rows `x` of layer `li`, into `out` (`n × hidden`).
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        cfg: &LlamaConfig,
        rope: &RopeTable,
        li: usize,
        x: &[f32],
        n: usize,
        input: &BatchInput<'_>,
        kv: &mut KvPool,
        s: &mut Scratch,
        out: &mut [f32],
    ) -> Result<(), ForwardError> {
        let hd = cfg.head_dim;
        self.qkv
            .forward(x, n, &mut [&mut s.q, &mut s.k, &mut s.v], &mut s.stacked)?;
        apply_rope(
            &mut s.q,
            input.positions,
            cfg.num_heads,
            hd,
            rope,
            cfg.rope_style,
        )?;
        apply_rope(
            &mut s.k,
            input.positions,
            cfg.num_kv_heads,
            hd,
            rope,
            cfg.rope_style,
        )?;
        kv.write(li, &s.k, &s.v, input.slots)?;
        kv.attend_window(
            li,
            &s.q,
            cfg.num_heads,
            input.seqs,
            cfg.sliding_window,
            &mut s.attn,
        )?;
        self.wo.forward(&s.attn, n, out)?;
        Ok(())
    }
}

/// The SwiGLU MLP: `down(silu(gate(x)) · up(x))`, gate and up in one stacked product.
pub struct Mlp {
    gate_up: Projections,
    down: Linear,
}

/// A decoder layer's feed-forward block: a dense MLP, or a mixture of experts.
pub trait FeedForward: Send + Sized {
    /// Loads layer `i`'s block.
    fn load(
        src: &mut WeightSource,
        i: usize,
        cfg: &LlamaConfig,
        extra: &Self::Config,
        xp: Precision,
    ) -> Result<Self, LoadError>;

    /// What the block needs beyond [`LlamaConfig`] (nothing for a dense MLP).
    type Config: Send;

    /// The block on the `n` normed rows `x`, into `out` (`n × hidden`), with the forward
    /// pass's reusable buffers.
    fn forward(
        &self,
        x: &[f32],
        n: usize,
        s: &mut Scratch,
        out: &mut [f32],
    ) -> Result<(), ForwardError>;
}

impl FeedForward for Mlp {
    type Config = ();

    fn load(
        src: &mut WeightSource,
        i: usize,
        cfg: &LlamaConfig,
        _: &(),
        xp: Precision,
    ) -> Result<Self, LoadError> {
        let (h, ff) = (cfg.hidden_size, cfg.intermediate_size);
        let gate = layer_linear(src, i, "ffn_gate", ff, h)?;
        let up = layer_linear(src, i, "ffn_up", ff, h)?;
        let down = layer_linear(src, i, "ffn_down", h, ff)?;
        Ok(Self {
            gate_up: Projections::new(vec![gate, up], xp),
            down: down.prepare(xp),
        })
    }

    fn forward(
        &self,
        x: &[f32],
        n: usize,
        s: &mut Scratch,
        out: &mut [f32],
    ) -> Result<(), ForwardError> {
        self.forward_rows(x, n, s, out)
    }
}

impl Mlp {
    /// `down(silu(gate(x)) · up(x))` on `n` rows, into `out`.
    pub fn forward_rows(
        &self,
        x: &[f32],
        n: usize,
        s: &mut Scratch,
        out: &mut [f32],
    ) -> Result<(), ForwardError> {
        let ff = self.down.cols();
        // Resizing within the capacity of earlier steps costs no allocation.
        s.gate.resize(n * ff, 0.0);
        s.up.resize(n * ff, 0.0);
        self.gate_up
            .forward(x, n, &mut [&mut s.gate, &mut s.up], &mut s.stacked)?;
        silu_mul(&mut s.gate, &s.up);
        self.down.forward(&s.gate, n, out)
    }

    /// The stacked gate/up product and the down projection of an expert or a dense MLP.
    pub fn from_parts(gate: Linear, up: Linear, down: Linear, xp: Precision) -> Self {
        Self {
            gate_up: Projections::new(vec![gate, up], xp),
            down: down.prepare(xp),
        }
    }
}

/// One decoder layer: pre-norm attention and pre-norm feed-forward, each added back.
pub struct DecoderLayer<F> {
    attn_norm: Vec<f32>,
    attn: Attention,
    ffn_norm: Vec<f32>,
    ffn: F,
}

impl<F: FeedForward> DecoderLayer<F> {
    fn load(
        src: &mut WeightSource,
        i: usize,
        cfg: &LlamaConfig,
        extra: &F::Config,
        xp: Precision,
    ) -> Result<Self, LoadError> {
        let h = cfg.hidden_size;
        Ok(Self {
            attn_norm: norm(src, &format!("blk.{i}.attn_norm.weight"), h)?,
            ffn_norm: norm(src, &format!("blk.{i}.ffn_norm.weight"), h)?,
            attn: Attention::load(src, i, cfg, xp)?,
            ffn: F::load(src, i, cfg, extra, xp)?,
        })
    }
}

/// A weight of layer `i` (`blk.{i}.{name}.weight`, with its bias when the file has one),
/// checked to be `rows × cols`.
pub fn layer_linear(
    src: &mut WeightSource,
    i: usize,
    name: &str,
    rows: usize,
    cols: usize,
) -> Result<Linear, LoadError> {
    let p = |s: &str| format!("blk.{i}.{s}");
    let mut l = src.linear(&p(&format!("{name}.weight")), false)?;
    if l.rows() != rows || l.cols() != cols {
        return Err(LoadError::Shape(format!(
            "blk.{i}.{name}.weight is {}×{}, expected {rows}×{cols}",
            l.rows(),
            l.cols()
        )));
    }
    let bias = p(&format!("{name}.bias"));
    if src.has(&bias) {
        l = l.with_bias(src.vector(&bias)?)?;
    }
    Ok(l)
}

pub(super) fn norm(src: &mut WeightSource, name: &str, len: usize) -> Result<Vec<f32>, LoadError> {
    let v = src.vector(name)?;
    if v.len() != len {
        return Err(LoadError::Shape(format!(
            "{name} has {} values, expected {len}",
            v.len()
        )));
    }
    Ok(v)
}

/// Buffers of one forward pass, reused by every layer.
pub struct Scratch {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    stacked: Vec<f32>,
    pub gate: Vec<f32>,
    pub up: Vec<f32>,
}

impl Scratch {
    /// Buffers that grow on demand (for blocks used outside [`LlamaModel`]).
    pub fn empty() -> Self {
        Self {
            q: Vec::new(),
            k: Vec::new(),
            v: Vec::new(),
            attn: Vec::new(),
            stacked: Vec::new(),
            gate: Vec::new(),
            up: Vec::new(),
        }
    }

    fn new(cfg: &LlamaConfig, n: usize) -> Self {
        let hd = cfg.head_dim;
        Self {
            q: vec![0f32; n * cfg.num_heads * hd],
            k: vec![0f32; n * cfg.num_kv_heads * hd],
            v: vec![0f32; n * cfg.num_kv_heads * hd],
            attn: vec![0f32; n * cfg.num_heads * hd],
            stacked: Vec::new(),
            gate: Vec::with_capacity(n * cfg.intermediate_size),
            up: Vec::with_capacity(n * cfg.intermediate_size),
        }
    }
}

/// A Llama-shaped model: embeddings, decoder layers with feed-forward blocks `F`, final
/// norm, output projection. `F` is a dense MLP for Llama, Mistral and Qwen2
/// ([`Llama`]), a mixture of experts for Mixtral.
pub struct LlamaModel<F> {
    pub config: LlamaConfig,
    spec: ModelSpec,
    embed: Linear,
    layers: Vec<DecoderLayer<F>>,
    final_norm: Vec<f32>,
    /// None when the output projection is tied to the embedding.
    lm_head: Option<Linear>,
    rope: RopeTable,
    /// KV element type of `cache.kv_cache_dtype = "auto"` for this model.
    auto_kv_dtype: crate::config::KvCacheDtype,
}

/// The Llama family's model: dense SwiGLU MLPs.
pub type Llama = LlamaModel<Mlp>;

impl Llama {
    pub fn load(src: &mut WeightSource, config: LlamaConfig) -> Result<Self, LoadError> {
        Self::load_with(src, config, Precision::default())
    }

    /// Load with the given activation precision for the quantized products (see
    /// `pagoda_kernels::quant::Precision`).
    pub fn load_with(
        src: &mut WeightSource,
        config: LlamaConfig,
        xp: Precision,
    ) -> Result<Self, LoadError> {
        Self::load_model(src, config, &(), xp)
    }
}

impl<F: FeedForward> LlamaModel<F> {
    /// Loads every weight; `extra` is what the feed-forward blocks need beyond `config`.
    pub fn load_model(
        src: &mut WeightSource,
        config: LlamaConfig,
        extra: &F::Config,
        xp: Precision,
    ) -> Result<Self, LoadError> {
        let auto_kv_dtype = crate::config::KvCacheDtype::Auto.resolve(src.stores_f32());
        let embed = src.linear("token_embd.weight", true)?.prepare(xp);
        if embed.rows() != config.vocab_size || embed.cols() != config.hidden_size {
            return Err(LoadError::Shape(format!(
                "token_embd.weight is {}×{}, expected {}×{}",
                embed.rows(),
                embed.cols(),
                config.vocab_size,
                config.hidden_size
            )));
        }
        let mut layers = Vec::with_capacity(config.num_layers);
        for i in 0..config.num_layers {
            layers.push(DecoderLayer::load(src, i, &config, extra, xp)?);
        }
        let final_norm = norm(src, "output_norm.weight", config.hidden_size)?;
        let lm_head = if src.has("output.weight") {
            Some(src.linear("output.weight", false)?.prepare(xp))
        } else {
            None
        };
        tracing::info!(
            source = %src.describe(),
            architecture = %config.architecture,
            layers = config.num_layers,
            hidden = config.hidden_size,
            heads = config.num_heads,
            kv_heads = config.num_kv_heads,
            vocab = config.vocab_size,
            sliding_window = ?config.sliding_window,
            weights = %layers.first().map(|l| l.attn.format.clone()).unwrap_or_default(),
            int8_kernel = pagoda_kernels::quant::QMatrix::int8_kernel_available(),
            activations = ?xp,
            tied_embeddings = lm_head.is_none(),
            "model loaded"
        );
        let rope = RopeTable::new(
            config.head_dim,
            config.max_position_embeddings,
            config.rope_theta,
        );
        Ok(Self {
            embed,
            layers,
            final_norm,
            lm_head,
            rope,
            auto_kv_dtype,
            spec: config.spec(),
            config,
        })
    }

    /// Runs the batch through the model, writing its K/V into the pool, and returns the
    /// logits of `input.logit_rows` (row-major, `logit_rows.len() × vocab_size`).
    pub fn forward(
        &self,
        input: &BatchInput<'_>,
        kv: &mut KvPool,
    ) -> Result<Vec<f32>, ForwardError> {
        let cfg = &self.config;
        let n = input.tokens.len();
        if input.positions.len() != n || input.slots.len() != n {
            return Err(ForwardError::Shape(
                "tokens/positions/slots differ in length".into(),
            ));
        }
        if let Some(p) = input
            .positions
            .iter()
            .find(|&&p| p >= self.rope.max_positions())
        {
            return Err(ForwardError::Shape(format!(
                "position {p} is beyond the model's context ({})",
                self.rope.max_positions()
            )));
        }
        let h = cfg.hidden_size;
        let mut x = vec![0f32; n * h];
        for (row, &t) in x.chunks_exact_mut(h).zip(input.tokens) {
            if t as usize >= cfg.vocab_size {
                return Err(ForwardError::Shape(format!(
                    "token id {t} is outside the vocabulary ({})",
                    cfg.vocab_size
                )));
            }
            self.embed.row(t as usize, row)?;
        }
        let mut hbuf = vec![0f32; n * h];
        let mut o = vec![0f32; n * h];
        let mut scratch = Scratch::new(cfg, n);

        for (li, layer) in self.layers.iter().enumerate() {
            hbuf.copy_from_slice(&x);
            rms_norm(&mut hbuf, &layer.attn_norm, cfg.rms_norm_eps);
            layer.attn.forward(
                cfg,
                &self.rope,
                li,
                &hbuf,
                n,
                input,
                kv,
                &mut scratch,
                &mut o,
            )?;
            for (xi, oi) in x.iter_mut().zip(&o) {
                *xi += oi;
            }

            hbuf.copy_from_slice(&x);
            rms_norm(&mut hbuf, &layer.ffn_norm, cfg.rms_norm_eps);
            layer.ffn.forward(&hbuf, n, &mut scratch, &mut o)?;
            for (xi, oi) in x.iter_mut().zip(&o) {
                *xi += oi;
            }
        }

        // Only the rows that sample need the final norm and the (large) output projection.
        let m = input.logit_rows.len();
        let mut last = vec![0f32; m * h];
        for (dst, &r) in last.chunks_exact_mut(h).zip(input.logit_rows) {
            if r >= n {
                return Err(ForwardError::Shape(format!("logit row {r} of {n}")));
            }
            dst.copy_from_slice(&x[r * h..(r + 1) * h]);
        }
        rms_norm(&mut last, &self.final_norm, cfg.rms_norm_eps);
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let mut logits = vec![0f32; m * cfg.vocab_size];
        head.forward(&last, m, &mut logits)?;
        Ok(logits)
    }
}

impl<F: FeedForward> LlamaModel<F> {
    /// Runs one whole sequence through the model in a single prefill on a private KV pool
    /// and returns the logits after each of `rows` (row i = after `tokens[..=i]`). For
    /// scoring and fidelity checks; serving goes through the executor's shared pool.
    pub fn sequence_logits(
        &self,
        tokens: &[u32],
        rows: &[usize],
    ) -> Result<Vec<f32>, ForwardError> {
        const BS: usize = 16;
        let cfg = &self.config;
        let num_blocks = tokens.len().div_ceil(BS).max(1);
        let mut kv = KvPool::new(
            cfg.num_layers,
            pagoda_kernels::attention::KvShape {
                num_blocks,
                block_size: BS,
                num_kv_heads: cfg.num_kv_heads,
                head_dim: cfg.head_dim,
            },
            self.auto_kv_dtype,
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
        self.forward(&input, &mut kv)
    }
}

impl<F: FeedForward> CausalLm for LlamaModel<F> {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    fn forward(&self, input: &BatchInput<'_>, kv: &mut KvPool) -> Result<Vec<f32>, ForwardError> {
        LlamaModel::forward(self, input, kv)
    }
}
