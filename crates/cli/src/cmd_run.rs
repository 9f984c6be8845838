//! `dsv4 run` (one-shot generation) and `dsv4 chat` (interactive multi-turn
//! REPL). Thin over the engine: prompts are rendered by dsv4-text, evaluated by
//! a `Session` (prefix reuse, rewind points, disk KV cache), sampled by the
//! engine's `Sampler`, and streamed through the DSML stream parser so reasoning
//! is shown apart from the answer (dim on a terminal; between `<think>` and
//! `</think>` lines when piped).
//!
//! The chat transcript is append-only: each turn adds the user turn and the
//! assistant opener after the previous answer, so the live KV state is reused
//! and only the new text is evaluated (earlier reasoning is kept in context,
//! unlike the official re-rendering that drops it, which would force a
//! re-prefill of the whole conversation every turn).

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use dsv4_engine::kvdisk::{DiskCache, DiskCacheOptions, SaveReason};
use dsv4_engine::pack::RopeStore;
use dsv4_engine::sampler::{self, Sampler, SamplerConfig, StopSequences};
use dsv4_engine::session::{GenLimits, Session, SessionOptions, StopReason};
use dsv4_engine::{Backend, Model};
use dsv4_gguf::GgufFile;
use dsv4_text::chat::{encode_messages, EncodeOptions, Message, ReasoningEffort, ThinkingMode};
use dsv4_text::dsml::{Event, StreamParser};
use dsv4_text::{StreamDecoder, Tokenizer};

pub const DEFAULT_MODEL: &str = "./dsv4flash.gguf";

/// Model, backend, context and cache options shared by `run` and `chat`.
#[derive(Args, Clone, Debug)]
pub struct ModelArgs {
    /// Model GGUF.
    #[arg(short = 'm', long, default_value = DEFAULT_MODEL)]
    pub model: PathBuf,
    /// Context size in tokens; the state for it is allocated up front.
    #[arg(long, default_value_t = 32768)]
    pub ctx: usize,
    /// Backend: auto (CUDA when a GPU is usable, else CPU), cpu or cuda.
    #[arg(long, default_value = "auto")]
    pub backend: String,
    /// CPU backend: quantise activations to 8 bits for the quantised-weight dot
    /// products (ds4's CPU numerics: faster, held to the fixtures' q8 bounds)
    /// instead of the f32 reference numerics.
    #[arg(long)]
    pub q8: bool,
    /// Precision of the RoPE dims of compressed KV rows in the state: f32 (exact
    /// vs the f32 reference; 4.12 GiB at 1M tokens for V4 Flash) or bf16 (the
    /// official model's cache precision, rounded when a row is made; 3.45 GiB,
    /// logits change slightly). Saved sessions record it and load only into the same.
    #[arg(long, default_value = "f32", value_name = "f32|bf16")]
    pub kv_rope: RopeStore,
    /// Prefill chunk (tokens per backend call).
    #[arg(long, default_value_t = 512)]
    pub chunk: usize,
    /// Disk KV cache directory (reuses prefills across runs); off when absent.
    #[arg(long)]
    pub kv_disk_dir: Option<PathBuf>,
    /// Disk KV cache budget in MiB.
    #[arg(long, default_value_t = 8192)]
    pub kv_disk_space_mb: u64,
    /// Accept disk checkpoints written by another quantisation of the same model.
    #[arg(long)]
    pub kv_allow_other_quant: bool,
}

#[derive(Args, Clone, Debug)]
pub struct SamplingArgs {
    /// Maximum tokens to generate.
    #[arg(short = 'n', long = "max-tokens", default_value_t = 4096)]
    pub n: usize,
    /// Temperature (0 = greedy).
    #[arg(long, default_value_t = sampler::DEFAULT_TEMPERATURE)]
    pub temp: f32,
    #[arg(long, default_value_t = sampler::DEFAULT_TOP_P)]
    pub top_p: f32,
    /// 0 = off.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = sampler::DEFAULT_MIN_P)]
    pub min_p: f32,
    /// RNG seed (default: from the clock; printed in the summary).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop when the answer contains this text (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
}

