//! `dsv4 run` and `dsv4 chat` end to end on the tiny fixture model (its GGUF
//! carries a toy 512-token tokenizer, so the text is noise; what is tested is
//! the plumbing: rendering, streaming, stop conditions, reproducibility, the
//! chat transcript's KV reuse, save/load, logprob dumps and the disk KV cache).

mod common;

use common::{dsv4, text};
use std::path::PathBuf;

fn model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures/tiny-q2/model.gguf")
}

#[test]
fn missing_model_says_how_to_get_one() {
    let o = dsv4(&["run", "-m", "/nonexistent/dsv4flash.gguf", "-p", "hi"], None);
    assert!(!o.status.success());
    let e = text(&o.stderr);
    assert!(e.contains("dsv4 download q2") && e.contains("dsv4 convert"), "{e}");
}

#[test]
fn run_is_reproducible_with_a_seed() {
    let m = model();
    let m = m.to_str().unwrap();
    let args = ["run", "-m", m, "-p", "Hello there", "-n", "12", "--seed", "7", "--ctx", "256", "--nothink"];
    let a = dsv4(&args, None);
    assert!(a.status.success(), "{}", text(&a.stderr));
    let b = dsv4(&args, None);
    assert_eq!(a.stdout, b.stdout);
    let e = text(&a.stderr);
    assert!(e.contains("generated") && e.contains("prefill") && e.contains("t/s"), "{e}");
    assert!(e.contains("context 256 tokens"), "{e}");
    // thinking mode (default) shows reasoning between markers when piped
    let t = dsv4(&["run", "-m", m, "-p", "Hello", "-n", "6", "--seed", "3", "--ctx", "256"], None);
    assert!(t.status.success());
    assert!(text(&t.stdout).starts_with("<think>\n"), "{}", text(&t.stdout));
    // greedy is reproducible without a seed
    let g1 = dsv4(&["run", "-m", m, "-p", "Hi", "-n", "8", "--temp", "0", "--nothink"], None);
    let g2 = dsv4(&["run", "-m", m, "-p", "Hi", "-n", "8", "--temp", "0", "--nothink"], None);
    assert_eq!(g1.stdout, g2.stdout);
}

#[test]
fn context_full_stops_generation() {
    let m = model();
    let o = dsv4(&["run", "-m", m.to_str().unwrap(), "-p", "Hello", "-n", "100", "--seed", "1", "--ctx", "16", "--nothink"], None);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains("ContextFull"), "{}", text(&o.stderr));
}

