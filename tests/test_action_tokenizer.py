"""Tests for the per-dimension action tokenizer (qsft_vla.tokenizers.action)."""

import json
import math
import os

import hypothesis
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
import jax
import numpy as np
import pytest

from qsft_vla.config import load_config_file
from qsft_vla.robot import ActionDim, RobotSpec
from qsft_vla.tokenizers import ActionTokenizer
from qsft_vla.tokenizers.action import (ActionOutOfBoundsError, ActionSpecError,
                                        ActionValueError, NonFiniteActionError)

SETTINGS = hypothesis.settings(max_examples=200, deadline=None)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(path):
  return load_config_file(os.path.join(ROOT, path))  # independent of the working directory


def robot(path):
  return RobotSpec.from_config(config(path).robot)


def cont(name, low, high, bins=256):
  return ActionDim(name, "continuous", bins, low=low, high=high)


def disc(name, values, labels=None):
  return ActionDim(name, "discrete", len(values), values=tuple(values), labels=labels)


# A mixed spec: two 256-bin arms, an odd-sized continuous dim, a 2-value gripper,
# a 3-value discrete dim with uneven gaps. One tokenizer so jax compiles once.
MIXED = ActionTokenizer([cont("x", -1.0, 1.0), cont("y", -0.3, 2.7), cont("z", 0.05, 0.3, 7),
                         disc("gripper", (0.0, 1.0)), disc("mode", (-2.0, 0.5, 4.0))])
ENCODE_JIT = jax.jit(MIXED.encode_jax)
DECODE_JIT = jax.jit(MIXED.decode_jax)


@st.composite
def continuous_dims(draw):
  # Bins stay >= ~10 float32 ulps wide, which the tokenizer requires.
  low = draw(st.floats(-100, 100))
  width = draw(st.floats(0.1, 200))
  bins = draw(st.integers(2, 300))
  return cont("d", low, low + width, bins)


def slack(tok):
  """Float32 rounding allowance: edges and centres are float32 roundings of
  their exact values (half an ulp each) at the largest magnitude in range."""
  low, high = tok.bounds
  return np.spacing(np.maximum(np.abs(low), np.abs(high))).astype(np.float64)


# --------------------------------------------------------------------------- #
# Properties.


@SETTINGS
@hypothesis.given(st.data())
def test_roundtrip_within_half_a_bin(data):
  tok = ActionTokenizer([data.draw(continuous_dims())])
  low, high = (float(b[0]) for b in tok.bounds)
  # The exact float32 bounds are included: the upper bound is in the last bin.
  xs = data.draw(hnp.arrays(np.float32, st.integers(1, 32),
                            elements=st.floats(low, high, width=32)))
  x = np.concatenate([xs, [low, high]]).astype(np.float32)[:, None]
  err = np.abs(tok.decode(tok.encode(x)).astype(np.float64) - x.astype(np.float64))
  assert np.all(err <= tok.bin_width / 2 + slack(tok)), (x[err.argmax()], err.max())
  assert tok.out_of_bounds_count.tolist() == [0]


@SETTINGS
@hypothesis.given(st.data())
def test_encode_is_monotone_and_in_range_for_any_finite_input(data):
  tok = ActionTokenizer([data.draw(continuous_dims())])
  xs = data.draw(hnp.arrays(np.float32, st.integers(1, 64),
                            elements=st.floats(allow_nan=False, allow_infinity=False, width=32)))
  x = np.sort(xs)[:, None]
  t = tok.encode(x)[:, 0]
  assert t.dtype == np.int32
  assert np.all(np.diff(t) >= 0)
  assert np.all((t >= 0) & (t < tok.bins_per_dim[0]))


@SETTINGS
@hypothesis.given(hnp.arrays(np.float64, st.tuples(st.integers(0, 4), st.just(5)),
                             elements=st.floats(allow_nan=False, allow_infinity=False)))
def test_tokens_in_range_for_far_out_float64(x):
  # Finite float64 beyond float32's range becomes inf in float32: still clipped.
  tok = ActionTokenizer(MIXED.dims)
  t = tok.encode(x)
  assert t.shape == x.shape and t.dtype == np.int32
  assert np.all((t >= 0) & (t < np.array(tok.bins_per_dim)))


