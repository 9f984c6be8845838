// Attention-side kernels (spec §6-§9): q/kv finishing, compressors, indexer
// scores and top-k, and single-pass sparse sink attention. Rows are staged in
// shared memory (head dims are at most 1024).

#define MAXD 1024

// ---- Packed compressed rows: the byte layouts of crates/engine/src/pack.rs.
// Attention row: u8 code[nope] (FP8 e4m3fn), u8 exp[ceil(nope/64)] (ue8m0:
// scale 2^(exp-127)), then the rope dims as f32 LE or bf16 LE (`rope_bf16`).
// Indexer row: u8 code[ceil(d/2)] (FP4 e2m1 s|eem, low nibble = even dim),
// u8 exp[ceil(d/32)]. On the device rows sit at a stride of row_bytes rounded
// up to a multiple of 4 (so the code words load aligned; the pad bytes stay
// zero). comp_finish encodes exactly as the CPU encoder (smallest exponent
// whose grid holds the block; all-zero blocks get 2^-22 / 2^-126), so the
// bytes equal the CPU's; decoding is a table value times a power of two,
// exact in f32, so a decoded row is bit for bit the f32 row it came from.

// 2^(e-127) for a ue8m0 byte (0 is 2^-127, an f32 subnormal; 255 never stored).
__device__ __forceinline__ float ue8m0_scale(u32 e) { return e ? __uint_as_float(e << 23) : __uint_as_float(0x00400000u); }
// 2^-E for E in [-127, 127].
__device__ __forceinline__ float pow2_neg(int e) { return (e < 127) ? __uint_as_float((u32)(127 - e) << 23) : __uint_as_float(0x00400000u); }
// e4m3fn code (low 8 bits of c) -> value: its bits placed as an f32 with the
// exponent 120 too small (subnormal codes land on f32 subnormals), times 2^120.
// Exact: a power-of-two scaling of a representable value (NaN codes are never stored).
__device__ __forceinline__ float e4m3_value(u32 c) { return __uint_as_float(((c & 0x80u) << 24) | ((c & 0x7fu) << 20)) * 0x1p120f; }
// e2m1 code (low 4 bits, s|eem) -> value, the same way (exponent 126 too small).
__device__ __forceinline__ float e2m1_value(u32 c) { return __uint_as_float(((c & 8u) << 28) | ((c & 7u) << 22)) * 0x1p126f; }
// Smallest E in [-127, 127] with a <= gmax * 2^E, where gmax = 1.gman * 2^gexp
// (448: gexp 8, gman 0x600000; 6: gexp 2, gman 0x400000); zero_e when a == 0.
__device__ __forceinline__ int pack_exp(float a, int gexp, u32 gman, int zero_e) {
    if (a == 0.f) return zero_e;
    u32 b = __float_as_uint(a);
    int ef = (int)((b >> 23) & 255), x;
    u32 m;
    if (ef) {
        x = ef - 127;
        m = b & 0x7fffffu;
    } else {  // f32 subnormal
        int l = 31 - __clz(b);
        x = l - 149;
        m = (b << (23 - l)) & 0x7fffffu;
    }
    int e = x - gexp + (m > gman ? 1 : 0);
    return min(max(e, -127), 127);
}
// e4m3fn code of q (already divided by its block scale; on the grid).
__device__ __forceinline__ u32 e4m3_code_of(float q) {
    u32 s = (__float_as_uint(q) >> 24) & 0x80u;
    float a = fabsf(q);
    if (a == 0.f) return s;
    u32 b = __float_as_uint(a);
    int e = (int)((b >> 23) & 255) - 127;
    if (e < -6) return s | (u32)(a * 512.f);
    return s | ((u32)(e + 7) << 3) | ((b >> 20) & 7);
}
__device__ __forceinline__ u32 e2m1_code_of(float q) {
    u32 s = (__float_as_uint(q) >> 28) & 8u;
    float a = fabsf(q);
    if (a == 0.f) return s;
    if (a == 0.5f) return s | 1u;
    u32 b = __float_as_uint(a);
    int e = (int)((b >> 23) & 255) - 127;
    return s | (u32)(2 + 2 * e) | ((b >> 22) & 1);
}
// bf16 bits of x, round to nearest even (x finite; as half::bf16::from_f32).
__device__ __forceinline__ u32 bf16_rne(float x) {
    u32 u = __float_as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u >> 16) | 0x40u;
    return (u + 0x7fffu + ((u >> 16) & 1)) >> 16;
}
// Packs the finished attention row r (block-shared) into out, as pack.rs does.
__device__ void pack_fp8_row(const float* r, u8* out, int d, int rd, int rope_bf16) {
    int nope = d - rd, nblk = (nope + 63) / 64;
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (int b = w; b < nblk; b += nw) {
        int i0 = b * 64 + lane, i1 = i0 + 32;
        float v0 = (i0 < nope) ? r[i0] : 0.f, v1 = (i1 < nope) ? r[i1] : 0.f;
        int e = pack_exp(warp_max(fmaxf(fabsf(v0), fabsf(v1))), 8, 0x600000u, -22);
        float inv = pow2_neg(e);
        if (i0 < nope) out[i0] = (u8)e4m3_code_of(v0 * inv);
        if (i1 < nope) out[i1] = (u8)e4m3_code_of(v1 * inv);
        if (lane == 0) out[nope + b] = (u8)(e + 127);
    }
    u8* t = out + nope + nblk;
    for (int j = threadIdx.x; j < rd; j += blockDim.x) {
        if (rope_bf16) {
            u32 h = bf16_rne(r[nope + j]);
            t[2 * j] = (u8)h;
            t[2 * j + 1] = (u8)(h >> 8);
        } else {
            u32 bits = __float_as_uint(r[nope + j]);
            for (int k = 0; k < 4; k++) t[4 * j + k] = (u8)(bits >> (8 * k));
        }
    }
}
// Packs the finished indexer row r (block-shared, on the FP4 grid) into out.
__device__ void pack_fp4_row(const float* r, u8* out, int d) {
    int ncode = (d + 1) / 2, nblk = (d + 31) / 32;
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (int b = w; b < nblk; b += nw) {
        int i = b * 32 + lane;
        float v = (i < d) ? r[i] : 0.f;
        int e = pack_exp(warp_max(fabsf(v)), 2, 0x400000u, -126);
        u32 c = (i < d) ? e2m1_code_of(v * pow2_neg(e)) : 0u;
        u32 hi = __shfl_down_sync(0xffffffffu, c, 1);
        if ((lane & 1) == 0 && i < d) out[i / 2] = (u8)(c | (hi << 4));
        if (lane == 0) out[ncode + b] = (u8)(e + 127);
    }
}
// Dim c of a packed attention row.
__device__ __forceinline__ float attn_row_val(const u8* row, int c, int nope, int nblk, int rope_bf16) {
    if (c < nope) return e4m3_value(row[c]) * ue8m0_scale(row[nope + c / 64]);
    const u8* t = row + nope + nblk;
    int j = c - nope;
    if (rope_bf16) return __uint_as_float(((u32)t[2 * j] | ((u32)t[2 * j + 1] << 8)) << 16);
    return __uint_as_float((u32)t[4 * j] | ((u32)t[4 * j + 1] << 8) | ((u32)t[4 * j + 2] << 16) | ((u32)t[4 * j + 3] << 24));
}
// Dims c0..c0+3 of a packed attention row: c0 % 4 == 0, the row 4-byte
// aligned, nope % 64 == 0 (as the FP8 sims need), so the 4 dims are all codes
// of one block or all RoPE dims. The RoPE dims sit at any byte offset: they are
// read as aligned words and funnel-shifted into place.
__device__ __forceinline__ float4 attn_row4(const u8* row, int c0, int nope, int nblk, int rope_bf16) {
    if (c0 < nope) {
        u32 w = *(const u32*)(row + c0);
        float s = ue8m0_scale(row[nope + (c0 >> 6)]);
        return make_float4(e4m3_value(w) * s, e4m3_value(w >> 8) * s, e4m3_value(w >> 16) * s, e4m3_value(w >> 24) * s);
    }
    int o = nope + nblk + (c0 - nope) * (rope_bf16 ? 2 : 4);
    const u32* p = (const u32*)(row + (o & ~3));
    u32 sh = (u32)(o & 3) * 8;
    if (rope_bf16) {
        u32 w0 = p[0], w1 = p[1], w2 = sh ? p[2] : 0u;
        u32 a = __funnelshift_r(w0, w1, sh), b = __funnelshift_r(w1, w2, sh);
        return make_float4(__uint_as_float(a << 16), __uint_as_float(a & 0xffff0000u), __uint_as_float(b << 16), __uint_as_float(b & 0xffff0000u));
    }
    u32 w0 = p[0], w1 = p[1], w2 = p[2], w3 = p[3], w4 = sh ? p[4] : 0u;
    return make_float4(__uint_as_float(__funnelshift_r(w0, w1, sh)), __uint_as_float(__funnelshift_r(w1, w2, sh)),
                       __uint_as_float(__funnelshift_r(w2, w3, sh)), __uint_as_float(__funnelshift_r(w3, w4, sh)));
}
// Dim j of a packed indexer row of d dims.
__device__ __forceinline__ float idx_row_val(const u8* row, int j, int d) {
    return e2m1_value((row[j >> 1] >> ((j & 1) * 4)) & 15) * ue8m0_scale(row[(d + 1) / 2 + j / 32]);
}
// Decode n packed rows (tests; attention: kind 0, indexer: kind 1) to f32.
extern "C" __global__ void unpack_rows(const u8* rows, int stride, int n, int d, int rd, int rope_bf16, int kind, float* out) {
    int nope = d - rd, nblk = (nope + 63) / 64;
    for (int r = blockIdx.x; r < n; r += gridDim.x) {
        const u8* row = rows + (u64)r * stride;
        for (int c = threadIdx.x; c < d; c += blockDim.x)
            out[(u64)r * d + c] = kind ? idx_row_val(row, c, d) : attn_row_val(row, c, nope, nblk, rope_bf16);
    }
}
// Pack n f32 rows (tests; rows already on their grids, rope dims bf16 values when rope_bf16).
extern "C" __global__ void pack_rows(const float* v, int n, int d, int rd, int rope_bf16, int kind, u8* rows, int stride) {
    __shared__ float r[MAXD];
    for (int e = blockIdx.x; e < n; e += gridDim.x) {
        for (int i = threadIdx.x; i < d; i += blockDim.x) r[i] = v[(u64)e * d + i];
        __syncthreads();
        if (kind) pack_fp4_row(r, rows + (u64)e * stride, d);
        else pack_fp8_row(r, rows + (u64)e * stride, d, rd, rope_bf16);
        __syncthreads();
    }
}

