"""A Llama decoder in Flax linen, matching Hugging Face's LlamaForCausalLM.

Why our own: transformers' FlaxLlama hard-codes RoPE theta 10000 and ignores
tie_word_embeddings, so it computes the wrong function for SmolLM2-135M
(theta 100000, tied embeddings), the pretrained language backbone we load from
a packaged checkpoint (DESIGN.md, "No downloads at run time"). This module
follows HF's layout exactly, so HF weights load by transposing Dense kernels
only (`params_from_hf`):
  - RMSNorm computed in float32 (weight * normalized, as HF);
  - rotary embeddings in HF's "rotate_half" convention (the first and second
    halves of each head are the pairs), theta from the config;
  - grouped-query attention: query head h reads key/value head h // (H / KV),
    as HF's repeat_kv;
  - SwiGLU MLP: down(silu(gate(x)) * up(x));
  - lm_head = embed^T when tie_word_embeddings, else its own kernel.

Inputs: token ids, or `inputs_embeds` (e.g. projected image features) given
directly, or `prefix_embeds` [B, P, C] placed before the embeddings of
`input_ids` (then masks and outputs cover P + T positions). Attention is
causal over the whole sequence; `attention_mask` [B, S] (True = real token)
hides padding as keys. Positions default to the count of real tokens before
each one (cumsum(mask) - 1), so left and right padding both give the positions
HF's generate uses; with no mask they are 0..S-1.

Each layer's params are a subtree "layers_{i}" (one-to-one with HF's
model.layers.{i}); `scan_layers` runs the stack as one lax.scan (fast compile)
instead of unrolled (fast to run on CPU).

Decoding keeps a fixed-size key/value cache (`init_cache`, `decode_step`), so
every step has static shapes under jit. `decode_step` takes any number t >= 1
of new positions: t = prompt length prefills, t = 1 generates.

Plain linen + jnp only (no TensorFlow, no deprecated flax APIs).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Sizes of a Llama decoder; defaults are SmolLM2-135M."""
  vocab_size: int = 49152
  hidden_size: int = 576
  intermediate_size: int = 1536
  num_hidden_layers: int = 30
  num_attention_heads: int = 9
  num_key_value_heads: int = 3
  head_dim: Optional[int] = None       # None: hidden_size // num_attention_heads
  rope_theta: float = 100000.0
  rms_norm_eps: float = 1e-5
  tie_word_embeddings: bool = True
  max_position_embeddings: int = 8192

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads"):
      if getattr(self, name) < 1:
        raise ValueError(f"LlamaConfig.{name} must be >= 1, got {getattr(self, name)}")
    if self.head_dim is None:
      if self.hidden_size % self.num_attention_heads:
        raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                         f"{self.num_attention_heads} heads; give head_dim")
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
    if self.head_dim % 2:
      raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                       f"num_key_value_heads {self.num_key_value_heads}")

  @classmethod
  def from_hf(cls, d: Mapping[str, Any]) -> "LlamaConfig":
    """From an HF config.json dict; refuses features this module does not implement."""
    if d.get("model_type", "llama") != "llama":
      raise ValueError(f"not a Llama config: model_type={d.get('model_type')!r}")
    if d.get("rope_scaling") is not None:
      raise ValueError(f"rope_scaling={d['rope_scaling']!r} is not supported "
                       "(only plain RoPE: rope_scaling None)")
    act = d.get("hidden_act", "silu")
    if act != "silu":
      raise ValueError(f"hidden_act={act!r} is not supported (only 'silu')")
    for flag in ("attention_bias", "mlp_bias"):
      if d.get(flag, False):
        raise ValueError(f"{flag}=True is not supported")
    heads = d["num_attention_heads"]
    return cls(
        vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
        num_attention_heads=heads, num_key_value_heads=d.get("num_key_value_heads") or heads,
        head_dim=d.get("head_dim"), rope_theta=float(d.get("rope_theta", 10000.0)),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        max_position_embeddings=d.get("max_position_embeddings", 2048))


class RMSNorm(nn.Module):
  """x / rms(x) * weight, computed in float32 and cast back to `dtype`."""
  eps: float
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    weight = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
    # HF casts to the input dtype before the weight multiply.
    return jnp.asarray(weight, self.dtype) * x.astype(self.dtype)


