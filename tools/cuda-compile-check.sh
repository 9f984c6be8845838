#!/usr/bin/env bash
# Compile every CUDA kernel on a machine without a GPU and print per-kernel
# SASS instruction counts: NVRTC, cuobjdump and nvdisasm come from NVIDIA's
# pip wheels (cached in ${DSV4_CUDA_TOOLS:-$HOME/.cache/dsv4/cuda-tools},
# about 150 MB), the cubin from `examples/kernel_compile` (the same source
# and options the engine compiles at run time).
#   tools/cuda-compile-check.sh [SM] [KERNEL_REGEX]   (SM default 90)
# A compile error fails the script with NVRTC's log. The counts are static
# (instructions in the binary, NOPs excluded): for a loop-free decode kernel
# they are what each warp executes, a quick check of a change before the GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
sm="${1:-90}"
re="${2:-.}"
tools="${DSV4_CUDA_TOOLS:-$HOME/.cache/dsv4/cuda-tools}"
if [ ! -x "$tools/bin/nvdisasm" ] || [ ! -e "$tools/lib/libnvrtc.so" ]; then
    mkdir -p "$tools/wheels" "$tools/x" "$tools/bin" "$tools/lib"
    python3 -m pip download --no-deps -q -d "$tools/wheels" nvidia-cuda-nvrtc-cu12 nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm
    for w in "$tools"/wheels/*.whl; do python3 -m zipfile -e "$w" "$tools/x"; done
    cp "$(find "$tools/x" -name cuobjdump -type f | head -1)" "$(find "$tools/x" -name nvdisasm -type f | head -1)" "$tools/bin/"
    chmod +x "$tools/bin/"*
    for f in $(find "$tools/x" -name 'libnvrtc*.so*'); do cp "$f" "$tools/lib/"; done
    ln -sf "$(basename "$(ls "$tools"/lib/libnvrtc.so.* | head -1)")" "$tools/lib/libnvrtc.so"
fi
cargo build --release -q -p dsv4-cuda --example kernel_compile
out="${CARGO_TARGET_DIR:-target}/kernels_sm$sm.cubin"
LD_LIBRARY_PATH="$tools/lib" "${CARGO_TARGET_DIR:-target}/release/examples/kernel_compile" "$out" "$sm"
PATH="$tools/bin:$PATH" cuobjdump -sass "$out" 2>/dev/null | python3 -c '
import re, sys
pat = re.compile(sys.argv[1])
cur, n = None, {}
for l in sys.stdin:
    m = re.match(r"\s+Function : (\S+)", l)
    if m:
        cur = m.group(1); n[cur] = 0; continue
    m = re.match(r"\s+/\*[0-9a-f]{4}\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_.]+)", l)
    if cur and m and m.group(2) != "NOP":
        n[cur] += 1
for k in sorted(n):
    if pat.search(k):
        print(f"{n[k]:7d}  {k}")
' "$re"
