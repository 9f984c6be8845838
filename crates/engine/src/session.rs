//! A `Session` is one live timeline of tokens with its model state: the unit the
//! CLI and the server drive. It reuses work across requests and turns, rewinds,
//! snapshots, saves and generates.
//!
//! Prefix reuse and rewind (`sync`). A new prompt is compared with the live
//! tokens; the longest common prefix (LCP) is kept. If the live timeline
//! extends past the LCP it must be rewound, and the V4 state cannot simply be
//! truncated (the window ring was overwritten, the compressors hold partial
//! windows). So the session keeps *rewind points*: frontier snapshots (state
//! minus the append-only compressed rows, see `state_io`) taken at every
//! multiple of `checkpoint_interval` tokens and whenever the caller calls
//! `mark()` (the CLI marks each prompt's end). The rule: restore the latest
//! rewind point at or before the LCP, evaluate the rest of the prompt from
//! there; with none, reset and prefill cold. Rewind points after the restored
//! one are dropped (their row data is gone), which is also what keeps every
//! remaining frontier valid.
//!
//! Evaluation is chunked (`chunk` tokens per backend call) with a progress
//! callback and a cancel flag checked between chunks and generated tokens.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::backend::{Backend, Snapshot, SnapshotKind};
use crate::config::Config;
use crate::error::{EngineError, Result};
use crate::model::{CompState, LayerState, State, Want};
use crate::sampler::Sampler;
use crate::state_io::{read_payload, write_payload, PayloadMeta};

#[derive(Clone, Debug)]
pub struct SessionOptions {
    /// Tokens per backend call during prefill.
    pub chunk: usize,
    /// A rewind point is taken whenever the position reaches a multiple of this (0 = never).
    pub checkpoint_interval: usize,
    /// Most rewind points kept in memory (the first and the newest are kept).
    pub max_checkpoints: usize,
    /// Accept saved states of the same model in another routed-expert quantisation.
    pub allow_other_quant: bool,
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions { chunk: 512, checkpoint_interval: 2048, max_checkpoints: 16, allow_other_quant: false }
    }
}

/// A rewind point: frontier snapshot plus the logits at that position.
struct Checkpoint {
    snap: Snapshot,
    logits: Vec<f32>,
}

/// What `sync` did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncStats {
    /// Tokens of the prompt that were already evaluated (LCP, or the rewind point).
    pub reused: usize,
    /// Position of the rewind point restored, if the timeline was rewound.
    pub restored_at: Option<usize>,
    /// Tokens evaluated now.
    pub evaluated: usize,
    /// Whether the state was reset (no usable prefix).
    pub cold: bool,
    /// Stopped early by the cancel flag (the session holds a prefix of the prompt).
    pub cancelled: bool,
}

/// Why generation stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// A stop token (EOS) was sampled; it is the last generated token, not evaluated.
    StopToken,
    /// `max_tokens` tokens were generated.
    MaxTokens,
    /// The next token would not fit in the context; the last token is not evaluated.
    ContextFull,
    /// The cancel flag was raised.
    Cancelled,
    /// The token callback asked to stop (e.g. a stop sequence); that token is not evaluated.
    Callback,
}

#[derive(Clone, Debug, Default)]
pub struct GenLimits {
    pub max_tokens: usize,
    pub stop_tokens: Vec<u32>,
}

#[derive(Clone, Debug)]
pub struct Generation {
    /// Every sampled token, in order (including a final stop token).
    pub tokens: Vec<u32>,
    pub reason: StopReason,
}

/// A full in-memory copy of a session, restorable at any time.
pub struct SessionSnapshot {
    tokens: Vec<u32>,
    logits: Vec<f32>,
    snap: Snapshot,
}

impl SessionSnapshot {
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }
    pub fn bytes(&self) -> usize {
        self.snap.bytes + self.tokens.len() * 4 + self.logits.len() * 4
    }
}

pub struct Session {
    backend: Box<dyn Backend>,
    tokens: Vec<u32>,
    logits: Vec<f32>,
    opts: SessionOptions,
    /// sorted by position; every one lies on the live timeline
    checkpoints: Vec<Checkpoint>,
    cancel: Option<Arc<AtomicBool>>,
}

impl Session {
    pub fn new(mut backend: Box<dyn Backend>, opts: SessionOptions) -> Session {
        backend.reset();
        Session { backend, tokens: Vec::new(), logits: Vec::new(), opts, checkpoints: Vec::new(), cancel: None }
    }

