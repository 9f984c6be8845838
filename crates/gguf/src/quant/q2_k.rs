//! Q2_K (spec §4.3): 84-byte blocks of 256 values — 16 sub-blocks of 16 with
//! 4-bit scale/min, 2-bit quants, f16 `d` and `dmin`.
//!
//! Layout: scales[16] @0, qs[64] @16, d @80, dmin @82. Within each 128-value
//! half, qs byte l holds elements l, 32+l, 64+l, 96+l in bit pairs 0..3.

use super::float::{f16_to_f32, rd_u16};
use super::q8_k::QK;

pub const BLOCK_BYTES: usize = 84;

/// Decode one block into 256 values (gguf-py order of operations: `(d·sc)·q − dmin·m`).
/// Fixed-size views remove bounds checks so the inner loops vectorise.
#[inline(always)]
pub(crate) fn dequant_block(b: &[u8], out: &mut [f32]) {
    let (Ok(b), Ok(out)) = (<&[u8; BLOCK_BYTES]>::try_from(b), <&mut [f32; QK]>::try_from(out)) else { return };
    let d = f16_to_f32(u16::from_le_bytes([b[80], b[81]]));
    let dmin = f16_to_f32(u16::from_le_bytes([b[82], b[83]]));
    for h in 0..2 {
        for j in 0..4 {
            for half in 0..2 {
                let s = 8 * h + 2 * j + half;
                let dl = d * (b[s] & 15) as f32;
                let ml = dmin * (b[s] >> 4) as f32;
                let base = 128 * h + 32 * j + 16 * half;
                let qs = &b[16 + 32 * h + 16 * half..][..16];
                for (o, &q) in out[base..base + 16].iter_mut().zip(qs) {
                    *o = dl * ((q >> (2 * j)) & 3) as f32 - ml;
                }
            }
        }
    }
}

pub(crate) fn dequant(data: &[u8], out: &mut [f32]) {
    for (b, o) in data.chunks_exact(BLOCK_BYTES).zip(out.chunks_exact_mut(QK)) {
        dequant_block(b, o);
    }
}

pub(crate) fn dot_scalar(row: &[u8], x: &[f32]) -> f32 {
    super::dot_via_dequant(row, x, BLOCK_BYTES, dequant_block)
}

