//! DeepSeek V4 chat encoding: messages -> the exact prompt text, as the
//! official `encoding_dsv4.py` renders it (shared/spec/chat.md §2).
//!
//! The pipeline mirrors the reference step by step so that every quirk is
//! reproduced: tool messages are merged into user turns as `<tool_result>`
//! blocks (sorted by call order), earlier reasoning is dropped in thinking mode
//! unless some message carries tools, and each message is rendered followed by
//! its transition (`<｜Assistant｜>` + `<think>` or `</think>`).
//!
//! Deliberate, documented deviations from the official encoder (both only
//! matter for content that would otherwise break the framing):
//! * a tool result containing `</tool_result>` has that sentinel's `<` written
//!   as `&lt;` (as ds4 does); the official encoder inserts it verbatim;
//! * DSML parameter values containing `</｜DSML｜parameter>` are escaped as
//!   described in [`crate::dsml`].
//!
//! Think Max: `reasoning_effort = max` in thinking mode adds the Think-Max
//! prefix at the start of the prompt. When [`EncodeOptions::context_tokens`] is
//! `Some(n)` with `n < 393216` (the context the model card requires for Think
//! Max), max is downgraded to high as ds4 does; `None` keeps the official rule.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::dsml;
use crate::error::ChatError;
use crate::pyjson;
use crate::special::{ASSISTANT, BOS, EOS, LATEST_REMINDER, THINK_END, THINK_START, USER};

/// Minimum context (tokens) for Think Max under ds4's rule (384 Ki).
pub const THINK_MAX_MIN_CONTEXT: u64 = 393_216;

/// The Think-Max prefix (chat.md §2.3), ending with an empty line.
pub const THINK_MAX_PREFIX: &str = "Reasoning Effort: Absolute maximum with no shortcuts permitted.\nYou MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root cause, rigorously stress-testing your logic against all potential paths, edge cases, and adversarial scenarios.\nExplicitly write out your entire deliberation process, documenting every intermediate step, considered alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n";

const TOOLS_HEAD: &str = "## Tools\n\nYou have access to a set of tools to help answer the user's question. You can invoke tools by writing a \"<｜DSML｜tool_calls>\" block like the following:\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"$TOOL_NAME\">\n<｜DSML｜parameter name=\"$PARAMETER_NAME\" string=\"true|false\">$PARAMETER_VALUE</｜DSML｜parameter>\n...\n</｜DSML｜invoke>\n<｜DSML｜invoke name=\"$TOOL_NAME2\">\n...\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>\n\nString parameters should be specified as is and set `string=\"true\"`. For all other types (numbers, booleans, arrays, objects), pass the value in JSON format and set `string=\"false\"`.\n\nIf thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning inside <think>...</think> BEFORE any tool calls or final response.\n\nOtherwise, output directly after </think> with tool calls or final response.\n\n### Available Tool Schemas\n\n";
const TOOLS_TAIL: &str = "\n\nYou MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.\n";
const RESPONSE_FORMAT_HEAD: &str = "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n";

/// Non-thinking (`</think>` opener) or thinking (`<think>` opener).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ThinkingMode {
    Chat,
    #[default]
    Thinking,
}

/// `reasoning_effort`: only `Max` changes the prompt (thinking mode only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReasoningEffort {
    High,
    Max,
}

/// Options of [`encode_messages`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodeOptions {
    pub mode: ThinkingMode,
    pub reasoning_effort: Option<ReasoningEffort>,
    /// Drop reasoning of turns before the last user turn (official default: true;
    /// forced off when any message carries tools).
    pub drop_thinking: bool,
    /// Start with BOS (official default: true).
    pub add_bos: bool,
    /// The serving context size in tokens; when `Some(n)` with `n < 393216`,
    /// `Max` is downgraded to `High` (ds4's rule). `None`: official behaviour.
    pub context_tokens: Option<u64>,
}

impl Default for EncodeOptions {
    fn default() -> Self {
        EncodeOptions { mode: ThinkingMode::Thinking, reasoning_effort: None, drop_thinking: true, add_bos: true, context_tokens: None }
    }
}

impl EncodeOptions {
    pub fn chat() -> Self {
        EncodeOptions { mode: ThinkingMode::Chat, ..Default::default() }
    }
    pub fn thinking() -> Self {
        Self::default()
    }
    /// The effort after applying the context rule.
    pub fn effective_effort(&self) -> Option<ReasoningEffort> {
        match (self.reasoning_effort, self.context_tokens) {
            (Some(ReasoningEffort::Max), Some(n)) if n < THINK_MAX_MIN_CONTEXT => Some(ReasoningEffort::High),
            (e, _) => e,
        }
    }
}

