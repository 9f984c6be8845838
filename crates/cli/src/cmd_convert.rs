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

pub fn imatrix(a: ImatrixArgs) -> Result<()> {
    let _ = (&a.model, &a.dataset, &a.out);
    bail!(
        "`dsv4 imatrix` needs the engine to expose the routed experts' inputs during prefill (not available yet); \
         the .dat writer is ready in dsv4_tools::imatrix::Collector"
    )
}
