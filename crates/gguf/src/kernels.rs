//! Matrix-vector and matrix-matrix products over quantised weights.
//!
//! Weights are `n_rows` contiguous rows of `row_bytes(n_cols)` bytes (GGUF
//! `ne = [n_cols, n_rows]`). Work is split over rows with rayon. Two paths:
//! f32 activations (`matvec`, `matmul`: weights decoded to f32, f32
//! accumulation) and ds4's 8-bit activation path (`quantize_acts` +
//! `matvec_q8`: integer block dot products, spec §4.7).

use rayon::prelude::*;

use crate::quant::simd::{clamp_level, level_of};
use crate::quant::{self, float, iq2_xxs, q2_k, q4_k, q8_0, simd_level, Q8KActs, Q8_0Acts, SimdLevel};
use crate::types::GgmlType;

/// Below this many weight bytes a product runs on the calling thread.
const PAR_MIN_BYTES: usize = 256 * 1024;
/// Target weight bytes per rayon task.
const TASK_BYTES: usize = 256 * 1024;
/// Tokens per tile in `matmul` (x rows kept hot while a chunk of rows is swept).
const TOK_TILE: usize = 8;

fn rows_per_task(row_bytes: usize, n_rows: usize) -> usize {
    let by_bytes = (TASK_BYTES / row_bytes.max(1)).max(1);
    // Enough tasks for load balancing on every thread.
    let by_threads = n_rows.div_ceil(rayon::current_num_threads() * 4).max(1);
    by_bytes.min(by_threads)
}

fn check_shapes(ty: GgmlType, w: &[u8], n_rows: usize, n_cols: usize) -> usize {
    let rb = ty.row_bytes(n_cols).unwrap_or_else(|| panic!("{ty}: {n_cols} columns are not a whole number of blocks"));
    assert!(ty.is_float_decodable() && ty != GgmlType::Q8_K, "{ty} is not a weight type");
    assert_eq!(w.len(), rb * n_rows, "{ty}: weight bytes do not match {n_rows}x{n_cols}");
    rb
}

/// `y[r] = dot(row r, x)` for `n_rows` rows of `n_cols` elements.
pub fn matvec(ty: GgmlType, w: &[u8], n_rows: usize, n_cols: usize, x: &[f32], y: &mut [f32]) {
    let rb = check_shapes(ty, w, n_rows, n_cols);
    assert_eq!(x.len(), n_cols);
    assert_eq!(y.len(), n_rows);
    let level = simd_level();
    let run = |r0: usize, ys: &mut [f32]| {
        for (i, yv) in ys.iter_mut().enumerate() {
            let r = r0 + i;
            *yv = quant::dot_f32_at(ty, &w[r * rb..(r + 1) * rb], x, level);
        }
    };
    if w.len() < PAR_MIN_BYTES {
        run(0, y);
    } else {
        let chunk = rows_per_task(rb, n_rows);
        y.par_chunks_mut(chunk).enumerate().for_each(|(c, ys)| run(c * chunk, ys));
    }
}

