//! Weight matrices as the loader reads them, and as the CPU backend runs them: one type
//! over dense and quantized storage, so a model file never cares how its matrices are
//! stored. Q4_0 / Q4_1 / Q8_0 run on pagoda's own kernels (batched: each
//! weight block is read once per step for every token); other GGUF formats (K-quants) go
//! through candle-core's `QMatMul` until pagoda has kernels of its own for them.

use candle_core::quantized::QMatMul;
use candle_core::{Device, Module, Tensor};
use pagoda_kernels::quant::{Precision, QMatrix};

use super::backend::ForwardError;
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
