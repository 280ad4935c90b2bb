//! The Llama family (Llama 1/2/3, Mistral, Qwen2, SmolLM): pre-norm decoder layers with
//! RMSNorm, grouped-query attention with rotary embeddings, and a SwiGLU MLP. Covers GGUF
//! files (weights kept quantized) and Hugging Face safetensors directories.

use std::path::Path;

use candle_core::quantized::gguf_file;
use pagoda_kernels::ops::RopeStyle;

use super::layers::Projections;
use super::{check_input, BatchInput, CausalLm, Family, Kind, KvLayout, ModelSpec};
use crate::executor::backend::{self, Backend, ForwardError};
use crate::executor::linear::Linear;
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
    kind: Kind::Llama,
};

/// Loads a Llama-family model from `src` onto `b`.
pub fn load<B: Backend>(b: &B, src: &mut WeightSource) -> Result<Llama<B>, LoadError> {
    let cfg = LlamaConfig::from_source(src)?;
    LlamaModel::load(b, src, cfg, &())
}

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
                values_are_keys: false,
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
pub struct Attention<B: Backend> {
    /// Q, K and V.
    qkv: Projections<B>,
    wo: B::Matrix,
    /// Storage format of the projections, for the load log.
    format: String,
}

impl<B: Backend> Attention<B> {
    pub fn load(
        b: &B,
        src: &mut WeightSource,
        i: usize,
        cfg: &LlamaConfig,
    ) -> Result<Self, LoadError> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let wq = layer_linear(src, i, "attn_q", cfg.num_heads * hd, h)?;
        let wk = layer_linear(src, i, "attn_k", cfg.num_kv_heads * hd, h)?;
        let wv = layer_linear(src, i, "attn_v", cfg.num_kv_heads * hd, h)?;
        let wo = layer_linear(src, i, "attn_output", h, cfg.num_heads * hd)?;
        Ok(Self {
            format: wq.format_name(),
            qkv: Projections::new(b, vec![wq, wk, wv])?,
            wo: b.matrix(wo)?,
        })
    }

    /// Attention of the normed rows `x` of layer `li`, into `out` (`n × hidden`).
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        b: &B,
        cfg: &LlamaConfig,
        rope: &B::Rope,
        li: usize,
        x: &B::Tensor,
        step: &B::Step<'_>,
        kv: &mut B::Kv,
        s: &mut Scratch<B>,
        out: &mut B::Tensor,
    ) -> Result<(), ForwardError> {
        let hd = cfg.head_dim;
        self.qkv
            .forward(b, x, &mut [&mut s.q, &mut s.k, &mut s.v], &mut s.stacked)?;
        b.rope(&mut s.q, cfg.num_heads, hd, rope, cfg.rope_style, step)?;
        b.rope(&mut s.k, cfg.num_kv_heads, hd, rope, cfg.rope_style, step)?;
        b.kv_write(kv, li, &s.k, Some(&s.v), step)?;
        b.attend(
            kv,
            li,
            &s.q,
            cfg.num_heads,
            None,
            cfg.sliding_window,
            step,
            &mut s.attn,
        )?;
        b.matmul(&self.wo, &s.attn, out)
    }
}

/// The SwiGLU MLP: `down(silu(gate(x)) · up(x))`, gate and up in one stacked product.
pub struct Mlp<B: Backend> {
    gate_up: Projections<B>,
    down: B::Matrix,
}

/// A decoder layer's feed-forward block: a dense MLP, or a mixture of experts.
pub trait FeedForward<B: Backend>: Send + Sync + Sized {
    /// What the block needs beyond [`LlamaConfig`] (nothing for a dense MLP).
    type Config: Send;

    /// Loads layer `i`'s block.
    fn load(
        b: &B,
        src: &mut WeightSource,
        i: usize,
        cfg: &LlamaConfig,
        extra: &Self::Config,
    ) -> Result<Self, LoadError>;

    /// The block on the normed rows `x`, into `out` (`n × hidden`), with the forward
    /// pass's reusable buffers.
    fn forward(
        &self,
        b: &B,
        x: &B::Tensor,
        s: &mut Scratch<B>,
        out: &mut B::Tensor,
    ) -> Result<(), ForwardError>;
}

