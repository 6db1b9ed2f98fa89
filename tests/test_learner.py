"""The Q-SFT learner (qsft_vla/learning/learner.py) on a tiny RT1Small and synthetic batches."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from qsft_vla.learning import learner as L
from qsft_vla.models.rt1_small import RT1Small, RT1SmallConfig

TINY = RT1SmallConfig(num_action_dims=2, action_vocab=5, window=1, width=32, depth=1, num_heads=2,
                      conv_channels=(8,), tokens_per_image=2, max_text_len=8, text_vocab=64,
                      text_dim=16)
# dim 0 has 5 bins, dim 1 has 3 (ids 3, 4 invalid there).
VALID = np.array([[True] * 5, [True, True, True, False, False]])


def make_batch(cfg=TINY, batch=8, seed=0, steps=None, reward=None, terminal=None):
  rng = np.random.default_rng(seed)
  lead = (batch,) if steps is None else (steps, batch)
  img = lambda: rng.integers(0, 256, lead + (cfg.window, 16, 16, 3), dtype=np.uint8)
  tokens = np.stack([rng.integers(0, VALID[j].sum(), lead) for j in range(cfg.num_action_dims)],
                    -1).astype(np.int32)
  return {
      "observation": {"image": img()}, "history_mask": np.ones(lead + (cfg.window,), bool),
      "next_observation": {"image": img()},
      "next_history_mask": np.ones(lead + (cfg.window,), bool),
      "instruction": np.array([b"pick"] * batch),  # dropped by the learner
      "text_ids": rng.integers(1, cfg.text_vocab, lead + (cfg.max_text_len,)).astype(np.int32),
      "text_mask": np.ones(lead + (cfg.max_text_len,), bool),
      "action_tokens": tokens,
      "reward": (rng.random(lead) < 0.3).astype(np.float32) if reward is None
                else np.full(lead, reward, np.float32),
      "terminal": (rng.random(lead) < 0.3) if terminal is None else np.full(lead, terminal),
      "has_next": rng.random(lead) < 0.9,
  }


@functools.lru_cache(maxsize=None)
def init_variables(model_cfg):
  b = make_batch(model_cfg, batch=1)
  return jax.jit(RT1Small(model_cfg).init)(jax.random.PRNGKey(0), b["observation"],
                                           b["history_mask"], b["text_ids"], b["text_mask"],
                                           b["action_tokens"])


def init_state(lrn, batch, seed=0):
  return lrn.init(jax.random.PRNGKey(seed), batch, variables=init_variables(lrn.model.config))


# The main Q-SFT learner: large lr and alpha so that a few steps show.
MAIN = dict(lr_pi=3e-3, lr_p=3e-3, polyak_alpha=0.25)


@functools.lru_cache(maxsize=None)
def make_learner(**kw):
  cfg = L.LearnerConfig(**kw)
  return L.Learner(RT1Small(L.model_config_for(TINY, cfg)), cfg, VALID)


def leaves(tree):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def assert_tree_equal(a, b):
  for x, y in zip(leaves(a), leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


def tree_changed(a, b):
  return any(not np.array_equal(x, y) for x, y in zip(leaves(a), leaves(b), strict=True))


def assert_params_close(a, b, lr):
  """Adam moves a weight by ~lr * sign(g) per step even where g is float noise
  (e.g. conv biases before GroupNorm, whose exact gradient is 0), so two
  mathematically equal runs may differ there by up to ~lr per step: almost
  every weight must agree to 1e-6, none by more than a few lr."""
  diffs = np.concatenate([np.abs(x - y).ravel() for x, y in zip(leaves(a), leaves(b),
                                                                 strict=True)])
  assert diffs.max() < 4 * lr, diffs.max()
  assert np.mean(diffs > 1e-6) < 0.02, np.mean(diffs > 1e-6)


def run(learner, state, batch, n):
  history = []
  for _ in range(n):
    state, m = learner.step(state, batch)
    history.append(jax.tree_util.tree_map(np.asarray, m))
  return state, history


def test_qsft_losses_decrease_and_metrics():
  lrn = make_learner(**MAIN)
  batch = make_batch()
  state = init_state(lrn, batch)
  state, hist = run(lrn, state, batch, 25)
  first, last = hist[0], hist[-1]
  for k in ("loss_pi", "loss_p", "weight_mean", "weight_std", "ratio_p_pi", "grad_norm_pi",
            "grad_norm_p", "lr_pi", "lr_p"):
    assert np.isfinite(last[k]), k
  assert last["loss_pi"] < 0.7 * first["loss_pi"], (first["loss_pi"], last["loss_pi"])
  assert last["loss_p"] < 0.9 * first["loss_p"], (first["loss_p"], last["loss_p"])
  assert 0.0 <= last["weight_mean"] <= 1.0
  assert float(last["lr_pi"]) == pytest.approx(3e-3) and float(last["lr_p"]) == pytest.approx(3e-3)
  assert int(state.step) == 25


def test_jit_on_mesh_equals_plain_function_and_is_deterministic():
  lrn = make_learner(**MAIN)
  assert lrn.mesh.axis_names == ("data", "fsdp") and lrn.mesh.shape["fsdp"] == 1
  one = lrn
  if len(jax.devices()) > 1:
    one = L.Learner(lrn.model, lrn.config, VALID, mesh=Mesh(np.array(jax.devices()[:1]), ("data",)))
  assert one.mesh.size == 1
  batch = make_batch(seed=1)
  state = init_state(one, batch, seed=1)
  s_jit, m_jit = one.step(state, batch)
  # The plain function, jitted without mesh or shardings (op by op it takes ~15 s).
  select = one._select  # pylint: disable=protected-access
  s_plain, m_plain = jax.jit(one.train_step)(state, select(batch))
  for k in m_jit:
    np.testing.assert_allclose(m_jit[k], m_plain[k], rtol=1e-5, atol=1e-6, err_msg=k)
  for name in ("params_pi", "params_p", "params_target"):
    assert_params_close(getattr(s_jit, name), getattr(s_plain, name), MAIN["lr_p"])
  # Same seed -> identical metrics and params.
  s2, m2 = one.step(init_state(one, batch, seed=1), batch)
  for k in m_jit:
    np.testing.assert_array_equal(m_jit[k], m2[k])
  assert_tree_equal(s_jit, s2)


def test_bc_updates_only_pi_and_filtered_bc_is_bc_on_its_batch():
  lrn = make_learner(algorithm="bc")
  batch = make_batch(seed=2)
  state = init_state(lrn, batch)
  assert state.params_p == {} and state.params_target == {}
  new, m = lrn.step(state, batch)
  assert tree_changed(state.params_pi, new.params_pi)
  assert set(m) == {"loss_pi", "grad_norm_pi", "lr_pi", "nonfinite"}

  # Filtered BC's filter is on the data side (test_train: the kept set); on a batch
  # the learner is BC, and it ignores fields it does not use.
  flt = make_learner(algorithm="filtered_bc")
  fs = init_state(flt, batch)
  fnew, fm = flt.step(fs, {**batch, "episode_return": np.zeros(8, np.float32)})
  assert set(fm) == set(m)
  np.testing.assert_allclose(fm["loss_pi"], m["loss_pi"], rtol=1e-6)
  assert_tree_equal(fnew.params_pi, new.params_pi)


def test_sequential_schedule_freezes_groups():
  lrn = make_learner(schedule="sequential", pi_steps=2)
  batch = make_batch(seed=3)
  s0 = init_state(lrn, batch)
  s2, hist = run(lrn, s0, batch, 2)
  assert tree_changed(s0.params_pi, s2.params_pi)
  assert_tree_equal(s0.params_p, s2.params_p)
  assert_tree_equal(s0.params_target, s2.params_target)
  assert_tree_equal(s0.opt_p, s2.opt_p)
  assert float(hist[0]["lr_p"]) == 0.0 and float(hist[0]["lr_pi"]) > 0
  s4, hist = run(lrn, s2, batch, 2)
  assert_tree_equal(s2.params_pi, s4.params_pi)
  assert_tree_equal(s2.opt_pi, s4.opt_pi)
  assert tree_changed(s2.params_p, s4.params_p)
  assert tree_changed(s2.params_target, s4.params_target)
  assert float(hist[-1]["lr_pi"]) == 0.0


def test_polyak_target_update():
  alpha = MAIN["polyak_alpha"]
  lrn = make_learner(**MAIN)
  batch = make_batch(seed=4)
  s0 = init_state(lrn, batch)
  s1, _ = lrn.step(s0, batch)
  s2, _ = lrn.step(s1, batch)  # the target now differs from both p and its init
  for old, new_p, new_t in zip(leaves(s1.params_target), leaves(s2.params_p),
                               leaves(s2.params_target), strict=True):
    np.testing.assert_allclose(new_t, (1 - alpha) * old + alpha * new_p, rtol=1e-6, atol=1e-7)
  assert tree_changed(s1.params_target, s2.params_target)


def test_shared_architecture_two_heads():
  with pytest.raises(ValueError, match="'num_output_heads': 2"):
    L.Learner(RT1Small(TINY), L.LearnerConfig(architecture="shared"), VALID)
  lrn = make_learner(architecture="shared", lr_pi=3e-3, lr_p=3e-3)
  assert lrn.model.config.num_output_heads == 2
  batch = make_batch(seed=5)
  s0 = init_state(lrn, batch)
  assert set(s0.params_p["params"]) == {"head_1"} and "head_1" not in s0.params_pi["params"]
  assert {"head", "head_1"} <= set(s0.params_target["params"])
  assert_tree_equal(s0.params_p["params"]["head_1"], s0.params_pi["params"]["head"])
  s, hist = run(lrn, s0, batch, 10)
  assert hist[-1]["loss_pi"] < hist[0]["loss_pi"]
  assert tree_changed(s.params_p["params"]["head_1"], s.params_pi["params"]["head"])
  full = lrn.inference_params(s)["shared"]
  b = lrn._select(batch)  # pylint: disable=protected-access
  logits = lrn.model.apply(full, b["observation"], b["history_mask"], b["text_ids"],
                           b["text_mask"], b["action_tokens"])
  assert logits.shape == (2, 8, 2, 6)
  # decode_step gives both heads too and agrees with teacher forcing at position 0.
  cache = lrn.model.apply(full, b["observation"], b["history_mask"], b["text_ids"],
                          b["text_mask"], method=RT1Small.encode_prefix)
  step0, _ = lrn.model.apply(full, cache, b["action_tokens"][:, 0], 0,
                             method=RT1Small.decode_step)
  np.testing.assert_allclose(step0, logits[:, :, 0], atol=1e-5)


def test_shared_encoder_gradients_are_the_separate_networks_summed_on_the_encoder():
  """architecture="shared_encoder": p_theta's own transformer and head on pi_phi's
  observation encoder, which both losses train. Known answer: from the same weights
  (p_theta starts as pi_phi), pi_phi's transformer and head get the gradient the
  separate pi_phi gets, p_theta's the one the separate p_theta gets, and the one
  encoder the sum of the two separate encoders' gradients."""
  from qsft_vla.models.vlm import VLMConfig  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="'p_trunk': True"):
    L.Learner(RT1Small(L.model_config_for(TINY, L.LearnerConfig(architecture="shared"))),
              L.LearnerConfig(architecture="shared_encoder"), VALID)
  with pytest.raises(ValueError, match=r"shared_encoder.*rt1_small.*VLMConfig has none"):
    L.check_model_fields(VLMConfig, L.LearnerConfig(architecture="shared_encoder"))
  L.check_model_fields(VLMConfig, L.LearnerConfig(algorithm="bc", architecture="shared_encoder"))
  sep, enc = make_learner(**MAIN), make_learner(**MAIN, architecture="shared_encoder")
  assert enc.model.config.p_trunk and enc.model.config.num_output_heads == 2
  batch = make_batch(seed=6)
  s_sep, s_enc = init_state(sep, batch), init_state(enc, batch)
  trunk = set(s_enc.params_p["params"]["p_trunk"])
  assert set(s_enc.params_p["params"]) == {"head_1", "p_trunk"}
  assert trunk == {"action_embed", "action_start", "action_pos", "block0", "ln_out"}
  assert_tree_equal(s_enc.params_pi, s_sep.params_pi)  # the same init, pi's own names
  b = enc._select(batch)  # pylint: disable=protected-access
  args = (b["observation"], b["history_mask"], b["text_ids"], b["text_mask"], b["action_tokens"])
  out = enc.model.apply(enc.inference_params(s_enc)["shared"], *args)
  np.testing.assert_array_equal(out[1], out[0])  # p_theta starts as pi_phi
  on = jnp.ones((), bool)
  gradients = lambda lrn, s: lrn._gradients(s, b, on, on, s.rng)  # pylint: disable=protected-access
  gpi_sep, gp_sep, m_sep = gradients(sep, s_sep)
  gpi_enc, gp_enc, m_enc = gradients(enc, s_enc)
  for k in ("loss_pi", "loss_p"):
    assert float(m_enc[k]) == pytest.approx(float(m_sep[k]), rel=1e-5)
  close = functools.partial(jax.tree_util.tree_map,
                            lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6))
  gpi_enc, gpi_sep, gp_sep = (g["params"] for g in (gpi_enc, gpi_sep, gp_sep))
  encoder = set(gpi_sep) - trunk - {"head"}
  assert "image_encoder" in encoder and set(gpi_enc) == set(gpi_sep)
  close({k: gpi_enc[k] for k in trunk | {"head"}}, {k: gpi_sep[k] for k in trunk | {"head"}})
  close(gp_enc["params"]["p_trunk"], {k: gp_sep[k] for k in trunk})
  close(gp_enc["params"]["head_1"], gp_sep["head"])
  close({k: gpi_enc[k] for k in encoder},
        jax.tree_util.tree_map(jnp.add, {k: gpi_sep[k] for k in encoder},
                               {k: gp_sep[k] for k in encoder}))
  assert any(np.abs(np.asarray(x)).max() > 0 for x in jax.tree_util.tree_leaves(
      {k: gp_sep[k] for k in encoder}))  # p's loss does reach an encoder
  new_enc, _ = enc.step(s_enc, batch)
  # Acting: the cache path (decode_step) gives both outputs as teacher forcing does.
  full = enc.inference_params(new_enc)["shared"]
  out = enc.model.apply(full, *args)
  cache = enc.model.apply(full, *args[:4], method=RT1Small.encode_prefix)
  prev = jnp.zeros_like(b["action_tokens"][:, 0])
  for j in range(TINY.num_action_dims):
    step, cache = enc.model.apply(full, cache, prev, j, method=RT1Small.decode_step)
    np.testing.assert_allclose(step, out[:, :, j], atol=1e-5)
    prev = b["action_tokens"][:, j]
  first = enc.model.apply(full, *args[:4], method=RT1Small.first_action_logits)
  np.testing.assert_allclose(first, out[:, :, 0], atol=1e-5)


