#!/usr/bin/env bash
# Installs everything (scripts/setup.sh) and runs the main job on the embedded
# default: generate the default offline dataset (BabyAI GoToLocal from the
# noisy BabyAI bot) and print its statistics.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export MUJOCO_GL=egl PYOPENGL_PLATFORM=egl TF_CPP_MIN_LOG_LEVEL=2
DATA="${DATA:-data/babyai_gotolocal}"
if [ ! -e "$DATA" ]; then
  .venv/bin/python -m data_tools.generate --env=babyai:BabyAI-GoToLocal-v0 \
    --episodes="${EPISODES:-500}" --noise=0.0,0.5,1.0 --seed=0 --out="$DATA"
fi
.venv/bin/python -m data_tools.validate --data="$DATA" --config=robot_configs/babyai.py
.venv/bin/python -m data_tools.stats --data="$DATA" --config=robot_configs/babyai.py
