//! Sequence state on the GPU: allocation for a context capacity, in-place
//! reset (captured graphs stay valid), and conversion to and from the engine's
//! portable host `State` (session save/load, snapshots).

use super::*;

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

}
