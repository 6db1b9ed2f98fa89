"""FSDP placement (qsft_vla/learning/sharding.py): the rules, and the sharded
Q-SFT step equal to the one-device step on 8 host CPU devices."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from qsft_vla import config as qconfig
from qsft_vla.learning import sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RULES = sharding.parse_rules(sharding.DEFAULT_RULES)


def test_default_rules_split_embeddings_by_vocabulary_and_kernels_by_output():
  spec = lambda name, shape: sharding.leaf_spec(name, shape, RULES, fsdp=4, min_size=16)
  assert spec("params_pi/params/text_embed/embedding", (1024, 32)) == ("fsdp", None)
  assert spec("params_p/params/block0/mlp/Dense_0/kernel", (64, 256)) == (None, "fsdp")
  assert spec("params_pi/params/image_encoder/conv0/kernel", (3, 3, 3, 16)) == (
      None, None, None, "fsdp")
  # The optimiser's moments carry the parameter's name inside their path.
  assert spec("opt_pi/1/0/mu/params/head/kernel", (64, 8)) == (None, "fsdp")
  assert spec("params_pi/params/head/bias", (64,)) == ()               # no rule names it
  assert spec("params_pi/params/head/kernel", (2, 6)) == ()           # below min_size
  assert spec("params_pi/params/head/kernel", (64, 6)) == ("fsdp", None)  # 6 % 4: the other axis
  assert spec("params_pi/params/head/kernel", (63, 6)) == ()          # neither: kept whole
  assert spec("p/text_embed/embedding", (30522, 64)) == (None, "fsdp")  # MiniLM's vocabulary
  assert sharding.leaf_spec("x/kernel", (64, 256), RULES, fsdp=1) == ()  # no fsdp axis


def test_rules_in_order_and_replicate_rule():
  rules = sharding.parse_rules(["head/kernel$:-", "kernel$:0", "a:b:c:1"])
  assert sharding.leaf_spec("p/head/kernel", (64, 64), rules, 2, 1) == ()
  assert sharding.leaf_spec("p/mlp/kernel", (64, 64), rules, 2, 1) == ("fsdp", None)
  assert sharding.leaf_spec("a:b:c", (4, 64), rules, 2, 1) == (None, "fsdp")  # last ':' splits
  assert sharding.leaf_spec("p/mlp/kernel", (64, 64), rules, 2, 1) == ("fsdp", None)
  assert sharding.leaf_spec("p/mlp/kernel", (64,), sharding.parse_rules(["kernel:3"]), 2, 1) == ()


@pytest.mark.parametrize("rule, match", [("kernel", "REGEX:AXIS"), ("kernel:x", "integer"),
                                         ("(:0", "regular expression"), (":0", "REGEX:AXIS")])
def test_bad_rules_are_refused_naming_the_rule(rule, match):
  with pytest.raises(ValueError, match=match):
    sharding.Rule.parse(rule)


def test_config_refuses_bad_fsdp_and_rules():
  cfg = qconfig.load_config_file(os.path.join(REPO, "robot_configs", "babyai.py"))
  cfg.train.fsdp = 0
  with pytest.raises(qconfig.ConfigError, match="train.fsdp"):
    qconfig.validate(cfg, where="c")
  cfg.train.fsdp = 1
  cfg.train.sharding_rules = ("kernel$:x",)
  with pytest.raises(qconfig.ConfigError, match=r"train.*kernel\$:x"):
    qconfig.validate(cfg, where="c")


def test_make_mesh_needs_fsdp_to_divide_the_devices():
  with pytest.raises(ValueError, match="train.fsdp=3"):
    sharding.make_mesh(np.arange(8), 3)


@pytest.mark.slow
def test_sharded_step_equals_one_device_step_and_splits_the_state():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, os.path.join(REPO, "tests", "fsdp_check.py")],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout)
  total = out["total_bytes"]
  for name in ("data2_fsdp4",):
    r = out[name]
    # Reductions split over devices add in another order: float noise, which Adam
    # turns into up to ~lr per step where a gradient is exactly 0 (conv biases
    # before GroupNorm); everything else agrees to 1e-5.
    assert r["max_leaf_diff"] < 4 * 3 * 1e-3, r
    assert r["leaves_over_1e-5"] <= 0.05 * r["leaves"], r
    assert r["max_metric_diff"] < 1e-4, r
    assert any("text_embed/embedding" in n for n in r["sharded_leaves"]), r
    assert any("opt_p" in n and "mu" in n for n in r["sharded_leaves"]), r
    held = r["bytes_per_device"]
    # Every device holds the replicated leaves whole and 1/fsdp of the sharded ones.
    assert held == [r["expected_bytes_per_device"]] * 8, (held, r)
    assert max(held) < 0.5 * total, (held, total)
