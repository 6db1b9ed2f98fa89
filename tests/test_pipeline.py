"""qsft_vla.data.pipeline on hand-built RLDS datasets with known values."""

import contextlib
import dataclasses
import os
from unittest import mock

import numpy as np
import pytest
import tensorflow as tf

from qsft_vla import config as qconfig
from qsft_vla.data import pipeline, rlds_reader, rlds_writer
from qsft_vla.data.episode import DataError
from qsft_vla.robot import Camera
from qsft_vla.tokenizers import action_tf
from qsft_vla.tokenizers.action import ActionTokenizer

from conftest import REPO, robot_spec

SPEC = robot_spec("metaworld")
TOKENIZER = ActionTokenizer.from_robot(SPEC)
GAMMA = 0.99  # metaworld config


def _frames(length, h=64, w=64):
  """Frame t is 30 t + 10 at pixel (0, 0), plus a small x pattern so crops show."""
  img = 30 * np.arange(length)[:, None, None, None] + 10 + (np.arange(w) % 4)[:, None]
  return np.broadcast_to(img, (length, h, w, 3)).astype(np.uint8)


def _episode(rewards, terminal, instruction, seed, spec=SPEC):
  n = len(rewards)
  rng = np.random.RandomState(seed)
  t = np.arange(n)
  cam = spec.cameras[0]
  obs = {"image": _frames(n, cam.height, cam.width)}
  if spec.state_dim:
    obs["state"] = np.repeat(t[:, None], spec.state_dim, 1).astype(np.float32)
  return {"steps": {"observation": obs,
                    "action": rng.uniform(-1.2, 1.2, (n, 4)).astype(np.float32),
                    "reward": np.asarray(rewards, np.float32),
                    "discount": np.ones(n, np.float32),
                    "is_first": t == 0, "is_last": t == n - 1,
                    "is_terminal": (t == n - 1) & terminal,
                    "language_instruction": [instruction] * n}}


@contextlib.contextmanager
def _unchecked_writer():
  """Lets RLDSWriter write data its checks would refuse (NaN, empty episodes)."""
  with mock.patch.object(rlds_writer, "check_episode",
                         lambda ep, spec, where: {"length": len(ep["steps"]["action"])}):
    yield


def _write(path, episodes, spec=SPEC, unchecked=False):
  with (_unchecked_writer() if unchecked else contextlib.nullcontext()):
    with rlds_writer.RLDSWriter(str(path), spec, name="t") as w:
      for ep in episodes:
        w.add(ep)
  return str(path)


HAND = [_episode([0, 0, 0, 0, 1], True, "pick it", seed=0),     # success: terminal
        _episode([0, 0.5, 0, 0.5], False, "push it", seed=1)]   # time limit: truncated


@pytest.fixture(scope="module")
def hand_dir(tmp_path_factory):
  return _write(tmp_path_factory.mktemp("hand") / "ds", HAND)


@pytest.fixture(scope="module")
def sparse_dir(tmp_path_factory):
  eps = [_episode([0, 0, 1], True, "pick it", seed=2), _episode([0, 0], False, "pick it", seed=3)]
  return _write(tmp_path_factory.mktemp("sparse") / "ds", eps)


def _cfg(data_dir, **data):
  cfg = qconfig.load_config_file(os.path.join(REPO, "robot_configs", "metaworld.py"))
  cfg.data.dir = data_dir
  cfg.data.shuffle_buffer = 32
  cfg.data.window = 1           # tests that need a history set it
  cfg.data.deterministic = False
  for k, v in data.items():
    if k.startswith("augment_"):
      setattr(cfg.data.augment, k[len("augment_"):], v)
    else:
      setattr(cfg.data, k, v)
  return cfg


def _all_eval(cfg, spec=SPEC):
  """One ordered pass as a single batch."""
  batches = list(pipeline.as_numpy_batches(cfg.data, spec, TOKENIZER, gamma=cfg.learner.gamma,
                                           batch_size=64, seed=0,
                                           train=False))
  assert len(batches) == 1
  return batches[0]


