//! The GGUF path: the real vocabulary written into GGUF metadata and read back
//! gives the same ids; the tiny fixtures' GGUF vocabulary matches their
//! tokenizer.json.
#![cfg(feature = "gguf")]

use dsv4_gguf::writer::GgufWriter;
use dsv4_gguf::GgufFile;
use dsv4_text::gguf_glue::tokenizer_metadata_from_json;
use dsv4_text::Tokenizer;
use std::path::PathBuf;

fn shared() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared")
}

#[test]
fn real_tokenizer_round_trips_through_gguf_metadata() {
    let json = shared().join("tokenizer/tokenizer.json");
    let kv = tokenizer_metadata_from_json(&json).unwrap();
    let mut w = GgufWriter::new();
    w.add_kv("general.architecture", dsv4_gguf::Value::String("deepseek4".into())).unwrap();
    for (k, v) in kv {
        w.add_kv(k, v).unwrap();
    }
    let file = GgufFile::from_bytes(w.to_bytes().unwrap()).unwrap();
    let from_gguf = Tokenizer::from_gguf(&file).unwrap();
    let from_json = Tokenizer::from_tokenizer_json(&json).unwrap();
    assert_eq!(from_gguf.vocab_size(), 129280);
    assert_eq!((from_gguf.bos_id(), from_gguf.eos_id()), (0, 1));
    let cases: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(shared().join("conformance/tokenizer/cases.json")).unwrap()).unwrap();
    for c in cases["cases"].as_array().unwrap() {
        let t = c["text"].as_str().unwrap();
        let want: Vec<u32> = c["ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        assert_eq!(from_gguf.encode(t), want, "{t:?}");
    }
    let chat = std::fs::read_to_string(shared().join("conformance/encoding/case1.expected.txt")).unwrap();
    assert_eq!(from_gguf.encode(&chat), from_json.encode(&chat));
    assert_eq!(from_gguf.decode(&from_gguf.encode(&chat)), chat.as_bytes());
}

#[test]
fn tiny_fixture_gguf_matches_its_tokenizer_json() {
    let json = Tokenizer::from_tokenizer_json(shared().join("fixtures/tiny-hf/hf/tokenizer.json")).unwrap();
    for set in ["tiny-f32", "tiny-q2"] {
        let path = shared().join(format!("fixtures/{set}/model.gguf"));
        let g = Tokenizer::from_gguf_path(&path).unwrap();
        assert_eq!(g.vocab_size(), 512, "{set}");
        for t in ["Hello world!", "<｜begin▁of▁sentence｜>Be brief.<｜User｜>hi there<｜Assistant｜></think>ok", "perché città 日本語 🙂 123456"] {
            assert_eq!(g.encode(t), json.encode(t), "{set}: {t:?}");
        }
    }
}
