//! Element-wise and per-row operations: RMS norm, rotary embeddings, SwiGLU
//! gating and greedy token selection.

use crate::error::{check_len, checked_product, KernelError};
use crate::simd::LANES;

/// RMS-normalise each row of `x` in place: `x ← x / sqrt(mean(x²) + eps) · weight`.
///
/// The row length is `weight.len()`; `x` holds `n` such rows. A trailing
/// partial row (when `x.len()` is not a multiple of `weight.len()`) is left
/// untouched, and an empty `weight` makes this a no-op.
pub fn rms_norm(x: &mut [f32], weight: &[f32], eps: f32) {
    let dim = weight.len();
    if dim == 0 {
        return;
    }
    for row in x.chunks_exact_mut(dim) {
        let mut acc = [0f32; LANES];
        let mut chunks = row.chunks_exact(LANES);
        for c in &mut chunks {
            for l in 0..LANES {
                acc[l] += c[l] * c[l];
            }
        }
        let mut ss = crate::simd::hsum_lanes(&acc);
        for v in chunks.remainder() {
            ss += v * v;
        }
        let inv = 1.0 / (ss / dim as f32 + eps).sqrt();
        for (v, w) in row.iter_mut().zip(weight) {
            *v = *v * inv * w;
        }
    }
}

/// Precomputed rotary-embedding angles for positions `0..max_pos`.
///
/// For pair `i` of a `dim`-wide rotary section the frequency is
/// `theta^(−2i / dim)`, and position `p` rotates that pair by `p · freq`.
/// Angles are evaluated in f64 and stored as f32 cos/sin tables of
/// `max_pos × dim/2` entries.
#[derive(Debug, Clone)]
pub struct RopeTable {
    dim: usize,
    max_pos: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RopeTable {
    /// Build the table. `dim` is the rotary dimension (normally the head
    /// dimension); an odd `dim` rotates only its first `dim − 1` elements.
    pub fn new(dim: usize, max_pos: usize, theta: f32) -> Self {
        let half = dim / 2;
        let len = max_pos.saturating_mul(half);
        let mut cos = Vec::with_capacity(len);
        let mut sin = Vec::with_capacity(len);
        let inv_freq: Vec<f64> = (0..half)
            .map(|i| (theta as f64).powf(-(2.0 * i as f64) / dim as f64))
            .collect();
        for p in 0..max_pos {
            for f in &inv_freq {
                let (s, c) = (p as f64 * f).sin_cos();
                cos.push(c as f32);
                sin.push(s as f32);
            }
        }
        Self {
            dim,
            max_pos,
            cos,
            sin,
        }
    }

    /// Number of positions covered (`max_pos`).
    pub fn max_positions(&self) -> usize {
        self.max_pos
    }

    /// The rotary dimension the table was built for.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// `(cos, sin)` for position `pos`, `dim / 2` entries each.
    fn angles(&self, pos: usize) -> (&[f32], &[f32]) {
        let half = self.dim / 2;
        (
            &self.cos[pos * half..(pos + 1) * half],
            &self.sin[pos * half..(pos + 1) * half],
        )
    }
}

/// Which elements of a head form each rotated pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Pairs `(2i, 2i + 1)`: GGUF llama weights (llama.cpp's "normal" rope).
    Interleaved,
    /// Pairs `(i, i + dim/2)`: Hugging Face `rotate_half` (GPT-NeoX style).
    Neox,
}

