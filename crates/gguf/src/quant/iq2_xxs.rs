//! IQ2_XXS (spec §4.5): 66-byte blocks of 256 values — f16 `d` then 8 groups
//! of 32 values, each two LE u32: `a0` = four 8-bit grid indices (8 values
//! each), `a1` = four 7-bit sign indices (bits 0..27) and a 4-bit scale (28..31).

use super::float::{f16_to_f32, rd_u16};
use super::iq2_tables::{IQ2XXS_GRID, KSIGNS_IQ2XS};
use super::q8_k::QK;

pub const BLOCK_BYTES: usize = 66;

/// ggml `keven_signs_q2xs`: for sign index i, byte m = 0xFF (−1) if bit m of
/// `ksigns_iq2xs[i]` is set, else 0x01 — the operand for `_mm256_sign_epi8`.
pub(crate) static KEVEN_SIGNS: [u64; 128] = {
    let mut t = [0u64; 128];
    let mut i = 0;
    while i < 128 {
        let s = KSIGNS_IQ2XS[i];
        let mut v = 0u64;
        let mut m = 0;
        while m < 8 {
            let byte: u64 = if (s >> m) & 1 == 1 { 0xFF } else { 0x01 };
            v |= byte << (8 * m);
            m += 1;
        }
        t[i] = v;
        i += 1;
    }
    t
};

#[inline(always)]
fn group_words(b: &[u8], g: usize) -> (u32, u32) {
    let o = 2 + 8 * g;
    (
        u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]),
        u32::from_le_bytes([b[o + 4], b[o + 5], b[o + 6], b[o + 7]]),
    )
}

