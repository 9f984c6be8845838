//! Synthetic GGUF models: random but valid weights of a given `Config`'s
//! shapes, in the types of the published files (q2: IQ2_XXS gate/up + Q2_K
//! down; q4: Q4_K; Q8_0 attention / shared experts / head; F16 embedding, HC,
//! compressors, indexer, router; F32 vectors; I32 hash table). Built in memory
//! for CPU benchmarks of the real shapes (the GPU benchmark builds its models
//! directly in device memory). Quantised blocks are hash noise with every f16
//! scale field set so the dequantised weights have a std near 1/sqrt(in).

use dsv4_engine::config::Config;
use dsv4_gguf::{GgmlType, GgufError, GgufWriter, Value};

/// Routed-expert types of the two published recipes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SynthRecipe {
    Q2,
    Q4,
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
}

fn f16b(v: f32) -> [u8; 2] {
    half::f16::from_f32(v).to_le_bytes()
}

/// `rows × cols` (times `n_mat`) of `ty`, GGUF layout.
fn matrix(rng: &mut Rng, ty: GgmlType, rows: usize, cols: usize, n_mat: usize) -> Vec<u8> {
    let std = 1.0 / (cols as f32).sqrt();
    let n = rows * n_mat;
    match ty {
        GgmlType::F16 => (0..n * cols).flat_map(|_| f16b(rng.unit() * std * 1.7)).collect(),
        GgmlType::F32 => (0..n * cols).flat_map(|_| (rng.unit() * std * 1.7).to_le_bytes()).collect(),
        _ => {
            let rb = ty.row_bytes(cols).unwrap_or(0);
            let mut b = vec![0u8; n * rb];
            for c in b.chunks_mut(8) {
                let r = rng.next().to_le_bytes();
                c.copy_from_slice(&r[..c.len()]);
            }
            let fields: &[(usize, f32)] = match ty {
                GgmlType::Q8_0 => &[(0, 1.0 / 74.0)],
                GgmlType::Q2_K => &[(80, 1.0 / 12.0), (82, 1.0 / 24.0)],
                GgmlType::Q4_K => &[(0, 1.0 / 240.0), (2, 1.0 / 480.0)],
                GgmlType::IQ2_XXS => &[(0, 1.0 / 50.0)],
                _ => &[],
            };
            for blk in b.chunks_exact_mut(ty.block_bytes()) {
                for &(off, v) in fields {
                    blk[off..off + 2].copy_from_slice(&f16b(v * std * (1.0 + 0.25 * rng.unit())));
                }
            }
            b
        }
    }
}

fn vector(rng: &mut Rng, n: usize, offset: f32, scale: f32) -> Vec<u8> {
    (0..n).flat_map(|_| (offset + scale * rng.unit()).to_le_bytes()).collect()
}

