//! OpenAI Chat Completions (`/v1/chat/completions`), legacy Completions
//! (`/v1/completions`) and the model list. Reasoning streams as
//! `delta.reasoning_content`, tool calls as a header chunk (id, name) followed
//! by `function.arguments` deltas as the DSML arrives.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use dsv4_text::chat::{FunctionCall, Message, ThinkingMode, ToolCall};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::errors::{body_rejection, parse_body, Api, ApiError, Kind, Rejection};
use crate::generator::{GenRequest, GenSummary, TokenLogprob};
use crate::prompt::{self, now_s, CHAT_ALIAS, REASONER_ALIAS};
use crate::sse::{self, Running, SseMapper};
use crate::turn::{random_id, timings_json, Finish, Out, Turn};
use crate::AppState;

const API: Api = Api::OpenAi;

#[derive(Debug, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
}

#[derive(Debug, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<Value>,
    #[serde(default)]
    pub reasoning_content: Option<String>,
    #[serde(default)]
    pub tool_calls: Option<Vec<ToolCallIn>>,
    #[serde(default)]
    pub tool_call_id: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct ToolCallIn {
    #[serde(default)]
    pub id: Option<String>,
    pub function: FunctionIn,
}

#[derive(Debug, Deserialize)]
pub struct FunctionIn {
    pub name: String,
    #[serde(default)]
    pub arguments: Option<Value>,
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub messages: Vec<ChatMessage>,
    #[serde(default)]
    pub tools: Option<Vec<Value>>,
    #[serde(default)]
    pub tool_choice: Option<Value>,
    #[serde(default)]
    pub max_tokens: Option<u32>,
    #[serde(default)]
    pub max_completion_tokens: Option<u32>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub top_k: Option<i64>,
    #[serde(default)]
    pub min_p: Option<f64>,
    #[serde(default)]
    pub seed: Option<i64>,
    #[serde(default)]
    pub stop: Option<Value>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub thinking: Option<Value>,
    #[serde(default)]
    pub think: Option<bool>,
    #[serde(default)]
    pub reasoning_effort: Option<String>,
    #[serde(default)]
    pub logprobs: Option<bool>,
    #[serde(default)]
    pub top_logprobs: Option<u32>,
    #[serde(default)]
    pub n: Option<u32>,
}

/// Text of OpenAI content: a string, null, or parts whose `text` fields are concatenated.
pub fn content_text(c: Option<&Value>, what: &str) -> Result<String, ApiError> {
    match c {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut s = String::new();
            for p in parts {
                match p {
                    Value::String(t) => s.push_str(t),
                    Value::Object(o) => {
                        if let Some(t) = o.get("text") {
                            s.push_str(t.as_str().ok_or_else(|| ApiError::invalid(format!("{what}: a part's `text` must be a string")))?);
                        }
                    }
                    _ => return Err(ApiError::invalid(format!("{what}: content parts must be objects"))),
                }
            }
            Ok(s)
        }
        Some(_) => Err(ApiError::invalid(format!("{what}: content must be a string, null or an array of parts"))),
    }
}

/// Arguments as the encoder wants them (a JSON string; objects are serialised).
fn arguments_value(a: Option<&Value>) -> Value {
    match a {
        None | Some(Value::Null) => Value::String("{}".into()),
        Some(Value::String(s)) => Value::String(s.clone()),
        Some(other) => Value::String(other.to_string()),
    }
}

fn convert_messages(msgs: &[ChatMessage]) -> Result<Vec<Message>, ApiError> {
    let mut out = Vec::with_capacity(msgs.len());
    for (i, m) in msgs.iter().enumerate() {
        let what = format!("messages[{i}]");
        let role = match m.role.as_str() {
            "system" | "developer" | "user" | "assistant" | "tool" => m.role.as_str(),
            "function" => "tool",
            other => return Err(ApiError::invalid(format!("{what}: unknown role {other:?} (system, developer, user, assistant, tool, function)"))),
        };
        let text = content_text(m.content.as_ref(), &what)?;
        let mut msg = Message::new(role, &text);
        if role == "assistant" {
            msg.reasoning_content = m.reasoning_content.clone().filter(|r| !r.is_empty());
            if let Some(calls) = &m.tool_calls {
                msg.tool_calls = Some(
                    calls
                        .iter()
                        .map(|c| ToolCall { id: c.id.clone(), kind: Some("function".into()), function: FunctionCall { name: c.function.name.clone(), arguments: arguments_value(c.function.arguments.as_ref()) } })
                        .collect(),
                );
            }
        }
        if role == "tool" {
            msg.tool_call_id = m.tool_call_id.clone().or_else(|| m.name.clone());
        }
        out.push(msg);
    }
    Ok(out)
}

