//! The shared f32 micro-kernel behind [`crate::dense::matmul_f32`] and the
//! batched path of [`crate::quant::QMatrix::matmul`].
//!
//! Both compute `out[t * rows + r] = dot(W[r, :], x[t, :])`. Work is split into
//! tasks that each own a contiguous range of weight rows; inside a task, rows
//! are processed in panels of [`ROW_TILE`] against tiles of [`TOKEN_TILE`]
//! tokens, so every weight vector loaded from memory feeds several
//! accumulators and every activation vector is reused across the panel.

use std::marker::PhantomData;

use crate::simd::{self, Level, LANES};

/// Rows per register tile.
pub(crate) const ROW_TILE: usize = 4;
/// Tokens per register tile (4 × 3 accumulators fit the 16 AVX2 registers).
pub(crate) const TOKEN_TILE: usize = 3;

/// Work below this many multiply-adds is done on the calling thread.
pub(crate) const PARALLEL_MIN_MACS: usize = 1 << 16;

/// Writes results into an `n × rows` row-major output from several tasks at
/// once, each task owning a disjoint set of rows (columns of the output).
pub(crate) struct OutWriter<'a> {
    ptr: *mut f32,
    rows: usize,
    n: usize,
    _borrow: PhantomData<&'a mut [f32]>,
}

// SAFETY: the writer is only a shared handle to a mutable buffer; the callers
// of `put` guarantee that no two threads write the same element, and the
// buffer outlives the writer through the `'a` borrow.
unsafe impl Send for OutWriter<'_> {}
// SAFETY: see above; concurrent `put`s touch disjoint elements.
unsafe impl Sync for OutWriter<'_> {}

impl<'a> OutWriter<'a> {
    /// Wrap `out`, which must hold exactly `n * rows` elements.
    pub(crate) fn new(out: &'a mut [f32], rows: usize, n: usize) -> Option<Self> {
        if rows.checked_mul(n) != Some(out.len()) {
            return None;
        }
        Some(Self {
            ptr: out.as_mut_ptr(),
            rows,
            n,
            _borrow: PhantomData,
        })
    }

    /// Store `value` at token `t`, row `r`.
    ///
    /// # Safety
    /// No other thread may write `(t, r)` while this writer is alive. Bounds
    /// are checked (and panic) so that a logic error cannot corrupt memory.
    #[inline(always)]
    pub(crate) unsafe fn put(&self, t: usize, r: usize, value: f32) {
        assert!(t < self.n && r < self.rows, "OutWriter index out of range");
        // SAFETY: in bounds by the assert; exclusivity is the caller's contract.
        unsafe { *self.ptr.add(t * self.rows + r) = value };
    }
}

/// How many rows one parallel task handles: about four tasks per worker,
/// a multiple of [`ROW_TILE`], and at most `max_rows`.
pub(crate) fn rows_per_task(rows: usize, max_rows: usize) -> usize {
    let threads = crate::pool::threads();
    let target = rows.div_ceil(threads * 4);
    let rounded = target.div_ceil(ROW_TILE) * ROW_TILE;
    rounded.clamp(ROW_TILE, max_rows.max(ROW_TILE))
}

/// Tokens per cache block: keep about 512 KiB of activations hot.
fn token_block(cols: usize) -> usize {
    let by_cache = (128 * 1024) / cols.max(1);
    let tb = by_cache.clamp(TOKEN_TILE, 40 * TOKEN_TILE);
    tb - tb % TOKEN_TILE
}

/// A register-tile multiply: `R` weight rows against `T` token rows, each
/// `k` long, returning the `R × T` dot products.
pub(crate) trait Tile {
    /// # Safety
    /// Every pointer must be valid for reading `k` consecutive `f32`s, and the
    /// implementation's target features must be available.
    unsafe fn tile<const R: usize, const T: usize>(
        w: [*const f32; R],
        x: [*const f32; T],
        k: usize,
    ) -> [[f32; T]; R];
}

/// The portable tile, written on lane arrays.
pub(crate) struct PortableTile;

impl Tile for PortableTile {
    #[inline(always)]
    unsafe fn tile<const R: usize, const T: usize>(
        w: [*const f32; R],
        x: [*const f32; T],
        k: usize,
    ) -> [[f32; T]; R] {
        // SAFETY: the caller guarantees each pointer covers `k` elements.
        let ws: [&[f32]; R] =
            std::array::from_fn(|i| unsafe { std::slice::from_raw_parts(w[i], k) });
        // SAFETY: as above.
        let xs: [&[f32]; T] =
            std::array::from_fn(|j| unsafe { std::slice::from_raw_parts(x[j], k) });
        let mut acc = [[[0f32; LANES]; T]; R];
        let full = k - k % LANES;
        let mut i = 0;
        while i < full {
            for (r, wr) in ws.iter().enumerate() {
                let wv = &wr[i..i + LANES];
                for (j, xj) in xs.iter().enumerate() {
                    let xv = &xj[i..i + LANES];
                    for l in 0..LANES {
                        acc[r][j][l] += wv[l] * xv[l];
                    }
                }
            }
            i += LANES;
        }
        let mut res = [[0f32; T]; R];
        for r in 0..R {
            for j in 0..T {
                let mut s = simd::hsum_lanes(&acc[r][j]);
                for c in full..k {
                    s += ws[r][c] * xs[j][c];
                }
                res[r][j] = s;
            }
        }
        res
    }
}

