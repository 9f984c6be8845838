//! The embedded demo model end to end: `dsv4 run` without -m from an empty
//! directory prints demo text and the one-line notice, and `dsv4 perplexity` on
//! the committed held-out text matches the PyTorch reference numbers in
//! models/demo-reference.json (tools/demo/check.py wrote them). No training here:
//! the GGUFs and the numbers are committed (docs/quality.md).

use std::path::PathBuf;
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn run_without_model_uses_the_demo() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = Command::new(env!("CARGO_BIN_EXE_dsv4"))
        .current_dir(dir.path())
        .args(["run", "-p", "Tell me a story about a fox.", "--seed", "42", "-n", "120", "--backend", "cpu", "--ctx", "512"])
        .output()
        .expect("running dsv4");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "dsv4 run failed: {stderr}");
    assert!(stderr.contains("embedded demo model"), "no demo notice in: {stderr}");
    assert!(stdout.to_lowercase().contains("fox"), "unexpected demo output: {stdout}");
}

#[test]
fn explicit_missing_model_is_still_an_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = Command::new(env!("CARGO_BIN_EXE_dsv4"))
        .current_dir(dir.path())
        .args(["run", "-m", "missing.gguf", "-p", "hi"])
        .output()
        .expect("running dsv4");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));
}

#[test]
fn perplexity_matches_the_pytorch_reference() {
    let root = repo();
    let refs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("models/demo-reference.json")).expect("reference json"))
            .expect("valid json");
    let heldout = root.join("models").join(refs["heldout"].as_str().expect("heldout name"));
    for var in ["q8", "q2"] {
        let r = &refs["variants"][var];
        let model = root.join("models").join(r["file"].as_str().expect("file name"));
        let out = Command::new(env!("CARGO_BIN_EXE_dsv4"))
            .arg("perplexity")
            .arg("-m")
            .arg(&model)
            .arg("--file")
            .arg(&heldout)
            .args(["--ctx", &refs["ctx"].to_string(), "--json"])
            .output()
            .expect("running dsv4");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let got: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json output");
        let nll = got["mean_nll"].as_f64().expect("mean_nll");
        let torch = r["torch_mean_nll"].as_f64().expect("torch_mean_nll");
        assert_eq!(got["tokens"], refs["tokens_scored"], "{var}: token count");
        // float32 engine vs float32 PyTorch on the same dequantised weights; 1e-3 nats
        // leaves room for a rare near-tied router / indexer decision flipping
        assert!((nll - torch).abs() < 1e-3, "{var}: engine {nll} vs torch {torch}");
    }
    // the embedded default is models/demo-q8.gguf
    let out = Command::new(env!("CARGO_BIN_EXE_dsv4"))
        .args(["perplexity", "-m", "demo", "--json", "--file"])
        .arg(&heldout)
        .output()
        .expect("running dsv4");
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json output");
    let torch = refs["variants"]["q8"]["torch_mean_nll"].as_f64().expect("q8 reference");
    assert!((got["mean_nll"].as_f64().unwrap_or(f64::NAN) - torch).abs() < 1e-3);
}
