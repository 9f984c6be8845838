//! Binds GGUF tensor names to typed fields, once, with type and shape checks.
//!
//! This is the only file that spells tensor names. Matrices stay in the mmap'd
//! file (a `Mat` is a typed byte range into it); small vectors (norms, biases,
//! scales, sinks, compressor position biases) are decoded to f32 at load.
//! Shapes follow the GGUF convention: a PyTorch `[out, in]` weight has
//! `ne = [in, out]`, experts are `ne = [in, out, n_expert]`.

use std::sync::Arc;

use dsv4_gguf::{quant, GgmlType, GgufFile};

use crate::config::Config;
use crate::error::{EngineError, Result};

/// Types a matrix may have: everything the dot-product kernels implement.
const MATRIX_TYPES: &[GgmlType] = &[
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q8_0,
    GgmlType::Q2_K,
    GgmlType::Q4_K,
    GgmlType::IQ2_XXS,
];

/// A weight matrix `[rows = out][cols = in]`, rows contiguous, in the file.
#[derive(Clone)]
pub struct Mat {
    pub name: String,
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    file: Arc<GgufFile>,
    start: usize,
    len: usize,
}

impl Mat {
    pub fn data(&self) -> &[u8] {
        &self.file.file_bytes()[self.start..self.start + self.len]
    }
    pub fn row_bytes(&self) -> usize {
        self.len / self.rows
    }
    /// Rows `r0 .. r0 + n` as their own matrix (grouped output projection, experts).
    pub fn rows(&self, r0: usize, n: usize) -> Mat {
        assert!(r0 + n <= self.rows, "row slice out of range");
        let rb = self.row_bytes();
        Mat {
            name: self.name.clone(),
            ty: self.ty,
            rows: n,
            cols: self.cols,
            file: self.file.clone(),
            start: self.start + r0 * rb,
            len: n * rb,
        }
    }
    /// Full dequantised copy (tests, small tensors).
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        let mut out = vec![0.0f32; self.rows * self.cols];
        quant::dequantize(self.ty, self.data(), &mut out)?;
        Ok(out)
    }
}

/// A stack of expert matrices `[n][rows][cols]`.
#[derive(Clone)]
pub struct Experts {
    pub all: Mat,
    pub n: usize,
    /// rows of one expert
    pub rows: usize,
}

impl Experts {
    pub fn expert(&self, e: usize) -> Mat {
        self.all.rows(e * self.rows, self.rows)
    }
}

/// Hyper-connection mixing parameters (attention/ffn: (2+M)·M mixes; head: M).
pub struct HcParams {
    pub fn_: Mat,
    pub scale: Vec<f32>,
    pub base: Vec<f32>,
}

pub struct Compressor {
    pub ratio: usize,
    /// lanes: 2 with overlap (ratio 4), else 1
    pub coff: usize,
    /// output row width d (head dim, or indexer head dim)
    pub d: usize,
    /// `[ratio][coff·d]` gate bias per in-window position
    pub ape: Vec<f32>,
    pub wkv: Mat,
    pub wgate: Mat,
    pub norm: Vec<f32>,
}

pub struct Indexer {
    pub q_b: Mat,
    pub proj: Mat,
    pub compressor: Compressor,
}

pub struct Attention {
    pub q_a: Mat,
    pub q_norm: Vec<f32>,
    pub q_b: Mat,
    pub kv: Mat,
    pub kv_norm: Vec<f32>,
    pub sinks: Vec<f32>,
    pub o_a: Mat,
    pub o_b: Mat,
    pub compressor: Option<Compressor>,
    pub indexer: Option<Indexer>,
}

pub struct Gate {
    pub weight: Mat,
    pub bias: Option<Vec<f32>>,
    /// `[vocab][n_used]` expert ids for hash-routed layers
    pub tid2eid: Option<Vec<u32>>,
}

pub struct Expert {
    pub w1: Mat,
    pub w3: Mat,
    pub w2: Mat,
}

