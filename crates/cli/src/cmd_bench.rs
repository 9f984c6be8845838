//! `dsv4 bench kernels`: memory bandwidth vs CPU matvec throughput.
//!
//! The matvec kernels are memory-bound at decode time, so they are judged
//! by weight bytes streamed per second relative to the machine's measured
//! read bandwidth. Weight matrices are made larger than the caches so every
//! repetition streams from DRAM.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use dsv4_gguf::kernels::{matvec, matvec_q8, quantize_acts};
use dsv4_gguf::bench::{bench_matrix, measure_bandwidth, time_rates};
use dsv4_gguf::GgmlType;
use dsv4_gguf::rayon;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// What to benchmark: `kernels` (CPU matvec vs memory bandwidth) or
    /// `synthetic` (a full-shape random-weight model on the GPU: decode at
    /// context frontiers and prefill, CSV with ratios to the bandwidth floor).
    /// `--synthetic RECIPE` alone implies `synthetic`.
    pub what: Option<String>,
    /// Synthetic model's routed-expert recipe: q2 or q4 (default q2).
    #[arg(long)]
    pub synthetic: Option<String>,
    /// synthetic: backend, auto (CUDA when usable), cuda or cpu (CPU: a few
    /// layers only; the model is built in RAM, ~2 GB per q2 layer plus the head).
    #[arg(long, default_value = "auto")]
    pub backend: String,
    /// synthetic: layers to build (43 = the full model; fewer on 80 GB cards).
    #[arg(long, default_value_t = 8)]
    pub layers: usize,
    /// synthetic: context frontiers for decode, comma-separated.
    #[arg(long, default_value = "2048,8192,32768,131072")]
    pub ctx_points: String,
    /// synthetic: timed decode steps per frontier.
    #[arg(long, default_value_t = 32)]
    pub steps: usize,
    /// synthetic: precision of the RoPE dims of compressed KV rows in the state (f32 or bf16).
    #[arg(long, default_value = "f32", value_name = "f32|bf16")]
    pub kv_rope: dsv4_engine::pack::RopeStore,
    /// synthetic: prompt tokens for the prefill measurement (0 = skip).
    #[arg(long, default_value_t = 2048)]
    pub prefill: usize,
    /// synthetic: 8-bit activations for quantised weights (`Numerics::Q8`,
    /// as `run --q8`); default f32 activations (the reference numerics).
    #[arg(long)]
    pub q8: bool,
    /// Worker threads (default: rayon's default, one per core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Weight bytes per type in MiB (keep it well above the last-level cache).
    #[arg(long, default_value_t = 256)]
    pub size_mb: usize,
    /// Buffer for the bandwidth test in MiB.
    #[arg(long, default_value_t = 1024)]
    pub bw_mb: usize,
    /// Timed repetitions per measurement (best and median are reported).
    #[arg(long, default_value_t = 7)]
    pub reps: usize,
    /// Columns (input width) of the benchmark matrices.
    #[arg(long, default_value_t = 4096)]
    pub cols: usize,
}

pub fn run(a: BenchArgs) -> Result<()> {
    let what = match (&a.what, &a.synthetic) {
        (Some(w), _) => w.as_str(),
        (None, Some(_)) => "synthetic",
        (None, None) => bail!("say what to benchmark: `dsv4 bench kernels` or `dsv4 bench --synthetic q2|q4 [--layers N]`"),
    };
    if what == "synthetic" {
        return synthetic(&a);
    }
    if what != "kernels" {
        bail!("unknown benchmark {what:?} (available: kernels, synthetic)");
    }
    let mut builder = rayon::ThreadPoolBuilder::new();
    if let Some(t) = a.threads {
        builder = builder.num_threads(t);
    }
    let pool = builder.build().context("building the thread pool")?;
    pool.install(|| bench_kernels(&a))
}

/// One benchmark row's result.
#[derive(Debug, Clone)]
pub struct KernelResult {
    pub ty: GgmlType,
    pub f32_best: f64,
    pub f32_median: f64,
    pub q8_best: f64,
    pub q8_median: f64,
}