/// Integer dot against Q8_K activations (spec §4.7).
pub(crate) fn dot_q8_scalar(row: &[u8], xd: &[f32], xq: &[i8], bsums: &[i16]) -> f32 {
    let mut s = 0f32;
    for (i, b) in row.chunks_exact(BLOCK_BYTES).enumerate() {
        let (scales, qs) = (&b[..16], &b[16..80]);
        let q8 = &xq[i * QK..(i + 1) * QK];
        let bs = &bsums[i * 16..(i + 1) * 16];
        let summ: i32 = (0..16).map(|k| (scales[k] >> 4) as i32 * bs[k] as i32).sum();
        let mut sumi = 0i32;
        for h in 0..2 {
            for j in 0..4 {
                for half in 0..2 {
                    let sc = (scales[8 * h + 2 * j + half] & 15) as i32;
                    let base = 128 * h + 32 * j + 16 * half;
                    let mut p = 0i32;
                    for l in 0..16 {
                        let q = ((qs[32 * h + 16 * half + l] >> (2 * j)) & 3) as i32;
                        p += q * q8[base + l] as i32;
                    }
                    sumi += sc * p;
                }
            }
        }
        let d = f16_to_f32(rd_u16(b, 80));
        let dmin = f16_to_f32(rd_u16(b, 82));
        s += xd[i] * (d * sumi as f32 - dmin * summ as f32);
    }
    s
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use super::*;
    use crate::quant::simd::avx2::*;
    use std::arch::x86_64::*;

    /// f32 path: per 16-value sub-block `d·sc·Σq·x − dmin·m·Σx`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot(row: &[u8], x: &[f32]) -> f32 {
        let m3 = _mm256_set1_epi8(3);
        let mut acc = _mm256_setzero_ps();
        let mut accm = _mm256_setzero_ps();
        for i in 0..x.len() / QK {
            let b = row.as_ptr().add(i * BLOCK_BYTES);
            prefetch_block(b, BLOCK_BYTES);
            let d = f16_1(u16::from_le_bytes([*b.add(80), *b.add(81)]));
            let dmin = f16_1(u16::from_le_bytes([*b.add(82), *b.add(83)]));
            let xb = x.as_ptr().add(i * QK);
            for h in 0..2 {
                let bits = _mm256_loadu_si256(b.add(16 + 32 * h) as *const __m256i);
                for j in 0..4 {
                    let q2 = match j {
                        0 => _mm256_and_si256(bits, m3),
                        1 => _mm256_and_si256(_mm256_srli_epi16(bits, 2), m3),
                        2 => _mm256_and_si256(_mm256_srli_epi16(bits, 4), m3),
                        _ => _mm256_and_si256(_mm256_srli_epi16(bits, 6), m3),
                    };
                    let s = 8 * h + 2 * j;
                    let base = xb.add(128 * h + 32 * j);
                    let (qx0, xs0) = qx_u8x16(_mm256_castsi256_si128(q2), base);
                    let (qx1, xs1) = qx_u8x16(_mm256_extracti128_si256(q2, 1), base.add(16));
                    let (s0, s1) = (*b.add(s), *b.add(s + 1));
                    acc = _mm256_fmadd_ps(_mm256_set1_ps(d * (s0 & 15) as f32), qx0, acc);
                    acc = _mm256_fmadd_ps(_mm256_set1_ps(d * (s1 & 15) as f32), qx1, acc);
                    accm = _mm256_fmadd_ps(_mm256_set1_ps(dmin * (s0 >> 4) as f32), xs0, accm);
                    accm = _mm256_fmadd_ps(_mm256_set1_ps(dmin * (s1 >> 4) as f32), xs1, accm);
                }
            }
        }
        hsum_ps(acc) - hsum_ps(accm)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q8(row: &[u8], xd: &[f32], xq: &[i8], bsums: &[i16]) -> f32 {
        let m3 = _mm256_set1_epi8(3);
        let m4 = _mm_set1_epi8(15);
        let mut acc = _mm256_setzero_ps();
        let mut acc_m = 0f32;
        for (i, &dx) in xd.iter().enumerate() {
            let b = row.as_ptr().add(i * BLOCK_BYTES);
            let q8 = xq.as_ptr().add(i * QK);
            prefetch_block(b, BLOCK_BYTES);
            let d = dx * f16_1(u16::from_le_bytes([*b.add(80), *b.add(81)]));
            let dmin = dx * f16_1(u16::from_le_bytes([*b.add(82), *b.add(83)]));
            let sc8 = _mm_loadu_si128(b as *const __m128i);
            // Mins times bsums: 16 × i16 products summed in i32.
            let mins = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(sc8, 4), m4));
            let bs = _mm256_loadu_si256(bsums.as_ptr().add(i * 16) as *const __m256i);
            let summ = hsum_epi32(_mm256_madd_epi16(mins, bs));
            let mut scales = [0i16; 16];
            _mm256_storeu_si256(scales.as_mut_ptr() as *mut __m256i, _mm256_cvtepu8_epi16(_mm_and_si128(sc8, m4)));
            let mut sumi = _mm256_setzero_si256();
            for h in 0..2 {
                let bits = _mm256_loadu_si256(b.add(16 + 32 * h) as *const __m256i);
                for j in 0..4 {
                    let q2 = match j {
                        0 => _mm256_and_si256(bits, m3),
                        1 => _mm256_and_si256(_mm256_srli_epi16(bits, 2), m3),
                        2 => _mm256_and_si256(_mm256_srli_epi16(bits, 4), m3),
                        _ => _mm256_and_si256(_mm256_srli_epi16(bits, 6), m3),
                    };
                    let a = _mm256_loadu_si256(q8.add(128 * h + 32 * j) as *const __m256i);
                    let p = _mm256_maddubs_epi16(q2, a);
                    let s = 8 * h + 2 * j;
                    let sc = _mm256_set_m128i(_mm_set1_epi16(scales[s + 1]), _mm_set1_epi16(scales[s]));
                    sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, sc));
                }
            }
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
            acc_m += dmin * summ as f32;
        }
        hsum_ps(acc) - acc_m
    }
}
