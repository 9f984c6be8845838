//! End-to-end tests of `dsv4 tokenize` and `dsv4 render` against the shared
//! conformance data.

use std::path::PathBuf;
use std::process::Command;

fn shared() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared")
}

fn dsv4(args: &[&str]) -> (bool, Vec<u8>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_dsv4")).args(args).output().expect("run dsv4");
    (out.status.success(), out.stdout, String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn tokenize_matches_reference_ids() {
    let tj = shared().join("tokenizer/tokenizer.json");
    let (ok, out, err) = dsv4(&["tokenize", "--tokenizer", tj.to_str().unwrap(), "--text", "Hello world!"]);
    assert!(ok, "{err}");
    assert_eq!(String::from_utf8(out).unwrap().trim(), "[19923,2058,3]");
}

#[test]
fn tokenize_with_fixture_gguf() {
    let gguf = shared().join("fixtures/tiny-f32/model.gguf");
    let (ok, out, err) = dsv4(&["tokenize", "--model", gguf.to_str().unwrap(), "--text", "<｜User｜>hi"]);
    assert!(ok, "{err}");
    assert!(String::from_utf8(out).unwrap().starts_with("[258,"));
}

#[test]
fn render_official_cases_exactly() {
    let dir = shared().join("conformance/encoding");
    for (n, mode) in [(1, "thinking"), (2, "thinking"), (4, "chat")] {
        let input = dir.join(format!("case{n}.input.json"));
        let want = std::fs::read(dir.join(format!("case{n}.expected.txt"))).unwrap();
        let (ok, out, err) = dsv4(&["render", "--messages", input.to_str().unwrap(), "--mode", mode]);
        assert!(ok, "case {n}: {err}");
        assert_eq!(String::from_utf8_lossy(&out), String::from_utf8_lossy(&want), "case {n}");
    }
}

#[test]
fn render_ids() {
    let input = shared().join("conformance/encoding/case2.input.json");
    let tj = shared().join("tokenizer/tokenizer.json");
    let (ok, out, err) = dsv4(&["render", "--messages", input.to_str().unwrap(), "--ids", "--tokenizer", tj.to_str().unwrap()]);
    assert!(ok, "{err}");
    let ids: Vec<u32> = serde_json::from_slice(&out).unwrap();
    assert_eq!(ids[0], 0);
    assert_eq!(*ids.last().unwrap(), 1);
    assert!(ids.contains(&128803) && ids.contains(&128804) && ids.contains(&128821));
}
