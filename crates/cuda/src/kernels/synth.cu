// Random but valid weights and state for synthetic full-size benchmarks: the
// bytes of quantised blocks are hash noise, with every f16 scale field then
// overwritten by a sane value so dequantised weights are finite and small.

__device__ __forceinline__ u32 mix32(u64 x) {
    x ^= x >> 33; x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33; x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return (u32)x;
}
__device__ __forceinline__ u16 f2h(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
extern "C" __global__ void synth_bytes(u8* p, u64 n, u64 seed) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) p[i] = (u8)mix32(seed * 0x9E3779B97F4A7C15ULL + i);
}
// f16 field at byte `off` of every block set to `v` (plus up to 25% noise).
extern "C" __global__ void synth_scale(u8* p, u64 n_blocks, int block_bytes, int off, float v, u64 seed) {
    for (u64 b = (u64)blockIdx.x * blockDim.x + threadIdx.x; b < n_blocks; b += (u64)gridDim.x * blockDim.x) {
        float r = (float)(mix32(seed + b) & 0xffff) / 65536.f;
        *(u16*)(p + b * block_bytes + off) = f2h(v * (0.75f + 0.5f * r));
    }
}
extern "C" __global__ void synth_f16(u16* p, u64 n, float scale, u64 seed) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        float r = (float)(mix32(seed + i) & 0xffffff) / 16777216.f;
        p[i] = f2h((2.f * r - 1.f) * scale);
    }
}
extern "C" __global__ void synth_f32(float* p, u64 n, float scale, float offset, u64 seed) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        float r = (float)(mix32(seed + i) & 0xffffff) / 16777216.f;
        p[i] = offset + (2.f * r - 1.f) * scale;
    }
}
extern "C" __global__ void synth_ids(int* p, u64 n, int modulo, u64 seed) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) p[i] = (int)(mix32(seed + i) % (u32)modulo);
}