def test_upper_bound_lands_in_last_bin():
  for low, high, bins in [(-1.0, 1.0, 256), (0.1, 0.7, 3), (-0.3, 2.7, 256), (1e-3, 1e3, 1000)]:
    tok = ActionTokenizer([cont("d", low, high, bins)])
    lo32, hi32 = (b[0] for b in tok.bounds)
    assert tok.encode([[hi32]]).item() == bins - 1
    assert tok.encode([[np.nextafter(hi32, np.float32(-np.inf))]]).item() == bins - 1
    assert tok.encode([[lo32]]).item() == 0
    assert tok.out_of_bounds_count.tolist() == [0]


@SETTINGS
@hypothesis.given(continuous_dims())
def test_every_token_decodes_into_its_own_bin(dim):
  tok = ActionTokenizer([dim])
  t = np.arange(dim.bins)[:, None]
  assert np.array_equal(tok.encode(tok.decode(t)), t)


@SETTINGS
@hypothesis.given(st.data())
def test_agrees_with_floor_formula_away_from_edges(data):
  dim = data.draw(continuous_dims())
  tok = ActionTokenizer([dim])
  low, high = (float(b[0]) for b in tok.bounds)
  x = data.draw(st.floats(low, high, width=32))
  u = (x - dim.low) / (dim.high - dim.low) * dim.bins  # float64, exact enough
  hypothesis.assume(abs(u - round(u)) > 1e-3)
  expected = min(max(math.floor(u), 0), dim.bins - 1)
  assert tok.encode([[x]]).item() == expected


@SETTINGS
@hypothesis.given(st.lists(st.floats(-1e4, 1e4, width=32), min_size=2, max_size=12, unique=True),
                  st.data())
def test_discrete_roundtrip_and_nearest(values, data):
  values = sorted(values)
  hypothesis.assume(min(np.diff(values)) > 1e-2)
  tok = ActionTokenizer([disc("d", values)])
  v = np.array(values, np.float32)[:, None]
  assert np.array_equal(tok.encode(v)[:, 0], np.arange(len(values)))
  assert np.array_equal(tok.decode(np.arange(len(values))[:, None]), v)
  x = data.draw(st.floats(values[0], values[-1], width=32))
  got = float(tok.decode(tok.encode([[x]])).item())
  nearest = min(abs(x - w) for w in values)
  assert abs(x - got) <= nearest + 1e-3


