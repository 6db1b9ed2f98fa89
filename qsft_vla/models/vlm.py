"""A LLaVA-style robot policy: SmolLM2-135M whose own vocabulary holds the action tokens.

Why: Q-SFT's point (QSFT.md) is to fine-tune a pretrained model's OWN
next-token distribution, with no new value heads, so training starts exactly
where pretraining left off. This module does that for robot control, as RT-2 /
OpenVLA do for behaviour cloning: action bins are vocabulary ids of the LM.

Per example the (causal) Llama sees one sequence:
  prefix  = for each of the W history frames: the projected image tokens of
            every camera (+ one projected state token when state_dim > 0),
            then the instruction (SmolLM2 ids, padding hidden by text_mask);
  actions = D positions; position j's input is the LM embedding of a fixed
            start id (`start_vocab_id`, default 1 = "<|im_start|>") at j = 0
            and of vocab id `action_id_offset + k_{j-1}` for j > 0; it
            predicts action token j.
Padding frames (history_mask False) and padded instruction tokens are masked
as keys and skipped when counting RoPE positions (Llama's default positions),
so padding changes nothing. Attention is causal over the whole sequence
(unlike RT1Small's prefix-LM): position 0 still depends only on the
observation and instruction, which the learner relies on for R(x_{t+1}^1).

Action ids (the RT-2 / OpenVLA convention): bin k is vocab id
action_id_offset + k, by default the LAST 256 ids (vocab_size - 256, i.e.
48896..49151 in SmolLM2): the BPE merges learned last, the rarest tokens. The
Q-SFT dummy is `dummy_vocab_id` (default 16 = "<empty_output>", a control
token that never occurs in instructions). K > 256 is refused.

Outputs: pi_phi / p_theta are the LM's own next-token logits. With one output
head the logits are hidden @ E[ids]^T for ids = [offset .. offset+K-1, dummy]
(E = the tied embedding / LM head), i.e. exactly the full-vocabulary logits at
those ids: output index k < K is bin k, index K the dummy, as the learner
expects. The learner masks every id outside its allowed set before each
softmax, so a softmax over these K + 1 logits IS the full-vocabulary softmax
restricted to the allowed ids (the other 48k ids would be masked anyway).
With num_output_heads H = 2 (Q-SFT "shared trunk, separate heads") the
learner needs two parameters "head" and "head_1" (it copies "head" into
"head_1" at init); here they are [K + 1, C] copies of the gathered LM-head
rows (filled by `pretrained_variables`; random at a bare init), so at the
pretrained start both heads equal the LM's own logits, but they then train
apart from the (still tied) input embeddings. With `detach_head0` (Q-SFT
"pi_head") head 0 reads the final hidden state behind a stop-gradient.

Vision: EfficientNet-Lite0 (ImageNet weights) -> last feature map, average
pooled to `image_tokens_per_frame` tokens on a grid -> 2-layer MLP projector
(new) -> LM width. `freeze_vision` stops gradients into EfficientNet (its
params stay in the tree; Adam leaves a zero-gradient param unchanged).
Batch norms are folded into per-channel affines (film_efficientnet.py says
why: the learner trains and Polyak-averages whole variable trees, so there is
no "batch_stats" collection to corrupt).

KV cache: `encode_prefix` prefills a Llama cache sized prefix + D;
`decode_step(cache, prev_token, j)` writes action position j at slot
prefix_len + j with RoPE position (real prefix tokens) + j, both derived from
j, so a traced j (lax.scan) works and equals teacher forcing.

The LM's sizes come from the folder's config.json (`lm_folder`; None = the
packaged SmolLM2-135M-Instruct, converted from GGUF on first use), read once
per folder and cached. Weights: `pretrained_variables` fills an initialised
variables tree with the LM and EfficientNet weights; `init_variables` builds
the same without a full model.init (which spends ~90 s on CPU drawing random
LM weights that are then overwritten). The instruction tokenizer is the
folder's own tokenizer.json (`tokenizer_path`).

  model = VLM(VLMConfig.for_robot(spec, action_tokenizer, window=2))
  variables = init_variables(model, rng, *example_inputs)   # pretrained start
  logits = model.apply(variables, obs, history_mask, text_ids, text_mask, tokens)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qsft_vla.models import film_efficientnet
from qsft_vla.models.layers import COMPUTE_DTYPES, check_policy_inputs
from qsft_vla.models.llama import Llama, LlamaConfig, params_from_hf
from qsft_vla.models.backbone_config import BackboneConfig

MAX_ACTION_VOCAB = 256      # action bins live in 256 reserved vocabulary ids


@functools.lru_cache(maxsize=8)
def resolve_lm_folder(lm_folder: Optional[str]) -> str:
  """The LM checkpoint folder (None: the packaged SmolLM2, converted and cached)."""
  if lm_folder is not None:
    return os.path.abspath(lm_folder)
  from qsft_vla.weights import gguf_convert  # pylint: disable=g-import-not-at-top
  return gguf_convert.smollm2_folder()


def tokenizer_path(lm_folder: Optional[str]) -> str:
  """The LM's own tokenizer.json: instructions are tokenized as it was trained."""
  path = os.path.join(resolve_lm_folder(lm_folder), "tokenizer.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: the LM folder has no tokenizer.json (the VLM "
                            "tokenizes instructions with the LM's own tokenizer)")
  return path


