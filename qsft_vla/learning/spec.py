"""What a learner is, without the training machinery: LearnerConfig and its choices.

The checkpoint loader and the robot-host Controller need to know which
networks a run trained and how it acts, but not how it was optimised; this
module is that knowledge, free of jax, optax and TF, so the robot-host import
path stays light. learner.py (training) builds on it; how the parameters are
grouped is policy/layout.py.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, ClassVar, Mapping, Optional

import numpy as np

from qsft_vla.errors import check_dataclass_fields

# The choices of the learner's string fields (used by losses.py, reweighting.py and
# targets.py too; they import them from here so this module needs no jax).
ALGORITHMS = ("qsft", "bc", "filtered_bc")
RESIDUALS = ("dummy", "uniform")
EXTRACTIONS = ("p", "ratio", "sample")
SAMPLE_PROPOSALS = ("pi+p", "pi")
P_PARAMETRIZATIONS = ("independent", "residual")
DEFAULT_EPS = 1e-4  # support threshold on pi_phi (QSFT.md)
BACKUPS = ("max", "mean", "expectile")
SCHEDULES = ("joint", "sequential")
ARCHITECTURES = ("separate", "shared", "shared_encoder", "pi_head")
RETIRED_FIELDS = ("filter_threshold",)
# LoRA's default targets: every linear map of the Llama decoder and of MiniLM's layers,
# and EfficientNet-Lite0's 1x1 convolutions (its depthwise 3x3 ones have one input
# channel: nothing low-rank to add). Parts a model keeps frozen itself (MiniLM in
# rt1_small unless train_text_encoder, the VLM's vision with freeze_vision) get no
# gradient, so their adapters stay at zero.
DEFAULT_LORA_TARGETS = (r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|query|key"
                        r"|value|attention_out|intermediate|output|expand_conv|project_conv"
                        r"|conv_head)/kernel$")


@dataclasses.dataclass(frozen=True)
class LearnerConfig:
  """The learner's schema, defined once: the config section `learner` is built
  from these fields and defaults (config.learner_defaults), all but
  NOT_CONFIGURABLE. Defaults from QSFT.md / the paper (Table 4, chess/wordle column).
  """
  NOT_CONFIGURABLE: ClassVar[tuple[str, ...]] = ("donate_state",)  # set by the binary

  algorithm: str = "qsft"           # "qsft" | "bc" | "filtered_bc" (the config variants)
  beta: float = 1.0                 # inference: pi * exp(beta * p); 0 = behaviour cloning
  # Inference: "p" (the paper's pi * exp(beta * p)) or "ratio" (pi * exp(ratio_beta * p / pi)
  # over the support pi > ratio_eps: ranks actions by the implied Q = p / pi;
  # reweighting.reweighted_logits), per token; or "sample": sample_k whole actions
  # (pi_phi's greedy one and draws, see sample_proposal), the one of largest
  # log pi(a) + ratio_beta * Q(a) acts, Q(a) the implied Q of its last token, i.e.
  # of the whole action (reweighting.best_candidate).
  extraction: str = "p"
  ratio_beta: float = 1.0
  ratio_eps: float = 0.01
  sample_k: int = 32
  # Where "sample" draws its candidates: "pi+p" half from pi_phi, half from p_theta
  # over the valid bins (p ~ pi * Q: the behaviour's actions weighted by their value,
  # so high-value actions that pi_phi makes rare are proposed too; candidate 1 is
  # p_theta's greedy action); "pi" all from pi_phi. Candidate 0 is pi_phi's greedy
  # action either way, and every candidate is scored alike.
  sample_proposal: str = "pi+p"
  gamma: float = 0.99
  eps: float = DEFAULT_EPS          # support threshold on pi_phi in the Bellman target
  clip_weights: bool = True         # clip Bellman weights to [0, 1]
  mc_lower_bound: bool = False      # weight = max(Bellman target, observed return-to-go G_t)
  # Mixed Monte-Carlo target: weight = (1 - mc_mix) * Bellman target + mc_mix * G_t;
  # 1 = pure Monte Carlo (no bootstrap: the target network is never evaluated).
  mc_mix: float = 0.0
  # "max": the paper's in-support max of p_bar / pi at the next state; "mean": its
  # expectation under pi, sum_b p_bar(b) (the behaviour's value; no ratio noise);
  # "expectile": the expectile_tau-expectile of the in-support ratios under pi, a soft
  # max between the two (targets.support_ratio_expectile).
  backup: str = "max"
  expectile_tau: float = 0.9
  # "independent": p_theta's own logits (the paper); "residual": stop_grad(log pi) + the
  # p network's output, whose head starts at zero (learning/reweighting.residual_p_logits).
  p_parametrization: str = "independent"
  residual: str = "dummy"           # "dummy" (final paper) | "uniform" (submitted version)
  polyak_alpha: float = 0.005
  lr_pi: float = 1e-4
  lr_p: float = 1e-4
  schedule: str = "joint"           # "joint" | "sequential" (pi_phi first, then p_theta)
  pi_steps: int = 0                 # sequential: steps of the pi_phi phase
  # "separate" backbones | "shared" trunk with two heads | "shared_encoder": one
  # observation encoder under two transformers (rt1_small's p_trunk: the image
  # convolutions run once for both networks; both losses train the encoder) | "pi_head":
  # p_theta's network, trained by L_WCE alone, with pi_phi a second head on its features
  # behind a stop-gradient (a step costs about one network's; with the Monte-Carlo
  # target and no dropout p_theta then trains exactly as a separate one)
  architecture: str = "separate"
  grad_clip_norm: Optional[float] = 1.0   # None: no clipping
  steps_per_call: int = 1           # optimiser steps per jit call (lax.scan)
  # Gradient accumulation: each step's batch is split into this many microbatches
  # whose gradients are averaged before one optimiser update (memory, not math:
  # exact wherever the microbatches' loss masks hold as many tokens, as for BC and
  # the Monte-Carlo target; otherwise each microbatch's masked mean counts alike).
  microbatches: int = 1
  # filtered_bc: keep the episodes whose return is at or above this quantile of
  # their dataset's returns (data.statistics.filter_threshold). The data side drops
  # the others before batching; the learner trains on what it is given.
  filter_quantile: float = 0.5
  mask_invalid_logits: bool = True
  # LoRA (models/lora.py; the config variant "lora"): rank > 0 makes pi_phi, p_theta
  # and the target three adapter sets on the frozen pretrained weights; 0 trains
  # every weight (full fine-tuning). The delta of an adapted kernel is
  # (lora_alpha / lora_rank) * A @ B; lora_targets: a regex searched in the paths of
  # the pretrained kernels to adapt; lora_full: a regex of pretrained leaves trained
  # in full ("" none). Leaves not from pretrained weights are always trained.
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_targets: str = DEFAULT_LORA_TARGETS
  lora_full: str = ""
  donate_state: bool = False        # step donates the input state's buffers
  # Batches of consecutive steps: every chunk_length rows of a batch are consecutive
  # steps of one episode (data/pipeline.py builds them; the learner checks it), so a
  # bootstrapped row's next state is the next row's state and the next-state passes
  # of pi_phi and of the target reuse the current-state passes, plus one state per
  # chunk. 1: independent examples (the reference path). No effect on the pure
  # Monte-Carlo target beyond the batches' make-up.
  chunk_length: int = 1

  def __post_init__(self):
    for name, allowed in (("algorithm", ALGORITHMS), ("schedule", SCHEDULES),
                          ("architecture", ARCHITECTURES), ("residual", RESIDUALS),
                          ("extraction", EXTRACTIONS), ("backup", BACKUPS),
                          ("sample_proposal", SAMPLE_PROPOSALS),
                          ("p_parametrization", P_PARAMETRIZATIONS)):
      if getattr(self, name) not in allowed:
        raise ValueError(f"LearnerConfig.{name} must be one of {allowed}, "
                         f"got {getattr(self, name)!r}")
    if self.steps_per_call < 1:
      raise ValueError(f"steps_per_call must be >= 1, got {self.steps_per_call}")
    if isinstance(self.microbatches, bool) or not isinstance(self.microbatches, int) \
        or self.microbatches < 1:
      raise ValueError(f"microbatches must be an integer >= 1, got {self.microbatches!r}")
    if isinstance(self.chunk_length, bool) or not isinstance(self.chunk_length, int) \
        or self.chunk_length < 1:
      raise ValueError(f"chunk_length must be an integer >= 1, got {self.chunk_length!r}")
    if not 0.0 <= self.polyak_alpha <= 1.0:
      raise ValueError(f"polyak_alpha must be in [0, 1], got {self.polyak_alpha}")
    if self.pi_steps < 0:
      raise ValueError(f"pi_steps must be >= 0, got {self.pi_steps}")
    for name in ("beta", "ratio_beta"):
      v = getattr(self, name)
      if not (np.isfinite(v) and 0.0 <= v <= 1e6):
        raise ValueError(f"{name} must be a finite number in [0, 1e6], got {v}")
    if not (np.isfinite(self.gamma) and 0.0 <= self.gamma < 1.0):
      raise ValueError(f"gamma must be in [0, 1), got {self.gamma}")
    if not (np.isfinite(self.eps) and 0.0 <= self.eps < 1.0):
      raise ValueError(f"eps must be in [0, 1), got {self.eps}")
    for name in ("lr_pi", "lr_p"):
      v = getattr(self, name)
      if not (np.isfinite(v) and v >= 0.0):
        raise ValueError(f"{name} must be a finite number >= 0, got {v}")
    if self.grad_clip_norm is not None and not (np.isfinite(self.grad_clip_norm)
                                                and self.grad_clip_norm > 0):
      raise ValueError(f"grad_clip_norm must be a finite number > 0 or None, got "
                       f"{self.grad_clip_norm}")
    if not (np.isfinite(self.mc_mix) and 0.0 <= self.mc_mix <= 1.0):
      raise ValueError(f"mc_mix must be in [0, 1], got {self.mc_mix}")
    if not (np.isfinite(self.filter_quantile) and 0.0 <= self.filter_quantile <= 1.0):
      raise ValueError(f"filter_quantile must be in [0, 1], got {self.filter_quantile}")
    if not (np.isfinite(self.expectile_tau) and 0.5 <= self.expectile_tau < 1.0):
      raise ValueError(f"expectile_tau must be in [0.5, 1), got {self.expectile_tau}")
    if isinstance(self.sample_k, bool) or not isinstance(self.sample_k, int) \
        or not 1 <= self.sample_k <= 4096:
      raise ValueError(f"sample_k must be an integer in [1, 4096], got {self.sample_k!r}")
    if not 0.0 <= self.ratio_eps < 1.0:
      raise ValueError(f"ratio_eps must be in [0, 1), got {self.ratio_eps}")
    if self.uses_p and self.architecture == "pi_head" and self.schedule == "sequential":
      raise ValueError("schedule='sequential' trains pi_phi before p_theta, but with "
                       "architecture='pi_head' pi_phi reads p_theta's features, which its "
                       "phase would leave untrained: use schedule='joint'")
    self._check_lora()

  def _check_lora(self):
    if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) \
        or self.lora_rank < 0:
      raise ValueError(f"lora_rank must be an integer >= 0 (0: no LoRA), got {self.lora_rank!r}")
    if not (np.isfinite(self.lora_alpha) and self.lora_alpha > 0):
      raise ValueError(f"lora_alpha must be a finite number > 0, got {self.lora_alpha}")
    for name in ("lora_targets", "lora_full"):
      try:
        re.compile(getattr(self, name))
      except (re.error, TypeError) as e:
        raise ValueError(f"{name} {getattr(self, name)!r} is not a regex: {e}") from None
    if self.lora_rank and self.p_parametrization == "residual":
      raise ValueError("lora_rank > 0 and p_parametrization='residual' do not combine (the "
                       "residual p head replaces a head the adapter sets share)")
    if self.lora_rank and self.num_output_heads == 2:
      raise ValueError("lora_rank > 0 needs architecture='separate' (the config modifier "
                       "+lora sets it): the three LoRA adapter sets on one frozen base replace "
                       f"the shared network, got architecture={self.architecture!r}")

  def beta_of(self, extraction: str) -> float:
    """The run's beta for an extraction: beta for "p", ratio_beta for the two on the
    implied Q ("ratio", "sample")."""
    return self.beta if extraction == "p" else self.ratio_beta

  @property
  def inference_beta(self) -> float:
    """The beta of the configured extraction."""
    return self.beta_of(self.extraction)

  def fields_without_effect(self) -> tuple[str, ...]:
    """Fields that change nothing under this config: LoRA's settings without LoRA
    (lora_rank 0). A resume ignores them, so a later default of one (lora_targets
    grew EfficientNet's convolutions) does not refuse a run saved before it."""
    return () if self.lora_rank else ("lora_alpha", "lora_targets", "lora_full")

  @property
  def uses_lora(self) -> bool:
    return self.lora_rank > 0

  @property
  def uses_p(self) -> bool:
    return self.algorithm == "qsft"

  @property
  def bootstraps(self) -> bool:
    """False for the pure Monte-Carlo target (mc_mix = 1): no target network pass."""
    return self.mc_mix < 1.0

  @property
  def keeps_target(self) -> bool:
    """Whether a Polyak target p_theta_bar is kept: only a bootstrapped target reads it."""
    return self.uses_p and self.bootstraps

  @property
  def num_output_heads(self) -> int:
    """Heads the model must have: 2 for Q-SFT with a shared trunk or encoder, else 1."""
    return 2 if self.uses_p and self.architecture != "separate" else 1

  @property
  def model_fields(self) -> dict[str, Any]:
    """What the learner fixes in the model config: the output heads, with the
    shared encoder p_theta's own transformer (a field rt1_small alone has), and
    with pi_head the stop-gradient in front of pi_phi's head."""
    fields = {"num_output_heads": self.num_output_heads}
    if self.uses_p and self.architecture == "shared_encoder":
      fields["p_trunk"] = True
    if self.uses_p and self.architecture == "pi_head":
      fields["detach_head0"] = True
    return fields

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "LearnerConfig":
    # Checkpoints written before filtered BC's filter moved to the data side hold
    # filter_threshold, a learner-side filter nothing ever set; it has no successor.
    d = {k: v for k, v in d.items() if k not in RETIRED_FIELDS}
    check_dataclass_fields(cls, d)
    return cls(**d)


def model_config_for(model_config, learner_config: LearnerConfig):
  """The model config with the output heads (and trunks) the learner needs."""
  check_model_fields(type(model_config), learner_config)
  return dataclasses.replace(model_config, **learner_config.model_fields)


def check_model_fields(config_cls, learner_config: LearnerConfig) -> None:
  """Raises ValueError if a model config class cannot hold what the learner needs."""
  known = {f.name for f in dataclasses.fields(config_cls)}
  missing = sorted(set(learner_config.model_fields) - known)
  if missing:
    raise ValueError(f"learner.architecture={learner_config.architecture!r} needs a model with "
                     f"{missing} (an observation encoder apart from its transformer: rt1_small); "
                     f"{config_cls.__name__} has none: use 'separate' or 'shared'")
