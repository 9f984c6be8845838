//! The real [`Generator`]: dsv4-engine's [`Session`] (live timeline with LCP
//! prefix reuse and rewind points) plus its [`Sampler`], the GGUF tokenizer,
//! and optionally the disk KV cache. Cache decisions (live prefix reused,
//! rewind, disk hit, evict/cold saves) are logged.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use dsv4_engine::kvdisk::{DiskCache, DiskCacheOptions, SaveReason};
use dsv4_engine::pack::RopeStore;
use dsv4_engine::sampler::{argmax, Sampler, SamplerConfig};
use dsv4_engine::session::{Session, SessionOptions};
use dsv4_engine::state_io::Fingerprint;
use dsv4_engine::{CpuBackend, Model, Numerics};
use dsv4_text::{StreamDecoder, Tokenizer};

use crate::dsml_grammar::DsmlGrammar;
use crate::generator::{FinishReason, Flow, GenError, GenEvent, GenRequest, GenSummary, Generator, ModelInfo, TokenLogprob};

pub struct EngineGenerator {
    session: Session,
    tok: Tokenizer,
    id: String,
    disk: Option<DiskCache>,
    cancel: Arc<AtomicBool>,
}

/// Disk cache settings from the CLI.
#[derive(Debug, Clone)]
pub struct DiskSettings {
    pub dir: std::path::PathBuf,
    pub space_mb: u64,
}

fn internal(e: impl std::fmt::Display) -> GenError {
    GenError::Internal(e.to_string())
}

impl EngineGenerator {
    pub fn new(session: Session, tok: Tokenizer, id: String, disk: Option<DiskCache>) -> Self {
        let cancel = Arc::new(AtomicBool::new(false));
        let mut session = session;
        session.set_cancel_flag(Some(cancel.clone()));
        EngineGenerator { session, tok, id, disk, cancel }
    }

    /// Loads a GGUF model (CPU backend) with a context of `ctx` tokens.
    pub fn load(path: &Path, ctx: usize, disk: Option<DiskSettings>) -> Result<Self, String> {
        Self::load_with(path, ctx, disk, RopeStore::F32, Numerics::F32, &|model, ctx| Ok(Box::new(CpuBackend::with_ctx(model, ctx))))
    }

    /// Loads a GGUF model on the backend `make` builds (the CLI chooses it; the
    /// server itself never sees a tensor), with the state's RoPE precision
    /// `kv_rope` (`--kv-rope`; see `dsv4_engine::pack::RopeStore`).
    pub fn load_with(
        path: &Path,
        ctx: usize,
        disk: Option<DiskSettings>,
        kv_rope: RopeStore,
        numerics: Numerics,
        make: &dyn Fn(Arc<Model>, usize) -> Result<Box<dyn dsv4_engine::Backend>, String>,
    ) -> Result<Self, String> {
        let file = Arc::new(dsv4_gguf::GgufFile::open(path).map_err(|e| format!("{}: {e}", path.display()))?);
        let tok = Tokenizer::from_gguf(&file).map_err(|e| format!("tokenizer: {e}"))?;
        let mut model = Model::from_gguf(file.clone(), None).map_err(|e| format!("model: {e}"))?;
        model.kv_rope = kv_rope;
        model.numerics = numerics;
        let model = Arc::new(model);
        let fp = Fingerprint::of_gguf(&model.cfg, &[&file]);
        let backend = make(model, ctx)?;
        let session = Session::new(backend, SessionOptions::default());
        let disk = match disk {
            Some(d) => {
                let mut o = DiskCacheOptions::new(d.dir);
                o.budget_bytes = d.space_mb << 20;
                o.kv_rope = session.backend().kv_rope();
                Some(DiskCache::open(o, fp).map_err(|e| format!("kv disk cache: {e}"))?)
            }
            None => None,
        };
        let id = path.file_stem().map(|_| "deepseek-v4-flash".to_string()).unwrap_or_default();
        Ok(Self::new(session, tok, id, disk))
    }

    fn lcp(&self, ids: &[u32]) -> usize {
        self.session.tokens().iter().zip(ids).take_while(|(a, b)| a == b).count()
    }

