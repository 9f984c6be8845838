//! OpenAI Responses (`/v1/responses`, as Codex CLI uses it). Input items map
//! to chat messages (function calls merge into the preceding assistant turn,
//! reasoning items attach to the next assistant turn, `instructions` become a
//! leading system message). The stream follows the Responses lifecycle:
//! `response.created` → `in_progress` → output items (reasoning, message,
//! function_call / custom_tool_call) with their deltas → `response.completed`,
//! `response.incomplete` (max_output_tokens) or `response.failed`. There is no
//! response store, so `previous_response_id` is rejected.

use std::collections::HashSet;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use dsv4_text::chat::{FunctionCall, Message, ToolCall};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::errors::{body_rejection, parse_body, Api, ApiError, Rejection};
use crate::generator::{GenRequest, GenSummary};
use crate::prompt::{self, now_s};
use crate::sse::{self, Running, SseMapper, Step};
use crate::turn::{random_id, timings_json, Finish, Out, Turn};
use crate::AppState;

const API: Api = Api::OpenAi;

#[derive(Debug, Deserialize)]
pub struct ResponsesRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub input: Value,
    #[serde(default)]
    pub instructions: Option<String>,
    #[serde(default)]
    pub tools: Option<Vec<Value>>,
    #[serde(default)]
    pub tool_choice: Option<Value>,
    #[serde(default)]
    pub max_output_tokens: Option<u32>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub reasoning: Option<Value>,
    #[serde(default)]
    pub previous_response_id: Option<Value>,
    #[serde(default)]
    pub conversation: Option<Value>,
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
}

fn parts_text(v: Option<&Value>, what: &str) -> Result<String, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut s = String::new();
            for p in parts {
                match p.get("type").and_then(Value::as_str) {
                    Some("input_text" | "output_text" | "text" | "summary_text" | "reasoning_text") | None => {
                        s.push_str(p.get("text").and_then(Value::as_str).ok_or_else(|| ApiError::invalid(format!("{what}: text parts need a string `text`")))?)
                    }
                    Some("refusal") => s.push_str(p.get("refusal").and_then(Value::as_str).unwrap_or("")),
                    Some(other) => s.push_str(&format!("[Unsupported {other}]")),
                }
            }
            Ok(s)
        }
        Some(_) => Err(ApiError::invalid(format!("{what}: content must be a string or an array of parts"))),
    }
}

fn push_call(out: &mut Vec<Message>, pending_reasoning: &mut String, call: ToolCall) {
    let reuse = matches!(out.last(), Some(m) if m.role == "assistant");
    if !reuse {
        let mut m = Message::assistant("");
        m.reasoning_content = (!pending_reasoning.is_empty()).then(|| std::mem::take(pending_reasoning));
        out.push(m);
    }
    if let Some(m) = out.last_mut() {
        m.tool_calls.get_or_insert_with(Vec::new).push(call);
    }
}