def test_steps_per_call_equals_single_steps():
  single = make_learner(**MAIN)
  double = make_learner(**MAIN, steps_per_call=2)
  batches = make_batch(seed=6, steps=2)
  s0 = init_state(double, batches)
  s_double, m_double = double.step(s0, batches)
  assert m_double["loss_p"].shape == (2,)
  s = s0
  for i in range(2):
    s, m = single.step(s, jax.tree_util.tree_map(lambda x: x[i], batches))
    for k in ("loss_pi", "loss_p", "weight_mean", "grad_norm_pi", "grad_norm_p"):
      np.testing.assert_allclose(m[k], m_double[k][i], rtol=1e-5, err_msg=k)
  assert int(s_double.step) == 2
  for name in ("params_pi", "params_p", "params_target"):
    assert_params_close(getattr(s, name), getattr(s_double, name), MAIN["lr_p"])


def test_known_answer_unit_weights_give_cross_entropy():
  """reward = 1 and terminal everywhere: w = 1 on the last (here only) token, so
  L_WCE == L_CE of p's logits, and with p == pi at init and no logit masking
  (the masks of pi and p differ by the dummy) loss_p == loss_pi."""
  cfg1 = dataclasses.replace(TINY, num_action_dims=1)
  lcfg = L.LearnerConfig(mask_invalid_logits=False)
  lrn = L.Learner(RT1Small(cfg1), lcfg, VALID[:1])
  batch = make_batch(cfg1, seed=7, reward=1.0, terminal=True)
  state = init_state(lrn, batch)
  _, m = lrn.step(state, batch)
  assert float(m["weight_mean"]) == 1.0 and float(m["weight_std"]) == 0.0
  assert float(m["weight_min"]) == 1.0
  np.testing.assert_allclose(m["loss_p"], -m["token_logp"], rtol=1e-6)
  np.testing.assert_allclose(m["loss_p"], m["loss_pi"], rtol=1e-6)