/// The `deepseek4.*` metadata of `c`.
fn metadata(w: &mut GgufWriter, c: &Config) -> Result<(), GgufError> {
    let u = |v: usize| Value::U32(v as u32);
    let p = "deepseek4.";
    w.add_kv("general.architecture", Value::String("deepseek4".into()))?;
    w.add_kv("general.name", Value::String("dsv4 synthetic".into()))?;
    for (k, v) in [
        ("context_length", u(c.context_length as usize)),
        ("embedding_length", u(c.dim)),
        ("vocab_size", u(c.vocab)),
        ("block_count", u(c.n_layers)),
        ("nextn_predict_layers", u(0)),
        ("attention.head_count", u(c.n_heads)),
        ("attention.head_count_kv", u(1)),
        ("attention.key_length", u(c.head_dim)),
        ("attention.value_length", u(c.head_dim)),
        ("attention.q_lora_rank", u(c.q_lora_rank)),
        ("attention.output_lora_rank", u(c.o_lora_rank)),
        ("attention.output_group_count", u(c.o_groups)),
        ("attention.sliding_window", u(c.window)),
        ("attention.indexer.head_count", u(c.index_heads)),
        ("attention.indexer.key_length", u(c.index_head_dim)),
        ("attention.indexer.top_k", u(c.index_topk)),
        ("rope.dimension_count", u(c.rope_dim)),
        ("rope.scaling.original_context_length", u(c.yarn_original_ctx as usize)),
        ("expert_count", u(c.n_experts)),
        ("expert_used_count", u(c.n_experts_used)),
        ("expert_shared_count", u(c.n_shared_experts)),
        ("expert_feed_forward_length", u(c.expert_ff)),
        ("expert_gating_func", u(4)),
        ("hash_layer_count", u(c.n_hash_layers)),
        ("hyper_connection.count", u(c.hc)),
        ("hyper_connection.sinkhorn_iterations", u(c.sinkhorn_iters)),
    ] {
        w.add_kv(format!("{p}{k}"), v)?;
    }
    for (k, v) in [
        ("attention.compress_rope_freq_base", c.compress_rope_theta),
        ("attention.layer_norm_rms_epsilon", c.rms_eps),
        ("rope.freq_base", c.rope_theta),
        ("rope.scaling.factor", c.yarn_factor),
        ("rope.scaling.yarn_beta_fast", c.yarn_beta_fast),
        ("rope.scaling.yarn_beta_slow", c.yarn_beta_slow),
        ("expert_weights_scale", c.route_scale),
        ("hyper_connection.epsilon", c.hc_eps),
    ] {
        w.add_kv(format!("{p}{k}"), Value::F32(v))?;
    }
    w.add_kv(format!("{p}expert_weights_norm"), Value::Bool(c.weights_norm))?;
    let ratios = c.compress_ratios[..c.n_layers].iter().map(|&r| Value::I32(r as i32)).collect();
    w.add_kv(format!("{p}attention.compress_ratios"), Value::Array(ratios))?;
    let limits = c.swiglu_limits[..c.n_layers].iter().map(|&l| Value::F32(l)).collect();
    w.add_kv(format!("{p}swiglu_clamp_exp"), Value::Array(limits))?;
    Ok(())
}

