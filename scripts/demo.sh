#!/usr/bin/env bash
# Build the real SmolLM2-135M-Instruct for the CPU and chat with it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/kiln build smollm2-135m -o out/smollm2-135m-cpu
.venv/bin/kiln run out/smollm2-135m-cpu --max-tokens 96 \
  --prompt "${1:-Explain in two sentences why the sky is blue.}"