def rotary(x, positions, theta: float):
  """HF rotate_half RoPE; x [B, T, H, d], positions int [B, T]."""
  d = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq      # [B, T, d/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]     # [B, T, 1, d]
  cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
  x1, x2 = x[..., : d // 2], x[..., d // 2:]
  return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def _attend(q, k, v, mask):
  """GQA attention; q [B,Tq,H,d], k/v [B,Tk,KV,d], mask bool [B,Tq,Tk] -> [B,Tq,H,d]."""
  b, tq, h, d = q.shape
  kv = k.shape[2]
  q = q.reshape(b, tq, kv, h // kv, d)  # query head h -> kv head h // (H / KV)
  logits = jnp.einsum("bqkgd,bskd->bkgqs", q, k).astype(jnp.float32) * (d ** -0.5)
  # A finite floor (not -inf) keeps a row with no allowed key (padding) NaN-free.
  logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bkgqs,bskd->bqkgd", weights, v).reshape(b, tq, h, d)


class LlamaAttention(nn.Module):
  config: LlamaConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    c = self.config
    dense = lambda n, name: nn.Dense(n, use_bias=False, dtype=self.dtype,
                                     param_dtype=self.param_dtype, name=name)
    self.q_proj = dense(c.num_attention_heads * c.head_dim, "q_proj")
    self.k_proj = dense(c.num_key_value_heads * c.head_dim, "k_proj")
    self.v_proj = dense(c.num_key_value_heads * c.head_dim, "v_proj")
    self.o_proj = dense(c.hidden_size, "o_proj")

  def __call__(self, x, positions, mask, cache=None, index=None):
    """x [B,T,C]; mask [B,T,S]. With cache (k, v [B,S,KV,d]) the new keys/values are
    written at `index` and attention reads the whole cache; returns (y, (k, v))."""
    c = self.config
    b, t, _ = x.shape
    q = self.q_proj(x).reshape(b, t, c.num_attention_heads, c.head_dim)
    k = self.k_proj(x).reshape(b, t, c.num_key_value_heads, c.head_dim)
    v = self.v_proj(x).reshape(b, t, c.num_key_value_heads, c.head_dim)
    q = rotary(q, positions, c.rope_theta)
    k = rotary(k, positions, c.rope_theta)
    if cache is not None:
      cache_k, cache_v = cache
      k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), (0, index, 0, 0))
      v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), (0, index, 0, 0))
    y = _attend(q, k, v, mask).reshape(b, t, c.num_attention_heads * c.head_dim)
    return self.o_proj(y), (k, v)


class LlamaMLP(nn.Module):
  config: LlamaConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = self.config
    dense = lambda n, name: nn.Dense(n, use_bias=False, dtype=self.dtype,
                                     param_dtype=self.param_dtype, name=name)
    gate = dense(c.intermediate_size, "gate_proj")(x)
    h = nn.silu(gate) * dense(c.intermediate_size, "up_proj")(x)
    return dense(c.hidden_size, "down_proj")(h)


class LlamaBlock(nn.Module):
  """x + attn(norm(x)); x + mlp(norm(x))."""
  config: LlamaConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.input_layernorm = RMSNorm(self.config.rms_norm_eps, **kw)
    self.self_attn = LlamaAttention(self.config, **kw)
    self.post_attention_layernorm = RMSNorm(self.config.rms_norm_eps, **kw)
    self.mlp = LlamaMLP(self.config, **kw)

  def __call__(self, x, positions, mask, cache=None, index=None):
    """Returns (x, new cache (k, v) or None)."""
    h, kv = self.self_attn(self.input_layernorm(x), positions, mask, cache, index)
    x = x + h
    return x + self.mlp(self.post_attention_layernorm(x)), (kv if cache is not None else None)


def _default_positions(mask, start=None):
  """Real tokens before each position (0-based); `start` [B] offsets them (decoding)."""
  pos = jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1
  if start is not None:
    pos = pos + start[:, None]
  return jnp.maximum(pos, 0)


