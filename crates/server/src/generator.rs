//! The narrow interface between the HTTP layer and whatever produces tokens.
//!
//! The server never sees a tensor: a [`Generator`] receives the rendered
//! prompt text plus sampling knobs and reports generated tokens one by one
//! through a callback whose [`Flow`] answer lets the caller stop generation
//! (client gone, stop sequence matched). One worker thread owns the generator
//! (see `worker.rs`); the real implementation lives in `engine_gen.rs`, a
//! scripted one for tests in `mock.rs`.

use serde::Serialize;

/// Sampling knobs as the request gave them (after defaults).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: u32,
    pub min_p: f32,
    pub seed: Option<u64>,
}

impl Default for Sampling {
    /// ds4's defaults (chat.md §8).
    fn default() -> Self {
        Sampling { temperature: 1.0, top_p: 1.0, top_k: 0, min_p: 0.05, seed: None }
    }
}

/// One generation job, already rendered to prompt text.
#[derive(Debug, Clone)]
pub struct GenRequest {
    /// The exact prompt text (special tokens written out; BOS included).
    pub prompt: String,
    pub sampling: Sampling,
    /// Upper bound on generated tokens.
    pub max_tokens: u32,
    /// `Some(n)`: report the sampled token's logprob and the top `n` alternatives.
    pub logprobs: Option<u32>,
    /// Sample DSML structure (tags, headers, JSON punctuation) greedily; only
    /// argument payloads use `sampling` (set when tools are offered).
    pub dsml_greedy: bool,
}

/// A token's log-probability and the most likely alternatives.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub top: Vec<(String, f32)>,
}

/// What a generator reports while it runs.
#[derive(Debug, Clone, PartialEq)]
pub enum GenEvent {
    /// The prompt was accepted (tokenized and fits the context); prefill starts.
    /// `cached_tokens` of it are reused from the live session or disk cache.
    Started { prompt_tokens: u32, cached_tokens: u32 },
    /// One sampled token and its decoded text (may be empty while a UTF-8
    /// character is incomplete).
    Token { id: u32, text: String, logprob: Option<TokenLogprob> },
}

/// The callback's answer: go on, or stop at once (no further tokens).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Stop,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The model emitted end-of-sequence.
    Eos,
    /// `max_tokens` reached (or the context filled up).
    Length,
    /// The callback said [`Flow::Stop`] (stop sequence or client gone).
    Stopped,
}

/// Counts and timings of one finished generation.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct GenSummary {
    pub prompt_tokens: u32,
    pub cached_tokens: u32,
    pub completion_tokens: u32,
    pub prefill_ms: f64,
    pub decode_ms: f64,
    pub finish: FinishReason,
}

impl GenSummary {
    /// Prompt tokens actually computed per second of prefill.
    pub fn prefill_tps(&self) -> f64 {
        rate(self.prompt_tokens.saturating_sub(self.cached_tokens), self.prefill_ms)
    }
    pub fn decode_tps(&self) -> f64 {
        rate(self.completion_tokens, self.decode_ms)
    }
}

fn rate(n: u32, ms: f64) -> f64 {
    if ms > 0.0 {
        n as f64 * 1000.0 / ms
    } else {
        0.0
    }
}

/// Failures a generator reports; mapped to HTTP in `errors.rs`.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum GenError {
    #[error("the prompt has {tokens} tokens; the context holds {ctx} (leave room for the reply)")]
    PromptTooLong { tokens: usize, ctx: usize },
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("generation failed: {0}")]
    Internal(String),
}

/// Static facts about the served model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    /// Canonical model id (e.g. `deepseek-v4-flash`).
    pub id: String,
    /// Context size in tokens.
    pub ctx: usize,
}

/// Produces tokens for rendered prompts. Owned by exactly one worker thread.
pub trait Generator: Send {
    /// Runs one request to completion, reporting through `events`. Must emit
    /// [`GenEvent::Started`] before the first token, and stop promptly after
    /// `events` answers [`Flow::Stop`].
    fn generate(&mut self, req: GenRequest, events: &mut dyn FnMut(GenEvent) -> Flow) -> Result<GenSummary, GenError>;
    fn model_info(&self) -> ModelInfo;
}
