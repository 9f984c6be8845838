//! DeepSeek V4 text handling: the byte-level BPE tokenizer (built from GGUF
//! metadata or a `tokenizer.json`), the official chat encoding, and the parser
//! for what the model generates (reasoning, content and DSML tool calls).
//!
//! Everything here is exact with respect to DeepSeek's reference: ids match the
//! Hugging Face `tokenizers` library on the official `tokenizer.json`, and
//! prompts match `encoding_dsv4.py` byte for byte (see `shared/spec/chat.md`).

pub mod chat;
pub mod dsml;
pub mod error;
#[cfg(feature = "gguf")]
pub mod gguf_glue;
pub mod hf_json;
pub mod pyjson;
mod pretok;
pub mod stream;
pub mod tokenizer;

pub use error::{ChatError, TokenizerError};
#[cfg(feature = "gguf")]
pub use gguf_glue::tokenizer_metadata;
pub use stream::StreamDecoder;
pub use tokenizer::Tokenizer;

/// Special token strings of DeepSeek V4 (chat.md §1).
pub mod special {
    pub const BOS: &str = "<｜begin▁of▁sentence｜>";
    pub const EOS: &str = "<｜end▁of▁sentence｜>";
    pub const USER: &str = "<｜User｜>";
    pub const ASSISTANT: &str = "<｜Assistant｜>";
    pub const THINK_START: &str = "<think>";
    pub const THINK_END: &str = "</think>";
    pub const DSML: &str = "｜DSML｜";
    pub const LATEST_REMINDER: &str = "<｜latest_reminder｜>";
}
