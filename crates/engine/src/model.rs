//! The DeepSeek V4 forward pass on CPU, as ../shared/spec/model.md describes it.
//!
//! `Model` holds the immutable weights; `State` holds everything carried between
//! calls (window ring, compressed rows, compressor and indexer partial windows).
//! `Model::eval` consumes any number of new tokens at the state's position. The
//! semantics are exactly "one token at a time" (spec §14): within a chunk the
//! projections are batched, the compressor state is advanced token by token, and
//! each token attends to the window / compressed rows visible at its position.
//! Whole-prompt, chunked and stepwise evaluation therefore give the same logits.
//!
//! Activations are f32 throughout. `Numerics::Q8` quantises activations to 8 bits
//! for the quantised-weight dot products (as ds4's CPU path does).

use std::path::Path;
use std::sync::Arc;

use dsv4_gguf::{kernels, GgufFile};
use rayon::prelude::*;

use crate::config::Config;
use crate::error::{EngineError, Result};
use crate::ops::{self, HcWeights, Rope};
use crate::pack::{PackedRows, RopeStore, RowFormat};
use crate::weights::{Block, Compressor, HcParams, Mat, Weights};

/// How dot products against quantised weights treat activations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Numerics {
    /// f32 activations against dequantised weights (the reference; strict fixture tolerance).
    #[default]
    F32,
    /// activations quantised to 8 bits (Q8_0 per 32 / Q8_K per 256) for quantised weights.
    Q8,
}

pub struct Model {
    pub cfg: Config,
    pub w: Weights,
    pub numerics: Numerics,
    /// How the RoPE dims of compressed attention rows are held in the state:
    /// f32 (default, exact vs the f32 reference) or rounded to bf16 at emission
    /// (the official cache precision; smaller state). Set before making states.
    pub kv_rope: RopeStore,
    rope_plain: Rope,
    rope_yarn: Rope,
    /// Largest number of tokens processed per internal pass (bounds activation memory).
    pub max_chunk: usize,
    /// Ablation for tests only: skip the FP8 round trip of KV rows (must break fixtures).
    pub ablate_kv_fp8: bool,
    /// Identifies these weights in saved states (computed once at load).
    pub fingerprint: crate::state_io::Fingerprint,
    /// Sees the routed experts' input rows (for importance matrices); `None`
    /// costs nothing. See `ExpertObserver`.
    pub observer: Option<ExpertObserver>,
}

/// Called as `(tensor, n_expert, expert, row)` for every row a routed expert
/// multiplies: the MoE input row under the GGUF names of both the gate and the
/// up tensor (`blk.N.ffn_gate_exps.weight`, `blk.N.ffn_up_exps.weight`; they
/// share the input), and the post-SwiGLU row, already scaled by the routing
/// weight as the down projection receives it, under `blk.N.ffn_down_exps.weight`.
/// The MTP block's tensors are named `mtp.0.…`. Rows of one chunk arrive grouped
/// by expert; calls come from the thread that runs `eval`.
pub type ExpertObserver = Arc<dyn Fn(&str, usize, usize, &[f32]) + Send + Sync>;

/// Streaming state of one compressor: `slots` partial tokens of `coff·d` values.
#[derive(Clone, Debug, PartialEq)]
pub struct CompState {
    pub kv: Vec<f32>,
    pub score: Vec<f32>,
}

/// Everything one layer carries between tokens (spec §14).
///
/// The compressed rows are held packed (see `pack`): they are exactly on the
/// FP8 / FP4 grids (and, with `RopeStore::Bf16`, their RoPE dims on bf16), so
/// packing is lossless and takes ~3-4x less memory than f32. `rows` /
/// `idx_rows` expose the packed bytes (the CUDA backend copies them to and from
/// the device as they are); `rows_f32` / `set_rows_from_f32` (and the `idx_`
/// pair) convert for code that wants plain f32 rows.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct LayerState {
    /// `[window][head_dim]`, slot = position mod window.
    pub ring: Vec<f32>,
    /// compressed attention rows, `len()` rows of `head_dim`
    pub rows: PackedRows,
    pub comp: Option<CompState>,
    /// indexer compressed rows, `len()` rows of `index_head_dim`
    pub idx_rows: PackedRows,
    pub idx_comp: Option<CompState>,
}

