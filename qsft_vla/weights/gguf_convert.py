"""GGUF (llama.cpp) -> HF-style Llama folder, so our Flax Llama has one loader (hf.py).

Our only packaged language model, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF
(DESIGN.md, "No downloads at run time"). Rather than teach the model code a
second format, we convert it once to what a hub checkpoint looks like:
config.json + model.safetensors (float32) + tokenizer.json, cached outside the
repo and keyed on the GGUF's sha256 and CONVERTER_VERSION.

What the conversion has to undo or rebuild:
  * Quantization: `gguf.quants.dequantize` gives float32 numpy. GGUF lists
    shapes in ggml order (ne, fastest axis first); the numpy arrays are the
    reverse, which is already HF's [out, in].
  * llama.cpp's convert_hf_to_gguf.py permutes the rows of q and k per head
    (interleaved rotary pairs instead of HF's rotate-half halves); we apply the
    inverse, with n_head for q and n_head_kv for k (grouped-query attention).
  * Names: blk.N.attn_q -> model.layers.N.self_attn.q_proj, etc. No output.weight
    means the LM head is tied to the embedding (tie_word_embeddings).
  * The tokenizer: GGUF keeps tokens, merges, token types and the name of the
    pre-tokenizer ("tokenizer.ggml.pre"), not a tokenizer.json. We rebuild a
    byte-level BPE with the `tokenizers` library. "smollm" splits every digit
    on its own before the GPT-2 regex (llama.cpp: "\\p{N}" then the GPT-2 regex;
    the original SmolLM2 tokenizer.json: Digits(individual_digits) + ByteLevel).
    transformers' own GGUF tokenizer ignores "pre" and so merges multi-digit
    numbers; we follow the model's real tokenizer instead.

  folder = gguf_convert.smollm2_folder()      # converted once, then reused
  ckpt = hf.load_folder(folder)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from typing import Any, Optional

import numpy as np

from qsft_vla.weights import hf, packaged

# Bump when the output changes (names, config fields, tokenizer): old caches are then ignored.
CONVERTER_VERSION = 2

# llama.cpp tensor name (inside blk.N.) -> HF name (inside model.layers.N.)
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
                 "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_BLOCK = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")

# tokenizer.ggml.pre -> whether digits are split one by one before the GPT-2 regex
# (llama.cpp llama-vocab.cpp). Other pre-tokenizers use other regexes: refuse them.
_PRE_DIGITS = {"smollm": True, "starcoder": True, "refact": True, "command-r": True,
               "codeshell": True, "exaone": True, "minerva": True,
               "default": False, "gpt-2": False, "gpt2": False, "mpt": False, "olmo": False,
               "jais": False}
_CONTROL, _USER_DEFINED = 3, 4  # gguf TokenType


class GGUFConversionError(ValueError):
  """The GGUF file is not a llama-architecture model this converter understands."""


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp's permutation of q/k rows (convert_hf_to_gguf.py LlamaModel.permute)."""
  return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
  """Inverse of permute_qk: back to HF's rotate-half row order within each head."""
  return (w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def _field(reader, key: str, default: Any = KeyError) -> Any:
  f = reader.fields.get(key)
  if f is None:
    if default is KeyError:
      raise GGUFConversionError(f"GGUF metadata has no {key!r}")
    return default
  return f.contents()


def _config(reader, path: str, tied: bool, has_bias: bool) -> dict:
  arch = _field(reader, "general.architecture")
  if arch != "llama":
    raise GGUFConversionError(f"{path}: architecture {arch!r}; only 'llama' is supported")
  g = lambda k, d=KeyError: _field(reader, f"llama.{k}", d)  # noqa: E731
  hidden, n_head = int(g("embedding_length")), int(g("attention.head_count"))
  n_kv = int(g("attention.head_count_kv", n_head))
  head_dim = int(g("attention.key_length", hidden // n_head))
  tokens = _field(reader, "tokenizer.ggml.tokens", None)
  vocab = int(g("vocab_size", len(tokens) if tokens is not None else 0))
  if not vocab:
    raise GGUFConversionError(f"{path}: no llama.vocab_size and no tokenizer.ggml.tokens")
  if g("rope.scaling.type", None) not in (None, "none"):
    raise GGUFConversionError(f"{path}: rope scaling {g('rope.scaling.type')!r} is not supported")
  tok = lambda k: _field(reader, f"tokenizer.ggml.{k}", None)  # noqa: E731
  cfg = {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "vocab_size": vocab, "hidden_size": hidden,
      "intermediate_size": int(g("feed_forward_length")),
      "num_hidden_layers": int(g("block_count")),
      "num_attention_heads": n_head, "num_key_value_heads": n_kv, "head_dim": head_dim,
      # GGUF stores float32: 9.9999997e-06; its shortest repr gives back the 1e-05 of the HF config
      "rms_norm_eps": float(str(np.float32(g("attention.layer_norm_rms_epsilon")))),
      "rope_theta": float(g("rope.freq_base", 10000.0)),
      "rope_scaling": None,
      "max_position_embeddings": int(g("context_length")),
      "tie_word_embeddings": tied, "hidden_act": "silu",
      "attention_bias": has_bias, "mlp_bias": False,
      "bos_token_id": tok("bos_token_id"), "eos_token_id": tok("eos_token_id"),
      "pad_token_id": tok("padding_token_id"),
      "torch_dtype": "float32",
  }
  if int(g("rope.dimension_count", head_dim)) != head_dim:
    raise GGUFConversionError(f"{path}: partial rotary (rope.dimension_count "
                              f"{g('rope.dimension_count')} != head_dim {head_dim}) is not supported")
  return cfg


def _hf_name(name: str) -> str:
  if name in _GLOBAL_NAMES:
    return _GLOBAL_NAMES[name]
  m = _BLOCK.match(name)
  if m and m.group(2) in _LAYER_NAMES:
    return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
  raise GGUFConversionError(f"GGUF tensor {name!r} has no HF Llama equivalent "
                            f"(unsupported llama variant?)")


def _dequantize(t, path: str) -> np.ndarray:
  from gguf import quants
  try:
    arr = quants.dequantize(np.asarray(t.data), t.tensor_type)  # plain ndarray: memmap slicing is slow
  except NotImplementedError as e:
    raise GGUFConversionError(f"{path}: tensor {t.name!r} has quantization "
                              f"{t.tensor_type.name}, which gguf cannot dequantize") from e
  shape = tuple(int(d) for d in reversed(t.shape))  # ggml ne order -> numpy order
  return np.array(arr, dtype=np.float32).reshape(shape)  # own copy, off the memmap


def tokenizer_json(reader, path: str = "<gguf>") -> tuple[str, dict]:
  """tokenizer.json text rebuilt from GGUF tokenizer metadata, and the special tokens by role."""
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
  model = _field(reader, "tokenizer.ggml.model")
  if model != "gpt2":
    raise GGUFConversionError(f"{path}: tokenizer.ggml.model {model!r}; only byte-level BPE "
                              f"('gpt2') is supported")
  pre = _field(reader, "tokenizer.ggml.pre", "default")
  if pre not in _PRE_DIGITS:
    raise GGUFConversionError(f"{path}: tokenizer.ggml.pre {pre!r} is not supported "
                              f"(known: {', '.join(sorted(_PRE_DIGITS))})")
  tokens = list(_field(reader, "tokenizer.ggml.tokens"))
  merges = [tuple(m.split(" ")) for m in _field(reader, "tokenizer.ggml.merges")]
  bad = [m for m in merges if len(m) != 2]
  if bad:
    raise GGUFConversionError(f"{path}: malformed BPE merges, e.g. {bad[0]!r}")
  types = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
  vocab = {t: i for i, t in enumerate(tokens)}
  if len(vocab) != len(tokens):
    raise GGUFConversionError(f"{path}: duplicate tokens in tokenizer.ggml.tokens")

  tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                            end_of_word_suffix="", fuse_unk=False))
  add_prefix = bool(_field(reader, "tokenizer.ggml.add_space_prefix", False))
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix, trim_offsets=True,
                                        use_regex=True)
  tk.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                               byte_level]) if _PRE_DIGITS[pre] else byte_level)
  tk.decoder = decoders.ByteLevel()
  roles = {}
  for role, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                    ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
    i = _field(reader, f"tokenizer.ggml.{key}", None)
    if i is not None and 0 <= int(i) < len(tokens):
      roles[role] = tokens[int(i)]
  if _field(reader, "tokenizer.ggml.add_bos_token", False) and "bos_token" in roles:
    bos = roles["bos_token"]
    tk.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 $B:1", special_tokens=[(bos, vocab[bos])])
  else:
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
  # Control tokens (<|im_start|>, ...) must match whole and never be split by BPE.
  special = [AddedToken(tokens[i], special=True, normalized=False)
             for i, ty in enumerate(types) if ty == _CONTROL]
  user = [AddedToken(tokens[i], special=False, normalized=False)
          for i, ty in enumerate(types) if ty == _USER_DEFINED]
  tk.add_special_tokens(special)
  tk.add_tokens(user)
  for t in special + user:  # adding must not have created new ids
    if tk.token_to_id(t.content) != vocab[t.content]:
      raise GGUFConversionError(f"{path}: special token {t.content!r} changed id")
  return tk.to_str(), roles


