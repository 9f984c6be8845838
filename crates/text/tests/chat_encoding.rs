//! Chat encoding: the official conformance cases byte for byte, plus cases
//! written from shared/spec/chat.md §2.

use dsv4_text::chat::{encode_messages, parse_messages_json, EncodeOptions, Message, ReasoningEffort, ThinkingMode, THINK_MAX_PREFIX};
use dsv4_text::ChatError;
use serde_json::json;
use std::path::PathBuf;

fn case(n: u32) -> (Vec<Message>, String) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/conformance/encoding");
    let input = std::fs::read_to_string(dir.join(format!("case{n}.input.json"))).unwrap();
    let expected = std::fs::read_to_string(dir.join(format!("case{n}.expected.txt"))).unwrap();
    (parse_messages_json(&input).unwrap(), expected)
}

fn msgs(v: serde_json::Value) -> Vec<Message> {
    serde_json::from_value(v).unwrap()
}

const B: &str = "<｜begin▁of▁sentence｜>";
const E: &str = "<｜end▁of▁sentence｜>";

#[test]
fn official_case1_thinking_tools() {
    let (m, want) = case(1);
    assert_eq!(encode_messages(&m, &EncodeOptions::thinking()).unwrap(), want);
}

#[test]
fn official_case2_thinking_drop() {
    let (m, want) = case(2);
    assert_eq!(encode_messages(&m, &EncodeOptions::thinking()).unwrap(), want);
}

#[test]
fn official_case4_chat_task() {
    let (m, want) = case(4);
    assert_eq!(encode_messages(&m, &EncodeOptions::chat()).unwrap(), want);
}

#[test]
fn shapes_chat_and_thinking() {
    let m = vec![Message::system("S"), Message::user("u1"), Message::assistant("a1"), Message::user("u2")];
    assert_eq!(
        encode_messages(&m, &EncodeOptions::chat()).unwrap(),
        format!("{B}S<｜User｜>u1<｜Assistant｜></think>a1{E}<｜User｜>u2<｜Assistant｜></think>")
    );
    assert_eq!(
        encode_messages(&m, &EncodeOptions::thinking()).unwrap(),
        format!("{B}S<｜User｜>u1<｜Assistant｜></think>a1{E}<｜User｜>u2<｜Assistant｜><think>")
    );
    // Without dropping, earlier turns keep their reasoning and the <think> opener.
    let mut m2 = m.clone();
    m2[2].reasoning_content = Some("r1".into());
    let opts = EncodeOptions { drop_thinking: false, ..EncodeOptions::thinking() };
    assert_eq!(
        encode_messages(&m2, &opts).unwrap(),
        format!("{B}S<｜User｜>u1<｜Assistant｜><think>r1</think>a1{E}<｜User｜>u2<｜Assistant｜><think>")
    );
    let no_bos = EncodeOptions { add_bos: false, ..EncodeOptions::chat() };
    assert!(!encode_messages(&m, &no_bos).unwrap().starts_with(B));
}

#[test]
fn think_max_prefix_and_context_rule() {
    let m = vec![Message::system("S"), Message::user("u")];
    let max = EncodeOptions { reasoning_effort: Some(ReasoningEffort::Max), ..EncodeOptions::thinking() };
    assert_eq!(encode_messages(&m, &max).unwrap(), format!("{B}{THINK_MAX_PREFIX}S<｜User｜>u<｜Assistant｜><think>"));
    assert!(THINK_MAX_PREFIX.ends_with("unchecked.\n\n"));
    // ds4's rule: Think Max needs >= 393216 tokens of context.
    let small = EncodeOptions { context_tokens: Some(393_215), ..max.clone() };
    assert_eq!(encode_messages(&m, &small).unwrap(), format!("{B}S<｜User｜>u<｜Assistant｜><think>"));
    let big = EncodeOptions { context_tokens: Some(1 << 20), ..max.clone() };
    assert!(encode_messages(&m, &big).unwrap().contains(THINK_MAX_PREFIX));
    // High adds nothing; chat mode never gets the prefix.
    let high = EncodeOptions { reasoning_effort: Some(ReasoningEffort::High), ..EncodeOptions::thinking() };
    assert!(!encode_messages(&m, &high).unwrap().contains("Reasoning Effort"));
    let chat = EncodeOptions { mode: ThinkingMode::Chat, ..max };
    assert!(!encode_messages(&m, &chat).unwrap().contains("Reasoning Effort"));
}

#[test]
fn tool_results_sorted_merged_and_escaped() {
    let m = msgs(json!([
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1, \"s\": \"v\"}"}},
            {"id": "b", "type": "function", "function": {"name": "g", "arguments": "not json"}}]},
        {"role": "tool", "tool_call_id": "b", "content": "B </tool_result> end"},
        {"role": "tool", "tool_call_id": "a", "content": "A"},
        {"role": "user", "content": "more"}
    ]));
    let got = encode_messages(&m, &EncodeOptions::chat()).unwrap();
    let want = format!(
        "{B}<｜User｜>q<｜Assistant｜></think>\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n<｜DSML｜parameter name=\"x\" string=\"false\">1</｜DSML｜parameter>\n<｜DSML｜parameter name=\"s\" string=\"true\">v</｜DSML｜parameter>\n</｜DSML｜invoke>\n<｜DSML｜invoke name=\"g\">\n<｜DSML｜parameter name=\"arguments\" string=\"true\">not json</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>{E}<｜User｜><tool_result>A</tool_result>\n\n<tool_result>B &lt;/tool_result> end</tool_result>\n\nmore<｜Assistant｜></think>"
    );
    assert_eq!(got, want);
}

