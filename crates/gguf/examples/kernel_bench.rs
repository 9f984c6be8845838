//! Same measurement as `dsv4 bench kernels`, through the crate API only (for
//! when the CLI does not build), plus a per-core in-cache mode.
//!
//! `cargo run --release -p dsv4-gguf --example kernel_bench -- [threads] [size_mb] [reps] [types]`
//! `types`: comma-separated names (default: all seven weight types).
//! With `size_mb` ≤ 2 the matrix stays in cache: a per-core compute ceiling.
//! `KB_TOKENS=n` adds `matmul_q8` with `n` tokens (prefill), reported as
//! weight GB/s × tokens (equal to the matvec figure when nothing is shared).

use std::time::Instant;

use dsv4_gguf::kernels::{matmul_q8, matvec, matvec_q8, quantize_acts};
use dsv4_gguf::bench::{best_median, measure_bandwidth, synthetic_weights};
use dsv4_gguf::quant::simd_enabled;
use dsv4_gguf::rayon;
use dsv4_gguf::GgmlType;


fn bench_type(ty: GgmlType, n_cols: usize, bytes: usize, reps: usize) -> (f64, f64, f64, f64) {
    let rb = ty.row_bytes(n_cols).unwrap();
    let n_rows = (bytes / rb).max(1);
    let w = synthetic_weights(ty, n_rows * n_cols / ty.block_elems());
    let x: Vec<f32> = (0..n_cols).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
    let mut y = vec![0f32; n_rows];
    let total = w.len() as f64;
    let mut time = |f: &mut dyn FnMut(&mut [f32])| {
        let mut rates = Vec::new();
        for i in 0..reps.max(1) + 1 {
            let t = Instant::now();
            f(&mut y);
            let dt = t.elapsed().as_secs_f64();
            if i > 0 {
                rates.push(total / dt / 1e9);
            }
        }
        std::hint::black_box(&y);
        best_median(rates)
    };
    let (a, b) = time(&mut |y| matvec(ty, &w, n_rows, n_cols, &x, y));
    let (c, d) = time(&mut |y| {
        let xq = quantize_acts(ty, &x);
        matvec_q8(ty, &w, n_rows, n_cols, &xq, y)
    });
    if let Some(n_tok) = std::env::var("KB_TOKENS").ok().and_then(|v| v.parse::<usize>().ok()) {
        let xqs: Vec<_> = (0..n_tok)
            .map(|t| quantize_acts(ty, &x.iter().map(|v| v * (1.0 + t as f32 * 0.01)).collect::<Vec<f32>>()))
            .collect();
        let mut ym = vec![0f32; n_rows * n_tok];
        let mut rates = Vec::new();
        for i in 0..reps.max(1) + 1 {
            let t = Instant::now();
            matmul_q8(ty, &w, n_rows, n_cols, &xqs, &mut ym);
            let dt = t.elapsed().as_secs_f64();
            if i > 0 {
                rates.push(total * n_tok as f64 / dt / 1e9);
            }
        }
        std::hint::black_box(&ym);
        let (b, m) = best_median(rates);
        println!("  {} matmul_q8 x{n_tok}: {b:.2} [{m:.2}] GB/s x tokens", ty.name());
    }
    (a, b, c, d)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let threads: usize = args.first().and_then(|s| s.parse().ok()).unwrap_or(0);
    let size_mb: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(256);
    let reps: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(7);
    let all = [GgmlType::F32, GgmlType::F16, GgmlType::BF16, GgmlType::Q8_0, GgmlType::Q2_K, GgmlType::Q4_K, GgmlType::IQ2_XXS];
    let types: Vec<GgmlType> = match args.get(3) {
        Some(s) => s.split(',').filter_map(|n| all.iter().copied().find(|t| t.name().eq_ignore_ascii_case(n))).collect(),
        None => all.to_vec(),
    };
    let mut b = rayon::ThreadPoolBuilder::new();
    if threads > 0 {
        b = b.num_threads(threads);
    }
    let pool = b.build().unwrap();
    pool.install(|| {
        let in_cache = size_mb <= 2;
        println!("threads: {}, SIMD: {}, weights: {size_mb} MiB per type, {reps} reps", rayon::current_num_threads(), if simd_enabled() { "on" } else { "off" });
        let bw = if in_cache {
            1.0
        } else {
            let (bw_best, bw_med) = measure_bandwidth(1 << 30, reps);
            println!("memory read bandwidth: best {bw_best:.2} GB/s, median {bw_med:.2} GB/s (1024 MiB buffer)\n");
            bw_best
        };
        println!("{:<8} {:>12} {:>8} {:>12} {:>8}", "type", "f32 path", "% bw", "q8 path", "% bw");
        for ty in types {
            let (a, am, c, cm) = bench_type(ty, 4096, size_mb << 20, reps);
            println!("{:<8} {:>6.2} [{:>5.2}] {:>5.0}% {:>6.2} [{:>5.2}] {:>5.0}%", ty.name(), a, am, 100.0 * a / bw, c, cm, 100.0 * c / bw);
        }
    });
}
