//! Tokenizer throughput benchmark: encodes a large, deterministically generated
//! mixed text (English prose, code, numbers, CJK, Cyrillic, emoji, whitespace)
//! on one thread and prints MB/s and tokens/s.
//!
//! `cargo run --release -p dsv4-text --example tokenize_bench [-- TOKENIZER.json [MB]]`

use dsv4_text::Tokenizer;
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let path = args.get(1).cloned().unwrap_or_else(|| format!("{}/../../../shared/tokenizer/tokenizer.json", env!("CARGO_MANIFEST_DIR")));
    let mb: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(16);
    let tok = match Tokenizer::from_tokenizer_json(&path) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("cannot load {path}: {e}");
            std::process::exit(1);
        }
    };
    for (label, random_words) in [("mixed text", false), ("mixed text + 25% random-letter words (adversarial for the caches)", true)] {
        println!("{label}:");
        bench(&tok, &mixed_text(mb << 20, random_words));
    }
}

fn bench(tok: &Tokenizer, text: &str) {
    // Warm-up on a slice so page faults and lazy init are not timed.
    let _ = tok.encode(&text[..text.len().min(1 << 16)]);
    let mut best = f64::INFINITY;
    let mut n_tokens = 0;
    for _ in 0..3 {
        let t0 = Instant::now();
        let ids = tok.encode(text);
        let dt = t0.elapsed().as_secs_f64();
        n_tokens = ids.len();
        best = best.min(dt);
    }
    let mbs = text.len() as f64 / 1e6 / best;
    println!(
        "  encode: {:.1} MB in {:.3} s -> {:.1} MB/s, {} tokens ({:.2} M tokens/s, {:.2} bytes/token)",
        text.len() as f64 / 1e6,
        best,
        mbs,
        n_tokens,
        n_tokens as f64 / 1e6 / best,
        text.len() as f64 / n_tokens as f64
    );
    let ids = tok.encode(text);
    let t0 = Instant::now();
    let bytes = tok.decode(&ids);
    println!("  decode: {:.1} MB/s (round trip ok: {})", text.len() as f64 / 1e6 / t0.elapsed().as_secs_f64(), bytes == text.as_bytes());
}

/// Deterministic mixed text of about `target` bytes.
fn mixed_text(target: usize, random_words: bool) -> String {
    let prose = [
        "The quick brown fox jumps over the lazy dog.", "In 1969, Apollo 11 landed on the Moon;", "it's", "we'll",
        "tokenization", "throughput", "DeepSeek", "inference", "engine", "attention", "is", "a", "of", "and", "the",
    ];
    let code = [
        "fn main() {\n    let x: Vec<u8> = vec![1, 2, 3];\n}\n", "if (a >= b && c != d) { return -1; }\n",
        "    for i in 0..n {\n        sum += v[i] * 2.5e-3;\n    }\n", "<div class=\"row\">&nbsp;</div>\n",
    ];
    let other = [
        "日本語のテキストとカタカナ、ひらがな。", "中文：深度求索公司创造了DeepSeek。", "Привет, мир! Как дела?",
        "emoji 🙂🚀👩‍💻 and flags 🇮🇹", "perché però città è É", "3.14159 -42 1e10 0x1F 2026-11-26",
        "\n\n", "\t\t", "   ", "\r\n",
    ];
    let mut s = String::with_capacity(target + 1024);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut rnd = |n: usize| {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) as usize % n
    };
    // Pseudo-words of random letters keep the piece cache honest (real text has
    // a long tail of rare words).
    const LETTERS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
    while s.len() < target {
        if random_words && rnd(4) == 0 {
            for _ in 0..6 {
                s.push(' ');
                for _ in 0..2 + rnd(9) {
                    s.push(LETTERS[rnd(LETTERS.len())] as char);
                }
            }
        }
        match rnd(10) {
            0..=5 => {
                for _ in 0..8 {
                    s.push_str(prose[rnd(prose.len())]);
                    s.push(' ');
                }
                s.push('\n');
            }
            6 | 7 => s.push_str(code[rnd(code.len())]),
            _ => {
                s.push_str(other[rnd(other.len())]);
                s.push(' ');
            }
        }
    }
    s
}