// FP8 e4m3 round trip of `len` values (multiple of 64) of a shared row, one
// warp per 64-block, power-of-two scale per block (spec §3.2).
__device__ void fp8_sim_shared(float* r, int len) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (int b = w; b < len / 64; b += nw) {
        float v0 = r[b * 64 + lane], v1 = r[b * 64 + 32 + lane];
        float amax = fmaxf(warp_max(fmaxf(fabsf(v0), fabsf(v1))), 1e-4f);
        float s = pow2_ceil(amax * (1.0f / 448.0f));
        r[b * 64 + lane] = e4m3_round(fminf(fmaxf(v0 / s, -448.f), 448.f)) * s;
        r[b * 64 + 32 + lane] = e4m3_round(fminf(fmaxf(v1 / s, -448.f), 448.f)) * s;
    }
    __syncthreads();
}
// FP4 e2m1 round trip in blocks of 32 (one warp per block, spec §3.3).
__device__ void fp4_sim_shared(float* r, int len) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    const float floorv = 6.0f * 1.1754943508222875e-38f;
    for (int b = w; b < len / 32; b += nw) {
        float v = r[b * 32 + lane];
        float amax = fmaxf(warp_max(fabsf(v)), floorv);
        float s = pow2_ceil(amax * (1.0f / 6.0f));
        r[b * 32 + lane] = e2m1_round(fminf(fmaxf(v / s, -6.f), 6.f)) * s;
    }
    __syncthreads();
}
// Sylvester-order Walsh-Hadamard of a shared row (power-of-two length), x n^-1/2.
__device__ void hadamard_shared(float* r, int n) {
    for (int h = 1; h < n; h <<= 1) {
        for (int k = threadIdx.x; k < n / 2; k += blockDim.x) {
            int i = (k / h) * 2 * h + (k % h);
            float a = r[i], b = r[i + h];
            r[i] = a + b;
            r[i + h] = a - b;
        }
        __syncthreads();
    }
    float s = rsqrtf((float)n);
    s = 1.0f / sqrtf((float)n);
    for (int i = threadIdx.x; i < n; i += blockDim.x) r[i] *= s;
    __syncthreads();
}
__device__ void rope_shared(float* r, int d, int rd, const float* omega, int pos, bool inverse) {
    for (int i = threadIdx.x; i < rd / 2; i += blockDim.x) rope_pair(&r[d - rd + 2 * i], &r[d - rd + 2 * i + 1], omega[i], pos, inverse);
    __syncthreads();
}
__device__ void rms_shared(float* r, int d, const float* w, float eps, float* sh) {
    float ss = 0.f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) ss += r[i] * r[i];
    ss = block_sum(ss, sh);
    float inv = 1.f / sqrtf(ss / (float)d + eps);
    for (int i = threadIdx.x; i < d; i += blockDim.x) r[i] = r[i] * inv * (w ? w[i] : 1.f);
    __syncthreads();
}

// mode 0: q head (unweighted RMS + RoPE); 1: kv row (RMSNorm w + RoPE + FP8 on
// the non-RoPE dims unless skip_fp8); 2: indexer q head (RoPE + Hadamard + FP4).
// Row b belongs to token b / per_tok at position p0 + b / per_tok.
extern "C" __global__ void row_finish(float* x, int d, int per_tok, int rd, const float* omega, const int* p0p, const float* w,
                                      float eps, int mode, int skip_fp8) {
    __shared__ float r[MAXD];
    __shared__ float sh[32];
    float* row = x + (u64)blockIdx.x * d;
    int pos = *p0p + blockIdx.x / per_tok;
    for (int i = threadIdx.x; i < d; i += blockDim.x) r[i] = row[i];
    __syncthreads();
    if (mode == 0) rms_shared(r, d, 0, eps, sh);
    if (mode == 1) rms_shared(r, d, w, eps, sh);
    rope_shared(r, d, rd, omega, pos, false);
    if (mode == 1 && !skip_fp8) fp8_sim_shared(r, d - rd);
    if (mode == 2) {
        hadamard_shared(r, d);
        fp4_sim_shared(r, d);
    }
    for (int i = threadIdx.x; i < d; i += blockDim.x) row[i] = r[i];
}

