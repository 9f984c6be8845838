"""Write (and read back) the demo model as an official-format DeepSeek V4
checkpoint, the layout `dsv4 convert --hf DIR` consumes (see
../../shared/fixtures/README.md, tiny-hf section): config.json and
inference/config.json, tokenizer files, safetensors shards with the official
tensor names and dtypes (FP8 e4m3 + ue8m0 128x128 block scales for the
projections the release stores in FP8, FP4 e2m1 packed two per byte + ue8m0
1x32 scales for routed experts, BF16 / F32 / I64 for the rest) and
model.safetensors.index.json.

Values are made exactly representable where ds4 keeps them in F16: BF16
tensors hold values that float16 also represents (the few below float16's range
are set to 0) and the F32 tensors ds4 stores as F16 (hc_*_fn, ape) are rounded
to float16, so the converter's f16 recipe is lossless and "f32" (the checkpoint)
and "f16" (its GGUF) evaluate identically.

`load(dir)` decodes a checkpoint back into a dsv4_torch.DSV4 (the exact
dequantised values), which check.py uses as the PyTorch reference.
"""

import json
import os
import re
import struct

import numpy as np
import torch

from dsv4_torch import Cfg, DSV4, fp4_weight_quant, fp8_weight_quant

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def official_name(k):
    k = re.sub(r"^mtp\.block\.", "mtp.0.", k)
    k = re.sub(r"^mtp\.(?!0\.)", "mtp.0.", k)
    k = re.sub(r"hc_(attn|ffn|head)\.(fn|base|scale)$", r"hc_\1_\2", k)
    k = k.replace("attn.idx_compressor.", "attn.indexer.compressor.").replace("attn.idx_wq_b.", "attn.indexer.wq_b.")
    k = k.replace("attn.idx_weights_proj.", "attn.indexer.weights_proj.")
    k = k.replace("ffn.shared.", "ffn.shared_experts.")
    k = re.sub(r"ffn\.bias$", "ffn.gate.bias", k)
    k = re.sub(r"ffn\.tid2eid$", "ffn.gate.tid2eid", k)
    if re.search(r"(^|\.)(attn_norm|ffn_norm|q_norm|kv_norm|norm|enorm|hnorm|embed)$", k):
        k += ".weight"
    return k


def kind(name):
    if re.search(r"attn\.(wq_a|wq_b|wkv|wo_a|wo_b)\.weight$|indexer\.wq_b\.weight$|shared_experts\.w\d\.weight$|(e_proj|h_proj)\.weight$", name):
        return "fp8"
    if re.search(r"ffn\.experts\.\d+\.w\d\.weight$", name):
        return "fp4"
    if name.endswith("tid2eid"):
        return "i64"
    if re.search(r"hc_\w+_(fn|base|scale)$|attn_sink$|\.ape$|gate\.bias$", name):
        return "f32"
    return "bf16"


def f16_exact_bf16(t):
    """BF16 rounding of t, with values float16 cannot hold exactly set to 0."""
    b = t.float().to(torch.bfloat16).float()
    return torch.where(b.to(torch.float16).float() == b, b, torch.zeros_like(b))


def e8m0(scale):
    return (torch.log2(scale).round().to(torch.int32) + 127).to(torch.uint8)


def encode(name, t):
    """-> list of (name, dtype string, shape, bytes)."""
    k = kind(name)
    if k == "fp8":
        q, s = fp8_weight_quant(t.float())
        codes = q.to(torch.float8_e4m3fn).view(torch.uint8)
        return [(name, "F8_E4M3", list(q.shape), codes.numpy().tobytes()),
                (name[: -len(".weight")] + ".scale", "F8_E8M0", list(s.shape), e8m0(s).numpy().tobytes())]
    if k == "fp4":
        q, s = fp4_weight_quant(t.float())
        mag = (q.abs().unsqueeze(-1) == E2M1).float().argmax(-1).to(torch.uint8)
        code = mag | ((q < 0).to(torch.uint8) << 3)
        packed = code[:, 0::2] | (code[:, 1::2] << 4)
        return [(name, "I8", list(packed.shape), packed.numpy().tobytes()),
                (name[: -len(".weight")] + ".scale", "F8_E8M0", list(s.shape), e8m0(s).numpy().tobytes())]
    if k == "i64":
        return [(name, "I64", list(t.shape), t.to(torch.int64).numpy().tobytes())]
    if k == "f32":
        v = t.float()
        if re.search(r"_fn$|\.ape$", name):
            v = v.to(torch.float16).float()
        return [(name, "F32", list(v.shape), v.numpy().astype("<f4").tobytes())]
    v = f16_exact_bf16(t)
    return [(name, "BF16", list(v.shape), v.to(torch.bfloat16).view(torch.int16).numpy().tobytes())]


