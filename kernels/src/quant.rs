//! ggml block-quantized weight matrices (Q4_0, Q4_1, Q8_0) and their matmul.
//!
//! A matrix is stored exactly as in a GGUF file: `rows` rows (output
//! features), each a run of blocks covering [`BLOCK_WEIGHTS`] consecutive
//! columns (input features). Keeping the file's byte layout means weights can
//! be loaded with a plain copy and handed unchanged to any future device
//! kernel.

use std::cell::RefCell;
use std::fmt;

use half::f16;

use crate::error::{check_len, checked_product, KernelError};
use crate::gemm::{self, OutWriter, ROW_TILE};
use crate::int8::{self, Int8Level};
use crate::packed;
use crate::simd::{self, Level, LANES};

/// Weights per quantization block, for every supported format.
pub const BLOCK_WEIGHTS: usize = 32;

/// Batches of at most this many tokens use the fused dequantize-and-dot
/// path; larger batches dequantize a panel of rows once and run the f32
/// register-tiled kernel.
const FUSED_MAX_TOKENS: usize = 4;

/// Upper bound on the f32 scratch one task dequantizes into (elements).
const SCRATCH_MAX_ELEMS: usize = 128 * 1024;

/// A ggml block quantization format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantFormat {
    /// f16 scale `d`, 32 × 4-bit `q`; weight = (q − 8) · d. 18 bytes per block.
    Q4_0,
    /// f16 scale `d`, f16 minimum `m`, 32 × 4-bit `q`; weight = q · d + m. 20 bytes.
    Q4_1,
    /// f16 scale `d`, 32 × i8 `q`; weight = q · d. 34 bytes per block.
    Q8_0,
}

impl QuantFormat {
    /// Weights per block (the same for every format).
    pub const BLOCK_WEIGHTS: usize = BLOCK_WEIGHTS;

    /// Bytes in one block of [`BLOCK_WEIGHTS`] weights.
    pub fn block_bytes(self) -> usize {
        match self {
            QuantFormat::Q4_0 => 18,
            QuantFormat::Q4_1 => 20,
            QuantFormat::Q8_0 => 34,
        }
    }
}

/// A quantized weight matrix: `rows` = out_features, `cols` = in_features
/// (a multiple of [`BLOCK_WEIGHTS`]), stored row-major in ggml blocks.
#[derive(Clone)]
pub struct QMatrix {
    format: QuantFormat,
    rows: usize,
    cols: usize,
    data: Vec<u8>,
    /// Whether `data` is in the row-interleaved layout of [`crate::packed`].
    packed: bool,
    /// Activation precision of the packed product.
    precision: Precision,
}

/// How a packed matrix quantizes the activations it is multiplied with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// Two 8-bit planes per activation (about 15 bits relative to each block's largest
    /// value): results match f32 activations closely, at about half the speed of `Fast`.
    #[default]
    Precise,
    /// One 8-bit plane, as llama.cpp's Q8 dot products: fastest, but rounding of
    /// activation outliers visibly moves logits.
    Fast,
}

impl fmt::Debug for QMatrix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QMatrix")
            .field("format", &self.format)
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .field("bytes", &self.data.len())
            .field("packed", &self.packed)
            .finish()
    }
}

impl QMatrix {
    /// Wrap raw ggml block bytes. Fails unless `cols` is a multiple of
    /// [`BLOCK_WEIGHTS`] and `data` holds exactly `rows × cols / 32` blocks.
    pub fn new(
        format: QuantFormat,
        rows: usize,
        cols: usize,
        data: Vec<u8>,
    ) -> Result<Self, KernelError> {
        if !cols.is_multiple_of(BLOCK_WEIGHTS) {
            return Err(KernelError::InvalidShape {
                what: "QMatrix cols",
                reason: format!("{cols} is not a multiple of {BLOCK_WEIGHTS}"),
            });
        }
        let expected = checked_product(
            "QMatrix",
            &[rows, cols / BLOCK_WEIGHTS, format.block_bytes()],
        )?;
        check_len("QMatrix data", expected, data.len())?;
        Ok(Self {
            format,
            rows,
            cols,
            data,
            packed: false,
            precision: Precision::default(),
        })
    }

