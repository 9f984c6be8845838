//! Kernels: SIMD vs scalar on odd shapes and random data, integer (q8) dots
//! vs the dequantised identity, matvec / matmul consistency.

use dsv4_gguf::kernels::{dot_q8_at, dot_q8_with, matmul, matmul_q8, matvec, matvec_q8, quantize_acts};
use dsv4_gguf::quant::{self, dot_f32_at, dot_f32_with, f32_to_f16, levels_available, quantize_acts_q8_0, quantize_acts_q8_k, simd_available};
use dsv4_gguf::GgmlType;
use proptest::prelude::*;

const WEIGHT_TYPES: [GgmlType; 7] =
    [GgmlType::F32, GgmlType::F16, GgmlType::BF16, GgmlType::Q8_0, GgmlType::Q2_K, GgmlType::Q4_K, GgmlType::IQ2_XXS];

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn f(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
}

/// Random valid data of `n_blocks` blocks: random bytes with finite f16 scales.
fn random_blocks(ty: GgmlType, n_blocks: usize, rng: &mut Rng) -> Vec<u8> {
    let bb = ty.block_bytes();
    let mut v = Vec::with_capacity(n_blocks * bb);
    for _ in 0..n_blocks {
        let mut b: Vec<u8> = (0..bb).map(|_| rng.next() as u8).collect();
        let f16_at = |b: &mut Vec<u8>, o: usize, x: f32| b[o..o + 2].copy_from_slice(&f32_to_f16(x).to_le_bytes());
        match ty {
            GgmlType::F32 => b.copy_from_slice(&rng.f().to_le_bytes()),
            GgmlType::F16 => f16_at(&mut b, 0, rng.f()),
            GgmlType::BF16 => b.copy_from_slice(&quant::f32_to_bf16(rng.f()).to_le_bytes()),
            GgmlType::Q8_0 | GgmlType::IQ2_XXS => f16_at(&mut b, 0, rng.f() * 0.01),
            GgmlType::Q2_K => {
                f16_at(&mut b, 80, rng.f() * 0.01);
                f16_at(&mut b, 82, rng.f() * 0.01);
            }
            GgmlType::Q4_K => {
                f16_at(&mut b, 0, rng.f() * 0.01);
                f16_at(&mut b, 2, rng.f() * 0.01);
            }
            _ => unreachable!(),
        }
        v.extend_from_slice(&b);
    }
    v
}

fn exact_dot(w: &[f32], x: &[f32]) -> (f64, f64) {
    let e = w.iter().zip(x).map(|(&a, &b)| a as f64 * b as f64).sum();
    let m = w.iter().zip(x).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum();
    (e, m)
}

fn close(a: f64, b: f64, mag: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * mag + 1e-30
}

fn check_row(ty: GgmlType, n_blocks: usize, seed: u64) {
    let mut rng = Rng(seed | 1);
    let n = n_blocks * ty.block_elems();
    let row = random_blocks(ty, n_blocks, &mut rng);
    let x: Vec<f32> = (0..n).map(|_| rng.f()).collect();
    let w = quant::dequantize_vec(ty, &row, n).unwrap();
    let (e, m) = exact_dot(&w, &x);
    let s = dot_f32_with(ty, &row, &x, false) as f64;
    let v = dot_f32_with(ty, &row, &x, true) as f64;
    assert!(close(s, e, m, 1e-5), "{ty} n={n}: scalar {s} vs exact {e}");
    assert!(close(v, e, m, 1e-5), "{ty} n={n}: simd {v} vs exact {e}");
    // Integer path: equals Σ deq(w)·deq(x_q) up to f32 noise, SIMD == scalar.
    let xq = quantize_acts(ty, &x);
    let xd: Vec<f32> = match (xq.q8_0(), xq.q8_k()) {
        (Some(a), _) => a.qs.iter().enumerate().map(|(i, &q)| a.d[i / 32] * q as f32).collect(),
        (_, Some(a)) => a.qs.iter().enumerate().map(|(i, &q)| a.d[i / 256] * q as f32).collect(),
        _ => x.clone(),
    };
    let (eq, mq) = exact_dot(&w, &xd);
    let qs = dot_q8_with(ty, &row, &xq, false) as f64;
    let qv = dot_q8_with(ty, &row, &xq, true) as f64;
    assert!(close(qs, eq, mq, 2e-5), "{ty} n={n}: q8 scalar {qs} vs {eq}");
    assert!(close(qv, eq, mq, 2e-5), "{ty} n={n}: q8 simd {qv} vs {eq}");
    // Every instruction-set level this CPU has (scalar, AVX2, AVX-512).
    for level in levels_available() {
        let v = dot_f32_at(ty, &row, &x, level) as f64;
        assert!(close(v, e, m, 1e-5), "{ty} n={n}: {level:?} {v} vs exact {e}");
        let qv = dot_q8_at(ty, &row, &xq, level) as f64;
        assert!(close(qv, eq, mq, 2e-5), "{ty} n={n}: q8 {level:?} {qv} vs {eq}");
    }
}

