"""The RT-1 style pretrained backbone (variant rt1_pretrained): FiLM-EfficientNet-Lite0
with ImageNet weights and the MiniLM instruction embedding inside RT1Small.

Small images (32x32 -> a 1x1 feature map) and a depth-1 transformer keep it fast.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qsft_vla import config as qconfig
from qsft_vla.models import efficientnet, minilm, rt1_small
from qsft_vla.models.rt1_small import RT1Small, RT1SmallConfig

from conftest import REPO
from test_rt1_small import decode_all

BABYAI = os.path.join(REPO, "robot_configs", "babyai.py")
SIZE = 32


def _cfg(**kw):
  base = dict(num_action_dims=3, action_vocab=7, window=2, state_dim=2, width=32, depth=1,
              num_heads=2, tokens_per_image=2, image_encoder="efficientnet_lite0",
              text_encoder="minilm")
  return RT1SmallConfig(**{**base, **kw})


def _inputs(cfg, batch=2, seed=0):
  rng = np.random.default_rng(seed)
  obs = {"image": rng.integers(0, 256, (batch, cfg.window, SIZE, SIZE, 3), dtype=np.uint8),
         "state": rng.normal(size=(batch, cfg.window, cfg.state_dim)).astype(np.float32)}
  hm = np.ones((batch, cfg.window), bool)
  hm[0, 0] = False
  ti = rng.integers(1000, 30000, (batch, cfg.max_text_len)).astype(np.int32)
  tm = np.arange(cfg.max_text_len)[None] < np.array([[5], [9]])[:batch]
  return obs, hm, ti, tm


@pytest.fixture(scope="module")
def model_and_vars():
  cfg = _cfg()
  model = RT1Small(cfg)
  obs, hm, ti, tm = _inputs(cfg)
  tokens = np.zeros((2, cfg.num_action_dims), np.int32)
  variables = jax.jit(model.init, static_argnums=6)(jax.random.PRNGKey(0), obs, hm, ti, tm,
                                                    tokens, False)
  return cfg, model, rt1_small.pretrained_variables(cfg, variables)


def test_features_equal_pretrained_efficientnet_with_film_at_identity(model_and_vars):
  cfg, model, variables = model_and_vars
  images = np.random.default_rng(1).integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
  cond = np.random.default_rng(2).normal(size=(2, 384)).astype(np.float32)  # any condition
  ours = model.apply(variables, images, cond,
                     method=lambda m, i, c: m.image_encoder.features(i, c))
  ref_model, ref_vars = efficientnet.load_efficientnet_lite0(num_classes=None)
  ref = ref_model.apply(ref_vars, efficientnet.normalize(images),
                        method=efficientnet.EfficientNetLite0.features)
  assert ours.shape == ref.shape == (2, 1, 1, 1280)
  np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-4, atol=1e-4)
  # The condition matters once FiLM moves away from identity.
  film = variables["params"]["image_encoder"]["film_0"]
  assert float(jnp.abs(film["dgamma"]["kernel"]).max()) == 0.0


def test_instruction_embedding_is_minilm(model_and_vars):
  cfg, model, variables = model_and_vars
  _, _, ti, tm = _inputs(cfg)
  ours = model.apply(variables, ti, tm, method=lambda m, i, t: m._instruction(i, t))  # pylint: disable=protected-access
  ref_model, ref_vars, _ = minilm.load_minilm()
  ref = ref_model.apply(ref_vars, ti, tm)
  assert ours.shape == (2, 384)
  np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_kv_cache_decode_equals_teacher_forcing(model_and_vars):
  cfg, model, variables = model_and_vars
  inputs = _inputs(cfg)
  tokens = np.array([[1, 5, 0], [6, 2, 3]], np.int32)
  full = jax.jit(model.apply)(variables, *inputs, tokens)
  stepped = decode_all(model, variables, inputs, tokens)
  np.testing.assert_allclose(np.asarray(stepped), np.asarray(full), rtol=1e-4, atol=1e-4)


def test_config_round_trips_and_rejects_bad_encoders():
  cfg = _cfg()
  assert RT1SmallConfig.from_dict(cfg.to_dict()) == cfg
  with pytest.raises(ValueError, match="image_encoder"):
    _cfg(image_encoder="resnet")
  with pytest.raises(ValueError, match="text_vocab"):
    _cfg(text_vocab=100)


def plain_qsft_beta():
  return qconfig.load_config_file(f"{BABYAI}:qsft").learner.beta


def test_variant_parsing():
  c = qconfig.load_config_file(f"{BABYAI}:bc+rt1_pretrained")
  assert c.learner.algorithm == "bc" and c.learner.beta == 0.0
  assert c.model.rt1_small.image_encoder == "efficientnet_lite0" and c.model.rt1_small.text_encoder == "minilm"
  q = qconfig.load_config_file(f"{BABYAI}:rt1_pretrained")
  assert q.learner.algorithm == "qsft" and q.learner.beta == plain_qsft_beta()
  plain = qconfig.load_config_file(f"{BABYAI}:bc")
  assert plain.model.rt1_small.image_encoder == "conv" and plain.learner.lr_pi == 1e-3
  with pytest.raises(qconfig.ConfigError, match="unknown or repeated variant 'nope'.*rt1_pretrained"):
    qconfig.load_config_file(f"{BABYAI}:bc+nope")
  with pytest.raises(qconfig.ConfigError, match="more than one"):
    qconfig.load_config_file(f"{BABYAI}:bc+qsft")