fn convert(req: &ResponsesRequest) -> Result<Vec<Message>, ApiError> {
    let mut out = Vec::new();
    if let Some(i) = &req.instructions {
        out.push(Message::system(i));
    }
    let items = match &req.input {
        Value::String(s) => {
            out.push(Message::user(s));
            return Ok(out);
        }
        Value::Array(a) => a,
        _ => return Err(ApiError::invalid("input must be a string or an array of items")),
    };
    let mut reasoning = String::new();
    for (i, it) in items.iter().enumerate() {
        let what = format!("input[{i}]");
        let ty = it.get("type").and_then(Value::as_str).unwrap_or("message");
        let s = |k: &str| it.get(k).and_then(Value::as_str).map(str::to_string).ok_or_else(|| ApiError::invalid(format!("{what}: `{k}` must be a string")));
        match ty {
            "message" => {
                let role = s("role")?;
                let text = parts_text(it.get("content"), &what)?;
                match role.as_str() {
                    "user" | "system" | "developer" => out.push(Message::new(&role, &text)),
                    "assistant" => {
                        let mut m = Message::assistant(&text);
                        m.reasoning_content = (!reasoning.is_empty()).then(|| std::mem::take(&mut reasoning));
                        out.push(m);
                    }
                    other => return Err(ApiError::invalid(format!("{what}: unknown role {other:?}"))),
                }
            }
            "function_call" => {
                let args = it.get("arguments").map(|a| a.as_str().map(str::to_string).unwrap_or_else(|| a.to_string())).unwrap_or_else(|| "{}".into());
                let call = ToolCall { id: Some(s("call_id")?), kind: Some("function".into()), function: FunctionCall { name: s("name")?, arguments: Value::String(args) } };
                push_call(&mut out, &mut reasoning, call);
            }
            "custom_tool_call" => {
                let args = json!({"input": s("input")?}).to_string();
                let call = ToolCall { id: Some(s("call_id")?), kind: Some("function".into()), function: FunctionCall { name: s("name")?, arguments: Value::String(args) } };
                push_call(&mut out, &mut reasoning, call);
            }
            "local_shell_call" => {
                let args = it.get("action").cloned().unwrap_or(Value::Null).to_string();
                let id = s("call_id").or_else(|_| s("id"))?;
                push_call(&mut out, &mut reasoning, ToolCall { id: Some(id), kind: Some("function".into()), function: FunctionCall { name: "local_shell".into(), arguments: Value::String(args) } });
            }
            "function_call_output" | "custom_tool_call_output" | "local_shell_call_output" => {
                let text = match it.get("output") {
                    Some(Value::String(o)) => o.clone(),
                    other => parts_text(other, &what)?,
                };
                out.push(Message::tool(&s("call_id")?, &text));
            }
            "reasoning" => {
                for key in ["content", "summary"] {
                    let t = parts_text(it.get(key), &what)?;
                    if !t.is_empty() {
                        reasoning = t;
                        break;
                    }
                }
            }
            "item_reference" => return Err(ApiError::invalid(format!("{what}: item references need a response store, which this server does not keep"))),
            other => return Err(ApiError::invalid(format!("{what}: unsupported item type {other:?}"))),
        }
    }
    Ok(out)
}

/// Builds output items and the matching stream events from turn events.
struct Items {
    resp_id: String,
    model: String,
    created: u64,
    custom: HashSet<String>,
    seq: u64,
    items: Vec<Value>,
    /// Index in `items` of the open item.
    open: Option<usize>,
    max_output_tokens: Option<u32>,
}

impl Items {
    fn ev(&mut self, ty: &str, mut v: Value) -> Event {
        v["type"] = json!(ty);
        v["sequence_number"] = json!(self.seq);
        self.seq += 1;
        sse::named(ty, &v)
    }

