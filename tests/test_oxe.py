"""Open X-Embodiment datasets read as published: fractal20220817_data (RT-1) and bridge (WidowX).

The fixtures are tiny TFDS datasets written with those datasets' feature specs
(every key, shape and dtype of the published `features.json`, episode metadata
included), so the robot configs' rlds_keys are checked against the real layout:
validation, statistics, the action assembled from its parts, and two training
steps from each.
"""

import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from conftest import REPO
from qsft_vla import config as qconfig, robot
from qsft_vla.data import rlds_reader
from qsft_vla.data.episode import DataError
from data_tools import validate as validate_tool
from qsft_vla.data import statistics
from qsft_vla import train

F = tfds.features
T = lambda shape, dtype=np.float32: F.Tensor(shape=shape, dtype=dtype)  # noqa: E731

FRACTAL = F.FeaturesDict({
    "aspects": F.FeaturesDict({k: T((), np.bool_) for k in (
        "already_success", "feasible", "has_aspects", "success", "undesirable")}),
    "attributes": F.FeaturesDict({
        **{k: T((), np.int64) for k in ("collection_mode", "data_type", "env", "location",
                                       "objects_family", "task_family")},
        **{k: T((), np.str_) for k in ("collection_mode_name", "data_type_name", "env_name",
                                      "location_name", "objects_family_name",
                                      "task_family_name")}}),
    "steps": F.Dataset({
        "action": F.FeaturesDict({
            "base_displacement_vector": T((2,)),
            "base_displacement_vertical_rotation": T((1,)),
            "gripper_closedness_action": T((1,)),
            "rotation_delta": T((3,)),
            "terminate_episode": T((3,), np.int32),
            "world_vector": T((3,)),
        }),
        "is_first": T((), np.bool_), "is_last": T((), np.bool_), "is_terminal": T((), np.bool_),
        "observation": F.FeaturesDict({
            "base_pose_tool_reached": T((7,)),
            "gripper_closed": T((1,)),
            "gripper_closedness_commanded": T((1,)),
            "height_to_bottom": T((1,)),
            "image": F.Image(shape=(256, 320, 3), dtype=np.uint8, encoding_format="jpeg"),
            "natural_language_embedding": T((512,)),
            "natural_language_instruction": T((), np.str_),
            "orientation_box": T((2, 3)),
            "orientation_start": T((4,)),
            "robot_orientation_positions_box": T((3, 3)),
            "rotation_delta_to_go": T((3,)),
            "src_rotation": T((4,)),
            "vector_to_go": T((3,)),
            "workspace_bounds": T((3, 3)),
        }),
        "reward": F.Scalar(dtype=np.float32),
    }),
})

BRIDGE = F.FeaturesDict({
    "steps": F.Dataset({
        "action": F.FeaturesDict({
            "open_gripper": T((), np.bool_),
            "rotation_delta": T((3,)),
            "terminate_episode": T(()),
            "world_vector": T((3,)),
        }),
        "is_first": T((), np.bool_), "is_last": T((), np.bool_), "is_terminal": T((), np.bool_),
        "observation": F.FeaturesDict({
            "image": F.Image(shape=(256, 256, 3), dtype=np.uint8, encoding_format="jpeg"),
            "natural_language_embedding": T((512,)),
            "natural_language_instruction": T((), np.str_),
            "state": T((7,)),
        }),
        "reward": F.Scalar(dtype=np.float32),
    }),
})


def _zeros(feature, rng):
  """A value for every leaf of a features dict: random where it matters, else zeros."""
  if isinstance(feature, F.FeaturesDict):
    return {k: _zeros(v, rng) for k, v in feature.items()}
  if isinstance(feature, F.Image):
    return rng.integers(0, 256, feature.shape, dtype=np.uint8)
  dtype = np.dtype(feature.np_dtype)
  if dtype.kind in "US" or dtype == np.object_:
    return ""
  return np.zeros(feature.shape, dtype)


def _write(out, name, features, episodes):
  os.makedirs(out)
  info = tfds.core.DatasetInfo(
      builder=tfds.core.dataset_info.DatasetIdentity(name=name, data_dir=out, module_name="",
                                                     version="0.1.0"),
      features=features)
  writer = tfds.core.SequentialWriter(ds_info=info, max_examples_per_shard=2)
  writer.initialize_splits(["train"])
  writer.add_examples({"train": episodes})
  writer.close_all()
  return out


def _fractal_episode(rng, length, success):
  steps = []
  for t in range(length):
    s = _zeros(FRACTAL["steps"].feature, rng)
    s["action"]["world_vector"] = rng.uniform(-0.5, 0.5, 3).astype(np.float32)
    s["action"]["rotation_delta"] = rng.uniform(-0.3, 0.3, 3).astype(np.float32)
    s["action"]["gripper_closedness_action"] = np.float32([rng.choice([-1.0, 1.0])])
    s["action"]["terminate_episode"] = np.int32([1, 0, 0] if t == length - 1 else [0, 1, 0])
    s["observation"]["natural_language_instruction"] = "pick coke can"
    s.update(is_first=t == 0, is_last=t == length - 1, is_terminal=t == length - 1,
             reward=np.float32(success and t == length - 1))
    steps.append(s)
  ep = {k: _zeros(v, rng) for k, v in FRACTAL.items() if k != "steps"}
  return {**ep, "steps": steps}


