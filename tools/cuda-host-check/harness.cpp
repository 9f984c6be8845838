// Host emulation of the packed-row device code of crates/cuda/src/kernels/attn.cu
// (the "Packed compressed rows" section, compiled as C++ with CUDA shims: one
// std::thread per CUDA thread of a 128-thread block, barriers for the warp
// shuffles). Checks against crates/engine/src/pack.rs, via vectors written by
// the packed_row_vectors example: packing gives the same bytes, decoding the
// same f32 bits; plus pack_exp and every code x every scale against exact
// double arithmetic. Run by tools/cuda-host-check.sh (needs g++ with C++20).
#include <cstdint>
#include <cstring>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <thread>
#include <barrier>
#include <algorithm>
#include <functional>
typedef unsigned char u8; typedef unsigned int u32; typedef unsigned long long u64;
#define __device__
#define __forceinline__ inline
struct dim3s { int x; };
thread_local dim3s threadIdx; dim3s blockDim{128};
inline float __uint_as_float(u32 u) { float f; memcpy(&f, &u, 4); return f; }
inline u32 __float_as_uint(float f) { u32 u; memcpy(&u, &f, 4); return u; }
inline u32 __funnelshift_r(u32 lo, u32 hi, u32 sh) { u64 v = ((u64)hi << 32) | lo; return (u32)(v >> (sh & 31)); }
inline int __clz(u32 x) { return x ? __builtin_clz(x) : 32; }
struct float4 { float x, y, z, w; };
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
using std::min; using std::max;
// warp exchange
static std::barrier<>* wbar[4];
static u32 xbuf[4][32];
inline u32 xchg(u32 v, int src) {
    int w = threadIdx.x >> 5, l = threadIdx.x & 31;
    xbuf[w][l] = v; wbar[w]->arrive_and_wait();
    u32 r = xbuf[w][src]; wbar[w]->arrive_and_wait();
    return r;
}
inline float __shfl_xor_sync(u32, float v, int o) { return __uint_as_float(xchg(__float_as_uint(v), (threadIdx.x & 31) ^ o)); }
inline u32 __shfl_down_sync(u32, u32 v, int o) { int l = threadIdx.x & 31; return xchg(v, l + o < 32 ? l + o : l); }
inline float warp_max(float v) { for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o)); return v; }
#include "packed_section.inc"  // extracted from attn.cu by tools/cuda-host-check.sh

void run_block(std::function<void()> f) {
    std::barrier<> b0(32), b1(32), b2(32), b3(32);
    wbar[0] = &b0; wbar[1] = &b1; wbar[2] = &b2; wbar[3] = &b3;
    std::vector<std::thread> ts;
    for (int t = 0; t < 128; t++) ts.emplace_back([t, &f] { threadIdx.x = t; f(); });
    for (auto& t : ts) t.join();
}

