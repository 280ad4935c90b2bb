//! The error type shared by every kernel in this crate.

use std::fmt;

/// Why a kernel refused its arguments.
///
/// Kernels validate shapes and buffer lengths up front and report a mismatch
/// instead of panicking, so a malformed model file or a bad batch description
/// surfaces as an error the caller can log and recover from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelError {
    /// A buffer does not have the length its shape implies.
    LengthMismatch {
        /// Which buffer (for example `"x"` or `"k_cache"`).
        what: &'static str,
        /// The length the shape requires.
        expected: usize,
        /// The length that was passed.
        actual: usize,
    },
    /// A dimension or a combination of dimensions is not supported.
    InvalidShape {
        /// Which argument.
        what: &'static str,
        /// A human-readable explanation.
        reason: String,
    },
    /// An index (row, slot, block id, position) lies outside its range.
    OutOfRange {
        /// What kind of index.
        what: &'static str,
        /// The offending value.
        index: usize,
        /// The exclusive upper bound it had to respect.
        bound: usize,
    },
}

impl fmt::Display for KernelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KernelError::LengthMismatch {
                what,
                expected,
                actual,
            } => write!(
                f,
                "length mismatch for {what}: expected {expected} elements, got {actual}"
            ),
            KernelError::InvalidShape { what, reason } => {
                write!(f, "invalid shape for {what}: {reason}")
            }
            KernelError::OutOfRange { what, index, bound } => {
                write!(f, "{what} {index} out of range (must be < {bound})")
            }
        }
    }
}

impl std::error::Error for KernelError {}

/// Return a [`KernelError::LengthMismatch`] unless `actual == expected`.
pub(crate) fn check_len(
    what: &'static str,
    expected: usize,
    actual: usize,
) -> Result<(), KernelError> {
    if expected == actual {
        Ok(())
    } else {
        Err(KernelError::LengthMismatch {
            what,
            expected,
            actual,
        })
    }
}

/// Multiply dimensions, reporting overflow as an invalid shape.
pub(crate) fn checked_product(what: &'static str, dims: &[usize]) -> Result<usize, KernelError> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| KernelError::InvalidShape {
            what,
            reason: format!("dimensions {dims:?} overflow usize"),
        })
}
