//! The DeepSeek V4 forward pass on the GPU, step for step the same as
//! `dsv4_engine::model` (the CPU reference it is tested against).
//!
//! Weights are uploaded once, tensor by tensor straight from the mmap'd GGUF.
//! Activations, the window ring, compressed rows and compressor/indexer state
//! live on the GPU across calls; per chunk only the token ids and a few small
//! per-token integers go up, and only the requested logits come back.

use dsv4_engine::config::Config;
use dsv4_engine::ops::Rope;
use dsv4_engine::weights::{Block, Compressor, HcParams, Mat, Weights};
use dsv4_engine::{EvalOutput, Want};
use dsv4_gguf::GgmlType;

use crate::device::{DevBuf, Gpu};
use crate::error::{CudaError, Result};
use crate::launch;

mod forward;
mod state;

pub use state::{alloc_state_for, dev_stride, gpu_state_bytes};

/// A weight matrix (or a stack of `n_exp` expert matrices) on the device.
pub struct GMat {
    pub buf: DevBuf,
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    pub row_bytes: usize,
}

/// A borrowed view of a device matrix (or of some of its rows).
#[derive(Clone, Copy, Debug)]
pub struct MatRef {
    pub ptr: u64,
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    pub row_bytes: usize,
}

impl MatRef {
    pub fn rows(self, r0: usize, n: usize) -> MatRef {
        MatRef { ptr: self.ptr + (r0 * self.row_bytes) as u64, rows: n, ..self }
    }
    pub fn expert_bytes(&self) -> u64 {
        (self.rows * self.row_bytes) as u64
    }
}

impl GMat {
    pub fn r(&self) -> MatRef {
        MatRef { ptr: self.buf.ptr, ty: self.ty, rows: self.rows, cols: self.cols, row_bytes: self.row_bytes }
    }
    pub fn upload(gpu: &Gpu, m: &Mat, rows_per: usize) -> Result<GMat> {
        let kname = mv_suffix(m.ty)
            .ok_or_else(|| CudaError::Unsupported(format!("tensor `{}`: type {} has no CUDA kernel", m.name, m.ty.name())))?;
        let _ = kname;
        if matches!(m.ty, GgmlType::F16 | GgmlType::BF16) && m.cols % 8 != 0 {
            return Err(CudaError::Unsupported(format!("tensor `{}`: F16 rows must be a multiple of 8 wide", m.name)));
        }
        if m.cols % 4 != 0 {
            return Err(CudaError::Unsupported(format!("tensor `{}`: rows must be a multiple of 4 wide", m.name)));
        }
        Ok(GMat { buf: gpu.upload(m.data())?, ty: m.ty, rows: rows_per, cols: m.cols, row_bytes: m.row_bytes() })
    }
}

/// Stage rows through shared memory (coalesced 16-byte loads) for the block
/// formats whose blocks are not 16-byte multiples, when rows are 16-byte
/// aligned and `rows_per_block` of them fit in 48 KB. Returns (flag, bytes).
fn stage_for(w: &MatRef, rows_per_block: usize) -> (i32, u32) {
    if !stage_enabled() {
        return (0, 0);
    }
    if rows_per_block == 0 {
        return (0, 0);
    }
    let quant = matches!(w.ty, GgmlType::Q8_0 | GgmlType::Q2_K | GgmlType::Q4_K | GgmlType::IQ2_XXS);
    if quant && w.row_bytes % 16 == 0 && w.ptr % 16 == 0 && w.row_bytes * rows_per_block <= 48 * 1024 {
        (1, (w.row_bytes * rows_per_block) as u32)
    } else {
        (0, 0)
    }
}

/// Staging a single-token x vector (≤ 32 KB) in shared memory per block:
/// measured slower on H200 (docs/perf.md, v5), so opt-in with DSV4_X_STAGE=1;
/// kept because the kernel tests cover it and it may pay off with more rows per block.
fn x_stage_ok(cols: usize, x: u64) -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let on = *ON.get_or_init(|| std::env::var("DSV4_X_STAGE").map(|v| v == "1").unwrap_or(false));
    on && cols % 4 == 0 && cols * F <= 32 * 1024 && x % 16 == 0
}

