//! Mixtral: the Llama decoder with a sparse mixture of experts in place of the MLP. A
//! router picks the top-k of `num_experts` SwiGLU experts per token (softmax over all
//! experts, the top k renormalised to sum to one) and the block's output is their
//! weighted sum. Tokens are grouped per expert, so each expert's weights are read once
//! per step for all the tokens routed to it.
//!
//! From GGUF (llama.cpp stores Mixtral under the `llama` architecture, with
//! `llama.expert_count` and the experts stacked into `ffn_{gate,up,down}_exps` tensors)
//! and from Hugging Face directories (`MixtralForCausalLM`).

use pagoda_kernels::quant::Precision;

use super::llama::{layer_linear, FeedForward, LlamaConfig, LlamaModel, Mlp, Scratch};
use super::Family;
use crate::executor::linear::{ForwardError, Linear};
use crate::executor::weights::{LoadError, WeightSource};

/// The family.
pub const FAMILY: Family = Family {
    name: "mixtral",
    gguf_names: &["llama"],
    hf_names: &["MixtralForCausalLM", "mixtral"],
    accepts: |src| MoeConfig::from_source(src).is_ok_and(|m| m.num_experts > 0),
    spec: |src| Ok(LlamaConfig::from_source(src)?.spec()),
    load: |src, xp| {
        let cfg = LlamaConfig::from_source(src)?;
        let moe = MoeConfig::from_source(src)?;
        if moe.num_experts == 0 || moe.top_k == 0 || moe.top_k > moe.num_experts {
            return Err(LoadError::Unsupported(format!(
                "a mixture of {} experts with {} per token",
                moe.num_experts, moe.top_k
            )));
        }
        Ok(Box::new(Mixtral::load_model(src, cfg, &moe, xp)?))
    },
};

/// A Mixtral model.
pub type Mixtral = LlamaModel<Moe>;

/// The mixture's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MoeConfig {
    pub num_experts: usize,
    /// Experts per token.
    pub top_k: usize,
}

impl MoeConfig {
    pub fn from_source(src: &WeightSource) -> Result<Self, LoadError> {
        if let Some(md) = src.gguf_metadata() {
            let arch = md
                .get("general.architecture")
                .and_then(|v| v.to_string().ok())
                .cloned()
                .unwrap_or_default();
            let int = |key: &str| {
                md.get(&format!("{arch}.{key}"))
                    .and_then(|v| {
                        v.to_u32()
                            .ok()
                            .or_else(|| v.to_u64().ok().map(|x| x as u32))
                    })
                    .map(|x| x as usize)
            };
            return Ok(Self {
                num_experts: int("expert_count").unwrap_or(0),
                top_k: int("expert_used_count").unwrap_or(0),
            });
        }
        let v = src
            .hf_config()
            .ok_or_else(|| LoadError::Unsupported("no model description".into()))?;
        let int = |key: &str| v.get(key).and_then(|x| x.as_u64()).map(|x| x as usize);
        Ok(Self {
            num_experts: int("num_local_experts").unwrap_or(0),
            top_k: int("num_experts_per_tok").unwrap_or(0),
        })
    }
}

/// The sparse mixture-of-experts block.
pub struct Moe {
    /// `num_experts × hidden`: one logit per expert per token.
    router: Linear,
    experts: Vec<Mlp>,
    top_k: usize,
}

impl FeedForward for Moe {
    type Config = MoeConfig;

    fn load(
        src: &mut WeightSource,
        i: usize,
        cfg: &LlamaConfig,
        moe: &MoeConfig,
        xp: Precision,
    ) -> Result<Self, LoadError> {
        let (h, ff) = (cfg.hidden_size, cfg.intermediate_size);
        let router = layer_linear(src, i, "ffn_gate_inp", moe.num_experts, h)?;
        let mut experts = Vec::with_capacity(moe.num_experts);
        for e in 0..moe.num_experts {
            let hf = |w: &str| format!("model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight");
            let mut part = |stacked: &str, w: &str, rows: usize, cols: usize| {
                let l = src.expert_linear(&format!("blk.{i}.{stacked}.weight"), e, &hf(w))?;
                if l.rows() != rows || l.cols() != cols {
                    return Err(LoadError::Shape(format!(
                        "expert {e} of blk.{i}.{stacked} is {}×{}, expected {rows}×{cols}",
                        l.rows(),
                        l.cols()
                    )));
                }
                Ok(l)
            };
            // Hugging Face names them w1 (gate), w3 (up), w2 (down).
            let gate = part("ffn_gate_exps", "w1", ff, h)?;
            let up = part("ffn_up_exps", "w3", ff, h)?;
            let down = part("ffn_down_exps", "w2", h, ff)?;
            experts.push(Mlp::from_parts(gate, up, down, xp));
        }
        Ok(Self {
            router: router.prepare(xp),
            experts,
            top_k: moe.top_k,
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
        // Each expert's tokens, with their routing weights.
        let mut routed: Vec<Vec<(usize, f32)>> = vec![Vec::new(); ne];
        for (t, row) in logits.chunks_exact(ne).enumerate() {
            for (e, w) in route(row, self.top_k) {
                routed[e].push((t, w));
            }
        }
        out.fill(0.0);
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

/// The `k` experts a token goes to and their weights: softmax over all logits, the `k`
/// largest (ties to the lower index), renormalised to sum to one.
pub fn route(logits: &[f32], k: usize) -> Vec<(usize, f32)> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = logits.iter().map(|&l| (l - max).exp()).collect();
    let total: f32 = exps.iter().sum();
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| exps[b].total_cmp(&exps[a]).then(a.cmp(&b)));
    let top: Vec<(usize, f32)> = order
        .into_iter()
        .take(k)
        .map(|e| (e, exps[e] / total))
        .collect();
    let sum: f32 = top.iter().map(|&(_, w)| w).sum();
    top.into_iter().map(|(e, w)| (e, w / sum)).collect()
}

#[cfg(test)]
mod tests {
    use super::route;

    #[test]
    fn routing_takes_the_top_k_and_renormalises() {
        let r = route(&[0.0, 2.0, 1.0, 2.0], 2);
        assert_eq!(r.iter().map(|&(e, _)| e).collect::<Vec<_>>(), vec![1, 3]);
        assert!((r[0].1 - 0.5).abs() < 1e-6 && (r[1].1 - 0.5).abs() < 1e-6);
        let r = route(&[1.0, 0.0, -1.0], 2);
        let (w0, w1) = (r[0].1, r[1].1);
        assert_eq!((r[0].0, r[1].0), (0, 1));
        assert!((w0 + w1 - 1.0).abs() < 1e-6);
        assert!((w0 / w1 - 1f32.exp()).abs() < 1e-5);
        assert_eq!(route(&[3.0, 1.0], 1), vec![(0, 1.0)]);
    }
}
