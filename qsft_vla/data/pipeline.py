"""The input pipeline: RLDS datasets -> shuffled, mixed batches of numpy arrays.

Per dataset (mixture member): open and check it up front (keys, declared
shapes, optionally a full pass for NaN/empty episodes), read episodes with the
images left encoded, compute the episode-level fields on whole episodes
(windows, next observation, terminal/has_next, rescaled reward, return-to-go,
action tokens), and flatten to steps. Then mix members by `data.weights`,
shuffle steps, decode/resize/augment images per step, batch and prefetch.

Images stay PNG/JPEG bytes until after the shuffle, so the shuffle buffer (and
a saved iterator state) holds compressed frames, not pixels.

One training example (a leading batch axis is added by batching):
  observation:        {<camera>: uint8[W, h, w, 3], "state": float32[W, S] (if state_dim)}
  history_mask:       bool[W]; False marks start-of-episode padding (a repeat of frame 0)
  next_observation:   the window ending at t+1 (the last step repeats its own window)
  next_history_mask:  bool[W]
  instruction:        string (raw text; numpy bytes)
  action:             float32[D] (raw); action_tokens: int32[D]
  reward:             float32, rescaled (statistics.rescale_reward_params)
  return_to_go:       float32, discounted with learner.gamma over rescaled rewards
  episode_return:     float32, the episode's undiscounted raw reward sum
  terminal:           bool, last step that reached a terminal state (no bootstrap)
  has_next:           bool, False on every episode's last step (no s')
  episode_index, step_index, dataset_index: int32 (episode = file order in its split)

Bad data fails with DataError naming the dataset dir, episode, step and key:
declared-feature problems when the pipeline is built, NaN/Inf and empty
episodes in the validation pass (or, with validate=False, when the offending
element is read). The pipeline itself writes nothing except an iterator state
that the caller asks for (statistics.load_or_compute caches a dataset's
statistics beside it, as everywhere).
"""

from __future__ import annotations

import json
import os
import re
import uuid
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from qsft_vla import config as qconfig
from qsft_vla.data import rlds_reader
from qsft_vla.data import transforms as tr
from qsft_vla.data.episode import DataError, step_features
from qsft_vla.tokenizers import action_tf
from qsft_vla.robot import RobotSpec

# In-graph checks raise InvalidArgumentError carrying this marked message;
# BatchIterator turns it back into a DataError.
_ERROR_MARK = "QSFT_DATA_ERROR"
_ERROR_RE = re.compile(_ERROR_MARK + r"<<(.*)\|(-?\d*)\|([^|]*)\|([^|]*)>>", re.S)
_ALL_STEPS = 2**31 - 1
ITERATOR_STATE_POINTER = "iterator_state.json"


# --------------------------------------------------------------------------- #
# Up-front checks and per-dataset parameters.


def _data_dirs(cfg) -> tuple[tuple[str, ...], np.ndarray]:
  dirs, weights = qconfig.data_sources(cfg.data)
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
    if name in keys:
      expect(name)
  return encoded


def reward_params(cfg, spec: RobotSpec, data_dir: str,
                  stats: Optional[dict[str, Any]] = None) -> tuple[float, float]:
  """(scale, shift) for one dataset: identity for "none", else from its statistics
  (`stats` when the caller has them, else read from the dataset's cache)."""
  mode = cfg.data.reward_rescale
  if mode == "none":
    return 1.0, 0.0
  from qsft_vla.data import statistics  # pylint: disable=g-import-not-at-top
  if stats is None:
    stats = statistics.load_or_compute(data_dir, spec, split=cfg.data.split)
  scale, shift = statistics.rescale_reward_params(stats, cfg.learner.gamma, mode)
  return float(scale), float(shift)


# --------------------------------------------------------------------------- #
# Episode level.


def _fail(where, key: str, what: str, step=None) -> tf.Tensor:
  step = "" if step is None else tf.strings.as_string(step)
  return tf.strings.join([_ERROR_MARK, "<<", where, "|", step, "|", key, "|", what, ">>"])


