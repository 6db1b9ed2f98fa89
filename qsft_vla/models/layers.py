"""Shared layers: FiLM conditioning, TokenLearner pooling, the policy-input
checks every backbone runs, a pre-norm transformer block with a key/value
cache, and the inverted-residual block of MobileNetV2 / EfficientNet-Lite.

Plain linen + jnp only (no TensorFlow), so the same code runs on old and new jax.
Attention masks are boolean [B, 1 or heads, Tq, Tk] (True = may attend).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import flax.linen as nn

# Compute dtypes a backbone config may name (compute_dtype); params stay float32.
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class FiLM(nn.Module):
  """x * (1 + dgamma(c)) + beta(c) per channel; identity at init (zero-init denses).
  `dtype` is the compute dtype of every layer here (params stay float32)."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, cond):
    channels = x.shape[-1]
    dense = lambda name: nn.Dense(channels, kernel_init=nn.initializers.zeros, dtype=self.dtype,
                                  name=name)
    dgamma, beta = dense("dgamma")(cond), dense("beta")(cond)
    # Broadcast [N, C] over the spatial axes of [N, ..., C].
    shape = (cond.shape[0],) + (1,) * (x.ndim - 2) + (channels,)
    return x * (1.0 + dgamma.reshape(shape)) + beta.reshape(shape)


class TokenLearner(nn.Module):
  """Feature map [N, h, w, C] -> [N, num_tokens, width]: learned spatial softmax
  maps pool the positions into tokens. The pooling is a weighted sum, blind to
  where a feature was; a learned position embedding keeps "left of me" and
  "ahead" apart (navigation and reaching need it)."""
  num_tokens: int
  width: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    n, h, w, c = x.shape
    pos = self.param("feature_pos", nn.initializers.normal(0.02), (h * w, c))
    feats = (x.reshape(n, h * w, c) + pos).astype(self.dtype)
    scores = nn.Dense(self.num_tokens, dtype=self.dtype, name="token_maps")(feats)
    maps = jax.nn.softmax(scores.astype(jnp.float32), axis=1).astype(self.dtype)
    tokens = jnp.einsum("npt,npc->ntc", maps, feats)
    return nn.Dense(self.width, dtype=self.dtype, name="token_proj")(tokens)


def check_policy_inputs(cfg, observation, history_mask, text_ids, text_mask) -> None:
  """The shapes every backbone takes (cfg: window, cameras, state_dim,
  max_text_len); ValueError naming the input and the expected shape."""
  batch = history_mask.shape[0]
  if history_mask.shape != (batch, cfg.window):
    raise ValueError(f"history_mask: expected shape [B, {cfg.window}], got {history_mask.shape}")
  for cam in cfg.cameras:
    if cam not in observation:
      raise ValueError(f"observation: missing camera {cam!r}; got keys {sorted(observation)}")
    img = observation[cam]
    if img.ndim != 5 or img.shape[:2] != (batch, cfg.window) or img.shape[-1] != 3:
      raise ValueError(f"observation[{cam!r}]: expected [{batch}, {cfg.window}, H, W, 3], "
                       f"got {img.shape}")
  if cfg.state_dim:
    st = observation.get("state")
    if st is None or st.shape != (batch, cfg.window, cfg.state_dim):
      raise ValueError(f"observation['state']: expected [{batch}, {cfg.window}, "
                       f"{cfg.state_dim}], got {None if st is None else st.shape}")
  for name, a in (("text_ids", text_ids), ("text_mask", text_mask)):
    if a.shape != (batch, cfg.max_text_len):
      raise ValueError(f"{name}: expected [{batch}, {cfg.max_text_len}], got {a.shape}")


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
  dtype: Any = jnp.float32   # compute dtype; params stay float32, softmax runs in float32

  def setup(self):
    if self.width % self.num_heads:
      raise ValueError(f"width {self.width} is not divisible by {self.num_heads} heads")
    head_dim = self.width // self.num_heads
    d = self.dtype
    self.ln_attn = nn.LayerNorm(dtype=d)
    self.qkv = nn.DenseGeneral((3, self.num_heads, head_dim), dtype=d)
    self.attn_out = nn.DenseGeneral(self.width, axis=(-2, -1), dtype=d)
    self.ln_mlp = nn.LayerNorm(dtype=d)
    self.mlp_in = nn.Dense(self.mlp_ratio * self.width, dtype=d)
    self.mlp_out = nn.Dense(self.width, dtype=d)
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


class InvertedResidual(nn.Module):
  """Expand 1x1 -> depthwise kxk -> project 1x1 (+ identity when shapes match),
  ReLU6 after the first two (MobileNetV2 / EfficientNet-Lite: no squeeze-excite).

  norm(name) builds each normalisation layer (a running-stat BatchNorm for the
  ImageNet classifiers, a folded affine for fine-tuning) and norm_names names
  them as the converted checkpoints do; padding is "SAME" (TF) or explicit
  (torch's padding=k//2).
  """
  cin: int
  cout: int
  kernel: int
  stride: int
  expand: int
  norm: Callable[[str], nn.Module]
  norm_names: tuple[str, str, str] = ("bn0", "bn1", "bn2")
  padding: Any = "SAME"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    mid = self.cin * self.expand
    expand_norm, depthwise_norm, project_norm = self.norm_names
    h = x
    if self.expand != 1:
      h = nn.Conv(mid, (1, 1), use_bias=False, dtype=self.dtype, name="expand_conv")(h)
      h = nn.relu6(self.norm(expand_norm)(h))
    h = nn.Conv(mid, (self.kernel, self.kernel), (self.stride, self.stride),
                padding=self.padding, feature_group_count=mid, use_bias=False, dtype=self.dtype,
                name="depthwise_conv")(h)
    h = nn.relu6(self.norm(depthwise_norm)(h))
    h = nn.Conv(self.cout, (1, 1), use_bias=False, dtype=self.dtype, name="project_conv")(h)
    h = self.norm(project_norm)(h)
    if self.stride == 1 and self.cin == self.cout:
      h = h + x
    return h
