"""A small RT-1-style policy network trained from scratch.

Per example the transformer sees one sequence:
  prefix  = for each of the W history frames: the instruction-conditioned image
            tokens of every camera (+ one state token when state_dim > 0);
  actions = D positions; position j holds a learned start embedding (j = 0) or
            the embedding of action token j-1 (j > 0), plus a per-dimension
            position embedding, and predicts action token j.
Attention is prefix-LM: the observation prefix attends bidirectionally within
itself, action positions attend to the whole prefix and causally to action
positions <= their own. Frames padded at the start of an episode
(history_mask False) are never attended to. Because the prefix never attends
to actions, its keys/values are computed once (`encode_prefix`) and decoding
adds one position per step (`decode_step`) with static shapes.

The instruction (token ids from tokenizers.text) -> learned embeddings ->
masked mean -> FiLM on every conv block of the image encoder, initialised to
the identity as in RT-1, so at init the instruction does not change anything.
With image_encoder "efficientnet_lite0" and text_encoder "minilm" (variant
rt1_pretrained) these are RT-1's pieces instead: the ImageNet EfficientNet-Lite0
with FiLM after every MBConv block + TokenLearner (film_efficientnet.py), and
the MiniLM sentence embedding of the instruction; `pretrained_variables`
loads their weights over a fresh init.
One output head gives logits over V = K + 1 ids: the K action bins and the
Q-SFT dummy id K. With `num_output_heads` H > 1 (Q-SFT "shared trunk, separate
output heads") the trunk is shared and H Dense heads ("head", "head_1", ...,
"head_{H-1}") read the same final features; __call__ then returns
[H, B, D, V] and decode_step [H, B, V] (head 0 first). H = 1 keeps the single
head's parameter name "head" and the unstacked shapes.
With `p_trunk` (Q-SFT "shared encoder", H = 2) only the observation encoder is
shared: head 1 reads its own transformer ("p_trunk": action inputs, blocks and
final norm named as the model's own) over the same encoded prefix, so the image
convolutions, most of a step's FLOPs, run once for both networks. Both losses
train the encoder: behind a stop-gradient (features from L_CE alone) p_theta
learned far worse (policy_quality_exploration.md, "Cost").
With `detach_head0` (Q-SFT "pi_head", H = 2, one trunk) head 0 reads the final
features behind a stop-gradient: the trunk is trained by head 1's loss alone.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qsft_vla.models import film_efficientnet, minilm
from qsft_vla.models.layers import (COMPUTE_DTYPES, FiLM, TokenLearner, TransformerBlock,
                                    check_policy_inputs)
from qsft_vla.models.backbone_config import BackboneConfig

IMAGE_ENCODERS = ("conv", "efficientnet_lite0")
TEXT_ENCODERS = ("learned", "minilm")


@dataclasses.dataclass(frozen=True)
class RT1SmallConfig(BackboneConfig):
  """Sizes of RT1Small. `action_vocab` is K (ActionTokenizer.vocab_size)."""
  _TUPLE_FIELDS = ("cameras", "conv_channels")
  NOT_CONFIGURABLE = BackboneConfig.NOT_CONFIGURABLE + ("text_vocab", "p_trunk")
  num_action_dims: int
  action_vocab: int
  window: int = 1
  cameras: tuple[str, ...] = ("image",)
  state_dim: int = 0
  text_vocab: int = 30522            # MiniLM WordPiece
  max_text_len: int = 16             # instruction tokens (MiniLM WordPiece), padded/truncated
  text_dim: int = 64
  conv_channels: tuple[int, ...] = (32, 64, 128)
  tokens_per_image: int = 8
  width: int = 128
  depth: int = 3
  num_heads: int = 4
  mlp_ratio: int = 4
  dropout: float = 0.0
  num_output_heads: int = 1
  p_trunk: bool = False              # with 2 heads: head 1 gets its own transformer (above)
  detach_head0: bool = False         # with 2 heads: head 0 reads the trunk behind a stop-gradient
  # "conv": the small FiLM conv net above; "efficientnet_lite0": RT-1's
  # FiLM-EfficientNet (film_efficientnet.py; `pretrained_variables`
  # loads ImageNet weights). "learned": masked mean of text_dim embeddings;
  # "minilm": the 384-d all-MiniLM-L6-v2 sentence embedding (text ids are its
  # WordPiece ids), frozen unless train_text_encoder.
  image_encoder: str = "conv"
  text_encoder: str = "learned"
  train_text_encoder: bool = False   # minilm: fine-tune it (default frozen, as RT-1's USE)
  compute_dtype: str = "float32"     # "bfloat16" on accelerators; params stay float32

  def __post_init__(self):
    for name in ("num_action_dims", "action_vocab", "window", "text_vocab", "max_text_len",
                 "num_output_heads", "text_dim", "tokens_per_image", "width", "depth",
                 "num_heads"):
      if getattr(self, name) < 1:
        raise ValueError(f"RT1SmallConfig.{name} must be >= 1, got {getattr(self, name)}")
    if not self.cameras:
      raise ValueError("RT1SmallConfig.cameras must name at least one camera")
    if self.p_trunk and self.num_output_heads != 2:
      raise ValueError(f"RT1SmallConfig.p_trunk needs num_output_heads=2 (pi_phi's head and "
                       f"p_theta's), got {self.num_output_heads}")
    if self.detach_head0 and (self.num_output_heads != 2 or self.p_trunk):
      raise ValueError("RT1SmallConfig.detach_head0 needs num_output_heads=2 on one trunk "
                       f"(no p_trunk), got {self.num_output_heads} heads, p_trunk={self.p_trunk}")
    if self.width % self.num_heads:
      raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
    if self.image_encoder not in IMAGE_ENCODERS:
      raise ValueError(f"RT1SmallConfig.image_encoder must be one of {IMAGE_ENCODERS}, "
                       f"got {self.image_encoder!r}")
    if self.compute_dtype not in COMPUTE_DTYPES:
      raise ValueError(f"RT1SmallConfig.compute_dtype must be one of {sorted(COMPUTE_DTYPES)}, "
                       f"got {self.compute_dtype!r}")
    if self.text_encoder not in TEXT_ENCODERS:
      raise ValueError(f"RT1SmallConfig.text_encoder must be one of {TEXT_ENCODERS}, "
                       f"got {self.text_encoder!r}")
    if self.text_encoder == "minilm":
      if self.text_vocab != minilm.BertConfig().vocab_size:
        raise ValueError(f"text_encoder 'minilm' needs MiniLM's WordPiece ids (text_vocab "
                         f"{minilm.BertConfig().vocab_size}), got text_vocab {self.text_vocab}")
      if self.max_text_len > minilm.BertConfig().max_position_embeddings:
        raise ValueError(f"max_text_len {self.max_text_len} exceeds MiniLM's positions")

  @property
  def uses_pretrained(self) -> bool:
    """Whether `pretrained_variables` changes anything."""
    return self.image_encoder != "conv" or self.text_encoder != "learned"

  @property
  def tokens_per_frame(self) -> int:
    return len(self.cameras) * self.tokens_per_image + (1 if self.state_dim else 0)

  @property
  def prefix_len(self) -> int:
    return self.window * self.tokens_per_frame



class ImageEncoder(nn.Module):
  """uint8 images [N, H, W, 3] + condition [N, E] -> tokens [N, num_tokens, width].

  Strided convs with GroupNorm and FiLM, then TokenLearner-lite: num_tokens
  learned spatial softmax maps pool the last feature map (plus a learned
  position embedding) into tokens.
  """
  channels: tuple[int, ...]
  num_tokens: int
  width: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, cond):
    d = self.dtype
    x = (images.astype(jnp.float32) * (2.0 / 255.0) - 1.0).astype(d)
    for i, c in enumerate(self.channels):
      x = nn.Conv(c, (3, 3), strides=(2, 2), padding="SAME", dtype=d, name=f"conv{i}")(x)
      x = nn.GroupNorm(num_groups=math.gcd(8, c), dtype=d, name=f"norm{i}")(x)
      x = FiLM(d, name=f"film{i}")(x, cond).astype(d)
      x = nn.relu(x)
    self.sow("intermediates", "conv_features", x)
    return TokenLearner(self.num_tokens, self.width, d, name="token_learner")(x)


def _trunk_layers(module: nn.Module, cfg: RT1SmallConfig, dtype) -> None:
  """Defines a transformer trunk's layers on `module` (call in its setup): the
  action inputs, the blocks and the final norm, under the names RT1Small's own
  trunk has always had (checkpoints read them), so a p_trunk starts as a copy."""
  embed_init = nn.initializers.normal(0.02)
  module.action_embed = nn.Embed(cfg.action_vocab, cfg.width, embedding_init=embed_init)
  module.action_start = module.param("action_start", embed_init, (cfg.width,))
  module.action_pos = module.param("action_pos", embed_init, (cfg.num_action_dims, cfg.width))
  module.blocks = [TransformerBlock(cfg.width, cfg.num_heads, cfg.mlp_ratio, cfg.dropout,
                                    dtype=dtype, name=f"block{i}") for i in range(cfg.depth)]
  module.ln_out = nn.LayerNorm(dtype=dtype)


class Trunk(nn.Module):
  """p_theta's own transformer trunk with a shared encoder (RT1SmallConfig.p_trunk).
  Holds layers only: RT1Small runs it as it runs its own trunk."""
  config: RT1SmallConfig
  dtype: Any = jnp.float32

  def setup(self):
    _trunk_layers(self, self.config, self.dtype)


class RT1Small(nn.Module):
  """See the module docstring. All shapes are static given the config."""
  config: RT1SmallConfig

  @property
  def dtype(self):
    """The compute dtype (config.compute_dtype); params stay float32, logits are float32."""
    return COMPUTE_DTYPES[self.config.compute_dtype]

  def setup(self):
    cfg = self.config
    d = self.dtype
    embed_init = nn.initializers.normal(0.02)
    if cfg.text_encoder == "minilm":
      self.text_encoder = minilm.SentenceEmbedder(minilm.BertConfig(), d)
    else:
      self.text_embed = nn.Embed(cfg.text_vocab, cfg.text_dim, embedding_init=embed_init)
    if cfg.image_encoder == "efficientnet_lite0":
      self.image_encoder = film_efficientnet.FiLMEfficientNetLite0(cfg.tokens_per_image,
                                                                   cfg.width, dtype=d)
    else:
      self.image_encoder = ImageEncoder(cfg.conv_channels, cfg.tokens_per_image, cfg.width, d)
    if cfg.state_dim:
      self.state_proj = nn.Dense(cfg.width, dtype=d)
    self.obs_pos = self.param("obs_pos", embed_init, (cfg.window, cfg.tokens_per_frame, cfg.width))
    _trunk_layers(self, cfg, d)
    self.head = nn.Dense(cfg.output_size, dtype=d)
    self.extra_heads = [nn.Dense(cfg.output_size, dtype=d, name=f"head_{i}")
                        for i in range(1, cfg.num_output_heads)]
    if cfg.p_trunk:
      self.p_trunk = Trunk(cfg, d)

  # ------------------------------------------------------------------ inputs
  def _instruction(self, text_ids, text_mask):
    """Masked mean of the learned token embeddings [B, text_dim], or the
    MiniLM sentence embedding [B, 384] (stop-gradient when frozen: Adam then
    leaves its params exactly unchanged and backprop skips BERT)."""
    if self.config.text_encoder == "minilm":
      emb = self.text_encoder(jnp.asarray(text_ids, jnp.int32), text_mask)
      return emb if self.config.train_text_encoder else jax.lax.stop_gradient(emb)
    emb = self.text_embed(text_ids)
    m = text_mask.astype(emb.dtype)[..., None]
    return (emb * m).sum(1) / jnp.maximum(m.sum(1), 1.0)

  def _prefix(self, observation, history_mask, text_ids, text_mask, instruction=None):
    """Observation tokens [B, P, C] and which of them may be attended to: bool[B, P].
    instruction: encode_instruction's output for these texts, if already computed."""
    cfg = self.config
    check_policy_inputs(self.config, observation, history_mask, text_ids, text_mask)
    b, w = history_mask.shape
    if instruction is None:
      instruction = self._instruction(text_ids, text_mask)
    cond = jnp.repeat(instruction, w, axis=0)  # [B*W, E]
    per_frame = []
    for cam in cfg.cameras:
      img = observation[cam]
      tokens = self.image_encoder(img.reshape((b * w,) + img.shape[2:]), cond)
      per_frame.append(tokens.reshape(b, w, cfg.tokens_per_image, cfg.width))
    if cfg.state_dim:
      state = jnp.asarray(observation["state"], jnp.float32)
      per_frame.append(self.state_proj(state)[:, :, None, :])
    x = (jnp.concatenate(per_frame, axis=2) + self.obs_pos).astype(self.dtype)  # [B, W, t, C]
    valid = jnp.repeat(jnp.asarray(history_mask, bool), cfg.tokens_per_frame, axis=1)
    return x.reshape(b, cfg.prefix_len, cfg.width), valid

  def _trunks(self):
    """The transformers over the encoded prefix: this module's own (pi_phi's, or
    every head's), and with p_trunk p_theta's."""
    return [self, self.p_trunk] if self.config.p_trunk else [self]

  def _cache(self, kvs, key_valid):
    """The decoding cache from each trunk's {"k", "v"} (in _trunks order)."""
    return {**kvs[0], "key_valid": key_valid, **({"p_trunk": kvs[1]} if kvs[1:] else {})}

  def _trunk_caches(self, cache):
    """Each trunk's {"k", "v"} of a _cache, in _trunks order."""
    return [cache] + ([cache["p_trunk"]] if self.config.p_trunk else [])

  def _action_inputs(self, trunk, action_tokens):
    """Shifted teacher forcing: [start, emb(k_0), ..., emb(k_{D-2})] + position: [B, D, C]."""
    b = action_tokens.shape[0]
    prev = trunk.action_embed(action_tokens[:, :-1])
    start = jnp.broadcast_to(trunk.action_start, (b, 1, self.config.width))
    return (jnp.concatenate([start, prev], axis=1) + trunk.action_pos).astype(self.dtype)

  def _logits(self, hs):
    """float32[..., V] with one head, [H, ..., V] with H > 1 heads, from the final
    features of each trunk (hs: one per _trunks entry). One trunk: every head reads
    it; with p_trunk, head 1 reads the second."""
    if self.config.p_trunk:
      return jnp.stack([self.head(self.ln_out(hs[0])).astype(jnp.float32),
                        self.extra_heads[0](self.p_trunk.ln_out(hs[1])).astype(jnp.float32)])
    h = self.ln_out(hs[0])
    # detach_head0 (Q-SFT "pi_head"): pi_phi's head is a probe of p_theta's features;
    # L_CE trains the head alone, so the trunk learns from L_WCE only.
    out = self.head(jax.lax.stop_gradient(h) if self.config.detach_head0 else h)
    out = out.astype(jnp.float32)
    if not self.extra_heads:
      return out
    return jnp.stack([out] + [head(h).astype(jnp.float32) for head in self.extra_heads])

  # ---------------------------------------------------------------- training
  def __call__(self, observation, history_mask, text_ids, text_mask, action_tokens,
               train: bool = False):
    """Teacher-forced logits float32[B, D, V] ([H, B, D, V] with H > 1 output
    heads); position j predicts action_tokens[:, j]."""
    cfg = self.config
    if action_tokens.shape[1:] != (cfg.num_action_dims,):
      raise ValueError(f"action_tokens: expected [B, {cfg.num_action_dims}], "
                       f"got {action_tokens.shape}")
    prefix, valid = self._prefix(observation, history_mask, text_ids, text_mask)
    key_valid = jnp.concatenate(
        [valid, jnp.ones((valid.shape[0], cfg.num_action_dims), bool)], axis=1)
    mask = self._attention_mask(key_valid)
    hs = []
    for trunk in self._trunks():
      x = jnp.concatenate([prefix, self._action_inputs(trunk, action_tokens)], axis=1)
      for block in trunk.blocks:
        x, _ = block(x, mask, train)
      hs.append(x[:, cfg.prefix_len:])
    return self._logits(hs)

  def _attention_mask(self, key_valid):
    """Prefix-LM mask bool[B, 1, T, T] over T = P + D positions."""
    p, t = self.config.prefix_len, key_valid.shape[1]
    q = jnp.arange(t)[:, None]
    k = jnp.arange(t)[None, :]
    structural = (k < p) | (k <= q)  # prefix keys for all; actions causally
    return (structural[None] & key_valid[:, None, :])[:, None]

  # --------------------------------------------------------------- inference
  def encode_instruction(self, text_ids, text_mask):
    """The per-episode instruction condition [B, E] (the MiniLM sentence
    embedding or the masked mean): the controller computes it once per reset
    instead of on every act()."""
    return self._instruction(text_ids, text_mask)

  def encode_prefix(self, observation, history_mask, text_ids, text_mask, instruction=None):
    """Runs the observation prefix once; returns the cache for decode_step.
    instruction: encode_instruction(text_ids, text_mask), if already computed.

    cache = {"k", "v": per layer [B, P + D, H, d] (action slots zero until
    decoded), "key_valid": bool[B, P + D]}; with p_trunk also "p_trunk":
    {"k", "v"} of p_theta's transformer.
    """
    cfg = self.config
    prefix, valid = self._prefix(observation, history_mask, text_ids, text_mask, instruction)
    mask = valid[:, None, None, :]  # the prefix sees itself bidirectionally
    pad = ((0, 0), (0, cfg.num_action_dims), (0, 0), (0, 0))
    kvs = []
    for trunk in self._trunks():
      x, ks, vs = prefix, [], []
      for block in trunk.blocks:
        x, (k, v) = block(x, mask, False)
        ks.append(jnp.pad(k, pad))
        vs.append(jnp.pad(v, pad))
      kvs.append({"k": ks, "v": vs})
    key_valid = jnp.concatenate(
        [valid, jnp.ones((valid.shape[0], cfg.num_action_dims), bool)], axis=1)
    return self._cache(kvs, key_valid)

  def first_action_logits(self, observation, history_mask, text_ids, text_mask,
                          instruction=None):
    """Logits float32[B, V] ([H, B, V] with H > 1 output heads) of action position 0
    in one pass over the prefix and the start position, without a cache: what
    encode_prefix + decode_step(j=0) give. For one action dimension there is
    nothing to decode after it, so acting needs no cache at all."""
    cfg = self.config
    prefix, valid = self._prefix(observation, history_mask, text_ids, text_mask, instruction)
    b = prefix.shape[0]
    key_valid = jnp.concatenate([valid, jnp.ones((b, 1), bool)], axis=1)
    mask = self._attention_mask(key_valid)
    hs = []
    for trunk in self._trunks():
      start = (jnp.broadcast_to(trunk.action_start, (b, 1, cfg.width))
               + trunk.action_pos[:1]).astype(self.dtype)
      x = jnp.concatenate([prefix, start], axis=1)
      for block in trunk.blocks:
        x, _ = block(x, mask, False)
      hs.append(x[:, cfg.prefix_len])
    return self._logits(hs)

  def decode_step(self, cache, prev_token, j):
    """Logits float32[B, V] ([H, B, V] with H > 1 output heads) for action
    position j (int, may be traced) and the new cache.

    prev_token int32[B] is action token j-1 (ignored at j = 0).
    """
    cfg = self.config
    j = jnp.asarray(j, jnp.int32)
    b = prev_token.shape[0]
    index = cfg.prefix_len + j
    mask = cache["key_valid"] & (jnp.arange(cfg.seq_len) <= index)[None, :]
    mask = mask[:, None, None, :]
    hs, kvs = [], []
    for trunk, kv in zip(self._trunks(), self._trunk_caches(cache)):
      emb = trunk.action_embed(jnp.asarray(prev_token, jnp.int32))
      x = jnp.where(j == 0, jnp.broadcast_to(trunk.action_start, (b, cfg.width)), emb)
      x = (x + jax.lax.dynamic_index_in_dim(trunk.action_pos, j, keepdims=False))[:, None, :]
      x = x.astype(self.dtype)
      ks, vs = [], []
      for block, k, v in zip(trunk.blocks, kv["k"], kv["v"]):
        x, (k, v) = block.decode(x, k, v, index, mask)
        ks.append(k)
        vs.append(v)
      hs.append(x[:, 0])
      kvs.append({"k": ks, "v": vs})
    return self._logits(hs), self._cache(kvs, cache["key_valid"])


