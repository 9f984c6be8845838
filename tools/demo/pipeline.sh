#!/usr/bin/env bash
# The whole demo-model pipeline: corpus + tokenizer + training -> official-format
# checkpoint -> `dsv4 convert` (f16, q8, q4, q2) -> perplexity, PyTorch vs engine.
# Usage: tools/demo/pipeline.sh [WORK_DIR] [extra train.py args, e.g. --threads 16 --time-budget 300]
# Writes WORK_DIR/{train,hf,demo-*.gguf,reference.json}; with INSTALL=1 copies the
# committed artefacts into models/ (demo-q8.gguf, demo-q2.gguf, demo-reference.json).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
WORK="${1:-$ROOT/tools/demo/out}"; shift || true
PY="${PYTHON:-python3}"
DSV4="${DSV4:-}"
if [ -z "$DSV4" ]; then
  cargo build --release -p dsv4 --manifest-path "$ROOT/Cargo.toml"
  DSV4="${CARGO_TARGET_DIR:-$ROOT/target}/release/dsv4"
fi
mkdir -p "$WORK"
"$PY" "$ROOT/tools/demo/train.py" --out "$WORK/train" "$@"
"$PY" "$ROOT/tools/demo/export.py" --train-dir "$WORK/train" --out "$WORK/hf"
"$PY" -c "import sys; sys.path.insert(0, '$ROOT/tools/demo'); import corpus; open('$WORK/heldout.txt', 'w').write(corpus.heldout_text(20261127, 40))"
for r in f16 q8 q4 q2; do "$DSV4" convert --hf "$WORK/hf" --out "$WORK/demo-$r.gguf" --recipe "$r"; done
"$PY" "$ROOT/tools/demo/check.py" --hf "$WORK/hf" --heldout "$WORK/heldout.txt" --dsv4 "$DSV4" \
  --gguf f16="$WORK/demo-f16.gguf" --gguf q8="$WORK/demo-q8.gguf" --gguf q4="$WORK/demo-q4.gguf" --gguf q2="$WORK/demo-q2.gguf" \
  --train-log "$WORK/train/train_log.json" --out "$WORK/reference.json"
if [ "${INSTALL:-0}" = 1 ]; then
  cp "$WORK/demo-q8.gguf" "$WORK/demo-q2.gguf" "$ROOT/models/"
  cp "$WORK/heldout.txt" "$ROOT/models/demo-heldout.txt"
  sed 's/"heldout": "heldout.txt"/"heldout": "demo-heldout.txt"/' "$WORK/reference.json" > "$ROOT/models/demo-reference.json"
fi
