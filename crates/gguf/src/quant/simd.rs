//! Runtime SIMD selection and shared AVX2 helpers.
//!
//! Kernels exist in two flavours: portable scalar code (the reference) and
//! AVX2+FMA+F16C code selected at run time, plus AVX-512 code for the formats
//! where it pays (IQ2_XXS). Setting the environment variable `DSV4_NO_SIMD=1`
//! forces the scalar code, `DSV4_NO_AVX512=1` the AVX2 code (read once, at
//! first use).

use std::sync::OnceLock;

/// Whether the AVX2 kernels are used (CPU support and `DSV4_NO_SIMD` not set).
pub fn simd_enabled() -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    *ENABLED.get_or_init(|| {
        let disabled = std::env::var("DSV4_NO_SIMD").is_ok_and(|v| !v.is_empty() && v != "0");
        !disabled && simd_available()
    })
}

/// Instruction-set level of a kernel. `Avx512` means AVX-512 F/BW/VBMI/VNNI and GFNI
/// (Ice Lake / Zen 4 and later) on top of AVX2+FMA+F16C; formats without an
/// AVX-512 kernel fall back to their AVX2 kernel at that level.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SimdLevel {
    Scalar,
    Avx2,
    Avx512,
}

/// Every level this CPU can run, lowest first (for tests and benchmarks).
pub fn levels_available() -> Vec<SimdLevel> {
    let mut v = vec![SimdLevel::Scalar];
    if simd_available() {
        v.push(SimdLevel::Avx2);
    }
    if avx512_available() {
        v.push(SimdLevel::Avx512);
    }
    v
}

/// Highest level the CPU supports, minus AVX-512 when `DSV4_NO_AVX512` is set
/// (`DSV4_NO_SIMD` is not consulted: this is the level `simd = true` means).
pub fn best_level() -> SimdLevel {
    static LEVEL: OnceLock<SimdLevel> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let no512 = std::env::var("DSV4_NO_AVX512").is_ok_and(|v| !v.is_empty() && v != "0");
        if avx512_available() && !no512 {
            SimdLevel::Avx512
        } else if simd_available() {
            SimdLevel::Avx2
        } else {
            SimdLevel::Scalar
        }
    })
}

/// The level the kernels use: [`best_level`], or scalar under `DSV4_NO_SIMD`.
pub fn simd_level() -> SimdLevel {
    if simd_enabled() {
        best_level()
    } else {
        SimdLevel::Scalar
    }
}

/// `simd = true` → [`best_level`]; `false` → scalar.
pub fn level_of(simd: bool) -> SimdLevel {
    if simd {
        best_level()
    } else {
        SimdLevel::Scalar
    }
}

/// `level`, lowered to what the CPU supports.
pub fn clamp_level(level: SimdLevel) -> SimdLevel {
    match level {
        SimdLevel::Avx512 if avx512_available() => SimdLevel::Avx512,
        SimdLevel::Avx512 | SimdLevel::Avx2 if simd_available() => SimdLevel::Avx2,
        _ => SimdLevel::Scalar,
    }
}

/// Whether the CPU supports the AVX-512 kernels (F, BW, VBMI, VNNI, GFNI and the AVX2 set);
/// always false when the crate was built by a compiler older than Rust 1.89.
pub fn avx512_available() -> bool {
    #[cfg(all(target_arch = "x86_64", dsv4_avx512))]
    {
        static AVAIL: OnceLock<bool> = OnceLock::new();
        *AVAIL.get_or_init(|| {
            simd_available()
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vbmi")
                && is_x86_feature_detected!("avx512vnni")
                && is_x86_feature_detected!("gfni")
        })
    }
    #[cfg(not(all(target_arch = "x86_64", dsv4_avx512)))]
    {
        false
    }
}