class Llama(nn.Module):
  """Llama causal LM. `dtype` is the compute dtype (float32 or bfloat16); params
  are `param_dtype`; logits are always float32.

  Params (collection "params"): embed_tokens/embedding [V, C],
  layers_{i}/{input_layernorm,post_attention_layernorm}/scale [C],
  layers_{i}/self_attn/{q,k,v,o}_proj/kernel [in, out],
  layers_{i}/mlp/{gate,up,down}_proj/kernel [in, out],
  norm/scale [C], and lm_head/kernel [C, V] unless tie_word_embeddings.
  """
  config: LlamaConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  # False: layers unrolled (fastest to run; compile time grows with depth, ~10 s
  # for SmolLM2 on CPU). True: one lax.scan over the layers (~1 s compile), at
  # the cost of stacking the params inside every call (on CPU, decoding SmolLM2
  # is then ~10x slower; negligible on an accelerator).
  scan_layers: bool = False

  def setup(self):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.embed_tokens = nn.Embed(c.vocab_size, c.hidden_size,
                                 embedding_init=nn.initializers.normal(0.02), **kw)
    # Each layer's params are one subtree "layers_{i}", applied through a
    # parent-less LlamaBlock, so the stack can run unrolled or as a lax.scan.
    self.layer_params = [self.param(f"layers_{i}", self._init_layer)
                         for i in range(c.num_hidden_layers)]
    self.norm = RMSNorm(c.rms_norm_eps, **kw)
    if not c.tie_word_embeddings:
      self.lm_head = nn.Dense(c.vocab_size, use_bias=False,
                              kernel_init=nn.initializers.normal(0.02), **kw)

  def _block(self):
    # parent=None: a free-standing module applied with explicit per-layer params.
    return LlamaBlock(self.config, dtype=self.dtype, param_dtype=self.param_dtype, parent=None)

  def _init_layer(self, rng):
    x = jnp.zeros((1, 1, self.config.hidden_size), self.dtype)
    return self._block().init(rng, x, jnp.zeros((1, 1), jnp.int32),
                              jnp.ones((1, 1, 1), bool))["params"]

  def _run_layers(self, x, positions, mask, cache=None, index=None):
    """x [B,T,C]; cache (k, v) each [L, B, S, KV, d] or None -> (x, new cache or None)."""
    block = self._block()

    def body(x, layer):
      p, kv = layer
      return block.apply({"params": p}, x, positions, mask, kv, index)

    if self.scan_layers:
      stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *self.layer_params)
      return jax.lax.scan(body, x, (stacked, cache))
    outs = []
    for i, p in enumerate(self.layer_params):
      x, kv = body(x, (p, None if cache is None else (cache[0][i], cache[1][i])))
      outs.append(kv)
    return x, (None if cache is None else jax.tree_util.tree_map(lambda *a: jnp.stack(a), *outs))

  def embed(self, input_ids):
    """Token embeddings [B, T, C] in the compute dtype (to build inputs_embeds)."""
    return self.embed_tokens(input_ids)

  def logits(self, hidden):
    """Final hidden states [B, T, C] (after the last norm) -> float32 logits [B, T, V]."""
    if self.config.tie_word_embeddings:
      out = self.embed_tokens.attend(hidden)
    else:
      out = self.lm_head(hidden)
    return out.astype(jnp.float32)

  def _inputs(self, input_ids, inputs_embeds, prefix_embeds):
    if (input_ids is None) == (inputs_embeds is None):
      raise ValueError("give exactly one of input_ids and inputs_embeds")
    x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.dtype)
    if prefix_embeds is not None:
      x = jnp.concatenate([prefix_embeds.astype(self.dtype), x], axis=1)
    return x

  def __call__(self, input_ids=None, attention_mask=None, positions=None, inputs_embeds=None,
               prefix_embeds=None, return_hidden: bool = False):
    """Teacher-forced forward over S = P + T positions.

    input_ids int [B, T] or inputs_embeds [B, T, C]; prefix_embeds [B, P, C] optional,
    placed first. attention_mask bool [B, S] (True = real), positions int [B, S].
    Returns float32 logits [B, S, V], and with return_hidden also the final
    (normed) hidden states [B, S, C].
    """
    x = self._inputs(input_ids, inputs_embeds, prefix_embeds)
    b, s, _ = x.shape
    if attention_mask is None:
      attention_mask = jnp.ones((b, s), bool)
    attention_mask = attention_mask.astype(bool)
    if positions is None:
      positions = _default_positions(attention_mask)
    causal = jnp.tril(jnp.ones((s, s), bool))
    mask = causal[None] & attention_mask[:, None, :]
    x, _ = self._run_layers(x, positions, mask)
    hidden = self.norm(x)
    logits = self.logits(hidden)
    return (logits, hidden) if return_hidden else logits

  def init_cache(self, batch: int, max_len: int):
    """An empty cache for `max_len` positions (uses no params: callable unbound).

    k, v [L, B, max_len, KV, d] in the compute dtype; mask bool [B, max_len]
    (slot holds a real token); index: next slot to write (shared by the batch);
    next_pos int [B]: position of the next real token.
    """
    c = self.config
    shape = (c.num_hidden_layers, batch, max_len, c.num_key_value_heads, c.head_dim)
    return {"k": jnp.zeros(shape, self.dtype), "v": jnp.zeros(shape, self.dtype),
            "mask": jnp.zeros((batch, max_len), bool),
            "index": jnp.zeros((), jnp.int32), "next_pos": jnp.zeros((batch,), jnp.int32)}

  def decode_step(self, cache, input_ids=None, inputs_embeds=None, attention_mask=None,
                  positions=None, return_hidden: bool = False):
    """Runs t new positions against the cache: input_ids [B, t] or inputs_embeds [B, t, C].

    They go in slots index..index+t-1 (the caller keeps index + t <= max_len).
    attention_mask bool [B, t] marks real tokens (default all); positions
    default to next_pos + real tokens before. Returns (float32 logits [B, t, V],
    new cache) (and hidden states before the cache with return_hidden).
    """
    x = self._inputs(input_ids, inputs_embeds, None)
    b, t, _ = x.shape
    index = cache["index"]
    max_len = cache["mask"].shape[1]
    if attention_mask is None:
      attention_mask = jnp.ones((b, t), bool)
    attention_mask = attention_mask.astype(bool)
    if positions is None:
      positions = _default_positions(attention_mask, cache["next_pos"])
    key_mask = jax.lax.dynamic_update_slice(cache["mask"], attention_mask, (0, index))
    causal = jnp.arange(max_len)[None, :] <= (index + jnp.arange(t))[:, None]  # [t, S]
    mask = causal[None] & key_mask[:, None, :]
    x, (k, v) = self._run_layers(x, positions, mask, (cache["k"], cache["v"]), index)
    hidden = self.norm(x)
    logits = self.logits(hidden)
    new_cache = {"k": k, "v": v, "mask": key_mask,
                 "index": index + t,
                 "next_pos": cache["next_pos"] + attention_mask.sum(axis=1).astype(jnp.int32)}
    return (logits, new_cache, hidden) if return_hidden else (logits, new_cache)