def write_safetensors(path, items):
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for name, dt, shape, data in items:
        header[name] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + len(data)]}
        off += len(data)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        for *_, data in items:
            f.write(data)


def hf_config(c: Cfg):
    return {
        "architectures": ["DeepseekV4ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 0, "eos_token_id": 1, "expert_dtype": "fp4", "hc_eps": c.hc_eps, "hc_mult": c.hc,
        "hc_sinkhorn_iters": c.sinkhorn_iters, "head_dim": c.head_dim, "hidden_act": "silu", "hidden_size": c.dim,
        "index_head_dim": c.idx_dim, "index_n_heads": c.idx_heads, "index_topk": c.idx_topk, "initializer_range": 0.02,
        "max_position_embeddings": 4096, "model_type": "deepseek_v4", "moe_intermediate_size": c.inter,
        "n_routed_experts": c.n_experts, "n_shared_experts": 1, "norm_topk_prob": True,
        "num_attention_heads": c.n_heads, "num_experts_per_tok": c.n_active, "num_hidden_layers": c.n_layers,
        "num_hash_layers": c.n_hash, "num_key_value_heads": 1, "num_nextn_predict_layers": 1,
        "o_groups": c.o_groups, "o_lora_rank": c.o_lora, "q_lora_rank": c.q_lora, "qk_rope_head_dim": c.rope_dim,
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                "scale_fmt": "ue8m0", "weight_block_size": [128, 128]},
        "rms_norm_eps": c.eps,
        "rope_scaling": {"beta_fast": c.beta_fast, "beta_slow": c.beta_slow, "factor": c.rope_factor,
                         "original_max_position_embeddings": c.original_ctx, "type": "yarn"},
        "rope_theta": c.rope_theta, "routed_scaling_factor": c.route_scale, "scoring_func": "sqrtsoftplus",
        "sliding_window": c.window, "swiglu_limit": c.swiglu_limit, "tie_word_embeddings": False,
        "topk_method": "noaux_tc", "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": c.vocab,
        "compress_rope_theta": c.compress_rope_theta, "compress_ratios": list(c.compress_ratios),
    }


def inference_config(c: Cfg):
    return {
        "vocab_size": c.vocab, "dim": c.dim, "moe_inter_dim": c.inter, "n_layers": c.n_layers,
        "n_hash_layers": c.n_hash, "n_heads": c.n_heads, "n_routed_experts": c.n_experts, "n_shared_experts": 1,
        "n_activated_experts": c.n_active, "score_func": "sqrtsoftplus", "route_scale": c.route_scale,
        "swiglu_limit": c.swiglu_limit, "q_lora_rank": c.q_lora, "head_dim": c.head_dim, "rope_head_dim": c.rope_dim,
        "o_groups": c.o_groups, "o_lora_rank": c.o_lora, "window_size": c.window, "original_seq_len": c.original_ctx,
        "rope_theta": c.rope_theta, "rope_factor": c.rope_factor, "beta_fast": c.beta_fast, "beta_slow": c.beta_slow,
        "index_n_heads": c.idx_heads, "index_head_dim": c.idx_dim, "index_topk": c.idx_topk, "hc_mult": c.hc,
        "hc_sinkhorn_iters": c.sinkhorn_iters, "dtype": "fp8", "scale_fmt": "ue8m0", "expert_dtype": "fp4",
        "compress_rope_theta": c.compress_rope_theta, "compress_ratios": list(c.compress_ratios),
    }