def episode_index(tfds_id: tf.Tensor, shard_lengths) -> tf.Tensor:
  """Index of the episode in its split's file order, from the tfds_id
  ("<name>-<split>.<format>-<shard>[-of-<n>]__<record>"); -1 if unparsable.
  The one definition of an episode's index (batches' episode_index and
  episode_metadata's keys): TFDS interleaves shards even when it does not
  shuffle them, so the order episodes are read in is not file order."""
  pattern = r"^.*-(\d+)(?:-of-\d+)?__(\d+)$"
  ok = tf.strings.regex_full_match(tfds_id, pattern)
  shard = tf.strings.to_number(
      tf.where(ok, tf.strings.regex_replace(tfds_id, pattern, r"\1"), "0"), tf.int64)
  record = tf.strings.to_number(
      tf.where(ok, tf.strings.regex_replace(tfds_id, pattern, r"\2"), "-1"), tf.int64)
  offsets = tf.constant(np.concatenate([[0], np.cumsum(shard_lengths)]).astype(np.int64))
  shard = tf.clip_by_value(shard, 0, len(shard_lengths))
  return tf.cast(tf.where(ok, tf.gather(offsets, shard) + record, -1), tf.int32)


def episode_metadata(data_dir: str, split: str = "train") -> dict[int, dict[str, Any]]:
  """{episode_index: that episode's metadata (str, float or bool values)} of a
  split, keyed exactly as the batches' `episode_index`; {} when the dataset has no
  episode metadata (e.g. converted data). Reads the metadata only (steps are not
  decoded): about a second per 1000 episodes."""
  builder = rlds_reader.open_builder(data_dir)
  if "episode_metadata" not in builder.info.features:
    return {}
  name = split.split("[")[0]
  lengths = list(builder.info.splits[name].shard_lengths)
  ds = builder.as_dataset(split=split, shuffle_files=False,
                          read_config=tfds.ReadConfig(add_tfds_id=True, try_autocache=False),
                          decoders={"steps": tfds.decode.SkipDecoding()})
  ds = ds.map(lambda ep: (episode_index(ep["tfds_id"], lengths), ep["episode_metadata"]))
  out = {}
  for index, md in ds.as_numpy_iterator():
    out[int(index)] = {k: v.decode("utf-8") if isinstance(v, bytes) else v.item()
                       for k, v in md.items()}
  return out


def _first_step(bad: tf.Tensor) -> tf.Tensor:
  """First t where bad[t, ...] is True anywhere."""
  flat = tf.reduce_any(tf.reshape(bad, [tf.shape(bad)[0], -1]), axis=1)
  return tf.argmax(tf.cast(flat, tf.int32), output_type=tf.int32)


def _episode_fn(data_dir: str, dataset_index: int, spec: RobotSpec, *, window: int,
                gamma: float, scale: float, shift: float, shard_lengths, encode,
                out_of_bounds, reject: bool):
  """Whole episode -> per-step tensors with a leading T axis (see module docstring)."""
  keys = rlds_reader.canonical_step_keys(spec)

  def fn(ep):
    episode = episode_index(ep["tfds_id"], shard_lengths)
    where = tf.strings.join([f"{data_dir}: episode ", tf.strings.as_string(episode)])
    steps_ds = ep["steps"]
    nonempty = tf.debugging.Assert(steps_ds.cardinality() > 0,
                                   [_fail(where, "steps", "empty episode (0 steps)")])
    with tf.control_dependencies([nonempty]):
      raw = steps_ds.batch(_ALL_STEPS).get_single_element()
    s = rlds_reader.canonicalize_steps(raw, spec, data_dir)
    s["action"] = tf.cast(s["action"], tf.float32)
    if spec.state_dim:
      s["observation"]["state"] = tf.cast(s["observation"]["state"], tf.float32)
    length = tf.shape(s["action"])[0]

    checks = []
    finite = {"action": s["action"], "reward": s["reward"]}
    if spec.state_dim:
      finite["observation/state"] = s["observation"]["state"]
    for name, x in finite.items():
      bad = ~tf.math.is_finite(x)
      checks.append(tf.debugging.Assert(
          ~tf.reduce_any(bad), [_fail(where, keys[name], "non-finite value (NaN or Inf)",
                                      _first_step(bad))]))
    if reject:  # the robot says out-of-bound actions are data bugs, not noise
      bad = out_of_bounds(s["action"])
      checks.append(tf.debugging.Assert(
          ~tf.reduce_any(bad), [_fail(where, keys["action"], "action outside the robot's "
                                      "bounds (out_of_bounds policy 'reject')",
                                      _first_step(bad))]))

    reward = tr.rescale_rewards(s["reward"], scale, shift)
    terminal, _ = tr.episode_end_flags(s["is_terminal"])
    obs = tr.history_windows(s["observation"], window)
    mask = tr.history_mask(length, window)
    if spec.instruction_source == "fixed":
      instruction = tf.fill([length], spec.instruction_text)
    else:
      instruction = s["language_instruction"]
    out = {
        "observation": obs,
        "history_mask": mask,
        "next_observation": tr.next_step(obs),
        "next_history_mask": tr.next_step(mask),
        "instruction": instruction,
        "action": s["action"],
        "action_tokens": encode(s["action"]),
        "reward": reward,
        "return_to_go": tr.returns_to_go(reward, gamma),
        # Undiscounted sum of the raw rewards, as in the statistics (filtered BC).
        "episode_return": tf.fill([length], tf.reduce_sum(tf.cast(s["reward"], tf.float32))),
        "terminal": terminal,
        "has_next": tr.has_next(length),
        "episode_index": tf.fill([length], episode),
        "step_index": tf.range(length, dtype=tf.int32),
        "dataset_index": tf.fill([length], tf.constant(dataset_index, tf.int32)),
    }
    with tf.control_dependencies(checks):
      return tf.nest.map_structure(tf.identity, out)

  return fn


