//! Synthetic full-size models built directly in GPU memory (no file): random
//! valid blocks of the real V4 Flash tensor types and shapes (spec gguf.md §3),
//! for decode/prefill benchmarks where the real weights are not available.
//! Also fast-forwards a state to a context frontier with random rows, so decode
//! at 128K context can be timed without prefilling 128K tokens first.

use dsv4_engine::config::Config;
use dsv4_engine::ops::Rope;
use dsv4_gguf::GgmlType;

use crate::device::{DevBuf, Gpu};
use crate::error::{CudaError, Result};
use crate::launch;
use crate::model::{GBlock, GComp, GHc, GIndexer, GMat, GMtp, GState, GpuModel, Scratch};

/// Routed-expert quantisation of the published files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recipe {
    /// gate/up IQ2_XXS, down Q2_K
    Q2,
    /// gate/up/down Q4_K
    Q4,
}

impl Recipe {
    pub fn parse(s: &str) -> Option<Recipe> {
        match s {
            "q2" => Some(Recipe::Q2),
            "q4" => Some(Recipe::Q4),
            _ => None,
        }
    }
    fn gate_up(self) -> GgmlType {
        match self {
            Recipe::Q2 => GgmlType::IQ2_XXS,
            Recipe::Q4 => GgmlType::Q4_K,
        }
    }
    fn down(self) -> GgmlType {
        match self {
            Recipe::Q2 => GgmlType::Q2_K,
            Recipe::Q4 => GgmlType::Q4_K,
        }
    }
}

struct Synth<'a> {
    gpu: &'a Gpu,
    seed: u64,
}

fn grid_for(n: u64) -> (u32, u32, u32) {
    ((n.div_ceil(256)).clamp(1, 8192) as u32, 1, 1)
}

