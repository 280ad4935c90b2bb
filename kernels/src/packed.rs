//! The row-interleaved ("packed") layout of a quantized matrix and its int8 matmul.
//!
//! ggml stores a matrix row after row. For a product against int8 activations it pays to
//! interleave [`GROUP`] = 8 rows instead, so that one 256-bit register holds four
//! consecutive weights of each of the eight rows: a single `vpdpbusd` (u8 × i8 dot of four
//! pairs, accumulated into eight i32 lanes) then advances all eight rows at once, against
//! four activations broadcast to every lane. No horizontal sums are needed and every
//! activation load is shared by eight rows.
//!
//! One *record* covers 8 rows × one block of 32 columns and holds exactly the bytes of the
//! eight ggml blocks it replaces (so packing never changes the matrix's size):
//!
//! | format | scales | weights |
//! |--------|--------|---------|
//! | Q4_0   | 8 × f16 `d` | 4 × 32 bytes, two 4-bit codes per byte |
//! | Q4_1   | 8 × f16 `d`, 8 × f16 `m` | 4 × 32 bytes, two 4-bit codes per byte |
//! | Q8_0   | 8 × f16 `d` | 8 × 32 bytes, codes biased by +128 to unsigned |
//!
//! Weight register `k` (0..8) holds, at byte `4·j + i`, the code of column `4k + i` of row
//! `j` of the group. For the 4-bit formats registers `k` and `k + 4` share 32 bytes: `k` in
//! the low nibbles, `k + 4` in the high ones.
//!
//! Activations are quantized per token and per 32-column block to i8 with one f32 scale
//! (`x ≈ dx · qx`, |qx| ≤ 127), as llama.cpp does for its Q8 dot products. A block's
//! contribution to output row `r` is then
//! `d_r · dx · (Σ c·qx − bias · Σ qx) + m_r · Σ x`, where `c` is the unsigned code, `bias`
//! is 8 (Q4_0), 0 (Q4_1) or 128 (Q8_0), and the `m` term exists only for Q4_1 (`Σ x` is
//! the exact f32 sum of the block's activations).

use half::f16;

use crate::quant::{QuantFormat, BLOCK_WEIGHTS};

/// Rows interleaved in one record.
pub(crate) const GROUP: usize = 8;

/// Bytes of one record (8 rows × 32 columns).
pub(crate) fn record_bytes(format: QuantFormat) -> usize {
    GROUP * format.block_bytes()
}

/// Bytes of the scale header at the start of a record.
pub(crate) fn scale_bytes(format: QuantFormat) -> usize {
    match format {
        QuantFormat::Q4_1 => 4 * GROUP,
        QuantFormat::Q4_0 | QuantFormat::Q8_0 => 2 * GROUP,
    }
}

/// The constant subtracted from every unsigned code to get the signed level.
pub(crate) fn code_bias(format: QuantFormat) -> i32 {
    match format {
        QuantFormat::Q4_0 => 8,
        QuantFormat::Q4_1 => 0,
        QuantFormat::Q8_0 => 128,
    }
}

/// Whether a `rows × cols` matrix can use the packed layout.
pub(crate) fn packable(rows: usize, cols: usize) -> bool {
    rows > 0 && rows.is_multiple_of(GROUP) && cols > 0 && cols.is_multiple_of(BLOCK_WEIGHTS)
}

/// The 32 unsigned codes of one ggml block, in column order.
fn block_codes(format: QuantFormat, block: &[u8]) -> [u8; BLOCK_WEIGHTS] {
    let mut c = [0u8; BLOCK_WEIGHTS];
    match format {
        QuantFormat::Q4_0 | QuantFormat::Q4_1 => {
            let qs = &block[format.block_bytes() - 16..];
            for i in 0..16 {
                c[i] = qs[i] & 0x0F;
                c[i + 16] = qs[i] >> 4;
            }
        }
        QuantFormat::Q8_0 => {
            for (ci, &q) in c.iter_mut().zip(&block[2..34]) {
                *ci = q ^ 0x80;
            }
        }
    }
    c
}

