"""learning.spec: the parameter groups per algorithm and architecture, defined once."""

import numpy as np
import pytest

from qsft_vla.learning import spec


def _variables():
  return {"params": {"trunk": {"w": np.ones(2)}, "head": {"k": np.zeros(3)},
                     spec.P_HEAD: {"k": np.ones(3)}},
          "batch_stats": {"m": np.zeros(1)}}


def test_shared_groups_split_the_p_head_and_merge_back():
  cfg = spec.LearnerConfig(architecture="shared")
  v = _variables()
  g = spec.param_groups(v, cfg)
  assert set(g["params_pi"]["params"]) == {"trunk", "head"}
  assert "batch_stats" in g["params_pi"]  # non-param collections belong to the trunk
  assert g["params_p"] == {"params": {spec.P_HEAD: v["params"][spec.P_HEAD]}}
  assert g["params_target"] is not v and set(g["params_target"]["params"]) == set(v["params"])
  inf = spec.inference_params(cfg, g["params_pi"], g["params_p"])
  assert set(inf) == spec.inference_keys(cfg) == {"shared"}
  assert set(inf["shared"]["params"]) == {"trunk", "head", spec.P_HEAD}


@pytest.mark.parametrize("algorithm,keys", [("qsft", {"pi", "p"}), ("bc", {"pi"}),
                                            ("filtered_bc", {"pi"})])
def test_separate_groups(algorithm, keys):
  cfg = spec.LearnerConfig(algorithm=algorithm)
  v = _variables()
  g = spec.param_groups(v, cfg)
  assert g["params_pi"]["params"] is v["params"]
  if algorithm == "qsft":
    assert g["params_p"]["params"] is v["params"] and g["params_target"]["params"] is v["params"]
  else:
    assert g["params_p"] == {} and g["params_target"] == {}
  inf = spec.inference_params(cfg, g["params_pi"], g["params_p"])
  assert set(inf) == spec.inference_keys(cfg) == keys


def test_shared_architecture_without_p_is_one_head():
  # BC has no p_theta: "shared" asks for nothing more than pi_phi.
  cfg = spec.LearnerConfig(algorithm="bc", architecture="shared")
  assert cfg.num_output_heads == 1 and spec.inference_keys(cfg) == {"pi"}


def test_learner_config_from_a_checkpoint_written_before_filter_quantile():
  """Old checkpoints store filter_threshold (a learner-side filter nothing set): it is
  dropped on reading, filter_quantile takes its default; unknown fields still fail."""
  old = {**spec.LearnerConfig(algorithm="filtered_bc").to_dict(), "filter_threshold": 0.5}
  del old["filter_quantile"]
  cfg = spec.LearnerConfig.from_dict(old)
  assert cfg.algorithm == "filtered_bc" and cfg.filter_quantile == 0.5
  with pytest.raises(ValueError, match="filter_treshold"):
    spec.LearnerConfig.from_dict({**old, "filter_treshold": 0.5})
  with pytest.raises(ValueError, match="filter_quantile"):
    spec.LearnerConfig(filter_quantile=1.5)