    fn response(&self, status: &str, s: Option<&GenSummary>, finish: Option<&Finish>, error: Value) -> Value {
        let incomplete = matches!(finish, Some(Finish::Length));
        json!({
            "id": self.resp_id, "object": "response", "created_at": self.created, "status": status, "model": self.model,
            "output": if status == "in_progress" { json!([]) } else { json!(self.items) },
            "error": error,
            "incomplete_details": if incomplete { json!({"reason": "max_output_tokens"}) } else { Value::Null },
            "instructions": null, "max_output_tokens": self.max_output_tokens, "parallel_tool_calls": true,
            "tool_choice": "auto", "tools": [], "temperature": null, "top_p": null, "metadata": {},
            "usage": s.map(|s| json!({
                "input_tokens": s.prompt_tokens, "input_tokens_details": {"cached_tokens": s.cached_tokens},
                "output_tokens": s.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": s.prompt_tokens + s.completion_tokens})),
            "timings": s.map(timings_json),
        })
    }

    fn close(&mut self, evs: &mut Vec<Event>) {
        let Some(i) = self.open.take() else { return };
        let item_id = self.items[i]["id"].clone();
        match self.items[i]["type"].as_str() {
            Some("reasoning") => {
                let text = self.items[i]["content"][0]["text"].clone();
                evs.push(self.ev("response.reasoning_text.done", json!({"item_id": item_id, "output_index": i, "content_index": 0, "text": text})));
            }
            Some("message") => {
                let text = self.items[i]["content"][0]["text"].clone();
                evs.push(self.ev("response.output_text.done", json!({"item_id": item_id, "output_index": i, "content_index": 0, "text": text, "logprobs": []})));
                let part = self.items[i]["content"][0].clone();
                evs.push(self.ev("response.content_part.done", json!({"item_id": item_id, "output_index": i, "content_index": 0, "part": part})));
            }
            Some("function_call") => {
                let (args, name) = (self.items[i]["arguments"].clone(), self.items[i]["name"].clone());
                evs.push(self.ev("response.function_call_arguments.done", json!({"item_id": item_id, "output_index": i, "arguments": args, "name": name})));
            }
            _ => {}
        }
        self.items[i]["status"] = json!("completed");
        let item = self.items[i].clone();
        evs.push(self.ev("response.output_item.done", json!({"output_index": i, "item": item})));
    }

    fn open_item(&mut self, item: Value, evs: &mut Vec<Event>) -> usize {
        self.close(evs);
        let i = self.items.len();
        self.items.push(item.clone());
        evs.push(self.ev("response.output_item.added", json!({"output_index": i, "item": item})));
        self.open = Some(i);
        i
    }

    fn open_type(&self) -> Option<&str> {
        self.open.and_then(|i| self.items[i]["type"].as_str())
    }

    fn feed(&mut self, outs: Vec<Out>, turn: &Turn) -> Vec<Event> {
        let mut evs = Vec::new();
        for o in outs {
            match o {
                Out::Reasoning(d) => {
                    let i = match (self.open_type(), self.open) {
                        (Some("reasoning"), Some(i)) => i,
                        _ => self.open_item(json!({"id": random_id("rs_"), "type": "reasoning", "status": "in_progress", "summary": [], "content": [{"type": "reasoning_text", "text": ""}]}), &mut evs),
                    };
                    append(&mut self.items[i]["content"][0]["text"], &d);
                    let id = self.items[i]["id"].clone();
                    evs.push(self.ev("response.reasoning_text.delta", json!({"item_id": id, "output_index": i, "content_index": 0, "delta": d})));
                }
                Out::Content(d) => {
                    if d.is_empty() {
                        continue;
                    }
                    let i = match (self.open_type(), self.open) {
                        (Some("message"), Some(i)) => i,
                        _ => {
                            let i = self.open_item(json!({"id": random_id("msg_"), "type": "message", "status": "in_progress", "role": "assistant", "content": []}), &mut evs);
                            let part = json!({"type": "output_text", "text": "", "annotations": [], "logprobs": []});
                            self.items[i]["content"] = json!([part.clone()]);
                            let id = self.items[i]["id"].clone();
                            evs.push(self.ev("response.content_part.added", json!({"item_id": id, "output_index": i, "content_index": 0, "part": part})));
                            i
                        }
                    };
                    append(&mut self.items[i]["content"][0]["text"], &d);
                    let id = self.items[i]["id"].clone();
                    evs.push(self.ev("response.output_text.delta", json!({"item_id": id, "output_index": i, "content_index": 0, "delta": d, "logprobs": []})));
                }
                Out::ToolStart { id, name, .. } => {
                    if self.custom.contains(&name) {
                        self.close(&mut evs); // emitted whole at ToolEnd
                    } else {
                        self.open_item(json!({"id": random_id("fc_"), "type": "function_call", "status": "in_progress", "call_id": id, "name": name, "arguments": ""}), &mut evs);
                    }
                }
                Out::ToolArgs { delta, .. } => {
                    if let (Some("function_call"), Some(i)) = (self.open_type(), self.open) {
                        append(&mut self.items[i]["arguments"], &delta);
                        let id = self.items[i]["id"].clone();
                        evs.push(self.ev("response.function_call_arguments.delta", json!({"item_id": id, "output_index": i, "delta": delta})));
                    }
                }
                Out::ToolEnd { index } => {
                    let Some(call) = turn.calls.get(index) else { continue };
                    if self.custom.contains(&call.name) {
                        let input = serde_json::from_str::<Value>(&call.arguments).ok().and_then(|v| v.get("input").and_then(Value::as_str).map(str::to_string)).unwrap_or_else(|| call.arguments.clone());
                        self.open_item(json!({"id": random_id("ctc_"), "type": "custom_tool_call", "status": "in_progress", "call_id": call.id, "name": call.name, "input": input}), &mut evs);
                    }
                    self.close(&mut evs);
                }
            }
        }
        evs
    }

    fn finish(&mut self, result: Result<GenSummary, ApiError>, turn: &Turn) -> Vec<Event> {
        let mut evs = Vec::new();
        match result {
            Ok(s) => {
                self.close(&mut evs);
                // Drop calls abandoned mid-way (malformed DSML): they never completed.
                self.items.retain(|it| it["status"] == "completed");
                let f = turn.finish_reason(&s);
                let (ty, status) = if f == Finish::Length { ("response.incomplete", "incomplete") } else { ("response.completed", "completed") };
                let r = self.response(status, Some(&s), Some(&f), Value::Null);
                evs.push(self.ev(ty, json!({"response": r})));
            }
            Err(e) => {
                let err = json!({"code": if e.status().is_server_error() { "server_error" } else { "invalid_request" }, "message": e.message});
                let r = self.response("failed", None, None, err);
                evs.push(self.ev("response.failed", json!({"response": r})));
            }
        }
        evs
    }
}

fn append(v: &mut Value, s: &str) {
    if let Value::String(t) = v {
        t.push_str(s);
    } else {
        *v = json!(s);
    }
}

pub async fn responses(State(state): State<AppState>, body: Result<Bytes, BytesRejection>) -> Result<Response, Rejection> {
    state.metrics.requests_responses.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let body = body.map_err(|e| body_rejection(API, e))?;
    let req: ResponsesRequest = parse_body(API, &body)?;
    inner(state, req).await.map_err(|e| Rejection(API, e))
}

async fn inner(state: AppState, req: ResponsesRequest) -> Result<Response, ApiError> {
    if req.previous_response_id.as_ref().is_some_and(|v| !v.is_null()) || req.conversation.as_ref().is_some_and(|v| !v.is_null()) {
        return Err(ApiError::invalid("previous_response_id / conversation are not supported: this server keeps no response store; send the full input"));
    }
    let model = req.model.clone().unwrap_or_else(|| state.worker.info.id.clone());
    let effort = req.reasoning.as_ref().and_then(|r| r.get("effort")).and_then(Value::as_str);
    let (mode, effort) = prompt::resolve_thinking(&model, None, None, effort)?;
    let messages = convert(&req)?;
    let raw_tools = req.tools.clone().unwrap_or_default();
    let custom: HashSet<String> = raw_tools.iter().filter(|t| t.get("type").and_then(Value::as_str) == Some("custom")).filter_map(|t| t.get("name").and_then(Value::as_str).map(str::to_string)).collect();
    let none = req.tool_choice.as_ref().and_then(Value::as_str) == Some("none");
    let tools = if none { Vec::new() } else { prompt::normalize_tools(&raw_tools)? };
    let has_tools = !tools.is_empty();
    let text = prompt::render(messages, tools, mode, effort, state.worker.info.ctx, &state.tools)?;
    let max_tokens = match req.max_output_tokens {
        Some(0) => return Err(ApiError::invalid("max_output_tokens must be at least 1")),
        Some(n) => n,
        None => state.cfg.default_max_tokens,
    };
    let gen = GenRequest { prompt: text, sampling: prompt::sampling(req.temperature, req.top_p, None, None, None)?, max_tokens, logprobs: None, dsml_greedy: has_tools };
    let mut run = sse::start(&state, gen, |c| Turn::new(mode, Vec::new(), "call_", c)).await?;
    let items = Items { resp_id: random_id("resp_"), model, created: now_s(), custom, seq: 0, items: Vec::new(), open: None, max_output_tokens: req.max_output_tokens };
    if req.stream.unwrap_or(false) {
        return Ok(sse::stream_response(run, ResponsesStream { items, state: state.clone() }, state.cfg.keepalive));
    }
    let mut items = items;
    let result = loop {
        match run.next().await {
            Step::Outs(outs) => {
                items.feed(outs, &run.turn);
            }
            Step::Done(r) => break r,
        }
    };
    let s = result?;
    run.turn.remember_dsml(&state.tools);
    items.close(&mut Vec::new());
    items.items.retain(|it| it["status"] == "completed");
    let f = run.turn.finish_reason(&s);
    let status = if f == Finish::Length { "incomplete" } else { "completed" };
    Ok(axum::Json(items.response(status, Some(&s), Some(&f), Value::Null)).into_response())
}

struct ResponsesStream {
    items: Items,
    state: AppState,
}

impl SseMapper for ResponsesStream {
    fn start(&mut self, _run: &mut Running) -> Vec<Event> {
        let r = self.items.response("in_progress", None, None, Value::Null);
        vec![self.items.ev("response.created", json!({"response": r.clone()})), self.items.ev("response.in_progress", json!({"response": r}))]
    }
    fn outs(&mut self, run: &mut Running, outs: Vec<Out>) -> Vec<Event> {
        self.items.feed(outs, &run.turn)
    }
    fn done(&mut self, run: &mut Running, result: Result<GenSummary, ApiError>) -> Vec<Event> {
        if result.is_ok() {
            run.turn.remember_dsml(&self.state.tools);
        }
        self.items.finish(result, &run.turn)
    }
}