#[test]
fn simd_matches_scalar_odd_shapes() {
    if !simd_available() {
        eprintln!("note: no AVX2/FMA/F16C, SIMD comparisons degenerate to scalar");
    }
    for ty in WEIGHT_TYPES {
        for n_blocks in [1, 2, 3, 7, 9, 17, 33] {
            for seed in 0..4 {
                check_row(ty, n_blocks, 0x9E37_79B9 + seed * 1000 + n_blocks as u64);
            }
        }
    }
}

/// Worst cases for the integer paths: every quant / scale / sign bit at its
/// extreme (no i16 overflow in `maddubs`/`packs`), activations at ±full scale.
#[test]
fn extreme_blocks_all_levels() {
    for ty in WEIGHT_TYPES {
        let n_blocks = 9;
        let n = n_blocks * ty.block_elems();
        let bb = ty.block_bytes();
        for fill in [0xFFu8, 0x00, 0xAA, 0x55, 0x80, 0x7F] {
            let mut row = vec![fill; n_blocks * bb];
            for b in row.chunks_exact_mut(bb) {
                let h = f32_to_f16(0.01).to_le_bytes();
                match ty {
                    GgmlType::F32 => b.copy_from_slice(&(-0.5f32).to_le_bytes()),
                    GgmlType::F16 | GgmlType::BF16 => b.copy_from_slice(&h),
                    GgmlType::Q8_0 | GgmlType::IQ2_XXS => b[..2].copy_from_slice(&h),
                    GgmlType::Q2_K => {
                        b[80..82].copy_from_slice(&h);
                        b[82..84].copy_from_slice(&h);
                    }
                    GgmlType::Q4_K => {
                        b[..2].copy_from_slice(&h);
                        b[2..4].copy_from_slice(&h);
                    }
                    _ => unreachable!(),
                }
            }
            let w = quant::dequantize_vec(ty, &row, n).unwrap();
            for xs in [[1.0f32, 1.0], [-1.0, -1.0], [1.0, -1.0]] {
                let x: Vec<f32> = (0..n).map(|i| xs[i % 2]).collect();
                let (e, m) = exact_dot(&w, &x);
                let xq = quantize_acts(ty, &x);
                for level in levels_available() {
                    let v = dot_f32_at(ty, &row, &x, level) as f64;
                    assert!(close(v, e, m, 1e-5), "{ty} fill {fill:#x} {level:?}: {v} vs {e}");
                    let q = dot_q8_at(ty, &row, &xq, level) as f64;
                    let s = dot_q8_at(ty, &row, &xq, quant::SimdLevel::Scalar) as f64;
                    assert!(close(q, s, m, 2e-5), "{ty} fill {fill:#x} q8 {level:?}: {q} vs scalar {s}");
                }
            }
        }
    }
}

