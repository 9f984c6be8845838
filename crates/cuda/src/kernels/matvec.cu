// Quantised matrix-vector products: y[t][r] = sum_c W[r][c] * x[t][c] for up to
// NT tokens, f32 activations against weights dequantised in registers, f32
// accumulation (the reference numerics). One warp per weight row; lanes take
// whole quant units (a Q8_0 block, a 64-value Q4_K chunk, a 32-value Q2_K run,
// an IQ2_XXS group) so every weight byte is read once per launch.
//
// Indexed (MoE) mode: blockIdx.y is a slot s; the weight matrix is expert
// eids[s] of a stack (expert_bytes apart), x is row s / x_group, y is row s.

#define T_F32 0
#define T_F16 1
#define T_BF16 2
#define T_Q8_0 3
#define T_Q2_K 4
#define T_Q4_K 5
#define T_IQ2_XXS 6

template <int NT>
__device__ __forceinline__ void fma_x(float (&acc)[NT], const float* x, int xs, int n, int idx, float w) {
#pragma unroll
    for (int t = 0; t < NT; t++)
        if (t < n) acc[t] += w * x[t * xs + idx];
}

template <int TY, int NT>
__device__ __forceinline__ void row_dot(const u8* wr, int cols, const float* x, int xs, int n, int lane, int nl, const u64* grid_tab, const u8* sign_tab, float (&acc)[NT]) {
    if (TY == T_F32) {
        const float* w = (const float*)wr;
        for (int c = lane * 4; c < cols; c += 4 * nl) {
            if (c + 3 < cols) {
                float4 v = *(const float4*)(w + c);
#pragma unroll
                for (int t = 0; t < NT; t++)
                    if (t < n) {
                        float4 xv = *(const float4*)(x + t * xs + c);
                        acc[t] += v.x * xv.x + v.y * xv.y + v.z * xv.z + v.w * xv.w;
                    }
            } else {
                for (int cc = c; cc < cols; cc++) fma_x<NT>(acc, x, xs, n, cc, w[cc]);
            }
        }
    } else if (TY == T_F16 || TY == T_BF16) {
        // 8 values (16 bytes) per unit when cols % 8 == 0 (checked on the host)
        for (int c = lane * 8; c < cols; c += 8 * nl) {
            uint4 v = *(const uint4*)(wr + 2 * c);
            u32 wv[4] = {v.x, v.y, v.z, v.w};
            float f[8];
#pragma unroll
            for (int i = 0; i < 4; i++) {
                u16 lo = (u16)(wv[i] & 0xffff), hi = (u16)(wv[i] >> 16);
                f[2 * i] = (TY == T_F16) ? h2f(lo) : bf2f(lo);
                f[2 * i + 1] = (TY == T_F16) ? h2f(hi) : bf2f(hi);
            }
#pragma unroll
            for (int t = 0; t < NT; t++)
                if (t < n) {
                    const float* xp = x + t * xs + c;
                    float4 a = *(const float4*)xp, b = *(const float4*)(xp + 4);
                    acc[t] += f[0] * a.x + f[1] * a.y + f[2] * a.z + f[3] * a.w + f[4] * b.x + f[5] * b.y + f[6] * b.z + f[7] * b.w;
                }
        }
    } else if (TY == T_Q8_0) {
        int nb = cols / 32;
        for (int b = lane; b < nb; b += nl) {
            const u8* blk = wr + b * 34;
            float d = h2f(ld16(blk));
            float q[32];
#pragma unroll
            for (int i = 0; i < 16; i++) {
                u16 v = ld16(blk + 2 + 2 * i);
                q[2 * i] = (float)(i8)(v & 0xff);
                q[2 * i + 1] = (float)(i8)(v >> 8);
            }
#pragma unroll
            for (int t = 0; t < NT; t++)
                if (t < n) {
                    const float* xp = x + t * xs + b * 32;
                    float s = 0.f;
#pragma unroll
                    for (int i = 0; i < 32; i += 4) {
                        float4 xv = *(const float4*)(xp + i);
                        s += q[i] * xv.x + q[i + 1] * xv.y + q[i + 2] * xv.z + q[i + 3] * xv.w;
                    }
                    acc[t] += d * s;
                }
        }
    } else if (TY == T_Q4_K) {
        int nu = cols / 64;  // 4 chunks of 64 per 256-block
        for (int u = lane; u < nu; u += nl) {
            int b = u >> 2, c = u & 3;
            const u8* blk = wr + b * 144;
            float d = h2f(ld16(blk)), dmin = h2f(ld16(blk + 2));
            const u8* S = blk + 4;
            int s0 = 2 * c, s1 = 2 * c + 1;
            int sc0, m0, sc1, m1;
            if (s0 < 4) { sc0 = S[s0] & 63; m0 = S[s0 + 4] & 63; }
            else { sc0 = (S[s0 + 4] & 15) | ((S[s0 - 4] >> 6) << 4); m0 = (S[s0 + 4] >> 4) | ((S[s0] >> 6) << 4); }
            if (s1 < 4) { sc1 = S[s1] & 63; m1 = S[s1 + 4] & 63; }
            else { sc1 = (S[s1 + 4] & 15) | ((S[s1 - 4] >> 6) << 4); m1 = (S[s1 + 4] >> 4) | ((S[s1] >> 6) << 4); }
            const uint4* qp = (const uint4*)(blk + 16 + 32 * c);
            uint4 qa = qp[0], qb = qp[1];
            u32 qw[8] = {qa.x, qa.y, qa.z, qa.w, qb.x, qb.y, qb.z, qb.w};
            float d0 = d * sc0, d1 = d * sc1, mm0 = dmin * m0, mm1 = dmin * m1;
#pragma unroll
            for (int t = 0; t < NT; t++)
                if (t < n) {
                    const float* xp = x + t * xs + b * 256 + 64 * c;
                    float slo = 0.f, shi = 0.f, xlo = 0.f, xhi = 0.f;
#pragma unroll
                    for (int i = 0; i < 8; i++) {
                        u32 w = qw[i];
                        float4 a = *(const float4*)(xp + 4 * i);
                        float4 h = *(const float4*)(xp + 32 + 4 * i);
                        slo += (float)(w & 15) * a.x + (float)((w >> 8) & 15) * a.y + (float)((w >> 16) & 15) * a.z + (float)((w >> 24) & 15) * a.w;
                        shi += (float)((w >> 4) & 15) * h.x + (float)((w >> 12) & 15) * h.y + (float)((w >> 20) & 15) * h.z + (float)((w >> 28) & 15) * h.w;
                        xlo += a.x + a.y + a.z + a.w;
                        xhi += h.x + h.y + h.z + h.w;
                    }
                    acc[t] += d0 * slo - mm0 * xlo + d1 * shi - mm1 * xhi;
                }
        }
    } else if (TY == T_Q2_K) {
        int nu = cols / 32;  // 8 runs of 32 per 256-block: (half h, shift j)
        for (int u = lane; u < nu; u += nl) {
            int b = u >> 3, r = u & 7, h = r >> 2, j = r & 3;
            const u8* blk = wr + b * 84;
            float d = h2f(ld16(blk + 80)), dmin = h2f(ld16(blk + 82));
            int s0 = 8 * h + 2 * j;  // sub-blocks s0 (l < 16) and s0 + 1
            float dA = d * (blk[s0] & 15), mA = dmin * (blk[s0] >> 4);
            float dB = d * (blk[s0 + 1] & 15), mB = dmin * (blk[s0 + 1] >> 4);
            const u32* qp = (const u32*)(blk + 16 + 32 * h);
            u32 qw[8];
#pragma unroll
            for (int i = 0; i < 8; i++) qw[i] = qp[i];
            int sh = 2 * j;
#pragma unroll
            for (int t = 0; t < NT; t++)
                if (t < n) {
                    const float* xp = x + t * xs + b * 256 + 128 * h + 32 * j;
                    float sA = 0.f, sB = 0.f, xA = 0.f, xB = 0.f;
#pragma unroll
                    for (int i = 0; i < 8; i++) {
                        u32 w = qw[i] >> sh;
                        float4 a = *(const float4*)(xp + 4 * i);
                        float p = (float)(w & 3) * a.x + (float)((w >> 8) & 3) * a.y + (float)((w >> 16) & 3) * a.z + (float)((w >> 24) & 3) * a.w;
                        float xsum = a.x + a.y + a.z + a.w;
                        if (i < 4) { sA += p; xA += xsum; } else { sB += p; xB += xsum; }
                    }
                    acc[t] += dA * sA - mA * xA + dB * sB - mB * xB;
                }
        }
    } else if (TY == T_IQ2_XXS) {
        int nu = cols / 32;  // 8 groups of 32 per 256-block
        for (int u = lane; u < nu; u += nl) {
            int b = u >> 3, g = u & 7;
            const u8* blk = wr + b * 66;
            float d = h2f(ld16(blk));
            const u8* q = blk + 2 + 8 * g;
            u32 a0 = (u32)ld16(q) | ((u32)ld16(q + 2) << 16);
            u32 a1 = (u32)ld16(q + 4) | ((u32)ld16(q + 6) << 16);
            float db = d * (0.5f + (float)(a1 >> 28)) * 0.25f;
            float v[32];
#pragma unroll
            for (int k = 0; k < 4; k++) {
                u64 grid = grid_tab[(a0 >> (8 * k)) & 255];
                u32 signs = sign_tab[(a1 >> (7 * k)) & 127];
#pragma unroll
                for (int m = 0; m < 8; m++) {
                    float mag = (float)((grid >> (8 * m)) & 255);
                    v[8 * k + m] = ((signs >> m) & 1) ? -mag : mag;
                }
            }
#pragma unroll
            for (int t = 0; t < NT; t++)
                if (t < n) {
                    const float* xp = x + t * xs + b * 256 + 32 * g;
                    float s = 0.f;
#pragma unroll
                    for (int i = 0; i < 32; i += 4) {
                        float4 xv = *(const float4*)(xp + i);
                        s += v[i] * xv.x + v[i + 1] * xv.y + v[i + 2] * xv.z + v[i + 3] * xv.w;
                    }
                    acc[t] += db * s;
                }
        }
    }
}