def greedy_generate(model: Llama, params, input_ids, max_new_tokens: int, attention_mask=None):
  """Greedy decoding: prefill the (left-padded) prompt [B, T], then one token a step.

  Returns the new token ids int [B, max_new_tokens]. `params` is the "params"
  collection. Jitted per call; meant for tests and small demos.
  """
  input_ids = jnp.asarray(input_ids)
  b, t = input_ids.shape
  cache = model.init_cache(b, t + max_new_tokens)
  # Params are jit arguments, not closed-over constants (XLA would constant-fold them).
  prefill = jax.jit(lambda params, cache, ids, mask: model.apply(
      {"params": params}, cache, ids, attention_mask=mask, method=Llama.decode_step))
  step = jax.jit(lambda params, cache, token: model.apply(
      {"params": params}, cache, token[:, None], method=Llama.decode_step))

  mask = jnp.ones((b, t), bool) if attention_mask is None else jnp.asarray(attention_mask, bool)
  logits, cache = prefill(params, cache, input_ids, mask)
  token = jnp.argmax(logits[:, -1], axis=-1)
  out = [token]
  for _ in range(max_new_tokens - 1):
    logits, cache = step(params, cache, token)
    token = jnp.argmax(logits[:, -1], axis=-1)
    out.append(token)
  return np.asarray(jnp.stack(out, axis=1))


# ---- Hugging Face checkpoints ----

_LAYER_KERNELS = {  # HF name inside model.layers.N -> our path inside layers_N
    "self_attn.q_proj.weight": ("self_attn", "q_proj"),
    "self_attn.k_proj.weight": ("self_attn", "k_proj"),
    "self_attn.v_proj.weight": ("self_attn", "v_proj"),
    "self_attn.o_proj.weight": ("self_attn", "o_proj"),
    "mlp.gate_proj.weight": ("mlp", "gate_proj"),
    "mlp.up_proj.weight": ("mlp", "up_proj"),
    "mlp.down_proj.weight": ("mlp", "down_proj"),
}
_LAYER_NORMS = {"input_layernorm.weight": "input_layernorm",
                "post_attention_layernorm.weight": "post_attention_layernorm"}