impl LayerState {
    /// A layer state from f32 rows (`[n][head_dim]`, `[n][index_head_dim]`), packed
    /// in this config's formats; fails if a row is not exactly on its grid.
    pub fn from_f32_rows(
        cfg: &Config,
        ring: Vec<f32>,
        rows: &[f32],
        comp: Option<CompState>,
        idx_rows: &[f32],
        idx_comp: Option<CompState>,
    ) -> Result<LayerState> {
        let mut l = LayerState { ring, rows: PackedRows::new(RowFormat::attn(cfg)), comp, idx_rows: PackedRows::new(RowFormat::indexer(cfg)), idx_comp };
        l.set_rows_from_f32(rows)?;
        l.set_idx_rows_from_f32(idx_rows)?;
        Ok(l)
    }

    /// How this state holds the RoPE dims of its compressed attention rows.
    pub fn kv_rope(&self) -> RopeStore {
        self.rows.format().rope_store().unwrap_or_default()
    }

    /// The compressed attention rows as f32, `[n][head_dim]` (bit-exact).
    pub fn rows_f32(&self) -> Vec<f32> {
        self.rows.to_f32()
    }

    /// The indexer rows as f32, `[n][index_head_dim]` (bit-exact).
    pub fn idx_rows_f32(&self) -> Vec<f32> {
        self.idx_rows.to_f32()
    }

    /// Replaces the compressed attention rows (keeps the allocation); on error
    /// the rows are left empty.
    pub fn set_rows_from_f32(&mut self, v: &[f32]) -> Result<()> {
        self.rows.clear();
        Ok(self.rows.extend_from_f32(v)?)
    }

    /// Replaces the indexer rows (keeps the allocation); on error they are left empty.
    pub fn set_idx_rows_from_f32(&mut self, v: &[f32]) -> Result<()> {
        self.idx_rows.clear();
        Ok(self.idx_rows.extend_from_f32(v)?)
    }
}

/// The state of one sequence: position plus per-layer state.
#[derive(Clone, Debug, PartialEq)]
pub struct State {
    pub pos: usize,
    pub layers: Vec<LayerState>,
}

/// What `eval` returns.
#[derive(Clone, Debug, Default)]
pub struct EvalOutput {
    /// `[rows][vocab]`: the last token's logits, or every token's when asked.
    pub logits: Vec<f32>,
    /// `[n][hc][dim]` final hyper-connection states, when asked.
    pub hidden: Vec<f32>,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct Want {
    pub all_logits: bool,
    pub hidden: bool,
}

impl CompState {
    fn new(c: &Compressor) -> CompState {
        let slots = if c.coff == 2 { 2 * c.ratio } else { c.ratio };
        let n = slots * c.coff * c.d;
        CompState { kv: vec![0.0; n], score: vec![f32::NEG_INFINITY; n] }
    }
}

impl Model {
    pub fn load(path: &Path) -> Result<Model> {
        Self::load_with_mtp(path, None)
    }

    pub fn load_with_mtp(path: &Path, mtp: Option<&Path>) -> Result<Model> {
        let file = Arc::new(GgufFile::open(path)?);
        let mtp_file = match mtp {
            Some(p) => Some(Arc::new(GgufFile::open(p)?)),
            None => None,
        };
        Self::from_gguf(file, mtp_file)
    }

    pub fn from_gguf(file: Arc<GgufFile>, mtp_file: Option<Arc<GgufFile>>) -> Result<Model> {
        let cfg = Config::from_gguf(&file)?;
        let w = Weights::bind_with_mtp(&cfg, &file, mtp_file.as_ref())?;
        let rope_plain = Rope::new(cfg.rope_dim, cfg.rope_theta, None);
        let mut files: Vec<&GgufFile> = vec![&file];
        files.extend(mtp_file.as_deref());
        let fingerprint = crate::state_io::Fingerprint::of_gguf(&cfg, &files);
        let rope_yarn = Rope::new(cfg.rope_dim, cfg.compress_rope_theta, Some(cfg.yarn()));
        Ok(Model { cfg, w, numerics: Numerics::F32, kv_rope: RopeStore::F32, rope_plain, rope_yarn, max_chunk: 512, ablate_kv_fp8: false, fingerprint, observer: None })
    }