    /// Before a prompt that shares little with the live session: save the live
    /// session (evict) and try the disk cache for a longer prefix.
    fn consult_disk(&mut self, prompt: &str, ids: &[u32]) {
        let Some(disk) = &self.disk else { return };
        let lcp = self.lcp(ids);
        let live = self.session.tokens().len();
        if lcp >= live || lcp * 2 >= ids.len() {
            return;
        }
        if live >= disk.opts.min_tokens {
            let text = self.tok.decode(self.session.tokens());
            match disk.save(&self.session, &text, SaveReason::Evict) {
                Ok(p) => tracing::info!("kv cache: saved the live session ({live} tokens) before replacing it: {}", p.display()),
                Err(e) => tracing::warn!("kv cache: evict save failed: {e}"),
            }
        }
        if let Some(entry) = disk.lookup(prompt.as_bytes()) {
            if entry.tokens > lcp {
                match disk.load_into(&entry, &mut self.session) {
                    Ok(true) => tracing::info!("kv cache: disk hit, {} tokens from {}", entry.tokens, entry.path.display()),
                    Ok(false) => {}
                    Err(e) => tracing::warn!("kv cache: load failed: {e}"),
                }
            }
        }
    }

    fn cold_save(&mut self, ids: &[u32], progress: &mut dyn FnMut(usize, usize)) -> Result<(), GenError> {
        let Some(k) = self.disk.as_ref().and_then(|d| d.cold_save_point(ids.len())) else { return Ok(()) };
        self.session.sync(&ids[..k], progress).map_err(internal)?;
        if self.cancel.load(Ordering::Relaxed) {
            return Ok(());
        }
        let text = self.tok.decode(&ids[..k]);
        if let Some(d) = &self.disk {
            match d.save(&self.session, &text, SaveReason::Cold) {
                Ok(p) => tracing::info!("kv cache: cold save of {k} tokens: {}", p.display()),
                Err(e) => tracing::warn!("kv cache: cold save failed: {e}"),
            }
        }
        Ok(())
    }
}

fn logprob_of(tok: &Tokenizer, logits: &[f32], id: u32, top: u32) -> TokenLogprob {
    let max = logits.iter().copied().filter(|v| v.is_finite()).fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().filter(|v| v.is_finite()).map(|&v| ((v - max) as f64).exp()).sum();
    let lse = max as f64 + sum.ln();
    let lp = |i: u32| logits.get(i as usize).map_or(f32::NEG_INFINITY, |&v| (v as f64 - lse) as f32);
    let name = |i: u32| String::from_utf8_lossy(tok.token_bytes(i)).into_owned();
    let mut best: Vec<u32> = Vec::new();
    if top > 0 {
        let mut idx: Vec<u32> = (0..logits.len() as u32).filter(|&i| logits[i as usize].is_finite()).collect();
        let k = (top as usize).min(idx.len());
        if k > 0 {
            idx.select_nth_unstable_by(k - 1, |a, b| logits[*b as usize].total_cmp(&logits[*a as usize]));
            idx.truncate(k);
            idx.sort_by(|a, b| logits[*b as usize].total_cmp(&logits[*a as usize]));
        }
        best = idx;
    }
    TokenLogprob { token: name(id), logprob: lp(id), top: best.into_iter().map(|i| (name(i), lp(i))).collect() }
}

