//! A scripted [`Generator`] for protocol tests: it "generates" prepared text
//! a few characters per token, so tests (and the SDK suite, through
//! `DSV4_SERVE_MOCK_SCRIPT`) can drive reasoning, content and DSML tool calls
//! that the tiny fixture model could never produce.
//!
//! Script (JSON): `{"replies": [...], "rules": [{"contains": s, "reply": r}],
//! "token_delay_ms": n, "ctx": n}`. A rule whose `contains` occurs in the last
//! turn of the prompt (text after the last `<｜User｜>`) wins; otherwise the
//! replies are used in turn, cycling. "Tokens" are chunks of up to 3 chars;
//! the cache-hit count is the common character prefix with the previous
//! prompt plus its reply, imitating live-session reuse.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::generator::{FinishReason, Flow, GenError, GenEvent, GenRequest, GenSummary, Generator, ModelInfo, TokenLogprob};

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Rule {
    pub contains: String,
    pub reply: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Script {
    #[serde(default)]
    pub replies: Vec<String>,
    #[serde(default)]
    pub rules: Vec<Rule>,
    #[serde(default)]
    pub token_delay_ms: u64,
    #[serde(default)]
    pub ctx: Option<usize>,
}

pub struct MockGenerator {
    script: Script,
    next: usize,
    last_text: String,
    /// Every request seen, for tests to inspect rendered prompts.
    pub seen: Arc<Mutex<Vec<GenRequest>>>,
}

impl MockGenerator {
    pub fn new(script: Script) -> Self {
        MockGenerator { script, next: 0, last_text: String::new(), seen: Arc::default() }
    }
    /// One reply for every request.
    pub fn always(reply: &str) -> Self {
        Self::new(Script { replies: vec![reply.into()], ..Default::default() })
    }
    pub fn from_json(text: &str) -> Result<Self, serde_json::Error> {
        Ok(Self::new(serde_json::from_str(text)?))
    }

    fn pick(&mut self, prompt: &str) -> String {
        let last_turn = prompt.rsplit(dsv4_text::special::USER).next().unwrap_or(prompt);
        if let Some(r) = self.script.rules.iter().find(|r| last_turn.contains(&r.contains)) {
            return r.reply.clone();
        }
        if self.script.replies.is_empty() {
            return String::new();
        }
        let r = self.script.replies[self.next % self.script.replies.len()].clone();
        self.next += 1;
        r
    }
}

/// Mock token count of a text: chunks of 3 chars.
fn count(s: &str) -> usize {
    s.chars().count().div_ceil(3)
}

impl Generator for MockGenerator {
    fn generate(&mut self, req: GenRequest, events: &mut dyn FnMut(GenEvent) -> Flow) -> Result<GenSummary, GenError> {
        if let Ok(mut seen) = self.seen.lock() {
            seen.push(req.clone());
        }
        let ctx = self.model_info().ctx;
        let prompt_tokens = count(&req.prompt);
        if prompt_tokens + 1 > ctx {
            return Err(GenError::PromptTooLong { tokens: prompt_tokens, ctx });
        }
        let common = self.last_text.bytes().zip(req.prompt.bytes()).take_while(|(a, b)| a == b).count();
        let cached = count(&req.prompt[..floor_char(&req.prompt, common)]) as u32;
        let t0 = Instant::now();
        let mut summary = GenSummary {
            prompt_tokens: prompt_tokens as u32,
            cached_tokens: cached,
            completion_tokens: 0,
            prefill_ms: 0.0,
            decode_ms: 0.0,
            finish: FinishReason::Eos,
        };
        if events(GenEvent::Started { prompt_tokens: prompt_tokens as u32, cached_tokens: cached }) == Flow::Stop {
            summary.finish = FinishReason::Stopped;
            return Ok(summary);
        }
        summary.prefill_ms = t0.elapsed().as_secs_f64() * 1000.0;
        let reply = self.pick(&req.prompt);
        let chars: Vec<char> = reply.chars().collect();
        let t1 = Instant::now();
        let mut generated = String::new();
        for chunk in chars.chunks(3) {
            if summary.completion_tokens >= req.max_tokens || prompt_tokens + summary.completion_tokens as usize >= ctx {
                summary.finish = FinishReason::Length;
                break;
            }
            if self.script.token_delay_ms > 0 {
                std::thread::sleep(Duration::from_millis(self.script.token_delay_ms));
            }
            let text: String = chunk.iter().collect();
            generated.push_str(&text);
            summary.completion_tokens += 1;
            let logprob = req.logprobs.map(|n| TokenLogprob {
                token: text.clone(),
                logprob: -0.5,
                top: (0..n.min(5)).map(|i| (format!("alt{i}"), -1.0 - i as f32)).collect(),
            });
            if events(GenEvent::Token { id: summary.completion_tokens, text, logprob }) == Flow::Stop {
                summary.finish = FinishReason::Stopped;
                break;
            }
        }
        summary.decode_ms = t1.elapsed().as_secs_f64() * 1000.0;
        self.last_text = format!("{}{}", req.prompt, generated);
        Ok(summary)
    }

    fn model_info(&self) -> ModelInfo {
        ModelInfo { id: "deepseek-v4-flash".into(), ctx: self.script.ctx.unwrap_or(65536) }
    }
}

fn floor_char(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}
