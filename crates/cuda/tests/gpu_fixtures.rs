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

/// A CUDA session saved to the versioned payload and loaded into a fresh CUDA
/// backend continues with bit-identical logits; so does an in-RAM snapshot.
#[test]
fn cuda_session_save_load_is_bit_exact() {
    use dsv4_engine::session::{Session, SessionOptions};
    if !gpu_or_skip() {
        return;
    }
    let dir = fixture_dir("tiny-q2");
    let tokens = Tokens::load(&dir.join("tokens.json")).unwrap();
    let model = Arc::new(Model::load(&dir.join("model.gguf")).unwrap());
    let mk = || Session::new(Box::new(CudaBackend::new(model.clone(), 1024, 32).unwrap()), SessionOptions::default());
    let mut a = mk();
    a.sync(&tokens.prompt, &mut |_, _| {}).unwrap();
    let mut payload = Vec::new();
    a.save(&mut payload).unwrap();
    let snap = a.snapshot().unwrap();
    let mut cont_a = Vec::new();
    for &t in &tokens.decode {
        a.extend(&[t], &mut |_, _| {}).unwrap();
        cont_a.extend_from_slice(a.logits());
    }
    let mut b = mk();
    b.load(&mut payload.as_slice()).unwrap();
    assert_eq!(b.tokens(), &tokens.prompt[..]);
    let mut cont_b = Vec::new();
    for &t in &tokens.decode {
        b.extend(&[t], &mut |_, _| {}).unwrap();
        cont_b.extend_from_slice(b.logits());
    }
    assert!(cont_a.iter().zip(&cont_b).all(|(x, y)| x.to_bits() == y.to_bits()), "save/load continuation differs");
    a.restore(&snap).unwrap();
    let mut cont_c = Vec::new();
    for &t in &tokens.decode {
        a.extend(&[t], &mut |_, _| {}).unwrap();
        cont_c.extend_from_slice(a.logits());
    }
    assert!(cont_a.iter().zip(&cont_c).all(|(x, y)| x.to_bits() == y.to_bits()), "snapshot/restore continuation differs");
    // and the CPU reference agrees with the CUDA continuation to float noise
    let mut cpu = Session::new(Box::new(CpuBackend::new(model.clone())), SessionOptions::default());
    cpu.sync(&tokens.prompt, &mut |_, _| {}).unwrap();
    let mut cont_cpu = Vec::new();
    for &t in &tokens.decode {
        cpu.extend(&[t], &mut |_, _| {}).unwrap();
        cont_cpu.extend_from_slice(cpu.logits());
    }
    let d = cont_a.iter().zip(&cont_cpu).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
    assert!(d < 1e-3, "CUDA vs CPU session logits differ by {d}");
}

/// 8-bit activation mode on the GPU (`Numerics::Q8`, mmvq.cu) meets the
/// fixtures' q8_activation_engine bounds, whole / chunked / stepwise, and
/// stays close to the CPU's 8-bit mode.
#[test]
fn cuda_q8_mode_within_bounds() {
    if !gpu_or_skip() {
        return;
    }
    for name in ["tiny-q2", "tiny-q4"] {
        let dir = fixture_dir(name);
        let tokens = Tokens::load(&dir.join("tokens.json")).unwrap();
        let exp: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
        let q8 = exp["tolerances"]["q8_activation_engine"].clone();
        let mut m = Model::load(&dir.join("model.gguf")).unwrap();
        m.numerics = dsv4_engine::Numerics::Q8;
        let model = Arc::new(m);
        let vocab = model.cfg.vocab;
        let mut gpu = CudaBackend::new(model.clone(), 4096, 16).unwrap();
        assert!(gpu.gpu_model.q8);
        let mut cpu = CpuBackend::new(model.clone());
        let cpu_out = fixture::run(&mut cpu, &tokens, 0, true, true).unwrap();
        for chunk in [0usize, 3] {
            let full = chunk == 0;
            let out = fixture::run(&mut gpu, &tokens, chunk, full, full).unwrap();
            let files: &[&str] = if full { &FILES } else { &FILES[..2] };
            for &f in files {
                let (got, cg) = match f {
                    "logits_prefill_last.f32" => (&out.prefill_last, &cpu_out.prefill_last),
                    "logits_decode.f32" => (&out.decode, &cpu_out.decode),
                    "logits_stepwise.f32" => (&out.stepwise, &cpu_out.stepwise),
                    _ => (&out.mtp, &cpu_out.mtp),
                };
                let want = fixture::read_f32(&dir.join(f)).unwrap();
                let s = fixture::compare(got, &want, vocab).unwrap();
                let c = fixture::compare(got, cg, vocab).unwrap();
                eprintln!("{name} cuda q8 chunk {chunk} {f}: mean_abs {:.3e} median_cos {:.5} top1 {:.3}; vs CPU q8 max_abs {:.3e} mean_abs {:.3e}", s.mean_abs, s.median_row_cosine, s.top1_agreement, c.max_abs, c.mean_abs);
                assert!(s.mean_abs <= q8["mean_abs"].as_f64().unwrap(), "{name} {f} mean_abs {}", s.mean_abs);
                assert!(s.median_row_cosine >= q8["median_row_cosine"].as_f64().unwrap(), "{name} {f} cos");
                assert!(s.top1_agreement >= q8["top1_agreement"].as_f64().unwrap(), "{name} {f} top1");
                // Same integer products, but float summation order differs, so an
                // activation can land on the other side of a rounding midpoint
                // in the next quantisation (and a near-tie top-k can flip): the
                // two 8-bit paths agree as closely as 8-bit is allowed to differ
                // from the reference.
                assert!(c.mean_abs <= q8["mean_abs"].as_f64().unwrap(), "{name} {f}: GPU q8 vs CPU q8 mean_abs {}", c.mean_abs);
                assert!(c.median_row_cosine >= q8["median_row_cosine"].as_f64().unwrap(), "{name} {f}: GPU q8 vs CPU q8 cos");
            }
        }
    }
}

