//! The CUDA backend against every public fixture (same tolerance as the CPU
//! path: whole prompt, chunked, stepwise, MTP) and against the CPU backend.
//! Skips (passing, with a note) on machines without a usable GPU.

use std::path::PathBuf;
use std::sync::Arc;

use dsv4_cuda::CudaBackend;
use dsv4_engine::fixture::{self, Tokens};
use dsv4_engine::{Backend, CpuBackend, Model};

fn gpu_or_skip() -> bool {
    match dsv4_cuda::available() {
        Ok(()) => true,
        Err(e) => {
            eprintln!("skipping CUDA test: {e}");
            false
        }
    }
}

fn fixture_dir(name: &str) -> PathBuf {
    // DSV4_SHARED points at a copy of ../shared on machines where the repo's
    // sibling folder is absent (the GPU test machine).
    let shared = std::env::var_os("DSV4_SHARED").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared"));
    shared.join("fixtures").join(name)
}

const FILES: [&str; 4] = ["logits_prefill_last.f32", "logits_decode.f32", "logits_stepwise.f32", "mtp_logits.f32"];

fn check(name: &str) {
    let dir = fixture_dir(name);
    let tokens = Tokens::load(&dir.join("tokens.json")).unwrap();
    let exp: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let tol = exp["tolerances"]["f32_engine"]["max_abs"].as_f64().unwrap() as f32;
    let model = Arc::new(Model::load(&dir.join("model.gguf")).unwrap());
    let vocab = model.cfg.vocab;
    // small max_chunk so prefill crosses chunk boundaries inside the backend too
    let mut gpu = CudaBackend::new(model.clone(), 4096, 16).unwrap();
    let mut cpu = CpuBackend::new(model.clone());
    let cpu_out = fixture::run(&mut cpu, &tokens, 0, true, true).unwrap();
    for chunk in [0usize, 1, 3, 16] {
        let full = chunk == 0;
        let out = fixture::run(&mut gpu, &tokens, chunk, full, full).unwrap();
        let files: &[&str] = if full { &FILES } else { &FILES[..2] };
        for &f in files {
            let got = match f {
                "logits_prefill_last.f32" => &out.prefill_last,
                "logits_decode.f32" => &out.decode,
                "logits_stepwise.f32" => &out.stepwise,
                _ => &out.mtp,
            };
            let want = fixture::read_f32(&dir.join(f)).unwrap();
            let s = fixture::compare(got, &want, vocab).unwrap();
            let cpu_got = match f {
                "logits_prefill_last.f32" => &cpu_out.prefill_last,
                "logits_decode.f32" => &cpu_out.decode,
                "logits_stepwise.f32" => &cpu_out.stepwise,
                _ => &cpu_out.mtp,
            };
            let vs_cpu = fixture::compare(got, cpu_got, vocab).unwrap();
            eprintln!("{name} cuda chunk {chunk} {f}: max_abs vs reference {:.3e}, vs CPU {:.3e}", s.max_abs, vs_cpu.max_abs);
            assert!(s.max_abs <= tol, "{name} chunk {chunk} {f}: {} > {tol}", s.max_abs);
        }
    }
}

#[test]
fn cuda_fixtures_match_reference() {
    if !gpu_or_skip() {
        return;
    }
    for name in ["tiny-f32", "tiny-q2", "tiny-q4"] {
        check(name);
    }
}

/// The GPU path must be able to fail too: without the FP8 KV round trip the
/// fixture comparison breaks.
#[test]
fn cuda_ablation_breaks_comparison() {
    if !gpu_or_skip() {
        return;
    }
    let dir = fixture_dir("tiny-f32");
    let tokens = Tokens::load(&dir.join("tokens.json")).unwrap();
    let mut m = Model::load(&dir.join("model.gguf")).unwrap();
    m.ablate_kv_fp8 = true;
    let vocab = m.cfg.vocab;
    let mut gpu = CudaBackend::new(Arc::new(m), 4096, 64).unwrap();
    let out = fixture::run(&mut gpu, &tokens, 0, false, false).unwrap();
    let want = fixture::read_f32(&dir.join("logits_decode.f32")).unwrap();
    let s = fixture::compare(&out.decode, &want, vocab).unwrap();
    assert!(s.max_abs > 0.05, "skipping FP8 must fail (max_abs {})", s.max_abs);
    assert_eq!(gpu.name(), "cuda");
}
