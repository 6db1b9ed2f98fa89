"""RLDSWriter/reader: exact round trip, atomic output, key mapping for foreign RLDS layouts."""

import json
import os

import numpy as np
import pytest

from qsft_vla.data import rlds_reader
from qsft_vla.data.episode import DataError
from qsft_vla.data.rlds_writer import PROVENANCE_FILE, RLDSWriter
from qsft_vla.robot import RobotSpec

from conftest import make_episode


def _leftovers(tmp_path, name):
  return [p for p in os.listdir(tmp_path) if name in p]


def test_round_trip_is_exact(tmp_path, metaworld_spec):
  out = str(tmp_path / "ds")
  eps = [make_episode(metaworld_spec, n, seed=n, terminal=n % 2 == 0) for n in (3, 4, 5)]
  with RLDSWriter(out, metaworld_spec, name="t", provenance={"by": "test"},
                  episodes_per_shard=2) as w:
    for ep in eps:
      w.add(ep)
  read = list(rlds_reader.iterate_episodes(out, metaworld_spec))
  assert [i for i, _ in read] == [0, 1, 2]
  for (_, got), want in zip(read, eps):
    for key in ("action", "reward", "discount", "is_first", "is_last", "is_terminal"):
      np.testing.assert_array_equal(got["steps"][key], want["steps"][key])
    for key in ("image", "state"):
      np.testing.assert_array_equal(got["steps"]["observation"][key],
                                    want["steps"]["observation"][key])
    assert got["steps"]["language_instruction"] == want["steps"]["language_instruction"]
    md = got["episode_metadata"]
    assert md["success"] == bool(want["steps"]["is_terminal"][-1])
    assert md["return"] == pytest.approx(float(want["steps"]["reward"].sum()))
  prov = json.load(open(os.path.join(out, PROVENANCE_FILE)))
  assert prov["num_episodes"] == 3 and prov["num_steps"] == 12
  assert prov["provenance"] == {"by": "test"}
  assert RobotSpec.from_config(prov["robot"]) == metaworld_spec


def test_bad_episode_leaves_nothing(tmp_path, metaworld_spec):
  out = str(tmp_path / "ds")
  bad = make_episode(metaworld_spec, 4, seed=1)
  bad["steps"]["action"][2, 1] = np.nan
  with pytest.raises(DataError, match=r"episode 1, step 2, key 'action'"):
    with RLDSWriter(out, metaworld_spec, name="t") as w:
      w.add(make_episode(metaworld_spec, 4))
      w.add(bad)
  assert _leftovers(tmp_path, "ds") == []


def test_existing_output_is_not_overwritten(tmp_path, metaworld_spec):
  out = tmp_path / "ds"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  with pytest.raises(FileExistsError):
    with RLDSWriter(str(out), metaworld_spec, name="t") as w:
      w.add(make_episode(metaworld_spec, 3))
  assert (out / "keep.txt").read_text() == "mine"


def test_no_episodes_is_an_error(tmp_path, metaworld_spec):
  with pytest.raises(DataError, match="no episodes"):
    with RLDSWriter(str(tmp_path / "ds"), metaworld_spec, name="t"):
      pass
  assert _leftovers(tmp_path, "ds") == []


def test_key_mapping_reads_a_foreign_layout(tmp_path, metaworld_spec):
  """A dataset written with other key names loads through robot.rlds_keys alone."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  out = str(tmp_path / "foreign")
  os.makedirs(out)
  info = tfds.core.DatasetInfo(
      builder=tfds.core.dataset_info.DatasetIdentity(
          name="foreign", data_dir=out, module_name="", version="1.0.0"),
      features=tfds.features.FeaturesDict({"steps": tfds.features.Dataset({
          "observation": {"rgb": tfds.features.Image(shape=(64, 64, 3)),
                          "proprio": tfds.features.Tensor(shape=(39,), dtype=np.float32),
                          "natural_language_instruction": tfds.features.Text()},
          "action": tfds.features.Tensor(shape=(4,), dtype=np.float32),
          "reward": tfds.features.Scalar(dtype=np.float32),
          "discount": tfds.features.Scalar(dtype=np.float32),
          "is_first": np.bool_, "is_last": np.bool_, "is_terminal": np.bool_})}))
  writer = tfds.core.SequentialWriter(ds_info=info, max_examples_per_shard=10)
  writer.initialize_splits(["train"])
  ep = make_episode(metaworld_spec, 3)
  s = ep["steps"]
  writer.add_examples({"train": [{"steps": [
      {"observation": {"rgb": s["observation"]["image"][t], "proprio": s["observation"]["state"][t],
                       "natural_language_instruction": "open the drawer"},
       "action": s["action"][t], "reward": s["reward"][t], "discount": s["discount"][t],
       "is_first": s["is_first"][t], "is_last": s["is_last"][t],
       "is_terminal": s["is_terminal"][t]} for t in range(3)]}]})
  writer.close_splits(["train"])

  with pytest.raises(DataError, match="observation/image"):
    list(rlds_reader.iterate_episodes(out, metaworld_spec))
  robot = metaworld_spec.to_dict()["robot"]
  robot["rlds_keys"].update({"cameras": {"image": "observation/rgb"}, "state": "observation/proprio",
                             "language_instruction": "observation/natural_language_instruction"})
  mapped = RobotSpec.from_config(robot)
  (_, got), = list(rlds_reader.iterate_episodes(out, mapped))
  np.testing.assert_array_equal(got["steps"]["observation"]["image"], s["observation"]["image"])
  np.testing.assert_array_equal(got["steps"]["observation"]["state"], s["observation"]["state"])
  assert got["steps"]["language_instruction"] == ["open the drawer"] * 3


def test_open_builder_errors(tmp_path):
  with pytest.raises(DataError, match="does not exist"):
    rlds_reader.open_builder(str(tmp_path / "nope"))
  with pytest.raises(DataError, match="no dataset_info.json"):
    rlds_reader.open_builder(str(tmp_path))


@pytest.mark.parametrize("robot", ["babyai", "metaworld"])
def test_the_writer_declares_the_step_features_of_episode_step_features(robot, request):
  """One declaration of a robot's RLDS step: what the writer declares (and so what
  the validator and the pipeline, which read the same one, accept) is exactly it."""
  from qsft_vla.data import episode, rlds_writer  # pylint: disable=g-import-not-at-top
  spec = request.getfixturevalue(f"{robot}_spec")
  steps = rlds_writer.episode_features(spec, "png")["steps"].feature
  declared = {}
  for key, f in steps.items():
    for sub, g in (f.items() if key == "observation" else [(None, f)]):
      name = f"{key}/{sub}" if sub else key
      dtype = np.object_ if isinstance(g, rlds_writer.tfds.features.Text) else g.np_dtype
      declared[name] = (tuple(g.shape), np.dtype(dtype))
  want = {k: (s, np.dtype(d)) for k, (s, d) in episode.step_features(spec).items()}
  assert declared == want
  assert set(rlds_reader.canonical_step_keys(spec)) <= set(want)