pub struct MoE {
    pub gate: Gate,
    pub gate_exps: Experts,
    pub up_exps: Experts,
    pub down_exps: Experts,
    pub shared: Option<Expert>,
}

pub struct Block {
    pub layer: usize,
    pub hc_attn: HcParams,
    pub attn_norm: Vec<f32>,
    pub attn: Attention,
    pub hc_ffn: HcParams,
    pub ffn_norm: Vec<f32>,
    pub moe: MoE,
}

pub struct MtpBlock {
    pub e_proj: Mat,
    pub h_proj: Mat,
    pub enorm: Vec<f32>,
    pub hnorm: Vec<f32>,
    pub norm: Vec<f32>,
    pub hc_head: HcParams,
    pub block: Block,
}

pub struct Weights {
    pub embed: Mat,
    pub output: Mat,
    pub output_norm: Vec<f32>,
    pub hc_head: HcParams,
    pub blocks: Vec<Block>,
    pub mtp: Option<MtpBlock>,
}

struct Binder<'a> {
    file: &'a Arc<GgufFile>,
}

impl Binder<'_> {
    fn get(&self, name: &str) -> Result<dsv4_gguf::Tensor<'_>> {
        self.file
            .tensor(name)
            .ok_or_else(|| EngineError::Weights(format!("missing tensor `{name}`")))
    }

    fn check_ne(name: &str, got: &[u64], want: &[usize]) -> Result<()> {
        let ok = got.len() >= want.len()
            && got.iter().zip(want).all(|(&g, &w)| g == w as u64)
            && got[want.len()..].iter().all(|&g| g == 1);
        if !ok {
            return Err(EngineError::Weights(format!("tensor `{name}` has ne {got:?}, expected {want:?}")));
        }
        Ok(())
    }

    fn mat(&self, name: &str, rows: usize, cols: usize) -> Result<Mat> {
        let t = self.get(name)?;
        if !MATRIX_TYPES.contains(&t.ty) {
            return Err(EngineError::Weights(format!("tensor `{name}` has unsupported type {}", t.ty.name())));
        }
        Self::check_ne(name, t.ne, &[cols, rows])?;
        self.mat_from(name, &t, rows, cols)
    }

    fn mat_from(&self, name: &str, t: &dsv4_gguf::Tensor<'_>, rows: usize, cols: usize) -> Result<Mat> {
        let rb = t.ty.row_bytes(cols).ok_or_else(|| {
            EngineError::Weights(format!("tensor `{name}`: {cols} columns is not a whole number of {} blocks", t.ty.name()))
        })?;
        if t.data.len() != rb * rows {
            return Err(EngineError::Weights(format!("tensor `{name}`: {} bytes, expected {}", t.data.len(), rb * rows)));
        }
        let base = self.file.file_bytes().as_ptr() as usize;
        let start = t.data.as_ptr() as usize - base;
        Ok(Mat { name: name.to_string(), ty: t.ty, rows, cols, file: self.file.clone(), start, len: t.data.len() })
    }

    fn experts(&self, name: &str, rows: usize, cols: usize, n: usize) -> Result<Experts> {
        let t = self.get(name)?;
        if !MATRIX_TYPES.contains(&t.ty) {
            return Err(EngineError::Weights(format!("tensor `{name}` has unsupported type {}", t.ty.name())));
        }
        Self::check_ne(name, t.ne, &[cols, rows, n])?;
        let all = self.mat_from(name, &t, rows * n, cols)?;
        Ok(Experts { all, n, rows })
    }

    fn vecf(&self, name: &str, n: usize) -> Result<Vec<f32>> {
        let t = self.get(name)?;
        Self::check_ne(name, t.ne, &[n])?;
        self.decode(name, &t, n)
    }

    fn decode(&self, name: &str, t: &dsv4_gguf::Tensor<'_>, n: usize) -> Result<Vec<f32>> {
        if !matches!(t.ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) {
            return Err(EngineError::Weights(format!(
                "tensor `{name}` must be F32/F16/BF16, found {}",
                t.ty.name()
            )));
        }
        let mut out = vec![0.0f32; n];
        quant::dequantize(t.ty, t.data, &mut out)?;
        Ok(out)
    }

    fn table(&self, name: &str, rows: usize, cols: usize) -> Result<Vec<f32>> {
        let t = self.get(name)?;
        Self::check_ne(name, t.ne, &[cols, rows])?;
        self.decode(name, &t, rows * cols)
    }

    fn hc(&self, prefix: &str, which: &str, n_mix: usize, width: usize, n_scale: usize) -> Result<HcParams> {
        Ok(HcParams {
            fn_: self.mat(&format!("{prefix}{which}_fn.weight"), n_mix, width)?,
            scale: self.vecf(&format!("{prefix}{which}_scale.weight"), n_scale)?,
            base: self.vecf(&format!("{prefix}{which}_base.weight"), n_mix)?,
        })
    }

    fn compressor(&self, prefix: &str, kind: &str, ratio: usize, d: usize, dim: usize) -> Result<Compressor> {
        let coff = if ratio == 4 { 2 } else { 1 };
        Ok(Compressor {
            ratio,
            coff,
            d,
            ape: self.table(&format!("{prefix}{kind}_ape.weight"), ratio, coff * d)?,
            wkv: self.mat(&format!("{prefix}{kind}_kv.weight"), coff * d, dim)?,
            wgate: self.mat(&format!("{prefix}{kind}_gate.weight"), coff * d, dim)?,
            norm: self.vecf(&format!("{prefix}{kind}_norm.weight"), d)?,
        })
    }

    fn block(&self, c: &Config, prefix: &str, layer: usize) -> Result<Block> {
        let d = c.dim;
        let m = c.hc;
        let n_mix = (2 + m) * m;
        let ratio = c.compress_ratios[layer];
        let hd = c.head_dim;
        let compressor = if ratio != 0 { Some(self.compressor(prefix, "attn_compressor", ratio, hd, d)?) } else { None };
        let indexer = if c.has_indexer(layer) {
            let ih = c.index_heads;
            let id = c.index_head_dim;
            Some(Indexer {
                q_b: self.mat(&format!("{prefix}indexer.attn_q_b.weight"), ih * id, c.q_lora_rank)?,
                proj: self.mat(&format!("{prefix}indexer.proj.weight"), ih, d)?,
                compressor: self.compressor(prefix, "indexer_compressor", ratio, id, d)?,
            })
        } else {
            None
        };
        let attn = Attention {
            q_a: self.mat(&format!("{prefix}attn_q_a.weight"), c.q_lora_rank, d)?,
            q_norm: self.vecf(&format!("{prefix}attn_q_a_norm.weight"), c.q_lora_rank)?,
            q_b: self.mat(&format!("{prefix}attn_q_b.weight"), c.n_heads * hd, c.q_lora_rank)?,
            kv: self.mat(&format!("{prefix}attn_kv.weight"), hd, d)?,
            kv_norm: self.vecf(&format!("{prefix}attn_kv_a_norm.weight"), hd)?,
            sinks: self.vecf(&format!("{prefix}attn_sinks.weight"), c.n_heads)?,
            o_a: self.mat(&format!("{prefix}attn_output_a.weight"), c.o_groups * c.o_lora_rank, c.n_heads * hd / c.o_groups)?,
            o_b: self.mat(&format!("{prefix}attn_output_b.weight"), d, c.o_groups * c.o_lora_rank)?,
            compressor,
            indexer,
        };
        let e = c.n_experts;
        let ff = c.expert_ff;
        let hash = c.is_hash_layer(layer);
        let tid2eid = if hash {
            let name = format!("{prefix}ffn_gate_tid2eid.weight");
            let t = self.get(&name)?;
            if t.ty != GgmlType::I32 {
                return Err(EngineError::Weights(format!("tensor `{name}` must be I32, found {}", t.ty.name())));
            }
            Self::check_ne(&name, t.ne, &[c.n_experts_used, c.vocab])?;
            let mut ids = Vec::with_capacity(c.vocab * c.n_experts_used);
            for ch in t.data.chunks_exact(4) {
                let v = i32::from_le_bytes([ch[0], ch[1], ch[2], ch[3]]);
                if v < 0 || v as usize >= e {
                    return Err(EngineError::Weights(format!("tensor `{name}`: expert id {v} out of range 0..{e}")));
                }
                ids.push(v as u32);
            }
            Some(ids)
        } else {
            None
        };
        let bias_name = format!("{prefix}exp_probs_b.bias");
        let bias = if self.file.tensor(&bias_name).is_some() { Some(self.vecf(&bias_name, e)?) } else { None };
        let shared = if c.n_shared_experts == 1 {
            Some(Expert {
                w1: self.mat(&format!("{prefix}ffn_gate_shexp.weight"), ff, d)?,
                w3: self.mat(&format!("{prefix}ffn_up_shexp.weight"), ff, d)?,
                w2: self.mat(&format!("{prefix}ffn_down_shexp.weight"), d, ff)?,
            })
        } else {
            None
        };
        let moe = MoE {
            gate: Gate { weight: self.mat(&format!("{prefix}ffn_gate_inp.weight"), e, d)?, bias, tid2eid },
            gate_exps: self.experts(&format!("{prefix}ffn_gate_exps.weight"), ff, d, e)?,
            up_exps: self.experts(&format!("{prefix}ffn_up_exps.weight"), ff, d, e)?,
            down_exps: self.experts(&format!("{prefix}ffn_down_exps.weight"), d, ff, e)?,
            shared,
        };
        Ok(Block {
            layer,
            hc_attn: self.hc(prefix, "hc_attn", n_mix, m * d, 3)?,
            attn_norm: self.vecf(&format!("{prefix}attn_norm.weight"), d)?,
            attn,
            hc_ffn: self.hc(prefix, "hc_ffn", n_mix, m * d, 3)?,
            ffn_norm: self.vecf(&format!("{prefix}ffn_norm.weight"), d)?,
            moe,
        })
    }
}

