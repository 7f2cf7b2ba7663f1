#!/usr/bin/env bash
# Shared set-up for scripts/test.sh and scripts/demo.sh: the Debian dataset, .venv (if missing) and an editable
# install of diffusers-otq with the extras given as $1 (e.g. "[test]"). Source it from the repository root.
set -euo pipefail
bash scripts/install_data.sh
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
# torch>=2.4,<2.14 in pyproject.toml resolves to the CPU wheel; an unpinned torch would pull a 5 GB CUDA build.
python -m pip install --quiet --disable-pip-version-check -e ".${1:-}"
