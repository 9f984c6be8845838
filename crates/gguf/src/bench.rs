//! Helpers shared by the CPU kernel benchmarks (`dsv4 bench kernels` and the
//! crate's `kernel_bench` example): a multi-threaded read-bandwidth probe and
//! valid random weight data of any block type.

use std::time::Instant;

use rayon::prelude::*;

use crate::quant::simd::read_probe;
use crate::quant::{f32_to_bf16, f32_to_f16};
use crate::GgmlType;

/// (best, median) of a list of rates, higher is better.
pub fn best_median(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(|a, b| b.total_cmp(a));
    (v[0], v[v.len() / 2])
}

/// Multi-threaded streaming read of a large buffer (AVX2 sum when available);
/// GB/s (1e9 bytes/s), best and median.
pub fn measure_bandwidth(bytes: usize, reps: usize) -> (f64, f64) {
    let mut buf = vec![0u8; bytes];
    // Touch every page (and make the content non-trivial) before timing.
    buf.par_chunks_mut(1 << 16).enumerate().for_each(|(i, c)| c.fill(i as u8));
    let chunk = (bytes / (rayon::current_num_threads() * 8)).max(1 << 16);
    let mut rates = Vec::new();
    let mut sink = 0u64;
    for _ in 0..reps.max(1) + 1 {
        let t = Instant::now();
        let s: u64 = buf.par_chunks(chunk).map(read_probe).reduce(|| 0, u64::wrapping_add);
        let dt = t.elapsed().as_secs_f64();
        sink = sink.wrapping_add(s);
        rates.push(bytes as f64 / dt / 1e9);
    }
    std::hint::black_box(sink);
    rates.remove(0); // warm-up
    best_median(rates)
}

/// Valid random weight data for `ty` (random quants, small finite scales).
pub fn synthetic_weights(ty: GgmlType, n_blocks: usize) -> Vec<u8> {
    let bb = ty.block_bytes();
    let mut v = vec![0u8; n_blocks * bb];
    v.par_chunks_mut(bb * 4096).enumerate().for_each(|(ci, c)| {
        let mut s = 0x9E37_79B9_7F4A_7C15u64 ^ (ci as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        for b in c.chunks_exact_mut(bb) {
            for byte in b.iter_mut() {
                *byte = next() as u8;
            }
            let small = ((next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.02;
            let h = f32_to_f16(small).to_le_bytes();
            match ty {
                GgmlType::F32 => b.copy_from_slice(&(small * 50.0).to_le_bytes()),
                GgmlType::F16 => b.copy_from_slice(&f32_to_f16(small * 50.0).to_le_bytes()),
                GgmlType::BF16 => b.copy_from_slice(&f32_to_bf16(small * 50.0).to_le_bytes()),
                GgmlType::Q8_0 | GgmlType::IQ2_XXS => b[..2].copy_from_slice(&h),
                GgmlType::Q4_K => {
                    b[..2].copy_from_slice(&h);
                    b[2..4].copy_from_slice(&h);
                }
                GgmlType::Q2_K => {
                    b[80..82].copy_from_slice(&h);
                    b[82..84].copy_from_slice(&h);
                }
                _ => {}
            }
        }
    });
    v
}

/// Best and median GB/s for `bytes` processed per call of `f`: one warm-up
/// call, then `reps` timed calls.
pub fn time_rates(reps: usize, bytes: f64, mut f: impl FnMut()) -> (f64, f64) {
    f();
    let rates = (0..reps.max(1))
        .map(|_| {
            let t = Instant::now();
            f();
            bytes / t.elapsed().as_secs_f64() / 1e9
        })
        .collect();
    best_median(rates)
}

/// A benchmark matrix: about `bytes` of `ty` weights with `n_cols` columns,
/// and a fixed non-trivial input vector.
pub struct BenchMatrix {
    pub n_rows: usize,
    pub w: Vec<u8>,
    pub x: Vec<f32>,
}

/// None when `n_cols` is not a whole number of `ty` blocks.
pub fn bench_matrix(ty: GgmlType, n_cols: usize, bytes: usize) -> Option<BenchMatrix> {
    let rb = ty.row_bytes(n_cols)?;
    let n_rows = (bytes / rb).max(1);
    let w = synthetic_weights(ty, n_rows * n_cols / ty.block_elems());
    let x = (0..n_cols).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
    Some(BenchMatrix { n_rows, w, x })
}
