//! Q8_0 (spec §4.2): 34-byte blocks of f16 scale + 32 int8, `x = d·q`.
//!
//! Also the Q8_0-style activation quantisation used by the 8-bit dot path
//! (scale kept in f32, round-half-even, spec §4.7).

use super::float::{f16_to_f32, f32_to_f16, rd_u16};

pub const QK: usize = 32;
pub const BLOCK_BYTES: usize = 34;

pub(crate) fn dequant(data: &[u8], out: &mut [f32]) {
    for (b, o) in data.chunks_exact(BLOCK_BYTES).zip(out.chunks_exact_mut(QK)) {
        let d = f16_to_f32(rd_u16(b, 0));
        for (v, &q) in o.iter_mut().zip(&b[2..]) {
            *v = d * (q as i8) as f32;
        }
    }
}

/// Quantise to Q8_0 bytes exactly like ggml / gguf-py: `d = amax/127`,
/// `q = round_half_away(x/d)`, `d` stored as f16. `x.len()` must be a multiple of 32.
pub fn quantize_q8_0(x: &[f32]) -> Vec<u8> {
    assert!(x.len() % QK == 0, "quantize_q8_0: length {} is not a multiple of 32", x.len());
    let mut out = Vec::with_capacity(x.len() / QK * BLOCK_BYTES);
    for blk in x.chunks_exact(QK) {
        let amax = blk.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f32_to_f16(d).to_le_bytes());
        out.extend(blk.iter().map(|&v| ((v * id).round() as i32).clamp(-128, 127) as i8 as u8));
    }
    out
}

/// Activations quantised per 32 for Q8_0 weights.
#[derive(Clone, Debug, Default)]
pub struct Q8_0Acts {
    pub d: Vec<f32>,
    pub qs: Vec<i8>,
}

/// `d = amax/127`, `q = rint(x·(1/d))` half-even, clamp; all-zero block → d = 0, q = 0.
pub fn quantize_acts_q8_0(x: &[f32]) -> Q8_0Acts {
    assert!(x.len() % QK == 0, "Q8_0 activations: length {} is not a multiple of 32", x.len());
    let mut a = Q8_0Acts { d: Vec::with_capacity(x.len() / QK), qs: Vec::with_capacity(x.len()) };
    for blk in x.chunks_exact(QK) {
        let amax = blk.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if amax != 0.0 { 1.0 / d } else { 0.0 };
        a.d.push(d);
        a.qs.extend(blk.iter().map(|&v| (v * id).round_ties_even().clamp(-128.0, 127.0) as i8));
    }
    a
}

pub(crate) fn dot_scalar(row: &[u8], x: &[f32]) -> f32 {
    let mut s = 0f32;
    for (b, xb) in row.chunks_exact(BLOCK_BYTES).zip(x.chunks_exact(QK)) {
        let d = f16_to_f32(rd_u16(b, 0));
        let mut acc = [0f32; 8];
        for (qc, xc) in b[2..].chunks_exact(8).zip(xb.chunks_exact(8)) {
            for l in 0..8 {
                acc[l] += ((qc[l] as i8) as f32) * xc[l];
            }
        }
        s += d * acc.iter().sum::<f32>();
    }
    s
}

