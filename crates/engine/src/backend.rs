//! The coarse, model-specific backend interface: a backend owns one sequence's
//! state and evaluates chunks of tokens on it. The CPU backend wraps `Model`;
//! the CUDA backend (crate dsv4-cuda) implements the same trait.
//!
//! The trait is deliberately small. Everything about timelines (prefix reuse,
//! rewind points, files) lives in `session` on top of four state methods:
//! `snapshot`/`restore` (in memory, in whatever form is cheapest for the
//! backend, e.g. device buffers) and `export_state`/`import_state` (the portable
//! host `State` that `state_io` serialises). A backend must make
//! `import_state(export_state())` and `restore(snapshot())` exact: the next
//! `eval` gives bit-identical logits to an uninterrupted run.

use std::any::Any;
use std::sync::Arc;

use crate::config::Config;
use crate::error::{EngineError, Result};
use crate::model::{EvalOutput, Model, State, Want};
use crate::pack::RopeStore;
use crate::state_io::{Fingerprint, Frontier};

/// What a snapshot keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapshotKind {
    /// Everything: can be restored at any later time, whatever happened since.
    Full,
    /// Everything except the compressed rows, which only append: restorable
    /// only while the live state still extends the snapshot's timeline (it has
    /// not been restored to an earlier position since). Small and fixed-size
    /// (~23 MB for V4 Flash); `Session` uses these as rewind points.
    Frontier,
}

/// An in-memory copy of a backend's state, opaque to everything but the backend
/// that made it (CPU: `State` or `Frontier`; CUDA: device copies).
pub struct Snapshot {
    pub pos: usize,
    pub kind: SnapshotKind,
    /// bytes held, for budgets and reports
    pub bytes: usize,
    pub data: Box<dyn Any + Send + Sync>,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Snapshot {{ pos: {}, kind: {:?}, bytes: {} }}", self.pos, self.kind, self.bytes)
    }
}

pub trait Backend: Send {
    fn config(&self) -> &Config;
    /// Identifies the loaded weights; saved states carry it (see `Fingerprint`).
    /// Default: the shape only (`arch`); backends that know their weights override it.
    fn fingerprint(&self) -> Fingerprint {
        let arch = Fingerprint::of_gguf(self.config(), &[]).arch;
        Fingerprint { arch, base: arch, full: arch }
    }
    /// Number of tokens consumed so far (the next token's position).
    fn pos(&self) -> usize;
    /// Token capacity the state was allocated for; `eval` past it fails with
    /// `EngineError::ContextFull` and leaves the state unchanged.
    fn ctx(&self) -> usize {
        (self.config().context_length as usize).max(1)
    }
    /// Bytes of sequence state allocated now (host or device), for reports.
    fn state_bytes(&self) -> usize {
        0
    }
    /// How the state holds the RoPE dims of compressed attention rows (saved
    /// states record it; one of the other kind is refused).
    fn kv_rope(&self) -> RopeStore {
        RopeStore::F32
    }
    /// Consume `tokens` at `pos()`; returns the last (or every) token's logits.
    fn eval(&mut self, tokens: &[u32], want: Want) -> Result<EvalOutput>;
    /// MTP block on a main-model hidden state (`[hc][dim]`) and token; advances the MTP state.
    fn mtp_eval(&mut self, hidden: &[f32], token: u32) -> Result<Vec<f32>>;
    /// Forget the sequence (position 0, empty caches, MTP cache too).
    fn reset(&mut self);
    fn name(&self) -> &'static str;
    /// Copy of the main-model state at `pos()` (see `SnapshotKind`).
    fn snapshot(&self, kind: SnapshotKind) -> Result<Snapshot> {
        let _ = kind;
        Err(EngineError::Backend(format!("the {} backend cannot snapshot its state", self.name())))
    }
    /// Returns the main-model state to a snapshot of this backend; the MTP cache
    /// is reset. Errors (foreign or unusable snapshot) leave the state unchanged.
    fn restore(&mut self, snap: &Snapshot) -> Result<()> {
        let _ = snap;
        Err(EngineError::Backend(format!("the {} backend cannot restore a snapshot", self.name())))
    }
    /// The main-model state as a host `State` (the portable, serialisable form).
    fn export_state(&self) -> Result<State> {
        Err(EngineError::Backend(format!("the {} backend cannot export its state", self.name())))
    }
    /// Replaces the main-model state (shapes are checked; the MTP cache is reset).
    fn import_state(&mut self, st: State) -> Result<()> {
        let _ = st;
        Err(EngineError::Backend(format!("the {} backend cannot import a state", self.name())))
    }
}

pub struct CpuBackend {
    pub model: Arc<Model>,
    pub state: State,
    pub mtp_state: Option<State>,
    ctx: usize,
}