pub fn model_list(state: &AppState) -> Value {
    let id = &state.worker.info.id;
    let created = 1_745_000_000u64;
    let ids = [id.as_str(), CHAT_ALIAS, REASONER_ALIAS];
    json!({"object": "list", "data": ids.iter().map(|m| json!({"id": m, "object": "model", "created": created, "owned_by": "deepseek", "context_length": state.worker.info.ctx})).collect::<Vec<_>>()})
}

pub async fn list_models(State(state): State<AppState>) -> Response {
    axum::Json(model_list(&state)).into_response()
}

pub async fn get_model(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    let list = model_list(&state);
    match list["data"].as_array().and_then(|a| a.iter().find(|m| m["id"] == id.as_str())) {
        Some(m) => axum::Json(m.clone()).into_response(),
        None => ApiError::new(Kind::NotFound, format!("model {id:?} does not exist")).with_code("model_not_found").into_response_for(API),
    }
}

fn max_tokens(state: &AppState, a: Option<u32>, b: Option<u32>) -> Result<u32, ApiError> {
    match a.or(b) {
        Some(0) => Err(ApiError::invalid("max_tokens must be at least 1")),
        Some(n) => Ok(n),
        None => Ok(state.cfg.default_max_tokens),
    }
}

fn logprobs_n(logprobs: Option<bool>, top: Option<u32>) -> Result<Option<u32>, ApiError> {
    match (logprobs.unwrap_or(false), top) {
        (_, Some(n)) if n > 20 => Err(ApiError::invalid("top_logprobs must be at most 20")),
        (true, n) => Ok(Some(n.unwrap_or(0))),
        (false, Some(_)) => Err(ApiError::invalid("top_logprobs requires logprobs: true")),
        (false, None) => Ok(None),
    }
}

pub fn logprobs_json(l: &[TokenLogprob]) -> Value {
    json!({"content": l.iter().map(|t| json!({
        "token": t.token, "logprob": t.logprob, "bytes": t.token.as_bytes(),
        "top_logprobs": t.top.iter().map(|(s, p)| json!({"token": s, "logprob": p, "bytes": s.as_bytes()})).collect::<Vec<_>>()
    })).collect::<Vec<_>>()})
}

pub fn usage_json(s: &GenSummary) -> Value {
    json!({
        "prompt_tokens": s.prompt_tokens, "completion_tokens": s.completion_tokens,
        "total_tokens": s.prompt_tokens + s.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": s.cached_tokens},
    })
}

fn finish_str(f: &Finish) -> &'static str {
    match f {
        Finish::Stop | Finish::StopSequence(_) => "stop",
        Finish::Length => "length",
        Finish::ToolCalls => "tool_calls",
    }
}

pub async fn chat_completions(State(state): State<AppState>, body: Result<Bytes, BytesRejection>) -> Result<Response, Rejection> {
    state.metrics.requests_chat.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let body = body.map_err(|e| body_rejection(API, e))?;
    let req: ChatRequest = parse_body(API, &body)?;
    chat_inner(state, req).await.map_err(|e| Rejection(API, e))
}

