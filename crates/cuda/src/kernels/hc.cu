// Hyper-connections, norms and embedding (spec §5, §0). One block per token.

// x[t][j][:] = embed[tok[t]] for all M streams. type: 0 f32, 1 f16, 2 bf16.
extern "C" __global__ void embed_rows(const u8* E, int type, const int* tok, int d, int m, float* x) {
    int t = blockIdx.x;
    u64 row = (u64)tok[t];
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float v;
        if (type == 0) v = ((const float*)E)[row * d + i];
        else if (type == 1) v = h2f(((const u16*)E)[row * d + i]);
        else v = bf2f(((const u16*)E)[row * d + i]);
        for (int j = 0; j < m; j++) x[((u64)t * m + j) * d + i] = v;
    }
}

// In-place RMSNorm of `rows` rows of width d; w may be null (unweighted).
// With q0 / qk set, the result is also written in 8-bit form (quant_vals).
// One block per row (in place: a second block of the row would read values
// this one already normalised).
extern "C" __global__ void rmsnorm_rows(float* x, const float* w, int d, float eps, i8* q0, float* d0, i8* qk, float* dk) {
    __shared__ float sh[32];
    float* r = x + (u64)blockIdx.x * d;
    float ss = 0.f;
#pragma unroll 4
    for (int i = threadIdx.x; i < d; i += blockDim.x) ss += r[i] * r[i];
    ss = block_sum(ss, sh);
    float inv = 1.f / sqrtf(ss / (float)d + eps);
    for (int b0 = 0; b0 < d; b0 += blockDim.x) {
        int i = b0 + threadIdx.x;
        bool ok = i < d;
        float v = ok ? r[i] * inv * (w ? w[i] : 1.f) : 0.f;
        if (ok) r[i] = v;
        if (q0 || qk) quant_vals(v, ok, (u64)blockIdx.x * d + i, q0, d0, qk, dk);
    }
}

// This thread's share of sum(p[i]^2), i < n: loads in batches of 8 per
// thread, all issued before they are used. (A plain strided loop compiled to
// load-use pairs: one L2 round trip per iteration, 64 in a row, which was
// most of hc_pre's time.)
__device__ __forceinline__ float sumsq_batched(const float* p, int n) {
    float ss = 0.f;
    for (int b0 = 0; b0 < n; b0 += 8 * blockDim.x) {
        float v[8];
#pragma unroll
        for (int k = 0; k < 8; k++) {
            int i = b0 + k * blockDim.x + threadIdx.x;
            v[k] = (i < n) ? p[i] : 0.f;
        }
#pragma unroll
        for (int k = 0; k < 8; k++) ss += v[k] * v[k];
    }
    return ss;
}

// HC kernels spread one token over gridDim.y blocks (a column slice each):
// one block per token put all of a decode step's HC work (and the 8-bit
// quantisation) on a single SM, which made these the slowest small kernels.