#[test]
fn matvec_and_matmul_consistent() {
    let mut rng = Rng(12345);
    for ty in WEIGHT_TYPES {
        for n_rows in 1..=17 {
            let n_blocks = [1, 3, 7][n_rows % 3];
            let n_cols = n_blocks * ty.block_elems().max(8);
            let nb = n_cols / ty.block_elems();
            let w = random_blocks(ty, nb * n_rows, &mut rng);
            let n_tok = 1 + n_rows % 11;
            let x: Vec<f32> = (0..n_cols * n_tok).map(|_| rng.f()).collect();
            let rb = ty.row_bytes(n_cols).unwrap();
            let mut y = vec![0f32; n_rows * n_tok];
            matmul(ty, &w, n_rows, n_cols, &x, n_tok, &mut y);
            let xqs: Vec<_> = x.chunks_exact(n_cols).map(|xt| quantize_acts(ty, xt)).collect();
            let mut yq_all = vec![0f32; n_rows * n_tok];
            matmul_q8(ty, &w, n_rows, n_cols, &xqs, &mut yq_all);
            for t in 0..n_tok {
                let xt = &x[t * n_cols..(t + 1) * n_cols];
                let mut yv = vec![0f32; n_rows];
                matvec(ty, &w, n_rows, n_cols, xt, &mut yv);
                let xq = quantize_acts(ty, xt);
                let mut yq = vec![0f32; n_rows];
                matvec_q8(ty, &w, n_rows, n_cols, &xq, &mut yq);
                assert_eq!(&yq_all[t * n_rows..(t + 1) * n_rows], &yq[..], "{ty} matmul_q8 t={t}");
                for r in 0..n_rows {
                    let wr = quant::dequantize_vec(ty, &w[r * rb..(r + 1) * rb], n_cols).unwrap();
                    let (e, m) = exact_dot(&wr, xt);
                    assert!(close(yv[r] as f64, e, m, 1e-5), "{ty} matvec r={r}");
                    assert!(close(y[t * n_rows + r] as f64, e, m, 1e-5), "{ty} matmul t={t} r={r}");
                    assert_eq!(yq[r], dot_q8_with(ty, &w[r * rb..(r + 1) * rb], &xq, quant::simd_enabled()));
                }
            }
        }
    }
}

#[test]
fn large_parallel_matvec_matches_serial_dots() {
    // Big enough to take the rayon path.
    let mut rng = Rng(777);
    for ty in [GgmlType::Q8_0, GgmlType::Q4_K, GgmlType::F16] {
        let (n_rows, n_cols) = (300, 2048);
        let w = random_blocks(ty, n_rows * n_cols / ty.block_elems(), &mut rng);
        let x: Vec<f32> = (0..n_cols).map(|_| rng.f()).collect();
        let rb = ty.row_bytes(n_cols).unwrap();
        let mut y = vec![0f32; n_rows];
        matvec(ty, &w, n_rows, n_cols, &x, &mut y);
        let x4: Vec<f32> = (0..n_cols * 5).map(|_| rng.f()).collect();
        let mut y4 = vec![0f32; n_rows * 5];
        matmul(ty, &w, n_rows, n_cols, &x4, 5, &mut y4);
        let xqs: Vec<_> = x4.chunks_exact(n_cols).map(|xt| quantize_acts(ty, xt)).collect();
        let mut yq4 = vec![0f32; n_rows * 5];
        matmul_q8(ty, &w, n_rows, n_cols, &xqs, &mut yq4);
        let mut yq = vec![0f32; n_rows];
        matvec_q8(ty, &w, n_rows, n_cols, &xqs[2], &mut yq);
        assert_eq!(&yq4[2 * n_rows..3 * n_rows], &yq[..]);
        for r in 0..n_rows {
            let row = &w[r * rb..(r + 1) * rb];
            assert_eq!(y[r], quant::dot_f32(ty, row, &x));
            let d = quant::dot_f32(ty, row, &x4[3 * n_cols..4 * n_cols]);
            assert!((y4[3 * n_rows + r] - d).abs() <= 1e-4 * (1.0 + d.abs()), "{ty} r={r}");
        }
    }
}