/// bf16 RoPE state on the GPU (`--kv-rope bf16`): the fixtures stay within the
/// bounds the CPU's bf16 mode is held to (crates/engine/tests/kv_rope.rs), and
/// the GPU agrees with the CPU in the same mode.
#[test]
fn cuda_bf16_rope_state_matches_bounds() {
    use dsv4_engine::pack::RopeStore;
    if !gpu_or_skip() {
        return;
    }
    for name in ["tiny-f32", "tiny-q2", "tiny-q4"] {
        let dir = fixture_dir(name);
        let tokens = Tokens::load(&dir.join("tokens.json")).unwrap();
        let mut m = Model::load(&dir.join("model.gguf")).unwrap();
        m.kv_rope = RopeStore::Bf16;
        let model = Arc::new(m);
        let vocab = model.cfg.vocab;
        let mut gpu = CudaBackend::new(model.clone(), 4096, 16).unwrap();
        assert_eq!(gpu.kv_rope(), RopeStore::Bf16);
        let mut cpu = CpuBackend::new(model.clone());
        let g = fixture::run(&mut gpu, &tokens, 0, true, true).unwrap();
        let c = fixture::run(&mut cpu, &tokens, 0, true, true).unwrap();
        for (f, got, cpu_got) in [
            ("logits_prefill_last.f32", &g.prefill_last, &c.prefill_last),
            ("logits_decode.f32", &g.decode, &c.decode),
            ("logits_stepwise.f32", &g.stepwise, &c.stepwise),
            ("mtp_logits.f32", &g.mtp, &c.mtp),
        ] {
            let want = fixture::read_f32(&dir.join(f)).unwrap();
            let s = fixture::compare(got, &want, vocab).unwrap();
            let vs_cpu = fixture::compare(got, cpu_got, vocab).unwrap();
            let rows: Vec<f32> = (0..s.rows).map(|r| fixture::compare(&got[r * vocab..(r + 1) * vocab], &want[r * vocab..(r + 1) * vocab], vocab).unwrap().max_abs).collect();
            let within = rows.iter().filter(|&&d| d <= 0.05).count();
            eprintln!(
                "{name} cuda bf16 {f}: max_abs vs reference {:.3e} ({within}/{} rows within 0.05), vs CPU bf16 {:.3e} (median row cos {:.6})",
                s.max_abs,
                s.rows,
                vs_cpu.max_abs,
                vs_cpu.median_row_cosine
            );
            if f == "logits_prefill_last.f32" || f == "logits_decode.f32" {
                assert!(s.max_abs <= 0.05, "{name} {f}: {}", s.max_abs);
            } else {
                assert!(within * 100 >= 95 * rows.len(), "{name} {f}: {within} of {} rows within 0.05", rows.len());
                assert!(s.min_row_cosine >= 0.99 && s.max_abs <= 1.0, "{name} {f}: {s:?}");
            }
        }
    }
}

