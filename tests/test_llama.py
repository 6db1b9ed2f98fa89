"""Flax Llama vs transformers' torch LlamaForCausalLM, on small random checkpoints
the tests write themselves and on the packaged SmolLM2-135M (converted from GGUF)."""

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from qsft_vla.models import llama  # noqa: E402
from qsft_vla.models.llama import Llama, LlamaConfig  # noqa: E402

from qsft_vla.weights.hf import load_folder  # noqa: E402


def _load(path):
  """(config dict, numpy tensors) of an HF folder."""
  ckpt = load_folder(path)
  return ckpt.config, ckpt.tensors


def _torch_llama(tmp_path, rope_theta, tied, seed=0):
  """A small seeded random LlamaForCausalLM saved as an HF folder; returns (torch model, path).

  Weights are larger than HF's default init (and norms are not all ones) so
  attention is far from uniform and RoPE / head-grouping mistakes show.
  """
  torch.manual_seed(seed)
  cfg = transformers.LlamaConfig(
      vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, rope_theta=rope_theta,
      tie_word_embeddings=tied, max_position_embeddings=128, rms_norm_eps=1e-5,
      initializer_range=0.2, attn_implementation="eager")
  model = transformers.LlamaForCausalLM(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.uniform_(0.5, 1.5)
  path = os.path.join(str(tmp_path), f"llama_{int(rope_theta)}_{tied}")
  model.save_pretrained(path, safe_serialization=True)
  return model, path


def _torch_greedy(tmodel, prompt, n):
  """n greedy tokens by re-running the whole sequence (no EOS handling, unlike generate)."""
  seq = torch.tensor(prompt)
  with torch.no_grad():
    for _ in range(n):
      nxt = tmodel(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)
      seq = torch.cat([seq, nxt], dim=1)
  return seq.numpy()[:, prompt.shape[1]:]


def _hf_positions(mask):
  return np.maximum(np.cumsum(mask, axis=1) - 1, 0)


def _padded_batch(vocab, seed=0):
  """ids [3, 9]: row 0 left-padded by 3, row 1 full, row 2 right-padded by 2."""
  rng = np.random.RandomState(seed)
  ids = rng.randint(0, vocab, (3, 9))
  mask = np.ones((3, 9), bool)
  mask[0, :3] = False
  mask[2, -2:] = False
  return ids, mask


@pytest.mark.parametrize("rope_theta,tied,scan", [(100000.0, True, False), (10000.0, False, True)])
def test_matches_torch_with_padding(tmp_path, rope_theta, tied, scan):
  tmodel, path = _torch_llama(tmp_path, rope_theta, tied)
  config, tensors = _load(path)
  assert ("lm_head.weight" in tensors) == (not tied)
  model, params = llama.from_hf(config, tensors, scan_layers=scan)
  assert model.config.rope_theta == rope_theta and model.config.tie_word_embeddings == tied
  ids, mask = _padded_batch(300)
  ours = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(ids),
                                         attention_mask=jnp.asarray(mask)))
  with torch.no_grad():
    ref = tmodel(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64)),
                 position_ids=torch.tensor(_hf_positions(mask))).logits.numpy()
  diff = np.abs(ours - ref)[mask].max()
  print(f"theta={rope_theta} tied={tied} scan={scan}: max |logit diff| {diff:.2e} "
        f"(logit scale {np.abs(ref[mask]).max():.1f})")
  assert diff < 1e-4
  # The right theta matters: the other one gives clearly different logits.
  other = Llama(LlamaConfig.from_hf(dict(config, rope_theta=110000.0 - rope_theta)))
  wrong = np.asarray(other.apply({"params": params}, jnp.asarray(ids),
                                 attention_mask=jnp.asarray(mask)))
  assert np.abs(wrong - ref)[mask].max() > 100 * diff


def test_inputs_embeds_and_prefix_match_torch(tmp_path):
  tmodel, path = _torch_llama(tmp_path, 100000.0, True)
  model, params = llama.from_hf(*_load(path))
  rng = np.random.RandomState(1)
  prefix = rng.randn(2, 4, 64).astype(np.float32)
  ids = rng.randint(0, 300, (2, 5))
  with torch.no_grad():
    tok = tmodel.get_input_embeddings()(torch.tensor(ids))
    ref = tmodel(inputs_embeds=torch.cat([torch.tensor(prefix), tok], dim=1)).logits.numpy()
  variables = {"params": params}
  via_prefix = model.apply(variables, jnp.asarray(ids), prefix_embeds=jnp.asarray(prefix))
  embeds = jnp.concatenate(
      [prefix, model.apply(variables, jnp.asarray(ids), method=Llama.embed)], axis=1)
  via_embeds, hidden = model.apply(variables, inputs_embeds=embeds, return_hidden=True)
  assert via_prefix.shape == (2, 9, 300) and hidden.shape == (2, 9, 64)
  np.testing.assert_allclose(np.asarray(via_prefix), ref, atol=1e-4)
  np.testing.assert_allclose(np.asarray(via_embeds), ref, atol=1e-4)


