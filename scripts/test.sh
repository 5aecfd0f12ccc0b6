#!/usr/bin/env bash
# Run the test suite (unit tests on tiny models, then the real-model tests marked slow).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
