"""The LLaVA-style VLM (models/vlm.py): action tokens as LM vocabulary ids.

Fast tests use a tiny random Llama folder (2 layers, width 64, vocab 512, so
the action ids are 256..511) written by a fixture; variables come from
jax.eval_shape + pretrained weights + random projectors (a real model.init
compiles EfficientNet's init, ~13 s on CPU). One slow test runs the real
SmolLM2-135M. Key checks: KV decoding == teacher forcing, and the outputs are
the LM's own next-token logits at the action / dummy ids ("no new heads").
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_without_tensorflow
from qsft_vla.config import ConfigError
from qsft_vla.models import efficientnet
from qsft_vla.models.llama import Llama
from qsft_vla.models.vlm import VLM, VLMConfig, init_variables, pretrained_variables
from qsft_vla.weights import hf

TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)


def tiny_llama_tensors(seed=0):
  rng = np.random.default_rng(seed)
  v, c, i = TINY["vocab_size"], TINY["hidden_size"], TINY["intermediate_size"]
  q = c
  kv = c // TINY["num_attention_heads"] * TINY["num_key_value_heads"]
  t = {"model.embed_tokens.weight": rng.normal(size=(v, c)),
       "model.norm.weight": 1 + 0.1 * rng.normal(size=(c,))}
  for layer in range(TINY["num_hidden_layers"]):
    p = f"model.layers.{layer}."
    for name, shape in (("self_attn.q_proj.weight", (q, c)), ("self_attn.k_proj.weight", (kv, c)),
                        ("self_attn.v_proj.weight", (kv, c)), ("self_attn.o_proj.weight", (c, q)),
                        ("mlp.gate_proj.weight", (i, c)), ("mlp.up_proj.weight", (i, c)),
                        ("mlp.down_proj.weight", (c, i))):
      t[p + name] = rng.normal(size=shape) / np.sqrt(shape[1])
    for name in ("input_layernorm.weight", "post_attention_layernorm.weight"):
      t[p + name] = 1 + 0.1 * rng.normal(size=(c,))
  return {k: v.astype(np.float32) for k, v in t.items()}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
  config = dict(model_type="llama", hidden_act="silu", rope_theta=10000.0, rms_norm_eps=1e-5,
                tie_word_embeddings=True, max_position_embeddings=512, **TINY)
  return hf.save_folder(str(tmp_path_factory.mktemp("lm") / "tiny_llama"), config,
                        tiny_llama_tensors())


def tiny_config(folder, **overrides):
  base = dict(num_action_dims=3, action_vocab=7, window=2, cameras=("image", "wrist"),
              state_dim=5, max_text_len=6, lm_folder=folder, projector_hidden=32)
  return VLMConfig(**{**base, **overrides})


def make_inputs(cfg, batch=3, seed=0, size=32, text_vocab=300):
  rng = np.random.default_rng(seed)
  obs = {c: rng.integers(0, 256, (batch, cfg.window, size, size, 3), dtype=np.uint8)
         for c in cfg.cameras}
  if cfg.state_dim:
    obs["state"] = rng.normal(size=(batch, cfg.window, cfg.state_dim)).astype(np.float32)
  history_mask = np.ones((batch, cfg.window), bool)
  history_mask[0, :-1] = False  # example 0 is at the start of its episode
  text_ids = rng.integers(20, text_vocab, (batch, cfg.max_text_len)).astype(np.int32)
  text_mask = np.arange(cfg.max_text_len)[None] < rng.integers(2, cfg.max_text_len + 1,
                                                               (batch, 1))
  tokens = rng.integers(0, cfg.action_vocab, (batch, cfg.num_action_dims)).astype(np.int32)
  return obs, history_mask, text_ids, text_mask, tokens


def fast_variables(model, cfg, inputs, seed=0):
  """Variables without model.init: shapes from eval_shape, random new layers, pretrained rest."""
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), *inputs)
  rng = np.random.default_rng(seed)
  rand = jax.tree_util.tree_map(
      lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.5 / np.sqrt(max(s.shape[0], 1)),
                            s.dtype), shapes)
  return pretrained_variables(cfg, rand)


_CACHE = {}


def setup(cfg):
  """(model, variables, jitted forward, encode, step), built once per config."""
  if cfg not in _CACHE:
    model = VLM(cfg)
    variables = fast_variables(model, cfg, make_inputs(cfg, batch=1))
    encode = jax.jit(lambda p, *a: model.apply(p, *a, method=VLM.encode_prefix))
    step = jax.jit(lambda p, c, prev, j: model.apply(p, c, prev, j, method=VLM.decode_step))
    _CACHE[cfg] = (model, variables, jax.jit(model.apply), encode, step)
  return _CACHE[cfg]


def decode_all(cfg, variables, inputs, tokens):
  _, _, _, encode, step = setup(cfg)
  cache = encode(variables, *inputs)
  prev = jnp.full((tokens.shape[0],), 3, jnp.int32)  # ignored at j = 0
  out = []
  for j in range(cfg.num_action_dims):
    logits, cache = step(variables, cache, prev, jnp.int32(j))
    out.append(logits)
    prev = jnp.asarray(tokens[:, j])
  return jnp.stack(out, axis=-2)


def lm_full_logits(model, variables, cfg, inputs, tokens):
  """The plain LM's full-vocabulary logits at the action positions [B, D, vocab]."""
  # pylint: disable=protected-access
  @jax.jit
  def run(variables, inputs, tokens):
    prefix, valid = model.apply(variables, *inputs, False, method=lambda m, *a: m._prefix(*a))
    ids = model.apply(variables, tokens, method=lambda m, t: m._action_ids(t))
    mask = jnp.concatenate([valid, jnp.ones(ids.shape, bool)], axis=1)
    logits = Llama(cfg.lm()).apply({"params": variables["params"]["lm"]}, ids,
                                   attention_mask=mask, prefix_embeds=prefix)
    return logits[:, cfg.prefix_len:]

  return run(variables, inputs, jnp.asarray(tokens))