fn stage_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("DSV4_MV_STAGE").map(|v| v == "1").unwrap_or(false))
}

fn mv_suffix(ty: GgmlType) -> Option<&'static str> {
    Some(match ty {
        GgmlType::F32 => "f32",
        GgmlType::F16 => "f16",
        GgmlType::BF16 => "bf16",
        GgmlType::Q8_0 => "q8_0",
        GgmlType::Q2_K => "q2_k",
        GgmlType::Q4_K => "q4_k",
        GgmlType::IQ2_XXS => "iq2_xxs",
        _ => return None,
    })
}

pub struct GHc {
    pub fn_: GMat,
    pub scale: DevBuf,
    pub base: DevBuf,
}

pub struct GComp {
    pub ratio: usize,
    pub coff: usize,
    pub d: usize,
    pub ape: DevBuf,
    pub wkv: GMat,
    pub wgate: GMat,
    pub norm: DevBuf,
}

pub struct GIndexer {
    pub q_b: GMat,
    pub proj: GMat,
    pub comp: GComp,
}

pub struct GBlock {
    pub layer: usize,
    pub hc_attn: GHc,
    pub attn_norm: DevBuf,
    pub q_a: GMat,
    pub q_norm: DevBuf,
    pub q_b: GMat,
    pub kv: GMat,
    pub kv_norm: DevBuf,
    pub sinks: DevBuf,
    pub o_a: GMat,
    pub o_b: GMat,
    pub comp: Option<GComp>,
    pub idx: Option<GIndexer>,
    pub hc_ffn: GHc,
    pub ffn_norm: DevBuf,
    pub gate: GMat,
    pub bias: Option<DevBuf>,
    pub tid2eid: Option<DevBuf>,
    pub gate_exps: GMat,
    pub up_exps: GMat,
    pub down_exps: GMat,
    pub shared: Option<(GMat, GMat, GMat)>,
}

pub struct GMtp {
    pub e_proj: GMat,
    pub h_proj: GMat,
    pub enorm: DevBuf,
    pub hnorm: DevBuf,
    pub norm: DevBuf,
    pub hc_head: GHc,
    pub block: GBlock,
}

/// Per-layer sequence state on the device.
pub struct GLayerState {
    pub ring: DevBuf,
    pub rows: Option<DevBuf>,
    pub comp_kv: Option<DevBuf>,
    pub comp_sc: Option<DevBuf>,
    pub idx_rows: Option<DevBuf>,
    pub idx_kv: Option<DevBuf>,
    pub idx_sc: Option<DevBuf>,
}

pub struct GState {
    /// the captured decode step for this state's buffers (dropped with them)
    pub graph: Option<crate::device::Graph>,
    pub pos: usize,
    /// the same position on the device (kernels read it, so a captured decode
    /// step replays correctly at every position)
    pub pos_dev: DevBuf,
    pub layers: Vec<GLayerState>,
}

/// Activation scratch for up to `n` tokens per pass.
pub(crate) struct Scratch {
    n: usize,
    tok: DevBuf,
    pub(crate) x: DevBuf,
    mixes: DevBuf,
    hw: DevBuf,
    a: DevBuf,
    qr: DevBuf,
    q: DevBuf,
    kv: DevBuf,
    ckv: DevBuf,
    csc: DevBuf,
    pooled: DevBuf,
    ickv: DevBuf,
    icsc: DevBuf,
    ipooled: DevBuf,
    iq: DevBuf,
    iw: DevBuf,
    vis: DevBuf,
    scores: DevBuf,
    sel: DevBuf,
    cnt: DevBuf,
    o: DevBuf,
    part: DevBuf,
    u: DevBuf,
    f: DevBuf,
    rlog: DevBuf,
    pub(crate) eids: DevBuf,
    /// expert-sorted prefill: slot order, inverse, tiles, gathered inputs
    order: DevBuf,
    pos: DevBuf,
    tiles: DevBuf,
    ag: DevBuf,
    /// 0, 1, 2, ... (identity slot -> matrix map for grouped launches)
    iota: DevBuf,
    ew: DevBuf,
    g: DevBuf,
    up: DevBuf,
    h: DevBuf,
    yk: DevBuf,
    sg: DevBuf,
    su: DevBuf,
    sh: DevBuf,
    ysh: DevBuf,
    y: DevBuf,
    head_y: DevBuf,
    pub(crate) logits: DevBuf,
    mtp_e: DevBuf,
    mtp_pe: DevBuf,
    mtp_h: DevBuf,
    mtp_ph: DevBuf,
    /// 8-bit activation scratch, one per stream (main + 3 side streams): a
    /// vector is quantised on the stream that consumes it, so branches running
    /// concurrently never share one
    pub(crate) q8: Vec<QScratch>,
    /// fused 8-bit copies: HcPre output `a`, normalised q_lora `qr`, routed
    /// expert hidden `h` (k rows per token), shared expert hidden `sh`
    pub(crate) fa: QFused,
    pub(crate) fqr: QFused,
    pub(crate) fh: QFused,
    pub(crate) fsh: QFused,
    /// Gram-matrix parts of the HC state written by hc_post ([n][d/256][10])
    pub(crate) gp: DevBuf,
    /// attention output of a decode step as Q8_0 (written by attn_combine)
    pub(crate) fo: QFused,
}