/// A function call inside an assistant message (OpenAI format).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub function: FunctionCall,
}

/// `function` of a tool call: `arguments` is normally a JSON string; an object
/// is accepted too.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionCall {
    pub name: String,
    #[serde(default)]
    pub arguments: Value,
}

/// One message in the official encoder's shape (OpenAI fields plus
/// `reasoning_content`, `tools`, `response_format`, `task`, `wo_eos`). Unknown
/// keys (e.g. `mask`) are ignored. `content` is a string, null, or a list of
/// content blocks (`{"type": "text", "text": ...}`, `tool_result`, ...).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_format: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wo_eos: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Message { role: role.into(), content: Some(Value::String(content.into())), ..Default::default() }
    }
    pub fn system(c: &str) -> Self {
        Self::new("system", c)
    }
    pub fn user(c: &str) -> Self {
        Self::new("user", c)
    }
    pub fn assistant(c: &str) -> Self {
        Self::new("assistant", c)
    }
    pub fn tool(call_id: &str, c: &str) -> Self {
        Message { tool_call_id: Some(call_id.into()), ..Self::new("tool", c) }
    }
    /// The content as text: a string as is, null as "", a list of blocks as its
    /// text blocks joined by "\n\n" (non-text blocks as `[Unsupported {type}]`).
    pub fn content_text(&self) -> String {
        content_to_text(self.content.as_ref())
    }
}

/// Parses a messages file: a JSON array of messages, or an object with a
/// `messages` array and optionally `tools` (attached to the first message, as
/// the official test driver does).
pub fn parse_messages_json(text: &str) -> Result<Vec<Message>, ChatError> {
    let v: Value = serde_json::from_str(text).map_err(|e| ChatError::Json(e.to_string()))?;
    let (msgs, tools) = match v {
        Value::Array(_) => (v, None),
        Value::Object(mut o) => {
            let m = o.remove("messages").ok_or_else(|| ChatError::Json("object without a `messages` array".into()))?;
            (m, o.remove("tools"))
        }
        _ => return Err(ChatError::Json("expected an array of messages or an object with `messages`".into())),
    };
    let mut msgs: Vec<Message> = serde_json::from_value(msgs).map_err(|e| ChatError::Json(e.to_string()))?;
    if let Some(tools) = tools {
        let tools: Vec<Value> = serde_json::from_value(tools).map_err(|e| ChatError::Json(format!("tools: {e}")))?;
        if let Some(first) = msgs.first_mut() {
            first.tools = Some(tools);
        }
    }
    Ok(msgs)
}

fn content_to_text(c: Option<&Value>) -> String {
    match c {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(blocks)) => blocks.iter().map(block_text).collect::<Vec<_>>().join("\n\n"),
        Some(other) => pyjson::dumps(other),
    }
}

fn block_text(b: &Value) -> String {
    match b.get("type").and_then(Value::as_str) {
        Some("text") => b.get("text").and_then(Value::as_str).unwrap_or("").to_string(),
        t => format!("[Unsupported {}]", t.unwrap_or("None")),
    }
}

/// A block of a merged user turn.
#[derive(Debug, Clone)]
enum Block {
    Text(String),
    ToolResult { id: String, content: String },
    Unsupported(String),
}

/// A message after merging (internal).
#[derive(Debug, Clone)]
struct Turn {
    role: String,
    content: String,
    blocks: Option<Vec<Block>>,
    reasoning: Option<String>,
    tool_calls: Vec<ToolCall>,
    tools: Vec<Value>,
    response_format: Option<Value>,
    task: Option<String>,
    wo_eos: bool,
}

impl Turn {
    fn from_message(m: &Message) -> Turn {
        Turn {
            role: m.role.clone(),
            content: m.content_text(),
            blocks: None,
            reasoning: m.reasoning_content.clone(),
            tool_calls: m.tool_calls.clone().unwrap_or_default(),
            tools: m.tools.clone().unwrap_or_default(),
            response_format: m.response_format.clone().filter(|v| !is_falsy(v)),
            task: m.task.clone(),
            wo_eos: m.wo_eos.unwrap_or(false),
        }
    }
}

fn is_falsy(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        Value::Number(_) => false,
    }
}

