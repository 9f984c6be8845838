//! `dsv4 logits`: evaluate a fixture's tokens.json and write the logits files in
//! the fixture's layout, so anyone can diff the engine against a reference.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use dsv4_engine::fixture::{self, Tokens};
use dsv4_engine::{Model, Numerics};

#[derive(Args)]
pub struct LogitsArgs {
    /// Model GGUF (main model; may also carry the MTP block `mtp.0.*`).
    #[arg(long, short = 'm')]
    pub model: PathBuf,
    /// Separate MTP GGUF (ds4 ships `mtp.0.*` in its own file).
    #[arg(long)]
    pub mtp: Option<PathBuf>,
    /// tokens.json in the fixture format (prompt, decode, sequence, mtp).
    #[arg(long)]
    pub tokens: PathBuf,
    /// Output folder (created).
    #[arg(long)]
    pub out: PathBuf,
    /// Prefill chunk size (0 = whole prompt in one call).
    #[arg(long, default_value_t = 0)]
    pub chunk: usize,
    /// Backend: cpu (the reference), cuda, or auto.
    #[arg(long, default_value = "cpu")]
    pub backend: String,
    /// Quantise activations to 8 bits for quantised-weight dot products (ds4's CPU numerics).
    #[arg(long)]
    pub q8: bool,
    /// Precision of the RoPE dims of compressed KV rows in the state: f32 (exact
    /// vs the f32 reference) or bf16 (the official cache precision; logits change slightly).
    #[arg(long, default_value = "f32", value_name = "f32|bf16")]
    pub kv_rope: dsv4_engine::pack::RopeStore,
    /// Also compare with the reference files in this fixture folder and print statistics.
    #[arg(long)]
    pub compare: Option<PathBuf>,
}

pub fn run(a: LogitsArgs) -> Result<()> {
    let mut model = Model::load_with_mtp(&a.model, a.mtp.as_deref()).with_context(|| format!("loading {}", a.model.display()))?;
    if a.q8 {
        model.numerics = Numerics::Q8;
    }
    model.kv_rope = a.kv_rope;
    let model = Arc::new(model);
    let tokens = Tokens::load(&a.tokens)?;
    let ctx = tokens.sequence.len().max(tokens.prompt.len()) + 16;
    let mut be = crate::backends::make(&a.backend, model.clone(), ctx)?;
    let out = fixture::run(be.as_mut(), &tokens, a.chunk, true, model.has_mtp())?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let files: [(&str, &Vec<f32>); 5] = [
        ("logits_prefill_last.f32", &out.prefill_last),
        ("logits_decode.f32", &out.decode),
        ("logits_stepwise.f32", &out.stepwise),
        ("hidden_final.f32", &out.hidden),
        ("mtp_logits.f32", &out.mtp),
    ];
    for (name, v) in files {
        if name == "mtp_logits.f32" && v.is_empty() {
            continue;
        }
        fixture::write_f32(&a.out.join(name), v)?;
    }
    eprintln!("wrote logits for {} prompt + {} decode tokens to {}", tokens.prompt.len(), tokens.decode.len(), a.out.display());
    if let Some(dir) = &a.compare {
        let vocab = be.config().vocab;
        for (name, v) in files {
            if name == "hidden_final.f32" || v.is_empty() {
                continue;
            }
            let want = fixture::read_f32(&dir.join(name))?;
            let s = fixture::compare(v, &want, vocab)?;
            println!(
                "{name:26} rows {:3}  max_abs {:.3e}  mean_abs {:.3e}  median_cos {:.6}  top1 {:.3}",
                s.rows, s.max_abs, s.mean_abs, s.median_row_cosine, s.top1_agreement
            );
        }
    }
    Ok(())
}
