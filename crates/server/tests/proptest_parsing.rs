//! Property tests: arbitrary bytes and arbitrary JSON values posted to every
//! endpoint never panic and never get a 5xx (the worker is a mock).

use std::sync::OnceLock;

use axum::body::Body;
use axum::http::Request;
use dsv4_server::mock::MockGenerator;
use dsv4_server::{AppState, ServerConfig};
use proptest::prelude::*;
use serde_json::{json, Value};
use tower::ServiceExt;

fn state() -> AppState {
    static S: OnceLock<AppState> = OnceLock::new();
    S.get_or_init(|| AppState::new(Box::new(MockGenerator::always("r</think>ok")), ServerConfig { default_max_tokens: 8, queue: 64, ..Default::default() }).expect("worker")).clone()
}

fn rt() -> &'static tokio::runtime::Runtime {
    static R: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    R.get_or_init(|| tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("rt"))
}

fn status_for(path: &str, body: Vec<u8>) -> u16 {
    let app = dsv4_server::router(state());
    let req = Request::post(path).header("content-type", "application/json").body(Body::from(body)).expect("request");
    rt().block_on(async {
        let resp = app.oneshot(req).await.expect("infallible");
        let st = resp.status().as_u16();
        let _ = axum::body::to_bytes(resp.into_body(), 1 << 24).await;
        st
    })
}

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(|f| json!(f)),
        "[a-z<>｜/\"]{0,12}".prop_map(Value::String),
        prop_oneof![Just("user"), Just("assistant"), Just("tool"), Just("system"), Just("text"), Just("tool_use"), Just("tool_result"), Just("function_call")].prop_map(|s| json!(s)),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::vec((prop_oneof![Just("role"), Just("content"), Just("type"), Just("text"), Just("messages"), Just("input"), Just("tools"), Just("tool_calls"), Just("max_tokens"), Just("stream"), Just("id"), Just("name"), Just("arguments"), Just("call_id")], inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect())),
        ]
    })
}

const PATHS: [&str; 4] = ["/v1/chat/completions", "/v1/messages", "/v1/responses", "/v1/completions"];

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_5xx(bytes in prop::collection::vec(any::<u8>(), 0..200), p in 0usize..4) {
        let st = status_for(PATHS[p], bytes);
        prop_assert!(st < 500, "status {}", st);
    }

    #[test]
    fn arbitrary_json_never_5xx(v in arb_json(), msgs in arb_json(), p in 0usize..4) {
        let mut body = match v { Value::Object(o) => Value::Object(o), other => json!({"x": other}) };
        body["messages"] = msgs.clone();
        body["input"] = msgs;
        body["max_tokens"] = json!(4);
        body["prompt"] = json!("p");
        let st = status_for(PATHS[p], body.to_string().into_bytes());
        prop_assert!(st < 500, "status {}", st);
    }
}
