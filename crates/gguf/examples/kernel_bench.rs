//! Same measurement as `dsv4 bench kernels`, through the crate API only (for
//! when the CLI does not build), plus a per-core in-cache mode.
//!
//! `cargo run --release -p dsv4-gguf --example kernel_bench -- [threads] [size_mb] [reps] [types]`
//! `types`: comma-separated names (default: all seven weight types).
//! With `size_mb` ≤ 2 the matrix stays in cache: a per-core compute ceiling.
//! `KB_TOKENS=n` adds `matmul_q8` with `n` tokens (prefill), reported as
//! weight GB/s × tokens (equal to the matvec figure when nothing is shared).


use dsv4_gguf::kernels::{matmul_q8, matvec, matvec_q8, quantize_acts};
use dsv4_gguf::bench::{bench_matrix, measure_bandwidth, time_rates};
use dsv4_gguf::quant::simd_enabled;
use dsv4_gguf::rayon;
use dsv4_gguf::GgmlType;


fn bench_type(ty: GgmlType, n_cols: usize, bytes: usize, reps: usize) -> (f64, f64, f64, f64) {
    let m = bench_matrix(ty, n_cols, bytes).expect("whole blocks");
    let n_rows = m.n_rows;
    let mut y = vec![0f32; n_rows];
    let total = m.w.len() as f64;
    let (a, b) = time_rates(reps, total, || matvec(ty, &m.w, n_rows, n_cols, &m.x, &mut y));
    let (c, d) = time_rates(reps, total, || {
        let xq = quantize_acts(ty, &m.x);
        matvec_q8(ty, &m.w, n_rows, n_cols, &xq, &mut y)
    });
    std::hint::black_box(&y);
    if let Some(n_tok) = std::env::var("KB_TOKENS").ok().and_then(|v| v.parse::<usize>().ok()) {
        let xqs: Vec<_> = (0..n_tok)
            .map(|t| quantize_acts(ty, &m.x.iter().map(|v| v * (1.0 + t as f32 * 0.01)).collect::<Vec<f32>>()))
            .collect();
        let mut ym = vec![0f32; n_rows * n_tok];
        let (b, med) = time_rates(reps, total * n_tok as f64, || matmul_q8(ty, &m.w, n_rows, n_cols, &xqs, &mut ym));
        std::hint::black_box(&ym);
        println!("  {} matmul_q8 x{n_tok}: {b:.2} [{med:.2}] GB/s x tokens", ty.name());
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
