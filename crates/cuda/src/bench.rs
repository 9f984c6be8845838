//! `dsv4 bench --synthetic q2|q4`: decode and prefill speed of a synthetic full-shape
//! model (random weights of the published types) on the GPU, as a ratio to the
//! memory-bandwidth floor measured in the same run.
//!
//! Decode floor: a step must read every active weight byte once (attention,
//! shared expert, 6 routed experts per layer, head) plus the KV rows it
//! attends to; divided by the measured device-to-device copy bandwidth.
//! With fewer layers than the model has (the full q2 model does not fit an
//! 80 GB card), the full-model figure is derived as head time + 43 × measured
//! per-layer time, and says so.

use std::time::Instant;

use dsv4_engine::config::Config;
use dsv4_engine::Want;

use crate::device::Gpu;
use crate::error::Result;
use crate::model::GpuModel;
use crate::synthetic::{head_decode_bytes, layer_decode_bytes, Recipe};

pub struct BenchOpts {
    pub recipe: Recipe,
    pub layers: usize,
    pub ctx_points: Vec<usize>,
    pub decode_steps: usize,
    pub prefill_tokens: usize,
    pub max_chunk: usize,
    /// 8-bit activations for quantised weights (`Numerics::Q8`)
    pub q8: bool,
    /// measure both numerics on the one model (f32 rows, then `_q8` rows)
    pub both: bool,
    /// RoPE dims of compressed rows in the state: f32 or bf16 (`--kv-rope`).
    pub kv_rope: dsv4_engine::pack::RopeStore,
}

/// Device-to-device copy bandwidth in GB/s (bytes read + written), best of 5.
pub fn copy_bandwidth(gpu: &Gpu) -> Result<f64> {
    let bytes = 1usize << 30;
    let a = gpu.alloc(bytes)?;
    let b = gpu.alloc(bytes)?;
    gpu.memset(a.ptr, 1, bytes)?;
    gpu.copy(b.ptr, a.ptr, bytes)?;
    gpu.sync()?;
    let mut best = 0.0f64;
    for _ in 0..5 {
        let t = Instant::now();
        for _ in 0..4 {
            gpu.copy(b.ptr, a.ptr, bytes)?;
        }
        gpu.sync()?;
        let s = t.elapsed().as_secs_f64();
        best = best.max(8.0 * bytes as f64 / s / 1e9);
    }
    Ok(best)
}

/// KV bytes a decode step reads at context `ctx`: f32 window rows, packed
/// compressed and indexer rows (device stride; RoPE dims as `rope`).
pub fn kv_decode_bytes(c: &Config, ctx: usize, rope: dsv4_engine::pack::RopeStore) -> u64 {
    use dsv4_engine::pack::RowFormat;
    let (ab, ib) = (crate::model::dev_stride(RowFormat::attn_with(c, rope)) as u64, crate::model::dev_stride(RowFormat::indexer(c)) as u64);
    let mut b = 0u64;
    for l in 0..c.n_layers {
        let r = c.compress_ratios[l];
        let win = c.window.min(ctx + 1);
        let mut rows = 0;
        if r == 4 {
            let vis = (ctx + 1) / 4;
            rows = vis.min(c.index_topk);
            if vis > c.index_topk {
                b += vis as u64 * ib; // indexer scores read every visible row
            }
        } else if r != 0 {
            rows = (ctx + 1) / r;
        }
        b += (win * c.head_dim * 4) as u64 + rows as u64 * ab;
    }
    b
}

/// Matvec kernels alone on decode-shaped matrices: GB/s of weight bytes.
/// Each case runs with f32 activations and with 8-bit ones (quantisation of x
/// included in the time).
pub fn kernel_bench(m: &mut GpuModel, print: &mut dyn FnMut(&str)) -> Result<()> {
    use crate::model::MatRef;
    let b = &m.blocks[m.blocks.len() - 1];
    let cases: Vec<(&str, MatRef, usize)> = vec![
        ("q_b Q8_0 32768x1024", b.q_b.r(), 0),
        ("o_b Q8_0 4096x8192", b.o_b.r(), 0),
        ("q_a Q8_0 1024x4096", b.q_a.r(), 0),
        ("head Q8_0 129280x4096", m.output.r(), 0),
        ("hc_fn F16 24x16384", b.hc_attn.fn_.r(), 0),
        ("gate_exps x6 slots", b.gate_exps.r(), 6),
        ("down_exps x6 slots", b.down_exps.r(), 6),
    ];
    let x = m.s.x.ptr; // scratch wide enough for any input row
    let y = m.s.logits.ptr;
    let keep = m.q8;
    for (q8, (name, w, slots)) in [false, true].into_iter().flat_map(|q| cases.iter().map(move |c| (q, *c))) {
        m.q8 = q8;
        let m = &*m;
        let bytes = if slots > 0 { w.rows * w.row_bytes * slots } else { w.rows * w.row_bytes };
        let reps = 30;
        let run = |m: &GpuModel| -> Result<()> {
            if slots > 0 {
                m.mv_experts(w, x, 0, 1, y, w.rows, slots, m.s.eids.ptr)
            } else {
                m.mv(w, x, w.cols, y, w.rows, 1)
            }
        };
        run(m)?;
        m.gpu.sync()?;
        let t = Instant::now();
        for _ in 0..reps {
            run(m)?;
        }
        m.gpu.sync()?;
        let dt = t.elapsed().as_secs_f64() / reps as f64;
        let acts = if m.uses_q8(w.ty) { "q8 " } else { "f32" };
        print(&format!("# kernel {name:26} {acts} {:8.1} us {:7.0} GB/s", dt * 1e6, bytes as f64 / dt / 1e9));
    }
    m.q8 = keep;
    Ok(())
}