    pub fn backend(&self) -> &dyn Backend {
        self.backend.as_ref()
    }
    pub fn config(&self) -> &Config {
        self.backend.config()
    }
    /// The evaluated tokens of the live timeline.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }
    /// Next-token logits after `tokens()` (empty before the first token).
    pub fn logits(&self) -> &[f32] {
        &self.logits
    }
    pub fn pos(&self) -> usize {
        self.tokens.len()
    }
    pub fn ctx(&self) -> usize {
        self.backend.ctx()
    }
    pub fn options(&self) -> &SessionOptions {
        &self.opts
    }
    /// Positions of the rewind points held.
    pub fn checkpoint_positions(&self) -> Vec<usize> {
        self.checkpoints.iter().map(|c| c.snap.pos).collect()
    }

    /// A flag that, when raised, stops prefill (between chunks) and generation.
    pub fn set_cancel_flag(&mut self, flag: Option<Arc<AtomicBool>>) {
        self.cancel = flag;
    }
    fn cancelled(&self) -> bool {
        self.cancel.as_ref().is_some_and(|f| f.load(Ordering::Relaxed))
    }

    pub fn reset(&mut self) {
        self.backend.reset();
        self.tokens.clear();
        self.logits.clear();
        self.checkpoints.clear();
    }

    /// Makes the live timeline equal `prompt`, reusing what it can (module docs).
    pub fn sync(&mut self, prompt: &[u32], progress: &mut dyn FnMut(usize, usize)) -> Result<SyncStats> {
        if prompt.len() > self.ctx() {
            return Err(EngineError::ContextFull { pos: prompt.len(), ctx: self.ctx() });
        }
        let lcp = self.tokens.iter().zip(prompt).take_while(|(a, b)| a == b).count();
        let mut stats = SyncStats::default();
        if lcp < self.tokens.len() {
            // rewind: the latest rewind point at or before the LCP
            match self.checkpoints.iter().rposition(|c| c.snap.pos <= lcp && c.snap.pos > 0) {
                Some(i) => {
                    let at = self.checkpoints[i].snap.pos;
                    self.backend.restore(&self.checkpoints[i].snap)?;
                    self.logits = self.checkpoints[i].logits.clone();
                    self.tokens.truncate(at);
                    self.checkpoints.truncate(i + 1);
                    stats.restored_at = Some(at);
                }
                None => {
                    self.reset();
                    stats.cold = true;
                }
            }
        }
        stats.reused = self.tokens.len();
        let rest = prompt[self.tokens.len()..].to_vec();
        stats.evaluated = self.extend(&rest, progress)?;
        stats.cancelled = stats.evaluated < rest.len();
        Ok(stats)
    }

    /// Evaluates `tokens` after the live timeline in chunks, taking rewind points
    /// at interval multiples. Returns how many were evaluated (fewer only when cancelled).
    pub fn extend(&mut self, tokens: &[u32], progress: &mut dyn FnMut(usize, usize)) -> Result<usize> {
        if self.pos() + tokens.len() > self.ctx() {
            return Err(EngineError::ContextFull { pos: self.pos() + tokens.len(), ctx: self.ctx() });
        }
        let total = tokens.len();
        let mut done = 0;
        progress(0, total);
        while done < total {
            if self.cancelled() {
                break;
            }
            let mut n = self.opts.chunk.max(1).min(total - done);
            // end chunks on rewind-point frontiers
            let iv = self.opts.checkpoint_interval;
            if iv > 0 {
                let to_frontier = iv - self.pos() % iv;
                n = n.min(to_frontier);
            }
            self.eval_step(&tokens[done..done + n])?;
            done += n;
            progress(done, total);
        }
        Ok(done)
    }

    /// One backend call; keeps tokens/logits in step and takes interval rewind points.
    fn eval_step(&mut self, toks: &[u32]) -> Result<()> {
        let out = self.backend.eval(toks, Want::default())?;
        self.tokens.extend_from_slice(toks);
        self.logits = out.logits;
        let iv = self.opts.checkpoint_interval;
        if iv > 0 && self.pos() % iv == 0 {
            self.mark()?;
        }
        Ok(())
    }

    /// Records a rewind point at the current position (no-op if one exists there).
    pub fn mark(&mut self) -> Result<()> {
        let pos = self.pos();
        if pos == 0 || self.checkpoints.last().is_some_and(|c| c.snap.pos == pos) {
            return Ok(());
        }
        let snap = self.backend.snapshot(SnapshotKind::Frontier)?;
        self.checkpoints.push(Checkpoint { snap, logits: self.logits.clone() });
        if self.checkpoints.len() > self.opts.max_checkpoints.max(2) {
            // keep the first (often a shared system prompt) and the newest
            self.checkpoints.remove(1);
        }
        Ok(())
    }

