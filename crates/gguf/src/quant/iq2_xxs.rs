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

/// Bit planes of the grid's level codes (8 → 0, 25 → 1, 43 → 2): bit m of
/// `[0][i]` = bit 0 of the code of value m of entry i, `[1][i]` = bit 1.
/// Together with the sign byte (`ksigns`, bit m = sign of value m) a row is
/// three planes, which one `vgf2p8affineqb` transposes into a 3-bit index
/// (code, sign) per value (see `avx512`).
#[cfg_attr(not(dsv4_avx512), allow(dead_code))]
pub(crate) static GRID_PLANES: [[u8; 256]; 2] = {
    let mut t = [[0u8; 256]; 2];
    let mut i = 0;
    while i < 256 {
        let mut m = 0;
        while m < 8 {
            let v = (IQ2XXS_GRID[i] >> (8 * m)) & 255;
            let lvl: u8 = if v == 8 {
                0
            } else if v == 25 {
                1
            } else if v == 43 {
                2
            } else {
                panic!("IQ2_XXS grid value outside {{8, 25, 43}}")
            };
            t[0][i] |= (lvl & 1) << m;
            t[1][i] |= (lvl >> 1) << m;
            m += 1;
        }
        i += 1;
    }
    t
};

/// Offset of the unsigned weights the AVX-512 q8 kernel feeds `vpdpbusd`:
/// it multiplies `Q8_OFFSET + w` (w = ±8/25/43, so 21..107, a valid u8)
/// with the signed Q8_K quants, and starts each i32 lane from
/// `−Q8_OFFSET·Σ` of that lane's four quants ([`q8_bias`]), so the lane ends
/// at exactly Σ w·q — the same integer the masked-negate kernel produced.
#[cfg_attr(not(dsv4_avx512), allow(dead_code))]
pub(crate) const Q8_OFFSET: i32 = 64;

/// `−Q8_OFFSET · (q[4j] + q[4j+1] + q[4j+2] + q[4j+3])` for every j: the
/// initial `vpdpbusd` accumulators of the AVX-512 kernel (computed once per
/// activation vector, shared by all rows).
pub(crate) fn q8_bias(qs: &[i8]) -> Vec<i32> {
    qs.chunks_exact(4).map(|c| -Q8_OFFSET * c.iter().map(|&q| q as i32).sum::<i32>()).collect()
}

/// AVX-512 (F/BW/VBMI/VNNI/GFNI) kernels: the whole block is decoded with
/// byte permutes instead of 64 scalar table loads. Grid rows become two bit
/// planes of their level codes through `vpermi2b` lookups in
/// [`GRID_PLANES`] (8 registers), sign rows through one `vpermi2b` in
/// `ksigns` (`dot_q8` does both for two blocks at once); per 128 weights one
/// `vpermt2b` gathers (plane 0, plane 1, signs) of two 8-value rows into
/// bytes 7, 6, 5 and 4, 3, 2 of a qword, one `vgf2p8affineqb` with that
/// qword as the bit matrix transposes it (byte m = code and sign of value m
/// of the two rows in bits 0..2 and 3..5), and one `vpermb` per row maps
/// that to the unsigned weight `Q8_OFFSET ± level` (q8 path), the signed
/// weight (f32 path) or the magnitude (prefill, which keeps a sign mask).
/// With the sign inside the lookup the q8 path needs no mask and no
/// negation of the activations (vpshufbitqmb + masked vpsubb were ~4 of ~38
/// cycles a block on Zen 4).
#[cfg(all(target_arch = "x86_64", dsv4_avx512))]
#[allow(clippy::incompatible_msrv)] // only built with Rust ≥ 1.89 (build.rs)
pub(crate) mod avx512 {
    use super::*;
    use crate::quant::simd::avx2::{f16_1, prefetch_block};
    use std::arch::x86_64::*;

