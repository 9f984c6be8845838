//! DSML tool calls: rendering them into prompts, and parsing what the model
//! generates (reasoning, visible content, tool calls) incrementally.
//!
//! Grammar (official, chat.md §3), after the optional reasoning `…</think>`:
//! `content` then `\n\n<｜DSML｜tool_calls>\n` + invokes + `</｜DSML｜tool_calls>`, where an
//! invoke is `<｜DSML｜invoke name="N">\n` + parameters + `</｜DSML｜invoke>\n` and a
//! parameter is `<｜DSML｜parameter name="K" string="true|false">V</｜DSML｜parameter>\n`.
//! Arguments JSON = `{` + `json(K): json(V)` (string) or `json(K): V` (verbatim) joined by ", " + `}`.
//!
//! [`StreamParser`] consumes text chunks as they are decoded and emits
//! [`Event`]s as soon as they are certain; it holds back only a tail that could
//! still become a marker. It never panics. Its leniencies and the rule for
//! malformed input:
//! * whitespace between DSML tags is skipped; a tool-call block is recognised
//!   even without the `\n\n` before it (the `\n\n` is stripped when present);
//! * after `</｜DSML｜tool_calls>` parsing returns to content (so a later block is
//!   parsed too); `<｜end▁of▁sentence｜>` ends the message, later text is ignored;
//! * missing `</think>` in thinking mode: everything is reasoning;
//! * **malformed or truncated DSML** (unexpected text where a tag must be, a bad
//!   header or `string` flag, a duplicate parameter, a tag over 1024 bytes, or the
//!   end of input inside a block): if no invoke of the block has been announced
//!   yet, the block's raw text becomes plain [`Event::Content`]; otherwise an
//!   [`Event::Error`] names the problem, the call in progress (if any) is
//!   abandoned (never ended; [`parse_completion`] drops it and keeps completed
//!   calls), and the unparsed rest of the text becomes content.
//!
//! Escaping inside parameter values (the official format has none, so a value
//! containing the closing tag would break the framing): a `string="true"` value
//! is written raw except that `</｜DSML｜parameter>` becomes
//! `&lt;/｜DSML｜parameter>`, which the parser turns back (so that exact text
//! cannot be passed literally); a `string="false"` (JSON) value has that
//! sentinel's `<` written as `\u003c`, which is the same JSON value. Tool and
//! parameter names are written raw, as the official encoder does.

use serde_json::Value;

use crate::chat::{FunctionCall, Message, ThinkingMode, ToolCall};
use crate::pyjson;
use crate::special::{EOS, THINK_END};

pub const TOOL_CALLS_OPEN: &str = "<｜DSML｜tool_calls>";
pub const TOOL_CALLS_CLOSE: &str = "</｜DSML｜tool_calls>";
const INVOKE_OPEN: &str = "<｜DSML｜invoke name=\"";
const INVOKE_CLOSE: &str = "</｜DSML｜invoke>";
const PARAM_OPEN: &str = "<｜DSML｜parameter name=\"";
const PARAM_CLOSE: &str = "</｜DSML｜parameter>";
const PARAM_CLOSE_ESCAPED: &str = "&lt;/｜DSML｜parameter>";
const PARAM_CLOSE_JSON_ESCAPED: &str = "\\u003c/｜DSML｜parameter>";
const BLOCK_OPEN_WITH_GAP: &str = "\n\n<｜DSML｜tool_calls>";
/// Longest tag header accepted before the input is declared malformed.
const MAX_TAG: usize = 1024;

// ---------------------------------------------------------------- rendering

