"""Value-sampled rows (LearnerConfig.weighted_rows): the known answer is L_WCE itself.

A batch whose uniform rows are a whole "dataset" and whose value-sampled rows hold
each of its rows exactly in proportion to its Monte-Carlo weight gives the
estimator its expectation, so its loss and gradients must equal the reference
path's on the dataset alone.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qsft_vla.learning import learner as L
from qsft_vla.models.rt1_small import RT1Small

from test_learner import MAIN, TINY, VALID, init_variables, make_batch

G = np.array([1.0, 0.5, 0.0, 0.5], np.float32)   # the rows' return-to-go (= their weights)
IN_PROPORTION = [0, 0, 1, 3]                     # rows drawn 2 : 1 : 0 : 1, as G


def _learner(**kw):
  cfg = L.LearnerConfig(**MAIN, mc_mix=1.0, **kw)
  return L.Learner(RT1Small(L.model_config_for(TINY, cfg)), cfg, VALID)


def _dataset():
  b = make_batch(batch=4, seed=11)
  b["has_next"] = np.ones(4, bool)  # no truncated ends: every token has its target
  b["return_to_go"] = G.copy()
  return b


def _with_drawn(data, drawn):
  rows = list(range(4)) + list(drawn)
  take = lambda x: x[rows] if isinstance(x, np.ndarray) and x.shape[:1] == (4,) else x
  out = {k: ({c: take(v) for c, v in x.items()} if isinstance(x, dict) else take(x))
         for k, x in data.items()}
  out["weighted_row"] = np.arange(4 + len(drawn)) >= 4
  out["mean_weight"] = np.full(4 + len(drawn), G.mean(), np.float32)  # E[w] over the dataset
  return out


def _gradients(lrn, state, batch):
  fn = jax.jit(lambda s, b: lrn._gradients(s, b, jnp.asarray(True), jnp.asarray(True),
                                           jax.random.PRNGKey(0)))
  return fn(state, lrn._select(batch))


@pytest.mark.parametrize("architecture", ["separate", "pi_head"])
def test_rows_drawn_in_proportion_give_the_loss_and_gradients_of_l_wce(architecture):
  ref, lrn = _learner(architecture=architecture), _learner(architecture=architecture,
                                                           weighted_rows=0.5)
  data = _dataset()
  variables = init_variables(ref.model.config)
  state = ref.init(jax.random.PRNGKey(0), data, variables=variables)
  g_pi_ref, g_p_ref, aux_ref = _gradients(ref, state, data)
  g_pi, g_p, aux = _gradients(lrn, state, _with_drawn(data, IN_PROPORTION))
  assert float(aux["loss_p"]) == pytest.approx(float(aux_ref["loss_p"]), rel=1e-5)
  # pi_phi learns from the uniform rows: the dataset, as on the reference path.
  assert float(aux["loss_pi"]) == pytest.approx(float(aux_ref["loss_pi"]), rel=1e-6)
  assert float(aux["weighted_rows_c"]) == pytest.approx(float(G.mean()))
  assert float(aux["weight_mean"]) == pytest.approx(float(aux_ref["weight_mean"]))
  for a, b in zip(jax.tree_util.tree_leaves((g_pi, g_p)),
                  jax.tree_util.tree_leaves((g_pi_ref, g_p_ref)), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)
  # Rows drawn out of proportion give another loss: the test can fail.
  _, _, wrong = _gradients(lrn, state, _with_drawn(data, [0, 1, 1, 3]))
  assert abs(float(wrong["loss_p"]) - float(aux_ref["loss_p"])) > 1e-3


def test_the_batch_must_mark_both_kinds_of_rows():
  lrn = _learner(weighted_rows=0.5)
  data = _dataset()
  with pytest.raises(ValueError, match=r"needs the batch fields \['weighted_row', "
                     r"'mean_weight'\]"):
    lrn._select(data)
  only_uniform = dict(_with_drawn(data, IN_PROPORTION), weighted_row=np.zeros(8, bool))
  with pytest.raises(ValueError, match="uniform and value-sampled rows"):
    lrn._select(only_uniform)
  # Without weighted_rows the fields are dropped, never sent to a device.
  selected = _learner()._select(_with_drawn(data, IN_PROPORTION))
  assert "weighted_row" not in selected and "mean_weight" not in selected


def test_config_needs_the_pure_monte_carlo_target_and_single_step_batches():
  for kw, what in (({"mc_mix": 0.5}, "mc_mix=0.5"), ({"mc_mix": 1.0, "chunk_length": 2},
                                                     "chunk_length=2"),
                   ({"mc_mix": 1.0, "microbatches": 2}, "microbatches=2")):
    with pytest.raises(ValueError, match=what):
      L.LearnerConfig(weighted_rows=0.5, **kw)
  for bad in (1.0, -0.1, float("nan")):
    with pytest.raises(ValueError, match="weighted_rows must be in"):
      L.LearnerConfig(weighted_rows=bad, mc_mix=1.0)
  # BC and filtered BC ignore it (a robot config's Q-SFT choice reaches their variants).
  bc = L.LearnerConfig(algorithm="bc", weighted_rows=0.5)
  assert not bc.uses_weighted_rows and bc.weighted_batch_rows(64) == 0
  assert L.LearnerConfig(weighted_rows=0.25, mc_mix=1.0).weighted_batch_rows(64) == 16
