//! DeepSeek-V2 (the Lite shape and the full one): multi-head latent attention (MLA) over a
//! compressed KV cache, and a mixture of experts with shared experts and (optionally)
//! group-limited routing.
//!
//! **MLA.** Each token's keys and values are one latent vector `c` (`kv_lora_rank`, RMS-
//! normed) plus one rotary key `k_pe` (`qk_rope_head_dim`) shared by all heads; head `h`'s
//! key is `[W_uk_h · c ; k_pe]` and its value `W_uv_h · c`. The pool stores only
//! `[c ; k_pe]` per token and layer (one "KV head" of `kv_lora_rank + qk_rope_head_dim`:
//! the pool's block shape is this model's), and attention runs on it directly by
//! absorbing the up-projections: the query `[q_nope_h ; q_pe_h]` becomes
//! `[W_uk_hᵀ q_nope_h ; q_pe_h]`, whose dot product with `[c ; k_pe]` equals the full
//! key's; the attention-weighted sum of `c` is mapped to the head's value by `W_uv_h`.
//! Scores are scaled by the full query head, `(qk_nope + qk_rope)^-½`.
//!
//! **MoE.** Layers from `first_k_dense_replace` on replace the MLP with `n_routed_experts`
//! experts (softmax router; the top `num_experts_per_tok`, or with `group_limited_greedy`
//! the top among the best `topk_group` of `n_group` groups; weights times
//! `routed_scaling_factor`, not renormalised, as transformers computes them) plus shared
//! experts that every token goes through.
//!
//! Laid out as the other families: config → attention / feed-forward / decoder layer →
//! model, each with load and forward; the KV pool is passed in. Hugging Face directories
//! (`DeepseekV2ForCausalLM`) and GGUF files (`deepseek2`, llama.cpp's names and keys; group
//! routing from `expert_group_count` / `expert_group_used_count`).

use pagoda_kernels::ops::RopeStyle;

use super::llama::{FeedForward, Mlp, Scratch};
use super::mixtral::{group_by_expert, Experts};
use super::{check_input, BatchInput, CausalLm, Family, Kind, KvLayout, ModelSpec};
use crate::executor::backend::{self, Backend, ForwardError};
use crate::executor::linear::Linear;
use crate::executor::weights::{LoadError, WeightSource};

/// The family.
pub const FAMILY: Family = Family {
    name: "deepseek2",
    gguf_names: &["deepseek2"],
    hf_names: &["DeepseekV2ForCausalLM", "deepseek_v2"],
    accepts: |_| true,
    spec: |src| Ok(DeepseekConfig::from_source(src)?.spec()),
    kind: Kind::Deepseek,
};

/// Loads a DeepSeek-V2 model from `src` onto `b`.
pub fn load<B: Backend>(b: &B, src: &mut WeightSource) -> Result<Deepseek<B>, LoadError> {
    let cfg = DeepseekConfig::from_source(src)?;
    Deepseek::load(b, src, cfg)
}

/// How routed experts are picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopK {
    /// The `num_experts_per_tok` highest scores (DeepSeek-V2-Lite).
    Greedy,
    /// Experts split into `n_group` groups; only the `topk_group` groups with the highest
    /// best score compete (DeepSeek-V2).
    GroupLimited { n_group: usize, topk_group: usize },
}

/// Hyper-parameters of a DeepSeek-V2 model.
#[derive(Debug, Clone, PartialEq)]
pub struct DeepseekConfig {
    pub architecture: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// The dense MLP's width (layers before `first_k_dense_replace`).
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub max_position_embeddings: usize,
    /// None: queries come from one projection; else through a low-rank bottleneck.
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    pub first_k_dense_replace: usize,
    pub n_routed_experts: usize,
    pub n_shared_experts: usize,
    pub num_experts_per_tok: usize,
    pub moe_intermediate_size: usize,
    pub routed_scaling_factor: f32,
    pub topk: TopK,
}

