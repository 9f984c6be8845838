//! End to end over the real generator: the tiny fixture GGUF (toy 512-token
//! vocabulary, random-looking output) served through every API. Protocol
//! shapes, usage and live-prefix reuse are checked; content is not.
#![cfg(feature = "engine")]

mod common;
use std::path::PathBuf;
use std::sync::Arc;

use common::*;
use dsv4_server::engine_gen::EngineGenerator;
use dsv4_server::ServerConfig;
use serde_json::{json, Value};

pub fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures/tiny-q2/model.gguf")
}

async fn post(base: &str, path: &str, body: Value) -> (u16, String) {
    let r = reqwest::Client::new().post(format!("{base}{path}")).json(&body).send().await.expect("send");
    (r.status().as_u16(), r.text().await.expect("body"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixture_model_serves_all_apis_and_reuses_prefix() {
    let gen = EngineGenerator::load(&fixture(), 512, None).expect("load fixture");
    let s = start_with(Box::new(gen), Arc::default(), ServerConfig::default()).await;
    let (st, body) = post(&s.base, "/v1/chat/completions", json!({"model": "deepseek-chat", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 6, "seed": 7, "logprobs": true, "top_logprobs": 3})).await;
    assert_eq!(st, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let u = &v["usage"];
    assert!(u["prompt_tokens"].as_u64().unwrap() > 3);
    assert!(u["completion_tokens"].as_u64().unwrap() <= 6);
    assert_eq!(v["choices"][0]["logprobs"]["content"][0]["top_logprobs"].as_array().unwrap().len(), 3);
    let reply = v["choices"][0]["message"]["content"].as_str().unwrap().to_string();

    // A longer conversation with the same start reuses the live prefix.
    let (st, body) = post(&s.base, "/v1/chat/completions", json!({"model": "deepseek-chat", "max_tokens": 4, "messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": reply}, {"role": "user", "content": "More"}]})).await;
    assert_eq!(st, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert!(v["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap() >= 4, "{v}");

    // Streaming (thinking default) and the other APIs.
    let (st, body) = post(&s.base, "/v1/chat/completions", json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "stream": true, "stream_options": {"include_usage": true}})).await;
    assert_eq!(st, 200);
    assert!(body.trim_end().ends_with("data: [DONE]"));
    let (st, body) = post(&s.base, "/v1/messages", json!({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "Hi"}], "stream": true})).await;
    assert_eq!(st, 200);
    assert!(body.contains("event: message_stop"), "{body}");
    let (st, body) = post(&s.base, "/v1/responses", json!({"input": "Hi", "max_output_tokens": 5})).await;
    assert_eq!(st, 200, "{body}");
    let (st, body) = post(&s.base, "/v1/completions", json!({"prompt": "Hi", "max_tokens": 3, "temperature": 0})).await;
    assert_eq!(st, 200, "{body}");
    // Past the context: a clean 400.
    let (st, body) = post(&s.base, "/v1/chat/completions", json!({"messages": [{"role": "user", "content": "x ".repeat(2000)}]})).await;
    assert_eq!(st, 400, "{body}");
}
