"""Checks any RLDS dataset against a robot config.

  python -m data_tools.validate --data=DIR --config=robot_configs/<x>.py[:variant] [--split=train]

Checks, in order: the directory is an RLDS/TFDS dataset with the split; the
steps have every key the robot needs (robot.rlds_keys); the declared features
have the robot's shapes and dtypes (cameras HxWx3 uint8, action [D] float32,
...); then every episode through episode.check_episode: dtypes, shapes,
NaN/Inf, empty episodes, is_first/is_last/is_terminal consistency, actions
outside the bounds (an error with out_of_bounds="reject", counted and reported
as a warning with "clip"). Exit status 0 when valid (with a short summary);
otherwise 1 with one message naming the episode, step, key and what was
expected.
"""

from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TF is imported (CLI noise)

import numpy as np  # pylint: disable=g-import-not-at-top

from qsft_vla.data import rlds_reader  # pylint: disable=g-import-not-at-top
from qsft_vla.data.episode import DataError, check_episode, step_features  # pylint: disable=g-import-not-at-top
from qsft_vla.robot import RobotSpec  # pylint: disable=g-import-not-at-top


def check_features(builder, spec: RobotSpec, where: str) -> None:
  """Fails, naming the key, if a declared step feature has the wrong shape or dtype."""
  want = step_features(spec)
  for name, path in rlds_reader.canonical_step_keys(spec).items():
    if name == "action" and not rlds_reader.action_is_one_vector(spec):
      continue  # its parts: rlds_reader.check_action_features
    feature = rlds_reader.step_feature(builder, path)
    shape = tuple(feature.shape) if feature.shape is not None else None
    np_dtype = getattr(feature, "np_dtype", None)
    dtype = np.dtype(feature.dtype.as_numpy_dtype if np_dtype is None else np_dtype)
    want_shape, want_dtype = want[name]
    if shape != want_shape or dtype != np.dtype(want_dtype):
      what = "string" if want_dtype is np.object_ else np.dtype(want_dtype).name
      got = "string" if dtype == np.object_ else dtype.name
      raise DataError(where, f"dataset declares shape {shape} dtype {got}; robot "
                      f"{spec.name!r} expects shape {want_shape} dtype {what} per step "
                      f"(for {name})", key=path)


def validate(data_dir: str, spec: RobotSpec, split: str = "train",
             out_of_bounds: str | None = None) -> dict[str, Any]:
  """Checks the whole split; raises DataError at the first problem, else returns a report.

  The report: {"data_dir", "split", "num_episodes", "num_steps", "out_of_bounds":
  {dim: count}, "first_out_of_bounds": (episode, step, dim) or None, "warnings": [str]}.
  """
  policy = out_of_bounds or spec.out_of_bounds
  builder = rlds_reader.open_builder(data_dir)
  splits = list(builder.info.splits.keys())
  if split.split("[")[0] not in splits:
    raise DataError(data_dir, f"no split {split!r}; present: {splits}")
  rlds_reader.check_dataset_keys(builder, spec, data_dir)
  check_features(builder, spec, data_dir)

  report = {"data_dir": data_dir, "split": split, "num_episodes": 0, "num_steps": 0,
            "out_of_bounds": {d.name: 0 for d in spec.action_dims
                              if d.kind == "discrete" or d.low is not None},
            "first_out_of_bounds": None, "warnings": []}
  episodes = rlds_reader.iterate_episodes(data_dir, spec, split)
  while True:
    where = f"{data_dir}: episode {report['num_episodes']}"
    try:
      _, episode = next(episodes)
    except StopIteration:
      break
    except DataError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      # A corrupt shard or undecodable image: say which episode could not be read.
      raise DataError(where, f"cannot read: {type(e).__name__}: {e}") from e
    r = check_episode(episode, spec, where, out_of_bounds=policy)
    for dim, n in r["out_of_bounds"].items():
      report["out_of_bounds"][dim] += n
    if r["first_out_of_bounds"] and report["first_out_of_bounds"] is None:
      report["first_out_of_bounds"] = (report["num_episodes"],) + tuple(r["first_out_of_bounds"])
    report["num_episodes"] += 1
    report["num_steps"] += r["length"]
  if report["num_episodes"] == 0:
    raise DataError(data_dir, f"split {split!r} has no episodes")
  total_oob = sum(report["out_of_bounds"].values())
  if total_oob:
    ep, step, dim = report["first_out_of_bounds"]
    per_dim = ", ".join(f"{k}: {v}" for k, v in report["out_of_bounds"].items() if v)
    report["warnings"].append(
        f"{total_oob} action value(s) outside the bounds ({per_dim}; first at episode {ep}, "
        f"step {step}, dimension {dim!r}); out_of_bounds='clip' clips them when tokenizing")
  return report


def format_report(r: dict[str, Any]) -> str:
  lines = [f"valid: {r['data_dir']} (split {r['split']}): {r['num_episodes']} episodes, "
           f"{r['num_steps']} steps"]
  lines += [f"warning: {w}" for w in r["warnings"]]
  return "\n".join(lines)


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("data", None, "RLDS dataset directory.", required=True)
  flags.DEFINE_string("config", None, "Robot config: robot_configs/<x>.py[:variant].",
                      required=True)
  flags.DEFINE_string("split", "train", "Split to check.")


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  from data_tools import cli  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  return cli.run("validate", lambda: format_report(
      validate(f.data, cli.load_robot(f.config), f.split)))


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(main)
