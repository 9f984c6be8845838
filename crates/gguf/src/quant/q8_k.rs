//! Q8_K (spec §4.6): 292-byte activation blocks of f32 scale, 256 int8 and
//! 16 i16 partial sums. Never stored in model files; used as the activation
//! side of the K-quant and IQ2_XXS integer dot products.

use super::float::rd_u16;

pub const QK: usize = 256;
pub const BLOCK_BYTES: usize = 292;

/// Activations quantised per 256 for K-quant / IQ2_XXS weights (struct-of-arrays).
#[derive(Clone, Debug, Default)]
pub struct Q8KActs {
    /// One scale per block.
    pub d: Vec<f32>,
    /// 256 quants per block.
    pub qs: Vec<i8>,
    /// 16 sums of 16 consecutive quants per block.
    pub bsums: Vec<i16>,
}

/// ggml `quantize_row_q8_K_ref`: `max` = signed element of largest |x|,
/// `iscale = −127/max`, `q = round_half_even(iscale·x)` clamped, `d = 1/iscale`.
pub fn quantize_acts_q8_k(x: &[f32]) -> Q8KActs {
    assert!(x.len() % QK == 0, "Q8_K activations: length {} is not a multiple of 256", x.len());
    let nb = x.len() / QK;
    let mut a = Q8KActs { d: Vec::with_capacity(nb), qs: Vec::with_capacity(x.len()), bsums: Vec::with_capacity(nb * 16) };
    for blk in x.chunks_exact(QK) {
        let (mut amax, mut max) = (0f32, 0f32);
        for &v in blk {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        if amax == 0.0 {
            a.d.push(0.0);
            a.qs.extend(std::iter::repeat(0i8).take(QK));
            a.bsums.extend(std::iter::repeat(0i16).take(16));
            continue;
        }
        let iscale = -127.0 / max;
        let start = a.qs.len();
        a.qs.extend(blk.iter().map(|&v| (iscale * v).round_ties_even().clamp(-128.0, 127.0) as i8));
        for g in a.qs[start..].chunks_exact(16) {
            a.bsums.push(g.iter().map(|&q| q as i16).sum());
        }
        a.d.push(1.0 / iscale);
    }
    a
}

impl Q8KActs {
    /// Serialise to the ggml `block_q8_K` byte layout.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.d.len() * BLOCK_BYTES);
        for (i, d) in self.d.iter().enumerate() {
            out.extend_from_slice(&d.to_le_bytes());
            out.extend(self.qs[i * QK..(i + 1) * QK].iter().map(|&q| q as u8));
            for s in &self.bsums[i * 16..(i + 1) * 16] {
                out.extend_from_slice(&s.to_le_bytes());
            }
        }
        out
    }
}

/// Quantise to Q8_K bytes (`block_q8_K` layout).
pub fn quantize_q8_k(x: &[f32]) -> Vec<u8> {
    quantize_acts_q8_k(x).to_bytes()
}

pub(crate) fn dequant(data: &[u8], out: &mut [f32]) {
    for (b, o) in data.chunks_exact(BLOCK_BYTES).zip(out.chunks_exact_mut(QK)) {
        let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        for (v, &q) in o.iter_mut().zip(&b[4..4 + QK]) {
            *v = d * (q as i8) as f32;
        }
    }
}

/// Read the bsums of a serialised block (for tests).
pub fn block_bsums(b: &[u8]) -> [i16; 16] {
    let mut s = [0i16; 16];
    for (k, v) in s.iter_mut().enumerate() {
        *v = rd_u16(b, 260 + 2 * k) as i16;
    }
    s
}
