"""How a run's parameters are grouped: defined here once, for training, checkpoints and acting.

Training (the learner's TrainState and the checkpoint items) keeps three groups:
  params_pi      pi_phi
  params_p       p_theta
  params_target  p_theta_bar, the Polyak target
per algorithm and architecture:
  separate Q-SFT:  three full variable dicts (p and the target start as pi)
  shared Q-SFT:    params_pi = the trunk + head 0, params_p = {"params": {"head_1"}},
                   params_target = the whole shared variables
  shared encoder:  as shared, with p_theta's transformer in params_p too:
                   {"params": {"head_1", "p_trunk"}}
  pi_head:         the other way round: params_pi = {"params": {"head"}} (pi_phi's
                   head on p_theta's features), params_p = the trunk + head 1,
                   params_target = the whole shared variables
  BC, filtered BC: params_pi only (params_p and params_target are {})
  The pure Monte-Carlo target (learner.mc_mix = 1) never reads p_theta_bar:
  params_target is {} there, under every architecture.
  LoRA (learner.lora_rank > 0): each group is an adapter set on a frozen base
                   that is not a group (models/lora.py; built by the learner and
                   by TrainedPolicy.load, not by param_groups)
Acting (the Controller, evaluation, the Q-gap probe) uses the networks:
  {"pi", "p"} (separate backbones), {"pi"} (no p_theta) or {"shared"} (one
  trunk; head 0 = pi_phi, head 1 = p_theta).

Free of jax, optax and TF: it only moves dict entries.
"""

from __future__ import annotations

from typing import Any

GROUPS = ("params_pi", "params_p", "params_target")
ACTING_GROUPS = GROUPS[:2]  # what acting reads of a checkpoint (not the target)
P_HEAD = "head_1"  # p_theta's head in a shared trunk (head 0, "head", is pi_phi's)
P_TRUNK = "p_trunk"  # p_theta's own transformer on a shared encoder (rt1_small)
PI_HEAD = "head"  # pi_phi's head in a shared trunk


def split_shared(variables, learner):
  """Full shared variables of a two-head model -> (pi_phi's group, p_theta's group).
  "shared" / "shared_encoder": p_theta owns {"params": {"head_1"}} (and "p_trunk"),
  pi_phi the rest; "pi_head": pi_phi owns {"params": {"head"}}, p_theta the rest."""
  params = dict(variables["params"])
  rest = {k: v for k, v in variables.items() if k != "params"}
  if learner.architecture == "pi_head":
    return {"params": {PI_HEAD: params.pop(PI_HEAD)}}, {**rest, "params": params}
  owned_by_p = {k: params.pop(k) for k in (P_HEAD, P_TRUNK) if k in params}
  return {**rest, "params": params}, {"params": owned_by_p}


def merge_shared(group_pi, group_p):
  """The full shared variables from the two groups of split_shared."""
  return {**group_p, **group_pi, "params": {**group_pi["params"], **group_p["params"]}}


def param_groups(variables, learner) -> dict[str, Any]:
  """The training groups of a model's full variables (concrete or abstract) for
  a LearnerConfig. The groups share leaves with `variables`: copy them before
  updating in place."""
  variables = dict(variables)
  target = variables if learner.keeps_target else {}
  if learner.num_output_heads == 2:
    pi, p = split_shared(variables, learner)
    return {"params_pi": pi, "params_p": p, "params_target": target}
  if learner.uses_p:
    return {"params_pi": variables, "params_p": variables, "params_target": target}
  return {"params_pi": variables, "params_p": {}, "params_target": {}}


def inference_params(learner, params_pi, params_p) -> dict[str, Any]:
  """The networks to act with, from the training groups."""
  if learner.num_output_heads == 2:
    return {"shared": merge_shared(params_pi, params_p)}
  if learner.uses_p:
    return {"pi": params_pi, "p": params_p}
  return {"pi": params_pi}


def inference_keys(learner) -> set[str]:
  """The keys inference_params returns for this learner."""
  if learner.num_output_heads == 2:
    return {"shared"}
  return {"pi", "p"} if learner.uses_p else {"pi"}


def check_networks(params, learner) -> None:
  """Raises ValueError unless params has exactly the acting networks of learner."""
  keys, expected = set(params), inference_keys(learner)
  if keys != expected:
    raise ValueError(f"params: algorithm={learner.algorithm!r}, "
                     f"architecture={learner.architecture!r} needs keys {sorted(expected)}, "
                     f"got {sorted(keys)}")


def has_p(params) -> bool:
  """Whether acting networks include p_theta (Q-SFT), i.e. whether beta may be > 0."""
  return "p" in params or "shared" in params


def pi_and_p_logits(outputs):
  """(pi_phi's, p_theta's or None) logits from {net: the model's output} of the
  acting networks: a shared trunk's output stacks the two heads."""
  if "shared" in outputs:
    return outputs["shared"][0], outputs["shared"][1]
  return outputs["pi"], outputs.get("p")
