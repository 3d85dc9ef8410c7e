#!/usr/bin/env bash
# The wheels benchmarks/gpu.sh installs on a JAX-only GPU machine that lacks Keras: keras as
# pinned in requirements.txt, and namex and optree, built for CPython 3.12 on x86-64 Linux.
# Run it where the package registry is reachable (this machine, not the GPU one); then carry
# the folder with the script (the device tool: carry=["benchmarks/wheels"]).
#
#   bash benchmarks/fetch_wheels.sh [FOLDER]      # default: benchmarks/wheels (git ignores it)
set -euo pipefail
cd "$(dirname "$0")/.."
folder=${1:-benchmarks/wheels}
keras=$(sed -n 's/^keras==//p' requirements.txt)
PYTHON=${PYTHON:-python3}
"$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --abi cp312 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    -d "$folder" "keras==$keras" namex==0.1.0 optree==0.20.0
ls "$folder"
