//! dsv4-engine: the DeepSeek V4 Flash model.
//!
//! `Config` (shape from GGUF metadata) → `Weights` (tensor binding) → `Model`
//! (CPU reference forward pass over `ops`, the pure per-step functions that the
//! CUDA backend is tested against). No async, no HTTP: the server and CLI sit on
//! top of this crate.

pub mod backend;
pub mod config;
pub mod error;
pub mod fixture;
pub mod model;
pub mod ops;
pub mod pack;
pub mod sampler;
pub mod session;
pub mod kvdisk;
pub mod state_io;
pub mod weights;

pub use backend::{Backend, CpuBackend, Snapshot, SnapshotKind};
pub use config::Config;
pub use error::{EngineError, Result};
pub use model::{EvalOutput, ExpertObserver, Model, Numerics, State, Want};