impl<B: Backend> FeedForward<B> for Mlp<B> {
    type Config = ();

    fn load(
        b: &B,
        src: &mut WeightSource,
        i: usize,
        cfg: &LlamaConfig,
        _: &(),
    ) -> Result<Self, LoadError> {
        let (h, ff) = (cfg.hidden_size, cfg.intermediate_size);
        let gate = layer_linear(src, i, "ffn_gate", ff, h)?;
        let up = layer_linear(src, i, "ffn_up", ff, h)?;
        let down = layer_linear(src, i, "ffn_down", h, ff)?;
        Self::from_parts(b, gate, up, down)
    }

    fn forward(
        &self,
        b: &B,
        x: &B::Tensor,
        s: &mut Scratch<B>,
        out: &mut B::Tensor,
    ) -> Result<(), ForwardError> {
        self.gate_up
            .swiglu(b, x, &mut s.stacked, &mut s.up, &mut s.gate)?;
        b.matmul(&self.down, &s.gate, out)
    }
}

impl<B: Backend> Mlp<B> {
    /// The stacked gate/up product and the down projection of an expert or a dense MLP.
    pub fn from_parts(b: &B, gate: Linear, up: Linear, down: Linear) -> Result<Self, LoadError> {
        Ok(Self {
            gate_up: Projections::new(b, vec![gate, up])?,
            down: b.matrix(down)?,
        })
    }
}

/// One decoder layer: pre-norm attention and pre-norm feed-forward, each added back.
pub struct DecoderLayer<B: Backend, F> {
    attn_norm: B::Tensor,
    attn: Attention<B>,
    ffn_norm: B::Tensor,
    ffn: F,
}