    /// Set the activation precision of packed products (ignored by the ggml layout).
    pub fn with_precision(mut self, precision: Precision) -> Self {
        self.precision = precision;
        self
    }

    /// Stack matrices of one format and width on top of each other (rows of `parts[0]`
    /// first). Used to fuse projections that read the same input, such as Q, K and V.
    pub fn concat_rows(parts: &[&QMatrix]) -> Result<Self, KernelError> {
        let first = parts.first().ok_or(KernelError::InvalidShape {
            what: "QMatrix::concat_rows",
            reason: "no matrices".into(),
        })?;
        let mut data = Vec::new();
        let mut rows = 0;
        for m in parts {
            if m.format != first.format || m.cols != first.cols || m.packed {
                return Err(KernelError::InvalidShape {
                    what: "QMatrix::concat_rows",
                    reason: format!(
                        "cannot stack {:?} {}x{} (packed: {}) onto {:?} x{}",
                        m.format, m.rows, m.cols, m.packed, first.format, first.cols
                    ),
                });
            }
            data.extend_from_slice(&m.data);
            rows += m.rows;
        }
        Self::new(first.format, rows, first.cols, data)
    }

    /// Whether [`QMatrix::prepare`] packs for an int8 kernel ([`crate::int8::level`] is
    /// not `Off`: the CPU has AVX2 or better and neither `PAGODA_KERNELS_INT8=off` nor
    /// `PAGODA_KERNELS_SCALAR=1` is set).
    pub fn int8_kernel_available() -> bool {
        crate::int8::level() != Int8Level::Off
    }

    /// Convert to the layout that runs fastest on this CPU: the row-interleaved int8
    /// layout of [`crate::packed`] where an int8 kernel runs and the row count is a
    /// multiple of 8, the ggml layout otherwise.
    pub fn prepare(self) -> Self {
        if Self::int8_kernel_available() {
            self.into_packed()
        } else {
            self
        }
    }

    /// Repack into the row-interleaved layout (a no-op when already packed or when the
    /// rows are not a multiple of 8). Products then quantize activations to int8; on a
    /// CPU without the SIMD kernel a portable version runs (slowly, for tests).
    pub fn into_packed(mut self) -> Self {
        if !self.packed && packed::packable(self.rows, self.cols) {
            self.data = packed::pack(self.format, self.rows, self.cols, &self.data);
            self.packed = true;
        }
        self
    }

    /// Whether the matrix is in the row-interleaved int8 layout.
    pub fn is_packed(&self) -> bool {
        self.packed
    }

    /// Quantize a row-major `rows × cols` f32 matrix (see [`quantize`]).
    pub fn from_f32(
        format: QuantFormat,
        rows: usize,
        cols: usize,
        values: &[f32],
    ) -> Result<Self, KernelError> {
        let expected = checked_product("QMatrix values", &[rows, cols])?;
        check_len("QMatrix values", expected, values.len())?;
        if !cols.is_multiple_of(BLOCK_WEIGHTS) {
            return Err(KernelError::InvalidShape {
                what: "QMatrix cols",
                reason: format!("{cols} is not a multiple of {BLOCK_WEIGHTS}"),
            });
        }
        Self::new(format, rows, cols, quantize(format, values)?)
    }

    /// Number of rows (output features).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns (input features).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The block format.
    pub fn format(&self) -> QuantFormat {
        self.format
    }

    /// The raw bytes: ggml blocks row after row, or records of 8 interleaved rows when
    /// [`QMatrix::is_packed`].
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// Bytes per row.
    pub fn row_bytes(&self) -> usize {
        self.cols / BLOCK_WEIGHTS * self.format.block_bytes()
    }

    fn row_data(&self, r: usize) -> &[u8] {
        let rb = self.row_bytes();
        &self.data[r * rb..(r + 1) * rb]
    }

