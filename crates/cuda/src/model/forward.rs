//! The forward pass on the GPU: matvec dispatch, hyper-connections, attention
//! (with the compressors and the indexer on parallel graph branches), MoE, the
//! head, and the CUDA-graph decode step. Mirrors `dsv4_engine::model` step for step.

use super::*;

/// The decode IQ2_XXS gate / up pair kernel: None = the generic paired
/// kernel (env DSV4_IQ2_PAIR=0), Some(false) = one shared copy of the grid
/// table and the signs by arithmetic (DSV4_IQ2_REP=0), Some(true) = the
/// bank-replicated tables. Env read once, for A/B runs.
fn iq2_pair_kernel() -> Option<bool> {
    static V: std::sync::OnceLock<Option<bool>> = std::sync::OnceLock::new();
    *V.get_or_init(|| {
        let on = |k: &str| std::env::var(k).map(|v| v != "0").unwrap_or(true);
        on("DSV4_IQ2_PAIR").then(|| on("DSV4_IQ2_REP"))
    })
}

/// Dynamic shared memory of the replicated-table IQ2 kernel (mmvq.cu
/// IQ2_REP_ENTRIES x 32 words).
const IQ2_REP_SHMEM: u32 = 384 * 32 * 4;

/// Decode attention prefetches its split's key rows into L2 when it starts
/// (env DSV4_ATTN_PF=0: not, for A/B runs).
fn attn_prefetch() -> i32 {
    static V: std::sync::OnceLock<i32> = std::sync::OnceLock::new();
    *V.get_or_init(|| std::env::var("DSV4_ATTN_PF").map(|v| v != "0").unwrap_or(true) as i32)
}

/// Most key splits of a single-token attention step (env DSV4_ATTN_SPLIT,
/// 1..=MAX_SPLIT, for experiments; default 16).
fn attn_split_max() -> usize {
    static V: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *V.get_or_init(|| std::env::var("DSV4_ATTN_SPLIT").ok().and_then(|v| v.parse().ok()).unwrap_or(16).clamp(1, MAX_SPLIT))
}

/// Persistent matvecs load their first weights before the PDL wait (env
/// DSV4_EARLY=0: never, for A/B runs).
/// DSV4_EARLY=2: half the warps, for A/B runs; the kernel's `early` argument).
fn early_all() -> i32 {
    static V: std::sync::OnceLock<i32> = std::sync::OnceLock::new();
    *V.get_or_init(|| std::env::var("DSV4_EARLY").ok().and_then(|v| v.parse().ok()).unwrap_or(1))
}
/// The early-load mode a call asks for, as the global knob allows.
fn early_mode(asked: i32) -> i32 {
    match (early_all(), asked) {
        (0, _) | (_, 0) => 0,
        (2, _) => 2,
        (_, a) => a,
    }
}
/// ... and for o_a (env DSV4_OA_EARLY, same values).
fn oa_early() -> i32 {
    static V: std::sync::OnceLock<i32> = std::sync::OnceLock::new();
    *V.get_or_init(|| std::env::var("DSV4_OA_EARLY").ok().and_then(|v| v.parse().ok()).unwrap_or(1))
}

impl GpuModel {
    /// y[t][r] = W x[t] for n tokens (x row stride xs, y row stride ys, in floats).
    /// In 8-bit mode, quantised weights take x quantised on this stream first.
    pub fn mv(&self, w: MatRef, x: u64, xs: usize, y: u64, ys: usize, n: usize) -> Result<()> {
        if self.uses_q8(w.ty) {
            let qa = self.quant(x, xs, w.cols, n, w.ty)?;
            return self.mvq(w, qa, y, ys, n);
        }
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
        if self.uses_q8(w.ty) {
            let qa = self.quant(x, xs, w.cols, slots.div_ceil(x_group), w.ty)?;
            return self.mvq_experts(w, qa, x_group, y, ys, slots, eids);
        }
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

    /// Grouped matvec over expert-sorted rows: tile t = (matrix, first row,
    /// rows ≤ 8) of `tiles`; each weight row is read once per tile.
    #[allow(clippy::too_many_arguments)]
    fn mv_grouped(&self, w: MatRef, x: u64, xs: usize, y: u64, ys: usize, tiles: u64, max_tiles: usize, rows_x: usize, pre: Option<QAct>) -> Result<()> {
        let suffix = mv_suffix(w.ty).ok_or_else(|| CudaError::Unsupported(format!("type {}", w.ty.name())))?;
        if self.uses_q8(w.ty) {
            let qa = match pre {
                Some(qa) => qa,
                None => self.quant(x, xs, w.cols, rows_x, w.ty)?,
            };
            let rpb = Self::mq_grid(&w).1;
            let suffix = Self::mq_suffix(&w)?;
            return launch!(self.gpu, &format!("mqg_{suffix}"), (w.rows.div_ceil(rpb as usize) as u32, max_tiles as u32, 1), (32 * rpb, 1, 1), 0;
                w.ptr, w.row_bytes as u64, w.rows as i32, w.cols as i32, qa.q, qa.qs as i32, qa.d, qa.ds as i32, y, ys as i32, w.expert_bytes(), tiles);
        }
        let name = format!("mvg_{suffix}");
        launch!(self.gpu, &name, (w.rows.div_ceil(4) as u32, max_tiles as u32, 1), (128, 1, 1), 0;
            w.ptr, w.row_bytes as u64, w.rows as i32, w.cols as i32, x, xs as i32, y, ys as i32, w.expert_bytes(), tiles)
    }

    /// The persistent matvec's x_group argument: negative when the expert ids
    /// are the constant `iota` (the o_a group stack), so the kernel may read
    /// them, and load the rows they name, before waiting for the previous kernel.
    fn xg_arg(&self, x_group: usize, eids: u64) -> i32 {
        if eids != 0 && eids == self.s.iota.ptr { -(x_group as i32) } else { x_group as i32 }
    }

    /// Whether products with weights of type `ty` use 8-bit activations now.
    pub(crate) fn uses_q8(&self, ty: GgmlType) -> bool {
        self.q8 && matches!(ty, GgmlType::Q8_0 | GgmlType::Q2_K | GgmlType::Q4_K | GgmlType::IQ2_XXS)
    }

    /// Quantise `rows` vectors of `cols` floats (row stride xs) for weights of
    /// type `ty` (Q8_0 blocks for Q8_0, Q8_K for the others) into this
    /// stream's scratch; valid until the next `quant` on the same stream.
    pub(crate) fn quant(&self, x: u64, xs: usize, cols: usize, rows: usize, ty: GgmlType) -> Result<QAct> {
        let blk = if ty == GgmlType::Q8_0 { 32 } else { 256 };
        let sc = &self.s.q8[self.gpu.cur_index()];
        if cols % blk != 0 || rows * cols > sc.cap {
            return Err(CudaError::Unsupported(format!("8-bit activations: {rows} x {cols} values (blocks of {blk}, scratch {})", sc.cap)));
        }
        let (q0, d0, qk, dk) = if blk == 32 { (sc.q.ptr, sc.d.ptr, 0u64, 0u64) } else { (0u64, 0u64, sc.q.ptr, sc.d.ptr) };
        launch!(self.gpu, "quant_q8", (cols.div_ceil(256) as u32, rows as u32, 1), (256, 1, 1), 0;
            x, xs as i32, cols as i32, q0, d0, qk, dk)?;
        Ok(QAct { q: sc.q.ptr, d: sc.d.ptr, qs: cols, ds: cols / blk })
    }

    fn mq_grid(w: &MatRef) -> (bool, u32) {
        // few long rows: a block per row (split-K); IQ2 blocks take 8 rows so
        // the table staging is shared by more rows
        let split = w.rows < 2048;
        let rpb = if w.ty == GgmlType::IQ2_XXS { 8 } else { 4 };
        (split, rpb)
    }

    /// Kernel suffix of the 8-bit products for `w`: Q8_0 rows shorter than
    /// 64 blocks take the short-row lane mapping.
    fn mq_suffix(w: &MatRef) -> Result<&'static str> {
        if w.ty == GgmlType::Q8_0 && w.cols / 32 < 64 {
            return Ok("q8_0s");
        }
        mv_suffix(w.ty).ok_or_else(|| CudaError::Unsupported(format!("type {}", w.ty.name())))
    }