# --------------------------------------------------------------------------- #
# Step level.


def _step_fn(spec: RobotSpec, encoded: dict[str, bool], dirs: tuple[str, ...], *,
             image_size, augment, seed: int, window: int):
  """Decodes, checks, resizes and (optionally) augments the frames of one example."""
  keys = rlds_reader.canonical_step_keys(spec)
  dirs_t = tf.constant(dirs)

  def fn(counter, ex):
    ex = dict(ex)
    obs, nxt = dict(ex["observation"]), dict(ex["next_observation"])
    where = tf.strings.join([tf.gather(dirs_t, ex["dataset_index"]), ": episode ",
                             tf.strings.as_string(ex["episode_index"])])
    base_seed = tf.stack([tf.constant(seed, tf.int64), counter])
    for k, cam in enumerate(spec.cameras):
      frames = tf.concat([obs[cam.name], nxt[cam.name]], axis=0)  # [2W, ...]
      if encoded[cam.name]:
        want = (cam.height, cam.width, 3)
        decoded = []
        for j in range(2 * window):
          img = tf.io.decode_image(frames[j], channels=3, expand_animations=False)
          ok = tf.debugging.Assert(
              tf.reduce_all(tf.shape(img) == want),
              [_fail(where, keys[f"observation/{cam.name}"],
                     f"decoded image shape differs from the robot config {want}",
                     ex["step_index"])])
          with tf.control_dependencies([ok]):
            decoded.append(tf.ensure_shape(img, want))
        frames = tf.stack(decoded)
      size = image_size or (cam.height, cam.width)
      if augment is not None:
        cam_seed = tf.random.experimental.stateless_fold_in(base_seed, k)
        frames = tr.augment_images(frames, cam_seed, crop_scale=augment.crop_scale,
                                   brightness=augment.brightness, contrast=augment.contrast,
                                   size=size)
      else:
        frames = tr.resize_images(frames, size)
      obs[cam.name], nxt[cam.name] = frames[:window], frames[window:]
    ex["observation"], ex["next_observation"] = obs, nxt
    return ex

  return fn


# --------------------------------------------------------------------------- #
# Assembly.


class _Member:
  """One mixture member: its builder, parameters and episode-level dataset."""

  def __init__(self, index: int, data_dir: str, cfg, spec: RobotSpec, tokenizer, stats=None):
    self.index, self.dir = index, data_dir
    self.builder = rlds_reader.open_builder(data_dir)
    self.encoded = check_dataset_features(self.builder, spec, data_dir)
    split = cfg.data.split.split("[")[0]  # "train[:90%]" -> "train"
    if split not in self.builder.info.splits:
      raise DataError(data_dir, f"no split {split!r}; have {sorted(self.builder.info.splits)}",
                      key="data.split")
    self.scale, self.shift = reward_params(cfg, spec, data_dir, stats)
    encode, oob = action_tf.tf_action_encoder(tokenizer.to_spec())
    split_info = self.builder.info.splits[split]
    self.episode_fn = _episode_fn(
        data_dir, index, spec, window=cfg.data.window, gamma=float(cfg.learner.gamma),
        scale=self.scale, shift=self.shift, shard_lengths=list(split_info.shard_lengths),
        encode=encode, out_of_bounds=oob, reject=tokenizer.out_of_bounds == "reject")

  def episodes(self, cfg, spec, *, shuffle_files: bool, seed: int, options) -> tf.data.Dataset:
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
    return self.builder.as_dataset(split=cfg.data.split, shuffle_files=shuffle_files,
                                   decoders={"steps": decoders} if decoders else None,
                                   read_config=read_config)