/// `y[t][r] = dot(row r, x[t])` for `n_tok` tokens. Each weight row is decoded
/// to f32 once; a chunk of decoded rows is swept against tiles of tokens.
pub fn matmul(ty: GgmlType, w: &[u8], n_rows: usize, n_cols: usize, x: &[f32], n_tok: usize, y: &mut [f32]) {
    let rb = check_shapes(ty, w, n_rows, n_cols);
    assert_eq!(x.len(), n_cols * n_tok);
    assert_eq!(y.len(), n_rows * n_tok);
    if n_tok == 0 || n_rows == 0 {
        return;
    }
    if n_tok == 1 {
        return matvec(ty, w, n_rows, n_cols, x, y);
    }
    // Rows per task bounded so the decoded rows (f32) stay around 128 KiB.
    let dec_rows = (128 * 1024 / (n_cols * 4).max(1)).clamp(1, 64);
    let chunk = rows_per_task(rb, n_rows).min(dec_rows).max(1);
    // Row-major results per chunk ([row][tok]), transposed into y afterwards.
    let mut yt = vec![0f32; n_rows * n_tok];
    let work = |c: usize, out: &mut [f32]| {
        let r0 = c * chunk;
        let nr = out.len() / n_tok;
        let mut dec = vec![0f32; nr * n_cols];
        for (i, d) in dec.chunks_exact_mut(n_cols.max(1)).enumerate() {
            let r = r0 + i;
            // Cannot fail: sizes were checked by check_shapes.
            let _ = quant::dequantize(ty, &w[r * rb..(r + 1) * rb], d);
        }
        for t0 in (0..n_tok).step_by(TOK_TILE) {
            let t1 = (t0 + TOK_TILE).min(n_tok);
            for i in 0..nr {
                let wr = &dec[i * n_cols..(i + 1) * n_cols];
                for t in t0..t1 {
                    out[i * n_tok + t] = float::dot_dense(wr, &x[t * n_cols..(t + 1) * n_cols]);
                }
            }
        }
    };
    if w.len() < PAR_MIN_BYTES {
        yt.chunks_mut(chunk * n_tok).enumerate().for_each(|(c, o)| work(c, o));
    } else {
        yt.par_chunks_mut(chunk * n_tok).enumerate().for_each(|(c, o)| work(c, o));
    }
    for r in 0..n_rows {
        for t in 0..n_tok {
            y[t * n_rows + r] = yt[r * n_tok + t];
        }
    }
}

#[derive(Clone, Debug)]
enum ActBlocks {
    /// Float weights: f32 dot with the original activations.
    Float,
    Q8_0(Q8_0Acts),
    Q8K(Q8KActs),
}

/// Activations quantised for one weight type (ds4's 8-bit CPU path): Q8_0
/// blocks of 32 for Q8_0 weights, Q8_K blocks of 256 for Q2_K / Q4_K /
/// IQ2_XXS, the original f32 values for float weights (always kept).
#[derive(Clone, Debug)]
pub struct QuantizedActs {
    weight_ty: GgmlType,
    x: Vec<f32>,
    blocks: ActBlocks,
    /// IQ2_XXS with the AVX-512 kernel: `iq2_xxs::q8_bias` of the Q8_K
    /// quants (its `vpdpbusd` start values); empty otherwise.
    iq2_bias: Vec<i32>,
}

impl QuantizedActs {
    /// The weight type these activations were prepared for.
    pub fn weight_type(&self) -> GgmlType {
        self.weight_ty
    }
    /// The original f32 activations.
    pub fn x(&self) -> &[f32] {
        &self.x
    }
    pub fn len(&self) -> usize {
        self.x.len()
    }
    pub fn is_empty(&self) -> bool {
        self.x.is_empty()
    }
    /// The Q8_0 blocks, if prepared for Q8_0 weights.
    pub fn q8_0(&self) -> Option<&Q8_0Acts> {
        match &self.blocks {
            ActBlocks::Q8_0(a) => Some(a),
            _ => None,
        }
    }
    /// The Q8_K blocks, if prepared for K-quant / IQ2_XXS weights.
    pub fn q8_k(&self) -> Option<&Q8KActs> {
        match &self.blocks {
            ActBlocks::Q8K(a) => Some(a),
            _ => None,
        }
    }
}

/// Quantise `x` for products with weights of type `weight_ty`. Panics if
/// `x.len()` is not a whole number of the activation block size.
pub fn quantize_acts(weight_ty: GgmlType, x: &[f32]) -> QuantizedActs {
    let blocks = match weight_ty {
        GgmlType::Q8_0 => ActBlocks::Q8_0(quant::quantize_acts_q8_0(x)),
        GgmlType::Q2_K | GgmlType::Q4_K | GgmlType::IQ2_XXS => ActBlocks::Q8K(quant::quantize_acts_q8_k(x)),
        _ => ActBlocks::Float,
    };
    let iq2_bias = match &blocks {
        ActBlocks::Q8K(q) if weight_ty == GgmlType::IQ2_XXS && quant::avx512_available() => iq2_xxs::q8_bias(&q.qs),
        _ => Vec::new(),
    };
    QuantizedActs { weight_ty, x: x.to_vec(), blocks, iq2_bias }
}

