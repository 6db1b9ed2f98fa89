"""The vlm_smollm2 variant: SmolLM2-135M as the policy, wired through config,
training binary, checkpoint and Controller (the module itself: test_vlm.py)."""

import os

import pytest

from qsft_vla import config as qconfig
from qsft_vla import train
from qsft_vla.models import vlm

from conftest import REPO

BABYAI = os.path.join(REPO, "robot_configs", "babyai.py")
METAWORLD = os.path.join(REPO, "robot_configs", "metaworld.py")


@pytest.mark.parametrize("path", [BABYAI, METAWORLD])
def test_variant_sets_backbone_and_keeps_algorithm(path):
  q = qconfig.load_config_file(f"{path}:vlm_smollm2")
  assert q.model.name == "vlm" and q.learner.algorithm == "qsft" and q.learner.beta > 0
  assert q.learner.lr_pi <= 1e-4 and q.learner.lr_p <= 1e-4
  b = qconfig.load_config_file(f"{path}:bc+vlm_smollm2")
  assert b.model.name == "vlm" and b.learner.algorithm == "bc" and b.learner.beta == 0.0
  with pytest.raises(qconfig.ConfigError, match="more than one"):
    qconfig.load_config_file(f"{path}:rt1_pretrained+vlm_smollm2")


@pytest.mark.parametrize("path,window", [(BABYAI, 1), (METAWORLD, 2)])
def test_build_uses_the_lm_tokenizer_and_vocabulary_ids(path, window):
  cfg = qconfig.load_config_file(f"{path}:vlm_smollm2")
  cfg.data.dir = "unused"  # stats are given: no dataset is read
  setup = train.build(cfg, stats=[None])
  mc = setup.policy.model_config
  assert isinstance(mc, vlm.VLMConfig) and mc.window == window
  # Instructions go through SmolLM2's own tokenizer (known ids), not MiniLM's.
  assert setup.policy.text_tokenizer.vocab_size == 49152
  ids, mask = setup.policy.text_tokenizer.encode_batch(["go to the red ball"], 8)
  assert ids[0, :5].tolist() == [2345, 288, 260, 2382, 4405] and mask[0].sum() == 5
  # Bin k is vocab id 48896 + k (the last 256 ids); the dummy is <empty_output>.
  out = mc.output_vocab_ids()
  assert out[0] == 48896 and out[mc.action_vocab - 1] == 48896 + mc.action_vocab - 1
  assert out[-1] == 16 and len(out) == mc.action_vocab + 1


def test_lm_folder_without_tokenizer_is_named(tmp_path):
  cfg = qconfig.load_config_file(f"{BABYAI}:vlm_smollm2")
  cfg.data.dir = "unused"
  cfg.model.vlm.lm_folder = str(tmp_path)
  with pytest.raises(qconfig.ConfigError, match=f"model.vlm.*{tmp_path}.*tokenizer.json"):
    train.build(cfg, stats=[None])