// Compressor streaming update over a chunk of n tokens (spec §7): one thread per
// output dim c (it owns lanes c and d+c of every slot, so no synchronisation).
// kv/sc: [n][coff*d] projections; ape: [ratio][coff*d]; state kvs/scs:
// [slots][coff*d]; pooled rows written to out[e][d] for the e-th emission.
extern "C" __global__ void comp_update(const float* kv, const float* sc, const float* ape, float* kvs, float* scs, int n,
                                       const int* p0p, int ratio, int coff, int d, float* out) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= d) return;
    int p0 = *p0p;
    int w = coff * d;
    int e = 0;
    if (n == 1 && coff == 2 && ratio <= 8) {
        // Decode step of an overlapping compressor (on the indexer's critical
        // path): every value the emission needs is loaded at once, before
        // any store (the loop below reads the slots back after writing them,
        // a chain of dependent round trips); same values, same order of
        // operations, same state afterwards.
        int p = p0, sl = p % ratio, slot = ratio + sl;
        const float* ap = ape + (u64)sl * w;
        float k0 = kv[c], k1 = kv[d + c];
        float s0 = sc[c] + ap[c], s1 = sc[d + c] + ap[d + c];
        if ((p + 1) % ratio != 0) {
            kvs[(u64)slot * w + c] = k0;
            kvs[(u64)slot * w + d + c] = k1;
            scs[(u64)slot * w + c] = s0;
            scs[(u64)slot * w + d + c] = s1;
            return;
        }
        // emission (sl == ratio - 1): pooled over slots 0..r-1 (first half)
        // and r..2r-1 (second half, the last one this token's); then slots
        // r..2r-1 (both halves) move down to 0..r-1
        float SA[8], KA[8], SB[8], KB[8], SC[8], KC[8];
#pragma unroll
        for (int s2 = 0; s2 < 8; s2++)
            if (s2 < ratio) {
                SA[s2] = scs[(u64)s2 * w + c];
                KA[s2] = kvs[(u64)s2 * w + c];
                SB[s2] = scs[(u64)(ratio + s2) * w + d + c];
                KB[s2] = kvs[(u64)(ratio + s2) * w + d + c];
                SC[s2] = scs[(u64)(ratio + s2) * w + c];
                KC[s2] = kvs[(u64)(ratio + s2) * w + c];
            }
#pragma unroll
        for (int s2 = 0; s2 < 8; s2++)
            if (s2 == ratio - 1) {
                SB[s2] = s1;
                KB[s2] = k1;
                SC[s2] = s0;
                KC[s2] = k0;
            }
        float mx = NEG_INF;
#pragma unroll
        for (int s2 = 0; s2 < 8; s2++)
            if (s2 < ratio) mx = fmaxf(mx, SA[s2]);
#pragma unroll
        for (int s2 = 0; s2 < 8; s2++)
            if (s2 < ratio) mx = fmaxf(mx, SB[s2]);
        // (two loops, not one over 2r slots: the sums go first half, then
        // second, and a runtime-indexed joint array would live in local memory)
        float num = 0.f, den = 0.f;
        if (mx != NEG_INF) {
#pragma unroll
            for (int s2 = 0; s2 < 8; s2++)
                if (s2 < ratio) {
                    float ex = expf(SA[s2] - mx);
                    den += ex;
                    num += ex * KA[s2];
                }
#pragma unroll
            for (int s2 = 0; s2 < 8; s2++)
                if (s2 < ratio) {
                    float ex = expf(SB[s2] - mx);
                    den += ex;
                    num += ex * KB[s2];
                }
        }
        out[c] = (mx == NEG_INF) ? 0.f : num / den;
        kvs[(u64)slot * w + c] = k0;
        kvs[(u64)slot * w + d + c] = k1;
        scs[(u64)slot * w + c] = s0;
        scs[(u64)slot * w + d + c] = s1;
#pragma unroll
        for (int s2 = 0; s2 < 8; s2++)
            if (s2 < ratio) {
                kvs[(u64)s2 * w + c] = KC[s2];
                scs[(u64)s2 * w + c] = SC[s2];
                kvs[(u64)s2 * w + d + c] = KB[s2];
                scs[(u64)s2 * w + d + c] = SB[s2];
            }
        return;
    }
    for (int t = 0; t < n; t++) {
        int p = p0 + t;
        int slot = (coff == 2) ? ratio + p % ratio : p % ratio;
        const float* ap = ape + (u64)(p % ratio) * w;
        for (int l = 0; l < coff; l++) {
            int i = l * d + c;
            kvs[(u64)slot * w + i] = kv[(u64)t * w + i];
            scs[(u64)slot * w + i] = sc[(u64)t * w + i] + ap[i];
        }
        if ((p + 1) % ratio != 0) continue;
        float mx = NEG_INF;
        if (coff == 2) {
            for (int s = 0; s < ratio; s++) mx = fmaxf(mx, scs[(u64)s * w + c]);
            for (int s = ratio; s < 2 * ratio; s++) mx = fmaxf(mx, scs[(u64)s * w + d + c]);
        } else {
            for (int s = 0; s < ratio; s++) mx = fmaxf(mx, scs[(u64)s * w + c]);
        }
        float num = 0.f, den = 0.f;
        if (mx != NEG_INF) {
            if (coff == 2) {
                for (int s = 0; s < ratio; s++) {
                    float ex = expf(scs[(u64)s * w + c] - mx);
                    den += ex;
                    num += ex * kvs[(u64)s * w + c];
                }
                for (int s = ratio; s < 2 * ratio; s++) {
                    float ex = expf(scs[(u64)s * w + d + c] - mx);
                    den += ex;
                    num += ex * kvs[(u64)s * w + d + c];
                }
            } else {
                for (int s = 0; s < ratio; s++) {
                    float ex = expf(scs[(u64)s * w + c] - mx);
                    den += ex;
                    num += ex * kvs[(u64)s * w + c];
                }
            }
        }
        out[(u64)e * d + c] = (mx == NEG_INF) ? 0.f : num / den;
        e++;
        if (coff == 2) {
            for (int s = 0; s < ratio; s++)
                for (int l = 0; l < 2; l++) {
                    int i = l * d + c;
                    kvs[(u64)s * w + i] = kvs[(u64)(s + ratio) * w + i];
                    scs[(u64)s * w + i] = scs[(u64)(s + ratio) * w + i];
                }
        }
    }
}

// Finish the rows emitted by a chunk of n tokens: RMSNorm, RoPE at row*ratio,
// then FP8 (attention rows; rope dims rounded to bf16 when rope_bf16) or
// Hadamard + FP4 (indexer rows), packed (layouts above) into row
// p0/ratio + e of `rows` (byte stride `stride`) for emission e. The grid may
// be larger than the emission count (CUDA graphs fix it): surplus blocks exit.
extern "C" __global__ void comp_finish(const float* pooled, u8* rows, int stride, const int* p0p, int n, int d, int rd, const float* omega,
                                       const float* norm_w, float eps, int ratio, int is_indexer, int rope_bf16) {
    __shared__ float r[MAXD];
    __shared__ float sh[32];
    int e = blockIdx.x;
    int p0 = *p0p;
    int first_row = p0 / ratio;
    if (e >= (p0 + n) / ratio - first_row) return;
    for (int i = threadIdx.x; i < d; i += blockDim.x) r[i] = pooled[(u64)e * d + i];
    __syncthreads();
    rms_shared(r, d, norm_w, eps, sh);
    rope_shared(r, d, rd, omega, (first_row + e) * ratio, false);
    u8* out = rows + (u64)(first_row + e) * stride;
    if (is_indexer) {
        hadamard_shared(r, d);
        fp4_sim_shared(r, d);
        pack_fp4_row(r, out, d);
    } else {
        fp8_sim_shared(r, d - rd);
        pack_fp8_row(r, out, d, rd, rope_bf16);
    }
}

// ring[(p0+t) % win] = kv[t] for the chunk's last min(n, win) rows.
extern "C" __global__ void ring_store(const float* kv, float* ring, int n, const int* p0p, int win, int d) {
    int t = n - 1 - blockIdx.x;  // one block per stored row
    if (t < 0) return;
    int p0 = *p0p;
    int slot = (p0 + t) % win;
    for (int i = threadIdx.x; i < d; i += blockDim.x) ring[(u64)slot * d + i] = kv[(u64)t * d + i];
}

