"""Export a trained demo model (OUT/model.pt + OUT/config.json + OUT/tokenizer.json
from train.py) to an official-format DeepSeek V4 checkpoint directory."""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import official_format  # noqa: E402
from dsv4_torch import Cfg, DSV4  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--train-dir", required=True)
ap.add_argument("--out", required=True)
a = ap.parse_args()
cfg = Cfg(**json.load(open(os.path.join(a.train_dir, "config.json"))))
model = DSV4(cfg)
model.load_state_dict(torch.load(os.path.join(a.train_dir, "model.pt")))
official_format.save(model, os.path.join(a.train_dir, "tokenizer.json"), a.out)
print(f"wrote {a.out}")