impl DeepseekConfig {
    pub fn from_source(src: &WeightSource) -> Result<Self, LoadError> {
        let cfg = match src.gguf_metadata() {
            Some(md) => Self::from_gguf(md)?,
            None => Self::from_hf(src)?,
        };
        cfg.validate()
    }

    /// From GGUF metadata (llama.cpp's `deepseek2` keys).
    fn from_gguf(
        md: &std::collections::HashMap<String, candle_core::quantized::gguf_file::Value>,
    ) -> Result<Self, LoadError> {
        let key = |k: &str| format!("deepseek2.{k}");
        let get = |k: &str| md.get(&key(k));
        let int = |k: &str| -> Result<usize, LoadError> {
            let v = get(k).ok_or_else(|| LoadError::MissingMetadata(key(k)))?;
            v.to_u64()
                .map(|x| x as usize)
                .or_else(|_| v.to_u32().map(|x| x as usize))
                .or_else(|_| v.to_i32().map(|x| x as usize))
                .map_err(|_| LoadError::MissingMetadata(key(k)))
        };
        let float = |k: &str, d: f32| {
            get(k)
                .and_then(|v| {
                    v.to_f32()
                        .ok()
                        .or_else(|| v.to_f64().ok().map(|x| x as f32))
                })
                .unwrap_or(d)
        };
        let rope = int("rope.dimension_count")?;
        let key_length = int("attention.key_length")?;
        let topk = match (int("expert_group_count"), int("expert_group_used_count")) {
            (Ok(n_group), Ok(topk_group)) if n_group > 1 => TopK::GroupLimited {
                n_group,
                topk_group,
            },
            _ => TopK::Greedy,
        };
        let vocab_size = match int("vocab_size") {
            Ok(v) => v,
            Err(_) => md
                .get("tokenizer.ggml.tokens")
                .and_then(|t| t.to_vec().ok())
                .map(|t| t.len())
                .ok_or_else(|| LoadError::MissingMetadata(key("vocab_size")))?,
        };
        Ok(Self {
            architecture: "deepseek2".into(),
            vocab_size,
            hidden_size: int("embedding_length")?,
            intermediate_size: int("feed_forward_length")?,
            num_layers: int("block_count")?,
            num_heads: int("attention.head_count")?,
            rms_norm_eps: float("attention.layer_norm_rms_epsilon", 1e-6),
            rope_theta: float("rope.freq_base", 10_000.0),
            max_position_embeddings: int("context_length")?,
            q_lora_rank: int("attention.q_lora_rank").ok().filter(|&r| r > 0),
            kv_lora_rank: int("attention.kv_lora_rank")?,
            qk_nope_head_dim: key_length.saturating_sub(rope),
            qk_rope_head_dim: rope,
            v_head_dim: int("attention.value_length")?,
            first_k_dense_replace: int("leading_dense_block_count").unwrap_or(0),
            n_routed_experts: int("expert_count")?,
            n_shared_experts: int("expert_shared_count").unwrap_or(0),
            num_experts_per_tok: int("expert_used_count")?,
            moe_intermediate_size: int("expert_feed_forward_length")?,
            routed_scaling_factor: float("expert_weights_scale", 1.0),
            topk,
        })
    }

