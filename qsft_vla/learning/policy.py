"""Inference-time Q-SFT policy: beta-reweighting of pi_phi by p_theta (QSFT.md, "Inference").

pi_hat(b|x) ~ pi_phi(b|x) * exp(beta * p_theta(b|x)), computed per token in log
space over the valid bins of the dimension being decoded. The controller
decodes the D dimensions autoregressively, one call per token position.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def reweighted_logits(pi_logits, p_logits, beta, valid_mask):
  """log_softmax(pi_phi)(x) + beta * softmax(p_theta)(x) on valid ids, -inf elsewhere.

  Both softmaxes run over the full vocabulary (as in training); the dummy and
  any non-action id must be False in `valid_mask` (bool broadcastable to
  [..., V]). beta = 0 gives behaviour cloning. Returns float32[..., V].
  """
  log_pi = jax.nn.log_softmax(jnp.asarray(pi_logits, jnp.float32), axis=-1)
  p = jax.nn.softmax(jnp.asarray(p_logits, jnp.float32), axis=-1)
  logits = log_pi + jnp.asarray(beta, jnp.float32) * p
  return jnp.where(jnp.asarray(valid_mask, bool), logits, -jnp.inf)


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
