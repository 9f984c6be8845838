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

// Lane-interleaved mapping: in each iteration a warp covers one contiguous
// chunk of the row (128 values for Q8_0, one 256-value block for the K/IQ
// formats) and lane l takes its 4 or 8 consecutive values, so the x loads of a
// warp are one contiguous 512 B / 1 KB run and the weight bytes of neighbouring
// lanes are neighbours too. Chunks c0, c0+cs, ... belong to this warp.
// Byte -> float without the quarter-rate I2F unit: place the byte in the low
// mantissa of 2^23 (one PRMT) and subtract 2^23 (one FADD); exact for 0..255.
// PRMT selector: result byte0 = x.byte[i], bytes 1-2 = 0, byte3 = 0x4B.
__device__ __forceinline__ float ubyte_f(u32 w, int i) {
    return __int_as_float(__byte_perm(w, 0x4B000000u, 0x7540u + i)) - 8388608.0f;
}

template <int NT>
__device__ __forceinline__ void fma8(float (&acc)[NT], const float* x, int xs, int n, int e0, const float (&v)[8]) {
#pragma unroll
    for (int t = 0; t < NT; t++)
        if (t < n) {
            const float* xp = x + t * xs + e0;
            float4 a = *(const float4*)xp, b = *(const float4*)(xp + 4);
            acc[t] += v[0] * a.x + v[1] * a.y + v[2] * a.z + v[3] * a.w + v[4] * b.x + v[5] * b.y + v[6] * b.z + v[7] * b.w;
        }
}

