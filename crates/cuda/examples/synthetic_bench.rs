//! Stand-alone runner of the synthetic GPU benchmark (same as `dsv4 bench
//! synthetic`), for the GPU machine: `synthetic_bench q2 LAYERS CTX,CTX,... STEPS PREFILL [f32|q8|both] [f32|bf16]`
//! (the last: RoPE dims of compressed rows in the state, `--kv-rope`).
fn main() {
    let a: Vec<String> = std::env::args().collect();
    let recipe = dsv4_cuda::synthetic::Recipe::parse(a.get(1).map(|s| s.as_str()).unwrap_or("q2")).expect("q2|q4");
    let layers = a.get(2).and_then(|s| s.parse().ok()).unwrap_or(4);
    let ctx_points = a.get(3).map(|s| s.split(',').filter_map(|x| x.parse().ok()).collect()).unwrap_or(vec![4096]);
    let decode_steps = a.get(4).and_then(|s| s.parse().ok()).unwrap_or(16);
    let prefill_tokens = a.get(5).and_then(|s| s.parse().ok()).unwrap_or(0);
    let q8 = a.get(6).map(|s| s == "q8").unwrap_or(false);
    let both = a.get(6).map(|s| s == "both").unwrap_or(false);
    let kv_rope = a.get(7).map(|s| s.parse().expect("f32|bf16")).unwrap_or_default();
    let opts = dsv4_cuda::bench::BenchOpts { recipe, layers, ctx_points, decode_steps, prefill_tokens, max_chunk: 256, q8, both, kv_rope };
    if let Err(e) = dsv4_cuda::bench::run(&opts, &mut |s| println!("{s}")) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