@functools.lru_cache(maxsize=8)
def lm_config(lm_folder: Optional[str]) -> LlamaConfig:
  """LlamaConfig from the folder's config.json (cheap: no tensors are read)."""
  path = os.path.join(resolve_lm_folder(lm_folder), "config.json")
  with open(path, encoding="utf-8") as f:
    return LlamaConfig.from_hf(json.load(f))


@dataclasses.dataclass(frozen=True)
class VLMConfig(BackboneConfig):
  """Sizes of VLM. `action_vocab` is K (ActionTokenizer.vocab_size), at most 256."""
  num_action_dims: int
  action_vocab: int
  window: int = 1
  cameras: tuple[str, ...] = ("image",)
  state_dim: int = 0
  max_text_len: int = 16               # instruction tokens (the LM's own tokenizer)
  num_output_heads: int = 1
  detach_head0: bool = False           # with 2 heads: head 0 reads the LM behind a stop-gradient
  dropout: float = 0.0                 # on the projected image/state tokens
  # A Hugging Face Llama folder (config.json, safetensors, tokenizer.json);
  # None: the packaged SmolLM2-135M-Instruct, converted from GGUF on first use.
  lm_folder: Optional[str] = None
  # Keep only the first N decoder layers of the pretrained LM (None: all). A
  # cheaper, weaker model; the end-to-end smoke tests use it to stay fast.
  lm_layers: Optional[int] = None
  # Vocabulary ids (see the module docstring): None = vocab_size - 256 (the last 256 ids).
  action_id_offset: Optional[int] = None
  dummy_vocab_id: int = 16             # SmolLM2 "<empty_output>"
  start_vocab_id: int = 1              # SmolLM2 "<|im_start|>": input of action position 0
  image_tokens_per_frame: int = 4      # per camera: the feature map pooled to this many tokens
  projector_hidden: int = 1024
  freeze_vision: bool = False
  compute_dtype: str = "float32"       # "bfloat16" on accelerators; params stay float32

  def __post_init__(self):
    for name in ("num_action_dims", "action_vocab", "window", "max_text_len",
                 "num_output_heads", "image_tokens_per_frame", "projector_hidden"):
      if getattr(self, name) < 1:
        raise ValueError(f"VLMConfig.{name} must be >= 1, got {getattr(self, name)}")
    if self.action_vocab > MAX_ACTION_VOCAB:
      raise ValueError(f"VLMConfig.action_vocab={self.action_vocab}: the VLM maps action bins "
                       f"to {MAX_ACTION_VOCAB} reserved vocabulary ids, so K must be <= "
                       f"{MAX_ACTION_VOCAB} (use fewer bins per dimension)")
    if self.num_output_heads not in (1, 2):
      raise ValueError(f"VLMConfig.num_output_heads must be 1 (separate backbones / BC) or 2 "
                       f"(shared trunk), got {self.num_output_heads}")
    if self.detach_head0 and self.num_output_heads != 2:
      raise ValueError(f"VLMConfig.detach_head0 needs num_output_heads=2, got "
                       f"{self.num_output_heads}")
    if not self.cameras:
      raise ValueError("VLMConfig.cameras must name at least one camera")
    if self.compute_dtype not in COMPUTE_DTYPES:
      raise ValueError(f"VLMConfig.compute_dtype must be one of {sorted(COMPUTE_DTYPES)}, "
                       f"got {self.compute_dtype!r}")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"VLMConfig.dropout must be in [0, 1), got {self.dropout}")
    if self.lm_layers is not None and self.lm_layers < 1:
      raise ValueError(f"VLMConfig.lm_layers must be >= 1 or None (all), got {self.lm_layers}")

  uses_pretrained = True  # init_variables loads the LM and EfficientNet weights

  # ---- sequence layout
  @property
  def tokens_per_frame(self) -> int:
    return len(self.cameras) * self.image_tokens_per_frame + (1 if self.state_dim else 0)

  @property
  def prefix_len(self) -> int:
    """Observation tokens + instruction tokens."""
    return self.window * self.tokens_per_frame + self.max_text_len

  # ---- vocabulary ids (need the LM's config)
  def lm(self) -> LlamaConfig:
    """The LM's config, truncated to lm_layers decoder layers if set."""
    c = lm_config(self.lm_folder)
    if self.lm_layers is None:
      return c
    if self.lm_layers > c.num_hidden_layers:
      raise ValueError(f"VLMConfig.lm_layers={self.lm_layers}, but the LM has only "
                       f"{c.num_hidden_layers} layers")
    return dataclasses.replace(c, num_hidden_layers=self.lm_layers)

  def output_vocab_ids(self) -> np.ndarray:
    """int32[K + 1]: vocab id of bin k at index k, the dummy's at index K. Validated."""
    vocab = self.lm().vocab_size
    offset = (vocab - MAX_ACTION_VOCAB if self.action_id_offset is None
              else self.action_id_offset)
    if offset < 0 or offset + self.action_vocab > vocab:
      raise ValueError(f"action ids {offset}..{offset + self.action_vocab - 1} are outside the "
                       f"LM vocabulary (size {vocab})")
    ids = np.arange(offset, offset + self.action_vocab)
    for name in ("dummy_vocab_id", "start_vocab_id"):
      v = getattr(self, name)
      if not 0 <= v < vocab:
        raise ValueError(f"VLMConfig.{name}={v} is outside the LM vocabulary (size {vocab})")
      if offset <= v < offset + self.action_vocab:
        raise ValueError(f"VLMConfig.{name}={v} collides with the action ids "
                         f"{offset}..{offset + self.action_vocab - 1}")
    return np.append(ids, self.dummy_vocab_id).astype(np.int32)

  @classmethod
  def for_robot(cls, spec, action_tokenizer, window: int, text_vocab: Optional[int] = None,
                **overrides) -> "VLMConfig":
    """BackboneConfig.for_robot; text_vocab: the instruction tokenizer's size,
    checked against the LM's."""
    cfg = super().for_robot(spec, action_tokenizer, window, **overrides)
    vocab = cfg.lm().vocab_size
    if text_vocab is not None and text_vocab > vocab:
      raise ValueError(f"the instruction tokenizer has {text_vocab} ids but the LM's "
                       f"vocabulary only {vocab}: use the tokenizer.json of the LM's folder")
    cfg.output_vocab_ids()  # fails here, naming the ids, rather than at the first step
    return cfg