impl Weights {
    /// Binds every tensor of the main model and, when present, the MTP block.
    pub fn bind(c: &Config, file: &Arc<GgufFile>) -> Result<Weights> {
        Self::bind_with_mtp(c, file, None)
    }

    /// As `bind`, taking `mtp.0.*` from `mtp_file` when given (ds4 ships the MTP
    /// block as a separate GGUF), else from the main file when it has them.
    pub fn bind_with_mtp(c: &Config, file: &Arc<GgufFile>, mtp_file: Option<&Arc<GgufFile>>) -> Result<Weights> {
        let b = Binder { file };
        let d = c.dim;
        let m = c.hc;
        let blocks = (0..c.n_layers)
            .map(|l| b.block(c, &format!("blk.{l}."), l))
            .collect::<Result<Vec<_>>>()?;
        let mtp_src = mtp_file.unwrap_or(file);
        let mtp = if c.n_mtp > 0 && mtp_src.tensor("mtp.0.e_proj.weight").is_some() {
            let mb = Binder { file: mtp_src };
            let layer = c.n_layers; // MTP's slot in compress_ratios / swiglu_limits
            Some(MtpBlock {
                e_proj: mb.mat("mtp.0.e_proj.weight", d, d)?,
                h_proj: mb.mat("mtp.0.h_proj.weight", d, d)?,
                enorm: mb.vecf("mtp.0.enorm.weight", d)?,
                hnorm: mb.vecf("mtp.0.hnorm.weight", d)?,
                norm: mb.vecf("mtp.0.norm.weight", d)?,
                hc_head: mb.hc("mtp.0.", "hc_head", m, m * d, 1)?,
                block: mb.block(c, "mtp.0.", layer)?,
            })
        } else {
            None
        };
        let embed = b.mat("token_embd.weight", c.vocab, d)?;
        Ok(Weights {
            embed,
            output: b.mat("output.weight", c.vocab, d)?,
            output_norm: b.vecf("output_norm.weight", d)?,
            hc_head: b.hc("", "output_hc", m, m * d, 1)?,
            blocks,
            mtp,
        })
    }
}
