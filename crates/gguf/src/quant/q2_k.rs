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

    /// f32 path: per 16-value sub-block `d·sc·Σq·x − dmin·m·Σx`. The 16
    /// `d·sc` and `dmin·m` factors of a block are computed as vectors and
    /// broadcast from a stack copy (no scalar conversions in the loop).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot(row: &[u8], x: &[f32]) -> f32 {
        let m3 = _mm256_set1_epi8(3);
        let m4 = _mm_set1_epi8(15);
        let mut acc = _mm256_setzero_ps();
        let mut accm = _mm256_setzero_ps();
        let mut f = [0f32; 32]; // d·sc[0..16], dmin·m[0..16]
        for i in 0..x.len() / QK {
            let b = row.as_ptr().add(i * BLOCK_BYTES);
            prefetch_block(b, BLOCK_BYTES);
            let d = _mm256_set1_ps(f16_1(u16::from_le_bytes([*b.add(80), *b.add(81)])));
            let dmin = _mm256_set1_ps(f16_1(u16::from_le_bytes([*b.add(82), *b.add(83)])));
            let sc8 = _mm_loadu_si128(b as *const __m128i);
            let sc = _mm_and_si128(sc8, m4);
            let mn = _mm_and_si128(_mm_srli_epi16(sc8, 4), m4);
            let cv = |v: __m128i| _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
            let fp = f.as_mut_ptr();
            _mm256_storeu_ps(fp, _mm256_mul_ps(d, cv(sc)));
            _mm256_storeu_ps(fp.add(8), _mm256_mul_ps(d, cv(_mm_srli_si128(sc, 8))));
            _mm256_storeu_ps(fp.add(16), _mm256_mul_ps(dmin, cv(mn)));
            _mm256_storeu_ps(fp.add(24), _mm256_mul_ps(dmin, cv(_mm_srli_si128(mn, 8))));
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
                    acc = _mm256_fmadd_ps(_mm256_broadcast_ss(&*fp.add(s)), qx0, acc);
                    acc = _mm256_fmadd_ps(_mm256_broadcast_ss(&*fp.add(s + 1)), qx1, acc);
                    accm = _mm256_fmadd_ps(_mm256_broadcast_ss(&*fp.add(16 + s)), xs0, accm);
                    accm = _mm256_fmadd_ps(_mm256_broadcast_ss(&*fp.add(17 + s)), xs1, accm);
                }
            }
        }
        hsum_ps(acc) - hsum_ps(accm)
    }

    /// `pshufb` controls broadcasting i16 scale `2j` to the low 128-bit lane
    /// and `2j+1` to the high lane (the scales register holds the same 8
    /// scales in both lanes).
    #[inline(always)]
    unsafe fn scale_shuffle(j: usize) -> __m256i {
        let lo = (0x0100 + 0x0202 * (2 * j)) as i16;
        let hi = (0x0100 + 0x0202 * (2 * j + 1)) as i16;
        _mm256_set_m128i(_mm_set1_epi16(hi), _mm_set1_epi16(lo))
    }

    /// ggml's AVX2 structure: scales broadcast by `pshufb`, `maddubs` of the
    /// 2-bit quants with the int8 activations, `madd` with the scales; mins
    /// times the Q8_K `bsums` accumulated as a vector (no per-block hsum).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q8(row: &[u8], xd: &[f32], xq: &[i8], bsums: &[i16]) -> f32 {
        let m3 = _mm256_set1_epi8(3);
        let m4 = _mm_set1_epi8(15);
        let shuf = [scale_shuffle(0), scale_shuffle(1), scale_shuffle(2), scale_shuffle(3)];
        let mut acc = _mm256_setzero_ps();
        let mut acc_m = _mm256_setzero_ps();
        for (i, &dx) in xd.iter().enumerate() {
            let b = row.as_ptr().add(i * BLOCK_BYTES);
            let q8 = xq.as_ptr().add(i * QK);
            prefetch_block(b, BLOCK_BYTES);
            let d = dx * f16_1(u16::from_le_bytes([*b.add(80), *b.add(81)]));
            let dmin = dx * f16_1(u16::from_le_bytes([*b.add(82), *b.add(83)]));
            let sc8 = _mm_loadu_si128(b as *const __m128i);
            // Mins times bsums: 16 i16 products summed pairwise in i32.
            let mins = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(sc8, 4), m4));
            let bs = _mm256_loadu_si256(bsums.as_ptr().add(i * 16) as *const __m256i);
            acc_m = _mm256_fmadd_ps(_mm256_set1_ps(dmin), _mm256_cvtepi32_ps(_mm256_madd_epi16(mins, bs)), acc_m);
            let scales = _mm256_cvtepu8_epi16(_mm_and_si128(sc8, m4));
            let mut s0 = _mm256_setzero_si256();
            let mut s1 = _mm256_setzero_si256();
            for h in 0..2 {
                // Scales 8h..8h+8 in both 128-bit lanes.
                let sc = if h == 0 {
                    _mm256_permute2x128_si256::<0x00>(scales, scales)
                } else {
                    _mm256_permute2x128_si256::<0x11>(scales, scales)
                };
                let bits = _mm256_loadu_si256(b.add(16 + 32 * h) as *const __m256i);
                let qa = q8.add(128 * h);
                let q0 = _mm256_and_si256(bits, m3);
                let q1 = _mm256_and_si256(_mm256_srli_epi16(bits, 2), m3);
                let q2 = _mm256_and_si256(_mm256_srli_epi16(bits, 4), m3);
                let q3 = _mm256_and_si256(_mm256_srli_epi16(bits, 6), m3);
                let p0 = _mm256_maddubs_epi16(q0, _mm256_loadu_si256(qa as *const __m256i));
                let p1 = _mm256_maddubs_epi16(q1, _mm256_loadu_si256(qa.add(32) as *const __m256i));
                let p2 = _mm256_maddubs_epi16(q2, _mm256_loadu_si256(qa.add(64) as *const __m256i));
                let p3 = _mm256_maddubs_epi16(q3, _mm256_loadu_si256(qa.add(96) as *const __m256i));
                let p0 = _mm256_madd_epi16(p0, _mm256_shuffle_epi8(sc, shuf[0]));
                let p1 = _mm256_madd_epi16(p1, _mm256_shuffle_epi8(sc, shuf[1]));
                let p2 = _mm256_madd_epi16(p2, _mm256_shuffle_epi8(sc, shuf[2]));
                let p3 = _mm256_madd_epi16(p3, _mm256_shuffle_epi8(sc, shuf[3]));
                s0 = _mm256_add_epi32(s0, _mm256_add_epi32(p0, p1));
                s1 = _mm256_add_epi32(s1, _mm256_add_epi32(p2, p3));
            }
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(_mm256_add_epi32(s0, s1)), acc);
        }
        hsum_ps(_mm256_sub_ps(acc, acc_m))
    }
}