    pub fn has_mtp(&self) -> bool {
        self.w.mtp.is_some()
    }

    /// Fresh state for the main model (position 0, empty history).
    pub fn new_state(&self) -> State {
        State { pos: 0, layers: self.w.blocks.iter().map(|b| layer_state(&self.cfg, b, self.kv_rope)).collect() }
    }

    /// Fresh state for the MTP block (its own window cache).
    pub fn new_mtp_state(&self) -> Option<State> {
        self.w.mtp.as_ref().map(|m| State { pos: 0, layers: vec![layer_state(&self.cfg, &m.block, self.kv_rope)] })
    }

    fn rope(&self, layer: usize) -> &Rope {
        if self.cfg.compress_ratios[layer] != 0 {
            &self.rope_yarn
        } else {
            &self.rope_plain
        }
    }

    /// `y[n][w.rows] = x[n][w.cols] · wᵀ`.
    fn mm(&self, w: &Mat, x: &[f32], n: usize) -> Vec<f32> {
        debug_assert_eq!(x.len(), n * w.cols);
        let mut y = vec![0.0f32; n * w.rows];
        match self.numerics {
            Numerics::F32 => {
                if n == 1 {
                    kernels::matvec(w.ty, w.data(), w.rows, w.cols, x, &mut y);
                } else {
                    kernels::matmul(w.ty, w.data(), w.rows, w.cols, x, n, &mut y);
                }
            }
            Numerics::Q8 => {
                for t in 0..n {
                    let xq = kernels::quantize_acts(w.ty, &x[t * w.cols..(t + 1) * w.cols]);
                    kernels::matvec_q8(w.ty, w.data(), w.rows, w.cols, &xq, &mut y[t * w.rows..(t + 1) * w.rows]);
                }
            }
        }
        y
    }

    fn check_tokens(&self, tokens: &[u32]) -> Result<()> {
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= self.cfg.vocab) {
            return Err(EngineError::Input(format!("token id {t} out of range (vocab {})", self.cfg.vocab)));
        }
        Ok(())
    }

    /// Embedding rows, replicated into the M hyper-connection streams: `[n][M·D]`.
    fn embed(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        let d = self.cfg.dim;
        let m = self.cfg.hc;
        let mut x = vec![0.0f32; tokens.len() * m * d];
        for (t, &tok) in tokens.iter().enumerate() {
            let e = self.w.embed.rows(tok as usize, 1).to_f32()?;
            for j in 0..m {
                x[(t * m + j) * d..(t * m + j + 1) * d].copy_from_slice(&e);
            }
        }
        Ok(x)
    }

    /// Main model: consume `tokens` at `st.pos`, return logits (and hidden states).
    pub fn eval(&self, st: &mut State, tokens: &[u32], want: Want) -> Result<EvalOutput> {
        self.check_tokens(tokens)?;
        let mut out = EvalOutput::default();
        if tokens.is_empty() {
            return Ok(out);
        }
        let n_total = tokens.len();
        let mut done = 0;
        while done < n_total {
            let n = self.max_chunk.max(1).min(n_total - done);
            let toks = &tokens[done..done + n];
            let mut x = self.embed(toks)?;
            for (l, blk) in self.w.blocks.iter().enumerate() {
                self.block_forward(blk, &mut st.layers[l], &mut x, toks, st.pos)?;
            }
            st.pos += n;
            let last_chunk = done + n == n_total;
            let md = self.cfg.hc * self.cfg.dim;
            if want.hidden {
                out.hidden.extend_from_slice(&x);
            }
            if want.all_logits {
                for t in 0..n {
                    out.logits.extend(self.head(&self.w.hc_head, &self.w.output_norm, &x[t * md..(t + 1) * md]));
                }
            } else if last_chunk {
                out.logits = self.head(&self.w.hc_head, &self.w.output_norm, &x[(n - 1) * md..n * md]);
            }
            done += n;
        }
        Ok(out)
    }

