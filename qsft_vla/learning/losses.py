"""Q-SFT losses on logits: L_CE for pi_phi and L_WCE for p_theta (QSFT.md).

Shapes: logits [..., V] over the model's full output vocabulary, tokens [...]
(ids into V), weights and mask broadcastable to tokens. Losses are averaged
over the mask (a 0/1 mask or per-token weights): sum(l * m) / sum(m).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qsft_vla.learning.spec import RESIDUALS  # noqa: F401 (re-exported)


def _token_logp(logits, tokens):
  logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
  tokens = jnp.asarray(tokens, jnp.int32)
  return logp, jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]


def _mask_like(mask, shape):
  if mask is None:
    return jnp.ones(shape, jnp.float32)
  return jnp.broadcast_to(jnp.asarray(mask, jnp.float32), shape)


def masked_mean(x, mask):
  total = jnp.sum(mask)
  # An empty mask gives 0 (not NaN), e.g. a batch of truncated ends only.
  return jnp.where(total > 0, jnp.sum(x * mask) / jnp.where(total > 0, total, 1.0), 0.0)


def cross_entropy(logits, tokens, mask=None):
  """L_CE = mean over unmasked tokens of -log pi(k|x): behaviour cloning for pi_phi."""
  _, token_logp = _token_logp(logits, tokens)
  return masked_mean(-token_logp, _mask_like(mask, token_logp.shape))


def weighted_cross_entropy(logits, tokens, weights, *, residual="dummy", dummy_id=None,
                           valid_mask=None, mask=None):
  """L_WCE of QSFT.md for p_theta, averaged over unmasked tokens.

  dummy:   -[w log p(k|x) + (1 - w) log p(a_d|x)], a_d = dummy_id.
  uniform: -[w log p(k|x) + (1 - w)/(K_j - 1) sum_{b != k, b valid} log p(b|x)],
           K_j = number of valid ids at that position (the bins of dimension j).

  Args:
    logits: [..., V]; tokens: int[...]; weights: float[...] (treated as
      constants: pass bellman_weights' stop-gradient output).
    residual: "dummy" (QSFT.md default) or "uniform".
    dummy_id: the dummy's id in V (required for "dummy").
    valid_mask: bool broadcastable to [..., V], e.g. [D, V] (required for
      "uniform"; used for the valid_mass metric when given).
    mask: broadcastable to tokens, e.g. bellman_weights' td_mask times a batch
      padding mask.

  Returns:
    (loss, metrics): metrics are means over the mask of the weight
    (weight_mean/std/min/max), log p(k|x) (token_logp), the residual term
    (residual_logp), p(a_d|x) (dummy_prob, "dummy") and the mass on valid ids
    (valid_mass, when valid_mask is given).
  """
  if residual not in RESIDUALS:
    raise ValueError(f"residual must be one of {RESIDUALS}, got {residual!r}")
  logp, token_logp = _token_logp(logits, tokens)
  w = jnp.broadcast_to(jnp.asarray(weights, jnp.float32), token_logp.shape)
  m = _mask_like(mask, token_logp.shape)
  valid = None
  if valid_mask is not None:
    valid = jnp.broadcast_to(jnp.asarray(valid_mask, bool), logp.shape)
  if residual == "dummy":
    if dummy_id is None:
      raise ValueError('residual="dummy" needs dummy_id')
    res_logp = logp[..., dummy_id]
  else:
    if valid is None:
      raise ValueError('residual="uniform" needs valid_mask')
    ids = jnp.arange(logp.shape[-1])
    others = valid & (ids != jnp.asarray(tokens, jnp.int32)[..., None])
    n_valid = jnp.sum(valid, axis=-1).astype(jnp.float32)
    # where, not multiply: masked ids may have log p = -inf.
    total = jnp.sum(jnp.where(others, logp, 0.0), axis=-1)
    res_logp = total / jnp.maximum(n_valid - 1.0, 1.0)
  # With w == 1 the residual term is exactly 0, so L_WCE == L_CE bit for bit.
  loss = masked_mean(-(w * token_logp + (1.0 - w) * res_logp), m)
  w_mean = masked_mean(w, m)
  metrics = {
      "weight_mean": w_mean,
      "weight_std": jnp.sqrt(jnp.maximum(masked_mean(jnp.square(w - w_mean), m), 0.0)),
      "weight_min": jnp.min(jnp.where(m > 0, w, jnp.inf)),
      "weight_max": jnp.max(jnp.where(m > 0, w, -jnp.inf)),
      "token_logp": masked_mean(token_logp, m),
      "residual_logp": masked_mean(res_logp, m),
  }
  if residual == "dummy":
    metrics["dummy_prob"] = masked_mean(jnp.exp(res_logp), m)
  if valid is not None:
    metrics["valid_mass"] = masked_mean(jnp.sum(jnp.where(valid, jnp.exp(logp), 0.0), -1), m)
  return loss, metrics