#[test]
fn dump_logprobs_writes_json() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("lp.json");
    let m = model();
    let o = dsv4(
        &["run", "-m", m.to_str().unwrap(), "-p", "abc", "-n", "5", "--dump-logprobs", out.to_str().unwrap(), "--logprobs-top-k", "3"],
        None,
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let steps = v["steps"].as_array().unwrap();
    assert!(!steps.is_empty() && steps.len() <= 5);
    for s in steps {
        let top = s["top"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        assert_eq!(top[0]["token"], s["token"], "greedy = best alternative");
        assert!(s["logprob"].as_f64().unwrap() <= 0.0);
        assert!(top[0]["logprob"].as_f64().unwrap() >= top[1]["logprob"].as_f64().unwrap());
    }
}

/// "reused" count of each summary line on stderr.
fn reused(stderr: &str) -> Vec<usize> {
    stderr
        .lines()
        .filter_map(|l| l.split(" tokens (").nth(1)?.split(' ').next()?.parse().ok())
        .collect()
}

#[test]
fn chat_keeps_the_transcript_state_and_saves() {
    let dir = tempfile::tempdir().unwrap();
    let save = dir.path().join("conv.dsv4");
    let m = model();
    let script = format!("Hello\n/nothink\nHow are you\n/save {}\n/quit\n", save.display());
    let o = dsv4(&["chat", "-m", m.to_str().unwrap(), "-n", "6", "--seed", "5", "--ctx", "512", "--system", "Be brief"], Some(&script));
    let e = text(&o.stderr);
    assert!(o.status.success(), "{e}");
    let r = reused(&e);
    assert_eq!(r.len(), 2, "{e}");
    assert_eq!(r[0], 0);
    assert!(r[1] > 10, "second turn re-evaluated the transcript: {e}");
    assert!(save.exists());
    // a new chat loads the conversation and continues it without a cold prefill
    let script = format!("/load {}\nAnd now\n/quit\n", save.display());
    let o = dsv4(&["chat", "-m", m.to_str().unwrap(), "-n", "4", "--seed", "5", "--ctx", "512"], Some(&script));
    let e = text(&o.stderr);
    assert!(o.status.success(), "{e}");
    assert!(e.contains("loaded"), "{e}");
    assert!(reused(&e)[0] > 10, "{e}");
    // /ctx resizes and keeps the conversation
    let o = dsv4(&["chat", "-m", m.to_str().unwrap(), "-n", "4", "--seed", "5", "--ctx", "512"], Some("Hi\n/ctx 300\nAgain\n/quit\n"));
    let e = text(&o.stderr);
    assert!(o.status.success(), "{e}");
    assert!(e.contains("context 300 tokens"), "{e}");
    assert!(reused(&e)[1] > 5, "{e}");
}

#[test]
fn disk_cache_reuses_a_long_prompt_across_runs() {
    let dir = tempfile::tempdir().unwrap();
    let m = model();
    let long: String = (0..160).map(|i| format!("line {i} of a long document. ")).collect();
    let args = |n: &'static str| {
        vec![
            "run".to_string(),
            "-m".into(),
            m.to_str().unwrap().into(),
            "-p".into(),
            long.clone(),
            "-n".into(),
            n.into(),
            "--seed".into(),
            "1".into(),
            "--ctx".into(),
            "16384".into(),
            "--kv-disk-dir".into(),
            dir.path().to_str().unwrap().into(),
        ]
    };
    let a: Vec<String> = args("4");
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let o = dsv4(&a, None);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let files = std::fs::read_dir(dir.path()).unwrap().count();
    assert!(files >= 1, "no checkpoint written: {}", text(&o.stderr));
    let o = dsv4(&a, None);
    let e = text(&o.stderr);
    assert!(o.status.success(), "{e}");
    assert!(e.contains("disk KV cache hit"), "{e}");
    // the hit skipped the cached prefix: the summary reports it as reused
    assert!(reused(&e)[0] >= 2048, "{e}");
}

/// `--kv-rope bf16`: the start-up line reports it, a chat saved in bf16 mode
/// loads in bf16 mode and is refused (with the reason) in f32 mode, and a bad
/// value is a usage error.
#[test]
fn kv_rope_flag_reaches_the_state() {
    let dir = tempfile::tempdir().unwrap();
    let save = dir.path().join("bf16.dsv4");
    let m = model();
    let m = m.to_str().unwrap();
    let script = format!("Hello\n/save {}\n/quit\n", save.display());
    let o = dsv4(&["chat", "-m", m, "-n", "4", "--seed", "5", "--ctx", "512", "--kv-rope", "bf16"], Some(&script));
    let e = text(&o.stderr);
    assert!(o.status.success(), "{e}");
    assert!(e.contains("bf16 RoPE dims"), "{e}");
    let load = format!("/load {}\n/quit\n", save.display());
    let o = dsv4(&["chat", "-m", m, "-n", "4", "--ctx", "512", "--kv-rope", "bf16"], Some(&load));
    let e = text(&o.stderr);
    assert!(o.status.success() && e.contains("loaded"), "{e}");
    let o = dsv4(&["chat", "-m", m, "-n", "4", "--ctx", "512"], Some(&load));
    let e = text(&o.stderr);
    assert!(e.contains("f32 RoPE dims") && e.contains("saved with --kv-rope bf16") && !e.contains("loaded"), "{e}");
    let o = dsv4(&["run", "-m", m, "-p", "hi", "--kv-rope", "f16"], None);
    assert!(!o.status.success() && text(&o.stderr).contains("f32 or bf16"), "{}", text(&o.stderr));
}