    /// y[t][r] = W xq[t] (8-bit activations) for n tokens.
    pub(crate) fn mvq(&self, w: MatRef, qa: QAct, y: u64, ys: usize, n: usize) -> Result<()> {
        if n == 1 && self.mq1p(w, None, qa, 1, y, 0, ys, 1, 0, 1)? {
            return Ok(());
        }
        let suffix = Self::mq_suffix(&w)?;
        let (split, rpb) = Self::mq_grid(&w);
        let mut done = 0;
        while done < n {
            let left = n - done;
            let nt = if left >= 8 { 8 } else if left >= 4 { 4 } else if left >= 2 { 2 } else { 1 };
            let name = format!("mq{}_{suffix}_{nt}", if split { "k" } else { "" });
            let (grid, block) = if split { ((w.rows as u32, 1, 1), (256, 1, 1)) } else { ((w.rows.div_ceil(rpb as usize) as u32, 1, 1), (32 * rpb, 1, 1)) };
            launch!(self.gpu, &name, grid, block, 0;
                w.ptr, w.row_bytes as u64, w.rows as i32, w.cols as i32,
                qa.q + (done * qa.qs) as u64, qa.qs as i32, qa.d + (done * qa.ds * F) as u64, qa.ds as i32,
                y + (done * ys * F) as u64, ys as i32, nt.min(left) as i32, 0u64, 0u64, 1i32)?;
            done += nt.min(left);
        }
        Ok(())
    }

    /// Expert matvec with 8-bit activations: y[s] = W[eids[s]] xq[s / x_group].
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn mvq_experts(&self, w: MatRef, qa: QAct, x_group: usize, y: u64, ys: usize, slots: usize, eids: u64) -> Result<()> {
        // (o_a follows the attention merge, a short latency-bound kernel its
        // early loads would slow: DSV4_OA_EARLY)
        let early = if eids == self.s.iota.ptr { oa_early() } else { 1 };
        if self.mq1p(w, None, qa, x_group, y, 0, ys, slots, eids, early)? {
            return Ok(());
        }
        let suffix = Self::mq_suffix(&w)?;
        let rpb = Self::mq_grid(&w).1;
        launch!(self.gpu, &format!("mq_{suffix}_1"), (w.rows.div_ceil(rpb as usize) as u32, slots as u32, 1), (32 * rpb, 1, 1), 0;
            w.ptr, w.row_bytes as u64, w.rows as i32, w.cols as i32, qa.q, qa.qs as i32, qa.d, qa.ds as i32,
            y, ys as i32, 1i32, eids, w.expert_bytes(), x_group as i32)
    }

    /// Single-token Q8_0 products by the persistent kernel (mmvq.cu `mq1p_*`):
    /// y[s] = W[eids[s]] xq[s / x_group] for s < slots (and likewise with w2
    /// into y2). False when it does not apply (other types, x rows that do
    /// not fit shared memory, unaligned input; env DSV4_MQ1P=0 for A/B runs).
    #[allow(clippy::too_many_arguments)]
    fn mq1p(&self, w: MatRef, w2: Option<MatRef>, qa: QAct, x_group: usize, y: u64, y2: u64, ys: usize, slots: usize, eids: u64, early: i32) -> Result<bool> {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let on = *ON.get_or_init(|| std::env::var("DSV4_MQ1P").map(|v| v != "0").unwrap_or(true));
        // rows copied with aligned 16-byte loads; x read as int4s
        let aligned = w.ptr % 16 == 0 && w.row_bytes % 16 == 0 && (eids == 0 || w.expert_bytes() % 16 == 0) && !matches!(w2, Some(m) if m.ptr % 16 != 0);
        if !on || self.no_persist.get() || w.ty != GgmlType::Q8_0 || w.cols % 32 != 0 || !aligned || qa.qs % 16 != 0 || qa.q % 16 != 0 {
            return Ok(false);
        }
        // per warp: a batch of 4 chunks of 16 (short rows: 8) blocks of 34
        // bytes, and 16 spare bytes (8 warps per block); short rows of one
        // batch and an even count: two rows per batch
        let short = w.cols / 32 < 64;
        static TWO: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let two_on = *TWO.get_or_init(|| std::env::var("DSV4_MQ1P_TWO").map(|v| v != "0").unwrap_or(true));
        let two = two_on && short && w.cols / 32 <= 32 && w.rows % 2 == 0;
        let (name, batch) = if two { ("mq1p_q8_0s2", 2 * 4 * 8 * 34) } else if short { ("mq1p_q8_0s", 4 * 8 * 34) } else { ("mq1p_q8_0", 4 * 16 * 34) };
        let smem = 8 * (batch + 16);
        let total = slots * if w2.is_some() { 2 } else { 1 } * w.rows / if two { 2 } else { 1 };
        // (DSV4_MQ1P_BPS: at most that many blocks per SM, leaving room for
        // the side branches; an experiment knob)
        static BPS: std::sync::OnceLock<(u32, u32)> = std::sync::OnceLock::new();
        let knob = |k: &str| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(u32::MAX);
        let (main_bps, side_bps) = *BPS.get_or_init(|| (knob("DSV4_MQ1P_BPS"), knob("DSV4_SIDE_BPS")));
        let bps = if self.gpu.cur_index() == 0 { main_bps } else { side_bps };
        // (DSV4_MQ1P_FREE: block slots the main-stream grids leave free, so
        // a side branch's small kernels are not locked out until they end)
        static FREE: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
        let free = *FREE.get_or_init(|| std::env::var("DSV4_MQ1P_FREE").ok().and_then(|v| v.parse().ok()).unwrap_or(0));
        let free = if self.gpu.cur_index() == 0 { free } else { 0 };
        let fit = self.gpu.resident_blocks(name, 256, smem as u32)?.min(self.gpu.sms.saturating_mul(bps)).saturating_sub(free).max(1);
        let grid = (total.div_ceil(8) as u32).min(fit);
        let (w2p, y2p) = w2.map(|m| (m.ptr, y2)).unwrap_or((0, 0));
        launch!(self.gpu, name, (grid, 1, 1), (256, 1, 1), smem as u32;
            w.ptr, w.row_bytes as u64, w.rows as i32, w.cols as i32, qa.q, qa.qs as i32, qa.d, qa.ds as i32,
            y, ys as i32, slots as i32, eids, w.expert_bytes(), self.xg_arg(x_group, eids), w2p, y2p, early_mode(early))?;
        Ok(true)
    }

