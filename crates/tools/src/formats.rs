//! Decoding the official checkpoint's number formats into f32 rows
//! (gguf.md §5): FP8 e4m3 with one E8M0 power-of-two scale per 128×128 block,
//! FP4 e2m1 packed two per byte (low nibble = even element) with one E8M0 scale
//! per 32 inputs, and plain BF16 / F16 / F32.
//!
//! Everything works a row at a time so the converter can stream a tensor in
//! bounded memory and decode rows in parallel. Shapes and scale grids are
//! checked once when a [`SourceMatrix`] is built, so the per-row path has no
//! input-dependent failure left except NaN codes, which are reported.

use crate::safetensors::{Checkpoint, Dtype, SafetensorsError, TensorView};

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Safetensors(#[from] SafetensorsError),
    #[error("tensor {tensor:?}: {msg}")]
    Bad { tensor: String, msg: String },
}

fn bad(tensor: &str, msg: impl Into<String>) -> SourceError {
    SourceError::Bad { tensor: tensor.to_string(), msg: msg.into() }
}

/// e4m3fn (bias 7, no infinities; 0x7f / 0xff are NaN) → f32, all 256 codes.
pub static E4M3: [f32; 256] = {
    let mut t = [0f32; 256];
    let mut i = 0;
    while i < 256 {
        let sign = if i & 0x80 != 0 { -1.0f32 } else { 1.0 };
        let e = ((i >> 3) & 15) as i32;
        let m = (i & 7) as f32;
        let mag = if e == 15 && (i & 7) == 7 {
            f32::NAN
        } else if e == 0 {
            m / 8.0 / 64.0 // 2^-6 · m/8
        } else {
            // (1 + m/8) · 2^(e-7), built from exact powers of two.
            let mut p = 1.0f32;
            let mut k = e - 7;
            while k > 0 {
                p *= 2.0;
                k -= 1;
            }
            while k < 0 {
                p /= 2.0;
                k += 1;
            }
            (1.0 + m / 8.0) * p
        };
        t[i] = sign * mag;
        i += 1;
    }
    t
};

/// e2m1 codes {0, .5, 1, 1.5, 2, 3, 4, 6} with bit 3 as sign.
pub const E2M1: [f32; 16] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0];

/// E8M0 scale byte → 2^(e−127); 255 is NaN (None). 0 gives 2^−127 (a subnormal f32).
#[inline]
pub fn e8m0(b: u8) -> Option<f32> {
    match b {
        255 => None,
        0 => Some(f32::from_bits(0x0040_0000)),
        e => Some(f32::from_bits((e as u32) << 23)),
    }
}

#[derive(Clone, Copy, Debug)]
enum Kind<'a> {
    F32,
    F16,
    BF16,
    Fp8 { scale: &'a [u8], scale_cols: usize },
    Fp4 { scale: &'a [u8] },
}

/// A 2-D (or 1-D, as one row) source tensor that decodes to f32 rows of `cols` values.
#[derive(Clone, Copy, Debug)]
pub struct SourceMatrix<'a> {
    pub name: &'a str,
    pub rows: usize,
    pub cols: usize,
    data: &'a [u8],
    kind: Kind<'a>,
}

/// `layers.0.attn.wq_a.weight` → `layers.0.attn.wq_a.scale`.
pub fn scale_name(weight: &str) -> String {
    format!("{}.scale", weight.strip_suffix(".weight").unwrap_or(weight))
}

impl<'a> SourceMatrix<'a> {
    /// Looks `name` up in the checkpoint; FP8 / FP4 weights need their `.scale`.
    pub fn open(ck: &'a Checkpoint, name: &str) -> Result<SourceMatrix<'a>, SourceError> {
        let v = ck.get(name)?;
        let scale = match v.dtype {
            Dtype::F8E4M3 | Dtype::I8 | Dtype::U8 => {
                let sn = scale_name(name);
                let s = ck.get(&sn).map_err(|_| bad(name, format!("{} weight without its scale tensor {sn:?}", v.dtype.name())))?;
                Some(s)
            }
            _ => None,
        };
        Self::from_views(v, scale)
    }

    pub fn from_views(v: TensorView<'a>, scale: Option<TensorView<'a>>) -> Result<SourceMatrix<'a>, SourceError> {
        let name = v.name;
        let (rows, cols) = match v.shape {
            [n] => (1, *n),
            [r, c] => (*r, *c),
            s => return Err(bad(name, format!("expected a 1-D or 2-D tensor, shape is {s:?}"))),
        };
        let kind = match v.dtype {
            Dtype::F32 => Kind::F32,
            Dtype::F16 => Kind::F16,
            Dtype::BF16 => Kind::BF16,
            Dtype::F8E4M3 => {
                let s = scale.ok_or_else(|| bad(name, "FP8 weight without a scale"))?;
                let want = [rows.div_ceil(128), cols.div_ceil(128)];
                if s.dtype != Dtype::F8E8M0 || s.shape != want {
                    return Err(bad(name, format!("FP8 scale must be F8_E8M0 {want:?} (one per 128x128 block), found {} {:?}", s.dtype.name(), s.shape)));
                }
                Kind::Fp8 { scale: s.data, scale_cols: want[1] }
            }
            Dtype::I8 | Dtype::U8 => {
                let s = scale.ok_or_else(|| bad(name, "packed FP4 weight without a scale"))?;
                let full = cols * 2;
                let want = [rows, full / 32];
                if full % 32 != 0 || s.dtype != Dtype::F8E8M0 || s.shape != want {
                    return Err(bad(
                        name,
                        format!("FP4 scale must be F8_E8M0 {want:?} (one per 32 inputs, {full} inputs), found {} {:?}", s.dtype.name(), s.shape),
                    ));
                }
                return Ok(SourceMatrix { name, rows, cols: full, data: v.data, kind: Kind::Fp4 { scale: s.data } });
            }
            d => return Err(bad(name, format!("dtype {} is not a weight format", d.name()))),
        };
        Ok(SourceMatrix { name, rows, cols, data: v.data, kind })
    }

