#!/usr/bin/env bash
# The test command (README): installs the Python test oracles, then runs every
# workspace test. Used as-is by CI (.ci/run).
set -euo pipefail
cd "$(dirname "$0")"
python3 -m pip install --quiet --disable-pip-version-check -r tools/test-requirements.txt
cargo test --workspace --release "$@"