/// 8-bit copies that producer kernels write beside their f32 output (fused
/// quantisation): both formats, [rows][cols] codes and per-block scales.
pub(crate) struct QFused {
    pub(crate) q0: DevBuf,
    pub(crate) d0: DevBuf,
    pub(crate) qk: DevBuf,
    pub(crate) dk: DevBuf,
    pub(crate) cols: usize,
}

impl QFused {
    fn new(g: &Gpu, rows: usize, cols: usize) -> Result<QFused> {
        let n = (rows * cols).max(256);
        Ok(QFused { q0: g.alloc(n)?, d0: g.alloc(n / 32 * F + F)?, qk: g.alloc(n)?, dk: g.alloc(n / 256 * F + F)?, cols })
    }
    /// Kernel arguments (q0, d0, qk, dk) for a producer whose consumers
    /// multiply weights of the given types (null = not wanted / not possible).
    pub(crate) fn args(&self, on: bool, want0: bool, wantk: bool) -> (u64, u64, u64, u64) {
        let z = 0u64;
        let p0 = on && want0 && self.cols % 32 == 0;
        let pk = on && wantk && self.cols % 256 == 0;
        (if p0 { self.q0.ptr } else { z }, if p0 { self.d0.ptr } else { z }, if pk { self.qk.ptr } else { z }, if pk { self.dk.ptr } else { z })
    }
    /// The copy for weights of type `ty`, if `args(on, ..)` asked for it.
    pub(crate) fn get(&self, ty: GgmlType) -> Option<QAct> {
        if ty == GgmlType::Q8_0 {
            (self.cols % 32 == 0).then_some(QAct { q: self.q0.ptr, d: self.d0.ptr, qs: self.cols, ds: self.cols / 32 })
        } else {
            (self.cols % 256 == 0).then_some(QAct { q: self.qk.ptr, d: self.dk.ptr, qs: self.cols, ds: self.cols / 256 })
        }
    }
}

/// Quantised activations of one stream: codes (`cap` bytes) and scales (one
/// f32 per 32 codes, enough for Q8_0 and Q8_K).
pub(crate) struct QScratch {
    pub(crate) q: DevBuf,
    pub(crate) d: DevBuf,
    pub(crate) cap: usize,
}

/// Activations quantised for 8-bit products: codes [rows][qs] (i8), scales
/// [rows][ds] (f32), one scale per `blk` codes (32: Q8_0, 256: Q8_K).
#[derive(Clone, Copy, Debug)]
pub(crate) struct QAct {
    pub(crate) q: u64,
    pub(crate) d: u64,
    pub(crate) qs: usize,
    pub(crate) ds: usize,
}

