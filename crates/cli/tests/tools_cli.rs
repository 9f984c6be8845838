//! `dsv4 convert` / `download` / `imatrix` through the real binary: a tiny-hf
//! conversion, clear failures that leave no output, and hostile tokens that are
//! refused before any network or shell is involved.

use std::path::PathBuf;
use std::process::Command;

fn dsv4() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dsv4"))
}

fn tiny_hf() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures/tiny-hf/hf")
}

#[test]
fn convert_tiny_hf_q8() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m.gguf");
    let st = dsv4().args(["convert", "--quiet", "--recipe", "q8", "--hf"]).arg(tiny_hf()).arg("--out").arg(&out).status().unwrap();
    assert!(st.success());
    assert!(dsv4_gguf::GgufFile::open(&out).unwrap().tensor("mtp.0.e_proj.weight").is_some());
}

#[test]
fn convert_failures_leave_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m.gguf");
    let o = dsv4().args(["convert", "--quiet", "--recipe", "q3", "--hf"]).arg(tiny_hf()).arg("--out").arg(&out).output().unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("unknown recipe"));
    let o = dsv4().args(["convert", "--quiet", "--hf"]).arg(tmp.path().join("nope")).arg("--out").arg(&out).output().unwrap();
    assert!(!o.status.success());
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
}

#[test]
fn hostile_tokens_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    for t in ["; touch HACKED;", "$(touch HACKED) x", "a\nb"] {
        let o = dsv4()
            .current_dir(tmp.path())
            .args(["download", "q2", "--quiet", "--endpoint", "http://127.0.0.1:9", "--token", t])
            .output()
            .unwrap();
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("token") && !err.contains("HACKED"), "{err}");
    }
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0, "something was created");
}