/// Multiply the `prow` weight rows in `w` (row-major, `cols` wide, global rows
/// `r0..r0 + prow`) with all `n` token rows of `x`, writing into `out`.
///
/// # Safety
/// The calling task must be the only writer of rows `r0..r0 + prow` of `out`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_rows(
    level: Level,
    w: &[f32],
    prow: usize,
    cols: usize,
    x: &[f32],
    n: usize,
    r0: usize,
    out: &OutWriter<'_>,
) {
    assert!(w.len() >= prow * cols && x.len() >= n * cols);
    match level {
        Level::Scalar => {
            // SAFETY: lengths asserted above; row exclusivity forwarded.
            unsafe { gemm_rows_generic::<PortableTile>(w, prow, cols, x, n, r0, out) }
        }
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => {
            // SAFETY: `Level::Avx2` is only chosen when the CPU has AVX2/FMA/F16C.
            unsafe { crate::x86::gemm_rows_avx2(w, prow, cols, x, n, r0, out) }
        }
    }
}

/// The blocking loops, generic over the register tile so that each
/// instruction-set variant gets its own fully inlined copy.
///
/// # Safety
/// `w` holds at least `prow * cols` and `x` at least `n * cols` elements, the
/// tile's target features are available, and the task owns rows
/// `r0..r0 + prow` of `out`.
#[inline(always)]
pub(crate) unsafe fn gemm_rows_generic<K: Tile>(
    w: &[f32],
    prow: usize,
    cols: usize,
    x: &[f32],
    n: usize,
    r0: usize,
    out: &OutWriter<'_>,
) {
    let tb = token_block(cols);
    let mut t0 = 0;
    while t0 < n {
        let t1 = (t0 + tb).min(n);
        let mut i = 0;
        while i + ROW_TILE <= prow {
            let wp: [*const f32; ROW_TILE] = std::array::from_fn(|k| w[(i + k) * cols..].as_ptr());
            // SAFETY: forwarded from this function's contract.
            unsafe { row_panel::<K, ROW_TILE>(wp, x, cols, t0, t1, r0 + i, out) };
            i += ROW_TILE;
        }
        while i < prow {
            // SAFETY: forwarded from this function's contract.
            unsafe { row_panel::<K, 1>([w[i * cols..].as_ptr()], x, cols, t0, t1, r0 + i, out) };
            i += 1;
        }
        t0 = t1;
    }
}

/// `R` weight rows (global index `r..r + R`) against tokens `t0..t1`.
#[inline(always)]
unsafe fn row_panel<K: Tile, const R: usize>(
    w: [*const f32; R],
    x: &[f32],
    cols: usize,
    t0: usize,
    t1: usize,
    r: usize,
    out: &OutWriter<'_>,
) {
    let xp = |t: usize| x[t * cols..].as_ptr();
    let mut t = t0;
    while t + TOKEN_TILE <= t1 {
        // SAFETY: every row pointer covers `cols` elements (checked by callers).
        let res = unsafe { K::tile::<R, TOKEN_TILE>(w, [xp(t), xp(t + 1), xp(t + 2)], cols) };
        // SAFETY: the task owns rows `r..r + R`.
        unsafe { store(out, &res, t, r) };
        t += TOKEN_TILE;
    }
    match t1 - t {
        2 => {
            // SAFETY: as above.
            let res = unsafe { K::tile::<R, 2>(w, [xp(t), xp(t + 1)], cols) };
            // SAFETY: the task owns rows `r..r + R`.
            unsafe { store(out, &res, t, r) };
        }
        1 => {
            // SAFETY: as above.
            let res = unsafe { K::tile::<R, 1>(w, [xp(t)], cols) };
            // SAFETY: the task owns rows `r..r + R`.
            unsafe { store(out, &res, t, r) };
        }
        _ => {}
    }
}

/// Store an `R × T` tile at tokens `t..t + T`, rows `r..r + R`.
///
/// # Safety
/// The calling task must own rows `r..r + R` of `out`.
#[inline(always)]
pub(crate) unsafe fn store<const R: usize, const T: usize>(
    out: &OutWriter<'_>,
    res: &[[f32; T]; R],
    t: usize,
    r: usize,
) {
    for (i, row) in res.iter().enumerate() {
        for (j, &v) in row.iter().enumerate() {
            // SAFETY: row ownership is this function's contract.
            unsafe { out.put(t + j, r + i, v) };
        }
    }
}

/// Run `count` independent tasks, in parallel unless the whole job is small.
pub(crate) fn run_tasks<F>(count: usize, macs: usize, task: F)
where
    F: Fn(usize) + Sync,
{
    if macs < PARALLEL_MIN_MACS {
        (0..count).for_each(task);
    } else {
        crate::pool::run(count, &task);
    }
}