pub struct GpuModel {
    pub gpu: Gpu,
    pub cfg: Config,
    pub ctx: usize,
    pub(crate) embed: GMat,
    pub(crate) output: GMat,
    pub(crate) output_norm: DevBuf,
    pub(crate) hc_head: GHc,
    pub blocks: Vec<GBlock>,
    pub mtp: Option<GMtp>,
    pub(crate) omega_plain: DevBuf,
    pub(crate) omega_yarn: DevBuf,
    pub(crate) s: Scratch,
    /// test-only ablation, mirrors `Model::ablate_kv_fp8`
    pub ablate_kv_fp8: bool,
    /// RoPE dims of compressed attention rows in f32 or bf16 (mirrors
    /// `Model::kv_rope`; set before allocating states, see state.rs)
    pub kv_rope: dsv4_engine::pack::RopeStore,
    /// capture decode steps as CUDA graphs (env DSV4_CUDA_GRAPHS=0 turns it off)
    pub use_graphs: bool,
    /// `Numerics::Q8`: quantised weights multiply 8-bit activations (mmvq.cu),
    /// as the CPU's 8-bit mode does; false = f32 activations (the reference)
    pub q8: bool,
    /// set while queueing a product that must not take the whole GPU with a
    /// persistent grid (a side branch needs SMs beside it)
    pub(crate) no_persist: std::cell::Cell<bool>,
}

/// Side streams whose kernels launch at high priority (see forward.rs: the
/// indexer queues on 3 and 4).
pub(crate) fn high_priority_streams() -> Vec<usize> {
    match std::env::var("DSV4_PRIO") {
        Ok(v) => v.chars().filter_map(|c| c.to_digit(10)).map(|d| d as usize).collect(),
        Err(_) => vec![3, 4],
    }
}

fn vec_up(gpu: &Gpu, v: &[f32]) -> Result<DevBuf> {
    gpu.upload(v)
}

fn hc_up(gpu: &Gpu, h: &HcParams) -> Result<GHc> {
    Ok(GHc { fn_: GMat::upload(gpu, &h.fn_, h.fn_.rows)?, scale: vec_up(gpu, &h.scale)?, base: vec_up(gpu, &h.base)? })
}

fn comp_up(gpu: &Gpu, c: &Compressor) -> Result<GComp> {
    Ok(GComp {
        ratio: c.ratio,
        coff: c.coff,
        d: c.d,
        ape: vec_up(gpu, &c.ape)?,
        wkv: GMat::upload(gpu, &c.wkv, c.wkv.rows)?,
        wgate: GMat::upload(gpu, &c.wgate, c.wgate.rows)?,
        norm: vec_up(gpu, &c.norm)?,
    })
}

fn block_up(gpu: &Gpu, b: &Block) -> Result<GBlock> {
    let at = &b.attn;
    let m = &b.moe;
    Ok(GBlock {
        layer: b.layer,
        hc_attn: hc_up(gpu, &b.hc_attn)?,
        attn_norm: vec_up(gpu, &b.attn_norm)?,
        q_a: GMat::upload(gpu, &at.q_a, at.q_a.rows)?,
        q_norm: vec_up(gpu, &at.q_norm)?,
        q_b: GMat::upload(gpu, &at.q_b, at.q_b.rows)?,
        kv: GMat::upload(gpu, &at.kv, at.kv.rows)?,
        kv_norm: vec_up(gpu, &at.kv_norm)?,
        sinks: vec_up(gpu, &at.sinks)?,
        o_a: GMat::upload(gpu, &at.o_a, at.o_a.rows)?,
        o_b: GMat::upload(gpu, &at.o_b, at.o_b.rows)?,
        comp: at.compressor.as_ref().map(|c| comp_up(gpu, c)).transpose()?,
        idx: at
            .indexer
            .as_ref()
            .map(|ix| -> Result<GIndexer> {
                Ok(GIndexer { q_b: GMat::upload(gpu, &ix.q_b, ix.q_b.rows)?, proj: GMat::upload(gpu, &ix.proj, ix.proj.rows)?, comp: comp_up(gpu, &ix.compressor)? })
            })
            .transpose()?,
        hc_ffn: hc_up(gpu, &b.hc_ffn)?,
        ffn_norm: vec_up(gpu, &b.ffn_norm)?,
        gate: GMat::upload(gpu, &m.gate.weight, m.gate.weight.rows)?,
        bias: m.gate.bias.as_ref().map(|v| vec_up(gpu, v)).transpose()?,
        tid2eid: m.gate.tid2eid.as_ref().map(|t| gpu.upload(&t.iter().map(|&e| e as i32).collect::<Vec<i32>>())).transpose()?,
        gate_exps: GMat::upload(gpu, &m.gate_exps.all, m.gate_exps.rows)?,
        up_exps: GMat::upload(gpu, &m.up_exps.all, m.up_exps.rows)?,
        down_exps: GMat::upload(gpu, &m.down_exps.all, m.down_exps.rows)?,
        shared: m
            .shared
            .as_ref()
            .map(|s| -> Result<(GMat, GMat, GMat)> {
                Ok((GMat::upload(gpu, &s.w1, s.w1.rows)?, GMat::upload(gpu, &s.w3, s.w3.rows)?, GMat::upload(gpu, &s.w2, s.w2.rows)?))
            })
            .transpose()?,
    })
}

