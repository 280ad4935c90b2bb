//! The CPU backend: pagoda's kernels (`pagoda_kernels`) on host memory. Tensors are
//! `Vec<f32>`, matrices are [`Linear`] converted to the layout fastest on this CPU,
//! the KV pool is [`KvPool`], and a step's index data is the batch description itself.

use pagoda_kernels::attention::KvShape;
use pagoda_kernels::ops::{apply_rope, rms_norm, silu_mul, silu_mul_halves, RopeStyle, RopeTable};
use pagoda_kernels::quant::Precision;

use super::kv_pool::KvPool;
use super::{Backend, ForwardError};
use crate::config::KvCacheDtype;
use crate::executor::linear::Linear;
use crate::executor::models::{BatchInput, KvLayout};
use crate::executor::weights::LoadError;

/// Runs models on this machine's cores.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cpu {
    /// Activations of the int8 quantized products (see [`Precision`]).
    precision: Precision,
}

impl Cpu {
    pub fn new(precision: Precision) -> Self {
        Self { precision }
    }
}

fn shape_err(msg: String) -> ForwardError {
    ForwardError::Shape(msg)
}

/// `len / width` when `len` is a whole number of rows of `width`.
fn rows_of(what: &str, len: usize, width: usize) -> Result<usize, ForwardError> {
    if width == 0 || !len.is_multiple_of(width) {
        return Err(shape_err(format!(
            "{what}: {len} values are not rows of {width}"
        )));
    }
    Ok(len / width)
}

impl Backend for Cpu {
    type Tensor = Vec<f32>;
    type Matrix = Linear;
    type Rope = RopeTable;
    type Kv = KvPool;
    type Step<'a> = &'a BatchInput<'a>;

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn tensor(&self) -> Vec<f32> {
        Vec::new()
    }

    fn upload(&self, host: &[f32]) -> Result<Vec<f32>, ForwardError> {
        Ok(host.to_vec())
    }

    fn download(&self, t: &Vec<f32>, out: &mut Vec<f32>) -> Result<(), ForwardError> {
        out.clear();
        out.extend_from_slice(t);
        Ok(())
    }

    fn len(&self, t: &Vec<f32>) -> usize {
        t.len()
    }

    fn matrix(&self, host: Linear) -> Result<Linear, LoadError> {
        Ok(host.prepare(self.precision))
    }

    fn matrix_shape(&self, m: &Linear) -> (usize, usize) {
        (m.rows(), m.cols())
    }

    fn rope_table(&self, dim: usize, max_pos: usize, theta: f32) -> Result<RopeTable, LoadError> {
        Ok(RopeTable::new(dim, max_pos, theta))
    }

    fn kv_pool(
        &self,
        layout: KvLayout,
        num_blocks: usize,
        block_size: usize,
        dtype: KvCacheDtype,
    ) -> Result<KvPool, ForwardError> {
        let shape = KvShape {
            num_blocks,
            block_size,
            num_kv_heads: layout.heads,
            head_dim: layout.head_dim,
        };
        Ok(KvPool::new(
            layout.num_layers,
            shape,
            dtype,
            layout.values_are_keys,
        ))
    }

    fn kv_blocks(&self, kv: &KvPool) -> usize {
        kv.num_blocks()
    }

    fn kv_copy_blocks(&self, kv: &mut KvPool, pairs: &[(u32, u32)]) -> Result<(), ForwardError> {
        Ok(kv.copy_blocks(pairs)?)
    }