def _pixel(images):
  """Step encoded in frame images[..., H, W, 3]: (value at (0, 0) - 10) / 30."""
  return (images[..., 0, 0, 0].astype(int) - 10) // 30


def _rtg(r, gamma):
  g, out = np.float32(0), []
  for x in r[::-1]:
    g = np.float32(x) + np.float32(gamma) * g
    out.append(g)
  return np.array(out[::-1], np.float32)


def test_hand_episode_exact_values(hand_dir):
  b = _all_eval(_cfg(hand_dir))
  np.testing.assert_array_equal(b["episode_index"], [0] * 5 + [1] * 4)
  np.testing.assert_array_equal(b["step_index"], [0, 1, 2, 3, 4, 0, 1, 2, 3])
  np.testing.assert_array_equal(b["dataset_index"], [0] * 9)
  assert b["observation"]["image"].shape == (9, 1, 64, 64, 3)
  assert b["observation"]["image"].dtype == np.uint8
  # Next-state alignment: s' of step t is o_{t+1}; the last step repeats itself, has_next False.
  np.testing.assert_array_equal(_pixel(b["observation"]["image"][:, 0]), [0, 1, 2, 3, 4, 0, 1, 2, 3])
  np.testing.assert_array_equal(_pixel(b["next_observation"]["image"][:, 0]),
                                [1, 2, 3, 4, 4, 1, 2, 3, 3])
  np.testing.assert_array_equal(b["next_observation"]["state"][:, 0, 0], [1, 2, 3, 4, 4, 1, 2, 3, 3])
  np.testing.assert_array_equal(b["has_next"], [1, 1, 1, 1, 0, 1, 1, 1, 0])
  # Terminal only on the success's last step; the truncated end is neither terminal nor has_next.
  np.testing.assert_array_equal(b["terminal"], [0, 0, 0, 0, 1, 0, 0, 0, 0])
  # Rewards are not 0/1, so "auto" maps [0, 1] onto [0, 1 - gamma].
  raw = np.concatenate([ep["steps"]["reward"] for ep in HAND])
  scale = (1 - GAMMA) / 1.0
  np.testing.assert_allclose(b["reward"], raw * scale, rtol=1e-6, atol=0)
  want_g = np.concatenate([_rtg(b["reward"][:5], GAMMA), _rtg(b["reward"][5:], GAMMA)])
  np.testing.assert_allclose(b["return_to_go"], want_g, rtol=1e-6)
  np.testing.assert_allclose(b["return_to_go"][:5], 0.01 * GAMMA ** np.arange(4, -1, -1),
                             rtol=1e-5)
  np.testing.assert_allclose(b["return_to_go"][5:], 0.01 * np.array(
      [0.5 * GAMMA + 0.5 * GAMMA**3, 0.5 + 0.5 * GAMMA**2, 0.5 * GAMMA, 0.5]), rtol=1e-5)
  actions = np.concatenate([ep["steps"]["action"] for ep in HAND])
  np.testing.assert_array_equal(b["action"], actions)
  np.testing.assert_array_equal(b["action_tokens"], TOKENIZER.encode(actions))
  assert b["action_tokens"].dtype == np.int32
  assert list(b["instruction"]) == [b"pick it"] * 5 + [b"push it"] * 4
  assert b["history_mask"].all() and b["next_history_mask"].all()


def test_episode_index_is_file_order_across_shards(tmp_path):
  eps = [_episode([0, 0, 1], True, f"ep {i}", seed=i) for i in range(5)]
  with rlds_writer.RLDSWriter(str(tmp_path / "ds"), SPEC, name="t", episodes_per_shard=2) as w:
    for ep in eps:
      w.add(ep)
  cfg = _cfg(str(tmp_path / "ds"), reward_rescale="none", deterministic=True)
  (b,) = _first_batches(cfg, 1, batch_size=64)  # shuffled files and steps
  assert len(set(b["episode_index"])) > 1
  for e, instruction in zip(b["episode_index"], b["instruction"]):
    assert instruction == f"ep {e}".encode()


