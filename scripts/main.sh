#!/usr/bin/env bash
# Installs everything (scripts/setup.sh) and runs the main job on the embedded
# default (scripts/default_job.sh): generate the default offline dataset
# (BabyAI GoToLocal from a behaviour mixture whose most common behaviour is
# wrong), train Q-SFT, BC and filtered BC on it on CPU, evaluate them on the
# same episodes and print them side by side.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec bash scripts/default_job.sh
