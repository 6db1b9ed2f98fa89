"""policy.layout: the parameter groups per algorithm and architecture, defined once."""

import numpy as np
import pytest

from qsft_vla.learning.spec import LearnerConfig
from qsft_vla.policy import layout


def _variables():
  return {"params": {"trunk": {"w": np.ones(2)}, "head": {"k": np.zeros(3)},
                     layout.P_HEAD: {"k": np.ones(3)}},
          "batch_stats": {"m": np.zeros(1)}}


def test_shared_groups_split_the_p_head_and_merge_back():
  cfg = LearnerConfig(architecture="shared")
  v = _variables()
  g = layout.param_groups(v, cfg)
  assert set(g["params_pi"]["params"]) == {"trunk", "head"}
  assert "batch_stats" in g["params_pi"]  # non-param collections belong to the trunk
  assert g["params_p"] == {"params": {layout.P_HEAD: v["params"][layout.P_HEAD]}}
  assert g["params_target"] is not v and set(g["params_target"]["params"]) == set(v["params"])
  inf = layout.inference_params(cfg, g["params_pi"], g["params_p"])
  assert set(inf) == layout.inference_keys(cfg) == {"shared"}
  assert set(inf["shared"]["params"]) == {"trunk", "head", layout.P_HEAD}


def test_pi_head_groups_give_pi_phi_its_head_only_and_merge_back():
  cfg = LearnerConfig(architecture="pi_head")
  v = _variables()
  g = layout.param_groups(v, cfg)
  assert g["params_pi"] == {"params": {"head": v["params"]["head"]}}
  assert set(g["params_p"]["params"]) == {"trunk", layout.P_HEAD}
  assert "batch_stats" in g["params_p"]  # the trunk is p_theta's, and so is its state
  inf = layout.inference_params(cfg, g["params_pi"], g["params_p"])
  assert set(inf) == {"shared"}
  assert inf["shared"]["params"] == v["params"] and inf["shared"]["batch_stats"] is v["batch_stats"]


@pytest.mark.parametrize("algorithm,keys", [("qsft", {"pi", "p"}), ("bc", {"pi"}),
                                            ("filtered_bc", {"pi"})])
def test_separate_groups(algorithm, keys):
  cfg = LearnerConfig(algorithm=algorithm)
  v = _variables()
  g = layout.param_groups(v, cfg)
  assert g["params_pi"]["params"] is v["params"]
  if algorithm == "qsft":
    assert g["params_p"]["params"] is v["params"] and g["params_target"]["params"] is v["params"]
  else:
    assert g["params_p"] == {} and g["params_target"] == {}
  inf = layout.inference_params(cfg, g["params_pi"], g["params_p"])
  assert set(inf) == layout.inference_keys(cfg) == keys


@pytest.mark.parametrize("architecture", ["separate", "pi_head"])
def test_pure_monte_carlo_target_has_no_target_group(architecture):
  # mc_mix = 1 never reads p_theta_bar: nothing to keep or checkpoint.
  cfg = LearnerConfig(algorithm="qsft", architecture=architecture, mc_mix=1.0)
  g = layout.param_groups(_variables(), cfg)
  assert g["params_target"] == {} and g["params_p"]
  assert layout.param_groups(_variables(), LearnerConfig(
      algorithm="qsft", architecture=architecture, mc_mix=0.5))["params_target"]


def test_shared_architecture_without_p_is_one_head():
  # BC has no p_theta: "shared" asks for nothing more than pi_phi.
  cfg = LearnerConfig(algorithm="bc", architecture="shared")
  assert cfg.num_output_heads == 1 and layout.inference_keys(cfg) == {"pi"}


@pytest.mark.parametrize("algorithm,architecture", [("qsft", "separate"), ("qsft", "shared"),
                                                    ("bc", "separate")])
def test_check_networks_names_what_is_missing(algorithm, architecture):
  cfg = LearnerConfig(algorithm=algorithm, architecture=architecture)
  g = layout.param_groups(_variables(), cfg)
  good = layout.inference_params(cfg, g["params_pi"], g["params_p"])
  layout.check_networks(good, cfg)
  with pytest.raises(ValueError, match="needs keys"):
    layout.check_networks({**good, "extra": {}}, cfg)


def test_pi_and_p_logits():
  pi, p = np.zeros(3), np.ones(3)
  assert layout.pi_and_p_logits({"pi": pi}) == (pi, None)
  assert layout.pi_and_p_logits({"pi": pi, "p": p}) == (pi, p)
  got = layout.pi_and_p_logits({"shared": np.stack([pi, p])})
  assert (got[0] == pi).all() and (got[1] == p).all()