    /// Dequantize row `r` into `out[..cols]`.
    ///
    /// # Panics
    /// If `r >= rows()` or `out.len() < cols()`, like slice indexing. Use
    /// [`QMatrix::try_dequantize_row`] when `r` comes from untrusted input
    /// (for example a token id used for an embedding lookup).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        if let Err(e) = self.try_dequantize_row(r, out) {
            panic!("QMatrix::dequantize_row: {e}");
        }
    }

    /// Dequantize row `r` into `out[..cols]`, reporting a bad row index or a
    /// short output buffer as an error.
    pub fn try_dequantize_row(&self, r: usize, out: &mut [f32]) -> Result<(), KernelError> {
        if r >= self.rows {
            return Err(KernelError::OutOfRange {
                what: "QMatrix row",
                index: r,
                bound: self.rows,
            });
        }
        if out.len() < self.cols {
            return Err(KernelError::LengthMismatch {
                what: "dequantize_row out",
                expected: self.cols,
                actual: out.len(),
            });
        }
        if self.packed {
            packed::dequantize_row(self.format, self.cols, &self.data, r, &mut out[..self.cols]);
        } else {
            dequantize_row_portable(self.format, self.row_data(r), &mut out[..self.cols]);
        }
        Ok(())
    }

    /// Batched matrix product against the weights:
    /// `out[t * rows + r] = Σ_c W[r, c] · x[t * cols + c]` for `t in 0..n`.
    ///
    /// `x` must hold exactly `n × cols` and `out` exactly `n × rows` values.
    /// Each weight block is decoded once per call and used for all `n`
    /// tokens; rows are split across the kernel pool's tasks.
    pub fn matmul(&self, x: &[f32], n: usize, out: &mut [f32]) -> Result<(), KernelError> {
        self.matmul_with(simd::level(), x, n, out)
    }

    /// The product of a packed matrix on one int8 level (tests compare every level).
    #[cfg(test)]
    pub(crate) fn int8_matmul_at(&self, level: Int8Level, x: &[f32], n: usize, out: &mut [f32]) {
        assert!(self.packed, "int8_matmul_at needs a packed matrix");
        assert_eq!(x.len(), n * self.cols);
        let writer = OutWriter::new(out, self.rows, n).expect("out is n × rows");
        self.packed_matmul(level, x, n, self.rows * self.cols * n, &writer);
    }

    pub(crate) fn matmul_with(
        &self,
        level: Level,
        x: &[f32],
        n: usize,
        out: &mut [f32],
    ) -> Result<(), KernelError> {
        check_len(
            "matmul x",
            checked_product("matmul x", &[n, self.cols])?,
            x.len(),
        )?;
        let out_len = checked_product("matmul out", &[n, self.rows])?;
        check_len("matmul out", out_len, out.len())?;
        if n == 0 || self.rows == 0 {
            return Ok(());
        }
        if self.cols == 0 {
            out.fill(0.0);
            return Ok(());
        }
        let rows = self.rows;
        let writer = OutWriter::new(out, rows, n).ok_or(KernelError::LengthMismatch {
            what: "matmul out",
            expected: out_len,
            actual: 0,
        })?;
        let macs = rows.saturating_mul(self.cols).saturating_mul(n);
        if self.packed {
            // The packed layout runs the int8 level in use; with the portable kernels
            // forced, or none in use (a matrix packed by hand), the portable int8 one.
            let l8 = match (level, int8::level()) {
                (Level::Scalar, _) | (_, Int8Level::Off) => Int8Level::Portable,
                (_, l) => l,
            };
            self.packed_matmul(l8, x, n, macs, &writer);
        } else if n <= FUSED_MAX_TOKENS {
            let chunk = gemm::rows_per_task(rows, 4096);
            gemm::run_tasks(rows.div_ceil(chunk), macs, |c| {
                let r0 = c * chunk;
                let r1 = (r0 + chunk).min(rows);
                // SAFETY: task `c` is the only one touching rows r0..r1.
                unsafe { self.fused_rows(level, r0, r1, x, n, &writer) };
            });
        } else {
            let max_rows = (SCRATCH_MAX_ELEMS / self.cols.max(1)) / ROW_TILE * ROW_TILE;
            let chunk = gemm::rows_per_task(rows, max_rows);
            gemm::run_tasks(rows.div_ceil(chunk), macs, |c| {
                let r0 = c * chunk;
                let r1 = (r0 + chunk).min(rows);
                with_scratch((r1 - r0) * self.cols, |w| {
                    self.dequantize_rows(level, r0, r1, w);
                    // SAFETY: task `c` is the only one touching rows r0..r1.
                    unsafe { gemm::gemm_rows(level, w, r1 - r0, self.cols, x, n, r0, &writer) };
                });
            });
        }
        Ok(())
    }

    /// The int8 product of a packed matrix: activations quantized once, then groups of
    /// eight rows split across the kernel pool's tasks.
    fn packed_matmul(
        &self,
        level: Int8Level,
        x: &[f32],
        n: usize,
        macs: usize,
        out: &OutWriter<'_>,
    ) {
        ACTS.with(|cell| {
            let mut local = packed::Acts::default();
            let mut guard = cell.try_borrow_mut().ok();
            let acts = guard.as_deref_mut().unwrap_or(&mut local);
            let precise = self.precision == Precision::Precise;
            acts.quantize(x, n, self.cols, precise);
            if int8::wants_wide(level, self.format, precise) {
                acts.widen();
            }
            let acts: &packed::Acts = acts;
            let product = int8::Product {
                format: self.format,
                data: &self.data,
                cols: self.cols,
                acts,
                n,
                out,
            };
            let groups = self.rows / packed::GROUP;
            let tasks = (crate::pool::threads() * 4).clamp(1, groups);
            let chunk = groups.div_ceil(tasks);
            gemm::run_tasks(groups.div_ceil(chunk), macs, |c| {
                let g0 = c * chunk;
                let g1 = (g0 + chunk).min(groups);
                // SAFETY: the matrix is packed with `groups` groups of `cols` columns;
                // `acts` holds n tokens; task `c` alone writes rows g0·8..g1·8.
                unsafe { int8::groups(level, &product, g0, g1) }
            });
        });
    }

    /// Decode rows `r0..r1` into `w` (`(r1 - r0) × cols` f32).
    fn dequantize_rows(&self, level: Level, r0: usize, r1: usize, w: &mut [f32]) {
        let rb = self.row_bytes();
        let bytes = &self.data[r0 * rb..r1 * rb];
        match level {
            Level::Scalar => {
                for (src, dst) in bytes
                    .chunks_exact(rb.max(1))
                    .zip(w.chunks_exact_mut(self.cols.max(1)))
                {
                    dequantize_row_portable(self.format, src, dst);
                }
            }
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => {
                // SAFETY: Avx2 is only selected when the CPU supports it; the
                // byte and f32 ranges match (r1 - r0) whole rows.
                unsafe { crate::x86::dequantize_rows_avx2(self.format, bytes, w) }
            }
        }
    }

    /// Fused decode-and-dot for rows `r0..r1` and `n <= FUSED_MAX_TOKENS` tokens.
    ///
    /// # Safety
    /// The caller must be the only writer of rows `r0..r1` of `out`.
    unsafe fn fused_rows(
        &self,
        level: Level,
        r0: usize,
        r1: usize,
        x: &[f32],
        n: usize,
        out: &OutWriter<'_>,
    ) {
        let rb = self.row_bytes();
        match level {
            Level::Scalar => {
                for r in r0..r1 {
                    let sums = fused_row_portable(
                        self.format,
                        &self.data[r * rb..(r + 1) * rb],
                        x,
                        n,
                        self.cols,
                    );
                    for (t, &v) in sums.iter().enumerate().take(n) {
                        // SAFETY: row ownership is this function's contract.
                        unsafe { out.put(t, r, v) };
                    }
                }
            }
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => {
                // SAFETY: CPU support checked by `Level`; the byte range is
                // whole rows r0..r1 and `x` holds n × cols values; row
                // ownership forwarded.
                unsafe {
                    crate::x86::fused_rows_avx2(
                        self.format,
                        &self.data[r0 * rb..r1 * rb],
                        self.cols,
                        r0,
                        x,
                        n,
                        out,
                    )
                }
            }
        }
    }
}

