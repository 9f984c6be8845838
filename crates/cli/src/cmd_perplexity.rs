//! `dsv4 perplexity`: token-level average negative log-likelihood of a text
//! file, the quality check that needs real text (docs/quality.md). The text is
//! tokenized with the model's own tokenizer and cut into windows of `--ctx`
//! tokens, each starting with BOS on a fresh state (so the number does not
//! depend on the context length the model was trained for); every token after
//! the BOS is scored given its window prefix. tools/demo/check.py computes the
//! same number with the PyTorch model, window for window.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use dsv4_engine::model::Want;
use dsv4_engine::Model;
use dsv4_gguf::GgufFile;
use dsv4_text::Tokenizer;

#[derive(Args, Debug)]
pub struct PerplexityArgs {
    /// Model GGUF; `demo` = the embedded demo model.
    #[arg(short = 'm', long)]
    pub model: String,
    /// UTF-8 text file to score.
    #[arg(long)]
    pub file: PathBuf,
    /// Window length in tokens, BOS included.
    #[arg(long, default_value_t = 128)]
    pub ctx: usize,
    /// Quantise activations to 8 bits for quantised-weight dot products (ds4's CPU numerics).
    #[arg(long)]
    pub q8: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: PerplexityArgs) -> Result<()> {
    if a.ctx < 2 {
        bail!("--ctx must be at least 2 (BOS plus one scored token)");
    }
    let file = if a.model == "demo" {
        crate::demo::open()?
    } else {
        Arc::new(GgufFile::open(std::path::Path::new(&a.model)).with_context(|| format!("opening {}", a.model))?)
    };
    let tok = Tokenizer::from_gguf(&file).map_err(|e| anyhow!("tokenizer: {e}"))?;
    let mut model = Model::from_gguf(file, None).context("loading the model")?;
    if a.q8 {
        model.numerics = dsv4_engine::Numerics::Q8;
    }
    let text = std::fs::read_to_string(&a.file).with_context(|| format!("reading {}", a.file.display()))?;
    let ids = tok.encode(&text);
    if ids.is_empty() {
        bail!("{} has no tokens", a.file.display());
    }
    let bos = tok.bos_id();
    let vocab = model.cfg.vocab;
    let t0 = std::time::Instant::now();
    let (mut nll, mut n) = (0.0f64, 0usize);
    for win in ids.chunks(a.ctx - 1) {
        let mut seq = Vec::with_capacity(win.len() + 1);
        seq.push(bos);
        seq.extend_from_slice(win);
        let mut st = model.new_state();
        let out = model.eval(&mut st, &seq, Want { all_logits: true, hidden: false })?;
        for (i, &target) in seq[1..].iter().enumerate() {
            let row = &out.logits[i * vocab..(i + 1) * vocab];
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = max + row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
            nll += lse - row[target as usize] as f64;
            n += 1;
        }
    }
    let mean = nll / n as f64;
    let secs = t0.elapsed().as_secs_f64();
    if a.json {
        let doc = serde_json::json!({"model": a.model, "file": a.file.display().to_string(), "ctx": a.ctx,
            "tokens": n, "mean_nll": mean, "perplexity": mean.exp(), "seconds": secs});
        println!("{doc}");
    } else {
        println!("{}: {} tokens scored (windows of {}), mean NLL {:.6} nats, perplexity {:.4} ({:.1} s)",
            a.file.display(), n, a.ctx, mean, mean.exp(), secs);
    }
    Ok(())
}