// Indexer scores for token t (blockIdx.y): score_i = sum_h w_h relu(q_h . K_i)
// for visible rows i < vis[t]; one warp per row, lanes split the heads. Key
// rows are packed FP4 (byte stride kstride), decoded exactly while staged.
extern "C" __global__ void index_scores(const float* q, const float* wts, const u8* krows, int kstride, const int* vis, int ih,
                                        int id, float wscale, float* scores, int ld, int k) {
    // q staged with a padded row stride (id + 1) so lanes (one head each) hit
    // distinct banks; each warp stages its key row once and reads it broadcast
    extern __shared__ float qs[];  // ih * (id + 1) + warps * id
    int t = blockIdx.y;
    int v = vis[t];
    if (v <= k) return;  // every visible row is selected; no scores needed
    int qstride = id + 1;
    const float* qt = q + (u64)t * ih * id;
    for (int i = threadIdx.x; i < ih * id; i += blockDim.x) qs[(i / id) * qstride + (i % id)] = qt[i];
    __syncthreads();
    int lane = threadIdx.x & 31, wp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    float* ks = qs + ih * qstride + wp * id;
    const float* wt = wts + (u64)t * ih;
    for (int i = blockIdx.x * nw + wp; i < v; i += gridDim.x * nw) {
        const u8* kr = krows + (u64)i * kstride;
        for (int j = lane; j < id; j += 32) ks[j] = idx_row_val(kr, j, id);
        __syncwarp();
        float acc = 0.f;
        for (int h = lane; h < ih; h += 32) {
            const float* qh = qs + h * qstride;
            float s = 0.f;
            for (int j = 0; j < id; j++) s += qh[j] * ks[j];
            acc += wt[h] * wscale * fmaxf(s, 0.f);
        }
        acc = warp_sum(acc);
        if (lane == 0) scores[(u64)t * ld + i] = acc;
        __syncwarp();
    }
}

// The same scores with one key row per thread (ID = index head dim, a
// compile-time 32 / 64 / 128): the row is decoded once into registers and
// every head's q is read from shared memory as a broadcast, so the work is
// FMAs (the warp-per-row kernel above spent it on shared loads: ~2 per MAC,
// 95 us a layer at 128K context). Per (row, head) the dims are added in the
// same order as above; heads are added in order h = 0, 1, ...
// Grid (blocks, tokens); dynamic shared memory (ih * ID + ih) floats.
template <int ID>
__device__ __forceinline__ void index_scores_rt_body(const float* q, const float* wts, const u8* krows, int kstride, const int* vis, int ih,
                                                     float wscale, float* scores, int ld, int k) {
    // q rows at a stride of ID + 4 floats: the lanes of a warp read different
    // heads at once (tpr > 1), and at a stride of ID (a multiple of 32 banks)
    // every lane's float4 hit the same banks: a 32-way conflict per load,
    // ~15 us per ratio-4 layer at 4K
    extern __shared__ float qsr[];
    const int QS = ID + 4;
    int t = blockIdx.y;
    int v = vis[t];
    if (v <= k) return;
    float* ws = qsr + ih * QS;
    const float4* qt4 = (const float4*)(q + (u64)t * ih * ID);
    // q staged in batches of 8 float4 per thread, loads before stores (a
    // strided copy loop is one dependent L2 round trip per iteration)
    int n4 = ih * ID / 4;
    for (int b0 = 0; b0 < n4; b0 += 8 * blockDim.x) {
        float4 tmp[8];
#pragma unroll
        for (int u = 0; u < 8; u++) {
            int i4 = b0 + u * blockDim.x + threadIdx.x;
            tmp[u] = (i4 < n4) ? qt4[i4] : make_float4(0.f, 0.f, 0.f, 0.f);
        }
#pragma unroll
        for (int u = 0; u < 8; u++) {
            int i4 = b0 + u * blockDim.x + threadIdx.x;
            if (i4 < n4) ((float4*)qsr)[i4 + i4 / (ID / 4)] = tmp[u];
        }
    }
    for (int h = threadIdx.x; h < ih; h += blockDim.x) ws[h] = wts[(u64)t * ih + h] * wscale;
    __syncthreads();
    // threads per row: 1 when the rows fill the grid (long contexts); up to a
    // warp when they do not (a 4K context has 1K rows: one thread per row
    // would leave the grid idle and each thread 8K dependent FMAs; with 4 the
    // kernel still took ~28 us, its time one thread's chain of 16 heads). The
    // tpr threads of a row take heads hg, hg + tpr, ... (each decodes the
    // row: same-address loads, one transaction) and add their sums by shuffles.
    int total = gridDim.x * blockDim.x;
    int tpr = 1;
    while (tpr < 32 && v * tpr * 2 <= total) tpr *= 2;
    int gt = blockIdx.x * blockDim.x + threadIdx.x;
    int hg = gt % tpr;
    int step = total / tpr;
    // warp-aligned trip count: every lane of a warp runs every pass (shuffles)
    for (int base = (gt - (gt & 31)) / tpr; base < v; base += step) {
        int i = base + (threadIdx.x & 31) / tpr;
        float acc = 0.f;
        if (i < v) {
            const u32* rw = (const u32*)(krows + (u64)i * kstride);
            u32 cw[ID / 8];
#pragma unroll
            for (int w = 0; w < ID / 8; w++) cw[w] = rw[w];
            u32 ex = rw[ID / 8];  // ID / 32 exponent bytes right after the codes
            float kr[ID];
#pragma unroll
            for (int j = 0; j < ID; j++) kr[j] = e2m1_value((cw[j / 8] >> (4 * (j % 8))) & 15u) * ue8m0_scale((ex >> (8 * (j / 32))) & 255u);
            for (int h = hg; h < ih; h += tpr) {
                const float4* q4 = (const float4*)(qsr + h * QS);
                float s = 0.f;
#pragma unroll
                for (int j4 = 0; j4 < ID / 4; j4++) {
                    float4 qv = q4[j4];
                    s += qv.x * kr[4 * j4];
                    s += qv.y * kr[4 * j4 + 1];
                    s += qv.z * kr[4 * j4 + 2];
                    s += qv.w * kr[4 * j4 + 3];
                }
                acc += ws[h] * fmaxf(s, 0.f);
            }
        }
        for (int o = 1; o < tpr; o <<= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
        if (i < v && hg == 0) scores[(u64)t * ld + i] = acc;
    }
}
#define INDEX_RT(ID)                                                                                                             \
    extern "C" __global__ void index_scores_rt##ID(const float* q, const float* wts, const u8* krows, int kstride, const int* vis, \
                                                   int ih, float wscale, float* scores, int ld, int k) {                            \
        index_scores_rt_body<ID>(q, wts, krows, kstride, vis, ih, wscale, scores, ld, k);                                         \
    }
INDEX_RT(32)
INDEX_RT(64)
INDEX_RT(128)

__device__ __forceinline__ u32 fkey(float f) {
    u32 b = __float_as_uint(f);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// Exclusive prefix of a 1-bit flag over the block (blockDim.x <= 1024); returns
// the rank of this thread among flagged threads, writes the total to *tot.
__device__ int block_rank(bool flag, int* wsum, int* tot) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    u32 m = __ballot_sync(0xffffffffu, flag);
    int pre = __popc(m & ((1u << lane) - 1));
    __syncthreads();
    if (lane == 0) wsum[w] = __popc(m);
    __syncthreads();
    if (w == 0) {
        // exclusive prefix over the warps by one warp scan (a serial walk by
        // one thread was ~1K cycles per call, twice per 1K scores in top-k)
        int c = (lane < nw) ? wsum[lane] : 0;
        int inc = c;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            int y = __shfl_up_sync(0xffffffffu, inc, o);
            if (lane >= o) inc += y;
        }
        if (lane < nw) wsum[lane] = inc - c;
        if (lane == 31) *tot = inc;
    }
    __syncthreads();
    return wsum[w] + pre;
}

