//! IQ2_XXS quantiser (block layout: gguf.md §4.5): each group of 32 values is
//! four 8-value points of the 256-entry `iq2xxs_grid` (magnitudes 8, 25, 43)
//! with an even-parity sign pattern, a 4-bit group scale and one f16 scale per
//! 256 values.
//!
//! Search (weighted least squares, the weights being importance × magnitude as
//! in ggml's `quantize_row_iq2_xxs_impl`): signs are taken from the data, and
//! where a sub-group has an odd number of negatives the cheapest element (least
//! weight·x²) is flipped. For each group we try a sweep of scales; for each scale
//! every 8-value sub-group is matched to its nearest grid point — by exact
//! lattice lookup when the per-element nearest magnitudes form a grid entry, by a
//! full weighted search over the 256 points otherwise — then the scale is refit
//! by least squares. The best group scale is then quantised to the block's f16
//! `d` and 4-bit `ls`, and the points are re-chosen for that final scale.
//!
//! Tables come from the gguf crate (the same data its dequantiser uses), so
//! every block we emit decodes there exactly as we modelled it.

use dsv4_gguf::quant::iq2_tables::{IQ2XXS_GRID, KSIGNS_IQ2XS};
use half::f16;
use std::sync::OnceLock;

pub const QK_K: usize = 256;
pub const BLOCK_BYTES: usize = 66;

/// Grid magnitudes as f32 rows, and a 3^8 lattice index → grid index map.
struct Tables {
    grid: [[f32; 8]; 256],
    norm2: [f32; 256],
    lattice: Vec<i16>,
    /// For lattice points off the grid: the nearest grid points (unweighted),
    /// among which the weighted search is done (ggml's "neighbours" idea).
    neighbours: Vec<Vec<u8>>,
}

const N_NEIGHBOURS: usize = 16;

fn level_of(b: u8) -> usize {
    match b {
        0x08 => 0,
        0x19 => 1,
        _ => 2,
    }
}

fn tables() -> &'static Tables {
    static T: OnceLock<Tables> = OnceLock::new();
    T.get_or_init(|| {
        let mut grid = [[0f32; 8]; 256];
        let mut norm2 = [0f32; 256];
        let mut lattice = vec![-1i16; 6561];
        for (g, &e) in IQ2XXS_GRID.iter().enumerate() {
            let mut key = 0usize;
            for m in (0..8).rev() {
                let b = ((e >> (8 * m)) & 0xff) as u8;
                grid[g][m] = b as f32;
                key = key * 3 + level_of(b);
            }
            norm2[g] = grid[g].iter().map(|v| v * v).sum();
            lattice[key] = g as i16;
        }
        let mut neighbours = vec![Vec::new(); 6561];
        for (key, nb) in neighbours.iter_mut().enumerate() {
            if lattice[key] >= 0 {
                continue;
            }
            let mut p = [0f32; 8];
            let mut k = key;
            for v in p.iter_mut() {
                *v = LEVELS[k % 3];
                k /= 3;
            }
            let mut d: Vec<(f32, u8)> = grid
                .iter()
                .enumerate()
                .map(|(gi, gv)| (gv.iter().zip(&p).map(|(a, b)| (a - b) * (a - b)).sum::<f32>(), gi as u8))
                .collect();
            d.sort_by(|a, b| a.0.total_cmp(&b.0));
            *nb = d.iter().take(N_NEIGHBOURS).map(|x| x.1).collect();
        }
        Tables { grid, norm2, lattice, neighbours }
    })
}

const LEVELS: [f32; 3] = [8.0, 25.0, 43.0];

/// Best grid point for magnitudes `a` with weights `w` at scale `s`
/// (minimises Σ w (a − s·g)²).
fn best_point(t: &Tables, a: &[f32; 8], w: &[f32; 8], s: f32) -> usize {
    // Per-element nearest level; if the tuple is on the grid it is optimal.
    let mut key = 0usize;
    for m in (0..8).rev() {
        let q = a[m] / s;
        let lv = if q < (LEVELS[0] + LEVELS[1]) / 2.0 {
            0
        } else if q < (LEVELS[1] + LEVELS[2]) / 2.0 {
            1
        } else {
            2
        };
        key = key * 3 + lv;
    }
    let g = t.lattice[key];
    if g >= 0 {
        return g as usize;
    }
    let mut best = 0usize;
    let mut best_err = f32::INFINITY;
    for &gi in &t.neighbours[key] {
        let gi = gi as usize;
        let gv = &t.grid[gi];
        let mut err = 0f32;
        for m in 0..8 {
            let d = a[m] - s * gv[m];
            err += w[m] * d * d;
        }
        if err < best_err {
            best_err = err;
            best = gi;
        }
    }
    best
}

/// Points for a whole group at scale `s`; returns (points, Σ w a g, Σ w g²).
fn fit_group(t: &Tables, a: &[[f32; 8]; 4], w: &[[f32; 8]; 4], s: f32) -> ([usize; 4], f32, f32) {
    let mut pts = [0usize; 4];
    let (mut sxg, mut sgg) = (0f32, 0f32);
    for k in 0..4 {
        let g = best_point(t, &a[k], &w[k], s);
        pts[k] = g;
        for m in 0..8 {
            let gv = t.grid[g][m];
            sxg += w[k][m] * a[k][m] * gv;
            sgg += w[k][m] * gv * gv;
        }
    }
    (pts, sxg, sgg)
}

