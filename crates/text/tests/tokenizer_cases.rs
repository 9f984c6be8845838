//! Conformance: the reference ids in shared/conformance/tokenizer/cases.json,
//! the tiny fixture tokenizer, decoding and the streaming decoder.

use dsv4_text::{StreamDecoder, Tokenizer};
use std::path::PathBuf;
use std::sync::OnceLock;

fn shared() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared")
}

fn real() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| Tokenizer::from_tokenizer_json(shared().join("tokenizer/tokenizer.json")).expect("load tokenizer.json"))
}

#[test]
fn conformance_cases() {
    let text = std::fs::read_to_string(shared().join("conformance/tokenizer/cases.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cases = v["cases"].as_array().unwrap();
    assert!(cases.len() >= 10);
    let mut failures = Vec::new();
    for c in cases {
        let t = c["text"].as_str().unwrap();
        let want: Vec<u32> = c["ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        let got = real().encode(t);
        if got != want {
            failures.push(format!("{t:?}\n  want {want:?}\n  got  {got:?}"));
        }
        assert_eq!(real().decode(&got), t.as_bytes(), "decode round trip of {t:?}");
    }
    assert!(failures.is_empty(), "{} mismatches:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn special_ids() {
    let t = real();
    assert_eq!(t.vocab_size(), 129280);
    assert_eq!(t.bos_id(), 0);
    assert_eq!(t.eos_id(), 1);
    for (s, id) in [("<｜User｜>", 128803), ("<｜Assistant｜>", 128804), ("<think>", 128821), ("</think>", 128822), ("｜DSML｜", 128825), ("<｜latest_reminder｜>", 128828)] {
        assert_eq!(t.token_id(s), Some(id), "{s}");
        assert_eq!(t.encode(s), vec![id]);
        assert!(t.encode_plain(s).len() > 1, "plain encoding must not produce the special token {s}");
        assert_eq!(t.decode(&[id]), s.as_bytes());
    }
    // chat.md §1: `<｜DSML｜invoke` = `<` + `｜DSML｜` + BPE(invoke).
    let ids = t.encode("<｜DSML｜invoke");
    assert_eq!(ids[1], 128825);
    assert_eq!(t.decode(&ids[..1]), b"<");
}

#[test]
fn tiny_fixture_tokenizer() {
    let path = shared().join("fixtures/tiny-hf/hf/tokenizer.json");
    let t = Tokenizer::from_tokenizer_json(&path).unwrap();
    assert_eq!(t.vocab_size(), 512);
    let exp: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(shared().join("fixtures/tiny-hf/expected.json")).unwrap()).unwrap();
    // The fixture manifest lists tokenizer cases (text -> ids) when present.
    let mut checked = 0;
    if let Some(cases) = exp.get("tokenizer_cases").or_else(|| exp.get("tokenizer")).and_then(|c| c.get("cases").or(Some(c))).and_then(|c| c.as_array()) {
        for c in cases {
            if let (Some(text), Some(ids)) = (c.get("text").and_then(|x| x.as_str()), c.get("ids").and_then(|x| x.as_array())) {
                let want: Vec<u32> = ids.iter().map(|x| x.as_u64().unwrap() as u32).collect();
                assert_eq!(t.encode(text), want, "{text:?}");
                checked += 1;
            }
        }
    }
    let s = "<｜User｜>hello world<｜Assistant｜><think>";
    let ids = t.encode(s);
    assert_eq!(ids[0], 258);
    assert_eq!(t.decode(&ids), s.as_bytes());
    eprintln!("tiny fixture cases checked: {checked}");
}

#[test]
fn stream_decoder_never_splits_chars() {
    let t = real();
    let text = "日本語 🙂🚀👩‍💻 façade 🇮🇹 end";
    let ids = t.encode(text);
    let mut d = StreamDecoder::new(t);
    let mut out = String::new();
    for &id in &ids {
        let piece = d.push(id);
        out.push_str(&piece);
    }
    out.push_str(&d.finish());
    assert_eq!(out, text);
    // A lone continuation byte is replaced, not held forever.
    let mut d = StreamDecoder::new(t);
    assert_eq!(d.push_bytes(&[0xe6, 0x97]), "");
    assert_eq!(d.push_bytes(&[0xa5]), "日");
    assert_eq!(d.push_bytes(&[0x80, b'a']), "\u{fffd}a");
    assert_eq!(d.push_bytes(&[0xf0, 0x9f]), "");
    assert_eq!(d.finish(), "\u{fffd}");
}