// Top-k rows per token by score (ties to the lower index), written in ascending
// row order to sel[t][0..cnt[t]). Tokens with vis <= k select all visible rows.
// Exact radix select on order-preserving keys (4 passes of 8 bits).
// Up to 32 x blockDim rows (128K context) the keys are read once into
// registers (CACHED): the passes and the final ordered pass then make no loads
// (each strided pass over L2 was a chain of dependent round trips).
// Histograms are per warp (most scores share their top key bytes, so one
// counter set had the whole block on a few counters), lanes with the same bin
// merged first (one atomic per bin per warp).
#define TK_KPT 32
// In-place exclusive prefix sum of a[0..n) (n <= 32 * 32 * 32 and a multiple
// of 32; blockDim.x a multiple of 32), in order, by the whole block; ws: 32
// ints. Ends with a barrier.
__device__ __forceinline__ void block_scan_excl(int* a, int n, int* ws) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    // each warp scans segments of 32 in turn, keeping a running total
    int seg_per_warp = (n / 32 + nw - 1) / nw;
    int run = 0;
    for (int sg = 0; sg < seg_per_warp; sg++) {
        int idx = (w * seg_per_warp + sg) * 32 + lane;
        int c = idx < n ? a[idx] : 0;
        int inc = c;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            int y = __shfl_up_sync(0xffffffffu, inc, o);
            if (lane >= o) inc += y;
        }
        if (idx < n) a[idx] = run + inc - c;
        run += __shfl_sync(0xffffffffu, inc, 31);
    }
    if (lane == 0) ws[w] = run;
    __syncthreads();
    if (w == 0) {
        int c = lane < nw ? ws[lane] : 0;
        int inc = c;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            int y = __shfl_up_sync(0xffffffffu, inc, o);
            if (lane >= o) inc += y;
        }
        if (lane < nw) ws[lane] = inc - c;
    }
    __syncthreads();
    int add = ws[w];
    for (int sg = 0; sg < seg_per_warp; sg++) {
        int idx = (w * seg_per_warp + sg) * 32 + lane;
        if (idx < n) a[idx] += add;
    }
    __syncthreads();
}

// Warp 0 of a top-k block (lane l): the bin of the 256-bin histogram of the
// key byte at `shift` where the count from the top reaches rem. Lane l sums
// bins 255 - 8l .. 248 - 8l, an inclusive scan over the lanes gives the
// cumulative counts, the crossing lane walks its 8 and stores the prefix
// extended by that bin and the rank left inside it.
__device__ __forceinline__ void topk_find_bin(const u32* hist, int lane, u32 prefix, int shift, int rem, u32* s_prefix, int* s_rem) {
    int hv[8], ls = 0;
#pragma unroll
    for (int u = 0; u < 8; u++) { hv[u] = (int)hist[255 - 8 * lane - u]; ls += hv[u]; }
    int inc = ls;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        int y = __shfl_up_sync(0xffffffffu, inc, o);
        if (lane >= o) inc += y;
    }
    int exc = inc - ls;
    if (exc < rem && inc >= rem) {
        int cum = exc;
#pragma unroll
        for (int u = 0; u < 8; u++) {
            if (cum + hv[u] >= rem) {
                *s_prefix = prefix | ((u32)(255 - 8 * lane - u) << shift);
                *s_rem = rem - cum;
                break;
            }
            cum += hv[u];
        }
    }
}

// One chunk (a row per thread, row i, key `key`) of the selected rows in
// row order, given the threshold key T: keys > T are taken, and of the keys
// == T the first `rem` in row order (eq_seen: how many earlier chunks held).
// Called by the whole block; base / eq_seen carry over between chunks.
__device__ __forceinline__ void topk_emit(u32 key, int i, int v, u32 T, int rem, int* out, int& base, int& eq_seen, int* wsum, int* tot) {
    bool eq = i < v && key == T;
    int eq_rank = block_rank(eq, wsum, tot);
    int eq_tot = *tot;
    bool take = i < v && (key > T || (eq && eq_seen + eq_rank < rem));
    int r = block_rank(take, wsum, tot);
    if (take) out[base + r] = i;
    base += *tot;
    eq_seen += eq_tot;
    __syncthreads();
}

template <bool CACHED>
__device__ __forceinline__ void topk_body(const float* sc, int v, int k, int* out, u32* hist, u32 (*whist)[256], int* wsum, int* tot,
                                          u32* s_prefix, int* s_rem) {
    int lane = threadIdx.x & 31, wq = threadIdx.x >> 5, nwq = blockDim.x >> 5;
    int nu = (v + blockDim.x - 1) / blockDim.x;
    u32 kr[CACHED ? TK_KPT : 1];
    if (CACHED) {
#pragma unroll
        for (int u = 0; u < TK_KPT; u++) {
            int i = u * blockDim.x + threadIdx.x;
            kr[u] = (u < nu && i < v) ? fkey(sc[i]) : 0u;
        }
    }
    u32 prefix = 0, mask = 0;
    int rem = k;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = threadIdx.x; i < 32 * 256; i += blockDim.x) whist[i >> 8][i & 255] = 0;
        __syncthreads();
        auto count = [&](u32 key, int i) {
            bool in = i < v && (key & mask) == prefix;
            u32 am = __ballot_sync(0xffffffffu, in);
            if (in) {
                u32 bin = (key >> shift) & 255;
                u32 peers = __match_any_sync(am, bin);
                if (lane == __ffs(peers) - 1) atomicAdd(&whist[wq][bin], (u32)__popc(peers));
            }
        };
        if (CACHED) {
#pragma unroll
            for (int u = 0; u < TK_KPT; u++)
                if (u < nu) count(kr[u], u * blockDim.x + threadIdx.x);
        } else {
            for (int b0 = 0; b0 < v; b0 += 8 * blockDim.x) {
                float sv[8];
#pragma unroll
                for (int u = 0; u < 8; u++) {
                    int i = b0 + u * blockDim.x + threadIdx.x;
                    sv[u] = (i < v) ? sc[i] : 0.f;
                }
#pragma unroll
                for (int u = 0; u < 8; u++) count(fkey(sv[u]), b0 + u * blockDim.x + threadIdx.x);
            }
        }
        __syncthreads();
        for (int b = threadIdx.x; b < 256; b += blockDim.x) {
            u32 c = 0;
            for (int w = 0; w < nwq; w++) c += whist[w][b];
            hist[b] = c;
        }
        __syncthreads();
        if (threadIdx.x < 32) topk_find_bin(hist, threadIdx.x, prefix, shift, rem, s_prefix, s_rem);
        __syncthreads();
        prefix = *s_prefix;
        rem = *s_rem;
        mask |= 255u << shift;
        __syncthreads();
    }
    // keys > T all selected; the first `rem` keys == T (lowest indices) too,
    // chunk by chunk of blockDim rows in row order
    int base = 0, eq_seen = 0;
    if (CACHED) {
        // all chunks at once: per (chunk u, warp w) counts of keys == T and of
        // taken keys, exclusive prefixes in row order (u-major, then warp,
        // then lane) by block scans: 4 barriers instead of ~7 per chunk
        int* ceq = (int*)&whist[0][0];       // [TK_KPT][32]
        int* ctk = (int*)&whist[4][0];       // [TK_KPT][32]
        u32 lt = (1u << lane) - 1;
        for (int i = threadIdx.x; i < TK_KPT * 32; i += blockDim.x) { ceq[i] = 0; ctk[i] = 0; }
        __syncthreads();
#pragma unroll
        for (int u = 0; u < TK_KPT; u++)
            if (u < nu) {
                int i = u * blockDim.x + threadIdx.x;
                u32 m = __ballot_sync(0xffffffffu, i < v && kr[u] == prefix);
                if (lane == 0) ceq[u * 32 + wq] = __popc(m);
            }
        __syncthreads();
        block_scan_excl(ceq, TK_KPT * 32, wsum);
#pragma unroll
        for (int u = 0; u < TK_KPT; u++)
            if (u < nu) {
                int i = u * blockDim.x + threadIdx.x;
                bool eq = i < v && kr[u] == prefix;
                u32 m = __ballot_sync(0xffffffffu, eq);
                int eq_rank = ceq[u * 32 + wq] + __popc(m & lt);
                bool take = i < v && (kr[u] > prefix || (eq && eq_rank < rem));
                u32 tm = __ballot_sync(0xffffffffu, take);
                if (lane == 0) ctk[u * 32 + wq] = __popc(tm);
            }
        __syncthreads();
        block_scan_excl(ctk, TK_KPT * 32, wsum);
#pragma unroll
        for (int u = 0; u < TK_KPT; u++)
            if (u < nu) {
                int i = u * blockDim.x + threadIdx.x;
                bool eq = i < v && kr[u] == prefix;
                u32 m = __ballot_sync(0xffffffffu, eq);
                int eq_rank = ceq[u * 32 + wq] + __popc(m & lt);
                bool take = i < v && (kr[u] > prefix || (eq && eq_rank < rem));
                u32 tm = __ballot_sync(0xffffffffu, take);
                if (take) out[ctk[u * 32 + wq] + __popc(tm & lt)] = i;
            }
    } else {
        for (int i0 = 0; i0 < v; i0 += blockDim.x) {
            int i = i0 + threadIdx.x;
            topk_emit((i < v) ? fkey(sc[i]) : 0u, i, v, prefix, rem, out, base, eq_seen, wsum, tot);
        }
    }
}