    fn step<'a>(&self, input: &'a BatchInput<'a>) -> Result<&'a BatchInput<'a>, ForwardError> {
        Ok(input)
    }

    fn embed(
        &self,
        table: &Linear,
        step: &&BatchInput<'_>,
        out: &mut Vec<f32>,
    ) -> Result<(), ForwardError> {
        let (vocab, h) = (table.rows(), table.cols());
        out.resize(step.tokens.len() * h, 0.0);
        for (row, &t) in out.chunks_exact_mut(h).zip(step.tokens) {
            if t as usize >= vocab {
                return Err(shape_err(format!(
                    "token id {t} is outside the vocabulary ({vocab})"
                )));
            }
            table.row(t as usize, row)?;
        }
        Ok(())
    }

    fn matmul(&self, w: &Linear, x: &Vec<f32>, out: &mut Vec<f32>) -> Result<(), ForwardError> {
        let n = rows_of("matmul input", x.len(), w.cols())?;
        out.resize(n * w.rows(), 0.0);
        w.forward(x, n, out)
    }

    fn matmul_heads(
        &self,
        ws: &[Linear],
        x: &Vec<f32>,
        out: &mut Vec<f32>,
    ) -> Result<(), ForwardError> {
        let Some(first) = ws.first() else {
            return Err(shape_err("matmul_heads without matrices".into()));
        };
        let (rows, cols, heads) = (first.rows(), first.cols(), ws.len());
        if ws.iter().any(|w| w.rows() != rows || w.cols() != cols) {
            return Err(shape_err(
                "matmul_heads: matrices of different shapes".into(),
            ));
        }
        let n = rows_of("matmul_heads input", x.len(), heads * cols)?;
        out.resize(n * heads * rows, 0.0);
        let mut xs = vec![0f32; n * cols];
        let mut ys = vec![0f32; n * rows];
        for (h, w) in ws.iter().enumerate() {
            for (t, dst) in xs.chunks_exact_mut(cols).enumerate() {
                let at = (t * heads + h) * cols;
                dst.copy_from_slice(&x[at..at + cols]);
            }
            w.forward(&xs, n, &mut ys)?;
            for (t, src) in ys.chunks_exact(rows).enumerate() {
                let at = (t * heads + h) * rows;
                out[at..at + rows].copy_from_slice(src);
            }
        }
        Ok(())
    }

    fn rms_norm(
        &self,
        x: &Vec<f32>,
        w: &Vec<f32>,
        eps: f32,
        out: &mut Vec<f32>,
    ) -> Result<(), ForwardError> {
        rows_of("rms_norm input", x.len(), w.len())?;
        out.clear();
        out.extend_from_slice(x);
        rms_norm(out, w, eps);
        Ok(())
    }

    fn rope(
        &self,
        x: &mut Vec<f32>,
        heads: usize,
        head_dim: usize,
        table: &RopeTable,
        style: RopeStyle,
        step: &&BatchInput<'_>,
    ) -> Result<(), ForwardError> {
        Ok(apply_rope(
            x,
            step.positions,
            heads,
            head_dim,
            table,
            style,
        )?)
    }

    fn silu_mul(&self, gate: &mut Vec<f32>, up: &Vec<f32>) -> Result<(), ForwardError> {
        if gate.len() != up.len() {
            return Err(shape_err(format!(
                "silu_mul: gate {} / up {} values",
                gate.len(),
                up.len()
            )));
        }
        silu_mul(gate, up);
        Ok(())
    }

    fn silu_mul_halves(
        &self,
        x: &Vec<f32>,
        half: usize,
        out: &mut Vec<f32>,
    ) -> Result<(), ForwardError> {
        out.resize(x.len() / 2, 0.0);
        silu_mul_halves(x, half, out).map_err(|e| shape_err(format!("silu_mul_halves: {e}")))
    }

    fn add(&self, x: &mut Vec<f32>, y: &Vec<f32>) -> Result<(), ForwardError> {
        if x.len() != y.len() {
            return Err(shape_err(format!("add: {} + {} values", x.len(), y.len())));
        }
        for (a, b) in x.iter_mut().zip(y) {
            *a += b;
        }
        Ok(())
    }

    fn fill(&self, t: &mut Vec<f32>, len: usize, value: f32) -> Result<(), ForwardError> {
        t.clear();
        t.resize(len, value);
        Ok(())
    }

    fn copy_cols(
        &self,
        src: &Vec<f32>,
        src_width: usize,
        src_col: usize,
        dst: &mut Vec<f32>,
        dst_width: usize,
        dst_col: usize,
        width: usize,
    ) -> Result<(), ForwardError> {
        if src_col + width > src_width || dst_col + width > dst_width {
            return Err(shape_err(format!(
                "copy_cols: {width} columns from {src_col} of {src_width} to {dst_col} of {dst_width}"
            )));
        }
        let rows = rows_of("copy_cols source", src.len(), src_width)?;
        dst.resize(rows * dst_width, 0.0);
        for (s, d) in src
            .chunks_exact(src_width)
            .zip(dst.chunks_exact_mut(dst_width))
        {
            d[dst_col..dst_col + width].copy_from_slice(&s[src_col..src_col + width]);
        }
        Ok(())
    }

    fn gather_rows(
        &self,
        src: &Vec<f32>,
        width: usize,
        rows: &[usize],
        dst: &mut Vec<f32>,
    ) -> Result<(), ForwardError> {
        let have = rows_of("gather_rows source", src.len(), width)?;
        dst.clear();
        for &r in rows {
            if r >= have {
                return Err(shape_err(format!("gather_rows: row {r} of {have}")));
            }
            dst.extend_from_slice(&src[r * width..(r + 1) * width]);
        }
        Ok(())
    }

    fn scatter_add_rows(
        &self,
        dst: &mut Vec<f32>,
        width: usize,
        src: &Vec<f32>,
        rows: &[usize],
        weights: &[f32],
    ) -> Result<(), ForwardError> {
        let have = rows_of("scatter_add_rows target", dst.len(), width)?;
        if src.len() != rows.len() * width || weights.len() != rows.len() {
            return Err(shape_err(format!(
                "scatter_add_rows: {} source values, {} rows, {} weights",
                src.len(),
                rows.len(),
                weights.len()
            )));
        }
        for ((s, &r), &w) in src.chunks_exact(width).zip(rows).zip(weights) {
            if r >= have {
                return Err(shape_err(format!("scatter_add_rows: row {r} of {have}")));
            }
            for (o, y) in dst[r * width..(r + 1) * width].iter_mut().zip(s) {
                *o += w * y;
            }
        }
        Ok(())
    }

    fn kv_write(
        &self,
        kv: &mut KvPool,
        layer: usize,
        k: &Vec<f32>,
        v: Option<&Vec<f32>>,
        step: &&BatchInput<'_>,
    ) -> Result<(), ForwardError> {
        Ok(kv.write(layer, k, v.map(|v| &v[..]), step.slots)?)
    }

    fn attend(
        &self,
        kv: &KvPool,
        layer: usize,
        q: &Vec<f32>,
        heads: usize,
        scale: Option<f32>,
        window: Option<usize>,
        step: &&BatchInput<'_>,
        out: &mut Vec<f32>,
    ) -> Result<(), ForwardError> {
        out.resize(q.len(), 0.0);
        Ok(kv.attend(layer, q, heads, step.seqs, scale, window, out)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dense(rows: usize, cols: usize, seed: usize) -> Linear {
        let w = (0..rows * cols)
            .map(|i| ((i * 7 + seed * 13) % 17) as f32 / 8.0 - 1.0)
            .collect();
        Linear::dense(w, rows, cols).unwrap()
    }

    #[test]
    fn silu_mul_halves_gates_stacked_rows_like_the_split_halves() {
        let b = Cpu::default();
        let (rows, half) = (2, 11);
        let x: Vec<f32> = (0..rows * 2 * half).map(|i| i as f32 / 7.0 - 3.0).collect();
        let mut out = Vec::new();
        b.silu_mul_halves(&x, half, &mut out).unwrap();
        assert_eq!(out.len(), rows * half);
        for (r, row) in x.chunks_exact(2 * half).enumerate() {
            let mut gate = row[..half].to_vec();
            b.silu_mul(&mut gate, &row[half..].to_vec()).unwrap();
            assert_eq!(&out[r * half..(r + 1) * half], &gate[..]);
        }
        let err = b.silu_mul_halves(&vec![0.0; 7], 2, &mut out).unwrap_err();
        assert!(err.to_string().contains("silu_mul_halves"), "{err}");
    }

    /// Per-head products equal one product per head on that head's columns.
    #[test]
    fn matmul_heads_runs_each_head_through_its_matrix() {
        let b = Cpu::default();
        let (heads, rows, cols, n) = (3, 4, 5, 2);
        let ws: Vec<Linear> = (0..heads).map(|h| dense(rows, cols, h)).collect();
        let x: Vec<f32> = (0..n * heads * cols).map(|i| i as f32 / 10.0).collect();
        let mut out = Vec::new();
        b.matmul_heads(&ws, &x, &mut out).unwrap();
        assert_eq!(out.len(), n * heads * rows);
        for (h, w) in ws.iter().enumerate() {
            let mut xh = Vec::new();
            b.copy_cols(&x, heads * cols, h * cols, &mut xh, cols, 0, cols)
                .unwrap();
            let mut yh = Vec::new();
            b.matmul(w, &xh, &mut yh).unwrap();
            let mut got = Vec::new();
            b.copy_cols(&out, heads * rows, h * rows, &mut got, rows, 0, rows)
                .unwrap();
            assert_eq!(got, yh, "head {h}");
        }
        // A mismatched input is an error, not a panic.
        assert!(b.matmul_heads(&ws, &x[1..].to_vec(), &mut out).is_err());
        assert!(b.matmul_heads(&[], &x, &mut out).is_err());
    }

    /// Row shuffles: gather, weighted scatter-add, column copies; bad indices are errors.
    #[test]
    fn row_and_column_moves() {
        let b = Cpu::default();
        let src: Vec<f32> = (0..12).map(|i| i as f32).collect(); // 4 rows of 3
        let mut g = Vec::new();
        b.gather_rows(&src, 3, &[2, 0], &mut g).unwrap();
        assert_eq!(g, vec![6.0, 7.0, 8.0, 0.0, 1.0, 2.0]);
        assert!(b.gather_rows(&src, 3, &[4], &mut Vec::new()).is_err());
        let mut acc = Vec::new();
        b.fill(&mut acc, 9, 1.0).unwrap();
        b.scatter_add_rows(&mut acc, 3, &g, &[1, 1], &[0.5, 2.0])
            .unwrap();
        assert_eq!(acc, vec![1.0, 1.0, 1.0, 4.0, 6.5, 9.0, 1.0, 1.0, 1.0]);
        assert!(b
            .scatter_add_rows(&mut acc, 3, &g, &[3, 0], &[1.0, 1.0])
            .is_err());
        assert!(b.scatter_add_rows(&mut acc, 3, &g, &[0], &[1.0]).is_err());
        // Two copies fill one tensor side by side.
        let mut d = Vec::new();
        b.copy_cols(&src, 3, 1, &mut d, 4, 0, 2).unwrap();
        b.copy_cols(&src, 3, 0, &mut d, 4, 2, 2).unwrap();
        assert_eq!(&d[..8], &[1.0, 2.0, 0.0, 1.0, 4.0, 5.0, 3.0, 4.0]);
        assert!(b.copy_cols(&src, 3, 2, &mut d, 4, 0, 2).is_err());
        assert!(b.copy_cols(&src, 5, 0, &mut d, 5, 0, 1).is_err());
    }
}
