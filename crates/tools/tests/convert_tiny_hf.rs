//! End-to-end conversion of ../shared/fixtures/tiny-hf (the official release
//! format in miniature) with every recipe, checked against its expected.json:
//! tensor inventory (names, ne, types, order), deepseek4.* metadata, tokenizer,
//! per-tensor dequantisation error against the checkpoint, and the converted
//! model's logits through dsv4-engine by the recipe's rule.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use dsv4_engine::fixture::{self, Tokens};
use dsv4_engine::{CpuBackend, Model};
use dsv4_gguf::{GgmlType, GgufFile, Value};
use dsv4_tools::formats::{tid2eid_i32, SourceMatrix};
use dsv4_tools::safetensors::Checkpoint;
use dsv4_tools::{convert, ConvertOptions, NoProgress, Recipe};
use serde_json::Value as Json;

fn tiny_hf() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures/tiny-hf")
}

fn expected() -> Json {
    serde_json::from_str(&std::fs::read_to_string(tiny_hf().join("expected.json")).unwrap()).unwrap()
}

fn opts(dir: &Path, recipe: Recipe) -> ConvertOptions {
    ConvertOptions {
        hf_dir: tiny_hf().join("hf"),
        out: dir.join(format!("tiny-{}.gguf", recipe.name())),
        recipe,
        imatrix: None,
        mtp_out: None,
        no_mtp: false,
        resume: false,
        name: None,
    }
}

fn value_matches(got: &Value, want: &Json) -> bool {
    match (got, want) {
        (Value::Array(g), Json::Array(w)) => g.len() == w.len() && g.iter().zip(w).all(|(a, b)| value_matches(a, b)),
        (Value::String(g), Json::String(w)) => g == w,
        (Value::Bool(g), Json::Bool(w)) => g == w,
        (g, Json::Number(n)) => match (g.as_f64(), n.as_f64()) {
            (Some(a), Some(b)) => (a - b).abs() <= 1e-6 * b.abs().max(1.0),
            _ => false,
        },
        _ => false,
    }
}

/// The checkpoint's exact values for one GGUF tensor (experts stacked).
fn reference_values(ck: &Checkpoint, from: &str, n_experts: usize) -> Vec<f32> {
    let name = from.split(" + ").next().unwrap();
    if name.contains("{E}") {
        let mut v = Vec::new();
        for e in 0..n_experts {
            v.extend(SourceMatrix::open(ck, &name.replace("{E}", &e.to_string())).unwrap().to_vec().unwrap());
        }
        v
    } else {
        SourceMatrix::open(ck, name).unwrap().to_vec().unwrap()
    }
}