/// Repack row-major ggml blocks (`rows × cols`, [`packable`]) into records.
pub(crate) fn pack(format: QuantFormat, rows: usize, cols: usize, src: &[u8]) -> Vec<u8> {
    let nb = cols / BLOCK_WEIGHTS;
    let bb = format.block_bytes();
    let rec = record_bytes(format);
    let sb = scale_bytes(format);
    let mut out = vec![0u8; src.len()];
    for g in 0..rows / GROUP {
        for b in 0..nb {
            let dst = &mut out[(g * nb + b) * rec..(g * nb + b + 1) * rec];
            for j in 0..GROUP {
                let r = g * GROUP + j;
                let blk = &src[(r * nb + b) * bb..(r * nb + b + 1) * bb];
                dst[2 * j..2 * j + 2].copy_from_slice(&blk[0..2]);
                if format == QuantFormat::Q4_1 {
                    dst[16 + 2 * j..16 + 2 * j + 2].copy_from_slice(&blk[2..4]);
                }
                let c = block_codes(format, blk);
                let w = &mut dst[sb..];
                match format {
                    QuantFormat::Q4_0 | QuantFormat::Q4_1 => {
                        for k in 0..4 {
                            for i in 0..4 {
                                w[k * 32 + j * 4 + i] = c[4 * k + i] | (c[4 * (k + 4) + i] << 4);
                            }
                        }
                    }
                    QuantFormat::Q8_0 => {
                        for k in 0..8 {
                            for i in 0..4 {
                                w[k * 32 + j * 4 + i] = c[4 * k + i];
                            }
                        }
                    }
                }
            }
        }
    }
    out
}

/// The unsigned code of column `4k + i` of lane `j` in a record's weight bytes.
#[inline(always)]
fn code_at(format: QuantFormat, w: &[u8], j: usize, k: usize, i: usize) -> u8 {
    match format {
        QuantFormat::Q4_0 | QuantFormat::Q4_1 => {
            let byte = w[(k % 4) * 32 + j * 4 + i];
            if k < 4 {
                byte & 0x0F
            } else {
                byte >> 4
            }
        }
        QuantFormat::Q8_0 => w[k * 32 + j * 4 + i],
    }
}

fn read_f16(bytes: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([bytes[at], bytes[at + 1]])).to_f32()
}

/// Decode row `r` of a packed matrix into `out[..cols]`.
pub(crate) fn dequantize_row(
    format: QuantFormat,
    cols: usize,
    data: &[u8],
    r: usize,
    out: &mut [f32],
) {
    let nb = cols / BLOCK_WEIGHTS;
    let rec = record_bytes(format);
    let sb = scale_bytes(format);
    let (g, j) = (r / GROUP, r % GROUP);
    let bias = code_bias(format) as f32;
    for b in 0..nb {
        let record = &data[(g * nb + b) * rec..(g * nb + b + 1) * rec];
        let d = read_f16(record, 2 * j);
        let m = if format == QuantFormat::Q4_1 {
            read_f16(record, 16 + 2 * j)
        } else {
            0.0
        };
        let w = &record[sb..];
        let dst = &mut out[b * BLOCK_WEIGHTS..(b + 1) * BLOCK_WEIGHTS];
        for k in 0..8 {
            for i in 0..4 {
                let c = code_at(format, w, j, k, i) as f32;
                dst[4 * k + i] = (c - bias) * d + m;
            }
        }
    }
}

/// Activations quantized per token and per 32-column block, as two planes of i8 codes:
/// `x ≈ d · (256 · q + q2)`, where `q` is the 8-bit code and `q2` the 8-bit code of what
/// `q` leaves over (so about 15 bits of precision relative to the block's largest value).
/// With `precise` off, `q2` is not used and `x ≈ d · q`.
#[derive(Debug, Default)]
pub(crate) struct Acts {
    /// Whether the second plane is filled and used.
    pub precise: bool,
    /// `n × cols` codes.
    pub q: Vec<i8>,
    /// `n × cols` codes of the remainder (only when `precise`).
    pub q2: Vec<i8>,
    /// `n × cols` combined codes `256 · q + q2` as i16 (only after [`Acts::widen`]; the
    /// operand of AVX2's Q8_0 kernel, where one `vpmaddwd` replaces two planes).
    pub wide: Vec<i16>,
    /// `n × blocks` scales.
    pub d: Vec<f32>,
    /// `n × blocks` sums of the combined codes (`256 · q + q2`, or `q`).
    pub sq: Vec<i32>,
    /// `n × blocks` exact sums of the activations.
    pub xs: Vec<f32>,
}