def _expected_hf_shapes(c: LlamaConfig) -> dict[str, tuple[int, ...]]:
  """HF tensor name -> shape ([out, in] for linear weights)."""
  q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
  shapes = {"model.embed_tokens.weight": (c.vocab_size, c.hidden_size),
            "model.norm.weight": (c.hidden_size,)}
  if not c.tie_word_embeddings:
    shapes["lm_head.weight"] = (c.vocab_size, c.hidden_size)
  per_layer = {"self_attn.q_proj.weight": (q, c.hidden_size),
               "self_attn.k_proj.weight": (kv, c.hidden_size),
               "self_attn.v_proj.weight": (kv, c.hidden_size),
               "self_attn.o_proj.weight": (c.hidden_size, q),
               "mlp.gate_proj.weight": (c.intermediate_size, c.hidden_size),
               "mlp.up_proj.weight": (c.intermediate_size, c.hidden_size),
               "mlp.down_proj.weight": (c.hidden_size, c.intermediate_size),
               "input_layernorm.weight": (c.hidden_size,),
               "post_attention_layernorm.weight": (c.hidden_size,)}
  for i in range(c.num_hidden_layers):
    for name, shape in per_layer.items():
      shapes[f"model.layers.{i}.{name}"] = shape
  return shapes


def params_from_hf(tensors: Mapping[str, np.ndarray], config: LlamaConfig,
                   dtype=np.float32) -> dict:
  """HF LlamaForCausalLM tensors -> our "params" collection (pass as {"params": ...}).

  Linear weights [out, in] become kernels [in, out]. Raises ValueError naming
  every missing, unexpected or mis-shaped tensor. Tolerated extras: rotary
  inv_freq buffers, and lm_head.weight in a tied checkpoint when it equals the
  embedding.
  """
  c = config
  expected = _expected_hf_shapes(c)
  tensors = dict(tensors)
  for name in [n for n in tensors if n.endswith("rotary_emb.inv_freq")]:
    del tensors[name]
  problems = []
  if c.tie_word_embeddings and "lm_head.weight" in tensors:
    head = tensors.pop("lm_head.weight")
    embed = tensors.get("model.embed_tokens.weight")
    if embed is None or np.shape(head) != np.shape(embed) or not np.array_equal(head, embed):
      problems.append("lm_head.weight: present and different from model.embed_tokens.weight "
                      "although tie_word_embeddings=True")
  missing = sorted(set(expected) - set(tensors))
  unexpected = sorted(set(tensors) - set(expected))
  if missing:
    problems.append(f"missing: {missing}")
  if unexpected:
    problems.append(f"unexpected: {unexpected}")
  for name, shape in expected.items():
    if name in tensors and tuple(np.shape(tensors[name])) != shape:
      problems.append(f"{name}: shape {tuple(np.shape(tensors[name]))}, expected {shape}")
  if problems:
    raise ValueError("HF Llama checkpoint does not match the config:\n  " + "\n  ".join(problems))

  get = lambda name: np.asarray(tensors[name], dtype=dtype)
  params: dict = {"embed_tokens": {"embedding": get("model.embed_tokens.weight")},
                  "norm": {"scale": get("model.norm.weight")}}
  if not c.tie_word_embeddings:
    params["lm_head"] = {"kernel": get("lm_head.weight").T}
  for i in range(c.num_hidden_layers):
    prefix = f"model.layers.{i}."
    layer: dict = {"self_attn": {}, "mlp": {}}
    for name, (group, proj) in _LAYER_KERNELS.items():
      layer[group][proj] = {"kernel": np.ascontiguousarray(get(prefix + name).T)}
    for name, ours in _LAYER_NORMS.items():
      layer[ours] = {"scale": get(prefix + name)}
    params[f"layers_{i}"] = layer
  return params


def from_hf(config: Mapping[str, Any], tensors: Mapping[str, np.ndarray], dtype=jnp.float32,
            param_dtype=jnp.float32, scan_layers: bool = False) -> tuple[Llama, dict]:
  """(model, params) from an HF config.json dict and its tensors (e.g. an
  HFCheckpoint's .config and .tensors). `dtype` is the compute dtype."""
  cfg = LlamaConfig.from_hf(config)
  params = params_from_hf(tensors, cfg, dtype=np.dtype(param_dtype))
  return Llama(cfg, dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers), params