def test_episode_metadata_is_keyed_like_batches(tmp_path):
  """TFDS reads shards interleaved (blocks of 16 records) even unshuffled, so
  enumerating episodes is not file order; episode_metadata keys by the batches'
  episode_index all the same."""
  eps = [_episode([0, 1], True, f"ep {i}", seed=i) for i in range(40)]
  with rlds_writer.RLDSWriter(str(tmp_path / "ds"), SPEC, name="t", episodes_per_shard=20) as w:
    for ep in eps:
      w.add(ep)
  builder = rlds_reader.open_builder(str(tmp_path / "ds"))
  ds = builder.as_dataset(split="train", shuffle_files=False)
  read = [int(i) for i in ds.map(lambda ep: ep["episode_metadata"]["episode_id"])
          .as_numpy_iterator()]
  assert read != sorted(read)  # the trap
  md = pipeline.episode_metadata(str(tmp_path / "ds"))
  assert sorted(md) == list(range(40))
  assert [md[i]["episode_id"] for i in range(40)] == [str(i) for i in range(40)]
  assert md[7] == {"episode_id": "7", "source": "", "noise": -1.0, "behavior": "",
                   "success": True, "return": 1.0}
  assert set(pipeline.episode_metadata(str(tmp_path / "ds"), "train[90%:]")) == set(range(36, 40))
  cfg = _cfg(str(tmp_path / "ds"), reward_rescale="none", deterministic=True)
  (b,) = _first_batches(cfg, 1, batch_size=64)
  for e, instruction in zip(b["episode_index"], b["instruction"]):
    assert instruction == f"ep {md[int(e)]['episode_id']}".encode()


def test_reward_rescale_modes(sparse_dir):
  r = _all_eval(_cfg(sparse_dir))["reward"]          # auto: sparse 0/1 passes through
  np.testing.assert_array_equal(r, [0, 0, 1, 0, 0])
  r = _all_eval(_cfg(sparse_dir, reward_rescale="minmax"))["reward"]
  np.testing.assert_allclose(r, [0, 0, 1 - GAMMA, 0, 0], rtol=1e-6)
  b = _all_eval(_cfg(sparse_dir, reward_rescale="none"))
  np.testing.assert_allclose(b["return_to_go"], [GAMMA**2, GAMMA, 1, 0, 0], rtol=1e-6)


def test_history_windows_with_padding_and_mask(hand_dir):
  b = _all_eval(_cfg(hand_dir, window=3, reward_rescale="none"))
  assert b["observation"]["image"].shape == (9, 3, 64, 64, 3)
  assert b["observation"]["state"].shape == (9, 3, 39)
  np.testing.assert_array_equal(_pixel(b["observation"]["image"][:5]), [
      [0, 0, 0], [0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 4]])
  np.testing.assert_array_equal(b["history_mask"][:5], [
      [0, 0, 1], [0, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 1]])
  # The next window ends at t+1; the last step's next window is its own window.
  np.testing.assert_array_equal(_pixel(b["next_observation"]["image"][:5]), [
      [0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 4], [2, 3, 4]])
  np.testing.assert_array_equal(b["next_history_mask"][:5], [
      [0, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 1]])
  np.testing.assert_array_equal(b["observation"]["state"][5:8, :, 0], [[0, 0, 0], [0, 0, 1],
                                                                       [0, 1, 2]])


def test_image_resize(hand_dir):
  b = _all_eval(_cfg(hand_dir, image_size=(32, 48), reward_rescale="none"))
  img = b["observation"]["image"]
  assert img.shape == (9, 1, 32, 48, 3) and img.dtype == np.uint8
  assert b["next_observation"]["image"].shape == (9, 1, 32, 48, 3)
  # Resizing keeps the frame identity: mean = 30 t + 10 + mean(x % 4).
  np.testing.assert_allclose(img.mean(axis=(1, 2, 3, 4)), 30 * b["step_index"] + 11.5, atol=1.0)


def _first_batches(cfg, n, seed=0, batch_size=16, validate=False):
  it = pipeline.as_numpy_batches(cfg.data, SPEC, TOKENIZER, gamma=cfg.learner.gamma,
                                 batch_size=batch_size, seed=seed,
                                 validate=validate)
  return [next(it) for _ in range(n)]