# ---------------------------------------------------------------- config

def test_config_ids_roundtrip_and_refusals(tiny_folder):
  cfg = tiny_config(tiny_folder)
  ids = cfg.output_vocab_ids()
  # The last 256 ids of the vocabulary (512 - 256 = 256), then the dummy.
  np.testing.assert_array_equal(ids, list(range(256, 263)) + [16])
  assert cfg.dummy_id == 7 and cfg.output_size == 8
  assert cfg.prefix_len == 2 * (2 * 4 + 1) + 6 and cfg.seq_len == cfg.prefix_len + 3
  assert VLMConfig.from_dict(cfg.to_dict()) == cfg
  with pytest.raises(ConfigError, match="unknown VLMConfig fields"):
    VLMConfig.from_dict({**cfg.to_dict(), "width": 3})
  with pytest.raises(ValueError, match="K must be <= 256"):
    tiny_config(tiny_folder, action_vocab=257)
  with pytest.raises(ValueError, match="num_output_heads"):
    tiny_config(tiny_folder, num_output_heads=3)
  with pytest.raises(ValueError, match="collides"):
    tiny_config(tiny_folder, dummy_vocab_id=258).output_vocab_ids()
  with pytest.raises(ValueError, match="outside the LM vocabulary"):
    tiny_config(tiny_folder, action_id_offset=510).output_vocab_ids()


def test_for_robot(metaworld_spec, tiny_folder):
  from qsft_vla.tokenizers.action import ActionTokenizer  # pylint: disable=g-import-not-at-top
  tok = ActionTokenizer.from_robot(metaworld_spec)
  cfg = VLMConfig.for_robot(metaworld_spec, tok, window=2, lm_folder=tiny_folder)
  assert cfg.num_action_dims == tok.num_dims and cfg.action_vocab == tok.vocab_size
  assert cfg.state_dim == metaworld_spec.state_dim and cfg.window == 2