def test_invalid_logits_do_not_matter():
  lrn = make_learner()
  x = jnp.arange(2 * 6, dtype=jnp.float32).reshape(2, 6)
  pi = np.asarray(lrn.mask_pi_logits(x))
  p = np.asarray(lrn.mask_p_logits(x))
  assert (pi[1, 3:] == L.NEG_INF).all() and (pi[:, 5] == L.NEG_INF).all()
  assert (p[1, 3:5] == L.NEG_INF).all() and (p[:, 5] == x[:, 5]).all()
  assert np.array_equal(pi[0, :5], x[0, :5])
  uniform = L.Learner(RT1Small(TINY), L.LearnerConfig(residual="uniform"), VALID)
  assert (np.asarray(uniform.mask_p_logits(x))[:, 5] == L.NEG_INF).all()  # no dummy
  with pytest.raises(ValueError, match="algorithm"):
    L.LearnerConfig(algorithm="sac")
  assert L.LearnerConfig.from_dict(L.LearnerConfig().to_dict()) == L.LearnerConfig()


@pytest.mark.parametrize("backup,mc", [("max", True), ("mean", False), ("mean", True),
                                       ("expectile", False)])
def test_backup_and_monte_carlo_bound_reach_the_weights(backup, mc):
  """The last token's weight is r + gamma * R(x') with R the chosen backup of the
  target network at the next state, bounded below by G_t when mc_lower_bound."""
  from qsft_vla.learning import targets  # pylint: disable=g-import-not-at-top
  lrn = make_learner(**MAIN, backup=backup, mc_lower_bound=mc, gamma=0.9)
  batch = make_batch(seed=3)
  batch["return_to_go"] = np.linspace(0.0, 1.0, 8).astype(np.float32)
  state = init_state(lrn, batch)
  _, metrics = lrn.step(state, batch)
  nxt = dict(batch, action_tokens=np.zeros_like(batch["action_tokens"]))
  tgt_next = lrn.mask_p_logits(lrn.model.apply(
      state.params_target, nxt["next_observation"], nxt["next_history_mask"], nxt["text_ids"],
      nxt["text_mask"], nxt["action_tokens"], False))[:, 0]
  if backup == "mean":
    r_next = targets.behavior_value(tgt_next, lrn.valid[0])
  else:
    pi_next = lrn.mask_pi_logits(lrn.model.apply(
        state.params_pi, nxt["next_observation"], nxt["next_history_mask"], nxt["text_ids"],
        nxt["text_mask"], nxt["action_tokens"], False))[:, 0]
    r_next = (targets.support_ratio_max(pi_next, tgt_next, lrn.valid[0]) if backup == "max" else
              targets.support_ratio_expectile(pi_next, tgt_next, lrn.valid[0], 0.9))
  boot = np.asarray(batch["has_next"]) & ~np.asarray(batch["terminal"])  # rows that read R(x')
  assert float(metrics["r_next_first"]) == pytest.approx(float(np.mean(r_next[boot])), rel=1e-5)
  if backup == "mean":  # the same init for p and target: sum of valid p_bar < 1, nonzero
    assert 0.0 < float(np.mean(r_next)) <= 1.0
  if mc:
    assert float(metrics["weight_min"]) >= 0.0
    # The bound raises the mean weight over the same step without it.
    plain = make_learner(**MAIN, backup=backup, mc_lower_bound=False, gamma=0.9)
    _, m0 = plain.step(init_state(plain, batch), batch)
    assert float(metrics["weight_mean"]) >= float(m0["weight_mean"])


