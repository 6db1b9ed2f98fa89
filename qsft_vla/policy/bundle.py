"""TrainedPolicy: one object that is a (trained or training) policy.

  policy = TrainedPolicy.load("/path/to/workdir")     # latest step; or step=N
  print(policy.describe())
  controller = Controller(policy, beta=8.0)          # policy/controller.py

Everything needed to act with a run's networks, without its config file, its
data or the training code: the model and its config, the learner config (which
networks exist and how they act), the action and text tokenizers, the robot
spec, the image sizes the model was trained at, the datasets' statistics and,
once trained, the acting parameters (policy/layout.py: {"pi", "p"}, {"pi"} or
{"shared"}). Training builds it without parameters (train.build) and writes
it into every checkpoint (meta(), plus the text tokenizer); the Controller,
the evaluator, the Q-gap probe and the benchmarks read it back with load().

TF-free and optax-free: this is the robot host's view of a run.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

from flax import traverse_util
import jax

from qsft_vla import robot as robot_lib
from qsft_vla.errors import CheckpointError
from qsft_vla.learning import spec as learner_spec
from qsft_vla.models import lora, registry
from qsft_vla.policy import checkpoints, layout
from qsft_vla.tokenizers.action import ActionTokenizer
from qsft_vla.tokenizers.text import TextTokenizer


@dataclasses.dataclass(frozen=True)
class TrainedPolicy:
  """A run's policy. params is None until there are trained parameters.

  config: the run's config as a plain dict (recorded in checkpoints).
  datasets: per mixture member {"dir", "weight", "statistics"}.
  step, path: which checkpoint this is, when it was loaded from one.
  lora_base: a LoRA run's frozen base: {"sha256": lora.identity of its weights,
    "sources": where they come from}; None without LoRA.
  """
  model_name: str
  model: Any
  model_config: Any
  learner: learner_spec.LearnerConfig
  action_tokenizer: ActionTokenizer
  text_tokenizer: TextTokenizer
  robot: robot_lib.RobotSpec
  image_sizes: Mapping[str, tuple[int, int]]
  datasets: tuple[Mapping[str, Any], ...] = ()
  config: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  params: Optional[Mapping[str, Any]] = None
  step: Optional[int] = None
  path: Optional[str] = None
  lora_base: Optional[Mapping[str, Any]] = None

  # ------------------------------------------------------------- derived

  @property
  def has_p(self) -> bool:
    """Whether this run trained p_theta (Q-SFT), i.e. whether beta may be > 0."""
    return self.learner.uses_p

  @property
  def statistics(self) -> list[Optional[Mapping[str, Any]]]:
    return [d.get("statistics") for d in self.datasets]

  def with_params(self, params: Mapping[str, Any], step: Optional[int] = None,
                  path: Optional[str] = None) -> "TrainedPolicy":
    """The same policy with acting parameters (layout.inference_params)."""
    layout.check_networks(params, self.learner)
    return dataclasses.replace(self, params=dict(params), step=step, path=path)

  def abstract_variables(self):
    """ShapeDtypeStructs of the model's full variables (no compute, no memory)."""
    inputs = registry.example_inputs(self.model_config, self.image_sizes)
    return jax.eval_shape(lambda: self.model.init(jax.random.PRNGKey(0), *inputs, False))

  def param_groups(self, variables) -> dict[str, Any]:
    """The training groups (layout.GROUPS) of full variables (not for LoRA runs,
    whose groups are adapter sets: see load)."""
    return layout.param_groups(variables, self.learner)

  def base_identity(self, base) -> dict[str, Any]:
    """What a LoRA checkpoint records of its frozen base (lora_base)."""
    return {"sha256": lora.identity(base),
            "sources": registry.pretrained_sources(self.model_name, self.model_config)}

  # ------------------------------------------------------------- describe

  def describe(self) -> str:
    """A few lines a person reads: what this policy is, acts on and was trained on."""
    lc, spec = self.learner, self.robot
    cams = ", ".join(f"{c}: {h}x{w}" for c, (h, w) in self.image_sizes.items())
    dims = ", ".join(f"{d.name} ({d.kind}, {d.bins} bins)" for d in self.action_tokenizer.dims)
    arch = {"separate": "separate networks", "shared": "shared trunk",
            "shared_encoder": "shared encoder",
            "pi_head": "pi_phi a head on p_theta's network"}[lc.architecture]
    algo = lc.algorithm + (f" ({arch}, beta {lc.inference_beta:g} on the "
                           f"{lc.extraction!r} extraction)" if lc.uses_p else "")
    lines = [f"policy: {algo}" + (f", step {self.step}" if self.step is not None else
                                   ", untrained"),
             f"robot: {spec.name}; cameras {cams}"
             + (f"; state {spec.state_dim}" if spec.state_dim else ""),
             f"actions: {dims}",
             f"model: {self.model_name}, window {self.model_config.window}"
             + (f"; LoRA rank {lc.lora_rank} on a frozen base (sha256 "
                f"{str(self.lora_base.get('sha256'))[:12]}..., from "
                f"{', '.join(self.lora_base.get('sources') or [])})" if self.lora_base else "")]
    for d in self.datasets:
      lines.append(f"data: {d.get('dir')} (weight {float(d.get('weight', 1.0)):g})")
    if self.path:
      lines.append(f"checkpoint: {self.path}")
    return "\n".join(lines)

  # ------------------------------------------------------------- checkpoints

  def meta(self) -> dict[str, Any]:
    """The checkpoint's meta item: everything but the weights and the text
    tokenizer (its own item), as JSON."""
    return {"format": checkpoints.FORMAT, "version": checkpoints.VERSION,
            "config": dict(self.config),
            "model": registry.describe(self.model_name, self.model_config),
            "learner": self.learner.to_dict(),
            "action_tokenizer": self.action_tokenizer.to_spec(),
            "robot": self.robot.to_dict()["robot"],
            "image_sizes": {k: list(v) for k, v in self.image_sizes.items()},
            "datasets": [dict(d) for d in self.datasets],
            **({"lora_base": dict(self.lora_base)} if self.lora_base else {})}

  @classmethod
  def from_meta(cls, meta: Mapping[str, Any], text_tokenizer: TextTokenizer,
                where: str = "checkpoint") -> "TrainedPolicy":
    """The policy (no params) a checkpoint's meta describes."""
    checkpoints.check_meta(meta, where)
    try:
      model, model_cfg = registry.from_description(meta["model"])
      learner = learner_spec.LearnerConfig.from_dict(meta["learner"])
      action_tokenizer = ActionTokenizer.from_spec(meta["action_tokenizer"])
      spec = robot_lib.RobotSpec.from_config(meta["robot"], where=where)
      image_sizes = {k: tuple(v) for k, v in meta["image_sizes"].items()}
    except (KeyError, TypeError, ValueError) as e:
      raise CheckpointError(f"{where}: bad metadata: {e!r}") from e
    if action_tokenizer.vocab_size != model_cfg.action_vocab:
      raise CheckpointError(f"{where}: action tokenizer has {action_tokenizer.vocab_size} ids, "
                            f"the model {model_cfg.action_vocab}")
    if learner.uses_lora and not meta.get("lora_base"):
      raise CheckpointError(f"{where}: a LoRA run's metadata must name its base (lora_base)")
    return cls(model_name=meta["model"]["name"], model=model, model_config=model_cfg,
               learner=learner, action_tokenizer=action_tokenizer,
               text_tokenizer=text_tokenizer, robot=spec, image_sizes=image_sizes,
               datasets=tuple(meta.get("datasets") or ()), config=meta.get("config") or {},
               lora_base=meta.get("lora_base"))

  @classmethod
  def load(cls, path: str, step: Optional[int] = None) -> "TrainedPolicy":
    """From a workdir, its checkpoints/ directory or one step directory (the
    latest complete step unless `step`): the acting networks only (pi_phi and
    p_theta; not the target or the optimiser), restored to the shapes the model
    description gives, checked against the step's checksums and for finiteness.
    Raises CheckpointError naming what is wrong."""
    ckpt_dir, step = checkpoints.resolve(path, step)
    where = f"{ckpt_dir}/{step}"
    meta = checkpoints.read_meta(ckpt_dir, step)
    text = checkpoints.read_text_tokenizer(ckpt_dir, step)
    policy = cls.from_meta(meta, text, where)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    variables = policy.abstract_variables()
    spec = lora.spec_of(policy.learner)
    if spec:  # the acting groups are adapter sets on the base of this host's weights
      pretrained = registry.pretrained_params(policy.model_name, policy.model_config)
      kinds = lora.classify(variables, lora.paths(pretrained), spec)
      adapter_set = lora.split(variables, lora.paths(pretrained), spec)[1]  # shapes only
      groups = {g: adapter_set for g in layout.ACTING_GROUPS}
    else:
      groups = policy.param_groups(variables)
    wanted = {g: groups[g] for g in layout.ACTING_GROUPS}
    wanted = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), wanted)
    out = checkpoints.restore(checkpoints.manager(ckpt_dir, read_only=True), step, wanted)
    checkpoints.check_finite({g: out[g] for g in wanted}, where)
    pi, p = out["params_pi"], out["params_p"]
    if spec:
      base = policy._base(lora.base_of(pretrained, kinds), variables, where)
      pi = lora.merge(base, pi, spec)
      p = lora.merge(base, p, spec) if policy.learner.uses_p else p
    params = layout.inference_params(policy.learner, pi, p)
    return policy.with_params(params, step=step, path=where)

  def _base(self, base, variables, where: str):
    """This host's base, in the model's dtypes, refused unless it is the base the
    checkpoint was trained on (lora_base)."""
    flat_vars = traverse_util.flatten_dict(dict(variables))
    base = traverse_util.unflatten_dict({
        k: jax.numpy.asarray(v, flat_vars[k].dtype)
        for k, v in traverse_util.flatten_dict(base).items()})
    here = self.base_identity(base)
    saved = dict(self.lora_base or {})
    if here["sha256"] != saved.get("sha256"):
      raise CheckpointError(
          f"{where}: this LoRA checkpoint was trained on another base: its weights have "
          f"sha256 {saved.get('sha256')} (from {', '.join(saved.get('sources') or ['?'])}); "
          f"this host's have {here['sha256']} (from {', '.join(here['sources'])}). Install "
          f"the weights it was trained on.")
    return base