def _options(deterministic: bool) -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = deterministic
  # Asserts are stateful ops with no state worth saving; checkpoint the iterator anyway.
  options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
  return options


def _members(cfg, spec, tokenizer, stats=None) -> tuple[list[_Member], np.ndarray]:
  dirs, weights = _data_dirs(cfg)
  stats = stats or [None] * len(dirs)
  return [_Member(i, d, cfg, spec, tokenizer, s) for i, (d, s) in enumerate(zip(dirs, stats))], \
      weights


def validate_datasets(cfg, spec: RobotSpec, tokenizer, members=None) -> int:
  """A full pass over every episode's non-image fields (images stay encoded):
  raises DataError on an empty episode, NaN/Inf action, reward or state, or a
  rejected out-of-bound action. Returns the number of steps checked."""
  if members is None:
    members, _ = _members(cfg, spec, tokenizer)
  parallel = _parallel_calls(cfg)
  total = 0
  for m in members:
    ds = m.episodes(cfg, spec, shuffle_files=False, seed=0, options=_options(True))
    # Ordered, so the error reported is the first bad episode in file order.
    ds = ds.map(m.episode_fn, num_parallel_calls=parallel, deterministic=True)
    count = ds.map(lambda ex: tf.shape(ex["reward"], out_type=tf.int64)[0])
    try:
      total += int(count.reduce(np.int64(0), lambda a, b: a + b))
    except tf.errors.InvalidArgumentError as e:
      raise _as_data_error(e) from None
    except tf.errors.DataLossError as e:
      raise rlds_reader.damaged_shard_error(m.dir, e) from None
  return total


def _parallel_calls(cfg) -> int:
  n = cfg.data.num_parallel_calls
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


