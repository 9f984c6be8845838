//! Every public fixture in ../shared/fixtures must match the official reference's
//! logits within the tolerance its expected.json gives, for whole-prompt,
//! chunked and stepwise evaluation, and the MTP block. Ablations show the check
//! can fail: a perturbed weight and a skipped FP8 round trip both break it.

use std::path::PathBuf;
use std::sync::Arc;

use dsv4_engine::fixture::{self, Outputs, Tokens};
use dsv4_engine::{CpuBackend, Model, Numerics};

fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures")
}

struct Fixture {
    dir: PathBuf,
    tokens: Tokens,
    max_abs: f32,
    q8: serde_json::Value,
}

fn load(name: &str) -> Fixture {
    let dir = fixtures_dir().join(name);
    assert!(dir.exists(), "fixture {} not found (expected ../shared beside the repo)", dir.display());
    let tokens = Tokens::load(&dir.join("tokens.json")).unwrap();
    let exp: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let max_abs = exp["tolerances"]["f32_engine"]["max_abs"].as_f64().expect("f32_engine.max_abs") as f32;
    let q8 = exp["tolerances"]["q8_activation_engine"].clone();
    Fixture { dir, tokens, max_abs, q8 }
}

fn model(f: &Fixture) -> Model {
    Model::load(&f.dir.join("model.gguf")).expect("load fixture model")
}

/// Max |engine - reference| per file; `files` selects which to check.
fn deviations(f: &Fixture, out: &Outputs, vocab: usize, files: &[&str]) -> Vec<(String, f32)> {
    let mut r = Vec::new();
    for &name in files {
        let got = match name {
            "logits_prefill_last.f32" => &out.prefill_last,
            "logits_decode.f32" => &out.decode,
            "logits_stepwise.f32" => &out.stepwise,
            "mtp_logits.f32" => &out.mtp,
            _ => unreachable!(),
        };
        let want = fixture::read_f32(&f.dir.join(name)).unwrap();
        let s = fixture::compare(got, &want, vocab).unwrap_or_else(|e| panic!("{name}: {e}"));
        r.push((name.to_string(), s.max_abs));
    }
    r
}

const ALL: [&str; 4] = ["logits_prefill_last.f32", "logits_decode.f32", "logits_stepwise.f32", "mtp_logits.f32"];

fn check_fixture(name: &str) {
    let f = load(name);
    let m = Arc::new(model(&f));
    assert!(m.has_mtp(), "{name}: fixture carries the MTP block");
    let vocab = m.cfg.vocab;
    let mut be = CpuBackend::new(m.clone());
    // whole prompt + decode + stepwise + MTP
    let out = fixture::run(&mut be, &f.tokens, 0, true, true).unwrap();
    for (file, dev) in deviations(&f, &out, vocab, &ALL) {
        eprintln!("{name} whole-prompt {file}: max_abs {dev:.3e}");
        assert!(dev <= f.max_abs, "{name} {file}: max |engine - reference| = {dev} > {}", f.max_abs);
    }
    // chunked prefill: same prefill-last and decode logits
    for chunk in [1usize, 3, 16] {
        let out = fixture::run(&mut be, &f.tokens, chunk, false, false).unwrap();
        for (file, dev) in deviations(&f, &out, vocab, &ALL[..2]) {
            eprintln!("{name} chunk {chunk} {file}: max_abs {dev:.3e}");
            assert!(dev <= f.max_abs, "{name} chunk {chunk} {file}: {dev} > {}", f.max_abs);
        }
    }
}

#[test]
fn tiny_f32_matches_reference() {
    check_fixture("tiny-f32");
}

#[test]
fn tiny_q2_matches_reference() {
    check_fixture("tiny-q2");
}

#[test]
fn tiny_q4_matches_reference() {
    check_fixture("tiny-q4");
}

