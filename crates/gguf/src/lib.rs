//! GGUF container and the ggml tensor block formats used by DeepSeek V4 Flash files.
//!
//! This crate knows nothing about the model: it reads and writes GGUF files
//! (mmap'd, strictly validated, hostile input gives an error and never a panic),
//! and implements dequantisation and dot products for the block formats the
//! published ds4 files use (F32, F16, BF16, Q8_0, Q2_K, Q4_K, IQ2_XXS, I32),
//! plus multi-threaded matrix-vector / matrix-matrix products over them.
//!
//! Kernels pick AVX2+FMA+F16C code at run time on x86-64 and fall back to
//! portable scalar code elsewhere. Set `DSV4_NO_SIMD=1` to force the scalar
//! code (read once per process), e.g. to rule SIMD out when debugging.
//!
//! Test vectors in `tests/data` come from gguf-py (`tests/oracle/gen_vectors.py`).

pub mod bench;
pub mod container;
pub mod kernels;
pub mod quant;
pub mod types;
pub mod writer;

pub use container::{GgufError, GgufFile, Tensor, TensorInfo, Value};
pub use kernels::{matmul, matmul_q8, matvec, matvec_q8, quantize_acts, QuantizedActs};
pub use quant::{dequantize, dot_f32, quantize_q8_0, read_i32};
pub use types::GgmlType;
pub use writer::GgufWriter;

/// Re-exported so dependants (the CLI benchmarks) share this crate's thread pool type.
pub use rayon;