// Top-k of v <= 1024 * E rows (one block of 1024 threads, E rows per thread,
// keys in registers): the radix passes of topk_body with one shared 256-bin
// histogram (warp-aggregated atomics) instead of per-warp histograms that
// every pass zeroed and merged, and no key cache beyond E registers (the
// general path spills). Same selection: the k largest keys, the lower row
// first on ties; written in ascending row order. (A bitonic sort of the 2K
// composites took ~20 us on the one SM, as long as the general path.)
template <int E>
__device__ __forceinline__ void topk_small(const float* sc, int v, int k, int* out, u32* hist, int* wsum, int* tot, u32* s_prefix, int* s_rem) {
    int t = threadIdx.x, lane = t & 31;
    u32 key[E];
#pragma unroll
    for (int u = 0; u < E; u++) {
        int i = u * 1024 + t;
        key[u] = (i < v) ? fkey(sc[i]) : 0u;
    }
    u32 prefix = 0, mask = 0;
    int rem = k;
    for (int shift = 24; shift >= 0; shift -= 8) {
        if (t < 256) hist[t] = 0;
        __syncthreads();
#pragma unroll
        for (int u = 0; u < E; u++) {
            bool in = u * 1024 + t < v && (key[u] & mask) == prefix;
            u32 am = __ballot_sync(0xffffffffu, in);
            if (in) {
                u32 bin = (key[u] >> shift) & 255;
                u32 peers = __match_any_sync(am, bin);
                if (lane == __ffs(peers) - 1) atomicAdd(&hist[bin], (u32)__popc(peers));
            }
        }
        __syncthreads();
        if (t < 32) topk_find_bin(hist, lane, prefix, shift, rem, s_prefix, s_rem);
        __syncthreads();
        prefix = *s_prefix;
        rem = *s_rem;
        mask |= 255u << shift;
    }
    // keys > T all taken, and the first `rem` keys == T in row order
    int base = 0, eq_seen = 0;
#pragma unroll
    for (int u = 0; u < E; u++) topk_emit(key[u], u * 1024 + t, v, prefix, rem, out, base, eq_seen, wsum, tot);
}

extern "C" __global__ void __launch_bounds__(1024) topk_select(const float* scores, int ld, const int* vis, int k, int* sel, int* cnt) {
    __shared__ u32 hist[256];
    __shared__ u32 whist[32][256];
    __shared__ int wsum[32];
    __shared__ int tot;
    __shared__ u32 s_prefix;
    __shared__ int s_rem;
    int t = blockIdx.x;
    int v = vis[t];
    int* out = sel + (u64)t * k;
    const float* sc = scores + (u64)t * ld;
    if (v <= k) {
        for (int i = threadIdx.x; i < v; i += blockDim.x) out[i] = i;
        if (threadIdx.x == 0) cnt[t] = v;
        return;
    }
    if (blockDim.x == 1024 && v <= 1024) topk_small<1>(sc, v, k, out, hist, wsum, &tot, &s_prefix, &s_rem);
    else if (blockDim.x == 1024 && v <= 2048) topk_small<2>(sc, v, k, out, hist, wsum, &tot, &s_prefix, &s_rem);
    else if (v <= TK_KPT * (int)blockDim.x) topk_body<true>(sc, v, k, out, hist, whist, wsum, &tot, &s_prefix, &s_rem);
    else topk_body<false>(sc, v, k, out, hist, whist, wsum, &tot, &s_prefix, &s_rem);
    if (threadIdx.x == 0) cnt[t] = k;
}

// Sparse sink attention (spec §9). Block (token t, head group g, key split z)
// handles HB heads of the shared K=V key set, so each key row is read once per
// head group: each warp takes every 8th key of the split (lane per 16 dims)
// with an online softmax per head, then the warps' states are merged in warp
// order in shared memory. Keys: the window (positions max(0,p-win+1)..p from the chunk's fresh
// rows or the ring), then compressed rows (sel[t][0..cnt[t]) or 0..vis[t]-1),
// packed (layout above; rfmt = byte stride * 2 + rope_bf16), decoded exactly.
// With one split (gridDim.z == 1) the block writes the final output (inverse
// RoPE on the tail); otherwise it writes a partial (max, sum, unnormalised o)
// that attn_combine merges (flash-decoding for single-token steps). pf: each
// block first prefetches its split's key rows into L2 (decode).
#define HB 4
#define ATT_D 512  // head dims the attention kernel supports (multiple of 128)
// Key j: an f32 window row (returned) or a packed compressed row (*packed).
__device__ __forceinline__ const float* attn_key(int j, int nwin, int lo, int p0, int win, const float* fresh, const float* ring,
                                                 const u8* rows, int rstride, const int* selt, int d, const u8** packed) {
    *packed = 0;
    if (j < nwin) {
        int qp = lo + j;
        return (qp >= p0) ? fresh + (u64)(qp - p0) * d : ring + (u64)(qp % win) * d;
    }
    int ri = selt ? selt[j - nwin] : (j - nwin);
    *packed = rows + (u64)ri * rstride;
    return 0;
}

