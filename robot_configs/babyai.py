"""BabyAI (minigrid): an agent in a grid world following a language mission.

One discrete action per step (the 7 minigrid actions), a 56x56 RGB egocentric
partial view (7x7 cells, 8 px each), the mission string as the instruction.
Variants (the learner): qsft (default), bc, filtered_bc; the same data, model
and schedule, so their results compare directly. A backbone variant,
"rt1_pretrained" (FiLM-EfficientNet-Lite0 + MiniLM) or "vlm_smollm2" (SmolLM2-135M
with the action bins in its vocabulary), alone (Q-SFT) or as
"<algorithm>+<backbone>", swaps in a pretrained backbone (config.apply_variant).
Usage: --config=robot_configs/babyai.py[:variant]
"""

from qsft_vla import config as qconfig

MINIGRID_ACTIONS = ("left", "right", "forward", "pickup", "drop", "toggle", "done")


def get_config(variant: str = "qsft"):
  c = qconfig.base_config()
  r = c.robot
  r.name = "babyai"
  r.control_hz = 10.0  # a grid world has no physical rate; used for video playback only
  r.cameras = {"image": {"height": 56, "width": 56}}
  r.state_dim = 0
  r.instruction.source = "step"
  r.action.names = ("action",)
  r.action.dims = {"action": qconfig.discrete_dim(range(len(MINIGRID_ACTIONS)),
                                                  labels=MINIGRID_ACTIONS)}
  r.action.out_of_bounds = "reject"  # an action id outside 0..6 is a data bug
  r.rlds_keys.cameras = {"image": "observation/image"}
  # Sparse success reward in {0, 1}: used as is (QSFT.md).
  c.data.reward_rescale = "auto"
  c.data.dir = "data/babyai_gotolocal_mix"   # scripts/main.sh generates it
  c.data.window = 1
  c.data.shuffle_buffer = 5_000
  c.data.deterministic = True            # cheap at this size; same seed, same run

  # Small enough for a CPU: 56x56 frames -> 7x7 features -> 8 tokens.
  c.model.rt1_small.conv_channels = (16, 32, 32)
  c.model.rt1_small.width = 64
  c.model.rt1_small.depth = 2
  c.model.rt1_small.num_heads = 4

  c.learner.gamma = 0.95                 # ALFWorld / 20Q column of the paper
  c.learner.lr_pi = 1e-3                  # a small model from scratch
  c.learner.lr_p = 1e-3
  qconfig.measured_learner(c)            # Monte-Carlo target, sample at beta 32
  # pi_phi a head on p_theta's network: a Q-SFT step costs 1.02x a BC step (separate
  # networks: 2.04x) at the same validation success on the three BabyAI tasks of the
  # suite (results/policy_quality_exploration.md, "Cost: pi_phi as a head").
  c.learner.architecture = "pi_head"

  c.train.num_steps = 2_000
  c.train.batch_size = 64
  c.train.checkpoint_every = 500
  c.train.log_every = 50

  c.eval.env = "babyai:BabyAI-GoToLocal-v0"
  c.eval.episodes = 100
  c.eval.max_steps = 64
  qconfig.apply_variant(c, variant, where="robot_configs/babyai.py")
  return c
