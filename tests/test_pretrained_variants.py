"""The pretrained backbone variants end to end on the real packaged weights:
a couple of training steps through train.train, a checkpoint, then the
robot-host Controller acts from it (the models themselves: test_rt1_pretrained.py,
test_vlm.py, test_vlm_smollm2.py)."""

import numpy as np
import pytest

from qsft_vla.policy import checkpoints
from qsft_vla import config as qconfig
from qsft_vla import train

from conftest import BABYAI_CONFIG, babyai_dataset

# Per variant: config overrides that keep the run small on 2 cores.
SMALL = {
    # One trunk with two heads: compiling the EfficientNet's forward and backward
    # passes once instead of for two networks was most of this test's time.
    "rt1_pretrained": {"model.rt1_small.width": 32, "model.rt1_small.depth": 1,
                       "model.rt1_small.num_heads": 2, "train.batch_size": 4,
                       "learner.architecture": "shared"},
    # The 30-layer LM dominates the suite's time on 2 cores: the first 2 of its
    # layers (the full LM: test_vlm_smollm2.py), one trunk with two heads and the
    # Monte-Carlo target (one forward/backward pass instead of five); the
    # separate-backbone and bootstrapped paths are tested on rt1_small.
    "vlm_smollm2": {"model.vlm.max_text_len": 8, "train.batch_size": 2,
                    "model.vlm.lm_layers": 2,
                    "learner.architecture": "shared", "learner.mc_mix": 1.0},
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  return babyai_dataset(tmp_path_factory, episodes=4, max_steps=12)


@pytest.mark.slow
@pytest.mark.parametrize("variant,model_name", [("rt1_pretrained", "rt1_small"),
                                                ("vlm_smollm2", "vlm")])
def test_train_two_steps_then_controller_acts(variant, model_name, dataset, tmp_path):
  from qsft_vla.policy.controller import Controller
  cfg = qconfig.load_config_file(f"{BABYAI_CONFIG}:{variant}")
  cfg.data.dir = dataset
  cfg.data.shuffle_buffer = 16
  cfg.update_from_flattened_dict(SMALL[variant])
  cfg.train.num_steps = 2
  cfg.train.log_every = cfg.train.checkpoint_every = 2
  summary = train.train(cfg, str(tmp_path))
  assert summary["step"] == 2
  assert np.isfinite(summary["loss_p"]) and np.isfinite(summary["loss_pi"])
  meta = checkpoints.read_meta(*checkpoints.resolve(str(tmp_path)))
  assert meta["model"]["name"] == model_name and meta["learner"]["algorithm"] == "qsft"
  ctrl = Controller.load(str(tmp_path))
  ctrl.reset("go to the red ball")
  img = np.random.default_rng(0).integers(0, 256, (56, 56, 3), dtype=np.uint8)
  for _ in range(2):
    action = np.asarray(ctrl.act({"image": img}))
    assert action.shape == (1,) and 0 <= action[0] <= 6
