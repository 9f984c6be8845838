//! Lossless packed storage of the compressed rows, the part of the sequence
//! state that grows with the context (spec §14).
//!
//! Compressed attention rows leave the compressor already on the FP8 e4m3 grid
//! in their non-RoPE dims (one power-of-two scale per 64-block, spec §3.2), and
//! indexer rows on the FP4 e2m1 grid (one power-of-two scale per 32-block,
//! §3.3). Storing them as f32 spends 32 bits on what is an 8- or 4-bit code plus
//! a shared exponent, so we store exactly that: codes plus one ue8m0 exponent
//! byte per block. The RoPE dims of attention rows are not quantised by the
//! model; how they are held is the state's `RopeStore` (`Model::kv_rope`,
//! `--kv-rope`):
//! * `F32` (default): the f32 values the engine computes, stored as f32
//!   (little-endian), so nothing changes bit for bit against the f32 reference
//!   fixtures.
//! * `Bf16`: the official model's cache precision (spec §14). The engine
//!   rounds the 64 RoPE dims of each compressed attention row to bf16 (round to
//!   nearest even) when the row is emitted, before it is stored or used
//!   (`RopeStore::round`), so storing them as bf16 is again lossless. This
//!   changes logits slightly against the f32 fixtures (a near-tie top-k choice
//!   of the indexer can flip; measured bounds in the tests and docs/perf.md)
//!   and saves 128 B per attention row (3.45 instead of 4.12 GiB at 1M tokens).
//!
//! Packing is *exact or an error*: the encoder picks, per block, the smallest
//! power-of-two scale 2^E with `amax ≤ grid_max·2^E` (a finer grid always
//! contains a coarser one's points, so if any scale represents the block, this
//! one does), encodes each value and checks that decoding gives back the same
//! f32 bits (negative zero included). A value off the grid (which the engine's
//! own sims never produce; NaN, ±inf, or a foreign row would) is rejected with
//! `PackError::OffGrid` instead of being rounded. Decoding is a table look-up
//! times a power of two, which is exact in f32 (every product is a multiple of
//! 2^-149 within range), so `decode(encode(v)) == v` bit for bit.
//!
//! Because the encoder is a function of the values alone, two packings of equal
//! rows are equal byte strings (derived `PartialEq` compares values exactly).
//!
//! Row layouts (bytes, in this order):
//! * attention (`RowFormat::Fp8`): `u8 code[nope]` (e4m3fn: s|eeee|mmm),
//!   `u8 exp[ceil(nope/64)]` (ue8m0: scale = 2^(exp−127)), then the RoPE dims,
//!   `f32 LE[rope]` (or `bf16 LE[rope]`). V4 Flash: 448 + 7 + 256 = 711 bytes
//!   (583 with bf16 RoPE) instead of 2048.
//! * indexer (`RowFormat::Fp4`): `u8 codes[ceil(dim/2)]` (e2m1: s|eem, low nibble
//!   = even element, as the official FP4 weights), `u8 exp[ceil(dim/32)]`.
//!   V4 Flash: 64 + 4 = 68 bytes instead of 512.

use thiserror::Error;

use crate::config::Config;
use crate::error::EngineError;

pub const FP8_BLOCK: usize = 64;
pub const FP4_BLOCK: usize = 32;
const FP8_MAX: f64 = 448.0;
const FP4_MAX: f64 = 6.0;
const FP4_GRID: [f32; 8] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];
/// Exponent range stored (byte = E + 127); 255 is the ue8m0 NaN and never written.
const E_MIN: i32 = -127;
const E_MAX: i32 = 127;

/// How the RoPE dims of compressed attention rows are held (the state's
/// precision option; see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
pub enum RopeStore {
    /// f32 little-endian: what this engine computes (bit-exact vs the f32 reference).
    #[default]
    F32,
    /// bf16 (the official model's cache precision): the engine rounds the RoPE
    /// dims to bf16 at emission, so only bf16 values are stored.
    Bf16,
}

impl RopeStore {
    pub fn bytes(self) -> usize {
        match self {
            RopeStore::F32 => 4,
            RopeStore::Bf16 => 2,
        }
    }

    /// The CLI spelling: `f32` or `bf16`.
    pub fn name(self) -> &'static str {
        match self {
            RopeStore::F32 => "f32",
            RopeStore::Bf16 => "bf16",
        }
    }

    /// What the emitted RoPE dims become before they are stored and used:
    /// unchanged (`F32`) or rounded to bf16, round to nearest even (`Bf16`).
    pub fn round(self, v: &mut [f32]) {
        if self == RopeStore::Bf16 {
            for x in v.iter_mut() {
                *x = half::bf16::from_f32(*x).to_f32();
            }
        }
    }
}

