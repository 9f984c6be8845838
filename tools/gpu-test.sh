#!/usr/bin/env bash
# GPU test suite in two halves, because the GPU machine has no Rust toolchain:
#   tools/gpu-test.sh build   (here)   builds the CUDA test binaries and the
#                                      synthetic benchmark (plus the dsv4 binary
#                                      with DSV4_GPU_WITH_CLI=1) into .gpu/ with
#                                      a copy of the fixtures;
#   tools/gpu-test.sh run     (there)  runs every test binary against the GPU.
# (.gpu/bin/fixture_logits FIXTURE OUT writes a fixture's CUDA logits, for byte
# comparisons between two builds.) Without a GPU, tools/cuda-host-check.sh
# checks the packed-row kernel code against pack.rs on the host.
# With the device tool: run `tools/gpu-test.sh build`, then on the GPU machine
# `bash tools/gpu-test.sh run` with `.gpu` carried.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
build)
    rm -rf .gpu && mkdir -p .gpu/bin .gpu/shared
    cargo test -p dsv4-cuda --release --no-run --message-format=json 2>/dev/null \
        | python3 -c 'import sys,json
for l in sys.stdin:
    try: m=json.loads(l)
    except Exception: continue
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["profile"].get("test"): print(m["executable"])' \
        | while read -r exe; do cp "$exe" .gpu/bin/; done
    # the dsv4 binary embeds the 13 MB demo model; add it only when asked
    # (the device tool sends at most 64 MiB of working tree)
    if [ "${DSV4_GPU_WITH_CLI:-0}" = 1 ]; then
        cargo build --release -p dsv4 2>/dev/null && cp "${CARGO_TARGET_DIR:-target}/release/dsv4" .gpu/bin/dsv4
    fi
    cargo build --release -p dsv4-cuda --examples 2>/dev/null && cp "${CARGO_TARGET_DIR:-target}/release/examples/"{synthetic_bench,fixture_logits} .gpu/bin/ || true
    strip .gpu/bin/* 2>/dev/null || true
    cp -r ../shared/fixtures .gpu/shared/fixtures
    rm -rf .gpu/shared/fixtures/tiny-hf
    du -sh .gpu
    ;;
run)
    export DSV4_SHARED="$PWD/.gpu/shared" DSV4_KERNEL_CACHE="$PWD/.gpu/kcache"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    fail=0
    for t in .gpu/bin/*-????????????????; do
        echo "== $(basename "$t")"
        "$t" --test-threads=1 --nocapture "${@:2}" || fail=1
    done
    exit $fail
    ;;
*)
    echo "usage: tools/gpu-test.sh build|run" >&2; exit 2 ;;
esac