def pool_grid(n: int) -> tuple[int, int]:
  """n tokens -> (rows, cols) with rows * cols = n, as square as possible."""
  rows = max(r for r in range(1, int(math.isqrt(n)) + 1) if n % r == 0)
  return rows, n // rows


def adaptive_avg_pool(x, rows: int, cols: int):
  """[N, h, w, C] -> [N, rows * cols, C]; cell i covers input rows
  floor(i h / rows) .. ceil((i + 1) h / rows) (cells overlap when h < rows)."""
  _, h, w, _ = x.shape
  cells = []
  for i in range(rows):
    r0, r1 = (i * h) // rows, -(-((i + 1) * h) // rows)
    for j in range(cols):
      c0, c1 = (j * w) // cols, -(-((j + 1) * w) // cols)
      cells.append(jnp.mean(x[:, r0:r1, c0:c1], axis=(1, 2)))
  return jnp.stack(cells, axis=1)


class Projector(nn.Module):
  """2-layer MLP (LLaVA-1.5): Dense -> GELU -> Dense."""
  hidden: int
  out: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = nn.gelu(nn.Dense(self.hidden, dtype=self.dtype, name="fc1")(x))
    return nn.Dense(self.out, dtype=self.dtype, name="fc2")(x)


class VLM(nn.Module):
  """See the module docstring. Same call interface as RT1Small."""
  config: VLMConfig

  def setup(self):
    cfg = self.config
    self.lm_cfg = cfg.lm()
    self.out_ids = cfg.output_vocab_ids()  # validates the ids
    dtype = COMPUTE_DTYPES[cfg.compute_dtype]
    width = self.lm_cfg.hidden_size
    self.lm = Llama(self.lm_cfg, dtype=dtype)
    self.vision = film_efficientnet.FiLMEfficientNetLite0(film=False, dtype=dtype)
    self.image_proj = Projector(cfg.projector_hidden, width, dtype=dtype)
    if cfg.state_dim:
      self.state_proj = Projector(cfg.projector_hidden, width, dtype=dtype)
    self.prefix_dropout = nn.Dropout(cfg.dropout)
    if cfg.num_output_heads > 1:
      init = nn.initializers.normal(0.02)
      self.heads = [self.param("head" if i == 0 else f"head_{i}", init,
                               (cfg.output_size, width)) for i in range(cfg.num_output_heads)]

  # ------------------------------------------------------------------ inputs
  def _prefix(self, observation, history_mask, text_ids, text_mask, train, instruction=None):
    """Prefix embeddings [B, prefix_len, C] and which of them are real: bool[B, prefix_len].
    instruction: encode_instruction's output for these texts, if already computed."""
    cfg = self.config
    check_policy_inputs(self.config, observation, history_mask, text_ids, text_mask)
    b, w = history_mask.shape
    rows, cols = pool_grid(cfg.image_tokens_per_frame)
    per_frame = []
    for cam in cfg.cameras:
      img = observation[cam]
      feats = self.vision.features(img.reshape((b * w,) + img.shape[2:]))
      if cfg.freeze_vision:
        feats = jax.lax.stop_gradient(feats)
      tokens = self.image_proj(adaptive_avg_pool(feats, rows, cols))
      per_frame.append(tokens.reshape(b, w, cfg.image_tokens_per_frame, -1))
    if cfg.state_dim:
      state = jnp.asarray(observation["state"], jnp.float32)
      per_frame.append(self.state_proj(state)[:, :, None, :])
    obs = jnp.concatenate(per_frame, axis=2).reshape(b, w * cfg.tokens_per_frame, -1)
    obs = self.prefix_dropout(obs, deterministic=not train)
    text = self.encode_instruction(text_ids, text_mask) if instruction is None else instruction
    x = jnp.concatenate([obs.astype(text.dtype), text], axis=1)
    valid = jnp.concatenate([jnp.repeat(jnp.asarray(history_mask, bool),
                                        cfg.tokens_per_frame, axis=1),
                             jnp.asarray(text_mask, bool)], axis=1)
    return x, valid

  def _action_ids(self, action_tokens):
    """Shifted teacher forcing: vocab ids [start, id(k_0), ..., id(k_{D-2})]: int[B, D]."""
    b = action_tokens.shape[0]
    prev = jnp.asarray(action_tokens[:, :-1], jnp.int32) + int(self.out_ids[0])
    start = jnp.full((b, 1), self.config.start_vocab_id, jnp.int32)
    return jnp.concatenate([start, prev], axis=1)

  def _logits(self, hidden):
    """Final (normed) hidden [..., C] -> float32 [..., K + 1] ([H, ..., K + 1] with H > 1)."""
    ids = jnp.asarray(self.out_ids)
    if self.config.num_output_heads > 1:
      # detach_head0 (Q-SFT "pi_head"): L_CE trains pi_phi's head alone, not the LM.
      ins = [jax.lax.stop_gradient(hidden) if i == 0 and self.config.detach_head0 else hidden
             for i in range(len(self.heads))]
      return jnp.stack([(x @ jnp.asarray(h, x.dtype).T).astype(jnp.float32)
                        for x, h in zip(ins, self.heads)])
    if self.lm_cfg.tie_word_embeddings:
      rows = self.lm.embed(ids)  # the tied LM-head rows of the output ids
      return (hidden @ rows.T.astype(hidden.dtype)).astype(jnp.float32)
    # Untied LM head: full logits, then gather (correct, slower; SmolLM2 is tied).
    return jnp.take(self.lm.logits(hidden), ids, axis=-1)

  # ---------------------------------------------------------------- training
  def __call__(self, observation, history_mask, text_ids, text_mask, action_tokens,
               train: bool = False):
    """Teacher-forced logits float32[B, D, K + 1] ([H, B, D, K + 1] with H > 1);
    position j predicts action_tokens[:, j]."""
    cfg = self.config
    if action_tokens.shape[1:] != (cfg.num_action_dims,):
      raise ValueError(f"action_tokens: expected [B, {cfg.num_action_dims}], "
                       f"got {action_tokens.shape}")
    prefix, valid = self._prefix(observation, history_mask, text_ids, text_mask, train)
    acts = self.lm.embed(self._action_ids(action_tokens))
    mask = jnp.concatenate([valid, jnp.ones(acts.shape[:2], bool)], axis=1)
    # The full-vocabulary logits Llama also returns are unused: jit drops them.
    _, hidden = self.lm(inputs_embeds=acts, prefix_embeds=prefix, attention_mask=mask,
                        return_hidden=True)
    return self._logits(hidden[:, cfg.prefix_len:])

  # --------------------------------------------------------------- inference
  def encode_instruction(self, text_ids, text_mask):
    """The instruction's LM input embeddings [B, max_text_len, C]. (The LM
    reads them after the image tokens, so only this lookup can be cached per
    episode; the controller does, as for RT1Small's sentence embedding.)"""
    del text_mask  # padding is hidden by the attention mask in _prefix
    return self.lm.embed(jnp.asarray(text_ids, jnp.int32))

  def encode_prefix(self, observation, history_mask, text_ids, text_mask, instruction=None):
    """Prefills the LM cache (sized prefix_len + D) with the prefix; returns
    {"lm": Llama cache, "prefix_pos": int32[B] (real prefix tokens)}.
    instruction: encode_instruction(text_ids, text_mask), if already computed."""
    cfg = self.config
    x, valid = self._prefix(observation, history_mask, text_ids, text_mask, False, instruction)
    cache = self.lm.init_cache(x.shape[0], cfg.seq_len)
    _, cache = self.lm.decode_step(cache, inputs_embeds=x, attention_mask=valid)
    return {"lm": cache, "prefix_pos": cache["next_pos"]}

  def first_action_logits(self, observation, history_mask, text_ids, text_mask,
                          instruction=None):
    """Logits float32[B, K + 1] ([H, B, K + 1] with H > 1) of action position 0 in
    one pass over the prefix and the start token, without a cache: what
    encode_prefix + decode_step(j=0) give, for robots with one action dimension."""
    cfg = self.config
    x, valid = self._prefix(observation, history_mask, text_ids, text_mask, False, instruction)
    b = x.shape[0]
    start = self.lm.embed(jnp.full((b, 1), cfg.start_vocab_id, jnp.int32))
    mask = jnp.concatenate([valid, jnp.ones((b, 1), bool)], axis=1)
    _, hidden = self.lm(inputs_embeds=start, prefix_embeds=x, attention_mask=mask,
                        return_hidden=True)
    return self._logits(hidden[:, cfg.prefix_len])

  def decode_step(self, cache, prev_token, j):
    """Logits float32[B, K + 1] ([H, B, K + 1] with H > 1) for action position
    j (int, may be traced) and the new cache. prev_token int32[B] is action
    token j-1 (ignored at j = 0). Slot and RoPE position come from j, so any j
    whose earlier positions are in the cache may be (re)decoded."""
    cfg = self.config
    j = jnp.asarray(j, jnp.int32)
    ids = jnp.where(j == 0, cfg.start_vocab_id,
                    jnp.asarray(prev_token, jnp.int32) + int(self.out_ids[0]))
    lm_cache = {**cache["lm"], "index": cfg.prefix_len + j, "next_pos": cache["prefix_pos"] + j}
    _, lm_cache, hidden = self.lm.decode_step(lm_cache, input_ids=ids[:, None],
                                              return_hidden=True)
    return self._logits(hidden[:, 0]), {"lm": lm_cache, "prefix_pos": cache["prefix_pos"]}


