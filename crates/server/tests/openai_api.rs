//! OpenAI Chat Completions / Completions / models over the scripted mock.

mod common;
use common::*;
use serde_json::{json, Value};

async fn post(base: &str, path: &str, body: Value) -> (u16, String) {
    let r = reqwest::Client::new().post(format!("{base}{path}")).json(&body).send().await.expect("send");
    (r.status().as_u16(), r.text().await.expect("body"))
}

#[tokio::test]
async fn models_list_get_and_404() {
    let s = mock("x</think>y").await;
    let v: Value = reqwest::get(format!("{}/v1/models", s.base)).await.unwrap().json().await.unwrap();
    let ids: Vec<&str> = v["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert!(ids.contains(&"deepseek-v4-flash") && ids.contains(&"deepseek-chat"));
    let r = reqwest::get(format!("{}/v1/models/deepseek-chat", s.base)).await.unwrap();
    assert_eq!(r.status(), 200);
    let r = reqwest::get(format!("{}/v1/models/nope", s.base)).await.unwrap();
    assert_eq!(r.status(), 404);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["type"], "invalid_request_error");
    let h: Value = reqwest::get(format!("{}/health", s.base)).await.unwrap().json().await.unwrap();
    assert_eq!(h["status"], "ok");
}

#[tokio::test]
async fn chat_non_stream_thinking_and_chat_alias() {
    let s = mock("Thinking hard.</think>Hello there!").await;
    let (st, body) = post(&s.base, "/v1/chat/completions", json!({"model": "deepseek-v4-flash", "messages": [{"role": "user", "content": "Hi"}]})).await;
    assert_eq!(st, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let m = &v["choices"][0]["message"];
    assert_eq!(m["content"], "Hello there!");
    assert_eq!(m["reasoning_content"], "Thinking hard.");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
    assert!(v["timings"]["decode_tokens_per_second"].is_number());
    let prompt = s.seen.lock().unwrap()[0].prompt.clone();
    assert!(prompt.ends_with("<｜User｜>Hi<｜Assistant｜><think>"), "{prompt}");

    // Non-thinking alias: `</think>` opener; content parts are concatenated.
    let s = mock("Plain answer").await;
    let (st, body) = post(&s.base, "/v1/chat/completions", json!({"model": "deepseek-chat", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "A"}, {"type": "text", "text": "B"}]}]})).await;
    assert_eq!(st, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "Plain answer");
    let prompt = s.seen.lock().unwrap()[0].prompt.clone();
    assert_eq!(prompt, "<｜begin▁of▁sentence｜>Be brief.<｜User｜>AB<｜Assistant｜></think>");
}

#[tokio::test]
async fn chat_stream_reasoning_content_usage_done() {
    let s = mock("Let me think about it.</think>The answer is 42.").await;
    let (st, body) = post(&s.base, "/v1/chat/completions", json!({"messages": [{"role": "user", "content": "Q"}], "stream": true, "stream_options": {"include_usage": true}})).await;
    assert_eq!(st, 200);
    assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
    let evs = json_events(&body);
    let mut reasoning = String::new();
    let mut content = String::new();
    let mut finish = None;
    let mut usage = None;
    for (_, e) in &evs {
        assert_eq!(e["object"], "chat.completion.chunk");
        if let Some(c) = e["choices"].get(0) {
            if let Some(r) = c["delta"]["reasoning_content"].as_str() {
                reasoning.push_str(r);
            }
            if let Some(t) = c["delta"]["content"].as_str() {
                content.push_str(t);
            }
            if let Some(f) = c["finish_reason"].as_str() {
                finish = Some(f.to_string());
            }
        }
        if !e["usage"].is_null() {
            usage = Some(e["usage"].clone());
        }
    }
    assert_eq!(reasoning, "Let me think about it.");
    assert_eq!(content, "The answer is 42.");
    assert_eq!(finish.as_deref(), Some("stop"));
    assert!(usage.unwrap()["completion_tokens"].as_u64().unwrap() > 0);
}

