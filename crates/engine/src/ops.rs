//! Pure CPU operations of the DeepSeek V4 forward pass, over plain slices.
//!
//! Every function here is the ground truth for one step of ../shared/spec/model.md
//! and is what the CUDA kernels are tested against. They allocate nothing the
//! caller did not ask for, never look at the model's shape constants, and
//! compute in f32 exactly as the official reference does when run in float32
//! (the fixtures were generated that way), including the FP8/FP4 "QAT"
//! round trips that the official graph applies to KV and indexer rows.

/// RMSNorm: `out_i = x_i * w_i / sqrt(mean(x²) + eps)` (spec §0). Sum in f32 like torch.
pub fn rmsnorm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    debug_assert_eq!(x.len(), w.len());
    debug_assert_eq!(x.len(), out.len());
    let r = rms_inv(x, eps);
    for ((o, &xi), &wi) in out.iter_mut().zip(x).zip(w) {
        *o = xi * r * wi;
    }
}

/// In-place RMSNorm with weight.
pub fn rmsnorm_inplace(x: &mut [f32], w: &[f32], eps: f32) {
    debug_assert_eq!(x.len(), w.len());
    let r = rms_inv(x, eps);
    for (xi, &wi) in x.iter_mut().zip(w) {
        *xi = *xi * r * wi;
    }
}

/// `1 / sqrt(mean(x²) + eps)`. Accumulates in f64: the reference sums in f32
/// with pairwise reduction, which is closer to an exact sum than a naive f32 loop.
pub fn rms_inv(x: &[f32], eps: f32) -> f32 {
    let ss: f64 = x.iter().map(|&v| (v as f64) * (v as f64)).sum();
    let mean = (ss / x.len().max(1) as f64) as f32;
    1.0 / (mean + eps).sqrt()
}

/// Unweighted per-vector RMS normalisation in place (per-head q norm, spec §6 step 3).
pub fn rms_scale_inplace(x: &mut [f32], eps: f32) {
    let r = rms_inv(x, eps);
    for v in x.iter_mut() {
        *v *= r;
    }
}

/// YaRN parameters for compressed layers (spec §3.1).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Yarn {
    pub factor: f32,
    pub original_ctx: f64,
    pub beta_fast: f64,
    pub beta_slow: f64,
}

/// Per-pair rotation frequencies ω_i for one (θ, YaRN) combination. Positions are
/// applied at use time (`angle = p·ω_i` in f32, as the official outer product does).
#[derive(Clone, Debug)]
pub struct Rope {
    pub omega: Vec<f32>,
}

impl Rope {
    /// `rope_dim` rotated dims (pairs = rope_dim / 2), base θ, optional YaRN.
    pub fn new(rope_dim: usize, theta: f32, yarn: Option<Yarn>) -> Rope {
        let half = rope_dim / 2;
        let mut omega: Vec<f32> = (0..half)
            .map(|i| {
                // torch: base ** (arange(0, dim, 2) / dim) in f32, then 1/that.
                let e = (2 * i) as f32 / rope_dim as f32;
                let p = (theta as f64).powf(e as f64) as f32;
                1.0f32 / p
            })
            .collect();
        if let Some(y) = yarn {
            let corr = |rot: f64| -> f64 {
                rope_dim as f64 * (y.original_ctx / (rot * 2.0 * std::f64::consts::PI)).ln()
                    / (2.0 * (theta as f64).ln())
            };
            let lo = corr(y.beta_fast).floor().max(0.0);
            let hi = corr(y.beta_slow).ceil().min(rope_dim as f64 - 1.0);
            let span = if hi == lo { 0.001 } else { hi - lo };
            for (i, w) in omega.iter_mut().enumerate() {
                let ramp = (((i as f64) - lo) / span).clamp(0.0, 1.0) as f32;
                // official: freqs / factor * (1 - smooth) + freqs * smooth, smooth = 1 - ramp
                let smooth = 1.0 - ramp;
                *w = *w / y.factor * (1.0 - smooth) + *w * smooth;
            }
        }
        Rope { omega }
    }