    /// MTP block: hidden state `h` (`[M][D]`, the main model's final HC state) and
    /// token at `mst.pos`; returns the MTP logits and advances the MTP state.
    pub fn mtp_eval(&self, mst: &mut State, h: &[f32], token: u32) -> Result<Vec<f32>> {
        let mtp = self.w.mtp.as_ref().ok_or_else(|| EngineError::Input("model has no MTP block".into()))?;
        self.check_tokens(&[token])?;
        let d = self.cfg.dim;
        let m = self.cfg.hc;
        if h.len() != m * d {
            return Err(EngineError::Input(format!("MTP hidden state has {} values, expected {}", h.len(), m * d)));
        }
        let eps = self.cfg.rms_eps;
        let emb = self.w.embed.rows(token as usize, 1).to_f32()?;
        let mut e = vec![0.0; d];
        ops::rmsnorm(&emb, &mtp.enorm, eps, &mut e);
        let pe = self.mm(&mtp.e_proj, &e, 1);
        let mut x = vec![0.0f32; m * d];
        let mut hn = vec![0.0f32; m * d];
        for j in 0..m {
            ops::rmsnorm(&h[j * d..(j + 1) * d], &mtp.hnorm, eps, &mut hn[j * d..(j + 1) * d]);
        }
        let ph = self.mm(&mtp.h_proj, &hn, m);
        for j in 0..m {
            for i in 0..d {
                x[j * d + i] = pe[i] + ph[j * d + i];
            }
        }
        self.block_forward(&mtp.block, &mut mst.layers[0], &mut x, &[token], mst.pos)?;
        mst.pos += 1;
        Ok(self.head(&mtp.hc_head, &mtp.norm, &x))
    }

    /// HcHead, final RMSNorm and the LM head for one token's HC state.
    pub fn head(&self, hc: &HcParams, norm: &[f32], x: &[f32]) -> Vec<f32> {
        let d = self.cfg.dim;
        let m = self.cfg.hc;
        let r = ops::rms_inv(x, self.cfg.rms_eps);
        let mixes = self.mm(&hc.fn_, x, 1);
        let w: Vec<f32> = (0..m).map(|j| ops::sigmoid(mixes[j] * r * hc.scale[0] + hc.base[j]) + self.cfg.hc_eps).collect();
        let mut y = vec![0.0f32; d];
        ops::hc_collapse(x, &w, d, &mut y);
        ops::rmsnorm_inplace(&mut y, norm, self.cfg.rms_eps);
        self.mm(&self.w.output, &y, 1)
    }

    /// HcPre for n tokens: returns (collapsed+normed inputs `[n][D]`, per-token weights).
    fn hc_pre(&self, hc: &HcParams, norm_w: &[f32], x: &[f32], n: usize) -> (Vec<f32>, Vec<HcWeights>) {
        let d = self.cfg.dim;
        let m = self.cfg.hc;
        let md = m * d;
        let n_mix = (2 + m) * m;
        let mixes = self.mm(&hc.fn_, x, n);
        let mut a = vec![0.0f32; n * d];
        let mut ws = Vec::with_capacity(n);
        for t in 0..n {
            let xt = &x[t * md..(t + 1) * md];
            let r = ops::rms_inv(xt, self.cfg.rms_eps);
            let mx: Vec<f32> = mixes[t * n_mix..(t + 1) * n_mix].iter().map(|v| v * r).collect();
            let w = ops::hc_split_sinkhorn(&mx, &hc.scale, &hc.base, m, self.cfg.sinkhorn_iters, self.cfg.hc_eps);
            let at = &mut a[t * d..(t + 1) * d];
            ops::hc_collapse(xt, &w.pre, d, at);
            ops::rmsnorm_inplace(at, norm_w, self.cfg.rms_eps);
            ws.push(w);
        }
        (a, ws)
    }