@pytest.mark.parametrize("dims,mc_mix,expected", [(2, 0.0, 4), (1, 0.0, 3), (1, 1.0, 2)])
def test_network_passes_per_step(dims, mc_mix, expected, monkeypatch):
  """Forward passes one Q-SFT step traces ("mean" backup, separate nets): pi and p on
  the batch, the target at s' and, only with D > 1 (inside-step weights), at s; the pure
  Monte-Carlo target needs neither target pass."""
  cfg = dataclasses.replace(TINY, num_action_dims=dims)
  lrn = L.Learner(RT1Small(cfg), L.LearnerConfig(**MAIN, backup="mean", mc_mix=mc_mix),
                  VALID[:dims])
  batch = make_batch(cfg, seed=7)
  batch["return_to_go"] = np.full(8, 0.5, np.float32)
  state = lrn.init(jax.random.PRNGKey(0), batch)
  calls = []
  real = L.Learner._apply
  monkeypatch.setattr(L.Learner, "_apply",
                      lambda self, *a: calls.append(1) or real(self, *a))
  jax.make_jaxpr(lrn.train_step)(state, lrn._select(batch))
  assert len(calls) == expected


@pytest.mark.parametrize("algorithm", ["qsft", "bc"])
def test_non_finite_step_changes_nothing(algorithm):
  """A NaN parameter makes the loss NaN: the state comes back bit for bit (but the step
  counter) and metrics["nonfinite"] says so; a finite step reports 0."""
  lrn = make_learner(**MAIN, algorithm=algorithm)
  batch = make_batch(seed=6)
  state = init_state(lrn, batch)
  _, m_ok = lrn.step(state, batch)
  assert float(m_ok["nonfinite"]) == 0.0
  leaves, treedef = jax.tree_util.tree_flatten(state.params_pi)
  leaves = [jnp.full_like(x, jnp.nan) for x in leaves]
  state = state.replace(params_pi=jax.tree_util.tree_unflatten(treedef, leaves))
  new, metrics = lrn.step(state, batch)
  assert float(metrics["nonfinite"]) == 1.0
  for a, b in zip(jax.tree_util.tree_leaves((state.params_pi, state.params_p,
                                            state.params_target, state.opt_pi, state.opt_p)),
                  jax.tree_util.tree_leaves((new.params_pi, new.params_p, new.params_target,
                                            new.opt_pi, new.opt_p))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert int(new.step) == int(state.step) + 1


def test_pi_head_p_theta_trains_as_a_separate_p_theta():
  """architecture="pi_head": p_theta's network (trunk + head 1) with pi_phi a second head
  behind a stop-gradient. Known answers: L_CE reaches pi_phi's head only (p_theta's
  gradient from it is exactly 0); with the Monte-Carlo target p_theta's training never
  reads pi_phi, so over several steps p_theta (trunk and head 1) follows a separate
  p_theta from the same weights step for step."""
  sep = make_learner(**MAIN, mc_mix=1.0)
  ph = make_learner(**MAIN, mc_mix=1.0, architecture="pi_head")
  assert ph.model.config.detach_head0 and ph.model.config.num_output_heads == 2
  with pytest.raises(ValueError, match="sequential.*pi_head"):
    L.LearnerConfig(architecture="pi_head", schedule="sequential", pi_steps=2)
  with pytest.raises(ValueError, match="detach_head0 needs num_output_heads=2"):
    dataclasses.replace(TINY, detach_head0=True)
  batches = [make_batch(seed=10 + i) for i in range(3)]
  for b in batches:
    b["return_to_go"] = np.linspace(0.0, 1.0, 8).astype(np.float32)
  s_sep, s_ph = init_state(sep, batches[0]), init_state(ph, batches[0])
  assert set(s_ph.params_pi["params"]) == {"head"}
  assert "head_1" in s_ph.params_p["params"] and "head" not in s_ph.params_p["params"]
  b = ph._select(batches[0])  # pylint: disable=protected-access
  on, off = jnp.ones((), bool), jnp.zeros((), bool)
  g_pi, g_p, _ = ph._gradients(s_ph, b, on, off, s_ph.rng)  # pylint: disable=protected-access
  assert all(not np.any(x) for x in leaves(g_p))  # L_CE alone: nothing reaches p_theta
  assert any(np.any(x) for x in leaves(g_pi))

  def as_separate(params_p):  # p_theta's group under the separate network's names
    params = dict(params_p["params"])
    params["head"] = params.pop("head_1")
    return {**params_p, "params": params}

  assert_tree_equal(as_separate(s_ph.params_p), s_sep.params_p)  # the same start
  for batch in batches:
    s_sep, m_sep = sep.step(s_sep, batch)
    s_ph, m_ph = ph.step(s_ph, batch)
    assert float(m_ph["loss_p"]) == pytest.approx(float(m_sep["loss_p"]), rel=1e-5)
  assert_params_close(as_separate(s_ph.params_p), s_sep.params_p, MAIN["lr_p"])
  assert tree_changed(s_ph.params_pi, init_state(ph, batches[0]).params_pi)
  # Acting reads the one network: head 0 is pi_phi, head 1 p_theta.
  args = (b["observation"], b["history_mask"], b["text_ids"], b["text_mask"], b["action_tokens"])
  out = ph.model.apply(ph.inference_params(s_ph)["shared"], *args)
  np.testing.assert_allclose(out[1], sep.model.apply(sep.inference_params(s_sep)["p"], *args),
                             atol=1e-3)


@pytest.mark.parametrize("architecture", ["separate", "shared", "shared_encoder", "pi_head"])
def test_pure_monte_carlo_target_keeps_no_target_network(architecture):
  """mc_mix = 1: every token's weight is the example's G_t; p_theta_bar is never read,
  so the state holds none (no third copy, no Polyak update) and the step runs without it."""
  lrn = make_learner(**MAIN, mc_mix=1.0, architecture=architecture)
  batch = make_batch(seed=5)
  g = np.linspace(0.0, 1.0, 8).astype(np.float32)
  batch["return_to_go"] = g
  state = init_state(lrn, batch)
  assert state.params_target == {} and leaves(state.params_p)
  bootstrapped = init_state(make_learner(**MAIN, mc_mix=0.5, architecture=architecture), batch)
  assert leaves(bootstrapped.params_target)
  new, metrics = lrn.step(state, batch)
  assert new.params_target == {}
  mask = np.asarray(batch["has_next"]) | np.asarray(batch["terminal"])  # rows with a target
  assert float(metrics["weight_max"]) == pytest.approx(float(g.max()), rel=1e-6)
  assert np.isfinite(float(metrics["loss_p"]))
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(new.params_p))
  assert mask.any()
  with pytest.raises(ValueError, match="mc_mix"):
    L.LearnerConfig(mc_mix=1.5)


