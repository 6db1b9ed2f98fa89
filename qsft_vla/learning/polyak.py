"""Polyak (exponential moving average) update of the target network p_theta_bar."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def polyak_update(target_params, online_params, alpha):
  """(1 - alpha) * target + alpha * online, leaf by leaf (QSFT.md: after every
  p_theta step). Computed in float32 and cast back to the target's dtype, so a
  small alpha is not rounded away in a low-precision leaf's arithmetic;
  non-float leaves (counters) take the online value."""
  def update(t, o):
    t, o = jnp.asarray(t), jnp.asarray(o)
    if not jnp.issubdtype(t.dtype, jnp.inexact):
      return o
    mixed = ((1.0 - alpha) * t.astype(jnp.float32) + alpha * o.astype(jnp.float32))
    return mixed.astype(t.dtype)
  return jax.tree_util.tree_map(update, target_params, online_params)