template <int TY, int NT>
__device__ __forceinline__ void mv_body(const u8* W, u64 row_bytes, int rows, int cols, const float* x, int xs, float* y, int ys, int n,
                                        const int* eids, u64 expert_bytes, int x_group) {
    // IQ2 tables staged in shared memory: lanes index them randomly, which
    // constant memory would serialise
    __shared__ u64 grid_tab[TY == T_IQ2_XXS ? 256 : 1];
    __shared__ u8 sign_tab[TY == T_IQ2_XXS ? 128 : 1];
    if (TY == T_IQ2_XXS) {
        for (int i = threadIdx.x; i < 256; i += blockDim.x) grid_tab[i] = IQ2XXS_GRID[i];
        for (int i = threadIdx.x; i < 128; i += blockDim.x) sign_tab[i] = KSIGNS_IQ2XS[i];
        __syncthreads();
    }
    int lane = threadIdx.x & 31;
    int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;
    if (eids) {
        int s = blockIdx.y;
        W += (u64)eids[s] * expert_bytes;
        x += (u64)(s / x_group) * xs;
        y += (u64)s * ys;
    }
    const u8* wr = W + (u64)row * row_bytes;
    float acc[NT];
#pragma unroll
    for (int t = 0; t < NT; t++) acc[t] = 0.f;
    row_dot<TY, NT>(wr, cols, x, xs, n, lane, 32, grid_tab, sign_tab, acc);
#pragma unroll
    for (int t = 0; t < NT; t++) {
        float v = warp_sum(acc[t]);
        if (lane == 0 && t < n) y[(u64)t * ys + row] = v;
    }
}

