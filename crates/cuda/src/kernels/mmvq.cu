// 8-bit activation matrix-vector products (the `Numerics::Q8` path, ds4's and
// ggml's numerics): activations are quantised once per vector, exactly as the
// CPU's `dsv4_gguf::kernels::quantize_acts` does (Q8_0 blocks of 32 for Q8_0
// weights, Q8_K blocks of 256 for Q2_K / Q4_K / IQ2_XXS), and the weight
// blocks are multiplied with integer dot products (dp4a). The integer sums
// are exact, so a row's result differs from the CPU's `matvec_q8` only in the
// order its per-block float terms are added.
//
// Why: the f32-activation kernels (matvec.cu) load 4 bytes of x per weight
// value through L1 — 15x the weight bytes for IQ2_XXS — and convert every
// weight to float; here x costs 1 byte per value and 4 values go through one
// instruction.
//
// Quantised activations of n rows of `cols` values: codes `q` [n][cols] (i8,
// row stride qs bytes), scales `d` [n][cols / blk] (f32, row stride ds).
//
// Matvec layout (as matvec.cu): one warp per weight row; per iteration a warp
// covers one contiguous chunk of the row, every lane takes its own run of
// values, so a warp's x loads are one contiguous run.
//   Q8_0   : chunk 16 blocks (512 values), lane -> block lane/2, 16 values
//   Q2_K   : chunk 2 blocks, lane -> block lane/16, 16 values
//   Q4_K   : chunk 1 block, lane -> values 8*lane .. +8
//   IQ2_XXS: chunk 4 blocks, lane -> block lane/8, group lane%8 (32 values)

// --- activation quantisation ------------------------------------------------

// Quantise values held one per thread, for producer kernels that emit their
// output in 8-bit form too (fused: no separate pass). Called uniformly by every
// thread of the block (it synchronises); thread t holds the value of flat
// index i (row-major [rows][cols], stride cols) with valid = i inside. Each
// warp holds one aligned run of 32 (Q8_0 block) and each group of 256
// consecutive threads one aligned run of 256 (Q8_K block), valid or not as a
// whole; blockDim is a multiple of 256 (at most 1024) when qk is set.
// q0/d0 (Q8_0, may be null): d = amax/127, q = rint(x * (1/d)).
// qk/dk (Q8_K, may be null): the signed value of largest |x| (first on ties)
// gives iscale = -127/max, q = rint(iscale * x) clamped, d = 1/iscale.
// Bit for bit the CPU's `quantize_acts_q8_0` / `quantize_acts_q8_k`.
__device__ __forceinline__ void quant_vals(float v, bool valid, u64 i, i8* q0, float* d0, i8* qk, float* dk) {
    __shared__ float qs_abs[32];
    __shared__ int qs_idx[32];
    __shared__ float qs_val[4];
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, grp = threadIdx.x >> 8;
    float a = valid ? fabsf(v) : 0.f;
    if (q0) {
        float amax = warp_max(a);
        float d = __fdiv_rn(amax, 127.0f);
        float id = (amax != 0.f) ? __fdiv_rn(1.0f, d) : 0.f;
        if (valid) {
            q0[i] = (i8)(int)fminf(fmaxf(rintf(__fmul_rn(v, id)), -128.f), 127.f);
            if (lane == 0) d0[i / 32] = d;
        }
    }
    if (qk) {
        // arg-max of |x| within each group of 256, lowest index on ties
        float ba = a;
        int bi = threadIdx.x & 255;
        warp_argmax(ba, bi);
        if (lane == 0) { qs_abs[w] = ba; qs_idx[w] = bi; }
        __syncthreads();
        if ((w & 7) == 0) {
            ba = (lane < 8) ? qs_abs[w + lane] : -1.f;
            bi = (lane < 8) ? qs_idx[w + lane] : 1 << 30;
            warp_argmax(ba, bi);
            if (lane == 0) { qs_abs[w] = ba; qs_idx[w] = bi; }
        }
        __syncthreads();
        float amax = qs_abs[grp * 8];
        if ((threadIdx.x & 255) == qs_idx[grp * 8]) qs_val[grp] = v;
        __syncthreads();
        if (valid) {
            if (amax == 0.f) {
                qk[i] = 0;
                if ((threadIdx.x & 255) == 0) dk[i / 256] = 0.f;
            } else {
                float is = __fdiv_rn(-127.0f, qs_val[grp]);
                qk[i] = (i8)(int)fminf(fmaxf(rintf(__fmul_rn(is, v)), -128.f), 127.f);
                if ((threadIdx.x & 255) == 0) dk[i / 256] = __fdiv_rn(1.0f, is);
            }
        }
        __syncthreads(); // shared arrays are reused by the next call
    }
}

// Stand-alone quantisation of `rows` vectors of `cols` floats (input row
// stride xs; output rows compact: codes stride cols, scales stride cols/32 or
// cols/256). Grid (ceil(cols/256), rows), 256 threads.
extern "C" __global__ void quant_q8(const float* x, int xs, int cols, i8* q0, float* d0, i8* qk, float* dk) {
    int row = blockIdx.y;
    int c = blockIdx.x * 256 + threadIdx.x;
    bool valid = c < cols;
    float v = valid ? x[(u64)row * xs + c] : 0.f;
    quant_vals(v, valid, (u64)row * cols + c, q0, d0, qk, dk);
}

// --- integer dot products -------------------------------------------------------

