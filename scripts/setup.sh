#!/usr/bin/env bash
# Create .venv with translator, its dependencies, the test tools and the optional extras the tests cover
# (CPU PyTorch 2.13.0 unless TORCH_SPEC says otherwise, e.g.
# TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128").
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build
# shellcheck disable=SC2086
.venv/bin/python -m pip install -q --disable-pip-version-check ${TORCH_SPEC:-torch==2.13.0}
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev,bench,serve]"
