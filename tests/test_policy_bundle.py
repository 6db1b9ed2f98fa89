"""policy.TrainedPolicy: one object that is a trained policy (load, describe, act)."""

import dataclasses
import json

import numpy as np
import pytest

from checkpoint_fixture import write_checkpoint
from qsft_vla.policy import Controller, TrainedPolicy, checkpoints


@pytest.fixture(scope="module")
def shared_qsft(tmp_path_factory):
  return write_checkpoint(tmp_path_factory.mktemp("shared"), "metaworld", "qsft", "shared",
                          step=3)


def test_load_describe_and_meta_round_trip(shared_qsft):
  policy = TrainedPolicy.load(shared_qsft)
  assert policy.step == 3 and policy.path.endswith("checkpoints/3")
  assert set(policy.params) == {"shared"} and policy.has_p
  text = policy.describe()
  for expected in ("policy: qsft (shared trunk, beta", "step 3", "robot: metaworld",
                   "cameras image: 64x64", "state 39", "model: rt1_small"):
    assert expected in text, (expected, text)
  # What a checkpoint's meta says is what the object holds, and back.
  meta = checkpoints.read_meta(*checkpoints.resolve(shared_qsft))
  again = TrainedPolicy.from_meta(meta, policy.text_tokenizer)
  assert json.loads(json.dumps(again.meta())) == {k: v for k, v in meta.items() if k != "step"}
  assert again.params is None and again.learner == policy.learner


def test_params_must_match_the_learner(shared_qsft):
  policy = TrainedPolicy.load(shared_qsft)
  with pytest.raises(ValueError, match=r"needs keys \['shared'\]"):
    policy.with_params({"pi": policy.params["shared"]})
  with pytest.raises(ValueError, match="with params"):
    Controller(dataclasses.replace(policy, params=None), warmup=False)


def test_controller_from_the_policy_equals_controller_load(shared_qsft):
  policy = TrainedPolicy.load(shared_qsft)
  a = Controller(policy, warmup=False)
  b = Controller.load(shared_qsft, warmup=False)
  assert a.policy is policy and a.step == b.step == 3
  rng = np.random.RandomState(0)
  obs = {"image": rng.randint(0, 256, (64, 64, 3)).astype(np.uint8),
         "state": rng.standard_normal(39).astype(np.float32)}
  a.reset("pick up the puck")
  b.reset("pick up the puck")
  np.testing.assert_array_equal(a.act(obs), b.act(obs))


def test_bc_policy_has_no_p(tmp_path):
  policy = TrainedPolicy.load(write_checkpoint(tmp_path, "babyai", "bc"))
  assert set(policy.params) == {"pi"} and not policy.has_p
  assert policy.describe().startswith("policy: bc, step 1")
