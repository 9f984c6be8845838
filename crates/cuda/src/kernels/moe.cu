// MoE routing and combination (spec §10). One block (or thread) per token.

// Routing of one token by a whole block (spec §10): from its logits l[ne] to
// k (expert id, weight) pairs sorted by expert id, left in shared ids / ws
// for every thread of the block (it synchronises; call it uniformly). The k
// slots are sorted by expert id so the reduction adds experts in ascending
// order, like the reference's per-expert loop. Scores in parallel, then warp
// 0 picks the top k (ties to the lower id); hash layers (tid: this token's
// row of tid2eid) take their ids from the table. sc / bs: ne floats each.
__device__ __forceinline__ void route_block(const float* l, int ne, int k, const float* bias, const int* tid, int norm, float route_scale,
                                            float* sc, float* bs, int* ids, float* ws) {
    for (int e = threadIdx.x; e < ne; e += blockDim.x) {
        float x = l[e];
        float s = sqrtf(x > 20.f ? x : log1pf(expf(x)));
        sc[e] = s;
        bs[e] = s + (bias ? bias[e] : 0.f);
    }
    __syncthreads();
    int lane = threadIdx.x;
    if (threadIdx.x < 32) {
        if (tid) {
            if (lane < k) ids[lane] = tid[lane];
        } else if (ne <= 256) {
            // each lane's (at most 8) biased scores in registers: no
            // shared-memory round trip per pick (k dependent picks)
            float bv8[8];
#pragma unroll
            for (int u = 0; u < 8; u++) bv8[u] = (u * 32 + lane < ne) ? bs[u * 32 + lane] : NEG_INF;
            for (int j = 0; j < k; j++) {
                float bv = NEG_INF;
                int bi = 0x7fffffff;
#pragma unroll
                for (int u = 0; u < 8; u++)
                    if (bv8[u] > bv) { bv = bv8[u]; bi = u * 32 + lane; }  // ascending e: strict > keeps the lower id
                warp_argmax(bv, bi);
                if (lane == 0) ids[j] = bi;
#pragma unroll
                for (int u = 0; u < 8; u++)
                    if (u * 32 + lane == bi) bv8[u] = NEG_INF;
            }
        } else {
            for (int j = 0; j < k; j++) {
                float bv = NEG_INF;
                int bi = 0x7fffffff;
                for (int e = lane; e < ne; e += 32) {
                    float v = bs[e];
                    if (v > bv) { bv = v; bi = e; }  // ascending e: strict > keeps the lower id
                }
                warp_argmax(bv, bi);
                if (lane == 0) { ids[j] = bi; bs[bi] = NEG_INF; }
                __syncwarp();
            }
        }
        __syncwarp();
        // lane j < k: pick j's id and weight; the sum in pick order (as the
        // reference), then each pick's place in ascending id order by
        // counting (equal ids, possible in a hash table, keep pick order, as
        // the insertion sort did): no per-lane arrays in local memory
        int id = lane < k ? ids[lane] : 0x7fffffff;
        float w = lane < k ? sc[id] : 0.f;
        float sum = 0.f;
        for (int j = 0; j < k; j++) sum += __shfl_sync(0xffffffffu, w, j);
        w = (norm ? w / sum : w) * route_scale;
        int at = 0;
        for (int j = 0; j < k; j++) {
            int o = __shfl_sync(0xffffffffu, id, j);
            at += o < id || (o == id && j < lane);
        }
        __syncwarp();
        if (lane < k) { ids[at] = id; ws[at] = w; }
    }
    __syncthreads();
}

// From router logits [n][ne] to (expert id, weight) per slot [n][k] (k <= 16,
// ne <= 1024). One block per token.
extern "C" __global__ void router(const float* logits, int ne, int k, const float* bias, const int* tid2eid, const int* tok,
                                  int norm, float route_scale, int* eids, float* ew) {
    __shared__ float sc[1024], bs[1024];
    __shared__ int ids[16];
    __shared__ float ws[16];
    int t = blockIdx.x;
    route_block(logits + (u64)t * ne, ne, k, bias, tid2eid ? tid2eid + (u64)tok[t] * k : 0, norm, route_scale, sc, bs, ids, ws);
    if (threadIdx.x < k) {
        eids[(u64)t * k + threadIdx.x] = ids[threadIdx.x];
        ew[(u64)t * k + threadIdx.x] = ws[threadIdx.x];
    }
}

