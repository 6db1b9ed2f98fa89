"""The robot-host core imports and runs with TensorFlow, TFDS and Reverb made unimportable.

A robot host (and a modern GPU host with new jax) has none of them, so the
config/robot spec, episode checks, action tokenizer and simulator adapters must
not import them, even indirectly.
"""

from conftest import run_without_tensorflow

CORE = """
    import numpy as np
    from qsft_vla import config, robot
    from qsft_vla.data import episode
    from qsft_vla.tokenizers import ActionTokenizer
    from qsft_vla import envs
    from qsft_vla.learning import losses, polyak, reweighting, targets
    cfg = config.load_config_file("robot_configs/metaworld.py")
    spec = robot.RobotSpec.from_config(cfg.robot)
    tok = ActionTokenizer.from_robot(spec)
    tokens = tok.encode(np.zeros((2, 4), np.float32))
    import jax.numpy as jnp
    assert (np.asarray(tok.encode_jax(jnp.zeros((2, 4)))) == tokens).all()
    env = envs.make_env("babyai:BabyAI-GoToLocal-v0", seed=0)
    obs = env.reset(seed=0)
    env.step(env.expert_action(np.random.default_rng(0), 0.0))
    env.close()
    print("TF-FREE OK")
"""


def test_core_runs_without_tensorflow():
  assert "TF-FREE OK" in run_without_tensorflow(CORE)