impl Generator for EngineGenerator {
    fn generate(&mut self, req: GenRequest, events: &mut dyn FnMut(GenEvent) -> Flow) -> Result<GenSummary, GenError> {
        self.cancel.store(false, Ordering::Relaxed);
        let ctx = self.session.ctx();
        let ids = self.tok.encode(&req.prompt);
        if ids.is_empty() {
            return Err(GenError::Invalid("the prompt is empty".into()));
        }
        if ids.len() + 1 > ctx {
            return Err(GenError::PromptTooLong { tokens: ids.len(), ctx });
        }
        self.consult_disk(&req.prompt, &ids);
        let estimate = self.lcp(&ids) as u32;
        let mut summary = GenSummary { prompt_tokens: ids.len() as u32, cached_tokens: estimate, completion_tokens: 0, prefill_ms: 0.0, decode_ms: 0.0, finish: FinishReason::Eos };
        if events(GenEvent::Started { prompt_tokens: ids.len() as u32, cached_tokens: estimate }) == Flow::Stop {
            summary.finish = FinishReason::Stopped;
            return Ok(summary);
        }
        let t0 = Instant::now();
        let cancel = self.cancel.clone();
        let started = GenEvent::Started { prompt_tokens: ids.len() as u32, cached_tokens: estimate };
        // Progress doubles as a liveness probe: a gone client raises the cancel flag.
        let mut progress = |_: usize, _: usize| {
            if events(started.clone()) == Flow::Stop {
                cancel.store(true, Ordering::Relaxed);
            }
        };
        if estimate == 0 && !self.session.tokens().is_empty() {
            tracing::info!("kv cache: no common prefix with the live session ({} tokens); prefill from zero", self.session.tokens().len());
        }
        if self.lcp(&ids) == 0 {
            self.cold_save(&ids, &mut progress)?;
        }
        let stats = self.session.sync(&ids, &mut progress).map_err(internal)?;
        drop(progress);
        // A rewind point at the prompt's end: the next turn shares at least this
        // prefix even if the re-tokenized reply differs from the sampled tokens.
        if !stats.cancelled {
            if let Err(e) = self.session.mark() {
                tracing::warn!("could not mark a rewind point: {e}");
            }
        }
        summary.cached_tokens = stats.reused as u32;
        summary.prefill_ms = t0.elapsed().as_secs_f64() * 1000.0;
        tracing::info!(
            "kv cache: prompt {} tokens, reused {}{}{}, evaluated {}",
            ids.len(),
            stats.reused,
            stats.restored_at.map(|p| format!(" (rewound to {p})")).unwrap_or_default(),
            if stats.cold { " (cold)" } else { "" },
            stats.evaluated
        );
        if stats.cancelled || self.cancel.load(Ordering::Relaxed) {
            summary.finish = FinishReason::Stopped;
            return Ok(summary);
        }
        let s = req.sampling;
        let seed = s.seed.unwrap_or_else(|| {
            let mut b = [0u8; 8];
            let _ = getrandom::fill(&mut b);
            u64::from_le_bytes(b)
        });
        let mut sampler = Sampler::new(SamplerConfig { temperature: s.temperature, top_k: s.top_k as usize, top_p: s.top_p, min_p: s.min_p, seed });
        let mut grammar = DsmlGrammar::default();
        let mut decoder = StreamDecoder::new(&self.tok);
        let eos = self.tok.eos_id();
        let t1 = Instant::now();
        loop {
            if summary.completion_tokens >= req.max_tokens {
                summary.finish = FinishReason::Length;
                break;
            }
            let logits = self.session.logits();
            let greedy = req.dsml_greedy && grammar.structure();
            let tok = if greedy { argmax(logits).ok_or_else(|| internal("no finite logit"))? } else { sampler.sample(logits).map_err(internal)? };
            if tok == eos {
                summary.finish = FinishReason::Eos;
                // Keep EOS in the live timeline: the next turn's prompt has it.
                if self.session.pos() + 1 <= ctx {
                    self.session.extend(&[eos], &mut |_, _| {}).map_err(internal)?;
                }
                break;
            }
            let logprob = req.logprobs.map(|n| logprob_of(&self.tok, logits, tok, n));
            let text = decoder.push(tok);
            grammar.feed(&text);
            summary.completion_tokens += 1;
            if events(GenEvent::Token { id: tok, text, logprob }) == Flow::Stop {
                summary.finish = FinishReason::Stopped;
                break;
            }
            if summary.completion_tokens >= req.max_tokens || self.session.pos() + 1 > ctx {
                summary.finish = FinishReason::Length;
                break;
            }
            self.session.extend(&[tok], &mut |_, _| {}).map_err(internal)?;
        }
        let rest = decoder.finish();
        if !rest.is_empty() {
            let _ = events(GenEvent::Token { id: eos, text: rest, logprob: None });
        }
        summary.decode_ms = t1.elapsed().as_secs_f64() * 1000.0;
        Ok(summary)
    }

    fn model_info(&self) -> ModelInfo {
        ModelInfo { id: self.id.clone(), ctx: self.session.ctx() }
    }
}