pub fn run(opts: &BenchOpts, print: &mut dyn FnMut(&str)) -> Result<()> {
    let gpu = Gpu::new(0)?;
    let full = Config::v4_flash();
    let cfg = full.with_layers(opts.layers);
    let bw = copy_bandwidth(&gpu)?;
    print(&format!("# device: {} (sm_{}{}), {:.1} GiB; measured copy bandwidth {:.0} GB/s", gpu.name, gpu.cc.0, gpu.cc.1, gpu.total_mem as f64 / (1u64 << 30) as f64, bw));
    let max_ctx = opts.ctx_points.iter().copied().max().unwrap_or(0).max(opts.prefill_tokens) + opts.decode_steps + 8;
    let t = Instant::now();
    let mut m = GpuModel::synthetic(gpu, &cfg, opts.recipe, max_ctx, opts.max_chunk, 7)?;
    m.kv_rope = opts.kv_rope;
    m.q8 = opts.q8;
    print(&format!("# activations: {}", if opts.q8 { "8-bit for quantised weights (Numerics::Q8)" } else { "f32 (reference numerics)" }));
    print(&format!("# synthetic {:?} model, {} of {} layers, built in {:.1} s, {:.1} GiB on the GPU", opts.recipe, cfg.n_layers, full.n_layers, t.elapsed().as_secs_f64(), m.gpu.allocated.get() as f64 / (1u64 << 30) as f64));
    let wbytes: u64 = (0..cfg.n_layers).map(|l| layer_decode_bytes(&cfg, l, opts.recipe)).sum::<u64>() + head_decode_bytes(&cfg);
    let full_wbytes: u64 = (0..full.n_layers).map(|l| layer_decode_bytes(&full, l, opts.recipe)).sum::<u64>() + head_decode_bytes(&full);
    print(&format!("# decode weight bytes per token: {:.3} GB for these layers, {:.3} GB for the full model", wbytes as f64 / 1e9, full_wbytes as f64 / 1e9));
    // expert ids for the kernel microbenchmark: 6 distinct experts
    m.gpu.write_i32(&m.s.eids, 0, &[3, 17, 60, 101, 200, 255])?;
    kernel_bench(&mut m, print)?;
    let modes: Vec<bool> = if opts.both { vec![false, true] } else { vec![opts.q8] };
    print("kind,layers,ctx,tokens,ms_per_token,tokens_per_s,gb_per_token,gb_per_s,ratio_to_copy_bw,full_model_ms_per_token_est,full_model_tokens_per_s_est,full_model_ratio_est");
    for q8 in modes {
        m.q8 = q8;
        measure(&mut m, opts, &cfg, &full, bw, wbytes, full_wbytes, if q8 { "_q8" } else { "" }, print)?;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn measure(m: &mut GpuModel, opts: &BenchOpts, cfg: &Config, full: &Config, bw: f64, wbytes: u64, full_wbytes: u64, tag: &str, print: &mut dyn FnMut(&str)) -> Result<()> {
    // head alone, to split the step into head + per-layer cost
    let x = m.s.x.ptr;
    m.enqueue_head(&m.hc_head, m.output_norm.ptr, x)?;
    m.gpu.sync()?;
    let t = Instant::now();
    let reps = 20;
    for _ in 0..reps {
        m.enqueue_head(&m.hc_head, m.output_norm.ptr, x)?;
        let _ = m.gpu.read_f32(m.s.logits.ptr, 16)?;
    }
    let t_head = t.elapsed().as_secs_f64() / reps as f64;
    for &ctx in &opts.ctx_points {
        let mut st = m.new_state()?;
        m.fast_forward(&mut st, ctx)?;
        let tok: Vec<u32> = vec![1234];
        for _ in 0..3 {
            m.eval(&mut st, &tok, Want::default())?;
        }
        let t = Instant::now();
        for i in 0..opts.decode_steps {
            let tok = [(1000 + i * 7) as u32];
            m.eval(&mut st, &tok, Want::default())?;
        }
        let dt = t.elapsed().as_secs_f64() / opts.decode_steps as f64;
        if std::env::var("DSV4_TRACE").is_ok_and(|v| v == "1") {
            // timeline of one more step (device.rs / common.cuh: tracing):
            // trace{tag},ctx,kernel,start,wait returned,end in µs from the first start
            m.gpu.trace_reset()?;
            m.eval(&mut st, &[4321], Want::default())?;
            let tr = m.gpu.trace_read()?;
            let t0 = tr.iter().map(|r| r.1).min().unwrap_or(0);
            let us = |t: u64| t.saturating_sub(t0) as f64 / 1e3;
            for (name, a, w, e) in &tr {
                print(&format!("trace{tag},{ctx},{name},{:.3},{:.3},{:.3}", us(*a), us(*w), us(*e)));
            }
        }
        let bytes = wbytes + kv_decode_bytes(cfg, ctx, opts.kv_rope);
        let gbps = bytes as f64 / dt / 1e9;
        let t_layer = (dt - t_head).max(0.0) / cfg.n_layers as f64;
        let full_dt = t_head + t_layer * full.n_layers as f64;
        let full_bytes = full_wbytes + kv_decode_bytes(full, ctx, opts.kv_rope);
        let full_ratio = full_bytes as f64 / full_dt / 1e9 / bw;
        print(&format!(
            "decode{tag},{},{},1,{:.3},{:.1},{:.3},{:.0},{:.3},{:.3},{:.1},{:.3}",
            cfg.n_layers, ctx, dt * 1e3, 1.0 / dt, bytes as f64 / 1e9, gbps, gbps / bw, full_dt * 1e3, 1.0 / full_dt, full_ratio
        ));
    }
    if std::env::var_os("DSV4_PROFILE").is_some() {
        // per-kernel time of an unrolled (graph-free, synchronised) decode step
        let ctx = opts.ctx_points.first().copied().unwrap_or(4096);
        let mut st = m.new_state()?;
        m.fast_forward(&mut st, ctx)?;
        m.use_graphs = false;
        *m.gpu.profile.borrow_mut() = Some(Default::default());
        let steps = 4;
        for i in 0..steps {
            m.eval(&mut st, &[(77 + i) as u32], Want::default())?;
        }
        let prof = m.gpu.profile.borrow_mut().take().unwrap_or_default();
        let mut v: Vec<_> = prof.into_iter().collect();
        v.sort_by(|a, b| b.1 .0.partial_cmp(&a.1 .0).unwrap_or(std::cmp::Ordering::Equal));
        let total: f64 = v.iter().map(|x| x.1 .0).sum();
        print(&format!("# profile{tag} at ctx {ctx}: {:.3} ms per step in kernels (synchronised)", total * 1e3 / steps as f64));
        for (name, (t, c)) in v.iter().take(20) {
            print(&format!("#   {name:24} {:8.3} ms/step {:6} launches/step {:6.1} us/launch", t * 1e3 / steps as f64, c / steps as u64, t * 1e6 / *c as f64));
        }
        // and one prefill chunk
        if opts.prefill_tokens > 0 {
            let n = opts.max_chunk.min(opts.prefill_tokens);
            let toks: Vec<u32> = (0..n).map(|i| (i * 7919 % 120000) as u32).collect();
            let mut st = m.new_state()?;
            *m.gpu.profile.borrow_mut() = Some(Default::default());
            m.eval(&mut st, &toks, Want::default())?;
            let prof = m.gpu.profile.borrow_mut().take().unwrap_or_default();
            let mut v: Vec<_> = prof.into_iter().collect();
            v.sort_by(|a, b| b.1 .0.partial_cmp(&a.1 .0).unwrap_or(std::cmp::Ordering::Equal));
            let total: f64 = v.iter().map(|x| x.1 .0).sum();
            print(&format!("# profile of a {n}-token prefill chunk: {:.3} ms in kernels (synchronised)", total * 1e3));
            for (name, (t, c)) in v.iter().take(12) {
                print(&format!("#   {name:24} {:8.3} ms {:6} launches", t * 1e3, c));
            }
        }
        m.use_graphs = true;
    }
    if opts.prefill_tokens > 0 {
        let mut st = m.new_state()?;
        let toks: Vec<u32> = (0..opts.prefill_tokens).map(|i| (i * 7919 % 120000) as u32).collect();
        // warm-up on a short prompt (kernel load), then a fresh state
        m.eval(&mut st, &toks[..opts.max_chunk.min(toks.len())], Want::default())?;
        let mut st = m.new_state()?;
        let t = Instant::now();
        m.eval(&mut st, &toks, Want::default())?;
        let dt = t.elapsed().as_secs_f64();
        let per_tok = dt / toks.len() as f64;
        let t_layer = per_tok / cfg.n_layers as f64;
        let full_per_tok = t_layer * full.n_layers as f64;
        print(&format!(
            "prefill{tag},{},{},{},{:.4},{:.1},,,,{:.4},{:.1},",
            cfg.n_layers, toks.len(), toks.len(), per_tok * 1e3, 1.0 / per_tok, full_per_tok * 1e3, 1.0 / full_per_tok
        ));
    }
    Ok(())
}