def test_imports_without_tensorflow_or_torch():
  out = run_without_tensorflow("""
      import sys
      from qsft_vla.models import vlm
      assert "torch" not in sys.modules
      print("VLM OK")
  """)
  assert "VLM OK" in out


# ---------------------------------------------------------------- model

@pytest.mark.parametrize("heads", [1, 2])
def test_shapes_and_kv_cache_decode_equals_teacher_forcing(tiny_folder, heads):
  cfg = tiny_config(tiny_folder, num_output_heads=heads)
  _, variables, forward, _, _ = setup(cfg)
  *inputs, tokens = make_inputs(cfg, batch=3, seed=2)
  forced = forward(variables, *inputs, tokens)
  lead = (heads,) if heads > 1 else ()
  assert forced.shape == lead + (3, cfg.num_action_dims, cfg.output_size)
  assert forced.dtype == jnp.float32 and np.isfinite(np.asarray(forced)).all()
  stepped = decode_all(cfg, variables, inputs, tokens)
  np.testing.assert_allclose(np.asarray(stepped), np.asarray(forced), atol=1e-4, rtol=1e-4)
  # Position 0 in one pass without a cache (what the controller runs for D = 1).
  model = VLM(cfg)
  first = jax.jit(lambda v, *a: model.apply(v, *a, method=VLM.first_action_logits))(
      variables, *inputs)
  np.testing.assert_allclose(np.asarray(first), np.asarray(forced[..., 0, :]), atol=1e-4,
                             rtol=1e-4)


@pytest.mark.parametrize("heads", [1, 2])
def test_outputs_are_the_lms_own_logits(tiny_folder, heads):
  """No new heads: output k is the LM's logit of vocab id offset + k, output K the dummy's."""
  cfg = tiny_config(tiny_folder, num_output_heads=heads)
  model, variables, forward, _, _ = setup(cfg)
  *inputs, tokens = make_inputs(cfg, batch=2, seed=3)
  out = np.asarray(forward(variables, *inputs, tokens))
  full = np.asarray(lm_full_logits(model, variables, cfg, inputs, tokens))
  expected = full[..., cfg.output_vocab_ids()]
  for h in range(heads):  # both heads start as the LM head (pretrained_variables)
    np.testing.assert_allclose(out[h] if heads > 1 else out, expected, atol=1e-4, rtol=1e-4)


def test_padding_is_ignored_and_real_inputs_matter(tiny_folder):
  cfg = tiny_config(tiny_folder)
  _, variables, forward, _, _ = setup(cfg)
  obs, hm, ti, tm, tokens = make_inputs(cfg, batch=3)
  assert not hm[0, 0] and hm[1, 0]
  tm[2, -2:] = False
  obs2 = {k: v.copy() for k, v in obs.items()}
  obs2["image"][0, 0] = 255 - obs2["image"][0, 0]   # padded frame of example 0
  obs2["state"][0, 0] += 5.0
  obs2["wrist"][1, 0] = 255 - obs2["wrist"][1, 0]   # a real frame of example 1: must matter
  ti2 = ti.copy()
  ti2[2, -2:] = (ti2[2, -2:] + 7) % 300             # padded text of example 2
  a = np.asarray(forward(variables, obs, hm, ti, tm, tokens))
  b = np.asarray(forward(variables, obs2, hm, ti2, tm, tokens))
  np.testing.assert_allclose(a[0], b[0], atol=1e-5)
  assert np.abs(a[1] - b[1]).max() > 1e-3
  np.testing.assert_allclose(a[2], b[2], atol=1e-5)
  ti3 = ti.copy()
  ti3[:, 0] = (ti3[:, 0] + 11) % 300                 # a real instruction token: must matter
  c = np.asarray(forward(variables, obs, hm, ti3, tm, tokens))
  assert (np.abs(c - a).max(axis=(1, 2)) > 1e-3).all()