impl std::fmt::Display for RopeStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for RopeStore {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(RopeStore::F32),
            "bf16" => Ok(RopeStore::Bf16),
            other => Err(format!("unknown RoPE state precision `{other}` (f32 or bf16)")),
        }
    }
}

/// The layout of one packed row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowFormat {
    /// `dim` values: the first `dim − rope` on the FP8 grid (blocks of 64), the
    /// last `rope` stored as `store` says.
    Fp8 { dim: usize, rope: usize, store: RopeStore },
    /// `dim` values on the FP4 grid (blocks of 32).
    Fp4 { dim: usize },
}

impl Default for RowFormat {
    fn default() -> Self {
        RowFormat::Fp4 { dim: 0 }
    }
}

#[derive(Debug, Error, Clone, PartialEq)]
pub enum PackError {
    #[error("row has {got} values, the packed format holds {want}")]
    Len { got: usize, want: usize },
    #[error("value {value:e} (dim {index}) is not on the {grid} grid of its block; packing it would not be exact")]
    OffGrid { index: usize, value: f32, grid: &'static str },
    #[error("packed rows are corrupt: {0}")]
    Corrupt(String),
}

impl From<PackError> for EngineError {
    fn from(e: PackError) -> Self {
        EngineError::Input(format!("compressed row storage: {e}"))
    }
}

/// e4m3fn code → value (0x7F / 0xFF are NaN).
fn e4m3_table() -> &'static [f32; 256] {
    static T: std::sync::OnceLock<[f32; 256]> = std::sync::OnceLock::new();
    T.get_or_init(|| {
        let mut t = [0f32; 256];
        for (c, v) in t.iter_mut().enumerate() {
            let e = ((c >> 3) & 15) as i32;
            let m = (c & 7) as f32;
            let a = if c & 0x7f == 0x7f {
                f32::NAN
            } else if e == 0 {
                m * (2.0f32).powi(-9)
            } else {
                (1.0 + m / 8.0) * (2.0f32).powi(e - 7)
            };
            *v = if c & 0x80 != 0 { -a } else { a };
        }
        t
    })
}

/// e2m1 code (s|eem) → value.
fn e2m1_value(code: u8) -> f32 {
    let a = FP4_GRID[(code & 7) as usize];
    if code & 8 != 0 {
        -a
    } else {
        a
    }
}

/// 2^e as f32, exact for e in [E_MIN, E_MAX] (2^-127 is subnormal but exact).
fn pow2(e: i32) -> f32 {
    (2.0f64).powi(e) as f32
}

/// The e4m3fn code of `c` if `c` is exactly on the grid.
fn e4m3_code(c: f32) -> Option<u8> {
    let sign = if c.is_sign_negative() { 0x80u8 } else { 0 };
    let a = c.abs();
    if a == 0.0 {
        return Some(sign);
    }
    if a.is_nan() || a > 448.0 {
        return None;
    }
    let bits = a.to_bits();
    let e = ((bits >> 23) & 0xff) as i32 - 127;
    if e < -6 {
        // subnormal e4m3: m·2^-9, m in 1..=7
        let m = a * 512.0;
        if m.fract() != 0.0 || m >= 8.0 {
            return None;
        }
        return Some(sign | m as u8);
    }
    if bits & ((1 << 20) - 1) != 0 {
        return None; // more than 3 mantissa bits
    }
    let code = sign | (((e + 7) as u8) << 3) | ((bits >> 20) & 7) as u8;
    (code & 0x7f != 0x7f).then_some(code)
}

fn e2m1_code(c: f32) -> Option<u8> {
    let sign = if c.is_sign_negative() { 8u8 } else { 0 };
    let a = c.abs();
    FP4_GRID.iter().position(|&g| g == a).map(|i| sign | i as u8)
}

/// Smallest E in [E_MIN, E_MAX] with `amax ≤ max·2^E` (`zero_e` for an all-zero block).
fn min_exponent(amax: f32, max: f64, zero_e: i32) -> i32 {
    if amax == 0.0 {
        return zero_e;
    }
    let a = amax as f64;
    // (clamped first: an infinite amax must not start the search at i32::MAX)
    let mut e = ((a / max).log2().ceil() as i32).clamp(E_MIN, E_MAX);
    // the log is only an estimate: settle the boundary with exact f64 products
    while e > E_MIN && max * (2.0f64).powi(e - 1) >= a {
        e -= 1;
    }
    while e < E_MAX && max * (2.0f64).powi(e) < a {
        e += 1;
    }
    e.clamp(E_MIN, E_MAX)
}