impl<B: Backend, F: FeedForward<B>> DecoderLayer<B, F> {
    fn load(
        b: &B,
        src: &mut WeightSource,
        i: usize,
        cfg: &LlamaConfig,
        extra: &F::Config,
    ) -> Result<Self, LoadError> {
        let h = cfg.hidden_size;
        Ok(Self {
            attn_norm: norm(b, src, &format!("blk.{i}.attn_norm.weight"), h)?,
            ffn_norm: norm(b, src, &format!("blk.{i}.ffn_norm.weight"), h)?,
            attn: Attention::load(b, src, i, cfg)?,
            ffn: F::load(b, src, i, cfg, extra)?,
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

/// A norm weight of `len` values, on the backend.
fn norm<B: Backend>(
    b: &B,
    src: &mut WeightSource,
    name: &str,
    len: usize,
) -> Result<B::Tensor, LoadError> {
    let v = src.vector(name)?;
    backend::vector(b, name, v, len)
}

/// Buffers of one forward pass, reused by every layer.
pub struct Scratch<B: Backend> {
    q: B::Tensor,
    k: B::Tensor,
    v: B::Tensor,
    attn: B::Tensor,
    stacked: B::Tensor,
    gate: B::Tensor,
    up: B::Tensor,
    /// Rows routed to one expert, and the expert's output for them.
    pub expert_in: B::Tensor,
    pub expert_out: B::Tensor,
    /// Router logits.
    pub router: B::Tensor,
}

impl<B: Backend> Scratch<B> {
    /// Empty buffers (the backend's ops size them).
    pub fn new(b: &B) -> Self {
        Self {
            q: b.tensor(),
            k: b.tensor(),
            v: b.tensor(),
            attn: b.tensor(),
            stacked: b.tensor(),
            gate: b.tensor(),
            up: b.tensor(),
            expert_in: b.tensor(),
            expert_out: b.tensor(),
            router: b.tensor(),
        }
    }
}

/// A Llama-shaped model: embeddings, decoder layers with feed-forward blocks `F`, final
/// norm, output projection. `F` is a dense MLP for Llama, Mistral and Qwen2
/// ([`Llama`]), a mixture of experts for Mixtral.
pub struct LlamaModel<B: Backend, F> {
    pub config: LlamaConfig,
    spec: ModelSpec,
    embed: B::Matrix,
    layers: Vec<DecoderLayer<B, F>>,
    final_norm: B::Tensor,
    /// None when the output projection is tied to the embedding.
    lm_head: Option<B::Matrix>,
    rope: B::Rope,
}

/// The Llama family's model: dense SwiGLU MLPs.
pub type Llama<B> = LlamaModel<B, Mlp<B>>;

impl<B: Backend, F: FeedForward<B>> LlamaModel<B, F> {
    /// Loads every weight onto `b`; `extra` is what the feed-forward blocks need beyond
    /// `config`.
    pub fn load(
        b: &B,
        src: &mut WeightSource,
        config: LlamaConfig,
        extra: &F::Config,
    ) -> Result<Self, LoadError> {
        let embed = src.linear("token_embd.weight", true)?;
        if embed.rows() != config.vocab_size || embed.cols() != config.hidden_size {
            return Err(LoadError::Shape(format!(
                "token_embd.weight is {}×{}, expected {}×{}",
                embed.rows(),
                embed.cols(),
                config.vocab_size,
                config.hidden_size
            )));
        }
        let embed = b.matrix(embed)?;
        let mut layers = Vec::with_capacity(config.num_layers);
        for i in 0..config.num_layers {
            layers.push(DecoderLayer::load(b, src, i, &config, extra)?);
        }
        let final_norm = norm(b, src, "output_norm.weight", config.hidden_size)?;
        let lm_head = if src.has("output.weight") {
            Some(b.matrix(src.linear("output.weight", false)?)?)
        } else {
            None
        };
        tracing::info!(
            source = %src.describe(),
            backend = b.name(),
            architecture = %config.architecture,
            layers = config.num_layers,
            hidden = config.hidden_size,
            heads = config.num_heads,
            kv_heads = config.num_kv_heads,
            vocab = config.vocab_size,
            sliding_window = ?config.sliding_window,
            weights = %layers.first().map(|l| l.attn.format.clone()).unwrap_or_default(),
            int8_kernel = %pagoda_kernels::int8::level(),
            tied_embeddings = lm_head.is_none(),
            "model loaded"
        );
        let rope = b.rope_table(
            config.head_dim,
            config.max_position_embeddings,
            config.rope_theta,
        )?;
        Ok(Self {
            embed,
            layers,
            final_norm,
            lm_head,
            rope,
            spec: config.spec(),
            config,
        })
    }
}

impl<B: Backend, F: FeedForward<B>> CausalLm<B> for LlamaModel<B, F> {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    fn forward(
        &self,
        b: &B,
        input: &BatchInput<'_>,
        kv: &mut B::Kv,
    ) -> Result<Vec<f32>, ForwardError> {
        let cfg = &self.config;
        check_input(input, cfg.max_position_embeddings)?;
        let step = b.step(input)?;
        let (mut x, mut hbuf, mut o) = (b.tensor(), b.tensor(), b.tensor());
        b.embed(&self.embed, &step, &mut x)?;
        let mut scratch = Scratch::new(b);
        for (li, layer) in self.layers.iter().enumerate() {
            b.rms_norm(&x, &layer.attn_norm, cfg.rms_norm_eps, &mut hbuf)?;
            layer.attn.forward(
                b,
                cfg,
                &self.rope,
                li,
                &hbuf,
                &step,
                kv,
                &mut scratch,
                &mut o,
            )?;
            b.add(&mut x, &o)?;
            b.rms_norm(&x, &layer.ffn_norm, cfg.rms_norm_eps, &mut hbuf)?;
            layer.ffn.forward(b, &hbuf, &mut scratch, &mut o)?;
            b.add(&mut x, &o)?;
        }
        // Only the rows that sample need the final norm and the (large) output projection.
        let h = cfg.hidden_size;
        b.gather_rows(&x, h, input.logit_rows, &mut o)?;
        b.rms_norm(&o, &self.final_norm, cfg.rms_norm_eps, &mut hbuf)?;
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        b.matmul(head, &hbuf, &mut o)?;
        let mut logits = Vec::new();
        b.download(&o, &mut logits)?;
        Ok(logits)
    }
}