template <int TY, int NT>
__device__ __forceinline__ void row_dot(const u8* wr, int cols, const float* x, int xs, int n, int lane, int c0, int cs,
                                        const u64* grid_tab, const u8* sign_tab, float (&acc)[NT]) {
    if (TY == T_F32) {
        const float* w = (const float*)wr;
        for (int c = (c0 * 32 + lane) * 4; c < cols; c += 128 * cs) {
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
        // 8 values (16 bytes) per lane; cols % 8 == 0 (checked on the host)
        for (int c = (c0 * 32 + lane) * 8; c < cols; c += 256 * cs) {
            uint4 v = *(const uint4*)(wr + 2 * c);
            u32 wv[4] = {v.x, v.y, v.z, v.w};
            float f[8];
#pragma unroll
            for (int i = 0; i < 4; i++) {
                u16 lo = (u16)(wv[i] & 0xffff), hi = (u16)(wv[i] >> 16);
                f[2 * i] = (TY == T_F16) ? h2f(lo) : bf2f(lo);
                f[2 * i + 1] = (TY == T_F16) ? h2f(hi) : bf2f(hi);
            }
            fma8<NT>(acc, x, xs, n, c, f);
        }
    } else if (TY == T_Q8_0) {
        // chunk = 4 blocks of 32; lane -> block lane/8, values (lane%8)*4 .. +4
        int nb = cols / 32;
        int nch = (nb + 3) / 4;
#pragma unroll 4
        for (int c = c0; c < nch; c += cs) {
            int b = c * 4 + (lane >> 3);
            if (b >= nb) continue;
            const u8* blk = wr + b * 34;
            float d = h2f(ld16(blk));
            int o = 2 + (lane & 7) * 4;
            u16 v0 = ld16(blk + o), v1 = ld16(blk + o + 2);
            float q0 = (float)(i8)(v0 & 0xff), q1 = (float)(i8)(v0 >> 8), q2 = (float)(i8)(v1 & 0xff), q3 = (float)(i8)(v1 >> 8);
            int e0 = b * 32 + (lane & 7) * 4;
#pragma unroll
            for (int t = 0; t < NT; t++)
                if (t < n) {
                    float4 xv = *(const float4*)(x + t * xs + e0);
                    acc[t] += d * (q0 * xv.x + q1 * xv.y + q2 * xv.z + q3 * xv.w);
                }
        }
    } else if (TY == T_Q4_K) {
        // chunk = one block; lane -> values 8*lane .. +8 (chunk c = lane/8 of 64)
        int nb = cols / 256;
        int c64 = lane >> 3, w = (lane & 7) * 8, hi = w >= 32;
        int s_ = 2 * c64 + hi;
#pragma unroll 4
        for (int b = c0; b < nb; b += cs) {
            const u8* blk = wr + b * 144;
            float d = h2f(ld16(blk)), dmin = h2f(ld16(blk + 2));
            const u8* S = blk + 4;
            int sc, m;
            if (s_ < 4) { sc = S[s_] & 63; m = S[s_ + 4] & 63; }
            else { sc = (S[s_ + 4] & 15) | ((S[s_ - 4] >> 6) << 4); m = (S[s_ + 4] >> 4) | ((S[s_] >> 6) << 4); }
            const u32* qp = (const u32*)(blk + 16 + 32 * c64 + (w & 31));
            u32 q0 = qp[0], q1 = qp[1];
            int sh = hi ? 4 : 0;
            float dl = d * sc, ml = dmin * m;
            u32 n0 = (q0 >> sh) & 0x0F0F0F0Fu, n1 = (q1 >> sh) & 0x0F0F0F0Fu;
            float v[8];
#pragma unroll
            for (int i = 0; i < 4; i++) {
                v[i] = dl * ubyte_f(n0, i) - ml;
                v[4 + i] = dl * ubyte_f(n1, i) - ml;
            }
            fma8<NT>(acc, x, xs, n, b * 256 + 8 * lane, v);
        }
    } else if (TY == T_Q2_K) {
        // chunk = one block; lane -> values 8*lane .. +8: half h, shift j, run l
        int nb = cols / 256;
        int h = lane >> 4, j = (lane >> 2) & 3, l0 = (lane & 3) * 8, s_ = lane >> 1;
#pragma unroll 4
        for (int b = c0; b < nb; b += cs) {
            const u8* blk = wr + b * 84;
            float d = h2f(ld16(blk + 80)), dmin = h2f(ld16(blk + 82));
            u8 sc = blk[s_];
            float dl = d * (sc & 15), ml = dmin * (sc >> 4);
            const u32* qp = (const u32*)(blk + 16 + 32 * h + l0);
            u32 q0 = qp[0], q1 = qp[1];
            u32 t0 = (q0 >> (2 * j)) & 0x03030303u, t1 = (q1 >> (2 * j)) & 0x03030303u;
            float v[8];
#pragma unroll
            for (int i = 0; i < 4; i++) {
                v[i] = dl * ubyte_f(t0, i) - ml;
                v[4 + i] = dl * ubyte_f(t1, i) - ml;
            }
            fma8<NT>(acc, x, xs, n, b * 256 + 8 * lane, v);
        }
    } else if (TY == T_IQ2_XXS) {
        // chunk = one block; lane -> group lane/4, grid entry k = lane%4 (8 values)
        int nb = cols / 256;
        int g = lane >> 2, k = lane & 3;
#pragma unroll 4
        for (int b = c0; b < nb; b += cs) {
            const u8* blk = wr + b * 66;
            float d = h2f(ld16(blk));
            const u8* q = blk + 2 + 8 * g;
            u32 a1 = (u32)ld16(q + 4) | ((u32)ld16(q + 6) << 16);
            float db = d * (0.5f + (float)(a1 >> 28)) * 0.25f;
            u64 grid = grid_tab[q[k]];
            u32 signs = sign_tab[(a1 >> (7 * k)) & 127];
            u32 glo = (u32)grid, ghi = (u32)(grid >> 32);
            float v[8];
#pragma unroll
            for (int m = 0; m < 8; m++) {
                float mag = db * ubyte_f(m < 4 ? glo : ghi, m & 3);
                // sign bit m of `signs` moved to bit 31 and xor-ed in
                v[m] = __int_as_float(__float_as_int(mag) ^ ((signs << (31 - m)) & 0x80000000u));
            }
            fma8<NT>(acc, x, xs, n, b * 256 + 32 * g + 8 * k, v);
        }
    }
}


extern __shared__ float mv_xsh[];

template <int TY, int NT, bool GROUPED>
__device__ __forceinline__ void mv_body(const u8* W, u64 row_bytes, int rows, int cols, const float* x, int xs, float* y, int ys, int n,
                                        const int* eids, u64 expert_bytes, int x_group, int stage, const int* tiles) {
    // stage == 2: single-token x staged once per block in shared memory (the
    // block's warps all read it; global/L1 x loads were half the load traffic)
    if (stage == 2) {
        const float* xsrc = eids ? x + (u64)(blockIdx.y / x_group) * xs : x;
        for (int i = threadIdx.x * 4; i < cols; i += blockDim.x * 4) *(float4*)(mv_xsh + i) = *(const float4*)(xsrc + i);
        __syncthreads();
    }
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
    if (GROUPED) {
        // grouped mode: tile blockIdx.y = (matrix, first row, rows) of
        // expert-sorted activations; empty tiles (len 0) exit
        const int* tl = tiles + 4 * blockIdx.y;
        if (tl[2] == 0) return;
        W += (u64)tl[0] * expert_bytes;
        x += (u64)tl[1] * xs;
        y += (u64)tl[1] * ys;
        n = tl[2];
    } else if (eids) {
        int s = blockIdx.y;
        W += (u64)eids[s] * expert_bytes;
        x += (u64)(s / x_group) * xs;
        y += (u64)s * ys;
    }
    if (stage == 2) x = mv_xsh;
    const u8* wr = W + (u64)row * row_bytes;
    if (stage == 1) {
        // copy the row with coalesced 16-byte loads (row_bytes % 16 == 0), then
        // let lanes pick whole quant blocks out of shared memory
        u8* my = (u8*)mv_xsh + (threadIdx.x >> 5) * row_bytes;
        const uint4* src = (const uint4*)wr;
        uint4* dst = (uint4*)my;
        int nv = (int)(row_bytes >> 4);
        for (int i = lane; i < nv; i += 32) dst[i] = src[i];
        __syncwarp();
        wr = my;
    }
    float acc[NT];
#pragma unroll
    for (int t = 0; t < NT; t++) acc[t] = 0.f;
    row_dot<TY, NT>(wr, cols, x, xs, n, lane, 0, 1, grid_tab, sign_tab, acc);
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
                                         const int* eids, u64 expert_bytes, int x_group, int stage) {
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
    if (stage == 1) {
        const uint4* src = (const uint4*)wr;
        uint4* dst = (uint4*)mv_xsh;
        int nv = (int)(row_bytes >> 4);
        for (int i = threadIdx.x; i < nv; i += blockDim.x) dst[i] = src[i];
        __syncthreads();
        wr = (const u8*)mv_xsh;
    }
    float acc[NT];
#pragma unroll
    for (int t = 0; t < NT; t++) acc[t] = 0.f;
    row_dot<TY, NT>(wr, cols, x, xs, n, threadIdx.x & 31, threadIdx.x >> 5, blockDim.x >> 5, grid_tab, sign_tab, acc);
    split_k_store<NT>(acc, red, y, ys, row, n);
}

// Split-K over blocks too: block (row, part) sums the chunks part, part +
// parts, ... of its row and writes a partial to y + part * pstride; the
// consumer adds the gridDim.y partials in order (deterministic). For the HC
// mix products (24 rows of 16384): one block per row left them latency-bound.
template <int TY>
__device__ __forceinline__ void mvks_body(const u8* W, u64 row_bytes, int cols, const float* x, float* y, int pstride) {
    __shared__ u64 grid_tab[TY == T_IQ2_XXS ? 256 : 1];
    __shared__ u8 sign_tab[TY == T_IQ2_XXS ? 128 : 1];
    __shared__ float red[8];
    if (TY == T_IQ2_XXS) {
        for (int i = threadIdx.x; i < 256; i += blockDim.x) grid_tab[i] = IQ2XXS_GRID[i];
        for (int i = threadIdx.x; i < 128; i += blockDim.x) sign_tab[i] = KSIGNS_IQ2XS[i];
        __syncthreads();
    }
    int row = blockIdx.x;
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    float acc[1] = {0.f};
    row_dot<TY, 1>(W + (u64)row * row_bytes, cols, x, 0, 1, lane, blockIdx.y * nw + w, gridDim.y * nw, grid_tab, sign_tab, acc);
    float v = warp_sum(acc[0]);
    if (lane == 0) red[w] = v;
    __syncthreads();
    if (threadIdx.x < 32) {
        v = (lane < nw) ? red[lane] : 0.f;
        v = warp_sum(v);
        if (lane == 0) y[(u64)blockIdx.y * pstride + row] = v;
    }
}
extern "C" __global__ void mvks_f16(const u8* W, u64 row_bytes, int cols, const float* x, float* y, int pstride) {
    mvks_body<T_F16>(W, row_bytes, cols, x, y, pstride);
}

#define MV_KERNEL(NAME, TY, NT)                                                                                              \
    extern "C" __global__ void NAME(const u8* W, u64 row_bytes, int rows, int cols, const float* x, int xs, float* y, int ys, \
                                    int n, const int* eids, u64 expert_bytes, int x_group, int stage) {                       \
        mv_body<TY, NT, false>(W, row_bytes, rows, cols, x, xs, y, ys, n, eids, expert_bytes, x_group, stage, 0);                       \
    }
// Grouped (prefill MoE): tiles of expert-sorted rows, see moe_group.
#define MVG_KERNEL(NAME, TY)                                                                                                 \
    extern "C" __global__ void NAME(const u8* W, u64 row_bytes, int rows, int cols, const float* x, int xs, float* y, int ys, \
                                    u64 expert_bytes, const int* tiles) {                                                     \
        mv_body<TY, 8, true>(W, row_bytes, rows, cols, x, xs, y, ys, 8, 0, expert_bytes, 1, 0, tiles);                        \
    }
#define MVK_KERNEL(NAME, TY, NT)                                                                                              \
    extern "C" __global__ void NAME(const u8* W, u64 row_bytes, int rows, int cols, const float* x, int xs, float* y, int ys, \
                                    int n, const int* eids, u64 expert_bytes, int x_group, int stage) {                       \
        mvk_body<TY, NT>(W, row_bytes, rows, cols, x, xs, y, ys, n, eids, expert_bytes, x_group, stage);                      \
    }
#define MV_TYPE(SUFFIX, TY)                                                                                                       \
    MV_KERNEL(mv_##SUFFIX##_1, TY, 1) MV_KERNEL(mv_##SUFFIX##_2, TY, 2) MV_KERNEL(mv_##SUFFIX##_4, TY, 4) MV_KERNEL(mv_##SUFFIX##_8, TY, 8) \
    MVK_KERNEL(mvk_##SUFFIX##_1, TY, 1) MVK_KERNEL(mvk_##SUFFIX##_2, TY, 2) MVK_KERNEL(mvk_##SUFFIX##_4, TY, 4) MVK_KERNEL(mvk_##SUFFIX##_8, TY, 8) \
    MVG_KERNEL(mvg_##SUFFIX, TY)

MV_TYPE(f32, T_F32)
MV_TYPE(f16, T_F16)
MV_TYPE(bf16, T_BF16)
MV_TYPE(q8_0, T_Q8_0)
MV_TYPE(q2_k, T_Q2_K)
MV_TYPE(q4_k, T_Q4_K)
MV_TYPE(iq2_xxs, T_IQ2_XXS)