thread_local! {
    static ACTS: RefCell<packed::Acts> = RefCell::new(packed::Acts::default());
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Lend `f` a per-thread f32 buffer of `len` elements (contents unspecified).
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => {
            if buf.len() < len {
                buf.resize(len, 0.0);
            }
            f(&mut buf[..len])
        }
        Err(_) => f(&mut vec![0.0; len]),
    })
}

#[inline(always)]
fn read_f16(bytes: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([bytes[at], bytes[at + 1]])).to_f32()
}

/// Decode one block into 32 weights.
#[inline(always)]
fn decode_block_portable(format: QuantFormat, block: &[u8], w: &mut [f32; BLOCK_WEIGHTS]) {
    match format {
        QuantFormat::Q4_0 => {
            let d = read_f16(block, 0);
            let qs = &block[2..18];
            for j in 0..16 {
                w[j] = ((qs[j] & 0x0F) as i32 - 8) as f32 * d;
                w[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
            }
        }
        QuantFormat::Q4_1 => {
            let d = read_f16(block, 0);
            let m = read_f16(block, 2);
            let qs = &block[4..20];
            for j in 0..16 {
                w[j] = (qs[j] & 0x0F) as f32 * d + m;
                w[j + 16] = (qs[j] >> 4) as f32 * d + m;
            }
        }
        QuantFormat::Q8_0 => {
            let d = read_f16(block, 0);
            for (wj, &q) in w.iter_mut().zip(&block[2..34]) {
                *wj = (q as i8) as f32 * d;
            }
        }
    }
}

/// Dequantize one row's blocks (`src`) into `dst` (its length in weights).
fn dequantize_row_portable(format: QuantFormat, src: &[u8], dst: &mut [f32]) {
    let mut w = [0f32; BLOCK_WEIGHTS];
    for (block, out) in src
        .chunks_exact(format.block_bytes())
        .zip(dst.chunks_exact_mut(BLOCK_WEIGHTS))
    {
        decode_block_portable(format, block, &mut w);
        out.copy_from_slice(&w);
    }
}

/// Dot products of one quantized row with up to [`FUSED_MAX_TOKENS`] tokens.
fn fused_row_portable(
    format: QuantFormat,
    row: &[u8],
    x: &[f32],
    n: usize,
    cols: usize,
) -> [f32; FUSED_MAX_TOKENS] {
    let n = n.min(FUSED_MAX_TOKENS);
    let mut acc = [[0f32; LANES]; FUSED_MAX_TOKENS];
    let mut w = [0f32; BLOCK_WEIGHTS];
    for (b, block) in row.chunks_exact(format.block_bytes()).enumerate() {
        decode_block_portable(format, block, &mut w);
        let base = b * BLOCK_WEIGHTS;
        for (t, acc_t) in acc.iter_mut().enumerate().take(n) {
            let xb = &x[t * cols + base..t * cols + base + BLOCK_WEIGHTS];
            for (wc, xc) in w.chunks_exact(LANES).zip(xb.chunks_exact(LANES)) {
                for l in 0..LANES {
                    acc_t[l] += wc[l] * xc[l];
                }
            }
        }
    }
    let mut res = [0f32; FUSED_MAX_TOKENS];
    for (r, a) in res.iter_mut().zip(&acc) {
        *r = simd::hsum_lanes(a);
    }
    res
}

/// Quantize `values` (any number of rows, concatenated) into ggml blocks.
///
/// `values.len()` must be a multiple of [`BLOCK_WEIGHTS`]; each run of 32
/// consecutive values becomes one block. Scales are chosen per block so that
/// the extreme value is represented (Q4_0 and Q8_0) or the block's range is
/// covered (Q4_1), and each weight is rounded to the nearest level using the
/// f16-rounded scale actually stored.
pub fn quantize(format: QuantFormat, values: &[f32]) -> Result<Vec<u8>, KernelError> {
    if !values.len().is_multiple_of(BLOCK_WEIGHTS) {
        return Err(KernelError::InvalidShape {
            what: "quantize values",
            reason: format!(
                "length {} is not a multiple of {BLOCK_WEIGHTS}",
                values.len()
            ),
        });
    }
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(KernelError::InvalidShape {
            what: "quantize values",
            reason: format!("value at index {i} is not finite"),
        });
    }
    let mut out = Vec::with_capacity(values.len() / BLOCK_WEIGHTS * format.block_bytes());
    for (b, block) in values.chunks_exact(BLOCK_WEIGHTS).enumerate() {
        let fits = match format {
            QuantFormat::Q4_0 => quantize_q4_0(block, &mut out),
            QuantFormat::Q4_1 => quantize_q4_1(block, &mut out),
            QuantFormat::Q8_0 => quantize_q8_0(block, &mut out),
        };
        if !fits {
            return Err(KernelError::InvalidShape {
                what: "quantize values",
                reason: format!("block {b} needs a scale beyond the f16 range"),
            });
        }
    }
    Ok(out)
}