impl CpuBackend {
    /// A backend with the model's nominal context (`deepseek4.context_length`),
    /// growing its row storage on demand.
    pub fn new(model: Arc<Model>) -> CpuBackend {
        let ctx = (model.cfg.context_length as usize).max(1);
        let state = model.new_state();
        let mtp_state = model.new_mtp_state();
        CpuBackend { model, state, mtp_state, ctx }
    }

    /// A backend whose state is allocated for `ctx` tokens up front.
    pub fn with_ctx(model: Arc<Model>, ctx: usize) -> CpuBackend {
        let mut b = CpuBackend::new(model);
        b.ctx = ctx.max(1);
        b.state.reserve_for(&b.model.cfg, b.ctx);
        b
    }
}

impl Backend for CpuBackend {
    fn config(&self) -> &Config {
        &self.model.cfg
    }
    fn fingerprint(&self) -> Fingerprint {
        self.model.fingerprint
    }
    fn pos(&self) -> usize {
        self.state.pos
    }
    fn ctx(&self) -> usize {
        self.ctx
    }
    fn state_bytes(&self) -> usize {
        self.state.heap_bytes() + self.mtp_state.as_ref().map_or(0, |s| s.heap_bytes())
    }
    fn kv_rope(&self) -> RopeStore {
        self.state.kv_rope()
    }
    fn eval(&mut self, tokens: &[u32], want: Want) -> Result<EvalOutput> {
        if self.state.pos + tokens.len() > self.ctx {
            return Err(EngineError::ContextFull { pos: self.state.pos + tokens.len(), ctx: self.ctx });
        }
        self.model.eval(&mut self.state, tokens, want)
    }
    fn mtp_eval(&mut self, hidden: &[f32], token: u32) -> Result<Vec<f32>> {
        let st = self.mtp_state.as_mut().ok_or_else(|| EngineError::Input("model has no MTP block".into()))?;
        self.model.mtp_eval(st, hidden, token)
    }
    fn reset(&mut self) {
        // keep the up-front allocation: clear, don't free
        for (l, fresh) in self.state.layers.iter_mut().zip(self.model.new_state().layers) {
            l.ring = fresh.ring;
            l.rows.clear();
            l.idx_rows.clear();
            l.comp = fresh.comp;
            l.idx_comp = fresh.idx_comp;
        }
        self.state.pos = 0;
        self.mtp_state = self.model.new_mtp_state();
    }
    fn name(&self) -> &'static str {
        "cpu"
    }
    fn snapshot(&self, kind: SnapshotKind) -> Result<Snapshot> {
        let (bytes, data): (usize, Box<dyn Any + Send + Sync>) = match kind {
            SnapshotKind::Full => {
                let mut st = self.state.clone();
                for l in st.layers.iter_mut() {
                    l.rows.shrink_to_fit();
                    l.idx_rows.shrink_to_fit();
                }
                (st.heap_bytes(), Box::new(st))
            }
            SnapshotKind::Frontier => {
                let f = self.state.frontier(&self.model.cfg);
                let b = f.layers.iter().map(|l| l.ring.len() * 4 + comp_len(&l.comp) + comp_len(&l.idx_comp)).sum();
                (b, Box::new(f))
            }
        };
        Ok(Snapshot { pos: self.state.pos, kind, bytes, data })
    }
    fn restore(&mut self, snap: &Snapshot) -> Result<()> {
        if let Some(st) = snap.data.downcast_ref::<State>() {
            st.check_shape(&self.model.cfg, &self.model.new_state())?;
            // copy into the existing buffers to keep the up-front capacity
            for (l, s) in self.state.layers.iter_mut().zip(&st.layers) {
                l.ring.clone_from(&s.ring);
                l.rows.clone_from(&s.rows);
                l.idx_rows.clone_from(&s.idx_rows);
                l.comp.clone_from(&s.comp);
                l.idx_comp.clone_from(&s.idx_comp);
            }
            self.state.pos = st.pos;
        } else if let Some(f) = snap.data.downcast_ref::<Frontier>() {
            self.state.rewind_to(&self.model.cfg, f)?;
        } else {
            return Err(EngineError::Backend("snapshot was not made by the CPU backend".into()));
        }
        self.mtp_state = self.model.new_mtp_state();
        Ok(())
    }
    fn export_state(&self) -> Result<State> {
        Ok(self.state.clone())
    }
    fn import_state(&mut self, st: State) -> Result<()> {
        st.check_shape(&self.model.cfg, &self.model.new_state())?;
        if st.pos > self.ctx {
            return Err(EngineError::ContextFull { pos: st.pos, ctx: self.ctx });
        }
        let snap = Snapshot { pos: st.pos, kind: SnapshotKind::Full, bytes: 0, data: Box::new(st) };
        self.restore(&snap)
    }
}

fn comp_len(c: &Option<crate::model::CompState>) -> usize {
    c.as_ref().map_or(0, |c| (c.kv.len() + c.score.len()) * 4)
}