/// A whole GGUF file (bytes) of `c` (no MTP block) with random weights.
pub fn synthetic_gguf(c: &Config, recipe: SynthRecipe, seed: u64) -> Result<Vec<u8>, GgufError> {
    let mut rng = Rng(seed | 1);
    let mut w = GgufWriter::new();
    metadata(&mut w, c)?;
    let (d, m, hd, h) = (c.dim, c.hc, c.head_dim, c.n_heads);
    let n_mix = (2 + m) * m;
    let (f16, f32t, q8) = (GgmlType::F16, GgmlType::F32, GgmlType::Q8_0);
    let (gu, dn) = match recipe {
        SynthRecipe::Q2 => (GgmlType::IQ2_XXS, GgmlType::Q2_K),
        SynthRecipe::Q4 => (GgmlType::Q4_K, GgmlType::Q4_K),
    };
    let u = |v: usize| v as u64;
    let mut t = |w: &mut GgufWriter, name: String, ty: GgmlType, ne: &[u64], bytes: Vec<u8>| -> Result<(), GgufError> {
        w.add_tensor(name, ty, ne, bytes).map(|_| ())
    };
    let emb = matrix(&mut rng, f16, c.vocab, d, 1);
    t(&mut w, "token_embd.weight".into(), f16, &[u(d), u(c.vocab)], emb)?;
    for l in 0..c.n_layers {
        let p = format!("blk.{l}.");
        for which in ["hc_attn", "hc_ffn"] {
            let fnm = matrix(&mut rng, f16, n_mix, m * d, 1);
            t(&mut w, format!("{p}{which}_fn.weight"), f16, &[u(m * d), u(n_mix)], fnm)?;
            t(&mut w, format!("{p}{which}_scale.weight"), f32t, &[3], vector(&mut rng, 3, 0.0, 0.5))?;
            t(&mut w, format!("{p}{which}_base.weight"), f32t, &[u(n_mix)], vector(&mut rng, n_mix, 0.0, 0.5))?;
        }
        t(&mut w, format!("{p}attn_norm.weight"), f32t, &[u(d)], vector(&mut rng, d, 1.0, 0.1))?;
        t(&mut w, format!("{p}ffn_norm.weight"), f32t, &[u(d)], vector(&mut rng, d, 1.0, 0.1))?;
        let qa = matrix(&mut rng, q8, c.q_lora_rank, d, 1);
        t(&mut w, format!("{p}attn_q_a.weight"), q8, &[u(d), u(c.q_lora_rank)], qa)?;
        t(&mut w, format!("{p}attn_q_a_norm.weight"), f32t, &[u(c.q_lora_rank)], vector(&mut rng, c.q_lora_rank, 1.0, 0.1))?;
        let qb = matrix(&mut rng, q8, h * hd, c.q_lora_rank, 1);
        t(&mut w, format!("{p}attn_q_b.weight"), q8, &[u(c.q_lora_rank), u(h * hd)], qb)?;
        let kv = matrix(&mut rng, q8, hd, d, 1);
        t(&mut w, format!("{p}attn_kv.weight"), q8, &[u(d), u(hd)], kv)?;
        t(&mut w, format!("{p}attn_kv_a_norm.weight"), f32t, &[u(hd)], vector(&mut rng, hd, 1.0, 0.1))?;
        t(&mut w, format!("{p}attn_sinks.weight"), f32t, &[u(h)], vector(&mut rng, h, 0.0, 1.0))?;
        let gw = h * hd / c.o_groups;
        let oa = matrix(&mut rng, q8, c.o_groups * c.o_lora_rank, gw, 1);
        t(&mut w, format!("{p}attn_output_a.weight"), q8, &[u(gw), u(c.o_groups * c.o_lora_rank)], oa)?;
        let ob = matrix(&mut rng, q8, d, c.o_groups * c.o_lora_rank, 1);
        t(&mut w, format!("{p}attn_output_b.weight"), q8, &[u(c.o_groups * c.o_lora_rank), u(d)], ob)?;
        let r = c.compress_ratios[l];
        let comp = |w: &mut GgufWriter, rng: &mut Rng, t: &mut dyn FnMut(&mut GgufWriter, String, GgmlType, &[u64], Vec<u8>) -> Result<(), GgufError>, kind: &str, dd: usize| -> Result<(), GgufError> {
            let coff = if r == 4 { 2 } else { 1 };
            let ape = matrix(rng, f16, r, coff * dd, 1);
            t(w, format!("{p}{kind}_ape.weight"), f16, &[u(coff * dd), u(r)], ape)?;
            let kvm = matrix(rng, f16, coff * dd, d, 1);
            t(w, format!("{p}{kind}_kv.weight"), f16, &[u(d), u(coff * dd)], kvm)?;
            let gm = matrix(rng, f16, coff * dd, d, 1);
            t(w, format!("{p}{kind}_gate.weight"), f16, &[u(d), u(coff * dd)], gm)?;
            t(w, format!("{p}{kind}_norm.weight"), f32t, &[u(dd)], vector(rng, dd, 1.0, 0.1))
        };
        if r != 0 {
            comp(&mut w, &mut rng, &mut t, "attn_compressor", hd)?;
        }
        if c.has_indexer(l) {
            let (ih, id) = (c.index_heads, c.index_head_dim);
            let iq = matrix(&mut rng, f16, ih * id, c.q_lora_rank, 1);
            t(&mut w, format!("{p}indexer.attn_q_b.weight"), f16, &[u(c.q_lora_rank), u(ih * id)], iq)?;
            let ip = matrix(&mut rng, f16, ih, d, 1);
            t(&mut w, format!("{p}indexer.proj.weight"), f16, &[u(d), u(ih)], ip)?;
            comp(&mut w, &mut rng, &mut t, "indexer_compressor", id)?;
        }
        let e = c.n_experts;
        let gate = matrix(&mut rng, f16, e, d, 1);
        t(&mut w, format!("{p}ffn_gate_inp.weight"), f16, &[u(d), u(e)], gate)?;
        if c.is_hash_layer(l) {
            let ids: Vec<u8> = (0..c.vocab * c.n_experts_used).flat_map(|_| ((rng.next() % e as u64) as i32).to_le_bytes()).collect();
            t(&mut w, format!("{p}ffn_gate_tid2eid.weight"), GgmlType::I32, &[u(c.n_experts_used), u(c.vocab)], ids)?;
        } else {
            t(&mut w, format!("{p}exp_probs_b.bias"), f32t, &[u(e)], vector(&mut rng, e, 0.0, 0.1))?;
        }
        let ff = c.expert_ff;
        let ge = matrix(&mut rng, gu, ff, d, e);
        t(&mut w, format!("{p}ffn_gate_exps.weight"), gu, &[u(d), u(ff), u(e)], ge)?;
        let ue = matrix(&mut rng, gu, ff, d, e);
        t(&mut w, format!("{p}ffn_up_exps.weight"), gu, &[u(d), u(ff), u(e)], ue)?;
        let de = matrix(&mut rng, dn, d, ff, e);
        t(&mut w, format!("{p}ffn_down_exps.weight"), dn, &[u(ff), u(d), u(e)], de)?;
        let s1 = matrix(&mut rng, q8, ff, d, 1);
        t(&mut w, format!("{p}ffn_gate_shexp.weight"), q8, &[u(d), u(ff)], s1)?;
        let s3 = matrix(&mut rng, q8, ff, d, 1);
        t(&mut w, format!("{p}ffn_up_shexp.weight"), q8, &[u(d), u(ff)], s3)?;
        let s2 = matrix(&mut rng, q8, d, ff, 1);
        t(&mut w, format!("{p}ffn_down_shexp.weight"), q8, &[u(ff), u(d)], s2)?;
    }
    let out = matrix(&mut rng, q8, c.vocab, d, 1);
    t(&mut w, "output.weight".into(), q8, &[u(d), u(c.vocab)], out)?;
    t(&mut w, "output_norm.weight".into(), f32t, &[u(d)], vector(&mut rng, d, 1.0, 0.1))?;
    let hfn = matrix(&mut rng, f16, m, m * d, 1);
    t(&mut w, "output_hc_fn.weight".into(), f16, &[u(m * d), u(m)], hfn)?;
    t(&mut w, "output_hc_base.weight".into(), f32t, &[u(m)], vector(&mut rng, m, 0.0, 0.5))?;
    t(&mut w, "output_hc_scale.weight".into(), f32t, &[1], vector(&mut rng, 1, 0.0, 0.5))?;
    w.to_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A shrunken V4 shape round-trips through the engine's loader and runs.
    #[test]
    fn synthetic_model_loads_and_runs() {
        let mut c = Config::v4_flash().with_layers(4);
        c.vocab = 1024;
        c.n_experts = 16;
        let bytes = synthetic_gguf(&c, SynthRecipe::Q2, 7).unwrap();
        let file = std::sync::Arc::new(dsv4_gguf::GgufFile::from_bytes(bytes).unwrap());
        let model = std::sync::Arc::new(dsv4_engine::Model::from_gguf(file, None).unwrap());
        assert_eq!(model.cfg.n_layers, 4);
        let mut be = dsv4_engine::CpuBackend::new(model);
        use dsv4_engine::Backend;
        let out = be.eval(&[0, 5, 9], dsv4_engine::Want::default()).unwrap();
        assert_eq!(out.logits.len(), 1024);
        assert!(out.logits.iter().all(|v| v.is_finite()));
    }
}
