"""Train the demo DeepSeek V4 model on CPU in a few minutes.

Data: the procedurally generated corpus of corpus.py (seeded; public domain by
construction). Tokenizer: a byte-level BPE learned on it (tokenizer.py).
Model: dsv4_torch.DSV4 with the config below (the exact V4 architecture at toy
size). Objective: next-token cross entropy + 0.3 x the MTP block's
next-next-token cross entropy. The activation QAT round trips (FP8 kv rows,
Hadamard + FP4 indexer) are always on, with straight-through gradients; the
weight fake quantisation to the checkpoint formats (FP8 128x128, FP4 1x32) is
switched on for the second half of training so the exported checkpoint keeps
the trained quality. The indexer's top-k has no gradient, so its weights keep
their initial values (the official recipe trains it with a separate loss);
non-hash routers use the loss-free balancing bias update.

Writes OUT/model.pt, OUT/config.json, OUT/tokenizer.json, OUT/train_log.json.
"""

import argparse
import json
import math
import os
import random
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import corpus  # noqa: E402
import tokenizer as tk  # noqa: E402
from dsv4_torch import Cfg, DSV4  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
# normaliser / pre-tokeniser / decoder of the official-format fixture tokenizer (vocab and merges removed)
TEMPLATE = os.path.join(HERE, "tokenizer_template.json")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(HERE, "out"))
    ap.add_argument("--seed", type=int, default=20261126)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--docs", type=int, default=20000)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--wqat-from", type=float, default=0.5, help="fraction of steps after which weight QAT is on")
    ap.add_argument("--template-tokenizer", default=TEMPLATE)
    ap.add_argument("--time-budget", type=float, default=0,
                    help="if > 0: time the first 5 steps and lower --steps to fit this many seconds (the run logs the steps used)")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    random.seed(a.seed)

    docs = corpus.documents(a.seed, a.docs)
    tok, vocab = tk.train(docs, a.template_tokenizer, a.vocab, os.path.join(a.out, "tokenizer.json"))
    stream, starts = [], []
    for d in docs:
        starts.append(len(stream))
        stream += [0] + tok.encode(d, add_special_tokens=False).ids
    stream = torch.tensor(stream, dtype=torch.long)
    starts = [s for s in starts if s + a.seq <= len(stream)]
    print(f"corpus: {len(docs)} documents, {len(stream)} tokens, vocab {vocab}", flush=True)

    cfg = Cfg(vocab=vocab)
    model = DSV4(cfg, seed=a.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params/1e6:.2f} M parameters", flush=True)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "fn" not in n]
    other = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "fn" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": other, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95))
    rng = random.Random(a.seed + 7)
    warm = 20  # fixed, so a rerun with --steps N reproduces a time-budgeted run
    log = []
    t0 = time.time()
    step = 0
    while step < a.steps:
        if step == 5 and a.time_budget > 0:
            per = (time.time() - t0) / 5
            a.steps = max(10, min(a.steps, int(a.time_budget / per)))
            print(f"{per:.2f} s/step: training {a.steps} steps", flush=True)
        if step == int(a.steps * a.wqat_from):
            model.set_weight_qat(True)
        lr = a.lr * min(1.0, (step + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / a.steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.tensor([rng.choice(starts) for _ in range(a.batch)])
        x = stream[idx[:, None] + torch.arange(a.seq)[None, :]]
        logits, mtp = model(x, mtp=True)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, vocab), x[:, 1:].reshape(-1))
        mtp_loss = F.cross_entropy(mtp[:, :-1].reshape(-1, vocab), x[:, 2:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        (loss + 0.3 * mtp_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():  # loss-free load balancing of score-routed layers
            for blk in list(model.layers) + [model.mtp.block]:
                if not blk.ffn.hash and blk.ffn.load is not None:
                    ld = blk.ffn.load
                    blk.ffn.bias += 1e-3 * torch.sign(ld.mean() - ld)
        if step % 10 == 0 or step == a.steps - 1 or step == int(a.steps * a.wqat_from):
            e = time.time() - t0
            log.append({"step": step, "loss": round(loss.item(), 4), "mtp_loss": round(mtp_loss.item(), 4),
                        "lr": lr, "elapsed_s": round(e, 1)})
            print(f"step {step:4d}  loss {loss.item():.4f}  mtp {mtp_loss.item():.4f}  lr {lr:.2e}  {e:.0f}s", flush=True)
        step += 1
    train_s = time.time() - t0
    torch.save(model.state_dict(), os.path.join(a.out, "model.pt"))
    json.dump(cfg.to_json(), open(os.path.join(a.out, "config.json"), "w"), indent=1)
    json.dump({"args": vars(a), "n_params": n_params, "corpus_tokens": len(stream), "vocab": vocab,
               "train_seconds": round(train_s, 1), "torch": torch.__version__, "log": log},
              open(os.path.join(a.out, "train_log.json"), "w"), indent=1)
    print(f"trained in {train_s:.0f}s", flush=True)


if __name__ == "__main__":
    main()
