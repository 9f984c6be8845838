//! Sequence state on the GPU: allocation for a context capacity, in-place
//! reset (captured graphs stay valid), and conversion to and from the engine's
//! portable host `State` (session save/load, snapshots).
//!
//! Compressed rows live on the device packed, in the byte layouts of
//! `dsv4_engine::pack` (FP8 codes + ue8m0 exponents + f32 or bf16 RoPE dims;
//! FP4 codes + exponents), each row at a stride of its byte size rounded up
//! to a multiple of 4 (`dev_stride`: V4 Flash 712 B attention rows with f32
//! RoPE, 584 B with bf16, 68 B indexer rows). Export and import are straight
//! copies of those bytes (the padding stripped or added), so the host `State`
//! holds exactly what the device held.

use dsv4_engine::pack::{PackedRows, RopeStore, RowFormat, StateBytes};

use super::*;

/// Device byte stride of a packed row: its size rounded up to 4 bytes (the
/// code words of a row then load aligned; the pad bytes stay zero).
pub fn dev_stride(fmt: RowFormat) -> usize {
    fmt.row_bytes().div_ceil(4) * 4
}

/// Bytes of one compressed-row buffer: `ctx / ratio` rows plus one spare (the
/// emission kernels' grid is fixed by the capacity), at the device stride.
fn rows_alloc_bytes(ctx: usize, ratio: usize, fmt: RowFormat) -> usize {
    (ctx / ratio + 1) * dev_stride(fmt)
}

/// f32 values of one compressor state buffer (kv or score).
fn comp_len(ratio: usize, coff: usize, d: usize) -> usize {
    (if coff == 2 { 2 * ratio } else { ratio }) * coff * d
}

/// Device bytes of the main model's state for `ctx` tokens with RoPE dims
/// stored as `rope`, split by part: the same arithmetic `GpuModel::new_state`
/// allocates with (tests check one against the other on the device).
pub fn gpu_state_bytes(cfg: &Config, ctx: usize, rope: RopeStore) -> StateBytes {
    let (afmt, ifmt) = (RowFormat::attn_with(cfg, rope), RowFormat::indexer(cfg));
    let mut s = StateBytes::default();
    for l in 0..cfg.n_layers {
        s.ring += cfg.window * cfg.head_dim * F;
        let r = cfg.compress_ratios.get(l).copied().unwrap_or(0);
        if r == 0 {
            continue;
        }
        s.rows += rows_alloc_bytes(ctx, r, afmt);
        s.comp += 2 * comp_len(r, cfg.coff(l), cfg.head_dim) * F;
        if cfg.has_indexer(l) {
            s.idx_rows += rows_alloc_bytes(ctx, r, ifmt);
            s.comp += 2 * comp_len(r, 2, cfg.index_head_dim) * F;
        }
    }
    s
}

/// One layer's device state, sized from (ratio, coff, d) of its compressors.
pub fn alloc_layer_state(g: &Gpu, cfg: &Config, ctx: usize, rope: RopeStore, comp: Option<(usize, usize, usize)>, idx: Option<(usize, usize, usize)>) -> Result<GLayerState> {
    let comp_state = |(ratio, coff, d): (usize, usize, usize)| -> Result<(DevBuf, DevBuf)> {
        let n = comp_len(ratio, coff, d);
        let kv = g.alloc_zeroed(n * F)?;
        let sc = g.upload(&vec![f32::NEG_INFINITY; n])?;
        Ok((kv, sc))
    };
    let (rows, comp_kv, comp_sc) = match comp {
        Some(c) => {
            let (k, s) = comp_state(c)?;
            (Some(g.alloc_zeroed(rows_alloc_bytes(ctx, c.0, RowFormat::attn_with(cfg, rope)))?), Some(k), Some(s))
        }
        None => (None, None, None),
    };
    let (idx_rows, idx_kv, idx_sc) = match idx {
        Some(c) => {
            let (k, s) = comp_state(c)?;
            (Some(g.alloc_zeroed(rows_alloc_bytes(ctx, c.0, RowFormat::indexer(cfg)))?), Some(k), Some(s))
        }
        None => (None, None, None),
    };
    Ok(GLayerState { ring: g.alloc_zeroed(cfg.window * cfg.head_dim * F)?, rows, comp_kv, comp_sc, idx_rows, idx_kv, idx_sc })
}

/// The main model's state of `cfg` for `ctx` tokens, allocated from the config
/// alone (what `new_state` allocates for a model of that config): measures the
/// device figure of shapes whose weights are not loaded (V4 Flash at 1M).
pub fn alloc_state_for(g: &Gpu, cfg: &Config, ctx: usize, rope: RopeStore) -> Result<Vec<GLayerState>> {
    (0..cfg.n_layers)
        .map(|l| {
            let r = cfg.compress_ratios.get(l).copied().unwrap_or(0);
            let comp = (r != 0).then_some((r, cfg.coff(l), cfg.head_dim));
            let idx = (r != 0 && cfg.has_indexer(l)).then_some((r, 2, cfg.index_head_dim));
            alloc_layer_state(g, cfg, ctx, rope, comp, idx)
        })
        .collect()
}