/// Round `v` to f16 and return both the stored bits and the value they mean.
fn to_f16(v: f32) -> (u16, f32) {
    let h = f16::from_f32(v);
    (h.to_bits(), h.to_f32())
}

fn inverse_or_zero(d: f32) -> f32 {
    if d == 0.0 {
        0.0
    } else {
        1.0 / d
    }
}

/// The block quantizers append one block to `out` and return `false` when a
/// stored f16 parameter would overflow.
fn quantize_q4_0(block: &[f32], out: &mut Vec<u8>) -> bool {
    // The value with the largest magnitude maps to level 0 (−8 · d), which
    // uses the asymmetric end of the 4-bit range for the extreme.
    let extreme = block
        .iter()
        .copied()
        .fold(0f32, |best, v| if v.abs() > best.abs() { v } else { best });
    let (bits, d) = to_f16(extreme / -8.0);
    let id = inverse_or_zero(d);
    out.extend_from_slice(&bits.to_le_bytes());
    let level = |v: f32| ((v * id).round() + 8.0).clamp(0.0, 15.0) as u8;
    for j in 0..16 {
        out.push(level(block[j]) | (level(block[j + 16]) << 4));
    }
    d.is_finite()
}

fn quantize_q4_1(block: &[f32], out: &mut Vec<u8>) -> bool {
    let lo = block.iter().copied().fold(f32::INFINITY, f32::min);
    let hi = block.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let (m_bits, m) = to_f16(lo);
    let (d_bits, d) = to_f16((hi - m) / 15.0);
    let id = inverse_or_zero(d);
    out.extend_from_slice(&d_bits.to_le_bytes());
    out.extend_from_slice(&m_bits.to_le_bytes());
    let level = |v: f32| ((v - m) * id).round().clamp(0.0, 15.0) as u8;
    for j in 0..16 {
        out.push(level(block[j]) | (level(block[j + 16]) << 4));
    }
    d.is_finite() && m.is_finite()
}

fn quantize_q8_0(block: &[f32], out: &mut Vec<u8>) -> bool {
    let amax = block.iter().fold(0f32, |a, v| a.max(v.abs()));
    let (bits, d) = to_f16(amax / 127.0);
    let id = inverse_or_zero(d);
    out.extend_from_slice(&bits.to_le_bytes());
    for &v in block {
        out.push(((v * id).round().clamp(-127.0, 127.0) as i8) as u8);
    }
    d.is_finite()
}