extern "C" __global__ void __launch_bounds__(256, 2) sink_attn(const float* q, const float* fresh, const float* ring, const u8* rows, int rfmt,
                                     const int* sel, const int* cnt, const int* vis, int sel_ld, const float* sinks,
                                     int h_count, int d, int rd, const float* omega, const int* p0p, int win, float scale,
                                     float* out, float* part, int max_keys, int pf) {
    // dynamic: HB * max_keys floats (the first max_keys hold this split's
    // compressed-row indices), then red = (warps) * d floats for the
    // cross-warp sum of P.V
    extern __shared__ float z[];
    __shared__ __align__(16) float qs[HB * ATT_D];
    __shared__ float oacc[HB * ATT_D];
    __shared__ float mx_s[HB], den_s[HB];
    __shared__ float wm[8][HB], wl[8][HB];
    int t = blockIdx.x, g = blockIdx.y, split = blockIdx.z, nsplit = gridDim.z;
    int p0 = *p0p;
    int p = p0 + t;
    int h0 = g * HB;
    int lo = p + 1 - win;
    if (lo < 0) lo = 0;
    int nwin = p - lo + 1;
    int ncomp = 0;
    if (rows) ncomp = sel ? cnt[t] : vis[t];
    int nk = nwin + ncomp;
    const int* selt = sel ? sel + (u64)t * sel_ld : 0;
    int per = (nk + nsplit - 1) / nsplit;
    int j0 = split * per, j1 = min(nk, j0 + per);
    int* kri = (int*)z;
    {
        // q of the head group as float4s, every load issued before the stores
        // (d % 4 == 0; a strided loop of dependent load/store pairs was 15 % of
        // this kernel's time)
        const int n4 = HB * d / 4;
        float4 qv[HB * ATT_D / 4 / 128 + 1];
#pragma unroll
        for (int u = 0; u < HB * ATT_D / 4 / 128 + 1; u++) {
            int i4 = threadIdx.x + u * blockDim.x;
            int h = (4 * i4) / d;
            qv[u] = (i4 < n4 && h0 + h < h_count) ? *(const float4*)(q + ((u64)t * h_count + h0) * d + 4 * i4) : make_float4(0.f, 0.f, 0.f, 0.f);
        }
        // the split's key list: -1 for a window key, else its compressed
        // row (one coalesced load, not a dependent one per key)
        for (int jj = threadIdx.x; jj < j1 - j0; jj += blockDim.x) {
            int j = j0 + jj;
            int ri = (j < nwin) ? -1 : (selt ? selt[j - nwin] : j - nwin);
            kri[jj] = ri;
            if (pf) {
                // every line of the key row on its way to L2 now: the warps
                // below load their keys two at a time, dependent round trips
                // that then hit L2 instead of DRAM
                const u8* kb;
                int bytes;
                if (ri < 0) {
                    int qp = lo + j;
                    kb = (const u8*)((qp >= p0) ? fresh + (u64)(qp - p0) * d : ring + (u64)(qp % win) * d);
                    bytes = d * 4;
                } else {
                    kb = rows + (u64)ri * (rfmt >> 1);
                    bytes = rfmt >> 1;
                }
                const u8* end = kb + bytes;
                for (const u8* a = (const u8*)((u64)kb & ~(u64)127); a < end; a += 128) asm volatile("prefetch.global.L2 [%0];" ::"l"(a));
            }
        }
#pragma unroll
        for (int u = 0; u < HB * ATT_D / 4 / 128 + 1; u++) {
            int i4 = threadIdx.x + u * blockDim.x;
            if (i4 < n4) *(float4*)(qs + 4 * i4) = qv[u];
        }
        for (int i = threadIdx.x; i < HB * d; i += blockDim.x) oacc[i] = 0.f;
    }
    __syncthreads();
    trace_mark(20);
    int lane = threadIdx.x & 31, wp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    int nd = d / 128;  // float4 chunks per lane (d is a multiple of 128)
    int rstride = rfmt >> 1, rope_bf16 = rfmt & 1, nope = d - rd, nblk = (nope + 63) / 64;
    // dims i * 128 + 4 lane .. + 3 of key j
    auto key4 = [&](int j, int i) -> float4 {
        int ri = kri[j - j0];
        if (ri < 0) {
            int qp = lo + j;
            const float* k = (qp >= p0) ? fresh + (u64)(qp - p0) * d : ring + (u64)(qp % win) * d;
            return *(const float4*)(k + i * 128 + lane * 4);
        }
        return attn_row4(rows + (u64)ri * rstride, i * 128 + lane * 4, nope, nblk, rope_bf16);
    };
    // One pass per warp with an online softmax: keys j0 + wp, + nw, ... two at
    // a time (both loads in flight), each read once for its scores and its
    // share of P.V (the three-phase version read every key twice, each a
    // dependent round trip, with barriers between the phases)
    float m[HB], l[HB], acc[HB][ATT_D / 32];
#pragma unroll
    for (int h = 0; h < HB; h++) {
        m[h] = NEG_INF;
        l[h] = 0.f;
#pragma unroll
        for (int i = 0; i < ATT_D / 32; i++) acc[h][i] = 0.f;
    }
    for (int ja = j0 + wp; ja < j1; ja += 2 * nw) {
        int jb = ja + nw;
        bool hb = jb < j1;
        float4 ka[ATT_D / 128], kb[ATT_D / 128];
#pragma unroll
        for (int i = 0; i < ATT_D / 128; i++)
            if (i < nd) {
                ka[i] = key4(ja, i);
                kb[i] = hb ? key4(jb, i) : make_float4(0.f, 0.f, 0.f, 0.f);
            }
#pragma unroll
        for (int h = 0; h < HB; h++) {
            float sa = 0.f, sb = 0.f;
#pragma unroll
            for (int i = 0; i < ATT_D / 128; i++)
                if (i < nd) {
                    float4 qv = *(const float4*)(qs + h * d + i * 128 + lane * 4);
                    sa += qv.x * ka[i].x + qv.y * ka[i].y + qv.z * ka[i].z + qv.w * ka[i].w;
                    sb += qv.x * kb[i].x + qv.y * kb[i].y + qv.z * kb[i].z + qv.w * kb[i].w;
                }
            sa = warp_sum(sa) * scale;
            sb = hb ? warp_sum(sb) * scale : NEG_INF;
            float mn = fmaxf(m[h], fmaxf(sa, sb));
            float c = expf(m[h] - mn);  // (0 while m is -inf: acc and l are 0)
            float pa = expf(sa - mn), pb = hb ? expf(sb - mn) : 0.f;
            l[h] = l[h] * c + pa + pb;
            m[h] = mn;
#pragma unroll
            for (int i = 0; i < ATT_D / 128; i++)
                if (i < nd) {
                    acc[h][4 * i] = acc[h][4 * i] * c + pa * ka[i].x + pb * kb[i].x;
                    acc[h][4 * i + 1] = acc[h][4 * i + 1] * c + pa * ka[i].y + pb * kb[i].y;
                    acc[h][4 * i + 2] = acc[h][4 * i + 2] * c + pa * ka[i].z + pb * kb[i].z;
                    acc[h][4 * i + 3] = acc[h][4 * i + 3] * c + pa * ka[i].w + pb * kb[i].w;
                }
        }
    }
    trace_mark(21);
    // merge the warps: the block's max per head, every warp's state scaled to
    // it, sums in warp order (no atomics: bit-reproducible run to run, which
    // saved/restored sessions rely on)
    if (lane == 0) {
#pragma unroll
        for (int h = 0; h < HB; h++) wm[wp][h] = m[h];
    }
    __syncthreads();
#pragma unroll
    for (int h = 0; h < HB; h++) {
        float M = NEG_INF;
        for (int w = 0; w < nw; w++) M = fmaxf(M, wm[w][h]);
        float f = (m[h] == NEG_INF) ? 0.f : expf(m[h] - M);
        l[h] *= f;
#pragma unroll
        for (int i = 0; i < ATT_D / 32; i++) acc[h][i] *= f;
        if (threadIdx.x == 0) mx_s[h] = M;
    }
    if (lane == 0) {
#pragma unroll
        for (int h = 0; h < HB; h++) wl[wp][h] = l[h];
    }
    __syncthreads();
    if (threadIdx.x < HB) {
        float sum = 0.f;
        for (int w = 0; w < nw; w++) sum += wl[w][threadIdx.x];
        den_s[threadIdx.x] = sum;
    }
    trace_mark(22);
    {
        // Per head: every warp parks its partial in `red`, then each thread adds
        // the warps' values of its dims in warp order
        float* red = z + HB * max_keys;
#pragma unroll
        for (int h = 0; h < HB; h++) {
#pragma unroll
            for (int i = 0; i < ATT_D / 128; i++)
                if (i < nd) {
                    float* r = red + wp * d + i * 128 + lane * 4;
                    r[0] = acc[h][4 * i];
                    r[1] = acc[h][4 * i + 1];
                    r[2] = acc[h][4 * i + 2];
                    r[3] = acc[h][4 * i + 3];
                }
            __syncthreads();
            for (int c = threadIdx.x; c < d; c += blockDim.x) {
                float v = oacc[h * d + c];
                for (int w = 0; w < nw; w++) v += red[w * d + c];
                oacc[h * d + c] = v;
            }
            __syncthreads();
        }
    }
    __syncthreads();
    trace_mark(23);
    if (nsplit == 1) {
        for (int h = 0; h < HB && h0 + h < h_count; h++) {
            float m = mx_s[h];
            float den = den_s[h] + expf(sinks[h0 + h] - m);
            for (int i = threadIdx.x; i < d; i += blockDim.x) oacc[h * d + i] /= den;
        }
    } else {
        // partial for (t, head, split): [m, l, o[d]] (per head: a division by
        // d + 2 per element was a fifth of this kernel's time)
        for (int h = 0; h < HB && h0 + h < h_count; h++) {
            float* dst = part + (((u64)t * h_count + h0 + h) * nsplit + split) * (d + 2);
            for (int c = threadIdx.x; c < d + 2; c += blockDim.x) dst[c] = (c == 0) ? mx_s[h] : (c == 1) ? den_s[h] : oacc[h * d + c - 2];
        }
        return;  // attn_combine merges them
    }
    __syncthreads();
    for (int h = 0; h < HB && h0 + h < h_count; h++) {
        for (int i = threadIdx.x; i < rd / 2; i += blockDim.x)
            rope_pair(&oacc[h * d + d - rd + 2 * i], &oacc[h * d + d - rd + 2 * i + 1], omega[i], p, true);
    }
    __syncthreads();
    // (per head: no integer division by d in the loop)
    for (int h = 0; h < HB && h0 + h < h_count; h++)
        for (int c = threadIdx.x; c < d; c += blockDim.x) out[((u64)t * h_count + h0 + h) * d + c] = oacc[h * d + c];
}

