"""What every backbone config shares: the robot-derived fields and the Q-SFT
output layout (K action ids + one dummy), JSON round-trip for checkpoints.

A backbone's config is a frozen dataclass that subclasses BackboneConfig and
defines the fields num_action_dims, action_vocab, window, cameras, state_dim
and the property prefix_len (observation + instruction positions). It is the
backbone's one schema: the config section model.<name> is built from its
fields and defaults (config.dataclass_section), all but NOT_CONFIGURABLE, which
the package derives from the robot, the data and the learner.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from qsft_vla.errors import check_dataclass_fields


class BackboneConfig:
  """Mixin for backbone config dataclasses (RT1SmallConfig, VLMConfig)."""
  _TUPLE_FIELDS: tuple[str, ...] = ("cameras",)  # lists in JSON, tuples here
  NOT_CONFIGURABLE: tuple[str, ...] = ("num_action_dims", "action_vocab", "window", "cameras",
                                       "state_dim", "num_output_heads", "detach_head0")

  @property
  def dummy_id(self) -> int:
    """Output index of the Q-SFT dummy: right after the K action bins."""
    return self.action_vocab

  @property
  def output_size(self) -> int:
    return self.action_vocab + 1

  @property
  def seq_len(self) -> int:
    return self.prefix_len + self.num_action_dims

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]):
    check_dataclass_fields(cls, d)
    d = dict(d)
    for k in cls._TUPLE_FIELDS:
      if k in d:
        d[k] = tuple(d[k])
    return cls(**d)

  @classmethod
  def for_robot(cls, spec, action_tokenizer, window: int, **overrides):
    """Config for a RobotSpec and its ActionTokenizer; overrides set the other fields."""
    return cls(num_action_dims=action_tokenizer.num_dims,
               action_vocab=action_tokenizer.vocab_size, window=window,
               cameras=tuple(c.name for c in spec.cameras), state_dim=spec.state_dim,
               **overrides)