#[derive(Args, Clone, Debug)]
pub struct ThinkArgs {
    /// Thinking mode (the default).
    #[arg(long, conflicts_with_all = ["nothink", "think_max"])]
    pub think: bool,
    /// Non-thinking mode.
    #[arg(long, conflicts_with = "think_max")]
    pub nothink: bool,
    /// Thinking with the Think-Max prefix (needs --ctx >= 393216, else it is downgraded).
    #[arg(long)]
    pub think_max: bool,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub think: ThinkArgs,
    /// The user prompt.
    #[arg(short = 'p', long, conflicts_with = "prompt_file")]
    pub prompt: Option<String>,
    /// Read the user prompt from a file.
    #[arg(long)]
    pub prompt_file: Option<PathBuf>,
    /// System prompt.
    #[arg(long)]
    pub system: Option<String>,
    /// Greedy continuation with the top-K alternatives per step, written as JSON.
    #[arg(long)]
    pub dump_logprobs: Option<PathBuf>,
    #[arg(long, default_value_t = 5)]
    pub logprobs_top_k: usize,
}

#[derive(Args, Debug)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub think: ThinkArgs,
    /// System prompt.
    #[arg(long)]
    pub system: Option<String>,
}

/// Thinking mode as the prompt needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Think {
    Off,
    High,
    Max,
}

impl ThinkArgs {
    fn mode(&self) -> Think {
        if self.nothink {
            Think::Off
        } else if self.think_max {
            Think::Max
        } else {
            Think::High
        }
    }
}

fn encode_opts(t: Think, ctx: usize, add_bos: bool) -> EncodeOptions {
    EncodeOptions {
        mode: if t == Think::Off { ThinkingMode::Chat } else { ThinkingMode::Thinking },
        reasoning_effort: (t == Think::Max).then_some(ReasoningEffort::Max),
        add_bos,
        context_tokens: Some(ctx as u64),
        ..Default::default()
    }
}

/// Builds the backend by name: the one place that knows the backends.
pub fn make_backend(name: &str, file: &Arc<GgufFile>, ctx: usize, q8: bool, kv_rope: RopeStore) -> Result<Box<dyn Backend>> {
    let mut model = Model::from_gguf(file.clone(), None).context("loading the model")?;
    if q8 {
        model.numerics = dsv4_engine::Numerics::Q8;
    }
    model.kv_rope = kv_rope;
    crate::backends::make(name, Arc::new(model), ctx)
}

/// The loaded model: file, tokenizer and a session on the chosen backend.
struct Loaded {
    file: Arc<GgufFile>,
    tok: Tokenizer,
    session: Session,
    cache: Option<DiskCache>,
    args: ModelArgs,
}

fn open_model(a: &ModelArgs) -> Result<Loaded> {
    let default_absent = a.model == Path::new(DEFAULT_MODEL) && !a.model.exists();
    if !a.model.exists() && !default_absent {
        bail!(
            "model file {} not found.\nGet one with `dsv4 download q2` (or q4), or convert the official release with \
             `dsv4 convert --hf DIR --out dsv4flash.gguf --recipe q2`, then pass it with -m PATH (default {DEFAULT_MODEL}).",
            a.model.display()
        );
    }
    // no model given and none in the default place: the embedded demo, with a notice
    let file = if default_absent {
        eprintln!("{}", crate::demo::notice());
        crate::demo::open()?
    } else {
        Arc::new(GgufFile::open(&a.model).with_context(|| format!("opening {}", a.model.display()))?)
    };
    let tok = Tokenizer::from_gguf(&file).map_err(|e| anyhow!("tokenizer: {e}"))?;
    let session = new_session(a, &file, a.ctx)?;
    let cache = match &a.kv_disk_dir {
        Some(dir) => {
            let mut o = DiskCacheOptions::new(dir);
            o.budget_bytes = a.kv_disk_space_mb << 20;
            o.allow_other_quant = a.kv_allow_other_quant;
            o.kv_rope = session.backend().kv_rope();
            Some(DiskCache::open(o, session.backend().fingerprint()).context("opening the disk KV cache")?)
        }
        None => None,
    };
    Ok(Loaded { file, tok, session, cache, args: a.clone() })
}

