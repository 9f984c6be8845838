//! The sequence state as data: sizes, frontiers (cheap rewind points), model
//! fingerprints, and the versioned binary payload that saves a session exactly.
//!
//! Two facts of the V4 state (spec §14) shape this module. The window ring and
//! the compressors' partial windows are small and overwritten every token; the
//! compressed rows only ever append. So a *frontier* — everything except the
//! row data, plus the row counts — is enough to rewind a live state to an
//! earlier position on the same timeline (truncate the rows, copy the rest back),
//! at a fixed cost of ~23 MB for V4 Flash instead of a full copy of the state.
//!
//! The payload stores every value bit for bit (f32 little-endian, including the
//! -inf score slots of an empty compressor), so a loaded session continues with
//! bit-identical logits. It ends with a CRC-32 of all preceding bytes and names
//! the model it belongs to by fingerprint, so a truncated, corrupt or foreign
//! payload is rejected before any state is touched.
//!
//! Payload layout (version 2, little-endian):
//! ```text
//! u8[8]  magic "DSV4SES\0"      u32 version = 2        u32 flags (bit 0: bf16 RoPE rows)
//! u64    fingerprint.arch       u64 fingerprint.base   u64 fingerprint.full
//! u64    n tokens               u32 n_layers  u32 window  u32 head_dim
//! u32    index_head_dim         u32 vocab     u32 logits length (0 or vocab)
//! u32[n] tokens                 f32[logits length] next-token logits
//! per layer: u32 ratio, u32 n_rows, u32 n_idx_rows, u32 has_comp, u32 has_idx,
//!            u32 row_bytes, u32 idx_row_bytes        (packed row sizes, see `pack`)
//!            f32 ring[window·head_dim], u8 rows[n_rows·row_bytes],
//!            if has_comp: f32 kv[len], f32 score[len]   (len from the config)
//!            u8 idx_rows[n_idx_rows·idx_row_bytes],
//!            if has_idx:  f32 kv[len], f32 score[len]
//! u32    crc32 of every byte above
//! ```
//! Rows are stored as the engine holds them: packed (FP8 codes + exponents + f32
//! or bf16 RoPE dims; FP4 codes + exponents), which is lossless. Flag bit 0 says
//! the state's RoPE precision (`pack::RopeStore`, `--kv-rope`): set for bf16,
//! clear for f32 (so every payload written before the option existed reads as
//! f32). A payload of the other precision is refused with an error naming both:
//! its values were computed under other numerics, so continuing from it would
//! not be the same computation. Unknown flag bits are refused too. Version 1
//! payloads (the same layout without the two row-size words, rows as f32, f32
//! RoPE) are still read into f32 states: their rows are packed on load, exactly.
//! The MTP block's state is not saved (it is a drafting cache; a loaded session
//! starts it empty).

use std::io::{Read, Write};

use crate::config::Config;
use crate::error::{EngineError, Result};
use crate::model::{CompState, LayerState, State};
use crate::pack::{PackedRows, RopeStore, RowFormat};

pub const PAYLOAD_MAGIC: [u8; 8] = *b"DSV4SES\0";
pub const PAYLOAD_VERSION: u32 = 2;
/// Payload flag: the compressed rows' RoPE dims are bf16 (`RopeStore::Bf16`).
pub const FLAG_BF16_ROPE: u32 = 1;
/// Sanity bound on token counts read from a payload (larger than any context).
const MAX_TOKENS: u64 = 1 << 26;

/// Identifies the model a state belongs to.
///
/// `arch` hashes the shape (Config); `base` also hashes every tensor except the
/// routed experts (names, types, dims and a sample of the data); `full` covers
/// every tensor. A state is exact only for the same `full`; ds4 lets q2 and q4
/// snapshots of one model stand in for each other, which is `base` equality.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
pub struct Fingerprint {
    pub arch: u64,
    pub base: u64,
    pub full: u64,
}

