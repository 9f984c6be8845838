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
// PDL_EARLY (env DSV4_PDL_EARLY=1, an experiment): allow the next kernel
// first, then wait, so a chain of kernels is scheduled ahead as far as their
// blocks fit beside the running ones (each still waits for its predecessor,
// which waited for its own: completion order is unchanged).
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
#if DSV4_TRACE
// Timeline of the GPU work (env DSV4_TRACE=1, an experiment: `Gpu::trace_*`).
// Per launch, thread 0 of block (0,0,0) records its name hash (FNV-1a of the
// kernel's name), when it started, when its wait returned (about when the
// kernel before it in its stream finished) and when it ended.
#define TRACE_CAP 16384
__device__ u64 dsv4_trace[4 * TRACE_CAP];
__device__ u32 dsv4_trace_n;
__shared__ u64 tr_start;
__shared__ u32 tr_name, tr_slot;
__device__ __forceinline__ u64 gtimer() {
    u64 t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
__device__ __forceinline__ bool tr_lead() { return (blockIdx.x | blockIdx.y | blockIdx.z | threadIdx.x | threadIdx.y | threadIdx.z) == 0; }
struct TraceScope {
    __device__ TraceScope(const char* f) {
        if (tr_lead()) {
            u32 h = 2166136261u;
            for (; *f; f++) h = (h ^ (u32)(u8)*f) * 16777619u;
            tr_name = h;
            tr_slot = 0xffffffffu;
            tr_start = gtimer();
        }
    }
    __device__ ~TraceScope() {
        if (tr_lead() && tr_slot != 0xffffffffu) dsv4_trace[4 * tr_slot + 3] = gtimer();
    }
};
#define TRACE_KERNEL() TraceScope tr_scope_(__func__)
__device__ __forceinline__ void trace_waited() {
    if (tr_lead()) {
        u32 s = atomicAdd(&dsv4_trace_n, 1u);
        if (s < TRACE_CAP) {
            dsv4_trace[4 * s] = tr_name;
            dsv4_trace[4 * s + 1] = tr_start;
            dsv4_trace[4 * s + 2] = gtimer();
            tr_slot = s;
        }
    }
}
// A point inside a kernel (block 0's thread 0 when it gets there): recorded
// as "mark<id>" with its time in the wait column.
__device__ __forceinline__ void trace_mark(u32 id) {
    if (tr_lead()) {
        u32 s = atomicAdd(&dsv4_trace_n, 1u);
        if (s < TRACE_CAP) {
            dsv4_trace[4 * s] = 0xAB000000u | id;
            dsv4_trace[4 * s + 1] = tr_start;
            dsv4_trace[4 * s + 2] = gtimer();
            dsv4_trace[4 * s + 3] = 0;
        }
    }
}
#else
#define TRACE_KERNEL()
__device__ __forceinline__ void trace_waited() {}
__device__ __forceinline__ void trace_mark(u32) {}
#endif

__device__ __forceinline__ void pdl_prologue() {
#if PDL_EARLY
    pdl_trigger();
    pdl_wait();
#else
    pdl_wait();
    pdl_trigger();
#endif
    trace_waited();
}
// A kernel whose signature carries PDL_MANUAL (before its opening brace) gets
// no automatic prologue: it does work that reads nothing a previous kernel
// wrote (the persistent matvec's first weight loads) first, then calls pdl_prologue()
// itself before touching anything else.
#define PDL_MANUAL

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
// Warp-wide arg-max: every lane ends with the largest v and its index i,
// the lowest index on ties.
__device__ __forceinline__ void warp_argmax(float& v, int& i) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, v, o);
        int oi = __shfl_xor_sync(0xffffffffu, i, o);
        if (ov > v || (ov == v && oi < i)) { v = ov; i = oi; }
    }
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
// Split-K epilogue (one block per row, its warps over the row's chunks):
// each warp's per-token partial sums added over the warps in warp order,
// y[t][row] for t < n. red: NT x 8 floats of shared memory (<= 8 warps).
template <int NT>
__device__ __forceinline__ void split_k_store(const float (&acc)[NT], float (*red)[8], float* y, int ys, int row, int n) {
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