    /// Two same-shaped products of one 8-bit input in one launch (decode):
    /// y1[s] = W1[eids[s]] xq[s / x_group], y2[s] likewise with W2 (eids 0:
    /// plain matrices, slots = 1).
    #[allow(clippy::too_many_arguments)]
    fn mvq_pair(&self, w1: MatRef, w2: MatRef, qa: QAct, x_group: usize, y1: u64, y2: u64, ys: usize, slots: usize, eids: u64) -> Result<()> {
        let suffix = Self::mq_suffix(&w1)?;
        if w1.ty != w2.ty || w1.rows != w2.rows || w1.cols != w2.cols || w1.row_bytes != w2.row_bytes {
            return Err(CudaError::Unsupported("paired products need equal shapes".into()));
        }
        if self.mq1p(w1, Some(w2), qa, x_group, y1, y2, ys, slots, eids, 1)? {
            return Ok(());
        }
        let rpb = Self::mq_grid(&w1).1;
        if let (GgmlType::IQ2_XXS, Some(rep)) = (w1.ty, iq2_pair_kernel()) {
            // one warp per row of both matrices (mmvq.cu iq2_pair_dot); `rep`:
            // bank-replicated look-up tables (48 KB of dynamic shared memory)
            let (name, shm) = if rep { ("mqp2r_iq2_xxs", IQ2_REP_SHMEM) } else { ("mqp2_iq2_xxs", 0) };
            return launch!(self.gpu, name, (w1.rows.div_ceil(8) as u32, slots as u32, 1), (256, 1, 1), shm;
                w1.ptr, w1.row_bytes as u64, w1.rows as i32, w1.cols as i32, qa.q, qa.qs as i32, qa.d, qa.ds as i32,
                y1, ys as i32, eids, w1.expert_bytes(), x_group as i32, w2.ptr, y2);
        }
        launch!(self.gpu, &format!("mqp_{suffix}"), (w1.rows.div_ceil(rpb as usize) as u32, (2 * slots) as u32, 1), (32 * rpb, 1, 1), 0;
            w1.ptr, w1.row_bytes as u64, w1.rows as i32, w1.cols as i32, qa.q, qa.qs as i32, qa.d, qa.ds as i32,
            y1, ys as i32, eids, w1.expert_bytes(), x_group as i32, w2.ptr, y2, slots as i32)
    }

    fn rmsnorm_rows(&self, x: u64, w: u64, d: usize, rows: usize) -> Result<()> {
        launch!(self.gpu, "rmsnorm_rows", (rows as u32, 1, 1), (512, 1, 1), 0; x, w, d as i32, self.cfg.rms_eps, 0u64, 0u64, 0u64, 0u64)
    }

    /// y = W x where `x` also exists as the fused 8-bit copy `fq` (written by
    /// its producer): 8-bit mode uses the copy, f32 mode (or float weights) x.
    #[allow(clippy::too_many_arguments)]
    fn mv_fused(&self, w: MatRef, x: u64, xs: usize, y: u64, ys: usize, n: usize, fq: &QFused) -> Result<()> {
        match self.fused(fq, w.ty) {
            Some(qa) => self.mvq(w, qa, y, ys, n),
            None => self.mv(w, x, xs, y, ys, n),
        }
    }

    /// The producer-written 8-bit copy `fq` for weights of type `ty`, when
    /// 8-bit mode uses one for them.
    fn fused(&self, fq: &QFused, ty: GgmlType) -> Option<QAct> {
        self.uses_q8(ty).then(|| fq.get(ty)).flatten()
    }

    fn is_k(ty: GgmlType) -> bool {
        matches!(ty, GgmlType::Q2_K | GgmlType::Q4_K | GgmlType::IQ2_XXS)
    }

    /// HcPre for n tokens: a = RMSNorm(collapse(x)), hw = post/comb.
    /// `want0` / `wantk`: consumers of `a` multiply Q8_0 / K-type weights, so
    /// hc_pre also writes those 8-bit copies (8-bit mode).
    /// Parts of the state's Gram matrix hc_post writes (none past 32 parts).
    fn gram_parts(&self) -> usize {
        let p = self.cfg.dim.div_ceil(256);
        if p <= 32 && self.cfg.hc <= 4 { p } else { 0 }
    }