impl Fingerprint {
    pub fn of_gguf(cfg: &Config, files: &[&dsv4_gguf::GgufFile]) -> Fingerprint {
        let arch = fnv1a(format!("{cfg:?}").as_bytes(), FNV_OFFSET);
        let mut base = arch;
        let mut full = arch;
        for f in files {
            for t in f.tensor_infos() {
                let mut desc = format!("{}|{}|{:?}|{}", t.name, t.ty.name(), t.ne, t.n_bytes).into_bytes();
                // a sample of the data: different weights with the same layout differ here
                let data = f.tensor_of(t).data;
                desc.extend_from_slice(&data[..data.len().min(64)]);
                desc.extend_from_slice(&data[data.len().saturating_sub(64)..]);
                full = fnv1a(&desc, full);
                if !t.name.contains("_exps") {
                    base = fnv1a(&desc, base);
                }
            }
        }
        Fingerprint { arch, base, full }
    }

    /// Whether a state saved under `saved` may be loaded into this model.
    pub fn accepts(&self, saved: &Fingerprint, allow_other_quant: bool) -> bool {
        self.full == saved.full || (allow_other_quant && self.base == saved.base && self.arch == saved.arch)
    }
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
fn fnv1a(bytes: &[u8], mut h: u64) -> u64 {
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

/// A rewind point: the state at `pos` minus the row data it shares with any
/// later state of the same timeline.
#[derive(Clone, Debug, PartialEq)]
pub struct Frontier {
    pub pos: usize,
    pub layers: Vec<FrontierLayer>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct FrontierLayer {
    pub ring: Vec<f32>,
    pub n_rows: usize,
    pub comp: Option<CompState>,
    pub n_idx_rows: usize,
    pub idx_comp: Option<CompState>,
}

fn comp_bytes(c: &Option<CompState>) -> usize {
    c.as_ref().map_or(0, |c| (c.kv.capacity() + c.score.capacity()) * 4)
}

impl State {
    /// How this state holds the RoPE dims of compressed attention rows.
    pub fn kv_rope(&self) -> RopeStore {
        self.layers.first().map(|l| l.kv_rope()).unwrap_or_default()
    }

    /// Bytes held by this state's buffers (allocated capacity, not just used).
    pub fn heap_bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| {
                l.ring.capacity() * 4 + l.rows.heap_bytes() + l.idx_rows.heap_bytes() + comp_bytes(&l.comp) + comp_bytes(&l.idx_comp)
            })
            .sum()
    }

    /// Reserves (packed) row storage for `ctx` tokens up front, so a long session
    /// never reallocates and the memory need is known at start
    /// (`pack::StateBytes::for_ctx` gives the same figure from the config alone).
    pub fn reserve_for(&mut self, cfg: &Config, ctx: usize) {
        for (l, ls) in self.layers.iter_mut().enumerate() {
            let r = cfg.compress_ratios.get(l).copied().unwrap_or(0);
            if r == 0 {
                continue;
            }
            let want = ctx / r;
            ls.rows.reserve_exact(want.saturating_sub(ls.rows.len()));
            if ls.idx_comp.is_some() {
                ls.idx_rows.reserve_exact(want.saturating_sub(ls.idx_rows.len()));
            }
        }
    }

    pub fn frontier(&self, _cfg: &Config) -> Frontier {
        Frontier {
            pos: self.pos,
            layers: self
                .layers
                .iter()
                .map(|l| FrontierLayer {
                    ring: l.ring.clone(),
                    n_rows: l.rows.len(),
                    comp: l.comp.clone(),
                    n_idx_rows: l.idx_rows.len(),
                    idx_comp: l.idx_comp.clone(),
                })
                .collect(),
        }
    }

    /// Rewinds to a frontier taken earlier on this state's timeline. The caller
    /// guarantees that the state has not been rewound before `f.pos` since `f`
    /// was taken (otherwise its row prefix may differ); sizes are checked.
    pub fn rewind_to(&mut self, _cfg: &Config, f: &Frontier) -> Result<()> {
        if f.pos > self.pos || f.layers.len() != self.layers.len() {
            return Err(EngineError::Input(format!("frontier at {} does not fit a state at {}", f.pos, self.pos)));
        }
        for (l, fl) in self.layers.iter().zip(&f.layers) {
            if l.rows.len() < fl.n_rows || l.idx_rows.len() < fl.n_idx_rows {
                return Err(EngineError::Input("frontier has more rows than the live state".into()));
            }
        }
        for (l, fl) in self.layers.iter_mut().zip(&f.layers) {
            l.ring.copy_from_slice(&fl.ring);
            l.rows.truncate(fl.n_rows);
            l.idx_rows.truncate(fl.n_idx_rows);
            l.comp.clone_from(&fl.comp);
            l.idx_comp.clone_from(&fl.idx_comp);
        }
        self.pos = f.pos;
        Ok(())
    }

    /// Checks that this state has exactly the shapes a state of `template`'s model at
    /// `self.pos` has (`template` = a fresh state of that model).
    pub fn check_shape(&self, cfg: &Config, template: &State) -> Result<()> {
        let bad = |m: String| Err(EngineError::Input(format!("state does not fit the model: {m}")));
        if self.layers.len() != template.layers.len() {
            return bad(format!("{} layers, model has {}", self.layers.len(), template.layers.len()));
        }
        for (i, (l, t)) in self.layers.iter().zip(&template.layers).enumerate() {
            let r = cfg.compress_ratios.get(i).copied().unwrap_or(0);
            let n_rows = if r == 0 { 0 } else { self.pos / r };
            let comp_len = |c: &Option<CompState>| c.as_ref().map(|c| (c.kv.len(), c.score.len()));
            let ok = l.ring.len() == t.ring.len()
                && l.rows.len() == n_rows
                && l.rows.format() == t.rows.format()
                && comp_len(&l.comp) == comp_len(&t.comp)
                && l.idx_rows.len() == if t.idx_comp.is_some() { n_rows } else { 0 }
                && l.idx_rows.format() == t.idx_rows.format()
                && comp_len(&l.idx_comp) == comp_len(&t.idx_comp);
            if !ok {
                return bad(format!("layer {i} has the wrong sizes for position {}", self.pos));
            }
        }
        Ok(())
    }
}

/// A writer that counts and checksums what passes through.
struct CrcWriter<'a> {
    inner: &'a mut dyn Write,
    crc: crc32fast::Hasher,
}

