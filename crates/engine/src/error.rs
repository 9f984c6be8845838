//! Engine errors: one enum, typed, so the CLI and server can map them (e.g. to
//! HTTP status codes) in one place.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum EngineError {
    #[error(transparent)]
    Gguf(#[from] dsv4_gguf::GgufError),
    #[error("model config: {0}")]
    Config(String),
    #[error("model weights: {0}")]
    Weights(String),
    #[error("invalid input: {0}")]
    Input(String),
    #[error("context full: position {pos} is past the context size {ctx}")]
    ContextFull { pos: usize, ctx: usize },
    #[error("backend: {0}")]
    Backend(String),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

pub type Result<T> = std::result::Result<T, EngineError>;