// IQ2_XXS values through one byte permute: every grid value is 8, 25 or 43,
// so a grid row is 8 codes 0..2; with the sign as +4 the 3-bit selector picks
// the signed byte out of the pair (IQ2_POS, IQ2_NEG). `gsel` holds a grid
// row's 8 selector nibbles, `sign_sel` the sign nibbles (+4) of a 7-bit sign
// index; their OR drives two PRMTs per 8 values: one 4-byte shared load
// instead of 2 x 8-byte ones plus negation arithmetic (the u64 look-ups
// bank-conflicted).
#define IQ2_POS 0x002B1908u
#define IQ2_NEG 0x00D5E7F8u

// PRMT with the selector as is: its low 16 bits are the four byte selectors
// (nibble bit 3 clear here, so no sign replication); __byte_perm would mask
// them first, two extra instructions per 8 values.
__device__ __forceinline__ u32 prmt_raw(u32 a, u32 b, u32 sel) {
    u32 r;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(sel));
    return r;
}

// Sign nibbles of a 7-bit IQ2 sign index by arithmetic (no table look-up:
// shared-memory look-ups with random indices bank-conflict, and were the
// kernel's limiter): the 8th sign is the parity of the 7 stored ones (an even
// number of negatives, ksigns_iq2xs), then bit m moves to bit 4m+2.
__device__ __forceinline__ u32 sign_sel(u32 i7) {
    u32 x = i7 | ((__popc(i7) & 1u) << 7);
    x = (x | (x << 12)) & 0x000F000Fu;
    x = (x | (x << 6)) & 0x03030303u;
    x = (x | (x << 3)) & 0x11111111u;
    return x << 2;
}

// One lane's 32 IQ2_XXS values of a group (grid halves a0, signs and scale
// a1) as 8 words of signed bytes.
// pos / neg: IQ2_POS / IQ2_NEG held in registers by the caller (as constants
// the compiler re-materialised one of them before every PRMT).
__device__ __forceinline__ void iq2_group_vals(u32 a0, u32 a1, const u32* gsel, int (&v)[8], u32 pos = IQ2_POS, u32 neg = IQ2_NEG) {
#pragma unroll
    for (int k = 0; k < 4; k++) {
        u32 sel = gsel[(a0 >> (8 * k)) & 255] | sign_sel((a1 >> (7 * k)) & 127);
        v[2 * k] = (int)prmt_raw(pos, neg, sel);
        v[2 * k + 1] = (int)prmt_raw(pos, neg, sel >> 16);
    }
}

// Replicated look-up tables (the paired decode kernel's `rep` variant):
// entry e for lane l at word e * 32 + l, so a warp's 32 random look-ups hit
// 32 different banks (one wavefront; one shared copy averaged ~3.5 for
// random indices). Entries 0..255: the grid selectors (IQ2_GSEL); 256..383:
// sign_sel of each 7-bit sign index, so the signs cost one load instead of
// ~10 integer instructions per 8 values (the kernel is issue-bound).
#define IQ2_REP_ENTRIES 384
__device__ __forceinline__ void stage_iq2_rep(u32* tab) {
    int lane = threadIdx.x & 31;
    for (int e = threadIdx.x; e < IQ2_REP_ENTRIES; e += blockDim.x) {
        u32 v = e < 256 ? IQ2_GSEL[e] : sign_sel((u32)(e - 256));
        uint4 v4 = make_uint4(v, v, v, v);
        // the 8 chunks of the entry in a lane-rotated order: the 8 lanes of a
        // store phase write 8 different bank groups
#pragma unroll
        for (int i = 0; i < 8; i++) *(uint4*)(tab + e * 32 + 4 * ((i + lane) & 7)) = v4;
    }
    __syncthreads();
}
// iq2_group_vals through the replicated tables (tl = tab + lane). Byte
// offsets built as (index << 7) | (lane << 2): one shift and one LOP3 per
// look-up (index * 32 + lane then * 4 took three instructions).
__device__ __forceinline__ void iq2_group_vals_rep(u32 a0, u32 a1, const u32* tl, int (&v)[8], u32 pos, u32 neg) {
    const char* tb = (const char*)(tl - (threadIdx.x & 31));
    u32 l4 = (threadIdx.x & 31) << 2;
#pragma unroll
    for (int k = 0; k < 4; k++) {
        // grid index: bits 8k..8k+7 of a0 -> bits 7..14; sign index: bits
        // 7k..7k+6 of a1 -> bits 7..13 (entries 256.. start at byte 32768)
        u32 gi = (k == 0 ? a0 << 7 : a0 >> (8 * k - 7)) & 0x7F80u;
        u32 si = (k == 0 ? a1 << 7 : k == 1 ? a1 : a1 >> (7 * k - 7)) & 0x3F80u;
        u32 sel = *(const u32*)(tb + (gi | l4)) | *(const u32*)(tb + 32768 + (si | l4));
        v[2 * k] = (int)prmt_raw(pos, neg, sel);
        v[2 * k + 1] = (int)prmt_raw(pos, neg, sel >> 16);
    }
}

// A lane's IQ2_XXS group g of block b (66 bytes: f16 scale, then 8 bytes
// per group): the scale, the 4 grid indices (a0) and signs + scale (a1).
__device__ __forceinline__ void iq2_load(const u8* wr, int b, int g, float& d, u32& a0, u32& a1) {
    const u8* blk = wr + b * 66;
    d = h2f(ld16(blk));
    const u16* qp = (const u16*)(blk + 2 + 8 * g);
    a0 = (u32)qp[0] | ((u32)qp[1] << 16);
    a1 = (u32)qp[2] | ((u32)qp[3] << 16);
}