    const fn sub_idx(po: usize, so: usize) -> [[u8; 64]; 2] {
        // Q_u qword s (k = s%4) carries row s of part 2u in bytes 7, 6, 5 and
        // row s of part 2u+1 in bytes 4, 3, 2 (part r row s = group
        // g = 2r + s/4, entry k): plane 0 (LS[8g+po+k]), plane 1 (hi[8g+po+k],
        // second table), sign row (LS[8g+so+k]). Bytes 0, 1 only reach result
        // bits 7, 6, which vpermb ignores. Single blocks and the first block
        // of a pair: po = 0, so = 4; the second block of a pair has planes and
        // signs swapped (po = 4, so = 0).
        let mut t = [[0u8; 64]; 2];
        let mut u = 0;
        while u < 2 {
            let mut s = 0;
            while s < 8 {
                let k = s % 4;
                let mut h = 0;
                while h < 2 {
                    let g = 2 * (2 * u + h) + s / 4;
                    let top = 8 * s + 7 - 3 * h;
                    t[u][top] = (8 * g + po + k) as u8;
                    t[u][top - 1] = (64 + 8 * g + po + k) as u8;
                    t[u][top - 2] = (8 * g + so + k) as u8;
                    h += 1;
                }
                t[u][8 * s] = t[u][8 * s + 7];
                t[u][8 * s + 1] = t[u][8 * s + 7];
                s += 1;
            }
            u += 1;
        }
        t
    }
    static SUB_IDX: [[u8; 64]; 2] = sub_idx(0, 4);
    static SUB_IDX_B: [[u8; 64]; 2] = sub_idx(4, 0);
    /// `vpermb` tables indexed by the transposed byte: bits 3h..3h+1 = level
    /// code, bit 3h+2 = sign (h = 0: first row of the qword, 1: second);
    /// the other bits are don't care, 6..7 unused.
    const fn level_table(offset: i32, h: usize) -> [u8; 64] {
        let mut t = [0u8; 64];
        let mut i = 0;
        while i < 64 {
            let c = i >> (3 * h);
            let mag = [8i32, 25, 43, 0][c & 3];
            let w = if (c >> 2) & 1 == 1 { -mag } else { mag };
            t[i] = (offset + w) as u8;
            i += 1;
        }
        t
    }
    /// `Q8_OFFSET + w` (u8) for the q8 path.
    static LEVELS_Q8: [[u8; 64]; 2] = [level_table(Q8_OFFSET, 0), level_table(Q8_OFFSET, 1)];
    /// `w` (i8) for the f32 path.
    static LEVELS_I8: [[u8; 64]; 2] = [level_table(0, 0), level_table(0, 1)];
    /// `|w|` (u8) for the prefill kernel, which takes the sign as a mask.
    static LEVELS_MAG: [[u8; 64]; 2] = [mag_table(0), mag_table(1)];
    const fn mag_table(h: usize) -> [u8; 64] {
        let mut t = [0u8; 64];
        let mut i = 0;
        while i < 64 {
            t[i] = [8u8, 25, 43, 0][(i >> (3 * h)) & 3];
            i += 1;
        }
        t
    }
    /// Scale words for `packs(dot_r, dot_r+1)` (r = 0 → `[0]`, r = 2 → `[1]`):
    /// word j (128-bit lane L = j/8, p = j%8) comes from dword 4L + p%4 of
    /// dot_{r + p/4}, i.e. group 2(r + p/4) + L/2, whose scale is word 0 of
    /// qword g of the scales register (`vpermw` index 4g).
    static SC_IDX: [[u16; 32]; 2] = {
        let mut t = [[0u16; 32]; 2];
        let mut h = 0;
        while h < 2 {
            let mut j = 0;
            while j < 32 {
                let (l, p) = (j / 8, j % 8);
                let g = 2 * (2 * h + p / 4) + l / 2;
                t[h][j] = (4 * g) as u16;
                j += 1;
            }
            h += 1;
        }
        t
    };

    // vpmultishiftqb control (one qword, broadcast).
    /// bytes 0..3 = grid indices (unchanged), 4..7 = the four 7-bit sign indices.
    const CTRL_SIDX: u64 = u64::from_le_bytes([0, 8, 16, 24, 32, 39, 46, 53]);
    /// Block pairs, qword g = (a1 of the second block, a1 of the first):
    /// bytes 0..3 = the second block's sign indices, 4..7 = the first's.
    const CTRL_PAIR: u64 = u64::from_le_bytes([0, 7, 14, 21, 32, 39, 46, 53]);
    /// Byte mask of the high dword of every qword.
    const HI4: u64 = 0xF0F0_F0F0_F0F0_F0F0;
    /// `vgf2p8affineqb` operand: byte m = 1 << m, so with the row qword as the
    /// matrix, result bit i of byte m = bit m of row byte 7 − i.
    const ONEHOT: u64 = u64::from_le_bytes([1, 2, 4, 8, 16, 32, 64, 128]);