/// Rotate every head of every token in place.
///
/// `x` is `positions.len() × n_heads × head_dim`; token `t` is rotated by the
/// angles of `positions[t]`. The first `table.dim()` elements of each head
/// are rotated (all of them when the table was built with `head_dim`).
pub fn apply_rope(
    x: &mut [f32],
    positions: &[usize],
    n_heads: usize,
    head_dim: usize,
    table: &RopeTable,
    style: RopeStyle,
) -> Result<(), KernelError> {
    let half = table.dim / 2;
    if half == 0 || 2 * half > head_dim {
        return Err(KernelError::InvalidShape {
            what: "apply_rope",
            reason: format!("rotary dim {} does not fit head_dim {head_dim}", table.dim),
        });
    }
    let expected = checked_product("apply_rope x", &[positions.len(), n_heads, head_dim])?;
    check_len("apply_rope x", expected, x.len())?;
    if let Some(&bad) = positions.iter().find(|&&p| p >= table.max_pos) {
        return Err(KernelError::OutOfRange {
            what: "rope position",
            index: bad,
            bound: table.max_pos,
        });
    }
    if n_heads == 0 {
        return Ok(());
    }
    let rot = 2 * half;
    for (tok, &pos) in x.chunks_exact_mut(n_heads * head_dim).zip(positions) {
        let (cos, sin) = table.angles(pos);
        for head in tok.chunks_exact_mut(head_dim) {
            match style {
                RopeStyle::Interleaved => {
                    for ((pair, &c), &s) in head[..rot].chunks_exact_mut(2).zip(cos).zip(sin) {
                        let (a, b) = (pair[0], pair[1]);
                        pair[0] = a * c - b * s;
                        pair[1] = a * s + b * c;
                    }
                }
                RopeStyle::Neox => {
                    let (lo, hi) = head[..rot].split_at_mut(half);
                    for (((a, b), &c), &s) in lo.iter_mut().zip(hi.iter_mut()).zip(cos).zip(sin) {
                        let (x0, x1) = (*a, *b);
                        *a = x0 * c - x1 * s;
                        *b = x0 * s + x1 * c;
                    }
                }
            }
        }
    }
    Ok(())
}

/// SwiGLU gating in place: `gate[i] = silu(gate[i]) · up[i]`, where
/// `silu(g) = g / (1 + e^(−g))`. Only the common length is processed.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    let len = gate.len().min(up.len());
    let g = gate.as_mut_ptr();
    // SAFETY: both slices hold `len` elements; `out` may be `gate`.
    unsafe { silu_mul_raw(g, g, up.as_ptr(), len) };
}

/// SwiGLU gating of stacked rows, where a stacked gate/up product left them: each row of
/// `x` holds `[gate | up]`, `half` values each, and `out` gets `rows × half` values
/// `silu(gate) · up` (no split into two buffers first).
pub fn silu_mul_halves(x: &[f32], half: usize, out: &mut [f32]) -> Result<(), KernelError> {
    if half == 0 || !x.len().is_multiple_of(2 * half) {
        return Err(KernelError::InvalidShape {
            what: "silu_mul_halves x",
            reason: format!("{} values are not rows of 2 × {half}", x.len()),
        });
    }
    check_len("silu_mul_halves out", x.len() / 2, out.len())?;
    for (row, o) in x.chunks_exact(2 * half).zip(out.chunks_exact_mut(half)) {
        let (gate, up) = row.split_at(half);
        // SAFETY: the three slices hold `half` elements.
        unsafe { silu_mul_raw(o.as_mut_ptr(), gate.as_ptr(), up.as_ptr(), half) };
    }
    Ok(())
}

/// `out[i] = silu(gate[i]) · up[i]` for `i < len`: AVX2 eight lanes at a time where the
/// level allows, the rest one by one. `out` may be `gate` (each element is read before
/// it is written).
///
/// # Safety
/// Every pointer addresses `len` floats.
unsafe fn silu_mul_raw(out: *mut f32, gate: *const f32, up: *const f32, len: usize) {
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if crate::simd::level() != crate::simd::Level::Scalar {
        done = len - len % 8;
        // SAFETY: AVX2/FMA are present whenever the level is not Scalar; the caller's
        // contract covers `done ≤ len` elements.
        unsafe { crate::x86::silu_mul_avx2(out, gate, up, done) };
    }
    for i in done..len {
        // SAFETY: the caller's contract.
        unsafe {
            let g = *gate.add(i);
            *out.add(i) = g / (1.0 + (-g).exp()) * *up.add(i);
        }
    }
}

/// Index of the largest value (the first one on ties). NaNs are ignored;
/// returns 0 for an empty slice or one holding only NaNs.
pub fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    let mut best_v = f32::NEG_INFINITY;
    let mut found = false;
    for (i, &v) in x.iter().enumerate() {
        if v.is_nan() {
            continue;
        }
        if !found || v > best_v {
            best = i;
            best_v = v;
            found = true;
        }
    }
    best
}