/// Integer dot of one weight row with prepared activations (SIMD if `simd`:
/// the best level the CPU supports).
pub fn dot_q8_with(ty: GgmlType, row: &[u8], a: &QuantizedActs, simd: bool) -> f32 {
    dot_q8_at(ty, row, a, level_of(simd))
}

/// [`dot_q8_with`] at an explicit [`SimdLevel`] (lowered to what the CPU supports).
pub fn dot_q8_at(ty: GgmlType, row: &[u8], a: &QuantizedActs, level: SimdLevel) -> f32 {
    debug_assert_eq!(ty.row_bytes(a.len()), Some(row.len()));
    let level = clamp_level(level);
    #[cfg(target_arch = "x86_64")]
    let avx2 = level >= SimdLevel::Avx2;
    #[cfg(all(target_arch = "x86_64", dsv4_avx512))]
    let avx512 = level == SimdLevel::Avx512;
    match (&a.blocks, ty) {
        (ActBlocks::Q8_0(q), GgmlType::Q8_0) => {
            #[cfg(target_arch = "x86_64")]
            if avx2 {
                // SAFETY: AVX2/FMA/F16C present; row holds d.len() blocks (checked by caller).
                return unsafe { q8_0::avx2::dot_q8(row, &q.d, &q.qs) };
            }
            q8_0::dot_q8_scalar(row, &q.d, &q.qs)
        }
        (ActBlocks::Q8K(q), GgmlType::Q2_K) => {
            #[cfg(target_arch = "x86_64")]
            if avx2 {
                // SAFETY: as above.
                return unsafe { q2_k::avx2::dot_q8(row, &q.d, &q.qs, &q.bsums) };
            }
            q2_k::dot_q8_scalar(row, &q.d, &q.qs, &q.bsums)
        }
        (ActBlocks::Q8K(q), GgmlType::Q4_K) => {
            #[cfg(target_arch = "x86_64")]
            if avx2 {
                // SAFETY: as above.
                return unsafe { q4_k::avx2::dot_q8(row, &q.d, &q.qs, &q.bsums) };
            }
            q4_k::dot_q8_scalar(row, &q.d, &q.qs, &q.bsums)
        }
        (ActBlocks::Q8K(q), GgmlType::IQ2_XXS) => {
            // iq2_bias is empty when the activations were prepared for another
            // Q8_K weight type; the AVX2 kernel needs none.
            #[cfg(all(target_arch = "x86_64", dsv4_avx512))]
            if avx512 && a.iq2_bias.len() * 4 == q.qs.len() {
                // SAFETY: AVX-512 F/BW/VBMI/VNNI/GFNI + AVX2 present (clamp_level);
                // row, d, qs and iq2_bias cover the same number of blocks.
                return unsafe { iq2_xxs::avx512::dot_q8(row, &q.d, &q.qs, &a.iq2_bias) };
            }
            #[cfg(target_arch = "x86_64")]
            if avx2 {
                // SAFETY: as above.
                return unsafe { iq2_xxs::avx2::dot_q8(row, &q.d, &q.qs) };
            }
            iq2_xxs::dot_q8_scalar(row, &q.d, &q.qs)
        }
        // Float weights, or activations prepared for another type: f32 path.
        _ => quant::dot_f32_at(ty, row, &a.x, level),
    }
}

