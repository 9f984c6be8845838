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
        let mut f = [0f32; 16];
        for i in 0..x.len() / QK {
            let b = row.as_ptr().add(i * BLOCK_BYTES);
            prefetch_block(b, BLOCK_BYTES);
            let d = _mm256_set1_ps(f16_1(u16::from_le_bytes([*b, *b.add(1)])));
            let dmin = _mm256_set1_ps(f16_1(u16::from_le_bytes([*b.add(2), *b.add(3)])));
            // d·sc[0..8], dmin·m[0..8] as vectors, broadcast from a stack copy.
            let w = scales_mins_words(b.add(4));
            let scm = _mm_set_epi32(w[3] as i32, w[2] as i32, w[1] as i32, w[0] as i32);
            let fp = f.as_mut_ptr();
            _mm256_storeu_ps(fp, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(scm))));
            _mm256_storeu_ps(fp.add(8), _mm256_mul_ps(dmin, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(scm, 8)))));
            let xb = x.as_ptr().add(i * QK);
            for c in 0..4 {
                let bits = _mm256_loadu_si256(b.add(16 + 32 * c) as *const __m256i);
                let (qx0, xs0) = qx_u8x32(_mm256_and_si256(bits, m4), xb.add(64 * c));
                let (qx1, xs1) = qx_u8x32(_mm256_and_si256(_mm256_srli_epi16(bits, 4), m4), xb.add(64 * c + 32));
                acc = _mm256_fmadd_ps(_mm256_broadcast_ss(&*fp.add(2 * c)), qx0, acc);
                acc = _mm256_fmadd_ps(_mm256_broadcast_ss(&*fp.add(2 * c + 1)), qx1, acc);
                accm = _mm256_fmadd_ps(_mm256_broadcast_ss(&*fp.add(8 + 2 * c)), xs0, accm);
                accm = _mm256_fmadd_ps(_mm256_broadcast_ss(&*fp.add(9 + 2 * c)), xs1, accm);
            }
        }
        hsum_ps(acc) - hsum_ps(accm)
    }

    /// ggml's 12-byte scale unpacking as four u32 words: `[sc0..3, sc4..7, m0..3, m4..7]`.
    #[inline(always)]
    pub(crate) fn scales_mins_words(p: *const u8) -> [u32; 4] {
        const K1: u32 = 0x3f3f_3f3f;
        const K2: u32 = 0x0f0f_0f0f;
        const K3: u32 = 0x0303_0303;
        // SAFETY: the caller passes a pointer to the 12 scale bytes of a block.
        let u: [u32; 3] = unsafe { (p as *const [u32; 3]).read_unaligned() };
        let (u0, u1, u2) = (u32::from_le(u[0]), u32::from_le(u[1]), u32::from_le(u[2]));
        [u0 & K1, (u2 & K2) | (((u0 >> 6) & K3) << 4), u1 & K1, ((u2 >> 4) & K2) | (((u1 >> 6) & K3) << 4)]
    }

    /// ggml's AVX2 structure: scales/mins unpacked with word operations,
    /// mins·bsums as one `madd`, scales broadcast with `pshufb`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q8(row: &[u8], xd: &[f32], xq: &[i8], bsums: &[i16]) -> f32 {
        let m4 = _mm256_set1_epi8(15);
        let mut shuf = [_mm256_setzero_si256(); 8];
        for (k, s) in shuf.iter_mut().enumerate() {
            *s = _mm256_set1_epi16((0x0100 + 0x0202 * k) as i16);
        }
        let mut acc = _mm256_setzero_ps();
        let mut acc_m = _mm_setzero_ps();
        for (i, &dx) in xd.iter().enumerate() {
            let b = row.as_ptr().add(i * BLOCK_BYTES);
            let q8 = xq.as_ptr().add(i * QK);
            prefetch_block(b, BLOCK_BYTES);
            let d = dx * f16_1(u16::from_le_bytes([*b, *b.add(1)]));
            let dmin = dx * f16_1(u16::from_le_bytes([*b.add(2), *b.add(3)]));
            let w = scales_mins_words(b.add(4));
            // [sc0..sc7 | m0..m7] as i16.
            let ms = _mm256_cvtepu8_epi16(_mm_set_epi32(w[3] as i32, w[2] as i32, w[1] as i32, w[0] as i32));
            let bs = _mm256_loadu_si256(bsums.as_ptr().add(i * 16) as *const __m256i);
            // Pairwise bsums = sums over the 8 sub-blocks of 32.
            let q8s = _mm_hadd_epi16(_mm256_castsi256_si128(bs), _mm256_extracti128_si256(bs, 1));
            let prod = _mm_madd_epi16(_mm256_extracti128_si256(ms, 1), q8s);
            acc_m = _mm_fmadd_ps(_mm_set1_ps(dmin), _mm_cvtepi32_ps(prod), acc_m);
            let sc128 = _mm256_castsi256_si128(ms);
            let scales = _mm256_set_m128i(sc128, sc128);
            let mut s0 = _mm256_setzero_si256();
            let mut s1 = _mm256_setzero_si256();
            for c in 0..4 {
                let bits = _mm256_loadu_si256(b.add(16 + 32 * c) as *const __m256i);
                let lo = _mm256_and_si256(bits, m4);
                let hi = _mm256_and_si256(_mm256_srli_epi16(bits, 4), m4);
                let a_lo = _mm256_loadu_si256(q8.add(64 * c) as *const __m256i);
                let a_hi = _mm256_loadu_si256(q8.add(64 * c + 32) as *const __m256i);
                let p_lo = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, a_lo), _mm256_shuffle_epi8(scales, shuf[2 * c]));
                let p_hi = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, a_hi), _mm256_shuffle_epi8(scales, shuf[2 * c + 1]));
                s0 = _mm256_add_epi32(s0, p_lo);
                s1 = _mm256_add_epi32(s1, p_hi);
            }
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(_mm256_add_epi32(s0, s1)), acc);
        }
        let m = _mm_add_ps(acc_m, _mm_movehl_ps(acc_m, acc_m));
        let m = _mm_add_ss(m, _mm_movehdup_ps(m));
        hsum_ps(acc) - _mm_cvtss_f32(m)
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    #[test]
    fn scale_words_match_scales_mins() {
        let mut s = 0x1234_5678_9abc_def1u64;
        for _ in 0..2000 {
            let mut b = [0u8; 12];
            for v in b.iter_mut() {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                *v = s as u8;
            }
            let (sc, m) = scales_mins(&b);
            let w = avx2::scales_mins_words(b.as_ptr());
            let bytes: Vec<u8> = w.iter().flat_map(|x| x.to_le_bytes()).collect();
            assert_eq!(&bytes[..8], &sc);
            assert_eq!(&bytes[8..], &m);
        }
    }
}
