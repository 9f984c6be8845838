//! GGUF glue: building a [`Tokenizer`] from `tokenizer.ggml.*` metadata, and
//! producing that metadata from a tokenizer (tests and converters need GGUFs
//! that carry the real vocabulary).
//!
//! Keys read: `tokenizer.ggml.tokens` (required), `.merges` (required),
//! `.token_type` (optional; absent = all normal), `.bos_token_id` /
//! `.eos_token_id` (optional; else looked up by the DeepSeek token strings,
//! else 0 / 1). Types 3 (control) and 4 (user-defined) are matched atomically.
//! Keys written: the same plus `.model = "gpt2"`, `.pre = "joyai-llm"` (the id
//! ds4's files carry), `.padding_token_id` (when `<｜▁pad▁｜>` exists) and
//! `.add_bos_token = false`. A tokenizer.json's added tokens are written with
//! type 3 when `special`, else 4.

use std::path::Path;

use dsv4_gguf::{GgufFile, Value};

use crate::error::TokenizerError;
use crate::hf_json::parse_tokenizer_json;
use crate::special::{BOS, EOS};
use crate::tokenizer::Tokenizer;

fn gerr(msg: impl Into<String>) -> TokenizerError {
    TokenizerError::Gguf(msg.into())
}

fn string_array(file: &GgufFile, key: &str) -> Result<Vec<String>, TokenizerError> {
    let arr = file.get(key).ok_or_else(|| gerr(format!("missing {key}")))?.as_array().ok_or_else(|| gerr(format!("{key} is not an array")))?;
    arr.iter()
        .enumerate()
        .map(|(i, v)| v.as_str().map(str::to_string).ok_or_else(|| gerr(format!("{key}[{i}] is not a string"))))
        .collect()
}

impl Tokenizer {
    /// Builds the tokenizer from a GGUF's `tokenizer.ggml.*` metadata.
    pub fn from_gguf(file: &GgufFile) -> Result<Self, TokenizerError> {
        let tokens = string_array(file, "tokenizer.ggml.tokens")?;
        let merges = string_array(file, "tokenizer.ggml.merges")?;
        let types = match file.get("tokenizer.ggml.token_type") {
            None => Vec::new(),
            Some(v) => v
                .as_array()
                .ok_or_else(|| gerr("tokenizer.ggml.token_type is not an array"))?
                .iter()
                .enumerate()
                .map(|(i, x)| x.as_i64().and_then(|x| i32::try_from(x).ok()).ok_or_else(|| gerr(format!("token_type[{i}] is not an integer"))))
                .collect::<Result<Vec<i32>, _>>()?,
        };
        let lookup = |name: &str, default: u32| tokens.iter().position(|t| t == name).map_or(default, |i| i as u32);
        let id_key = |key: &str| file.get(key).and_then(Value::as_u32);
        let bos = id_key("tokenizer.ggml.bos_token_id").unwrap_or_else(|| lookup(BOS, 0));
        let eos = id_key("tokenizer.ggml.eos_token_id").unwrap_or_else(|| lookup(EOS, 1));
        Tokenizer::new(tokens, merges, types, bos, eos)
    }

    /// Opens a GGUF file and builds its tokenizer.
    pub fn from_gguf_path(path: impl AsRef<Path>) -> Result<Self, TokenizerError> {
        let path = path.as_ref();
        let file = GgufFile::open(path).map_err(|e| gerr(format!("{}: {e}", path.display())))?;
        Self::from_gguf(&file)
    }
}

/// The `tokenizer.ggml.*` metadata entries describing `tok`.
pub fn tokenizer_metadata(tok: &Tokenizer) -> Vec<(String, Value)> {
    let strings = |v: Vec<String>| Value::Array(v.into_iter().map(Value::String).collect());
    let mut kv = vec![
        ("tokenizer.ggml.model".to_string(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".to_string(), Value::String("joyai-llm".into())),
        ("tokenizer.ggml.tokens".to_string(), strings(tok.tokens().to_vec())),
        ("tokenizer.ggml.token_type".to_string(), Value::Array(tok.token_types().iter().map(|&t| Value::I32(t)).collect())),
        ("tokenizer.ggml.merges".to_string(), strings(tok.merges())),
        ("tokenizer.ggml.bos_token_id".to_string(), Value::U32(tok.bos_id())),
        ("tokenizer.ggml.eos_token_id".to_string(), Value::U32(tok.eos_id())),
    ];
    if let Some(pad) = tok.token_id("<｜▁pad▁｜>") {
        kv.push(("tokenizer.ggml.padding_token_id".to_string(), Value::U32(pad)));
    }
    kv.push(("tokenizer.ggml.add_bos_token".to_string(), Value::Bool(false)));
    kv
}

/// The metadata for a `tokenizer.json` file (merges kept in the file's order).
pub fn tokenizer_metadata_from_json(path: impl AsRef<Path>) -> Result<Vec<(String, Value)>, TokenizerError> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|source| TokenizerError::Io { path: path.display().to_string(), source })?;
    // Validate by building, then describe.
    let d = parse_tokenizer_json(&text)?;
    let tok = Tokenizer::new(d.tokens, d.merges, d.token_types, d.bos, d.eos)?;
    Ok(tokenizer_metadata(&tok))
}