#[inline(always)]
pub(crate) fn dequant_block(b: &[u8], out: &mut [f32]) {
    let d = f16_to_f32(rd_u16(b, 0));
    for g in 0..8 {
        let (a0, a1) = group_words(b, g);
        // Same operation order as gguf-py: d·(0.5+ls)·0.25, then ·grid·sign.
        let db = d * (0.5 + (a1 >> 28) as f32) * 0.25;
        for k in 0..4 {
            let grid = IQ2XXS_GRID[((a0 >> (8 * k)) & 255) as usize].to_le_bytes();
            let signs = KSIGNS_IQ2XS[((a1 >> (7 * k)) & 127) as usize];
            for m in 0..8 {
                let v = db * grid[m] as f32;
                out[32 * g + 8 * k + m] = if (signs >> m) & 1 == 1 { -v } else { v };
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

/// Integer dot against Q8_K: `d_x·d·0.125·Σ_g (2·ls_g+1)·Σ signed_grid·q8` (spec §4.7).
pub(crate) fn dot_q8_scalar(row: &[u8], xd: &[f32], xq: &[i8]) -> f32 {
    let mut s = 0f32;
    for (i, b) in row.chunks_exact(BLOCK_BYTES).enumerate() {
        let q8 = &xq[i * QK..(i + 1) * QK];
        let mut sumi = 0i32;
        for g in 0..8 {
            let (a0, a1) = group_words(b, g);
            let mut p = 0i32;
            for k in 0..4 {
                let grid = IQ2XXS_GRID[((a0 >> (8 * k)) & 255) as usize].to_le_bytes();
                let signs = KSIGNS_IQ2XS[((a1 >> (7 * k)) & 127) as usize];
                for m in 0..8 {
                    let v = grid[m] as i32 * q8[32 * g + 8 * k + m] as i32;
                    p += if (signs >> m) & 1 == 1 { -v } else { v };
                }
            }
            sumi += (2 * (a1 >> 28) as i32 + 1) * p;
        }
        s += xd[i] * f16_to_f32(rd_u16(b, 0)) * 0.125 * sumi as f32;
    }
    s
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use super::*;
    use crate::quant::simd::avx2::*;
    use std::arch::x86_64::*;

    /// 32 signed grid values of group `g` of block `b` as i8 lanes.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn group_i8(b: *const u8, g: usize) -> (__m256i, u32) {
        let w = (b.add(2 + 8 * g) as *const [u32; 2]).read_unaligned();
        let (a0, a1) = (u32::from_le(w[0]), u32::from_le(w[1]));
        let grid = IQ2XXS_GRID.as_ptr();
        let signs = KEVEN_SIGNS.as_ptr();
        let gv = _mm256_set_epi64x(
            *grid.add((a0 >> 24) as usize) as i64,
            *grid.add(((a0 >> 16) & 255) as usize) as i64,
            *grid.add(((a0 >> 8) & 255) as usize) as i64,
            *grid.add((a0 & 255) as usize) as i64,
        );
        let sv = _mm256_set_epi64x(
            *signs.add(((a1 >> 21) & 127) as usize) as i64,
            *signs.add(((a1 >> 14) & 127) as usize) as i64,
            *signs.add(((a1 >> 7) & 127) as usize) as i64,
            *signs.add((a1 & 127) as usize) as i64,
        );
        (_mm256_sign_epi8(gv, sv), a1 >> 28)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot(row: &[u8], x: &[f32]) -> f32 {
        let nb = x.len() / QK;
        let mut acc = _mm256_setzero_ps();
        for i in 0..nb {
            let b = row.as_ptr().add(i * BLOCK_BYTES);
            prefetch_block(b, BLOCK_BYTES);
            let d = f16_1(u16::from_le_bytes([*b, *b.add(1)]));
            for g in 0..8 {
                let (v, ls) = group_i8(b, g);
                let xp = x.as_ptr().add(i * QK + 32 * g);
                let lo = _mm256_castsi256_si128(v);
                let hi = _mm256_extracti128_si256(v, 1);
                let w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo));
                let w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8)));
                let w2 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi));
                let w3 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8)));
                let p01 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xp.add(8)), _mm256_mul_ps(w0, _mm256_loadu_ps(xp)));
                let p23 = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xp.add(24)), _mm256_mul_ps(w2, _mm256_loadu_ps(xp.add(16))));
                // Same scale as dequantisation: d·(0.5+ls)·0.25.
                let db = d * (0.5 + ls as f32) * 0.25;
                acc = _mm256_fmadd_ps(_mm256_set1_ps(db), _mm256_add_ps(p01, p23), acc);
            }
        }
        hsum_ps(acc)
    }

    /// Σ signed_grid·q8 of group `g` (as 8 i32 lanes, pre-scaled by 2·ls+1).
    /// Grid indices are read as bytes straight from the block (no shifts);
    /// table loads + inserts beat hardware gathers on the AMD target (measured).
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn group_q8(b: *const u8, q8: *const i8, g: usize) -> __m256i {
        let gp = b.add(2 + 8 * g);
        let a1 = u32::from_le((gp.add(4) as *const u32).read_unaligned());
        let grid = IQ2XXS_GRID.as_ptr();
        let signs = KEVEN_SIGNS.as_ptr();
        let gv = _mm256_set_epi64x(
            *grid.add(*gp.add(3) as usize) as i64,
            *grid.add(*gp.add(2) as usize) as i64,
            *grid.add(*gp.add(1) as usize) as i64,
            *grid.add(*gp as usize) as i64,
        );
        let sv = _mm256_set_epi64x(
            *signs.add(((a1 >> 21) & 127) as usize) as i64,
            *signs.add(((a1 >> 14) & 127) as usize) as i64,
            *signs.add(((a1 >> 7) & 127) as usize) as i64,
            *signs.add((a1 & 127) as usize) as i64,
        );
        let a = _mm256_sign_epi8(_mm256_loadu_si256(q8.add(32 * g) as *const __m256i), sv);
        let p = _mm256_maddubs_epi16(gv, a);
        _mm256_madd_epi16(p, _mm256_set1_epi16((2 * (a1 >> 28) + 1) as i16))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q8(row: &[u8], xd: &[f32], xq: &[i8]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        for (i, &dx) in xd.iter().enumerate() {
            let b = row.as_ptr().add(i * BLOCK_BYTES);
            let q8 = xq.as_ptr().add(i * QK);
            prefetch_block(b, BLOCK_BYTES);
            let d = dx * f16_1(u16::from_le_bytes([*b, *b.add(1)])) * 0.125;
            // Two independent integer accumulators for ILP.
            let mut s0 = _mm256_setzero_si256();
            let mut s1 = _mm256_setzero_si256();
            for g in (0..8).step_by(2) {
                s0 = _mm256_add_epi32(s0, group_q8(b, q8, g));
                s1 = _mm256_add_epi32(s1, group_q8(b, q8, g + 1));
            }
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(_mm256_add_epi32(s0, s1)), acc);
        }
        hsum_ps(acc)
    }
}