// Each lane first issues the weight loads of U iterations (all independent),
// then does their arithmetic: a warp has U chunks of its row in flight
// instead of one, which is what keeps enough bytes moving per SM (a row of a
// 4096-wide expert is only 4-16 iterations long, so latency, not bandwidth,
// bounded the one-at-a-time loop).
#define MQ_U 4
// Q8_0 weights in the short-row lane mapping (same bytes as T_Q8_0)
#define T_Q8_0S 7

template <int TY, int NT>
__device__ __forceinline__ void row_dotq(const u8* wr, int cols, const i8* xq, int xqs, const float* xd, int xds, int n, int lane, int c0, int cs,
                                         const u32* gsel, float (&acc)[NT]) {
    if (TY == T_Q8_0) {
        // chunk = 16 blocks; lane -> block lane/2, half lane%2 (16 values).
        // The 16 code bytes sit at 2 (mod 4) or 0 (mod 4): five aligned words
        // and four funnel shifts instead of eight 2-byte loads (the kernel was
        // L1-request bound). The fifth word may lie past the matrix end:
        // allocations carry 16 spare bytes (Gpu::alloc).
        int nb = cols / 32;
        int nch = (nb + 15) / 16;
        int hf = lane & 1;
        for (int c = c0; c < nch; c += MQ_U * cs) {
            int w[MQ_U][4], bb[MQ_U];
            float dw[MQ_U];
#pragma unroll
            for (int u = 0; u < MQ_U; u++) {
                int b = (c + u * cs) * 16 + (lane >> 1);
                bb[u] = (c + u * cs < nch && b < nb) ? b : -1;
                if (bb[u] >= 0) {
                    const u8* blk = wr + (u64)b * 34;
                    dw[u] = h2f(ld16(blk));
                    u64 A = (u64)(blk + 2 + 16 * hf);
                    const u32* A4 = (const u32*)(A & ~3ull);
                    u32 sh = (u32)(A & 3) * 8;
                    u32 r0 = A4[0], r1 = A4[1], r2 = A4[2], r3 = A4[3], r4 = A4[4];
                    w[u][0] = (int)__funnelshift_r(r0, r1, sh);
                    w[u][1] = (int)__funnelshift_r(r1, r2, sh);
                    w[u][2] = (int)__funnelshift_r(r2, r3, sh);
                    w[u][3] = (int)__funnelshift_r(r3, r4, sh);
                }
            }
#pragma unroll
            for (int u = 0; u < MQ_U; u++) {
                if (bb[u] < 0) continue;
                int b = bb[u];
#pragma unroll
                for (int t = 0; t < NT; t++)
                    if (t < n) {
                        int4 xv = *(const int4*)(xq + (u64)t * xqs + b * 32 + 16 * hf);
                        int s = __dp4a(w[u][0], xv.x, __dp4a(w[u][1], xv.y, __dp4a(w[u][2], xv.z, __dp4a(w[u][3], xv.w, 0))));
                        acc[t] += (float)s * (dw[u] * xd[(u64)t * xds + b]);
                    }
            }
        }
    } else if (TY == T_Q8_0S) {
        // Q8_0 rows of fewer than 64 blocks (q_b: 32): 16-block chunks would
        // leave most of the MQ_U slots empty, so chunk = 8 blocks, lane ->
        // block lane/4, 8 values (three aligned words, two funnel shifts)
        int nb = cols / 32;
        int nch = (nb + 7) / 8;
        int qt = lane & 3;
        for (int c = c0; c < nch; c += MQ_U * cs) {
            int w[MQ_U][2], bb[MQ_U];
            float dw[MQ_U];
#pragma unroll
            for (int u = 0; u < MQ_U; u++) {
                int b = (c + u * cs) * 8 + (lane >> 2);
                bb[u] = (c + u * cs < nch && b < nb) ? b : -1;
                if (bb[u] >= 0) {
                    const u8* blk = wr + (u64)b * 34;
                    dw[u] = h2f(ld16(blk));
                    u64 A = (u64)(blk + 2 + 8 * qt);
                    const u32* A4 = (const u32*)(A & ~3ull);
                    u32 sh = (u32)(A & 3) * 8;
                    u32 r0 = A4[0], r1 = A4[1], r2 = A4[2];
                    w[u][0] = (int)__funnelshift_r(r0, r1, sh);
                    w[u][1] = (int)__funnelshift_r(r1, r2, sh);
                }
            }
#pragma unroll
            for (int u = 0; u < MQ_U; u++) {
                if (bb[u] < 0) continue;
                int b = bb[u];
#pragma unroll
                for (int t = 0; t < NT; t++)
                    if (t < n) {
                        int2 xv = *(const int2*)(xq + (u64)t * xqs + b * 32 + 8 * qt);
                        int s = __dp4a(w[u][0], xv.x, __dp4a(w[u][1], xv.y, 0));
                        acc[t] += (float)s * (dw[u] * xd[(u64)t * xds + b]);
                    }
            }
        }
    } else if (TY == T_Q2_K) {
        // chunk = 2 blocks; lane -> block lane/16, sub-block sb = lane%16 (16
        // values, one scale byte): 16 values per lane halve the per-value
        // address / scale work (the kernel is issue-bound)
        int nb = cols / 256;
        int nch = (nb + 1) / 2;
        int sb = lane & 15;
        int h = sb >> 3, j = (sb >> 1) & 3, half = sb & 1;
        for (int c = c0; c < nch; c += MQ_U * cs) {
            u32 dd[MQ_U], sc[MQ_U], q[MQ_U][4];
            int bb[MQ_U];
#pragma unroll
            for (int u = 0; u < MQ_U; u++) {
                int b = (c + u * cs) * 2 + (lane >> 4);
                bb[u] = (c + u * cs < nch && b < nb) ? b : -1;
                if (bb[u] >= 0) {
                    const u8* blk = wr + b * 84;
                    dd[u] = *(const u32*)(blk + 80);
                    sc[u] = blk[sb];
                    const u32* qp = (const u32*)(blk + 16 + 32 * h + 16 * half);
#pragma unroll
                    for (int w = 0; w < 4; w++) q[u][w] = qp[w];
                }
            }
#pragma unroll
            for (int u = 0; u < MQ_U; u++) {
                if (bb[u] < 0) continue;
                int b = bb[u];
                float d = h2f((u16)(dd[u] & 0xffff)), dmin = h2f((u16)(dd[u] >> 16));
                float fd = d * (float)(sc[u] & 15), fm = dmin * (float)(sc[u] >> 4);
                int t4[4];
#pragma unroll
                for (int w = 0; w < 4; w++) t4[w] = (int)((q[u][w] >> (2 * j)) & 0x03030303u);
#pragma unroll
                for (int t = 0; t < NT; t++)
                    if (t < n) {
                        int4 xv = *(const int4*)(xq + (u64)t * xqs + b * 256 + 16 * sb);
                        int sq = __dp4a(t4[0], xv.x, __dp4a(t4[1], xv.y, __dp4a(t4[2], xv.z, __dp4a(t4[3], xv.w, 0))));
                        int sx = __dp4a(0x01010101, xv.x, __dp4a(0x01010101, xv.y, __dp4a(0x01010101, xv.z, __dp4a(0x01010101, xv.w, 0))));
                        acc[t] += xd[(u64)t * xds + b] * (fd * (float)sq - fm * (float)sx);
                    }
            }
        }
    } else if (TY == T_Q4_K) {
        int nb = cols / 256;
        int c64 = lane >> 3, w = (lane & 7) * 8, hi = w >= 32;
        int s_ = 2 * c64 + hi;
        int sh = hi ? 4 : 0;
        for (int c = c0; c < nb; c += MQ_U * cs) {
            u32 dd[MQ_U], q0[MQ_U], q1[MQ_U], sa[MQ_U], sb[MQ_U];
#pragma unroll
            for (int u = 0; u < MQ_U; u++) {
                int b = c + u * cs;
                if (b < nb) {
                    const u8* blk = wr + b * 144;
                    dd[u] = *(const u32*)blk;
                    const u8* S = blk + 4;
                    // the bytes this lane's (scale, min) pair is built from
                    sa[u] = (s_ < 4) ? S[s_] : S[s_ + 4];
                    sb[u] = (s_ < 4) ? S[s_ + 4] : ((u32)S[s_ - 4] | ((u32)S[s_] << 8));
                    const u32* qp = (const u32*)(blk + 16 + 32 * c64 + (w & 31));
                    q0[u] = qp[0];
                    q1[u] = qp[1];
                }
            }
#pragma unroll
            for (int u = 0; u < MQ_U; u++) {
                int b = c + u * cs;
                if (b >= nb) continue;
                float d = h2f((u16)(dd[u] & 0xffff)), dmin = h2f((u16)(dd[u] >> 16));
                int scv, m;
                if (s_ < 4) { scv = sa[u] & 63; m = sb[u] & 63; }
                else { scv = (sa[u] & 15) | (((sb[u] & 0xff) >> 6) << 4); m = (sa[u] >> 4) | (((sb[u] >> 8) >> 6) << 4); }
                int n0 = (int)((q0[u] >> sh) & 0x0F0F0F0Fu), n1 = (int)((q1[u] >> sh) & 0x0F0F0F0Fu);
                float fd = d * (float)scv, fm = dmin * (float)m;
#pragma unroll
                for (int t = 0; t < NT; t++)
                    if (t < n) {
                        int2 xv = *(const int2*)(xq + (u64)t * xqs + b * 256 + 8 * lane);
                        int sq = __dp4a(n0, xv.x, __dp4a(n1, xv.y, 0));
                        int sx = __dp4a(0x01010101, xv.x, __dp4a(0x01010101, xv.y, 0));
                        acc[t] += xd[(u64)t * xds + b] * (fd * (float)sq - fm * (float)sx);
                    }
            }
        }
    } else if (TY == T_IQ2_XXS) {
        int nb = cols / 256;
        int nch = (nb + 3) / 4;
        int g = lane & 7;
        for (int c = c0; c < nch; c += MQ_U * cs) {
            u32 A0[MQ_U], A1[MQ_U];
            float D[MQ_U];
            int bb[MQ_U];
#pragma unroll
            for (int u = 0; u < MQ_U; u++) {
                int b = (c + u * cs) * 4 + (lane >> 3);
                bb[u] = (c + u * cs < nch && b < nb) ? b : -1;
                if (bb[u] >= 0) iq2_load(wr, b, g, D[u], A0[u], A1[u]);
            }
#pragma unroll
            for (int u = 0; u < MQ_U; u++) {
                if (bb[u] < 0) continue;
                int b = bb[u];
                u32 a1 = A1[u];
                // the group's 32 signed values as 8 words of 4 bytes
                int v[8];
                iq2_group_vals(A0[u], a1, gsel, v);
                float fs = D[u] * 0.125f * (float)(2 * (int)(a1 >> 28) + 1);
#pragma unroll
                for (int t = 0; t < NT; t++)
                    if (t < n) {
                        const int4* xp = (const int4*)(xq + (u64)t * xqs + b * 256 + 32 * g);
                        int4 xa = xp[0], xb = xp[1];
                        int s = __dp4a(v[0], xa.x, __dp4a(v[1], xa.y, __dp4a(v[2], xa.z, __dp4a(v[3], xa.w, 0))));
                        s = __dp4a(v[4], xb.x, __dp4a(v[5], xb.y, __dp4a(v[6], xb.z, __dp4a(v[7], xb.w, s))));
                        acc[t] += (float)s * (fs * xd[(u64)t * xds + b]);
                    }
            }
        }
    }
}