    #[inline(always)]
    unsafe fn ld(p: *const u8) -> __m512i {
        _mm512_loadu_si512(p as *const _)
    }

    /// Constant registers of the decoder.
    struct Tabs {
        tl: [__m512i; 4],
        th: [__m512i; 4],
        ks: [__m512i; 2],
        levels: [__m512i; 2],
        sub: [__m512i; 2],
        sub_b: [__m512i; 2],
        sc: [__m512i; 2],
        c_sidx: __m512i,
        c_pair: __m512i,
        onehot: __m512i,
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vnni,gfni,avx2,fma,f16c")]
    unsafe fn tabs(levels: &[[u8; 64]; 2]) -> Tabs {
        let gl = GRID_PLANES[0].as_ptr();
        let gh = GRID_PLANES[1].as_ptr();
        Tabs {
            tl: [ld(gl), ld(gl.add(64)), ld(gl.add(128)), ld(gl.add(192))],
            th: [ld(gh), ld(gh.add(64)), ld(gh.add(128)), ld(gh.add(192))],
            ks: [ld(KSIGNS_IQ2XS.as_ptr()), ld(KSIGNS_IQ2XS.as_ptr().add(64))],
            levels: [ld(levels[0].as_ptr()), ld(levels[1].as_ptr())],
            sub: [ld(SUB_IDX[0].as_ptr()), ld(SUB_IDX[1].as_ptr())],
            sub_b: [ld(SUB_IDX_B[0].as_ptr()), ld(SUB_IDX_B[1].as_ptr())],
            sc: [ld(SC_IDX[0].as_ptr() as *const u8), ld(SC_IDX[1].as_ptr() as *const u8)],
            c_sidx: _mm512_set1_epi64(CTRL_SIDX as i64),
            c_pair: _mm512_set1_epi64(CTRL_PAIR as i64),
            onehot: _mm512_set1_epi64(ONEHOT as i64),
        }
    }

    /// Per-block decode: `(LS, hi, Q)`: LS qword g = plane-0 bytes (bytes 0..3)
    /// and sign rows (4..7) of group g, `hi` bytes 8g..8g+3 = plane-1 bytes,
    /// `Q` the raw 64 group bytes (for the scales).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vnni,gfni,avx2,fma,f16c")]
    unsafe fn codes(b: *const u8, t: &Tabs) -> (__m512i, __m512i, __m512i) {
        let q = ld(b.add(2));
        let m = _mm512_multishift_epi64_epi8(t.c_sidx, q);
        let signs = _mm512_permutex2var_epi8(t.ks[0], m, t.ks[1]);
        let top = _mm512_movepi8_mask(q);
        let lo = _mm512_mask_blend_epi8(
            top,
            _mm512_permutex2var_epi8(t.tl[0], q, t.tl[1]),
            _mm512_permutex2var_epi8(t.tl[2], q, t.tl[3]),
        );
        let hi = _mm512_mask_blend_epi8(
            top,
            _mm512_permutex2var_epi8(t.th[0], q, t.th[1]),
            _mm512_permutex2var_epi8(t.th[2], q, t.th[3]),
        );
        let ls = _mm512_mask_blend_epi8(0xF0F0_F0F0_F0F0_F0F0, lo, signs);
        (ls, hi, q)
    }

    /// The 64 weights of parts 2u and 2u+1 (part r = groups 2r, 2r+1, row-major,
    /// 8 values per row) as bytes of `t.levels`, from one gather and one
    /// transpose (two rows per qword).
    #[inline(always)]
    unsafe fn parts(ls: __m512i, sub: __m512i, hi: __m512i, t: &Tabs) -> (__m512i, __m512i) {
        let p = _mm512_permutex2var_epi8(ls, sub, hi);
        let idx = _mm512_gf2p8affine_epi64_epi8::<0>(t.onehot, p);
        (_mm512_permutexvar_epi8(idx, t.levels[0]), _mm512_permutexvar_epi8(idx, t.levels[1]))
    }