    fn hc_post_all(&self, f: &[f32], x: &mut [f32], ws: &[HcWeights]) {
        let d = self.cfg.dim;
        let md = self.cfg.hc * d;
        let mut out = vec![0.0f32; md];
        for (t, w) in ws.iter().enumerate() {
            ops::hc_post(&f[t * d..(t + 1) * d], &x[t * md..(t + 1) * md], w, d, &mut out);
            x[t * md..(t + 1) * md].copy_from_slice(&out);
        }
    }

    /// One transformer block over a chunk of n tokens at positions p0.. (spec §4).
    fn block_forward(&self, blk: &Block, st: &mut LayerState, x: &mut [f32], tokens: &[u32], p0: usize) -> Result<()> {
        let n = tokens.len();
        let (a, ws) = self.hc_pre(&blk.hc_attn, &blk.attn_norm, x, n);
        let f = self.attention(blk, st, &a, n, p0)?;
        self.hc_post_all(&f, x, &ws);
        let (a, ws) = self.hc_pre(&blk.hc_ffn, &blk.ffn_norm, x, n);
        let f = self.moe(blk, &a, tokens);
        self.hc_post_all(&f, x, &ws);
        Ok(())
    }

    /// Runs a compressor over n tokens' projections, appending finished rows (spec §7).
    /// Rows are packed as they are appended; the sims above put them exactly on
    /// the packed grids, so a packing error means non-finite activations.
    #[allow(clippy::too_many_arguments)]
    fn compress(&self, c: &Compressor, cs: &mut CompState, rows: &mut PackedRows, a: &[f32], n: usize, p0: usize, is_indexer: bool, rope: &Rope) -> Result<()> {
        let w = c.coff * c.d;
        let kv = self.mm(&c.wkv, a, n);
        let sc = self.mm(&c.wgate, a, n);
        let r = c.ratio;
        let d = c.d;
        let rd = self.cfg.rope_dim;
        for t in 0..n {
            let p = p0 + t;
            let slot = if c.coff == 2 { r + p % r } else { p % r };
            cs.kv[slot * w..(slot + 1) * w].copy_from_slice(&kv[t * w..(t + 1) * w]);
            let ape = &c.ape[(p % r) * w..(p % r + 1) * w];
            for i in 0..w {
                cs.score[slot * w + i] = sc[t * w + i] + ape[i];
            }
            if (p + 1) % r != 0 {
                continue;
            }
            let mut vals: Vec<&[f32]> = Vec::with_capacity(2 * r);
            let mut scs: Vec<&[f32]> = Vec::with_capacity(2 * r);
            if c.coff == 2 {
                // lane A of the previous window, lane B of the current one
                for s in 0..r {
                    vals.push(&cs.kv[s * w..s * w + d]);
                    scs.push(&cs.score[s * w..s * w + d]);
                }
                for s in r..2 * r {
                    vals.push(&cs.kv[s * w + d..(s + 1) * w]);
                    scs.push(&cs.score[s * w + d..(s + 1) * w]);
                }
            } else {
                for s in 0..r {
                    vals.push(&cs.kv[s * w..(s + 1) * w]);
                    scs.push(&cs.score[s * w..(s + 1) * w]);
                }
            }
            let mut row = vec![0.0f32; d];
            ops::softmax_pool(&vals, &scs, &mut row);
            ops::rmsnorm_inplace(&mut row, &c.norm, self.cfg.rms_eps);
            rope.apply(&mut row[d - rd..], p + 1 - r, false);
            if is_indexer {
                ops::hadamard_inplace(&mut row);
                ops::fp4_sim_inplace(&mut row, 32);
            } else {
                ops::fp8_sim_inplace(&mut row[..d - rd], 64);
                // the state's RoPE precision: bf16 rounds here, before the row is stored or used
                self.kv_rope.round(&mut row[d - rd..]);
            }
            rows.push(&row)?;
            #[cfg(debug_assertions)]
            {
                let mut chk = vec![0f32; row.len()];
                rows.decode_row(rows.len() - 1, &mut chk);
                debug_assert!(chk.iter().zip(&row).all(|(x, y)| x.to_bits() == y.to_bits()), "packed row does not decode exactly");
            }
            if c.coff == 2 {
                // the current window becomes the previous one
                cs.kv.copy_within(r * w..2 * r * w, 0);
                cs.score.copy_within(r * w..2 * r * w, 0);
            }
        }
        Ok(())
    }