/// Parameters of a call's arguments: (name, is_string, value text). A JSON
/// object gives one parameter per key in order; anything else (invalid JSON,
/// non-object) is one string parameter named `arguments` holding the raw text.
fn arguments_params(args: &Value) -> Vec<(String, bool, String)> {
    let parsed;
    let obj = match args {
        Value::Object(o) => o,
        Value::String(s) => match serde_json::from_str::<Value>(s) {
            Ok(Value::Object(o)) => {
                parsed = o;
                &parsed
            }
            _ => return vec![("arguments".into(), true, s.clone())],
        },
        Value::Null => return Vec::new(),
        other => return vec![("arguments".into(), true, pyjson::dumps(other))],
    };
    obj.iter()
        .map(|(k, v)| match v {
            Value::String(s) => (k.clone(), true, s.replace(PARAM_CLOSE, PARAM_CLOSE_ESCAPED)),
            other => (k.clone(), false, pyjson::dumps(other).replace(PARAM_CLOSE, PARAM_CLOSE_JSON_ESCAPED)),
        })
        .collect()
}

/// One `<｜DSML｜invoke …>…</｜DSML｜invoke>` element.
pub fn render_invoke(name: &str, arguments: &Value) -> String {
    let params: Vec<String> = arguments_params(arguments)
        .into_iter()
        .map(|(k, is_str, v)| format!("{PARAM_OPEN}{k}\" string=\"{is_str}\">{v}{PARAM_CLOSE}"))
        .collect();
    format!("{INVOKE_OPEN}{name}\">\n{}\n{INVOKE_CLOSE}", params.join("\n"))
}

/// The tool-call suffix of an assistant turn: `"\n\n<｜DSML｜tool_calls>\n" … "</｜DSML｜tool_calls>"`.
pub fn render_tool_calls(calls: &[ToolCall]) -> String {
    let invokes: Vec<String> = calls.iter().map(|c| render_invoke(&c.function.name, &c.function.arguments)).collect();
    format!("\n\n{TOOL_CALLS_OPEN}\n{}\n{TOOL_CALLS_CLOSE}", invokes.join("\n"))
}

// ------------------------------------------------------------------ parsing

/// What the parser recognised, in order. Concatenating the `ToolCallArgs`
/// deltas of one index gives that call's complete JSON arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Reasoning(String),
    Content(String),
    /// The invoke header is complete. `id` is left for the caller to assign.
    ToolCallStart { index: usize, id: Option<String>, name: String },
    ToolCallArgs { index: usize, delta: String },
    ToolCallEnd { index: usize },
    /// Malformed DSML after a call was announced (see the module docs).
    Error { index: Option<usize>, message: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Reasoning,
    Content,
    /// Inside a block, between invokes.
    Block,
    /// Inside an invoke, between parameters.
    Invoke,
    /// Inside a parameter value.
    Param { is_str: bool },
    /// After EOS.
    Done,
}

#[derive(Debug)]
struct OpenCall {
    index: usize,
    params: Vec<String>,
}

/// Incremental parser of a completion (the text generated after the prompt's
/// `<think>` or `</think>` opener).
#[derive(Debug)]
pub struct StreamParser {
    state: State,
    buf: String,
    /// Raw text of the current block while no invoke has been announced.
    block_raw: String,
    block_announced: bool,
    call: Option<OpenCall>,
    next_index: usize,
    events: Vec<Event>,
}

/// Smallest char-boundary offset from which `buf`'s tail is a proper prefix of
/// some marker (text before it can be emitted safely).
fn safe_len(buf: &str, markers: &[&str]) -> usize {
    let longest = markers.iter().map(|m| m.len()).max().unwrap_or(0);
    let start = buf.len().saturating_sub(longest.saturating_sub(1));
    (start..buf.len())
        .find(|&p| buf.is_char_boundary(p) && markers.iter().any(|m| m.as_bytes().starts_with(&buf.as_bytes()[p..])))
        .unwrap_or(buf.len())
}

fn is_prefix_of_any(buf: &str, tags: &[&str]) -> bool {
    tags.iter().any(|t| t.starts_with(buf))
}

impl StreamParser {
    pub fn new(mode: ThinkingMode) -> Self {
        StreamParser {
            state: if mode == ThinkingMode::Thinking { State::Reasoning } else { State::Content },
            buf: String::new(),
            block_raw: String::new(),
            block_announced: false,
            call: None,
            next_index: 0,
            events: Vec::new(),
        }
    }

    /// Feeds a chunk of generated text; returns the events it completed.
    pub fn push(&mut self, text: &str) -> Vec<Event> {
        if self.state != State::Done {
            self.buf.push_str(text);
            self.run(false);
        }
        std::mem::take(&mut self.events)
    }