impl RowFormat {
    /// Attention rows of this config (FP8 non-RoPE dims, f32 RoPE dims).
    pub fn attn(cfg: &Config) -> RowFormat {
        RowFormat::attn_with(cfg, RopeStore::F32)
    }

    /// Attention rows of this config with the RoPE dims stored as `rope`.
    pub fn attn_with(cfg: &Config, rope: RopeStore) -> RowFormat {
        RowFormat::Fp8 { dim: cfg.head_dim, rope: cfg.rope_dim, store: rope }
    }

    /// How this format stores RoPE dims (`None` for FP4 rows, which have none).
    pub fn rope_store(&self) -> Option<RopeStore> {
        match *self {
            RowFormat::Fp8 { store, .. } => Some(store),
            RowFormat::Fp4 { .. } => None,
        }
    }

    /// Indexer rows of this config.
    pub fn indexer(cfg: &Config) -> RowFormat {
        RowFormat::Fp4 { dim: cfg.index_head_dim }
    }

    /// Values per row.
    pub fn dim(&self) -> usize {
        match *self {
            RowFormat::Fp8 { dim, .. } | RowFormat::Fp4 { dim } => dim,
        }
    }

    /// Bytes per packed row.
    pub fn row_bytes(&self) -> usize {
        match *self {
            RowFormat::Fp8 { dim, rope, store } => {
                let nope = dim - rope;
                nope + nope.div_ceil(FP8_BLOCK) + rope * store.bytes()
            }
            RowFormat::Fp4 { dim } => dim.div_ceil(2) + dim.div_ceil(FP4_BLOCK),
        }
    }

    /// Packs one row into `out` (`row_bytes()` long), exactly or not at all.
    pub fn encode(&self, v: &[f32], out: &mut [u8]) -> Result<(), PackError> {
        if v.len() != self.dim() {
            return Err(PackError::Len { got: v.len(), want: self.dim() });
        }
        debug_assert_eq!(out.len(), self.row_bytes());
        match *self {
            RowFormat::Fp8 { dim, rope, store } => {
                let nope = dim - rope;
                let (codes, rest) = out.split_at_mut(nope);
                let (exps, tail) = rest.split_at_mut(nope.div_ceil(FP8_BLOCK));
                let table = e4m3_table();
                for (b, blk) in v[..nope].chunks(FP8_BLOCK).enumerate() {
                    let amax = blk.iter().fold(0.0f32, |m, x| if x.is_nan() { f32::NAN } else { m.max(x.abs()) });
                    let e = min_exponent(if amax.is_nan() { 0.0 } else { amax }, FP8_MAX, -22);
                    let s = pow2(e);
                    exps[b] = (e + 127) as u8;
                    for (j, &x) in blk.iter().enumerate() {
                        let i = b * FP8_BLOCK + j;
                        let code = e4m3_code(x / s).filter(|&c| (table[c as usize] * s).to_bits() == x.to_bits());
                        codes[i] = code.ok_or(PackError::OffGrid { index: i, value: x, grid: "FP8 e4m3" })?;
                    }
                }
                match store {
                    RopeStore::F32 => {
                        for (o, x) in tail.chunks_exact_mut(4).zip(&v[nope..]) {
                            o.copy_from_slice(&x.to_le_bytes());
                        }
                    }
                    RopeStore::Bf16 => {
                        for (j, (o, &x)) in tail.chunks_exact_mut(2).zip(&v[nope..]).enumerate() {
                            let h = half::bf16::from_f32(x);
                            if h.to_f32().to_bits() != x.to_bits() {
                                return Err(PackError::OffGrid { index: nope + j, value: x, grid: "bf16" });
                            }
                            o.copy_from_slice(&h.to_bits().to_le_bytes());
                        }
                    }
                }
            }
            RowFormat::Fp4 { dim } => {
                let (codes, exps) = out.split_at_mut(dim.div_ceil(2));
                codes.fill(0);
                for (b, blk) in v.chunks(FP4_BLOCK).enumerate() {
                    let amax = blk.iter().fold(0.0f32, |m, x| if x.is_nan() { f32::NAN } else { m.max(x.abs()) });
                    let e = min_exponent(if amax.is_nan() { 0.0 } else { amax }, FP4_MAX, -126);
                    let s = pow2(e);
                    exps[b] = (e + 127) as u8;
                    for (j, &x) in blk.iter().enumerate() {
                        let i = b * FP4_BLOCK + j;
                        let code = e2m1_code(x / s).filter(|&c| (e2m1_value(c) * s).to_bits() == x.to_bits());
                        let code = code.ok_or(PackError::OffGrid { index: i, value: x, grid: "FP4 e2m1" })?;
                        codes[i / 2] |= code << (4 * (i % 2));
                    }
                }
            }
        }
        Ok(())
    }

