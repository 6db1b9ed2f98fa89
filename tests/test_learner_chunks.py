"""Chunked batches (learner.chunk_length): the Bellman weights from the shared passes equal
the per-example reference path's, on a tiny RT1Small."""

import dataclasses
import functools

import jax
import numpy as np
import pytest

from qsft_vla.learning import learner as L
from qsft_vla.models.rt1_small import RT1Small

from test_learner import MAIN, TINY, VALID, leaves

CHUNK = 4


def chunked_batch(dims, seed=0):
  """8 rows, two chunks of 4. Chunk 0: steps 0..3 of episode 0. Chunk 1: steps 5, 6 of
  episode 1, which ends there (terminal), then steps 0, 1 of episode 2. A bootstrapped
  row's next_observation is the next row's observation; the terminal row's is noise."""
  rng = np.random.default_rng(seed)
  img = lambda n: rng.integers(0, 256, (n, 1, 16, 16, 3), dtype=np.uint8)
  s, u, v = img(5), img(2), img(3)
  obs = np.concatenate([s[:4], u, v[:2]])
  nxt = np.concatenate([s[1:], u[1:], img(1), v[1:]])
  text = lambda n, t: np.repeat(rng.integers(1, TINY.text_vocab, (1, TINY.max_text_len)), n, 0)
  tokens = np.stack([rng.integers(0, VALID[j].sum(), 8) for j in range(dims)], -1)
  return {
      "observation": {"image": obs}, "history_mask": np.ones((8, 1), bool),
      "next_observation": {"image": nxt}, "next_history_mask": np.ones((8, 1), bool),
      "text_ids": np.concatenate([text(4, 0), text(2, 1), text(2, 2)]).astype(np.int32),
      "text_mask": np.ones((8, TINY.max_text_len), bool),
      "action_tokens": tokens.astype(np.int32),
      "reward": np.array([0, 0, 0, 0, 0, 1, 0, 0], np.float32),
      "terminal": np.arange(8) == 5,
      "has_next": np.arange(8) != 5,
      "return_to_go": rng.random(8).astype(np.float32),
      "episode_index": np.array([0, 0, 0, 0, 1, 1, 2, 2], np.int32),
      "step_index": np.array([0, 1, 2, 3, 5, 6, 0, 1], np.int32),
  }


def learners(dims, dropout=0.0, **kw):
  model_cfg = dataclasses.replace(TINY, num_action_dims=dims, dropout=dropout)
  out = []
  for chunk in (1, CHUNK):
    # Unclipped weights: the max backup of perturbed networks is above 1 / gamma, and a
    # clip at 1 would hide which next state R was read at.
    cfg = L.LearnerConfig(**MAIN, chunk_length=chunk, clip_weights=False, **kw)
    out.append(L.Learner(RT1Small(L.model_config_for(model_cfg, cfg)), cfg, VALID[:dims]))
  return out


def perturbed_state(lrn, batch):
  """Init, then pi_phi, p_theta and the target moved apart at random, so that the
  ratios (and so every weight) depend on the state: at init p = pi gives R = 1 anywhere."""
  state = lrn.init(jax.random.PRNGKey(0), batch)
  noise = lambda tree, k: jax.tree_util.tree_map(
      lambda x: x + 0.7 * jax.random.normal(jax.random.PRNGKey(k), x.shape, x.dtype), tree)
  return state.replace(params_pi=noise(state.params_pi, 1), params_p=noise(state.params_p, 2),
                       params_target=noise(state.params_target, 3))


@functools.lru_cache(maxsize=None)
def _jitted_gradients(lrn):
  return jax.jit(lambda st, b: lrn._gradients(st, b, np.bool_(True), np.bool_(True),
                                              jax.random.PRNGKey(9)))


def gradients(lrn, state, batch):
  """(grad pi, grad p, metrics) of one step, compiled once per learner."""
  return _jitted_gradients(lrn)(state, lrn._select(batch))


