"""Config schema and RobotSpec: the real robot configs load; bad fields fail with their name."""

import json
import os

import pytest

from qsft_vla import config as qconfig
from qsft_vla.robot import RobotSpec

from conftest import REPO


@pytest.mark.parametrize("name", ["babyai", "metaworld"])
def test_robot_configs_load_and_round_trip(name):
  cfg = qconfig.load_config_file(os.path.join(REPO, "robot_configs", f"{name}.py"))
  spec = RobotSpec.from_config(cfg.robot)
  again = RobotSpec.from_config(json.loads(json.dumps(spec.to_dict()))["robot"])
  assert again == spec
  assert spec.camera_names == ("image",)


def test_metaworld_action_space():
  spec = RobotSpec.from_config(qconfig.load_config_file(
      os.path.join(REPO, "robot_configs/metaworld.py")).robot)
  assert [d.name for d in spec.action_dims] == ["dx", "dy", "dz", "gripper"]
  assert all(d.kind == "continuous" and (d.low, d.high, d.bins) == (-1, 1, 256)
             for d in spec.action_dims)
  assert spec.state_dim == 39


def test_babyai_action_space():
  spec = RobotSpec.from_config(qconfig.load_config_file(
      os.path.join(REPO, "robot_configs/babyai.py")).robot)
  (dim,) = spec.action_dims
  assert dim.kind == "discrete" and dim.values == tuple(float(i) for i in range(7))
  assert dim.labels[2] == "forward"


def test_unknown_field_is_named():
  cfg = qconfig.base_config()
  with pytest.raises(AttributeError, match="grippr"):
    cfg.robot.grippr = 1
  with pytest.raises(AttributeError, match="lrr"):
    cfg.data.lrr = 1


def test_missing_required_field_is_named(tmp_path):
  path = tmp_path / "robot.py"
  path.write_text("from qsft_vla import config as q\n"
                  "def get_config():\n  return q.base_config()\n")
  with pytest.raises(qconfig.ConfigError, match="robot.name"):
    qconfig.load_config_file(str(path))


def test_unknown_variant_and_missing_file():
  with pytest.raises(qconfig.ConfigError, match="unknown or repeated variant 'nope'"):
    qconfig.load_config_file(os.path.join(REPO, "robot_configs/babyai.py:nope"))
  with pytest.raises(qconfig.ConfigError, match="not found"):
    qconfig.load_config_file("robot_configs/does_not_exist.py")


def _robot(**changes):
  cfg = qconfig.load_config_file(os.path.join(REPO, "robot_configs/metaworld.py"))
  r = cfg.robot.to_dict()
  for path, value in changes.items():
    node = r
    *head, last = path.split(".")
    for k in head:
      node = node[k]
    node[last] = value
  return r


@pytest.mark.parametrize("changes, message", [
    ({"action.dims.dx.kind": "angular"}, "action.dims.dx.kind"),
    ({"action.dims.dx.bins": 1}, "action.dims.dx.bins"),
    ({"action.dims.dx.low": 2.0}, "action.dims.dx: low"),
    ({"action.dims.dx.high": None}, "set both low and high"),
    ({"action.names": ("dx", "dy", "dz")}, "must name the same"),
    ({"action.out_of_bounds": "wrap"}, "out_of_bounds"),
    ({"cameras": {}}, "cameras"),
    ({"cameras": {"image": {"height": 0, "width": 64}}}, "cameras.image"),
    ({"state_dim": -1}, "state_dim"),
    ({"instruction.source": "fixed"}, "instruction.text"),
    ({"rlds_keys.cameras": {"wrist": "observation/wrist"}}, "unknown camera"),
])
def test_invalid_robot_fields_are_named(changes, message):
  with pytest.raises(qconfig.ConfigError, match=message.replace(".", r"\.")):
    RobotSpec.from_config(_robot(**changes))


def test_discrete_values_must_increase():
  r = _robot()
  r["action"]["dims"]["gripper"] = qconfig.discrete_dim([1.0, -1.0]).to_dict()
  with pytest.raises(qconfig.ConfigError, match="strictly increasing"):
    RobotSpec.from_config(r)


def test_data_section_checks():
  cfg = qconfig.load_config_file(os.path.join(REPO, "robot_configs/babyai.py"))
  cfg.data.dir = ("a", "b")
  cfg.data.weights = (1.0,)
  with pytest.raises(qconfig.ConfigError, match="data.weights"):
    qconfig.validate(cfg)
  cfg.data.weights = (1.0, 3.0)
  qconfig.validate(cfg)
  cfg.data.window = 0
  with pytest.raises(qconfig.ConfigError, match="data.window"):
    qconfig.validate(cfg)
