//! A small random-weight model GGUF that carries the **real** DeepSeek V4
//! tokenizer (129,280 ids), built at test time from the tiny-q2 fixture.
//!
//! Same metadata as tiny-q2 except `deepseek4.vocab_size` = 129280 and the
//! `tokenizer.ggml.*` keys, which come from `shared/tokenizer/tokenizer.json`.
//! Same tensors except the three with a vocabulary dimension, extended from 512
//! to 129,280 rows, deterministically:
//! * `token_embd.weight` (F16 [dim, vocab]) and `blk.{0,1,2}.ffn_gate_tid2eid.weight`
//!   (I32 [n_used, vocab]): row r = original row r % 512 (embeddings keep the
//!   fixture's shared-mean structure; expert ids stay valid and distinct);
//! * `output.weight` (Q8_0 [dim, vocab]): rows < 512 unchanged; row r >= 512
//!   keeps the block scales of row r % 512 with fresh pseudo-random quants, so
//!   every id has its own logit (no argmax ties between copies) and greedy
//!   decoding can land anywhere in the real vocabulary, specials included.
//!
//! The file (~100 MB) is written once per test process to a fixed path under
//! `CARGO_TARGET_TMPDIR` (atomically, so concurrent test binaries are safe; a
//! static tempdir would never be dropped and would leak a file per run).
//! Shared by the engine and CLI tests (`#[path]`-included by the latter).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use dsv4_gguf::{GgmlType, GgufFile, GgufWriter, Value};

pub const VOCAB: usize = 129_280;
pub const BOS: u32 = 0;
pub const EOS: u32 = 1;
pub const USER: u32 = 128_803;
pub const ASSISTANT: u32 = 128_804;
pub const THINK: u32 = 128_821;
pub const THINK_END: u32 = 128_822;
pub const DSML: u32 = 128_825;

/// `/work/shared` seen from a crate of this workspace.
pub fn shared() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared")
}

pub fn tokenizer_json() -> PathBuf {
    shared().join("tokenizer/tokenizer.json")
}

pub fn base_fixture() -> PathBuf {
    shared().join("fixtures/tiny-q2/model.gguf")
}

/// Path of the real-tokenizer model, built on first use in this process.
pub fn model_path() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("realtok");
        std::fs::create_dir_all(&dir).expect("creating the test model directory");
        let path = dir.join("tiny-q2-realtok.gguf");
        build(&base_fixture(), &tokenizer_json(), &path);
        path
    })
}

/// splitmix64: deterministic quants for the extra output rows.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Repeats `data`'s rows (of `row_bytes`) cyclically up to `rows` rows.
fn cycle_rows(data: &[u8], row_bytes: usize, rows: usize) -> Vec<u8> {
    let n = data.len() / row_bytes;
    let mut out = Vec::with_capacity(rows * row_bytes);
    for r in 0..rows {
        out.extend_from_slice(&data[(r % n) * row_bytes..(r % n + 1) * row_bytes]);
    }
    out
}

/// Q8_0 output head: original rows, then rows with the scales of row r % n and fresh quants.
fn extend_q8_0_head(data: &[u8], row_bytes: usize, rows: usize) -> Vec<u8> {
    let bb = GgmlType::Q8_0.block_bytes();
    assert_eq!(bb, 34);
    assert_eq!(row_bytes % bb, 0);
    let mut out = cycle_rows(data, row_bytes, rows);
    let n = data.len() / row_bytes;
    for r in n..rows {
        let row = &mut out[r * row_bytes..(r + 1) * row_bytes];
        for (b, block) in row.chunks_exact_mut(bb).enumerate() {
            // block = f16 scale, 32 x i8; a triangular distribution in [-126, 126]
            let mut h = mix(((r as u64) << 20) ^ b as u64);
            for j in 0..32 {
                if j % 4 == 0 && j > 0 {
                    h = mix(h);
                }
                let a = ((h >> ((j % 4) * 16)) & 0xff) as i32 % 127;
                let c = ((h >> ((j % 4) * 16 + 8)) & 0xff) as i32 % 127;
                block[2 + j] = (a - c) as i8 as u8;
            }
        }
    }
    out
}

/// Writes the real-tokenizer model built from `base` (a tiny fixture GGUF) to `out`.
pub fn build(base: &Path, tokenizer_json: &Path, out: &Path) {
    let f = GgufFile::open(base).unwrap_or_else(|e| panic!("{}: {e}", base.display()));
    let tok_kv = dsv4_text::gguf_glue::tokenizer_metadata_from_json(tokenizer_json).expect("tokenizer.json");
    let n_tokens = tok_kv
        .iter()
        .find(|(k, _)| k == "tokenizer.ggml.tokens")
        .and_then(|(_, v)| v.as_array())
        .map(|a| a.len())
        .expect("tokens");
    assert_eq!(n_tokens, VOCAB, "the real tokenizer has {VOCAB} ids");
    let old_vocab = f.get("deepseek4.vocab_size").and_then(Value::as_u64).expect("vocab_size") as usize;

    let mut w = GgufWriter::new();
    for (k, v) in f.metadata() {
        if k.starts_with("tokenizer.ggml.") {
            continue;
        }
        let v = match k.as_str() {
            "deepseek4.vocab_size" => Value::U32(VOCAB as u32),
            "general.name" => Value::String("tiny-q2 with the real DeepSeek V4 tokenizer (test model)".into()),
            _ => v.clone(),
        };
        w.add_kv(k.clone(), v).unwrap();
    }
    for (k, v) in tok_kv {
        w.add_kv(k, v).unwrap();
    }

    for t in f.tensor_infos() {
        let data = f.tensor_of(t).data;
        let vocab_rows = t.name == "token_embd.weight" || t.name == "output.weight" || t.name.ends_with(".ffn_gate_tid2eid.weight");
        if !vocab_rows {
            w.add_tensor(t.name.clone(), t.ty, &t.ne, data.to_vec()).unwrap();
            continue;
        }
        assert_eq!(t.ne.len(), 2, "{}", t.name);
        assert_eq!(t.ne[1] as usize, old_vocab, "{}: rows are the vocabulary", t.name);
        let row_bytes = data.len() / old_vocab;
        let bytes = match (t.name.as_str(), t.ty) {
            ("output.weight", GgmlType::Q8_0) => extend_q8_0_head(data, row_bytes, VOCAB),
            ("output.weight", ty) => panic!("output.weight is {ty}, expected Q8_0"),
            _ => cycle_rows(data, row_bytes, VOCAB),
        };
        w.add_tensor(t.name.clone(), t.ty, &[t.ne[0], VOCAB as u64], bytes).unwrap();
    }
    // write_file: temp sibling + fsync + rename, so a concurrent reader never sees half a file
    w.write_file(out).unwrap_or_else(|e| panic!("writing {}: {e}", out.display()));
}
