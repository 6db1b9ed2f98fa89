"""Inference-time Q-SFT policy: beta-reweighting of pi_phi by p_theta (QSFT.md, "Inference").

Two extractions (QSFT.md, "Policy extraction"), per token in log space over the
valid bins of the dimension being decoded:
  "p" (the paper's, default):  pi_hat(b|x) ~ pi_phi(b|x) * exp(beta * p_theta(b|x))
  "ratio":  pi_hat(b|x) ~ pi_phi(b|x) * exp(beta * p_theta(b|x) / pi_phi(b|x)) over
            the support pi_phi(b|x) > eps: the implied Q = p / pi, so actions are
            ranked by value rather than by frequency times value (the
            KL-regularised improvement step of AWR / AWAC).
The controller decodes the D dimensions autoregressively, one call per token position.

A third extraction ranks whole actions instead of tokens:
  "sample": K candidate actions, pi_phi's greedy one and K - 1 draws, each
            dimension given the ones before (LearnerConfig.sample_proposal: all
            from pi_phi, or half from p_theta over the valid bins, p ~ pi * Q,
            which also proposes the high-value actions pi_phi makes rare),
            scored by log pi_phi(a) + beta * Q(a), Q(a) the implied Q of the
            candidate's last token, which the Bellman weights make the value of
            the whole action (best_candidate). A candidate pi_phi makes rare pays
            for it in log pi; and, unlike the per-token ratio, a choice in one
            dimension is judged by the value of the action it ends up in.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qsft_vla.learning import targets
from qsft_vla.learning.spec import EXTRACTIONS, P_PARAMETRIZATIONS  # noqa: F401 (re-exported)

NEG_INF = -1e9  # finite: exp underflows to exactly 0, no inf - inf NaNs
TOKEN_EXTRACTIONS = ("p", "ratio")  # reweighted_logits; "sample" is best_candidate


def allowed_ids(action_valid_mask, vocab_size: int, dummy_id: int, residual: str):
  """(pi_allowed, p_allowed) bool[D, V]: the ids pi_phi and p_theta may put mass on.

  pi_phi: the valid bins of each dimension. p_theta: those bins plus the dummy
  id with the "dummy" residual ("uniform" spreads the residual over the bins).
  Training masks logits with these before every softmax, and so must inference.
  """
  pi_allowed = targets.vocab_valid_mask(action_valid_mask, vocab_size)
  p_allowed = pi_allowed.copy()
  if residual == "dummy":
    p_allowed[:, dummy_id] = True
  return pi_allowed, p_allowed


def residual_p_logits(pi_logits, p_raw, pi_allowed):
  """p_theta's logits in the "residual" parametrization: stop_grad(log pi_phi) + the
  p network's output on pi_phi's ids, the output alone elsewhere (the dummy).

  Then p(b|x) / pi(b|x) = exp(out_b) / Z(x): the implied Q is carried by the p
  network's output alone, and pi_phi's own estimation noise cancels in the
  ratio (with two independent networks it does not, and the ratio of two noisy
  small probabilities swamps Q gaps of a few percent). With the p network's
  output head zero at the start, p_theta starts equal to pi_phi, as in the paper.
  pi_logits must already be masked to the valid ids (mask_logits).
  """
  log_pi = jax.lax.stop_gradient(jax.nn.log_softmax(jnp.asarray(pi_logits, jnp.float32), -1))
  p_raw = jnp.asarray(p_raw, jnp.float32)
  return jnp.where(jnp.asarray(pi_allowed, bool), log_pi + p_raw, p_raw)


def mask_logits(logits, allowed):
  """logits [..., D, V] (or [..., V] with allowed [V]) with disallowed ids at NEG_INF."""
  return jnp.where(jnp.asarray(allowed, bool), logits, NEG_INF)


def reweighted_logits(pi_logits, p_logits, beta, valid_mask, extraction="p",
                      eps=targets.DEFAULT_EPS):
  """The reweighted policy's logits on valid ids, -inf elsewhere. float32[..., V].

  extraction "p":     log_softmax(pi_phi) + beta * softmax(p_theta).
  extraction "ratio": log_softmax(pi_phi) + beta * softmax(p_theta) / softmax(pi_phi)
                      on the valid ids with pi_phi > eps; if none is, the valid id
                      of largest pi_phi alone (as support_ratio_max falls back).
  Both softmaxes run over the full vocabulary (as in training); the dummy and
  any non-action id must be False in `valid_mask` (bool broadcastable to
  [..., V]). beta = 0 gives behaviour cloning with either extraction.
  """
  if extraction not in TOKEN_EXTRACTIONS:
    raise ValueError(f"per-token extraction must be one of {TOKEN_EXTRACTIONS}, got "
                     f"{extraction!r}")
  log_pi = jax.nn.log_softmax(jnp.asarray(pi_logits, jnp.float32), axis=-1)
  log_p = jax.nn.log_softmax(jnp.asarray(p_logits, jnp.float32), axis=-1)
  valid = jnp.broadcast_to(jnp.asarray(valid_mask, bool), log_pi.shape)
  beta = jnp.asarray(beta, jnp.float32)
  if extraction == "p":
    return jnp.where(valid, log_pi + beta * jnp.exp(log_p), -jnp.inf)
  support = valid & (log_pi > jnp.log(jnp.asarray(eps, jnp.float32)))
  best = jnp.argmax(jnp.where(valid, log_pi, -jnp.inf), axis=-1)
  only_best = jnp.arange(log_pi.shape[-1]) == best[..., None]
  support = jnp.where(jnp.any(support, axis=-1, keepdims=True), support, only_best & valid)
  # The exponent is clipped so a huge beta * ratio cannot overflow to inf - inf.
  score = jnp.clip(beta * jnp.exp(jnp.minimum(log_p - log_pi, 30.0)), -1e30, 1e30)
  return jnp.where(support, log_pi + score, -jnp.inf)


def best_candidate(log_pi_sum, q_last, beta, temperature=0.0, rng=None):
  """The index of the candidate action to act on: argmax (temperature 0) or a
  sample of log_pi_sum + beta * q_last, both float32[K] (the candidates' summed
  log pi_phi and the implied Q of their last token). beta = 0: pi_phi's most
  likely candidate (its greedy action, unless a draw is more likely)."""
  score = (jnp.asarray(log_pi_sum, jnp.float32)
           + jnp.asarray(beta, jnp.float32) * jnp.clip(jnp.asarray(q_last, jnp.float32), -1e6, 1e6))
  return select(score, temperature, rng)


def select(logits, temperature, rng=None):
  """Token ids int32[...] from logits [..., V]: argmax at temperature 0 (the
  control default), else a sample from softmax(logits / temperature) with `rng`.

  A Python temperature of 0 needs no rng; a traced temperature works under jit
  (then rng is required, and temperature <= 0 still means argmax).
  """
  logits = jnp.asarray(logits, jnp.float32)
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  if isinstance(temperature, (int, float)) and temperature <= 0:
    return greedy
  if rng is None:
    raise ValueError("sampling at temperature > 0 needs an rng key")
  t = jnp.asarray(temperature, jnp.float32)
  sampled = jax.random.categorical(rng, logits / jnp.where(t > 0, t, 1.0), axis=-1)
  return jnp.where(t > 0, sampled.astype(jnp.int32), greedy)