pub(crate) fn dot_q8_scalar(row: &[u8], xd: &[f32], xq: &[i8]) -> f32 {
    let mut s = 0f32;
    for ((b, &dx), qx) in row.chunks_exact(BLOCK_BYTES).zip(xd).zip(xq.chunks_exact(QK)) {
        let sumi: i32 = b[2..].iter().zip(qx).map(|(&w, &x)| (w as i8) as i32 * x as i32).sum();
        s += f16_to_f32(rd_u16(b, 0)) * dx * sumi as f32;
    }
    s
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use super::*;
    use crate::quant::simd::avx2::*;
    use std::arch::x86_64::*;

    /// Σ q·x of block `i` against f32 activations, as two f32 vectors.
    #[inline(always)]
    unsafe fn block_f32(r: *const u8, xp: *const f32, i: usize) -> (__m256, __m256) {
        let q = _mm256_loadu_si256(r.add(i * BLOCK_BYTES + 2) as *const __m256i);
        let xb = xp.add(i * QK);
        let q0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm256_castsi256_si128(q)));
        let q1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(_mm256_castsi256_si128(q), 8)));
        let hi = _mm256_extracti128_si256(q, 1);
        let q2 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi));
        let q3 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8)));
        let p01 = _mm256_fmadd_ps(q1, _mm256_loadu_ps(xb.add(8)), _mm256_mul_ps(q0, _mm256_loadu_ps(xb)));
        let p23 = _mm256_fmadd_ps(q3, _mm256_loadu_ps(xb.add(24)), _mm256_mul_ps(q2, _mm256_loadu_ps(xb.add(16))));
        (p01, p23)
    }

    /// f32 path; weight scales converted 8 blocks at a time (see [`dot_q8`]).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot(row: &[u8], x: &[f32]) -> f32 {
        let nb = x.len() / QK;
        let (r, xp) = (row.as_ptr(), x.as_ptr());
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let mut sc = [0f32; 8];
        let mut i = 0;
        while i + 8 <= nb {
            let b0 = r.add(i * BLOCK_BYTES);
            for l in 0..5 {
                _mm_prefetch::<_MM_HINT_T0>(b0.wrapping_add(PREFETCH + 64 * l) as *const i8);
            }
            _mm256_storeu_ps(sc.as_mut_ptr(), weight_scales8(r, i));
            for k in 0..8 {
                let d = _mm256_broadcast_ss(&*sc.as_ptr().add(k));
                let (p01, p23) = block_f32(r, xp, i + k);
                acc0 = _mm256_fmadd_ps(d, p01, acc0);
                acc1 = _mm256_fmadd_ps(d, p23, acc1);
            }
            i += 8;
        }
        while i < nb {
            let b = r.add(i * BLOCK_BYTES);
            let d = _mm256_set1_ps(f16_1(u16::from_le_bytes([*b, *b.add(1)])));
            let (p01, p23) = block_f32(r, xp, i);
            acc0 = _mm256_fmadd_ps(d, p01, acc0);
            acc1 = _mm256_fmadd_ps(d, p23, acc1);
            i += 1;
        }
        hsum_ps(_mm256_add_ps(acc0, acc1))
    }

    /// (d_w·d_x broadcast, Σ q_w·q_x as f32 lanes) of block `i`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn block(r: *const u8, qp: *const i8, xd: &[f32], i: usize) -> (__m256, __m256) {
        let b = r.add(i * BLOCK_BYTES);
        let dw = f16_1(u16::from_le_bytes([*b, *b.add(1)]));
        let w = _mm256_loadu_si256(b.add(2) as *const __m256i);
        let a = _mm256_loadu_si256(qp.add(i * QK) as *const __m256i);
        (_mm256_set1_ps(dw * *xd.get_unchecked(i)), _mm256_cvtepi32_ps(dot_i8x32(w, a)))
    }

    /// The eight f16 weight scales of blocks `i..i+8` (stride 34 bytes) as
    /// f32, with one gather and one conversion.
    #[inline(always)]
    unsafe fn weight_scales8(r: *const u8, i: usize) -> __m256 {
        let offs = _mm256_setr_epi32(0, 34, 68, 102, 136, 170, 204, 238);
        let g = _mm256_i32gather_epi32::<1>(r.add(i * BLOCK_BYTES) as *const i32, offs);
        let g = _mm256_and_si256(g, _mm256_set1_epi32(0xFFFF));
        _mm256_cvtph_ps(_mm_packus_epi32(_mm256_castsi256_si128(g), _mm256_extracti128_si256(g, 1)))
    }

    /// Combined scales `d_w·d_x` of the 8 blocks from `i`.
    #[inline(always)]
    unsafe fn scales8(r: *const u8, xd: *const f32, i: usize) -> __m256 {
        _mm256_mul_ps(weight_scales8(r, i), _mm256_loadu_ps(xd.add(i)))
    }

    /// Eight blocks per iteration: scales computed 8 at a time (one gather,
    /// one conversion) and broadcast from a stack copy; per block only the
    /// integer dot, one conversion and one FMA remain.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q8(row: &[u8], xd: &[f32], xq: &[i8]) -> f32 {
        let nb = xd.len();
        let (r, qp) = (row.as_ptr(), xq.as_ptr());
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let mut sc = [0f32; 8];
        let mut i = 0;
        while i + 8 <= nb {
            let b0 = r.add(i * BLOCK_BYTES);
            for l in 0..5 {
                _mm_prefetch::<_MM_HINT_T0>(b0.wrapping_add(PREFETCH + 64 * l) as *const i8);
            }
            _mm256_storeu_ps(sc.as_mut_ptr(), scales8(r, xd.as_ptr(), i));
            for k in (0..8).step_by(2) {
                let w0 = _mm256_loadu_si256(b0.add(k * BLOCK_BYTES + 2) as *const __m256i);
                let w1 = _mm256_loadu_si256(b0.add((k + 1) * BLOCK_BYTES + 2) as *const __m256i);
                let a0 = _mm256_loadu_si256(qp.add((i + k) * QK) as *const __m256i);
                let a1 = _mm256_loadu_si256(qp.add((i + k + 1) * QK) as *const __m256i);
                let p0 = _mm256_cvtepi32_ps(dot_i8x32(w0, a0));
                let p1 = _mm256_cvtepi32_ps(dot_i8x32(w1, a1));
                acc0 = _mm256_fmadd_ps(_mm256_broadcast_ss(&*sc.as_ptr().add(k)), p0, acc0);
                acc1 = _mm256_fmadd_ps(_mm256_broadcast_ss(&*sc.as_ptr().add(k + 1)), p1, acc1);
            }
            i += 8;
        }
        while i < nb {
            let (d0, p0) = block(r, qp, xd, i);
            acc0 = _mm256_fmadd_ps(d0, p0, acc0);
            i += 1;
        }
        hsum_ps(_mm256_add_ps(acc0, acc1))
    }
}
