//! `dsv4 run`, `dsv4 chat` and `dsv4 tokenize` end to end on a model whose GGUF
//! carries the real DeepSeek V4 tokenizer (129,280 ids; built at test time from
//! the tiny-q2 fixture by `common/realtok.rs`, shared with the engine tests).
//! The weights are random, so the text is noise; what is tested is that the
//! real vocabulary flows through rendering, tokenizing, generation, streaming,
//! the chat transcript and save/load.

mod common;

use common::{dsv4, text};

use std::process::Output;

use common::realtok;

fn model() -> String {
    realtok::model_path().to_str().unwrap().to_string()
}

fn ok(o: &Output) -> String {
    let e = text(&o.stderr);
    assert!(o.status.success(), "dsv4 failed: {e}");
    e
}

/// "reused" count of each turn's summary line on stderr.
fn reused(stderr: &str) -> Vec<usize> {
    stderr.lines().filter_map(|l| l.split(" tokens (").nth(1)?.split(' ').next()?.parse().ok()).collect()
}

#[test]
fn tokenize_uses_the_real_vocabulary() {
    let m = model();
    let o = dsv4(&["tokenize", "--model", &m, "--text", "<｜User｜>hi"], None);
    ok(&o);
    let ids: Vec<u32> = serde_json::from_str(text(&o.stdout).trim()).expect("a JSON array of ids");
    assert_eq!(ids[0], realtok::USER, "{ids:?}");
    assert!(ids.len() >= 2);
    // every chat special is one token with its real id
    let specials = "<｜begin▁of▁sentence｜><｜User｜><｜Assistant｜><think></think>｜DSML｜<｜end▁of▁sentence｜>";
    let o = dsv4(&["tokenize", "--model", &m, "--text", specials], None);
    ok(&o);
    let ids: Vec<u32> = serde_json::from_str(text(&o.stdout).trim()).unwrap();
    assert_eq!(ids, [realtok::BOS, realtok::USER, realtok::ASSISTANT, realtok::THINK, realtok::THINK_END, realtok::DSML, realtok::EOS]);
    // the GGUF's vocabulary is the tokenizer.json one, for text beyond the toy fixtures' 512 ids
    let t = "Grüße aus 東京 — tool calls: <｜DSML｜invoke name=\"f\">";
    let a = dsv4(&["tokenize", "--model", &m, "--text", t], None);
    let b = dsv4(&["tokenize", "--tokenizer", realtok::tokenizer_json().to_str().unwrap(), "--text", t], None);
    ok(&a);
    ok(&b);
    assert_eq!(a.stdout, b.stdout);
    let ids: Vec<u32> = serde_json::from_str(text(&a.stdout).trim()).unwrap();
    assert!(ids.contains(&realtok::DSML) && ids.iter().any(|&i| i >= 512), "{ids:?}");
}

#[test]
fn run_is_reproducible_with_the_real_tokenizer() {
    let m = model();
    let args = ["run", "-m", &m, "-p", "Hello", "--nothink", "-n", "8", "--seed", "1", "--backend", "cpu", "--ctx", "1024"];
    let a = dsv4(&args, None);
    let e = ok(&a);
    assert!(e.contains("cpu backend") && e.contains("generated"), "{e}");
    let b = dsv4(&args, None);
    ok(&b);
    assert_eq!(a.stdout, b.stdout);
    assert!(!a.stdout.is_empty());
    // the prompt really is the real-vocabulary rendering: BOS <｜User｜> Hello <｜Assistant｜> </think>
    let dir = tempfile::tempdir().unwrap();
    let lp = dir.path().join("lp.json");
    let o = dsv4(
        &["run", "-m", &m, "-p", "Hello", "--nothink", "-n", "4", "--backend", "cpu", "--ctx", "1024", "--dump-logprobs", lp.to_str().unwrap()],
        None,
    );
    ok(&o);
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&lp).unwrap()).unwrap();
    assert_eq!(v["prompt_tokens"], 5, "{v}");
    for s in v["steps"].as_array().unwrap() {
        assert!((s["token"].as_u64().unwrap() as usize) < realtok::VOCAB);
    }
    // thinking mode: the <think> opener is the real special token and is shown as a marker when piped
    let t = dsv4(&["run", "-m", &m, "-p", "Hello", "-n", "6", "--seed", "3", "--backend", "cpu", "--ctx", "1024"], None);
    ok(&t);
    assert!(text(&t.stdout).starts_with("<think>\n"), "{}", text(&t.stdout));
}