/// Chunked and whole-prompt evaluation agree with each other far more tightly
/// than the reference tolerance (same math, only summation order differs).
#[test]
fn chunked_equals_whole_prompt() {
    let f = load("tiny-q2");
    let m = Arc::new(model(&f));
    let mut be = CpuBackend::new(m);
    let whole = fixture::run(&mut be, &f.tokens, 0, false, false).unwrap();
    for chunk in [1usize, 5, 7, 64] {
        let c = fixture::run(&mut be, &f.tokens, chunk, false, false).unwrap();
        let d = whole.decode.iter().zip(&c.decode).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(d < 1e-3, "chunk {chunk}: decode logits differ by {d}");
    }
}

/// The 8-bit activation mode meets the fixture's q8_activation_engine bounds.
#[test]
fn q8_activation_mode_within_bounds() {
    for name in ["tiny-q2", "tiny-q4"] {
        let f = load(name);
        let mut m = model(&f);
        m.numerics = Numerics::Q8;
        let m = Arc::new(m);
        let vocab = m.cfg.vocab;
        let mut be = CpuBackend::new(m);
        let out = fixture::run(&mut be, &f.tokens, 0, true, true).unwrap();
        let mut pooled_got = Vec::new();
        let mut pooled_want = Vec::new();
        for file in ALL {
            let got = match file {
                "logits_prefill_last.f32" => &out.prefill_last,
                "logits_decode.f32" => &out.decode,
                "logits_stepwise.f32" => &out.stepwise,
                _ => &out.mtp,
            };
            let want = fixture::read_f32(&f.dir.join(file)).unwrap();
            let s = fixture::compare(got, &want, vocab).unwrap();
            eprintln!("{name} q8 {file}: mean_abs {:.3e} median_cos {:.5} top1 {:.3}", s.mean_abs, s.median_row_cosine, s.top1_agreement);
            assert!(s.mean_abs <= f.q8["mean_abs"].as_f64().unwrap(), "{name} {file} mean_abs {}", s.mean_abs);
            assert!(s.median_row_cosine >= f.q8["median_row_cosine"].as_f64().unwrap(), "{name} {file} cos");
            assert!(s.top1_agreement >= f.q8["top1_agreement"].as_f64().unwrap(), "{name} {file} top1");
            pooled_got.extend_from_slice(got);
            pooled_want.extend_from_slice(&want);
        }
        let p = &f.q8["pooled_all_rows"];
        let s = fixture::compare(&pooled_got, &pooled_want, vocab).unwrap();
        eprintln!("{name} q8 pooled: mean_abs {:.3e} median_cos {:.5} top1 {:.3}", s.mean_abs, s.median_row_cosine, s.top1_agreement);
        assert!(s.mean_abs <= p["mean_abs"].as_f64().unwrap());
        assert!(s.median_row_cosine >= p["median_row_cosine"].as_f64().unwrap());
        assert!(s.top1_agreement >= p["top1_agreement"].as_f64().unwrap());
    }
}

/// The comparison can fail: skipping the FP8 KV round trip, or perturbing one
/// norm weight slightly, moves the logits past the tolerance.
#[test]
fn ablations_break_the_comparison() {
    let f = load("tiny-f32");
    // skipped FP8 rounding
    let mut m = model(&f);
    m.ablate_kv_fp8 = true;
    let vocab = m.cfg.vocab;
    let mut be = CpuBackend::new(Arc::new(m));
    let out = fixture::run(&mut be, &f.tokens, 0, false, false).unwrap();
    let worst = deviations(&f, &out, vocab, &ALL[..2]).into_iter().map(|x| x.1).fold(0.0, f32::max);
    assert!(worst > f.max_abs, "skipping FP8 must fail the fixture (worst {worst})");
    // a deliberately wrong weight: one layer's kv norm scaled by 1.05
    let mut m = model(&f);
    for v in m.w.blocks[2].attn.kv_norm.iter_mut() {
        *v *= 1.05;
    }
    let mut be = CpuBackend::new(Arc::new(m));
    let out = fixture::run(&mut be, &f.tokens, 0, false, false).unwrap();
    let worst = deviations(&f, &out, vocab, &ALL[..2]).into_iter().map(|x| x.1).fold(0.0, f32::max);
    assert!(worst > f.max_abs, "a wrong weight must fail the fixture (worst {worst})");
}