// Decode pair (gate and up of one expert slot): one warp takes row r of both
// matrices, so the block's table staging, the slot set-up, the x loads and
// the warp's fixed costs are shared by two rows (a 4096-wide row is only 4
// groups per lane: those costs were a quarter of the paired kernel's
// instructions), and both rows' weight loads are in flight together. Lane
// mapping and the order of the additions per row are those of row_dotq.
template <bool REP, int U = MQ_U>
__device__ __forceinline__ void iq2_pair_dot(const u8* w1, const u8* w2, int cols, const i8* xq, const float* xd, int lane,
                                             const u32* gsel, float& acc1, float& acc2) {
    int nb = cols / 256;
    int nch = (nb + 3) / 4;
    int g = lane & 7;
    // a per-thread copy (its value is IQ2_POS: laneid < 32), so it lives in a
    // vector register; as a warp-uniform constant it was copied from a uniform
    // register before every PRMT
    u32 z;
    asm volatile("mov.u32 %0, %%laneid;" : "=r"(z));
    u32 pos = IQ2_POS + (z >> 5), neg = IQ2_NEG;
    for (int c = 0; c < nch; c += U) {
        u32 A0[2][U], A1[2][U];
        float D[2][U];
        int bb[U];
#pragma unroll
        for (int u = 0; u < U; u++) {
            int b = (c + u) * 4 + (lane >> 3);
            bb[u] = (c + u < nch && b < nb) ? b : -1;
            if (bb[u] >= 0) {
#pragma unroll
                for (int r = 0; r < 2; r++) iq2_load(r ? w2 : w1, b, g, D[r][u], A0[r][u], A1[r][u]);
            }
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            if (bb[u] < 0) continue;
            int b = bb[u];
            const int4* xp = (const int4*)(xq + b * 256 + 32 * g);
            int4 xa = xp[0], xb = xp[1];
            float xs = xd[b];
#pragma unroll
            for (int r = 0; r < 2; r++) {
                int v[8];
                if (REP) iq2_group_vals_rep(A0[r][u], A1[r][u], gsel, v, pos, neg);
                else iq2_group_vals(A0[r][u], A1[r][u], gsel, v, pos, neg);
                float fs = D[r][u] * 0.125f * (float)(2 * (int)(A1[r][u] >> 28) + 1);
                int s = __dp4a(v[0], xa.x, __dp4a(v[1], xa.y, __dp4a(v[2], xa.z, __dp4a(v[3], xa.w, 0))));
                s = __dp4a(v[4], xb.x, __dp4a(v[5], xb.y, __dp4a(v[6], xb.z, __dp4a(v[7], xb.w, s))));
                if (r) acc2 += (float)s * (fs * xs);
                else acc1 += (float)s * (fs * xs);
            }
        }
    }
}