/// Whether the CPU supports the AVX2 kernels (ignores `DSV4_NO_SIMD`).
pub fn simd_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Wrapping sum of `data` as little-endian u64 words (trailing bytes ignored):
/// a pure streaming read used to measure memory bandwidth (AVX2 when enabled,
/// so the probe is never compute-bound).
pub fn read_probe(data: &[u8]) -> u64 {
    let words = data.len() / 8;
    #[cfg(target_arch = "x86_64")]
    if simd_enabled() {
        // SAFETY: AVX2 present; reads stay within the first 8·words bytes.
        return unsafe { avx2::read_probe(data.as_ptr(), words) };
    }
    data[..words * 8]
        .chunks_exact(8)
        .fold(0u64, |a, c| a.wrapping_add(u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])))
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use std::arch::x86_64::*;

    /// Software prefetch distance in bytes ahead of the current weight block.
    /// The hardware prefetcher alone leaves the compute-heavier formats
    /// latency-bound when streaming from DRAM. (Prefetching past the end of
    /// a slice is harmless: prefetches never fault.)
    pub const PREFETCH: usize = 1024;

    /// Prefetch the block `PREFETCH` bytes ahead of `b` (every cache line of it).
    #[inline(always)]
    pub fn prefetch_block(b: *const u8, block_bytes: usize) {
        let p = b.wrapping_add(PREFETCH);
        let mut o = 0;
        while o < block_bytes {
            // SAFETY: prefetch is a hint and never faults, whatever the address.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(o) as *const i8) };
            o += 64;
        }
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(block_bytes - 1) as *const i8) };
    }

    /// Horizontal sum of 8 f32 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn hsum_ps(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// Σ a_i·b_i over 32 signed bytes each, as 8 i32 lanes (ggml's sign trick:
    /// maddubs needs an unsigned first operand). Saturates only if both are −128.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub unsafe fn dot_i8x32(a: __m256i, b: __m256i) -> __m256i {
        let ax = _mm256_sign_epi8(a, a);
        let sy = _mm256_sign_epi8(b, a);
        let p16 = _mm256_maddubs_epi16(ax, sy);
        _mm256_madd_epi16(p16, _mm256_set1_epi16(1))
    }

    /// One f16 → f32 through F16C (cheaper than the portable conversion in hot loops).
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn f16_1(bits: u16) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    /// 8 f32 from 8 packed f16 at `p`.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn load_f16x8(p: *const u8) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }

    /// f32 dot of `n` (multiple of 8) contiguous f32 values.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_f32_f32(a: *const f32, b: *const f32, n: usize) -> f32 {
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let mut i = 0;
        while i + 16 <= n {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a.add(i)), _mm256_loadu_ps(b.add(i)), acc0);
            acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a.add(i + 8)), _mm256_loadu_ps(b.add(i + 8)), acc1);
            i += 16;
        }
        while i + 8 <= n {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a.add(i)), _mm256_loadu_ps(b.add(i)), acc0);
            i += 8;
        }
        hsum_ps(_mm256_add_ps(acc0, acc1))
    }

    /// `(Σ q_i·x_i, Σ x_i)` lane-wise for 16 unsigned bytes `q` and 16 f32 at `x`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn qx_u8x16(q: __m128i, x: *const f32) -> (__m256, __m256) {
        let x0 = _mm256_loadu_ps(x);
        let x1 = _mm256_loadu_ps(x.add(8));
        let q0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q));
        let q1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(q, 8)));
        (_mm256_fmadd_ps(q1, x1, _mm256_mul_ps(q0, x0)), _mm256_add_ps(x0, x1))
    }

    /// `(Σ q_i·x_i, Σ x_i)` lane-wise for 32 unsigned bytes `q` and 32 f32 at `x`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn qx_u8x32(q: __m256i, x: *const f32) -> (__m256, __m256) {
        let (a, sa) = qx_u8x16(_mm256_castsi256_si128(q), x);
        let (b, sb) = qx_u8x16(_mm256_extracti128_si256(q, 1), x.add(16));
        (_mm256_add_ps(a, b), _mm256_add_ps(sa, sb))
    }

    #[target_feature(enable = "avx2")]
    pub unsafe fn read_probe(p: *const u8, words: usize) -> u64 {
        let mut acc = [_mm256_setzero_si256(); 4];
        let mut i = 0;
        while i + 16 <= words {
            for (k, a) in acc.iter_mut().enumerate() {
                *a = _mm256_add_epi64(*a, _mm256_loadu_si256(p.add(8 * (i + 4 * k)) as *const __m256i));
            }
            i += 16;
        }
        let s = _mm256_add_epi64(_mm256_add_epi64(acc[0], acc[1]), _mm256_add_epi64(acc[2], acc[3]));
        let mut lanes = [0u64; 4];
        _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, s);
        let mut total = lanes.iter().fold(0u64, |a, &b| a.wrapping_add(b));
        while i < words {
            total = total.wrapping_add((p.add(8 * i) as *const u64).read_unaligned());
            i += 1;
        }
        total
    }
}