async fn chat_inner(state: AppState, req: ChatRequest) -> Result<Response, ApiError> {
    if req.n.unwrap_or(1) != 1 {
        return Err(ApiError::invalid("only n = 1 is supported"));
    }
    let model = req.model.clone().unwrap_or_else(|| state.worker.info.id.clone());
    let (mode, effort) = prompt::resolve_thinking(&model, req.thinking.as_ref(), req.think, req.reasoning_effort.as_deref())?;
    let messages = convert_messages(&req.messages)?;
    let tool_choice_none = req.tool_choice.as_ref().and_then(Value::as_str) == Some("none");
    let tools = match (&req.tools, tool_choice_none) {
        (Some(t), false) => prompt::normalize_tools(t)?,
        _ => Vec::new(),
    };
    let has_tools = !tools.is_empty();
    let text = prompt::render(messages, tools, mode, effort, state.worker.info.ctx, &state.tools)?;
    let gen = GenRequest {
        prompt: text,
        sampling: prompt::sampling(req.temperature, req.top_p, req.top_k, req.min_p, req.seed)?,
        max_tokens: max_tokens(&state, req.max_completion_tokens, req.max_tokens)?,
        logprobs: logprobs_n(req.logprobs, req.top_logprobs)?,
        dsml_greedy: has_tools,
    };
    let stops = prompt::stop_list(req.stop.as_ref())?;
    let want_logprobs = gen.logprobs.is_some();
    let run = sse::start(&state, gen, |c| Turn::new(mode, stops, "call_", c)).await?;
    let id = random_id("chatcmpl-");
    if req.stream.unwrap_or(false) {
        let include_usage = req.stream_options.as_ref().and_then(|o| o.include_usage).unwrap_or(false);
        let m = ChatStream { id, model, created: now_s(), include_usage, want_logprobs, state: state.clone(), sent_tool_calls: 0 };
        return Ok(sse::stream_response(run, m, state.cfg.keepalive));
    }
    let mut run = run;
    let summary = run.collect().await?;
    let t = &run.turn;
    t.remember_dsml(&state.tools);
    let calls: Vec<Value> = t.done_calls().iter().map(|c| json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}})).collect();
    let mut message = json!({"role": "assistant", "content": t.content});
    if mode == ThinkingMode::Thinking {
        message["reasoning_content"] = json!(t.reasoning);
    }
    if !calls.is_empty() {
        message["tool_calls"] = json!(calls);
    }
    Ok(axum::Json(json!({
        "id": id, "object": "chat.completion", "created": now_s(), "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": if want_logprobs { logprobs_json(&t.logprobs) } else { Value::Null }, "finish_reason": finish_str(&t.finish_reason(&summary))}],
        "usage": usage_json(&summary),
        "timings": timings_json(&summary),
    }))
    .into_response())
}

struct ChatStream {
    id: String,
    model: String,
    created: u64,
    include_usage: bool,
    want_logprobs: bool,
    state: AppState,
    sent_tool_calls: usize,
}

impl ChatStream {
    fn chunk(&self, delta: Value, finish: Option<&str>, logprobs: Value) -> axum::response::sse::Event {
        sse::data(&json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}))
    }
}

impl SseMapper for ChatStream {
    fn start(&mut self, _run: &mut Running) -> Vec<axum::response::sse::Event> {
        vec![self.chunk(json!({"role": "assistant", "content": ""}), None, Value::Null)]
    }

    fn outs(&mut self, run: &mut Running, outs: Vec<Out>) -> Vec<axum::response::sse::Event> {
        let mut evs = Vec::with_capacity(outs.len());
        for o in outs {
            let (delta, lp) = match o {
                Out::Reasoning(s) => (json!({"reasoning_content": s}), Value::Null),
                Out::Content(s) => {
                    let lp = if self.want_logprobs { logprobs_json(&std::mem::take(&mut run.pending_logprobs)) } else { Value::Null };
                    (json!({"content": s}), lp)
                }
                Out::ToolStart { index, id, name } => {
                    self.sent_tool_calls += 1;
                    (json!({"tool_calls": [{"index": index, "id": id, "type": "function", "function": {"name": name, "arguments": ""}}]}), Value::Null)
                }
                Out::ToolArgs { index, delta } => (json!({"tool_calls": [{"index": index, "function": {"arguments": delta}}]}), Value::Null),
                Out::ToolEnd { .. } => continue,
            };
            evs.push(self.chunk(delta, None, lp));
        }
        evs
    }

    fn done(&mut self, run: &mut Running, result: Result<GenSummary, ApiError>) -> Vec<axum::response::sse::Event> {
        let mut evs = Vec::new();
        match result {
            Ok(s) => {
                run.turn.remember_dsml(&self.state.tools);
                evs.push(self.chunk(json!({}), Some(finish_str(&run.turn.finish_reason(&s))), Value::Null));
                if self.include_usage {
                    evs.push(sse::data(&json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                        "choices": [], "usage": usage_json(&s), "timings": timings_json(&s)})));
                }
            }
            Err(e) => evs.push(sse::data(&e.body(API))),
        }
        evs.push(axum::response::sse::Event::default().data("[DONE]"));
        evs
    }
}

// ------------------------------------------------------------ completions

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub prompt: Value,
    #[serde(default)]
    pub max_tokens: Option<u32>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub top_k: Option<i64>,
    #[serde(default)]
    pub min_p: Option<f64>,
    #[serde(default)]
    pub seed: Option<i64>,
    #[serde(default)]
    pub stop: Option<Value>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub thinking: Option<Value>,
    #[serde(default)]
    pub think: Option<bool>,
    #[serde(default)]
    pub reasoning_effort: Option<String>,
    #[serde(default)]
    pub logprobs: Option<u32>,
}

