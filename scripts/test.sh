#!/usr/bin/env bash
# Install the Debian dataset, create .venv (if missing), install diffusers-otq with its test extras, run the tests.
# Usage: bash scripts/test.sh [pytest args...]
# One pytest-xdist worker per core (at most 4; OTQ_TEST_WORKERS overrides it, 0 runs in one process), each test file
# on one worker so that its module fixtures are built once; tests/conftest.py splits torch's threads among them.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. scripts/setup_env.sh "[test]"
count='import os; n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
print(max(1, min(4, n)))'
workers="${OTQ_TEST_WORKERS:-$(python -c "$count")}"
python -m pytest -n "$workers" --dist loadfile "$@"
