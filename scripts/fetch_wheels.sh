#!/usr/bin/env bash
# Download the wheels that the GPU machine lacks into .whl/ (git-ignored), for scripts/gpu_runbook.sh.
#   bash scripts/fetch_wheels.sh
# The lent H100/H200 image (Python 3.12, torch 2.11, lightning 2.6, sacrebleu, sentencepiece, transformers) has
# neither `datasets` nor `jsonargparse`; these pure-Python wheels are installed there with --no-deps --target, beside
# its own packages (see the device tool's README).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  datasets==5.2.0 dill multiprocess jsonargparse docstring-parser typeshed-client
ls -1 .whl
