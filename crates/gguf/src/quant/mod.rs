//! Block formats: dequantisation, f32-activation dot products and encoders.
//!
//! One file per format; each has a scalar reference and (on x86-64) an AVX2
//! variant chosen at run time (see [`simd`]; `DSV4_NO_SIMD=1` forces scalar).
//! IQ2_XXS also has an AVX-512 (VBMI/VNNI/GFNI) variant, used where the CPU
//! has it (`DSV4_NO_AVX512=1` keeps AVX2); [`SimdLevel`] selects explicitly.
//! Dequantisation is scalar only: it is not on the inference hot path and is
//! the bit-exact reference the tests compare against gguf-py.

pub mod float;
pub mod iq2_tables;
pub mod iq2_xxs;
pub mod q2_k;
pub mod q4_k;
pub mod q8_0;
pub mod q8_k;
pub mod simd;

pub use float::{bf16_to_f32, encode_bf16, encode_f16, encode_f32, f16_to_f32, f32_to_bf16, f32_to_f16};
pub use q8_0::{quantize_acts_q8_0, quantize_q8_0, Q8_0Acts};
pub use q8_k::{quantize_acts_q8_k, quantize_q8_k, Q8KActs};
pub use simd::{avx512_available, best_level, levels_available, simd_available, simd_enabled, simd_level, SimdLevel};

use crate::container::GgufError;
use crate::types::GgmlType;

// Block geometry of each format module agrees with the type table (spec §1.1).
const _: () = assert!(q8_0::BLOCK_BYTES == 34 && q8_0::QK == 32);
const _: () = assert!(q2_k::BLOCK_BYTES == 84 && q4_k::BLOCK_BYTES == 144);
const _: () = assert!(iq2_xxs::BLOCK_BYTES == 66 && q8_k::BLOCK_BYTES == 292 && q8_k::QK == 256);

/// Decode `out.len()` elements of type `ty`; `data` must be exactly
/// `ty.row_bytes(out.len())` bytes. I32 is rejected (use [`read_i32`]).
pub fn dequantize(ty: GgmlType, data: &[u8], out: &mut [f32]) -> Result<(), GgufError> {
    let expected = ty.row_bytes(out.len()).ok_or(GgufError::Length {
        ty,
        what: "output (not a whole number of blocks)",
        expected: out.len().div_ceil(ty.block_elems()) * ty.block_elems(),
        got: out.len(),
    })?;
    if data.len() != expected {
        return Err(GgufError::Length { ty, what: "input data", expected, got: data.len() });
    }
    match ty {
        GgmlType::F32 => float::dequant_f32(data, out),
        GgmlType::F16 => float::dequant_f16(data, out),
        GgmlType::BF16 => float::dequant_bf16(data, out),
        GgmlType::Q8_0 => q8_0::dequant(data, out),
        GgmlType::Q2_K => q2_k::dequant(data, out),
        GgmlType::Q4_K => q4_k::dequant(data, out),
        GgmlType::IQ2_XXS => iq2_xxs::dequant(data, out),
        GgmlType::Q8_K => q8_k::dequant(data, out),
        GgmlType::I32 => return Err(GgufError::Unsupported { ty, op: "dequantize (use read_i32)" }),
    }
    Ok(())
}

/// Convenience: dequantise into a new vector of `n` elements.
pub fn dequantize_vec(ty: GgmlType, data: &[u8], n: usize) -> Result<Vec<f32>, GgufError> {
    // Check sizes before allocating so hostile sizes cannot trigger a huge allocation.
    if ty.row_bytes(n) != Some(data.len()) {
        return Err(GgufError::Length { ty, what: "input data", expected: ty.row_bytes(n).unwrap_or(0), got: data.len() });
    }
    let mut out = vec![0f32; n];
    dequantize(ty, data, &mut out)?;
    Ok(out)
}