// Split-K variant: one block (256 threads) per row, partial sums reduced in
// shared memory. For matrices with few long rows (HC mixes, router, small
// projections), where one warp per row leaves most of the GPU idle.
template <int TY, int NT>
__device__ __forceinline__ void mvk_body(const u8* W, u64 row_bytes, int rows, int cols, const float* x, int xs, float* y, int ys, int n,
                                         const int* eids, u64 expert_bytes, int x_group) {
    __shared__ u64 grid_tab[TY == T_IQ2_XXS ? 256 : 1];
    __shared__ u8 sign_tab[TY == T_IQ2_XXS ? 128 : 1];
    __shared__ float red[NT][8];
    if (TY == T_IQ2_XXS) {
        for (int i = threadIdx.x; i < 256; i += blockDim.x) grid_tab[i] = IQ2XXS_GRID[i];
        for (int i = threadIdx.x; i < 128; i += blockDim.x) sign_tab[i] = KSIGNS_IQ2XS[i];
        __syncthreads();
    }
    int row = blockIdx.x;
    if (eids) {
        int s = blockIdx.y;
        W += (u64)eids[s] * expert_bytes;
        x += (u64)(s / x_group) * xs;
        y += (u64)s * ys;
    }
    const u8* wr = W + (u64)row * row_bytes;
    float acc[NT];
#pragma unroll
    for (int t = 0; t < NT; t++) acc[t] = 0.f;
    row_dot<TY, NT>(wr, cols, x, xs, n, threadIdx.x, blockDim.x, grid_tab, sign_tab, acc);
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
#pragma unroll
    for (int t = 0; t < NT; t++) {
        float v = warp_sum(acc[t]);
        if (lane == 0) red[t][w] = v;
    }
    __syncthreads();
    if (threadIdx.x < 32) {
#pragma unroll
        for (int t = 0; t < NT; t++) {
            float v = (lane < (int)(blockDim.x >> 5)) ? red[t][lane] : 0.f;
            v = warp_sum(v);
            if (lane == 0 && t < n) y[(u64)t * ys + row] = v;
        }
    }
}