def _assert_same(a, b):
  tf.nest.assert_same_structure(a, b)
  for x, y in zip(tf.nest.flatten(a), tf.nest.flatten(b)):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(x, y)


def test_augmentation_changes_pixels_consistently_across_window(hand_dir):
  cfg = _cfg(hand_dir, window=2, reward_rescale="none", deterministic=True,
             augment_enabled=True, augment_crop_scale=0.75)
  plain = _all_eval(_cfg(hand_dir, window=2, reward_rescale="none"))
  clean = {(e, s): plain["observation"]["image"][i]
           for i, (e, s) in enumerate(zip(plain["episode_index"], plain["step_index"]))}
  (b,) = _first_batches(cfg, 1, batch_size=32)
  obs, nxt = b["observation"]["image"], b["next_observation"]["image"]
  assert obs.shape == (32, 2, 64, 64, 3) and obs.dtype == np.uint8
  changed = [not np.array_equal(obs[i], clean[(e, s)])
             for i, (e, s) in enumerate(zip(b["episode_index"], b["step_index"]))]
  assert np.mean(changed) > 0.9
  # At step 0 the window is [o_0, o_0] and the next window starts with o_0: one crop and
  # one jitter for all of them, so the three frames stay identical.
  first = np.flatnonzero(b["step_index"] == 0)
  assert first.size
  for i in first:
    np.testing.assert_array_equal(obs[i, 0], obs[i, 1])
    np.testing.assert_array_equal(obs[i, 1], nxt[i, 0])


def test_train_is_deterministic_for_a_seed(hand_dir):
  cfg = _cfg(hand_dir, deterministic=True, augment_enabled=True)
  a, b = _first_batches(cfg, 3), _first_batches(cfg, 3)
  for x, y in zip(a, b):
    _assert_same(x, y)
  c = _first_batches(cfg, 3, seed=1)
  assert any(not np.array_equal(x["action"], y["action"]) for x, y in zip(a, c))


def test_mixture_weights(hand_dir, sparse_dir):
  cfg = _cfg([hand_dir, sparse_dir], weights=[3.0, 1.0], deterministic=True,
             reward_rescale="none")
  batches = _first_batches(cfg, 20, batch_size=100)
  idx = np.concatenate([b["dataset_index"] for b in batches])
  assert abs(np.mean(idx == 0) - 0.75) < 0.05
  # Each member's own episodes: the sparse set has 3- and 2-step episodes only.
  assert set(np.concatenate([b["step_index"][b["dataset_index"] == 1] for b in batches])) == {
      0, 1, 2}


def test_chunks_are_consecutive_steps_through_mixing_and_shuffle(hand_dir, sparse_dir):
  """chunk_length=4: every 4 rows of a batch continue one member's stream of steps:
  where a row bootstraps, the next row is its next step, whose observation is this
  row's next_observation; the parallel map keeps the order although the config lets
  it reorder (deterministic=False). The runs themselves are shuffled."""
  from qsft_vla.learning.learner import check_chunks  # pylint: disable=g-import-not-at-top
  cfg = _cfg([hand_dir, sparse_dir], window=2, reward_rescale="none", deterministic=False)
  it = pipeline.as_numpy_batches(cfg.data, SPEC, TOKENIZER, gamma=GAMMA, batch_size=16, seed=0,
                                 validate=False, chunk_length=4)
  followed, starts = 0, set()
  for _ in range(10):
    b = next(it)
    check_chunks(b, 4)
    boot = b["has_next"] & ~b["terminal"]
    for i in np.flatnonzero(boot & (np.arange(16) % 4 < 3)):
      np.testing.assert_array_equal(b["next_observation"]["image"][i],
                                    b["observation"]["image"][i + 1])
      np.testing.assert_array_equal(b["next_history_mask"][i], b["history_mask"][i + 1])
      followed += 1
    starts |= set(zip(b["dataset_index"][::4], b["episode_index"][::4], b["step_index"][::4]))
  assert followed > 50 and len(starts) > 3
  with pytest.raises(ValueError, match="not a multiple of chunk_length=4"):
    pipeline.make_dataset(cfg.data, SPEC, TOKENIZER, gamma=GAMMA, batch_size=10, seed=0,
                          validate=False, chunk_length=4)


