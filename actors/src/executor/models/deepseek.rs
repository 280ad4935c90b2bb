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

use pagoda_kernels::ops::{apply_rope, rms_norm, RopeStyle, RopeTable};
use pagoda_kernels::quant::Precision;

use super::llama::{Mlp, Scratch};
use super::{BatchInput, CausalLm, Family, KvLayout, ModelSpec};
use crate::executor::kv_pool::KvPool;
use crate::executor::linear::{ForwardError, Linear};
use crate::executor::weights::{LoadError, WeightSource};

/// The family.
pub const FAMILY: Family = Family {
    name: "deepseek2",
    gguf_names: &["deepseek2"],
    hf_names: &["DeepseekV2ForCausalLM", "deepseek_v2"],
    accepts: |_| true,
    spec: |src| Ok(DeepseekConfig::from_source(src)?.spec()),
    load: |src, xp| {
        let cfg = DeepseekConfig::from_source(src)?;
        Ok(Box::new(Deepseek::load(src, cfg, xp)?))
    },
};

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

fn vector(src: &mut WeightSource, gguf: &str, hf: &str, len: usize) -> Result<Vec<f32>, LoadError> {
    let v = src.vector_as(gguf, hf)?;
    if v.len() != len {
        return Err(LoadError::Shape(format!(
            "{hf} has {} values, expected {len}",
            v.len()
        )));
    }
    Ok(v)
}

/// How queries are made.
enum QueryProj {
    Direct(Linear),
    LowRank {
        a: Linear,
        norm: Vec<f32>,
        b: Linear,
    },
}

/// Multi-head latent attention (see the module docs).
pub struct Mla {
    q: QueryProj,
    /// `hidden → kv_lora_rank + qk_rope_head_dim`.
    kv_a: Linear,
    kv_a_norm: Vec<f32>,
    /// Per head, `W_uk_h` (`qk_nope × kv_lora_rank`), row-major.
    w_uk: Vec<Vec<f32>>,
    /// Per head, `W_uv_h` (`v_head_dim × kv_lora_rank`), row-major.
    w_uv: Vec<Vec<f32>>,
    o: Linear,
}

