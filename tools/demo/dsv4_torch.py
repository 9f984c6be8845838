"""DeepSeek V4 forward pass in PyTorch, batched over whole sequences, for training
the demo model and for checking the Rust engine against it.

Implements ../../shared/spec/model.md (the official inference/model.py semantics)
for a prefill from position 0: hyper-connections with Sinkhorn, sliding-window
sink attention with a shared K=V head, compressors (ratio 4 with overlapping
windows + the Hadamard/FP4 indexer, larger ratios without overlap), MoE with
sqrt(softplus) scores, selection bias, hash routing and clamped SwiGLU, and the
MTP block. Everything runs in float32; the official QAT round trips (FP8 e4m3 on
the non-RoPE dims of kv rows and compressed rows, Hadamard + FP4 e2m1 on the
indexer) are applied exactly as the engine does, with a straight-through
gradient so the model can be trained with them on. Optional weight fake
quantisation (FP8 128x128 blocks / FP4 1x32 blocks, also straight-through)
makes the trained weights survive the export to the official checkpoint format.
"""

import math
from dataclasses import dataclass, field, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Cfg:
    vocab: int = 1024
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    head_dim: int = 128
    rope_dim: int = 64
    q_lora: int = 128
    o_groups: int = 2
    o_lora: int = 128
    n_experts: int = 8
    n_active: int = 2
    inter: int = 256
    n_hash: int = 3
    window: int = 16
    idx_heads: int = 4
    idx_dim: int = 128
    idx_topk: int = 8
    hc: int = 4
    sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    eps: float = 1e-6
    compress_ratios: list = field(default_factory=lambda: [0, 0, 4, 8, 0])  # last = MTP
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_factor: float = 16.0
    original_ctx: int = 65536
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    route_scale: float = 1.5
    swiglu_limit: float = 10.0

    def to_json(self):
        return asdict(self)


# ---------------------------------------------------------------- QAT simulations

def _pow2_ceil(t):
    """2^ceil(log2(t)) exactly, for positive finite t (frexp: t = m * 2^e, m in [0.5, 1))."""
    m, e = torch.frexp(t)
    e = torch.where(m == 0.5, e - 1, e)
    return torch.ldexp(torch.ones_like(t), e)


def _e4m3_round(v):
    """Round to the FP8 E4M3FN grid, nearest-even; |v| <= 448 already."""
    a = v.abs()
    _, e = torch.frexp(torch.where(a > 0, a, torch.ones_like(a)))
    e = torch.clamp(e - 1, min=-6)  # floor(log2|v|), subnormals share 2^-6's step
    step = torch.ldexp(torch.ones_like(v), e - 3)
    return torch.round(v / step) * step


def _e2m1_round(v):
    """Round to the FP4 E2M1 grid {0,.5,1,1.5,2,3,4,6}, ties to the even code; |v| <= 6."""
    a = v.abs()
    _, e = torch.frexp(torch.where(a > 0, a, torch.ones_like(a)))
    e = torch.clamp(e - 1, min=0)
    step = torch.ldexp(torch.ones_like(v), e - 1)
    return torch.round(v / step) * step