fn new_session(a: &ModelArgs, file: &Arc<GgufFile>, ctx: usize) -> Result<Session> {
    let backend = make_backend(&a.backend, file, ctx, a.q8, a.kv_rope)?;
    let cfg = backend.config();
    // both backends store compressed rows packed (lossless FP8/FP4 codes; the
    // GPU pads rows to 4-byte multiples, a fraction of a percent more)
    let per_token = dsv4_engine::pack::StateBytes::per_token(cfg, backend.kv_rope());
    eprintln!(
        "dsv4: {} backend, context {} tokens, state {:.1} MiB allocated ({:.0} bytes/token for compressed rows, {} RoPE dims)",
        backend.name(),
        ctx,
        backend.state_bytes() as f64 / (1 << 20) as f64,
        per_token,
        backend.kv_rope()
    );
    let opts = SessionOptions { chunk: a.chunk.max(1), allow_other_quant: a.kv_allow_other_quant, ..Default::default() };
    Ok(Session::new(backend, opts))
}

fn sampler_for(s: &SamplingArgs) -> (Sampler, u64) {
    let seed = s.seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
    });
    let cfg = SamplerConfig { temperature: s.temp, top_k: s.top_k, top_p: s.top_p, min_p: s.min_p, seed };
    (Sampler::new(cfg), seed)
}

/// Shared Ctrl+C flag: raised by SIGINT, checked by prefill and generation.
fn interrupt_flag() -> Arc<AtomicBool> {
    static FLAG: std::sync::OnceLock<Arc<AtomicBool>> = std::sync::OnceLock::new();
    FLAG.get_or_init(|| {
        let f = Arc::new(AtomicBool::new(false));
        let g = f.clone();
        // if a handler is already installed (tests, embedding), generation is simply not interruptible
        let _ = ctrlc::set_handler(move || g.store(true, Ordering::SeqCst));
        f
    })
    .clone()
}

impl Loaded {
    /// Brings the session to `prompt` (token ids of `rendered`), using the disk
    /// cache when the live state does not already cover it; shows progress.
    fn prefill(&mut self, prompt: &[u32]) -> Result<(usize, usize, f64)> {
        // the cache is taken out while the session is driven (both live in self)
        let cache = self.cache.take();
        let res = self.prefill_with(prompt, cache.as_ref());
        self.cache = cache;
        res
    }

    fn prefill_with(&mut self, prompt: &[u32], cache: Option<&DiskCache>) -> Result<(usize, usize, f64)> {
        let lcp = |s: &Session| s.tokens().iter().zip(prompt).take_while(|(a, b)| a == b).count();
        if let Some(cache) = cache {
            // the live state covers little of the prompt: look for a longer prefix on disk
            let live = lcp(&self.session);
            if live < prompt.len() / 2 {
                if let Some(e) = cache.lookup(&self.tok.decode(prompt)) {
                    if e.tokens > live && cache.load_into(&e, &mut self.session)? {
                        eprintln!("dsv4: disk KV cache hit: {} tokens from {}", e.tokens, e.path.display());
                    }
                }
            }
            // cold save point: trimmed and aligned, evaluated and saved before the rest
            if let Some(k) = cache.cold_save_point(prompt.len()) {
                if k > lcp(&self.session) {
                    self.sync_progress(&prompt[..k])?;
                    if let Err(e) = cache.save(&self.session, &self.tok.decode(&prompt[..k]), SaveReason::Cold) {
                        eprintln!("warning: kv cache save failed: {e}");
                    }
                }
            }
        }
        let t0 = Instant::now();
        let before = self.session.pos();
        let st = self.sync_progress(prompt)?;
        let secs = t0.elapsed().as_secs_f64();
        if let Some(cache) = cache {
            // a long prefill crossed a continued-save frontier: save the prompt end
            if cache.continued_point(before, self.session.pos()).is_some() {
                if let Err(e) = cache.save(&self.session, &self.tok.decode(self.session.tokens()), SaveReason::Continued) {
                    eprintln!("warning: kv cache save failed: {e}");
                }
            }
        }
        Ok((st.0, st.1, secs))
    }