# ---- pretrained weights


def pretrained_variables(model_cfg: RT1SmallConfig, variables):
  """`variables` (a fresh init) with the image/text encoder params replaced by
  the packaged pretrained weights: EfficientNet-Lite0 (ImageNet, batch norms
  folded) for image_encoder "efficientnet_lite0", all-MiniLM-L6-v2 for
  text_encoder "minilm". FiLM, TokenLearner and the transformer keep their
  init (FiLM is the identity there, so the pretrained features pass through).
  Shapes are checked, so a mismatch fails here and not in the first step."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  if not model_cfg.uses_pretrained:
    return variables
  params = dict(variables["params"])

  def overwrite(scope, loaded):
    fresh = params[scope]
    merged = dict(fresh)
    for k, v in loaded.items():
      if k not in fresh:
        raise ValueError(f"pretrained {scope}: no {k!r} in the model")
      want = jax.tree_util.tree_structure(fresh[k])
      if jax.tree_util.tree_structure(v) != want:
        raise ValueError(f"pretrained {scope}/{k}: structure differs from the model")
      for a, b in zip(jax.tree_util.tree_leaves(fresh[k]), jax.tree_util.tree_leaves(v)):
        if np.shape(a) != np.shape(b):
          raise ValueError(f"pretrained {scope}/{k}: shape {np.shape(b)} != {np.shape(a)}")
      merged[k] = jax.tree_util.tree_map(lambda x, y: np.asarray(x, np.asarray(y).dtype), v,
                                         fresh[k])
    params[scope] = merged

  for scope, loaded in pretrained_params(model_cfg).items():
    overwrite(scope, loaded)
  return {**variables, "params": params}


def pretrained_params(model_cfg: RT1SmallConfig):
  """Every weight of the model that comes from pretrained checkpoints, by scope:
  {"image_encoder": EfficientNet-Lite0's backbone (not its FiLM layers),
  "text_encoder": MiniLM}, as the config uses them ({} for neither)."""
  out = {}
  if model_cfg.image_encoder == "efficientnet_lite0":
    out["image_encoder"] = film_efficientnet.pretrained_params()
  if model_cfg.text_encoder == "minilm":
    _, loaded, _ = minilm.load_minilm()
    out["text_encoder"] = dict(loaded["params"])
  return out


def init_variables(model: RT1Small, rng, *example_inputs, pretrained: bool = True):
  """model.init (jitted), then the pretrained encoders when the config uses them."""
  variables = jax.jit(model.init, static_argnums=6)(rng, *example_inputs, False)
  return pretrained_variables(model.config, variables) if pretrained else variables


def pretrained_sources(model_cfg: RT1SmallConfig) -> list[str]:
  """Where pretrained_params reads its weights, for people (error messages)."""
  from qsft_vla.weights import packaged  # pylint: disable=g-import-not-at-top
  names = (["efficientnet_lite0_pth"] if model_cfg.image_encoder == "efficientnet_lite0" else []) \
      + (["minilm_folder"] if model_cfg.text_encoder == "minilm" else [])
  return [f"{packaged.ARTIFACTS[n].package} {packaged.ARTIFACTS[n].version}" for n in names]
