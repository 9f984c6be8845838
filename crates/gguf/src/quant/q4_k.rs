//! Q4_K (spec §4.4): 144-byte blocks of 256 values — 8 sub-blocks of 32 with
//! 6-bit scale/min packed in 12 bytes, 4-bit quants, f16 `d` and `dmin`.
//!
//! Layout: d @0, dmin @2, scales[12] @4, qs[128] @16. Chunk c (64 values)
//! uses qs[32c..32c+32]: low nibbles = sub-block 2c, high = 2c+1.

use super::float::{f16_to_f32, rd_u16};
use super::q8_k::QK;

pub const BLOCK_BYTES: usize = 144;

/// ggml `get_scale_min_k4` for all 8 sub-blocks: (scales, mins).
#[inline(always)]
pub(crate) fn scales_mins(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let (mut sc, mut m) = ([0u8; 8], [0u8; 8]);
    for j in 0..8 {
        if j < 4 {
            sc[j] = s[j] & 63;
            m[j] = s[j + 4] & 63;
        } else {
            sc[j] = (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4);
            m[j] = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
        }
    }
    (sc, m)
}

/// Decode one block (fixed-size views so the inner loop vectorises).
#[inline(always)]
pub(crate) fn dequant_block(b: &[u8], out: &mut [f32]) {
    let (Ok(b), Ok(out)) = (<&[u8; BLOCK_BYTES]>::try_from(b), <&mut [f32; QK]>::try_from(out)) else { return };
    let d = f16_to_f32(u16::from_le_bytes([b[0], b[1]]));
    let dmin = f16_to_f32(u16::from_le_bytes([b[2], b[3]]));
    let (sc, m) = scales_mins(&b[4..16]);
    for c in 0..4 {
        let (d1, m1) = (d * sc[2 * c] as f32, dmin * m[2 * c] as f32);
        let (d2, m2) = (d * sc[2 * c + 1] as f32, dmin * m[2 * c + 1] as f32);
        let qs = &b[16 + 32 * c..16 + 32 * c + 32];
        let (lo, hi) = out[64 * c..64 * c + 64].split_at_mut(32);
        for l in 0..32 {
            lo[l] = d1 * (qs[l] & 15) as f32 - m1;
            hi[l] = d2 * (qs[l] >> 4) as f32 - m2;
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

pub(crate) fn dot_q8_scalar(row: &[u8], xd: &[f32], xq: &[i8], bsums: &[i16]) -> f32 {
    let mut s = 0f32;
    for (i, b) in row.chunks_exact(BLOCK_BYTES).enumerate() {
        let (sc, m) = scales_mins(&b[4..16]);
        let q8 = &xq[i * QK..(i + 1) * QK];
        let bs = &bsums[i * 16..(i + 1) * 16];
        let summ: i32 = (0..8).map(|k| m[k] as i32 * (bs[2 * k] as i32 + bs[2 * k + 1] as i32)).sum();
        let mut sumi = 0i32;
        for c in 0..4 {
            let (mut lo, mut hi) = (0i32, 0i32);
            for l in 0..32 {
                let q = b[16 + 32 * c + l];
                lo += (q & 15) as i32 * q8[64 * c + l] as i32;
                hi += (q >> 4) as i32 * q8[64 * c + 32 + l] as i32;
            }
            sumi += sc[2 * c] as i32 * lo + sc[2 * c + 1] as i32 * hi;
        }
        let d = f16_to_f32(rd_u16(b, 0));
        let dmin = f16_to_f32(rd_u16(b, 2));
        s += xd[i] * (d * sumi as f32 - dmin * summ as f32);
    }
    s
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use super::*;
    use crate::quant::simd::avx2::*;
    use std::arch::x86_64::*;

    /// f32 path: per 32-value sub-block `d·sc·Σq·x − dmin·m·Σx` (re-associated
    /// like ggml; equal to the dequantised dot up to f32 rounding).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot(row: &[u8], x: &[f32]) -> f32 {
        let m4 = _mm256_set1_epi8(15);
        let mut acc = _mm256_setzero_ps();
        let mut accm = _mm256_setzero_ps();
        for i in 0..x.len() / QK {
            let b = row.as_ptr().add(i * BLOCK_BYTES);
            prefetch_block(b, BLOCK_BYTES);
            let d = f16_1(u16::from_le_bytes([*b, *b.add(1)]));
            let dmin = f16_1(u16::from_le_bytes([*b.add(2), *b.add(3)]));
            let (sc, m) = scales_mins(std::slice::from_raw_parts(b.add(4), 12));
            let xb = x.as_ptr().add(i * QK);
            for c in 0..4 {
                let bits = _mm256_loadu_si256(b.add(16 + 32 * c) as *const __m256i);
                let (qx0, xs0) = qx_u8x32(_mm256_and_si256(bits, m4), xb.add(64 * c));
                let (qx1, xs1) = qx_u8x32(_mm256_and_si256(_mm256_srli_epi16(bits, 4), m4), xb.add(64 * c + 32));
                acc = _mm256_fmadd_ps(_mm256_set1_ps(d * sc[2 * c] as f32), qx0, acc);
                acc = _mm256_fmadd_ps(_mm256_set1_ps(d * sc[2 * c + 1] as f32), qx1, acc);
                accm = _mm256_fmadd_ps(_mm256_set1_ps(dmin * m[2 * c] as f32), xs0, accm);
                accm = _mm256_fmadd_ps(_mm256_set1_ps(dmin * m[2 * c + 1] as f32), xs1, accm);
            }
        }
        hsum_ps(acc) - hsum_ps(accm)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q8(row: &[u8], xd: &[f32], xq: &[i8], bsums: &[i16]) -> f32 {
        let m4 = _mm256_set1_epi8(15);
        let mut acc = _mm256_setzero_ps();
        let mut acc_m = 0f32;
        for (i, &dx) in xd.iter().enumerate() {
            let b = row.as_ptr().add(i * BLOCK_BYTES);
            let q8 = xq.as_ptr().add(i * QK);
            prefetch_block(b, BLOCK_BYTES);
            let d = dx * f16_1(u16::from_le_bytes([*b, *b.add(1)]));
            let dmin = dx * f16_1(u16::from_le_bytes([*b.add(2), *b.add(3)]));
            let (sc, m) = scales_mins(std::slice::from_raw_parts(b.add(4), 12));
            let bs = bsums.as_ptr().add(i * 16);
            let mut summ = 0i32;
            for (k, &mk) in m.iter().enumerate() {
                summ += mk as i32 * (*bs.add(2 * k) as i32 + *bs.add(2 * k + 1) as i32);
            }
            let mut sumi = _mm256_setzero_si256();
            for c in 0..4 {
                let bits = _mm256_loadu_si256(b.add(16 + 32 * c) as *const __m256i);
                let lo = _mm256_and_si256(bits, m4);
                let hi = _mm256_and_si256(_mm256_srli_epi16(bits, 4), m4);
                let a_lo = _mm256_loadu_si256(q8.add(64 * c) as *const __m256i);
                let a_hi = _mm256_loadu_si256(q8.add(64 * c + 32) as *const __m256i);
                let p_lo = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, a_lo), _mm256_set1_epi16(sc[2 * c] as i16));
                let p_hi = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, a_hi), _mm256_set1_epi16(sc[2 * c + 1] as i16));
                sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(p_lo, p_hi));
            }
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
            acc_m += dmin * summ as f32;
        }
        hsum_ps(acc) - acc_m
    }
}