def make_dataset(cfg, spec: RobotSpec, tokenizer, *, batch_size: int, seed: int,
                 train: bool = True, validate: bool = True,
                 keep_returns: Optional[Sequence[float]] = None,
                 stats: Optional[Sequence[Optional[dict[str, Any]]]] = None) -> tf.data.Dataset:
  """The batched tf.data pipeline (see the module docstring for one example).

  train=True: every member repeats forever with shuffled files, members are
  sampled by data.weights, steps are shuffled in one buffer of
  data.shuffle_buffer, augmentation follows data.augment, partial batches are
  dropped. train=False: one ordered pass (members concatenated), no shuffle,
  no augmentation, last partial batch kept.
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
  """
  members, weights = _members(cfg, spec, tokenizer, stats)
  if any(m.encoded != members[0].encoded for m in members):
    raise DataError(members[0].dir, "mixture members store cameras differently (encoded "
                    "images vs raw tensors); convert them to one layout")
  if validate:
    validate_datasets(cfg, spec, tokenizer, members)
  deterministic = bool(cfg.data.deterministic) or not train
  options = _options(deterministic)
  parallel = _parallel_calls(cfg)

  streams = []
  for m in members:
    member_seed = seed * 1_000_003 + m.index
    ds = m.episodes(cfg, spec, shuffle_files=train, seed=member_seed, options=options)
    if train:
      ds = ds.repeat()
    ds = ds.map(m.episode_fn, num_parallel_calls=parallel, deterministic=deterministic)
    if keep_returns is not None:
      ds = ds.filter(_keep_episode(keep_returns[m.index]))
    streams.append(ds.unbatch())
  if train:
    if len(streams) == 1:
      ds = streams[0]
    else:
      ds = tf.data.Dataset.sample_from_datasets(streams, weights=list(weights), seed=seed)
    ds = ds.shuffle(cfg.data.shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
  else:
    ds = streams[0]
    for s in streams[1:]:
      ds = ds.concatenate(s)

  augment = cfg.data.augment if (train and cfg.data.augment.enabled) else None
  image_size = None if cfg.data.image_size is None else tuple(cfg.data.image_size)
  step_fn = _step_fn(spec, members[0].encoded, tuple(m.dir for m in members),
                     image_size=image_size, augment=augment, seed=seed, window=cfg.data.window)
  ds = ds.enumerate().map(step_fn, num_parallel_calls=parallel, deterministic=deterministic)
  ds = ds.batch(batch_size, drop_remainder=train)
  if cfg.data.prefetch:
    ds = ds.prefetch(tf.data.AUTOTUNE if cfg.data.prefetch < 0 else cfg.data.prefetch)
  return ds.with_options(options)


# --------------------------------------------------------------------------- #
# Numpy batches.


def _as_data_error(e: tf.errors.OpError) -> Exception:
  m = _ERROR_RE.search(e.message or "")
  if m is None:
    return e
  where, step, key, what = m.groups()
  return DataError(where, what, step=int(step) if step else None, key=key)


class BatchIterator:
  """Iterates a pipeline's batches as dicts of numpy arrays (strings as bytes).

  Bad data found while reading raises DataError. The iterator position
  (shuffle buffers and prefetched batches included) can be saved and restored
  with a tf.train.Checkpoint of the underlying tf.data iterator.
  """

  def __init__(self, dataset: tf.data.Dataset, data_dirs: tuple[str, ...] = ()):
    self.dataset = dataset
    self.data_dirs = tuple(data_dirs)   # to name a damaged shard
    self._it = iter(dataset)

  def __iter__(self) -> Iterator[dict[str, Any]]:
    return self

  def __next__(self) -> dict[str, Any]:
    try:
      batch = next(self._it)
    except tf.errors.InvalidArgumentError as e:
      raise _as_data_error(e) from None
    except tf.errors.DataLossError as e:
      raise rlds_reader.damaged_shard_error(self.data_dirs, e) from None
    return tf.nest.map_structure(lambda x: x.numpy(), batch)

  def save_iterator_state(self, path: str) -> None:
    """Writes the position under directory `path`, atomically: the new files
    get a fresh prefix and the pointer file is swapped in (os.replace) only
    after they are complete; a failure leaves the previous state intact."""
    os.makedirs(path, exist_ok=True)
    prefix = f"iterator-{uuid.uuid4().hex}"
    try:
      tf.train.Checkpoint(iterator=self._it).write(os.path.join(path, prefix))
      pointer_tmp = os.path.join(path, f".{ITERATOR_STATE_POINTER}.{prefix}.tmp")
      with open(pointer_tmp, "w") as f:
        json.dump({"prefix": prefix}, f)
      os.replace(pointer_tmp, os.path.join(path, ITERATOR_STATE_POINTER))
    except BaseException:
      _remove_state_files(path, keep=_current_prefix(path))
      raise
    _remove_state_files(path, keep=prefix)

  def restore_iterator_state(self, path: str) -> None:
    """Restores a position saved by `save_iterator_state` into this iterator,
    which must come from an identically configured pipeline."""
    prefix = _current_prefix(path)
    if prefix is None:
      raise FileNotFoundError(f"{path}: no iterator state ({ITERATOR_STATE_POINTER} missing)")
    tf.train.Checkpoint(iterator=self._it).read(os.path.join(path, prefix)).assert_consumed()


def _current_prefix(path: str) -> str | None:
  try:
    with open(os.path.join(path, ITERATOR_STATE_POINTER)) as f:
      return json.load(f)["prefix"]
  except FileNotFoundError:
    return None


def _remove_state_files(path: str, keep: str | None) -> None:
  """Deletes iterator files and temp pointers other than `keep`'s."""
  for name in os.listdir(path):
    stale = name.startswith("iterator-") and (keep is None or not name.startswith(keep + "."))
    if stale or (name.startswith(f".{ITERATOR_STATE_POINTER}.") and name.endswith(".tmp")):
      os.remove(os.path.join(path, name))


def as_numpy_batches(cfg, spec: RobotSpec, tokenizer, *, batch_size: int, seed: int,
                     train: bool = True, validate: bool = True,
                     keep_returns: Optional[Sequence[float]] = None,
                     stats: Optional[Sequence[Optional[dict[str, Any]]]] = None) -> BatchIterator:
  """`make_dataset(...)` wrapped in a BatchIterator."""
  return BatchIterator(make_dataset(cfg, spec, tokenizer, batch_size=batch_size, seed=seed,
                                    train=train, validate=validate, keep_returns=keep_returns,
                                    stats=stats),
                       _data_dirs(cfg)[0])
