//! The compute seam. Every operation a model performs — matrix products on dense or
//! quantized weights, attention over the paged KV pool, norms, rotary embeddings,
//! activations, the row shuffles of mixture-of-experts and latent attention, and the
//! download of the logits the sampler reads — goes through [`Backend`]. Weights, norm
//! vectors, rotary tables, activations and the KV pool are the backend's own types, so
//! they live wherever the backend keeps its memory.
//!
//! [`Cpu`] is the one implementation today (pagoda's kernels, buffers in host memory).
//! A GPU backend is a second implementation of the same trait: the model files are
//! generic over it and do not change.
//!
//! Conventions every implementation keeps:
//! - A [`Backend::Tensor`] is a flat f32 buffer whose length the ops read; an op sizes
//!   its output tensor itself (growing it if needed; steady-state steps reuse memory).
//! - Matrices compute `out (n × rows) = x (n × cols) · Wᵀ (+ bias)`; `n` is the input's
//!   length over `cols`.
//! - Row indices (`rows`) and routing weights are host slices: they come from routing
//!   decisions the model makes on downloaded router logits. A step's token ids,
//!   positions, KV slots and block tables are given once per step ([`Backend::step`]).
//! - Shape mismatches are errors ([`ForwardError`]), never panics.

pub mod cpu;
pub mod kv_pool;

pub use cpu::Cpu;

use pagoda_kernels::ops::RopeStyle;

use super::linear::Linear;
use super::models::{BatchInput, KvLayout};
use super::weights::LoadError;
use crate::config::KvCacheDtype;

/// Errors raised while running a model (shape mismatches are bugs, but never panics).
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("kernel: {0}")]
    Kernel(#[from] pagoda_kernels::KernelError),
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("{0}")]
    Shape(String),
}

