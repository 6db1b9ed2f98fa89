"""learning.spec: the learner's schema (LearnerConfig) and reading old checkpoints' fields."""

import pytest

from qsft_vla.learning import spec


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


def test_sample_proposal_choices_and_old_checkpoints():
  """A checkpoint written before sample_proposal reads with the default ("pi+p");
  anything but the listed proposals is refused, naming the field."""
  old = spec.LearnerConfig(extraction="sample").to_dict()
  del old["sample_proposal"]
  assert spec.LearnerConfig.from_dict(old).sample_proposal == "pi+p"
  assert spec.LearnerConfig(sample_proposal="pi").sample_proposal == "pi"
  with pytest.raises(ValueError, match=r"LearnerConfig.sample_proposal must be one of"):
    spec.LearnerConfig(sample_proposal="p")
