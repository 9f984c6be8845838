//! Runs tools/sdk_tests/test_sdk.py (pytest, official `openai` and `anthropic`
//! SDKs) against two in-process servers on loopback: one over the scripted
//! mock (tools/sdk_tests/mock_script.json), one over the tiny fixture model.
//! When python3 lacks the SDKs the test is skipped with a message, unless
//! DSV4_REQUIRE_SDK_TESTS=1 (then it fails). `.ci/run` → test.sh installs
//! tools/test-requirements.txt, which includes them.
#![cfg(feature = "engine")]

mod common;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

use common::*;
use dsv4_server::engine_gen::EngineGenerator;
use dsv4_server::mock::MockGenerator;
use dsv4_server::ServerConfig;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_compatibility() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let have = Command::new("python3").args(["-c", "import openai, anthropic, pytest"]).status().map(|s| s.success()).unwrap_or(false);
    if !have {
        assert!(std::env::var("DSV4_REQUIRE_SDK_TESTS").as_deref() != Ok("1"), "python3 with openai, anthropic and pytest is required");
        eprintln!("SKIPPED: python3 lacks openai/anthropic/pytest (pip install -r tools/test-requirements.txt)");
        return;
    }
    let script = std::fs::read_to_string(root.join("tools/sdk_tests/mock_script.json")).expect("mock script");
    let mock = start(MockGenerator::from_json(&script).expect("script"), ServerConfig::default()).await;
    let fixture = root.join("../shared/fixtures/tiny-q2/model.gguf");
    let real = start_with(Box::new(EngineGenerator::load(&fixture, 512, None).expect("fixture")), Arc::default(), ServerConfig::default()).await;
    let (m, r) = (mock.base.clone(), real.base.clone());
    let dir = root.join("tools/sdk_tests");
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "test_sdk.py"])
            .current_dir(dir)
            .env("DSV4_MOCK_URL", m)
            .env("DSV4_REAL_URL", r)
            .env("NO_PROXY", "127.0.0.1,localhost")
            .output()
    })
    .await
    .expect("join")
    .expect("run pytest");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("{text}");
    assert!(out.status.success(), "SDK tests failed:\n{text}");
}