// IQ2 grid selector table in shared memory (see IQ2_POS), built from the grid
// once per block.
template <int TY>
__device__ __forceinline__ void stage_iq2(u32* gsel) {
    if (TY == T_IQ2_XXS) {
        for (int i = threadIdx.x; i < 256; i += blockDim.x) gsel[i] = IQ2_GSEL[i];
        __syncthreads();
    }
}

// Warp per row (rows_per_block = blockDim.x / 32). Indexed (MoE) mode:
// blockIdx.y is slot s, the matrix is expert eids[s], x row s / x_group, y row s.
// Grouped mode: tile blockIdx.y = (matrix, first row, rows) of expert-sorted rows.
// Pair mode (W2 set): blocks with blockIdx.y >= pair use matrix W2 and output
// y2 with slot blockIdx.y - pair: two products of one input in one launch
// (gate and up, the shared expert's w1 and w3).
template <int TY, int NT, bool GROUPED>
__device__ __forceinline__ void mq_body(const u8* W, u64 row_bytes, int rows, int cols, const i8* xq, int xqs, const float* xd, int xds,
                                        float* y, int ys, int n, const int* eids, u64 expert_bytes, int x_group, const int* tiles,
                                        const u8* W2 = 0, float* y2 = 0, int pair = 0) {
    __shared__ u32 gsel[TY == T_IQ2_XXS ? 256 : 1];
    stage_iq2<TY>(gsel);
    int lane = threadIdx.x & 31;
    int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;
    if (GROUPED) {
        const int* tl = tiles + 4 * blockIdx.y;
        if (tl[2] == 0) return;
        W += (u64)tl[0] * expert_bytes;
        xq += (u64)tl[1] * xqs;
        xd += (u64)tl[1] * xds;
        y += (u64)tl[1] * ys;
        n = tl[2];
    } else {
        int s = blockIdx.y;
        if (W2 && s >= pair) {
            W = W2;
            y = y2;
            s -= pair;
        }
        if (eids) {
            W += (u64)eids[s] * expert_bytes;
            xq += (u64)(s / x_group) * xqs;
            xd += (u64)(s / x_group) * xds;
            y += (u64)s * ys;
        }
    }
    const u8* wr = W + (u64)row * row_bytes;
    float acc[NT];
#pragma unroll
    for (int t = 0; t < NT; t++) acc[t] = 0.f;
    row_dotq<TY, NT>(wr, cols, xq, xqs, xd, xds, n, lane, 0, 1, gsel, acc);
#pragma unroll
    for (int t = 0; t < NT; t++) {
        float v = warp_sum(acc[t]);
        if (lane == 0 && t < n) y[(u64)t * ys + row] = v;
    }
}