    /// Unpacks one row (`dim()` values) from `b` (`row_bytes()` long).
    pub fn decode(&self, b: &[u8], out: &mut [f32]) {
        debug_assert_eq!(b.len(), self.row_bytes());
        debug_assert_eq!(out.len(), self.dim());
        match *self {
            RowFormat::Fp8 { dim, rope, store } => {
                let nope = dim - rope;
                let (codes, rest) = b.split_at(nope);
                let (exps, tail) = rest.split_at(nope.div_ceil(FP8_BLOCK));
                let table = e4m3_table();
                for ((o, c), &e) in out[..nope].chunks_mut(FP8_BLOCK).zip(codes.chunks(FP8_BLOCK)).zip(exps) {
                    let s = pow2(e as i32 - 127);
                    for (x, &k) in o.iter_mut().zip(c) {
                        *x = table[k as usize] * s;
                    }
                }
                match store {
                    RopeStore::F32 => {
                        for (x, c) in out[nope..].iter_mut().zip(tail.chunks_exact(4)) {
                            *x = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                        }
                    }
                    RopeStore::Bf16 => {
                        for (x, c) in out[nope..].iter_mut().zip(tail.chunks_exact(2)) {
                            *x = half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
                        }
                    }
                }
            }
            RowFormat::Fp4 { dim } => {
                let (codes, exps) = b.split_at(dim.div_ceil(2));
                for (b_i, (o, &e)) in out.chunks_mut(FP4_BLOCK).zip(exps).enumerate() {
                    let s = pow2(e as i32 - 127);
                    for (j, x) in o.iter_mut().enumerate() {
                        let i = b_i * FP4_BLOCK + j;
                        *x = e2m1_value((codes[i / 2] >> (4 * (i % 2))) & 15) * s;
                    }
                }
            }
        }
    }

    /// Checks bytes from outside (a saved state): no NaN codes, no NaN exponents.
    fn validate(&self, b: &[u8]) -> Result<(), PackError> {
        let bad = |m: &str| Err(PackError::Corrupt(m.into()));
        match *self {
            RowFormat::Fp8 { dim, rope, .. } => {
                let nope = dim - rope;
                if b[..nope].iter().any(|&c| c & 0x7f == 0x7f) {
                    return bad("NaN FP8 code");
                }
                if b[nope..nope + nope.div_ceil(FP8_BLOCK)].contains(&255) {
                    return bad("NaN scale exponent");
                }
            }
            RowFormat::Fp4 { dim } => {
                if b[dim.div_ceil(2)..].contains(&255) {
                    return bad("NaN scale exponent");
                }
            }
        }
        Ok(())
    }
}

/// An append-only list of packed rows of one format.
#[derive(Debug, PartialEq, Default)]
pub struct PackedRows {
    fmt: RowFormat,
    n: usize,
    data: Vec<u8>,
}

impl Clone for PackedRows {
    fn clone(&self) -> Self {
        PackedRows { fmt: self.fmt, n: self.n, data: self.data.clone() }
    }
    /// Reuses this list's allocation (restores keep the up-front reservation).
    fn clone_from(&mut self, src: &Self) {
        self.fmt = src.fmt;
        self.n = src.n;
        self.data.clone_from(&src.data);
    }
}

impl PackedRows {
    pub fn new(fmt: RowFormat) -> PackedRows {
        PackedRows { fmt, n: 0, data: Vec::new() }
    }

