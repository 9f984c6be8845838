//! Open the shared tiny-q2 / tiny-q4 fixture GGUFs (real Q8_0, Q2_K, Q4_K,
//! IQ2_XXS, F16 tensors): every tensor matches `expected.json`'s
//! `gguf_tensors`, dequantises, and `dot_f32` agrees with the dequantised dot.
//! Skipped with a note when the fixtures are absent.

use std::path::PathBuf;

use dsv4_gguf::kernels::{matvec, matvec_q8, quantize_acts};
use dsv4_gguf::quant::{dequantize_vec, dot_f32_with, read_i32};
use dsv4_gguf::{GgmlType, GgufFile};

fn fixture_dir(name: &str) -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures").join(name);
    if p.join("model.gguf").exists() {
        Some(p)
    } else {
        eprintln!("note: fixture {} absent, skipping", p.display());
        None
    }
}

fn check_fixture(name: &str) {
    let Some(dir) = fixture_dir(name) else { return };
    let f = GgufFile::open(&dir.join("model.gguf")).unwrap();
    let expected: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("expected.json")).unwrap()).unwrap();
    let list = expected["gguf_tensors"].as_array().unwrap();
    assert_eq!(f.tensor_infos().len(), list.len(), "{name}: tensor count");
    assert_eq!(f.version(), 3);
    assert_eq!(f.get("general.architecture").and_then(|v| v.as_str()), Some("deepseek4"));
    let mut seen = std::collections::HashSet::new();
    for e in list {
        let tname = e["name"].as_str().unwrap();
        let t = f.tensor(tname).unwrap_or_else(|| panic!("{name}: tensor {tname} missing"));
        assert_eq!(t.ty.name(), e["type"].as_str().unwrap(), "{tname}: type");
        let ne: Vec<u64> = e["ne"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
        assert_eq!(t.ne, &ne[..], "{tname}: ne");
        seen.insert(t.ty);
        if t.ty == GgmlType::I32 {
            let ids = read_i32(t.data);
            assert_eq!(ids.len(), t.n_elems());
            continue;
        }
        let deq = dequantize_vec(t.ty, t.data, t.n_elems()).unwrap();
        assert!(deq.iter().all(|v| v.is_finite()), "{tname}: non-finite values");
        // Row dots (a few rows per tensor) against the dequantised values.
        let n_cols = t.dim(0) as usize;
        let n_rows = t.n_rows();
        let rb = t.ty.row_bytes(n_cols).unwrap();
        let x: Vec<f32> = (0..n_cols).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
        for r in [0, n_rows / 2, n_rows - 1] {
            let row = &t.data[r * rb..(r + 1) * rb];
            let w = &deq[r * n_cols..(r + 1) * n_cols];
            let exact: f64 = w.iter().zip(&x).map(|(&a, &b)| a as f64 * b as f64).sum();
            let mag: f64 = w.iter().zip(&x).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum();
            for simd in [false, true] {
                let d = dot_f32_with(t.ty, row, &x, simd) as f64;
                assert!((d - exact).abs() <= 1e-5 * mag.max(1e-30), "{tname} row {r} simd={simd}: {d} vs {exact}");
            }
        }
        // Whole-matrix products (2-D weights only): f32 path exact-ish, q8 path close.
        // 3-D expert stacks: the first expert's matrix.
        let n_rows = t.dim(1) as usize;
        if n_rows > 1 {
            let data = &t.data[..n_rows * rb];
            let mut y = vec![0f32; n_rows];
            matvec(t.ty, data, n_rows, n_cols, &x, &mut y);
            let xq = quantize_acts(t.ty, &x);
            let mut yq = vec![0f32; n_rows];
            matvec_q8(t.ty, data, n_rows, n_cols, &xq, &mut yq);
            let (mut num, mut den) = (0f64, 0f64);
            for r in 0..n_rows {
                let w = &deq[r * n_cols..(r + 1) * n_cols];
                let exact: f64 = w.iter().zip(&x).map(|(&a, &b)| a as f64 * b as f64).sum();
                let mag: f64 = w.iter().zip(&x).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum();
                assert!((y[r] as f64 - exact).abs() <= 1e-5 * mag.max(1e-30), "{tname} matvec row {r}");
                num += (yq[r] as f64 - exact).powi(2);
                den += exact * exact;
            }
            // 8-bit activations: relative rms error of a couple of percent at most.
            assert!(num <= 0.03f64.powi(2) * den.max(1e-30), "{tname}: q8 path rel rms {}", (num / den).sqrt());
        }
    }
    eprintln!("{name}: {} tensors, types {:?}", list.len(), seen);
}

#[test]
fn tiny_q2_fixture() {
    check_fixture("tiny-q2");
}

#[test]
fn tiny_q4_fixture() {
    check_fixture("tiny-q4");
}