# Separate networks with the max backup: D2_mixed_mc (pi_phi at s' from the loss's pass)
# and D2_max_dropout (from its own pass).
CASES = {
    "D2_max_pi_head": dict(dims=2, backup="max", architecture="pi_head"),
    "D2_expectile_shared": dict(dims=2, backup="expectile", architecture="shared"),
    "D1_max_separate": dict(dims=1, backup="max"),
    "D2_mean_residual_bound": dict(dims=2, backup="mean", p_parametrization="residual",
                                   mc_lower_bound=True),
    "D2_max_dropout": dict(dims=2, backup="max", dropout=0.2),
    "D2_mixed_mc": dict(dims=2, backup="max", mc_mix=0.5),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_chunked_weights_equal_the_reference(case):
  """The same state and batch through the reference path (every next state passed on
  its own) and the chunked one: equal Bellman weights (their statistics), L_WCE and
  p_theta's gradient to float tolerance. Rolling the next states by one row (a wrong
  pairing) changes the mean R at the next state, so the comparison sees them."""
  kw = dict(CASES[case])
  dims, dropout = kw.pop("dims"), kw.pop("dropout", 0.0)
  ref, chk = learners(dims, dropout, **kw)
  batch = chunked_batch(dims)
  state = perturbed_state(ref, batch)
  _, g_ref, m_ref = gradients(ref, state, batch)
  _, g_chk, m_chk = gradients(chk, state, batch)
  for k in ("loss_p", "weight_mean", "weight_std", "weight_min", "weight_max", "loss_pi",
            "r_next_first"):
    np.testing.assert_allclose(m_chk[k], m_ref[k], rtol=1e-5, atol=1e-6, err_msg=k)
  for a, b in zip(leaves(g_chk), leaves(g_ref), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  wrong = dict(batch, next_observation={"image": np.roll(batch["next_observation"]["image"],
                                                         1, axis=0)})
  _, g_wrong, m_wrong = gradients(ref, state, wrong)
  assert not np.allclose(m_wrong["r_next_first"], m_ref["r_next_first"], rtol=2e-6, atol=0)


def test_chunks_cut_the_next_state_passes(monkeypatch):
  """Rows through the networks in one step (D = 2, "max" backup, separate nets, B = 8):
  reference pi 8 + p 8 + pi at s' 8 + target at s 8 + target at s' 8 = 40; chunks of 4:
  pi 8 + p 8 + pi at the 2 chunk ends + target at s and the 2 chunk ends = 28."""
  counts = []
  for lrn in learners(2, backup="max"):
    batch = chunked_batch(2)
    state = lrn.init(jax.random.PRNGKey(0), batch)
    rows = []
    real = L.Learner._apply
    monkeypatch.setattr(L.Learner, "_apply",
                        lambda self, *a: rows.append(a[5].shape[0]) or real(self, *a))
    jax.make_jaxpr(lrn.train_step)(state, lrn._select(batch))
    monkeypatch.setattr(L.Learner, "_apply", real)
    counts.append(sum(rows))
  assert counts == [40, 28]


def test_check_chunks_refuses_rows_that_are_not_next_steps():
  batch = chunked_batch(2)
  L.check_chunks(batch, CHUNK)        # the terminal row may be followed by anything
  L.check_chunks(batch, 2)
  bad = dict(batch, step_index=np.array([0, 1, 3, 4, 5, 6, 0, 1], np.int32))
  with pytest.raises(ValueError, match=r"row 1 \(dataset 0, episode 0, step 1\) bootstraps"):
    L.check_chunks(bad, CHUNK)
  L.check_chunks(dict(bad, has_next=np.arange(8) % 4 != 1), CHUNK)  # row 1 no longer reads s'
  other_dataset = dict(batch, dataset_index=np.array([0, 0, 1, 1, 0, 0, 0, 0], np.int32))
  with pytest.raises(ValueError, match="row 1 .* next row is dataset 1"):
    L.check_chunks(other_dataset, CHUNK)
  with pytest.raises(ValueError, match="does not split into chunks"):
    L.check_chunks(batch, 3)
  with pytest.raises(ValueError, match=r"needs the batch's \['episode_index', 'step_index'\]"):
    L.check_chunks({k: v for k, v in batch.items() if not k.endswith("_index")}, CHUNK)
  _, chk = learners(2, backup="max")
  state = chk.init(jax.random.PRNGKey(0), batch)
  with pytest.raises(ValueError, match="not chunks of consecutive steps"):
    chk.step(state, bad)
  with pytest.raises(ValueError, match="chunk_length must be an integer >= 1"):
    L.LearnerConfig(chunk_length=0)


def test_microbatches_must_hold_whole_chunks():
  cfg = L.LearnerConfig(**MAIN, chunk_length=CHUNK, microbatches=4)
  lrn = L.Learner(RT1Small(L.model_config_for(TINY, cfg)), cfg, VALID)
  batch = chunked_batch(2)
  state = lrn.init(jax.random.PRNGKey(0), batch)
  with pytest.raises(ValueError, match="whole chunks of learner.chunk_length=4"):
    lrn.step(state, batch)
