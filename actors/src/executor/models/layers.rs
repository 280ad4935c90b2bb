//! Building blocks several families share, written against the [`Backend`] seam.

use crate::executor::backend::{Backend, ForwardError};
use crate::executor::linear::Linear;
use crate::executor::weights::LoadError;

/// Projections of one input (Q, K and V; or gate and up), run as a single stacked matrix
/// when their storage allows it: one pass over the input and one product instead of
/// several.
pub enum Projections<B: Backend> {
    Stacked { m: B::Matrix, rows: Vec<usize> },
    Separate(Vec<B::Matrix>),
}

impl<B: Backend> Projections<B> {
    /// Stacks `parts` if their storage allows it, and hands them to the backend.
    pub fn new(b: &B, parts: Vec<Linear>) -> Result<Self, LoadError> {
        match Linear::stack(&parts) {
            Some(stacked) => Ok(Projections::Stacked {
                rows: parts.iter().map(Linear::rows).collect(),
                m: b.matrix(stacked)?,
            }),
            None => Ok(Projections::Separate(
                parts
                    .into_iter()
                    .map(|l| b.matrix(l))
                    .collect::<Result<_, _>>()?,
            )),
        }
    }

    /// `outs[i]` = `x` · part iᵀ. `stacked` holds the stacked output between calls.
    pub fn forward(
        &self,
        b: &B,
        x: &B::Tensor,
        outs: &mut [&mut B::Tensor],
        stacked: &mut B::Tensor,
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
                    b.matmul(p, x, o)?;
                }
            }
            Projections::Stacked { m, rows } => {
                if rows.len() != outs.len() {
                    return Err(ForwardError::Shape(format!(
                        "{} stacked projections into {} outputs",
                        rows.len(),
                        outs.len()
                    )));
                }
                b.matmul(m, x, stacked)?;
                let total: usize = rows.iter().sum();
                let mut at = 0;
                for (o, &r) in outs.iter_mut().zip(rows) {
                    b.copy_cols(stacked, total, at, o, r, 0, r)?;
                    at += r;
                }
            }
        }
        Ok(())
    }

    /// SwiGLU of a gate/up pair (parts `[gate, up]`): `out = silu(x · gateᵀ) · (x · upᵀ)`.
    /// A stacked pair is gated where its product lands (rows of `[gate | up]`), with no
    /// split into two buffers; separate parts go through `up`.
    pub fn swiglu(
        &self,
        b: &B,
        x: &B::Tensor,
        stacked: &mut B::Tensor,
        up: &mut B::Tensor,
        out: &mut B::Tensor,
    ) -> Result<(), ForwardError> {
        match self {
            Projections::Stacked { m, rows } if rows.len() == 2 && rows[0] == rows[1] => {
                b.matmul(m, x, stacked)?;
                b.silu_mul_halves(stacked, rows[0], out)
            }
            _ => {
                self.forward(b, x, &mut [&mut *out, &mut *up], stacked)?;
                b.silu_mul(out, up)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::executor::backend::Cpu;
    use pagoda_kernels::quant::{QMatrix, QuantFormat};
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
        let b = Cpu::default();
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
            let stacked = Projections::new(&b, make(&mut r2)).unwrap();
            assert!(matches!(stacked, Projections::Stacked { .. }), "{kind}");
            let mut want: Vec<Vec<f32>> = sizes.iter().map(|&r| vec![0f32; n * r]).collect();
            for (p, w) in parts.iter().zip(want.iter_mut()) {
                p.forward(&x, n, w).unwrap();
            }
            let mut got: Vec<Vec<f32>> = sizes.iter().map(|_| Vec::new()).collect();
            let mut outs: Vec<&mut Vec<f32>> = got.iter_mut().collect();
            stacked.forward(&b, &x, &mut outs, &mut Vec::new()).unwrap();
            for (g, w) in got.iter().zip(&want) {
                assert_eq!(g.len(), w.len());
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
        let b = Cpu::default();
        let mut rng = StdRng::seed_from_u64(1);
        let a = quant(&mut rng, 8, 64);
        let c = quant(&mut rng, 8, 32);
        assert!(Linear::stack(&[a, c]).is_none(), "different widths");
        let a = quant(&mut rng, 8, 64);
        let d = Linear::dense(values(&mut rng, 8 * 64), 8, 64).unwrap();
        assert!(Linear::stack(&[a, d]).is_none(), "mixed storage");
        assert!(Linear::stack(&[]).is_none());
        // Unstackable parts still work, one by one.
        let a = quant(&mut rng, 8, 64);
        let d = Linear::dense(values(&mut rng, 8 * 64), 8, 64).unwrap();
        let p = Projections::new(&b, vec![a, d]).unwrap();
        assert!(matches!(p, Projections::Separate(_)));
        let x = values(&mut rng, 2 * 64);
        let (mut o1, mut o2) = (Vec::new(), Vec::new());
        p.forward(&b, &x, &mut [&mut o1, &mut o2], &mut Vec::new())
            .unwrap();
        assert_eq!((o1.len(), o2.len()), (16, 16));
        // An input that is not whole rows is an error, not a panic.
        assert!(p
            .forward(
                &b,
                &x[..100].to_vec(),
                &mut [&mut o1, &mut o2],
                &mut Vec::new()
            )
            .is_err());
        assert!(p.forward(&b, &x, &mut [&mut o1], &mut Vec::new()).is_err());
    }
}
