#!/usr/bin/env python3
"""Generate dequantisation / quantisation test vectors with gguf-py as the oracle.

Usage: pip install gguf numpy && python3 gen_vectors.py [OUT_DIR]
(default OUT_DIR: ../data next to this script). Deterministic (fixed seed).

For each format writes `deq_<TYPE>.bin`:
    u32 n_elems, u32 n_bytes, n_bytes raw block bytes, n_elems f32 (gguf-py dequantised)
and for the encoders `quant_<TYPE>.bin`:
    u32 n_elems, u32 n_bytes, n_elems f32 input, n_bytes gguf-py quantised bytes
Committed vectors were made with gguf-py 0.19.0 and numpy 2.4.6.
All little-endian. gguf-py dequantises in float32; every product involved is
exact in f32 (f16 scale times small integers), so results must match bit for bit.
"""
import os
import struct
import sys

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants

rng = np.random.default_rng(20261126)


def f16_scales(n, lo=-12, hi=2):
    """Random finite, non-zero f16 values with varied exponents and signs, as bytes."""
    mant = rng.uniform(1.0, 2.0, n)
    exp = rng.integers(lo, hi, n).astype(np.float64)
    sign = np.where(rng.random(n) < 0.5, -1.0, 1.0)
    return (sign * mant * 2.0**exp).astype(np.float16)


def blocks_q8_0(nb):
    d = f16_scales(nb).view(np.uint8).reshape(nb, 2)
    q = rng.integers(0, 256, (nb, 32), dtype=np.uint8)
    return np.concatenate([d, q], axis=1)


def blocks_q2_k(nb):
    scales = rng.integers(0, 256, (nb, 16), dtype=np.uint8)
    qs = rng.integers(0, 256, (nb, 64), dtype=np.uint8)
    d = f16_scales(nb).view(np.uint8).reshape(nb, 2)
    dmin = f16_scales(nb).view(np.uint8).reshape(nb, 2)
    return np.concatenate([scales, qs, d, dmin], axis=1)


def blocks_q4_k(nb):
    d = f16_scales(nb).view(np.uint8).reshape(nb, 2)
    dmin = f16_scales(nb).view(np.uint8).reshape(nb, 2)
    scales = rng.integers(0, 256, (nb, 12), dtype=np.uint8)
    qs = rng.integers(0, 256, (nb, 128), dtype=np.uint8)
    return np.concatenate([d, dmin, scales, qs], axis=1)


def blocks_iq2_xxs(nb):
    d = f16_scales(nb).view(np.uint8).reshape(nb, 2)
    qs = rng.integers(0, 256, (nb, 64), dtype=np.uint8)
    return np.concatenate([d, qs], axis=1)


def floats(n):
    x = rng.standard_normal(n) * np.exp2(rng.integers(-20, 10, n))
    return x.astype(np.float32)


def write_deq(out, name, qtype, raw, n_elems):
    raw = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1)
    deq = quants.dequantize(raw, qtype).astype(np.float32).reshape(-1)
    assert deq.size == n_elems, (name, deq.size, n_elems)
    with open(os.path.join(out, f"deq_{name}.bin"), "wb") as f:
        f.write(struct.pack("<II", n_elems, raw.size))
        f.write(raw.tobytes())
        f.write(deq.astype("<f4").tobytes())


def write_quant(out, name, qtype, x):
    q = np.ascontiguousarray(quants.quantize(x.reshape(1, -1), qtype)).view(np.uint8).reshape(-1)
    with open(os.path.join(out, f"quant_{name}.bin"), "wb") as f:
        f.write(struct.pack("<II", x.size, q.size))
        f.write(x.astype("<f4").tobytes())
        f.write(q.tobytes())


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(here, "..", "data")
    os.makedirs(out, exist_ok=True)
    nb = 12
    write_deq(out, "Q8_0", T.Q8_0, blocks_q8_0(nb * 8), nb * 8 * 32)
    write_deq(out, "Q2_K", T.Q2_K, blocks_q2_k(nb), nb * 256)
    write_deq(out, "Q4_K", T.Q4_K, blocks_q4_k(nb), nb * 256)
    write_deq(out, "IQ2_XXS", T.IQ2_XXS, blocks_iq2_xxs(nb), nb * 256)
    x = floats(1024)
    write_deq(out, "F32", T.F32, x.view(np.uint8), x.size)
    write_deq(out, "F16", T.F16, floats(1024).astype(np.float16).view(np.uint8), 1024)
    bf = rng.integers(0, 1 << 16, 1024, dtype=np.uint16)
    bf = bf[(bf & 0x7F80) != 0x7F80][:512]  # drop inf/NaN patterns
    write_deq(out, "BF16", T.BF16, bf.view(np.uint8), bf.size)
    # Encoders. Include exact ties for the rounding modes.
    xq = floats(32 * 16)
    xq[:32] = np.arange(32, dtype=np.float32) - 15.5  # half-way points for Q8_0
    xq[32:64] = 0.0  # all-zero block
    write_quant(out, "Q8_0", T.Q8_0, xq)
    xf = floats(2048)
    xf[:4] = [1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, 70000.0, 1e-8]  # f16 ties, overflow, subnormal
    write_quant(out, "F16", T.F16, xf)
    xb = floats(2048)
    xb[:2] = np.array([0x3F808000, 0x3F818000], dtype=np.uint32).view(np.float32)  # bf16 ties
    write_quant(out, "BF16", T.BF16, xb)
    print("wrote vectors to", out)


if __name__ == "__main__":
    main()
