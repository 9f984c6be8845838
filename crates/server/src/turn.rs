//! API-neutral handling of one assistant turn as it is generated: decoded
//! text goes through the DSML [`StreamParser`] (reasoning / content / tool
//! calls), stop sequences are matched on content (holding back a tail that
//! could still become one), tool calls get unguessable ids, and the exact
//! sampled DSML block is remembered for byte-identical replay.
//!
//! Each API module maps the resulting [`Out`] events to its own SSE shapes or
//! folds them into one response object.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use dsv4_text::chat::ThinkingMode;
use dsv4_text::dsml::{Event, StreamParser, TOOL_CALLS_CLOSE, TOOL_CALLS_OPEN};

use crate::generator::{FinishReason, GenSummary, TokenLogprob};
use crate::toolmem::ToolMemory;

/// API-neutral output events.
#[derive(Debug, Clone, PartialEq)]
pub enum Out {
    Reasoning(String),
    Content(String),
    ToolStart { index: usize, id: String, name: String },
    ToolArgs { index: usize, delta: String },
    ToolEnd { index: usize },
}

/// Why the turn ended, in API-neutral terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finish {
    Stop,
    StopSequence(String),
    Length,
    ToolCalls,
}

#[derive(Debug, Clone, Default)]
pub struct Call {
    pub id: String,
    pub name: String,
    pub arguments: String,
    pub done: bool,
}

/// The accumulated turn.
pub struct Turn {
    parser: StreamParser,
    stops: Vec<String>,
    /// Content not yet released because it could begin a stop sequence.
    held: String,
    stop_hit: Option<String>,
    raw: String,
    id_prefix: &'static str,
    cancel: Arc<AtomicBool>,
    pub reasoning: String,
    pub content: String,
    pub calls: Vec<Call>,
    pub logprobs: Vec<TokenLogprob>,
    pub errors: Vec<String>,
}

/// `prefix` + 24 random alphanumerics (about 143 bits).
pub fn random_id(prefix: &str) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut bytes = [0u8; 24];
    if getrandom::fill(&mut bytes).is_err() {
        // No OS randomness: fall back to time and a counter (still unique).
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        return format!("{prefix}{t:x}{n:x}");
    }
    let mut s = String::with_capacity(prefix.len() + 24);
    s.push_str(prefix);
    s.extend(bytes.iter().map(|b| ALPHABET[(*b as usize) % ALPHABET.len()] as char));
    s
}

impl Turn {
    pub fn new(mode: ThinkingMode, stops: Vec<String>, id_prefix: &'static str, cancel: Arc<AtomicBool>) -> Self {
        Turn {
            parser: StreamParser::new(mode),
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
            stop_hit: None,
            raw: String::new(),
            id_prefix,
            cancel,
            reasoning: String::new(),
            content: String::new(),
            calls: Vec::new(),
            logprobs: Vec::new(),
            errors: Vec::new(),
        }
    }

    /// Feeds one token's decoded text.
    pub fn push(&mut self, text: &str, logprob: Option<TokenLogprob>) -> Vec<Out> {
        if self.stop_hit.is_some() {
            return Vec::new();
        }
        if let Some(l) = logprob {
            self.logprobs.push(l);
        }
        self.raw.push_str(text);
        let evs = self.parser.push(text);
        self.map(evs, false)
    }

    /// Ends the input: flushes held text; reports truncated DSML.
    pub fn finish(&mut self) -> Vec<Out> {
        if self.stop_hit.is_some() {
            return Vec::new();
        }
        let evs = self.parser.finish();
        self.map(evs, true)
    }

