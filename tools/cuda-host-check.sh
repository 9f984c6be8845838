#!/usr/bin/env bash
# Checks the packed compressed-row code of the CUDA kernels (encode in
# comp_finish, decode in sink_attn / index_scores: the "Packed compressed rows"
# section of crates/cuda/src/kernels/attn.cu) against crates/engine/src/pack.rs
# on this machine, without a GPU: the section is compiled as C++ with CUDA shims
# (tools/cuda-host-check/harness.cpp) and run on rows the CPU packed.
# Needs g++ with C++20 (<barrier>). Takes ~40 s (it starts a thread per CUDA thread).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${TMPDIR:-/tmp}/dsv4-cuda-host-check"
mkdir -p "$out"
sed -n '/^\/\/ ---- Packed compressed rows/,/^\/\/ Decode n packed rows/p' crates/cuda/src/kernels/attn.cu | sed '$d' > "$out/packed_section.inc"
cargo run --release -q -p dsv4-engine --example packed_row_vectors -- "$out/vectors.bin"
g++ -std=c++20 -O2 -pthread -I "$out" -o "$out/harness" tools/cuda-host-check/harness.cpp
"$out/harness" "$out/vectors.bin"