const F: usize = 4; // bytes per f32
/// most key splits of a single-token attention step
const MAX_SPLIT: usize = 64;

impl GpuModel {
    /// Upload the model's weights and allocate state scratch for `ctx` tokens,
    /// processing at most `max_chunk` tokens per pass.
    pub fn new(gpu: Gpu, cfg: &Config, w: &Weights, ctx: usize, max_chunk: usize, progress: &mut dyn FnMut(usize, usize)) -> Result<GpuModel> {
        if cfg.hc > 4 || cfg.n_experts > 1024 || cfg.head_dim > 512 || cfg.head_dim % 128 != 0 || cfg.index_head_dim > 1024 || cfg.n_experts_used > 16 || (2 + cfg.hc) * cfg.hc > 96 {
            return Err(CudaError::Unsupported("model shape exceeds the CUDA kernels' limits".into()));
        }
        let total = w.blocks.len() + 2;
        progress(0, total);
        let embed = GMat::upload(&gpu, &w.embed, w.embed.rows)?;
        if !matches!(w.embed.ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) {
            return Err(CudaError::Unsupported("token embedding must be F32/F16/BF16".into()));
        }
        let output = GMat::upload(&gpu, &w.output, w.output.rows)?;
        progress(1, total);
        let mut blocks = Vec::with_capacity(w.blocks.len());
        for (i, b) in w.blocks.iter().enumerate() {
            blocks.push(block_up(&gpu, b)?);
            progress(2 + i, total);
        }
        let mtp = match &w.mtp {
            Some(m) => Some(GMtp {
                e_proj: GMat::upload(&gpu, &m.e_proj, m.e_proj.rows)?,
                h_proj: GMat::upload(&gpu, &m.h_proj, m.h_proj.rows)?,
                enorm: vec_up(&gpu, &m.enorm)?,
                hnorm: vec_up(&gpu, &m.hnorm)?,
                norm: vec_up(&gpu, &m.norm)?,
                hc_head: hc_up(&gpu, &m.hc_head)?,
                block: block_up(&gpu, &m.block)?,
            }),
            None => None,
        };
        progress(total, total);
        let rp = Rope::new(cfg.rope_dim, cfg.rope_theta, None);
        let ry = Rope::new(cfg.rope_dim, cfg.compress_rope_theta, Some(cfg.yarn()));
        let omega_plain = gpu.upload(&rp.omega)?;
        let omega_yarn = gpu.upload(&ry.omega)?;
        let s = Scratch::new(&gpu, cfg, ctx, max_chunk.max(1))?;
        // the indexer's side streams (3, 4) at high priority: its chain
        // runs beside q_b and ends the attention's wait (env DSV4_PRIO:
        // digits of other stream indices, "" none, for A/B runs)
        gpu.set_high_priority(&high_priority_streams());
        Ok(GpuModel {
            output_norm: vec_up(&gpu, &w.output_norm)?,
            hc_head: hc_up(&gpu, &w.hc_head)?,
            gpu,
            cfg: cfg.clone(),
            ctx,
            embed,
            output,
            blocks,
            mtp,
            omega_plain,
            omega_yarn,
            s,
            ablate_kv_fp8: false,
            kv_rope: Default::default(),
            use_graphs: std::env::var("DSV4_CUDA_GRAPHS").map(|v| v != "0").unwrap_or(true),
            q8: false,
            no_persist: false.into(),
        })
    }

