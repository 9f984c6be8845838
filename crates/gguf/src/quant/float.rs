//! Plain float formats: F32, F16 and BF16 (spec §4.1) — decode, encode, dot.

use half::{bf16, f16};

/// f16 bits → f32 (exact, subnormals included).
#[inline]
pub fn f16_to_f32(bits: u16) -> f32 {
    f16::from_bits(bits).to_f32()
}

/// f32 → f16 bits, round-to-nearest-even (overflow → ±inf).
#[inline]
pub fn f32_to_f16(x: f32) -> u16 {
    f16::from_f32(x).to_bits()
}

/// bf16 bits → f32: the upper half of a binary32.
#[inline]
pub fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// f32 → bf16 bits, round-to-nearest-even on the dropped 16 bits; NaNs stay quiet NaNs.
#[inline]
pub fn f32_to_bf16(x: f32) -> u16 {
    bf16::from_f32(x).to_bits()
}

#[inline]
pub(crate) fn rd_u16(b: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([b[i], b[i + 1]])
}

/// Encode f32 values as little-endian F32 bytes.
pub fn encode_f32(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le_bytes()).collect()
}
/// Encode f32 values as little-endian F16 bytes.
pub fn encode_f16(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|&v| f32_to_f16(v).to_le_bytes()).collect()
}
/// Encode f32 values as little-endian BF16 bytes.
pub fn encode_bf16(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|&v| f32_to_bf16(v).to_le_bytes()).collect()
}

pub(crate) fn dequant_f32(data: &[u8], out: &mut [f32]) {
    for (o, c) in out.iter_mut().zip(data.chunks_exact(4)) {
        *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
}
pub(crate) fn dequant_f16(data: &[u8], out: &mut [f32]) {
    for (o, c) in out.iter_mut().zip(data.chunks_exact(2)) {
        *o = f16_to_f32(u16::from_le_bytes([c[0], c[1]]));
    }
}
pub(crate) fn dequant_bf16(data: &[u8], out: &mut [f32]) {
    for (o, c) in out.iter_mut().zip(data.chunks_exact(2)) {
        *o = bf16_to_f32(u16::from_le_bytes([c[0], c[1]]));
    }
}

/// Generic "decode 8, multiply-add" loop (plain mul+add: `mul_add` would be a
/// libm call without hardware FMA) with 8 independent lanes; written so that
/// LLVM vectorises it when inlined into an AVX2 function.
#[inline(always)]
fn dot_lanes<const W: usize>(row: &[u8], x: &[f32], dec: impl Fn(&[u8]) -> f32) -> f32 {
    let mut acc = [0f32; 8];
    let n8 = x.len() / 8 * 8;
    for (xc, rc) in x[..n8].chunks_exact(8).zip(row.chunks_exact(8 * W)) {
        for l in 0..8 {
            acc[l] += dec(&rc[l * W..l * W + W]) * xc[l];
        }
    }
    let mut s = 0f32;
    for a in acc {
        s += a;
    }
    for i in n8..x.len() {
        s += dec(&row[i * W..i * W + W]) * x[i];
    }
    s
}

fn dec_f32(b: &[u8]) -> f32 {
    f32::from_le_bytes([b[0], b[1], b[2], b[3]])
}
fn dec_f16(b: &[u8]) -> f32 {
    f16_to_f32(u16::from_le_bytes([b[0], b[1]]))
}
fn dec_bf16(b: &[u8]) -> f32 {
    bf16_to_f32(u16::from_le_bytes([b[0], b[1]]))
}

pub(crate) fn dot_f32_scalar(row: &[u8], x: &[f32]) -> f32 {
    dot_lanes::<4>(row, x, dec_f32)
}
pub(crate) fn dot_f16_scalar(row: &[u8], x: &[f32]) -> f32 {
    dot_lanes::<2>(row, x, dec_f16)
}
pub(crate) fn dot_bf16_scalar(row: &[u8], x: &[f32]) -> f32 {
    dot_lanes::<2>(row, x, dec_bf16)
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use super::*;
    use crate::quant::simd::avx2::*;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_f32(row: &[u8], x: &[f32]) -> f32 {
        let n8 = x.len() / 8 * 8;
        let mut s = dot_f32_f32(row.as_ptr() as *const f32, x.as_ptr(), n8);
        for i in n8..x.len() {
            s += dec_f32(&row[i * 4..]) * x[i];
        }
        s
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_f16(row: &[u8], x: &[f32]) -> f32 {
        let n = x.len();
        let (r, xp) = (row.as_ptr(), x.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            for (k, a) in acc.iter_mut().enumerate() {
                let w = load_f16x8(r.add(2 * (i + 8 * k)));
                *a = _mm256_fmadd_ps(w, _mm256_loadu_ps(xp.add(i + 8 * k)), *a);
            }
            i += 32;
        }
        while i + 8 <= n {
            acc[0] = _mm256_fmadd_ps(load_f16x8(r.add(2 * i)), _mm256_loadu_ps(xp.add(i)), acc[0]);
            i += 8;
        }
        let mut s = hsum_ps(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
        while i < n {
            s += dec_f16(&row[2 * i..]) * x[i];
            i += 1;
        }
        s
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_bf16(row: &[u8], x: &[f32]) -> f32 {
        let n = x.len();
        let (r, xp) = (row.as_ptr(), x.as_ptr());
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let mut i = 0;
        while i + 16 <= n {
            let h = _mm256_loadu_si256(r.add(2 * i) as *const __m256i);
            let lo = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(h)), 16);
            let hi = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(h, 1)), 16);
            acc0 = _mm256_fmadd_ps(_mm256_castsi256_ps(lo), _mm256_loadu_ps(xp.add(i)), acc0);
            acc1 = _mm256_fmadd_ps(_mm256_castsi256_ps(hi), _mm256_loadu_ps(xp.add(i + 8)), acc1);
            i += 16;
        }
        let mut s = hsum_ps(_mm256_add_ps(acc0, acc1));
        while i < n {
            s += dec_bf16(&row[2 * i..]) * x[i];
            i += 1;
        }
        s
    }
}

/// Dense f32 dot product (SIMD when enabled); `a.len()` must equal `b.len()`.
pub fn dot_dense(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let n = a.len().min(b.len());
    #[cfg(target_arch = "x86_64")]
    if crate::quant::simd::simd_enabled() {
        let n8 = n / 8 * 8;
        // SAFETY: AVX2/FMA present; both slices hold at least n8 elements.
        let mut s = unsafe { crate::quant::simd::avx2::dot_f32_f32(a.as_ptr(), b.as_ptr(), n8) };
        for i in n8..n {
            s += a[i] * b[i];
        }
        return s;
    }
    let mut acc = [0f32; 8];
    let n8 = n / 8 * 8;
    for (ac, bc) in a[..n8].chunks_exact(8).zip(b[..n8].chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += ac[l] * bc[l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for i in n8..n {
        s += a[i] * b[i];
    }
    s
}
