//! The linear layer: one type over dense and quantized weights, so a model file never cares
//! how its matrices are stored. Q4_0 / Q4_1 / Q8_0 run on pagoda's own kernels (batched: each
//! weight block is read once per step for every token); other GGUF formats (K-quants) go
//! through candle-core's `QMatMul` until pagoda has kernels of its own for them.

use candle_core::quantized::QMatMul;
use candle_core::{Device, Module, Tensor};
use pagoda_kernels::quant::{Precision, QMatrix};

use super::weights::LoadError;

/// A weight matrix of `rows` (out features) × `cols` (in features), with an optional bias.
pub struct Linear {
    weight: Weight,
    bias: Option<Vec<f32>>,
}

enum Weight {
    Dense {
        w: Vec<f32>,
        rows: usize,
        cols: usize,
    },
    Quant(QMatrix),
    Candle {
        m: QMatMul,
        rows: usize,
        cols: usize,
    },
}

/// Errors raised while running a layer (shape mismatches are bugs, but never panics).
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("kernel: {0}")]
    Kernel(#[from] pagoda_kernels::KernelError),
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("{0}")]
    Shape(String),
}

impl Linear {
    pub fn dense(w: Vec<f32>, rows: usize, cols: usize) -> Result<Self, LoadError> {
        if w.len() != rows * cols {
            return Err(LoadError::Shape(format!(
                "dense matrix has {} values, expected {rows}×{cols}",
                w.len()
            )));
        }
        Ok(Self {
            weight: Weight::Dense { w, rows, cols },
            bias: None,
        })
    }

    pub fn quant(m: QMatrix) -> Self {
        Self {
            weight: Weight::Quant(m),
            bias: None,
        }
    }

    pub fn candle(m: QMatMul, rows: usize, cols: usize) -> Self {
        Self {
            weight: Weight::Candle { m, rows, cols },
            bias: None,
        }
    }

    /// Convert quantized weights to the layout fastest on this CPU (see
    /// `QMatrix::prepare`), with `precision` for the activations of packed products;
    /// other storage is returned unchanged. Call after any [`Linear::stack`].
    pub fn prepare(self, precision: Precision) -> Self {
        let weight = match self.weight {
            Weight::Quant(m) => Weight::Quant(m.prepare().with_precision(precision)),
            other => other,
        };
        Self {
            weight,
            bias: self.bias,
        }
    }

    /// One layer computing all of `parts` (same input width, rows stacked in order), or
    /// `None` when their storage cannot be stacked (mixed formats, candle weights).
    pub fn stack(parts: &[Linear]) -> Option<Linear> {
        let first = parts.first()?;
        let cols = first.cols();
        if parts.iter().any(|p| p.cols() != cols) {
            return None;
        }
        let weight = match &first.weight {
            Weight::Quant(_) => {
                let ms: Option<Vec<&QMatrix>> = parts
                    .iter()
                    .map(|p| match &p.weight {
                        Weight::Quant(m) => Some(m),
                        _ => None,
                    })
                    .collect();
                Weight::Quant(QMatrix::concat_rows(&ms?).ok()?)
            }
            Weight::Dense { .. } => {
                let mut all = Vec::new();
                for p in parts {
                    match &p.weight {
                        Weight::Dense { w, .. } => all.extend_from_slice(w),
                        _ => return None,
                    }
                }
                let rows = all.len() / cols.max(1);
                Weight::Dense { w: all, rows, cols }
            }
            Weight::Candle { .. } => return None,
        };
        let bias = if parts.iter().any(|p| p.bias.is_some()) {
            let mut b = Vec::new();
            for p in parts {
                match &p.bias {
                    Some(pb) => b.extend_from_slice(pb),
                    None => b.resize(b.len() + p.rows(), 0.0),
                }
            }
            Some(b)
        } else {
            None
        };
        Some(Linear { weight, bias })
    }

    pub fn with_bias(mut self, bias: Vec<f32>) -> Result<Self, LoadError> {
        if bias.len() != self.rows() {
            return Err(LoadError::Shape(format!(
                "bias has {} values, expected {}",
                bias.len(),
                self.rows()
            )));
        }
        self.bias = Some(bias);
        Ok(self)
    }

    pub fn rows(&self) -> usize {
        match &self.weight {
            Weight::Dense { rows, .. } | Weight::Candle { rows, .. } => *rows,
            Weight::Quant(m) => m.rows(),
        }
    }

