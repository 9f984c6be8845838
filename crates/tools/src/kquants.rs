//! Q2_K and Q4_K quantisers: faithful ports of ggml's reference quantisers
//! (`quantize_row_q2_K_ref`, `quantize_row_q4_K_ref` with `make_qkx2_quants`),
//! including ggml's float rounding trick in `nearest_int`, so our blocks are the
//! ones llama.cpp's reference path produces for the same f32 input (block
//! layouts: gguf.md §4.3 / §4.4). Rows must be whole 256-value blocks.

use half::f16;

pub const QK_K: usize = 256;
pub const Q2_K_BYTES: usize = 84;
pub const Q4_K_BYTES: usize = 144;

/// ggml's `nearest_int`: round-to-nearest-even through the float adder.
#[inline]
fn nearest_int(fval: f32) -> i32 {
    let val = fval + 12_582_912.0;
    let i = val.to_bits() as i32;
    (i & 0x007f_ffff) - 0x0040_0000
}

#[inline]
fn fp16_round(x: f32) -> (u16, f32) {
    let h = f16::from_f32(x);
    (h.to_bits(), h.to_f32())
}

#[allow(clippy::too_many_arguments)]
fn make_qkx2_quants(
    x: &[f32],
    weights: &[f32],
    nmax: i32,
    l_out: &mut [u8],
    laux: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    use_mad: bool,
) -> (f32, f32) {
    let n = x.len();
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l_out[..n].fill(0);
        return (0.0, -min);
    }
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0.0f32;
    for i in 0..n {
        let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        l_out[i] = l as u8;
        let mut diff = scale * l as f32 + min - x[i];
        diff = if use_mad { diff.abs() } else { diff * diff };
        best_error += weights[i] * diff;
    }
    if nstep < 1 {
        return (scale, -min);
    }
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for i in 0..n {
            let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            laux[i] = l as u8;
            let w = weights[i];
            let lf = l as f32;
            sum_l += w * lf;
            sum_l2 += w * lf * lf;
            sum_xl += w * lf * x[i];
        }
        let d = sum_w * sum_l2 - sum_l * sum_l;
        if d > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / d;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / d;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0.0f32;
            for i in 0..n {
                let mut diff = this_scale * laux[i] as f32 + this_min - x[i];
                diff = if use_mad { diff.abs() } else { diff * diff };
                cur_error += weights[i] * diff;
            }
            if cur_error < best_error {
                l_out[..n].copy_from_slice(&laux[..n]);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// Quantise `x` (a multiple of 256 values) to Q2_K blocks, appending to `out`.
pub fn quantize_q2_k(x: &[f32], out: &mut Vec<u8>) {
    assert!(x.len() % QK_K == 0, "Q2_K needs whole 256-value blocks");
    let q4scale = 15.0f32;
    for xb in x.chunks_exact(QK_K) {
        let mut l = [0u8; QK_K];
        let mut laux = [0u8; 16];
        let mut weights = [0f32; 16];
        let mut mins = [0f32; 16];
        let mut scales = [0f32; 16];
        let mut max_scale = 0f32;
        let mut max_min = 0f32;
        for j in 0..16 {
            for k in 0..16 {
                weights[k] = xb[16 * j + k].abs();
            }
            let (s, m) = make_qkx2_quants(&xb[16 * j..16 * j + 16], &weights, 3, &mut l[16 * j..16 * j + 16], &mut laux, -0.5, 0.1, 15, true);
            scales[j] = s;
            mins[j] = m;
            if s > max_scale {
                max_scale = s;
            }
            if m > max_min {
                max_min = m;
            }
        }
        let mut sc = [0u8; 16];
        let (d_bits, d) = if max_scale > 0.0 {
            let iscale = q4scale / max_scale;
            for j in 0..16 {
                sc[j] = nearest_int(iscale * scales[j]) as u8;
            }
            fp16_round(max_scale / q4scale)
        } else {
            fp16_round(0.0)
        };
        let (dmin_bits, dmin) = if max_min > 0.0 {
            let iscale = q4scale / max_min;
            for j in 0..16 {
                let v = nearest_int(iscale * mins[j]);
                sc[j] |= (v << 4) as u8;
            }
            fp16_round(max_min / q4scale)
        } else {
            fp16_round(0.0)
        };
        for j in 0..16 {
            let dd = d * (sc[j] & 0xF) as f32;
            if dd == 0.0 {
                continue;
            }
            let dm = dmin * (sc[j] >> 4) as f32;
            for ii in 0..16 {
                let v = nearest_int((xb[16 * j + ii] + dm) / dd).clamp(0, 3);
                l[16 * j + ii] = v as u8;
            }
        }
        out.extend_from_slice(&sc);
        for j in (0..QK_K).step_by(128) {
            for k in 0..32 {
                out.push(l[j + k] | (l[j + k + 32] << 2) | (l[j + k + 64] << 4) | (l[j + k + 96] << 6));
            }
        }
        out.extend_from_slice(&d_bits.to_le_bytes());
        out.extend_from_slice(&dmin_bits.to_le_bytes());
    }
}

fn get_scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// Quantise `x` (a multiple of 256 values) to Q4_K blocks, appending to `out`.
pub fn quantize_q4_k(x: &[f32], out: &mut Vec<u8>) {
    assert!(x.len() % QK_K == 0, "Q4_K needs whole 256-value blocks");
    for xb in x.chunks_exact(QK_K) {
        let mut l = [0u8; QK_K];
        let mut laux = [0u8; 32];
        let mut weights = [0f32; 32];
        let mut mins = [0f32; 8];
        let mut scales = [0f32; 8];
        let mut max_scale = 0f32;
        let mut max_min = 0f32;
        for j in 0..8 {
            let sub = &xb[32 * j..32 * j + 32];
            let sum_x2: f32 = sub.iter().map(|v| v * v).sum();
            let av_x = (sum_x2 / 32.0).sqrt();
            for k in 0..32 {
                weights[k] = av_x + sub[k].abs();
            }
            let (s, m) = make_qkx2_quants(sub, &weights, 15, &mut l[32 * j..32 * j + 32], &mut laux, -1.0, 0.1, 20, false);
            scales[j] = s;
            mins[j] = m;
            if s > max_scale {
                max_scale = s;
            }
            if m > max_min {
                max_min = m;
            }
        }
        let inv_scale = if max_scale > 0.0 { 63.0 / max_scale } else { 0.0 };
        let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
        let mut sc = [0u8; 12];
        for j in 0..8 {
            // ggml stores nearest_int into a uint8_t before MIN(63, ..): keep the truncation.
            let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
            let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
            if j < 4 {
                sc[j] = ls;
                sc[j + 4] = lm;
            } else {
                sc[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
                sc[j - 4] |= (ls >> 4) << 6;
                sc[j] |= (lm >> 4) << 6;
            }
        }
        let (d_bits, d) = fp16_round(max_scale / 63.0);
        let (dmin_bits, dmin) = fp16_round(max_min / 63.0);
        for j in 0..8 {
            let (s, m) = get_scale_min_k4(j, &sc);
            let dd = d * s as f32;
            if dd == 0.0 {
                continue;
            }
            let dm = dmin * m as f32;
            for ii in 0..32 {
                l[32 * j + ii] = nearest_int((xb[32 * j + ii] + dm) / dd).clamp(0, 15) as u8;
            }
        }
        out.extend_from_slice(&d_bits.to_le_bytes());
        out.extend_from_slice(&dmin_bits.to_le_bytes());
        out.extend_from_slice(&sc);
        for j in (0..QK_K).step_by(64) {
            for k in 0..32 {
                out.push(l[j + k] | (l[j + k + 32] << 4));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_int_is_round_half_even() {
        assert_eq!(nearest_int(0.5), 0);
        assert_eq!(nearest_int(1.5), 2);
        assert_eq!(nearest_int(2.5), 2);
        assert_eq!(nearest_int(-1.5), -2);
        assert_eq!(nearest_int(-0.4), 0);
        assert_eq!(nearest_int(7.6), 8);
    }
}
