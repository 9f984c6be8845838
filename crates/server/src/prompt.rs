//! Shared request-to-prompt logic: thinking-mode resolution (chat.md §6),
//! sampling defaults, stop lists, tool-schema normalisation, and rendering the
//! conversation with `dsv4_text::chat::encode_messages` plus exact DSML replay
//! from the [`ToolMemory`].

use dsv4_text::chat::{encode_messages, EncodeOptions, Message, ReasoningEffort, ThinkingMode};
use dsv4_text::dsml::render_tool_calls;
use serde_json::{json, Value};

use crate::errors::ApiError;
use crate::generator::Sampling;
use crate::toolmem::ToolMemory;

/// The non-thinking alias; `deepseek-reasoner` and the canonical id think.
pub const CHAT_ALIAS: &str = "deepseek-chat";
pub const REASONER_ALIAS: &str = "deepseek-reasoner";

/// Thinking mode and effort from a request's controls (chat.md §6): explicit
/// `thinking`/`think` first, then the effort (`none` = off), then the alias.
pub fn resolve_thinking(model: &str, thinking: Option<&Value>, think: Option<bool>, effort: Option<&str>) -> Result<(ThinkingMode, Option<ReasoningEffort>), ApiError> {
    let explicit = match thinking {
        None | Some(Value::Null) => think,
        Some(Value::Bool(b)) => Some(*b),
        Some(Value::Object(o)) => match o.get("type").and_then(Value::as_str) {
            Some("enabled") | Some("adaptive") => Some(true),
            Some("disabled") => Some(false),
            Some(other) => return Err(ApiError::invalid(format!("thinking.type must be \"enabled\" or \"disabled\", not {other:?}"))),
            None => return Err(ApiError::invalid("thinking must have a `type`")),
        },
        Some(_) => return Err(ApiError::invalid("thinking must be a boolean or an object with `type`")),
    };
    let (effort_on, effort) = match effort {
        None => (None, None),
        Some("max") => (Some(true), Some(ReasoningEffort::Max)),
        Some("xhigh" | "high" | "medium" | "low" | "minimal") => (Some(true), Some(ReasoningEffort::High)),
        Some("none") => (Some(false), None),
        Some(other) => return Err(ApiError::invalid(format!("unknown reasoning effort {other:?} (none, minimal, low, medium, high, xhigh, max)"))),
    };
    let on = explicit.or(effort_on).unwrap_or(model != CHAT_ALIAS);
    Ok(if on { (ThinkingMode::Thinking, effort) } else { (ThinkingMode::Chat, None) })
}

/// Sampling knobs with ds4's defaults; negative `top_k` / `seed` mean "off".
pub fn sampling(temperature: Option<f64>, top_p: Option<f64>, top_k: Option<i64>, min_p: Option<f64>, seed: Option<i64>) -> Result<Sampling, ApiError> {
    let d = Sampling::default();
    let finite = |name: &str, v: Option<f64>, lo: f64, hi: f64| -> Result<Option<f32>, ApiError> {
        match v {
            None => Ok(None),
            Some(x) if x.is_finite() && x >= lo && x <= hi => Ok(Some(x as f32)),
            Some(x) => Err(ApiError::invalid(format!("{name} must be between {lo} and {hi}, got {x}"))),
        }
    };
    Ok(Sampling {
        temperature: finite("temperature", temperature, 0.0, 2.0)?.unwrap_or(d.temperature),
        top_p: finite("top_p", top_p, 0.0, 1.0)?.unwrap_or(d.top_p),
        top_k: top_k.map(|k| k.clamp(0, 1024) as u32).unwrap_or(d.top_k),
        min_p: finite("min_p", min_p, 0.0, 1.0)?.unwrap_or(d.min_p),
        seed: seed.map(|s| s as u64),
    })
}

/// `stop`: a string or an array of at most 16 strings.
pub fn stop_list(v: Option<&Value>) -> Result<Vec<String>, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(a)) if a.len() <= 16 => a
            .iter()
            .map(|x| x.as_str().map(str::to_string).ok_or_else(|| ApiError::invalid("stop sequences must be strings")))
            .collect(),
        Some(Value::Array(_)) => Err(ApiError::invalid("at most 16 stop sequences")),
        Some(_) => Err(ApiError::invalid("stop must be a string or an array of strings")),
    }
}