def test_causality_over_action_tokens(tiny_folder):
  cfg = tiny_config(tiny_folder)
  _, variables, forward, _, _ = setup(cfg)
  *inputs, tokens = make_inputs(cfg, batch=3)
  base = np.asarray(forward(variables, *inputs, tokens))
  for j in range(cfg.num_action_dims):
    changed = tokens.copy()
    changed[:, j] = (changed[:, j] + 3) % cfg.action_vocab
    out = np.asarray(forward(variables, *inputs, changed))
    np.testing.assert_allclose(out[:, :j + 1], base[:, :j + 1], atol=1e-6)
    for later in range(j + 1, cfg.num_action_dims):
      assert np.abs(out[:, later] - base[:, later]).max() > 1e-4, (j, later)


def test_pretrained_variables_fill_lm_and_vision(tiny_folder):
  cfg = tiny_config(tiny_folder, num_output_heads=2)
  _, variables, _, _, _ = setup(cfg)
  p = variables["params"]
  emb = tiny_llama_tensors()["model.embed_tokens.weight"]
  np.testing.assert_array_equal(np.asarray(p["lm"]["embed_tokens"]["embedding"]), emb)
  np.testing.assert_array_equal(np.asarray(p["head"]), emb[cfg.output_vocab_ids()])
  np.testing.assert_array_equal(np.asarray(p["head_1"]), np.asarray(p["head"]))
  # Batch norms are folded: nothing outside "params" for the learner to train.
  assert set(variables) == {"params"}
  eff_model, eff = efficientnet.load_efficientnet_lite0(num_classes=None)
  np.testing.assert_array_equal(np.asarray(p["vision"]["conv_stem"]["kernel"]),
                                eff["params"]["conv_stem"]["kernel"])
  # The VLM's vision features are EfficientNet-Lite0's (with running-stat batch norms).
  images = np.random.default_rng(3).integers(0, 256, (2, 64, 64, 3), np.uint8)
  want = eff_model.apply(eff, efficientnet.normalize(images), method=eff_model.features)
  got = VLM(cfg).apply(variables, images, method=lambda m, x: m.vision.features(x))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4)
  bad = dict(tiny_llama_tensors())
  bad["model.norm.weight"] = bad["model.norm.weight"][:10]
  with pytest.raises(ValueError, match="model.norm.weight"):
    pretrained_variables(cfg, variables, lm_tensors=bad)


def test_precomputed_instruction_gives_the_same_cache(tiny_folder):
  cfg = tiny_config(tiny_folder, window=1, cameras=("image",))
  model, variables, _, _, _ = setup(cfg)
  *inputs, _ = make_inputs(cfg, batch=2, seed=6)
  encoded = model.apply(variables, inputs[2], inputs[3], method=VLM.encode_instruction)
  assert encoded.shape == (2, cfg.max_text_len, TINY["hidden_size"])
  fresh = model.apply(variables, *inputs, method=VLM.encode_prefix)
  cached = model.apply(variables, *inputs, encoded, method=VLM.encode_prefix)
  for a, b in zip(jax.tree_util.tree_leaves(fresh), jax.tree_util.tree_leaves(cached)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_freeze_vision_stops_gradients(tiny_folder):
  cfg = tiny_config(tiny_folder, freeze_vision=True, window=1, cameras=("image",), state_dim=0)
  model, variables, _, _, _ = setup(cfg)
  *inputs, tokens = make_inputs(cfg, batch=2)

  def loss(params):
    logits = model.apply({**variables, "params": params}, *inputs, tokens)
    return jax.nn.logsumexp(logits, axis=-1).sum()

  grads = jax.jit(jax.grad(loss))(variables["params"])
  norm = lambda t: float(sum(jnp.abs(x).sum() for x in jax.tree_util.tree_leaves(t)))
  assert norm(grads["vision"]) == 0.0
  assert norm(grads["image_proj"]) > 0.0 and norm(grads["lm"]) > 0.0


def test_init_variables_pretrained_plus_fresh_new_layers(tiny_folder):
  cfg = tiny_config(tiny_folder, window=1, cameras=("image",))
  model = VLM(cfg)
  inputs = make_inputs(cfg, batch=1)
  v = init_variables(model, jax.random.PRNGKey(0), *inputs)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), *inputs)
  assert (jax.tree_util.tree_structure(jax.tree_util.tree_map(np.shape, v))
          == jax.tree_util.tree_structure(jax.tree_util.tree_map(np.shape, shapes)))
  for a, b in zip(jax.tree_util.tree_leaves(v), jax.tree_util.tree_leaves(shapes)):
    assert a.shape == b.shape and a.dtype == b.dtype
  np.testing.assert_array_equal(np.asarray(v["params"]["lm"]["norm"]["scale"]),
                                tiny_llama_tensors()["model.norm.weight"])
  fc1 = v["params"]["image_proj"]["fc1"]
  assert not np.asarray(fc1["bias"]).any() and 0 < float(np.std(fc1["kernel"])) < 0.1