    /// Ends the input: flushes held-back text and reports truncated DSML.
    pub fn finish(&mut self) -> Vec<Event> {
        self.run(true);
        std::mem::take(&mut self.events)
    }

    fn emit_text(&mut self, reasoning: bool, s: &str) {
        if s.is_empty() {
            return;
        }
        // Merge with the previous event of the same kind to keep events few.
        match (self.events.last_mut(), reasoning) {
            (Some(Event::Reasoning(r)), true) => r.push_str(s),
            (Some(Event::Content(c)), false) => c.push_str(s),
            _ => self.events.push(if reasoning { Event::Reasoning(s.into()) } else { Event::Content(s.into()) }),
        }
    }

    fn args(&mut self, delta: String) {
        if let Some(index) = self.call.as_ref().map(|c| c.index) {
            self.args_for(index, delta);
        }
    }

    fn args_for(&mut self, index: usize, delta: String) {
        {
            match self.events.last_mut() {
                Some(Event::ToolCallArgs { index: i, delta: d }) if *i == index => d.push_str(&delta),
                _ => self.events.push(Event::ToolCallArgs { index, delta }),
            }
        }
    }

    /// Consumes `n` bytes of `buf` as part of the current block.
    fn consume(&mut self, n: usize) {
        if !self.block_announced {
            self.block_raw.push_str(&self.buf[..n]);
        }
        self.buf.drain(..n);
    }

    fn malformed(&mut self, message: &str) {
        if !self.block_announced {
            let raw = std::mem::take(&mut self.block_raw);
            self.emit_text(false, &raw);
        } else {
            let index = self.call.as_ref().map(|c| c.index);
            self.events.push(Event::Error { index, message: message.into() });
        }
        self.call = None;
        self.block_raw.clear();
        self.block_announced = false;
        self.state = State::Content;
    }

    /// Runs the state machine until it needs more input.
    fn run(&mut self, at_end: bool) {
        loop {
            let progressed = match self.state {
                State::Done => {
                    self.buf.clear();
                    false
                }
                State::Reasoning | State::Content => self.step_text(at_end),
                State::Block | State::Invoke => self.step_tags(at_end),
                State::Param { is_str } => self.step_param(is_str, at_end),
            };
            if !progressed {
                break;
            }
        }
    }

    fn step_text(&mut self, at_end: bool) -> bool {
        let reasoning = self.state == State::Reasoning;
        let end_marker = if reasoning { THINK_END } else { TOOL_CALLS_OPEN };
        let hit = |m: &str| self.buf.find(m);
        let (end_pos, eos_pos) = (hit(end_marker), hit(EOS));
        match (end_pos, eos_pos) {
            (Some(p), e) if e.map_or(true, |e| p < e) => {
                let mut text = self.buf[..p].to_string();
                let rest = p + end_marker.len();
                if reasoning {
                    self.emit_text(true, &text);
                    self.state = State::Content;
                } else {
                    let gap = text.ends_with("\n\n");
                    if gap {
                        text.truncate(text.len() - 2);
                    }
                    self.emit_text(false, &text);
                    self.block_raw = if gap { BLOCK_OPEN_WITH_GAP.into() } else { TOOL_CALLS_OPEN.into() };
                    self.block_announced = false;
                    self.state = State::Block;
                }
                self.buf.drain(..rest);
                true
            }
            (_, Some(e)) => {
                let text = self.buf[..e].to_string();
                self.emit_text(reasoning, &text);
                self.buf.clear();
                self.state = State::Done;
                false
            }
            _ => {
                let n = if at_end {
                    self.buf.len()
                } else if reasoning {
                    safe_len(&self.buf, &[THINK_END, EOS])
                } else {
                    safe_len(&self.buf, &[BLOCK_OPEN_WITH_GAP, TOOL_CALLS_OPEN, EOS])
                };
                let text: String = self.buf.drain(..n).collect();
                self.emit_text(reasoning, &text);
                false
            }
        }
    }

