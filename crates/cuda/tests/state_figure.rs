//! The GPU state figure for V4 Flash, from the allocation code's arithmetic
//! (`gpu_state_bytes`, which `new_state` allocates with; measured on the device
//! by gpu_fixtures.rs `cuda_state_bytes_measured`). Needs no GPU.

use dsv4_cuda::model::{dev_stride, gpu_state_bytes};
use dsv4_engine::pack::{RopeStore, RowFormat, StateBytes};
use dsv4_engine::Config;

#[test]
fn v4_flash_gpu_state_figure() {
    let cfg = Config::v4_flash();
    // row strides: the packed sizes rounded up to 4 bytes
    assert_eq!(dev_stride(RowFormat::attn_with(&cfg, RopeStore::F32)), 712);
    assert_eq!(dev_stride(RowFormat::attn_with(&cfg, RopeStore::Bf16)), 584);
    assert_eq!(dev_stride(RowFormat::indexer(&cfg)), 68);
    let ctx = 1usize << 20;
    let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
    for rope in [RopeStore::F32, RopeStore::Bf16] {
        let g = gpu_state_bytes(&cfg, ctx, rope);
        let host = StateBytes::for_ctx(&cfg, ctx, rope);
        println!(
            "V4 Flash GPU state at {ctx} tokens, {rope} RoPE: {} B = {:.3} GiB (rows {} + indexer {} + window {} + compressors {}); host {} B = {:.3} GiB",
            g.total(),
            gib(g.total()),
            g.rows,
            g.idx_rows,
            g.ring,
            g.comp,
            host.total(),
            gib(host.total())
        );
        // same window and compressor state; rows differ only by the stride
        // padding (1 B per f32-RoPE attention row) and one spare row per layer
        assert_eq!((g.ring, g.comp), (host.ring, host.comp));
        assert!(g.total() >= host.total() && g.total() - host.total() < host.total() / 100);
    }
    assert!(gpu_state_bytes(&cfg, ctx, RopeStore::Bf16).total() <= 4 << 30, "the 4 GiB target");
    // f32 rows (the layout before packing): 13.4 GiB
    assert!(gpu_state_bytes(&cfg, ctx, RopeStore::F32).total() * 3 < 3440 * 4 * ctx);
}
