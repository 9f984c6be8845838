//! Property test against the reference: thousands of random mixed-script
//! strings are tokenized here and by the Hugging Face `tokenizers` library (run
//! once through `python3`) on the same tokenizer.json; the ids must be equal.
//!
//! If python3 or `tokenizers` is missing the test fails, unless
//! `DSV4_SKIP_PY_ORACLE=1` is set.

use dsv4_text::hf_json::parse_tokenizer_json;
use dsv4_text::Tokenizer;
use std::io::Write;
use std::path::PathBuf;
use std::process::Command;

fn tokenizer_json() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/tokenizer/tokenizer.json")
}

/// xorshift64*: deterministic, dependency-free randomness for reproducible cases.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const SPECIALS: &[&str] = &[
    "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>",
    "｜DSML｜", "<｜latest_reminder｜>", "<｜action｜>", "<｜fim▁hole｜>", "<｜/table>｜", "<｜▁pad▁｜>",
];

const WORDS: &[&str] = &[
    "the", " the", "Hello", " world", "don't", "I'm", "x_y", "foo.bar", "<tool_result>", "</tool_result>",
    "<｜DSML｜invoke name=\"f\">", "</｜DSML｜parameter>", "  ", "\r\n", "\n\n", "\t", " \n ", "...", "'s", "'LL",
    "ﬁ", "ǅ", "İ", "ß", "Ω", "ǈ",
];

/// Characters drawn from the scripts and classes the pre-tokenizer distinguishes.
fn random_char(r: &mut Rng) -> char {
    let ranges: &[(u32, u32)] = &[
        (0x20, 0x7e),     // ASCII printable
        (0x20, 0x7e),
        (0x30, 0x39),     // digits
        (0x00, 0x1f),     // controls incl. \t \n \r \v \f
        (0xa0, 0xff),     // Latin-1 (nbsp, punctuation, letters)
        (0x100, 0x17f),   // Latin Extended-A
        (0x300, 0x36f),   // combining marks
        (0x391, 0x3c9),   // Greek
        (0x400, 0x44f),   // Cyrillic
        (0x5d0, 0x5ea),   // Hebrew
        (0x620, 0x64a),   // Arabic
        (0x660, 0x669),   // Arabic-Indic digits
        (0x900, 0x97f),   // Devanagari (letters, marks, digits)
        (0xe00, 0xe5b),   // Thai
        (0x2000, 0x206f), // general punctuation, spaces, format chars (ZWJ)
        (0x2150, 0x218b), // number forms (Nl, No)
        (0x2460, 0x24ff), // enclosed numerics (No, So)
        (0x3000, 0x303f), // CJK punctuation, ideographic space, 〇
        (0x3040, 0x30ff), // kana
        (0x4e00, 0x9fff), // CJK (incl. beyond 9FA5)
        (0xac00, 0xd7a3), // Hangul
        (0xff01, 0xff5e), // fullwidth forms (incl. ｜)
        (0x1f300, 0x1f64f), // emoji
        (0x1f1e6, 0x1f1ff), // regional indicators
        (0x1f3fb, 0x1f3ff), // skin tones (Sk)
        (0xfe00, 0xfe0f), // variation selectors (Mn)
        (0xe000, 0xe010), // private use
    ];
    let special: &[char] = &['\u{85}', '\u{a0}', '\u{1680}', '\u{2028}', '\u{2029}', '\u{202f}', '\u{205f}', '\u{3000}', '\u{180e}', '\u{200b}', '\u{feff}', '\u{ad}', '\u{1c}', '\u{7f}', '\r', '\n', '\t', ' '];
    if r.below(8) == 0 {
        return special[r.below(special.len() as u64) as usize];
    }
    let (lo, hi) = ranges[r.below(ranges.len() as u64) as usize];
    char::from_u32(lo + r.below((hi - lo + 1) as u64) as u32).unwrap_or('?')
}

