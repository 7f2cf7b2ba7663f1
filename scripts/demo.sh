#!/usr/bin/env bash
# The main job on a fresh clone: set up .venv, install diffusers-otq, run `diffusers-otq demo` on the bundled
# reference model. Extra arguments go to the demo (e.g. --bits 3 --num-images 40).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. scripts/setup_env.sh ""
diffusers-otq demo "$@"
