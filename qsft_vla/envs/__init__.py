"""Simulator adapters by id: `make_env("babyai:BabyAI-GoToLocal-v0", seed=0)`.

Ids are "<prefix>:<name>[:<option>]": "babyai:<BabyAI level>" (minigrid; option
"strict": a wrong pickup / door / placement ends the episode as a failure, as
BabyAI's strict verifier defines it) and "metaworld:<task>-v3". Each adapter
implements qsft_vla.envs.base.SimEnv and matches one robot config
(`robot_config_for`). A simulator's package is only
imported when one of its ids is used. TF-free.
"""

from __future__ import annotations

import importlib

from qsft_vla.envs.base import SimEnv

# prefix -> (module, adapter class, robot config module, example id, options)
_ADAPTERS = {
    "babyai": ("qsft_vla.envs.babyai", "BabyAIEnv", "robot_configs.babyai",
               "babyai:BabyAI-GoToLocal-v0", ("strict",)),
    "metaworld": ("qsft_vla.envs.metaworld", "MetaWorldEnv", "robot_configs.metaworld",
                  "metaworld:pick-place-v3", ()),
}


def parse_env_id(env_id: str) -> tuple[str, str]:
  """(prefix, name) of "<prefix>:<name>[:<option>]" (the name keeps its option);
  ValueError for an unknown prefix or option. Imports nothing."""
  prefix, sep, name = str(env_id).partition(":")
  if not sep or prefix not in _ADAPTERS or not name:
    known = ", ".join(f"{p}: (e.g. {a[3]})" for p, a in _ADAPTERS.items())
    raise ValueError(f"unknown environment id {env_id!r}: expected <prefix>:<name> with a "
                     f"known prefix: {known}")
  base, sep, option = name.partition(":")
  allowed = _ADAPTERS[prefix][4]
  if sep and option not in allowed:
    raise ValueError(f"unknown option {option!r} in environment id {env_id!r}; {prefix} "
                     + (f"takes {', '.join(allowed)}" if allowed else "takes none"))
  if not base:
    raise ValueError(f"environment id {env_id!r} has no name before its option")
  return prefix, name


def known_names(prefix: str) -> list[str]:
  """The levels/tasks an adapter knows (imports the simulator)."""
  module = importlib.import_module(_ADAPTERS[prefix][0])
  return module.levels() if prefix == "babyai" else module.tasks()


def check_env_id(env_id: str) -> None:
  """Raises ValueError naming the known prefixes, or the known levels/tasks, for a bad id."""
  prefix, name = parse_env_id(env_id)
  names = known_names(prefix)
  name = name.partition(":")[0]
  if name not in names:
    raise ValueError(f"unknown {prefix} name {name!r} in {env_id!r}; known: {', '.join(names)}")


def adapter_class(env_id: str) -> type[SimEnv]:
  """The SimEnv subclass for `env_id` (imports the simulator; checks the id)."""
  check_env_id(env_id)
  module_name, cls_name = _ADAPTERS[parse_env_id(env_id)[0]][:2]
  return getattr(importlib.import_module(module_name), cls_name)


def make_env(env_id: str, seed: int = 0, **kwargs) -> SimEnv:
  """The adapter for `env_id`; `seed` seeds resets called without one.

  kwargs go to the adapter: max_steps (both), camera and task_index (Meta-World).
  """
  return adapter_class(env_id)(parse_env_id(env_id)[1], seed=seed, **kwargs)


def robot_config_for(env_id: str) -> str:
  """The robot config module (in the robot_configs package) of an env id's adapter."""
  return _ADAPTERS[parse_env_id(env_id)[0]][2]


def robot_spec_for(env_id: str):
  """The RobotSpec the adapter's observations and actions follow (its robot config's
  `robot` section, checked field by field)."""
  from qsft_vla import robot  # pylint: disable=g-import-not-at-top
  module = importlib.import_module(robot_config_for(env_id))
  return robot.RobotSpec.from_config(module.get_config().robot, where=module.__file__)


__all__ = ["SimEnv", "adapter_class", "make_env", "check_env_id", "known_names", "robot_config_for",
           "robot_spec_for"]