impl Acts {
    /// Quantize `x` (`n × cols`, cols a multiple of 32) into `self`, reusing its buffers.
    pub(crate) fn quantize(&mut self, x: &[f32], n: usize, cols: usize, precise: bool) {
        let nb = cols / BLOCK_WEIGHTS;
        self.precise = precise;
        self.q.resize(n * cols, 0);
        self.q2.resize(if precise { n * cols } else { 0 }, 0);
        self.d.resize(n * nb, 0.0);
        self.sq.resize(n * nb, 0);
        self.xs.resize(n * nb, 0.0);
        let q2 = if precise {
            &mut self.q2[..]
        } else {
            &mut [][..]
        };
        let (q, d, sq, xs) = (
            &mut self.q[..],
            &mut self.d[..],
            &mut self.sq[..],
            &mut self.xs[..],
        );
        let out = BlockOut { q, q2, d, sq, xs };
        quantize_split(&x[..n * cols], out, precise);
        self.wide.clear();
    }

    /// Fill [`Acts::wide`] from the two planes (precise activations only): `256 · q + q2`
    /// lies within ±32 639, so it fits an i16 exactly.
    pub(crate) fn widen(&mut self) {
        assert!(
            self.precise,
            "only precise activations have two planes to combine"
        );
        self.wide.clear();
        self.wide.extend(
            self.q
                .iter()
                .zip(&self.q2)
                .map(|(&q, &q2)| 256 * i16::from(q) + i16::from(q2)),
        );
    }
}

/// Where the codes, scales and sums of a run of blocks go (the fields of [`Acts`], for a
/// range of blocks; `q2` empty unless precise).
pub(crate) struct BlockOut<'a> {
    pub q: &'a mut [i8],
    pub q2: &'a mut [i8],
    pub d: &'a mut [f32],
    pub sq: &'a mut [i32],
    pub xs: &'a mut [f32],
}

impl<'a> BlockOut<'a> {
    /// The first `blocks` blocks and the rest (`q2` is empty, and stays so, with one
    /// plane).
    fn split_at(self, blocks: usize) -> (Self, Self) {
        let w = blocks * BLOCK_WEIGHTS;
        let (q, qr) = self.q.split_at_mut(w);
        let (q2, q2r) = self.q2.split_at_mut(w.min(self.q2.len()));
        let (d, dr) = self.d.split_at_mut(blocks);
        let (sq, sqr) = self.sq.split_at_mut(blocks);
        let (xs, xsr) = self.xs.split_at_mut(blocks);
        (
            Self { q, q2, d, sq, xs },
            Self {
                q: qr,
                q2: q2r,
                d: dr,
                sq: sqr,
                xs: xsr,
            },
        )
    }
}

/// Blocks per part when quantizing is split across the kernel pool (a prefill step
/// quantizes hundreds of thousands of activations per matmul, a 32-sequence decode step
/// tens of thousands).
const SPLIT_BLOCKS: usize = 256;

/// Quantize `x` into `out`, split across the kernel pool while it is large.
fn quantize_split(x: &[f32], out: BlockOut<'_>, precise: bool) {
    let blocks = out.d.len();
    let threads = crate::pool::threads();
    if blocks >= 2 * SPLIT_BLOCKS && threads > 1 {
        let per = blocks.div_ceil((blocks / SPLIT_BLOCKS).min(threads * 4));
        let mut parts = Vec::with_capacity(blocks.div_ceil(per));
        let (mut x, mut out) = (x, out);
        while !out.d.is_empty() {
            let b = per.min(out.d.len());
            let (xa, xr) = x.split_at(b * BLOCK_WEIGHTS);
            let (a, rest) = out.split_at(b);
            parts.push((xa, a));
            (x, out) = (xr, rest);
        }
        crate::pool::for_each(parts, |(x, out)| quantize_part(x, out, precise));
        return;
    }
    quantize_part(x, out, precise);
}