    pub fn cols(&self) -> usize {
        match &self.weight {
            Weight::Dense { cols, .. } | Weight::Candle { cols, .. } => *cols,
            Weight::Quant(m) => m.cols(),
        }
    }

    /// A short name of the storage format, for logs.
    pub fn format_name(&self) -> String {
        match &self.weight {
            Weight::Dense { .. } => "f32".into(),
            Weight::Quant(m) => format!("{:?}", m.format()),
            Weight::Candle { .. } => "candle-qmatmul".into(),
        }
    }

    /// `out` (n × rows) = `x` (n × cols) · Wᵀ (+ bias).
    pub fn forward(&self, x: &[f32], n: usize, out: &mut [f32]) -> Result<(), ForwardError> {
        let (rows, cols) = (self.rows(), self.cols());
        if x.len() != n * cols || out.len() != n * rows {
            return Err(ForwardError::Shape(format!(
                "linear {rows}×{cols}: input {} / output {} values for {n} tokens",
                x.len(),
                out.len()
            )));
        }
        match &self.weight {
            Weight::Dense { w, .. } => pagoda_kernels::dense::matmul_f32(w, rows, cols, x, n, out)?,
            Weight::Quant(m) => m.matmul(x, n, out)?,
            Weight::Candle { m, .. } => {
                let t = Tensor::from_slice(x, (n, cols), &Device::Cpu)?;
                let y = m.forward(&t)?.flatten_all()?.to_vec1::<f32>()?;
                out.copy_from_slice(&y);
            }
        }
        if let Some(b) = &self.bias {
            for row in out.chunks_exact_mut(rows) {
                for (o, b) in row.iter_mut().zip(b) {
                    *o += b;
                }
            }
        }
        Ok(())
    }

    /// Row `r` of the weight as f32 (used for embedding lookups).
    pub fn row(&self, r: usize, out: &mut [f32]) -> Result<(), ForwardError> {
        let (rows, cols) = (self.rows(), self.cols());
        if r >= rows || out.len() != cols {
            return Err(ForwardError::Shape(format!(
                "row {r} of a {rows}×{cols} matrix into {} values",
                out.len()
            )));
        }
        match &self.weight {
            Weight::Dense { w, .. } => out.copy_from_slice(&w[r * cols..(r + 1) * cols]),
            Weight::Quant(m) => m.try_dequantize_row(r, out)?,
            Weight::Candle { .. } => {
                return Err(ForwardError::Shape(
                    "row lookup on a candle QMatMul weight (load it dense)".into(),
                ))
            }
        }
        Ok(())
    }
}

/// Projections of one input (Q, K and V; or gate and up), run as a single stacked matrix
/// when their storage allows it: one pass over the input and one kernel call instead of
/// several.
pub enum Projections {
    Stacked { lin: Linear, rows: Vec<usize> },
    Separate(Vec<Linear>),
}

impl Projections {
    /// Stack `parts` if possible, and convert the result for this CPU
    /// (`Linear::prepare`).
    pub fn new(parts: Vec<Linear>, precision: Precision) -> Self {
        match Linear::stack(&parts) {
            Some(lin) => Projections::Stacked {
                rows: parts.iter().map(Linear::rows).collect(),
                lin: lin.prepare(precision),
            },
            None => {
                Projections::Separate(parts.into_iter().map(|l| l.prepare(precision)).collect())
            }
        }
    }