    /// `sync` with a progress bar on long prompts (hidden when stderr is not a terminal).
    fn sync_progress(&mut self, prompt: &[u32]) -> Result<(usize, usize)> {
        let todo = prompt.len().saturating_sub(self.session.pos());
        let bar = if todo >= 256 && std::io::stderr().is_terminal() {
            let b = indicatif::ProgressBar::new(prompt.len() as u64);
            b.set_style(
                indicatif::ProgressStyle::with_template("prefill {bar:40} {pos}/{len} tokens ({per_sec}, eta {eta})")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            b
        } else {
            indicatif::ProgressBar::hidden()
        };
        let st = self.session.sync(prompt, &mut |done, total| bar.set_position((prompt.len() - total + done) as u64))?;
        bar.finish_and_clear();
        if st.cancelled {
            bail!("prefill interrupted");
        }
        Ok((st.reused, st.evaluated))
    }

    /// Saves the live session at shutdown (when a cache is configured).
    fn shutdown_save(&self) {
        if let Some(cache) = &self.cache {
            if self.session.pos() >= cache.opts.min_tokens {
                if let Err(e) = cache.save(&self.session, &self.tok.decode(self.session.tokens()), SaveReason::Shutdown) {
                    eprintln!("warning: kv cache save failed: {e}");
                }
            }
        }
    }
}

/// Streams generated text: reasoning apart from the answer, stop sequences on the answer.
struct Printer<'t> {
    dec: StreamDecoder<'t>,
    parser: StreamParser,
    stops: StopSequences,
    tty: bool,
    in_reasoning: bool,
    stopped: bool,
    answer: String,
}

impl<'t> Printer<'t> {
    fn new(tok: &'t Tokenizer, think: Think, stops: Vec<String>) -> Self {
        let mode = if think == Think::Off { ThinkingMode::Chat } else { ThinkingMode::Thinking };
        Printer {
            dec: StreamDecoder::new(tok),
            parser: StreamParser::new(mode),
            stops: StopSequences::new(stops),
            tty: std::io::stdout().is_terminal(),
            in_reasoning: false,
            stopped: false,
            answer: String::new(),
        }
    }

    fn events(&mut self, evs: Vec<Event>) {
        let mut out = std::io::stdout().lock();
        for ev in evs {
            match ev {
                Event::Reasoning(t) => {
                    if !self.in_reasoning {
                        self.in_reasoning = true;
                        let _ = write!(out, "{}", if self.tty { "\x1b[2m" } else { "<think>\n" });
                    }
                    let _ = write!(out, "{t}");
                }
                other => {
                    self.end_reasoning(&mut out);
                    let text = match other {
                        Event::Content(t) => t,
                        Event::ToolCallStart { name, .. } => format!("\n[tool call {name}] "),
                        Event::ToolCallArgs { delta, .. } => delta,
                        Event::ToolCallEnd { .. } => "\n".into(),
                        Event::Error { message, .. } => format!("\n[dsml error: {message}]\n"),
                        Event::Reasoning(_) => unreachable!(),
                    };
                    let (show, hit) = self.stops.push(&text);
                    self.answer.push_str(&show);
                    let _ = write!(out, "{show}");
                    if hit {
                        self.stopped = true;
                    }
                }
            }
        }
        let _ = out.flush();
    }