    /// From a Hugging Face `config.json`.
    fn from_hf(src: &WeightSource) -> Result<Self, LoadError> {
        let v = src
            .hf_config()
            .ok_or_else(|| LoadError::Unsupported("no model description".into()))?;
        let path = src.hf_config_path().unwrap_or_default();
        let bad = |m: String| LoadError::BadConfig {
            path: path.clone(),
            message: m,
        };
        let int = |k: &str| -> Result<usize, LoadError> {
            v.get(k)
                .and_then(|x| x.as_u64())
                .map(|x| x as usize)
                .ok_or_else(|| bad(format!("missing integer '{k}'")))
        };
        let float = |k: &str, d: f64| v.get(k).and_then(|x| x.as_f64()).unwrap_or(d) as f32;
        if let Some(rs) = v.get("rope_scaling").filter(|r| !r.is_null()) {
            return Err(LoadError::Unsupported(format!(
                "rope_scaling {rs} is not implemented yet"
            )));
        }
        let method = v
            .get("topk_method")
            .and_then(|x| x.as_str())
            .unwrap_or("greedy");
        let topk = match method {
            "greedy" => TopK::Greedy,
            "group_limited_greedy" => TopK::GroupLimited {
                n_group: int("n_group")?,
                topk_group: int("topk_group")?,
            },
            other => {
                return Err(LoadError::Unsupported(format!(
                    "topk_method {other:?} is not implemented"
                )))
            }
        };
        let num_heads = int("num_attention_heads")?;
        Ok(Self {
            architecture: "deepseek2".into(),
            vocab_size: int("vocab_size")?,
            hidden_size: int("hidden_size")?,
            intermediate_size: int("intermediate_size")?,
            num_layers: int("num_hidden_layers")?,
            num_heads,
            rms_norm_eps: float("rms_norm_eps", 1e-6),
            rope_theta: float("rope_theta", 10_000.0),
            max_position_embeddings: int("max_position_embeddings")?,
            q_lora_rank: v
                .get("q_lora_rank")
                .and_then(|x| x.as_u64())
                .map(|x| x as usize),
            kv_lora_rank: int("kv_lora_rank")?,
            qk_nope_head_dim: int("qk_nope_head_dim")?,
            qk_rope_head_dim: int("qk_rope_head_dim")?,
            v_head_dim: int("v_head_dim")?,
            first_k_dense_replace: int("first_k_dense_replace").unwrap_or(0),
            n_routed_experts: int("n_routed_experts")?,
            n_shared_experts: int("n_shared_experts").unwrap_or(0),
            num_experts_per_tok: int("num_experts_per_tok")?,
            moe_intermediate_size: int("moe_intermediate_size")?,
            routed_scaling_factor: float("routed_scaling_factor", 1.0),
            topk,
        })
    }

    fn validate(self) -> Result<Self, LoadError> {
        let cfg = self;
        let groups_ok = match cfg.topk {
            TopK::Greedy => true,
            TopK::GroupLimited {
                n_group,
                topk_group,
            } => {
                n_group > 0
                    && topk_group > 0
                    && topk_group <= n_group
                    && cfg.n_routed_experts.is_multiple_of(n_group)
            }
        };
        if cfg.num_heads == 0
            || cfg.qk_rope_head_dim == 0
            || !cfg.qk_rope_head_dim.is_multiple_of(2)
            || cfg.num_experts_per_tok == 0
            || cfg.num_experts_per_tok > cfg.n_routed_experts
            || !groups_ok
        {
            return Err(LoadError::Unsupported(format!(
                "inconsistent DeepSeek-V2 config {cfg:?}"
            )));
        }
        Ok(cfg)
    }

    /// One query (and key) head: the part without rotary embedding, then the rotary part.
    fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// The pool keeps `[c ; k_pe]`: one head of `kv_lora_rank + qk_rope_head_dim`.
    fn cache_dim(&self) -> usize {
        self.kv_lora_rank + self.qk_rope_head_dim
    }

    pub fn spec(&self) -> ModelSpec {
        ModelSpec {
            architecture: self.architecture.clone(),
            vocab_size: self.vocab_size,
            max_position_embeddings: self.max_position_embeddings,
            kv: KvLayout {
                num_layers: self.num_layers,
                heads: 1,
                head_dim: self.cache_dim(),
                values_are_keys: true,
            },
            sliding_window: None,
        }
    }
}

fn hf(i: usize, name: &str) -> String {
    format!("model.layers.{i}.{name}")
}

/// A matrix, checked to be `rows × cols` (GGUF name `blk.{i}.{gguf}`, HF name `hf`).
fn matrix(
    src: &mut WeightSource,
    gguf: &str,
    hf: &str,
    rows: usize,
    cols: usize,
) -> Result<Linear, LoadError> {
    let l = src.linear_as(gguf, hf, false)?;
    if l.rows() != rows || l.cols() != cols {
        return Err(LoadError::Shape(format!(
            "{hf} is {}×{}, expected {rows}×{cols}",
            l.rows(),
            l.cols()
        )));
    }
    Ok(l)
}

