//! Model tools for dsv4: reading the official DeepSeek V4 Flash safetensors
//! release, converting it to GGUF files in ds4's exact layout with our own
//! quantisers (Q8_0, Q4_K, Q2_K, IQ2_XXS), importance matrices, and a
//! downloader for the published GGUF files that treats everything coming from
//! the network or the user as hostile.
//!
//! The library uses typed errors; the CLI (`dsv4 convert|download|imatrix`)
//! wraps them with anyhow.

pub mod convert;
pub mod download;
pub mod formats;
pub mod gguf_stream;
pub mod imatrix;
pub mod iq2xxs;
pub mod kquants;
pub mod plan;
pub mod safetensors;
pub mod synthetic;

pub use convert::{convert, ConvertError, ConvertOptions, ConvertReport, NoProgress, Progress};
pub use plan::Recipe;

/// Re-exported so the CLI shares this crate's versions.
pub use indicatif;
pub use rayon;