def _hard_inputs(rng, n):
  """Random values in and around the bounds, plus exact edges, centres and -0.0."""
  tok = MIXED
  low, high = (b.astype(np.float64) for b in tok.bounds)
  span = high - low
  x = rng.uniform(low - 0.2 * span, high + 0.2 * span, size=(n, tok.num_dims))
  edges = tok._edges_flat.reshape(tok.num_dims, -1)  # pylint: disable=protected-access
  for d in range(tok.num_dims):
    pick = edges[d, :tok.bins_per_dim[d] - 1]
    rows = rng.integers(0, n, size=n // 4)
    x[rows, d] = rng.choice(pick, size=rows.size)
  x[rng.integers(0, n, size=4), 0] = -0.0
  return x.astype(np.float32)


@pytest.mark.parametrize("seed", range(5))
def test_numpy_and_jax_agree(seed):
  rng = np.random.default_rng(seed)
  x = _hard_inputs(rng, 512)
  tok = ActionTokenizer(MIXED.dims)
  t_np = tok.encode(x)
  t_jax = np.asarray(ENCODE_JIT(x))
  assert t_jax.dtype == np.int32
  assert np.array_equal(t_np, t_jax)
  assert np.array_equal(tok.decode(t_np), np.asarray(DECODE_JIT(t_np)))
  assert np.asarray(DECODE_JIT(t_np)).dtype == np.float32


@SETTINGS
@hypothesis.given(hnp.arrays(np.float32, (16, 5),
                             elements=st.floats(allow_nan=False, allow_infinity=False, width=32)))
def test_numpy_and_jax_agree_on_any_finite_input(x):
  tok = ActionTokenizer(MIXED.dims)
  t = tok.encode(x)
  assert np.array_equal(t, np.asarray(ENCODE_JIT(x)))
  assert np.array_equal(tok.decode(t), np.asarray(DECODE_JIT(t)))


def test_any_leading_shape():
  x = _hard_inputs(np.random.default_rng(0), 24).reshape(2, 3, 4, 5)
  tok = ActionTokenizer(MIXED.dims)
  t = tok.encode(x)
  assert t.shape == x.shape
  assert np.array_equal(t.reshape(24, 5), tok.encode(x.reshape(24, 5)))
  assert np.array_equal(t, np.asarray(tok.encode_jax(x)))
  assert tok.decode(t).shape == x.shape
  assert tok.encode(x[0, 0, 0]).shape == (5,)
  assert tok.encode(np.zeros((0, 5))).shape == (0, 5)


# --------------------------------------------------------------------------- #
# Bad input.


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("policy", ["clip", "reject"])
def test_non_finite_rejected_naming_dim_and_index(bad, policy):
  tok = ActionTokenizer(MIXED.dims, out_of_bounds=policy)
  x = np.zeros((3, 5), np.float32)
  x[1, 3] = bad
  x[2, 0] = bad  # later in C order: not the one reported
  with pytest.raises(NonFiniteActionError, match=r"'gripper' \(index 3\).*actions\[1, 3\]"):
    tok.encode(x)
  assert issubclass(NonFiniteActionError, ValueError)
  assert tok.out_of_bounds_count.tolist() == [0] * 5


def test_reject_policy_names_dim_value_and_index():
  tok = ActionTokenizer.from_robot(robot("robot_configs/babyai.py"))
  assert tok.out_of_bounds == "reject"
  assert tok.encode([[6.0], [0.0], [2.4], [2.5]]).ravel().tolist() == [6, 0, 2, 3]
  with pytest.raises(ActionOutOfBoundsError, match=r"'action' \(index 0\): value 7\.0 at actions\[2, 0\]"):
    tok.encode([[1.0], [2.0], [7.0], [-1.0]])
  with pytest.raises(ActionOutOfBoundsError, match=r"value -0\.5"):
    tok.encode(np.array([-0.5]))
  # Within the documented tolerance of the first/last value: accepted.
  assert tok.encode([[6.0 + 1e-6], [-1e-6]]).ravel().tolist() == [6, 0]
  metaworld = ActionTokenizer.from_robot(robot("robot_configs/metaworld.py"), out_of_bounds="reject")
  with pytest.raises(ActionOutOfBoundsError, match=r"'dz' \(index 2\): value 1\.5.*\[-1\.0, 1\.0\]"):
    metaworld.encode([0.0, 0.0, 1.5, 0.0])


def test_clip_counts_exactly_and_accumulates():
  tok = ActionTokenizer(MIXED.dims)  # x, y in [-1, 1], [-0.3, 2.7]; gripper {0, 1}
  x = np.array([[-1.0, 3.0, 0.1, 0.0, 0.5],     # y above
                [1.5, -0.3, 0.3, 1.0, 4.0],     # x above; y, z, mode exactly at bounds
                [-2.0, 2.8, 0.0, 1.1, -3.0],    # x below, y above, z below, gripper, mode
                [0.0, 0.0, 0.2, 0.5, 0.0]], np.float32)
  t = tok.encode(x)
  assert tok.out_of_bounds_count.tolist() == [2, 2, 1, 1, 1]
  assert t[1, 0] == 255 and t[2, 0] == 0 and t[2, 3] == 1 and t[2, 4] == 0
  tok.encode(x[:1])
  assert tok.out_of_bounds_count.tolist() == [2, 3, 1, 1, 1]
  tok.encode_jax(x)  # the jax path does not count
  assert tok.out_of_bounds_count.tolist() == [2, 3, 1, 1, 1]
  tok.reset_out_of_bounds_count()
  assert tok.out_of_bounds_count.tolist() == [0] * 5


def test_jax_path_clips_and_maps_non_finite():
  tok = MIXED
  x = np.array([[np.nan, np.inf, -np.inf, np.nan, 1e9]], np.float32)
  assert np.asarray(ENCODE_JIT(x)).tolist() == [[0, 255, 0, 0, 2]]
  t = np.array([[-5, 300, 7, 2, -1]])
  assert np.array_equal(np.asarray(DECODE_JIT(t)), tok.decode([[0, 255, 6, 1, 0]]))


def test_bad_shapes_dtypes_and_tokens():
  tok = MIXED
  with pytest.raises(ActionValueError, match=r"\[\.\.\., 5\].*\(3, 4\)"):
    tok.encode(np.zeros((3, 4)))
  with pytest.raises(ActionValueError, match=r"\(\)"):
    tok.encode(np.float32(0.0))
  with pytest.raises(ActionValueError, match="numeric"):
    tok.encode(np.array([["a"] * 5]))
  with pytest.raises(ActionValueError, match="shape"):
    tok.encode_jax(np.zeros((2, 3)))
  with pytest.raises(ActionValueError, match="integers"):
    tok.decode(np.zeros((1, 5), np.float32))
  with pytest.raises(ActionValueError, match=r"'gripper' \(index 3\): token 2 at tokens\[0, 3\].*\[0, 2\)"):
    tok.decode([[0, 0, 0, 2, 0]])
  with pytest.raises(ActionValueError, match=r"'x' \(index 0\): token -1"):
    tok.decode([[-1, 0, 0, 0, 0]])


# --------------------------------------------------------------------------- #
# Bounds from statistics.


def _unbounded_robot():
  cfg = config("robot_configs/metaworld.py")
  cfg.robot.action.dims.dy.low = None
  cfg.robot.action.dims.dy.high = None
  cfg.robot.action.dims.dz.low = None
  cfg.robot.action.dims.dz.high = None
  return RobotSpec.from_config(cfg.robot)


def test_bounds_from_stats():
  stats = {"action": {"q01": np.array([-9.0, -0.25, 0.1, -9.0]),
                      "q99": [9.0, 0.75, 0.4, 9.0]}}
  tok = ActionTokenizer.from_robot(_unbounded_robot(), stats)
  low, high = tok.bounds
  assert low.tolist() == pytest.approx([-1.0, -0.25, 0.1, -1.0])  # configured bounds win
  assert high.tolist() == pytest.approx([1.0, 0.75, 0.4, 1.0])
  spec = tok.to_spec()
  assert [spec["dims"][1]["low"], spec["dims"][1]["high"]] == [-0.25, 0.75]
  assert isinstance(spec["dims"][2]["low"], float)  # stored as plain numbers
  again = ActionTokenizer.from_json(tok.to_json())  # no stats needed any more
  assert again == tok
  x = np.random.default_rng(0).uniform(-1, 1, (100, 4)).astype(np.float32)
  assert np.array_equal(again.encode(x), tok.encode(x))


def test_missing_stats_names_the_dimension():
  spec = _unbounded_robot()
  with pytest.raises(ActionSpecError, match=r"'dy' \(index 1\).*no low/high.*none were given"):
    ActionTokenizer.from_robot(spec)
  with pytest.raises(ActionSpecError, match=r"'dy'.*no action q01/q99"):
    ActionTokenizer.from_robot(spec, {"reward": {}})
  with pytest.raises(ActionSpecError, match=r"q01.*one entry per action dimension \(4\)"):
    ActionTokenizer.from_robot(spec, {"action": {"q01": [0.0] * 3, "q99": [1.0] * 3}})
  with pytest.raises(ActionSpecError, match=r"'dz' \(index 2\).*q01=0.5 and q99=0.5"):
    ActionTokenizer.from_robot(spec, {"action": {"q01": [0, 0, 0.5, 0], "q99": [1, 1, 0.5, 1]}})
  with pytest.raises(ActionSpecError, match=r"'dx' \(index 0\).*no bounds"):
    ActionTokenizer([ActionDim("dx", "continuous", 256)])


# --------------------------------------------------------------------------- #
# Spec, JSON and the shared token space.


@pytest.mark.parametrize("path", ["robot_configs/babyai.py", "robot_configs/metaworld.py"])
def test_json_roundtrip_of_robot_configs(path):
  tok = ActionTokenizer.from_robot(robot(path))
  text = tok.to_json()
  assert json.loads(text) == tok.to_spec()
  again = ActionTokenizer.from_json(text)
  assert again == tok
  assert again.to_spec() == tok.to_spec()
  assert again.names == tok.names and again.dims == tok.dims
  assert ActionTokenizer.from_spec(json.loads(text)) == tok
  t = np.stack([np.arange(tok.vocab_size) % b for b in tok.bins_per_dim], -1)
  assert np.array_equal(again.decode(t), tok.decode(t))


def test_equality_is_by_spec():
  a = ActionTokenizer.from_robot(robot("robot_configs/metaworld.py"))
  assert a == ActionTokenizer.from_robot(robot("robot_configs/metaworld.py"))
  assert a != ActionTokenizer.from_robot(robot("robot_configs/metaworld.py"), out_of_bounds="reject")
  assert a != ActionTokenizer.from_robot(robot("robot_configs/babyai.py"))
  assert a != a.to_spec()


def _spec():
  return ActionTokenizer([cont("x", -1.0, 1.0), disc("gripper", (0.0, 1.0), ("open", "close"))],
                         out_of_bounds="clip").to_spec()


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.update(version=2), r"unknown version 2"),
    (lambda s: s.update(format="other"), r"format"),
    (lambda s: s.update(extra=1), r"unknown field\(s\) \['extra'\]"),
    (lambda s: s.pop("dims"), r"missing field\(s\) \['dims'\]"),
    (lambda s: s.update(out_of_bounds="wrap"), r"out_of_bounds"),
    (lambda s: s.update(dims=[]), r"dims must be a non-empty list"),
    (lambda s: s["dims"][0].update(scale=2), r"dims\[0\] has unknown field\(s\) \['scale'\]"),
    (lambda s: s["dims"][0].pop("low"), r"dims\[0\] is missing field\(s\) \['low'\]"),
    (lambda s: s["dims"][1].update(bins=3), r"'gripper'.*bins \(3\).*number of values \(2\)"),
    (lambda s: s["dims"][0].update(bins=1), r"'x'.*bins must be an integer >= 2"),
    (lambda s: s["dims"][0].update(bins=2.5), r"dims\[0\]\.bins must be an integer"),
    (lambda s: s["dims"][0].update(low=2.0), r"'x'.*finite low < high"),
    (lambda s: s["dims"][0].update(high="1"), r"dims\[0\]\.high must be a number"),
    (lambda s: s["dims"][0].update(kind="angle"), r"kind must be one of"),
    (lambda s: s["dims"][1].update(values=[1.0, 0.0]), r"strictly increasing"),
    (lambda s: s["dims"][1].update(labels=["open"]), r"labels must be 2 strings"),
    (lambda s: s["dims"][1].update(name="x"), r"unique"),
    (lambda s: s["dims"][0].update(low=1000.0, high=1000.001, bins=256), r"too narrow.*float32"),
])
def test_from_spec_rejects_bad_specs(edit, message):
  spec = _spec()
  assert ActionTokenizer.from_spec(_spec()) == ActionTokenizer.from_spec(spec)
  edit(spec)
  with pytest.raises(ActionSpecError, match=message):
    ActionTokenizer.from_spec(spec)


