#!/usr/bin/env bash
# Installs everything (scripts/setup.sh) and runs the main job on the embedded
# default (scripts/default_job.sh): generate the default offline dataset
# (BabyAI GoToLocal from the noisy BabyAI bot), train Q-SFT and BC on it on
# CPU, evaluate both on the same episodes and print them side by side.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec bash scripts/default_job.sh