@pytest.mark.parametrize("architecture", ["separate", "shared", "shared_encoder", "pi_head"])
def test_residual_parametrization_starts_at_pi_and_cancels_pi(architecture):
  """p = softmax(stop_grad(log pi) + out): equal to pi at the start (zero head, the
  dummy at -20), and p / pi = exp(out_b) / Z whatever pi is."""
  from qsft_vla.learning import reweighting  # pylint: disable=g-import-not-at-top
  lrn = make_learner(**MAIN, p_parametrization="residual", architecture=architecture)
  batch = make_batch(seed=4)
  state = init_state(lrn, batch)
  params = lrn.inference_params(state)
  args = (batch["observation"], batch["history_mask"], batch["text_ids"], batch["text_mask"],
          batch["action_tokens"], False)
  if architecture != "separate":
    out = lrn.model.apply(params["shared"], *args)
    pi_raw, p_raw = out[0], out[1]
  else:
    pi_raw, p_raw = lrn.model.apply(params["pi"], *args), lrn.model.apply(params["p"], *args)
  np.testing.assert_allclose(np.asarray(p_raw)[..., :lrn.dummy_id], 0.0)
  pi_l = lrn.mask_pi_logits(pi_raw)
  p = jax.nn.softmax(lrn.p_logits_from(pi_l, p_raw), -1)
  np.testing.assert_allclose(np.asarray(p), np.asarray(jax.nn.softmax(pi_l, -1)), atol=1e-6)
  # The ratio depends on the p output only: any pi gives exp(out_b) / Z.
  out = np.random.default_rng(0).normal(size=p_raw.shape).astype(np.float32)
  for seed in (1, 2):
    other_pi = lrn.mask_pi_logits(np.random.default_rng(seed).normal(size=pi_raw.shape))
    pl = np.asarray(jax.nn.log_softmax(reweighting.residual_p_logits(other_pi, out, lrn.valid), -1))
    lpi = np.asarray(jax.nn.log_softmax(other_pi, -1))
    v = np.broadcast_to(lrn.valid, pl.shape)
    log_ratio = np.where(v, pl - lpi, 0.0)
    # log(p/pi) - out is the same (-log Z) for every valid id of a position.
    diff = np.where(v, log_ratio - out, np.nan)
    np.testing.assert_allclose(np.nanmax(diff, -1), np.nanmin(diff, -1), atol=1e-4)
  state, metrics = lrn.step(state, batch)
  assert np.isfinite(float(metrics["loss_p"]))
  with pytest.raises(ValueError, match="p_parametrization"):
    L.LearnerConfig(p_parametrization="shared")


