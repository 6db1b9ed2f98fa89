"""Pipeline batches (numpy) -> learner batches.

The pipeline yields raw instruction strings; the learner wants token ids. Most
datasets repeat a few instructions, so ids are cached per distinct string and
tokenising costs a dict lookup per example.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

LEARNER_KEYS = ("observation", "history_mask", "next_observation", "next_history_mask",
                "action_tokens", "reward", "terminal", "has_next", "return_to_go")
# Where each row comes from: the learner checks chunked batches on the host with
# them and never sends them to a device.
INDEX_KEYS = ("episode_index", "step_index", "dataset_index")
_CACHE_LIMIT = 100_000  # distinct instructions kept; beyond that the cache restarts


class BatchPreparer:
  """__call__(pipeline batch) -> learner batch (text_ids/text_mask added)."""

  def __init__(self, text_tokenizer, max_text_len: int):
    self.text_tokenizer = text_tokenizer
    self.max_text_len = int(max_text_len)
    self._cache: dict[bytes, tuple[np.ndarray, np.ndarray]] = {}

  def encode(self, instructions) -> tuple[np.ndarray, np.ndarray]:
    texts = [bytes(t) if isinstance(t, (bytes, np.bytes_)) else str(t).encode("utf-8")
             for t in np.asarray(instructions, dtype=object).reshape(-1)]
    missing = sorted({t for t in texts if t not in self._cache})
    if missing:
      if len(self._cache) + len(missing) > _CACHE_LIMIT:
        self._cache.clear()
      ids, mask = self.text_tokenizer.encode_batch(missing, self.max_text_len)
      for t, i, m in zip(missing, ids, mask):
        self._cache[t] = (i, m)
    ids = np.stack([self._cache[t][0] for t in texts])
    mask = np.stack([self._cache[t][1] for t in texts])
    return ids, mask

  def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: batch[k] for k in LEARNER_KEYS}
    out.update({k: batch[k] for k in INDEX_KEYS if k in batch})
    out["text_ids"], out["text_mask"] = self.encode(batch["instruction"])
    return out


def stack(batches: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """[S] batches -> one batch with a leading microbatch axis (learner steps_per_call = S)."""
  first = batches[0]
  out = {}
  for k, v in first.items():
    if isinstance(v, Mapping):
      out[k] = stack([b[k] for b in batches])
    else:
      out[k] = np.stack([np.asarray(b[k]) for b in batches])
  return out