    fn step_tags(&mut self, at_end: bool) -> bool {
        let ws = self.buf.len() - self.buf.trim_start_matches([' ', '\t', '\r', '\n']).len();
        if ws > 0 {
            self.consume(ws);
        }
        if self.buf.is_empty() {
            if at_end {
                self.malformed("input ends inside a tool-call block");
                return true;
            }
            return false;
        }
        let in_block = self.state == State::Block;
        let (open, close) = if in_block { (INVOKE_OPEN, TOOL_CALLS_CLOSE) } else { (PARAM_OPEN, INVOKE_CLOSE) };
        if self.buf.starts_with(close) {
            self.consume(close.len());
            if in_block {
                self.block_raw.clear();
                self.block_announced = false;
                self.state = State::Content;
            } else if let Some(c) = self.call.take() {
                self.args_for(c.index, if c.params.is_empty() { "{}".into() } else { "}".into() });
                self.events.push(Event::ToolCallEnd { index: c.index });
                self.state = State::Block;
            }
            return true;
        }
        if self.buf.starts_with(open) {
            let Some(q) = self.buf[open.len()..].find("\">").map(|q| q + open.len()) else {
                if self.buf.len() > MAX_TAG {
                    self.malformed("unterminated DSML tag");
                    return true;
                }
                if at_end {
                    self.malformed("input ends inside a DSML tag");
                    return true;
                }
                return false;
            };
            let inner = self.buf[open.len()..q].to_string();
            if in_block {
                if inner.is_empty() || inner.contains('\n') {
                    self.malformed("invalid invoke name");
                    return true;
                }
                self.consume(q + 2);
                let index = self.next_index;
                self.next_index += 1;
                self.block_announced = true;
                self.block_raw.clear();
                self.events.push(Event::ToolCallStart { index, id: None, name: inner });
                self.call = Some(OpenCall { index, params: Vec::new() });
                self.state = State::Invoke;
            } else {
                let parsed = inner.rsplit_once("\" string=\"").and_then(|(k, f)| match f {
                    "true" => Some((k.to_string(), true)),
                    "false" => Some((k.to_string(), false)),
                    _ => None,
                });
                let Some((key, is_str)) = parsed.filter(|(k, _)| !k.is_empty() && !k.contains('\n')) else {
                    self.malformed("invalid parameter header");
                    return true;
                };
                let Some(call) = self.call.as_mut() else {
                    self.malformed("parameter outside an invoke");
                    return true;
                };
                if call.params.contains(&key) {
                    let m = format!("duplicate parameter {key:?}");
                    self.malformed(&m);
                    return true;
                }
                let first = call.params.is_empty();
                call.params.push(key.clone());
                self.consume(q + 2);
                let mut d = String::from(if first { "{" } else { ", " });
                d.push_str(&pyjson::dumps_str(&key));
                d.push_str(": ");
                if is_str {
                    d.push('"');
                }
                self.args(d);
                self.state = State::Param { is_str };
            }
            return true;
        }
        if !at_end && is_prefix_of_any(&self.buf, &[open, close]) {
            return false;
        }
        let what = if in_block { "expected <｜DSML｜invoke or </｜DSML｜tool_calls>" } else { "expected <｜DSML｜parameter or </｜DSML｜invoke>" };
        self.malformed(what);
        true
    }

    fn step_param(&mut self, is_str: bool, at_end: bool) -> bool {
        let (n, closed) = match self.buf.find(PARAM_CLOSE) {
            Some(p) => (p, true),
            None if at_end => {
                self.malformed("input ends inside a parameter value");
                return true;
            }
            None => {
                let markers: &[&str] = if is_str { &[PARAM_CLOSE, PARAM_CLOSE_ESCAPED] } else { &[PARAM_CLOSE] };
                (safe_len(&self.buf, markers), false)
            }
        };
        let body: String = self.buf[..n].to_string();
        let delta = if is_str {
            let s = pyjson::dumps_str(&body.replace(PARAM_CLOSE_ESCAPED, PARAM_CLOSE));
            s[1..s.len() - 1].to_string()
        } else {
            body
        };
        if !delta.is_empty() {
            self.args(delta);
        }
        self.buf.drain(..n);
        if closed {
            self.buf.drain(..PARAM_CLOSE.len());
            if is_str {
                self.args("\"".into());
            }
            self.state = State::Invoke;
        }
        closed
    }
}