/// Where a model's memory lives and how its operations run.
pub trait Backend: Send + Sync + Sized + 'static {
    /// A flat f32 buffer: activations, norm weights, biases.
    type Tensor: Send + Sync;
    /// A weight matrix in the backend's layout (dense or quantized).
    type Matrix: Send + Sync;
    /// Rotary-embedding tables.
    type Rope: Send + Sync;
    /// The paged KV pool: per layer, K and V for `num_blocks × block_size` token slots.
    type Kv: Send;
    /// One step's token ids, positions, KV slots and block tables, as the ops read them.
    type Step<'a>
    where
        Self: 'a;

    /// A short name, for logs.
    fn name(&self) -> &'static str;

    // ---------------------------------------------------------------- memory

    /// An empty tensor (ops size it).
    fn tensor(&self) -> Self::Tensor;
    /// A tensor holding `host`.
    fn upload(&self, host: &[f32]) -> Result<Self::Tensor, ForwardError>;
    /// The values of `t`, into `out` (resized to fit).
    fn download(&self, t: &Self::Tensor, out: &mut Vec<f32>) -> Result<(), ForwardError>;
    /// The number of values in `t`.
    fn len(&self, t: &Self::Tensor) -> usize;
    /// A matrix from weights as the loader read them (quantized ones stay quantized where
    /// the backend can run them so).
    fn matrix(&self, host: Linear) -> Result<Self::Matrix, LoadError>;
    /// `(rows, cols)` of a matrix.
    fn matrix_shape(&self, m: &Self::Matrix) -> (usize, usize);
    /// Rotary tables for a `dim`-wide rotary section, positions `0..max_pos`.
    fn rope_table(&self, dim: usize, max_pos: usize, theta: f32) -> Result<Self::Rope, LoadError>;
    /// The KV pool for a model's layout: `num_blocks` blocks of `block_size` slots.
    fn kv_pool(
        &self,
        layout: KvLayout,
        num_blocks: usize,
        block_size: usize,
        dtype: KvCacheDtype,
    ) -> Result<Self::Kv, ForwardError>;
    /// Blocks in a pool.
    fn kv_blocks(&self, kv: &Self::Kv) -> usize;
    /// Copies whole blocks, `(src, dst)`, in every layer (a fork's copy on write).
    fn kv_copy_blocks(&self, kv: &mut Self::Kv, pairs: &[(u32, u32)]) -> Result<(), ForwardError>;
    /// A step's index data, made once per forward pass.
    fn step<'a>(&self, input: &'a BatchInput<'a>) -> Result<Self::Step<'a>, ForwardError>;

    // ---------------------------------------------------------------- operations

    /// Row `token` of `table` for each of the step's tokens (embedding lookup).
    fn embed(
        &self,
        table: &Self::Matrix,
        step: &Self::Step<'_>,
        out: &mut Self::Tensor,
    ) -> Result<(), ForwardError>;
    /// `out = x · wᵀ (+ bias)`.
    fn matmul(
        &self,
        w: &Self::Matrix,
        x: &Self::Tensor,
        out: &mut Self::Tensor,
    ) -> Result<(), ForwardError>;
    /// One matrix per head: `x` is `n × heads × cols`, head `h` of every row goes through
    /// `ws[h]` (`rows × cols`), `out` is `n × heads × rows`.
    fn matmul_heads(
        &self,
        ws: &[Self::Matrix],
        x: &Self::Tensor,
        out: &mut Self::Tensor,
    ) -> Result<(), ForwardError>;
    /// `out = x / sqrt(mean(x²) + eps) · w`, row by row (rows of `w`'s length).
    fn rms_norm(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        eps: f32,
        out: &mut Self::Tensor,
    ) -> Result<(), ForwardError>;
    /// Rotates, in place, the first `table`-width elements of each of the `heads` heads
    /// (`head_dim` wide) of every row, by the row's position.
    #[allow(clippy::too_many_arguments)]
    fn rope(
        &self,
        x: &mut Self::Tensor,
        heads: usize,
        head_dim: usize,
        table: &Self::Rope,
        style: RopeStyle,
        step: &Self::Step<'_>,
    ) -> Result<(), ForwardError>;
    /// SwiGLU gating in place: `gate = silu(gate) · up`.
    fn silu_mul(&self, gate: &mut Self::Tensor, up: &Self::Tensor) -> Result<(), ForwardError>;
    /// SwiGLU gating of a stacked gate/up product: each row of `x` holds `[gate | up]`,
    /// `half` values each; `out` becomes the rows' `silu(gate) · up` (`rows × half`).
    fn silu_mul_halves(
        &self,
        x: &Self::Tensor,
        half: usize,
        out: &mut Self::Tensor,
    ) -> Result<(), ForwardError>;
    /// `x += y`.
    fn add(&self, x: &mut Self::Tensor, y: &Self::Tensor) -> Result<(), ForwardError>;
    /// Sets `t` to `len` copies of `value`.
    fn fill(&self, t: &mut Self::Tensor, len: usize, value: f32) -> Result<(), ForwardError>;
    /// Copies columns `src_col..src_col + width` of every row of `src` (rows of
    /// `src_width`) to columns `dst_col..` of the same rows of `dst` (rows of
    /// `dst_width`). `dst` is sized to the row count, keeping its values when it already
    /// is, so several calls can fill one tensor.
    #[allow(clippy::too_many_arguments)]
    fn copy_cols(
        &self,
        src: &Self::Tensor,
        src_width: usize,
        src_col: usize,
        dst: &mut Self::Tensor,
        dst_width: usize,
        dst_col: usize,
        width: usize,
    ) -> Result<(), ForwardError>;
    /// `dst` = rows `rows` of `src` (rows of `width`), in that order.
    fn gather_rows(
        &self,
        src: &Self::Tensor,
        width: usize,
        rows: &[usize],
        dst: &mut Self::Tensor,
    ) -> Result<(), ForwardError>;
    /// Row `rows[j]` of `dst` += `weights[j]` · row `j` of `src` (rows of `width`).
    fn scatter_add_rows(
        &self,
        dst: &mut Self::Tensor,
        width: usize,
        src: &Self::Tensor,
        rows: &[usize],
        weights: &[f32],
    ) -> Result<(), ForwardError>;
    /// Stores the step's keys and values (`n × heads × head_dim` each) of `layer` at the
    /// step's slots; `v` is `None` exactly when the pool's layout has `values_are_keys`.
    fn kv_write(
        &self,
        kv: &mut Self::Kv,
        layer: usize,
        k: &Self::Tensor,
        v: Option<&Self::Tensor>,
        step: &Self::Step<'_>,
    ) -> Result<(), ForwardError>;
    /// Causal paged attention of `q` (`n × heads × head_dim`) over `layer` of the pool
    /// for the step's sequences: softmax scale `scale` (`None`: `head_dim^-½`), within a
    /// sliding `window` of positions if given.
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        kv: &Self::Kv,
        layer: usize,
        q: &Self::Tensor,
        heads: usize,
        scale: Option<f32>,
        window: Option<usize>,
        step: &Self::Step<'_>,
        out: &mut Self::Tensor,
    ) -> Result<(), ForwardError>;
}

/// Bytes one KV block takes across all layers (K and V, or K alone) at `dtype`.
pub fn kv_bytes_per_block(layout: KvLayout, block_size: usize, dtype: KvCacheDtype) -> usize {
    layout.buffers()
        * layout.num_layers
        * block_size
        * layout.heads
        * layout.head_dim
        * dtype.bytes()
}

/// The backend's copy of a host vector (norm weights), checked to be `len` long.
pub fn vector<B: Backend>(
    b: &B,
    name: &str,
    v: Vec<f32>,
    len: usize,
) -> Result<B::Tensor, LoadError> {
    if v.len() != len {
        return Err(LoadError::Shape(format!(
            "{name} has {} values, expected {len}",
            v.len()
        )));
    }
    b.upload(&v).map_err(|e| LoadError::Backend(e.to_string()))
}