    /// Rotates interleaved pairs `(x[2i], x[2i+1])` of `x` (exactly the rotated tail,
    /// `rope_dim` values) by `pos·ω_i`; `inverse` rotates by the conjugate.
    pub fn apply(&self, x: &mut [f32], pos: usize, inverse: bool) {
        debug_assert_eq!(x.len(), self.omega.len() * 2);
        let p = pos as f32;
        for (i, &w) in self.omega.iter().enumerate() {
            let ang = p * w;
            // torch.polar(1, angle) in complex64: cos/sin of the f32 angle.
            let (s, c) = (ang as f64).sin_cos();
            let (c, mut s) = (c as f32, s as f32);
            if inverse {
                s = -s;
            }
            let a = x[2 * i];
            let b = x[2 * i + 1];
            x[2 * i] = a * c - b * s;
            x[2 * i + 1] = a * s + b * c;
        }
    }
}

/// `2^ceil(log2(v))` for a positive finite f32, exactly as the official
/// `fast_round_scale`: exponent of v, +1 when the mantissa is not zero.
pub fn pow2_ceil(v: f32) -> f32 {
    debug_assert!(v > 0.0 && v.is_finite());
    let bits = v.to_bits();
    let exp = ((bits >> 23) & 0xff) as i32;
    let mant = bits & 0x7f_ffff;
    if exp == 0 {
        // subnormal: fall back to an exact f64 computation
        let e = (v as f64).log2().ceil() as i32;
        return (2.0f64).powi(e) as f32;
    }
    let e = exp - 127 + if mant != 0 { 1 } else { 0 };
    (2.0f64).powi(e) as f32
}

/// Round to the FP8 E4M3FN grid, nearest-even, for |x| ≤ 448.
pub fn e4m3_round(x: f32) -> f32 {
    let a = x.abs();
    if a == 0.0 || !a.is_finite() {
        return x;
    }
    // binade exponent, at least the min normal exponent (-6); 3 mantissa bits.
    let e = (((a.to_bits() >> 23) & 0xff) as i32 - 127).max(-6);
    let q = (2.0f32).powi(e - 3);
    let r = (a / q).round_ties_even() * q;
    r.min(448.0).copysign(x)
}

/// FP8 e4m3 in-place simulation with power-of-two scales per block of 64
/// (spec §3.2). `x.len()` must be a multiple of the block (caller slices).
pub fn fp8_sim_inplace(x: &mut [f32], block: usize) {
    for blk in x.chunks_mut(block) {
        let amax = blk.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-4);
        let s = pow2_ceil(amax * (1.0f32 / 448.0));
        for v in blk.iter_mut() {
            let t = (*v / s).clamp(-448.0, 448.0);
            *v = e4m3_round(t) * s;
        }
    }
}

/// Round to the FP4 e2m1 grid {0,.5,1,1.5,2,3,4,6}, ties to the even code.
pub fn e2m1_round(x: f32) -> f32 {
    const GRID: [f32; 8] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];
    let a = x.abs().min(6.0);
    let mut best = 0usize;
    let mut best_d = f32::INFINITY;
    for (i, &g) in GRID.iter().enumerate() {
        let d = (a - g).abs();
        // strictly closer wins; on an exact tie prefer the even code
        if d < best_d || (d == best_d && i % 2 == 0) {
            best = i;
            best_d = d;
        }
    }
    GRID[best].copysign(x)
}

/// FP4 e2m1 in-place simulation with power-of-two scales per block of 32 (spec §3.3).
pub fn fp4_sim_inplace(x: &mut [f32], block: usize) {
    let floor = 6.0f32 * (2.0f32).powi(-126);
    for blk in x.chunks_mut(block) {
        let amax = blk.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(floor);
        let s = pow2_ceil(amax * (1.0f32 / 6.0));
        for v in blk.iter_mut() {
            let t = (*v / s).clamp(-6.0, 6.0);
            *v = e2m1_round(t) * s;
        }
    }
}

/// Natural-order (Sylvester) Walsh-Hadamard transform scaled by n^-½ (spec §3.4).
/// `x.len()` must be a power of two.
pub fn hadamard_inplace(x: &mut [f32]) {
    let n = x.len();
    debug_assert!(n.is_power_of_two());
    let mut h = 1;
    while h < n {
        for i in (0..n).step_by(2 * h) {
            for j in i..i + h {
                let a = x[j];
                let b = x[j + h];
                x[j] = a + b;
                x[j + h] = a - b;
            }
        }
        h *= 2;
    }
    let s = (n as f32).powf(-0.5);
    for v in x.iter_mut() {
        *v *= s;
    }
}

pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// PyTorch softplus (threshold 20: returns x above it).
pub fn softplus(x: f32) -> f32 {
    if x > 20.0 {
        x
    } else {
        x.exp().ln_1p()
    }
}

pub fn silu(x: f32) -> f32 {
    x * sigmoid(x)
}

/// Hyper-connection weights of one token (spec §5): `pre[m]`, `post[m]`, `comb[m][m]`
/// with comb[src][dst].
#[derive(Clone, Debug, Default)]
pub struct HcWeights {
    pub pre: Vec<f32>,
    pub post: Vec<f32>,
    pub comb: Vec<f32>,
}

/// From the (2+m)·m mixes (already multiplied by the RMS factor) to pre/post/comb,
/// including the Sinkhorn normalisation of comb.
pub fn hc_split_sinkhorn(mixes: &[f32], scale: &[f32], base: &[f32], m: usize, iters: usize, eps: f32) -> HcWeights {
    debug_assert_eq!(mixes.len(), (2 + m) * m);
    let pre: Vec<f32> = (0..m).map(|j| sigmoid(mixes[j] * scale[0] + base[j]) + eps).collect();
    let post: Vec<f32> = (0..m).map(|j| 2.0 * sigmoid(mixes[m + j] * scale[1] + base[m + j])).collect();
    let mut c: Vec<f32> = (0..m * m).map(|i| mixes[2 * m + i] * scale[2] + base[2 * m + i]).collect();
    sinkhorn(&mut c, m, iters, eps);
    HcWeights { pre, post, comb: c }
}

/// Sinkhorn as the official kernel orders it: row softmax + eps, column
/// normalise, then (iters-1) × (row normalise, column normalise).
pub fn sinkhorn(c: &mut [f32], m: usize, iters: usize, eps: f32) {
    for j in 0..m {
        let row = &mut c[j * m..(j + 1) * m];
        let mx = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let mut s = 0.0f32;
        for v in row.iter_mut() {
            *v = (*v - mx).exp();
            s += *v;
        }
        for v in row.iter_mut() {
            *v = *v / s + eps;
        }
    }
    let col_norm = |c: &mut [f32]| {
        for k in 0..m {
            let s: f32 = (0..m).map(|j| c[j * m + k]).sum();
            for j in 0..m {
                c[j * m + k] /= s + eps;
            }
        }
    };
    col_norm(c);
    for _ in 1..iters {
        for j in 0..m {
            let s: f32 = c[j * m..(j + 1) * m].iter().sum();
            for v in c[j * m..(j + 1) * m].iter_mut() {
                *v /= s + eps;
            }
        }
        col_norm(c);
    }
}

/// `out = Σ_j w[j] · X[j]` over m streams of width d (HcPre collapse, HcHead).
pub fn hc_collapse(x: &[f32], w: &[f32], d: usize, out: &mut [f32]) {
    debug_assert_eq!(x.len(), w.len() * d);
    out.fill(0.0);
    for (j, &wj) in w.iter().enumerate() {
        for (o, &v) in out.iter_mut().zip(&x[j * d..(j + 1) * d]) {
            *o += wj * v;
        }
    }
}

/// HcPost: `X'[k] = post[k]·f + Σ_j comb[j][k]·R[j]`.
pub fn hc_post(f: &[f32], residual: &[f32], w: &HcWeights, d: usize, out: &mut [f32]) {
    let m = w.post.len();
    debug_assert_eq!(residual.len(), m * d);
    debug_assert_eq!(out.len(), m * d);
    for k in 0..m {
        let o = &mut out[k * d..(k + 1) * d];
        for (oi, &fi) in o.iter_mut().zip(f) {
            *oi = w.post[k] * fi;
        }
        for j in 0..m {
            let c = w.comb[j * m + k];
            for (oi, &r) in o.iter_mut().zip(&residual[j * d..(j + 1) * d]) {
                *oi += c * r;
            }
        }
    }
}

/// Sink attention of one query head over a key set whose rows are both K and V
/// (spec §9): `o = Σ e^(z_j−M) k_j / (e^(sink−M) + Σ e^(z_j−M))`, z = q·k·scale.
pub fn sink_attention(q: &[f32], keys: &[&[f32]], sink: f32, scale: f32, out: &mut [f32]) {
    out.fill(0.0);
    if keys.is_empty() {
        return;
    }
    let mut z: Vec<f32> = keys.iter().map(|k| dot(q, k) * scale).collect();
    let mx = z.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let mut denom = (sink - mx).exp();
    for v in z.iter_mut() {
        *v = (*v - mx).exp();
        denom += *v;
    }
    for (k, &p) in keys.iter().zip(&z) {
        let p = p / denom;
        for (o, &kv) in out.iter_mut().zip(k.iter()) {
            *o += p * kv;
        }
    }
}

