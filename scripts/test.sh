#!/usr/bin/env bash
# Install the Debian dataset, create .venv (if missing), install diffusers-otq with its test extras, run the tests.
# Usage: bash scripts/test.sh [pytest args...]
# One pytest-xdist worker per core (at most 4; OTQ_TEST_WORKERS overrides it, 0 runs in one process), each test file
# on one worker so that its module fixtures are built once; tests/conftest.py splits torch's threads among them.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. scripts/setup_env.sh "[test]"
python -m pytest -n "${OTQ_TEST_WORKERS:-auto}" --maxprocesses 4 --dist loadfile "$@"