// Split-K: one block (256 threads) per row, for matrices with few long rows.
template <int TY, int NT>
__device__ __forceinline__ void mqk_body(const u8* W, u64 row_bytes, int rows, int cols, const i8* xq, int xqs, const float* xd, int xds,
                                         float* y, int ys, int n, const int* eids, u64 expert_bytes, int x_group) {
    __shared__ u32 gsel[TY == T_IQ2_XXS ? 256 : 1];
    __shared__ float red[NT][8];
    stage_iq2<TY>(gsel);
    int row = blockIdx.x;
    if (eids) {
        int s = blockIdx.y;
        W += (u64)eids[s] * expert_bytes;
        xq += (u64)(s / x_group) * xqs;
        xd += (u64)(s / x_group) * xds;
        y += (u64)s * ys;
    }
    const u8* wr = W + (u64)row * row_bytes;
    float acc[NT];
#pragma unroll
    for (int t = 0; t < NT; t++) acc[t] = 0.f;
    row_dotq<TY, NT>(wr, cols, xq, xqs, xd, xds, n, threadIdx.x & 31, threadIdx.x >> 5, blockDim.x >> 5, gsel, acc);
    split_k_store<NT>(acc, red, y, ys, row, n);
}

#define MQ_ARGS const u8 *W, u64 row_bytes, int rows, int cols, const i8 *xq, int xqs, const float *xd, int xds, float *y, int ys
#define MQ_KERNEL(NAME, TY, NT)                                                                                     \
    extern "C" __global__ void NAME(MQ_ARGS, int n, const int* eids, u64 expert_bytes, int x_group) {                \
        mq_body<TY, NT, false>(W, row_bytes, rows, cols, xq, xqs, xd, xds, y, ys, n, eids, expert_bytes, x_group, 0); \
    }
#define MQK_KERNEL(NAME, TY, NT)                                                                                 \
    extern "C" __global__ void NAME(MQ_ARGS, int n, const int* eids, u64 expert_bytes, int x_group) {             \
        mqk_body<TY, NT>(W, row_bytes, rows, cols, xq, xqs, xd, xds, y, ys, n, eids, expert_bytes, x_group);      \
    }
#define MQG_KERNEL(NAME, TY)                                                                                  \
    extern "C" __global__ void NAME(MQ_ARGS, u64 expert_bytes, const int* tiles) {                             \
        mq_body<TY, 8, true>(W, row_bytes, rows, cols, xq, xqs, xd, xds, y, ys, 8, 0, expert_bytes, 1, tiles); \
    }
#define MQP_KERNEL(NAME, TY)                                                                                           \
    extern "C" __global__ void NAME(MQ_ARGS, const int* eids, u64 expert_bytes, int x_group, const u8* W2, float* y2, int pair) { \
        mq_body<TY, 1, false>(W, row_bytes, rows, cols, xq, xqs, xd, xds, y, ys, 1, eids, expert_bytes, x_group, 0, W2, y2, pair); \
    }
