#!/usr/bin/env bash
# Lint (ruff), format check (ruff format), types (mypy) and the import layers (import-linter).
# Run by .ci/run before the tests; needs the environment scripts/setup.sh makes.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# mypy and import-linter read `kiln` as one tree, as it is installed: compiler/ with passes/, targets/ and
# runtime/ inside (pyproject.toml's package-dir). A folder of links gives them that view of the sources.
view=build/package-view
rm -rf "$view" && mkdir -p "$view/kiln"
for f in compiler/*.py compiler/*/; do ln -s "$PWD/${f%/}" "$view/kiln/"; done
for d in passes targets runtime; do ln -s "$PWD/$d" "$view/kiln/$d"; done
(cd "$view" && MYPYPATH=. "$OLDPWD/.venv/bin/mypy" --config-file "$OLDPWD/pyproject.toml" -p kiln)
PYTHONPATH="$view" .venv/bin/lint-imports pyproject.toml