# ---- pretrained weights

PRETRAINED = ("lm", "vision")  # top-level params subtrees filled from checkpoints


def init_variables(model: VLM, rng, *example_inputs, pretrained: bool = True, lm_tensors=None,
                   vision_params=None):
  """Pretrained variables without a full model.init: only the new layers
  (projectors, output heads) are initialised (jitted; XLA drops the unused
  random init of the 135M LM, which takes ~90 s on CPU), the rest is
  `pretrained_variables`. example_inputs: as for __call__ (batch 1 is enough).
  pretrained=False: a plain random init (timing the architecture only)."""
  if not pretrained:
    return jax.jit(model.init)(rng, *example_inputs)

  def new_layers(rng):
    params = model.init(rng, *example_inputs)["params"]
    return {k: v for k, v in params.items() if k not in PRETRAINED}

  shapes = flax.core.unfreeze(jax.eval_shape(model.init, rng, *example_inputs))
  shapes["params"] = {**shapes["params"], **jax.jit(new_layers)(rng)}
  return pretrained_variables(model.config, shapes, lm_tensors, vision_params)


def pretrained_variables(model_cfg: VLMConfig, variables, lm_tensors=None, vision_params=None):
  """`variables` (from model.init) with the LM params from the config's HF folder
  and EfficientNet-Lite0 from the packaged ImageNet weights (batch norms
  folded); projectors keep their init. With two output heads, both are set to
  the LM-head rows of the output ids (so each head starts as the LM's own
  logits). `lm_tensors` (HF names) / `vision_params` (folded, as
  film_efficientnet.pretrained_params) override the sources.
  Raises ValueError when a shape does not match the initialised tree."""
  variables = flax.core.unfreeze(variables)
  params = dict(variables["params"])
  c = model_cfg.lm()
  new = pretrained_params(model_cfg, lm_tensors, vision_params)
  if model_cfg.num_output_heads > 1:
    ids = model_cfg.output_vocab_ids()
    table = (new["lm"]["embed_tokens"]["embedding"] if c.tie_word_embeddings
             else new["lm"]["lm_head"]["kernel"].T)
    rows = np.asarray(table)[ids]
    new["head"] = rows
    for i in range(1, model_cfg.num_output_heads):
      new[f"head_{i}"] = rows.copy()
  _check_like(params, new, "params")
  params.update(new)
  out = {**variables, "params": params}
  return jax.tree_util.tree_map(lambda ref, x: jnp.asarray(x, ref.dtype), variables, out)