def test_lm_layers_keeps_the_first_layers_of_the_pretrained_lm(tiny_folder):
  # The tiny LM has 2 layers: lm_layers=1 keeps layer 0's weights and drops layer 1.
  cfg = tiny_config(tiny_folder, window=1, cameras=("image",), lm_layers=1)
  assert cfg.lm().num_hidden_layers == 1
  v = init_variables(VLM(cfg), jax.random.PRNGKey(0), *make_inputs(cfg, batch=1))
  lm = v["params"]["lm"]
  assert "layers_0" in lm and "layers_1" not in lm
  np.testing.assert_array_equal(
      np.asarray(lm["layers_0"]["self_attn"]["q_proj"]["kernel"]),
      tiny_llama_tensors()["model.layers.0.self_attn.q_proj.weight"].T)
  full = tiny_config(tiny_folder, window=1, cameras=("image",))
  assert full.lm().num_hidden_layers == 2
  with pytest.raises(ValueError, match="lm_layers=3, but the LM has only 2"):
    tiny_config(tiny_folder, lm_layers=3).lm()
  with pytest.raises(ValueError, match="lm_layers must be >= 1"):
    tiny_config(tiny_folder, lm_layers=0)


def test_bfloat16_compute(tiny_folder):
  cfg = tiny_config(tiny_folder, window=1, cameras=("image",), compute_dtype="bfloat16")
  f32 = dataclasses.replace(cfg, compute_dtype="float32")
  *inputs, tokens = make_inputs(cfg, batch=2, seed=4)
  _, variables, _, _, _ = setup(f32)
  a = np.asarray(setup(f32)[2](variables, *inputs, tokens))
  b = setup(cfg)[2](variables, *inputs, tokens)  # same float32 params, bf16 compute
  assert b.dtype == jnp.float32 and np.isfinite(np.asarray(b)).all()
  assert np.corrcoef(a.ravel(), np.asarray(b).ravel())[0, 1] > 0.98


# ---------------------------------------------------------------- real SmolLM2

@pytest.mark.slow
def test_smollm2_kv_decode_and_no_new_heads():
  cfg = VLMConfig(num_action_dims=4, action_vocab=256, window=2, state_dim=4, max_text_len=8,
                  projector_hidden=64)
  np.testing.assert_array_equal(cfg.output_vocab_ids()[[0, 255, 256]], [48896, 49151, 16])
  model, variables, forward, _, _ = setup(cfg)
  *inputs, tokens = make_inputs(cfg, batch=2, seed=5, size=64, text_vocab=5000)
  forced = np.asarray(forward(variables, *inputs, tokens))
  stepped = np.asarray(decode_all(cfg, variables, inputs, tokens))
  np.testing.assert_allclose(stepped, forced, atol=2e-4, rtol=1e-4)
  full = np.asarray(lm_full_logits(model, variables, cfg, inputs, tokens))
  np.testing.assert_allclose(forced, full[..., cfg.output_vocab_ids()], atol=2e-4, rtol=1e-4)
  assert dataclasses.replace(cfg, lm_folder=None) == cfg
