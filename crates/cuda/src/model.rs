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
    /// capture decode steps as CUDA graphs (env DSV4_CUDA_GRAPHS=0 turns it off)
    pub use_graphs: bool,
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
const MAX_SPLIT: usize = 16;

impl GpuModel {
    /// Upload the model's weights and allocate state scratch for `ctx` tokens,
    /// processing at most `max_chunk` tokens per pass.
    pub fn new(gpu: Gpu, cfg: &Config, w: &Weights, ctx: usize, max_chunk: usize, progress: &mut dyn FnMut(usize, usize)) -> Result<GpuModel> {
        if cfg.hc > 8 || cfg.n_experts > 1024 || cfg.head_dim > 512 || cfg.head_dim % 128 != 0 || cfg.index_head_dim > 1024 || cfg.n_experts_used > 16 || (2 + cfg.hc) * cfg.hc > 96 {
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
            use_graphs: std::env::var("DSV4_CUDA_GRAPHS").map(|v| v != "0").unwrap_or(true),
        })
    }

    pub fn new_state(&self) -> Result<GState> {
        let layers = self.blocks.iter().map(|b| self.layer_state(b)).collect::<Result<Vec<_>>>()?;
        Ok(GState { graph: None, pos: 0, pos_dev: self.gpu.alloc_zeroed(4)?, layers })
    }

    pub fn new_mtp_state(&self) -> Result<Option<GState>> {
        match &self.mtp {
            Some(m) => Ok(Some(GState { graph: None, pos: 0, pos_dev: self.gpu.alloc_zeroed(4)?, layers: vec![self.layer_state(&m.block)?] })),
            None => Ok(None),
        }
    }

    /// Back to position 0 without reallocating (captured graphs stay valid).
    pub fn reset_state(&self, st: &mut GState) -> Result<()> {
        let g = &self.gpu;
        st.pos = 0;
        g.memset(st.pos_dev.ptr, 0, 4)?;
        for l in &st.layers {
            g.memset(l.ring.ptr, 0, l.ring.bytes)?;
            for b in [&l.rows, &l.comp_kv, &l.idx_rows, &l.idx_kv].into_iter().flatten() {
                g.memset(b.ptr, 0, b.bytes)?;
            }
            for b in [&l.comp_sc, &l.idx_sc].into_iter().flatten() {
                let n = (b.bytes / F) as i32;
                launch!(g, "fill_f32", ((n as u32).div_ceil(256).min(4096), 1, 1), (256, 1, 1), 0; b.ptr, n, f32::NEG_INFINITY)?;
            }
        }
        g.sync()
    }

    /// Bytes of device memory held by a state.
    pub fn state_bytes(&self, st: &GState) -> usize {
        st.layers
            .iter()
            .map(|l| {
                l.ring.bytes
                    + [&l.rows, &l.comp_kv, &l.comp_sc, &l.idx_rows, &l.idx_kv, &l.idx_sc].iter().map(|b| b.as_ref().map_or(0, |b| b.bytes)).sum::<usize>()
            })
            .sum()
    }

    /// The state as the engine's portable host `State` (exactly the CPU layout).
    pub fn export_state(&self, st: &GState, ratios: &[usize]) -> Result<dsv4_engine::State> {
        let g = &self.gpu;
        let mut layers = Vec::with_capacity(st.layers.len());
        for (l, ls) in st.layers.iter().enumerate() {
            let r = ratios[l];
            let rd = |b: &Option<DevBuf>, n: usize| -> Result<Vec<f32>> {
                match b {
                    Some(b) => g.read_f32(b.ptr, n),
                    None => Ok(Vec::new()),
                }
            };
            let comp = |kv: &Option<DevBuf>, sc: &Option<DevBuf>| -> Result<Option<dsv4_engine::model::CompState>> {
                match (kv, sc) {
                    (Some(k), Some(s)) => Ok(Some(dsv4_engine::model::CompState { kv: g.read_f32(k.ptr, k.bytes / F)?, score: g.read_f32(s.ptr, s.bytes / F)? })),
                    _ => Ok(None),
                }
            };
            let n_rows = if r != 0 { st.pos / r } else { 0 };
            // the host state holds rows packed (lossless); pack the f32 device rows
            let rows = rd(&ls.rows, n_rows * self.cfg.head_dim)?;
            let idx_rows = if ls.idx_rows.is_some() { rd(&ls.idx_rows, n_rows * self.cfg.index_head_dim)? } else { Vec::new() };
            layers.push(dsv4_engine::model::LayerState::from_f32_rows(
                &self.cfg,
                g.read_f32(ls.ring.ptr, ls.ring.bytes / F)?,
                &rows,
                comp(&ls.comp_kv, &ls.comp_sc)?,
                &idx_rows,
                comp(&ls.idx_kv, &ls.idx_sc)?,
            )?);
        }
        Ok(dsv4_engine::State { pos: st.pos, layers })
    }

    /// Overwrite a state with a host `State` of the same shape (buffers, and so
    /// captured graphs, stay valid).
    pub fn import_state(&self, st: &mut GState, src: &dsv4_engine::State) -> Result<()> {
        let g = &self.gpu;
        let bad = |m: String| CudaError::Engine(dsv4_engine::EngineError::Input(format!("state does not fit this model: {m}")));
        if src.layers.len() != st.layers.len() {
            return Err(bad(format!("{} layers, expected {}", src.layers.len(), st.layers.len())));
        }
        if src.pos > self.ctx {
            return Err(bad(format!("position {} past the context {}", src.pos, self.ctx)));
        }
        let put = |b: &Option<DevBuf>, v: &[f32], what: &str| -> Result<()> {
            match b {
                Some(b) if v.len() * F <= b.bytes => g.write_f32(b, 0, v),
                None if v.is_empty() => Ok(()),
                _ => Err(bad(format!("{what}: {} values do not fit", v.len()))),
            }
        };
        for (l, (ls, s)) in st.layers.iter().zip(&src.layers).enumerate() {
            if s.ring.len() * F != ls.ring.bytes {
                return Err(bad(format!("layer {l} window")));
            }
            g.write_f32(&ls.ring, 0, &s.ring)?;
            put(&ls.rows, &s.rows_f32(), "rows")?;
            put(&ls.idx_rows, &s.idx_rows_f32(), "indexer rows")?;
            match (&s.comp, &ls.comp_kv, &ls.comp_sc) {
                (Some(c), Some(k), Some(sc)) if c.kv.len() * F == k.bytes && c.score.len() * F == sc.bytes => {
                    g.write_f32(k, 0, &c.kv)?;
                    g.write_f32(sc, 0, &c.score)?;
                }
                (None, None, None) => {}
                _ => return Err(bad(format!("layer {l} compressor"))),
            }
            match (&s.idx_comp, &ls.idx_kv, &ls.idx_sc) {
                (Some(c), Some(k), Some(sc)) if c.kv.len() * F == k.bytes && c.score.len() * F == sc.bytes => {
                    g.write_f32(k, 0, &c.kv)?;
                    g.write_f32(sc, 0, &c.score)?;
                }
                (None, None, None) => {}
                _ => return Err(bad(format!("layer {l} indexer compressor"))),
            }
        }
        st.pos = src.pos;
        g.write_i32(&st.pos_dev, 0, &[src.pos as i32])?;
        g.sync()
    }

    fn layer_state(&self, b: &GBlock) -> Result<GLayerState> {
        let c = &self.cfg;
        let g = &self.gpu;
        let comp_state = |cp: &GComp| -> Result<(DevBuf, DevBuf)> {
            let slots = if cp.coff == 2 { 2 * cp.ratio } else { cp.ratio };
            let n = slots * cp.coff * cp.d;
            let kv = g.alloc_zeroed(n * F)?;
            let sc = g.upload(&vec![f32::NEG_INFINITY; n])?;
            Ok((kv, sc))
        };
        let (rows, comp_kv, comp_sc) = match &b.comp {
            Some(cp) => {
                let (k, s) = comp_state(cp)?;
                (Some(g.alloc_zeroed((self.ctx / cp.ratio + 1) * cp.d * F)?), Some(k), Some(s))
            }
            None => (None, None, None),
        };
        let (idx_rows, idx_kv, idx_sc) = match &b.idx {
            Some(ix) => {
                let (k, s) = comp_state(&ix.comp)?;
                (Some(g.alloc_zeroed((self.ctx / ix.comp.ratio + 1) * ix.comp.d * F)?), Some(k), Some(s))
            }
            None => (None, None, None),
        };
        Ok(GLayerState { ring: g.alloc_zeroed(c.window * c.head_dim * F)?, rows, comp_kv, comp_sc, idx_rows, idx_kv, idx_sc })
    }

    fn omega(&self, layer: usize) -> u64 {
        if self.cfg.compress_ratios[layer] != 0 {
            self.omega_yarn.ptr
        } else {
            self.omega_plain.ptr
        }
    }

    /// y[t][r] = W x[t] for n tokens (x row stride xs, y row stride ys, in floats).
    pub fn mv(&self, w: MatRef, x: u64, xs: usize, y: u64, ys: usize, n: usize) -> Result<()> {
        let suffix = mv_suffix(w.ty).ok_or_else(|| CudaError::Unsupported(format!("type {}", w.ty.name())))?;
        let mut done = 0;
        while done < n {
            let left = n - done;
            let nt = if left >= 8 { 8 } else if left >= 4 { 4 } else if left >= 2 { 2 } else { 1 };
            // few long rows (HC mixes, small projections): a whole block per row
            // splits the columns, otherwise one warp per row
            let split = w.rows < 2048;
            let name = format!("mv{}_{suffix}_{nt}", if split { "k" } else { "" });
            let (grid, block) = if split { ((w.rows as u32, 1, 1), (256, 1, 1)) } else { ((w.rows.div_ceil(4) as u32, 1, 1), (128, 1, 1)) };
            let (mut stage, mut shmem) = stage_for(&w, if split { 1 } else { 4 });
            if !split && nt == 1 && stage == 0 && x_stage_ok(w.cols, x) {
                (stage, shmem) = (2, (w.cols * F) as u32);
            }
            launch!(self.gpu, &name, grid, block, shmem;
                w.ptr, w.row_bytes as u64, w.rows as i32, w.cols as i32,
                x + (done * xs * F) as u64, xs as i32, y + (done * ys * F) as u64, ys as i32, nt.min(left) as i32,
                0u64, 0u64, 1i32, stage)?;
            done += nt.min(left);
        }
        Ok(())
    }

    /// Expert matvec over `slots` (token, expert) pairs: y[s] = W[eids[s]] x[s / x_group].
    pub(crate) fn mv_experts(&self, w: MatRef, x: u64, xs: usize, x_group: usize, y: u64, ys: usize, slots: usize, eids: u64) -> Result<()> {
        let suffix = mv_suffix(w.ty).ok_or_else(|| CudaError::Unsupported(format!("type {}", w.ty.name())))?;
        let name = format!("mv_{suffix}_1");
        let grid = (w.rows.div_ceil(4) as u32, slots as u32, 1);
        let (mut stage, mut shmem) = stage_for(&w, 4);
        if stage == 0 && x_stage_ok(w.cols, x) && (xs * F) % 16 == 0 {
            (stage, shmem) = (2, (w.cols * F) as u32);
        }
        launch!(self.gpu, &name, grid, (128, 1, 1), shmem;
            w.ptr, w.row_bytes as u64, w.rows as i32, w.cols as i32,
            x, xs as i32, y, ys as i32, 1i32, eids, w.expert_bytes(), x_group as i32, stage)
    }

    fn rmsnorm_rows(&self, x: u64, w: u64, d: usize, rows: usize) -> Result<()> {
        launch!(self.gpu, "rmsnorm_rows", (rows as u32, 1, 1), (512, 1, 1), 0; x, w, d as i32, self.cfg.rms_eps)
    }

    /// HcPre for n tokens: a = RMSNorm(collapse(x)), hw = post/comb.
    fn hc_pre(&self, hc: &GHc, norm: u64, x: u64, n: usize) -> Result<()> {
        let c = self.cfg.clone();
        let md = c.hc * c.dim;
        let nmix = (2 + c.hc) * c.hc;
        let (mixes, a, hw) = (self.s.mixes.ptr, self.s.a.ptr, self.s.hw.ptr);
        self.mv(hc.fn_.r(), x, md, mixes, nmix, n)?;
        launch!(self.gpu, "hc_pre", (n as u32, 1, 1), (1024, 1, 1), 0;
            x, mixes, hc.scale.ptr, hc.base.ptr, norm, c.dim as i32, c.hc as i32, c.sinkhorn_iters as i32, c.hc_eps, c.rms_eps, a, hw)
    }

    fn hc_post(&self, x: u64, f: u64, n: usize) -> Result<()> {
        let c = &self.cfg;
        launch!(self.gpu, "hc_post", (n as u32, 1, 1), (1024, 1, 1), 0; x, f, self.s.hw.ptr, c.dim as i32, c.hc as i32)
    }

    /// Logits of one token's HC state at x (main head or the MTP's).
    fn head(&self, hc: &GHc, norm: u64, x: u64) -> Result<Vec<f32>> {
        self.enqueue_head(hc, norm, x)?;
        self.gpu.read_f32(self.s.logits.ptr, self.cfg.vocab)
    }

    /// Queue the head computation; logits land in the scratch `logits` buffer.
    pub(crate) fn enqueue_head(&self, hc: &GHc, norm: u64, x: u64) -> Result<()> {
        let c = self.cfg.clone();
        let md = c.hc * c.dim;
        let (mixes, hy, logits) = (self.s.mixes.ptr, self.s.head_y.ptr, self.s.logits.ptr);
        self.mv(hc.fn_.r(), x, md, mixes, c.hc, 1)?;
        launch!(self.gpu, "hc_head", (1, 1, 1), (1024, 1, 1), 0;
            x, mixes, hc.scale.ptr, hc.base.ptr, norm, c.dim as i32, c.hc as i32, c.hc_eps, c.rms_eps, hy)?;
        self.mv(self.output.r(), hy, c.dim, logits, c.vocab, 1)
    }

    /// Main model: consume `tokens` at `st.pos`.
    pub fn eval(&self, st: &mut GState, tokens: &[u32], want: Want) -> Result<EvalOutput> {
        let c = self.cfg.clone();
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= c.vocab) {
            return Err(dsv4_engine::EngineError::Input(format!("token id {t} out of range (vocab {})", c.vocab)).into());
        }
        if st.pos + tokens.len() > self.ctx {
            return Err(dsv4_engine::EngineError::ContextFull { pos: st.pos + tokens.len(), ctx: self.ctx }.into());
        }
        let mut out = EvalOutput::default();
        let md = c.hc * c.dim;
        let mut done = 0;
        while done < tokens.len() {
            let n = self.s.n.min(tokens.len() - done);
            let toks: Vec<i32> = tokens[done..done + n].iter().map(|&t| t as i32).collect();
            self.gpu.write_i32(&self.s.tok, 0, &toks)?;
            let ety = match self.embed.ty {
                GgmlType::F32 => 0i32,
                GgmlType::F16 => 1,
                _ => 2,
            };
            launch!(self.gpu, "embed_rows", (n as u32, 1, 1), (256, 1, 1), 0;
                self.embed.buf.ptr, ety, self.s.tok.ptr, c.dim as i32, c.hc as i32, self.s.x.ptr)?;
            if n == 1 && self.use_graphs {
                // decode step: replay (or capture) the whole step as one CUDA graph
                self.decode_step_graph(st)?;
            } else {
                self.enqueue_blocks(st, n)?;
            }
            st.pos += n;
            if want.hidden {
                out.hidden.extend(self.gpu.read_f32(self.s.x.ptr, n * md)?);
            }
            let norm = self.output_norm.ptr;
            if want.all_logits {
                for t in 0..n {
                    out.logits.extend(self.head(&self.hc_head, norm, self.s.x.f32_at(t * md))?);
                }
            } else if done + n == tokens.len() {
                out.logits = self.head(&self.hc_head, norm, self.s.x.f32_at((n - 1) * md))?;
            }
            done += n;
        }
        Ok(out)
    }

    fn enqueue_blocks(&self, st: &mut GState, n: usize) -> Result<()> {
        let pp = st.pos_dev.ptr;
        for (l, b) in self.blocks.iter().enumerate() {
            self.block_forward(b, &mut st.layers[l], n, st.pos, pp, self.s.x.ptr)?;
        }
        launch!(self.gpu, "advance_pos", (1, 1, 1), (32, 1, 1), 0; pp, n as i32)
    }

    /// One token through all layers as a CUDA graph, captured on first use for
    /// this state (its buffers are fixed for its lifetime) and replayed after.
    fn decode_step_graph(&self, st: &mut GState) -> Result<()> {
        if st.graph.is_none() {
            self.gpu.begin_capture()?;
            let r = self.enqueue_blocks(st, 1);
            let g = self.gpu.end_capture();
            r?;
            st.graph = Some(g?);
        }
        match &st.graph {
            Some(g) => self.gpu.launch_graph(g),
            None => Err(CudaError::Driver("decode graph missing".into())),
        }
    }

    /// MTP block on hidden state `h` (`[hc][dim]`) and `token` at `mst.pos`.
    pub fn mtp_eval(&self, mst: &mut GState, h: &[f32], token: u32) -> Result<Vec<f32>> {
        let c = self.cfg.clone();
        let mtp = self.mtp.as_ref().ok_or_else(|| CudaError::Engine(dsv4_engine::EngineError::Input("model has no MTP block".into())))?;
        {
            if token as usize >= c.vocab || h.len() != c.hc * c.dim {
                return Err(dsv4_engine::EngineError::Input("bad MTP input".into()).into());
            }
            let (d, m) = (c.dim, c.hc);
            self.gpu.write_i32(&self.s.tok, 0, &[token as i32])?;
            let ety = match self.embed.ty {
                GgmlType::F32 => 0i32,
                GgmlType::F16 => 1,
                _ => 2,
            };
            // e = RMSNorm(embed[t], enorm); ph[j] = h_proj RMSNorm(h[j], hnorm)
            launch!(self.gpu, "embed_rows", (1, 1, 1), (256, 1, 1), 0; self.embed.buf.ptr, ety, self.s.tok.ptr, d as i32, 1i32, self.s.mtp_e.ptr)?;
            self.rmsnorm_rows(self.s.mtp_e.ptr, mtp.enorm.ptr, d, 1)?;
            self.gpu.write_f32(&self.s.mtp_h, 0, h)?;
            self.rmsnorm_rows(self.s.mtp_h.ptr, mtp.hnorm.ptr, d, m)?;
            let (e, pe, hh, ph, x) = (self.s.mtp_e.ptr, self.s.mtp_pe.ptr, self.s.mtp_h.ptr, self.s.mtp_ph.ptr, self.s.x.ptr);
            self.mv(mtp.e_proj.r(), e, d, pe, d, 1)?;
            self.mv(mtp.h_proj.r(), hh, d, ph, d, m)?;
            launch!(self.gpu, "mtp_combine", (((m * d) as u32).div_ceil(256), 1, 1), (256, 1, 1), 0; pe, ph, d as i32, m as i32, x)?;
            let pp = mst.pos_dev.ptr;
            self.block_forward(&mtp.block, &mut mst.layers[0], 1, mst.pos, pp, x)?;
            launch!(self.gpu, "advance_pos", (1, 1, 1), (32, 1, 1), 0; pp, 1i32)?;
            mst.pos += 1;
            self.head(&mtp.hc_head, mtp.norm.ptr, x)
        }
    }

    fn block_forward(&self, b: &GBlock, st: &mut GLayerState, n: usize, p0: usize, pp: u64, x: u64) -> Result<()> {
        let d = self.cfg.dim;
        self.hc_pre(&b.hc_attn, b.attn_norm.ptr, x, n)?;
        self.attention(b, st, n, p0, pp)?;
        let f = self.s.f.ptr;
        self.hc_post(x, f, n)?;
        self.hc_pre(&b.hc_ffn, b.ffn_norm.ptr, x, n)?;
        self.moe(b, n)?;
        let y = self.s.y.ptr;
        let _ = d;
        self.hc_post(x, y, n)
    }

    fn compress(&self, cp: &GComp, kvs: u64, scs: u64, rows: u64, n: usize, pp: u64, is_indexer: bool, omega: u64) -> Result<()> {
        let w = cp.coff * cp.d;
        // the two compressors run concurrently (side streams): separate scratch
        let (ckv, csc, pooled) = if is_indexer { (self.s.ickv.ptr, self.s.icsc.ptr, self.s.ipooled.ptr) } else { (self.s.ckv.ptr, self.s.csc.ptr, self.s.pooled.ptr) };
        let a = self.s.a.ptr;
        self.mv(cp.wkv.r(), a, self.cfg.dim, ckv, w, n)?;
        self.mv(cp.wgate.r(), a, self.cfg.dim, csc, w, n)?;
        let r = cp.ratio;
        // upper bound of rows a chunk of n tokens can finish, whatever its position
        let max_emit = n / r + 1;
        launch!(self.gpu, "comp_update", ((cp.d as u32).div_ceil(128), 1, 1), (128, 1, 1), 0;
            ckv, csc, cp.ape.ptr, kvs, scs, n as i32, pp, r as i32, cp.coff as i32, cp.d as i32, pooled)?;
        launch!(self.gpu, "comp_finish", (max_emit as u32, 1, 1), (128, 1, 1), 0;
            pooled, rows, pp, n as i32, cp.d as i32, self.cfg.rope_dim as i32, omega, cp.norm.ptr, self.cfg.rms_eps, r as i32, is_indexer as i32)
    }

    fn attention(&self, b: &GBlock, st: &mut GLayerState, n: usize, p0: usize, pp: u64) -> Result<()> {
        let c = self.cfg.clone();
        let (h, hd, rd) = (c.n_heads, c.head_dim, c.rope_dim);
        let omega = self.omega(b.layer);
        let s = &self.s;
        let (a, qr, q, kv, o, u, f) = (s.a.ptr, s.qr.ptr, s.q.ptr, s.kv.ptr, s.o.ptr, s.u.ptr, s.f.ptr);
        let ratio = c.compress_ratios[b.layer];
        if ratio != 0 {
            // visible compressed rows per token (read by the indexer and attention)
            launch!(self.gpu, "set_vis", ((n as u32).div_ceil(128), 1, 1), (128, 1, 1), 0; pp, n as i32, ratio as i32, self.s.vis.ptr)?;
        }
        // Independent branches, parallel in the captured graph: the kv row and
        // the two compressors (they only need `a`) beside the q path.
        let (_, j_kv) = self.gpu.on_side(1, || -> Result<()> {
            self.mv(b.kv.r(), a, c.dim, kv, hd, n)?;
            launch!(self.gpu, "row_finish", (n as u32, 1, 1), (128, 1, 1), 0;
                kv, hd as i32, 1i32, rd as i32, omega, pp, b.kv_norm.ptr, c.rms_eps, 1i32, self.ablate_kv_fp8 as i32)
        })?;
        let (_, j_comp) = self.gpu.on_side(2, || -> Result<()> {
            if let (Some(cp), Some(kvs), Some(scs), Some(rows)) = (&b.comp, &st.comp_kv, &st.comp_sc, &st.rows) {
                self.compress(cp, kvs.ptr, scs.ptr, rows.ptr, n, pp, false, omega)?;
            }
            Ok(())
        })?;
        let (_, j_icomp) = self.gpu.on_side(3, || -> Result<()> {
            if let (Some(ix), Some(kvs), Some(scs), Some(irows)) = (&b.idx, &st.idx_kv, &st.idx_sc, &st.idx_rows) {
                self.compress(&ix.comp, kvs.ptr, scs.ptr, irows.ptr, n, pp, true, omega)?;
            }
            Ok(())
        })?;
        self.mv(b.q_a.r(), a, c.dim, qr, c.q_lora_rank, n)?;
        self.rmsnorm_rows(qr, b.q_norm.ptr, c.q_lora_rank, n)?;
        self.mv(b.q_b.r(), qr, c.q_lora_rank, q, h * hd, n)?;
        launch!(self.gpu, "row_finish", ((n * h) as u32, 1, 1), (128, 1, 1), 0;
            q, hd as i32, h as i32, rd as i32, omega, pp, 0u64, c.rms_eps, 0i32, 0i32)?;
        let mut use_sel = false;
        if let (Some(ix), Some(irows)) = (&b.idx, &st.idx_rows) {
            let (ih, id) = (c.index_heads, c.index_head_dim);
            let (iq, iw, vis, scores, sel, cnt) = (self.s.iq.ptr, self.s.iw.ptr, self.s.vis.ptr, self.s.scores.ptr, self.s.sel.ptr, self.s.cnt.ptr);
            self.mv(ix.q_b.r(), qr, c.q_lora_rank, iq, ih * id, n)?;
            launch!(self.gpu, "row_finish", ((n * ih) as u32, 1, 1), (128, 1, 1), 0;
                iq, id as i32, ih as i32, rd as i32, omega, pp, 0u64, c.rms_eps, 2i32, 0i32)?;
            self.mv(ix.proj.r(), a, c.dim, iw, ih, n)?;
            let wscale = (id as f32).powf(-0.5) * (ih as f32).powf(-0.5);
            let ld = self.ctx / ratio + 1;
            self.gpu.join(j_icomp)?;
            // fixed grid (grid-stride inside) so the launch is position independent
            let blocks_x = (ld.div_ceil(8) as u32).min(264);
            launch!(self.gpu, "index_scores", (blocks_x, n as u32, 1), (256, 1, 1), ((ih * (id + 1) + 8 * id) * F) as u32;
                iq, iw, irows.ptr, vis, ih as i32, id as i32, wscale, scores, ld as i32, c.index_topk as i32)?;
            launch!(self.gpu, "topk_select", (n as u32, 1, 1), (1024, 1, 1), 0;
                scores, ld as i32, vis, c.index_topk as i32, sel, cnt)?;
            use_sel = true;
        } else {
            self.gpu.join(j_icomp)?;
        }
        self.gpu.join(j_kv)?;
        self.gpu.join(j_comp)?;
        // attention over window + compressed rows
        // key-count bound from the capacity, not the position (graph replay)
        let _ = p0;
        let max_keys = c.window + if ratio == 0 { 0 } else if use_sel { c.index_topk } else { self.ctx / ratio + 1 };
        let rows_ptr = st.rows.as_ref().map(|r| r.ptr).unwrap_or(0);
        let (sel_ptr, sel_ld) = if use_sel { (self.s.sel.ptr, c.index_topk) } else { (0u64, 0) };
        let scale = (hd as f32).powf(-0.5);
        // single-token steps split the keys over several blocks (flash-decoding)
        let nsplit = if n == 1 { max_keys.div_ceil(64).clamp(1, MAX_SPLIT) } else { 1 };
        let per = max_keys.div_ceil(nsplit);
        const HB: usize = 4;
        let part = self.s.part.ptr;
        launch!(self.gpu, "sink_attn", (n as u32, h.div_ceil(HB) as u32, nsplit as u32), (256, 1, 1), (HB * per * F) as u32;
            q, kv, st.ring.ptr, rows_ptr, sel_ptr, self.s.cnt.ptr, self.s.vis.ptr, sel_ld as i32, b.sinks.ptr,
            h as i32, hd as i32, rd as i32, omega, pp, c.window as i32, scale, o, part, per as i32)?;
        if nsplit > 1 {
            launch!(self.gpu, "attn_combine", (1, h as u32, 1), (128, 1, 1), 0;
                part, nsplit as i32, b.sinks.ptr, h as i32, hd as i32, rd as i32, omega, pp, o)?;
        }
        let stored = n.min(c.window);
        launch!(self.gpu, "ring_store", (stored as u32, 1, 1), (128, 1, 1), 0; kv, st.ring.ptr, n as i32, pp, c.window as i32, hd as i32)?;
        // grouped low-rank output projection
        let (g, ro) = (c.o_groups, c.o_lora_rank);
        let gw = h * hd / g;
        if n == 1 {
            // all groups in one launch: group gi is "expert" gi of a stack of
            // ro-row matrices, input slice gi*gw, output slice gi*ro
            self.mv_experts(b.o_a.r().rows(0, ro), o, gw, 1, u, ro, g, self.s.iota.ptr)?;
        } else {
            for gi in 0..g {
                self.mv(b.o_a.r().rows(gi * ro, ro), o + (gi * gw * F) as u64, h * hd, u + (gi * ro * F) as u64, g * ro, n)?;
            }
        }
        self.mv(b.o_b.r(), u, g * ro, f, c.dim, n)
    }

    fn moe(&self, b: &GBlock, n: usize) -> Result<()> {
        let c = self.cfg.clone();
        let (d, k, ne, ff) = (c.dim, c.n_experts_used, c.n_experts, c.expert_ff);
        let s = &self.s;
        let (a, rlog, eids, ew, g, up, hbuf, yk, y) = (s.a.ptr, s.rlog.ptr, s.eids.ptr, s.ew.ptr, s.g.ptr, s.up.ptr, s.h.ptr, s.yk.ptr, s.y.ptr);
        let limit = c.swiglu_limits[b.layer];
        // the shared expert runs beside the routed ones (parallel graph branch)
        let j_shared = match &b.shared {
            Some((w1, w3, w2)) => {
                let (_, j) = self.gpu.on_side(1, || -> Result<()> {
                    let (sg, su, sh, ys) = (self.s.sg.ptr, self.s.su.ptr, self.s.sh.ptr, self.s.ysh.ptr);
                    self.mv(w1.r(), a, d, sg, ff, n)?;
                    self.mv(w3.r(), a, d, su, ff, n)?;
                    launch!(self.gpu, "swiglu", (((n * ff) as u32).div_ceil(256).min(65535), 1, 1), (256, 1, 1), 0;
                        sg, su, 0u64, ff as i32, n as i32, limit, sh)?;
                    self.mv(w2.r(), sh, ff, ys, d, n)
                })?;
                Some(j)
            }
            None => None,
        };
        self.mv(b.gate.r(), a, d, rlog, ne, n)?;
        let bias = b.bias.as_ref().map(|x| x.ptr).unwrap_or(0);
        let tid = b.tid2eid.as_ref().map(|x| x.ptr).unwrap_or(0);
        launch!(self.gpu, "router", (n as u32, 1, 1), (256, 1, 1), 0;
            rlog, ne as i32, k as i32, bias, tid, self.s.tok.ptr, c.weights_norm as i32, c.route_scale, eids, ew)?;
        let slots = n * k;
        self.mv_experts(b.gate_exps.r(), a, d, k, g, ff, slots, eids)?;
        self.mv_experts(b.up_exps.r(), a, d, k, up, ff, slots, eids)?;
        launch!(self.gpu, "swiglu", (((slots * ff) as u32).div_ceil(256).min(65535), 1, 1), (256, 1, 1), 0;
            g, up, ew, ff as i32, slots as i32, limit, hbuf)?;
        self.mv_experts(b.down_exps.r(), hbuf, ff, 1, yk, d, slots, eids)?;
        let mut ysh = 0u64;
        if let Some(j) = j_shared {
            self.gpu.join(j)?;
            ysh = self.s.ysh.ptr;
        }
        launch!(self.gpu, "moe_reduce", (((n * d) as u32).div_ceil(256).min(65535), 1, 1), (256, 1, 1), 0;
            yk, ysh, k as i32, d as i32, n as i32, y)
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
        })
    }
}
