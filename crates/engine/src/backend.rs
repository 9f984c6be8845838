//! The coarse, model-specific backend interface: a backend owns one sequence's
//! state and evaluates chunks of tokens on it. The CPU backend wraps `Model`;
//! the CUDA backend (crate dsv4-cuda) implements the same trait.

use std::sync::Arc;

use crate::config::Config;
use crate::error::{EngineError, Result};
use crate::model::{EvalOutput, Model, State, Want};

pub trait Backend: Send {
    fn config(&self) -> &Config;
    /// Number of tokens consumed so far (the next token's position).
    fn pos(&self) -> usize;
    /// Consume `tokens` at `pos()`; returns the last (or every) token's logits.
    fn eval(&mut self, tokens: &[u32], want: Want) -> Result<EvalOutput>;
    /// MTP block on a main-model hidden state (`[hc][dim]`) and token; advances the MTP state.
    fn mtp_eval(&mut self, hidden: &[f32], token: u32) -> Result<Vec<f32>>;
    /// Forget the sequence (position 0, empty caches, MTP cache too).
    fn reset(&mut self);
    fn name(&self) -> &'static str;
}

pub struct CpuBackend {
    pub model: Arc<Model>,
    pub state: State,
    pub mtp_state: Option<State>,
}

impl CpuBackend {
    pub fn new(model: Arc<Model>) -> CpuBackend {
        let state = model.new_state();
        let mtp_state = model.new_mtp_state();
        CpuBackend { model, state, mtp_state }
    }
}

impl Backend for CpuBackend {
    fn config(&self) -> &Config {
        &self.model.cfg
    }
    fn pos(&self) -> usize {
        self.state.pos
    }
    fn eval(&mut self, tokens: &[u32], want: Want) -> Result<EvalOutput> {
        self.model.eval(&mut self.state, tokens, want)
    }
    fn mtp_eval(&mut self, hidden: &[f32], token: u32) -> Result<Vec<f32>> {
        let st = self.mtp_state.as_mut().ok_or_else(|| EngineError::Input("model has no MTP block".into()))?;
        self.model.mtp_eval(st, hidden, token)
    }
    fn reset(&mut self) {
        self.state = self.model.new_state();
        self.mtp_state = self.model.new_mtp_state();
    }
    fn name(&self) -> &'static str {
        "cpu"
    }
}