@pytest.mark.parametrize("tied,scan", [(True, False), (False, True)])
def test_kv_cache_decode_equals_teacher_forcing(tied, scan):
  cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
  model = Llama(cfg, scan_layers=scan)
  ids, mask = _padded_batch(300, seed=2)
  # Left-padded prompts of 5 columns, then 4 more real tokens for every row.
  mask[2, -2:] = True
  params = model.init(jax.random.PRNGKey(0), jnp.asarray(ids))["params"]
  # Larger weights: sharper attention, so a cache slot mix-up would show.
  params = jax.tree_util.tree_map(lambda p: p * 8.0 if p.ndim >= 2 else p, params)
  variables = {"params": params}
  full = np.asarray(model.apply(variables, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))

  step = jax.jit(lambda c, x, m: model.apply(variables, c, x, attention_mask=m,
                                             method=Llama.decode_step))
  cache = model.init_cache(3, 12)  # longer than needed: unused slots must not matter
  logits, cache = step(cache, jnp.asarray(ids[:, :5]), jnp.asarray(mask[:, :5]))
  pieces = [np.asarray(logits)]
  for i in range(5, 9):
    logits, cache = step(cache, jnp.asarray(ids[:, i:i + 1]), jnp.asarray(mask[:, i:i + 1]))
    pieces.append(np.asarray(logits))
  cached = np.concatenate(pieces, axis=1)
  diff = np.abs(cached - full)[mask].max()
  print(f"tied={tied} scan={scan}: cached vs teacher-forced max |diff| {diff:.2e} "
        f"(logit scale {np.abs(full).max():.1f})")
  # Only summation order differs (t=1 vs t=9 matmuls): float32 rounding.
  assert diff < 5e-5
  assert int(cache["index"]) == 9
  np.testing.assert_array_equal(np.asarray(cache["next_pos"]), mask.sum(1))


def test_greedy_generate_matches_teacher_forced_argmax(tmp_path):
  tmodel, path = _torch_llama(tmp_path, 100000.0, False, seed=3)
  model, params = llama.from_hf(*_load(path))
  prompt = np.random.RandomState(3).randint(0, 300, (2, 4))
  new = llama.greedy_generate(model, params, prompt, max_new_tokens=5)
  np.testing.assert_array_equal(new, _torch_greedy(tmodel, prompt, 5))


def test_bfloat16_compute_close_to_float32():
  cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2)
  ids = jnp.asarray(np.random.RandomState(4).randint(0, 300, (2, 6)))
  params = Llama(cfg).init(jax.random.PRNGKey(1), ids)["params"]
  f32 = Llama(cfg).apply({"params": params}, ids)
  bf16 = Llama(cfg, dtype=jnp.bfloat16).apply({"params": params}, ids)
  assert bf16.dtype == jnp.float32 and params["norm"]["scale"].dtype == jnp.float32
  assert float(jnp.abs(bf16 - f32).max()) < 0.05 * float(jnp.abs(f32).max()) + 1e-3
  cache = Llama(cfg, dtype=jnp.bfloat16).init_cache(2, 8)
  assert cache["k"].dtype == jnp.bfloat16


@pytest.mark.parametrize("scan", [False, True])
def test_gradients_reach_every_layer(scan):
  cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2)
  model = Llama(cfg, scan_layers=scan)
  ids = jnp.asarray(np.random.RandomState(5).randint(0, 50, (2, 6)))
  params = model.init(jax.random.PRNGKey(2), ids)["params"]
  loss = lambda p: jnp.mean(model.apply({"params": p}, ids[:, :-1]).max(-1))
  grads = jax.grad(loss)(params)
  for i in range(3):
    g = grads[f"layers_{i}"]["self_attn"]["q_proj"]["kernel"]
    assert g.shape == (32, 32) and float(jnp.abs(g).sum()) > 0


