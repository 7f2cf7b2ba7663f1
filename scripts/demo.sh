#!/usr/bin/env bash
# The main job on a fresh clone: set up .venv, install diffusers-otq with the demo extra (the peer libraries and
# matplotlib), run `diffusers-otq demo` on the bundled models. Extra arguments go to the demo (e.g. --full, or
# --models otq/fashion-mnist-dit --budgets 2 3).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. scripts/setup_env.sh "[demo]"
diffusers-otq demo "$@"
