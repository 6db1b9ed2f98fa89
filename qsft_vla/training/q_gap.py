"""The Q-gap diagnostic (QSFT.md, "Diagnostic: the Q gap"), logged during training.

p_theta / pi_phi at a dataset token estimates Q(s, a) on the support. On a fixed
slice of episodes whose metadata names the behaviour that collected them
(data_tools.generate), the mean implied Q of the expert's steps minus that of
the other behaviours' steps says whether the model separates good actions from
bad ones, long before a rollout does. Also reported, per behaviour:
  q_gap/q_<label>            mean implied Q of its steps (mean over the step's tokens)
  q_gap/agree_pi             share of expert steps where argmax pi_phi is the expert's action
                             (also for BC and filtered BC)
  q_gap/agree_policy         the same for the controller's policy (extraction and beta of
                             the run; all D tokens teacher-forced); not for the "sample"
                             extraction, whose choice depends on its draws
  q_gap/agree_q              the same for the implied Q alone: argmax of p / pi over the
                             support pi > ratio_eps (the ratio extraction as beta -> inf)
  q_gap/gap                  q_expert - q_others
  q_gap/q_fixes              share of expert steps where the implied Q ranks the expert's
                             action first and pi_phi does not (what a large beta can fix)
  q_gap/q_breaks             share where pi_phi is right and the implied Q is not (what it
                             can break)
  q_gap/q_expert_where_pi_wrong, q_gap/q_pi_choice_where_pi_wrong
                             on the expert steps where argmax pi_phi is not the expert's
                             action: the implied Q of the expert's action and of pi_phi's
                             choice; Q-SFT can correct imitation only if the first is larger
The slice is `eval.q_gap_split` of the (first) dataset, read once, up to
`eval.q_gap_examples` steps; hold it out of training with `data.split`
(e.g. data.split="train[:95%]", eval.q_gap_split="train[95%:]").

The same figures for a finished run's checkpoints: training/q_gap_checkpoints.py.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from qsft_vla.learning import reweighting
from qsft_vla.policy import layout

EXPERT = "expert"


def episode_behaviors(data_dir: str) -> dict[int, str]:
  """{episode_index (as batches carry it): behaviour label} of a dataset's "train"
  split ({} when its metadata has no `behavior`, e.g. converted data)."""
  from qsft_vla.data import pipeline  # pylint: disable=g-import-not-at-top  (TF)
  return {i: md["behavior"] for i, md in pipeline.episode_metadata(data_dir).items()
          if "behavior" in md}


class QGapProbe:
  """Reads the slice once; `__call__(params)` returns the q_gap/* scalars."""

  def __init__(self, cfg, setup, prepare, split: str, max_examples: int, batch_size: int = 256):
    from qsft_vla.data import pipeline  # pylint: disable=g-import-not-at-top  (TF)
    self.learner = setup.learner
    self.labels_by_episode = episode_behaviors(setup.data_dirs[0])
    self.batches: list[dict[str, Any]] = []
    self.labels: list[np.ndarray] = []
    if EXPERT not in set(self.labels_by_episode.values()):
      return  # nothing to compare against
    probe_cfg = cfg.copy_and_resolve_references()
    with probe_cfg.unlocked():
      probe_cfg.data.dir = setup.data_dirs[0]
      probe_cfg.data.weights = None
      probe_cfg.data.split = split
    policy = setup.policy
    it = pipeline.as_numpy_batches(probe_cfg.data, policy.robot, policy.action_tokenizer,
                                   gamma=policy.learner.gamma,
                                   batch_size=batch_size, seed=0, train=False, validate=False)
    seen = 0
    for raw in it:
      if seen >= max_examples:
        break
      take = min(len(raw["reward"]), max_examples - seen)
      raw = jax.tree_util.tree_map(lambda x: x[:take], raw)  # nested (observation)
      batch = prepare(raw)
      self.batches.append({k: batch[k] for k in ("observation", "history_mask", "text_ids",
                                                 "text_mask", "action_tokens")})
      self.labels.append(np.asarray([self.labels_by_episode.get(int(e), "")
                                     for e in raw["episode_index"]]))
      seen += take
    lc = setup.policy.learner
    self._extraction, self._eps = lc.extraction, lc.ratio_eps
    # agree_policy is a per-token figure: "sample"'s choice depends on its draws.
    self._per_token = lc.extraction in reweighting.TOKEN_EXTRACTIONS
    self._beta = lc.inference_beta
    self._fn = jax.jit(self._per_step)

  @property
  def enabled(self) -> bool:
    return bool(self.batches)

  def _per_step(self, params, batch):
    pi_logits, p_logits = self.learner.policy_logits(
        params, batch["observation"], batch["history_mask"], batch["text_ids"],
        batch["text_mask"], batch["action_tokens"])
    if p_logits is None:  # BC / filtered BC: no p_theta; only agree_pi means anything then
      p_logits = pi_logits
    tok = jnp.asarray(batch["action_tokens"], jnp.int32)[..., None]
    log_ratio = jax.nn.log_softmax(p_logits, -1) - jax.nn.log_softmax(pi_logits, -1)

    def implied_q(ids):  # [B]: p / pi at the given token per dimension, mean over dims
      return jnp.mean(jnp.exp(jnp.take_along_axis(log_ratio, ids, -1)[..., 0]), axis=-1)

    q = implied_q(tok)
    agree_pi = jnp.all(jnp.argmax(pi_logits, -1) == tok[..., 0], axis=-1)
    agree_policy = agree_pi  # placeholder where the extraction is not per token
    if self._per_token:
      logits = reweighting.reweighted_logits(pi_logits, p_logits, self._beta, self.learner.valid,
                                             self._extraction, self._eps)
      agree_policy = jnp.all(jnp.argmax(logits, -1) == tok[..., 0], axis=-1)
    # The implied Q alone (the ratio extraction at an infinite beta): does it rank the
    # expert's action first among the supported ones?
    q_only = reweighting.reweighted_logits(pi_logits, p_logits, 1.0, self.learner.valid, "ratio", self._eps)
    q_only = q_only - jax.nn.log_softmax(pi_logits, -1)
    agree_q = jnp.all(jnp.argmax(q_only, -1) == tok[..., 0], axis=-1)
    # The implied Q of pi_phi's own choice (per token, after the dataset's prefix).
    q_choice = implied_q(jnp.argmax(pi_logits, -1)[..., None])
    return q, agree_pi, agree_policy, agree_q, q_choice

  def __call__(self, params: Mapping[str, Any]) -> dict[str, float]:
    """params: Learner.inference_params."""
    if not self.enabled:
      return {}
    has_p = layout.has_p(params)
    outs = [jax.device_get(self._fn(params, b)) for b in self.batches]
    q, agree_pi, agree_policy, agree_q, q_choice = (
        np.concatenate([o[i] for o in outs]) for i in range(5))
    labels = np.concatenate(self.labels)
    if not has_p:
      return summarize(None, agree_pi, None, labels)
    return summarize(q, agree_pi, agree_policy if self._per_token else None, labels, agree_q,
                     q_choice)


def summarize(q, agree_pi, agree_policy, labels, agree_q=None,
              q_pi_choice=None) -> dict[str, float]:
  """The q_gap/* scalars from per-step implied Q (of the dataset's action, and of
  pi_phi's argmax), agreements and behaviour labels (all but agree_pi None
  without p_theta)."""
  out: dict[str, float] = {}
  expert = labels == EXPERT
  if expert.any():
    out["q_gap/agree_pi"] = float(np.mean(agree_pi[expert]))
  if q is None:
    return out
  for label in sorted(set(labels.tolist())):
    if label:
      out[f"q_gap/q_{label}"] = float(np.mean(q[labels == label]))
  others = ~expert & (labels != "")
  if expert.any() and others.any():
    out["q_gap/gap"] = float(np.mean(q[expert]) - np.mean(q[others]))
  if expert.any():
    if agree_policy is not None:
      out["q_gap/agree_policy"] = float(np.mean(agree_policy[expert]))
    if agree_q is not None:
      out["q_gap/agree_q"] = float(np.mean(agree_q[expert]))
      out["q_gap/q_fixes"] = float(np.mean(agree_q[expert] & ~agree_pi[expert]))
      out["q_gap/q_breaks"] = float(np.mean(~agree_q[expert] & agree_pi[expert]))
    wrong = expert & ~agree_pi
    if q_pi_choice is not None and wrong.any():
      out["q_gap/q_expert_where_pi_wrong"] = float(np.mean(q[wrong]))
      out["q_gap/q_pi_choice_where_pi_wrong"] = float(np.mean(q_pi_choice[wrong]))
  return out


def maybe_probe(cfg, setup, prepare) -> Optional[QGapProbe]:
  """The probe when eval.q_gap_split is set and the data has expert episodes, else None."""
  if not cfg.eval.q_gap_split:
    return None
  from qsft_vla.data.episode import DataError  # pylint: disable=g-import-not-at-top
  try:
    probe = QGapProbe(cfg, setup, prepare, cfg.eval.q_gap_split, int(cfg.eval.q_gap_examples))
  except DataError as e:  # e.g. a held-out slice with no episodes in a tiny dataset
    logging.warning("Q-gap diagnostic off: %s", e)
    return None
  if not probe.enabled:
    logging.warning("Q-gap diagnostic off: %s has no episodes labelled %r in its metadata",
                    setup.data_dirs[0], EXPERT)
    return None
  return probe
