#!/usr/bin/env bash
# Build llama.cpp's quantizer (ggml's libggml-base.so) for the evaluation's GGUF peers
# (diffusers_otq/evaluation/gguf.py). Not part of the test command's install: a few minutes of C compilation.
#   bash scripts/install_gguf.sh            # -> ~/.cache/diffusers-otq/ggml/libggml-base.so
# Needs cmake and a C/C++ compiler; downloads the llama-cpp-python source package (pinned, checksummed).
set -euo pipefail
VERSION=0.3.36
SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
URL="https://files.pythonhosted.org/packages/ec/e9/e7de2b0463ea3ffbf0ede6cb21b58c1258a8f6521aae45ca773a59fe7cf3/llama_cpp_python-${VERSION}.tar.gz"
DEST="${DIFFUSERS_OTQ_GGML_DIR:-$HOME/.cache/diffusers-otq/ggml}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
curl -sSfL -o "$WORK/llama.tar.gz" "$URL"
echo "$SHA256  $WORK/llama.tar.gz" | sha256sum -c --quiet
tar xzf "$WORK/llama.tar.gz" -C "$WORK"
GGML="$WORK/llama_cpp_python-${VERSION}/vendor/llama.cpp/ggml"
touch "$GGML/ggml.pc.in"  # the source package leaves out this pkg-config template; ggml's CMakeLists configures it
cmake -S "$GGML" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=ON \
  -DGGML_OPENMP=OFF -DGGML_BUILD_TESTS=OFF -DGGML_BUILD_EXAMPLES=OFF > "$WORK/cmake.log"
cmake --build "$WORK/build" --target ggml-base -j "$(nproc)" > "$WORK/build.log"
mkdir -p "$DEST"
cp -L "$WORK/build/src/libggml-base.so" "$DEST/libggml-base.so"
echo "llama.cpp ${VERSION} quantizer: $DEST/libggml-base.so"