// Merge the splits of sink_attn: o = sum_s e^(m_s-M) o_s / (sum_s e^(m_s-M) l_s + e^(sink-M)).
extern "C" __global__ void attn_combine(const float* part, int nsplit, const float* sinks, int h_count, int d, int rd,
                                        const float* omega, const int* p0p, float* out, i8* q0, float* d0) {
    // (q0, d0: when set, `out` is also written as Q8_0 codes and scales, the
    // input of the grouped output projection in 8-bit mode; blockDim 128)
    __shared__ float o[MAXD];
    __shared__ float wsp[64], lw_s[64];
    __shared__ float den_s;
    int t = blockIdx.x, h = blockIdx.y;
    int p = *p0p + t;
    // block z merges dims [cb, ce) (gridDim.z chunks of whole warps: fewer
    // partial loads per thread, which bounded this kernel)
    int cz = ((d + gridDim.z - 1) / gridDim.z + 31) & ~31;
    int cb = min(d, (int)blockIdx.z * cz), ce = min(d, cb + cz);
    const float* pp = part + ((u64)t * h_count + h) * nsplit * (d + 2);
    // The partial values of this thread's dims (4 x blockDim at a time, 16
    // splits per batch) are loaded before the split weights exist (they only
    // scale the sum): the first batch is in flight while warp 0 computes the
    // weights (one round trip for both instead of ~5 dependent ones)
    float pv[4][16];
    auto load = [&](int c0, int s0) {
#pragma unroll
        for (int r = 0; r < 4; r++)
#pragma unroll
            for (int u = 0; u < 16; u++) {
                int i = cb + c0 + r * blockDim.x + threadIdx.x;
                pv[r][u] = (i < ce && s0 + u < nsplit) ? pp[(s0 + u) * (d + 2) + 2 + i] : 0.f;
            }
    };
    load(0, 0);
    trace_mark(10);
    if (threadIdx.x < 32) {
        // split weights by one warp (nsplit <= 64): lane s holds splits s, s+32
        int l = threadIdx.x;
        float m0 = (l < nsplit) ? pp[l * (d + 2)] : NEG_INF, m1 = (l + 32 < nsplit) ? pp[(l + 32) * (d + 2)] : NEG_INF;
        float l0 = (l < nsplit) ? pp[l * (d + 2) + 1] : 0.f, l1 = (l + 32 < nsplit) ? pp[(l + 32) * (d + 2) + 1] : 0.f;
        float M = warp_max(fmaxf(sinks[h], fmaxf(m0, m1)));
        float w0 = (m0 == NEG_INF) ? 0.f : expf(m0 - M), w1 = (m1 == NEG_INF) ? 0.f : expf(m1 - M);
        if (l < nsplit) wsp[l] = w0;
        if (l + 32 < nsplit) wsp[l + 32] = w1;
        // the denominator in split order, as before (sink first, then the
        // splits): the products go to lane 0 through shared memory
        float lw0 = w0 * l0, lw1 = w1 * l1;
        if (l < nsplit) lw_s[l] = lw0;
        if (l + 32 < nsplit) lw_s[l + 32] = lw1;
        __syncwarp();
        if (l == 0) {
            float den = expf(sinks[h] - M);
            for (int s2 = 0; s2 < nsplit; s2++) den += lw_s[s2];
            den_s = den;
        }
    }
    __syncthreads();
    trace_mark(11);
    for (int c0 = 0; c0 < ce - cb; c0 += 4 * blockDim.x) {
        // per dim: v = sum over splits in order of w_s * o_s, then / den
        float v[4] = {0.f, 0.f, 0.f, 0.f};
        for (int s0 = 0; s0 < nsplit; s0 += 16) {
            if (c0 > 0 || s0 > 0) load(c0, s0);
#pragma unroll
            for (int u = 0; u < 16; u++)
                if (s0 + u < nsplit) {
                    float w = wsp[s0 + u];
#pragma unroll
                    for (int r = 0; r < 4; r++) v[r] = __fmaf_rn(w, pv[r][u], v[r]);
                }
        }
#pragma unroll
        for (int r = 0; r < 4; r++) {
            int i = cb + c0 + r * blockDim.x + threadIdx.x;
            if (i < ce) o[i] = v[r] / den_s;
        }
    }
    __syncthreads();
    trace_mark(12);
    for (int i = threadIdx.x; i < rd / 2; i += blockDim.x)
        if (d - rd + 2 * i >= cb && d - rd + 2 * i < ce) rope_pair(&o[d - rd + 2 * i], &o[d - rd + 2 * i + 1], omega[i], p, true);
    __syncthreads();
    trace_mark(13);
    for (int b0 = cb; b0 < ce; b0 += blockDim.x) {
        int i = b0 + threadIdx.x;
        bool ok = i < ce;
        float v = ok ? o[i] : 0.f;
        u64 flat = ((u64)t * h_count + h) * d + i;
        if (ok) out[flat] = v;
        if (q0) quant_vals(v, ok, flat, q0, d0, 0, 0);
    }
}

// vis[t] = (p0 + t + 1) / ratio: compressed rows visible to chunk token t.
extern "C" __global__ void set_vis(const int* p0p, int n, int ratio, int* vis) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t < n) vis[t] = (*p0p + t + 1) / ratio;
}
// The sequence position lives on the device so a captured decode step can be replayed.
extern "C" __global__ void advance_pos(int* p0p, int n) {
    if (threadIdx.x == 0 && blockIdx.x == 0) *p0p += n;
}
