//! Shared helpers: start a server on an ephemeral loopback port.
#![allow(dead_code)]

use std::sync::{Arc, Mutex};

use dsv4_server::mock::MockGenerator;
use dsv4_server::{AppState, GenRequest, Generator, ServerConfig};

pub struct Server {
    pub base: String,
    pub seen: Arc<Mutex<Vec<GenRequest>>>,
    pub state: AppState,
}

pub async fn start_with(gen: Box<dyn Generator>, seen: Arc<Mutex<Vec<GenRequest>>>, cfg: ServerConfig) -> Server {
    let state = AppState::new(gen, cfg).expect("worker");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app = dsv4_server::router(state.clone());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Server { base: format!("http://{addr}"), seen, state }
}

pub async fn start(mock: MockGenerator, cfg: ServerConfig) -> Server {
    let seen = mock.seen.clone();
    start_with(Box::new(mock), seen, cfg).await
}

pub async fn mock(reply: &str) -> Server {
    start(MockGenerator::always(reply), ServerConfig::default()).await
}

/// Parses an SSE body into (event name, data) pairs (comments skipped).
pub fn sse_events(body: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for block in body.split("\n\n") {
        let mut name = String::new();
        let mut data = String::new();
        for line in block.lines() {
            if let Some(v) = line.strip_prefix("event:") {
                name = v.trim().to_string();
            } else if let Some(v) = line.strip_prefix("data:") {
                data.push_str(v.strip_prefix(' ').unwrap_or(v));
            }
        }
        if !data.is_empty() {
            out.push((name, data));
        }
    }
    out
}

pub fn json_events(body: &str) -> Vec<(String, serde_json::Value)> {
    sse_events(body).into_iter().filter(|(_, d)| d != "[DONE]").map(|(n, d)| (n, serde_json::from_str(&d).expect("event json"))).collect()
}

pub const TOOL_REPLY: &str = "I should look.</think>Let me check.\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"get_weather\">\n<｜DSML｜parameter name=\"city\" string=\"true\">Paris</｜DSML｜parameter>\n<｜DSML｜parameter name=\"opts\" string=\"false\">{\"units\":\"c\"}</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>";

pub fn weather_tool() -> serde_json::Value {
    serde_json::json!({"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "opts": {"type": "object"}}}}})
}