#define MQ_TYPE(SUFFIX, TY)                                                                                                                     \
    MQ_KERNEL(mq_##SUFFIX##_1, TY, 1) MQ_KERNEL(mq_##SUFFIX##_2, TY, 2) MQ_KERNEL(mq_##SUFFIX##_4, TY, 4) MQ_KERNEL(mq_##SUFFIX##_8, TY, 8)     \
    MQK_KERNEL(mqk_##SUFFIX##_1, TY, 1) MQK_KERNEL(mqk_##SUFFIX##_2, TY, 2) MQK_KERNEL(mqk_##SUFFIX##_4, TY, 4) MQK_KERNEL(mqk_##SUFFIX##_8, TY, 8) \
    MQG_KERNEL(mqg_##SUFFIX, TY) MQP_KERNEL(mqp_##SUFFIX, TY)

MQ_TYPE(q8_0, T_Q8_0)
MQ_TYPE(q8_0s, T_Q8_0S)
MQ_TYPE(q2_k, T_Q2_K)
MQ_TYPE(q4_k, T_Q4_K)
MQ_TYPE(iq2_xxs, T_IQ2_XXS)

// Paired IQ2_XXS decode product (see iq2_pair_dot): grid (ceil(rows / 8),
// slots), 256 threads; y1[s] = W1[eids[s]] xq[s / x_group], y2[s] likewise.
template <bool REP, int U = MQ_U>
__device__ __forceinline__ void mqp2_body(MQ_ARGS, const int* eids, u64 expert_bytes, int x_group, const u8* W2, float* y2, u32* tab) {
    int lane = threadIdx.x & 31;
    int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;
    int s = blockIdx.y;
    u64 eo = eids ? (u64)eids[s] * expert_bytes : 0;
    const u8* w1 = W + eo + (u64)row * row_bytes;
    const u8* w2 = W2 + eo + (u64)row * row_bytes;
    int xr = eids ? s / x_group : 0;
    float acc1 = 0.f, acc2 = 0.f;
    iq2_pair_dot<REP, U>(w1, w2, cols, xq + (u64)xr * xqs, xd + (u64)xr * xds, lane, REP ? tab + lane : tab, acc1, acc2);
    acc1 = warp_sum(acc1);
    acc2 = warp_sum(acc2);
    if (lane == 0) {
        y[(u64)s * ys + row] = acc1;
        y2[(u64)s * ys + row] = acc2;
    }
}
extern "C" __global__ void mqp2_iq2_xxs(MQ_ARGS, const int* eids, u64 expert_bytes, int x_group, const u8* W2, float* y2) {
    __shared__ u32 gsel[256];
    stage_iq2<T_IQ2_XXS>(gsel);
    mqp2_body<false>(W, row_bytes, rows, cols, xq, xqs, xd, xds, y, ys, eids, expert_bytes, x_group, W2, y2, gsel);
}
// The same with the replicated tables (dynamic shared IQ2_REP_ENTRIES * 32
// words, 48 KB), two chunks per row in flight instead of four: 56 registers,
// so 4 blocks fit per SM instead of 3 (more warps hide the latency better
// than more loads per warp: 6.84 -> 6.75 ms per step); bit for bit
// mqp2_iq2_xxs (the same chunks in the same order).
extern "C" __global__ void mqp2r_iq2_xxs(MQ_ARGS, const int* eids, u64 expert_bytes, int x_group, const u8* W2, float* y2) {
    extern __shared__ u32 tab[];
    stage_iq2_rep(tab);
    mqp2_body<true, 2>(W, row_bytes, rows, cols, xq, xqs, xd, xds, y, ys, eids, expert_bytes, x_group, W2, y2, tab);
}
// --- persistent single-token Q8_0 products ------------------------------------
//
// Decode's Q8_0 projections (q_a, q_b, o_a, o_b, the shared expert, the head)
// with one warp per row ran at 2.0-2.7 TB/s inside the decode graph. Their
// weight loads are unaligned words (34-byte blocks): ~30 L1 wavefronts per
// 544 bytes, and the L1/TEX pipe was the limiter (ncu: 86 % busy). Here each
// warp copies its row's bytes with aligned 16-byte loads (rows and matrices
// are 16-byte aligned; 4 wavefronts per 512 bytes) into a per-warp shared
// buffer and the lanes take their blocks from there; the next batch's loads
// are in flight (in registers) while the current one is multiplied. A fixed
// grid (what fits on the GPU at once) walks the flattened (slot, row) space:
// warp gw takes rows gw, gw + NW, ... When the row addresses do not depend on
// a previous kernel (eids null or constant), the first batch is loaded before
// the PDL wait.
//
// Lane mapping and per-lane order of additions are those of row_dotq
// (T_Q8_0: chunk 16 blocks, lane -> block lane/2, 16 values; T_Q8_0S: chunk
// 8 blocks, lane -> block lane/4, 8 values), so results equal the per-row
// kernels bit for bit. x is read from global memory (L1) as there.
template <int CB, int RPI = 1>
struct Q8V {
    static const int BATCH = RPI * MQ_U * CB * 34;  // bytes per batch: MQ_U chunks of RPI rows
    static const int NV = (BATCH / 16 + 31) / 32;    // 16-byte loads per lane
};

__device__ __forceinline__ uint4 ldg_stream(const void* p) {
    uint4 r;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
    return r;
}

// (span: the bytes of the item: its row, or its RPI consecutive rows)
template <int CB, int RPI>
__device__ __forceinline__ void q8v_load(uint4 (&R)[Q8V<CB, RPI>::NV], const u8* wr, u64 span, int bt, int lane) {
    u64 off0 = (u64)bt * Q8V<CB, RPI>::BATCH;
#pragma unroll
    for (int v = 0; v < Q8V<CB, RPI>::NV; v++) {
        int i = v * 32 + lane;
        u64 off = off0 + (u64)i * 16;
        R[v] = (i < Q8V<CB, RPI>::BATCH / 16 && off < span) ? ldg_stream(wr + off) : make_uint4(0, 0, 0, 0);
    }
}

template <int CB, int RPI>
__device__ __forceinline__ void q8v_store(const uint4 (&R)[Q8V<CB, RPI>::NV], u8* buf, int lane) {
#pragma unroll
    for (int v = 0; v < Q8V<CB, RPI>::NV; v++) {
        int i = v * 32 + lane;
        if (i < Q8V<CB, RPI>::BATCH / 16) ((uint4*)buf)[i] = R[v];
    }
}

// acc += batch bt (in buf) against x (codes xq, scales xd)
template <int CB>
__device__ __forceinline__ void q8v_dot(const u8* buf, const i8* xq, const float* xd, int nb, int bt, int lane, float& acc) {
    const int LS = CB == 16 ? 1 : 2;  // log2(lanes per block)
    int part = lane & ((1 << LS) - 1);
#pragma unroll
    for (int u = 0; u < MQ_U; u++) {
        int lb = u * CB + (lane >> LS);
        int b = bt * MQ_U * CB + lb;
        if (b >= nb) continue;
        const u8* blk = buf + lb * 34;
        float dw = h2f(*(const u16*)blk);
        u32 A = (u32)(u64)(blk + 2 + (CB == 16 ? 16 : 8) * part);
        const u32* A4 = (const u32*)(blk + 2 + (CB == 16 ? 16 : 8) * part - (A & 3));
        u32 sh = (A & 3) * 8;
        int s;
        if (CB == 16) {
            u32 r0 = A4[0], r1 = A4[1], r2 = A4[2], r3 = A4[3], r4 = A4[4];
            int4 xv = *(const int4*)(xq + b * 32 + 16 * part);
            s = __dp4a((int)__funnelshift_r(r0, r1, sh), xv.x, __dp4a((int)__funnelshift_r(r1, r2, sh), xv.y,
                  __dp4a((int)__funnelshift_r(r2, r3, sh), xv.z, __dp4a((int)__funnelshift_r(r3, r4, sh), xv.w, 0))));
        } else {
            u32 r0 = A4[0], r1 = A4[1], r2 = A4[2];
            int2 xv = *(const int2*)(xq + b * 32 + 8 * part);
            s = __dp4a((int)__funnelshift_r(r0, r1, sh), xv.x, __dp4a((int)__funnelshift_r(r1, r2, sh), xv.y, 0));
        }
        acc += (float)s * (dw * xd[b]);
    }
}

// y[s][r] = W_s xq[s / x_group] for the flattened f = s * rows + r, s <
// slots (W2 set: as many slots more with W2 / y2, same x). x_group < 0: eids
// are constants (the o_a group stack: readable before the wait); early: load the first batch before the PDL
// wait (a flood of weight loads also slows the kernel it overlaps, so the
// host chooses: 0 none, 1 every warp, 2 half of them). RPI == 2 (short rows of one batch, rows even): an item is
// two consecutive rows (contiguous bytes), loaded as one batch of twice the
// bytes, so a warp keeps as many bytes in flight as with long rows.
// Dynamic shared memory: 8 warps x (BATCH + 16) bytes (the 16: the last
// block's fifth word).
template <int CB, int RPI>
__device__ __forceinline__ void mq1p_body(const u8* W, u64 row_bytes, int rows, int cols, const i8* xq, int xqs, const float* xd, int xds,
                                          float* y, int ys, int slots, const int* eids, u64 expert_bytes, int x_group, const u8* W2, float* y2,
                                          int early_ok) {
    extern __shared__ __align__(16) u8 mq1p_sh[];
    bool static_eids = x_group < 0;
    if (static_eids) x_group = -x_group;
    int lane = threadIdx.x & 31, wp = threadIdx.x >> 5;
    u8* buf = mq1p_sh + wp * (Q8V<CB, RPI>::BATCH + 16);
    int nb = cols / 32;
    int nbat = RPI == 1 ? (nb + MQ_U * CB - 1) / (MQ_U * CB) : 1;
    int S = W2 ? 2 * slots : slots;
    int F = S * rows / RPI;  // items
    int NW = gridDim.x * (blockDim.x >> 5);
    int f = blockIdx.x * (blockDim.x >> 5) + wp, bt = 0;
    // first weight row of item ff
    auto row_ptr = [&](int ff) -> const u8* {
        int fr = ff * RPI;
        int s = fr / rows, r = fr - s * rows;
        const u8* M = W;
        if (s >= slots) {
            M = W2;
            s -= slots;
        }
        if (eids) M += (u64)eids[s] * expert_bytes;
        return M + (u64)r * row_bytes;
    };
    const u64 span = row_bytes * RPI;
    uint4 R[Q8V<CB, RPI>::NV];
    // (early_ok 2: only half the warps, a smaller flood)
    bool early = (early_ok == 1 || (early_ok == 2 && wp < 4)) && (!eids || static_eids);
    if (early && f < F) q8v_load<CB, RPI>(R, row_ptr(f), span, 0, lane);
    pdl_prologue();
    if (!early && f < F) q8v_load<CB, RPI>(R, row_ptr(f), span, 0, lane);
    float acc = 0.f;
    while (f < F) {
        __syncwarp();
        q8v_store<CB, RPI>(R, buf, lane);
        __syncwarp();
        int f2 = f, bt2 = bt + 1;
        if (bt2 == nbat) {
            bt2 = 0;
            f2 += NW;
        }
        if (f2 < F) q8v_load<CB, RPI>(R, row_ptr(f2), span, bt2, lane);
#pragma unroll
        for (int j = 0; j < RPI; j++) {
            int fr = f * RPI + j;
            int s = fr / rows;
            int sx = (s >= slots ? s - slots : s) / x_group;
            q8v_dot<CB>(buf + j * row_bytes, xq + (u64)sx * xqs, xd + (u64)sx * xds, nb, bt, lane, acc);
            if (bt == nbat - 1) {
                float v = warp_sum(acc);
                acc = 0.f;
                if (lane == 0) {
                    int r = fr - s * rows;
                    if (s >= slots) y2[(u64)(s - slots) * ys + r] = v;
                    else y[(u64)s * ys + r] = v;
                }
            }
        }
        f = f2;
        bt = bt2;
    }
}

#define MQ1P_KERNEL(NAME, CB, RPI)                                                                                            \
    extern "C" __global__ void __launch_bounds__(256) NAME(MQ_ARGS, int slots, const int* eids, u64 expert_bytes, int x_group, \
                                                            const u8* W2, float* y2, int early) PDL_MANUAL {                   \
        mq1p_body<CB, RPI>(W, row_bytes, rows, cols, xq, xqs, xd, xds, y, ys, slots, eids, expert_bytes, x_group, W2, y2, early); \
    }
MQ1P_KERNEL(mq1p_q8_0, 16, 1)
MQ1P_KERNEL(mq1p_q8_0s, 8, 1)
MQ1P_KERNEL(mq1p_q8_0s2, 8, 2)