def pretrained_params(model_cfg: VLMConfig, lm_tensors=None, vision_params=None):
  """{"lm": the LM's params from the config's HF folder, "vision": EfficientNet-Lite0
  from the packaged ImageNet weights (batch norms folded)}: every weight of the
  model that comes from pretrained checkpoints (numpy, float32)."""
  from qsft_vla.weights import hf  # pylint: disable=g-import-not-at-top
  c = model_cfg.lm()
  if lm_tensors is None:
    lm_tensors = hf.load_folder(resolve_lm_folder(model_cfg.lm_folder), dtype=np.float32).tensors
  return {"lm": params_from_hf(_first_layers(lm_tensors, c.num_hidden_layers), c),
          "vision": (film_efficientnet.pretrained_params() if vision_params is None
                     else vision_params)}


def pretrained_sources(model_cfg: VLMConfig) -> list[str]:
  """Where pretrained_params reads its weights, for people (error messages)."""
  from qsft_vla.weights import packaged  # pylint: disable=g-import-not-at-top
  eff = packaged.ARTIFACTS["efficientnet_lite0_pth"]
  lm = (f"LM folder {os.path.abspath(model_cfg.lm_folder)}" if model_cfg.lm_folder else
        "{0.package} {0.version}".format(packaged.ARTIFACTS["smollm2_gguf"]))
  return [lm, f"{eff.package} {eff.version}"]


