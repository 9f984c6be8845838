//! Fuzz-style property tests: arbitrary bytes and DSML-like fragments never
//! panic the tokenizer, the streaming decoder or the DSML parser; encode/decode
//! and render/parse round trips hold.

use dsv4_text::chat::ThinkingMode;
use dsv4_text::dsml::{parse_completion, render_completion, Event, ParsedMessage, ParsedToolCall, StreamParser};
use dsv4_text::{StreamDecoder, Tokenizer};
use proptest::prelude::*;
use std::sync::OnceLock;

fn tok() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| Tokenizer::from_tokenizer_json(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/tokenizer/tokenizer.json")).unwrap())
}

const FRAGMENTS: &[&str] = &[
    "<think>", "</think>", "<｜end▁of▁sentence｜>", "\n\n", "\n", " ", "<｜DSML｜tool_calls>", "</｜DSML｜tool_calls>",
    "<｜DSML｜invoke name=\"", "\">", "</｜DSML｜invoke>", "<｜DSML｜parameter name=\"", "\" string=\"true\">", "\" string=\"false\">",
    "</｜DSML｜parameter>", "&lt;/｜DSML｜parameter>", "f", "x", "1", "{", "}", "\"", "日本", "🙂", "<", "｜DSML｜", "/",
];

fn dsml_soup() -> impl Strategy<Value = String> {
    prop::collection::vec(0..FRAGMENTS.len(), 0..60).prop_map(|v| v.into_iter().map(|i| FRAGMENTS[i]).collect())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn tokenizer_round_trips_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let s = String::from_utf8_lossy(&bytes).into_owned();
        let ids = tok().encode(&s);
        prop_assert_eq!(tok().decode(&ids), s.as_bytes());
        let plain = tok().encode_plain(&s);
        prop_assert_eq!(tok().decode(&plain), s.as_bytes());
    }

    #[test]
    fn tokenizer_round_trips_any_string(s in "\\PC*") {
        prop_assert_eq!(tok().decode(&tok().encode(&s)), s.as_bytes());
    }

    #[test]
    fn stream_decoder_equals_lossy(bytes in prop::collection::vec(any::<u8>(), 0..200), cut in 1usize..7) {
        let mut d = StreamDecoder::new(tok());
        let mut out = String::new();
        for c in bytes.chunks(cut) {
            out.push_str(&d.push_bytes(c));
        }
        out.push_str(&d.finish());
        prop_assert_eq!(out, String::from_utf8_lossy(&bytes).into_owned());
    }

    #[test]
    fn stream_decoder_on_token_ids(s in "\\PC{0,40}") {
        let ids = tok().encode(&s);
        let mut d = StreamDecoder::new(tok());
        let mut out = String::new();
        for id in ids {
            out.push_str(&d.push(id));
        }
        out.push_str(&d.finish());
        prop_assert_eq!(out, s);
    }

    #[test]
    fn dsml_parser_never_panics_and_is_chunking_independent(s in dsml_soup(), cut in 1usize..9, thinking in any::<bool>()) {
        let mode = if thinking { ThinkingMode::Thinking } else { ThinkingMode::Chat };
        let whole = parse_completion(&s, mode);
        let mut p = StreamParser::new(mode);
        let mut ev = Vec::new();
        let chars: Vec<char> = s.chars().collect();
        for c in chars.chunks(cut) {
            ev.extend(p.push(&c.iter().collect::<String>()));
        }
        ev.extend(p.finish());
        let mut content = String::new();
        let mut reasoning = String::new();
        for e in &ev {
            match e {
                Event::Content(c) => content.push_str(c),
                Event::Reasoning(r) => reasoning.push_str(r),
                _ => {}
            }
        }
        prop_assert_eq!(content, whole.content.clone());
        prop_assert_eq!(reasoning, whole.reasoning_content.clone().unwrap_or_default());
        for c in &whole.tool_calls {
            let ok = c.arguments.starts_with('{') && c.arguments.ends_with('}');
            prop_assert!(ok, "arguments not an object: {}", c.arguments);
        }
    }

    #[test]
    fn dsml_parser_never_panics_on_random_bytes(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let s = String::from_utf8_lossy(&bytes);
        let _ = parse_completion(&s, ThinkingMode::Thinking);
        let _ = parse_completion(&s, ThinkingMode::Chat);
    }

    #[test]
    fn render_then_parse_round_trips(
        reasoning in "[a-z 日\n]{0,20}",
        content in "[a-zA-Z 。\n<>/]{0,20}",
        calls in prop::collection::vec(("[a-z_]{1,8}", prop::collection::vec(("[a-z]{1,6}", prop_oneof![
            "[a-z \n\"\\\\日<>&]{0,12}".prop_map(serde_json::Value::String),
            any::<i32>().prop_map(|i| serde_json::json!(i)),
            any::<bool>().prop_map(|b| serde_json::json!([b, null, {"k": "</｜DSML｜parameter>"}])),
            Just(serde_json::Value::String("a</｜DSML｜parameter>b".into())),
        ]), 0..4)), 0..3),
        thinking in any::<bool>(),
        ended in any::<bool>(),
    ) {
        let mode = if thinking { ThinkingMode::Thinking } else { ThinkingMode::Chat };
        let tool_calls: Vec<ParsedToolCall> = calls.into_iter().map(|(name, params)| {
            let mut obj = serde_json::Map::new();
            for (k, v) in params { obj.entry(k).or_insert(v); }
            ParsedToolCall { name, arguments: dsv4_text::pyjson::dumps(&serde_json::Value::Object(obj)) }
        }).collect();
        // Content must not itself contain markers; the generators guarantee it.
        let msg = ParsedMessage {
            reasoning_content: thinking.then(|| reasoning.clone()),
            content: content.clone(),
            tool_calls,
            ended,
            errors: vec![],
        };
        let text = render_completion(&msg, mode);
        let back = parse_completion(&text, mode);
        // Arguments compare as JSON values: a `string="false"` value holding the
        // closing tag comes back with its `<` as `\u003c` (same value).
        let norm = |m: &ParsedMessage| {
            let args: Vec<serde_json::Value> = m.tool_calls.iter().map(|c| serde_json::from_str(&c.arguments).unwrap()).collect();
            (m.reasoning_content.clone(), m.content.clone(), m.tool_calls.iter().map(|c| c.name.clone()).collect::<Vec<_>>(), args, m.ended, m.errors.clone())
        };
        prop_assert_eq!(norm(&back), norm(&msg), "text: {:?}", text);
        prop_assert_eq!(render_completion(&back, mode), text);
    }
}
