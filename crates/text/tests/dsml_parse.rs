//! DSML completion parsing: the official case's assistant turns, streaming in
//! arbitrary chunks, and the documented handling of malformed input.

use dsv4_text::chat::ThinkingMode;
use dsv4_text::dsml::{parse_completion, render_completion, Event, StreamParser};
use std::path::PathBuf;

const E: &str = "<｜end▁of▁sentence｜>";

/// The assistant completions of official case 1 (text after `<｜Assistant｜><think>`).
fn case1_completions() -> Vec<String> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/conformance/encoding/case1.expected.txt");
    let text = std::fs::read_to_string(p).unwrap();
    text.split("<｜Assistant｜><think>").skip(1).map(|s| format!("{}{E}", s.split(E).next().unwrap())).collect()
}

/// Aggregated view of an event list (chunking-independent).
#[derive(Debug, PartialEq, Default)]
struct Agg {
    reasoning: String,
    content: String,
    calls: Vec<(usize, String, String, bool)>,
    errors: Vec<Option<usize>>,
}

fn aggregate(events: &[Event]) -> Agg {
    let mut a = Agg::default();
    for e in events {
        match e {
            Event::Reasoning(s) => a.reasoning.push_str(s),
            Event::Content(s) => a.content.push_str(s),
            Event::ToolCallStart { index, name, .. } => a.calls.push((*index, name.clone(), String::new(), false)),
            Event::ToolCallArgs { index, delta } => a.calls.iter_mut().find(|c| c.0 == *index).unwrap().2.push_str(delta),
            Event::ToolCallEnd { index } => a.calls.iter_mut().find(|c| c.0 == *index).unwrap().3 = true,
            Event::Error { index, .. } => a.errors.push(*index),
        }
    }
    a
}

fn stream(text: &str, mode: ThinkingMode, chunk: usize) -> Vec<Event> {
    let mut p = StreamParser::new(mode);
    let mut ev = Vec::new();
    let chars: Vec<char> = text.chars().collect();
    for c in chars.chunks(chunk.max(1)) {
        ev.extend(p.push(&c.iter().collect::<String>()));
    }
    ev.extend(p.finish());
    ev
}

