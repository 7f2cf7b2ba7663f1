#!/usr/bin/env bash
# Install the offline datasets: Fashion-MNIST from Debian (package dataset-fashion-mnist, MIT).
# scikit-learn's digits ship inside the scikit-learn wheel. Skipped when the files are already present.
set -euo pipefail
if [ -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ]; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq dataset-fashion-mnist
