#!/usr/bin/env bash
# Installs everything (scripts/setup.sh) and runs the whole test suite,
# slow end-to-end tests included. CI runs exactly this (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export MUJOCO_GL=egl PYOPENGL_PLATFORM=egl TF_CPP_MIN_LOG_LEVEL=2
exec .venv/bin/python -m pytest -q -n 2 --durations=15 tests "$@"
