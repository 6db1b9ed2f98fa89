"""Small pure TensorFlow transforms used by the input pipeline.

Episode-level functions take a whole episode's steps as tensors with a leading
time axis T (step t = (o_t, a_t, r_t), episode.py) and return per-step tensors;
step-level functions act on the frames of one training example. All of them are
graph-safe (usable inside tf.data maps) and deterministic given their seed.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import tensorflow as tf

# --------------------------------------------------------------------------- #
# Episode level.


def has_next(length) -> tf.Tensor:
  """bool[T]: step t has a next step t+1 in the episode (False on the last step)."""
  return tf.range(length) < length - 1


def next_step(x: Any) -> Any:
  """x[t+1] for every t (any nest of [T, ...] tensors); the last step keeps x[T-1].

  The last step has no successor; repeating it keeps shapes static and is
  masked by `has_next` (the bootstrap term of that step is dropped).
  """
  return tf.nest.map_structure(lambda v: tf.concat([v[1:], v[-1:]], axis=0), x)


def episode_end_flags(is_terminal: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """(terminal, truncated_end), both bool[T], from the dataset's is_terminal.

  terminal: the last step, which ended in a terminal state (no bootstrap,
  Q-target = r). truncated_end: the last step of an episode cut by a time limit
  (not terminal, but also no s' to bootstrap from). is_terminal on an earlier
  step is ignored here; the episode checks reject it at conversion.
  """
  length = tf.shape(is_terminal)[0]
  last = tf.range(length) == length - 1
  terminal = last & tf.cast(is_terminal, tf.bool)
  return terminal, last & ~terminal


# Returns-to-go are summed in blocks of this many steps (see returns_to_go).
_RETURN_BLOCK = 128


def returns_to_go(rewards: tf.Tensor, gamma: float) -> tf.Tensor:
  """float32[T]: G_t = r_t + gamma * G_{t+1}, with G = 0 after the last step.

  Vectorised instead of a sequential scan (a tf.scan costs more per step than
  the rest of the episode transforms together): discounted sums inside blocks
  of 128 steps with a fixed discount matrix, then across block starts with a
  (T/128)^2 one. Only powers gamma^k with k >= 0 appear, so long episodes
  cannot overflow (no gamma^-t trick).
  """
  r = tf.cast(rewards, tf.float32)
  b = _RETURN_BLOCK
  length = tf.shape(r)[0]
  n = (length + b - 1) // b
  blocks = tf.reshape(tf.pad(r, [[0, n * b - length]]), [n, b])
  k = np.arange(b)
  lag = k[None, :] - k[:, None]  # [i, j] = j - i
  within = np.where(lag >= 0, float(gamma) ** np.maximum(lag, 0), 0.0).astype(np.float32)
  local = tf.matmul(blocks, within, transpose_b=True)  # [block, i]: sum_j gamma^(j-i) r_j
  c = tf.range(n)
  block_lag = tf.cast(c[None, :] - c[:, None], tf.float64)
  across = tf.where(block_lag >= 0,
                    tf.pow(tf.constant(float(gamma), tf.float64), tf.maximum(block_lag, 0.0) * b),
                    0.0)
  starts = tf.linalg.matvec(tf.cast(across, tf.float32), local[:, 0])  # G at block starts
  after = tf.concat([starts[1:], tf.zeros([1])], axis=0)  # G at the next block's start
  tail = (float(gamma) ** (b - k)).astype(np.float32)  # gamma^(B - i)
  return tf.reshape(local + tail[None, :] * after[:, None], [-1])[:length]


def rescale_rewards(rewards: tf.Tensor, scale: float, shift: float) -> tf.Tensor:
  """r' = r * scale + shift (float32), parameters from statistics.rescale_reward_params."""
  return tf.cast(rewards, tf.float32) * tf.constant(scale, tf.float32) + tf.constant(
      shift, tf.float32)


def history_indices(length, window: int) -> tf.Tensor:
  """int32[T, W]: frame indices t-W+1..t of each step's window, clamped at 0."""
  t = tf.range(length)[:, None]
  offsets = tf.range(window)[None, :] - (window - 1)
  return tf.maximum(t + offsets, 0)


def history_mask(length, window: int) -> tf.Tensor:
  """bool[T, W]: True where the window entry is a real frame, not start padding."""
  t = tf.range(length)[:, None]
  offsets = tf.range(window)[None, :] - (window - 1)
  return t + offsets >= 0


def history_windows(x: Any, window: int) -> Any:
  """[T, ...] -> [T, W, ...] (any nest): frames t-W+1..t; the episode start is
  padded by repeating the first frame (see `history_mask`)."""
  flat = tf.nest.flatten(x)
  idx = history_indices(tf.shape(flat[0])[0], window)
  return tf.nest.map_structure(lambda v: tf.gather(v, idx), x)


# --------------------------------------------------------------------------- #
# Step level: images [N, H, W, 3] uint8, N = all frames of one example.


def _to_uint8(x: tf.Tensor) -> tf.Tensor:
  return tf.cast(tf.clip_by_value(tf.round(x), 0.0, 255.0), tf.uint8)


def resize_images(images: tf.Tensor, size: Sequence[int] | None) -> tf.Tensor:
  """uint8[..., H, W, 3] -> uint8[..., h, w, 3] (bilinear, antialiased).

  Identity when `size` is None or already the image size, so stored-size data
  stays bit-exact.
  """
  if size is None:
    return images
  h, w = int(size[0]), int(size[1])
  if images.shape[-3] == h and images.shape[-2] == w:
    return images
  out = tf.image.resize(tf.cast(images, tf.float32), (h, w), method="bilinear", antialias=True)
  return _to_uint8(out)


def augment_images(images: tf.Tensor, seed: tf.Tensor, *, crop_scale: float,
                   brightness: float, contrast: float,
                   size: Sequence[int] | None = None) -> tf.Tensor:
  """Random crop (then resize), brightness and contrast jitter; uint8 in and out.

  One draw per call, applied to every frame in `images` [N, H, W, 3]: the
  frames of a history window and its next observation must stay consistent,
  or the model would see camera motion that never happened.

  Args:
    images: uint8[N, H, W, 3].
    seed: int32/int64[2], a stateless seed (same seed -> same output).
    crop_scale: the crop keeps this fraction of each side (>= 1: no crop).
    brightness: delta drawn from U[-brightness, brightness], in [0, 1] pixel units.
    contrast: factor drawn from U[1 - contrast, 1 + contrast] (per-channel mean kept).
    size: output (h, w); None = the input size.
  """
  seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=4)
  h, w = images.shape[-3], images.shape[-2]
  out_size = (h, w) if size is None else (int(size[0]), int(size[1]))
  x = tf.cast(images, tf.float32)
  if crop_scale < 1.0:
    ch, cw = max(1, round(h * crop_scale)), max(1, round(w * crop_scale))
    top = tf.random.stateless_uniform((), seeds[0], 0, h - ch + 1, dtype=tf.int32)
    left = tf.random.stateless_uniform((), seeds[1], 0, w - cw + 1, dtype=tf.int32)
    x = x[:, top:top + ch, left:left + cw, :]
    x = tf.image.resize(x, out_size, method="bilinear", antialias=True)
  elif out_size != (h, w):
    x = tf.image.resize(x, out_size, method="bilinear", antialias=True)
  if brightness > 0:
    delta = tf.random.stateless_uniform((), seeds[2], -brightness, brightness)
    x = x + 255.0 * delta
  if contrast > 0:
    factor = tf.random.stateless_uniform((), seeds[3], 1.0 - contrast, 1.0 + contrast)
    mean = tf.reduce_mean(x, axis=(-3, -2), keepdims=True)
    x = (x - mean) * factor + mean
  return _to_uint8(x)
