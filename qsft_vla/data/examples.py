"""Episodes -> training examples: the episode- and step-level tf.data functions.

The episode function works on a whole episode (windows, next observation,
terminal/has_next, rescaled reward, return-to-go, action tokens, in-graph
checks) and yields its steps; the step function decodes, checks, resizes and
augments the frames of one example after the shuffle. episode_index and
episode_metadata define how an episode is numbered.

One training example (example_spec defines it; a leading batch axis is added by batching):
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
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from qsft_vla.data import rlds_reader
from qsft_vla.data import transforms as tr
from qsft_vla.data.graph_errors import fail
from qsft_vla.robot import RobotSpec

_ALL_STEPS = 2**31 - 1

def example_spec(spec: RobotSpec, *, window: int, image_size=None) -> dict[str, Any]:
  """tf.TensorSpecs of one training example (the layout above): what the pipeline
  yields before batching, and what a replay table stores (qsft_vla/replay)."""
  def frames(cam):
    h, w = tuple(image_size) if image_size is not None else (cam.height, cam.width)
    return tf.TensorSpec([window, h, w, 3], tf.uint8)

  obs = {cam.name: frames(cam) for cam in spec.cameras}
  if spec.state_dim:
    obs["state"] = tf.TensorSpec([window, spec.state_dim], tf.float32)
  scalar = lambda dtype: tf.TensorSpec([], dtype)
  d = spec.action_dim
  return {
      "observation": obs, "history_mask": tf.TensorSpec([window], tf.bool),
      "next_observation": dict(obs), "next_history_mask": tf.TensorSpec([window], tf.bool),
      "instruction": scalar(tf.string),
      "action": tf.TensorSpec([d], tf.float32), "action_tokens": tf.TensorSpec([d], tf.int32),
      "reward": scalar(tf.float32), "return_to_go": scalar(tf.float32),
      "episode_return": scalar(tf.float32), "terminal": scalar(tf.bool),
      "has_next": scalar(tf.bool), "episode_index": scalar(tf.int32),
      "step_index": scalar(tf.int32), "dataset_index": scalar(tf.int32),
  }


# --------------------------------------------------------------------------- #
# Episode level.


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


def episode_fn(data_dir: str, dataset_index: int, spec: RobotSpec, *, window: int,
                gamma: float, scale: float, shift: float, shard_lengths, encode,
                out_of_bounds, reject: bool):
  """Whole episode -> per-step tensors with a leading T axis (see module docstring)."""
  keys = rlds_reader.canonical_step_keys(spec)

  def fn(ep):
    episode = episode_index(ep["tfds_id"], shard_lengths)
    where = tf.strings.join([f"{data_dir}: episode ", tf.strings.as_string(episode)])
    steps_ds = ep["steps"]
    nonempty = tf.debugging.Assert(steps_ds.cardinality() > 0,
                                   [fail(where, "steps", "empty episode (0 steps)")])
    with tf.control_dependencies([nonempty]):
      raw = steps_ds.batch(_ALL_STEPS).get_single_element()
    s = rlds_reader.canonicalize_steps(raw, spec, data_dir, batched=True)
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
          ~tf.reduce_any(bad), [fail(where, keys[name], "non-finite value (NaN or Inf)",
                                      _first_step(bad))]))
    if reject:  # the robot says out-of-bound actions are data bugs, not noise
      bad = out_of_bounds(s["action"])
      checks.append(tf.debugging.Assert(
          ~tf.reduce_any(bad), [fail(where, keys["action"], "action outside the robot's "
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


def step_fn(spec: RobotSpec, encoded: dict[str, bool], dirs: tuple[str, ...], *,
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
              [fail(where, keys[f"observation/{cam.name}"],
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
