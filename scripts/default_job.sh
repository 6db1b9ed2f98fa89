#!/usr/bin/env bash
# The embedded default, end to end on CPU: generate the default dataset (BabyAI
# GoToLocal from the BabyAI bot with epsilon-random actions), train Q-SFT and
# BC on it with the same model, data and steps, evaluate both on the same
# episodes, and print them side by side. scripts/main.sh runs it at full size;
# tests/test_default_job.py runs it tiny. Every size is an environment variable.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
export MUJOCO_GL="${MUJOCO_GL:-egl}" PYOPENGL_PLATFORM="${PYOPENGL_PLATFORM:-egl}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"

DATA="${DATA:-data/babyai_gotolocal}"     # generated once, reused
RUNS="${RUNS:-runs/default}"              # one workdir per method; a rerun resumes
EPISODES="${EPISODES:-1000}"              # dataset episodes
STEPS="${STEPS:-2000}"                    # training steps per method
EVAL_EPISODES="${EVAL_EPISODES:-100}"
EVAL_SEED="${EVAL_SEED:-1000}"
CONFIG=robot_configs/babyai.py
ENV_ID=babyai:BabyAI-GoToLocal-v0
TRAIN_FLAGS=(${TRAIN_FLAGS:-})            # extra --config.* overrides (tests: a tiny model)

if [ ! -e "$DATA" ]; then
  "$PYTHON" -m data_tools.generate --env="$ENV_ID" --episodes="$EPISODES" \
    --noise=0.0,0.5,1.0 --seed=0 --out="$DATA"
fi
"$PYTHON" -m data_tools.validate --data="$DATA" --config="$CONFIG"
"$PYTHON" -m data_tools.stats --data="$DATA" --config="$CONFIG"

for method in qsft bc; do
  echo "== training $method for $STEPS steps -> $RUNS/$method"
  "$PYTHON" -m qsft_vla.train --config="$CONFIG:$method" --workdir="$RUNS/$method" \
    --config.data.dir="$DATA" --config.train.num_steps="$STEPS" "${TRAIN_FLAGS[@]}"
done

for method in qsft bc; do
  echo "== evaluating $method: $EVAL_EPISODES episodes of $ENV_ID, seed $EVAL_SEED"
  "$PYTHON" -m qsft_vla.evaluate --workdir="$RUNS/$method" --env="$ENV_ID" \
    --episodes="$EVAL_EPISODES" --seed="$EVAL_SEED"
done

"$PYTHON" -m qsft_vla.evaluation.compare --out="$RUNS/comparison.md" \
  "Q-SFT=$RUNS/qsft/eval/${ENV_ID#*:}-seed$EVAL_SEED.json" \
  "BC=$RUNS/bc/eval/${ENV_ID#*:}-seed$EVAL_SEED.json"
