//! Mixtral: the Llama decoder with a sparse mixture of experts in place of the MLP. A
//! router picks the top-k of `num_experts` SwiGLU experts per token (softmax over all
//! experts, the top k renormalised to sum to one) and the block's output is their
//! weighted sum. Tokens are grouped per expert, so each expert's weights are read once
//! per step for all the tokens routed to it.
//!
//! From GGUF (llama.cpp stores Mixtral under the `llama` architecture, with
//! `llama.expert_count` and the experts stacked into `ffn_{gate,up,down}_exps` tensors)
//! and from Hugging Face directories (`MixtralForCausalLM`).

use super::llama::{layer_linear, FeedForward, LlamaConfig, LlamaModel, Mlp, Scratch};
use super::{Family, Kind};
use crate::executor::backend::{Backend, ForwardError};
use crate::executor::weights::{LoadError, WeightSource};

/// The family.
pub const FAMILY: Family = Family {
    name: "mixtral",
    gguf_names: &["llama"],
    hf_names: &["MixtralForCausalLM", "mixtral"],
    accepts: |src| MoeConfig::from_source(src).is_ok_and(|m| m.num_experts > 0),
    spec: |src| Ok(LlamaConfig::from_source(src)?.spec()),
    kind: Kind::Mixtral,
};

/// Loads a Mixtral model from `src` onto `b`.
pub fn load<B: Backend>(b: &B, src: &mut WeightSource) -> Result<Mixtral<B>, LoadError> {
    let cfg = LlamaConfig::from_source(src)?;
    let moe = MoeConfig::from_source(src)?;
    if moe.num_experts == 0 || moe.top_k == 0 || moe.top_k > moe.num_experts {
        return Err(LoadError::Unsupported(format!(
            "a mixture of {} experts with {} per token",
            moe.num_experts, moe.top_k
        )));
    }
    LlamaModel::load(b, src, cfg, &moe)
}

/// A Mixtral model.
pub type Mixtral<B> = LlamaModel<B, Moe<B>>;

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

/// SwiGLU experts run on the tokens routed to them: each expert's rows are gathered,
/// run through it in one product, and added back weighted, so an expert's weights are
/// read once per step.
pub struct Experts<B: Backend> {
    experts: Vec<Mlp<B>>,
}

impl<B: Backend> Experts<B> {
    pub fn new(experts: Vec<Mlp<B>>) -> Self {
        Self { experts }
    }

    pub fn len(&self) -> usize {
        self.experts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.experts.is_empty()
    }

    /// `out` (`n × width`, already holding what the experts add to) += for each token, the
    /// weighted outputs of the experts `routed` sends it to (`routed[e]`: expert `e`'s
    /// tokens and weights).
    pub fn forward(
        &self,
        b: &B,
        x: &B::Tensor,
        width: usize,
        routed: &[Vec<(usize, f32)>],
        s: &mut Scratch<B>,
        out: &mut B::Tensor,
    ) -> Result<(), ForwardError> {
        let mut rows = Vec::new();
        let mut weights = Vec::new();
        for (expert, tokens) in self.experts.iter().zip(routed) {
            if tokens.is_empty() {
                continue;
            }
            rows.clear();
            weights.clear();
            for &(t, w) in tokens {
                rows.push(t);
                weights.push(w);
            }
            let mut xs = std::mem::replace(&mut s.expert_in, b.tensor());
            let mut ys = std::mem::replace(&mut s.expert_out, b.tensor());
            let run = b
                .gather_rows(x, width, &rows, &mut xs)
                .and_then(|()| expert.forward(b, &xs, s, &mut ys))
                .and_then(|()| b.scatter_add_rows(out, width, &ys, &rows, &weights));
            s.expert_in = xs;
            s.expert_out = ys;
            run?;
        }
        Ok(())
    }
}

/// Each expert's tokens and their weights, from router logits (`n × experts`, host
/// memory) and a routing rule.
pub fn group_by_expert(
    logits: &[f32],
    experts: usize,
    mut route: impl FnMut(&[f32]) -> Vec<(usize, f32)>,
) -> Vec<Vec<(usize, f32)>> {
    let mut routed: Vec<Vec<(usize, f32)>> = vec![Vec::new(); experts];
    for (t, row) in logits.chunks_exact(experts.max(1)).enumerate() {
        for (e, w) in route(row) {
            if let Some(r) = routed.get_mut(e) {
                r.push((t, w));
            }
        }
    }
    routed
}

/// The sparse mixture-of-experts block.
pub struct Moe<B: Backend> {
    /// `num_experts × hidden`: one logit per expert per token.
    router: B::Matrix,
    experts: Experts<B>,
    top_k: usize,
}

impl<B: Backend> FeedForward<B> for Moe<B> {
    type Config = MoeConfig;

    fn load(
        b: &B,
        src: &mut WeightSource,
        i: usize,
        cfg: &LlamaConfig,
        moe: &MoeConfig,
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
            experts.push(Mlp::from_parts(b, gate, up, down)?);
        }
        Ok(Self {
            router: b.matrix(router)?,
            experts: Experts::new(experts),
            top_k: moe.top_k,
        })
    }

    fn forward(
        &self,
        b: &B,
        x: &B::Tensor,
        s: &mut Scratch<B>,
        out: &mut B::Tensor,
    ) -> Result<(), ForwardError> {
        let ne = self.experts.len();
        let (_, h) = b.matrix_shape(&self.router);
        // Routing decisions are made on the host: the logits are n × experts.
        b.matmul(&self.router, x, &mut s.router)?;
        let mut logits = Vec::new();
        b.download(&s.router, &mut logits)?;
        let routed = group_by_expert(&logits, ne, |row| route(row, self.top_k));
        b.fill(out, b.len(x), 0.0)?;
        self.experts.forward(b, x, h, &routed, s, out)
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