fn user_blocks(m: &Message) -> Vec<Block> {
    match &m.content {
        Some(Value::Array(blocks)) => blocks
            .iter()
            .map(|b| match b.get("type").and_then(Value::as_str) {
                Some("text") => Block::Text(b.get("text").and_then(Value::as_str).unwrap_or("").into()),
                Some("tool_result") => Block::ToolResult {
                    id: b.get("tool_use_id").and_then(Value::as_str).unwrap_or("").into(),
                    content: content_to_text(b.get("content")),
                },
                t => Block::Unsupported(t.unwrap_or("None").into()),
            })
            .collect(),
        other => vec![Block::Text(content_to_text(other.as_ref()))],
    }
}

/// Step 1: tool messages become `tool_result` blocks of a user turn; a user
/// message right after such a merged turn (without a task) joins it.
fn merge_tool_messages(msgs: &[Message]) -> Vec<Turn> {
    let mut merged: Vec<Turn> = Vec::with_capacity(msgs.len());
    for m in msgs {
        let last_is_open_user = |merged: &Vec<Turn>, need_no_task: bool| {
            merged.last().is_some_and(|t| t.role == "user" && t.blocks.is_some() && (!need_no_task || t.task.is_none()))
        };
        match m.role.as_str() {
            "tool" => {
                let block = Block::ToolResult { id: m.tool_call_id.clone().unwrap_or_default(), content: m.content_text() };
                if last_is_open_user(&merged, false) {
                    if let Some(b) = merged.last_mut().and_then(|t| t.blocks.as_mut()) {
                        b.push(block);
                    }
                } else {
                    let mut t = Turn::from_message(&Message { role: "user".into(), ..Default::default() });
                    t.blocks = Some(vec![block]);
                    merged.push(t);
                }
            }
            "user" => {
                let blocks = user_blocks(m);
                if last_is_open_user(&merged, true) {
                    if let Some(b) = merged.last_mut().and_then(|t| t.blocks.as_mut()) {
                        b.extend(blocks);
                    }
                } else {
                    let mut t = Turn::from_message(m);
                    t.blocks = Some(blocks);
                    merged.push(t);
                }
            }
            _ => merged.push(Turn::from_message(m)),
        }
    }
    merged
}

/// Step 2: reorder tool results within a user turn by the most recent
/// assistant's call order (unknown ids sort as 0; the sort is stable).
fn sort_tool_results(turns: &mut [Turn]) {
    let mut order: Vec<(String, usize)> = Vec::new();
    for t in turns.iter_mut() {
        if t.role == "assistant" && !t.tool_calls.is_empty() {
            order = t.tool_calls.iter().enumerate().filter_map(|(i, c)| c.id.clone().filter(|s| !s.is_empty()).map(|id| (id, i))).collect();
        } else if t.role == "user" {
            let Some(blocks) = t.blocks.as_mut() else { continue };
            let n_results = blocks.iter().filter(|b| matches!(b, Block::ToolResult { .. })).count();
            if n_results <= 1 || order.is_empty() {
                continue;
            }
            let key = |b: &Block| match b {
                Block::ToolResult { id, .. } => order.iter().find(|(k, _)| k == id).map_or(0, |&(_, i)| i),
                _ => 0,
            };
            let mut results: Vec<Block> = blocks.iter().filter(|b| matches!(b, Block::ToolResult { .. })).cloned().collect();
            results.sort_by_key(key);
            let mut it = results.into_iter();
            for b in blocks.iter_mut() {
                if matches!(b, Block::ToolResult { .. }) {
                    if let Some(r) = it.next() {
                        *b = r;
                    }
                }
            }
        }
    }
}

fn last_user_index(turns: &[Turn]) -> Option<usize> {
    turns.iter().rposition(|t| t.role == "user" || t.role == "developer")
}

/// Step 5: drop earlier reasoning and earlier developer messages.
fn drop_thinking(turns: Vec<Turn>) -> Vec<Turn> {
    let Some(last_user) = last_user_index(&turns) else { return turns };
    let mut out = Vec::with_capacity(turns.len());
    for (i, mut t) in turns.into_iter().enumerate() {
        let keep = matches!(t.role.as_str(), "user" | "system" | "tool" | "latest_reminder") || i >= last_user;
        if keep {
            out.push(t);
        } else if t.role == "assistant" {
            t.reasoning = None;
            out.push(t);
        }
        // Earlier developer messages (and any other role) are dropped.
    }
    out
}

/// Escapes the closing sentinel inside a tool result (`<` -> `&lt;`), ds4's rule.
pub fn escape_tool_result(content: &str) -> String {
    content.replace("</tool_result>", "&lt;/tool_result>")
}