/// Reads `n` bytes of device memory (a multiple of 4: packed rows at the device stride).
fn read_bytes(g: &Gpu, ptr: u64, n: usize) -> Result<Vec<u8>> {
    debug_assert_eq!(n % 4, 0);
    let words = g.read_i32(ptr, n / 4)?;
    Ok(bytemuck::cast_slice(&words).to_vec())
}

impl GpuModel {
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
            let comp = |kv: &Option<DevBuf>, sc: &Option<DevBuf>| -> Result<Option<dsv4_engine::model::CompState>> {
                match (kv, sc) {
                    (Some(k), Some(s)) => Ok(Some(dsv4_engine::model::CompState { kv: g.read_f32(k.ptr, k.bytes / F)?, score: g.read_f32(s.ptr, s.bytes / F)? })),
                    _ => Ok(None),
                }
            };
            let n_rows = if r != 0 { st.pos / r } else { 0 };
            // the device rows are the host's packed bytes at a padded stride: strip the padding
            let packed = |b: &Option<DevBuf>, fmt: RowFormat| -> Result<PackedRows> {
                let (rb, stride) = (fmt.row_bytes(), dev_stride(fmt));
                let n = if b.is_some() { n_rows } else { 0 };
                let raw = match b {
                    Some(b) if n > 0 => read_bytes(g, b.ptr, n * stride)?,
                    _ => Vec::new(),
                };
                let mut data = Vec::with_capacity(n * rb);
                for row in raw.chunks_exact(stride.max(1)).take(n) {
                    data.extend_from_slice(&row[..rb]);
                }
                Ok(PackedRows::from_bytes(fmt, n, data).map_err(dsv4_engine::EngineError::from)?)
            };
            layers.push(dsv4_engine::model::LayerState {
                ring: g.read_f32(ls.ring.ptr, ls.ring.bytes / F)?,
                rows: packed(&ls.rows, self.attn_fmt())?,
                comp: comp(&ls.comp_kv, &ls.comp_sc)?,
                idx_rows: packed(&ls.idx_rows, self.idx_fmt())?,
                idx_comp: comp(&ls.idx_kv, &ls.idx_sc)?,
            });
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
        if src.kv_rope() != self.kv_rope {
            return Err(bad(format!("its compressed rows hold {} RoPE dims, this backend {} (--kv-rope)", src.kv_rope(), self.kv_rope)));
        }
        // packed host rows → the device stride (pad bytes zero)
        let put = |b: &Option<DevBuf>, rows: &PackedRows, fmt: RowFormat, what: &str| -> Result<()> {
            if rows.format() != fmt {
                return Err(bad(format!("{what}: row format {:?}, expected {fmt:?}", rows.format())));
            }
            let (rb, stride) = (fmt.row_bytes(), dev_stride(fmt));
            match b {
                Some(b) if rows.len() * stride <= b.bytes => {
                    let mut data = vec![0u8; rows.len() * stride];
                    for (o, r) in data.chunks_exact_mut(stride.max(1)).zip(rows.as_bytes().chunks_exact(rb.max(1))) {
                        o[..rb].copy_from_slice(r);
                    }
                    g.write(b, 0, &data)
                }
                None if rows.is_empty() => Ok(()),
                _ => Err(bad(format!("{what}: {} rows do not fit", rows.len()))),
            }
        };
        for (l, (ls, s)) in st.layers.iter().zip(&src.layers).enumerate() {
            if s.ring.len() * F != ls.ring.bytes {
                return Err(bad(format!("layer {l} window")));
            }
            g.write_f32(&ls.ring, 0, &s.ring)?;
            put(&ls.rows, &s.rows, self.attn_fmt(), "rows")?;
            put(&ls.idx_rows, &s.idx_rows, self.idx_fmt(), "indexer rows")?;
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
        let comp = b.comp.as_ref().map(|cp| (cp.ratio, cp.coff, cp.d));
        let idx = b.idx.as_ref().map(|ix| (ix.comp.ratio, ix.comp.coff, ix.comp.d));
        alloc_layer_state(&self.gpu, &self.cfg, self.ctx, self.kv_rope, comp, idx)
    }

    /// Format of this model's compressed attention rows (`kv_rope` decides the RoPE dims).
    pub fn attn_fmt(&self) -> RowFormat {
        RowFormat::attn_with(&self.cfg, self.kv_rope)
    }

    /// Format of this model's indexer rows.
    pub fn idx_fmt(&self) -> RowFormat {
        RowFormat::indexer(&self.cfg)
    }

}
