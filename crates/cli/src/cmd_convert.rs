//! `dsv4 convert`, `dsv4 download` and `dsv4 imatrix`: thin wrappers over
//! dsv4-tools that parse arguments, draw progress bars and print a summary.
//! All the work (and all validation) lives in the library.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use dsv4_tools::download::{self, DownloadOptions, DownloadProgress, Target};
use dsv4_tools::indicatif::{ProgressBar, ProgressStyle};
use dsv4_tools::{ConvertOptions, Progress, Recipe};

#[derive(Args)]
pub struct ConvertArgs {
    /// Directory of the official release (config.json, tokenizer.json, *.safetensors).
    #[arg(long)]
    pub hf: PathBuf,
    /// Output GGUF file (written as OUT.tmp, renamed when complete).
    #[arg(long)]
    pub out: PathBuf,
    /// q2 | q4 | q8 | f16
    #[arg(long, default_value = "q4")]
    pub recipe: String,
    /// llama.cpp legacy .dat importance matrix (used by the IQ2_XXS experts of q2).
    #[arg(long)]
    pub imatrix: Option<PathBuf>,
    /// Write the MTP block to this separate GGUF (as ds4 expects) instead of OUT.
    #[arg(long)]
    pub mtp_out: Option<PathBuf>,
    /// Leave the MTP block out.
    #[arg(long)]
    pub no_mtp: bool,
    /// Continue an interrupted conversion from OUT.tmp.
    #[arg(long)]
    pub resume: bool,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Args)]
pub struct DownloadArgs {
    /// q2 | q4 | q2-imatrix | q4-imatrix | mtp
    pub what: String,
    #[arg(long, default_value = download::DEFAULT_REPO)]
    pub repo: String,
    #[arg(long, default_value = "./gguf")]
    pub dir: PathBuf,
    /// Hugging Face token (else HF_TOKEN, else the local token file).
    #[arg(long)]
    pub token: Option<String>,
    /// Exact file name in the repository, instead of matching by kind.
    #[arg(long)]
    pub file: Option<String>,
    #[arg(long, default_value = "main")]
    pub revision: String,
    /// Symlink to point at the result (default ./dsv4flash.gguf, ./dsv4flash-mtp.gguf for mtp).
    #[arg(long)]
    pub link: Option<PathBuf>,
    /// Hub base URL (also HF_ENDPOINT).
    #[arg(long)]
    pub endpoint: Option<String>,
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Args)]
pub struct ImatrixArgs {
    /// Model GGUF.
    #[arg(short = 'm', long)]
    pub model: PathBuf,
    /// Text file of calibration prompts.
    #[arg(long)]
    pub dataset: PathBuf,
    /// Output .dat file (llama.cpp legacy format).
    #[arg(long)]
    pub out: PathBuf,
    /// Tokens per chunk: the dataset is cut into chunks of CHUNK−1 tokens, each
    /// evaluated from an empty state after a BOS token (as llama.cpp's imatrix).
    #[arg(long, default_value_t = 512)]
    pub chunk: usize,
    /// Skip the MTP block. By default, when the model has one, it runs on every
    /// position so that its routed experts (`mtp.0.*`) get statistics too.
    #[arg(long)]
    pub no_mtp: bool,
}

struct Bar(Option<ProgressBar>);

impl Progress for Bar {
    fn begin(&self, total: u64) {
        if let Some(b) = &self.0 {
            b.set_length(total);
        }
    }
    fn advance(&self, n: u64, tensor: &str) {
        if let Some(b) = &self.0 {
            b.inc(n);
            b.set_message(tensor.to_string());
        }
    }
    fn finish(&self) {
        if let Some(b) = &self.0 {
            b.finish_and_clear();
        }
    }
}

impl DownloadProgress for Bar {
    fn file(&self, name: &str, size: u64, already: u64) {
        if let Some(b) = &self.0 {
            b.set_length(size);
            b.set_position(already);
            b.set_message(name.to_string());
        }
    }
    fn bytes(&self, n: u64) {
        if let Some(b) = &self.0 {
            b.inc(n);
        }
    }
    fn done(&self) {
        if let Some(b) = &self.0 {
            b.finish_and_clear();
        }
    }
}

fn bar(quiet: bool) -> Bar {
    if quiet {
        return Bar(None);
    }
    let b = ProgressBar::new(0);
    b.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {bytes_per_sec} eta {eta} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    b.enable_steady_tick(Duration::from_millis(250));
    Bar(Some(b))
}

pub fn convert(a: ConvertArgs) -> Result<()> {
    let recipe = Recipe::parse(&a.recipe).ok_or_else(|| anyhow!("unknown recipe {:?} (q2, q4, q8 or f16)", a.recipe))?;
    if let Some(n) = a.threads {
        dsv4_tools::rayon::ThreadPoolBuilder::new().num_threads(n.max(1)).build_global().ok();
    }
    let opts = ConvertOptions {
        hf_dir: a.hf,
        out: a.out,
        recipe,
        imatrix: a.imatrix,
        mtp_out: a.mtp_out,
        no_mtp: a.no_mtp,
        resume: a.resume,
        name: None,
    };
    let r = dsv4_tools::convert::convert_and_verify(&opts, &bar(a.quiet)).context("conversion failed")?;
    eprintln!(
        "wrote {} ({} tensors{}, {:.2} GB from {:.2} GB of safetensors) in {:.1} s",
        opts.out.display(),
        r.tensors,
        if r.resumed_at > 0 { format!(", resumed after {}", r.resumed_at) } else { String::new() },
        r.bytes_out as f64 / 1e9,
        r.bytes_in as f64 / 1e9,
        r.seconds
    );
    Ok(())
}

