"""qsft_vla.data.transforms: exact values on a hand-built 5-step episode."""

import numpy as np
import pytest
import tensorflow as tf

from qsft_vla.data import transforms as tr


def _np(x):
  return tf.nest.map_structure(lambda v: v.numpy(), x)


def test_next_step_alignment_and_has_next():
  obs = {"image": tf.reshape(tf.range(5 * 2), (5, 2)), "state": tf.range(5.0)}
  nxt = _np(tr.next_step(obs))
  np.testing.assert_array_equal(nxt["state"], [1, 2, 3, 4, 4])  # last step repeats itself
  np.testing.assert_array_equal(nxt["image"][:, 0], [2, 4, 6, 8, 8])
  np.testing.assert_array_equal(tr.has_next(5).numpy(), [True] * 4 + [False])
  np.testing.assert_array_equal(tr.has_next(1).numpy(), [False])


@pytest.mark.parametrize("is_terminal,terminal,truncated", [
    ([0, 0, 0, 0, 1], [0, 0, 0, 0, 1], [0, 0, 0, 0, 0]),   # success: terminal state
    ([0, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 1]),   # time limit: truncated
])
def test_terminal_vs_truncated(is_terminal, terminal, truncated):
  term, trunc = tr.episode_end_flags(tf.constant(np.array(is_terminal, bool)))
  np.testing.assert_array_equal(term.numpy(), np.array(terminal, bool))
  np.testing.assert_array_equal(trunc.numpy(), np.array(truncated, bool))


def test_returns_to_go_exact():
  g = tr.returns_to_go(tf.constant([0, 0, 0, 0, 1], tf.float32), 0.9).numpy()
  np.testing.assert_allclose(g, [0.9**4, 0.9**3, 0.81, 0.9, 1.0], rtol=1e-6)
  g = tr.returns_to_go(tf.constant([1, 2, 3], tf.float32), 0.5).numpy()
  np.testing.assert_allclose(g, [1 + 0.5 * (2 + 0.5 * 3), 2 + 0.5 * 3, 3], rtol=1e-7)
  assert tr.returns_to_go(tf.constant([1, 1], tf.float32), 1.0).numpy().tolist() == [2, 1]
  assert tr.returns_to_go(tf.zeros([0]), 0.9).numpy().shape == (0,)


def test_returns_to_go_long_episode_is_finite():
  g = tr.returns_to_go(tf.ones([20_000]), 0.99).numpy()
  assert np.all(np.isfinite(g))
  np.testing.assert_allclose(g[0], 100.0, rtol=1e-4)
  assert g[-1] == 1.0


@pytest.mark.parametrize("length", [1, 127, 128, 129, 300, 1000])
@pytest.mark.parametrize("gamma", [0.0, 0.9, 1.0])
def test_returns_to_go_matches_recursion_across_blocks(length, gamma):
  rng = np.random.RandomState(length)
  r = (rng.randn(length) * (rng.rand(length) < 0.3)).astype(np.float32)
  want, acc = np.zeros(length), 0.0
  for t in range(length - 1, -1, -1):
    acc = float(r[t]) + gamma * acc
    want[t] = acc
  got = tr.returns_to_go(tf.constant(r), gamma).numpy()
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * (1 + np.abs(want).max()))


def test_rescale_rewards_exact():
  r = tr.rescale_rewards(tf.constant([0.0, 0.5, 2.0]), 0.005, 0.01).numpy()
  np.testing.assert_allclose(r, [0.01, 0.0125, 0.02], rtol=1e-6)
  assert r.dtype == np.float32


def test_history_windows_pad_by_repeating_first_frame():
  x = tf.constant([10, 11, 12, 13, 14])
  w = tr.history_windows(x, 3).numpy()
  np.testing.assert_array_equal(w, [[10, 10, 10], [10, 10, 11], [10, 11, 12], [11, 12, 13],
                                    [12, 13, 14]])
  np.testing.assert_array_equal(tr.history_mask(5, 3).numpy(), [
      [0, 0, 1], [0, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 1]])
  np.testing.assert_array_equal(tr.history_windows(x, 1).numpy()[:, 0], [10, 11, 12, 13, 14])
  assert tr.history_mask(5, 1).numpy().all()
  # Works on nests and higher-rank frames; the next window is the window of t+1.
  imgs = tf.reshape(tf.range(5 * 4), (5, 2, 2))
  win = tr.history_windows({"image": imgs}, 2)["image"].numpy()
  assert win.shape == (5, 2, 2, 2)
  np.testing.assert_array_equal(win[0, 0], win[0, 1])
  nxt = tr.next_step(tr.history_windows(x, 2)).numpy()
  np.testing.assert_array_equal(nxt, [[10, 11], [11, 12], [12, 13], [13, 14], [13, 14]])


def test_resize_images():
  img = tf.fill([2, 8, 8, 3], tf.constant(200, tf.uint8))
  out = tr.resize_images(img, (4, 6))
  assert out.shape == (2, 4, 6, 3) and out.dtype == tf.uint8
  assert np.all(out.numpy() == 200)  # a constant image stays constant
  assert tr.resize_images(img, None) is img
  assert tr.resize_images(img, (8, 8)) is img


def _ramp(n=3, h=16, w=16):
  y = np.arange(h)[:, None] * 8 + np.arange(w)[None, :] * 4
  img = np.stack([y, y[::-1], y.T], -1).astype(np.uint8)
  return tf.constant(np.stack([img] * n))


def test_augment_same_draw_for_all_frames_seeded_and_changes_pixels():
  imgs = _ramp()
  kw = dict(crop_scale=0.8, brightness=0.1, contrast=0.1)
  a = tr.augment_images(imgs, tf.constant([1, 2]), **kw).numpy()
  b = tr.augment_images(imgs, tf.constant([1, 2]), **kw).numpy()
  c = tr.augment_images(imgs, tf.constant([1, 3]), **kw).numpy()
  assert a.shape == (3, 16, 16, 3) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, b)               # seeded
  assert not np.array_equal(a, imgs.numpy())         # changes pixels
  assert not np.array_equal(a, c)                    # another seed, another draw
  np.testing.assert_array_equal(a[0], a[1])          # identical across frames
  np.testing.assert_array_equal(a[0], a[2])
  out = tr.augment_images(imgs, tf.constant([1, 2]), size=(8, 12), **kw)
  assert out.shape == (3, 8, 12, 3) and out.dtype == tf.uint8


def test_augment_off_is_identity():
  imgs = _ramp()
  out = tr.augment_images(imgs, tf.constant([0, 0]), crop_scale=1.0, brightness=0.0,
                          contrast=0.0)
  np.testing.assert_array_equal(out.numpy(), imgs.numpy())


def test_transforms_work_inside_tf_data():
  ds = tf.data.Dataset.from_tensors(tf.constant([0.0, 0.0, 1.0]))
  ds = ds.map(lambda r: {"g": tr.returns_to_go(r, 0.5), "n": tr.has_next(tf.shape(r)[0]),
                         "w": tr.history_windows(r, 2)})
  out = next(iter(ds))
  np.testing.assert_allclose(out["g"].numpy(), [0.25, 0.5, 1.0])
  assert out["w"].shape == (3, 2)
