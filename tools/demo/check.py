"""Perplexity of the demo model on held-out text, PyTorch vs the engine.

For the official checkpoint ("f32": its exact dequantised values) and for every
GGUF the converter wrote from it (values as gguf-py dequantises them), the
PyTorch model (float32, the same QAT round trips as the engine) scores the
held-out file exactly like `dsv4 perplexity`: windows of --ctx tokens, each
BOS + the next ctx-1 tokens on a fresh state, every token after BOS scored.
Then runs `dsv4 perplexity` on each GGUF and writes both numbers and their
difference to --out (models/demo-reference.json).
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import official_format as of  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402


@torch.no_grad()
def torch_nll(model, ids, ctx):
    nll, n = 0.0, 0
    for s in range(0, len(ids), ctx - 1):
        seq = torch.tensor([[0] + ids[s: s + ctx - 1]])
        lp = torch.log_softmax(model(seq)[0].double(), -1)
        tgt = seq[0, 1:]
        nll -= lp[torch.arange(len(tgt)), tgt].sum().item()
        n += len(tgt)
    return nll / n, n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hf", required=True)
    ap.add_argument("--gguf", action="append", default=[], help="VARIANT=PATH (repeatable)")
    ap.add_argument("--heldout", required=True)
    ap.add_argument("--dsv4", default="dsv4")
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    ap.add_argument("--train-log", help="train_log.json to summarise in the output")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cfg = of.cfg_from_hf(a.hf)
    tok = Tokenizer.from_file(os.path.join(a.hf, "tokenizer.json"))
    ids = tok.encode(open(a.heldout, encoding="utf-8").read(), add_special_tokens=False).ids
    res = {"heldout": os.path.basename(a.heldout), "ctx": a.ctx, "tokens_scored": None, "variants": {}}
    t = time.time()
    nll, n = torch_nll(of.load(a.hf, cfg).eval(), ids, a.ctx)
    res["tokens_scored"] = n
    res["variants"]["f32"] = {"torch_mean_nll": nll, "torch_perplexity": math.exp(nll),
                              "note": "official checkpoint values (FP8/FP4 dequantised); identical to the f16 GGUF"}
    print(f"f32   torch {nll:.6f}  ({time.time() - t:.0f}s)", flush=True)
    for spec in a.gguf:
        var, path = spec.split("=", 1)
        t = time.time()
        tn, _ = torch_nll(of.load_gguf(path, cfg).eval(), ids, a.ctx)
        out = subprocess.run([a.dsv4, "perplexity", "-m", path, "--file", a.heldout, "--ctx", str(a.ctx), "--json"],
                             check=True, capture_output=True, text=True).stdout
        e = json.loads(out.strip().splitlines()[-1])
        if e["tokens"] != n:
            raise SystemExit(f"{var}: engine scored {e['tokens']} tokens, torch {n} (tokenizers differ)")
        res["variants"][var] = {"file": os.path.basename(path), "bytes": os.path.getsize(path),
                                "torch_mean_nll": tn, "torch_perplexity": math.exp(tn),
                                "engine_mean_nll": e["mean_nll"], "engine_perplexity": e["perplexity"],
                                "abs_diff_mean_nll": abs(e["mean_nll"] - tn)}
        print(f"{var:5} torch {tn:.6f}  engine {e['mean_nll']:.6f}  diff {abs(e['mean_nll'] - tn):.2e}  ({time.time() - t:.0f}s)", flush=True)
    if a.train_log:
        tl = json.load(open(a.train_log))
        res["training"] = {k: tl[k] for k in ("n_params", "corpus_tokens", "vocab", "train_seconds", "torch")}
        res["training"]["args"] = {k: tl["args"][k] for k in ("seed", "steps", "batch", "seq", "lr", "docs", "wqat_from", "threads")}
        res["training"]["loss_curve"] = [(r["step"], r["loss"], r["mtp_loss"]) for r in tl["log"]]
    json.dump(res, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
