//! Typed errors of the text crate: tokenizer construction, chat encoding and
//! DSML parsing each get their own enum so callers can tell them apart.

use thiserror::Error;

/// Errors building a [`crate::Tokenizer`] (never raised by encoding or decoding).
#[derive(Debug, Error)]
pub enum TokenizerError {
    #[error("reading {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("tokenizer.json: {0}")]
    Json(String),
    #[error("GGUF tokenizer metadata: {0}")]
    Gguf(String),
    #[error("token_types has {types} entries but there are {tokens} tokens")]
    TypeCountMismatch { tokens: usize, types: usize },
    #[error("merge #{index} {merge:?} is not of the form \"left right\" with both parts and their concatenation in the vocabulary")]
    BadMerge { index: usize, merge: String },
    #[error("byte-level alphabet incomplete: no token for byte 0x{0:02x}")]
    MissingByte(u8),
    #[error("token id {id} out of range for a vocabulary of {vocab} tokens")]
    IdOutOfRange { id: u32, vocab: usize },
    #[error("building the added-token matcher: {0}")]
    Matcher(String),
}

/// Errors rendering a conversation with [`crate::chat::encode_messages`].
#[derive(Debug, Error, PartialEq)]
pub enum ChatError {
    #[error("message {index}: unknown role {role:?}")]
    UnknownRole { index: usize, role: String },
    #[error("message {index}: a developer message needs non-empty content")]
    EmptyDeveloper { index: usize },
    #[error("message {index}: unknown task {task:?} (expected action, query, authority, domain, title or read_url)")]
    UnknownTask { index: usize, task: String },
    #[error("message {index}: tool {tool}: no `function` object")]
    BadTool { index: usize, tool: usize },
    #[error("invalid messages JSON: {0}")]
    Json(String),
}