def test_from_json_rejects_garbage():
  with pytest.raises(ActionSpecError, match="not valid JSON"):
    ActionTokenizer.from_json("{")
  with pytest.raises(ActionSpecError, match="must be a dict"):
    ActionTokenizer.from_json("[1]")


def test_mixed_spec_properties_and_valid_mask():
  tok = ActionTokenizer([cont("x", -1.0, 1.0), disc("gripper", (-1.0, 1.0))])
  assert tok.num_dims == 2 and tok.names == ("x", "gripper")
  assert tok.bins_per_dim == (256, 2) and tok.vocab_size == 256
  mask = tok.valid_mask()
  assert mask.shape == (2, 256) and mask.dtype == bool
  assert mask[0].all()
  assert mask[1, :2].all() and not mask[1, 2:].any()
  width = tok.bin_width
  assert width[0] == 2.0 / 256 and np.isnan(width[1])
  low, high = tok.bounds
  assert low.tolist() == [-1.0, -1.0] and high.tolist() == [1.0, 1.0]
  assert low.dtype == np.float32
  # Decoded actions always lie within the bounds used for clipping.
  every = np.stack(np.nonzero(mask), -1)
  t = np.zeros((len(every), 2), np.int64)
  t[:, 0] = every[:, 1] % 256
  t[:, 1] = every[:, 1] % 2
  a = tok.decode(t)
  assert np.all((a >= low) & (a <= high))