pub fn download(a: DownloadArgs) -> Result<()> {
    let target = Target::parse(&a.what).ok_or_else(|| anyhow!("unknown kind {:?} (q2, q4, q2-imatrix, q4-imatrix or mtp)", a.what))?;
    let token = download::resolve_token(a.token.as_deref())?;
    let endpoint = a.endpoint.or_else(|| std::env::var("HF_ENDPOINT").ok()).unwrap_or_else(|| download::DEFAULT_ENDPOINT.to_string());
    let opts = DownloadOptions {
        target,
        repo: a.repo,
        revision: a.revision,
        dir: a.dir,
        token,
        endpoint,
        file: a.file,
        link: Some(a.link.unwrap_or_else(|| PathBuf::from(target.default_link()))),
        max_retries: 8,
        max_backoff: Duration::from_secs(60),
    };
    let paths = download::download(&opts, &bar(a.quiet))?;
    for p in &paths {
        eprintln!("verified {}", p.display());
    }
    if let Some(l) = &opts.link {
        eprintln!("{} -> {}", l.display(), paths.first().map(|p| p.display().to_string()).unwrap_or_default());
    }
    Ok(())
}

/// `dsv4 imatrix`: tokenises the dataset with the model's own tokenizer, runs
/// it chunk by chunk through the CPU engine with an expert observer attached
/// (`Model::observer`), and writes the collected Σx² per expert input column as
/// a llama.cpp legacy `.dat` (written as OUT.tmp, renamed when complete).
pub fn imatrix(a: ImatrixArgs) -> Result<()> {
    use std::sync::{Arc, Mutex};

    use dsv4_engine::{Backend, CpuBackend, Model, Want};
    use dsv4_tools::imatrix::Collector;

    if a.chunk < 2 {
        bail!("--chunk must be at least 2 (a BOS token and one dataset token)");
    }
    let text = std::fs::read_to_string(&a.dataset).with_context(|| format!("reading the dataset {}", a.dataset.display()))?;
    let file = Arc::new(dsv4_gguf::GgufFile::open(&a.model).with_context(|| format!("opening {}", a.model.display()))?);
    let tok = dsv4_text::Tokenizer::from_gguf(&file).with_context(|| format!("tokenizer of {}", a.model.display()))?;
    let tokens = tok.encode(&text);
    if tokens.is_empty() {
        bail!("the dataset {} has no tokens", a.dataset.display());
    }
    let mut model = Model::from_gguf(file, None).with_context(|| format!("loading {}", a.model.display()))?;
    let collector = Arc::new(Mutex::new(Collector::default()));
    let sink = collector.clone();
    model.observer = Some(Arc::new(move |name: &str, n_expert: usize, e: usize, row: &[f32]| {
        // a poisoned lock only means an earlier observer call panicked; the sums are still usable
        sink.lock().unwrap_or_else(|p| p.into_inner()).add(name, n_expert, e, row);
    }));
    let use_mtp = model.has_mtp() && !a.no_mtp;
    let model = Arc::new(model);
    let mut backend = CpuBackend::with_ctx(model, a.chunk);
    let chunks: Vec<&[u32]> = tokens.chunks(a.chunk - 1).collect();
    let t0 = std::time::Instant::now();
    for (i, c) in chunks.iter().enumerate() {
        backend.reset();
        let mut toks = Vec::with_capacity(c.len() + 1);
        toks.push(tok.bos_id());
        toks.extend_from_slice(c);
        let out = backend.eval(&toks, Want { all_logits: false, hidden: use_mtp })?;
        if use_mtp {
            // the MTP block pairs the hidden state of position p with token p+1
            let hd = out.hidden.len() / toks.len();
            for (p, &next) in toks.iter().enumerate().skip(1) {
                backend.mtp_eval(&out.hidden[(p - 1) * hd..p * hd], next)?;
            }
        }
        eprintln!("imatrix: chunk {}/{} ({} tokens, {:.1} s)", i + 1, chunks.len(), toks.len(), t0.elapsed().as_secs_f64());
    }
    let mut col = collector.lock().unwrap_or_else(|p| p.into_inner());
    col.chunks = chunks.len() as i32;
    let dataset = a.dataset.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let bytes = col.to_bytes(&dataset);
    let tmp = a.out.with_extension("dat.tmp");
    std::fs::write(&tmp, &bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &a.out).with_context(|| format!("renaming {} to {}", tmp.display(), a.out.display()))?;
    eprintln!(
        "imatrix: {} dataset tokens in {} chunks of at most {}, {} bytes -> {}",
        tokens.len(),
        chunks.len(),
        a.chunk,
        bytes.len(),
        a.out.display()
    );
    Ok(())
}