def fp8_sim(x, block=64):
    """In-place-style FP8 round trip of the last dim in blocks (spec 3.2)."""
    sh = x.shape
    v = x.reshape(*sh[:-1], sh[-1] // block, block)
    amax = v.abs().amax(-1, keepdim=True).clamp(min=1e-4)
    s = _pow2_ceil(amax * torch.tensor(1.0 / 448.0, dtype=torch.float32))
    q = _e4m3_round(torch.clamp(v / s, -448.0, 448.0)) * s
    return q.reshape(sh)


def fp4_sim(x, block=32):
    """FP4 round trip of the last dim in blocks of 32 (spec 3.3)."""
    sh = x.shape
    v = x.reshape(*sh[:-1], sh[-1] // block, block)
    amax = v.abs().amax(-1, keepdim=True).clamp(min=6.0 * 2.0 ** -126)
    s = _pow2_ceil(amax * torch.tensor(1.0 / 6.0, dtype=torch.float32))
    q = _e2m1_round(torch.clamp(v / s, -6.0, 6.0)) * s
    return q.reshape(sh)


def ste(x, fn):
    """Forward fn(x), backward identity (straight-through)."""
    return x + (fn(x.detach()) - x).detach() if x.requires_grad else fn(x)


def hadamard(x):
    """Natural-order Walsh-Hadamard on the last dim, scaled by n^-1/2 (butterfly like the engine)."""
    n = x.shape[-1]
    y = x
    h = 1
    while h < n:
        y = y.reshape(*x.shape[:-1], n // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    return y.reshape(x.shape) * (n ** -0.5)


# weight formats of the official checkpoint (used for QAT and by the exporter)

def fp8_weight_quant(w, block=128):
    """FP8 e4m3 with one power-of-two scale per 128x128 block: returns (codes as float, scale grid)."""
    o, i = w.shape
    bo, bi = -(-o // block), -(-i // block)
    wp = F.pad(w, (0, bi * block - i, 0, bo * block - o))
    v = wp.reshape(bo, block, bi, block)
    amax = v.abs().amax(dim=(1, 3), keepdim=True).clamp(min=1e-12)
    s = _pow2_ceil(amax * torch.tensor(1.0 / 448.0))
    q = _e4m3_round(torch.clamp(v / s, -448.0, 448.0))
    return q.reshape(bo * block, bi * block)[:o, :i], s.reshape(bo, bi)


def fp8_weight_sim(w):
    q, s = fp8_weight_quant(w)
    return q * s.repeat_interleave(128, 0)[: w.shape[0]].repeat_interleave(128, 1)[:, : w.shape[1]]


def fp4_weight_quant(w):
    """FP4 e2m1 with one power-of-two scale per 32 inputs: returns (values on the grid, scales [o, i/32])."""
    o, i = w.shape
    v = w.reshape(o, i // 32, 32)
    amax = v.abs().amax(-1, keepdim=True).clamp(min=6.0 * 2.0 ** -126)
    s = _pow2_ceil(amax * torch.tensor(1.0 / 6.0))
    q = _e2m1_round(torch.clamp(v / s, -6.0, 6.0))
    return q.reshape(o, i), s.reshape(o, i // 32)


def fp4_weight_sim(w):
    q, s = fp4_weight_quant(w)
    return q * s.repeat_interleave(32, 1)


# ---------------------------------------------------------------- helpers

def rmsnorm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope_omega(rd, theta, yarn=None):
    e = torch.arange(0, rd, 2, dtype=torch.float32) / rd
    om = 1.0 / torch.tensor([float(theta) ** float(v) for v in e.tolist()], dtype=torch.float64).float()
    if yarn is not None:
        factor, orig, bf, bs = yarn
        corr = lambda rot: rd * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(theta))
        lo = max(math.floor(corr(bf)), 0.0)
        hi = min(math.ceil(corr(bs)), rd - 1.0)
        span = 0.001 if hi == lo else hi - lo
        ramp = ((torch.arange(rd // 2, dtype=torch.float64) - lo) / span).clamp(0, 1).float()
        smooth = 1.0 - ramp
        om = om / factor * (1.0 - smooth) + om * smooth
    return om


def apply_rope(x, pos, omega, inverse=False):
    """Rotate interleaved pairs of the last rd dims of x[..., S, (H,) D] at positions pos [S]."""
    rd = omega.numel() * 2
    ang = pos.float()[:, None] * omega[None, :]  # [S, rd/2], f32 like the engine
    c = torch.cos(ang.double()).float()
    s = torch.sin(ang.double()).float()
    if inverse:
        s = -s
    while c.dim() < x.dim() - 1:
        # broadcast over head dims placed after S
        c = c.unsqueeze(-2)
        s = s.unsqueeze(-2)
    head, tail = x[..., :-rd], x[..., -rd:]
    t = tail.reshape(*tail.shape[:-1], rd // 2, 2)
    a, b = t[..., 0], t[..., 1]
    rot = torch.stack((a * c - b * s, a * s + b * c), -1).reshape(tail.shape)
    return torch.cat((head, rot), -1)


class Lin(nn.Module):
    """Bias-free linear whose weight may be fake-quantised (fp8 / fp4 / none) during training."""

    def __init__(self, i, o, fmt="bf16", std=None):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(o, i) * (std if std is not None else i ** -0.5))
        self.fmt = fmt
        self.qat = False

    def w(self):
        if self.qat and self.fmt == "fp8":
            return ste(self.weight, fp8_weight_sim)
        if self.qat and self.fmt == "fp4":
            return ste(self.weight, fp4_weight_sim)
        return self.weight

    def forward(self, x):
        return x @ self.w().t()


def ones(n):
    return nn.Parameter(torch.ones(n))


# ---------------------------------------------------------------- hyper-connections

class HcParams(nn.Module):
    def __init__(self, c: Cfg, n_out):
        super().__init__()
        self.fn = nn.Parameter(torch.randn(n_out, c.hc * c.dim) * 0.01)
        self.base = nn.Parameter(torch.zeros(n_out))
        self.scale = nn.Parameter(torch.ones(3 if n_out != c.hc else 1))


def sinkhorn(C, iters, eps):
    C = torch.softmax(C, -1) + eps
    C = C / (C.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        C = C / (C.sum(-1, keepdim=True) + eps)
        C = C / (C.sum(-2, keepdim=True) + eps)
    return C


def hc_pre(X, p: HcParams, c: Cfg):
    """X [B,S,M,D] -> (a [B,S,D], post [B,S,M], comb [B,S,M,M])."""
    B, S, M, D = X.shape
    x = X.reshape(B, S, M * D)
    r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c.eps)
    m = (x @ p.fn.t()) * r
    pre = torch.sigmoid(m[..., :M] * p.scale[0] + p.base[:M]) + c.hc_eps
    post = 2 * torch.sigmoid(m[..., M:2 * M] * p.scale[1] + p.base[M:2 * M])
    C = (m[..., 2 * M:] * p.scale[2] + p.base[2 * M:]).reshape(B, S, M, M)
    C = sinkhorn(C, c.sinkhorn_iters, c.hc_eps)
    a = (pre.unsqueeze(-1) * X).sum(-2)
    return a, post, C


def hc_post(f, R, post, C):
    return post.unsqueeze(-1) * f.unsqueeze(-2) + torch.einsum("bsjk,bsjd->bskd", C, R)


def hc_head(X, p: HcParams, c: Cfg):
    B, S, M, D = X.shape
    x = X.reshape(B, S, M * D)
    r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c.eps)
    m = (x @ p.fn.t()) * r
    w = torch.sigmoid(m * p.scale[0] + p.base) + c.hc_eps
    return (w.unsqueeze(-1) * X).sum(-2)


# ---------------------------------------------------------------- attention

class Compressor(nn.Module):
    def __init__(self, c: Cfg, ratio, d):
        super().__init__()
        self.ratio, self.d = ratio, d
        self.coff = 2 if ratio == 4 else 1
        self.ape = nn.Parameter(torch.randn(ratio, self.coff * d) * 0.1)
        self.wkv = Lin(c.dim, self.coff * d)
        self.wgate = Lin(c.dim, self.coff * d, std=0.1 * c.dim ** -0.5)
        self.norm = ones(d)

    def forward(self, a, c: Cfg):
        """a [B,S,D] -> pooled rows [B, S//r, d] (before norm/rope/sims)."""
        B, S, _ = a.shape
        r, d = self.ratio, self.d
        n = S // r
        if n == 0:
            return a.new_zeros(B, 0, d)
        kv = self.wkv(a[:, : n * r]).reshape(B, n, r, self.coff * d)
        sc = (self.wgate(a[:, : n * r]).reshape(B, n, r, self.coff * d) + self.ape)
        if self.coff == 2:
            kvA, kvB = kv[..., :d], kv[..., d:]
            scA, scB = sc[..., :d], sc[..., d:]
            # window i pools lane A of window i-1 and lane B of window i
            kvA = torch.cat((kvA.new_zeros(B, 1, r, d), kvA[:, :-1]), 1)
            scA = torch.cat((torch.full_like(scA[:, :1], float("-inf")), scA[:, :-1]), 1)
            kv = torch.cat((kvA, kvB), 2)
            sc = torch.cat((scA, scB), 2)
        w = torch.softmax(sc, 2)
        return (w * kv).sum(2)


class Attention(nn.Module):
    def __init__(self, c: Cfg, ratio):
        super().__init__()
        self.ratio = ratio
        H, Dh = c.n_heads, c.head_dim
        self.wq_a = Lin(c.dim, c.q_lora, "fp8")
        self.q_norm = ones(c.q_lora)
        self.wq_b = Lin(c.q_lora, H * Dh, "fp8")
        self.wkv = Lin(c.dim, Dh, "fp8")
        self.kv_norm = ones(Dh)
        self.attn_sink = nn.Parameter(torch.zeros(H))
        self.wo_a = Lin(H * Dh // c.o_groups, c.o_groups * c.o_lora, "fp8")
        self.wo_b = Lin(c.o_groups * c.o_lora, c.dim, "fp8", std=0.5 * (c.o_groups * c.o_lora) ** -0.5)
        if ratio:
            self.compressor = Compressor(c, ratio, Dh)
        if ratio == 4:
            self.idx_wq_b = Lin(c.q_lora, c.idx_heads * c.idx_dim, "fp8")
            self.idx_weights_proj = Lin(c.dim, c.idx_heads)
            self.idx_compressor = Compressor(c, 4, c.idx_dim)
        self.last_selection = None

    def forward(self, a, c: Cfg, ropes):
        B, S, _ = a.shape
        H, Dh, rd = c.n_heads, c.head_dim, c.rope_dim
        omega = ropes[1] if self.ratio else ropes[0]
        pos = torch.arange(S)
        qr = rmsnorm(self.wq_a(a), self.q_norm, c.eps)
        q = self.wq_b(qr).reshape(B, S, H, Dh)
        q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + c.eps)
        q = apply_rope(q, pos, omega)
        kv = rmsnorm(self.wkv(a), self.kv_norm, c.eps)
        kv = apply_rope(kv, pos, omega)
        kv = torch.cat((ste(kv[..., : Dh - rd], fp8_sim), kv[..., Dh - rd:]), -1)
        keys = kv  # [B,S,Dh]
        # mask [S, S + n]: window of raw rows, then visible / selected compressed rows
        win = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - c.window)
        mask = win.unsqueeze(0).expand(B, S, S)
        if self.ratio:
            r = self.ratio
            rows = self.compressor(a, c)
            n = rows.shape[1]
            if n:
                rows = rmsnorm(rows, self.compressor.norm, c.eps)
                rows = apply_rope(rows, torch.arange(n) * r, omega)
                rows = torch.cat((ste(rows[..., : Dh - rd], fp8_sim), rows[..., Dh - rd:]), -1)
                visible = torch.arange(n)[None, :] < ((pos + 1) // r)[:, None]  # [S, n]
                vis = visible.unsqueeze(0).expand(B, S, n)
                if r == 4:
                    vis = vis & self.index_select(a, qr, c, omega, visible)
                keys = torch.cat((kv, rows), 1)
                mask = torch.cat((mask, vis), 2)
        z = torch.einsum("bshd,btd->bhst", q, keys) * (Dh ** -0.5)
        z = z.masked_fill(~mask.unsqueeze(1), float("-inf"))
        sink = self.attn_sink.view(1, H, 1, 1).expand(B, H, S, 1)
        p = torch.softmax(torch.cat((z, sink), -1), -1)[..., :-1]
        o = torch.einsum("bhst,btd->bshd", p, keys)
        o = apply_rope(o, pos, omega, inverse=True)
        G = c.o_groups
        og = o.reshape(B, S, G, H * Dh // G)
        wa = self.wo_a.w().reshape(G, c.o_lora, H * Dh // G)
        u = torch.einsum("bsgi,goi->bsgo", og, wa).reshape(B, S, G * c.o_lora)
        return self.wo_b(u)

    def index_select(self, a, qr, c: Cfg, omega, visible):
        """Indexer top-k (spec 8): boolean [B,S,n] of selected visible compressed rows."""
        B, S, _ = a.shape
        IH, ID, rd = c.idx_heads, c.idx_dim, c.rope_dim
        pos = torch.arange(S)
        with torch.no_grad():  # top-k has no gradient; the indexer is not trained (see README)
            rows = self.idx_compressor(a, c)
            n = rows.shape[1]
            rows = rmsnorm(rows, self.idx_compressor.norm, c.eps)
            rows = apply_rope(rows, torch.arange(n) * 4, omega)
            K = fp4_sim(hadamard(rows))  # [B,n,ID]
            qI = self.idx_wq_b(qr).reshape(B, S, IH, ID)
            qI = apply_rope(qI, pos, omega)
            qI = fp4_sim(hadamard(qI))
            w = self.idx_weights_proj(a) * (ID ** -0.5 * IH ** -0.5)  # [B,S,IH]
            sc = torch.einsum("bshd,bnd->bshn", qI, K).clamp(min=0)
            score = (sc * w.unsqueeze(-1)).sum(2)  # [B,S,n]
            score = score.masked_fill(~visible.unsqueeze(0), float("-inf"))
            k = min(c.idx_topk, n)
            idx = score.topk(k, -1).indices
            sel = torch.zeros(B, S, n, dtype=torch.bool)
            sel.scatter_(-1, idx, True)
            return sel & visible.unsqueeze(0)


# ---------------------------------------------------------------- MoE

class Expert(nn.Module):
    def __init__(self, c: Cfg, fmt):
        super().__init__()
        self.w1 = Lin(c.dim, c.inter, fmt)
        self.w3 = Lin(c.dim, c.inter, fmt)
        self.w2 = Lin(c.inter, c.dim, fmt, std=0.5 * c.inter ** -0.5)

    def forward(self, x, weight, limit):
        g = self.w1(x).clamp(max=limit)
        u = self.w3(x).clamp(-limit, limit)
        return self.w2(F.silu(g) * u * weight)


class MoE(nn.Module):
    def __init__(self, c: Cfg, hash_layer, gen):
        super().__init__()
        self.hash = hash_layer
        self.gate = Lin(c.dim, c.n_experts)
        if hash_layer:
            t = torch.stack([torch.randperm(c.n_experts, generator=gen)[: c.n_active] for _ in range(c.vocab)])
            self.register_buffer("tid2eid", t)
        else:
            self.register_buffer("bias", torch.zeros(c.n_experts))
        self.experts = nn.ModuleList([Expert(c, "fp4") for _ in range(c.n_experts)])
        self.shared = Expert(c, "fp8")
        self.load = None

    def forward(self, a, tokens, c: Cfg):
        B, S, D = a.shape
        x = a.reshape(B * S, D)
        s = torch.sqrt(F.softplus(self.gate(x)))
        if self.hash:
            idx = self.tid2eid[tokens.reshape(-1)]
        else:
            idx = (s + self.bias).topk(c.n_active, -1).indices
        w = s.gather(-1, idx)
        w = w / w.sum(-1, keepdim=True) * c.route_scale
        self.load = torch.bincount(idx.reshape(-1), minlength=c.n_experts).float()
        y = torch.zeros_like(x)
        for e, ex in enumerate(self.experts):
            tok, slot = torch.nonzero(idx == e, as_tuple=True)
            if tok.numel():
                y = y.index_add(0, tok, ex(x[tok], w[tok, slot].unsqueeze(-1), c.swiglu_limit))
        y = y + self.shared(x, 1.0, c.swiglu_limit)
        return y.reshape(B, S, D)


# ---------------------------------------------------------------- blocks and model

class Block(nn.Module):
    def __init__(self, c: Cfg, layer, ratio, gen):
        super().__init__()
        mix = (2 + c.hc) * c.hc
        self.hc_attn = HcParams(c, mix)
        self.hc_ffn = HcParams(c, mix)
        self.attn_norm = ones(c.dim)
        self.ffn_norm = ones(c.dim)
        self.attn = Attention(c, ratio)
        self.ffn = MoE(c, layer < c.n_hash, gen)

    def forward(self, X, tokens, c, ropes):
        a, post, C = hc_pre(X, self.hc_attn, c)
        X = hc_post(self.attn(rmsnorm(a, self.attn_norm, c.eps), c, ropes), X, post, C)
        a, post, C = hc_pre(X, self.hc_ffn, c)
        return hc_post(self.ffn(rmsnorm(a, self.ffn_norm, c.eps), tokens, c), X, post, C)


class MTP(nn.Module):
    def __init__(self, c: Cfg, gen):
        super().__init__()
        self.e_proj = Lin(c.dim, c.dim, "fp8")
        self.h_proj = Lin(c.dim, c.dim, "fp8")
        self.enorm = ones(c.dim)
        self.hnorm = ones(c.dim)
        self.norm = ones(c.dim)
        self.hc_head = HcParams(c, c.hc)
        self.block = Block(c, c.n_layers, c.compress_ratios[c.n_layers], gen)


class DSV4(nn.Module):
    def __init__(self, c: Cfg, seed=0):
        super().__init__()
        self.c = c
        gen = torch.Generator().manual_seed(seed + 1)
        self.embed = nn.Parameter(torch.randn(c.vocab, c.dim))
        self.layers = nn.ModuleList([Block(c, l, c.compress_ratios[l], gen) for l in range(c.n_layers)])
        self.hc_head = HcParams(c, c.hc)
        self.norm = ones(c.dim)
        self.head = Lin(c.dim, c.vocab, std=0.5 * c.dim ** -0.5)
        self.mtp = MTP(c, gen)
        self.ropes = (
            rope_omega(c.rope_dim, c.rope_theta),
            rope_omega(c.rope_dim, c.compress_rope_theta, (c.rope_factor, c.original_ctx, c.beta_fast, c.beta_slow)),
        )

    def set_weight_qat(self, on):
        for m in self.modules():
            if isinstance(m, Lin):
                m.qat = on

    def hidden(self, tokens):
        B, S = tokens.shape
        X = self.embed[tokens].unsqueeze(2).expand(B, S, self.c.hc, self.c.dim)
        for blk in self.layers:
            X = blk(X, tokens, self.c, self.ropes)
        return X

    def logits_from(self, X, hc, norm):
        return self.head(rmsnorm(hc_head(X, hc, self.c), norm, self.c.eps))

    def forward(self, tokens, mtp=False):
        """tokens [B,S] from position 0 -> main logits [B,S,V] (and MTP logits [B,S-1,V])."""
        X = self.hidden(tokens)
        logits = self.logits_from(X, self.hc_head, self.norm)
        if not mtp:
            return logits
        c, m = self.c, self.mtp
        # slot i: state after token i with the embedding of token i+1, at position i
        e = rmsnorm(self.embed[tokens[:, 1:]], m.enorm, c.eps)
        Xin = m.e_proj(e).unsqueeze(2) + m.h_proj(rmsnorm(X[:, :-1], m.hnorm, c.eps))
        Xo = m.block(Xin, tokens[:, 1:], c, self.ropes)
        return logits, self.logits_from(Xo, m.hc_head, m.norm)