def test_iterator_resume_continues_exactly(hand_dir, tmp_path):
  cfg = _cfg(hand_dir, deterministic=True, augment_enabled=True, reward_rescale="none")
  make = lambda: pipeline.as_numpy_batches(cfg.data, SPEC, TOKENIZER, gamma=cfg.learner.gamma,
                                           batch_size=8, seed=3,  # noqa
                                           validate=False)
  it = make()
  for _ in range(3):
    next(it)
  state = str(tmp_path / "state")
  it.save_iterator_state(state)
  want = [next(it) for _ in range(2)]
  fresh, resumed = make(), make()
  resumed.restore_iterator_state(state)
  for w in want:
    _assert_same(next(resumed), w)
  assert not np.array_equal(next(fresh)["action"], want[0]["action"])  # not a no-op restore
  it.save_iterator_state(state)  # a second save replaces the first's files
  assert len([n for n in os.listdir(state) if n.endswith(".index")]) == 1
  assert set(os.listdir(state)) <= {pipeline.ITERATOR_STATE_POINTER} | {
      n for n in os.listdir(state) if n.startswith("iterator-")}


def test_failed_iterator_save_leaves_previous_state(hand_dir, tmp_path):
  cfg = _cfg(hand_dir, deterministic=True, reward_rescale="none")
  it = pipeline.as_numpy_batches(cfg.data, SPEC, TOKENIZER, gamma=cfg.learner.gamma,
                                 batch_size=8, seed=0, validate=False)
  state = str(tmp_path / "state")
  next(it)
  it.save_iterator_state(state)
  before = sorted(os.listdir(state))
  want = next(it)
  real_write = tf.train.Checkpoint.write

  def write_then_die(self, prefix, **kw):
    real_write(self, prefix, **kw)  # files on disk, then a crash before the pointer swap
    raise OSError("disk full")

  with mock.patch.object(tf.train.Checkpoint, "write", write_then_die):
    with pytest.raises(OSError, match="disk full"):
      it.save_iterator_state(state)
  assert sorted(os.listdir(state)) == before
  resumed = pipeline.as_numpy_batches(cfg.data, SPEC, TOKENIZER, gamma=cfg.learner.gamma,
                                      batch_size=8, seed=0, validate=False)
  resumed.restore_iterator_state(state)
  _assert_same(next(resumed), want)
  with pytest.raises(FileNotFoundError):
    resumed.restore_iterator_state(str(tmp_path / "nothing"))


# --------------------------------------------------------------------------- #
# Action tokens in TF.


@pytest.mark.parametrize("name", ["metaworld", "babyai", "stats_bounds"])
def test_tf_action_encoder_matches_numpy_encode(name):
  rng = np.random.RandomState(0)
  if name == "stats_bounds":
    spec = dataclasses.replace(SPEC, action_dims=tuple(
        dataclasses.replace(d, low=None, high=None, bins=17) for d in SPEC.action_dims))
    tok = ActionTokenizer.from_robot(spec, {"action": {"q01": [-0.3, -1, 0, 2],
                                                       "q99": [0.7, 1, 1e-3, 5]}})
  else:
    tok = ActionTokenizer.from_robot(robot_spec(name), out_of_bounds="clip")
  low, high = tok.bounds
  span = high - low
  x = rng.uniform(low - 0.2 * span, high + 0.2 * span, (4000, tok.num_dims))
  # Exact bin edges and decoded centres are where float rules disagree first.
  edges = [low + span * k / np.array(tok.bins_per_dim) for k in range(max(tok.bins_per_dim) + 1)]
  centres = tok.decode(np.stack([np.minimum(k, np.array(tok.bins_per_dim) - 1)
                                 for k in range(max(tok.bins_per_dim))]))
  x = np.concatenate([x, np.stack(edges), centres, np.zeros((1, tok.num_dims)),
                      np.full((1, tok.num_dims), -1e-40)]).astype(np.float32)
  encode, _ = action_tf.tf_action_encoder(tok.to_spec())
  np.testing.assert_array_equal(encode(tf.constant(x)).numpy(), tok.encode(x))