def _bridge_episode(rng, length, success):
  steps = []
  for t in range(length):
    s = _zeros(BRIDGE["steps"].feature, rng)
    s["action"]["world_vector"] = rng.uniform(-0.05, 0.05, 3).astype(np.float32)
    s["action"]["rotation_delta"] = rng.uniform(-0.1, 0.1, 3).astype(np.float32)
    s["action"]["open_gripper"] = bool(t % 2)
    s["action"]["terminate_episode"] = np.float32(t == length - 1)
    s["observation"]["state"] = rng.standard_normal(7).astype(np.float32)
    s["observation"]["natural_language_instruction"] = "put the spoon in the pot"
    s.update(is_first=t == 0, is_last=t == length - 1, is_terminal=t == length - 1,
             reward=np.float32(success and t == length - 1))
    steps.append(s)
  return {"steps": steps}


@pytest.fixture(scope="module")
def oxe(tmp_path_factory):
  rng = np.random.default_rng(0)
  root = tmp_path_factory.mktemp("oxe")
  fractal = [_fractal_episode(rng, n, n % 2 == 0) for n in (4, 5, 6)]
  bridge = [_bridge_episode(rng, n, n % 2 == 1) for n in (3, 5, 4)]
  return {
      "fractal": (_write(str(root / "fractal20220817_data" / "0.1.0"), "fractal20220817_data",
                         FRACTAL, fractal), fractal),
      "bridge": (_write(str(root / "bridge" / "0.1.0"), "bridge", BRIDGE, bridge), bridge),
  }


def _spec(name):
  return robot.RobotSpec.from_config(
      qconfig.load_config_file(os.path.join(REPO, "robot_configs", f"{name}.py")).robot)


def _expected_actions(name, episode):
  rows = []
  for s in episode["steps"]:
    a = s["action"]
    if name == "fractal":
      rows.append([*a["world_vector"], *a["rotation_delta"], *a["gripper_closedness_action"],
                   float(np.argmax(a["terminate_episode"]))])
    else:
      rows.append([*a["world_vector"], *a["rotation_delta"], float(a["open_gripper"])])
  return np.asarray(rows, np.float32)


@pytest.mark.parametrize("name", ["fractal", "bridge"])
def test_published_layout_reads_validates_and_assembles_the_action(oxe, name):
  data, written = oxe[name]
  spec = _spec(name)
  episodes = list(rlds_reader.iterate_episodes(data, spec))
  assert len(episodes) == len(written)
  for (_, ep), want in zip(episodes, written):
    np.testing.assert_array_equal(ep["steps"]["action"], _expected_actions(name, want))
    assert (ep["steps"]["discount"] == 1).all()  # neither dataset stores one
    assert set(ep["steps"]["language_instruction"]) == {
        want["steps"][0]["observation"]["natural_language_instruction"]}
  report = validate_tool.validate(data, spec)
  assert report["num_episodes"] == 3 and report["num_steps"] == len(
      [s for ep in written for s in ep["steps"]])
  stats = statistics.compute(data, spec)  # what the tokenizer's quantile bounds come from
  assert stats["num_episodes"] == 3


def test_a_wrong_action_mapping_is_refused_naming_the_part(oxe):
  data, _ = oxe["fractal"]
  cfg = qconfig.load_config_file(os.path.join(REPO, "robot_configs", "fractal.py"))
  cfg.robot.rlds_keys.action = "action/world_vector,action/rotation_delta,action/gripper"
  with pytest.raises(DataError, match="action/gripper"):
    validate_tool.validate(data, robot.RobotSpec.from_config(cfg.robot))
  cfg.robot.rlds_keys.action = "action/world_vector,action/rotation_delta"
  with pytest.raises(DataError, match="give 6 dimensions.*has 8"):
    validate_tool.validate(data, robot.RobotSpec.from_config(cfg.robot))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fractal", "bridge"])
def test_two_training_steps_from_the_published_layout(oxe, name, tmp_path):
  data, _ = oxe[name]
  cfg = qconfig.load_config_file(os.path.join(REPO, "robot_configs", f"{name}.py"))
  cfg.data.dir = data
  cfg.data.image_size = (32, 40) if name == "fractal" else (32, 32)
  cfg.data.shuffle_buffer = 16
  cfg.model.rt1_small.update(width=32, depth=1, num_heads=2, conv_channels=(8, 16, 16),
                             tokens_per_image=2, text_dim=16)
  cfg.train.update(num_steps=2, batch_size=4, checkpoint_every=2, log_every=1)
  summary = train.train(cfg, str(tmp_path / name))
  assert summary["step"] == 2 and np.isfinite(summary["loss_pi"]) and np.isfinite(summary["loss_p"])