fn random_string(r: &mut Rng) -> String {
    let mut s = String::new();
    let parts = 1 + r.below(12);
    for _ in 0..parts {
        match r.below(10) {
            0 => s.push_str(SPECIALS[r.below(SPECIALS.len() as u64) as usize]),
            1 | 2 => s.push_str(WORDS[r.below(WORDS.len() as u64) as usize]),
            3 => {
                // A run of one class: long spaces, digits, letters or punctuation.
                let c = random_char(r);
                for _ in 0..1 + r.below(70) {
                    s.push(c);
                }
            }
            _ => {
                for _ in 0..1 + r.below(8) {
                    s.push(random_char(r));
                }
            }
        }
    }
    s
}

const ORACLE: &str = r#"
import json, sys
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[1])
texts = json.load(open(sys.argv[2], encoding="utf-8"))
out = [tok.encode(t, add_special_tokens=False).ids for t in texts]
json.dump(out, sys.stdout)
"#;

fn run_oracle(texts: &[String]) -> Option<Vec<Vec<u32>>> {
    let dir = std::env::temp_dir().join(format!("dsv4-oracle-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let input = dir.join("texts.json");
    std::fs::File::create(&input).unwrap().write_all(serde_json::to_string(texts).unwrap().as_bytes()).unwrap();
    let out = Command::new("python3").arg("-c").arg(ORACLE).arg(tokenizer_json()).arg(&input).output();
    let _ = std::fs::remove_dir_all(&dir);
    let skip = std::env::var("DSV4_SKIP_PY_ORACLE").is_ok_and(|v| v == "1");
    match out {
        Ok(o) if o.status.success() => Some(serde_json::from_slice(&o.stdout).expect("oracle output")),
        Ok(o) if skip => {
            eprintln!("oracle unavailable (skipped): {}", String::from_utf8_lossy(&o.stderr));
            None
        }
        Ok(o) => panic!("python3 tokenizers oracle failed (pip install tokenizers, or set DSV4_SKIP_PY_ORACLE=1): {}", String::from_utf8_lossy(&o.stderr)),
        Err(e) if skip => {
            eprintln!("python3 unavailable (skipped): {e}");
            None
        }
        Err(e) => panic!("python3 not runnable ({e}); install python3 + tokenizers or set DSV4_SKIP_PY_ORACLE=1"),
    }
}

#[test]
fn random_unicode_matches_hf_tokenizers() {
    let n: usize = std::env::var("DSV4_ORACLE_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(5000);
    let mut r = Rng(0x5eed_1234_abcd_0001);
    let mut texts: Vec<String> = (0..n).map(|_| random_string(&mut r)).collect();
    // A few long documents too (exercise the heap BPE and long whitespace runs).
    for _ in 0..20 {
        let mut s = String::new();
        while s.len() < 20_000 {
            s.push_str(&random_string(&mut r));
        }
        texts.push(s);
    }
    let Some(want) = run_oracle(&texts) else { return };
    let json_tok = Tokenizer::from_tokenizer_json(tokenizer_json()).unwrap();
    // The GGUF path: the same data through `Tokenizer::new` (one atomic pass over types 3/4).
    let d = parse_tokenizer_json(&std::fs::read_to_string(tokenizer_json()).unwrap()).unwrap();
    let gguf_tok = Tokenizer::new(d.tokens, d.merges, d.token_types, d.bos, d.eos).unwrap();
    let mut bad = Vec::new();
    for (i, t) in texts.iter().enumerate() {
        let a = json_tok.encode(t);
        let b = gguf_tok.encode(t);
        if a != want[i] || b != want[i] {
            bad.push(format!("{t:?}\n  hf   {:?}\n  json {a:?}\n  gguf {b:?}", want[i]));
        }
        assert_eq!(json_tok.decode(&a), t.as_bytes());
    }
    assert!(bad.is_empty(), "{} of {} strings differ; first ones:\n{}", bad.len(), texts.len(), bad[..bad.len().min(5)].join("\n"));
}
