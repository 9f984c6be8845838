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
extern "C" __global__ void rmsnorm_rows(float* x, const float* w, int d, float eps, i8* q0, float* d0, i8* qk, float* dk) {
    __shared__ float sh[32];
    float* r = x + (u64)blockIdx.x * d;
    float ss = 0.f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) ss += r[i] * r[i];
    ss = block_sum(ss, sh);
    float inv = 1.f / sqrtf(ss / (float)d + eps);
    for (int base = 0; base < d; base += blockDim.x) {
        int i = base + threadIdx.x;
        bool ok = i < d;
        float v = ok ? r[i] * inv * (w ? w[i] : 1.f) : 0.f;
        if (ok) r[i] = v;
        if (q0 || qk) quant_vals(v, ok, (u64)blockIdx.x * d + i, q0, d0, qk, dk);
    }
}

// values per thread of the HC kernels (d <= HC_VPT * blockDim) and most
// streams held in registers (m <= HC_M; both checked on the host)
#define HC_VPT 4
#define HC_M 4

// HcPre tail: from the (2+m)m mixes (fn . x, already computed) to the
// normalised sub-block input a[t] and the post/comb weights hw[t] (m + m*m).
extern "C" __global__ void __launch_bounds__(1024) hc_pre(const float* x, const float* mixes, const float* scale, const float* base,
                                  const float* norm_w, int d, int m, int iters, float hc_eps, float rms_eps,
                                  float* a, float* hw, i8* q0, float* d0, i8* qk, float* dk) {
    __shared__ float sh[32];
    __shared__ float pre[16], mix[96], comb[64];
    int t = blockIdx.x;
    const float* xt = x + (u64)t * m * d;
    int md = m * d, nmix = (2 + m) * m;
    // the token's m x d state in registers (d <= HC_VPT * blockDim, m <=
    // HC_M, checked on the host): every load is issued up front, one memory
    // round trip instead of one per loop iteration, and read once for both
    // the norm and the collapse
    float xr[HC_M][HC_VPT];
    float ss = 0.f;
#pragma unroll
    for (int j = 0; j < HC_M; j++)
#pragma unroll
        for (int v = 0; v < HC_VPT; v++) {
            int i = threadIdx.x + v * blockDim.x;
            xr[j][v] = (j < m && i < d) ? xt[(u64)j * d + i] : 0.f;
        }
#pragma unroll
    for (int j = 0; j < HC_M; j++)
#pragma unroll
        for (int v = 0; v < HC_VPT; v++) ss += xr[j][v] * xr[j][v];
    ss = block_sum(ss, sh);
    float r = 1.f / sqrtf(ss / (float)md + rms_eps);
    float* out = hw + (u64)t * (m + m * m);
    if (m == 4) {
        // warp 0: lanes 0..15 hold comb[j][k] (j = lane / 4, k = lane % 4); row
        // sums are xor-shuffles over 1, 2 and column sums over 4, 8
        if (threadIdx.x < 32) {
            int l = threadIdx.x;
            const float* mx_in = mixes + (u64)t * nmix;
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
            c = e / s + hc_eps;
            for (int it = 0; it < iters; it++) {
                if (it > 0) {
                    float rs = c + __shfl_xor_sync(0xffffffffu, c, 1);
                    rs += __shfl_xor_sync(0xffffffffu, rs, 2);
                    c = c / (rs + hc_eps);
                }
                float cs = c + __shfl_xor_sync(0xffffffffu, c, 4);
                cs += __shfl_xor_sync(0xffffffffu, cs, 8);
                c = c / (cs + hc_eps);
            }
            if (valid) out[4 + l] = c;
        }
    } else if (threadIdx.x == 0) {
        for (int i = 0; i < nmix; i++) mix[i] = mixes[(u64)t * nmix + i] * r;
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
    __syncthreads();
    float* at = a + (u64)t * d;
    float av[HC_VPT];
    float ss2 = 0.f;
#pragma unroll
    for (int v = 0; v < HC_VPT; v++) {
        float acc = 0.f;
#pragma unroll
        for (int j = 0; j < HC_M; j++)
            if (j < m) acc += pre[j] * xr[j][v];
        av[v] = acc;
        ss2 += acc * acc;
    }
    ss2 = block_sum(ss2, sh);
    float inv = 1.f / sqrtf(ss2 / (float)d + rms_eps);
#pragma unroll
    for (int v = 0; v < HC_VPT; v++) {
        int i = threadIdx.x + v * blockDim.x;
        bool ok = i < d;
        float val = ok ? av[v] * inv * norm_w[i] : 0.f;
        if (ok) at[i] = val;
        // uniform: a whole warp (256-group) is in or out of [0, d)
        if ((q0 || qk) && v * (int)blockDim.x < d) quant_vals(val, ok, (u64)t * d + i, q0, d0, qk, dk);
    }
}

// HcPost in place: x[t][k] = post[k] f[t] + sum_j comb[j][k] x[t][j].
// All loads first (d <= HC_VPT * blockDim): in-place stores would otherwise
// keep the compiler from overlapping one iteration's loads with the next.
extern "C" __global__ void __launch_bounds__(1024) hc_post(float* x, const float* f, const float* hw, int d, int m) {
    int t = blockIdx.x;
    const float* w = hw + (u64)t * (m + m * m);
    float* xt = x + (u64)t * m * d;
    float r[HC_M][HC_VPT], fi[HC_VPT];
#pragma unroll
    for (int v = 0; v < HC_VPT; v++) {
        int i = threadIdx.x + v * blockDim.x;
        fi[v] = (i < d) ? f[(u64)t * d + i] : 0.f;
#pragma unroll
        for (int j = 0; j < HC_M; j++) r[j][v] = (j < m && i < d) ? xt[(u64)j * d + i] : 0.f;
    }
    float wp[HC_M], wc[HC_M][HC_M];
#pragma unroll
    for (int k = 0; k < HC_M; k++) {
        wp[k] = (k < m) ? w[k] : 0.f;
#pragma unroll
        for (int j = 0; j < HC_M; j++) wc[j][k] = (j < m && k < m) ? w[m + j * m + k] : 0.f;
    }
#pragma unroll
    for (int v = 0; v < HC_VPT; v++) {
        int i = threadIdx.x + v * blockDim.x;
        if (i >= d) continue;
#pragma unroll
        for (int k = 0; k < HC_M; k++) {
            if (k >= m) continue;
            float o = wp[k] * fi[v];
#pragma unroll
            for (int j = 0; j < HC_M; j++)
                if (j < m) o += wc[j][k] * r[j][v];
            xt[(u64)k * d + i] = o;
        }
    }
}

// HcHead + final RMSNorm: y[t] = RMSNorm(sum_j w_j X[j], norm), w from m mixes.
extern "C" __global__ void hc_head(const float* x, const float* mixes, const float* scale, const float* base,
                                   const float* norm_w, int d, int m, float hc_eps, float rms_eps, float* y) {
    __shared__ float sh[32];
    __shared__ float w[16];
    int t = blockIdx.x;
    const float* xt = x + (u64)t * m * d;
    int md = m * d;
    float ss = 0.f;
    for (int i = threadIdx.x; i < md; i += blockDim.x) ss += xt[i] * xt[i];
    ss = block_sum(ss, sh);
    float r = 1.f / sqrtf(ss / (float)md + rms_eps);
    if (threadIdx.x < m) {
        float mx = mixes[(u64)t * m + threadIdx.x] * r;
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