fn check_recipe(recipe: Recipe) {
    let exp = expected();
    let tmp = tempfile::tempdir().unwrap();
    let o = opts(tmp.path(), recipe);
    let t0 = std::time::Instant::now();
    let rep = convert(&o, &NoProgress).unwrap();
    eprintln!("{}: converted {} tensors, {} bytes in {:.2}s", recipe.name(), rep.tensors, rep.bytes_out, t0.elapsed().as_secs_f64());
    assert!(!dsv4_tools::gguf_stream::tmp_path(&o.out).exists(), "temp file left behind");
    let f = GgufFile::open(&o.out).unwrap();

    // 1. Inventory: names, order, ne and type per recipe.
    let want = exp["expected_gguf"]["tensors"].as_array().unwrap();
    let infos = f.tensor_infos();
    assert_eq!(infos.len(), want.len(), "tensor count");
    for (got, w) in infos.iter().zip(want) {
        assert_eq!(got.name, w["name"].as_str().unwrap());
        let ne: Vec<u64> = w["ne"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect();
        assert_eq!(got.ne, ne, "{}", got.name);
        assert_eq!(got.ty.name(), w["types"][recipe.name()].as_str().unwrap(), "{} type", got.name);
    }

    // 2. Metadata derived from config.json, and the tokenizer.
    for (k, v) in exp["expected_gguf"]["metadata_from_config_json"].as_object().unwrap() {
        let got = f.get(k).unwrap_or_else(|| panic!("missing metadata {k}"));
        assert!(value_matches(got, v), "{k}: got {got:?}, want {v}");
    }
    assert_eq!(f.get("general.architecture").and_then(Value::as_str), Some("deepseek4"));
    let ref_gguf = GgufFile::open(&tiny_hf().join("../tiny-f32/model.gguf")).unwrap();
    for key in ["tokenizer.ggml.tokens", "tokenizer.ggml.merges"] {
        assert_eq!(f.get(key), ref_gguf.get(key), "{key} differs from tiny-f32's");
    }
    let tok = dsv4_text::Tokenizer::from_gguf(&f).unwrap();
    for case in exp["tokenizer_cases"]["cases"].as_array().unwrap() {
        let ids: Vec<u32> = case["ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        assert_eq!(tok.encode(case["text"].as_str().unwrap()), ids, "tokenizer case {}", case["text"]);
    }

    // 3. Per-tensor dequantisation error against the checkpoint.
    let bounds = &exp["tolerances"]["tensor_dequantisation_error_bounds"]["types"];
    let ck = Checkpoint::open(&tiny_hf().join("hf")).unwrap();
    let n_exp = exp["config"]["n_routed_experts"].as_u64().unwrap() as usize;
    let mut worst: std::collections::BTreeMap<&str, f64> = Default::default();
    for (got, w) in infos.iter().zip(want) {
        let from = w["from"][0].as_str().unwrap();
        let t = f.tensor(&got.name).unwrap();
        if got.ty == GgmlType::I32 {
            let v = ck.get(from).unwrap();
            assert_eq!(dsv4_gguf::read_i32(t.data), tid2eid_i32(&v, n_exp).unwrap(), "{}", got.name);
            continue;
        }
        let refv = reference_values(&ck, from, n_exp);
        let deq = dsv4_gguf::quant::dequantize_vec(got.ty, t.data, t.n_elems()).unwrap();
        let (mut e2, mut r2) = (0f64, 0f64);
        for (a, b) in deq.iter().zip(&refv) {
            e2 += ((a - b) as f64).powi(2);
            r2 += (*b as f64).powi(2);
        }
        let rel = (e2 / r2.max(1e-30)).sqrt();
        let bound = bounds[got.ty.name()]["bound_rel_rms_error"].as_f64().unwrap();
        assert!(rel <= bound, "{} ({}): relative RMS error {rel:.4} > {bound}", got.name, got.ty);
        let e = worst.entry(got.ty.name()).or_insert(0.0);
        *e = e.max(rel);
    }
    eprintln!("{}: worst relative RMS error per type {worst:?}", recipe.name());

    // 4. Logits through the engine, by the recipe's rule.
    let rule = &exp["tolerances"]["recipes"][recipe.name()];
    let m = Arc::new(Model::load(&o.out).unwrap());
    assert!(m.has_mtp());
    let vocab = m.cfg.vocab;
    let mut be = CpuBackend::new(m);
    let tokens = Tokens::load(&tiny_hf().join("tokens.json")).unwrap();
    let out = fixture::run(&mut be, &tokens, 0, true, true).unwrap();
    for (file, got) in [
        ("logits_prefill_last.f32", &out.prefill_last),
        ("logits_decode.f32", &out.decode),
        ("logits_stepwise.f32", &out.stepwise),
        ("mtp_logits.f32", &out.mtp),
    ] {
        let want = fixture::read_f32(&tiny_hf().join(file)).unwrap();
        let s = fixture::compare(got, &want, vocab).unwrap();
        eprintln!(
            "{} {file}: max_abs {:.3e} mean_abs {:.3e} median_cos {:.5} top1 {:.3}",
            recipe.name(),
            s.max_abs,
            s.mean_abs,
            s.median_row_cosine,
            s.top1_agreement
        );
        if rule["rule"] == "f32_engine" {
            assert!(s.max_abs as f64 <= rule["max_abs"].as_f64().unwrap(), "{file}: max_abs {}", s.max_abs);
        } else {
            assert!(s.mean_abs <= rule["mean_abs"].as_f64().unwrap(), "{file}: mean_abs {}", s.mean_abs);
            assert!(s.median_row_cosine >= rule["median_row_cosine"].as_f64().unwrap(), "{file}: cos {}", s.median_row_cosine);
            assert!(s.top1_agreement >= rule["top1_agreement"].as_f64().unwrap(), "{file}: top1 {}", s.top1_agreement);
        }
    }
}

#[test]
fn tiny_hf_f16() {
    check_recipe(Recipe::F16);
}

#[test]
fn tiny_hf_q8() {
    check_recipe(Recipe::Q8);
}

#[test]
fn tiny_hf_q4() {
    check_recipe(Recipe::Q4);
}

#[test]
fn tiny_hf_q2() {
    check_recipe(Recipe::Q2);
}

/// `--mtp-out`: the main file has no `mtp.*`, the MTP file has only them, and
/// the engine loading both reproduces the in-file MTP logits exactly.
#[test]
fn tiny_hf_separate_mtp_file() {
    let tmp = tempfile::tempdir().unwrap();
    let mut o = opts(tmp.path(), Recipe::Q8);
    o.mtp_out = Some(tmp.path().join("mtp.gguf"));
    convert(&o, &NoProgress).unwrap();
    let main = GgufFile::open(&o.out).unwrap();
    let mtp = GgufFile::open(o.mtp_out.as_ref().unwrap()).unwrap();
    assert!(main.tensor_infos().iter().all(|t| !t.name.starts_with("mtp.")));
    assert!(!mtp.tensor_infos().is_empty() && mtp.tensor_infos().iter().all(|t| t.name.starts_with("mtp.0.")));
    let m = Arc::new(Model::load_with_mtp(&o.out, o.mtp_out.as_deref()).unwrap());
    assert!(m.has_mtp());
    let vocab = m.cfg.vocab;
    let mut be = CpuBackend::new(m);
    let tokens = Tokens::load(&tiny_hf().join("tokens.json")).unwrap();
    let out = fixture::run(&mut be, &tokens, 0, false, true).unwrap();
    let want = fixture::read_f32(&tiny_hf().join("mtp_logits.f32")).unwrap();
    let s = fixture::compare(&out.mtp, &want, vocab).unwrap();
    assert!(s.mean_abs <= 0.23 && s.median_row_cosine >= 0.996, "{s:?}");
}