impl Mla {
    pub fn load(
        src: &mut WeightSource,
        i: usize,
        cfg: &DeepseekConfig,
        xp: Precision,
    ) -> Result<Self, LoadError> {
        let (h, nh, qk) = (cfg.hidden_size, cfg.num_heads, cfg.qk_head_dim());
        let g = |n: &str| format!("blk.{i}.{n}");
        let q = match cfg.q_lora_rank {
            None => QueryProj::Direct(
                matrix(
                    src,
                    &g("attn_q.weight"),
                    &hf(i, "self_attn.q_proj.weight"),
                    nh * qk,
                    h,
                )?
                .prepare(xp),
            ),
            Some(r) => QueryProj::LowRank {
                a: matrix(
                    src,
                    &g("attn_q_a.weight"),
                    &hf(i, "self_attn.q_a_proj.weight"),
                    r,
                    h,
                )?
                .prepare(xp),
                norm: vector(
                    src,
                    &g("attn_q_a_norm.weight"),
                    &hf(i, "self_attn.q_a_layernorm.weight"),
                    r,
                )?,
                b: matrix(
                    src,
                    &g("attn_q_b.weight"),
                    &hf(i, "self_attn.q_b_proj.weight"),
                    nh * qk,
                    r,
                )?
                .prepare(xp),
            },
        };
        let kv_a = matrix(
            src,
            &g("attn_kv_a_mqa.weight"),
            &hf(i, "self_attn.kv_a_proj_with_mqa.weight"),
            cfg.cache_dim(),
            h,
        )?
        .prepare(xp);
        let kv_a_norm = vector(
            src,
            &g("attn_kv_a_norm.weight"),
            &hf(i, "self_attn.kv_a_layernorm.weight"),
            cfg.kv_lora_rank,
        )?;
        // The up-projection is absorbed into the query and the output: keep it as f32
        // rows per head.
        let per_head = cfg.qk_nope_head_dim + cfg.v_head_dim;
        let kv_b = src.vector_as(&g("attn_kv_b.weight"), &hf(i, "self_attn.kv_b_proj.weight"))?;
        let r = cfg.kv_lora_rank;
        if kv_b.len() != nh * per_head * r {
            return Err(LoadError::Shape(format!(
                "kv_b_proj of layer {i} has {} values, expected {}",
                kv_b.len(),
                nh * per_head * r
            )));
        }
        let mut w_uk = Vec::with_capacity(nh);
        let mut w_uv = Vec::with_capacity(nh);
        for head in kv_b.chunks_exact(per_head * r) {
            let (uk, uv) = head.split_at(cfg.qk_nope_head_dim * r);
            w_uk.push(uk.to_vec());
            w_uv.push(uv.to_vec());
        }
        let o = matrix(
            src,
            &g("attn_output.weight"),
            &hf(i, "self_attn.o_proj.weight"),
            h,
            nh * cfg.v_head_dim,
        )?
        .prepare(xp);
        Ok(Self {
            q,
            kv_a,
            kv_a_norm,
            w_uk,
            w_uv,
            o,
        })
    }

    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        cfg: &DeepseekConfig,
        rope: &RopeTable,
        li: usize,
        x: &[f32],
        n: usize,
        input: &BatchInput<'_>,
        kv: &mut KvPool,
        out: &mut [f32],
    ) -> Result<(), ForwardError> {
        let (nh, nope, rd, r, vd) = (
            cfg.num_heads,
            cfg.qk_nope_head_dim,
            cfg.qk_rope_head_dim,
            cfg.kv_lora_rank,
            cfg.v_head_dim,
        );
        let qk = nope + rd;
        let mut q = vec![0f32; n * nh * qk];
        match &self.q {
            QueryProj::Direct(w) => w.forward(x, n, &mut q)?,
            QueryProj::LowRank { a, norm, b } => {
                let mut qa = vec![0f32; n * a.rows()];
                a.forward(x, n, &mut qa)?;
                rms_norm(&mut qa, norm, cfg.rms_norm_eps);
                b.forward(&qa, n, &mut q)?;
            }
        }
        // The latent and the shared rotary key: what the pool keeps.
        let cd = r + rd;
        let mut kv_a = vec![0f32; n * cd];
        self.kv_a.forward(x, n, &mut kv_a)?;
        let mut k_pe = vec![0f32; n * rd];
        let mut latent = vec![0f32; n * r];
        for t in 0..n {
            latent[t * r..(t + 1) * r].copy_from_slice(&kv_a[t * cd..t * cd + r]);
            k_pe[t * rd..(t + 1) * rd].copy_from_slice(&kv_a[t * cd + r..(t + 1) * cd]);
        }
        rms_norm(&mut latent, &self.kv_a_norm, cfg.rms_norm_eps);
        apply_rope(
            &mut k_pe,
            input.positions,
            1,
            rd,
            rope,
            RopeStyle::Interleaved,
        )?;
        let mut k_rows = vec![0f32; n * cd];
        let mut v_rows = vec![0f32; n * cd];
        for t in 0..n {
            k_rows[t * cd..t * cd + r].copy_from_slice(&latent[t * r..(t + 1) * r]);
            k_rows[t * cd + r..(t + 1) * cd].copy_from_slice(&k_pe[t * rd..(t + 1) * rd]);
            v_rows[t * cd..t * cd + r].copy_from_slice(&latent[t * r..(t + 1) * r]);
        }
        kv.write(li, &k_rows, &v_rows, input.slots)?;

        // Queries in the cache's space: [W_ukᵀ q_nope ; rotated q_pe] per head.
        let mut q_pe = vec![0f32; n * nh * rd];
        for t in 0..n {
            for h in 0..nh {
                let src = &q[(t * nh + h) * qk + nope..(t * nh + h + 1) * qk];
                q_pe[(t * nh + h) * rd..(t * nh + h + 1) * rd].copy_from_slice(src);
            }
        }
        apply_rope(
            &mut q_pe,
            input.positions,
            nh,
            rd,
            rope,
            RopeStyle::Interleaved,
        )?;
        let mut q_cache = vec![0f32; n * nh * cd];
        for t in 0..n {
            for h in 0..nh {
                let qn = &q[(t * nh + h) * qk..(t * nh + h) * qk + nope];
                let dst = &mut q_cache[(t * nh + h) * cd..(t * nh + h + 1) * cd];
                let (lat, pe) = dst.split_at_mut(r);
                // lat[j] = Σ_d W_uk[d][j] · q_nope[d]
                lat.fill(0.0);
                for (d, &qd) in qn.iter().enumerate() {
                    let row = &self.w_uk[h][d * r..(d + 1) * r];
                    for (l, &w) in lat.iter_mut().zip(row) {
                        *l += w * qd;
                    }
                }
                pe.copy_from_slice(&q_pe[(t * nh + h) * rd..(t * nh + h + 1) * rd]);
            }
        }
        let scale = 1.0 / (qk as f32).sqrt();
        let mut o_cache = vec![0f32; n * nh * cd];
        kv.attend_scaled(li, &q_cache, nh, input.seqs, scale, &mut o_cache)?;
        // Each head's weighted latent through W_uv.
        let mut heads = vec![0f32; n * nh * vd];
        for t in 0..n {
            for h in 0..nh {
                let lat = &o_cache[(t * nh + h) * cd..(t * nh + h) * cd + r];
                let dst = &mut heads[(t * nh + h) * vd..(t * nh + h + 1) * vd];
                for (d, o) in dst.iter_mut().enumerate() {
                    let row = &self.w_uv[h][d * r..(d + 1) * r];
                    *o = row.iter().zip(lat).map(|(w, l)| w * l).sum();
                }
            }
        }
        self.o.forward(&heads, n, out)?;
        Ok(())
    }
}