    pub fn format(&self) -> RowFormat {
        self.fmt
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Appends one row (`dim()` values); on error nothing is appended.
    pub fn push(&mut self, row: &[f32]) -> Result<(), PackError> {
        let rb = self.fmt.row_bytes();
        let at = self.data.len();
        self.data.resize(at + rb, 0);
        match self.fmt.encode(row, &mut self.data[at..]) {
            Ok(()) => {
                self.n += 1;
                Ok(())
            }
            Err(e) => {
                self.data.truncate(at);
                Err(e)
            }
        }
    }

    /// Appends `rows.len() / dim()` rows; on error nothing is appended.
    pub fn extend_from_f32(&mut self, rows: &[f32]) -> Result<(), PackError> {
        let d = self.fmt.dim();
        if d == 0 || !rows.len().is_multiple_of(d) {
            return Err(PackError::Len { got: rows.len(), want: d });
        }
        let (n0, b0) = (self.n, self.data.len());
        self.data.reserve(rows.len() / d * self.fmt.row_bytes());
        for r in rows.chunks_exact(d) {
            if let Err(e) = self.push(r) {
                self.n = n0;
                self.data.truncate(b0);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Decodes row `i` into `out` (`dim()` values). Panics if `i >= len()`.
    pub fn decode_row(&self, i: usize, out: &mut [f32]) {
        let rb = self.fmt.row_bytes();
        self.fmt.decode(&self.data[i * rb..(i + 1) * rb], out);
    }

    /// All rows as f32 (`[len][dim]`).
    pub fn to_f32(&self) -> Vec<f32> {
        let d = self.fmt.dim();
        let mut v = vec![0f32; self.n * d];
        for (i, o) in v.chunks_exact_mut(d.max(1)).enumerate().take(self.n) {
            self.decode_row(i, o);
        }
        v
    }

    pub fn truncate(&mut self, n: usize) {
        if n < self.n {
            self.n = n;
            self.data.truncate(n * self.fmt.row_bytes());
        }
    }

    pub fn clear(&mut self) {
        self.truncate(0);
    }

    /// Reserves room for `additional` more rows, exactly.
    pub fn reserve_exact(&mut self, additional: usize) {
        self.data.reserve_exact(additional * self.fmt.row_bytes());
    }

    pub fn shrink_to_fit(&mut self) {
        self.data.shrink_to_fit();
    }

    /// Bytes allocated (capacity, not just used).
    pub fn heap_bytes(&self) -> usize {
        self.data.capacity()
    }

    /// The packed bytes of all rows, row after row.
    pub fn as_bytes(&self) -> &[u8] {
        &self.data
    }

    /// Rows from packed bytes (a saved state): sizes and codes are checked.
    pub fn from_bytes(fmt: RowFormat, n: usize, data: Vec<u8>) -> Result<PackedRows, PackError> {
        let rb = fmt.row_bytes();
        if data.len() != n * rb {
            return Err(PackError::Corrupt(format!("{} bytes for {n} rows of {rb}", data.len())));
        }
        if rb > 0 {
            for r in data.chunks_exact(rb) {
                fmt.validate(r)?;
            }
        }
        Ok(PackedRows { fmt, n, data })
    }
}

/// Bytes of sequence state for `ctx` tokens of the main model (what
/// `CpuBackend::with_ctx` allocates up front), split by part.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StateBytes {
    /// packed compressed attention rows
    pub rows: usize,
    /// packed indexer rows
    pub idx_rows: usize,
    /// window rings (f32)
    pub ring: usize,
    /// compressor partial windows (f32 kv + score)
    pub comp: usize,
}

impl StateBytes {
    pub fn total(&self) -> usize {
        self.rows + self.idx_rows + self.ring + self.comp
    }

    /// Growing part per token, amortised (rows only), in bytes.
    pub fn per_token(cfg: &Config, rope: RopeStore) -> f64 {
        let s = StateBytes::for_ctx(cfg, 1 << 20, rope);
        (s.rows + s.idx_rows) as f64 / (1u64 << 20) as f64
    }

    /// The state of `cfg`'s main model at `ctx` tokens with RoPE dims stored as `rope`.
    pub fn for_ctx(cfg: &Config, ctx: usize, rope: RopeStore) -> StateBytes {
        let attn = RowFormat::attn_with(cfg, rope);
        let idx = RowFormat::indexer(cfg);
        let mut s = StateBytes::default();
        for l in 0..cfg.n_layers {
            s.ring += cfg.window * cfg.head_dim * 4;
            let r = cfg.compress_ratios.get(l).copied().unwrap_or(0);
            if r == 0 {
                continue;
            }
            let slots = |coff: usize| if coff == 2 { 2 * r } else { r } * coff;
            s.rows += ctx / r * attn.row_bytes();
            s.comp += 2 * slots(cfg.coff(l)) * cfg.head_dim * 4;
            if cfg.has_indexer(l) {
                s.idx_rows += ctx / r * idx.row_bytes();
                s.comp += 2 * slots(2) * cfg.index_head_dim * 4;
            }
        }
        s
    }
}