impl Write for CrcWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

struct CrcReader<'a> {
    inner: &'a mut dyn Read,
    crc: crc32fast::Hasher,
}

impl CrcReader<'_> {
    fn exact(&mut self, buf: &mut [u8]) -> Result<()> {
        self.inner.read_exact(buf).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => EngineError::Input("state payload is truncated".into()),
            _ => EngineError::Io(e),
        })?;
        self.crc.update(buf);
        Ok(())
    }
    fn u32(&mut self) -> Result<u32> {
        let mut b = [0u8; 4];
        self.exact(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }
    fn u64(&mut self) -> Result<u64> {
        let mut b = [0u8; 8];
        self.exact(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }
    fn f32s(&mut self, n: usize) -> Result<Vec<f32>> {
        let mut v = vec![0f32; n];
        if cfg!(target_endian = "little") {
            self.exact(bytemuck::cast_slice_mut(&mut v))?;
        } else {
            for x in v.iter_mut() {
                *x = f32::from_bits(self.u32()?);
            }
        }
        Ok(v)
    }
}

fn put_f32s(w: &mut dyn Write, v: &[f32]) -> std::io::Result<()> {
    if cfg!(target_endian = "little") {
        w.write_all(bytemuck::cast_slice(v))
    } else {
        for x in v {
            w.write_all(&x.to_bits().to_le_bytes())?;
        }
        Ok(())
    }
}

/// What a payload carries besides the model state.
#[derive(Clone, Debug, PartialEq)]
pub struct PayloadMeta {
    pub fingerprint: Fingerprint,
    pub tokens: Vec<u32>,
    /// next-token logits after `tokens` (empty when there are no tokens)
    pub logits: Vec<f32>,
}

/// Writes the payload (see the module docs); `st.pos` must equal `meta.tokens.len()`.
pub fn write_payload(w: &mut dyn Write, cfg: &Config, meta: &PayloadMeta, st: &State) -> Result<()> {
    if st.pos != meta.tokens.len() {
        return Err(EngineError::Input(format!("state at {} but {} tokens", st.pos, meta.tokens.len())));
    }
    let mut w = CrcWriter { inner: w, crc: crc32fast::Hasher::new() };
    let mut head = Vec::with_capacity(96);
    head.extend_from_slice(&PAYLOAD_MAGIC);
    let flags = if st.kv_rope() == RopeStore::Bf16 { FLAG_BF16_ROPE } else { 0 };
    for v in [PAYLOAD_VERSION, flags] {
        head.extend_from_slice(&v.to_le_bytes());
    }
    let fp = meta.fingerprint;
    for v in [fp.arch, fp.base, fp.full, meta.tokens.len() as u64] {
        head.extend_from_slice(&v.to_le_bytes());
    }
    let dims = [st.layers.len(), cfg.window, cfg.head_dim, cfg.index_head_dim, cfg.vocab, meta.logits.len()];
    for v in dims {
        head.extend_from_slice(&(v as u32).to_le_bytes());
    }
    w.write_all(&head)?;
    let toks: Vec<u8> = meta.tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
    w.write_all(&toks)?;
    put_f32s(&mut w, &meta.logits)?;
    for (i, l) in st.layers.iter().enumerate() {
        let r = cfg.compress_ratios.get(i).copied().unwrap_or(0);
        let hdr = [
            r as u32,
            l.rows.len() as u32,
            l.idx_rows.len() as u32,
            l.comp.is_some() as u32,
            l.idx_comp.is_some() as u32,
            l.rows.format().row_bytes() as u32,
            l.idx_rows.format().row_bytes() as u32,
        ];
        let hdr: Vec<u8> = hdr.iter().flat_map(|v| v.to_le_bytes()).collect();
        w.write_all(&hdr)?;
        put_f32s(&mut w, &l.ring)?;
        w.write_all(l.rows.as_bytes())?;
        if let Some(c) = &l.comp {
            put_f32s(&mut w, &c.kv)?;
            put_f32s(&mut w, &c.score)?;
        }
        w.write_all(l.idx_rows.as_bytes())?;
        if let Some(c) = &l.idx_comp {
            put_f32s(&mut w, &c.kv)?;
            put_f32s(&mut w, &c.score)?;
        }
    }
    let crc = w.crc.clone().finalize();
    w.inner.write_all(&crc.to_le_bytes())?;
    Ok(())
}

/// Reads `n` rows of `fmt`: packed bytes (version 2), or f32 (version 1) packed
/// here, exactly (off-grid rows are an error).
fn read_rows(r: &mut CrcReader, version: u32, fmt: RowFormat, n: usize) -> Result<PackedRows> {
    if version == 1 {
        let v = r.f32s(n * fmt.dim())?;
        let mut p = PackedRows::new(fmt);
        p.extend_from_f32(&v)?;
        Ok(p)
    } else {
        let mut b = vec![0u8; n * fmt.row_bytes()];
        r.exact(&mut b)?;
        Ok(PackedRows::from_bytes(fmt, n, b)?)
    }
}

/// Reads a payload for the model whose fresh state is `template`. Every size is
/// checked against the model before it is allocated, and the CRC before the
/// state is returned: an error never leaves a half-loaded state behind.
pub fn read_payload(r: &mut dyn Read, cfg: &Config, template: &State) -> Result<(PayloadMeta, State)> {
    let mut r = CrcReader { inner: r, crc: crc32fast::Hasher::new() };
    let bad = |m: &str| EngineError::Input(format!("state payload: {m}"));
    let mut magic = [0u8; 8];
    r.exact(&mut magic)?;
    if magic != PAYLOAD_MAGIC {
        return Err(bad("not a dsv4 session payload (bad magic)"));
    }
    let version = r.u32()?;
    if version != PAYLOAD_VERSION && version != 1 {
        return Err(bad(&format!("version {version}, this engine reads 1 and {PAYLOAD_VERSION}")));
    }
    let flags = r.u32()?;
    if flags & !FLAG_BF16_ROPE != 0 {
        return Err(bad(&format!("unknown flags {flags:#x} (written by a newer engine?)")));
    }
    let saved_rope = if flags & FLAG_BF16_ROPE != 0 { RopeStore::Bf16 } else { RopeStore::F32 };
    let want_rope = template.kv_rope();
    if saved_rope != want_rope {
        return Err(bad(&format!(
            "the state was saved with --kv-rope {saved_rope} (RoPE dims of compressed rows in {saved_rope}), this session uses --kv-rope {want_rope}; \
             load it with --kv-rope {saved_rope}"
        )));
    }
    let fingerprint = Fingerprint { arch: r.u64()?, base: r.u64()?, full: r.u64()? };
    let n = r.u64()?;
    if n > MAX_TOKENS {
        return Err(bad("token count out of range"));
    }
    let n = n as usize;
    let mut dims = [0usize; 6];
    for d in dims.iter_mut() {
        *d = r.u32()? as usize;
    }
    let want = [template.layers.len(), cfg.window, cfg.head_dim, cfg.index_head_dim, cfg.vocab];
    if dims[..5] != want {
        return Err(bad(&format!("shape {:?} does not match the model {:?}", &dims[..5], want)));
    }
    let n_logits = dims[5];
    if !(n_logits == 0 && n == 0 || n_logits == cfg.vocab) {
        return Err(bad("logits length does not match the vocab"));
    }
    let mut tb = vec![0u8; n * 4];
    r.exact(&mut tb)?;
    let tokens: Vec<u32> = tb.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    if tokens.iter().any(|&t| t as usize >= cfg.vocab) {
        return Err(bad("token id out of range"));
    }
    let logits = r.f32s(n_logits)?;
    let mut layers = Vec::with_capacity(template.layers.len());
    for (i, t) in template.layers.iter().enumerate() {
        let ratio = cfg.compress_ratios.get(i).copied().unwrap_or(0);
        let (afmt, ifmt) = (t.rows.format(), t.idx_rows.format());
        let h: Vec<u32> = (0..if version == 1 { 5 } else { 7 }).map(|_| r.u32()).collect::<Result<_>>()?;
        let want_rows = if ratio == 0 { 0 } else { n / ratio };
        let want_idx = if t.idx_comp.is_some() { want_rows } else { 0 };
        let mut want_h = vec![ratio as u32, want_rows as u32, want_idx as u32, t.comp.is_some() as u32, t.idx_comp.is_some() as u32];
        if version != 1 {
            want_h.extend([afmt.row_bytes() as u32, ifmt.row_bytes() as u32]);
        }
        if h != want_h {
            return Err(bad(&format!("layer {i} header {h:?} does not match {want_h:?}")));
        }
        let ring = r.f32s(t.ring.len())?;
        // version 1 rows are f32: pack them (exact, or an error for off-grid rows)
        let rows = read_rows(&mut r, version, afmt, want_rows)?;
        let comp = match &t.comp {
            Some(c) => Some(CompState { kv: r.f32s(c.kv.len())?, score: r.f32s(c.score.len())? }),
            None => None,
        };
        let idx_rows = read_rows(&mut r, version, ifmt, want_idx)?;
        let idx_comp = match &t.idx_comp {
            Some(c) => Some(CompState { kv: r.f32s(c.kv.len())?, score: r.f32s(c.score.len())? }),
            None => None,
        };
        layers.push(LayerState { ring, rows, comp, idx_rows, idx_comp });
    }
    let crc = r.crc.clone().finalize();
    let mut b = [0u8; 4];
    r.inner.read_exact(&mut b).map_err(|_| bad("truncated (no checksum)"))?;
    if u32::from_le_bytes(b) != crc {
        return Err(bad("checksum mismatch (corrupt)"));
    }
    let st = State { pos: n, layers };
    st.check_shape(cfg, template)?;
    Ok((PayloadMeta { fingerprint, tokens, logits }, st))
}