    fn end_reasoning(&mut self, out: &mut impl Write) {
        if self.in_reasoning {
            self.in_reasoning = false;
            let _ = write!(out, "{}", if self.tty { "\x1b[0m\n" } else { "\n</think>\n" });
        }
    }

    /// Feeds a token; returns false once a stop sequence completed.
    fn push(&mut self, id: u32) -> bool {
        let text = self.dec.push(id);
        let evs = self.parser.push(&text);
        self.events(evs);
        !self.stopped
    }

    fn finish(&mut self) {
        let text = self.dec.finish();
        let mut evs = self.parser.push(&text);
        evs.extend(self.parser.finish());
        self.events(evs);
        let rest = if self.stopped { String::new() } else { self.stops.finish() };
        let mut out = std::io::stdout().lock();
        self.end_reasoning(&mut out);
        let _ = writeln!(out, "{rest}");
        let _ = out.flush();
    }
}

struct TurnStats {
    prompt: usize,
    reused: usize,
    prefill_tps: f64,
    generated: usize,
    decode_tps: f64,
    reason: StopReason,
    /// generated tokens that were sampled but not evaluated (0 or 1: a stop or last token)
    unevaluated: Vec<u32>,
}

fn summary(s: &TurnStats, seed: u64) {
    eprintln!(
        "dsv4: prompt {} tokens ({} reused), prefill {:.1} t/s | generated {} tokens, decode {:.1} t/s | stop: {:?} | seed {}",
        s.prompt, s.reused, s.prefill_tps, s.generated, s.decode_tps, s.reason, seed
    );
}

/// Prefill `prompt`, then generate and stream; the answer's tokens stay in the session.
fn turn(l: &mut Loaded, prompt: &[u32], think: Think, sa: &SamplingArgs, sampler: &mut Sampler) -> Result<TurnStats> {
    let (reused, evaluated, secs) = l.prefill(prompt)?;
    l.session.mark()?; // a rewind point at the prompt end: regenerating from here is free
    let flag = interrupt_flag();
    flag.store(false, Ordering::SeqCst);
    l.session.set_cancel_flag(Some(flag.clone()));
    let limits = GenLimits { max_tokens: sa.n, stop_tokens: vec![l.tok.eos_id()] };
    let t0 = Instant::now();
    let mut printer = Printer::new(&l.tok, think, sa.stop.clone());
    let eos = l.tok.eos_id();
    let g = l.session.generate(sampler, &limits, &mut |id| if id == eos { true } else { printer.push(id) })?;
    printer.finish();
    l.session.set_cancel_flag(None);
    let dsecs = t0.elapsed().as_secs_f64();
    Ok(TurnStats {
        prompt: prompt.len(),
        reused,
        prefill_tps: if secs > 0.0 { evaluated as f64 / secs } else { 0.0 },
        generated: g.tokens.len(),
        decode_tps: if dsecs > 0.0 { g.tokens.len() as f64 / dsecs } else { 0.0 },
        reason: g.reason,
        unevaluated: g.tokens[l.session.pos().saturating_sub(prompt.len()).min(g.tokens.len())..].to_vec(),
    })
}

fn read_prompt(a: &RunArgs) -> Result<String> {
    match (&a.prompt, &a.prompt_file) {
        (Some(p), _) => Ok(p.clone()),
        (None, Some(f)) => std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display())),
        (None, None) => bail!("give a prompt with -p TEXT or --prompt-file FILE"),
    }
}

pub fn run(a: RunArgs) -> Result<()> {
    let user = read_prompt(&a)?;
    let mut l = open_model(&a.model)?;
    let think = a.think.mode();
    let mut msgs = Vec::new();
    if let Some(s) = &a.system {
        msgs.push(Message::system(s));
    }
    msgs.push(Message::user(&user));
    let rendered = encode_messages(&msgs, &encode_opts(think, a.model.ctx, true)).map_err(|e| anyhow!("rendering the prompt: {e}"))?;
    let prompt = l.tok.encode(&rendered);
    if let Some(path) = &a.dump_logprobs {
        return dump_logprobs(&mut l, &prompt, a.sampling.n, a.logprobs_top_k, path);
    }
    let (mut sampler, seed) = sampler_for(&a.sampling);
    let st = turn(&mut l, &prompt, think, &a.sampling, &mut sampler)?;
    summary(&st, seed);
    l.shutdown_save();
    Ok(())
}