#[tokio::test]
async fn chat_tool_call_round_trip_replays_exact_dsml() {
    let s = mock(TOOL_REPLY).await;
    let (st, body) = post(&s.base, "/v1/chat/completions", json!({"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": [weather_tool()]})).await;
    assert_eq!(st, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let c = &v["choices"][0];
    assert_eq!(c["finish_reason"], "tool_calls");
    let call = &c["message"]["tool_calls"][0];
    let id = call["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("call_") && id.len() >= 29, "{id}");
    assert_eq!(call["function"]["name"], "get_weather");
    let args: Value = serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args, json!({"city": "Paris", "opts": {"units": "c"}}));
    assert_eq!(c["message"]["content"], "Let me check.");
    let first_prompt = s.seen.lock().unwrap()[0].prompt.clone();
    assert!(first_prompt.contains("## Tools") && first_prompt.contains("\"name\": \"get_weather\""));
    assert!(s.seen.lock().unwrap()[0].dsml_greedy);

    // Send the history back: the sampled DSML (compact JSON `{"units":"c"}`) is replayed byte for byte.
    let msg = c["message"].clone();
    let (st, body) = post(&s.base, "/v1/chat/completions", json!({"messages": [{"role": "user", "content": "Weather in Paris?"}, msg, {"role": "tool", "tool_call_id": id, "content": "18C"}], "tools": [weather_tool()]})).await;
    assert_eq!(st, 200, "{body}");
    let second = s.seen.lock().unwrap()[1].prompt.clone();
    let sampled = &TOOL_REPLY[TOOL_REPLY.find("\n\n<｜DSML｜tool_calls>").unwrap()..];
    assert!(second.contains(sampled), "exact DSML not replayed:\n{second}");
    assert!(second.starts_with(&first_prompt), "the live prefix must be reusable");
    assert!(second.contains("<tool_result>18C</tool_result>"));

    // An unknown id falls back to canonical rendering (`{"units": "c"}`).
    let mut msg2 = c["message"].clone();
    msg2["tool_calls"][0]["id"] = json!("call_unknown");
    let (st, _) = post(&s.base, "/v1/chat/completions", json!({"messages": [{"role": "user", "content": "Weather?"}, msg2, {"role": "tool", "tool_call_id": "call_unknown", "content": "18C"}], "tools": [weather_tool()]})).await;
    assert_eq!(st, 200);
    let third = s.seen.lock().unwrap()[2].prompt.clone();
    assert!(third.contains("{\"units\": \"c\"}"), "{third}");
}

#[tokio::test]
async fn chat_stream_tool_header_then_argument_deltas() {
    let s = mock(TOOL_REPLY).await;
    let (st, body) = post(&s.base, "/v1/chat/completions", json!({"messages": [{"role": "user", "content": "W?"}], "tools": [weather_tool()], "stream": true})).await;
    assert_eq!(st, 200);
    let evs = json_events(&body);
    let tc: Vec<&Value> = evs.iter().filter_map(|(_, e)| e["choices"][0]["delta"]["tool_calls"].get(0)).collect();
    assert!(tc.len() > 2, "arguments should stream in several deltas");
    assert_eq!(tc[0]["function"]["name"], "get_weather");
    assert!(tc[0]["id"].as_str().unwrap().starts_with("call_"));
    let args: String = tc.iter().filter_map(|t| t["function"]["arguments"].as_str()).collect();
    assert_eq!(serde_json::from_str::<Value>(&args).unwrap(), json!({"city": "Paris", "opts": {"units": "c"}}));
    let last = evs.iter().rev().find(|(_, e)| e["choices"][0]["finish_reason"].is_string()).unwrap();
    assert_eq!(last.1["choices"][0]["finish_reason"], "tool_calls");
}

#[tokio::test]
async fn stop_sequences_and_max_tokens() {
    let s = mock("</think>one two STOP three").await;
    let (_, body) = post(&s.base, "/v1/chat/completions", json!({"messages": [{"role": "user", "content": "x"}], "stop": ["STOP"]})).await;
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "one two ");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let (_, body) = post(&s.base, "/v1/chat/completions", json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 2})).await;
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 2);
}

#[tokio::test]
async fn logprobs_and_legacy_completions() {
    let s = mock("</think>abcdef").await;
    let (_, body) = post(&s.base, "/v1/chat/completions", json!({"messages": [{"role": "user", "content": "x"}], "logprobs": true, "top_logprobs": 2})).await;
    let v: Value = serde_json::from_str(&body).unwrap();
    let lp = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert!(!lp.is_empty());
    assert_eq!(lp[0]["top_logprobs"].as_array().unwrap().len(), 2);
    let (st, body) = post(&s.base, "/v1/completions", json!({"prompt": "Say hi", "max_tokens": 10})).await;
    assert_eq!(st, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["choices"][0]["text"], "abcdef");
    let p = s.seen.lock().unwrap().last().unwrap().prompt.clone();
    assert!(p.starts_with("<｜begin▁of▁sentence｜>You are a helpful assistant<｜User｜>Say hi<｜Assistant｜>"), "{p}");
    let (st, body) = post(&s.base, "/v1/completions", json!({"prompt": "Say hi", "stream": true})).await;
    assert_eq!(st, 200);
    assert!(body.contains("data: [DONE]"));
}

#[tokio::test]
async fn cached_tokens_reported_for_a_growing_conversation() {
    let s = mock("</think>Reply one.").await;
    let (_, b1) = post(&s.base, "/v1/chat/completions", json!({"model": "deepseek-chat", "messages": [{"role": "user", "content": "First question"}]})).await;
    let v1: Value = serde_json::from_str(&b1).unwrap();
    let (_, b2) = post(&s.base, "/v1/chat/completions", json!({"model": "deepseek-chat", "messages": [{"role": "user", "content": "First question"}, {"role": "assistant", "content": v1["choices"][0]["message"]["content"]}, {"role": "user", "content": "Second"}]})).await;
    let v2: Value = serde_json::from_str(&b2).unwrap();
    assert!(v2["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap() > 5, "{v2}");
}
