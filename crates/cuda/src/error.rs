//! CUDA backend errors; converted to `EngineError::Backend` at the trait boundary.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum CudaError {
    #[error("CUDA is not usable here: {0}")]
    Unavailable(String),
    #[error("CUDA driver: {0}")]
    Driver(String),
    #[error("kernel compilation (NVRTC): {0}")]
    Nvrtc(String),
    #[error("GPU out of memory: asked for {asked} bytes, {free} free of {total} ({detail})")]
    OutOfMemory { asked: usize, free: usize, total: usize, detail: String },
    #[error("{0}")]
    Unsupported(String),
    #[error(transparent)]
    Engine(#[from] dsv4_engine::EngineError),
}

pub type Result<T> = std::result::Result<T, CudaError>;

impl From<CudaError> for dsv4_engine::EngineError {
    fn from(e: CudaError) -> Self {
        match e {
            CudaError::Engine(e) => e,
            other => dsv4_engine::EngineError::Backend(other.to_string()),
        }
    }
}