def test_reject_policy_flags_out_of_bound_actions():
  tok = ActionTokenizer.from_robot(robot_spec("babyai"))
  _, oob = action_tf.tf_action_encoder(tok.to_spec())
  np.testing.assert_array_equal(oob(tf.constant([[0.0], [6.0], [6.5], [-0.5]])).numpy()[:, 0],
                                [False, False, True, True])


# --------------------------------------------------------------------------- #
# Bad input: each fails with its DataError and leaves nothing behind.


def _listing(root):
  return sorted(os.path.relpath(os.path.join(d, f), root)
                for d, _, fs in os.walk(root) for f in fs)


def _bad_nan(key):
  def make():
    ep = _episode([0, 0, 0, 1], True, "pick it", seed=5)
    ep["steps"][key][2] = np.nan
    return ep
  return make


@pytest.mark.parametrize("key,make", [("action", _bad_nan("action")),
                                      ("reward", _bad_nan("reward"))])
def test_nan_fails_naming_dataset_episode_step_and_key(tmp_path, key, make):
  data_dir = _write(tmp_path / "ds", [HAND[0], make()], unchecked=True)
  before = _listing(tmp_path)
  cfg = _cfg(data_dir, reward_rescale="none", deterministic=True)
  want = rf"{data_dir}: episode 1, step 2, key '{key}': non-finite"
  with pytest.raises(DataError, match=want):   # the validation pass, before training
    pipeline.make_dataset(cfg.data, SPEC, TOKENIZER, gamma=cfg.learner.gamma, batch_size=4, seed=0)
  it = pipeline.as_numpy_batches(cfg.data, SPEC, TOKENIZER, gamma=cfg.learner.gamma,
                                 batch_size=4, seed=0, validate=False)
  with pytest.raises(DataError, match=want):   # and the in-graph check while reading
    for _ in range(10):
      next(it)
  assert _listing(tmp_path) == before


def test_empty_episode_fails_naming_the_episode(tmp_path):
  empty = _episode([], False, "pick it", seed=0)
  empty["episode_metadata"] = {"success": False, "return": 0.0}  # nothing to derive them from
  data_dir = _write(tmp_path / "ds", [HAND[0], HAND[1], empty], unchecked=True)
  before = _listing(tmp_path)
  cfg = _cfg(data_dir, reward_rescale="none")
  with pytest.raises(DataError, match=rf"{data_dir}: episode 2, key 'steps': empty episode"):
    pipeline.make_dataset(cfg.data, SPEC, TOKENIZER, gamma=cfg.learner.gamma, batch_size=4, seed=0)
  it = pipeline.as_numpy_batches(cfg.data, SPEC, TOKENIZER, gamma=cfg.learner.gamma,
                                 batch_size=64, seed=0, train=False,
                                 validate=False)
  with pytest.raises(DataError, match="episode 2, key 'steps'"):
    next(it)
  assert _listing(tmp_path) == before


def test_missing_key_fails_when_built(tmp_path):
  no_state = dataclasses.replace(SPEC, state_dim=0)
  data_dir = _write(tmp_path / "ds", [_episode([0, 1], True, "x", 0, spec=no_state)],
                    spec=no_state)
  before = _listing(tmp_path)
  with pytest.raises(DataError, match=r"key 'observation/state'"):
    pipeline.make_dataset(_cfg(data_dir).data, SPEC, TOKENIZER, gamma=GAMMA, batch_size=4, seed=0)
  assert _listing(tmp_path) == before


def test_wrong_image_shape_fails_when_built(tmp_path):
  small = dataclasses.replace(SPEC, cameras=(Camera("image", 32, 32),))
  data_dir = _write(tmp_path / "ds", [_episode([0, 1], True, "x", 0, spec=small)], spec=small)
  before = _listing(tmp_path)
  with pytest.raises(DataError, match=r"key 'observation/image'.*\(32, 32, 3\).*\(64, 64, 3\)"):
    pipeline.make_dataset(_cfg(data_dir).data, SPEC, TOKENIZER, gamma=GAMMA, batch_size=4, seed=0)
  assert _listing(tmp_path) == before