    /// Samples and evaluates tokens until a stop condition. `on_token` sees every
    /// sampled token (including a final stop token) and returns false to stop.
    pub fn generate(&mut self, sampler: &mut Sampler, limits: &GenLimits, on_token: &mut dyn FnMut(u32) -> bool) -> Result<Generation> {
        if self.logits.is_empty() {
            return Err(EngineError::Input("generate needs at least one prompt token".into()));
        }
        let mut out = Vec::new();
        let reason = loop {
            if out.len() >= limits.max_tokens {
                break StopReason::MaxTokens;
            }
            if self.cancelled() {
                break StopReason::Cancelled;
            }
            let tok = sampler.sample(&self.logits)?;
            out.push(tok);
            let keep_going = on_token(tok);
            if limits.stop_tokens.contains(&tok) {
                break StopReason::StopToken;
            }
            if !keep_going {
                break StopReason::Callback;
            }
            if self.pos() + 1 > self.ctx() {
                break StopReason::ContextFull;
            }
            if out.len() >= limits.max_tokens {
                // the last token is not needed for anything: skip its evaluation
                break StopReason::MaxTokens;
            }
            self.eval_step(&[tok])?;
        };
        Ok(Generation { tokens: out, reason })
    }

    /// A full copy of the session (tokens, logits, state).
    pub fn snapshot(&self) -> Result<SessionSnapshot> {
        Ok(SessionSnapshot { tokens: self.tokens.clone(), logits: self.logits.clone(), snap: self.backend.snapshot(SnapshotKind::Full)? })
    }

    /// Returns to a snapshot of this session; rewind points are dropped.
    pub fn restore(&mut self, s: &SessionSnapshot) -> Result<()> {
        self.backend.restore(&s.snap)?;
        self.tokens = s.tokens.clone();
        self.logits = s.logits.clone();
        self.checkpoints.clear();
        Ok(())
    }

    /// Writes the full state as a payload (`state_io`).
    pub fn save(&self, w: &mut dyn Write) -> Result<()> {
        let meta = PayloadMeta { fingerprint: self.backend.fingerprint(), tokens: self.tokens.clone(), logits: self.logits.clone() };
        let st = self.backend.export_state()?;
        write_payload(w, self.config(), &meta, &st)
    }

    /// Reads a payload and replaces the session with it. Everything is checked
    /// (model fingerprint, shapes, checksum) before the live state is touched.
    pub fn load(&mut self, r: &mut dyn Read) -> Result<()> {
        let cfg = self.config().clone();
        let (meta, st) = read_payload(r, &cfg, &State::empty_for_rope(&cfg, self.backend.kv_rope()))?;
        if !self.backend.fingerprint().accepts(&meta.fingerprint, self.opts.allow_other_quant) {
            return Err(EngineError::Input("saved state belongs to a different model".into()));
        }
        if meta.tokens.len() > self.ctx() {
            return Err(EngineError::ContextFull { pos: meta.tokens.len(), ctx: self.ctx() });
        }
        self.backend.import_state(st)?;
        self.tokens = meta.tokens;
        self.logits = meta.logits;
        self.checkpoints.clear();
        Ok(())
    }
}

impl State {
    /// A fresh state (position 0) for a model of this config, built from the
    /// config alone (the shapes `Model::new_state` gives), with f32 RoPE rows.
    pub fn empty_for(cfg: &Config) -> State {
        State::empty_for_rope(cfg, crate::pack::RopeStore::F32)
    }

    /// `empty_for` with the compressed rows' RoPE dims held as `rope`.
    pub fn empty_for_rope(cfg: &Config, rope: crate::pack::RopeStore) -> State {
        let comp = |coff: usize, r: usize, d: usize| {
            let n = if coff == 2 { 2 * r } else { r } * coff * d;
            CompState { kv: vec![0.0; n], score: vec![f32::NEG_INFINITY; n] }
        };
        let layers = (0..cfg.n_layers)
            .map(|l| {
                let r = cfg.compress_ratios.get(l).copied().unwrap_or(0);
                LayerState {
                    ring: vec![0.0; cfg.window * cfg.head_dim],
                    rows: crate::pack::PackedRows::new(crate::pack::RowFormat::attn_with(cfg, rope)),
                    comp: (r != 0).then(|| comp(cfg.coff(l), r, cfg.head_dim)),
                    idx_rows: crate::pack::PackedRows::new(crate::pack::RowFormat::indexer(cfg)),
                    idx_comp: cfg.has_indexer(l).then(|| comp(2, r, cfg.index_head_dim)),
                }
            })
            .collect();
        State { pos: 0, layers }
    }
}
