#!/usr/bin/env bash
# The embedded default, end to end on CPU: generate the default dataset (BabyAI
# GoToLocal from a behaviour mixture whose most common behaviour is wrong: 25%
# of the episodes from the BabyAI bot, 75% from the bot sent to the nearest
# other object), train Q-SFT, BC and filtered BC on it
# with the same model, data, steps and seed, evaluate all three on the same
# episodes, and print them side by side with paired tests. scripts/main.sh runs
# it at full size; tests/test_default_job.py runs it tiny. Every size is an
# environment variable.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
export MUJOCO_GL="${MUJOCO_GL:-egl}" PYOPENGL_PLATFORM="${PYOPENGL_PLATFORM:-egl}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"

DATA="${DATA:-data/babyai_gotolocal_mix}"   # generated once, reused
RUNS="${RUNS:-runs/default}"                # one workdir per method; a rerun resumes
EPISODES="${EPISODES:-4000}"                # dataset episodes
BEHAVIOR="${BEHAVIOR:-expert:0.25,distractor:0.75}"  # benchmarks/policy_quality.py says why
STEPS="${STEPS:-2000}"                      # training steps per method
EVAL_EPISODES="${EVAL_EPISODES:-100}"
EVAL_SEED="${EVAL_SEED:-1000}"              # the test stream (README: never tuned on)
CONFIG=robot_configs/babyai.py
ENV_ID=babyai:BabyAI-GoToLocal-v0
TRAIN_FLAGS=(${TRAIN_FLAGS:-})              # extra --config.* overrides (tests: a tiny model)
# Every method trains on the first 90% of the episodes; Q-SFT's Q-gap diagnostic
# (q_gap/* in metrics.jsonl, a "q gap" log line per checkpoint) reads the rest.
SPLIT_FLAGS=(--config.data.split="train[:90%]" --config.eval.q_gap_split="train[90%:]")
METHODS=(qsft bc filtered_bc)

if [ ! -e "$DATA" ]; then
  "$PYTHON" -m data_tools.generate --env="$ENV_ID" --episodes="$EPISODES" \
    --behavior="$BEHAVIOR" --seed=0 --out="$DATA"
fi
"$PYTHON" -m data_tools.validate --data="$DATA" --config="$CONFIG"
"$PYTHON" -m data_tools.stats --data="$DATA" --config="$CONFIG"

for method in "${METHODS[@]}"; do
  echo "== training $method for $STEPS steps -> $RUNS/$method"
  "$PYTHON" -m qsft_vla.train --config="$CONFIG:$method" --workdir="$RUNS/$method" \
    --config.data.dir="$DATA" --config.train.num_steps="$STEPS" "${SPLIT_FLAGS[@]}" \
    "${TRAIN_FLAGS[@]}"
done

for method in "${METHODS[@]}"; do
  echo "== evaluating $method: $EVAL_EPISODES episodes of $ENV_ID, seed $EVAL_SEED"
  "$PYTHON" -m qsft_vla.evaluate --workdir="$RUNS/$method" --env="$ENV_ID" \
    --episodes="$EVAL_EPISODES" --seed="$EVAL_SEED"
done

stem="${ENV_ID#*:}-seed$EVAL_SEED"
"$PYTHON" -m qsft_vla.evaluation.compare --out="$RUNS/comparison.md" \
  "Q-SFT=$RUNS/qsft/eval/$stem.json" "BC=$RUNS/bc/eval/$stem.json" \
  "filtered BC=$RUNS/filtered_bc/eval/$stem.json"