/// `/v1/completions`: the prompt is wrapped as one user turn (ds4's rule,
/// chat.md §5: system "You are a helpful assistant"); the text returned is
/// the visible content (reasoning is not part of `text`).
pub async fn completions(State(state): State<AppState>, body: Result<Bytes, BytesRejection>) -> Result<Response, Rejection> {
    state.metrics.requests_completions.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let body = body.map_err(|e| body_rejection(API, e))?;
    let req: CompletionRequest = parse_body(API, &body)?;
    completions_inner(state, req).await.map_err(|e| Rejection(API, e))
}

async fn completions_inner(state: AppState, req: CompletionRequest) -> Result<Response, ApiError> {
    let prompt_text = match &req.prompt {
        Value::String(s) => s.clone(),
        Value::Array(a) if a.len() == 1 && a[0].is_string() => a[0].as_str().unwrap_or_default().to_string(),
        _ => return Err(ApiError::invalid("prompt must be a string (or an array of one string)")),
    };
    let model = req.model.clone().unwrap_or_else(|| state.worker.info.id.clone());
    let (mode, effort) = prompt::resolve_thinking(&model, req.thinking.as_ref(), req.think, req.reasoning_effort.as_deref())?;
    let messages = vec![Message::system("You are a helpful assistant"), Message::user(&prompt_text)];
    let text = prompt::render(messages, Vec::new(), mode, effort, state.worker.info.ctx, &state.tools)?;
    if req.logprobs.is_some_and(|n| n > 20) {
        return Err(ApiError::invalid("logprobs must be at most 20"));
    }
    let gen = GenRequest {
        prompt: text,
        sampling: prompt::sampling(req.temperature, req.top_p, req.top_k, req.min_p, req.seed)?,
        max_tokens: max_tokens(&state, req.max_tokens, None)?,
        logprobs: req.logprobs,
        dsml_greedy: false,
    };
    let stops = prompt::stop_list(req.stop.as_ref())?;
    let mut run = sse::start(&state, gen, |c| Turn::new(mode, stops, "call_", c)).await?;
    let id = random_id("cmpl-");
    if req.stream.unwrap_or(false) {
        let include_usage = req.stream_options.as_ref().and_then(|o| o.include_usage).unwrap_or(false);
        return Ok(sse::stream_response(run, CompletionStream { id, model, created: now_s(), include_usage }, state.cfg.keepalive));
    }
    let s = run.collect().await?;
    Ok(axum::Json(json!({
        "id": id, "object": "text_completion", "created": now_s(), "model": model,
        "choices": [{"index": 0, "text": run.turn.content, "logprobs": Value::Null, "finish_reason": finish_str(&run.turn.finish_reason(&s))}],
        "usage": usage_json(&s), "timings": timings_json(&s),
    }))
    .into_response())
}

struct CompletionStream {
    id: String,
    model: String,
    created: u64,
    include_usage: bool,
}

impl CompletionStream {
    fn chunk(&self, text: &str, finish: Option<&str>) -> axum::response::sse::Event {
        sse::data(&json!({"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
            "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": finish}]}))
    }
}

impl SseMapper for CompletionStream {
    fn start(&mut self, _run: &mut Running) -> Vec<axum::response::sse::Event> {
        Vec::new()
    }
    fn outs(&mut self, _run: &mut Running, outs: Vec<Out>) -> Vec<axum::response::sse::Event> {
        outs.into_iter().filter_map(|o| if let Out::Content(s) = o { Some(self.chunk(&s, None)) } else { None }).collect()
    }
    fn done(&mut self, run: &mut Running, result: Result<GenSummary, ApiError>) -> Vec<axum::response::sse::Event> {
        let mut evs = Vec::new();
        match result {
            Ok(s) => {
                evs.push(self.chunk("", Some(finish_str(&run.turn.finish_reason(&s)))));
                if self.include_usage {
                    evs.push(sse::data(&json!({"id": self.id, "object": "text_completion", "created": self.created, "model": self.model, "choices": [], "usage": usage_json(&s)})));
                }
            }
            Err(e) => evs.push(sse::data(&e.body(API))),
        }
        evs.push(axum::response::sse::Event::default().data("[DONE]"));
        evs
    }
}
