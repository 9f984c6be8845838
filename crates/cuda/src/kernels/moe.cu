// MoE routing and combination (spec §10). One block (or thread) per token.

// From router logits [n][ne] to (expert id, weight) per slot [n][k], the k
// slots of a token sorted by expert id so the reduction adds experts in
// ascending order, like the reference's per-expert loop.
extern "C" __global__ void router(const float* logits, int ne, int k, const float* bias, const int* tid2eid, const int* tok,
                                  int norm, float route_scale, int* eids, float* ew) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    // n is encoded by the grid; the host launches exactly n threads in total
    const float* l = logits + (u64)t * ne;
    int ids[16];
    float w[16];
    if (tid2eid) {
        for (int j = 0; j < k; j++) ids[j] = tid2eid[(u64)tok[t] * k + j];
    } else {
        for (int j = 0; j < k; j++) {
            int best = -1;
            float bv = NEG_INF;
            for (int e = 0; e < ne; e++) {
                bool used = false;
                for (int q = 0; q < j; q++) used |= (ids[q] == e);
                if (used) continue;
                float x = l[e];
                float s = sqrtf(x > 20.f ? x : log1pf(expf(x)));
                float b = s + (bias ? bias[e] : 0.f);
                if (best < 0 || b > bv) { best = e; bv = b; }
            }
            ids[j] = best;
        }
    }
    float sum = 0.f;
    for (int j = 0; j < k; j++) {
        float x = l[ids[j]];
        w[j] = sqrtf(x > 20.f ? x : log1pf(expf(x)));
        sum += w[j];
    }
    for (int j = 0; j < k; j++) w[j] = (norm ? w[j] / sum : w[j]) * route_scale;
    // insertion sort by expert id
    for (int a = 1; a < k; a++)
        for (int b = a; b > 0 && ids[b - 1] > ids[b]; b--) {
            int ti = ids[b]; ids[b] = ids[b - 1]; ids[b - 1] = ti;
            float tw = w[b]; w[b] = w[b - 1]; w[b - 1] = tw;
        }
    for (int j = 0; j < k; j++) {
        eids[(u64)t * k + j] = ids[j];
        ew[(u64)t * k + j] = w[j];
    }
}

// h[s][i] = silu(min(g, L)) * clamp(u, -L, L) * w[s]  (w null: 1)
extern "C" __global__ void swiglu(const float* g, const float* u, const float* w, int ff, int rows, float limit, float* h) {
    u64 total = (u64)rows * ff;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x) {
        float gv = g[i], uv = u[i];
        if (limit > 0.f) { gv = fminf(gv, limit); uv = fminf(fmaxf(uv, -limit), limit); }
        float ws = w ? w[i / ff] : 1.f;
        h[i] = gv / (1.f + expf(-gv)) * uv * ws;
    }
}

// y[t] = sum_j yk[t*k + j] + ysh[t] (ysh may be null).
extern "C" __global__ void moe_reduce(const float* yk, const float* ysh, int k, int d, int n, float* y) {
    u64 total = (u64)n * d;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x) {
        u64 t = i / d, c = i % d;
        float acc = 0.f;
        for (int j = 0; j < k; j++) acc += yk[(t * k + j) * d + c];
        if (ysh) acc += ysh[i];
        y[i] = acc;
    }
}

// x[i] *= s (indexer weight scale etc.)
extern "C" __global__ void scale_inplace(float* x, float s, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) x[i] *= s;
}