def test_config_from_hf():
  d = {"model_type": "llama", "vocab_size": 49152, "hidden_size": 576,
       "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
       "num_key_value_heads": 3, "rope_theta": 100000, "rms_norm_eps": 1e-5,
       "tie_word_embeddings": True, "rope_scaling": None, "hidden_act": "silu",
       "max_position_embeddings": 8192}
  c = LlamaConfig.from_hf(d)
  assert c == LlamaConfig() and c.head_dim == 64
  with pytest.raises(ValueError, match="rope_scaling"):
    LlamaConfig.from_hf(dict(d, rope_scaling={"rope_type": "llama3", "factor": 8.0}))
  with pytest.raises(ValueError, match="hidden_act"):
    LlamaConfig.from_hf(dict(d, hidden_act="gelu"))
  with pytest.raises(ValueError, match="num_key_value_heads"):
    LlamaConfig(num_attention_heads=9, num_key_value_heads=2)


def test_params_from_hf_names_bad_tensors():
  cfg = LlamaConfig(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
  tensors = {name: np.zeros(shape, np.float32)
             for name, shape in llama._expected_hf_shapes(cfg).items()}
  params = llama.params_from_hf(tensors, cfg)
  assert params["layers_0"]["self_attn"]["k_proj"]["kernel"].shape == (8, 4)
  assert params["lm_head"]["kernel"].shape == (8, 10)
  bad = dict(tensors)
  del bad["model.layers.0.mlp.up_proj.weight"]
  bad["model.layers.1.mlp.up_proj.weight"] = np.zeros((16, 8), np.float32)
  bad["model.layers.0.self_attn.q_proj.weight"] = np.zeros((8, 9), np.float32)
  with pytest.raises(ValueError) as e:
    llama.params_from_hf(bad, cfg)
  msg = str(e.value)
  assert "missing: ['model.layers.0.mlp.up_proj.weight']" in msg
  assert "unexpected: ['model.layers.1.mlp.up_proj.weight']" in msg
  assert "model.layers.0.self_attn.q_proj.weight: shape (8, 9), expected (8, 8)" in msg
  # Tied: a separate lm_head must equal the embedding.
  tied = LlamaConfig(**{**cfg.__dict__, "tie_word_embeddings": True})
  same = dict(tensors, **{"lm_head.weight": tensors["model.embed_tokens.weight"]})
  assert "lm_head" not in llama.params_from_hf(same, tied)
  with pytest.raises(ValueError, match="different from model.embed_tokens"):
    llama.params_from_hf(dict(tensors, **{"lm_head.weight": np.ones((10, 8), np.float32)}), tied)


def _torch_from_folder(folder):
  return transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.mark.slow
def test_smollm2_matches_torch():
  """The packaged SmolLM2-135M-Instruct (GGUF -> HF folder) in our Flax Llama vs torch."""
  gguf_convert = pytest.importorskip("qsft_vla.weights.gguf_convert")
  from tokenizers import Tokenizer

  start = time.time()
  folder = gguf_convert.smollm2_folder()
  config, tensors = _load(folder)
  # scan_layers: one compiled layer body (~1 s to compile on CPU instead of ~10 s).
  model, params = llama.from_hf(config, tensors, scan_layers=True)
  assert model.config.rope_theta == 100000 and model.config.tie_word_embeddings
  tok = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
  chat = ("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
          "<|im_start|>assistant\n")
  ids = np.asarray([tok.encode(chat).ids])

  ours = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(ids)))
  tmodel = _torch_from_folder(folder)
  with torch.no_grad():
    ref = tmodel(input_ids=torch.tensor(ids)).logits.numpy()
  diff = np.abs(ours - ref).max()
  agree = (ours.argmax(-1) == ref.argmax(-1)).mean()
  print(f"SmolLM2: {ids.shape[1]} tokens, max |logit diff| {diff:.2e} "
        f"(logit scale {np.abs(ref).max():.1f}), argmax agreement {agree:.3f}")
  assert diff < 1e-3
  assert ours[0, -1].argmax() == ref[0, -1].argmax()
  assert agree == 1.0

  prompt = np.asarray([tok.encode("The capital of France is").ids])
  new = llama.greedy_generate(model, params, prompt, max_new_tokens=8)
  text = tok.decode(new[0].tolist())
  ref_new = _torch_greedy(tmodel, prompt, 8)
  print(f"SmolLM2 greedy: 'The capital of France is' -> {text!r} "
        f"({time.time() - start:.1f} s in all)")
  np.testing.assert_array_equal(new, ref_new)
  assert "Paris" in text
