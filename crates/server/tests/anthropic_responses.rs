//! Anthropic Messages and OpenAI Responses over the scripted mock.

mod common;
use common::*;
use serde_json::{json, Value};

async fn post(base: &str, path: &str, body: Value) -> (u16, String) {
    let r = reqwest::Client::new().post(format!("{base}{path}")).json(&body).send().await.expect("send");
    (r.status().as_u16(), r.text().await.expect("body"))
}

fn anth_tool() -> Value {
    json!({"name": "get_weather", "description": "Weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}})
}

#[tokio::test]
async fn anthropic_non_stream_tool_use_and_round_trip() {
    let s = mock(TOOL_REPLY).await;
    let (st, body) = post(&s.base, "/v1/messages", json!({"model": "claude-sonnet-4-5", "max_tokens": 200, "system": [{"type": "text", "text": "Sys"}], "messages": [{"role": "user", "content": "Weather?"}], "tools": [anth_tool()]})).await;
    assert_eq!(st, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["type"], "message");
    assert_eq!(v["stop_reason"], "tool_use");
    let content = v["content"].as_array().unwrap();
    assert_eq!(content[0]["type"], "thinking");
    assert_eq!(content[1], json!({"type": "text", "text": "Let me check."}));
    let tu = &content[2];
    assert_eq!(tu["type"], "tool_use");
    assert!(tu["id"].as_str().unwrap().starts_with("toolu_"));
    assert_eq!(tu["input"], json!({"city": "Paris", "opts": {"units": "c"}}));
    let p0 = s.seen.lock().unwrap()[0].prompt.clone();
    assert!(p0.starts_with("<｜begin▁of▁sentence｜>Sys\n\n## Tools"), "{p0}");

    let (st, body) = post(&s.base, "/v1/messages", json!({"model": "m", "max_tokens": 50, "system": "Sys", "tools": [anth_tool()], "messages": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": content},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tu["id"], "content": [{"type": "text", "text": "18C"}]}]}
    ]})).await;
    assert_eq!(st, 200, "{body}");
    let p1 = s.seen.lock().unwrap()[1].prompt.clone();
    let sampled = &TOOL_REPLY[TOOL_REPLY.find("\n\n<｜DSML｜tool_calls>").unwrap()..];
    assert!(p1.contains(sampled), "{p1}");
    assert!(p1.contains("<tool_result>18C</tool_result>"));
}

#[tokio::test]
async fn anthropic_stream_event_lifecycle() {
    let s = mock(TOOL_REPLY).await;
    let (st, body) = post(&s.base, "/v1/messages", json!({"model": "m", "max_tokens": 200, "stream": true, "messages": [{"role": "user", "content": "Weather?"}], "tools": [anth_tool()]})).await;
    assert_eq!(st, 200);
    let evs = json_events(&body);
    let names: Vec<&str> = evs.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names.first(), Some(&"message_start"));
    assert_eq!(names.last(), Some(&"message_stop"));
    for (n, e) in &evs {
        assert_eq!(n, e["type"].as_str().unwrap());
    }
    let starts: Vec<&Value> = evs.iter().filter(|(n, _)| n == "content_block_start").map(|(_, e)| &e["content_block"]).collect();
    let kinds: Vec<&str> = starts.iter().map(|b| b["type"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["thinking", "text", "tool_use"]);
    let json_parts: String = evs.iter().filter(|(_, e)| e["delta"]["type"] == "input_json_delta").map(|(_, e)| e["delta"]["partial_json"].as_str().unwrap().to_string()).collect();
    assert_eq!(serde_json::from_str::<Value>(&json_parts).unwrap(), json!({"city": "Paris", "opts": {"units": "c"}}));
    let md = evs.iter().find(|(n, _)| n == "message_delta").unwrap();
    assert_eq!(md.1["delta"]["stop_reason"], "tool_use");
    // every started block is stopped
    assert_eq!(names.iter().filter(|n| **n == "content_block_start").count(), names.iter().filter(|n| **n == "content_block_stop").count());
}

#[tokio::test]
async fn anthropic_errors_use_anthropic_shape() {
    let s = mock("x").await;
    let r = reqwest::Client::new().post(format!("{}/v1/messages", s.base)).body("{not json").send().await.unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "invalid_request_error");
    let (st, body) = post(&s.base, "/v1/messages", json!({"max_tokens": 5, "messages": [{"role": "robot", "content": "x"}]})).await;
    assert_eq!(st, 400);
    assert!(body.contains("role"));
}

#[tokio::test]
async fn responses_non_stream_and_function_call_items() {
    let s = mock(TOOL_REPLY).await;
    let tool = json!({"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}});
    let (st, body) = post(&s.base, "/v1/responses", json!({"model": "m", "instructions": "Be useful", "input": "Weather?", "tools": [tool]})).await;
    assert_eq!(st, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["object"], "response");
    assert_eq!(v["status"], "completed");
    let out = v["output"].as_array().unwrap();
    let types: Vec<&str> = out.iter().map(|o| o["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["reasoning", "message", "function_call"]);
    let fc = &out[2];
    let call_id = fc["call_id"].as_str().unwrap();
    assert_eq!(fc["name"], "get_weather");

    let input = json!([
        {"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
        {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": "I should look."}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Let me check."}]},
        {"type": "function_call", "call_id": call_id, "name": "get_weather", "arguments": fc["arguments"]},
        {"type": "function_call_output", "call_id": call_id, "output": "18C"}
    ]);
    let (st, body) = post(&s.base, "/v1/responses", json!({"model": "m", "instructions": "Be useful", "input": input, "tools": [tool]})).await;
    assert_eq!(st, 200, "{body}");
    let p1 = s.seen.lock().unwrap()[1].prompt.clone();
    let sampled = &TOOL_REPLY[TOOL_REPLY.find("\n\n<｜DSML｜tool_calls>").unwrap()..];
    assert!(p1.contains(sampled), "{p1}");
    let (st, _) = post(&s.base, "/v1/responses", json!({"input": "x", "previous_response_id": "resp_1"})).await;
    assert_eq!(st, 400);
}

#[tokio::test]
async fn responses_stream_lifecycle_and_incomplete() {
    let s = mock("Hmm.</think>Hello world").await;
    let (st, body) = post(&s.base, "/v1/responses", json!({"input": "Hi", "stream": true})).await;
    assert_eq!(st, 200);
    let evs = json_events(&body);
    let names: Vec<&str> = evs.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(&names[..2], ["response.created", "response.in_progress"]);
    assert_eq!(names.last(), Some(&"response.completed"));
    for (i, (_, e)) in evs.iter().enumerate() {
        assert_eq!(e["sequence_number"], i as u64);
    }
    let text: String = evs.iter().filter(|(n, _)| n == "response.output_text.delta").map(|(_, e)| e["delta"].as_str().unwrap().to_string()).collect();
    assert_eq!(text, "Hello world");
    assert!(names.contains(&"response.reasoning_text.delta"));
    let done = &evs.last().unwrap().1["response"];
    assert_eq!(done["output"][1]["content"][0]["text"], "Hello world");
    assert!(done["usage"]["output_tokens"].as_u64().unwrap() > 0);

    let (_, body) = post(&s.base, "/v1/responses", json!({"input": "Hi", "stream": true, "max_output_tokens": 2})).await;
    let evs = json_events(&body);
    let last = &evs.last().unwrap();
    assert_eq!(last.0, "response.incomplete");
    assert_eq!(last.1["response"]["incomplete_details"]["reason"], "max_output_tokens");
}