#[test]
fn activation_quantisers() {
    let mut x: Vec<f32> = (0..512).map(|i| ((i * 31 % 97) as f32 - 48.0) / 7.0).collect();
    x[256..512].fill(0.0);
    let a = quantize_acts_q8_k(&x);
    assert_eq!((a.d.len(), a.qs.len(), a.bsums.len()), (2, 512, 32));
    assert_eq!(a.d[1], 0.0);
    for b in 0..16 {
        assert_eq!(a.bsums[b], a.qs[16 * b..16 * b + 16].iter().map(|&q| q as i16).sum::<i16>());
    }
    // The largest-|x| element maps to −127 (iscale = −127/max).
    let amax = x[..256].iter().fold(0f32, |m, v| m.max(v.abs()));
    let imax = (0..256).find(|&i| x[i].abs() == amax).unwrap(); // first one wins, as in ggml
    assert_eq!(a.qs[imax], -127);
    let bytes = a.to_bytes();
    assert_eq!(bytes.len(), 2 * 292);
    assert_eq!(quant::q8_k::block_bsums(&bytes), a.bsums[..16]);
    let deq = quant::dequantize_vec(GgmlType::Q8_K, &bytes, 512).unwrap();
    for i in 0..256 {
        assert!((deq[i] - x[i]).abs() <= a.d[0].abs() * 0.5 + 1e-6);
    }
    // Q8_0 activations: d = amax/127, half-even rounding.
    let mut y = vec![0f32; 32];
    y[0] = 127.0;
    y[1] = 2.5;
    y[2] = -3.5;
    let q = quantize_acts_q8_0(&y);
    assert_eq!(q.d, [1.0]);
    assert_eq!(&q.qs[..3], &[127, 2, -4]);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]
    #[test]
    fn simd_matches_scalar_random(ty_i in 0usize..7, n_blocks in 1usize..12, seed in any::<u64>()) {
        check_row(WEIGHT_TYPES[ty_i], n_blocks, seed);
    }
}

/// matmul_q8 (tiles of tokens; IQ2_XXS decodes each block once per tile at
/// the AVX-512 level) is bitwise equal to matvec_q8 per token, for even and
/// odd block counts and token counts around the tile size.
#[test]
fn matmul_q8_tiles_match_matvec_q8() {
    let mut rng = Rng(4242);
    for ty in [GgmlType::IQ2_XXS, GgmlType::Q2_K, GgmlType::Q8_0] {
        for (n_blocks, n_rows) in [(1, 3), (2, 5), (5, 4), (16, 70)] {
            let n_cols = n_blocks * 256;
            let w = random_blocks(ty, n_cols / ty.block_elems() * n_rows, &mut rng);
            for n_tok in [2, 7, 8, 9, 17] {
                let xqs: Vec<_> = (0..n_tok)
                    .map(|_| quantize_acts(ty, &(0..n_cols).map(|_| rng.f()).collect::<Vec<f32>>()))
                    .collect();
                let mut y = vec![0f32; n_rows * n_tok];
                matmul_q8(ty, &w, n_rows, n_cols, &xqs, &mut y);
                for (t, xq) in xqs.iter().enumerate() {
                    let mut yv = vec![0f32; n_rows];
                    matvec_q8(ty, &w, n_rows, n_cols, xq, &mut yv);
                    assert_eq!(&y[t * n_rows..(t + 1) * n_rows], &yv[..], "{ty} blocks={n_blocks} n_tok={n_tok} t={t}");
                }
            }
        }
    }
}

/// Q8_K activations prepared for another K-quant still work with IQ2_XXS
/// weights at every level (the AVX-512 kernel's per-activation offsets are
/// only prepared for IQ2_XXS; without them the dot falls back to AVX2).
#[test]
fn iq2_xxs_with_acts_prepared_for_other_q8k_types() {
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let n = 3 * 256;
    let row = random_blocks(GgmlType::IQ2_XXS, 3, &mut rng);
    let x: Vec<f32> = (0..n).map(|_| rng.f()).collect();
    let own = quantize_acts(GgmlType::IQ2_XXS, &x);
    for other in [GgmlType::Q2_K, GgmlType::Q4_K] {
        let acts = quantize_acts(other, &x);
        for &level in &levels_available() {
            let a = dot_q8_at(GgmlType::IQ2_XXS, &row, &acts, level) as f64;
            let b = dot_q8_at(GgmlType::IQ2_XXS, &row, &own, level) as f64;
            assert!(close(a, b, b.abs().max(1e-3), 1e-5), "{other} acts at {level:?}: {a} vs {b}");
        }
    }
}