// HcPre tail: from the (2+m)m mixes (fn . x, already computed) to the
// normalised sub-block input a[t] and the post/comb weights hw[t] (m + m*m).
// Grid (tokens, 1) or (tokens, 1 + slices): block 0 computes the HC weights,
// block 1 + s writes (and quantises) columns [s*cs, (s+1)*cs), cs = d / slices
// (a multiple of 256); with one block it does both.
// Both norms need all columns: every block accumulates the m x m Gram matrix
// G[j][k] = sum_i x_j[i] x_k[i] in one pass (sum x^2 = trace G, and the norm
// of a = sum_j pre_j x_j is pre^T G pre), so no block computes the collapse of
// columns it does not own. m <= 4 (checked on the host).
extern "C" __global__ void hc_pre(const float* x, const float* mixes, const float* scale, const float* base,
                                  const float* norm_w, int d, int m, int iters, float hc_eps, float rms_eps,
                                  float* a, float* hw, i8* q0, float* d0, i8* qk, float* dk, int nparts, int pstride,
                                  const float* gp, int gparts, int part) {
    __shared__ float sh[32];
    __shared__ float gsh[32][10];
    __shared__ float pre[16], mix[96], comb[64], msum[96];
    int t = blockIdx.x;
    const float* xt = x + (u64)t * m * d;
    int md = m * d, nmix = (2 + m) * m;
    // the mixes arrive as nparts partial sums (split-K products), added in order
    if (threadIdx.x < nmix) {
        float v = 0.f;
        for (int p = 0; p < nparts; p++) v += mixes[(u64)p * pstride + (u64)t * nmix + threadIdx.x];
        msum[threadIdx.x] = v;
    }
    // G: the per-block parts hc_post left in gp (when it wrote this x), added
    // in order; else over all columns, 4 columns x m streams of loads in flight
    // per thread
    if (gp) {
        __shared__ float gpsh[32 * 10];  // gparts <= 32 (checked on the host)
        for (int i = threadIdx.x; i < gparts * 10; i += blockDim.x) gpsh[i] = gp[(u64)t * gparts * 10 + i];
        __syncthreads();
        if (threadIdx.x < 10) {
            float v = 0.f;
            for (int p = 0; p < gparts; p++) v += gpsh[p * 10 + threadIdx.x];
            gsh[0][threadIdx.x] = v;
        }
        __syncthreads();
    } else {
        float g[10];
#pragma unroll
        for (int q = 0; q < 10; q++) g[q] = 0.f;
        for (int b0 = 0; b0 < d; b0 += 4 * blockDim.x) {
            float xv[4][4];
#pragma unroll
            for (int k = 0; k < 4; k++) {
                int i = b0 + k * blockDim.x + threadIdx.x;
#pragma unroll
                for (int j = 0; j < 4; j++) xv[k][j] = (j < m && i < d) ? xt[(u64)j * d + i] : 0.f;
            }
#pragma unroll
            for (int k = 0; k < 4; k++) {
                int q = 0;
#pragma unroll
                for (int j = 0; j < 4; j++)
#pragma unroll
                    for (int l = j; l < 4; l++) g[q++] += xv[k][j] * xv[k][l];
            }
        }
        int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
        for (int q = 0; q < 10; q++) {
            float v = warp_sum(g[q]);
            if (lane == 0) gsh[w][q] = v;
        }
        __syncthreads();
        if (threadIdx.x < 10) {
            float v = 0.f;
            for (int ww = 0; ww < nw; ww++) v += gsh[ww][threadIdx.x];
            gsh[0][threadIdx.x] = v;
        }
        __syncthreads();
    }
    float G[4][4];
    {
        int q = 0;
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int l = j; l < 4; l++) { G[j][l] = gsh[0][q]; G[l][j] = gsh[0][q]; q++; }
    }
    float ss = 0.f;