def test_reject_policy_fails_on_out_of_bound_actions(hand_dir):
  # HAND actions reach +-1.2, outside metaworld's [-1, 1]; "clip" tokenizes them, "reject" refuses.
  first = int(np.argmax(np.any(np.abs(HAND[0]["steps"]["action"]) > 1, axis=1)))
  strict = ActionTokenizer.from_robot(SPEC, out_of_bounds="reject")
  with pytest.raises(DataError, match=rf"episode 0, step {first}, key 'action': action outside"):
    pipeline.make_dataset(_cfg(hand_dir).data, SPEC, strict, gamma=GAMMA, batch_size=4, seed=0)


def test_fixed_instruction_comes_from_the_robot_config(hand_dir):
  fixed = dataclasses.replace(SPEC, instruction_source="fixed", instruction_text="open it")
  b = _all_eval(_cfg(hand_dir, reward_rescale="none"), spec=fixed)
  assert list(b["instruction"]) == [b"open it"] * 9


def _flip_middle_byte(path):
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0xFF]))


def test_damaged_files_are_named(hand_dir, tmp_path):
  """A bit-flipped shard and a broken dataset_info.json are one DataError naming
  the file, from the statistics and from the training batches alike."""
  import shutil  # pylint: disable=g-import-not-at-top
  from qsft_vla.data import statistics  # pylint: disable=g-import-not-at-top
  shard_dir = shutil.copytree(hand_dir, tmp_path / "shard")
  shard = sorted(p for p in os.listdir(shard_dir) if ".tfrecord" in p)[0]
  _flip_middle_byte(os.path.join(shard_dir, shard))
  with pytest.raises(DataError, match=rf"{shard}: damaged record file \(corrupted record at"):
    statistics.compute(str(shard_dir), SPEC)
  with pytest.raises(DataError, match=rf"{shard}: damaged record file"):
    _first_batches(_cfg(str(shard_dir)), 1)

  info_dir = shutil.copytree(hand_dir, tmp_path / "info")
  with open(os.path.join(info_dir, "dataset_info.json"), "w") as f:
    f.write("{broken")
  with pytest.raises(DataError, match=r"dataset_info.json: unreadable \(JSONDecodeError"):
    _first_batches(_cfg(str(info_dir)), 1)


@pytest.mark.parametrize("threshold", [0.5, float(np.nextafter(np.float32(0), np.float32(1)))])
def test_keep_returns_filters_episodes_before_batching(sparse_dir, threshold):
  """Filtered BC's data: only the successful episode (return 1 of {1, 0}) reaches the
  batches, which are full (16 examples of its 3 steps, repeated). The second
  threshold is statistics.filter_threshold's for this data: just above 0."""
  cfg = _cfg(sparse_dir)
  it = pipeline.as_numpy_batches(cfg.data, SPEC, TOKENIZER, gamma=cfg.learner.gamma,
                                 batch_size=16, seed=0, validate=False,
                                 keep_returns=[threshold])
  for _ in range(3):
    b = next(it)
    assert b["episode_return"].shape == (16,) and (b["episode_return"] == 1.0).all()
    assert set(b["episode_index"].tolist()) == {0}



@pytest.mark.parametrize("window, image_size", [(1, None), (3, (32, 48))])
def test_example_spec_is_what_the_pipeline_yields(hand_dir, window, image_size):
  """examples.example_spec (the layout replay tables store) is the pipeline's
  element before batching: same keys, shapes and dtypes."""
  from qsft_vla.data import examples
  cfg = _cfg(hand_dir, window=window, image_size=image_size)
  ds = pipeline.make_dataset(cfg.data, SPEC, TOKENIZER, gamma=GAMMA, batch_size=4, seed=0,
                             train=True, validate=False)
  got = tf.nest.map_structure(lambda s: tf.TensorSpec(s.shape[1:], s.dtype), ds.element_spec)
  want = examples.example_spec(SPEC, window=window, image_size=image_size)
  tf.nest.assert_same_structure(got, want)
  for g, w in zip(tf.nest.flatten(got), tf.nest.flatten(want)):
    assert g == w, (g, w)