/// `out[t] = dot_q8_at(ty, row, &xq[t], level)` for a tile of at most
/// `TOK_TILE` tokens (bitwise equal); IQ2_XXS at the AVX-512 level decodes
/// each weight block once for the whole tile.
fn dot_q8_tile(ty: GgmlType, row: &[u8], xq: &[QuantizedActs], level: SimdLevel, out: &mut [f32]) {
    #[cfg(all(target_arch = "x86_64", dsv4_avx512))]
    if ty == GgmlType::IQ2_XXS && clamp_level(level) == SimdLevel::Avx512 && xq.len() > 1 {
        let acts: Option<Vec<(&[f32], &[i8])>> = xq.iter().map(|a| a.q8_k().map(|q| (&q.d[..], &q.qs[..]))).collect();
        if let Some(acts) = acts {
            for (xs, o) in acts.chunks(iq2_xxs::avx512::MULTI_MAX).zip(out.chunks_mut(iq2_xxs::avx512::MULTI_MAX)) {
                // SAFETY: AVX-512 F/BW/VBMI/VNNI/GFNI + AVX2 present (clamp_level);
                // every activation set holds row.len() / 66 blocks (checked by the caller).
                unsafe { iq2_xxs::avx512::dot_q8_multi(row, xs, o) };
            }
            return;
        }
    }
    for (o, a) in out.iter_mut().zip(xq) {
        *o = dot_q8_at(ty, row, a, level);
    }
}

/// `y[r] = dot(row r, xq)` using integer block dot products (spec §4.7);
/// float weights use the f32 dot with the original activations.
pub fn matvec_q8(ty: GgmlType, w: &[u8], n_rows: usize, n_cols: usize, xq: &QuantizedActs, y: &mut [f32]) {
    let rb = check_shapes(ty, w, n_rows, n_cols);
    assert_eq!(xq.len(), n_cols);
    assert_eq!(y.len(), n_rows);
    let level = simd_level();
    let run = |r0: usize, ys: &mut [f32]| {
        for (i, yv) in ys.iter_mut().enumerate() {
            let r = r0 + i;
            *yv = dot_q8_at(ty, &w[r * rb..(r + 1) * rb], xq, level);
        }
    };
    if w.len() < PAR_MIN_BYTES {
        run(0, y);
    } else {
        let chunk = rows_per_task(rb, n_rows);
        y.par_chunks_mut(chunk).enumerate().for_each(|(c, ys)| run(c * chunk, ys));
    }
}

/// `y[t][r] = dot_q8(row r, xq[t])` for several tokens (8-bit path of
/// prefill). Each weight row is swept against a tile of tokens while it is
/// hot in L1, so weight bytes come from memory once per tile; results are
/// bitwise identical to [`matvec_q8`] per token.
pub fn matmul_q8(ty: GgmlType, w: &[u8], n_rows: usize, n_cols: usize, xq: &[QuantizedActs], y: &mut [f32]) {
    let rb = check_shapes(ty, w, n_rows, n_cols);
    let n_tok = xq.len();
    assert!(xq.iter().all(|a| a.len() == n_cols), "activation length differs from n_cols = {n_cols}");
    assert_eq!(y.len(), n_rows * n_tok);
    if n_tok == 0 || n_rows == 0 {
        return;
    }
    let level = simd_level();
    let chunk = rows_per_task(rb, n_rows);
    let mut yt = vec![0f32; n_rows * n_tok];
    let work = |c: usize, out: &mut [f32]| {
        let r0 = c * chunk;
        let nr = out.len() / n_tok;
        for t0 in (0..n_tok).step_by(TOK_TILE) {
            let t1 = (t0 + TOK_TILE).min(n_tok);
            for i in 0..nr {
                let row = &w[(r0 + i) * rb..(r0 + i + 1) * rb];
                dot_q8_tile(ty, row, &xq[t0..t1], level, &mut out[i * n_tok + t0..i * n_tok + t1]);
            }
        }
    };
    if w.len() < PAR_MIN_BYTES {
        yt.chunks_mut(chunk * n_tok).enumerate().for_each(|(c, o)| work(c, o));
    } else {
        yt.par_chunks_mut(chunk * n_tok).enumerate().for_each(|(c, o)| work(c, o));
    }
    for r in 0..n_rows {
        for t in 0..n_tok {
            y[t * n_rows + r] = yt[r * n_tok + t];
        }
    }
}