    fn omega(&self, layer: usize) -> u64 {
        if self.cfg.compress_ratios[layer] != 0 {
            self.omega_yarn.ptr
        } else {
            self.omega_plain.ptr
        }
    }

}


impl Scratch {
    pub(crate) fn new(g: &Gpu, c: &Config, ctx: usize, n: usize) -> Result<Scratch> {
        let f = |count: usize| g.alloc(count.max(1) * F);
        let (d, m, h, hd) = (c.dim, c.hc, c.n_heads, c.head_dim);
        let k = c.n_experts_used;
        let ff = c.expert_ff;
        let maxw = 2 * hd.max(c.index_head_dim);
        let min_ratio = c.compress_ratios.iter().copied().filter(|&r| r > 0).min().unwrap_or(4);
        Ok(Scratch {
            n,
            tok: f(n)?,
            x: f(n * m * d)?,
            mixes: f(n * (2 + m) * m)?,
            hw: f(n * (m + m * m))?,
            a: f(n * d)?,
            qr: f(n * c.q_lora_rank)?,
            q: f(n * h * hd)?,
            kv: f(n * hd)?,
            ckv: f(n * maxw)?,
            csc: f(n * maxw)?,
            pooled: f((n / min_ratio + 2) * hd.max(c.index_head_dim))?,
            ickv: f(n * 2 * c.index_head_dim)?,
            icsc: f(n * 2 * c.index_head_dim)?,
            ipooled: f((n / min_ratio + 2) * c.index_head_dim)?,
            iq: f(n * c.index_heads * c.index_head_dim)?,
            iw: f(n * c.index_heads)?,
            vis: f(n)?,
            scores: f(n * (ctx / 4 + 1))?,
            sel: f(n * c.index_topk.max(1))?,
            cnt: f(n)?,
            o: f(n * h * hd)?,
            part: f(h * MAX_SPLIT * (hd + 2))?,
            u: f(n * c.o_groups * c.o_lora_rank)?,
            f: f(n * d)?,
            rlog: f(n * c.n_experts)?,
            eids: f(n * k)?,
            order: f(n * k)?,
            pos: f(n * k)?,
            tiles: f(4 * ((n * k).div_ceil(8) + c.n_experts))?,
            ag: f(n * k * d)?,
            iota: g.upload(&(0..1024i32).collect::<Vec<i32>>())?,
            ew: f(n * k)?,
            g: f(n * k * ff)?,
            up: f(n * k * ff)?,
            h: f(n * k * ff)?,
            yk: f(n * k * d)?,
            sg: f(n * ff)?,
            su: f(n * ff)?,
            sh: f(n * ff)?,
            ysh: f(n * d)?,
            y: f(n * d)?,
            head_y: f(d)?,
            logits: f(c.vocab)?,
            mtp_e: f(d)?,
            mtp_pe: f(d)?,
            mtp_h: f(m * d)?,
            mtp_ph: f(m * d)?,
            q8: {
                // largest rows x cols any quantised product takes in one call:
                // expert inputs (k per token, grouped prefill gathers k*n rows),
                // attention output, HC-stream inputs (MTP h_proj)
                let per_tok = [k * d, k * ff, h * hd, c.o_groups * c.o_lora_rank, m * d, c.q_lora_rank, d].into_iter().max().unwrap_or(d);
                let cap = (n * per_tok).next_multiple_of(256);
                (0..5) // one per stream: main + 4 side streams
                    .map(|_| -> Result<QScratch> { Ok(QScratch { q: g.alloc(cap)?, d: g.alloc(cap / 32 * F)?, cap }) })
                    .collect::<Result<Vec<_>>>()?
            },
            fa: QFused::new(g, n, d)?,
            fqr: QFused::new(g, n, c.q_lora_rank)?,
            fh: QFused::new(g, n * k, ff)?,
            fsh: QFused::new(g, n, ff)?,
            gp: f(n * d.div_ceil(256) * 10)?,
            fo: QFused::new(g, 1, h * hd)?,
        })
    }
}