/// Greedy continuation with the top-K alternatives (log-probabilities) per step.
fn dump_logprobs(l: &mut Loaded, prompt: &[u32], n: usize, k: usize, path: &Path) -> Result<()> {
    l.prefill(prompt)?;
    let eos = l.tok.eos_id();
    let mut steps = Vec::new();
    for _ in 0..n {
        let logits = l.session.logits();
        let lmax = logits.iter().copied().filter(|v| v.is_finite()).fold(f32::NEG_INFINITY, f32::max);
        let lse = lmax as f64 + logits.iter().filter(|v| v.is_finite()).map(|&v| ((v - lmax) as f64).exp()).sum::<f64>().ln();
        let top = sampler::top_k_logits(logits, k.max(1));
        let Some(&(tok, lg)) = top.first() else { bail!("no finite logits") };
        let alt: Vec<serde_json::Value> = top
            .iter()
            .map(|&(id, v)| {
                serde_json::json!({"token": id, "text": String::from_utf8_lossy(&l.tok.decode(&[id])), "logprob": v as f64 - lse})
            })
            .collect();
        steps.push(serde_json::json!({
            "token": tok, "text": String::from_utf8_lossy(&l.tok.decode(&[tok])), "logprob": lg as f64 - lse, "top": alt
        }));
        if tok == eos || l.session.pos() + 1 > l.session.ctx() {
            break;
        }
        l.session.extend(&[tok], &mut |_, _| {})?;
    }
    let doc = serde_json::json!({"prompt_tokens": prompt.len(), "top_k": k, "steps": steps});
    std::fs::write(path, serde_json::to_string_pretty(&doc)?).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("dsv4: wrote {} steps to {}", steps.len(), path.display());
    Ok(())
}

const CHAT_HELP: &str = "commands: /think /nothink /think-max /ctx N /read FILE /save NAME /load NAME /reset /quit";

