#!/usr/bin/env bash
# Install the Debian dataset, create .venv (if missing), install diffusers-otq with its test extras, run the tests.
# Usage: bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. scripts/setup_env.sh "[test]"
python -m pytest "$@"
