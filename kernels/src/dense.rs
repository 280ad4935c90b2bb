//! Dense f32 matrix product, for weights kept unquantized (and as a
//! reference shape for the quantized kernels).

use crate::error::{check_len, checked_product, KernelError};
use crate::gemm::{self, OutWriter};
use crate::simd::{self, Level};

/// `out (n × rows) = x (n × cols) · Wᵀ`, where `w` is `rows × cols` row-major.
///
/// `w`, `x` and `out` must hold exactly `rows × cols`, `n × cols` and
/// `n × rows` values. Rows are split across the kernel pool's tasks.
pub fn matmul_f32(
    w: &[f32],
    rows: usize,
    cols: usize,
    x: &[f32],
    n: usize,
    out: &mut [f32],
) -> Result<(), KernelError> {
    matmul_f32_with(simd::level(), w, rows, cols, x, n, out)
}

pub(crate) fn matmul_f32_with(
    level: Level,
    w: &[f32],
    rows: usize,
    cols: usize,
    x: &[f32],
    n: usize,
    out: &mut [f32],
) -> Result<(), KernelError> {
    check_len(
        "matmul_f32 w",
        checked_product("matmul_f32 w", &[rows, cols])?,
        w.len(),
    )?;
    check_len(
        "matmul_f32 x",
        checked_product("matmul_f32 x", &[n, cols])?,
        x.len(),
    )?;
    let out_len = checked_product("matmul_f32 out", &[n, rows])?;
    check_len("matmul_f32 out", out_len, out.len())?;
    if n == 0 || rows == 0 {
        return Ok(());
    }
    let writer = OutWriter::new(out, rows, n).ok_or(KernelError::LengthMismatch {
        what: "matmul_f32 out",
        expected: out_len,
        actual: 0,
    })?;
    let chunk = gemm::rows_per_task(rows, 1024);
    let macs = rows.saturating_mul(cols).saturating_mul(n);
    gemm::run_tasks(rows.div_ceil(chunk), macs, |c| {
        let r0 = c * chunk;
        let r1 = (r0 + chunk).min(rows);
        // SAFETY: task `c` is the only one writing rows r0..r1.
        unsafe {
            gemm::gemm_rows(
                level,
                &w[r0 * cols..r1 * cols],
                r1 - r0,
                cols,
                x,
                n,
                r0,
                &writer,
            )
        };
    });
    Ok(())
}