impl Synth<'_> {
    fn next(&mut self) -> u64 {
        self.seed = self.seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.seed >> 11
    }

    /// `[n_mat][rows][cols]` of type `ty` with values of typical size `std`.
    fn mat(&mut self, ty: GgmlType, rows: usize, cols: usize, n_mat: usize) -> Result<GMat> {
        let row_bytes = ty.row_bytes(cols).ok_or_else(|| CudaError::Unsupported(format!("{cols} columns of {}", ty.name())))?;
        let total = row_bytes * rows * n_mat;
        let buf = self.gpu.alloc(total)?;
        let std = 1.0 / (cols as f32).sqrt();
        let seed = self.next();
        let g = self.gpu;
        match ty {
            GgmlType::F16 => {
                let n = (total / 2) as u64;
                launch!(g, "synth_f16", grid_for(n), (256, 1, 1), 0; buf.ptr, n, std * 1.7, seed)?;
            }
            GgmlType::F32 => {
                let n = (total / 4) as u64;
                launch!(g, "synth_f32", grid_for(n), (256, 1, 1), 0; buf.ptr, n, std * 1.7, 0.0f32, seed)?;
            }
            _ => {
                launch!(g, "synth_bytes", grid_for(total as u64), (256, 1, 1), 0; buf.ptr, total as u64, seed)?;
                let nb = (total / ty.block_bytes()) as u64;
                let bb = ty.block_bytes() as i32;
                // (offset of each f16 scale field, its value) so weights have ~std
                let fields: &[(i32, f32)] = match ty {
                    GgmlType::Q8_0 => &[(0, std / 74.0)],
                    GgmlType::Q2_K => &[(80, std / 12.0), (82, std / 24.0)],
                    GgmlType::Q4_K => &[(0, std / 240.0), (2, std / 480.0)],
                    GgmlType::IQ2_XXS => &[(0, std / 50.0)],
                    _ => return Err(CudaError::Unsupported(format!("synthetic {}", ty.name()))),
                };
                for &(off, v) in fields {
                    let s2 = self.next();
                    launch!(g, "synth_scale", grid_for(nb), (256, 1, 1), 0; buf.ptr, nb, bb, off, v, s2)?;
                }
            }
        }
        Ok(GMat { buf, ty, rows, cols, row_bytes })
    }

    fn vecf(&mut self, n: usize, scale: f32, offset: f32) -> Result<DevBuf> {
        let buf = self.gpu.alloc(n * 4)?;
        let seed = self.next();
        launch!(self.gpu, "synth_f32", grid_for(n as u64), (256, 1, 1), 0; buf.ptr, n as u64, scale, offset, seed)?;
        Ok(buf)
    }

    fn hc(&mut self, c: &Config, n_mix: usize, n_scale: usize) -> Result<GHc> {
        Ok(GHc { fn_: self.mat(GgmlType::F16, n_mix, c.hc * c.dim, 1)?, scale: self.vecf(n_scale, 0.5, 0.0)?, base: self.vecf(n_mix, 0.5, 0.0)? })
    }

    fn comp(&mut self, c: &Config, ratio: usize, d: usize) -> Result<GComp> {
        let coff = if ratio == 4 { 2 } else { 1 };
        Ok(GComp {
            ratio,
            coff,
            d,
            ape: self.vecf(ratio * coff * d, 0.5, 0.0)?,
            wkv: self.mat(GgmlType::F16, coff * d, c.dim, 1)?,
            wgate: self.mat(GgmlType::F16, coff * d, c.dim, 1)?,
            norm: self.vecf(d, 0.1, 1.0)?,
        })
    }

    fn block(&mut self, c: &Config, layer: usize, recipe: Recipe) -> Result<GBlock> {
        let (d, hd, h) = (c.dim, c.head_dim, c.n_heads);
        let n_mix = (2 + c.hc) * c.hc;
        let ratio = c.compress_ratios[layer];
        let q8 = GgmlType::Q8_0;
        let e = c.n_experts;
        let ff = c.expert_ff;
        let tid2eid = if c.is_hash_layer(layer) {
            let n = (c.vocab * c.n_experts_used) as u64;
            let b = self.gpu.alloc(n as usize * 4)?;
            let seed = self.next();
            launch!(self.gpu, "synth_ids", grid_for(n), (256, 1, 1), 0; b.ptr, n, e as i32, seed)?;
            Some(b)
        } else {
            None
        };
        Ok(GBlock {
            layer,
            hc_attn: self.hc(c, n_mix, 3)?,
            attn_norm: self.vecf(d, 0.1, 1.0)?,
            q_a: self.mat(q8, c.q_lora_rank, d, 1)?,
            q_norm: self.vecf(c.q_lora_rank, 0.1, 1.0)?,
            q_b: self.mat(q8, h * hd, c.q_lora_rank, 1)?,
            kv: self.mat(q8, hd, d, 1)?,
            kv_norm: self.vecf(hd, 0.1, 1.0)?,
            sinks: self.vecf(h, 1.0, 0.0)?,
            o_a: self.mat(q8, c.o_groups * c.o_lora_rank, h * hd / c.o_groups, 1)?,
            o_b: self.mat(q8, d, c.o_groups * c.o_lora_rank, 1)?,
            comp: if ratio != 0 { Some(self.comp(c, ratio, hd)?) } else { None },
            idx: if c.has_indexer(layer) {
                Some(GIndexer {
                    q_b: self.mat(GgmlType::F16, c.index_heads * c.index_head_dim, c.q_lora_rank, 1)?,
                    proj: self.mat(GgmlType::F16, c.index_heads, d, 1)?,
                    comp: self.comp(c, ratio, c.index_head_dim)?,
                })
            } else {
                None
            },
            hc_ffn: self.hc(c, n_mix, 3)?,
            ffn_norm: self.vecf(d, 0.1, 1.0)?,
            gate: self.mat(GgmlType::F16, e, d, 1)?,
            bias: if c.is_hash_layer(layer) { None } else { Some(self.vecf(e, 0.1, 0.0)?) },
            tid2eid,
            gate_exps: self.mat(recipe.gate_up(), ff, d, e)?,
            up_exps: self.mat(recipe.gate_up(), ff, d, e)?,
            down_exps: self.mat(recipe.down(), d, ff, e)?,
            shared: Some((self.mat(q8, ff, d, 1)?, self.mat(q8, ff, d, 1)?, self.mat(q8, d, ff, 1)?)),
        })
    }
}

/// Bytes of weights one decode step reads in `layer` (attention, shared
/// expert, `n_used` routed experts, router, HC) — the decode floor's numerator.
pub fn layer_decode_bytes(c: &Config, layer: usize, recipe: Recipe) -> u64 {
    let q8 = |rows: usize, cols: usize| (rows * GgmlType::Q8_0.row_bytes(cols).unwrap_or(0)) as u64;
    let f16 = |rows: usize, cols: usize| (rows * cols * 2) as u64;
    let rb = |ty: GgmlType, rows: usize, cols: usize| (rows * ty.row_bytes(cols).unwrap_or(0)) as u64;
    let (d, hd, h) = (c.dim, c.head_dim, c.n_heads);
    let n_mix = (2 + c.hc) * c.hc;
    let mut b = 2 * f16(n_mix, c.hc * d);
    b += q8(c.q_lora_rank, d) + q8(h * hd, c.q_lora_rank) + q8(hd, d) + q8(c.o_groups * c.o_lora_rank, h * hd / c.o_groups) + q8(d, c.o_groups * c.o_lora_rank);
    let ratio = c.compress_ratios[layer];
    if ratio != 0 {
        let coff = if ratio == 4 { 2 } else { 1 };
        b += 2 * f16(coff * hd, d);
    }
    if c.has_indexer(layer) {
        b += f16(c.index_heads * c.index_head_dim, c.q_lora_rank) + f16(c.index_heads, d) + 2 * f16(2 * c.index_head_dim, d);
    }
    b += f16(c.n_experts, d);
    b += 3 * q8(c.expert_ff, d);
    let ff = c.expert_ff;
    b += c.n_experts_used as u64 * (2 * rb(recipe.gate_up(), ff, d) + rb(recipe.down(), d, ff));
    b
}