// h[s][i] = silu(min(g, L)) * clamp(u, -L, L) * w[s]  (w null: 1; with widx the
// weight of row s is w[widx[s]]: rows in expert-sorted order)
// With q0 / qk set, h is also written in 8-bit form (quant_vals; needs
// blockDim 256 and ff % 256 == 0 for qk, ff % 32 == 0 for q0).
extern "C" __global__ void swiglu(const float* g, const float* u, const float* w, int ff, int rows, float limit, float* h, const int* widx,
                                  i8* q0, float* d0, i8* qk, float* dk) {
    u64 total = (u64)rows * ff;
    for (u64 base = (u64)blockIdx.x * blockDim.x; base < total; base += (u64)gridDim.x * blockDim.x) {
        u64 i = base + threadIdx.x;
        bool ok = i < total;
        float hv = 0.f;
        if (ok) {
            float gv = g[i], uv = u[i];
            if (limit > 0.f) { gv = fminf(gv, limit); uv = fminf(fmaxf(uv, -limit), limit); }
            u64 r = i / ff;
            float ws = w ? w[widx ? widx[r] : r] : 1.f;
            hv = gv / (1.f + expf(-gv)) * uv * ws;
            h[i] = hv;
        }
        if (q0 || qk) quant_vals(hv, ok, i, q0, d0, qk, dk);
    }
}

// y[t] = sum_j yk[t*k + j] + ysh[t] (ysh may be null); with pos, slot s's
// row is yk[pos[s]] (expert-sorted order).
extern "C" __global__ void moe_reduce(const float* yk, const float* ysh, int k, int d, int n, float* y, const int* pos) {
    u64 total = (u64)n * d;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x) {
        u64 t = i / d, c = i % d;
        // all k loads issued before the adds (k <= 16, checked on the host)
        float v[16];
#pragma unroll
        for (int j = 0; j < 16; j++) {
            u64 row = (j < k) ? (pos ? (u64)pos[t * k + j] : t * k + j) : 0;
            v[j] = (j < k) ? yk[row * d + c] : 0.f;
        }
        float acc = 0.f;
#pragma unroll
        for (int j = 0; j < 16; j++)
            if (j < k) acc += v[j];
        if (ysh) acc += ysh[i];
        y[i] = acc;
    }
}

// x[i] *= s (indexer weight scale etc.)
extern "C" __global__ void scale_inplace(float* x, float s, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) x[i] *= s;
}

extern "C" __global__ void fill_f32(float* x, int n, float v) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) x[i] = v;
}

// Sort the n*k (token, expert) slots by expert for grouped expert matvecs
// (prefill): order[j] = slot at sorted position j, pos[slot] = j, and tiles of
// up to `tile` rows per expert as (expert, first row, rows, 1); unused tile
// entries get rows = 0. One block; ne <= 1024. Which slots share a tile may
// vary run to run, but each slot's arithmetic does not depend on it.
extern "C" __global__ void moe_group(const int* eids, int slots, int ne, int tile, int max_tiles, int* order, int* pos, int* tiles) {
    __shared__ int cnt[1024], off[1024], tb[1024], cur[1024];
    for (int e = threadIdx.x; e < ne; e += blockDim.x) cnt[e] = 0;
    __syncthreads();
    for (int s = threadIdx.x; s < slots; s += blockDim.x) atomicAdd(&cnt[eids[s]], 1);
    __syncthreads();
    if (threadIdx.x == 0) {
        int run = 0, runt = 0;
        for (int e = 0; e < ne; e++) {
            off[e] = run; cur[e] = run; tb[e] = runt;
            run += cnt[e];
            runt += (cnt[e] + tile - 1) / tile;
        }
    }
    __syncthreads();
    for (int s = threadIdx.x; s < slots; s += blockDim.x) {
        int j = atomicAdd(&cur[eids[s]], 1);
        order[j] = s;
        pos[s] = j;
    }
    for (int t = threadIdx.x; t < max_tiles; t += blockDim.x) {
        tiles[4 * t] = 0; tiles[4 * t + 1] = 0; tiles[4 * t + 2] = 0; tiles[4 * t + 3] = 0;
    }
    __syncthreads();
    for (int e = threadIdx.x; e < ne; e += blockDim.x) {
        int nt = (cnt[e] + tile - 1) / tile;
        for (int i = 0; i < nt; i++) {
            int t = tb[e] + i;
            tiles[4 * t] = e;
            tiles[4 * t + 1] = off[e] + i * tile;
            tiles[4 * t + 2] = min(tile, cnt[e] - i * tile);
            tiles[4 * t + 3] = 1;
        }
    }
}

// dst[j] = src[idx[j] / div] (rows of d floats)
extern "C" __global__ void gather_rows(const float* src, const int* idx, int div, int d, int rows, float* dst) {
    u64 total = (u64)rows * d;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x) {
        u64 j = i / d, c = i % d;
        dst[i] = src[(u64)(idx[j] / div) * d + c];
    }
}
