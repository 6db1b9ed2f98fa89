"""Small random-init checkpoints written the way training writes them (tests only).

The checkpoints hold the parameter items only (no optimiser state: they are
for inference). At init the learner makes p_theta a copy of pi_phi; here
p_theta gets its own random init instead, so that tests of beta-reweighting
see a p_theta that actually differs from pi_phi.
"""

import dataclasses
import functools
import os

import jax

from qsft_vla import config as qconfig, robot
from qsft_vla.learning import learner as learner_lib
from qsft_vla.models import registry
from qsft_vla.policy import TrainedPolicy, checkpoints, layout
from qsft_vla.tokenizers.action import ActionTokenizer
from conftest import REPO


# Tiny sizes so a checkpoint is written and compiled in about a second.
TINY_MODEL = {"width": 32, "depth": 1, "num_heads": 2, "conv_channels": (8, 16, 16),
              "tokens_per_image": 2, "text_dim": 16}


@functools.lru_cache(maxsize=None)
def _jitted_init(name, model_cfg):
  """model.init compiled once per model config (eager init compiles op by op)."""
  return jax.jit(registry.build(name, model_cfg).init, static_argnums=6)


def write_checkpoint(workdir, robot_name="babyai", algorithm="qsft", architecture="separate",
                     seed=0, step=1, tiny=True, image_size=None, nan_params=False,
                     **config_overrides):
  """Writes a random-init model's checkpoint under workdir/checkpoints/<step>/.

  robot_name: "babyai" | "metaworld" (robot_configs/<name>.py); algorithm: a
  config variant ("qsft", "bc", "filtered_bc"); architecture: "separate" |
  "shared". tiny: small model sizes (else the config file's). image_size:
  (h, w) the model sees (config data.image_size), None = camera size.
  nan_params: one NaN in pi_phi's output layer (what a damaged file would hold).
  config_overrides: "section.field" -> value, e.g. {"learner.beta": 2.0}.
  Returns workdir.
  """
  cfg = qconfig.load_config_file(
      os.path.join(REPO, "robot_configs", f"{robot_name}.py:{algorithm}"))
  cfg.learner.architecture = architecture
  if tiny:
    for k, v in TINY_MODEL.items():
      cfg.model.rt1_small[k] = v
  if image_size is not None:
    cfg.data.image_size = tuple(image_size)
  for name, value in config_overrides.items():
    section, field = name.split(".")
    cfg[section][field] = value

  spec = robot.RobotSpec.from_config(cfg.robot)
  tokenizer = ActionTokenizer.from_robot(spec)
  text = registry.text_tokenizer(cfg)
  fields = {f.name for f in dataclasses.fields(learner_lib.LearnerConfig)}
  learner_cfg = learner_lib.LearnerConfig(
      **{k: v for k, v in qconfig.as_dict(cfg)["learner"].items() if k in fields})
  model_cfg = registry.model_config(cfg, spec, tokenizer, learner_cfg,
                                    text_vocab=text.vocab_size)
  sizes = {c.name: tuple(cfg.data.image_size or (c.height, c.width)) for c in spec.cameras}

  inputs = registry.example_inputs(model_cfg, sizes)
  init = _jitted_init(cfg.model.name, model_cfg)
  key_pi, key_p = jax.random.split(jax.random.PRNGKey(seed))
  variables = init(key_pi, *inputs, False)
  if learner_cfg.num_output_heads == 2:
    # model.init draws head_1 independently of head (the learner would copy it).
    params_pi, params_p = layout.split_shared(variables, learner_cfg)
    params_target = variables
  elif learner_cfg.uses_p:
    params_pi, params_p = variables, init(key_p, *inputs, False)
    params_target = params_p
  else:
    params_pi, params_p, params_target = variables, {}, {}

  if nan_params:
    params_pi = jax.tree_util.tree_map(lambda x: x, params_pi)
    head = params_pi["params"]["head"]
    head["kernel"] = head["kernel"].at[0, 0].set(float("nan"))
  meta = TrainedPolicy(model_name=cfg.model.name, model=None, model_config=model_cfg,
                       learner=learner_cfg, action_tokenizer=tokenizer, text_tokenizer=text,
                       robot=spec, image_sizes=sizes, config=qconfig.as_dict(cfg)).meta()
  mngr = checkpoints.manager(checkpoints.directory(workdir), keep=None)
  checkpoints.save(mngr, step, {"params_pi": params_pi, "params_p": params_p,
                                "params_target": params_target}, meta, text)
  return str(workdir)