int main(int argc, char** argv) {
    if (argc < 2) { fprintf(stderr, "usage: harness VECTORS\n"); return 2; }
    // pack_exp against a brute-force reference over many magnitudes (incl. f32 subnormals)
    long bad = 0, checked = 0;
    for (int k = 0; k < 2000000; k++) {
        u32 bits = (u32)rand() * 2654435761u ^ (u32)rand();
        bits &= 0x7fffffffu;
        if ((bits >> 23) == 255) continue;
        float a = __uint_as_float(bits);
        struct { double g; int gexp; u32 gman; int z; } gs[2] = {{448.0, 8, 0x600000u, -22}, {6.0, 2, 0x400000u, -126}};
        for (auto& g : gs) {
            int want;
            if (a == 0.f) want = g.z;
            else { want = -127; while (want < 127 && g.g * ldexp(1.0, want) < (double)a) want++; }
            int got = pack_exp(a, g.gexp, g.gman, g.z);
            checked++;
            if (got != want) { if (bad < 5) printf("pack_exp(%g) = %d, want %d\n", a, got, want); bad++; }
        }
    }
    printf("pack_exp: %ld of %ld wrong\n", bad, checked);
    // every ue8m0 byte and pow2_neg
    for (int e = 0; e < 255; e++) if (ue8m0_scale(e) != (float)ldexp(1.0, e - 127)) { printf("ue8m0 %d\n", e); bad++; }
    for (int e = -127; e <= 127; e++) if (pow2_neg(e) != (float)ldexp(1.0, -e)) { printf("pow2_neg %d\n", e); bad++; }
    // every e4m3 / e2m1 code times every scale, against exact double arithmetic
    for (u32 c = 0; c < 256; c++) {
        if ((c & 0x7f) == 0x7f) continue;
        int ex = (c >> 3) & 15, m = c & 7;
        double a = ex ? (1.0 + m / 8.0) * ldexp(1.0, ex - 7) : m * ldexp(1.0, -9);
        if (c & 0x80) a = -a;
        for (u32 e = 0; e < 255; e++) {
            double want = a * ldexp(1.0, (int)e - 127);
            float got = e4m3_value(c) * ue8m0_scale(e);
            if (fabs(want) < 3.4e38 && ((float)want != got || std::signbit((float)want) != std::signbit(got))) { if (bad++ < 5) printf("e4m3 %02x e %d: %g want %g\n", c, e, got, want); }
        }
    }
    for (u32 c = 0; c < 16; c++) {
        double g[8] = {0, 0.5, 1, 1.5, 2, 3, 4, 6};
        double a = (c & 8) ? -g[c & 7] : g[c & 7];
        for (u32 e = 0; e < 255; e++) {
            double want = a * ldexp(1.0, (int)e - 127);
            float got = e2m1_value(c) * ue8m0_scale(e);
            if (fabs(want) < 3.4e38 && ((float)want != got || std::signbit((float)want) != std::signbit(got))) { if (bad++ < 5) printf("e2m1 %x e %d: %g want %g\n", c, e, got, want); }
        }
    }
    // bf16 round to nearest even against the nearer of the two bf16 neighbours (ties: even)
    for (long k = 0; k < 4000000; k++) {
        u32 u = ((u32)rand() << 16) ^ (u32)rand();
        if (k % 4 == 0) u = (u & 0xffff0000u) | 0x8000u;  // exact ties
        if (((u >> 23) & 255) == 255) continue;
        u32 lo = u & 0xffff0000u, hi = lo + 0x10000u;
        double x = __uint_as_float(u), dl = fabs(x - (double)__uint_as_float(lo));
        double dh = (((hi >> 23) & 255) == 255) ? INFINITY : fabs((double)__uint_as_float(hi) - x);
        if (((hi >> 23) & 255) == 255 && (hi & 0x7fffffu) == 0) dh = fabs(ldexp(1.0, 128) - fabs(x));  // rounding up to inf
        u32 want = (dl < dh || (dl == dh && !(lo & 0x10000u))) ? lo >> 16 : hi >> 16;
        if (bf16_rne(x) != want) { if (bad++ < 5) printf("bf16_rne(%08x) = %04x, want %04x\n", u, bf16_rne(x), want); }
    }
    printf("code tables, bf16 rounding: %ld wrong so far\n", bad);
    FILE* f = fopen(argv[1], "rb");
    long rows_ok = 0, rows_bad = 0;
    u32 h[6];
    while (fread(h, 4, 6, f) == 6) {
        int kind = h[0], d = h[1], rd = h[2], bf = h[3], n = h[4], rb = h[5];
        int stride = (rb + 3) / 4 * 4;
        std::vector<float> v(d);
        std::vector<u8> want(rb), got(stride + 16), packed(stride);
        int nope = d - rd, nblk = (nope + 63) / 64;
        long cb = 0;
        for (int r = 0; r < n; r++) {
            fread(v.data(), 4, d, f);
            fread(want.data(), 1, rb, f);
            std::fill(got.begin(), got.end(), 0xAB);
            std::vector<u8> out(stride, 0);
            run_block([&] { if (kind) pack_fp4_row(v.data(), out.data(), d); else pack_fp8_row(v.data(), out.data(), d, rd, bf); });
            bool ok = memcmp(out.data(), want.data(), rb) == 0;
            for (int i = rb; i < stride; i++) ok = ok && out[i] == 0;
            // decode (from the CPU bytes, at a 4-aligned copy)
            memcpy(packed.data(), want.data(), rb);
            for (int c = 0; c < d; c++) {
                float x = kind ? idx_row_val(packed.data(), c, d) : attn_row_val(packed.data(), c, nope, nblk, bf);
                if (__float_as_uint(x) != __float_as_uint(v[c])) { ok = false; if (cb++ < 3) printf("decode kind %d d %d row %d dim %d: %08x want %08x\n", kind, d, r, c, __float_as_uint(x), __float_as_uint(v[c])); }
            }
            if (!kind && d % 4 == 0) for (int c0 = 0; c0 < d; c0 += 4) {
                float4 q = attn_row4(packed.data(), c0, nope, nblk, bf);
                float qq[4] = {q.x, q.y, q.z, q.w};
                for (int k = 0; k < 4; k++) if (__float_as_uint(qq[k]) != __float_as_uint(v[c0 + k])) { ok = false; if (cb++ < 3) printf("row4 d %d dim %d\n", d, c0 + k); }
            }
            if (!ok && rows_bad < 5) {
                printf("mismatch kind %d d %d rd %d bf16 %d row %d\n", kind, d, rd, bf, r);
                for (int i = 0; i < rb; i++) if (out[i] != want[i]) { printf("  byte %d: %02x want %02x\n", i, out[i], want[i]); break; }
            }
            (ok ? rows_ok : rows_bad)++;
        }
    }
    printf("rows: %ld ok, %ld bad\n", rows_ok, rows_bad);
    return (bad || rows_bad) ? 1 : 0;
}