/// Normalises a tool list to OpenAI `{"type":"function","function":{...}}`
/// objects. Accepts the Chat shape, the flat Responses shape and Anthropic's
/// `input_schema` shape; `custom` (freeform) tools get one string `input`.
/// Other hosted tools are skipped (we cannot run them).
pub fn normalize_tools(tools: &[Value]) -> Result<Vec<Value>, ApiError> {
    let mut out = Vec::with_capacity(tools.len());
    for (i, t) in tools.iter().enumerate() {
        let o = t.as_object().ok_or_else(|| ApiError::invalid(format!("tools[{i}] must be an object")))?;
        if let Some(f) = o.get("function") {
            if !f.get("name").is_some_and(Value::is_string) {
                return Err(ApiError::invalid(format!("tools[{i}].function.name must be a string")));
            }
            out.push(json!({"type": "function", "function": f}));
            continue;
        }
        let ty = o.get("type").and_then(Value::as_str);
        let Some(name) = o.get("name").and_then(Value::as_str) else {
            if matches!(ty, Some("function") | Some("custom") | None) {
                return Err(ApiError::invalid(format!("tools[{i}] needs a `name`")));
            }
            continue;
        };
        let mut f = serde_json::Map::new();
        f.insert("name".into(), json!(name));
        if let Some(d) = o.get("description") {
            f.insert("description".into(), d.clone());
        }
        match ty {
            Some("custom") => {
                f.insert("parameters".into(), json!({"type": "object", "properties": {"input": {"type": "string", "description": "The raw tool input."}}, "required": ["input"]}));
            }
            Some("function") | None | Some("tool") => {
                let params = o.get("parameters").or_else(|| o.get("input_schema")).cloned().unwrap_or_else(|| json!({"type": "object", "properties": {}}));
                f.insert("parameters".into(), params);
            }
            // Anthropic server tools (bash_20250124, text_editor_…, web_search_…) with a name: expose as plain functions.
            Some(_) if o.contains_key("input_schema") => {
                f.insert("parameters".into(), o.get("input_schema").cloned().unwrap_or(Value::Null));
            }
            Some(_) => continue,
        }
        out.push(json!({"type": "function", "function": Value::Object(f)}));
    }
    Ok(out)
}

/// Renders the conversation: tools attach to a leading system message (one
/// is inserted when absent); assistant tool calls whose ids the server issued
/// are replayed from the exact sampled DSML.
pub fn render(mut messages: Vec<Message>, tools: Vec<Value>, mode: ThinkingMode, effort: Option<ReasoningEffort>, ctx: usize, mem: &ToolMemory) -> Result<String, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid("the conversation has no messages"));
    }
    if !tools.is_empty() {
        if messages[0].role != "system" {
            messages.insert(0, Message::system(""));
        }
        messages[0].tools = Some(tools);
    }
    let opts = EncodeOptions { mode, reasoning_effort: effort, context_tokens: Some(ctx as u64), ..EncodeOptions::default() };
    let mut text = encode_messages(&messages, &opts)?;
    let mut from = 0;
    for m in messages.iter().filter(|m| m.role == "assistant") {
        let Some(calls) = m.tool_calls.as_ref().filter(|c| !c.is_empty()) else { continue };
        let canonical = render_tool_calls(calls);
        let Some(rel) = text.get(from..).and_then(|t| t.find(&canonical)) else { continue };
        let pos = from + rel;
        let ids: Option<Vec<&str>> = calls.iter().map(|c| c.id.as_deref()).collect();
        match ids.and_then(|ids| mem.block_for(&ids)) {
            Some(exact) => {
                text.replace_range(pos..pos + canonical.len(), &exact);
                from = pos + exact.len();
            }
            None => from = pos + canonical.len(),
        }
    }
    Ok(text)
}

/// Current Unix time in seconds.
pub fn now_s() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}
