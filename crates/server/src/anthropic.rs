//! Anthropic Messages (`/v1/messages`, as Claude Code uses it). Content blocks
//! map to the chat encoding: `text` → content, `thinking` → reasoning,
//! `tool_use` → assistant tool calls (input JSON as arguments), `tool_result`
//! → tool messages (rendered as `<tool_result>` blocks). Streams thinking,
//! text and `tool_use` blocks (`input_json_delta`) in Anthropic's event
//! lifecycle, errors in `{"type":"error","error":{…}}`.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use dsv4_text::chat::{FunctionCall, Message, ThinkingMode, ToolCall};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::errors::{body_rejection, parse_body, Api, ApiError, Rejection};
use crate::generator::{GenRequest, GenSummary};
use crate::prompt;
use crate::sse::{self, Running, SseMapper};
use crate::turn::{random_id, timings_json, Finish, Out, Turn};
use crate::AppState;

const API: Api = Api::Anthropic;

#[derive(Debug, Deserialize)]
pub struct AnthMessage {
    pub role: String,
    pub content: Value,
}

#[derive(Debug, Deserialize)]
pub struct MessagesRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub messages: Vec<AnthMessage>,
    #[serde(default)]
    pub system: Option<Value>,
    #[serde(default)]
    pub max_tokens: Option<u32>,
    #[serde(default)]
    pub tools: Option<Vec<Value>>,
    #[serde(default)]
    pub tool_choice: Option<Value>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub top_k: Option<i64>,
    #[serde(default)]
    pub stop_sequences: Option<Value>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub thinking: Option<Value>,
    #[serde(default)]
    pub output_config: Option<Value>,
}

/// `system`: a string or text blocks (joined by newline; `x-anthropic-*` parts dropped).
fn system_text(v: Option<&Value>) -> Result<Option<String>, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Array(blocks)) => {
            let mut parts = Vec::new();
            for b in blocks {
                let t = b.get("text").and_then(Value::as_str).ok_or_else(|| ApiError::invalid("system blocks must be text blocks"))?;
                if !t.starts_with("x-anthropic-") {
                    parts.push(t.to_string());
                }
            }
            Ok(Some(parts.join("\n")))
        }
        Some(_) => Err(ApiError::invalid("system must be a string or an array of text blocks")),
    }
}

/// A tool result's content: a string or blocks (text joined by "\n\n").
fn tool_result_text(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|b| match b.get("type").and_then(Value::as_str) {
                Some("text") => b.get("text").and_then(Value::as_str).unwrap_or("").to_string(),
                t => format!("[Unsupported {}]", t.unwrap_or("None")),
            })
            .collect::<Vec<_>>()
            .join("\n\n"),
        Some(other) => other.to_string(),
    }
}

fn convert(req: &MessagesRequest) -> Result<Vec<Message>, ApiError> {
    let mut out = Vec::new();
    if let Some(s) = system_text(req.system.as_ref())? {
        out.push(Message::system(&s));
    }
    for (i, m) in req.messages.iter().enumerate() {
        let what = format!("messages[{i}]");
        if m.role != "user" && m.role != "assistant" {
            return Err(ApiError::invalid(format!("{what}: role must be \"user\" or \"assistant\", not {:?}", m.role)));
        }
        let blocks: Vec<Value> = match &m.content {
            Value::String(s) => vec![json!({"type": "text", "text": s})],
            Value::Array(a) => a.clone(),
            _ => return Err(ApiError::invalid(format!("{what}: content must be a string or an array of blocks"))),
        };
        let mut text = String::new();
        let mut reasoning = String::new();
        let mut calls = Vec::new();
        for (k, b) in blocks.iter().enumerate() {
            let ty = b.get("type").and_then(Value::as_str).ok_or_else(|| ApiError::invalid(format!("{what}.content[{k}]: a block needs a `type`")))?;
            match ty {
                "text" => text.push_str(b.get("text").and_then(Value::as_str).ok_or_else(|| ApiError::invalid(format!("{what}.content[{k}].text must be a string")))?),
                "thinking" => reasoning.push_str(b.get("thinking").and_then(Value::as_str).unwrap_or("")),
                "redacted_thinking" => {}
                "tool_use" | "server_tool_use" => {
                    let id = b.get("id").and_then(Value::as_str).ok_or_else(|| ApiError::invalid(format!("{what}.content[{k}]: tool_use needs an `id`")))?;
                    let name = b.get("name").and_then(Value::as_str).ok_or_else(|| ApiError::invalid(format!("{what}.content[{k}]: tool_use needs a `name`")))?;
                    let input = b.get("input").cloned().unwrap_or_else(|| json!({}));
                    calls.push(ToolCall { id: Some(id.into()), kind: Some("function".into()), function: FunctionCall { name: name.into(), arguments: Value::String(input.to_string()) } });
                }
                "tool_result" => {
                    if m.role != "user" {
                        return Err(ApiError::invalid(format!("{what}.content[{k}]: tool_result belongs in a user message")));
                    }
                    let id = b.get("tool_use_id").and_then(Value::as_str).unwrap_or("");
                    if !text.is_empty() {
                        out.push(Message::user(&std::mem::take(&mut text)));
                    }
                    out.push(Message::tool(id, &tool_result_text(b.get("content"))));
                }
                "image" | "document" => text.push_str(&format!("[Unsupported {ty}]")),
                other => return Err(ApiError::invalid(format!("{what}.content[{k}]: unknown block type {other:?}"))),
            }
        }
        if m.role == "assistant" {
            let mut msg = Message::assistant(&text);
            msg.reasoning_content = (!reasoning.is_empty()).then_some(reasoning);
            msg.tool_calls = (!calls.is_empty()).then_some(calls);
            out.push(msg);
        } else if !text.is_empty() || !matches!(out.last(), Some(l) if l.role == "tool") {
            out.push(Message::user(&text));
        }
    }
    Ok(out)
}