/// Routed experts, shared experts, and the router.
pub struct DeepseekMoe {
    /// `n_routed_experts × hidden`.
    router: Linear,
    experts: Vec<Mlp>,
    shared: Option<Mlp>,
    top_k: usize,
    method: TopK,
    scaling: f32,
}

impl DeepseekMoe {
    fn load(
        src: &mut WeightSource,
        i: usize,
        cfg: &DeepseekConfig,
        xp: Precision,
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
            experts.push(Mlp::from_parts(gate, up, down, xp));
        }
        let shared = if cfg.n_shared_experts > 0 {
            let sff = ff * cfg.n_shared_experts;
            let mut part = |g: &str, w: &str, rows: usize, cols: usize| {
                matrix(
                    src,
                    &format!("blk.{i}.{g}.weight"),
                    &hf(i, &format!("mlp.shared_experts.{w}.weight")),
                    rows,
                    cols,
                )
            };
            let gate = part("ffn_gate_shexp", "gate_proj", sff, h)?;
            let up = part("ffn_up_shexp", "up_proj", sff, h)?;
            let down = part("ffn_down_shexp", "down_proj", h, sff)?;
            Some(Mlp::from_parts(gate, up, down, xp))
        } else {
            None
        };
        Ok(Self {
            router: router.prepare(xp),
            experts,
            shared,
            top_k: cfg.num_experts_per_tok,
            method: cfg.topk,
            scaling: cfg.routed_scaling_factor,
        })
    }

    fn forward(
        &self,
        x: &[f32],
        n: usize,
        s: &mut Scratch,
        out: &mut [f32],
    ) -> Result<(), ForwardError> {
        let h = x.len() / n.max(1);
        let ne = self.experts.len();
        let mut logits = vec![0f32; n * ne];
        self.router.forward(x, n, &mut logits)?;
        let mut routed: Vec<Vec<(usize, f32)>> = vec![Vec::new(); ne];
        for (t, row) in logits.chunks_exact(ne).enumerate() {
            for (e, w) in route(row, self.top_k, self.method) {
                routed[e].push((t, w * self.scaling));
            }
        }
        match &self.shared {
            Some(shared) => shared.forward_rows(x, n, s, out)?,
            None => out.fill(0.0),
        }
        let mut xs = Vec::new();
        let mut ys = Vec::new();
        for (expert, tokens) in self.experts.iter().zip(&routed) {
            if tokens.is_empty() {
                continue;
            }
            let m = tokens.len();
            xs.clear();
            for &(t, _) in tokens {
                xs.extend_from_slice(&x[t * h..(t + 1) * h]);
            }
            ys.resize(m * h, 0.0);
            expert.forward_rows(&xs, m, s, &mut ys)?;
            for (j, &(t, w)) in tokens.iter().enumerate() {
                for (o, y) in out[t * h..(t + 1) * h]
                    .iter_mut()
                    .zip(&ys[j * h..(j + 1) * h])
                {
                    *o += w * y;
                }
            }
        }
        Ok(())
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
enum Ffn {
    Dense(Mlp),
    Moe(DeepseekMoe),
}

/// One decoder layer: pre-norm MLA, pre-norm feed-forward.
struct Layer {
    attn_norm: Vec<f32>,
    attn: Mla,
    ffn_norm: Vec<f32>,
    ffn: Ffn,
}

/// A loaded DeepSeek-V2 model.
pub struct Deepseek {
    pub config: DeepseekConfig,
    spec: ModelSpec,
    embed: Linear,
    layers: Vec<Layer>,
    final_norm: Vec<f32>,
    lm_head: Linear,
    rope: RopeTable,
}

impl Deepseek {
    pub fn load(
        src: &mut WeightSource,
        config: DeepseekConfig,
        xp: Precision,
    ) -> Result<Self, LoadError> {
        let h = config.hidden_size;
        let embed = src
            .linear_as("token_embd.weight", "model.embed_tokens.weight", true)?
            .prepare(xp);
        if embed.rows() != config.vocab_size || embed.cols() != h {
            return Err(LoadError::Shape(format!(
                "the embedding is {}×{}, expected {}×{h}",
                embed.rows(),
                embed.cols(),
                config.vocab_size
            )));
        }
        let mut layers = Vec::with_capacity(config.num_layers);
        for i in 0..config.num_layers {
            let ffn = if i < config.first_k_dense_replace {
                let ff = config.intermediate_size;
                let mut part = |g: &str, w: &str, rows: usize, cols: usize| {
                    matrix(
                        src,
                        &format!("blk.{i}.{g}.weight"),
                        &hf(i, &format!("mlp.{w}.weight")),
                        rows,
                        cols,
                    )
                };
                let gate = part("ffn_gate", "gate_proj", ff, h)?;
                let up = part("ffn_up", "up_proj", ff, h)?;
                let down = part("ffn_down", "down_proj", h, ff)?;
                Ffn::Dense(Mlp::from_parts(gate, up, down, xp))
            } else {
                Ffn::Moe(DeepseekMoe::load(src, i, &config, xp)?)
            };
            layers.push(Layer {
                attn_norm: vector(
                    src,
                    &format!("blk.{i}.attn_norm.weight"),
                    &hf(i, "input_layernorm.weight"),
                    h,
                )?,
                ffn_norm: vector(
                    src,
                    &format!("blk.{i}.ffn_norm.weight"),
                    &hf(i, "post_attention_layernorm.weight"),
                    h,
                )?,
                attn: Mla::load(src, i, &config, xp)?,
                ffn,
            });
        }
        let final_norm = vector(src, "output_norm.weight", "model.norm.weight", h)?;
        let lm_head =
            matrix(src, "output.weight", "lm_head.weight", config.vocab_size, h)?.prepare(xp);
        let rope = RopeTable::new(
            config.qk_rope_head_dim,
            config.max_position_embeddings,
            config.rope_theta,
        );
        tracing::info!(
            source = %src.describe(),
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

impl CausalLm for Deepseek {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    fn forward(&self, input: &BatchInput<'_>, kv: &mut KvPool) -> Result<Vec<f32>, ForwardError> {
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
        let mut scratch = Scratch::empty();
        for (li, layer) in self.layers.iter().enumerate() {
            hbuf.copy_from_slice(&x);
            rms_norm(&mut hbuf, &layer.attn_norm, cfg.rms_norm_eps);
            layer
                .attn
                .forward(cfg, &self.rope, li, &hbuf, n, input, kv, &mut o)?;
            for (xi, oi) in x.iter_mut().zip(&o) {
                *xi += oi;
            }
            hbuf.copy_from_slice(&x);
            rms_norm(&mut hbuf, &layer.ffn_norm, cfg.rms_norm_eps);
            match &layer.ffn {
                Ffn::Dense(mlp) => mlp.forward_rows(&hbuf, n, &mut scratch, &mut o)?,
                Ffn::Moe(moe) => moe.forward(&hbuf, n, &mut scratch, &mut o)?,
            }
            for (xi, oi) in x.iter_mut().zip(&o) {
                *xi += oi;
            }
        }
        let m = input.logit_rows.len();
        let mut last = vec![0f32; m * h];
        for (dst, &r) in last.chunks_exact_mut(h).zip(input.logit_rows) {
            if r >= n {
                return Err(ForwardError::Shape(format!("logit row {r} of {n}")));
            }
            dst.copy_from_slice(&x[r * h..(r + 1) * h]);
        }
        rms_norm(&mut last, &self.final_norm, cfg.rms_norm_eps);
        let mut logits = vec![0f32; m * cfg.vocab_size];
        self.lm_head.forward(&last, m, &mut logits)?;
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