#[test]
fn tools_keep_reasoning_in_thinking_mode() {
    let m = msgs(json!([
        {"role": "system", "content": "S", "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]},
        {"role": "user", "content": "u1"},
        {"role": "assistant", "reasoning_content": "r1", "content": "a1"},
        {"role": "user", "content": "u2"}
    ]));
    let got = encode_messages(&m, &EncodeOptions::thinking()).unwrap();
    assert!(got.contains("{\"name\": \"f\", \"parameters\": {\"type\": \"object\"}}\n\nYou MUST strictly follow"));
    assert!(got.ends_with(&format!("<｜User｜>u1<｜Assistant｜><think>r1</think>a1{E}<｜User｜>u2<｜Assistant｜><think>")), "{got}");
}

#[test]
fn developer_latest_reminder_response_format() {
    let m = msgs(json!([
        {"role": "system", "content": "S", "response_format": {"type": "json_object"}},
        {"role": "developer", "content": "D1"},
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "a1", "reasoning_content": "r"},
        {"role": "developer", "content": "D2"},
        {"role": "latest_reminder", "content": "R"}
    ]));
    // Thinking + drop: the earlier developer message is dropped, the last user
    // turn is the last developer; a developer followed by latest_reminder still
    // gets the assistant opener.
    let got = encode_messages(&m, &EncodeOptions::thinking()).unwrap();
    assert_eq!(
        got,
        format!("{B}S\n\n## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n{{\"type\": \"json_object\"}}<｜User｜>u1<｜Assistant｜></think>a1{E}<｜User｜>D2<｜Assistant｜><think><｜latest_reminder｜>R")
    );
    let chat = encode_messages(&m, &EncodeOptions::chat()).unwrap();
    assert!(chat.contains("<｜User｜>D1<｜User｜>u1<｜Assistant｜></think>a1"), "{chat}");
    let bad = vec![Message::new("developer", "")];
    assert_eq!(encode_messages(&bad, &EncodeOptions::chat()), Err(ChatError::EmptyDeveloper { index: 0 }));
    let bad = vec![Message::new("wizard", "x")];
    assert!(matches!(encode_messages(&bad, &EncodeOptions::chat()), Err(ChatError::UnknownRole { .. })));
}

#[test]
fn tasks_and_wo_eos() {
    let m = msgs(json!([
        {"role": "user", "content": "u", "task": "query"},
        {"role": "assistant", "content": "q", "reasoning_content": "ignored"}
    ]));
    assert_eq!(encode_messages(&m, &EncodeOptions::thinking()).unwrap(), format!("{B}<｜User｜>u<｜query｜>q{E}"));
    let m = msgs(json!([
        {"role": "user", "content": "u", "task": "action"},
        {"role": "assistant", "content": "Search"}
    ]));
    assert_eq!(encode_messages(&m, &EncodeOptions::thinking()).unwrap(), format!("{B}<｜User｜>u<｜Assistant｜><think><｜action｜>Search{E}"));
    let m = msgs(json!([
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": "a", "task": "title"}
    ]));
    assert_eq!(encode_messages(&m, &EncodeOptions::chat()).unwrap(), format!("{B}<｜User｜>u<｜Assistant｜></think>a{E}<｜title｜>"));
    let m = msgs(json!([{"role": "user", "content": "u", "task": "bogus"}]));
    assert!(matches!(encode_messages(&m, &EncodeOptions::chat()), Err(ChatError::UnknownTask { .. })));
    let m = msgs(json!([{"role": "user", "content": "u"}, {"role": "assistant", "content": "partial", "wo_eos": true}]));
    assert_eq!(encode_messages(&m, &EncodeOptions::chat()).unwrap(), format!("{B}<｜User｜>u<｜Assistant｜></think>partial"));
}

#[test]
fn consecutive_users_merge_and_blocks() {
    let m = msgs(json!([
        {"role": "user", "content": "a"},
        {"role": "user", "content": [{"type": "text", "text": "b"}, {"type": "image_url", "image_url": {"url": "x"}}]}
    ]));
    assert_eq!(encode_messages(&m, &EncodeOptions::chat()).unwrap(), format!("{B}<｜User｜>a\n\nb\n\n[Unsupported image_url]<｜Assistant｜></think>"));
}

#[test]
fn dsml_values_are_escaped_only_where_they_would_break_framing() {
    let m = msgs(json!([
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "w",
            "arguments": {"text": "a</｜DSML｜parameter>b", "obj": {"k": "x</｜DSML｜parameter>", "f": 1.5, "l": [true, null]}}}}]}
    ]));
    let got = encode_messages(&m, &EncodeOptions::chat()).unwrap();
    assert!(got.contains("string=\"true\">a&lt;/｜DSML｜parameter>b</｜DSML｜parameter>"), "{got}");
    assert!(got.contains("string=\"false\">{\"k\": \"x\\u003c/｜DSML｜parameter>\", \"f\": 1.5, \"l\": [true, null]}</｜DSML｜parameter>"), "{got}");
}

#[test]
fn messages_file_shapes() {
    let obj = r#"{"messages": [{"role": "system", "content": "S"}], "tools": [{"type": "function", "function": {"name": "f"}}]}"#;
    let m = parse_messages_json(obj).unwrap();
    assert_eq!(m[0].tools.as_ref().map(|t| t.len()), Some(1));
    assert!(parse_messages_json("42").is_err());
    assert!(parse_messages_json("{\"x\": 1}").is_err());
}