    #[inline(always)]
    unsafe fn all_parts(ls: __m512i, sub: &[__m512i; 2], hi: __m512i, t: &Tabs) -> [__m512i; 4] {
        let (x0, x1) = parts(ls, sub[0], hi, t);
        let (x2, x3) = parts(ls, sub[1], hi, t);
        [x0, x1, x2, x3]
    }

    /// The group-scale words of a block for the two packed dot pairs, from
    /// its qwords `q` (as [`codes`] returns them).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vnni,gfni,avx2,fma,f16c")]
    unsafe fn scale_words(q: __m512i, t: &Tabs) -> [__m512i; 2] {
        // Qword g: (a1 >> 27) | 1 = 2·ls_g + 1 (< 32, so also its low word).
        let scales = _mm512_or_si512(_mm512_srli_epi64(q, 59), _mm512_set1_epi64(1));
        [_mm512_permutexvar_epi16(t.sc[0], scales), _mm512_permutexvar_epi16(t.sc[1], scales)]
    }

    /// A decoded block: the offset weights of the four 64-value parts, and
    /// the group-scale words for the two packed dot pairs.
    struct Decoded {
        xw: [__m512i; 4],
        w: [__m512i; 2],
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vnni,gfni,avx2,fma,f16c")]
    unsafe fn decode(b: *const u8, t: &Tabs) -> Decoded {
        let (ls, hi, q) = codes(b, t);
        Decoded {
            xw: all_parts(ls, &t.sub, hi, t),
            w: scale_words(q, t),
        }
    }

    /// [`decode`] of blocks `b` and `b + 66` with one set of grid lookups:
    /// the 32 grid indices of each block fill the low and high dwords of the
    /// qwords of one vector (a byte-masked load of the second block 4 bytes
    /// early; no permute), and likewise the sign indices (a masked load 4
    /// bytes late), so the four grid `vpermi2b`, the `ksigns` one and the
    /// `vpmultishiftqb` serve both blocks.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vnni,gfni,avx2,fma,f16c")]
    unsafe fn decode_pair(b: *const u8, t: &Tabs) -> (Decoded, Decoded) {
        let bb = b.add(BLOCK_BYTES);
        let qa = ld(b.add(2));
        // Qword g: bytes 0..3 = first block's grid indices of group g, 4..7 = second's.
        let g = _mm512_mask_loadu_epi8(qa, HI4, b.add(BLOCK_BYTES - 2) as *const i8);
        // Qword g: bytes 0..3 = second block's a1 word of group g, 4..7 = first's
        // (the masked load does not touch the 4 bytes past the second block).
        let h = _mm512_mask_loadu_epi8(qa, !HI4, bb.add(2 + 4) as *const i8);
        let signs = _mm512_permutex2var_epi8(t.ks[0], _mm512_multishift_epi64_epi8(t.c_pair, h), t.ks[1]);
        let top = _mm512_movepi8_mask(g);
        let lo = _mm512_mask_blend_epi8(
            top,
            _mm512_permutex2var_epi8(t.tl[0], g, t.tl[1]),
            _mm512_permutex2var_epi8(t.tl[2], g, t.tl[3]),
        );
        let hi = _mm512_mask_blend_epi8(
            top,
            _mm512_permutex2var_epi8(t.th[0], g, t.th[1]),
            _mm512_permutex2var_epi8(t.th[2], g, t.th[3]),
        );
        let ls_a = _mm512_mask_blend_epi8(HI4, lo, signs);
        let ls_b = _mm512_mask_blend_epi8(HI4, signs, lo);
        let one = _mm512_set1_epi64(1);
        // As in decode: (a1 >> 27) | 1 = 2·ls + 1 in the low word of qword g;
        // the second block's a1 is the low dword, so mask off the first's.
        let sc_a = _mm512_or_si512(_mm512_srli_epi64(h, 59), one);
        let sc_b = _mm512_ternarylogic_epi64::<0xEA>(_mm512_srli_epi64(h, 27), _mm512_set1_epi64(31), one);
        (
            Decoded {
                xw: all_parts(ls_a, &t.sub, hi, t),
                w: [_mm512_permutexvar_epi16(t.sc[0], sc_a), _mm512_permutexvar_epi16(t.sc[1], sc_a)],
            },
            Decoded {
                xw: all_parts(ls_b, &t.sub_b, hi, t),
                w: [_mm512_permutexvar_epi16(t.sc[0], sc_b), _mm512_permutexvar_epi16(t.sc[1], sc_b)],
            },
        )
    }

