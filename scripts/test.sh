#!/usr/bin/env bash
# Installs everything (scripts/setup.sh) and runs the whole test suite,
# slow end-to-end tests included. CI runs exactly this (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export MUJOCO_GL=egl PYOPENGL_PLATFORM=egl TF_CPP_MIN_LOG_LEVEL=2
# One jax compilation cache for the whole run: the many tests (and their
# subprocesses) that compile the same tiny programs compile each once.
cache="$(mktemp -d "${TMPDIR:-/tmp}/qsft_vla_jax_cache.XXXXXX")"
trap 'rm -rf "$cache"' EXIT
export JAX_COMPILATION_CACHE_DIR="$cache"
.venv/bin/python -m pytest -q -n 2 --durations=15 tests "$@"