    /// `outs[i]` (n × rows of part i) = `x` · part iᵀ. `scratch` holds the stacked output
    /// between calls, so steady-state steps do not allocate.
    pub fn forward(
        &self,
        x: &[f32],
        n: usize,
        outs: &mut [&mut [f32]],
        scratch: &mut Vec<f32>,
    ) -> Result<(), ForwardError> {
        match self {
            Projections::Separate(parts) => {
                if parts.len() != outs.len() {
                    return Err(ForwardError::Shape(format!(
                        "{} projections into {} outputs",
                        parts.len(),
                        outs.len()
                    )));
                }
                for (p, o) in parts.iter().zip(outs.iter_mut()) {
                    p.forward(x, n, o)?;
                }
            }
            Projections::Stacked { lin, rows } => {
                if rows.len() != outs.len()
                    || rows.iter().zip(outs.iter()).any(|(r, o)| o.len() != n * r)
                {
                    return Err(ForwardError::Shape(format!(
                        "stacked projections of {rows:?} rows into outputs of {:?} values for {n} tokens",
                        outs.iter().map(|o| o.len()).collect::<Vec<_>>()
                    )));
                }
                let total = lin.rows();
                scratch.resize(n * total, 0.0);
                lin.forward(x, n, &mut scratch[..n * total])?;
                for (t, src) in scratch[..n * total].chunks_exact(total).enumerate() {
                    let mut at = 0;
                    for (o, &r) in outs.iter_mut().zip(rows) {
                        o[t * r..(t + 1) * r].copy_from_slice(&src[at..at + r]);
                        at += r;
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pagoda_kernels::quant::QuantFormat;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    fn values(rng: &mut StdRng, len: usize) -> Vec<f32> {
        (0..len).map(|_| rng.gen_range(-1.0f32..1.0)).collect()
    }

    fn quant(rng: &mut StdRng, rows: usize, cols: usize) -> Linear {
        let w = values(rng, rows * cols);
        Linear::quant(QMatrix::from_f32(QuantFormat::Q4_1, rows, cols, &w).unwrap())
    }

    /// Stacked projections (with biases on some parts, as Qwen2's Q/K/V) give what the
    /// parts give one by one, for dense and quantized (packed on this CPU) weights.
    #[test]
    fn stacked_projections_match_the_parts() {
        let mut rng = StdRng::seed_from_u64(5);
        let (cols, n) = (64, 5);
        let x = values(&mut rng, n * cols);
        let sizes = [24, 8, 16];
        for kind in ["dense", "quant"] {
            let make = |rng: &mut StdRng| -> Vec<Linear> {
                sizes
                    .iter()
                    .enumerate()
                    .map(|(i, &rows)| {
                        let l = match kind {
                            "dense" => Linear::dense(values(rng, rows * cols), rows, cols).unwrap(),
                            _ => quant(rng, rows, cols),
                        };
                        if i == 1 {
                            l
                        } else {
                            l.with_bias(values(rng, rows)).unwrap()
                        }
                    })
                    .collect()
            };
            let mut r1 = StdRng::seed_from_u64(9);
            let mut r2 = StdRng::seed_from_u64(9);
            let parts = make(&mut r1);
            let stacked = Projections::new(make(&mut r2), Precision::default());
            assert!(matches!(stacked, Projections::Stacked { .. }), "{kind}");
            let mut want: Vec<Vec<f32>> = sizes.iter().map(|&r| vec![0f32; n * r]).collect();
            for (p, w) in parts.iter().zip(want.iter_mut()) {
                p.forward(&x, n, w).unwrap();
            }
            let mut got: Vec<Vec<f32>> = sizes.iter().map(|&r| vec![f32::NAN; n * r]).collect();
            let mut outs: Vec<&mut [f32]> = got.iter_mut().map(|v| v.as_mut_slice()).collect();
            stacked.forward(&x, n, &mut outs, &mut Vec::new()).unwrap();
            for (g, w) in got.iter().zip(&want) {
                for (a, b) in g.iter().zip(w) {
                    // Quantized parts run unpacked, the stack packed (int8 activations
                    // in two planes): close, not bit-equal.
                    assert!(
                        (a - b).abs() <= 1e-3 * (1.0 + b.abs()),
                        "{kind}: {a} vs {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn stacking_refuses_mismatched_parts() {
        let mut rng = StdRng::seed_from_u64(1);
        let a = quant(&mut rng, 8, 64);
        let b = quant(&mut rng, 8, 32);
        assert!(Linear::stack(&[a, b]).is_none(), "different widths");
        let a = quant(&mut rng, 8, 64);
        let d = Linear::dense(values(&mut rng, 8 * 64), 8, 64).unwrap();
        assert!(Linear::stack(&[a, d]).is_none(), "mixed storage");
        assert!(Linear::stack(&[]).is_none());
        // Unstackable parts still work, one by one.
        let a = quant(&mut rng, 8, 64);
        let d = Linear::dense(values(&mut rng, 8 * 64), 8, 64).unwrap();
        let p = Projections::new(vec![a, d], Precision::default());
        assert!(matches!(p, Projections::Separate(_)));
        let x = values(&mut rng, 2 * 64);
        let (mut o1, mut o2) = (vec![0f32; 16], vec![0f32; 16]);
        p.forward(&x, 2, &mut [&mut o1, &mut o2], &mut Vec::new())
            .unwrap();
        // A wrong output size is an error, not a panic.
        let mut short = vec![0f32; 3];
        assert!(p
            .forward(&x, 2, &mut [&mut o1, &mut short], &mut Vec::new())
            .is_err());
    }
}