/// bf16 RoPE sessions on the GPU: save/load and snapshot/restore continue
/// bit-identically; a CPU-saved bf16 session loads into the GPU (the packed
/// bytes go straight to the device) and continues like the CPU; an f32 payload
/// is refused; the exported rows are the CPU's canonical packing.
#[test]
fn cuda_bf16_session_save_load_is_bit_exact() {
    use dsv4_engine::pack::{PackedRows, RopeStore};
    use dsv4_engine::session::{Session, SessionOptions};
    if !gpu_or_skip() {
        return;
    }
    let dir = fixture_dir("tiny-q2");
    let tokens = Tokens::load(&dir.join("tokens.json")).unwrap();
    let mut m = Model::load(&dir.join("model.gguf")).unwrap();
    m.kv_rope = RopeStore::Bf16;
    let model = Arc::new(m);
    let mk = || Session::new(Box::new(CudaBackend::new(model.clone(), 1024, 32).unwrap()), SessionOptions::default());
    let cont = |s: &mut Session| -> Vec<u32> {
        let mut v = Vec::new();
        for &t in &tokens.decode {
            s.extend(&[t], &mut |_, _| {}).unwrap();
            v.extend(s.logits().iter().map(|x| x.to_bits()));
        }
        v
    };
    let mut a = mk();
    a.sync(&tokens.prompt, &mut |_, _| {}).unwrap();
    let mut payload = Vec::new();
    a.save(&mut payload).unwrap();
    assert_eq!(u32::from_le_bytes(payload[12..16].try_into().unwrap()), 1, "payload flags say bf16");
    let st = a.backend().export_state().unwrap();
    for l in &st.layers {
        for rows in [&l.rows, &l.idx_rows] {
            let mut again = PackedRows::new(rows.format());
            again.extend_from_f32(&rows.to_f32()).unwrap();
            assert_eq!(again.as_bytes(), rows.as_bytes(), "exported rows are canonical");
        }
    }
    let snap = a.snapshot().unwrap();
    let want = cont(&mut a);
    let mut b = mk();
    b.load(&mut payload.as_slice()).unwrap();
    assert_eq!(cont(&mut b), want, "save/load continuation differs");
    a.restore(&snap).unwrap();
    assert_eq!(cont(&mut a), want, "snapshot/restore continuation differs");
    // CPU → GPU in bf16 mode: continues like the CPU session (float noise only)
    let mut cpu = Session::new(Box::new(CpuBackend::new(model.clone())), SessionOptions::default());
    cpu.sync(&tokens.prompt, &mut |_, _| {}).unwrap();
    let mut cpu_payload = Vec::new();
    cpu.save(&mut cpu_payload).unwrap();
    let mut c = mk();
    c.load(&mut cpu_payload.as_slice()).unwrap();
    let from_cpu: Vec<f32> = cont(&mut c).into_iter().map(f32::from_bits).collect();
    let cpu_cont: Vec<f32> = cont(&mut cpu).into_iter().map(f32::from_bits).collect();
    let d = from_cpu.iter().zip(&cpu_cont).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
    eprintln!("CPU-saved bf16 session continued on the GPU: max |Δ| vs CPU {d:.3e}");
    assert!(d < 1e-3, "CPU→GPU bf16 continuation differs by {d}");
    // an f32 state is refused by a bf16 GPU session
    let f32_model = Arc::new(Model::load(&dir.join("model.gguf")).unwrap());
    let mut f = Session::new(Box::new(CudaBackend::new(f32_model, 1024, 32).unwrap()), SessionOptions::default());
    f.sync(&tokens.prompt[..9], &mut |_, _| {}).unwrap();
    let mut fp = Vec::new();
    f.save(&mut fp).unwrap();
    let e = c.load(&mut fp.as_slice()).unwrap_err().to_string();
    assert!(e.contains("--kv-rope"), "{e}");
    assert!(f.load(&mut payload.as_slice()).is_err());
}

/// The device state figure: a model's allocation equals `gpu_state_bytes`, and
/// the V4 Flash state at 1M tokens, allocated on the device from the config
/// (both RoPE stores), measures what the allocation code computes.
#[test]
fn cuda_state_bytes_measured() {
    use dsv4_cuda::model::{alloc_state_for, gpu_state_bytes};
    use dsv4_engine::pack::RopeStore;
    if !gpu_or_skip() {
        return;
    }
    let dir = fixture_dir("tiny-q2");
    for rope in [RopeStore::F32, RopeStore::Bf16] {
        let mut m = Model::load(&dir.join("model.gguf")).unwrap();
        m.kv_rope = rope;
        let model = Arc::new(m);
        let ctx = 1000;
        let be = CudaBackend::new(model.clone(), ctx, 16).unwrap();
        let main = gpu_state_bytes(&model.cfg, ctx, rope).total();
        // + the MTP block's state (window only: ratio 0)
        let mtp = if model.has_mtp() { model.cfg.window * model.cfg.head_dim * 4 } else { 0 };
        assert_eq!(be.state_bytes(), main + mtp, "{rope:?}");
    }
    let gpu = dsv4_cuda::Gpu::new(0).unwrap();
    let cfg = dsv4_engine::Config::v4_flash();
    let ctx = 1usize << 20;
    for rope in [RopeStore::F32, RopeStore::Bf16] {
        let want = gpu_state_bytes(&cfg, ctx, rope);
        gpu.sync().unwrap();
        let (free0, _) = cudarc::driver::result::mem_get_info().unwrap();
        let before = gpu.allocated.get();
        let st = alloc_state_for(&gpu, &cfg, ctx, rope).unwrap();
        gpu.sync().unwrap();
        let (free1, _) = cudarc::driver::result::mem_get_info().unwrap();
        let got = gpu.allocated.get() - before;
        println!(
            "V4 Flash GPU state at {ctx} tokens, {rope} RoPE: allocated {got} B = {:.3} GiB (rows {} + indexer {} + window {} + compressors {}); device free memory fell by {} B = {:.3} GiB",
            got as f64 / (1u64 << 30) as f64,
            want.rows,
            want.idx_rows,
            want.ring,
            want.comp,
            free0 - free1,
            (free0 - free1) as f64 / (1u64 << 30) as f64
        );
        assert_eq!(got, want.total());
        if rope == RopeStore::Bf16 {
            assert!(got <= 4 << 30);
        }
        drop(st);
    }
}