/// One parsed tool call (OpenAI `function` shape).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedToolCall {
    pub name: String,
    /// JSON text of the arguments.
    pub arguments: String,
}

/// A whole parsed assistant completion.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ParsedMessage {
    /// `Some` in thinking mode (possibly empty).
    pub reasoning_content: Option<String>,
    pub content: String,
    pub tool_calls: Vec<ParsedToolCall>,
    /// Whether the text contained `<｜end▁of▁sentence｜>`.
    pub ended: bool,
    /// Problems found (malformed DSML); empty for well-formed output.
    pub errors: Vec<String>,
}

impl ParsedMessage {
    /// As an assistant [`Message`] (tool-call ids `call_0`, `call_1`, … by index).
    pub fn to_message(&self) -> Message {
        let tool_calls = (!self.tool_calls.is_empty()).then(|| {
            self.tool_calls
                .iter()
                .enumerate()
                .map(|(i, c)| ToolCall {
                    id: Some(format!("call_{i}")),
                    kind: Some("function".into()),
                    function: FunctionCall { name: c.name.clone(), arguments: Value::String(c.arguments.clone()) },
                })
                .collect()
        });
        Message {
            role: "assistant".into(),
            content: Some(Value::String(self.content.clone())),
            reasoning_content: self.reasoning_content.clone(),
            tool_calls,
            ..Default::default()
        }
    }
}

/// Parses a complete completion in one go (same rules as [`StreamParser`]).
pub fn parse_completion(text: &str, mode: ThinkingMode) -> ParsedMessage {
    let mut p = StreamParser::new(mode);
    let mut events = p.push(text);
    events.extend(p.finish());
    let mut msg = ParsedMessage {
        reasoning_content: (mode == ThinkingMode::Thinking).then(String::new),
        ended: text.contains(EOS),
        ..Default::default()
    };
    // (index, name, args, complete)
    let mut calls: Vec<(usize, String, String, bool)> = Vec::new();
    for e in events {
        match e {
            Event::Reasoning(s) => msg.reasoning_content.get_or_insert_with(String::new).push_str(&s),
            Event::Content(s) => msg.content.push_str(&s),
            Event::ToolCallStart { index, name, .. } => calls.push((index, name, String::new(), false)),
            Event::ToolCallArgs { index, delta } => {
                if let Some(c) = calls.iter_mut().find(|c| c.0 == index) {
                    c.2.push_str(&delta);
                }
            }
            Event::ToolCallEnd { index } => {
                if let Some(c) = calls.iter_mut().find(|c| c.0 == index) {
                    c.3 = true;
                }
            }
            Event::Error { message, .. } => msg.errors.push(message),
        }
    }
    msg.tool_calls = calls.into_iter().filter(|c| c.3).map(|(_, name, arguments, _)| ParsedToolCall { name, arguments }).collect();
    msg
}

/// Renders a parsed completion back to text: the inverse of [`parse_completion`]
/// for well-formed output (reasoning + `</think>` in thinking mode, content,
/// tool calls, EOS if the original had it).
pub fn render_completion(msg: &ParsedMessage, mode: ThinkingMode) -> String {
    let mut out = String::new();
    if mode == ThinkingMode::Thinking {
        out.push_str(msg.reasoning_content.as_deref().unwrap_or(""));
        out.push_str(THINK_END);
    }
    out.push_str(&msg.content);
    if !msg.tool_calls.is_empty() {
        let invokes: Vec<String> = msg.tool_calls.iter().map(|c| render_invoke(&c.name, &Value::String(c.arguments.clone()))).collect();
        out.push_str(&format!("\n\n{TOOL_CALLS_OPEN}\n{}\n{TOOL_CALLS_CLOSE}", invokes.join("\n")));
    }
    if msg.ended {
        out.push_str(EOS);
    }
    out
}