    /// Attention sub-block for n tokens (spec §6), returns `[n][D]`.
    fn attention(&self, blk: &Block, st: &mut LayerState, a: &[f32], n: usize, p0: usize) -> Result<Vec<f32>> {
        let c = &self.cfg;
        let at = &blk.attn;
        let layer = blk.layer;
        let rope = self.rope(layer);
        let (h, hd, rd) = (c.n_heads, c.head_dim, c.rope_dim);
        let nope = hd - rd;
        let eps = c.rms_eps;
        let win = c.window;

        // q path: qr = RMSNorm(wq_a a), q = wq_b qr, per-head RMS, RoPE.
        let mut qr = self.mm(&at.q_a, a, n);
        for row in qr.chunks_mut(c.q_lora_rank) {
            ops::rmsnorm_inplace(row, &at.q_norm, eps);
        }
        let mut q = self.mm(&at.q_b, &qr, n);
        for t in 0..n {
            for hh in 0..h {
                let qh = &mut q[(t * h + hh) * hd..(t * h + hh + 1) * hd];
                ops::rms_scale_inplace(qh, eps);
                rope.apply(&mut qh[nope..], p0 + t, false);
            }
        }
        // kv rows: RMSNorm, RoPE tail, FP8 round trip of the non-RoPE dims.
        let mut kv = self.mm(&at.kv, a, n);
        for t in 0..n {
            let row = &mut kv[t * hd..(t + 1) * hd];
            ops::rmsnorm_inplace(row, &at.kv_norm, eps);
            rope.apply(&mut row[nope..], p0 + t, false);
            if !self.ablate_kv_fp8 {
                ops::fp8_sim_inplace(&mut row[..nope], 64);
            }
        }
        // compressors first: a row finished by token p is visible to token p.
        if let (Some(comp), Some(cs)) = (&at.compressor, st.comp.as_mut()) {
            self.compress(comp, cs, &mut st.rows, a, n, p0, false, rope)?;
        }
        // indexer queries and weights
        let mut iq = Vec::new();
        let mut iw = Vec::new();
        if let (Some(ix), Some(ics)) = (&at.indexer, st.idx_comp.as_mut()) {
            self.compress(&ix.compressor, ics, &mut st.idx_rows, a, n, p0, true, rope)?;
            let (ih, id) = (c.index_heads, c.index_head_dim);
            iq = self.mm(&ix.q_b, &qr, n);
            for t in 0..n {
                for hh in 0..ih {
                    let v = &mut iq[(t * ih + hh) * id..(t * ih + hh + 1) * id];
                    rope.apply(&mut v[id - rd..], p0 + t, false);
                    ops::hadamard_inplace(v);
                    ops::fp4_sim_inplace(v, 32);
                }
            }
            iw = self.mm(&ix.proj, a, n);
            let s = (id as f32).powf(-0.5) * (ih as f32).powf(-0.5);
            for v in iw.iter_mut() {
                *v *= s;
            }
        }

        let ratio = c.compress_ratios[layer];
        let scale = (hd as f32).powf(-0.5);
        let mut o = vec![0.0f32; n * h * hd];
        {
            let st_ro: &LayerState = st;
            let kv_ro = &kv;
            o.par_chunks_mut(h * hd).enumerate().for_each(|(t, ot)| {
                let p = p0 + t;
                // compressed keys this token sees, decoded from the packed rows
                // into a per-token scratch (bit-identical to the f32 rows)
                let mut comp_keys: Vec<f32> = Vec::new();
                if ratio != 0 {
                    let visible = (p + 1) / ratio;
                    let sel: Vec<usize> = if ratio == 4 && !iq.is_empty() {
                        self.indexer_select(&iq, &iw, &st_ro.idx_rows, t, visible)
                    } else {
                        (0..visible).collect()
                    };
                    comp_keys.resize(sel.len() * hd, 0.0);
                    for (&i, k) in sel.iter().zip(comp_keys.chunks_exact_mut(hd)) {
                        st_ro.rows.decode_row(i, k);
                    }
                }
                let mut keys: Vec<&[f32]> = Vec::new();
                let lo = (p + 1).saturating_sub(win);
                for qp in lo..=p {
                    if qp >= p0 {
                        keys.push(&kv_ro[(qp - p0) * hd..(qp - p0 + 1) * hd]);
                    } else {
                        let s = qp % win;
                        keys.push(&st_ro.ring[s * hd..(s + 1) * hd]);
                    }
                }
                keys.extend(comp_keys.chunks_exact(hd));
                for hh in 0..h {
                    let qh = &q[(t * h + hh) * hd..(t * h + hh + 1) * hd];
                    let oh = &mut ot[hh * hd..(hh + 1) * hd];
                    ops::sink_attention(qh, &keys, at.sinks[hh], scale, oh);
                    rope.apply(&mut oh[nope..], p, true);
                }
            });
        }
        // window ring: the chunk's last min(n, W) rows at slot pos mod W
        for t in n.saturating_sub(win)..n {
            let s = (p0 + t) % win;
            st.ring[s * hd..(s + 1) * hd].copy_from_slice(&kv[t * hd..(t + 1) * hd]);
        }

        // grouped low-rank output projection
        let g = c.o_groups;
        let gw = h * hd / g;
        let ro = c.o_lora_rank;
        let mut u = vec![0.0f32; n * g * ro];
        for gi in 0..g {
            let wg = at.o_a.rows(gi * ro, ro);
            let mut xin = vec![0.0f32; n * gw];
            for t in 0..n {
                xin[t * gw..(t + 1) * gw].copy_from_slice(&o[t * h * hd + gi * gw..t * h * hd + (gi + 1) * gw]);
            }
            let ug = self.mm(&wg, &xin, n);
            for t in 0..n {
                u[t * g * ro + gi * ro..t * g * ro + (gi + 1) * ro].copy_from_slice(&ug[t * ro..(t + 1) * ro]);
            }
        }
        Ok(self.mm(&at.o_b, &u, n))
    }