def convert_gguf(gguf_path: str, out_dir: str) -> str:
  """Converts a llama-architecture GGUF to an HF folder at `out_dir` (atomic); returns its path.

  Writes config.json, model.safetensors (float32), tokenizer.json and tokenizer_config.json.
  """
  import gguf
  gguf_path = os.path.abspath(gguf_path)
  try:
    reader = gguf.GGUFReader(gguf_path)
  except (OSError, ValueError) as e:
    raise GGUFConversionError(f"{gguf_path}: cannot read as GGUF: {e}") from e
  tensors: dict[str, np.ndarray] = {}
  for t in reader.tensors:
    name = _hf_name(t.name)
    if name in tensors:
      raise GGUFConversionError(f"{gguf_path}: tensor {t.name!r} appears twice")
    tensors[name] = _dequantize(t, gguf_path)
  tied = "lm_head.weight" not in tensors
  cfg = _config(reader, gguf_path, tied, any(k.endswith("_proj.bias") for k in tensors))
  n_head, n_kv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
  for i in range(cfg["num_hidden_layers"]):
    for proj, heads in (("q_proj", n_head), ("k_proj", n_kv)):
      for kind in ("weight", "bias"):
        name = f"model.layers.{i}.self_attn.{proj}.{kind}"
        if name in tensors:
          if tensors[name].shape[0] != heads * hd:
            raise GGUFConversionError(f"{gguf_path}: {name} has {tensors[name].shape[0]} rows, "
                                      f"expected {heads} heads x {hd}")
          tensors[name] = unpermute_qk(tensors[name], heads)
        elif kind == "weight":
          raise GGUFConversionError(f"{gguf_path}: no tensor for {name}")
  emb = tensors.get("model.embed_tokens.weight")
  if emb is None or emb.shape != (cfg["vocab_size"], cfg["hidden_size"]):
    raise GGUFConversionError(f"{gguf_path}: token_embd.weight has shape "
                              f"{None if emb is None else emb.shape}, expected "
                              f"({cfg['vocab_size']}, {cfg['hidden_size']})")
  tok_json, roles = tokenizer_json(reader, gguf_path)
  tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
             "model_max_length": cfg["max_position_embeddings"],
             "model_input_names": ["input_ids", "attention_mask"],  # no token_type_ids for a causal LM
             "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)), **roles}
  template = _field(reader, "tokenizer.chat_template", None)
  if template:
    tok_cfg["chat_template"] = template

  # Stage beside out_dir, add tokenizer_config.json, then one rename: readers see all or nothing.
  out_dir = os.path.abspath(out_dir)
  os.makedirs(os.path.dirname(out_dir), exist_ok=True)
  stage = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.stage-", dir=os.path.dirname(out_dir))
  try:
    folder = hf.save_folder(os.path.join(stage, "f"), cfg, tensors, tokenizer_json=tok_json)
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
      json.dump(tok_cfg, f, indent=2)
    if os.path.isdir(out_dir):
      os.rename(out_dir, os.path.join(stage, "old"))
    os.rename(folder, out_dir)
  finally:
    shutil.rmtree(stage, ignore_errors=True)
  return out_dir


def _complete(folder: str) -> bool:
  return all(os.path.isfile(os.path.join(folder, f))
             for f in (hf.CONFIG, hf.SINGLE, hf.TOKENIZER, "tokenizer_config.json"))


def smollm2_folder(cache: Optional[str] = None) -> str:
  """The packaged SmolLM2-135M-Instruct as an HF folder: converted on first use, then cached.

  The cache key is the GGUF's sha256 (verified by packaged.locate) and CONVERTER_VERSION,
  under packaged.cache_dir() unless `cache` names another root.
  """
  gguf_path = packaged.locate("smollm2_gguf")
  sha = packaged.ARTIFACTS["smollm2_gguf"].sha256
  key = f"{sha[:16]}-v{CONVERTER_VERSION}"
  folder = (os.path.join(cache, "smollm2", key) if cache
            else packaged.cache_dir("smollm2", key))
  if _complete(folder):
    return folder
  try:
    return convert_gguf(gguf_path, folder)
  except OSError:
    if _complete(folder):  # another process finished the same conversion first
      return folder
    raise