@pytest.mark.parametrize("kw", [dict(algorithm="bc"),
                                dict(MAIN, mc_mix=1.0),                  # the BabyAI default's target
                                dict(MAIN, mc_lower_bound=True)])        # bootstrapped
def test_microbatches_average_to_the_full_batch_step(kw):
  """Gradient accumulation: 4 microbatches of 2 give the step of the batch of 8 when
  every microbatch's loss mask holds as many tokens (no truncated ends here)."""
  batch = make_batch(seed=5)
  batch["has_next"] = np.ones(8, bool)
  batch["return_to_go"] = np.random.default_rng(5).random(8).astype(np.float32)
  full = make_learner(**kw)
  micro = make_learner(**kw, microbatches=4)
  state = init_state(full, batch)
  s_full, m_full = full.step(state, batch)
  s_micro, m_micro = micro.step(state, batch)
  for k in ("loss_pi", "grad_norm_pi") + (("loss_p", "grad_norm_p") if "loss_p" in m_full else ()):
    np.testing.assert_allclose(m_micro[k], m_full[k], rtol=2e-5, atol=1e-6, err_msg=k)
  for name in ("params_pi", "params_p", "params_target"):
    if leaves(getattr(s_full, name)):  # BC has no p_theta and no target
      assert_params_close(getattr(s_micro, name), getattr(s_full, name), 3e-3)


def test_microbatches_must_divide_the_batch():
  lrn = make_learner(algorithm="bc", microbatches=3)
  batch = make_batch(seed=6)
  with pytest.raises(ValueError, match="microbatches=3"):
    lrn.step(init_state(lrn, batch), batch)


def test_bfloat16_compute_trains_float32_params():
  """model compute_dtype bfloat16: the step runs, losses are finite and the params,
  target and Adam states stay float32 (mixed precision, f32 master weights)."""
  cfg = dataclasses.replace(TINY, compute_dtype="bfloat16")
  lc = L.LearnerConfig(**MAIN)
  lrn = L.Learner(RT1Small(L.model_config_for(cfg, lc)), lc, VALID)
  batch = make_batch(cfg)
  state = lrn.init(jax.random.PRNGKey(0), batch)
  for i in range(2):
    state, m = lrn.step(state, make_batch(cfg, seed=i))
    assert np.isfinite(m["loss_pi"]) and np.isfinite(m["loss_p"]) and m["nonfinite"] == 0
  floats = [x for x in jax.tree_util.tree_leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
  assert floats and all(x.dtype == jnp.float32 for x in floats)