#[test]
fn official_case1_turns_parse_and_round_trip() {
    let turns = case1_completions();
    assert_eq!(turns.len(), 2);
    let m = parse_completion(&turns[0], ThinkingMode::Thinking);
    assert_eq!(m.reasoning_content.as_deref(), Some("The user wants to know the weather in Beijing. I should use the get_weather tool."));
    assert_eq!(m.content, "");
    assert_eq!(m.tool_calls.len(), 1);
    assert_eq!(m.tool_calls[0].name, "get_weather");
    assert_eq!(m.tool_calls[0].arguments, r#"{"location": "Beijing", "unit": "celsius"}"#);
    assert!(m.errors.is_empty() && m.ended);
    assert_eq!(render_completion(&m, ThinkingMode::Thinking), turns[0]);
    let m2 = parse_completion(&turns[1], ThinkingMode::Thinking);
    assert_eq!(m2.content, "The weather in Beijing is currently sunny with a temperature of 22°C and 45% humidity.");
    assert!(m2.tool_calls.is_empty());
    assert_eq!(render_completion(&m2, ThinkingMode::Thinking), turns[1]);
}

#[test]
fn streaming_in_any_chunking_matches_whole() {
    for t in case1_completions() {
        let whole = aggregate(&stream(&t, ThinkingMode::Thinking, usize::MAX));
        for chunk in [1, 2, 3, 5, 7, 13] {
            assert_eq!(aggregate(&stream(&t, ThinkingMode::Thinking, chunk)), whole, "chunk {chunk}");
        }
    }
    // The tool call is announced as soon as its header is complete.
    let t = &case1_completions()[0];
    let head = &t[..t.find("\">\n<｜DSML｜parameter").unwrap() + 2];
    let mut p = StreamParser::new(ThinkingMode::Thinking);
    let ev = p.push(head);
    assert!(ev.iter().any(|e| matches!(e, Event::ToolCallStart { index: 0, name, .. } if name == "get_weather")), "{ev:?}");
}

#[test]
fn multiple_calls_json_values_and_escapes() {
    let text = "Let me check.\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"a\">\n<｜DSML｜parameter name=\"n\" string=\"false\">[1, {\"x\": null}]</｜DSML｜parameter>\n<｜DSML｜parameter name=\"s\" string=\"true\">line1\n\"q\" &lt;/｜DSML｜parameter> 日本</｜DSML｜parameter>\n</｜DSML｜invoke>\n<｜DSML｜invoke name=\"b\">\n\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>".to_string() + E;
    let m = parse_completion(&text, ThinkingMode::Chat);
    assert_eq!(m.reasoning_content, None);
    assert_eq!(m.content, "Let me check.");
    assert_eq!(m.tool_calls[0].arguments, "{\"n\": [1, {\"x\": null}], \"s\": \"line1\\n\\\"q\\\" </｜DSML｜parameter> 日本\"}");
    let v: serde_json::Value = serde_json::from_str(&m.tool_calls[0].arguments).unwrap();
    assert_eq!(v["s"], "line1\n\"q\" </｜DSML｜parameter> 日本");
    assert_eq!(m.tool_calls[1].arguments, "{}");
    assert_eq!(render_completion(&m, ThinkingMode::Chat), text);
    for chunk in [1, 4, 9] {
        assert_eq!(aggregate(&stream(&text, ThinkingMode::Chat, chunk)), aggregate(&stream(&text, ThinkingMode::Chat, usize::MAX)));
    }
}

#[test]
fn malformed_before_any_invoke_becomes_content() {
    let text = "Hi\n\n<｜DSML｜tool_calls>\nnot a tag at all";
    let m = parse_completion(text, ThinkingMode::Chat);
    assert_eq!(m.content, text);
    assert!(m.tool_calls.is_empty() && m.errors.is_empty());
    // Truncated right after the block opener: also plain text.
    let m = parse_completion("x<｜DSML｜tool_calls>\n<｜DSML｜inv", ThinkingMode::Chat);
    assert_eq!(m.content, "x<｜DSML｜tool_calls>\n<｜DSML｜inv");
}

#[test]
fn malformed_after_an_invoke_is_an_error() {
    let good = "<｜DSML｜invoke name=\"ok\">\n<｜DSML｜parameter name=\"a\" string=\"true\">1</｜DSML｜parameter>\n</｜DSML｜invoke>\n";
    // Duplicate parameter in the second call.
    let text = format!("<think>r</think>c\n\n<｜DSML｜tool_calls>\n{good}<｜DSML｜invoke name=\"bad\">\n<｜DSML｜parameter name=\"a\" string=\"true\">1</｜DSML｜parameter>\n<｜DSML｜parameter name=\"a\" string=\"true\">2</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>");
    let m = parse_completion(&text[7..], ThinkingMode::Thinking);
    assert_eq!(m.tool_calls.len(), 1);
    assert_eq!(m.tool_calls[0].name, "ok");
    assert_eq!(m.errors.len(), 1);
    assert!(m.errors[0].contains("duplicate"), "{:?}", m.errors);
    // Truncated inside a value (e.g. max_tokens): error, completed calls kept.
    let text = format!("\n\n<｜DSML｜tool_calls>\n{good}<｜DSML｜invoke name=\"t\">\n<｜DSML｜parameter name=\"a\" string=\"true\">abc");
    let ev = stream(&text, ThinkingMode::Chat, 3);
    assert!(matches!(ev.last(), Some(Event::Error { index: Some(1), .. })), "{ev:?}");
    let m = parse_completion(&text, ThinkingMode::Chat);
    assert_eq!(m.tool_calls.len(), 1);
    // Bad string flag.
    let text = format!("\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"t\">\n<｜DSML｜parameter name=\"a\" string=\"maybe\">1</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>");
    let m = parse_completion(&text, ThinkingMode::Chat);
    assert!(m.tool_calls.is_empty() && m.errors.len() == 1);
}

#[test]
fn reasoning_without_end_and_text_after_eos() {
    let m = parse_completion("thinking forever", ThinkingMode::Thinking);
    assert_eq!(m.reasoning_content.as_deref(), Some("thinking forever"));
    assert_eq!(m.content, "");
    let m = parse_completion(&format!("r</think>done{E}ignored"), ThinkingMode::Thinking);
    assert_eq!(m.content, "done");
    assert!(m.ended);
    // Holding back a partial marker never loses text.
    let ev = stream("a</thi", ThinkingMode::Thinking, 1);
    assert_eq!(aggregate(&ev).reasoning, "a</thi");
}