fn group_err(t: &Tables, a: &[[f32; 8]; 4], w: &[[f32; 8]; 4], pts: &[usize; 4], s: f32) -> f32 {
    let mut e = 0f32;
    for k in 0..4 {
        for m in 0..8 {
            let d = a[k][m] - s * t.grid[pts[k]][m];
            e += w[k][m] * d * d;
        }
    }
    e
}

/// Quantise `x` (whole 256-value blocks) to IQ2_XXS, appending to `out`.
/// `importance` (same length as one row period, or `None`) weights each column.
pub fn quantize_iq2_xxs(x: &[f32], importance: Option<&[f32]>, out: &mut Vec<u8>) {
    assert!(x.len() % QK_K == 0, "IQ2_XXS needs whole 256-value blocks");
    if let Some(q) = importance {
        assert!(q.len() == x.len(), "importance must have one weight per value");
    }
    let t = tables();
    let _ = t.norm2[0];
    for (bi, xb) in x.chunks_exact(QK_K).enumerate() {
        let qw = importance.map(|q| &q[bi * QK_K..(bi + 1) * QK_K]);
        let sigma2 = 2.0 * xb.iter().map(|v| v * v).sum::<f32>() / QK_K as f32;
        // Per group: magnitudes, weights, sign bytes and the best continuous scale.
        let mut mags = [[[0f32; 8]; 4]; 8];
        let mut wts = [[[0f32; 8]; 4]; 8];
        let mut signs = [[0u8; 4]; 8];
        let mut gscale = [0f32; 8];
        for g in 0..8 {
            for k in 0..4 {
                let base = 32 * g + 8 * k;
                let mut sb = 0u8;
                let mut nneg = 0;
                for m in 0..8 {
                    let v = xb[base + m];
                    mags[g][k][m] = v.abs();
                    let imp = qw.map_or(1.0, |q| q[base + m]);
                    wts[g][k][m] = imp * (sigma2 + v * v).sqrt();
                    if v < 0.0 {
                        sb |= 1 << m;
                        nneg += 1;
                    }
                }
                if nneg % 2 == 1 {
                    // Flip the element whose wrong sign costs least.
                    let mut im = 0;
                    let mut cmin = f32::INFINITY;
                    for m in 0..8 {
                        let c = wts[g][k][m] * mags[g][k][m] * mags[g][k][m];
                        if c < cmin {
                            cmin = c;
                            im = m;
                        }
                    }
                    sb ^= 1 << im;
                }
                signs[g][k] = sb;
            }
            // A flipped element is approximated as +g where x is −|x|: model that
            // by giving it the signed target −|x| in the fit.
            let mut a = mags[g];
            for k in 0..4 {
                for m in 0..8 {
                    let neg_data = xb[32 * g + 8 * k + m] < 0.0;
                    let neg_code = signs[g][k] >> m & 1 == 1;
                    if neg_data != neg_code {
                        a[k][m] = -a[k][m];
                    }
                }
            }
            mags[g] = a;
            let amax = a.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
            if amax == 0.0 {
                gscale[g] = 0.0;
                continue;
            }
            let mut best_s = 0f32;
            let mut best_e = f32::INFINITY;
            for step in 0..16 {
                // amax lands between level 25 and 55 of the grid's units.
                let s0 = amax / (28.0 + 2.0 * step as f32);
                let (pts, sxg, sgg) = fit_group(t, &a, &wts[g], s0);
                let s = if sgg > 0.0 { (sxg / sgg).max(0.0) } else { s0 };
                let e = group_err(t, &a, &wts[g], &pts, s);
                if e < best_e {
                    best_e = e;
                    best_s = s;
                }
            }
            gscale[g] = best_s;
        }
        // Block scale: group scale = d · (0.5 + ls) · 0.25, ls ∈ 0..15.
        let max_s = gscale.iter().fold(0f32, |m, &v| m.max(v));
        if max_s == 0.0 {
            out.extend_from_slice(&[0u8; BLOCK_BYTES]);
            continue;
        }
        let dh = f16::from_f32(max_s / (15.5 * 0.25));
        let d = dh.to_f32();
        out.extend_from_slice(&dh.to_bits().to_le_bytes());
        for g in 0..8 {
            let ls = if d > 0.0 { ((gscale[g] / (0.25 * d)) - 0.5).round().clamp(0.0, 15.0) as u32 } else { 0 };
            let s = d * (0.5 + ls as f32) * 0.25;
            let (pts, _, _) = fit_group(t, &mags[g], &wts[g], s.max(f32::MIN_POSITIVE));
            let mut a0 = 0u32;
            let mut a1 = 0u32;
            for k in 0..4 {
                a0 |= (pts[k] as u32) << (8 * k);
                let si = (signs[g][k] & 127) as u32;
                debug_assert_eq!(KSIGNS_IQ2XS[si as usize], signs[g][k]);
                a1 |= si << (7 * k);
            }
            a1 |= ls << 28;
            out.extend_from_slice(&a0.to_le_bytes());
            out.extend_from_slice(&a1.to_le_bytes());
        }
    }
}