    /// `gram`: x was just written by hc_post, which left its Gram parts.
    #[allow(clippy::too_many_arguments)]
    /// Returns the join of the HC-weights branch (hw: post / comb, only read
    /// by hc_post) when it runs beside the slices on side stream 4.
    fn hc_pre(&self, hc: &GHc, norm: u64, x: u64, n: usize, want0: bool, wantk: bool, gram: bool, mix_ready: bool) -> Result<Option<crate::device::Join>> {
        let c = self.cfg.clone();
        let nmix = (2 + c.hc) * c.hc;
        let (mixes, a, hw) = (self.s.mixes.ptr, self.s.a.ptr, self.s.hw.ptr);
        // the mixes: partials the previous hc_post left, or computed here
        let (nparts, pstride) = if mix_ready { (self.cfg.dim.div_ceil(256) as i32, (n * nmix) as i32) } else { self.hc_mixes(hc, x, n, nmix)? };
        let (q0, d0, qk, dk) = self.s.fa.args(self.q8, want0, wantk);
        // a token's columns in slices of 256 (or more) over several blocks
        let k256 = if c.dim % 256 == 0 { c.dim / 256 } else { 1 };
        let slices = [16usize, 8, 4, 2, 1].into_iter().find(|s| k256 % s == 0).unwrap_or(1);
        let gp = if gram && self.gram_parts() > 0 { self.s.gp.ptr } else { 0u64 };
        // The HC weights (a Sinkhorn: one long dependent chain) are only read
        // by hc_post, after the attention or the MoE: with several slices
        // they run as their own launch on side stream 4 (part 2) and the
        // layer's next kernels wait for the slices alone (part 1). One slice:
        // block 0 of a token does both (part 0). (env DSV4_HC_SPLIT=0: the
        // weights in block 0 beside the slices, in the same launch, for A/B)
        static SPLIT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let split = slices > 1 && *SPLIT.get_or_init(|| std::env::var("DSV4_HC_SPLIT").map(|v| v != "0").unwrap_or(true));
        let mut join = None;
        if split {
            let (_, j) = self.gpu.on_side(4, || {
                launch!(self.gpu, "hc_pre", (n as u32, 1, 1), (256, 1, 1), 0;
                    x, mixes, hc.scale.ptr, hc.base.ptr, norm, c.dim as i32, c.hc as i32, c.sinkhorn_iters as i32, c.hc_eps, c.rms_eps, a, hw,
                    0u64, 0u64, 0u64, 0u64, nparts, pstride, gp, self.gram_parts() as i32, 2i32)
            })?;
            join = Some(j);
        }
        // (part 0: block 0 of a token computes the weights beside the slices)
        let (gy, part) = if split { (slices, 1i32) } else if slices > 1 { (slices + 1, 0) } else { (1, 0) };
        launch!(self.gpu, "hc_pre", (n as u32, gy as u32, 1), (256, 1, 1), 0;
            x, mixes, hc.scale.ptr, hc.base.ptr, norm, c.dim as i32, c.hc as i32, c.sinkhorn_iters as i32, c.hc_eps, c.rms_eps, a, hw,
            q0, d0, qk, dk, nparts, pstride, gp, self.gram_parts() as i32, part)?;
        Ok(join)
    }

    /// The HC mix products fn . x (`rows` of them per token) into the `mixes`
    /// scratch; returns (partials, stride) for hc_pre / hc_head to add. A
    /// single decode token splits each long F16 row over 8 blocks.
    fn hc_mixes(&self, hc: &GHc, x: u64, n: usize, rows: usize) -> Result<(i32, i32)> {
        let c = &self.cfg;
        let md = c.hc * c.dim;
        // (blocks per row; env DSV4_MIX_PARTS for A/B runs, 1..=8: 2 / 4 / 8
        // measured 7.26 / 7.18-7.20 / 7.14 ms at 4K, q8, one H200; later
        // 7.12 (4) vs 7.08 (8))
        static P: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
        let parts = *P.get_or_init(|| std::env::var("DSV4_MIX_PARTS").ok().and_then(|v| v.parse().ok()).unwrap_or(8usize).clamp(1, 8));
        if n == 1 && hc.fn_.ty == GgmlType::F16 && md % 8 == 0 && parts * rows <= self.s.n * (2 + c.hc) * c.hc {
            launch!(self.gpu, "mvks_f16", (rows as u32, parts as u32, 1), (256, 1, 1), 0;
                hc.fn_.buf.ptr, hc.fn_.row_bytes as u64, md as i32, x, self.s.mixes.ptr, rows as i32)?;
            return Ok((parts as i32, rows as i32));
        }
        self.mv(hc.fn_.r(), x, md, self.s.mixes.ptr, rows, n)?;
        Ok((1, 0))
    }

    /// HcPost; `moe` = (yk, ysh, pos): f is the MoE output, reduced inside;
    /// `next`: the HC whose mix products hc_post should leave as partials
    /// (when `mix_fused` allows; the consumer must be told the same).
    fn hc_post_with(&self, x: u64, f: u64, n: usize, moe: Option<(u64, u64, u64)>, next: Option<&GHc>) -> Result<()> {
        let c = &self.cfg;
        let gp = if self.gram_parts() > 0 { self.s.gp.ptr } else { 0u64 };
        let (yk, ysh, pos) = moe.unwrap_or((0, 0, 0));
        let (fnw, frows) = match next {
            Some(h) if self.mix_fused(h, n) => (h.fn_.buf.ptr, h.fn_.rows as i32),
            _ => (0u64, 0i32),
        };
        launch!(self.gpu, "hc_post", (n as u32, c.dim.div_ceil(256) as u32, 1), (256, 1, 1), 0;
            x, f, self.s.hw.ptr, c.dim as i32, c.hc as i32, gp, yk, ysh, c.n_experts_used as i32, pos, fnw, frows, self.s.mixes.ptr)
    }

    /// Whether hc_post computes `hc`'s mix products as partials for n tokens
    /// (decode only: the partials of a longer chunk would not fit `mixes`).
    pub(crate) fn mix_fused(&self, hc: &GHc, n: usize) -> bool {
        let c = &self.cfg;
        let parts = c.dim.div_ceil(256);
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        // measured slower than the separate split-K product (H200, q8, 4K: 8.55 vs
        // 8.35-8.39 ms; docs/perf.md), so opt-in (DSV4_MIX_FUSE=1)
        let on = *ON.get_or_init(|| std::env::var("DSV4_MIX_FUSE").map(|v| v == "1").unwrap_or(false));
        on && n == 1 && hc.fn_.ty == GgmlType::F16 && hc.fn_.cols == c.hc * c.dim && hc.fn_.rows <= 32 && c.hc <= 4
            && parts * hc.fn_.rows <= self.s.n * (2 + c.hc) * c.hc
    }