fn stop_reason(f: &Finish) -> (&'static str, Value) {
    match f {
        Finish::Stop => ("end_turn", Value::Null),
        Finish::StopSequence(s) => ("stop_sequence", json!(s)),
        Finish::Length => ("max_tokens", Value::Null),
        Finish::ToolCalls => ("tool_use", Value::Null),
    }
}

fn usage(s: &GenSummary) -> Value {
    json!({"input_tokens": s.prompt_tokens.saturating_sub(s.cached_tokens), "output_tokens": s.completion_tokens,
        "cache_read_input_tokens": s.cached_tokens, "cache_creation_input_tokens": 0})
}

/// Tool input as an object (malformed arguments are wrapped, never dropped).
fn input_object(args: &str) -> Value {
    match serde_json::from_str::<Value>(args) {
        Ok(v @ Value::Object(_)) => v,
        _ => json!({"arguments": args}),
    }
}

pub async fn messages(State(state): State<AppState>, body: Result<Bytes, BytesRejection>) -> Result<Response, Rejection> {
    state.metrics.requests_messages.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let body = body.map_err(|e| body_rejection(API, e))?;
    let req: MessagesRequest = parse_body(API, &body)?;
    inner(state, req).await.map_err(|e| Rejection(API, e))
}

async fn inner(state: AppState, req: MessagesRequest) -> Result<Response, ApiError> {
    let model = req.model.clone().unwrap_or_else(|| state.worker.info.id.clone());
    let effort = req.output_config.as_ref().and_then(|o| o.get("effort")).and_then(Value::as_str);
    let (mode, effort) = prompt::resolve_thinking(&model, req.thinking.as_ref(), None, effort)?;
    let messages = convert(&req)?;
    let none = req.tool_choice.as_ref().and_then(|t| t.get("type")).and_then(Value::as_str) == Some("none");
    let tools = match (&req.tools, none) {
        (Some(t), false) => prompt::normalize_tools(t)?,
        _ => Vec::new(),
    };
    let has_tools = !tools.is_empty();
    let text = prompt::render(messages, tools, mode, effort, state.worker.info.ctx, &state.tools)?;
    let max_tokens = match req.max_tokens {
        Some(0) => return Err(ApiError::invalid("max_tokens must be at least 1")),
        Some(n) => n,
        None => state.cfg.default_max_tokens,
    };
    let gen = GenRequest {
        prompt: text,
        sampling: prompt::sampling(req.temperature, req.top_p, req.top_k, None, None)?,
        max_tokens,
        logprobs: None,
        dsml_greedy: has_tools,
    };
    let stops = prompt::stop_list(req.stop_sequences.as_ref())?;
    let mut run = sse::start(&state, gen, |c| Turn::new(mode, stops, "toolu_", c)).await?;
    let id = random_id("msg_");
    if req.stream.unwrap_or(false) {
        let m = MessagesStream { id, model, state: state.clone(), open: None, next_block: 0 };
        return Ok(sse::stream_response(run, m, state.cfg.keepalive));
    }
    let s = run.collect().await?;
    let t = &run.turn;
    t.remember_dsml(&state.tools);
    let mut content = Vec::new();
    if mode == ThinkingMode::Thinking && !t.reasoning.is_empty() {
        content.push(json!({"type": "thinking", "thinking": t.reasoning, "signature": ""}));
    }
    if !t.content.is_empty() {
        content.push(json!({"type": "text", "text": t.content}));
    }
    for c in t.done_calls() {
        content.push(json!({"type": "tool_use", "id": c.id, "name": c.name, "input": input_object(&c.arguments)}));
    }
    let (reason, seq) = stop_reason(&t.finish_reason(&s));
    Ok(axum::Json(json!({"id": id, "type": "message", "role": "assistant", "model": model, "content": content,
        "stop_reason": reason, "stop_sequence": seq, "usage": usage(&s), "timings": timings_json(&s)}))
    .into_response())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Open {
    Thinking,
    Text,
    Tool(usize),
}

struct MessagesStream {
    id: String,
    model: String,
    state: AppState,
    /// The content block currently open and its index.
    open: Option<(Open, usize)>,
    next_block: usize,
}

impl MessagesStream {
    fn close(&mut self, evs: &mut Vec<Event>) {
        if let Some((kind, idx)) = self.open.take() {
            if kind == Open::Thinking {
                evs.push(sse::named("content_block_delta", &json!({"type": "content_block_delta", "index": idx, "delta": {"type": "signature_delta", "signature": ""}})));
            }
            evs.push(sse::named("content_block_stop", &json!({"type": "content_block_stop", "index": idx})));
        }
    }

    /// Makes `kind` the open block (closing another), returning its index.
    fn ensure(&mut self, kind: Open, block: Value, evs: &mut Vec<Event>) -> usize {
        if let Some((k, idx)) = self.open {
            if k == kind {
                return idx;
            }
        }
        self.close(evs);
        let idx = self.next_block;
        self.next_block += 1;
        evs.push(sse::named("content_block_start", &json!({"type": "content_block_start", "index": idx, "content_block": block})));
        self.open = Some((kind, idx));
        idx
    }
}

impl SseMapper for MessagesStream {
    fn start(&mut self, run: &mut Running) -> Vec<Event> {
        vec![sse::named(
            "message_start",
            &json!({"type": "message_start", "message": {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": [],
                "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": run.prompt_tokens.saturating_sub(run.cached_tokens), "output_tokens": 0, "cache_read_input_tokens": run.cached_tokens, "cache_creation_input_tokens": 0}}}),
        )]
    }

    fn outs(&mut self, _run: &mut Running, outs: Vec<Out>) -> Vec<Event> {
        let mut evs = Vec::new();
        for o in outs {
            match o {
                Out::Reasoning(s) => {
                    let idx = self.ensure(Open::Thinking, json!({"type": "thinking", "thinking": "", "signature": ""}), &mut evs);
                    evs.push(sse::named("content_block_delta", &json!({"type": "content_block_delta", "index": idx, "delta": {"type": "thinking_delta", "thinking": s}})));
                }
                Out::Content(s) => {
                    if s.is_empty() {
                        continue;
                    }
                    let idx = self.ensure(Open::Text, json!({"type": "text", "text": ""}), &mut evs);
                    evs.push(sse::named("content_block_delta", &json!({"type": "content_block_delta", "index": idx, "delta": {"type": "text_delta", "text": s}})));
                }
                Out::ToolStart { index, id, name } => {
                    self.close(&mut evs);
                    self.ensure(Open::Tool(index), json!({"type": "tool_use", "id": id, "name": name, "input": {}}), &mut evs);
                }
                Out::ToolArgs { index, delta } => {
                    if let Some((Open::Tool(i), idx)) = self.open {
                        if i == index {
                            evs.push(sse::named("content_block_delta", &json!({"type": "content_block_delta", "index": idx, "delta": {"type": "input_json_delta", "partial_json": delta}})));
                        }
                    }
                }
                Out::ToolEnd { .. } => self.close(&mut evs),
            }
        }
        evs
    }

    fn done(&mut self, run: &mut Running, result: Result<GenSummary, ApiError>) -> Vec<Event> {
        let mut evs = Vec::new();
        match result {
            Ok(s) => {
                // A tool block left open was abandoned (malformed DSML): close it anyway.
                self.close(&mut evs);
                run.turn.remember_dsml(&self.state.tools);
                let (reason, seq) = stop_reason(&run.turn.finish_reason(&s));
                evs.push(sse::named("message_delta", &json!({"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": seq},
                    "usage": {"output_tokens": s.completion_tokens, "input_tokens": s.prompt_tokens.saturating_sub(s.cached_tokens), "cache_read_input_tokens": s.cached_tokens}, "timings": timings_json(&s)})));
                evs.push(sse::named("message_stop", &json!({"type": "message_stop"})));
            }
            Err(e) => evs.push(sse::named("error", &e.body(API))),
        }
        evs
    }
}