    /// Σ_g (2·ls_g+1)·Σ signed_grid·q8 of a decoded block, as 16 i32 lanes;
    /// `bias` = the block's 64 [`q8_bias`] lanes.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vnni,gfni,avx2,fma,f16c")]
    unsafe fn apply_q8(dec: &Decoded, q8: *const i8, bias: *const i32) -> __m512i {
        let zero = _mm512_setzero_si512();
        let mut dots = [zero; 4];
        for (r, dot) in dots.iter_mut().enumerate() {
            // Lane j: −64·Σq + Σ (64 + w)·q = Σ w·q over its four values.
            let acc = ld(bias.add(16 * r) as *const u8);
            *dot = _mm512_dpbusd_epi32(acc, dec.xw[r], ld(q8.add(64 * r) as *const u8));
        }
        // |4 products| ≤ 4·43·128 < 2^15: the i32 lanes fit i16 (packs is
        // exact), and madd with the per-word group scales sums pairs of them.
        let mut sumi = zero;
        for h in 0..2 {
            let p = _mm512_packs_epi32(dots[2 * h], dots[2 * h + 1]);
            sumi = _mm512_add_epi32(sumi, _mm512_madd_epi16(p, dec.w[h]));
        }
        sumi
    }

    /// Σ_g (2·ls_g+1)·Σ signed_grid·q8 of one block, as 16 i32 lanes.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vnni,gfni,avx2,fma,f16c")]
    unsafe fn block_q8(b: *const u8, q8: *const i8, bias: *const i32, t: &Tabs) -> __m512i {
        apply_q8(&decode(b, t), q8, bias)
    }

    /// `xd[0]·d·0.125` and `xd[1]·d'·0.125` of blocks `b` and `b + 66` in lanes
    /// 0 and 1 (the scalar expression's two roundings): one conversion and
    /// two multiplies for both blocks instead of an insert, a conversion and
    /// two scalar multiplies each (~4 % of the loop on Zen 4).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vnni,gfni,avx2,fma,f16c")]
    unsafe fn pair_scales(b: *const u8, xd: *const f32) -> __m128 {
        let lo = u16::from_le_bytes([*b, *b.add(1)]) as u32;
        let hi = u16::from_le_bytes([*b.add(BLOCK_BYTES), *b.add(BLOCK_BYTES + 1)]) as u32;
        let d = _mm_cvtph_ps(_mm_cvtsi32_si128((lo | hi << 16) as i32));
        let x = _mm_castpd_ps(_mm_load_sd(xd as *const f64));
        _mm_mul_ps(_mm_mul_ps(x, d), _mm_set1_ps(0.125))
    }