#pragma unroll
    for (int j = 0; j < 4; j++)
        if (j < m) ss += G[j][j];
    float r = 1.f / sqrtf(ss / (float)md + rms_eps);
    float* out = hw + (u64)t * (m + m * m);
    // With gridDim.y > 1, block 0 of a token only computes the HC weights
    // (the Sinkhorn's long dependent chain then runs beside the slices
    // instead of before block 0's slice); blocks 1.. own the column slices.
    // part 1: only the slices (block y = slice y; the weights are launched
    // separately, beside the layer's critical path, as part 2: one block per
    // token, weights only; nothing reads them before hc_post)
    bool comb_block = part == 2 || (part == 0 && blockIdx.y == 0);
    bool slice_block = part == 1 || (part == 0 && (gridDim.y == 1 || blockIdx.y > 0));
    if (!comb_block) {
        // slices only need `pre`
        if (threadIdx.x < m) {
            const float* mx_in = msum;
            pre[threadIdx.x] = 1.f / (1.f + expf(-(mx_in[threadIdx.x] * r * scale[0] + base[threadIdx.x]))) + hc_eps;
        }
    } else if (m == 4) {
        // warp 0: lanes 0..15 hold comb[j][k] (j = lane / 4, k = lane % 4); row
        // sums are xor-shuffles over 1, 2 and column sums over 4, 8
        if (threadIdx.x < 32) {
            int l = threadIdx.x;
            const float* mx_in = msum;
            if (l < 4) {
                pre[l] = 1.f / (1.f + expf(-(mx_in[l] * r * scale[0] + base[l]))) + hc_eps;
                out[l] = 2.f / (1.f + expf(-(mx_in[4 + l] * r * scale[1] + base[4 + l])));
            }
            bool valid = l < 16;
            float c = valid ? mx_in[8 + l] * r * scale[2] + base[8 + l] : 0.f;
            float mx = fmaxf(c, __shfl_xor_sync(0xffffffffu, c, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            float e = expf(c - mx);
            float s = e + __shfl_xor_sync(0xffffffffu, e, 1);
            s += __shfl_xor_sync(0xffffffffu, s, 2);
            // The iterations are one long dependent chain on one warp while the
            // block waits: multiply by a correctly rounded reciprocal (a short
            // MUFU + refinement sequence) instead of a full IEEE division
            // (within 1 ulp of c / s; the kernel test holds it to the CPU).
            c = e * __frcp_rn(s) + hc_eps;
            for (int it = 0; it < iters; it++) {
                if (it > 0) {
                    float rs = c + __shfl_xor_sync(0xffffffffu, c, 1);
                    rs += __shfl_xor_sync(0xffffffffu, rs, 2);
                    c = c * __frcp_rn(rs + hc_eps);
                }
                float cs = c + __shfl_xor_sync(0xffffffffu, c, 4);
                cs += __shfl_xor_sync(0xffffffffu, cs, 8);
                c = c * __frcp_rn(cs + hc_eps);
            }
            if (valid) out[4 + l] = c;
        }
    } else if (threadIdx.x == 0) {
        for (int i = 0; i < nmix; i++) mix[i] = msum[i] * r;
        for (int j = 0; j < m; j++) {
            pre[j] = 1.f / (1.f + expf(-(mix[j] * scale[0] + base[j]))) + hc_eps;
            out[j] = 2.f / (1.f + expf(-(mix[m + j] * scale[1] + base[m + j])));
        }
        for (int i = 0; i < m * m; i++) comb[i] = mix[2 * m + i] * scale[2] + base[2 * m + i];
        // Sinkhorn: row softmax + eps, column normalise, then (iters-1) x (row, column)
        for (int j = 0; j < m; j++) {
            float mx = NEG_INF;
            for (int k = 0; k < m; k++) mx = fmaxf(mx, comb[j * m + k]);
            float s = 0.f;
            for (int k = 0; k < m; k++) { comb[j * m + k] = expf(comb[j * m + k] - mx); s += comb[j * m + k]; }
            for (int k = 0; k < m; k++) comb[j * m + k] = comb[j * m + k] / s + hc_eps;
        }
        for (int it = 0; it < iters; it++) {
            if (it > 0) {
                for (int j = 0; j < m; j++) {
                    float s = 0.f;
                    for (int k = 0; k < m; k++) s += comb[j * m + k];
                    for (int k = 0; k < m; k++) comb[j * m + k] /= s + hc_eps;
                }
            }
            for (int k = 0; k < m; k++) {
                float s = 0.f;
                for (int j = 0; j < m; j++) s += comb[j * m + k];
                for (int j = 0; j < m; j++) comb[j * m + k] /= s + hc_eps;
            }
        }
        for (int i = 0; i < m * m; i++) out[m + i] = comb[i];
    }
    if (!slice_block) return;  // the whole block: no barrier follows for it
    __syncthreads();
    float* at = a + (u64)t * d;
    int nsl = part == 1 ? gridDim.y : gridDim.y == 1 ? 1 : gridDim.y - 1;
    int cs = d / nsl, c0 = (part == 1 ? blockIdx.y : gridDim.y == 1 ? 0 : blockIdx.y - 1) * cs;
    float ss2 = 0.f;
#pragma unroll
    for (int j = 0; j < 4; j++)
#pragma unroll
        for (int l = 0; l < 4; l++)
            if (j < m && l < m) ss2 += pre[j] * pre[l] * G[j][l];
    float inv = 1.f / sqrtf(ss2 / (float)d + rms_eps);
    for (int b0 = c0; b0 < c0 + cs; b0 += blockDim.x) {
        int i = b0 + threadIdx.x;
        bool ok = i < c0 + cs;
        float val = 0.f;
        if (ok) {
            float xv[4];
#pragma unroll
            for (int j = 0; j < 4; j++) xv[j] = (j < m) ? xt[(u64)j * d + i] : 0.f;
            float v = 0.f;
#pragma unroll
            for (int j = 0; j < 4; j++)
                if (j < m) v += pre[j] * xv[j];
            val = v * inv * norm_w[i];
            at[i] = val;
        }
        if (q0 || qk) quant_vals(val, ok, (u64)t * d + i, q0, d0, qk, dk);
    }
}

// HcPost in place: x[t][k] = post[k] f[t] + sum_j comb[j][k] x[t][j].
// Grid (tokens, ceil(d / blockDim)): one column per thread, all its loads
// independent.
// yk (may be null): f is the MoE output, reduced here as moe_reduce does it
// (f = sum_j yk[row_j] + ysh, rows t*k + j or pos[t*k + j]) instead of in a
// separate kernel.
// fnw (may be null): the next HC's mix weights (F16, frows rows of m*d): the
// block also writes its part of their products with the new state,
// mixp[(blockIdx.y * gridDim.x + t) * frows + r], which the next hc_pre or
// hc_head adds in order (the separate mixes matvec is skipped).
extern "C" __global__ void hc_post(float* x, const float* f, const float* hw, int d, int m, float* gp,
                                   const float* yk, const float* ysh, int k, const int* pos,
                                   const u16* fnw, int frows, float* mixp) {
    __shared__ float msh[8][32];
    // gp (may be null): this block's part of the new state's Gram matrix,
    // gp[(t * gridDim.y + blockIdx.y) * 10 + q] over its columns (m <= 4), so
    // the next hc_pre need not read the whole state again for its norms
    __shared__ float gsh[32][10];
    int t = blockIdx.x;
    int i = blockIdx.y * blockDim.x + threadIdx.x;
    bool ok = i < d;
    const float* w = hw + (u64)t * (m + m * m);
    float* xt = x + (u64)t * m * d;
    float r[8], o[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int j = 0; j < 8; j++) r[j] = (ok && j < m) ? xt[(u64)j * d + i] : 0.f;
    float fi = 0.f;
    if (ok && yk) {
        float v[16];
#pragma unroll
        for (int j = 0; j < 16; j++) {
            u64 row = (j < k) ? (pos ? (u64)pos[(u64)t * k + j] : (u64)t * k + j) : 0;
            v[j] = (j < k) ? yk[row * d + i] : 0.f;
        }
        float acc = 0.f;
#pragma unroll
        for (int j = 0; j < 16; j++)
            if (j < k) acc += v[j];
        if (ysh) acc += ysh[(u64)t * d + i];
        fi = acc;
    } else if (ok) {
        fi = f[(u64)t * d + i];
    }
    for (int k = 0; k < m; k++) {
        float v = w[k] * fi;
#pragma unroll
        for (int j = 0; j < 8; j++)
            if (j < m) v += w[m + j * m + k] * r[j];
        if (ok) xt[(u64)k * d + i] = v;
        if (k < 4) o[k] = ok ? v : 0.f;
    }
    int lane = threadIdx.x & 31, wp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    if (fnw) {
        // blockDim 256 (8 warps), frows <= 32
        // 8 rows at a time, their weight loads issued together
        int md = m * d;
        for (int r0 = 0; r0 < frows; r0 += 8) {
            u16 wv[8][4];
#pragma unroll
            for (int rr = 0; rr < 8; rr++)
#pragma unroll
                for (int kk = 0; kk < 4; kk++) wv[rr][kk] = (ok && r0 + rr < frows && kk < m) ? fnw[(u64)(r0 + rr) * md + (u64)kk * d + i] : (u16)0;
#pragma unroll
            for (int rr = 0; rr < 8; rr++) {
                float pv = 0.f;
#pragma unroll
                for (int kk = 0; kk < 4; kk++)
                    if (kk < m) pv += h2f(wv[rr][kk]) * o[kk];
                pv = warp_sum(pv);
                if (lane == 0 && r0 + rr < frows) msh[wp][r0 + rr] = pv;
            }
        }
        __syncthreads();
        if (threadIdx.x < frows) {
            float v = 0.f;
            for (int w = 0; w < nw; w++) v += msh[w][threadIdx.x];
            mixp[((u64)blockIdx.y * gridDim.x + t) * frows + threadIdx.x] = v;
        }
        __syncthreads();
    }
    if (!gp) return;
    int q = 0;
#pragma unroll
    for (int j = 0; j < 4; j++)
#pragma unroll
        for (int l = j; l < 4; l++) {
            float v = warp_sum(o[j] * o[l]);
            if (lane == 0) gsh[wp][q] = v;
            q++;
        }
    __syncthreads();
    if (threadIdx.x < 10) {
        float v = 0.f;
        for (int ww = 0; ww < nw; ww++) v += gsh[ww][threadIdx.x];
        gp[((u64)t * gridDim.y + blockIdx.y) * 10 + threadIdx.x] = v;
    }
}

// HcHead + final RMSNorm: y[t] = RMSNorm(sum_j w_j X[j], norm), w from m mixes.
extern "C" __global__ void hc_head(const float* x, const float* mixes, const float* scale, const float* base,
                                   const float* norm_w, int d, int m, float hc_eps, float rms_eps, float* y, int nparts, int pstride) {
    __shared__ float sh[32];
    __shared__ float w[16];
    int t = blockIdx.x;
    const float* xt = x + (u64)t * m * d;
    int md = m * d;
    float ss = block_sum(sumsq_batched(xt, md), sh);
    float r = 1.f / sqrtf(ss / (float)md + rms_eps);
    if (threadIdx.x < m) {
        float mv = 0.f;
        for (int p = 0; p < nparts; p++) mv += mixes[(u64)p * pstride + (u64)t * m + threadIdx.x];
        float mx = mv * r;
        w[threadIdx.x] = 1.f / (1.f + expf(-(mx * scale[0] + base[threadIdx.x]))) + hc_eps;
    }
    __syncthreads();
    float* yt = y + (u64)t * d;
    float ss2 = 0.f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float v = 0.f;
        for (int j = 0; j < m; j++) v += w[j] * xt[(u64)j * d + i];
        yt[i] = v;
        ss2 += v * v;
    }
    ss2 = block_sum(ss2, sh);
    float inv = 1.f / sqrtf(ss2 / (float)d + rms_eps);
    for (int i = threadIdx.x; i < d; i += blockDim.x) yt[i] = yt[i] * inv * norm_w[i];
}

// MTP input: x[j] = pe + ph[j] (e_proj broadcast over streams).
extern "C" __global__ void mtp_combine(const float* pe, const float* ph, int d, int m, float* x) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < m * d; i += gridDim.x * blockDim.x) x[i] = pe[i % d] + ph[i];
}