#[test]
fn chat_two_turns_save_and_load() {
    let m = model();
    let dir = tempfile::tempdir().unwrap();
    let save = dir.path().join("conv.dsv4");
    let save = save.to_str().unwrap();
    let args = ["chat", "-m", &m, "-n", "6", "--temp", "0", "--backend", "cpu", "--ctx", "1024", "--system", "Be brief"];

    // two turns in one process: the second reuses the transcript's state
    let two = dsv4(&args, Some("Hello\n/nothink\nHow are you? 你好\n/save NAME\n/quit\n".replace("NAME", save).as_str()));
    let e = ok(&two);
    let r = reused(&e);
    assert_eq!(r.len(), 2, "{e}");
    assert_eq!(r[0], 0);
    assert!(r[1] > 10, "second turn re-evaluated the transcript: {e}");
    assert!(e.contains("saved") && std::path::Path::new(save).exists(), "{e}");
    let saved: usize = e.lines().find_map(|l| l.strip_prefix("saved ")?.split(' ').next()?.parse().ok()).expect("saved N tokens");
    assert!(saved > r[1]);

    // a new process loads it and continues without a cold prefill
    let three = dsv4(&args, Some(format!("/load {save}\n/nothink\nAnd now?\n/quit\n").as_str()));
    let e = ok(&three);
    assert!(e.contains(&format!("loaded {saved} tokens")), "{e}");
    let r = reused(&e);
    assert_eq!(r.len(), 1, "{e}");
    assert!(r[0] >= saved, "the loaded transcript was not reused: {e}");
    // reproducible (greedy)
    let again = dsv4(&args, Some(format!("/load {save}\n/nothink\nAnd now?\n/quit\n").as_str()));
    ok(&again);
    assert_eq!(three.stdout, again.stdout);
}

/// A conversation saved after turn 1 and continued in a new process answers
/// turn 2 exactly as the uninterrupted conversation does (greedy).
#[test]
fn chat_continued_after_load_equals_uninterrupted() {
    let m = model();
    let dir = tempfile::tempdir().unwrap();
    let save = dir.path().join("turn1.dsv4");
    let save = save.to_str().unwrap();
    let args = ["chat", "-m", &m, "-n", "5", "--temp", "0", "--backend", "cpu", "--ctx", "1024", "--nothink"];
    let both = dsv4(&args, Some("Hello\nAnd then?\n/quit\n"));
    ok(&both);
    let first = dsv4(&args, Some(format!("Hello\n/save {save}\n/quit\n").as_str()));
    ok(&first);
    let second = dsv4(&args, Some(format!("/load {save}\nAnd then?\n/quit\n").as_str()));
    ok(&second);
    let turn2 = both.stdout.strip_prefix(first.stdout.as_slice()).expect("turn 1 prints the same in both runs");
    assert_eq!(text(turn2), text(&second.stdout));
}

/// "prompt N tokens" of each turn's summary line on stderr.
fn prompt_lens(stderr: &str) -> Vec<usize> {
    stderr.lines().filter_map(|l| l.split("prompt ").nth(1)?.split(' ').next()?.parse().ok()).collect()
}

/// Stricter form of the test above: the continued transcript itself (not only
/// the greedy text, which a random model may not change) is the same. Fails
/// today: `/save` writes only evaluated tokens, so the last sampled token of an
/// answer cut by `-n` (held in `pending` in cmd_run.rs's chat loop) is lost, and
/// turn 2's prompt is one token shorter after `/load` (16 vs 17 tokens here).
#[test]
fn chat_transcript_after_load_equals_uninterrupted() {
    let m = model();
    let dir = tempfile::tempdir().unwrap();
    let save = dir.path().join("turn1.dsv4");
    let save = save.to_str().unwrap();
    let args = ["chat", "-m", &m, "-n", "5", "--temp", "0", "--backend", "cpu", "--ctx", "1024", "--nothink"];
    let both = dsv4(&args, Some("Hello\nAnd then?\n/quit\n"));
    let e_both = ok(&both);
    ok(&dsv4(&args, Some(format!("Hello\n/save {save}\n/quit\n").as_str())));
    let second = dsv4(&args, Some(format!("/load {save}\nAnd then?\n/quit\n").as_str()));
    let e_second = ok(&second);
    let (a, b) = (prompt_lens(&e_both), prompt_lens(&e_second));
    assert_eq!((a.len(), b.len()), (2, 1), "{e_both}\n{e_second}");
    assert_eq!(a[1], b[0], "turn 2's transcript differs after /save + /load:\n{e_both}\n{e_second}");
}