    /// The PyTorch shape `[rows, cols]` after unpacking (FP4 columns doubled).
    pub fn shape(&self) -> [usize; 2] {
        [self.rows, self.cols]
    }

    pub fn format_name(&self) -> &'static str {
        match self.kind {
            Kind::F32 => "F32",
            Kind::F16 => "F16",
            Kind::BF16 => "BF16",
            Kind::Fp8 { .. } => "F8_E4M3",
            Kind::Fp4 { .. } => "FP4 (I8)",
        }
    }

    /// Decodes row `r` into `out` (`cols` values).
    pub fn row(&self, r: usize, out: &mut [f32]) -> Result<(), SourceError> {
        assert!(r < self.rows && out.len() == self.cols, "row {r} / len {} out of range", out.len());
        let c = self.cols;
        match self.kind {
            Kind::F32 => {
                for (o, b) in out.iter_mut().zip(self.data[r * c * 4..(r + 1) * c * 4].chunks_exact(4)) {
                    *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            Kind::F16 => {
                for (o, b) in out.iter_mut().zip(self.data[r * c * 2..(r + 1) * c * 2].chunks_exact(2)) {
                    *o = half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
                }
            }
            Kind::BF16 => {
                for (o, b) in out.iter_mut().zip(self.data[r * c * 2..(r + 1) * c * 2].chunks_exact(2)) {
                    *o = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
                }
            }
            Kind::Fp8 { scale, scale_cols } => {
                let codes = &self.data[r * c..(r + 1) * c];
                let srow = &scale[(r / 128) * scale_cols..(r / 128 + 1) * scale_cols];
                for (bi, (oc, cc)) in out.chunks_mut(128).zip(codes.chunks(128)).enumerate() {
                    let s = e8m0(srow[bi]).ok_or_else(|| bad(self.name, format!("NaN scale (0xff) at block ({}, {bi})", r / 128)))?;
                    for (o, &q) in oc.iter_mut().zip(cc) {
                        if q & 0x7f == 0x7f {
                            return Err(bad(self.name, format!("NaN FP8 code at row {r}")));
                        }
                        *o = E4M3[q as usize] * s;
                    }
                }
            }
            Kind::Fp4 { scale } => {
                let packed = &self.data[r * c / 2..(r + 1) * c / 2];
                let srow = &scale[r * (c / 32)..(r + 1) * (c / 32)];
                for (bi, (oc, pc)) in out.chunks_mut(32).zip(packed.chunks(16)).enumerate() {
                    let s = e8m0(srow[bi]).ok_or_else(|| bad(self.name, format!("NaN scale (0xff) at row {r}, group {bi}")))?;
                    for (j, &b) in pc.iter().enumerate() {
                        oc[2 * j] = E2M1[(b & 15) as usize] * s;
                        oc[2 * j + 1] = E2M1[(b >> 4) as usize] * s;
                    }
                }
            }
        }
        Ok(())
    }

    /// All rows, row-major (for small tensors and tests).
    pub fn to_vec(&self) -> Result<Vec<f32>, SourceError> {
        let mut v = vec![0f32; self.rows * self.cols];
        for (r, o) in v.chunks_mut(self.cols.max(1)).enumerate().take(self.rows) {
            self.row(r, o)?;
        }
        Ok(v)
    }
}

/// `tid2eid` I64 `[vocab, k]` → row-major i32, each id checked against `n_experts`.
pub fn tid2eid_i32(v: &TensorView<'_>, n_experts: usize) -> Result<Vec<i32>, SourceError> {
    if !matches!(v.dtype, Dtype::I64 | Dtype::I32) {
        return Err(bad(v.name, format!("tid2eid must be I64 or I32, found {}", v.dtype.name())));
    }
    let sz = v.dtype.size();
    v.data
        .chunks_exact(sz)
        .enumerate()
        .map(|(i, b)| {
            let x = if sz == 8 { i64::from_le_bytes(b.try_into().expect("8")) } else { i32::from_le_bytes(b.try_into().expect("4")) as i64 };
            if x < 0 || x >= n_experts as i64 {
                Err(bad(v.name, format!("entry {i} = {x} is not an expert id (0..{n_experts})")))
            } else {
                Ok(x as i32)
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e4m3_table_matches_definition() {
        assert_eq!(E4M3[0], 0.0);
        assert_eq!(E4M3[0x38], 1.0); // e=7, m=0
        assert_eq!(E4M3[0x7e], 448.0);
        assert_eq!(E4M3[0xfe], -448.0);
        assert_eq!(E4M3[0x01], 2f32.powi(-9));
        assert!(E4M3[0x7f].is_nan() && E4M3[0xff].is_nan());
        assert_eq!(E4M3[0x3c], 1.5);
    }

    #[test]
    fn e8m0_powers() {
        assert_eq!(e8m0(127), Some(1.0));
        assert_eq!(e8m0(128), Some(2.0));
        assert_eq!(e8m0(120), Some(2f32.powi(-7)));
        assert_eq!(e8m0(0), Some(2f32.powi(-127)));
        assert_eq!(e8m0(255), None);
    }
}