    /// `bias` = [`q8_bias`] of `xq` (16 lanes per 64 quants).
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vnni,gfni,avx2,fma,f16c")]
    pub unsafe fn dot_q8(row: &[u8], xd: &[f32], xq: &[i8], bias: &[i32]) -> f32 {
        debug_assert!(xq.len() >= xd.len() * QK && bias.len() >= xd.len() * QK / 4);
        let t = tabs(&LEVELS_Q8);
        let mut acc0 = _mm512_setzero_ps();
        let mut acc1 = _mm512_setzero_ps();
        let nb = xd.len();
        let scale = |i: usize| {
            let b = row.as_ptr().add(i * BLOCK_BYTES);
            xd[i] * f16_1(u16::from_le_bytes([*b, *b.add(1)])) * 0.125
        };
        // Two blocks per iteration; block i goes to acc_{i%2} (dot_q8_multi
        // keeps the same order, so its results are bitwise equal).
        let mut i = 0;
        while i + 2 <= nb {
            let b = row.as_ptr().add(i * BLOCK_BYTES);
            prefetch_block(b, 2 * BLOCK_BYTES);
            let (d0, d1) = decode_pair(b, &t);
            let s0 = apply_q8(&d0, xq.as_ptr().add(i * QK), bias.as_ptr().add(i * QK / 4));
            let s1 = apply_q8(&d1, xq.as_ptr().add((i + 1) * QK), bias.as_ptr().add((i + 1) * QK / 4));
            let sv = _mm512_castps128_ps512(pair_scales(b, xd.as_ptr().add(i)));
            acc0 = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_setzero_si512(), sv), _mm512_cvtepi32_ps(s0), acc0);
            acc1 = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_set1_epi32(1), sv), _mm512_cvtepi32_ps(s1), acc1);
            i += 2;
        }
        if i < nb {
            let b = row.as_ptr().add(i * BLOCK_BYTES);
            let s0 = block_q8(b, xq.as_ptr().add(i * QK), bias.as_ptr().add(i * QK / 4), &t);
            acc0 = _mm512_fmadd_ps(_mm512_set1_ps(scale(i)), _mm512_cvtepi32_ps(s0), acc0);
        }
        _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1))
    }

    /// A block decoded for several tokens: magnitudes and sign masks of the
    /// four 64-value parts, and the group-scale words.
    struct DecodedMasked {
        mag: [__m512i; 4],
        neg: [__mmask64; 4],
        w: [__m512i; 2],
    }

    /// [`decode`] with `|w|` and a sign mask instead of `Q8_OFFSET + w`
    /// (`t` from `tabs(&LEVELS_MAG)`): the prefill kernel negates each token's
    /// quants under the mask, so it needs no per-token [`q8_bias`] (which
    /// would double the activation bytes a tile of tokens keeps in L1).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vnni,gfni,avx2,fma,f16c")]
    unsafe fn decode_masked(b: *const u8, t: &Tabs) -> DecodedMasked {
        let (ls, hi, q) = codes(b, t);
        let mut mag = [_mm512_setzero_si512(); 4];
        let mut neg = [0; 4];
        for u in 0..2 {
            let idx = _mm512_gf2p8affine_epi64_epi8::<0>(t.onehot, _mm512_permutex2var_epi8(ls, t.sub[u], hi));
            mag[2 * u] = _mm512_permutexvar_epi8(idx, t.levels[0]);
            mag[2 * u + 1] = _mm512_permutexvar_epi8(idx, t.levels[1]);
            neg[2 * u] = _mm512_test_epi8_mask(idx, _mm512_set1_epi8(0x04));
            neg[2 * u + 1] = _mm512_test_epi8_mask(idx, _mm512_set1_epi8(0x20));
        }
        DecodedMasked { mag, neg, w: scale_words(q, t) }
    }

    /// [`apply_q8`] of a [`DecodedMasked`] block: the same 16 i32 lanes.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vnni,gfni,avx2,fma,f16c")]
    unsafe fn apply_masked(dec: &DecodedMasked, q8: *const i8) -> __m512i {
        let zero = _mm512_setzero_si512();
        let mut dots = [zero; 4];
        for (r, dot) in dots.iter_mut().enumerate() {
            let a = ld(q8.add(64 * r) as *const u8);
            let a = _mm512_mask_sub_epi8(a, dec.neg[r], zero, a);
            *dot = _mm512_dpbusd_epi32(zero, dec.mag[r], a);
        }
        let mut sumi = zero;
        for h in 0..2 {
            let p = _mm512_packs_epi32(dots[2 * h], dots[2 * h + 1]);
            sumi = _mm512_add_epi32(sumi, _mm512_madd_epi16(p, dec.w[h]));
        }
        sumi
    }

    /// Most tokens [`dot_q8_multi`] takes at once.
    pub const MULTI_MAX: usize = 8;

    /// [`dot_q8`] of one row against up to [`MULTI_MAX`] tokens `(d, qs)`,
    /// decoding each weight block once (prefill). `out[k]` is bitwise equal
    /// to `dot_q8(row, xs[k].0, xs[k].1, bias)` (same integer lanes).
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vnni,gfni,avx2,fma,f16c")]
    pub unsafe fn dot_q8_multi(row: &[u8], xs: &[(&[f32], &[i8])], out: &mut [f32]) {
        let n = xs.len().min(MULTI_MAX).min(out.len());
        let t = tabs(&LEVELS_MAG);
        let mut acc = [[_mm512_setzero_ps(); 2]; MULTI_MAX];
        let nb = row.len() / BLOCK_BYTES;
        for i in 0..nb {
            let b = row.as_ptr().add(i * BLOCK_BYTES);
            prefetch_block(b, BLOCK_BYTES);
            let dw = f16_1(u16::from_le_bytes([*b, *b.add(1)]));
            let dec = decode_masked(b, &t);
            for (k, &(xd, xq)) in xs[..n].iter().enumerate() {
                let s = apply_masked(&dec, xq.as_ptr().add(i * QK));
                let a = &mut acc[k][i % 2];
                *a = _mm512_fmadd_ps(_mm512_set1_ps(xd[i] * dw * 0.125), _mm512_cvtepi32_ps(s), *a);
            }
        }
        for k in 0..n {
            out[k] = _mm512_reduce_add_ps(_mm512_add_ps(acc[k][0], acc[k][1]));
        }
    }

    /// f32 path: signed grid values → f32, per group `d·(0.5+ls)·0.25 · Σ w·x`
    /// (same scale expression as dequantisation).
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vnni,gfni,avx2,fma,f16c")]
    pub unsafe fn dot(row: &[u8], x: &[f32]) -> f32 {
        let t = tabs(&LEVELS_I8);
        let mut acc = _mm512_setzero_ps();
        for i in 0..x.len() / QK {
            let b = row.as_ptr().add(i * BLOCK_BYTES);
            prefetch_block(b, BLOCK_BYTES);
            let d = f16_1(u16::from_le_bytes([*b, *b.add(1)]));
            let (ls, hi, _) = codes(b, &t);
            let xb = x.as_ptr().add(i * QK);
            let ws = all_parts(ls, &t.sub, hi, &t);
            for (r, &w) in ws.iter().enumerate() {
                let xr = xb.add(64 * r);
                let w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_castsi512_si128(w)));
                let w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32::<1>(w)));
                let w2 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32::<2>(w)));
                let w3 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32::<3>(w)));
                let pa = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xr.add(16)), _mm512_mul_ps(w0, _mm512_loadu_ps(xr)));
                let pb = _mm512_fmadd_ps(w3, _mm512_loadu_ps(xr.add(48)), _mm512_mul_ps(w2, _mm512_loadu_ps(xr.add(32))));
                let ga = b.add(2 + 8 * (2 * r) + 7);
                let gb = b.add(2 + 8 * (2 * r + 1) + 7);
                let da = d * (0.5 + (*ga >> 4) as f32) * 0.25;
                let db = d * (0.5 + (*gb >> 4) as f32) * 0.25;
                acc = _mm512_fmadd_ps(_mm512_set1_ps(da), pa, acc);
                acc = _mm512_fmadd_ps(_mm512_set1_ps(db), pb, acc);
            }
        }
        _mm512_reduce_add_ps(acc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_planes_decode_to_grid() {
        for (i, &g) in IQ2XXS_GRID.iter().enumerate() {
            let mut v = 0u64;
            for m in 0..8 {
                let code = (GRID_PLANES[0][i] >> m) & 1 | ((GRID_PLANES[1][i] >> m) & 1) << 1;
                v |= ([8u64, 25, 43][code as usize]) << (8 * m);
            }
            assert_eq!(v, g, "grid entry {i}");
        }
    }

    #[test]
    fn q8_bias_is_offset_times_sums_of_four() {
        let q: Vec<i8> = (0..64).map(|i| (i * 37 % 255 - 127) as i8).collect();
        let b = q8_bias(&q);
        assert_eq!(b.len(), 16);
        for (j, &v) in b.iter().enumerate() {
            assert_eq!(v, -Q8_OFFSET * q[4 * j..4 * j + 4].iter().map(|&x| x as i32).sum::<i32>());
        }
    }

    #[test]
    fn keven_signs_match_ksigns() {
        for i in 0..128 {
            for m in 0..8 {
                let neg = (KEVEN_SIGNS[i] >> (8 * m)) & 255 == 0xFF;
                assert_eq!(neg, (KSIGNS_IQ2XS[i] >> m) & 1 == 1);
            }
        }
    }
}