#define MV_KERNEL(NAME, TY, NT)                                                                                              \
    extern "C" __global__ void NAME(const u8* W, u64 row_bytes, int rows, int cols, const float* x, int xs, float* y, int ys, \
                                    int n, const int* eids, u64 expert_bytes, int x_group) {                                  \
        mv_body<TY, NT>(W, row_bytes, rows, cols, x, xs, y, ys, n, eids, expert_bytes, x_group);                              \
    }
#define MVK_KERNEL(NAME, TY, NT)                                                                                              \
    extern "C" __global__ void NAME(const u8* W, u64 row_bytes, int rows, int cols, const float* x, int xs, float* y, int ys, \
                                    int n, const int* eids, u64 expert_bytes, int x_group) {                                  \
        mvk_body<TY, NT>(W, row_bytes, rows, cols, x, xs, y, ys, n, eids, expert_bytes, x_group);                             \
    }
#define MV_TYPE(SUFFIX, TY)                                                                                                       \
    MV_KERNEL(mv_##SUFFIX##_1, TY, 1) MV_KERNEL(mv_##SUFFIX##_2, TY, 2) MV_KERNEL(mv_##SUFFIX##_4, TY, 4) MV_KERNEL(mv_##SUFFIX##_8, TY, 8) \
    MVK_KERNEL(mvk_##SUFFIX##_1, TY, 1) MVK_KERNEL(mvk_##SUFFIX##_2, TY, 2) MVK_KERNEL(mvk_##SUFFIX##_4, TY, 4) MVK_KERNEL(mvk_##SUFFIX##_8, TY, 8)

MV_TYPE(f32, T_F32)
MV_TYPE(f16, T_F16)
MV_TYPE(bf16, T_BF16)
MV_TYPE(q8_0, T_Q8_0)
MV_TYPE(q2_k, T_Q2_K)
MV_TYPE(q4_k, T_Q4_K)
MV_TYPE(iq2_xxs, T_IQ2_XXS)