fn bench_kernels(a: &BenchArgs) -> Result<()> {
    println!(
        "threads: {}, SIMD level: {:?} (IQ2_XXS uses AVX-512 where present), weights: {} MiB per type, {} reps",
        rayon::current_num_threads(),
        dsv4_gguf::quant::simd::simd_level(),
        a.size_mb,
        a.reps
    );
    let (bw_best, bw_med) = measure_bandwidth(a.bw_mb << 20, a.reps);
    println!("memory read bandwidth: best {bw_best:.2} GB/s, median {bw_med:.2} GB/s ({} MiB buffer)\n", a.bw_mb);
    println!("{:<8} {:>12} {:>8} {:>12} {:>8}   (GB/s of weight bytes, best of {}; median in brackets)", "type", "f32 path", "% bw", "q8 path", "% bw", a.reps);
    let types = [GgmlType::F32, GgmlType::F16, GgmlType::BF16, GgmlType::Q8_0, GgmlType::Q2_K, GgmlType::Q4_K, GgmlType::IQ2_XXS];
    for ty in types {
        let r = bench_type(ty, a.cols, a.size_mb << 20, a.reps)?;
        println!(
            "{:<8} {:>6.2} [{:>5.2}] {:>5.0}% {:>6.2} [{:>5.2}] {:>5.0}%",
            r.ty.name(),
            r.f32_best,
            r.f32_median,
            100.0 * r.f32_best / bw_best,
            r.q8_best,
            r.q8_median,
            100.0 * r.q8_best / bw_best
        );
    }
    Ok(())
}


/// Throughput of `matvec` and `matvec_q8` for one type over ~`bytes` of weights.
pub fn bench_type(ty: GgmlType, n_cols: usize, bytes: usize, reps: usize) -> Result<KernelResult> {
    let m = bench_matrix(ty, n_cols, bytes).with_context(|| format!("{n_cols} columns are not whole {ty} blocks"))?;
    let mut y = vec![0f32; m.n_rows];
    let total = m.w.len() as f64;
    let (f32_best, f32_median) = time_rates(reps, total, || matvec(ty, &m.w, m.n_rows, n_cols, &m.x, &mut y));
    let (q8_best, q8_median) = time_rates(reps, total, || {
        let xq = quantize_acts(ty, &m.x);
        matvec_q8(ty, &m.w, m.n_rows, n_cols, &xq, &mut y)
    });
    std::hint::black_box(&y);
    Ok(KernelResult { ty, f32_best, f32_median, q8_best, q8_median })
}

#[cfg(test)]
mod tests {
    use super::*;
    use dsv4_gguf::bench::synthetic_weights;

    #[test]
    fn synthetic_weights_decode_and_bench_runs() {
        for ty in [GgmlType::F16, GgmlType::Q8_0, GgmlType::Q2_K, GgmlType::Q4_K, GgmlType::IQ2_XXS] {
            let n = 4 * ty.block_elems().max(256);
            let w = synthetic_weights(ty, n / ty.block_elems());
            let v = dsv4_gguf::quant::dequantize_vec(ty, &w, n).unwrap();
            assert!(v.iter().all(|x| x.is_finite()), "{ty}");
            let r = bench_type(ty, 256, 64 * 1024, 1).unwrap();
            assert!(r.f32_best > 0.0 && r.q8_best > 0.0);
        }
        let (bw, _) = measure_bandwidth(1 << 20, 1);
        assert!(bw > 0.0);
    }
}

/// `dsv4 bench --synthetic q2|q4`: see dsv4_cuda::bench. GPU only for now.
fn synthetic(a: &BenchArgs) -> Result<()> {
    let name = a.synthetic.as_deref().unwrap_or("q2");
    let recipe = dsv4_cuda::synthetic::Recipe::parse(name).with_context(|| format!("unknown recipe {name:?} (q2 or q4)"))?;
    let use_cuda = match a.backend.as_str() {
        "cpu" => false,
        "cuda" => true,
        "auto" => dsv4_cuda::available().is_ok(),
        other => bail!("unknown backend {other:?} (auto, cpu, cuda)"),
    };
    if !use_cuda {
        return synthetic_cpu(a, recipe);
    }
    if let Err(why) = dsv4_cuda::available() {
        bail!("`bench --synthetic` on CUDA needs a usable GPU ({why}); use --backend cpu");
    }
    let ctx_points = a
        .ctx_points
        .split(',')
        .map(|x| x.trim().parse::<usize>().with_context(|| format!("bad context point {x:?}")))
        .collect::<Result<Vec<_>>>()?;
    let opts = dsv4_cuda::bench::BenchOpts { recipe, layers: a.layers, ctx_points, decode_steps: a.steps, prefill_tokens: a.prefill, max_chunk: 256, q8: a.q8, both: false, kv_rope: a.kv_rope };
    dsv4_cuda::bench::run(&opts, &mut |s| println!("{s}")).map_err(|e| anyhow::anyhow!("{e}"))
}

