//! Loading a Hugging Face `tokenizer.json` (the official DeepSeek V4 file or the
//! tiny fixture) into a [`Tokenizer`], and converting it to GGUF-style data.
//!
//! Only the parts that determine ids are read: `model.vocab`, `model.merges`
//! (`"left right"` strings or `[left, right]` pairs) and `added_tokens`. The
//! pre-tokenizer is assumed to be DeepSeek V4's (checked loosely: a `Split`
//! sequence is expected); other models are out of scope.
//!
//! Added tokens become token type 3 (control) when `special`, else 4
//! (user-defined); both are matched atomically, as `tokenizers` does with every
//! added token. Like `tokenizers`, non-normalized added tokens are split out
//! first and normalized ones second (no normaliser exists, so this only matters
//! for overlapping added tokens).

use std::path::Path;

use serde_json::Value;

use crate::error::TokenizerError;
use crate::tokenizer::{token_type, Tokenizer};

/// Plain data extracted from a tokenizer.json, in GGUF form.
#[derive(Debug, Clone)]
pub struct TokenizerData {
    pub tokens: Vec<String>,
    pub merges: Vec<String>,
    pub token_types: Vec<i32>,
    pub bos: u32,
    pub eos: u32,
    /// Ids of added tokens with `normalized: false` (first matching pass).
    pub atomic_unnormalized: Vec<u32>,
    /// Ids of added tokens with `normalized: true` (second matching pass).
    pub atomic_normalized: Vec<u32>,
}

fn err(msg: impl Into<String>) -> TokenizerError {
    TokenizerError::Json(msg.into())
}

/// Parses tokenizer.json text into GGUF-style data. BOS/EOS are the added tokens
/// `<｜begin▁of▁sentence｜>` / `<｜end▁of▁sentence｜>` when present, else ids 0 / 1.
pub fn parse_tokenizer_json(text: &str) -> Result<TokenizerData, TokenizerError> {
    let root: Value = serde_json::from_str(text).map_err(|e| err(e.to_string()))?;
    let model = root.get("model").ok_or_else(|| err("no `model`"))?;
    if let Some(t) = model.get("type").and_then(Value::as_str) {
        if t != "BPE" {
            return Err(err(format!("model type {t:?} is not BPE")));
        }
    }
    let vocab = model.get("vocab").and_then(Value::as_object).ok_or_else(|| err("no `model.vocab` object"))?;
    let mut entries: Vec<(u32, String, i32)> = Vec::with_capacity(vocab.len() + 2048);
    for (s, id) in vocab {
        let id = id.as_u64().filter(|&i| i < u32::MAX as u64).ok_or_else(|| err(format!("bad id for {s:?}")))?;
        entries.push((id as u32, s.clone(), token_type::NORMAL));
    }
    let mut unnorm = Vec::new();
    let mut norm = Vec::new();
    if let Some(added) = root.get("added_tokens").and_then(Value::as_array) {
        for a in added {
            let id = a.get("id").and_then(Value::as_u64).filter(|&i| i < u32::MAX as u64).ok_or_else(|| err("added token without id"))? as u32;
            let content = a.get("content").and_then(Value::as_str).ok_or_else(|| err("added token without content"))?;
            let special = a.get("special").and_then(Value::as_bool).unwrap_or(false);
            let normalized = a.get("normalized").and_then(Value::as_bool).unwrap_or(!special);
            let ty = if special { token_type::CONTROL } else { token_type::USER_DEFINED };
            entries.push((id, content.to_string(), ty));
            if normalized {
                norm.push(id);
            } else {
                unnorm.push(id);
            }
        }
    }
    let n = entries.iter().map(|e| e.0 as usize + 1).max().unwrap_or(0);
    if n > 16 << 20 {
        return Err(err(format!("token id {} too large", n - 1)));
    }
    let mut tokens = vec![String::new(); n];
    let mut types = vec![token_type::UNUSED; n];
    // Added tokens come after the vocab entries, so they override an entry of
    // the same id (ids 0..2 are in both in the official file).
    for (id, s, ty) in entries {
        tokens[id as usize] = s;
        types[id as usize] = ty;
    }
    let merges_v = model.get("merges").and_then(Value::as_array).ok_or_else(|| err("no `model.merges` array"))?;
    let mut merges = Vec::with_capacity(merges_v.len());
    for m in merges_v {
        match m {
            Value::String(s) => merges.push(s.clone()),
            Value::Array(p) if p.len() == 2 => match (p[0].as_str(), p[1].as_str()) {
                (Some(a), Some(b)) => merges.push(format!("{a} {b}")),
                _ => return Err(err("merge pair is not two strings")),
            },
            _ => return Err(err("merge is neither a string nor a pair")),
        }
    }
    let find = |name: &str, default: u32| tokens.iter().position(|t| t == name).map_or(default, |i| i as u32);
    let bos = find("<｜begin▁of▁sentence｜>", 0);
    let eos = find("<｜end▁of▁sentence｜>", 1);
    Ok(TokenizerData { tokens, merges, token_types: types, bos, eos, atomic_unnormalized: unnorm, atomic_normalized: norm })
}

impl Tokenizer {
    /// Loads a Hugging Face `tokenizer.json`.
    pub fn from_tokenizer_json(path: impl AsRef<Path>) -> Result<Self, TokenizerError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| TokenizerError::Io { path: path.display().to_string(), source })?;
        Self::from_tokenizer_json_str(&text)
    }

    /// Loads a Hugging Face `tokenizer.json` from its text.
    pub fn from_tokenizer_json_str(text: &str) -> Result<Self, TokenizerError> {
        let d = parse_tokenizer_json(text)?;
        let mut tok = Tokenizer::new(d.tokens, d.merges, d.token_types, d.bos, d.eos)?;
        tok.set_atomic_groups(&[d.atomic_unnormalized, d.atomic_normalized])?;
        Ok(tok)
    }
}
