"""The input pipeline: RLDS datasets -> shuffled, mixed batches of numpy arrays.

Per dataset (mixture member): open and check it up front (keys, declared
shapes, optionally a full pass for NaN/empty episodes), read episodes with the
images left encoded, compute the episode-level fields on whole episodes
(windows, next observation, terminal/has_next, rescaled reward, return-to-go,
action tokens), and flatten to steps. Then mix members by `data.weights`,
shuffle steps, decode/resize/augment images per step, batch and prefetch.

Images stay PNG/JPEG bytes until after the shuffle, so the shuffle buffer (and
a saved iterator state) holds compressed frames, not pixels.

Chunks (chunk_length L > 1, for the learner's chunked batches): each member's
steps, still in episode order, are cut into runs of L consecutive steps before
mixing; the runs are what is mixed and shuffled (a buffer of data.shuffle_buffer
steps holds data.shuffle_buffer // L runs), and a batch is B / L whole runs. A
run may cross from one episode's last step into the next episode, where nothing
bootstraps.

Each training example's layout: data/examples.py.

Bad data fails with DataError naming the dataset dir, episode, step and key:
declared-feature problems when the pipeline is built, NaN/Inf and empty
episodes in the validation pass (or, with validate=False, when the offending
element is read). The pipeline itself writes nothing except an iterator state
that the caller asks for (statistics.load_or_compute caches a dataset's
statistics beside it, as everywhere).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from qsft_vla import config as qconfig
from qsft_vla.data import examples, graph_errors, rlds_reader
# Re-exported: callers read batches and episode numbers through the pipeline.
from qsft_vla.data.batch_iterator import ITERATOR_STATE_POINTER, BatchIterator  # noqa: F401
from qsft_vla.data.episode import DataError, step_features
from qsft_vla.data.examples import episode_index, episode_metadata  # noqa: F401
from qsft_vla.robot import RobotSpec
from qsft_vla.tokenizers import action_tf

# --------------------------------------------------------------------------- #
# Up-front checks and per-dataset parameters.


def _data_dirs(data) -> tuple[tuple[str, ...], np.ndarray]:
  dirs, weights = qconfig.data_sources(data)
  w = np.asarray(weights, float)
  return dirs, w / w.sum()


def check_dataset_features(builder, spec: RobotSpec, where: str) -> dict[str, bool]:
  """Compares the dataset's declared step features with the robot config.

  Returns {camera: stored encoded (Image feature)}; raises DataError naming the
  key on a missing key or a wrong shape/dtype.
  """
  rlds_reader.check_dataset_keys(builder, spec, where)
  keys = rlds_reader.canonical_step_keys(spec)
  want = step_features(spec)

  def expect(name):
    """float32 features may be stored as any float type (cast to float32 when read)."""
    path, (shape, dtype) = keys[name], want[name]
    f = rlds_reader.step_feature(builder, path)
    got_shape, got_dtype = tuple(f.shape), tf.dtypes.as_dtype(f.np_dtype)
    if got_shape != shape:
      raise DataError(where, f"declared shape {got_shape} does not match the robot config "
                      f"{shape}", key=path)
    lenient = dtype is np.float32
    if not got_dtype.is_floating if lenient else got_dtype != tf.dtypes.as_dtype(dtype):
      raise DataError(where, f"declared dtype {got_dtype.name}, expected "
                      f"{'a float type' if lenient else np.dtype(dtype).name}", key=path)
    return f

  encoded = {}
  for cam in spec.cameras:
    f = expect(f"observation/{cam.name}")
    encoded[cam.name] = isinstance(f, tfds.features.Image)
  for name in ("observation/state", "action", "reward"):  # what the pipeline reads
    if name in keys and (name != "action" or rlds_reader.action_is_one_vector(spec)):
      expect(name)  # an action of several parts: rlds_reader.check_action_features
  return encoded


def reward_params(data, spec: RobotSpec, data_dir: str, gamma: float,
                  stats: Optional[dict[str, Any]] = None) -> tuple[float, float]:
  """(scale, shift) for one dataset: identity for "none", else from its statistics
  (`stats` when the caller has them, else read from the dataset's cache)."""
  mode = data.reward_rescale
  if mode == "none":
    return 1.0, 0.0
  from qsft_vla.data import statistics  # pylint: disable=g-import-not-at-top
  if stats is None:
    stats = statistics.load_or_compute(data_dir, spec, split=data.split)
  scale, shift = statistics.rescale_reward_params(stats, gamma, mode)
  return float(scale), float(shift)


# --------------------------------------------------------------------------- #
# Assembly.


class _Member:
  """One mixture member: its builder, parameters and episode-level dataset."""

  def __init__(self, index: int, data_dir: str, data, spec: RobotSpec, tokenizer, gamma: float,
               stats=None):
    self.index, self.dir = index, data_dir
    self.builder = rlds_reader.open_builder(data_dir)
    self.encoded = check_dataset_features(self.builder, spec, data_dir)
    split = data.split.split("[")[0]  # "train[:90%]" -> "train"
    if split not in self.builder.info.splits:
      raise DataError(data_dir, f"no split {split!r}; have {sorted(self.builder.info.splits)}",
                      key="data.split")
    self.scale, self.shift = reward_params(data, spec, data_dir, gamma, stats)
    encode, oob = action_tf.tf_action_encoder(tokenizer.to_spec())
    split_info = self.builder.info.splits[split]
    self.episode_fn = examples.episode_fn(
        data_dir, index, spec, window=data.window, gamma=float(gamma),
        scale=self.scale, shift=self.shift, shard_lengths=list(split_info.shard_lengths),
        encode=encode, out_of_bounds=oob, reject=tokenizer.out_of_bounds == "reject")

  def episodes(self, data, spec, *, shuffle_files: bool, seed: int, options) -> tf.data.Dataset:
    decoders = {}
    keys = rlds_reader.canonical_step_keys(spec)
    for cam, enc in self.encoded.items():
      if enc:  # keep the PNG/JPEG bytes; decoded per step after the shuffle
        node = decoders
        parts = keys[f"observation/{cam}"].split("/")
        for part in parts[:-1]:
          node = node.setdefault(part, {})
        node[parts[-1]] = tfds.decode.SkipDecoding()
    read_config = tfds.ReadConfig(add_tfds_id=True, shuffle_seed=seed, try_autocache=False,
                                  options=options)
    return self.builder.as_dataset(split=data.split, shuffle_files=shuffle_files,
                                   decoders={"steps": decoders} if decoders else None,
                                   read_config=read_config)


def _options(deterministic: bool) -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = deterministic
  # Asserts are stateful ops with no state worth saving; checkpoint the iterator anyway.
  options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
  return options


def _members(data, spec, tokenizer, gamma: float, stats=None) -> tuple[list[_Member], np.ndarray]:
  dirs, weights = _data_dirs(data)
  stats = stats or [None] * len(dirs)
  members = [_Member(i, d, data, spec, tokenizer, gamma, s)
             for i, (d, s) in enumerate(zip(dirs, stats))]
  return members, weights


def validate_datasets(data, spec: RobotSpec, tokenizer, gamma: float, members=None) -> int:
  """A full pass over every episode's non-image fields (images stay encoded):
  raises DataError on an empty episode, NaN/Inf action, reward or state, or a
  rejected out-of-bound action. Returns the number of steps checked."""
  if members is None:
    members, _ = _members(data, spec, tokenizer, gamma)
  parallel = _parallel_calls(data)
  total = 0
  for m in members:
    ds = m.episodes(data, spec, shuffle_files=False, seed=0, options=_options(True))
    # Ordered, so the error reported is the first bad episode in file order.
    ds = ds.map(m.episode_fn, num_parallel_calls=parallel, deterministic=True)
    count = ds.map(lambda ex: tf.shape(ex["reward"], out_type=tf.int64)[0])
    try:
      total += int(count.reduce(np.int64(0), lambda a, b: a + b))
    except tf.errors.InvalidArgumentError as e:
      raise graph_errors.as_data_error(e) from None
    except tf.errors.DataLossError as e:
      raise rlds_reader.damaged_shard_error(m.dir, e) from None
  return total


def _parallel_calls(data) -> int:
  n = data.num_parallel_calls
  return tf.data.AUTOTUNE if n in (-1, None) else int(n)


def _keep_episode(threshold: float):
  """Predicate on an episode's examples: its return >= threshold. The float32 return
  the pipeline sums may round below the statistics' float64 one: a tolerance of
  1e-6 of the threshold keeps that episode (the learner's own mask then decides
  exactly). Relative only, and compared in float64: the threshold just above a
  lowest return of 0 is the smallest float32 above 0, a denormal that float32
  kernels flush to 0 (and an absolute tolerance would keep the zeros too)."""
  t = float(np.float32(threshold))
  t = tf.constant(t - 1e-6 * abs(t), tf.float64)
  return lambda ex: tf.cast(ex["episode_return"][0], tf.float64) >= t


def make_dataset(data, spec: RobotSpec, tokenizer, *, gamma: float, batch_size: Optional[int],
                 seed: int,
                 train: bool = True, validate: bool = True,
                 keep_returns: Optional[Sequence[float]] = None,
                 stats: Optional[Sequence[Optional[dict[str, Any]]]] = None,
                 chunk_length: int = 1) -> tf.data.Dataset:
  """The batched tf.data pipeline (see the module docstring for one example).

  data: the config's data section (dirs, weights, split, window, shuffle,
  images, augmentation); gamma: the learner's discount, for the return-to-go
  and the reward rescaling. The pipeline reads nothing else of the config.
  train=True: every member repeats forever with shuffled files, members are
  sampled by data.weights, steps are shuffled in one buffer of
  data.shuffle_buffer, augmentation follows data.augment, partial batches are
  dropped. train=False: one ordered pass (members concatenated), no shuffle,
  no augmentation, last partial batch kept. batch_size=None: unbatched examples,
  without prefetch.
  Deterministic (data.deterministic or train=False): ordered maps and seeded
  shuffles, so the same config and seed give identical batches.
  validate: run `validate_datasets` first (a full read of the non-image data),
  so bad data fails before training rather than hours into it.
  keep_returns: per mixture member, keep only episodes whose return is at least
  this (filtered BC), before shuffling and batching, so every batch is full of
  kept steps. Each threshold must be met by some episode (statistics.
  filter_threshold never exceeds the largest return), or a repeating member
  would search forever.
  stats: per member, the statistics of data.split the caller already has (the
  training binary reads them once); None reads them from each dataset's cache.
  chunk_length: with train=True, every chunk_length examples in a row are
  consecutive steps of one member (the module docstring); batch_size must be a
  multiple of it.
  """
  chunk = int(chunk_length)
  if chunk > 1 and not train:
    raise ValueError("chunk_length > 1 is for training batches (train=True)")
  if chunk > 1 and (batch_size is None or batch_size % chunk):
    raise ValueError(f"batch size {batch_size} is not a multiple of chunk_length={chunk}")
  members, weights = _members(data, spec, tokenizer, gamma, stats)
  if any(m.encoded != members[0].encoded for m in members):
    raise DataError(members[0].dir, "mixture members store cameras differently (encoded "
                    "images vs raw tensors); convert them to one layout")
  if validate:
    validate_datasets(data, spec, tokenizer, gamma, members)
  deterministic = bool(data.deterministic) or not train
  options = _options(deterministic)
  parallel = _parallel_calls(data)

  streams = []
  for m in members:
    member_seed = seed * 1_000_003 + m.index
    ds = m.episodes(data, spec, shuffle_files=train, seed=member_seed, options=options)
    if train:
      ds = ds.repeat()
    ds = ds.map(m.episode_fn, num_parallel_calls=parallel, deterministic=deterministic)
    if keep_returns is not None:
      ds = ds.filter(_keep_episode(keep_returns[m.index]))
    ds = ds.unbatch()
    streams.append(ds.batch(chunk, drop_remainder=True) if chunk > 1 else ds)
  if train:
    if len(streams) == 1:
      ds = streams[0]
    else:
      ds = tf.data.Dataset.sample_from_datasets(streams, weights=list(weights), seed=seed)
    ds = ds.shuffle(max(1, data.shuffle_buffer // chunk), seed=seed,
                    reshuffle_each_iteration=True)
    if chunk > 1:
      ds = ds.unbatch()
  else:
    ds = streams[0]
    for s in streams[1:]:
      ds = ds.concatenate(s)

  augment = data.augment if (train and data.augment.enabled) else None
  image_size = None if data.image_size is None else tuple(data.image_size)
  step_fn = examples.step_fn(spec, members[0].encoded, tuple(m.dir for m in members),
                             image_size=image_size, augment=augment, seed=seed,
                             window=data.window)
  # Chunks need the runs' order kept through the parallel map.
  ds = ds.enumerate().map(step_fn, num_parallel_calls=parallel,
                          deterministic=deterministic or chunk > 1)
  if batch_size is None:  # the examples themselves (replay mixes them with its samples)
    return ds.with_options(options)
  ds = ds.batch(batch_size, drop_remainder=train)
  if data.prefetch:
    ds = ds.prefetch(tf.data.AUTOTUNE if data.prefetch < 0 else data.prefetch)
  return ds.with_options(options)


def as_numpy_batches(data, spec: RobotSpec, tokenizer, *, gamma: float, batch_size: int,
                     seed: int,
                     train: bool = True, validate: bool = True,
                     keep_returns: Optional[Sequence[float]] = None,
                     stats: Optional[Sequence[Optional[dict[str, Any]]]] = None,
                     chunk_length: int = 1) -> BatchIterator:
  """`make_dataset(...)` wrapped in a BatchIterator."""
  return BatchIterator(make_dataset(data, spec, tokenizer, gamma=gamma, batch_size=batch_size,
                                    seed=seed,
                                    train=train, validate=validate, keep_returns=keep_returns,
                                    stats=stats, chunk_length=chunk_length),
                       _data_dirs(data)[0])