    /// Indexer top-k over the rows visible to chunk token t (spec §8).
    fn indexer_select(&self, iq: &[f32], iw: &[f32], idx_rows: &PackedRows, t: usize, visible: usize) -> Vec<usize> {
        let c = &self.cfg;
        let (ih, id) = (c.index_heads, c.index_head_dim);
        if visible <= c.index_topk {
            return (0..visible).collect();
        }
        let q = &iq[t * ih * id..(t + 1) * ih * id];
        let w = &iw[t * ih..(t + 1) * ih];
        // each row is decoded just before it is scored (the decode is a table
        // look-up per value, small next to the ih dot products that follow)
        let mut k = vec![0.0f32; id];
        let scores: Vec<f32> = (0..visible)
            .map(|i| {
                idx_rows.decode_row(i, &mut k);
                let k = &k[..];
                let mut s = 0.0f32;
                for hh in 0..ih {
                    s += w[hh] * ops::dot(&q[hh * id..(hh + 1) * id], k).max(0.0);
                }
                s
            })
            .collect();
        ops::topk_desc(&scores, c.index_topk)
    }

    /// Routed + shared experts for n tokens (spec §10), returns `[n][D]`.
    fn moe(&self, blk: &Block, a: &[f32], tokens: &[u32]) -> Vec<f32> {
        let c = &self.cfg;
        let n = tokens.len();
        let d = c.dim;
        let k = c.n_experts_used;
        let ne = c.n_experts;
        let moe = &blk.moe;
        let logits = self.mm(&moe.gate.weight, a, n);
        // per token: selected experts and their weights
        let mut sel: Vec<(usize, usize, f32)> = Vec::with_capacity(n * k); // (expert, token, weight)
        for t in 0..n {
            let s: Vec<f32> = logits[t * ne..(t + 1) * ne].iter().map(|&v| ops::softplus(v).sqrt()).collect();
            let idx: Vec<usize> = if let Some(tab) = &moe.gate.tid2eid {
                let tok = tokens[t] as usize;
                tab[tok * k..(tok + 1) * k].iter().map(|&e| e as usize).collect()
            } else {
                let biased: Vec<f32> = match &moe.gate.bias {
                    Some(b) => s.iter().zip(b).map(|(x, y)| x + y).collect(),
                    None => s.clone(),
                };
                ops::topk_desc(&biased, k)
            };
            let mut wts: Vec<f32> = idx.iter().map(|&e| s[e]).collect();
            if c.weights_norm {
                let sum: f32 = wts.iter().sum();
                for v in wts.iter_mut() {
                    *v /= sum;
                }
            }
            for (&e, &wt) in idx.iter().zip(&wts) {
                sel.push((e, t, wt * c.route_scale));
            }
        }
        // group by expert (ascending), so each token accumulates experts in
        // ascending index order like the official per-expert loop
        sel.sort_by_key(|&(e, t, _)| (e, t));
        let limit = c.swiglu_limits[blk.layer];
        let ff = c.expert_ff;
        // GGUF tensor names, only built when someone observes
        let names = self.observer.as_ref().map(|_| {
            let prefix = if blk.layer < c.n_layers { format!("blk.{}.", blk.layer) } else { format!("mtp.{}.", blk.layer - c.n_layers) };
            ["ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"].map(|t| format!("{prefix}{t}.weight"))
        });
        let mut y = vec![0.0f32; n * d];
        let mut i = 0;
        while i < sel.len() {
            let e = sel[i].0;
            let mut j = i;
            while j < sel.len() && sel[j].0 == e {
                j += 1;
            }
            let group = &sel[i..j];
            let m = group.len();
            let mut xin = vec![0.0f32; m * d];
            for (r, &(_, t, _)) in group.iter().enumerate() {
                xin[r * d..(r + 1) * d].copy_from_slice(&a[t * d..(t + 1) * d]);
            }
            if let (Some(obs), Some(nm)) = (&self.observer, &names) {
                for row in xin.chunks_exact(d) {
                    obs(&nm[0], ne, e, row);
                    obs(&nm[1], ne, e, row);
                }
            }
            let g = self.mm(&moe.gate_exps.expert(e), &xin, m);
            let u = self.mm(&moe.up_exps.expert(e), &xin, m);
            let mut hmid = vec![0.0f32; m * ff];
            for (r, &(_, _, wt)) in group.iter().enumerate() {
                ops::swiglu_clamped(&g[r * ff..(r + 1) * ff], &u[r * ff..(r + 1) * ff], limit, wt, &mut hmid[r * ff..(r + 1) * ff]);
            }
            if let (Some(obs), Some(nm)) = (&self.observer, &names) {
                for row in hmid.chunks_exact(ff) {
                    obs(&nm[2], ne, e, row);
                }
            }
            let out = self.mm(&moe.down_exps.expert(e), &hmid, m);
            for (r, &(_, t, _)) in group.iter().enumerate() {
                for (yv, ov) in y[t * d..(t + 1) * d].iter_mut().zip(&out[r * d..(r + 1) * d]) {
                    *yv += ov;
                }
            }
            i = j;
        }
        if let Some(sh) = &moe.shared {
            let g = self.mm(&sh.w1, a, n);
            let u = self.mm(&sh.w3, a, n);
            let mut hmid = vec![0.0f32; n * ff];
            for t in 0..n {
                ops::swiglu_clamped(&g[t * ff..(t + 1) * ff], &u[t * ff..(t + 1) * ff], limit, 1.0, &mut hmid[t * ff..(t + 1) * ff]);
            }
            let out = self.mm(&sh.w2, &hmid, n);
            for (yv, ov) in y.iter_mut().zip(&out) {
                *yv += ov;
            }
        }
        y
    }
}

fn layer_state(c: &Config, b: &Block, rope: RopeStore) -> LayerState {
    LayerState {
        ring: vec![0.0; c.window * c.head_dim],
        rows: PackedRows::new(RowFormat::attn_with(c, rope)),
        comp: b.attn.compressor.as_ref().map(CompState::new),
        idx_rows: PackedRows::new(RowFormat::indexer(c)),
        idx_comp: b.attn.indexer.as_ref().map(|ix| CompState::new(&ix.compressor)),
    }
}