/// Little-endian int32 values (the I32 `tid2eid` table). Trailing bytes are ignored.
pub fn read_i32(data: &[u8]) -> Vec<i32> {
    data.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// Dot product of one row of `x.len()` elements of type `ty` with `x`, f32
/// accumulation (uses SIMD when enabled).
pub fn dot_f32(ty: GgmlType, row: &[u8], x: &[f32]) -> f32 {
    dot_f32_with(ty, row, x, simd_enabled())
}

/// [`dot_f32`] with an explicit choice of SIMD (`true` = the best level the
/// CPU supports, see [`simd::best_level`]). Unsupported types (I32, Q8_K) return NaN.
pub fn dot_f32_with(ty: GgmlType, row: &[u8], x: &[f32], simd: bool) -> f32 {
    dot_f32_at(ty, row, x, simd::level_of(simd))
}

/// [`dot_f32`] at an explicit [`SimdLevel`] (lowered to what the CPU supports).
pub fn dot_f32_at(ty: GgmlType, row: &[u8], x: &[f32], level: SimdLevel) -> f32 {
    debug_assert_eq!(ty.row_bytes(x.len()), Some(row.len()), "dot_f32: row/x length mismatch for {ty}");
    let n = x.len() / ty.block_elems() * ty.block_elems();
    let Some(nb) = ty.row_bytes(n) else { return f32::NAN };
    if row.len() < nb {
        return f32::NAN;
    }
    let (row, x) = (&row[..nb], &x[..n]);
    let level = simd::clamp_level(level);
    #[cfg(all(target_arch = "x86_64", dsv4_avx512))]
    if level == SimdLevel::Avx512 {
        // SAFETY: the CPU supports AVX-512 F/BW/VBMI/VNNI/GFNI + AVX2/FMA/F16C (clamp_level); lengths are consistent.
        if ty == GgmlType::IQ2_XXS {
            return unsafe { iq2_xxs::avx512::dot(row, x) };
        }
    }
    #[cfg(target_arch = "x86_64")]
    if level >= SimdLevel::Avx2 {
        // SAFETY: the CPU supports avx2+fma+f16c (clamp_level); lengths are consistent.
        unsafe {
            return match ty {
                GgmlType::F32 => float::avx2::dot_f32(row, x),
                GgmlType::F16 => float::avx2::dot_f16(row, x),
                GgmlType::BF16 => float::avx2::dot_bf16(row, x),
                GgmlType::Q8_0 => q8_0::avx2::dot(row, x),
                GgmlType::Q2_K => q2_k::avx2::dot(row, x),
                GgmlType::Q4_K => q4_k::avx2::dot(row, x),
                GgmlType::IQ2_XXS => iq2_xxs::avx2::dot(row, x),
                GgmlType::Q8_K | GgmlType::I32 => f32::NAN,
            };
        }
    }
    match ty {
        GgmlType::F32 => float::dot_f32_scalar(row, x),
        GgmlType::F16 => float::dot_f16_scalar(row, x),
        GgmlType::BF16 => float::dot_bf16_scalar(row, x),
        GgmlType::Q8_0 => q8_0::dot_scalar(row, x),
        GgmlType::Q2_K => q2_k::dot_scalar(row, x),
        GgmlType::Q4_K => q4_k::dot_scalar(row, x),
        GgmlType::IQ2_XXS => iq2_xxs::dot_scalar(row, x),
        GgmlType::Q8_K | GgmlType::I32 => f32::NAN,
    }
}

/// Dot of 256-value blocks by dequantising each into a stack buffer. Inlined
/// into AVX2 functions it autovectorises (8 independent lanes).
#[inline(always)]
pub(crate) fn dot_via_dequant(row: &[u8], x: &[f32], block_bytes: usize, deq: impl Fn(&[u8], &mut [f32])) -> f32 {
    let mut buf = [0f32; 256];
    let mut acc = [0f32; 8];
    for (b, xb) in row.chunks_exact(block_bytes).zip(x.chunks_exact(256)) {
        deq(b, &mut buf);
        for (wc, xc) in buf.chunks_exact(8).zip(xb.chunks_exact(8)) {
            for l in 0..8 {
                acc[l] += wc[l] * xc[l];
            }
        }
    }
    acc.iter().sum()
}