/// Plain f32 dot product (f64-free, fixed order).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    // 8 independent accumulators: vectorises and keeps the error small.
    let mut acc = [0.0f32; 8];
    let n8 = a.len() / 8 * 8;
    for i in (0..n8).step_by(8) {
        for l in 0..8 {
            acc[l] += a[i + l] * b[i + l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for i in n8..a.len() {
        s += a[i] * b[i];
    }
    s
}

/// Indices of the `k` largest values, descending; ties break towards the lower index.
pub fn topk_desc(scores: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    let k = k.min(idx.len());
    let cmp = |a: &usize, b: &usize| {
        scores[*b]
            .partial_cmp(&scores[*a])
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.cmp(b))
    };
    if k < idx.len() && k > 0 {
        idx.select_nth_unstable_by(k - 1, cmp);
        idx.truncate(k);
    }
    idx.sort_by(cmp);
    idx.truncate(k);
    idx
}

/// Softmax pooling over candidates, independently per feature dim (compressor §7):
/// `out[c] = Σ_i softmax_i(score_i[c]) · value_i[c]`. Scores of −∞ contribute nothing.
pub fn softmax_pool(values: &[&[f32]], scores: &[&[f32]], out: &mut [f32]) {
    let d = out.len();
    for c in 0..d {
        let mx = scores.iter().fold(f32::NEG_INFINITY, |a, s| a.max(s[c]));
        if mx == f32::NEG_INFINITY {
            out[c] = 0.0;
            continue;
        }
        let mut den = 0.0f32;
        let mut num = 0.0f32;
        for (v, s) in values.iter().zip(scores) {
            let e = (s[c] - mx).exp();
            den += e;
            num += e * v[c];
        }
        out[c] = num / den;
    }
}

/// SwiGLU with DeepSeek V4's asymmetric clamp and the routing weight applied
/// before the down projection: `h = silu(min(g, L)) · clamp(u, −L, L) · w`.
pub fn swiglu_clamped(g: &[f32], u: &[f32], limit: f32, w: f32, out: &mut [f32]) {
    for ((o, &gi), &ui) in out.iter_mut().zip(g).zip(u) {
        let (gi, ui) = if limit > 0.0 { (gi.min(limit), ui.clamp(-limit, limit)) } else { (gi, ui) };
        *o = silu(gi) * ui * w;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f32, b: f32, rel: f32) -> bool {
        (a - b).abs() <= rel * b.abs().max(1e-30)
    }

    #[test]
    fn yarn_reference_numbers() {
        // spec §3.5: θc = 160000, pair i -> ω_i (plain), ω'_i (YaRN)
        let y = Yarn { factor: 16.0, original_ctx: 65536.0, beta_fast: 32.0, beta_slow: 1.0 };
        let plain = Rope::new(64, 160000.0, None);
        let yarn = Rope::new(64, 160000.0, Some(y));
        let cases = [
            (0, 1.0, 1.0),
            (1, 0.6876560, 0.6876560),
            (15, 3.6355386e-3, 3.6355386e-3),
            (16, 2.5e-3, 2.265625e-3),
            (20, 5.5901699e-4, 2.9697778e-4),
            (24, 1.25e-4, 1.953125e-5),
            (25, 8.5957003e-5, 5.3723127e-6),
            (31, 9.0888465e-6, 5.6805290e-7),
        ];
        for (i, w, wy) in cases {
            assert!(close(plain.omega[i], w, 1e-5), "plain {i}: {} vs {w}", plain.omega[i]);
            assert!(close(yarn.omega[i], wy, 1e-5), "yarn {i}: {} vs {wy}", yarn.omega[i]);
        }
    }

    #[test]
    fn rope_inverse_roundtrip() {
        let r = Rope::new(64, 10000.0, None);
        let x0: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut x = x0.clone();
        r.apply(&mut x, 12345, false);
        assert!(x.iter().zip(&x0).any(|(a, b)| (a - b).abs() > 1e-3));
        r.apply(&mut x, 12345, true);
        for (a, b) in x.iter().zip(&x0) {
            assert!((a - b).abs() < 1e-5);
        }
    }

    #[test]
    fn fp8_reference_numbers() {
        // amax = 1.0 -> s = 2^-8; 0.3 -> 76.8 -> 80 -> 0.3125
        let mut v = vec![0.0f32; 64];
        v[0] = 1.0;
        v[1] = 0.3;
        fp8_sim_inplace(&mut v, 64);
        assert_eq!(v[0], 1.0);
        assert_eq!(v[1], 0.3125);
        // amax = 448·2^k exactly -> s = 2^k
        assert_eq!(pow2_ceil(448.0 * 4.0 / 448.0), 4.0);
        assert_eq!(pow2_ceil(3.0), 4.0);
        assert_eq!(pow2_ceil(0.25), 0.25);
        // subnormal e4m3 step 2^-9 and max 448
        assert_eq!(e4m3_round(448.0), 448.0);
        assert_eq!(e4m3_round(3.0 * 2f32.powi(-10)), 2f32.powi(-8)); // 1.5 steps -> tie -> even (2 steps)
        assert_eq!(e4m3_round(-17.0), -16.0); // step 2 in [16,32): 17 -> tie -> 16 (even)
        assert_eq!(e4m3_round(19.0), 20.0);
    }

    #[test]
    fn fp4_reference_numbers() {
        let mut v = vec![0.0f32; 32];
        v[0] = 1.0;
        v[1] = 0.3;
        v[2] = 0.625;
        v[3] = 0.875;
        fp4_sim_inplace(&mut v, 32);
        assert_eq!(v[0], 1.0);
        assert_eq!(v[1], 0.25);
        assert_eq!(v[2], 0.5);
        assert_eq!(v[3], 1.0);
        for (x, want) in [(0.25, 0.0), (0.75, 1.0), (1.25, 1.0), (1.75, 2.0), (2.5, 2.0), (3.5, 4.0), (5.0, 4.0), (-5.0, -4.0), (7.0, 6.0)] {
            assert_eq!(e2m1_round(x), want, "{x}");
        }
    }

    #[test]
    fn hadamard_matches_matrix() {
        let n = 16;
        let x: Vec<f32> = (0..n).map(|i| (i as f32 * 1.3).cos()).collect();
        let mut y = x.clone();
        hadamard_inplace(&mut y);
        for i in 0..n {
            let mut s = 0.0f32;
            for j in 0..n {
                let sign = if ((i & j) as u32).count_ones() % 2 == 0 { 1.0 } else { -1.0 };
                s += sign * x[j];
            }
            s /= (n as f32).sqrt();
            assert!((s - y[i]).abs() < 1e-5);
        }
    }

    #[test]
    fn sinkhorn_is_doubly_stochastic() {
        let m = 4;
        let mut c: Vec<f32> = (0..16).map(|i| ((i * 7) % 5) as f32 - 2.0).collect();
        sinkhorn(&mut c, m, 20, 1e-6);
        for k in 0..m {
            let col: f32 = (0..m).map(|j| c[j * m + k]).sum();
            assert!((col - 1.0).abs() < 1e-4);
            let row: f32 = c[k * m..(k + 1) * m].iter().sum();
            assert!((row - 1.0).abs() < 1e-3);
        }
    }

    #[test]
    fn topk_ties_lower_index() {
        let s = [1.0, 3.0, 3.0, 2.0, 3.0];
        assert_eq!(topk_desc(&s, 2), vec![1, 2]);
        assert_eq!(topk_desc(&s, 4), vec![1, 2, 4, 3]);
        assert_eq!(topk_desc(&s, 9), vec![1, 2, 4, 3, 0]);
    }

    #[test]
    fn sink_attention_sink_only_shrinks() {
        let q = [1.0f32, 0.0];
        let k1 = [1.0f32, 2.0];
        let keys: Vec<&[f32]> = vec![&k1];
        let mut o = [0.0f32; 2];
        sink_attention(&q, &keys, f32::NEG_INFINITY, 1.0, &mut o);
        assert_eq!(o, [1.0, 2.0]);
        sink_attention(&q, &keys, 1.0, 1.0, &mut o); // z = 1 = sink -> half
        assert!((o[0] - 0.5).abs() < 1e-6 && (o[1] - 1.0).abs() < 1e-6);
    }
}