def save(model: DSV4, tokenizer_json, out):
    c = model.c
    os.makedirs(os.path.join(out, "inference"), exist_ok=True)
    items = []
    for k, t in model.state_dict().items():
        items += encode(official_name(k), t.detach())
    items.sort(key=lambda x: x[0])
    # two shards of about equal size; a weight and its scale stay together (adjacent names)
    total = sum(len(x[3]) for x in items)
    shards, acc, cur = [[]], 0, 0
    for it in items:
        if acc > total / 2 and not it[0].endswith(".scale") and len(shards) == 1:
            shards.append([])
        shards[-1].append(it)
        acc += len(it[3])
    wmap = {}
    for i, sh in enumerate(shards):
        fn = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(os.path.join(out, fn), sh)
        wmap.update({x[0]: fn for x in sh})
    json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(wmap.items()))},
              open(os.path.join(out, "model.safetensors.index.json"), "w"), indent=2)
    json.dump(hf_config(c), open(os.path.join(out, "config.json"), "w"), indent=2)
    json.dump(inference_config(c), open(os.path.join(out, "inference", "config.json"), "w"), indent=4)
    json.dump({"_from_model_config": True, "bos_token_id": 0, "eos_token_id": 1, "do_sample": True,
               "temperature": 1.0, "top_p": 1.0}, open(os.path.join(out, "generation_config.json"), "w"), indent=2)
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "tokenizer_config.json"), encoding="utf-8") as f:
        tc = f.read()
    with open(os.path.join(out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        f.write(tc)
    with open(tokenizer_json, encoding="utf-8") as f, open(os.path.join(out, "tokenizer.json"), "w", encoding="utf-8") as g:
        g.write(f.read())


def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        h = json.loads(f.read(n))
        base = 8 + n
        data = open(path, "rb").read()
    out = {}
    for k, v in h.items():
        if k == "__metadata__":
            continue
        s, e = v["data_offsets"]
        out[k] = (v["dtype"], v["shape"], data[base + s: base + e])
    return out


def decode(dt, shape, raw):
    u8 = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    if dt == "F8_E4M3":
        return u8.view(torch.float8_e4m3fn).float().reshape(shape)
    if dt == "F8_E8M0":
        return torch.pow(2.0, u8.float() - 127).reshape(shape)
    if dt == "I8":
        lo, hi = u8 & 15, u8 >> 4
        codes = torch.stack((lo, hi), -1).reshape(shape[0], shape[1] * 2)
        return (E2M1[(codes & 7).long()] * torch.where(codes >= 8, -1.0, 1.0))
    if dt == "BF16":
        return u8.view(torch.bfloat16).float().reshape(shape)
    if dt == "F32":
        return u8.view(torch.float32).reshape(shape).clone()
    if dt == "I64":
        return u8.view(torch.int64).reshape(shape).clone()
    raise ValueError(dt)


def load(hf_dir, cfg: Cfg):
    """Official checkpoint -> DSV4 holding the exact dequantised values (float32)."""
    idx = json.load(open(os.path.join(hf_dir, "model.safetensors.index.json")))
    raw = {}
    for fn in sorted(set(idx["weight_map"].values())):
        raw.update(read_safetensors(os.path.join(hf_dir, fn)))
    model = DSV4(cfg)
    sd = {}
    for k, ref in model.state_dict().items():
        name = official_name(k)
        dt, shape, data = raw[name]
        v = decode(dt, shape, data)
        if dt in ("F8_E4M3", "I8"):
            s = decode(*raw[name[: -len(".weight")] + ".scale"])
            if dt == "F8_E4M3":
                s = s.repeat_interleave(128, 0)[: v.shape[0]].repeat_interleave(128, 1)[:, : v.shape[1]]
            else:
                s = s.repeat_interleave(32, 1)
            v = v * s
        sd[k] = v.to(ref.dtype).reshape(ref.shape)
    model.load_state_dict(sd)
    return model


def cfg_from_hf(hf_dir):
    j = json.load(open(os.path.join(hf_dir, "config.json")))
    rs = j["rope_scaling"]
    return Cfg(vocab=j["vocab_size"], dim=j["hidden_size"], n_layers=j["num_hidden_layers"], n_heads=j["num_attention_heads"],
               head_dim=j["head_dim"], rope_dim=j["qk_rope_head_dim"], q_lora=j["q_lora_rank"], o_groups=j["o_groups"],
               o_lora=j["o_lora_rank"], n_experts=j["n_routed_experts"], n_active=j["num_experts_per_tok"],
               inter=j["moe_intermediate_size"], n_hash=j["num_hash_layers"], window=j["sliding_window"],
               idx_heads=j["index_n_heads"], idx_dim=j["index_head_dim"], idx_topk=j["index_topk"], hc=j["hc_mult"],
               sinkhorn_iters=j["hc_sinkhorn_iters"], hc_eps=j["hc_eps"], eps=j["rms_norm_eps"],
               compress_ratios=j["compress_ratios"], rope_theta=j["rope_theta"],
               compress_rope_theta=j["compress_rope_theta"], rope_factor=rs["factor"],
               original_ctx=rs["original_max_position_embeddings"], beta_fast=rs["beta_fast"], beta_slow=rs["beta_slow"],
               route_scale=j["routed_scaling_factor"], swiglu_limit=j["swiglu_limit"])


# GGUF name (ds4 layout, crates/tools/src/plan.rs) -> official name, per block
_BLOCK = {
    "hc_attn_fn.weight": "hc_attn_fn", "hc_attn_scale.weight": "hc_attn_scale", "hc_attn_base.weight": "hc_attn_base",
    "hc_ffn_fn.weight": "hc_ffn_fn", "hc_ffn_scale.weight": "hc_ffn_scale", "hc_ffn_base.weight": "hc_ffn_base",
    "attn_norm.weight": "attn_norm.weight", "ffn_norm.weight": "ffn_norm.weight",
    "attn_q_a.weight": "attn.wq_a.weight", "attn_q_a_norm.weight": "attn.q_norm.weight", "attn_q_b.weight": "attn.wq_b.weight",
    "attn_kv.weight": "attn.wkv.weight", "attn_kv_a_norm.weight": "attn.kv_norm.weight", "attn_sinks.weight": "attn.attn_sink",
    "attn_output_a.weight": "attn.wo_a.weight", "attn_output_b.weight": "attn.wo_b.weight",
    "attn_compressor_ape.weight": "attn.compressor.ape", "attn_compressor_kv.weight": "attn.compressor.wkv.weight",
    "attn_compressor_gate.weight": "attn.compressor.wgate.weight", "attn_compressor_norm.weight": "attn.compressor.norm.weight",
    "indexer.attn_q_b.weight": "attn.indexer.wq_b.weight", "indexer.proj.weight": "attn.indexer.weights_proj.weight",
    "indexer_compressor_ape.weight": "attn.indexer.compressor.ape",
    "indexer_compressor_kv.weight": "attn.indexer.compressor.wkv.weight",
    "indexer_compressor_gate.weight": "attn.indexer.compressor.wgate.weight",
    "indexer_compressor_norm.weight": "attn.indexer.compressor.norm.weight",
    "ffn_gate_inp.weight": "ffn.gate.weight", "exp_probs_b.bias": "ffn.gate.bias", "ffn_gate_tid2eid.weight": "ffn.gate.tid2eid",
    "ffn_gate_shexp.weight": "ffn.shared_experts.w1.weight", "ffn_up_shexp.weight": "ffn.shared_experts.w3.weight",
    "ffn_down_shexp.weight": "ffn.shared_experts.w2.weight",
    "e_proj.weight": "e_proj.weight", "h_proj.weight": "h_proj.weight", "enorm.weight": "enorm.weight",
    "hnorm.weight": "hnorm.weight", "norm.weight": "norm.weight", "hc_head_fn.weight": "hc_head_fn",
    "hc_head_base.weight": "hc_head_base", "hc_head_scale.weight": "hc_head_scale",
}
_TOP = {"token_embd.weight": "embed.weight", "output.weight": "head.weight", "output_norm.weight": "norm.weight",
        "output_hc_fn.weight": "hc_head_fn", "output_hc_base.weight": "hc_head_base", "output_hc_scale.weight": "hc_head_scale"}
_EXPS = {"ffn_gate_exps.weight": "w1", "ffn_up_exps.weight": "w3", "ffn_down_exps.weight": "w2"}


def load_gguf(path, cfg: Cfg):
    """A GGUF written by `dsv4 convert` -> DSV4 with the values gguf-py dequantises (float32)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    vals = {}
    for t in GGUFReader(path).tensors:
        arr = t.data.copy() if t.tensor_type.name in ("I32",) else dequantize(t.data, t.tensor_type)
        v = torch.from_numpy(arr.copy())
        name = t.name
        if name in _TOP:
            vals[_TOP[name]] = v
            continue
        m = re.match(r"^(blk\.(\d+)\.|mtp\.0\.)(.*)$", name)
        pre = f"layers.{m.group(2)}." if m.group(2) is not None else "mtp.0."
        rest = m.group(3)
        if rest in _EXPS:
            for e in range(v.shape[0]):
                vals[f"{pre}ffn.experts.{e}.{_EXPS[rest]}.weight"] = v[e]
        else:
            vals[pre + _BLOCK[rest]] = v
    model = DSV4(cfg)
    sd = {k: vals[official_name(k)].to(ref.dtype).reshape(ref.shape) for k, ref in model.state_dict().items()}
    model.load_state_dict(sd)
    return model
