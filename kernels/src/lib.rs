//! CPU compute kernels for pagoda: quantized and dense matrix products,
//! paged attention with an online softmax, RMS norm, rotary embeddings and
//! SwiGLU gating.
//!
//! Every kernel validates its arguments and returns [`KernelError`] on a
//! shape or format mismatch. Hot loops dispatch at run time to AVX2/FMA code
//! on x86-64 machines that support it and otherwise run portable Rust that
//! the compiler vectorises for the target's baseline. Parallel kernels run on
//! the kernels' own thread pool ([`pool`]). Setting `PAGODA_KERNELS_SCALAR=1` in the environment
//! forces the portable path (useful when chasing a numerical difference);
//! `PAGODA_KERNELS_INT8` picks the int8 kernel of quantized products ([`int8`]).

pub mod attention;
pub mod dense;
mod error;
mod gemm;
pub mod int8;
pub mod ops;
mod packed;
pub mod pool;
pub mod quant;
mod simd;
#[cfg(test)]
mod unit_tests;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use error::KernelError;
