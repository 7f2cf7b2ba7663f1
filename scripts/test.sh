#!/usr/bin/env bash
# Create .venv (if missing), install diffusers-otq with its test extras, run the test suite.
# Usage: bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
# torch>=2.4,<2.14 in pyproject.toml resolves to the CPU wheel; an unpinned torch would pull a 5 GB CUDA build.
python -m pip install --quiet --disable-pip-version-check -e ".[test]"
python -m pytest "$@"