/// The SwiGLU MLP of layer `i` (`ff` wide): GGUF `blk.{i}.ffn_{gate,up,down}{suffix}`,
/// Hugging Face `{prefix}.{gate,up,down}_proj` — the dense layers and the shared experts.
fn dense_mlp<B: Backend>(
    b: &B,
    src: &mut WeightSource,
    i: usize,
    suffix: &str,
    prefix: &str,
    ff: usize,
    h: usize,
) -> Result<Mlp<B>, LoadError> {
    let mut part = |g: &str, rows: usize, cols: usize| {
        matrix(
            src,
            &format!("blk.{i}.ffn_{g}{suffix}.weight"),
            &hf(i, &format!("{prefix}.{g}_proj.weight")),
            rows,
            cols,
        )
    };
    let gate = part("gate", ff, h)?;
    let up = part("up", ff, h)?;
    let down = part("down", h, ff)?;
    Mlp::from_parts(b, gate, up, down)
}

fn vector<B: Backend>(
    b: &B,
    src: &mut WeightSource,
    gguf: &str,
    hf: &str,
    len: usize,
) -> Result<B::Tensor, LoadError> {
    let v = src.vector_as(gguf, hf)?;
    backend::vector(b, hf, v, len)
}

/// How queries are made.
enum QueryProj<B: Backend> {
    Direct(B::Matrix),
    LowRank {
        a: B::Matrix,
        norm: B::Tensor,
        b: B::Matrix,
    },
}

/// Multi-head latent attention (see the module docs).
pub struct Mla<B: Backend> {
    q: QueryProj<B>,
    /// `hidden → kv_lora_rank + qk_rope_head_dim`.
    kv_a: B::Matrix,
    kv_a_norm: B::Tensor,
    /// Per head, `W_uk_hᵀ` (`kv_lora_rank × qk_nope`): a head's query into latent space.
    w_uk_t: Vec<B::Matrix>,
    /// Per head, `W_uv_h` (`v_head_dim × kv_lora_rank`): a weighted latent into values.
    w_uv: Vec<B::Matrix>,
    o: B::Matrix,
}

/// Buffers of latent attention, reused by every layer.
struct MlaScratch<B: Backend> {
    qa: B::Tensor,
    qa_normed: B::Tensor,
    q: B::Tensor,
    kv_a: B::Tensor,
    latent_raw: B::Tensor,
    latent: B::Tensor,
    k_pe: B::Tensor,
    cache_rows: B::Tensor,
    q_pe: B::Tensor,
    q_nope: B::Tensor,
    q_latent: B::Tensor,
    q_cache: B::Tensor,
    o_cache: B::Tensor,
    o_latent: B::Tensor,
    heads: B::Tensor,
}

impl<B: Backend> MlaScratch<B> {
    fn new(b: &B) -> Self {
        Self {
            qa: b.tensor(),
            qa_normed: b.tensor(),
            q: b.tensor(),
            kv_a: b.tensor(),
            latent_raw: b.tensor(),
            latent: b.tensor(),
            k_pe: b.tensor(),
            cache_rows: b.tensor(),
            q_pe: b.tensor(),
            q_nope: b.tensor(),
            q_latent: b.tensor(),
            q_cache: b.tensor(),
            o_cache: b.tensor(),
            o_latent: b.tensor(),
            heads: b.tensor(),
        }
    }
}