/// Quantize `x` into `out` on this thread.
fn quantize_part(x: &[f32], out: BlockOut<'_>, precise: bool) {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::level() != crate::simd::Level::Scalar {
        // SAFETY: AVX2/FMA are present whenever the level is not Scalar.
        unsafe { crate::x86::quantize_acts_avx2(x, out, precise) };
        return;
    }
    quantize_blocks(x, out, precise);
}

/// The portable body of [`Acts::quantize`] (and the reference of its AVX2 version).
#[inline(always)]
pub(crate) fn quantize_blocks(x: &[f32], out: BlockOut<'_>, precise: bool) {
    let BlockOut { q, q2, d, sq, xs } = out;
    const W: usize = BLOCK_WEIGHTS;
    for (i, xb) in x.chunks_exact(W).enumerate() {
        let xb: &[f32; W] = xb.try_into().expect("block of 32");
        let mut amax = [0f32; 8];
        let mut sum = [0f32; 8];
        for c in 0..W / 8 {
            for l in 0..8 {
                let v = xb[c * 8 + l];
                amax[l] = amax[l].max(v.abs());
                sum[l] += v;
            }
        }
        let amax = amax.iter().fold(0f32, |a, &v| a.max(v));
        let (scale, inv) = if amax > 0.0 && amax.is_finite() {
            (amax / 127.0, 127.0 / amax)
        } else {
            (0.0, 0.0)
        };
        let mut codes = [0i32; W];
        let qb = &mut q[i * W..(i + 1) * W];
        if precise {
            let q2b = &mut q2[i * W..(i + 1) * W];
            for l in 0..W {
                let y = (xb[l] * inv).clamp(-127.0, 127.0);
                let c = y.round_ties_even();
                let c2 = ((y - c) * 256.0).round_ties_even().clamp(-127.0, 127.0);
                qb[l] = c as i32 as i8;
                q2b[l] = c2 as i32 as i8;
                codes[l] = 256 * c as i32 + c2 as i32;
            }
            d[i] = scale / 256.0;
        } else {
            for l in 0..W {
                let c = (xb[l] * inv).round_ties_even().clamp(-127.0, 127.0);
                qb[l] = c as i32 as i8;
                codes[l] = c as i32;
            }
            d[i] = scale;
        }
        sq[i] = codes.iter().sum();
        xs[i] = sum.iter().sum();
    }
}

/// Portable int8 product for groups `g0..g1`: `out[t][g·8 + j]` for every token.
/// The reference for the SIMD kernel, and the fallback on CPUs without it.
#[allow(clippy::too_many_arguments)]
pub(crate) fn groups_portable(
    format: QuantFormat,
    data: &[u8],
    cols: usize,
    g0: usize,
    g1: usize,
    acts: &Acts,
    n: usize,
    mut put: impl FnMut(usize, usize, f32),
) {
    let nb = cols / BLOCK_WEIGHTS;
    let rec = record_bytes(format);
    let sb = scale_bytes(format);
    let bias = code_bias(format);
    for g in g0..g1 {
        for t in 0..n {
            let mut acc = [0f32; GROUP];
            for b in 0..nb {
                let record = &data[(g * nb + b) * rec..(g * nb + b + 1) * rec];
                let w = &record[sb..];
                let tb = t * nb + b;
                let span = t * cols + b * BLOCK_WEIGHTS..t * cols + (b + 1) * BLOCK_WEIGHTS;
                let xq = &acts.q[span.clone()];
                let xq2 = if acts.precise {
                    &acts.q2[span]
                } else {
                    &[0i8; BLOCK_WEIGHTS][..]
                };
                let hi = if acts.precise { 256 } else { 1 };
                for (j, a) in acc.iter_mut().enumerate() {
                    let mut s = 0i32;
                    for k in 0..8 {
                        for i in 0..4 {
                            let c = code_at(format, w, j, k, i) as i32;
                            s += c * (hi * xq[4 * k + i] as i32 + xq2[4 * k + i] as i32);
                        }
                    }
                    s -= bias * acts.sq[tb];
                    *a += s as f32 * (read_f16(record, 2 * j) * acts.d[tb]);
                    if format == QuantFormat::Q4_1 {
                        *a += read_f16(record, 16 + 2 * j) * acts.xs[tb];
                    }
                }
            }
            for (j, &v) in acc.iter().enumerate() {
                put(t, g * GROUP + j, v);
            }
        }
    }
}