fn render_tools(index: usize, tools: &[Value]) -> Result<String, ChatError> {
    let mut schemas = Vec::with_capacity(tools.len());
    for (k, t) in tools.iter().enumerate() {
        let f = t.get("function").ok_or(ChatError::BadTool { index, tool: k })?;
        schemas.push(pyjson::dumps(f));
    }
    Ok(format!("{TOOLS_HEAD}{}{TOOLS_TAIL}", schemas.join("\n")))
}

fn task_token(index: usize, task: &str) -> Result<&'static str, ChatError> {
    Ok(match task {
        "action" => "<｜action｜>",
        "query" => "<｜query｜>",
        "authority" => "<｜authority｜>",
        "domain" => "<｜domain｜>",
        "title" => "<｜title｜>",
        "read_url" => "<｜read_url｜>",
        _ => return Err(ChatError::UnknownTask { index, task: task.into() }),
    })
}

/// Renders messages into the exact prompt text of the official encoder.
pub fn encode_messages(messages: &[Message], opts: &EncodeOptions) -> Result<String, ChatError> {
    let thinking = opts.mode == ThinkingMode::Thinking;
    let mut turns = merge_tool_messages(messages);
    sort_tool_results(&mut turns);
    let any_tools = turns.iter().any(|t| !t.tools.is_empty());
    let drop = opts.drop_thinking && !any_tools;
    if thinking && drop {
        turns = drop_thinking(turns);
    }
    let last_user = last_user_index(&turns);
    let after_last_user = |i: usize, inclusive: bool| match last_user {
        Some(l) => i > l || (inclusive && i == l),
        // No user turn: Python's index is -1, so every i >= 0 is after it.
        None => true,
    };
    let mut out = String::new();
    if opts.add_bos {
        out.push_str(BOS);
    }
    for (i, t) in turns.iter().enumerate() {
        if i == 0 && thinking && opts.effective_effort() == Some(ReasoningEffort::Max) {
            out.push_str(THINK_MAX_PREFIX);
        }
        match t.role.as_str() {
            "system" | "developer" => {
                if t.role == "developer" {
                    if t.content.is_empty() {
                        return Err(ChatError::EmptyDeveloper { index: i });
                    }
                    out.push_str(USER);
                }
                out.push_str(&t.content);
                if !t.tools.is_empty() {
                    out.push_str("\n\n");
                    out.push_str(&render_tools(i, &t.tools)?);
                }
                if let Some(rf) = &t.response_format {
                    out.push_str("\n\n");
                    out.push_str(RESPONSE_FORMAT_HEAD);
                    out.push_str(&pyjson::dumps(rf));
                }
            }
            "user" => {
                out.push_str(USER);
                match &t.blocks {
                    Some(blocks) if !blocks.is_empty() => {
                        let parts: Vec<String> = blocks
                            .iter()
                            .map(|b| match b {
                                Block::Text(s) => s.clone(),
                                Block::ToolResult { content, .. } => format!("<tool_result>{}</tool_result>", escape_tool_result(content)),
                                Block::Unsupported(ty) => format!("[Unsupported {ty}]"),
                            })
                            .collect();
                        out.push_str(&parts.join("\n\n"));
                    }
                    _ => out.push_str(&t.content),
                }
            }
            "latest_reminder" => {
                out.push_str(LATEST_REMINDER);
                out.push_str(&t.content);
            }
            "assistant" => {
                let prev_has_task = i > 0 && turns[i - 1].task.is_some();
                if thinking && !prev_has_task && (!drop || after_last_user(i, false)) {
                    out.push_str(t.reasoning.as_deref().unwrap_or(""));
                    out.push_str(THINK_END);
                }
                out.push_str(&t.content);
                if !t.tool_calls.is_empty() {
                    out.push_str(&dsml::render_tool_calls(&t.tool_calls));
                }
                if !t.wo_eos {
                    out.push_str(EOS);
                }
            }
            other => return Err(ChatError::UnknownRole { index: i, role: other.into() }),
        }
        // Transition to the next turn (chat.md §2.2).
        let next_role = turns.get(i + 1).map(|n| n.role.as_str());
        if matches!(next_role, Some(r) if r != "assistant" && r != "latest_reminder") {
            continue;
        }
        if let Some(task) = &t.task {
            let tok = task_token(i, task)?;
            if task == "action" {
                out.push_str(ASSISTANT);
                out.push_str(if thinking { THINK_START } else { THINK_END });
            }
            out.push_str(tok);
        } else if t.role == "user" || t.role == "developer" {
            out.push_str(ASSISTANT);
            out.push_str(if thinking && (!drop || after_last_user(i, true)) { THINK_START } else { THINK_END });
        }
    }
    Ok(out)
}
