// Shared helpers for every dsv4 kernel file. NVRTC compiles all kernel files
// as one program: this header, the IQ2 tables (generated from the Rust tables
// so there is one source of truth), then each family's file.
typedef unsigned char u8;
typedef signed char i8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

// Programmatic dependent launch (sm_90): wait until the previous kernel of
// the stream has finished and its writes are visible, then allow the next
// kernel to be scheduled (its blocks wait in their own prologue). Inserted at
// the top of every kernel by device.rs; a no-op for normal launches.
__device__ __forceinline__ void pdl_prologue() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

#define NEG_INF (__int_as_float(0xff800000))

__device__ __forceinline__ float h2f(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ float bf2f(u16 h) { return __uint_as_float(((u32)h) << 16); }
__device__ __forceinline__ u16 ld16(const u8* p) { return *(const u16*)p; }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
// Block-wide sum; every thread gets the result. `sh` needs 32 floats.
__device__ __forceinline__ float block_sum(float v, float* sh) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) sh[w] = v;
    __syncthreads();
    float t = (threadIdx.x < nw) ? sh[threadIdx.x] : 0.f;
    if (w == 0) {
        t = warp_sum(t);
        if (lane == 0) sh[0] = t;
    }
    __syncthreads();
    return sh[0];
}
__device__ __forceinline__ float block_max(float v, float* sh) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) sh[w] = v;
    __syncthreads();
    float t = (threadIdx.x < nw) ? sh[threadIdx.x] : NEG_INF;
    if (w == 0) {
        t = warp_max(t);
        if (lane == 0) sh[0] = t;
    }
    __syncthreads();
    return sh[0];
}

// 2^ceil(log2(v)) exactly like the official fast_round_scale (v > 0, normal).
__device__ __forceinline__ float pow2_ceil(float v) {
    u32 b = __float_as_uint(v);
    int e = (int)((b >> 23) & 0xff);
    if (e == 0) return exp2f(ceilf(log2f(v)));
    e = e - 127 + ((b & 0x7fffff) ? 1 : 0);
    return exp2f((float)e);
}
__device__ __forceinline__ float e4m3_round(float x) {
    float a = fabsf(x);
    if (a == 0.f) return x;
    int e = (int)((__float_as_uint(a) >> 23) & 0xff) - 127;
    if (e < -6) e = -6;
    float q = exp2f((float)(e - 3));
    float r = rintf(a / q) * q;
    r = fminf(r, 448.f);
    return copysignf(r, x);
}
__device__ __forceinline__ float e2m1_round(float x) {
    const float g[8] = {0.f, 0.5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f};
    float a = fminf(fabsf(x), 6.f);
    int best = 0;
    float bd = 1e30f;
#pragma unroll
    for (int i = 0; i < 8; i++) {
        float d = fabsf(a - g[i]);
        if (d < bd || (d == bd && (i % 2) == 0)) { best = i; bd = d; }
    }
    return copysignf(g[best], x);
}
// RoPE on interleaved pairs of `x` (2*npairs values) at position pos.
__device__ __forceinline__ void rope_pair(float* a, float* b, float omega, int pos, bool inverse) {
    float ang = (float)pos * omega;
    float s, c;
    sincosf(ang, &s, &c);
    if (inverse) s = -s;
    float x0 = *a, x1 = *b;
    *a = x0 * c - x1 * s;
    *b = x0 * s + x1 * c;
}