pub fn chat(a: ChatArgs) -> Result<()> {
    let mut l = open_model(&a.model)?;
    let mut think = a.think.mode();
    let (mut sampler, seed) = sampler_for(&a.sampling);
    // rustyline gives line editing and history on a terminal and plain line
    // reads on a pipe, so the same loop serves people and scripted tests.
    let mut rl = rustyline::DefaultEditor::new().context("starting the line editor")?;
    let interactive = std::io::stdin().is_terminal();
    if interactive {
        eprintln!("dsv4 chat — {CHAT_HELP}; Ctrl+C stops a generation, Ctrl+D quits");
    }
    // tokens of the transcript not yet evaluated (e.g. the EOS closing an answer)
    let mut pending: Vec<u32> = Vec::new();
    let mut ended_open = false; // last answer ended without EOS: close it before the next turn
    loop {
        let line = match rl.readline(if interactive { "> " } else { "" }) {
            Ok(line) => line,
            Err(rustyline::error::ReadlineError::Interrupted) => continue,
            Err(rustyline::error::ReadlineError::Eof) => break,
            Err(e) => return Err(e.into()),
        };
        let line = line.trim_end_matches(['\r', '\n']).to_string();
        if line.trim().is_empty() {
            continue;
        }
        let _ = rl.add_history_entry(line.as_str());
        let user = if let Some(cmd) = line.strip_prefix('/') {
            let (name, arg) = cmd.split_once(' ').map_or((cmd, ""), |(a, b)| (a, b.trim()));
            match name {
                "quit" | "exit" => break,
                "think" => think = Think::High,
                "nothink" => think = Think::Off,
                "think-max" => think = Think::Max,
                "reset" => {
                    l.session.reset();
                    pending.clear();
                    ended_open = false;
                }
                "ctx" => {
                    let n: usize = arg.parse().with_context(|| format!("/ctx needs a number, got `{arg}`"))?;
                    resize(&mut l, n)?;
                }
                "save" if !arg.is_empty() => {
                    // the last sampled token of the answer is not evaluated yet:
                    // evaluate it so the saved transcript is the whole conversation
                    if !pending.is_empty() {
                        l.session.extend(&pending, &mut |_, _| {})?;
                        pending.clear();
                    }
                    let mut f = std::io::BufWriter::new(std::fs::File::create(arg).with_context(|| format!("creating {arg}"))?);
                    l.session.save(&mut f)?;
                    f.flush()?;
                    eprintln!("saved {} tokens to {arg}", l.session.pos());
                }
                "load" if !arg.is_empty() => {
                    let mut f = std::io::BufReader::new(std::fs::File::open(arg).with_context(|| format!("opening {arg}"))?);
                    match l.session.load(&mut f) {
                        Ok(()) => {
                            pending.clear();
                            // an answer that ended with EOS is closed; one cut short is not
                            let eos = l.tok.eos_id();
                            ended_open = l.session.pos() > 0 && l.session.tokens().last() != Some(&eos);
                            eprintln!("loaded {} tokens from {arg}", l.session.pos());
                        }
                        Err(e) => eprintln!("error: {e}"),
                    }
                }
                "read" if !arg.is_empty() => {
                    match std::fs::read_to_string(arg) {
                        Ok(text) => {
                            run_turn(&mut l, &text, think, &a, &mut sampler, &mut pending, &mut ended_open, seed)?;
                        }
                        Err(e) => eprintln!("error: {arg}: {e}"),
                    }
                }
                _ => eprintln!("{CHAT_HELP}"),
            }
            continue;
        } else {
            line
        };
        run_turn(&mut l, &user, think, &a, &mut sampler, &mut pending, &mut ended_open, seed)?;
    }
    l.shutdown_save();
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn run_turn(
    l: &mut Loaded,
    user: &str,
    think: Think,
    a: &ChatArgs,
    sampler: &mut Sampler,
    pending: &mut Vec<u32>,
    ended_open: &mut bool,
    seed: u64,
) -> Result<()> {
    let first = l.session.pos() == 0 && pending.is_empty();
    let mut msgs = Vec::new();
    if first {
        if let Some(s) = &a.system {
            msgs.push(Message::system(s));
        }
    }
    msgs.push(Message::user(user));
    let rendered = encode_messages(&msgs, &encode_opts(think, l.session.ctx(), first)).map_err(|e| anyhow!("rendering: {e}"))?;
    let mut prompt = l.session.tokens().to_vec();
    prompt.extend_from_slice(pending);
    if *ended_open {
        prompt.push(l.tok.eos_id());
    }
    prompt.extend(l.tok.encode(&rendered));
    let st = match turn(l, &prompt, think, &a.sampling, sampler) {
        Ok(st) => st,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(());
        }
    };
    summary(&st, seed);
    // the sampled-but-unevaluated last token (EOS or the max-tokens one) belongs to the transcript;
    // an answer cut short (max tokens, Ctrl+C, stop sequence) is closed with EOS next turn
    *pending = st.unevaluated.clone();
    *ended_open = st.reason != StopReason::StopToken;
    Ok(())
}

/// `/ctx N`: a new backend state for N tokens, carrying the conversation over when it fits.
fn resize(l: &mut Loaded, n: usize) -> Result<()> {
    let mut buf = Vec::new();
    l.session.save(&mut buf)?;
    let mut s = new_session(&l.args, &l.file, n)?;
    if s.load(&mut buf.as_slice()).is_err() {
        eprintln!("the conversation does not fit {n} tokens; starting over");
    }
    l.session = s;
    Ok(())
}
