"""Shared layers: FiLM conditioning and a pre-norm transformer block with a key/value cache.

Plain linen + jnp only (no TensorFlow), so the same code runs on old and new jax.
Attention masks are boolean [B, 1 or heads, Tq, Tk] (True = may attend).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn


class FiLM(nn.Module):
  """x * (1 + dgamma(c)) + beta(c) per channel; identity at init (zero-init denses)."""

  @nn.compact
  def __call__(self, x, cond):
    channels = x.shape[-1]
    dgamma = nn.Dense(channels, kernel_init=nn.initializers.zeros, name="dgamma")(cond)
    beta = nn.Dense(channels, kernel_init=nn.initializers.zeros, name="beta")(cond)
    # Broadcast [N, C] over the spatial axes of [N, ..., C].
    shape = (cond.shape[0],) + (1,) * (x.ndim - 2) + (channels,)
    return x * (1.0 + dgamma.reshape(shape)) + beta.reshape(shape)


def _attend(q, k, v, mask):
  """Softmax attention; q [B,Tq,H,d], k/v [B,Tk,H,d], mask bool broadcastable to [B,H,Tq,Tk]."""
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum("bqhd,bkhd->bhqk", q * scale, k).astype(jnp.float32)
  # A finite floor (not -inf) keeps a row with no allowed key NaN-free.
  logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


class TransformerBlock(nn.Module):
  """Pre-norm block: x + Attn(LN(x)); x + MLP(LN(x)).

  `__call__` runs a whole sequence and also returns its keys/values (to seed a
  cache); `decode` runs new positions against a fixed-size cache, writing their
  keys/values at `index`, so decoding has static shapes under jit.
  """
  width: int
  num_heads: int
  mlp_ratio: int = 4
  dropout: float = 0.0

  def setup(self):
    if self.width % self.num_heads:
      raise ValueError(f"width {self.width} is not divisible by {self.num_heads} heads")
    head_dim = self.width // self.num_heads
    self.ln_attn = nn.LayerNorm()
    self.qkv = nn.DenseGeneral((3, self.num_heads, head_dim))
    self.attn_out = nn.DenseGeneral(self.width, axis=(-2, -1))
    self.ln_mlp = nn.LayerNorm()
    self.mlp_in = nn.Dense(self.mlp_ratio * self.width)
    self.mlp_out = nn.Dense(self.width)
    self.drop = nn.Dropout(self.dropout)

  def _project(self, x):
    qkv = self.qkv(self.ln_attn(x))  # [B, T, 3, H, d]
    return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]

  def _finish(self, x, attended, train):
    x = x + self.drop(self.attn_out(attended), deterministic=not train)
    h = self.mlp_out(nn.gelu(self.mlp_in(self.ln_mlp(x))))
    return x + self.drop(h, deterministic=not train)

  def __call__(self, x, mask, train: bool = False):
    """x [B, T, C], mask bool [B, 1|H, T, T] -> (y [B, T, C], (k, v) each [B, T, H, d])."""
    q, k, v = self._project(x)
    return self._finish(x, _attend(q, k, v, mask), train), (k, v)

  def decode(self, x, cache_k, cache_v, index, mask):
    """x [B, t, C] at positions index..index+t-1; cache_k/v [B, S, H, d]; mask [B, 1|H, t, S].

    Returns (y [B, t, C], (cache_k, cache_v) with the new keys/values written).
    """
    q, k, v = self._project(x)
    start = (0, index, 0, 0)
    cache_k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), start)
    cache_v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), start)
    return self._finish(x, _attend(q, cache_k, cache_v, mask), False), (cache_k, cache_v)