/// The same benchmark on the CPU backend, for small layer counts: the model is
/// generated in RAM (dsv4_tools::synthetic), decode is timed at a short context
/// (prefilling long contexts on a CPU takes too long), and the full-model
/// figure is scaled by decode bytes (head + 43 layers vs head + N layers).
fn synthetic_cpu(a: &BenchArgs, recipe: dsv4_cuda::synthetic::Recipe) -> Result<()> {
    use dsv4_engine::{Backend, Config, CpuBackend, Model, Want};
    use std::sync::Arc;
    let full = Config::v4_flash();
    let cfg = full.with_layers(a.layers);
    let (bw, _) = measure_bandwidth(1 << 30, 5);
    println!("# CPU, {} threads; measured read bandwidth {bw:.1} GB/s", rayon::current_num_threads());
    let t = Instant::now();
    let r = match recipe {
        dsv4_cuda::synthetic::Recipe::Q2 => dsv4_tools::synthetic::SynthRecipe::Q2,
        dsv4_cuda::synthetic::Recipe::Q4 => dsv4_tools::synthetic::SynthRecipe::Q4,
    };
    let bytes = dsv4_tools::synthetic::synthetic_gguf(&cfg, r, 7).map_err(|e| anyhow::anyhow!("{e}"))?;
    let file = Arc::new(dsv4_gguf::GgufFile::from_bytes(bytes)?);
    let mut model = Model::from_gguf(file, None)?;
    if a.q8 {
        model.numerics = dsv4_engine::Numerics::Q8;
    }
    model.kv_rope = a.kv_rope;
    let model = Arc::new(model);
    println!("# activations: {}", if a.q8 { "8-bit for quantised weights" } else { "f32" });
    println!("# synthetic {recipe:?} model, {} of {} layers, built in RAM in {:.1} s", cfg.n_layers, full.n_layers, t.elapsed().as_secs_f64());
    let wbytes: u64 = (0..cfg.n_layers).map(|l| dsv4_cuda::synthetic::layer_decode_bytes(&cfg, l, recipe)).sum::<u64>() + dsv4_cuda::synthetic::head_decode_bytes(&cfg);
    let full_bytes: u64 = (0..full.n_layers).map(|l| dsv4_cuda::synthetic::layer_decode_bytes(&full, l, recipe)).sum::<u64>() + dsv4_cuda::synthetic::head_decode_bytes(&full);
    let prefill = a.prefill.clamp(1, 256);
    let mut be = CpuBackend::with_ctx(model, prefill + a.steps + 8);
    let toks: Vec<u32> = (0..prefill).map(|i| (i * 7919 % 120000) as u32).collect();
    let t = Instant::now();
    be.eval(&toks, Want::default())?;
    let pf = t.elapsed().as_secs_f64();
    let steps = a.steps.max(1);
    let t = Instant::now();
    for i in 0..steps {
        be.eval(&[(1000 + 7 * i) as u32], Want::default())?;
    }
    let dt = t.elapsed().as_secs_f64() / steps as f64;
    let gbps = wbytes as f64 / dt / 1e9;
    let full_dt = dt * full_bytes as f64 / wbytes as f64;
    println!("kind,layers,ctx,tokens,ms_per_token,tokens_per_s,gb_per_token,gb_per_s,ratio_to_read_bw,full_model_ms_per_token_est,full_model_tokens_per_s_est");
    println!("decode,{},{},1,{:.1},{:.3},{:.3},{:.1},{:.3},{:.0},{:.4}", cfg.n_layers, prefill, dt * 1e3, 1.0 / dt, wbytes as f64 / 1e9, gbps, gbps / bw, full_dt * 1e3, 1.0 / full_dt);
    println!("prefill,{},{},{},{:.1},{:.2},,,,,", cfg.n_layers, prefill, prefill, pf * 1e3 / prefill as f64, prefill as f64 / pf);
    Ok(())
}