    fn map(&mut self, evs: Vec<Event>, at_end: bool) -> Vec<Out> {
        let mut out = Vec::new();
        for e in evs {
            if self.stop_hit.is_some() {
                break;
            }
            match e {
                Event::Reasoning(s) => {
                    self.reasoning.push_str(&s);
                    out.push(Out::Reasoning(s));
                }
                Event::Content(s) => self.content_text(&s, &mut out),
                Event::ToolCallStart { index, name, .. } => {
                    self.flush_held(&mut out);
                    let id = random_id(self.id_prefix);
                    self.calls.push(Call { id: id.clone(), name: name.clone(), ..Default::default() });
                    out.push(Out::ToolStart { index, id, name });
                }
                Event::ToolCallArgs { index, delta } => {
                    if let Some(c) = self.calls.get_mut(index) {
                        c.arguments.push_str(&delta);
                    }
                    out.push(Out::ToolArgs { index, delta });
                }
                Event::ToolCallEnd { index } => {
                    if let Some(c) = self.calls.get_mut(index) {
                        c.done = true;
                    }
                    out.push(Out::ToolEnd { index });
                }
                Event::Error { message, .. } => {
                    tracing::warn!("malformed DSML in model output: {message}");
                    self.errors.push(message);
                }
            }
        }
        if at_end {
            self.flush_held(&mut out);
        }
        out
    }

    fn flush_held(&mut self, out: &mut Vec<Out>) {
        if !self.held.is_empty() {
            let s = std::mem::take(&mut self.held);
            self.content.push_str(&s);
            out.push(Out::Content(s));
        }
    }

    fn content_text(&mut self, s: &str, out: &mut Vec<Out>) {
        if self.stops.is_empty() {
            self.content.push_str(s);
            out.push(Out::Content(s.to_string()));
            return;
        }
        self.held.push_str(s);
        // Earliest complete stop sequence in the held text.
        if let Some((pos, stop)) = self.stops.iter().filter_map(|st| self.held.find(st.as_str()).map(|p| (p, st.clone()))).min_by_key(|(p, _)| *p) {
            let before = self.held[..pos].to_string();
            self.held.clear();
            if !before.is_empty() {
                self.content.push_str(&before);
                out.push(Out::Content(before));
            }
            self.stop_hit = Some(stop);
            self.cancel.store(true, Ordering::Relaxed);
            return;
        }
        // Release everything that cannot be the start of a stop sequence.
        let keep_from = (0..self.held.len())
            .filter(|&p| self.held.is_char_boundary(p))
            .find(|&p| self.stops.iter().any(|st| st.starts_with(&self.held[p..])))
            .unwrap_or(self.held.len());
        if keep_from > 0 {
            let rel: String = self.held[..keep_from].to_string();
            self.held.drain(..keep_from);
            self.content.push_str(&rel);
            out.push(Out::Content(rel));
        }
    }

    /// Completed tool calls.
    pub fn done_calls(&self) -> Vec<&Call> {
        self.calls.iter().filter(|c| c.done).collect()
    }

    pub fn finish_reason(&self, s: &GenSummary) -> Finish {
        if let Some(st) = &self.stop_hit {
            return Finish::StopSequence(st.clone());
        }
        if !self.done_calls().is_empty() && s.finish != FinishReason::Length {
            return Finish::ToolCalls;
        }
        match s.finish {
            FinishReason::Length => Finish::Length,
            _ => Finish::Stop,
        }
    }

    /// Stores the exact sampled DSML block under the ids of its calls.
    pub fn remember_dsml(&self, mem: &ToolMemory) {
        let ids: Vec<String> = self.done_calls().iter().map(|c| c.id.clone()).collect();
        if ids.is_empty() {
            return;
        }
        let Some(open) = self.raw.find(TOOL_CALLS_OPEN) else { return };
        let Some(close_rel) = self.raw[open..].find(TOOL_CALLS_CLOSE) else { return };
        let start = if self.raw[..open].ends_with("\n\n") { open - 2 } else { open };
        let end = open + close_rel + TOOL_CALLS_CLOSE.len();
        mem.remember(ids, self.raw[start..end].to_string());
    }
}

/// Sums up usage/timing for the responses' `timings` objects.
pub fn timings_json(s: &GenSummary) -> serde_json::Value {
    serde_json::json!({
        "prompt_tokens": s.prompt_tokens,
        "cached_tokens": s.cached_tokens,
        "completion_tokens": s.completion_tokens,
        "prefill_ms": round3(s.prefill_ms),
        "decode_ms": round3(s.decode_ms),
        "prefill_tokens_per_second": round3(s.prefill_tps()),
        "decode_tokens_per_second": round3(s.decode_tps()),
    })
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