/// Weight bytes of the output head (HcHead fn + LM head).
pub fn head_decode_bytes(c: &Config) -> u64 {
    (c.hc * c.hc * c.dim * 2) as u64 + (c.vocab * GgmlType::Q8_0.row_bytes(c.dim).unwrap_or(0)) as u64
}

impl GpuModel {
    /// A full-shape model of `cfg` with random weights of the recipe's types,
    /// built in GPU memory.
    pub fn synthetic(gpu: Gpu, cfg: &Config, recipe: Recipe, ctx: usize, max_chunk: usize, seed: u64) -> Result<GpuModel> {
        cfg.validate()?;
        let mut s = Synth { gpu: &gpu, seed };
        let embed = s.mat(GgmlType::F16, cfg.vocab, cfg.dim, 1)?;
        let output = s.mat(GgmlType::Q8_0, cfg.vocab, cfg.dim, 1)?;
        let output_norm = s.vecf(cfg.dim, 0.1, 1.0)?;
        let hc_head = s.hc(cfg, cfg.hc, 1)?;
        let mut blocks = Vec::with_capacity(cfg.n_layers);
        for l in 0..cfg.n_layers {
            blocks.push(s.block(cfg, l, recipe)?);
        }
        let mtp: Option<GMtp> = None;
        let rp = Rope::new(cfg.rope_dim, cfg.rope_theta, None);
        let ry = Rope::new(cfg.rope_dim, cfg.compress_rope_theta, Some(cfg.yarn()));
        let omega_plain = gpu.upload(&rp.omega)?;
        let omega_yarn = gpu.upload(&ry.omega)?;
        let scratch = Scratch::new(&gpu, cfg, ctx, max_chunk.max(1))?;
        gpu.sync()?;
        // the indexer's side streams (3, 4) at high priority: its chain
        // runs beside q_b and ends the attention's wait (env DSV4_PRIO:
        // digits of other stream indices, "" none, for A/B runs)
        gpu.set_high_priority(&crate::model::high_priority_streams());
        Ok(GpuModel {
            gpu,
            cfg: cfg.clone(),
            ctx,
            embed,
            output,
            output_norm,
            hc_head,
            blocks,
            mtp,
            omega_plain,
            omega_yarn,
            s: scratch,
            ablate_kv_fp8: false,
            kv_rope: Default::default(),
            use_graphs: std::env::var("DSV4_CUDA_GRAPHS").map(|v| v != "0").unwrap_or(true),
            q8: false,
            no_persist: false.into(),
        })
    }

    /// Jump a fresh state to position `pos` with random window, compressed and
    /// indexer rows (and compressor partial windows left empty): decode from
    /// there reads exactly what it would at that context.
    pub fn fast_forward(&self, st: &mut GState, pos: usize) -> Result<()> {
        if pos > self.ctx {
            return Err(CudaError::Unsupported(format!("position {pos} past the context {}", self.ctx)));
        }
        let g = &self.gpu;
        let mut seed = 12345u64;
        for l in &st.layers {
            let n = (l.ring.bytes / 4) as u64;
            seed += 1;
            launch!(g, "synth_f32", grid_for(n), (256, 1, 1), 0; l.ring.ptr, n, 1.0f32, 0.0f32, seed)?;
            // packed rows: 0x38 in every byte is a valid row (FP8 code 1.0,
            // exponent 2^-71, finite f32/bf16 RoPE dims; FP4 codes 1.5 / -0)
            for b in [l.rows.as_ref(), l.idx_rows.as_ref()].into_iter().flatten() {
                g.memset(b.ptr, 0x38, b.bytes)?;
            }
        }
        st.pos = pos;
        g.write_i32(&st.pos_dev, 0, &[pos as i32])?;
        g.sync()
    }
}