impl<B: Backend> Mla<B> {
    pub fn load(
        b: &B,
        src: &mut WeightSource,
        i: usize,
        cfg: &DeepseekConfig,
    ) -> Result<Self, LoadError> {
        let (h, nh, qk) = (cfg.hidden_size, cfg.num_heads, cfg.qk_head_dim());
        let g = |n: &str| format!("blk.{i}.{n}");
        let q = match cfg.q_lora_rank {
            None => QueryProj::Direct(b.matrix(matrix(
                src,
                &g("attn_q.weight"),
                &hf(i, "self_attn.q_proj.weight"),
                nh * qk,
                h,
            )?)?),
            Some(r) => QueryProj::LowRank {
                a: b.matrix(matrix(
                    src,
                    &g("attn_q_a.weight"),
                    &hf(i, "self_attn.q_a_proj.weight"),
                    r,
                    h,
                )?)?,
                norm: vector(
                    b,
                    src,
                    &g("attn_q_a_norm.weight"),
                    &hf(i, "self_attn.q_a_layernorm.weight"),
                    r,
                )?,
                b: b.matrix(matrix(
                    src,
                    &g("attn_q_b.weight"),
                    &hf(i, "self_attn.q_b_proj.weight"),
                    nh * qk,
                    r,
                )?)?,
            },
        };
        let kv_a = b.matrix(matrix(
            src,
            &g("attn_kv_a_mqa.weight"),
            &hf(i, "self_attn.kv_a_proj_with_mqa.weight"),
            cfg.cache_dim(),
            h,
        )?)?;
        let kv_a_norm = vector(
            b,
            src,
            &g("attn_kv_a_norm.weight"),
            &hf(i, "self_attn.kv_a_layernorm.weight"),
            cfg.kv_lora_rank,
        )?;
        // The up-projection is absorbed into the query and the output: per head, one
        // dense matrix each way.
        let (nope, vd, r) = (cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank);
        let per_head = nope + vd;
        let kv_b = src.vector_as(&g("attn_kv_b.weight"), &hf(i, "self_attn.kv_b_proj.weight"))?;
        if kv_b.len() != nh * per_head * r {
            return Err(LoadError::Shape(format!(
                "kv_b_proj of layer {i} has {} values, expected {}",
                kv_b.len(),
                nh * per_head * r
            )));
        }
        let mut w_uk_t = Vec::with_capacity(nh);
        let mut w_uv = Vec::with_capacity(nh);
        for head in kv_b.chunks_exact(per_head * r) {
            let (uk, uv) = head.split_at(nope * r);
            // uk is nope × r; its transpose maps a query head (nope) into the latent (r).
            let mut t = vec![0f32; r * nope];
            for d in 0..nope {
                for j in 0..r {
                    t[j * nope + d] = uk[d * r + j];
                }
            }
            w_uk_t.push(b.matrix(Linear::dense(t, r, nope)?)?);
            w_uv.push(b.matrix(Linear::dense(uv.to_vec(), vd, r)?)?);
        }
        let o = b.matrix(matrix(
            src,
            &g("attn_output.weight"),
            &hf(i, "self_attn.o_proj.weight"),
            h,
            nh * vd,
        )?)?;
        Ok(Self {
            q,
            kv_a,
            kv_a_norm,
            w_uk_t,
            w_uv,
            o,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        b: &B,
        cfg: &DeepseekConfig,
        rope: &B::Rope,
        li: usize,
        x: &B::Tensor,
        step: &B::Step<'_>,
        kv: &mut B::Kv,
        s: &mut MlaScratch<B>,
        out: &mut B::Tensor,
    ) -> Result<(), ForwardError> {
        let (nh, nope, rd, r) = (
            cfg.num_heads,
            cfg.qk_nope_head_dim,
            cfg.qk_rope_head_dim,
            cfg.kv_lora_rank,
        );
        let (qk, cd, eps) = (nope + rd, r + rd, cfg.rms_norm_eps);
        let interleaved = RopeStyle::Interleaved;
        match &self.q {
            QueryProj::Direct(w) => b.matmul(w, x, &mut s.q)?,
            QueryProj::LowRank { a, norm, b: up } => {
                b.matmul(a, x, &mut s.qa)?;
                b.rms_norm(&s.qa, norm, eps, &mut s.qa_normed)?;
                b.matmul(up, &s.qa_normed, &mut s.q)?;
            }
        }
        // What the pool keeps per token: the normed latent and the rotated shared key.
        b.matmul(&self.kv_a, x, &mut s.kv_a)?;
        b.copy_cols(&s.kv_a, cd, 0, &mut s.latent_raw, r, 0, r)?;
        b.rms_norm(&s.latent_raw, &self.kv_a_norm, eps, &mut s.latent)?;
        b.copy_cols(&s.kv_a, cd, r, &mut s.k_pe, rd, 0, rd)?;
        b.rope(&mut s.k_pe, 1, rd, rope, interleaved, step)?;
        b.copy_cols(&s.latent, r, 0, &mut s.cache_rows, cd, 0, r)?;
        b.copy_cols(&s.k_pe, rd, 0, &mut s.cache_rows, cd, r, rd)?;
        // Values are the latent: the pool keeps these rows once and attention reads them
        // as V too (the rotary columns of its output are not used).
        b.kv_write(kv, li, &s.cache_rows, None, step)?;

        // Queries in the cache's space, per head: [W_ukᵀ q_nope ; rotated q_pe].
        b.copy_cols(&s.q, qk, nope, &mut s.q_pe, rd, 0, rd)?;
        b.rope(&mut s.q_pe, nh, rd, rope, interleaved, step)?;
        b.copy_cols(&s.q, qk, 0, &mut s.q_nope, nope, 0, nope)?;
        b.matmul_heads(&self.w_uk_t, &s.q_nope, &mut s.q_latent)?;
        b.copy_cols(&s.q_latent, r, 0, &mut s.q_cache, cd, 0, r)?;
        b.copy_cols(&s.q_pe, rd, 0, &mut s.q_cache, cd, r, rd)?;
        let scale = 1.0 / (qk as f32).sqrt();
        b.attend(
            kv,
            li,
            &s.q_cache,
            nh,
            Some(scale),
            None,
            step,
            &mut s.o_cache,
        )?;
        // Each head's weighted latent through W_uv, then the output projection.
        b.copy_cols(&s.o_cache, cd, 0, &mut s.o_latent, r, 0, r)?;
        b.matmul_heads(&self.w_uv, &s.o_latent, &mut s.heads)?;
        b.matmul(&self.o, &s.heads, out)
    }
}

/// Routed experts, shared experts, and the router.
pub struct DeepseekMoe<B: Backend> {
    /// `n_routed_experts × hidden`.
    router: B::Matrix,
    experts: Experts<B>,
    shared: Option<Mlp<B>>,
    top_k: usize,
    method: TopK,
    scaling: f32,
}

impl<B: Backend> DeepseekMoe<B> {
    fn load(
        b: &B,
        src: &mut WeightSource,
        i: usize,
        cfg: &DeepseekConfig,
    ) -> Result<Self, LoadError> {
        let (h, ff) = (cfg.hidden_size, cfg.moe_intermediate_size);
        let router = matrix(
            src,
            &format!("blk.{i}.ffn_gate_inp.weight"),
            &hf(i, "mlp.gate.weight"),
            cfg.n_routed_experts,
            h,
        )?;
        let mut experts = Vec::with_capacity(cfg.n_routed_experts);
        for e in 0..cfg.n_routed_experts {
            let mut part = |stacked: &str, w: &str| {
                src.expert_linear(
                    &format!("blk.{i}.{stacked}.weight"),
                    e,
                    &hf(i, &format!("mlp.experts.{e}.{w}.weight")),
                )
            };
            let gate = part("ffn_gate_exps", "gate_proj")?;
            let up = part("ffn_up_exps", "up_proj")?;
            let down = part("ffn_down_exps", "down_proj")?;
            if gate.rows() != ff || gate.cols() != h || down.rows() != h || down.cols() != ff {
                return Err(LoadError::Shape(format!(
                    "expert {e} of layer {i} is not {ff}×{h} / {h}×{ff}"
                )));
            }
            experts.push(Mlp::from_parts(b, gate, up, down)?);
        }
        let shared = if cfg.n_shared_experts > 0 {
            let sff = ff * cfg.n_shared_experts;
            Some(dense_mlp(
                b,
                src,
                i,
                "_shexp",
                "mlp.shared_experts",
                sff,
                h,
            )?)
        } else {
            None
        };
        Ok(Self {
            router: b.matrix(router)?,
            experts: Experts::new(experts),
            shared,
            top_k: cfg.num_experts_per_tok,
            method: cfg.topk,
            scaling: cfg.routed_scaling_factor,
        })
    }

    fn forward(
        &self,
        b: &B,
        x: &B::Tensor,
        s: &mut Scratch<B>,
        out: &mut B::Tensor,
    ) -> Result<(), ForwardError> {
        let (ne, h) = b.matrix_shape(&self.router);
        // Routing decisions are made on the host: the logits are n × experts.
        b.matmul(&self.router, x, &mut s.router)?;
        let mut logits = Vec::new();
        b.download(&s.router, &mut logits)?;
        let routed = group_by_expert(&logits, ne, |row| {
            route(row, self.top_k, self.method)
                .into_iter()
                .map(|(e, w)| (e, w * self.scaling))
                .collect()
        });
        match &self.shared {
            Some(shared) => shared.forward(b, x, s, out)?,
            None => b.fill(out, b.len(x), 0.0)?,
        }
        self.experts.forward(b, x, h, &routed, s, out)
    }
}

/// The experts a token goes to and their softmax scores (not renormalised).
pub fn route(logits: &[f32], k: usize, method: TopK) -> Vec<(usize, f32)> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = logits.iter().map(|&l| (l - max).exp()).collect();
    let total: f32 = exps.iter().sum();
    let mut scores: Vec<f32> = exps.iter().map(|e| e / total).collect();
    if let TopK::GroupLimited {
        n_group,
        topk_group,
    } = method
    {
        let per = scores.len() / n_group;
        let best: Vec<f32> = scores
            .chunks(per)
            .map(|g| g.iter().copied().fold(f32::NEG_INFINITY, f32::max))
            .collect();
        let mut groups: Vec<usize> = (0..n_group).collect();
        groups.sort_by(|&a, &b| best[b].total_cmp(&best[a]).then(a.cmp(&b)));
        for &g in &groups[topk_group..] {
            scores[g * per..(g + 1) * per].fill(0.0);
        }
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    order.into_iter().take(k).map(|e| (e, scores[e])).collect()
}

/// A layer's feed-forward block.
enum Ffn<B: Backend> {
    Dense(Mlp<B>),
    Moe(DeepseekMoe<B>),
}

/// One decoder layer: pre-norm MLA, pre-norm feed-forward.
struct Layer<B: Backend> {
    attn_norm: B::Tensor,
    attn: Mla<B>,
    ffn_norm: B::Tensor,
    ffn: Ffn<B>,
}

/// A loaded DeepSeek-V2 model.
pub struct Deepseek<B: Backend> {
    pub config: DeepseekConfig,
    spec: ModelSpec,
    embed: B::Matrix,
    layers: Vec<Layer<B>>,
    final_norm: B::Tensor,
    lm_head: B::Matrix,
    rope: B::Rope,
}

impl<B: Backend> Deepseek<B> {
    pub fn load(b: &B, src: &mut WeightSource, config: DeepseekConfig) -> Result<Self, LoadError> {
        let h = config.hidden_size;
        let embed = src.linear_as("token_embd.weight", "model.embed_tokens.weight", true)?;
        if embed.rows() != config.vocab_size || embed.cols() != h {
            return Err(LoadError::Shape(format!(
                "the embedding is {}×{}, expected {}×{h}",
                embed.rows(),
                embed.cols(),
                config.vocab_size
            )));
        }
        let embed = b.matrix(embed)?;
        let mut layers = Vec::with_capacity(config.num_layers);
        for i in 0..config.num_layers {
            let ffn = if i < config.first_k_dense_replace {
                let ff = config.intermediate_size;
                Ffn::Dense(dense_mlp(b, src, i, "", "mlp", ff, h)?)
            } else {
                Ffn::Moe(DeepseekMoe::load(b, src, i, &config)?)
            };
            layers.push(Layer {
                attn_norm: vector(
                    b,
                    src,
                    &format!("blk.{i}.attn_norm.weight"),
                    &hf(i, "input_layernorm.weight"),
                    h,
                )?,
                ffn_norm: vector(
                    b,
                    src,
                    &format!("blk.{i}.ffn_norm.weight"),
                    &hf(i, "post_attention_layernorm.weight"),
                    h,
                )?,
                attn: Mla::load(b, src, i, &config)?,
                ffn,
            });
        }
        let final_norm = vector(b, src, "output_norm.weight", "model.norm.weight", h)?;
        let lm_head = b.matrix(matrix(
            src,
            "output.weight",
            "lm_head.weight",
            config.vocab_size,
            h,
        )?)?;
        let rope = b.rope_table(
            config.qk_rope_head_dim,
            config.max_position_embeddings,
            config.rope_theta,
        )?;
        tracing::info!(
            source = %src.describe(),
            backend = b.name(),
            layers = config.num_layers,
            hidden = h,
            heads = config.num_heads,
            kv_lora_rank = config.kv_lora_rank,
            routed_experts = config.n_routed_experts,
            shared_experts = config.n_shared_experts,
            "model loaded"
        );
        Ok(Self {
            spec: config.spec(),
            config,
            embed,
            layers,
            final_norm,
            lm_head,
            rope,
        })
    }
}

impl<B: Backend> CausalLm<B> for Deepseek<B> {
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
        let mut mla = MlaScratch::new(b);
        for (li, layer) in self.layers.iter().enumerate() {
            b.rms_norm(&x, &layer.attn_norm, cfg.rms_norm_eps, &mut hbuf)?;
            layer
                .attn
                .forward(b, cfg, &self.rope, li, &hbuf, &step, kv, &mut mla, &mut o)?;
            b.add(&mut x, &o)?;
            b.rms_norm(&x, &layer.ffn_norm, cfg.rms_norm_eps, &mut hbuf)?;
            match &layer.ffn {
                Ffn::Dense(mlp) => mlp.forward(b, &hbuf, &mut scratch, &mut o)?,
                Ffn::Moe(moe) => moe.forward(b, &hbuf, &mut scratch, &mut o)?,
            }
            b.add(&mut x, &o)?;
        }
        b.gather_rows(&x, cfg.hidden_size, input.logit_rows, &mut o)?;
        b.rms_norm(&o, &self.final_norm, cfg.rms_norm_eps, &mut hbuf)?;
        b.matmul(&self.lm_head, &hbuf, &mut o)?;
        let mut logits = Vec::new();
        b.download(&o, &mut logits)?;
        Ok(logits)
    }
}

#[cfg(test)]
mod tests {
    use super::{route, TopK};