    /// Logits of one token's HC state at x (main head or the MTP's).
    fn head(&self, hc: &GHc, norm: u64, x: u64, mix_ready: bool) -> Result<Vec<f32>> {
        self.enqueue_head_with(hc, norm, x, mix_ready)?;
        self.gpu.read_f32(self.s.logits.ptr, self.cfg.vocab)
    }

    /// Queue the head computation; logits land in the scratch `logits` buffer.
    pub(crate) fn enqueue_head(&self, hc: &GHc, norm: u64, x: u64) -> Result<()> {
        self.enqueue_head_with(hc, norm, x, false)
    }

    /// `mix_ready`: the last hc_post left this head's mix partials (decode).
    fn enqueue_head_with(&self, hc: &GHc, norm: u64, x: u64, mix_ready: bool) -> Result<()> {
        let c = self.cfg.clone();
        let (mixes, hy, logits) = (self.s.mixes.ptr, self.s.head_y.ptr, self.s.logits.ptr);
        let (nparts, pstride) = if mix_ready { (c.dim.div_ceil(256) as i32, c.hc as i32) } else { self.hc_mixes(hc, x, 1, c.hc)? };
        launch!(self.gpu, "hc_head", (1, 1, 1), (1024, 1, 1), 0;
            x, mixes, hc.scale.ptr, hc.base.ptr, norm, c.dim as i32, c.hc as i32, c.hc_eps, c.rms_eps, hy, nparts, pstride)?;
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
                    out.logits.extend(self.head(&self.hc_head, norm, self.s.x.f32_at(t * md), n == 1 && self.mix_fused(&self.hc_head, 1))?);
                }
            } else if done + n == tokens.len() {
                out.logits = self.head(&self.hc_head, norm, self.s.x.f32_at((n - 1) * md), n == 1 && self.mix_fused(&self.hc_head, 1))?;
            }
            done += n;
        }
        Ok(out)
    }

    fn enqueue_blocks(&self, st: &mut GState, n: usize) -> Result<()> {
        let pp = st.pos_dev.ptr;
        for (l, b) in self.blocks.iter().enumerate() {
            let next = self.blocks.get(l + 1).map(|nb| &nb.hc_attn).unwrap_or(&self.hc_head);
            self.block_forward(b, &mut st.layers[l], n, st.pos, pp, self.s.x.ptr, l > 0, next)?;
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
            self.block_forward(&mtp.block, &mut mst.layers[0], 1, mst.pos, pp, x, false, &mtp.hc_head)?;
            launch!(self.gpu, "advance_pos", (1, 1, 1), (32, 1, 1), 0; pp, 1i32)?;
            mst.pos += 1;
            self.head(&mtp.hc_head, mtp.norm.ptr, x, self.mix_fused(&mtp.hc_head, 1))
        }
    }

    /// `after_post`: x was last written by an hc_post (every block of a pass
    /// but the first), so the attention HcPre can take its Gram parts.
    #[allow(clippy::too_many_arguments)]
    /// `next`: the HC after this block (the next block's attention HC or the
    /// head's), whose mixes the block's last hc_post leaves as partials.
    fn block_forward(&self, b: &GBlock, st: &mut GLayerState, n: usize, p0: usize, pp: u64, x: u64, after_post: bool, next: &GHc) -> Result<()> {
        let d = self.cfg.dim;
        // 8-bit copies of `a` for the consumers: attention projections (q_a,
        // kv) and the FFN's experts / shared expert
        let q0 = |t: GgmlType| t == GgmlType::Q8_0;
        // (after an hc_post, that hc_post left this HC's mix partials)
        let jw = self.hc_pre(&b.hc_attn, b.attn_norm.ptr, x, n, q0(b.q_a.ty) || q0(b.kv.ty), Self::is_k(b.q_a.ty) || Self::is_k(b.kv.ty), after_post,
            after_post && self.mix_fused(&b.hc_attn, n))?;
        // (the HC weights branch is joined inside, before o_b: a join costs
        // the next kernel its programmatic launch, cheapest at o_b's input
        // quantisation; hc_post then follows o_b directly)
        self.attention(b, st, n, p0, pp, jw)?;
        let f = self.s.f.ptr;
        self.hc_post_with(x, f, n, None, Some(&b.hc_ffn))?;
        let sh_ty = b.shared.as_ref().map(|s| s.0.ty);
        let want0 = q0(b.gate_exps.ty) || sh_ty.is_some_and(q0);
        let wantk = Self::is_k(b.gate_exps.ty) || sh_ty.is_some_and(Self::is_k);
        let jw = self.hc_pre(&b.hc_ffn, b.ffn_norm.ptr, x, n, want0, wantk, true, self.mix_fused(&b.hc_ffn, n))?;
        let red = self.moe(b, n)?;
        if let Some(j) = jw {
            self.gpu.join(j)?;
        }
        let y = self.s.y.ptr;
        let _ = d;
        self.hc_post_with(x, y, n, Some(red), Some(next))
    }

    fn compress(&self, cp: &GComp, kvs: u64, scs: u64, rows: u64, n: usize, pp: u64, is_indexer: bool, omega: u64) -> Result<()> {
        // rows are packed (state.rs): the indexer's FP4 rows or the attention rows
        let stride = state::dev_stride(if is_indexer { self.idx_fmt() } else { self.attn_fmt() });
        let rope_bf16 = (self.kv_rope == dsv4_engine::pack::RopeStore::Bf16) as i32;
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
            pooled, rows, stride as i32, pp, n as i32, cp.d as i32, self.cfg.rope_dim as i32, omega, cp.norm.ptr, self.cfg.rms_eps, r as i32, is_indexer as i32, rope_bf16)
    }

    fn attention(&self, b: &GBlock, st: &mut GLayerState, n: usize, p0: usize, pp: u64, jw: Option<crate::device::Join>) -> Result<()> {
        let c = self.cfg.clone();
        let (h, hd, rd) = (c.n_heads, c.head_dim, c.rope_dim);
        let omega = self.omega(b.layer);
        let s = &self.s;
        let (a, qr, q, kv, o, u, f) = (s.a.ptr, s.qr.ptr, s.q.ptr, s.kv.ptr, s.o.ptr, s.u.ptr, s.f.ptr);
        let ratio = c.compress_ratios[b.layer];
        // visible compressed rows per token (read by the indexer and the
        // attention): on a side stream, off the q path's chain
        let j_vis = if ratio != 0 {
            let (_, j) = self.gpu.on_side(2, || {
                launch!(self.gpu, "set_vis", ((n as u32).div_ceil(128), 1, 1), (128, 1, 1), 0; pp, n as i32, ratio as i32, self.s.vis.ptr)
            })?;
            Some(j)
        } else {
            None
        };
        // Independent branches, parallel in the captured graph: the kv row and
        // the two compressors (they only need `a`) beside the q path.
        let (_, j_kv) = self.gpu.on_side(1, || -> Result<()> {
            self.mv_fused(b.kv.r(), a, c.dim, kv, hd, n, &self.s.fa)?;
            launch!(self.gpu, "row_finish", (n as u32, 1, 1), (128, 1, 1), 0;
                kv, hd as i32, 1i32, rd as i32, omega, pp, b.kv_norm.ptr, c.rms_eps, 1i32, self.ablate_kv_fp8 as i32)?;
            if n == 1 {
                // a single token's ring slot (p mod window) holds position
                // p - window, outside its own window: store it here, off the
                // critical path (a chunk must store after its attention)
                launch!(self.gpu, "ring_store", (1, 1, 1), (128, 1, 1), 0; kv, st.ring.ptr, 1i32, pp, c.window as i32, hd as i32)?;
            }
            Ok(())
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
        self.mv_fused(b.q_a.r(), a, c.dim, qr, c.q_lora_rank, n, &self.s.fa)?;
        {
            // RMSNorm of qr, writing the 8-bit copies q_b and the indexer's q_b take
            let iq_ty = b.idx.as_ref().map(|ix| ix.q_b.ty);
            let want0 = b.q_b.ty == GgmlType::Q8_0 || iq_ty == Some(GgmlType::Q8_0);
            let wantk = Self::is_k(b.q_b.ty) || iq_ty.is_some_and(Self::is_k);
            let (q0, d0, qk, dk) = self.s.fqr.args(self.q8, want0, wantk);
            launch!(self.gpu, "rmsnorm_rows", (n as u32, 1, 1), (512, 1, 1), 0;
                qr, b.q_norm.ptr, c.q_lora_rank as i32, c.rms_eps, q0, d0, qk, dk)?;
        }
        // The indexer (its q from qr, its head weights from a, scores over
        // the compressed indexer rows, top-k) runs beside q_b: on side stream
        // 3, after the indexer compressor queued there (whose rows it reads).
        let mut use_sel = false;
        let mut j_ix = None;
        if let (Some(ix), Some(irows)) = (&b.idx, &st.idx_rows) {
            use_sel = true;
            let (ih, id) = (c.index_heads, c.index_head_dim);
            let (iq, iw, vis, scores, sel, cnt) = (self.s.iq.ptr, self.s.iw.ptr, self.s.vis.ptr, self.s.scores.ptr, self.s.sel.ptr, self.s.cnt.ptr);
            // its q and head weights on side stream 4, beside the indexer
            // compressor (stream 3), whose new row only the scores need
            let (_, jq) = self.gpu.on_side(4, || -> Result<()> {
                self.mv_fused(ix.q_b.r(), qr, c.q_lora_rank, iq, ih * id, n, &self.s.fqr)?;
                launch!(self.gpu, "row_finish", ((n * ih) as u32, 1, 1), (128, 1, 1), 0;
                    iq, id as i32, ih as i32, rd as i32, omega, pp, 0u64, c.rms_eps, 2i32, 0i32)?;
                self.mv(ix.proj.r(), a, c.dim, iw, ih, n)
            })?;
            let (_, j) = self.gpu.on_side(3, || -> Result<()> {
                self.gpu.wait_on_current(&jq)?;
                if let Some(jv) = &j_vis {
                    self.gpu.wait_on_current(jv)?;
                }
                let wscale = (id as f32).powf(-0.5) * (ih as f32).powf(-0.5);
                let ld = self.ctx / ratio + 1;
                // fixed grid (grid-stride inside) so the launch is position independent
                let blocks_x = (ld.div_ceil(8) as u32).min(264);
                let istride = state::dev_stride(self.idx_fmt());
                // (q rows padded by 4 floats in shared memory, see attn.cu)
                if matches!(id, 32 | 64 | 128) && (ih * (id + 4) + ih) * F <= 48 * 1024 {
                    // 1-32 threads per key row (see attn.cu); at least 264 blocks so
                    // short contexts still spread over the GPU
                    let bx = (ld.div_ceil(128) as u32).clamp(264, 1024);
                    launch!(self.gpu, &format!("index_scores_rt{id}"), (bx, n as u32, 1), (128, 1, 1), ((ih * (id + 4) + ih) * F) as u32;
                        iq, iw, irows.ptr, istride as i32, vis, ih as i32, wscale, scores, ld as i32, c.index_topk as i32)?;
                } else {
                    launch!(self.gpu, "index_scores", (blocks_x, n as u32, 1), (256, 1, 1), ((ih * (id + 1) + 8 * id) * F) as u32;
                        iq, iw, irows.ptr, istride as i32, vis, ih as i32, id as i32, wscale, scores, ld as i32, c.index_topk as i32)?;
                }
                launch!(self.gpu, "topk_select", (n as u32, 1, 1), (1024, 1, 1), 0;
                    scores, ld as i32, vis, c.index_topk as i32, sel, cnt)
            })?;
            j_ix = Some(j);
        }
        // With an indexer beside it (its chain only needs qr and `a`), q_b's
        // persistent grid would lock the indexer's kernels out of the GPU
        // until it ends, putting the whole chain after q_b: the per-row
        // kernel leaves SMs as its blocks retire (env DSV4_QB_ROWS=0: the
        // persistent grid anyway, for A/B runs)
        static QB_ROWS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let qb_rows = use_sel && *QB_ROWS.get_or_init(|| std::env::var("DSV4_QB_ROWS").map(|v| v != "0").unwrap_or(true));
        self.no_persist.set(qb_rows);
        let r = self.mv_fused(b.q_b.r(), qr, c.q_lora_rank, q, h * hd, n, &self.s.fqr);
        self.no_persist.set(false);
        r?;
        launch!(self.gpu, "row_finish", ((n * h) as u32, 1, 1), (128, 1, 1), 0;
            q, hd as i32, h as i32, rd as i32, omega, pp, 0u64, c.rms_eps, 0i32, 0i32)?;
        self.gpu.join(j_icomp)?;
        if let Some(j) = j_ix {
            self.gpu.join(j)?;
        }
        self.gpu.join(j_kv)?;
        self.gpu.join(j_comp)?;
        if let Some(j) = j_vis {
            self.gpu.join(j)?;
        }
        // The HC-weights branch (read only by hc_post) is long done by now:
        // joined here, where the attention kernel already waits on several
        // branches, it costs no kernel its programmatic launch (env
        // DSV4_HCJ=late: before o_b's input quantisation, for A/B runs)
        static HCJ_LATE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let mut jw = jw;
        if !*HCJ_LATE.get_or_init(|| std::env::var("DSV4_HCJ").is_ok_and(|v| v == "late")) {
            if let Some(j) = jw.take() {
                self.gpu.join(j)?;
            }
        }
        // attention over window + compressed rows
        // key-count bound from the capacity, not the position (graph replay)
        let _ = p0;
        let max_keys = c.window + if ratio == 0 { 0 } else if use_sel { c.index_topk } else { self.ctx / ratio + 1 };
        let rows_ptr = st.rows.as_ref().map(|r| r.ptr).unwrap_or(0);
        // packed rows: byte stride * 2 + (RoPE dims in bf16)
        let rfmt = (state::dev_stride(self.attn_fmt()) * 2) as i32 + (self.kv_rope == dsv4_engine::pack::RopeStore::Bf16) as i32;
        let (sel_ptr, sel_ld) = if use_sel { (self.s.sel.ptr, c.index_topk) } else { (0u64, 0) };
        let scale = (hd as f32).powf(-0.5);
        // single-token steps split the keys over several blocks (flash-decoding)
        // (16 keys per split at most: a warp's keys are dependent DRAM round
        // trips, so short splits keep the kernel off the latency chain)
        let nsplit = if n == 1 { max_keys.div_ceil(16).clamp(1, attn_split_max()) } else { 1 };
        let per = max_keys.div_ceil(nsplit);
        const HB: usize = 4;
        let part = self.s.part.ptr;
        // dynamic shared: HB x per scores + 8 warps x hd for the P.V sum
        launch!(self.gpu, "sink_attn", (n as u32, h.div_ceil(HB) as u32, nsplit as u32), (256, 1, 1), ((HB * per + 8 * hd) * F) as u32;
            q, kv, st.ring.ptr, rows_ptr, rfmt, sel_ptr, self.s.cnt.ptr, self.s.vis.ptr, sel_ld as i32, b.sinks.ptr,
            h as i32, hd as i32, rd as i32, omega, pp, c.window as i32, scale, o, part, per as i32, attn_prefetch())?;
        // 8-bit mode: the combine also writes o as Q8_0 for the output projection
        let fo = nsplit > 1 && self.uses_q8(b.o_a.ty) && b.o_a.ty == GgmlType::Q8_0 && (h * hd / c.o_groups) % 32 == 0 && hd <= 1024;
        if nsplit > 1 {
            let (q0, d0) = if fo { (self.s.fo.q0.ptr, self.s.fo.d0.ptr) } else { (0u64, 0u64) };
            // (dims in chunks over grid z: fewer partial loads per thread;
            // env DSV4_COMBINE_Z, 1..=8)
            static CZ: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
            let cz = *CZ.get_or_init(|| std::env::var("DSV4_COMBINE_Z").ok().and_then(|v| v.parse().ok()).unwrap_or(4usize).clamp(1, 8));
            let cz = if hd % (32 * cz) == 0 { cz } else { 1 };
            launch!(self.gpu, "attn_combine", (1, h as u32, cz as u32), (128, 1, 1), 0;
                part, nsplit as i32, b.sinks.ptr, h as i32, hd as i32, rd as i32, omega, pp, o, q0, d0)?;
        }
        let stored = n.min(c.window);
        if n > 1 {
            launch!(self.gpu, "ring_store", (stored as u32, 1, 1), (128, 1, 1), 0; kv, st.ring.ptr, n as i32, pp, c.window as i32, hd as i32)?;
        }
        // grouped low-rank output projection
        let (g, ro) = (c.o_groups, c.o_lora_rank);
        let gw = h * hd / g;
        if n == 1 {
            // all groups in one launch: group gi is "expert" gi of a stack of
            // ro-row matrices, input slice gi*gw, output slice gi*ro
            if fo {
                let qa = QAct { q: self.s.fo.q0.ptr, d: self.s.fo.d0.ptr, qs: gw, ds: gw / 32 };
                self.mvq_experts(b.o_a.r().rows(0, ro), qa, 1, u, ro, g, self.s.iota.ptr)?;
            } else {
                self.mv_experts(b.o_a.r().rows(0, ro), o, gw, 1, u, ro, g, self.s.iota.ptr)?;
            }
        } else {
            for gi in 0..g {
                self.mv(b.o_a.r().rows(gi * ro, ro), o + (gi * gw * F) as u64, h * hd, u + (gi * ro * F) as u64, g * ro, n)?;
            }
        }
        if let Some(j) = jw {
            self.gpu.join(j)?;
        }
        self.mv(b.o_b.r(), u, g * ro, f, c.dim, n)
    }

    /// The MoE of n tokens up to the expert outputs; returns (yk, ysh, pos)
    /// for hc_post to reduce (ysh 0 without a shared expert, pos 0 unless the
    /// slots were sorted by expert).
    fn moe(&self, b: &GBlock, n: usize) -> Result<(u64, u64, u64)> {
        let c = self.cfg.clone();
        let (d, ff) = (c.dim, c.expert_ff);
        let (a, yk) = (self.s.a.ptr, self.s.yk.ptr);
        let limit = c.swiglu_limits[b.layer];
        // the shared expert runs beside the routed ones (parallel graph branch)
        let j_shared = match &b.shared {
            Some((w1, w3, w2)) => {
                let (_, j) = self.gpu.on_side(1, || -> Result<()> {
                    let (sg, su, sh, ys) = (self.s.sg.ptr, self.s.su.ptr, self.s.sh.ptr, self.s.ysh.ptr);
                    match (n, self.fused(&self.s.fa, w1.ty)) {
                        (1, Some(qa)) if w1.ty == w3.ty && w1.rows == w3.rows => self.mvq_pair(w1.r(), w3.r(), qa, 1, sg, su, ff, 1, 0)?,
                        _ => {
                            self.mv_fused(w1.r(), a, d, sg, ff, n, &self.s.fa)?;
                            self.mv_fused(w3.r(), a, d, su, ff, n, &self.s.fa)?;
                        }
                    }
                    let (q0, d0, qk, dk) = self.s.fsh.args(self.q8, w2.ty == GgmlType::Q8_0, Self::is_k(w2.ty));
                    launch!(self.gpu, "swiglu", (((n * ff) as u32).div_ceil(256).min(65535), 1, 1), (256, 1, 1), 0;
                        sg, su, 0u64, ff as i32, n as i32, limit, sh, 0u64, q0, d0, qk, dk)?;
                    self.mv_fused(w2.r(), sh, ff, ys, d, n, &self.s.fsh)
                })?;
                Some(j)
            }
            None => None,
        };
        let mut pos = 0u64;
        self.routed(b, n, &mut pos)?;
        let mut ysh = 0u64;
        if let Some(j) = j_shared {
            self.gpu.join(j)?;
            ysh = self.s.ysh.ptr;
        }
        Ok((yk, ysh, pos))
    }

    /// Decode MoE after the gate / up products: swiglu (weighted, 8-bit copy
    /// for the down products) and the down products per slot.
    fn routed_tail(&self, b: &GBlock, slots: usize) -> Result<()> {
        let c = &self.cfg;
        let (d, ff) = (c.dim, c.expert_ff);
        let s = &self.s;
        let (eids, ew, g, up, hbuf, yk) = (s.eids.ptr, s.ew.ptr, s.g.ptr, s.up.ptr, s.h.ptr, s.yk.ptr);
        let limit = c.swiglu_limits[b.layer];
        let dty = b.down_exps.ty;
        let (q0, d0, qk, dk) = self.s.fh.args(self.q8, dty == GgmlType::Q8_0, Self::is_k(dty));
        launch!(self.gpu, "swiglu", (((slots * ff) as u32).div_ceil(256).min(65535), 1, 1), (256, 1, 1), 0;
            g, up, ew, ff as i32, slots as i32, limit, hbuf, 0u64, q0, d0, qk, dk)?;
        match self.fused(&self.s.fh, dty) {
            Some(qa) => self.mvq_experts(b.down_exps.r(), qa, 1, yk, d, slots, eids),
            None => self.mv_experts(b.down_exps.r(), hbuf, ff, 1, yk, d, slots, eids),
        }
    }

    /// Router and routed experts of `moe` (yk; `pos` set when the slots were
    /// sorted by expert).
    fn routed(&self, b: &GBlock, n: usize, pos: &mut u64) -> Result<()> {
        let c = self.cfg.clone();
        let (d, k, ne, ff) = (c.dim, c.n_experts_used, c.n_experts, c.expert_ff);
        let s = &self.s;
        let (a, rlog, eids, ew, g, up, hbuf, yk) = (s.a.ptr, s.rlog.ptr, s.eids.ptr, s.ew.ptr, s.g.ptr, s.up.ptr, s.h.ptr, s.yk.ptr);
        let limit = c.swiglu_limits[b.layer];
        self.mv(b.gate.r(), a, d, rlog, ne, n)?;
        let bias = b.bias.as_ref().map(|x| x.ptr).unwrap_or(0);
        let tid = b.tid2eid.as_ref().map(|x| x.ptr).unwrap_or(0);
        let slots = n * k;
        let (gt, ut) = (b.gate_exps.r(), b.up_exps.r());
        launch!(self.gpu, "router", (n as u32, 1, 1), (256, 1, 1), 0;
            rlog, ne as i32, k as i32, bias, tid, self.s.tok.ptr, c.weights_norm as i32, c.route_scale, eids, ew)?;
        if n == 1 {
            // decode: one matvec per (token, expert) slot, expert id read on the device
            // 8-bit mode: gate / up take HcPre's fused copy of `a`, down the
            // copy swiglu writes
            let fa = |ty: GgmlType| self.fused(&self.s.fa, ty);
            match (fa(gt.ty), fa(ut.ty)) {
                // gate and up of all slots in one launch
                (Some(qa), Some(_)) if gt.ty == ut.ty && gt.rows == ut.rows => self.mvq_pair(gt, ut, qa, k, g, up, ff, slots, eids)?,
                (qg, qu) => {
                    match qg {
                        Some(qa) => self.mvq_experts(gt, qa, k, g, ff, slots, eids)?,
                        None => self.mv_experts(gt, a, d, k, g, ff, slots, eids)?,
                    }
                    match qu {
                        Some(qa) => self.mvq_experts(ut, qa, k, up, ff, slots, eids)?,
                        None => self.mv_experts(ut, a, d, k, up, ff, slots, eids)?,
                    }
                }
            }
            self.routed_tail(b, slots)?;
        } else {
            // prefill: slots sorted by expert, each expert's weights read once
            // per tile of up to 8 tokens instead of once per token
            let (order, pos_b, tiles, ag) = (self.s.order.ptr, self.s.pos.ptr, self.s.tiles.ptr, self.s.ag.ptr);
            let max_tiles = slots.div_ceil(8) + ne;
            launch!(self.gpu, "moe_group", (1, 1, 1), (1024, 1, 1), 0;
                eids, slots as i32, ne as i32, 8i32, max_tiles as i32, order, pos_b, tiles)?;
            launch!(self.gpu, "gather_rows", (((slots * d) as u32).div_ceil(256).min(65535), 1, 1), (256, 1, 1), 0;
                a, order, k as i32, d as i32, slots as i32, ag)?;
            // gate and up share one quantisation of the gathered rows
            let qag = if self.uses_q8(b.gate_exps.ty) && b.gate_exps.ty == b.up_exps.ty { Some(self.quant(ag, d, d, slots, b.gate_exps.ty)?) } else { None };
            self.mv_grouped(b.gate_exps.r(), ag, d, g, ff, tiles, max_tiles, slots, qag)?;
            self.mv_grouped(b.up_exps.r(), ag, d, up, ff, tiles, max_tiles, slots, qag)?;
            let dty = b.down_exps.ty;
            let (q0, d0, qk, dk) = self.s.fh.args(self.q8, dty == GgmlType::Q8_0, Self::is_k(dty));
            launch!(self.gpu, "swiglu", (((slots * ff) as u32).div_ceil(256).min(65535), 1, 1), (256, 1, 1), 0;
                g, up, ew, ff as i32, slots as i32, limit, hbuf, order, q0, d0, qk, dk)?;
            let pre = self.fused(&self.s.fh, dty);
            self.mv_grouped(b.down_exps.r(), hbuf, ff, yk, d, tiles, max_tiles, slots, pre)?;
            *pos = pos_b;
        }
        Ok(())
    }
}
