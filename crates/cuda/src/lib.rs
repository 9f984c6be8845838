//! dsv4-cuda: the CUDA backend (Hopper first), implementing the engine's
//! `Backend` trait with the same math as the CPU reference.
//!
//! CUDA is loaded at run time (cudarc's dynamic loading), so this crate builds
//! and its tests run (and skip) on machines without a GPU. Kernels live in
//! `src/kernels/*.cu`, one family per file, and are compiled by NVRTC for the
//! GPU in use and cached on disk (`$DSV4_KERNEL_CACHE`, default
//! `~/.cache/dsv4/kernels`).

pub mod device;
pub mod error;
pub mod model;
pub mod synthetic;
pub mod bench;

use std::io::IsTerminal;
use std::sync::Arc;

use dsv4_engine::backend::{Snapshot, SnapshotKind};
use dsv4_engine::state_io::Fingerprint;
use dsv4_engine::{Backend, Config, EngineError, EvalOutput, Model, State, Want};

pub use device::{probe, Gpu};
pub use error::CudaError;
pub use model::{GState, GpuModel};

/// Whether a usable CUDA device is present (driver, NVRTC, at least one GPU).
pub fn available() -> std::result::Result<(), String> {
    probe()
}

pub struct CudaBackend {
    pub gpu_model: GpuModel,
    state: GState,
    mtp_state: Option<GState>,
    /// keeps the mmap'd weights (and the CPU config) alive
    pub cpu_model: Arc<Model>,
}

impl CudaBackend {
    /// Upload `model`'s weights to GPU 0 and allocate state for `ctx` tokens.
    pub fn new(model: Arc<Model>, ctx: usize, max_chunk: usize) -> Result<CudaBackend, EngineError> {
        let gpu = Gpu::new(0)?;
        let bar = if std::io::stderr().is_terminal() {
            let b = indicatif::ProgressBar::new(1);
            b.set_style(indicatif::ProgressStyle::with_template("uploading weights {bar:40} {pos}/{len} layers {elapsed}").unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()));
            Some(b)
        } else {
            None
        };
        let mut progress = |done: usize, total: usize| {
            if let Some(b) = &bar {
                b.set_length(total as u64);
                b.set_position(done as u64);
            }
        };
        let mut gm = GpuModel::new(gpu, &model.cfg, &model.w, ctx, max_chunk, &mut progress)?;
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        gm.ablate_kv_fp8 = model.ablate_kv_fp8;
        gm.kv_rope = model.kv_rope;
        gm.q8 = model.numerics == dsv4_engine::Numerics::Q8;
        let state = gm.new_state()?;
        let mtp_state = gm.new_mtp_state()?;
        Ok(CudaBackend { gpu_model: gm, state, mtp_state, cpu_model: model })
    }

    pub fn device_name(&self) -> &str {
        &self.gpu_model.gpu.name
    }
}

impl Backend for CudaBackend {
    fn config(&self) -> &Config {
        &self.gpu_model.cfg
    }
    fn pos(&self) -> usize {
        self.state.pos
    }
    fn eval(&mut self, tokens: &[u32], want: Want) -> Result<EvalOutput, EngineError> {
        self.gpu_model.gpu.bind()?;
        Ok(self.gpu_model.eval(&mut self.state, tokens, want)?)
    }
    fn mtp_eval(&mut self, hidden: &[f32], token: u32) -> Result<Vec<f32>, EngineError> {
        self.gpu_model.gpu.bind()?;
        let st = self.mtp_state.as_mut().ok_or_else(|| EngineError::Input("model has no MTP block".into()))?;
        Ok(self.gpu_model.mtp_eval(st, hidden, token)?)
    }
    fn reset(&mut self) {
        // In place, so captured decode graphs stay valid. A failure here (a dead
        // context) surfaces again at the next eval, which returns the error.
        let _ = self.gpu_model.gpu.bind();
        let _ = self.gpu_model.reset_state(&mut self.state);
        if let Some(m) = self.mtp_state.as_mut() {
            let _ = self.gpu_model.reset_state(m);
        }
    }
    fn name(&self) -> &'static str {
        "cuda"
    }
    fn fingerprint(&self) -> Fingerprint {
        self.cpu_model.fingerprint
    }
    fn ctx(&self) -> usize {
        self.gpu_model.ctx
    }
    fn state_bytes(&self) -> usize {
        self.gpu_model.state_bytes(&self.state) + self.mtp_state.as_ref().map_or(0, |s| self.gpu_model.state_bytes(s))
    }
    fn kv_rope(&self) -> dsv4_engine::pack::RopeStore {
        self.gpu_model.kv_rope
    }
    /// Both kinds are host copies of the full state (a Frontier is restorable
    /// in more cases than promised, never fewer).
    fn snapshot(&self, kind: SnapshotKind) -> Result<Snapshot, EngineError> {
        let st = self.export_state()?;
        let bytes = st.heap_bytes();
        Ok(Snapshot { pos: st.pos, kind, bytes, data: Box::new(st) })
    }
    fn restore(&mut self, snap: &Snapshot) -> Result<(), EngineError> {
        let st = snap.data.downcast_ref::<State>().ok_or_else(|| EngineError::Backend("snapshot was not made by the CUDA backend".into()))?;
        self.import_state(st.clone())
    }
    fn export_state(&self) -> Result<State, EngineError> {
        self.gpu_model.gpu.bind()?;
        Ok(self.gpu_model.export_state(&self.state, &self.gpu_model.cfg.compress_ratios)?)
    }
    fn import_state(&mut self, st: State) -> Result<(), EngineError> {
        self.gpu_model.gpu.bind()?;
        self.gpu_model.import_state(&mut self.state, &st)?;
        if let Some(m) = self.mtp_state.as_mut() {
            self.gpu_model.reset_state(m)?;
        }
        Ok(())
    }
}