    #[test]
    fn greedy_routing_keeps_softmax_scores() {
        let r = route(&[0.0, 1.0, 2.0, 3.0], 2, TopK::Greedy);
        assert_eq!(r.iter().map(|&(e, _)| e).collect::<Vec<_>>(), vec![3, 2]);
        let total: f32 = [0.0f32, 1.0, 2.0, 3.0].iter().map(|x| x.exp()).sum();
        assert!((r[0].1 - 3f32.exp() / total).abs() < 1e-6);
    }

    #[test]
    fn group_limited_routing_only_looks_in_the_best_groups() {
        // Groups {0,1} (best 0.9), {2,3} (best 3.0), {4,5} (best 2.9): with one group
        // allowed, both experts come from {2,3}, although expert 4 beats expert 2.
        let logits = [0.9, 0.1, 1.0, 3.0, 2.9, 0.0];
        let r = route(
            &logits,
            2,
            TopK::GroupLimited {
                n_group: 3,
                topk_group: 1,
            },
        );
        assert_eq!(r.iter().map(|&(e, _)| e).collect::<Vec<_>>(), vec![3, 2]);
        let greedy = route(&logits, 2, TopK::Greedy);
        assert_eq!(
            greedy.iter().map(|&(e, _)| e).collect::<Vec<_>>(),
            vec![3, 4]
        );
    }
}
