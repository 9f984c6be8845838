//! The embedded demo model: a small DeepSeek V4 trained on generated text
//! (tools/demo/, docs/quality.md), compiled into the binary so that `dsv4 run`
//! and `dsv4 chat` print real text from a fresh clone, from any directory,
//! before anyone has downloaded the 80+ GB release. Used only when no model is
//! given and the default `./dsv4flash.gguf` is absent.

use std::sync::Arc;

use anyhow::{Context, Result};
use dsv4_gguf::GgufFile;

/// models/demo-q8.gguf (the converter's q8 recipe of the trained checkpoint).
static DEMO_Q8: &[u8] = include_bytes!("../../../models/demo-q8.gguf");

/// Name shown in messages.
pub const DEMO_NAME: &str = "embedded demo model (models/demo-q8.gguf)";

/// The one-line notice printed (on stderr) whenever the demo model is used.
pub fn notice() -> String {
    format!(
        "dsv4: ./dsv4flash.gguf not found; using the {DEMO_NAME}, a tiny V4 trained on generated text. \
         For the real model: `dsv4 download q2` (or `dsv4 convert --hf DIR --out dsv4flash.gguf`), or pass -m PATH."
    )
}

/// Parses the embedded GGUF (a copy of the bytes: `GgufFile` owns its data).
pub fn open() -> Result<Arc<GgufFile>> {
    Ok(Arc::new(GgufFile::from_bytes(DEMO_Q8.to_vec()).context("parsing the embedded demo model")?))
}