def _first_layers(tensors, n: int):
  """HF tensors without the decoder layers n, n+1, ... (VLMConfig.lm_layers)."""
  def layer(name):
    parts = name.split(".")
    return int(parts[2]) if name.startswith("model.layers.") and parts[2].isdigit() else -1
  return {k: v for k, v in tensors.items() if layer(k) < n}


def _check_like(ref, new, where):
  """Every leaf of `new` exists in `ref` with the same shape (and vice versa per subtree)."""
  problems = []
  for key, sub in new.items():
    if key not in ref:
      problems.append(f"{where}/{key}: not in the initialised variables")
      continue
    ref_leaves = {jax.tree_util.keystr(p): np.shape(x)
                  for p, x in jax.tree_util.tree_leaves_with_path(ref[key])}
    new_leaves = {jax.tree_util.keystr(p): np.shape(x)
                  for p, x in jax.tree_util.tree_leaves_with_path(sub)}
    for name in sorted(set(ref_leaves) | set(new_leaves)):
      if ref_leaves.get(name) != new_leaves.get(name):
        problems.append(f"{where}/{key}{name}: initialised {ref_leaves.get(name)}, "
                        f"pretrained {new_leaves.get(name)}")
  if problems:
    raise ValueError("pretrained weights do not fit the VLM:\n  " + "\n  ".join(problems[:20]))
