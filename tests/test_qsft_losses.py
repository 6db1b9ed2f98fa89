"""Known-answer checks of QSFT.md for the Q-SFT math (qsft_vla.learning).

Fixed points are checked on free logit tables (one logit vector per token
state) trained with adam on the exact expected loss under pi_beta.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qsft_vla.learning import losses, polyak, reweighting, targets

GAMMA = 0.9


def _np_log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _train(loss_fn, params, steps, lr=0.1, extra=None, after_step=None):
  """Adam (cosine-decayed lr) on a deterministic loss, all steps in one jit'ed scan.
  `after_step(params, extra) -> extra` runs after each update (the Polyak target)."""
  opt = optax.adam(optax.cosine_decay_schedule(lr, steps, alpha=0.01))

  def step(carry, _):
    params, opt_state, extra = carry
    grads = jax.grad(loss_fn)(params, extra)
    updates, opt_state = opt.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    if after_step is not None:
      extra = after_step(params, extra)
    return (params, opt_state, extra), None

  @jax.jit
  def run(params, extra):
    (params, _, extra), _ = jax.lax.scan(step, (params, opt.init(params), extra), None,
                                         length=steps)
    return params, extra
  return run(params, extra)


# --------------------------------------------------------------------------- #
# 1. w = 1: L_WCE == L_CE.


def _random_batch(seed=0, b=4, bins=(6, 4, 2), extra_ids=2):
  rng = np.random.RandomState(seed)
  d, k = len(bins), max(bins)
  v = k + extra_ids  # action ids 0..k-1, then the dummy (id k) and one text id
  valid = targets.vocab_valid_mask(np.arange(k)[None] < np.array(bins)[:, None], v)
  logits = rng.randn(b, d, v).astype(np.float32) * 2
  tokens = np.stack([rng.randint(0, n, b) for n in bins], axis=1).astype(np.int32)
  mask = (rng.rand(b, d) > 0.3).astype(np.float32)
  return logits, tokens, valid, mask, k


@pytest.mark.parametrize("residual", ["dummy", "uniform"])
def test_wce_with_unit_weights_equals_ce(residual):
  logits, tokens, valid, mask, dummy = _random_batch()
  for m in (None, mask):
    ce = losses.cross_entropy(logits, tokens, mask=m)
    wce, _ = losses.weighted_cross_entropy(logits, tokens, np.ones(tokens.shape), residual=residual,
                                           dummy_id=dummy, valid_mask=valid, mask=m)
    assert float(wce) == float(ce)
  want = -_np_log_softmax(logits)[np.arange(4)[:, None], np.arange(3)[None], tokens]
  np.testing.assert_allclose(float(ce), (want * mask).sum() / mask.sum(), rtol=1e-6)


def test_wce_matches_numpy_reference():
  logits, tokens, valid, mask, dummy = _random_batch(seed=1)
  w = np.random.RandomState(2).rand(*tokens.shape).astype(np.float32)
  logp = _np_log_softmax(logits)
  b_idx, d_idx = np.arange(4)[:, None], np.arange(3)[None]
  lk = logp[b_idx, d_idx, tokens]
  dummy_l = -(w * lk + (1 - w) * logp[..., dummy])
  others = valid[None] & (np.arange(logits.shape[-1]) != tokens[..., None])
  k_j = valid.sum(-1)[None]
  uniform_l = -(w * lk + (1 - w) / (k_j - 1) * np.where(others, logp, 0).sum(-1))
  for residual, want in (("dummy", dummy_l), ("uniform", uniform_l)):
    got, metrics = losses.weighted_cross_entropy(logits, tokens, w, residual=residual,
                                                 dummy_id=dummy, valid_mask=valid, mask=mask)
    np.testing.assert_allclose(float(got), (want * mask).sum() / mask.sum(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["weight_mean"]), (w * mask).sum() / mask.sum(),
                               rtol=1e-5)
    assert float(metrics["weight_min"]) == w[mask > 0].min()
  assert float(metrics["valid_mass"]) < 1.0


def test_loss_argument_errors_and_empty_mask():
  logits, tokens, valid, _, dummy = _random_batch()
  w = np.ones(tokens.shape)
  with pytest.raises(ValueError, match="dummy_id"):
    losses.weighted_cross_entropy(logits, tokens, w)
  with pytest.raises(ValueError, match="valid_mask"):
    losses.weighted_cross_entropy(logits, tokens, w, residual="uniform")
  with pytest.raises(ValueError, match="residual"):
    losses.weighted_cross_entropy(logits, tokens, w, residual="spread", dummy_id=dummy)
  zero = np.zeros(tokens.shape)
  assert float(losses.cross_entropy(logits, tokens, mask=zero)) == 0.0
  loss, _ = losses.weighted_cross_entropy(logits, tokens, w, dummy_id=dummy, mask=zero)
  assert float(loss) == 0.0


# --------------------------------------------------------------------------- #
# 2. Tabular MDP: p -> pi_beta * Q (dummy), the uniform-spread fixed point.

S, K, D = 2, 3, 2            # env states, bins per dimension, action dimensions
V = K + 1                    # + the dummy
DUMMY = K
NX = S + S * K               # token states: x[0] = s, x[1] = (s, k1)


def _mdp():
  """Deterministic dynamics over (s, k1, k2): next state, reward, terminal."""
  nxt = np.zeros((S, K, K), np.int32)
  rew = np.zeros((S, K, K), np.float32)
  term = np.zeros((S, K, K), bool)
  nxt[0, 0] = 1; rew[0, 0, 1] = 0.05                        # s0, k1=0: go to s1
  term[0, 2, 0] = True; rew[0, 2, 0] = 0.8                  # s0, (2, 0): success 0.8
  nxt[1] = 0; rew[1] = 0.02                                 # s1: back to s0 ...
  term[1, 1, 1] = True; rew[1, 1, 1] = 1.0                  # ... or success 1.0
  term[1, 0, 2] = True; rew[1, 0, 2] = 0.0                  # ... or failure
  return nxt, rew, term


def _behaviour():
  """pi_beta[NX, K]: a fixed, strictly positive behaviour policy per token state."""
  return np.random.RandomState(0).dirichlet(np.full(K, 4.0), NX).astype(np.float32)


def _q_star():
  """Behaviour-support Q (every action is in the support): value iteration on the
  token MDP; gamma = 1 inside a step. Returns W[NX, K] = Q(x, a)."""
  nxt, rew, term = _mdp()
  v = np.zeros(S)
  for _ in range(500):
    q2 = rew + GAMMA * (~term) * v[nxt]
    v = q2.max((1, 2))
  q1 = q2.max(2)
  return np.concatenate([q1, q2.reshape(S * K, K)]).astype(np.float32)


def test_q_star_is_a_probability_and_nontrivial():
  w = _q_star()
  assert w.min() >= 0 and w.max() <= 1
  np.testing.assert_allclose(w[0].max(), 0.95, atol=1e-6)  # s0 goes via s1: 0.05 + 0.9 * 1
  assert len(np.unique(np.round(w, 4))) >= 6


@pytest.mark.parametrize("residual", ["dummy", "uniform"])
def test_tabular_fixed_point_with_exact_targets(residual):
  pi_b, w = _behaviour(), _q_star()
  valid = np.arange(V) < K                  # the dummy / extra id is never an action
  tokens = np.broadcast_to(np.arange(K), (NX, K))

  def loss_fn(table, _):
    logits = jnp.broadcast_to(table[:, None, :], (NX, K, V))
    # Expected loss under pi_beta: the token probabilities are the mask weights.
    loss, _ = losses.weighted_cross_entropy(logits, tokens, w, residual=residual,
                                            dummy_id=DUMMY, valid_mask=valid, mask=pi_b)
    return loss

  table, _ = _train(loss_fn, jnp.zeros((NX, V)), steps=3000)
  p = np.asarray(jax.nn.softmax(table))
  if residual == "dummy":
    np.testing.assert_allclose(p[:, :K], pi_b * w, atol=1e-3)
    np.testing.assert_allclose(p[:, :K] / pi_b, w, atol=1e-3)
    np.testing.assert_allclose(p[:, DUMMY], (pi_b * (1 - w)).sum(1), atol=1e-3)
  else:
    spread = pi_b * (1 - w)
    want = pi_b * w + (spread.sum(1, keepdims=True) - spread) / (K - 1)
    np.testing.assert_allclose(p[:, :K], want, atol=1e-3)
    assert p[:, DUMMY].max() < 1e-4


def _tabular_transitions():
  """Every (s, k1, k2) as one batch row: table rows of the two token positions,
  tokens, dynamics and the row's probability under pi_beta (uniform over s)."""
  nxt, rew, term = _mdp()
  pi_b = _behaviour()
  s, k1, k2 = (a.reshape(-1) for a in np.meshgrid(np.arange(S), np.arange(K), np.arange(K),
                                                  indexing="ij"))
  rows = np.stack([s, S + s * K + k1], axis=1)               # [B, D]
  prob = pi_b[s, k1] * pi_b[S + s * K + k1, k2]
  return dict(rows=rows, tokens=np.stack([k1, k2], 1).astype(np.int32),
              next_row=nxt[s, k1, k2], reward=rew[s, k1, k2], terminal=term[s, k1, k2],
              prob=prob.astype(np.float32))


def test_tabular_fixed_point_through_bellman_weights_and_polyak():
  """Algorithm 1 in miniature: pi_phi by CE, p_theta by L_WCE (dummy) with
  targets from the Polyak target network via support_ratio_max/bellman_weights."""
  tr = _tabular_transitions()
  valid = np.arange(V) < K
  prob = tr["prob"][:, None]

  def loss_fn(params, target):
    pi_logits, p_logits = params["pi"][tr["rows"]], params["p"][tr["rows"]]
    r_within = targets.support_ratio_max(pi_logits, target[tr["rows"]], valid)
    r_next = targets.support_ratio_max(params["pi"][tr["next_row"]], target[tr["next_row"]],
                                       valid)
    w, td_mask = targets.bellman_weights(r_within, r_next, tr["reward"], tr["terminal"],
                                         ~tr["terminal"], GAMMA)
    ce = losses.cross_entropy(pi_logits, tr["tokens"], mask=prob)
    wce, _ = losses.weighted_cross_entropy(p_logits, tr["tokens"], w, dummy_id=DUMMY,
                                           mask=prob * td_mask)
    return ce + wce

  params = {"pi": jnp.zeros((NX, V)), "p": jnp.zeros((NX, V))}
  params, target = _train(loss_fn, params, steps=4000, extra=params["p"],
                          after_step=lambda prm, tgt: polyak.polyak_update(tgt, prm["p"], 0.05))
  pi = np.asarray(jax.nn.softmax(params["pi"]))
  p = np.asarray(jax.nn.softmax(params["p"]))
  pi_b, w = _behaviour(), _q_star()
  np.testing.assert_allclose(pi[:, :K], pi_b, atol=1e-3)
  np.testing.assert_allclose(p[:, :K] / pi_b, w, atol=1e-3)
  np.testing.assert_allclose(np.asarray(jax.nn.softmax(target))[:, :K] / pi_b, w, atol=1e-3)


def _q_behaviour():
  """Q of the behaviour policy itself (policy evaluation on the token MDP, gamma = 1
  inside a step): what the "mean" backup converges to. W[NX, K]."""
  nxt, rew, term = _mdp()
  pi_b = _behaviour()
  pi1, pi2 = pi_b[:S], pi_b[S:].reshape(S, K, K)
  v = np.zeros(S)
  for _ in range(2000):
    q2 = rew + GAMMA * (~term) * v[nxt]
    v = np.einsum("sa,sab,sab->s", pi1, pi2, q2)
  q1 = np.einsum("sab,sab->sa", pi2, q2)
  return np.concatenate([q1, q2.reshape(S * K, K)]).astype(np.float32)


def test_mean_backup_converges_to_the_behaviour_q():
  """backup="mean": R(x) = sum_b p_bar(b|x) = E_pi[p_bar / pi], so p / pi -> Q^pi_beta
  (SARSA), which differs from the in-support max's Q* here."""
  tr = _tabular_transitions()
  valid = np.arange(V) < K
  prob = tr["prob"][:, None]
  q_b = _q_behaviour()
  assert np.abs(q_b - _q_star()).max() > 0.05

  def loss_fn(params, target):
    p_logits = params["p"][tr["rows"]]
    r_within = targets.behavior_value(target[tr["rows"]], valid)
    r_next = targets.behavior_value(target[tr["next_row"]], valid)
    w, td_mask = targets.bellman_weights(r_within, r_next, tr["reward"], tr["terminal"],
                                         ~tr["terminal"], GAMMA)
    wce, _ = losses.weighted_cross_entropy(p_logits, tr["tokens"], w, dummy_id=DUMMY,
                                           mask=prob * td_mask)
    return wce

  params = {"p": jnp.zeros((NX, V))}
  params, _ = _train(loss_fn, params, steps=4000, extra=params["p"],
                     after_step=lambda prm, tgt: polyak.polyak_update(tgt, prm["p"], 0.05))
  p = np.asarray(jax.nn.softmax(params["p"]))
  np.testing.assert_allclose(p[:, :K] / _behaviour(), q_b, atol=2e-3)
  # The value is one minus the dummy's probability.
  np.testing.assert_allclose(np.asarray(targets.behavior_value(params["p"], valid)),
                             1.0 - p[:, DUMMY], atol=1e-6)


# --------------------------------------------------------------------------- #
# 3. One-step bandit: beta-reweighting picks a* above the threshold, conservatively.


def _bandit(pi_beta, q):
  """Trains pi_phi (CE) and p_theta (WCE, dummy, w = r from the last-dim target of a
  terminal one-dimension step) on the expected loss; returns both logit vectors."""
  tokens = np.array([[0], [1]], np.int32)
  prob = np.asarray(pi_beta, np.float32)[:, None]
  w, td_mask = targets.bellman_weights(np.zeros((2, 1)), np.full(2, 0.5), np.asarray(q),
                                       np.ones(2, bool), np.zeros(2, bool), GAMMA)
  np.testing.assert_allclose(np.asarray(w)[:, 0], q, rtol=1e-6)

  def loss_fn(params, _):
    logits = {k: jnp.broadcast_to(v, (2, 1, 3)) for k, v in params.items()}
    ce = losses.cross_entropy(logits["pi"], tokens, mask=prob)
    wce, _ = losses.weighted_cross_entropy(logits["p"], tokens, w, dummy_id=2,
                                           mask=prob * td_mask)
    return ce + wce

  params, _ = _train(loss_fn, {"pi": jnp.zeros(3), "p": jnp.zeros(3)}, steps=2000)
  return params["pi"], params["p"]


def test_bandit_beta_threshold():
  pi_logits, p_logits = _bandit((0.6, 0.4), (0.3, 1.0))
  valid = np.array([True, True, False])
  pi = np.asarray(jax.nn.softmax(pi_logits))
  p = np.asarray(jax.nn.softmax(p_logits))
  np.testing.assert_allclose(p, [0.18, 0.4, 0.42], atol=1e-3)
  np.testing.assert_allclose(pi[:2] / pi[:2].sum(), [0.6, 0.4], atol=1e-3)

  def pick(beta):
    logits = reweighting.reweighted_logits(pi_logits, p_logits, beta, valid)
    return int(reweighting.select(logits, 0.0))
  assert pick(0.0) == 0 and pick(1.5) == 0
  for beta in (2.0, 4.0, 8.0):
    assert pick(beta) == 1
  threshold = np.log(pi[0] / pi[1]) / (p[1] - p[0])
  np.testing.assert_allclose(threshold, np.log(0.6 / 0.4) / (0.4 - 0.18), atol=2e-2)
  assert pick(threshold - 0.02) == 0 and pick(threshold + 0.02) == 1


def test_bandit_is_conservative_about_rare_actions():
  # pi_beta(a*) Q(a*) = 0.1 < pi_beta(a) Q(a) = 0.45: p(a*) < p(a), so no beta picks a*.
  pi_logits, p_logits = _bandit((0.9, 0.1), (0.5, 1.0))
  p = np.asarray(jax.nn.softmax(p_logits))
  np.testing.assert_allclose(p[:2], [0.45, 0.1], atol=1e-3)
  betas = jnp.linspace(0.0, 100.0, 401)
  logits = jax.vmap(lambda b: reweighting.reweighted_logits(pi_logits, p_logits, b,
                                                       np.array([True, True, False])))(betas)
  assert (np.asarray(reweighting.select(logits, 0.0)) == 0).all()


def test_ratio_extraction_ranks_by_implied_q():
  """pi * exp(beta * p / pi) on the support: with p = pi_beta Q, a* wins for every
  beta above log(0.6/0.4) / (1.0 - 0.3) ~= 0.579, where the paper's form needs 1.84;
  and it picks the rarer better action the paper's form never picks (0.9/0.1 bandit)."""
  valid = np.array([True, True, False])
  pi_logits, p_logits = _bandit((0.6, 0.4), (0.3, 1.0))

  def pick(beta, pl=pi_logits, ql=p_logits, eps=1e-4):
    return int(reweighting.select(reweighting.reweighted_logits(pl, ql, beta, valid, "ratio", eps), 0.0))
  threshold = np.log(0.6 / 0.4) / (1.0 - 0.3)
  assert pick(0.0) == 0 and pick(threshold - 0.03) == 0
  assert pick(threshold + 0.03) == 1 and pick(1.0) == 1 and pick(1e6) == 1
  rare_pi, rare_p = _bandit((0.9, 0.1), (0.5, 1.0))
  # beta above log(0.9 / 0.1) / (1.0 - 0.5) ~= 4.39 picks the rare action a*.
  assert pick(4.0, rare_pi, rare_p) == 0 and pick(5.0, rare_pi, rare_p) == 1
  assert pick(50.0, rare_pi, rare_p, eps=0.2) == 0  # below the support threshold: never
  # Nothing in the support: the most likely valid action alone.
  assert pick(100.0, rare_pi, rare_p, eps=0.95) == 0
  # Values: log pi + beta * p / pi on the support, -inf elsewhere.
  out = np.asarray(reweighting.reweighted_logits(rare_pi, rare_p, 3.0, valid, "ratio", 0.2))
  lp = _np_log_softmax(np.asarray(rare_pi))
  ratio = np.exp(_np_log_softmax(np.asarray(rare_p)) - lp)
  np.testing.assert_allclose(out[0], lp[0] + 3.0 * ratio[0], rtol=1e-5)
  assert np.isneginf(out[1]) and np.isneginf(out[2])
  with pytest.raises(ValueError, match="extraction"):
    reweighting.reweighted_logits(rare_pi, rare_p, 1.0, valid, "q")


# --------------------------------------------------------------------------- #
# 4. The reward enters the last-dimension target.


def test_reward_enters_last_dimension_target():
  r_within = np.array([[0.9, 0.4]], np.float32)   # R(x_t[0]), R(x_t[1])
  r_next = np.array([0.25], np.float32)
  one = np.ones(1, bool)
  w, _ = targets.bellman_weights(r_within, r_next, [0.7], one, ~one, GAMMA)
  np.testing.assert_allclose(np.asarray(w), [[0.4, 0.7]], rtol=1e-6)
  w, _ = targets.bellman_weights(r_within, r_next, [0.7], ~one, one, GAMMA, clip=False)
  np.testing.assert_allclose(np.asarray(w), [[0.4, 0.7 + GAMMA * 0.25]], rtol=1e-6)
  w2, _ = targets.bellman_weights(r_within, r_next, [0.1], ~one, one, GAMMA, clip=False)
  np.testing.assert_allclose(np.asarray(w2)[:, :-1], np.asarray(w)[:, :-1])
  np.testing.assert_allclose(np.asarray(w)[:, -1] - np.asarray(w2)[:, -1], [0.6], rtol=1e-5)


def test_inside_step_weights_are_the_next_position_ratio():
  r_within = np.array([[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]], np.float32)
  w, td_mask = targets.bellman_weights(r_within, [0.0, 0.0], [0.0, 0.0], [True, True],
                                       [False, False], GAMMA)
  np.testing.assert_allclose(np.asarray(w)[:, :3], r_within[:, 1:])
  np.testing.assert_array_equal(np.asarray(td_mask), np.ones((2, 4)))


def test_weights_are_stop_gradient():
  def total(r_within, r_next):
    w, _ = targets.bellman_weights(r_within, r_next, jnp.zeros(2), jnp.zeros(2, bool),
                                   jnp.ones(2, bool), GAMMA)
    return jnp.sum(w)
  g = jax.grad(total, argnums=(0, 1))(jnp.full((2, 3), 0.5), jnp.full(2, 0.5))
  assert all(float(jnp.abs(x).max()) == 0.0 for x in g)


# --------------------------------------------------------------------------- #
# 5. Support masking in R.


def _ratio_case():
  # ids 0-2 are actions, 3 is the dummy. ratios p/pi: 0.5, 0.8, 200, 2.5 (about).
  pi = np.array([0.5, 0.3, 5e-5, 0.19995])
  p = np.array([0.25, 0.24, 0.01, 0.5])
  return np.log(pi).astype(np.float32), np.log(p).astype(np.float32)


def test_support_ratio_excludes_rare_and_invalid_tokens():
  pi_logits, p_logits = _ratio_case()
  actions = np.array([True, True, True, False])
  # id 2 has ratio 200 but pi < eps; id 3 (ratio 2.5) is not an action.
  np.testing.assert_allclose(float(targets.support_ratio_max(pi_logits, p_logits, actions)),
                             0.8, rtol=1e-5)
  np.testing.assert_allclose(
      float(targets.support_ratio_max(pi_logits, p_logits, actions, eps=1e-5)), 200, rtol=1e-4)
  np.testing.assert_allclose(
      float(targets.support_ratio_max(pi_logits, p_logits, np.ones(4, bool))), 0.5 / 0.19995,
      rtol=1e-5)
  # Nobody passes eps: fall back to the valid token of largest pi (id 0).
  np.testing.assert_allclose(
      float(targets.support_ratio_max(pi_logits, p_logits, actions, eps=0.9)), 0.5, rtol=1e-5)
  # Probabilities are softmaxes over the full vocabulary: shifting logits changes nothing.
  np.testing.assert_allclose(
      float(targets.support_ratio_max(pi_logits + 3.0, p_logits - 2.0, actions)), 0.8, rtol=1e-5)


def _expectile_bisect(values, weights, tau):
  """The tau-expectile of a discrete distribution, by bisection on its defining equation."""
  lo, hi = min(values), max(values)
  for _ in range(200):
    m = (lo + hi) / 2
    g = sum(w * (tau if v >= m else 1 - tau) * (v - m) for v, w in zip(values, weights))
    lo, hi = (m, hi) if g > 0 else (lo, m)
  return (lo + hi) / 2


def test_support_ratio_expectile_known_answers():
  pi_logits, p_logits = _ratio_case()
  actions = np.array([True, True, True, False])
  # Support {0, 1} (id 2 is rarer than eps, id 3 no action): ratios 0.5, 0.8 under pi 0.5, 0.3.
  r = lambda tau, **kw: float(targets.support_ratio_expectile(pi_logits, p_logits, actions,  # noqa
                                                              tau, **kw))
  np.testing.assert_allclose(r(0.5), (0.25 + 0.24) / 0.8, rtol=1e-5)   # the pi-weighted mean
  for tau in (0.7, 0.9, 0.99):
    np.testing.assert_allclose(r(tau), _expectile_bisect([0.5, 0.8], [0.5 / 0.8, 0.3 / 0.8], tau),
                               rtol=1e-5)
  assert 0.5 < r(0.9) < r(0.99) < 0.8 + 1e-6   # towards the in-support max, never past it
  np.testing.assert_allclose(r(0.9, eps=0.9), 0.5, rtol=1e-5)  # the max's fallback
  # A wider support (eps 1e-5 admits id 2, ratio 200 with pi 5e-5): weighted by pi, the rare
  # action's huge ratio moves the expectile far less than it moves the max (200).
  wide = float(targets.support_ratio_expectile(pi_logits, p_logits, actions, 0.9, eps=1e-5))
  np.testing.assert_allclose(wide, _expectile_bisect([0.5, 0.8, 200.0],
                                                     [0.5, 0.3, 5e-5], 0.9), rtol=1e-4)
  assert wide < 1.0


def test_support_ratio_broadcasts_a_per_dimension_mask():
  pi_logits, p_logits = _ratio_case()
  logits_pi = np.broadcast_to(pi_logits, (5, 2, 4))
  logits_p = np.broadcast_to(p_logits, (5, 2, 4))
  per_dim = np.array([[True, True, True, False], [True, False, False, False]])
  r = np.asarray(targets.support_ratio_max(logits_pi, logits_p, per_dim))
  assert r.shape == (5, 2)
  np.testing.assert_allclose(r, np.broadcast_to([0.8, 0.5], (5, 2)), rtol=1e-5)


def test_vocab_valid_mask_places_action_ids():
  m = targets.vocab_valid_mask(np.array([[True, True, True], [True, False, False]]), 6, offset=2)
  np.testing.assert_array_equal(m, [[0, 0, 1, 1, 1, 0], [0, 0, 1, 0, 0, 0]])
  with pytest.raises(ValueError, match="do not fit"):
    targets.vocab_valid_mask(np.ones((1, 3), bool), 4, offset=2)


# --------------------------------------------------------------------------- #
# 6. Truncated and terminal ends.


def test_truncated_end_drops_only_the_bootstrap_token():
  r_within = np.full((3, 3), 0.6, np.float32)
  r_next = np.full(3, 0.5, np.float32)
  reward = np.array([0.1, 0.2, 0.3], np.float32)
  terminal = np.array([False, True, False])
  has_next = np.array([False, False, True])       # truncated, terminal, mid-episode
  w, td_mask = targets.bellman_weights(r_within, r_next, reward, terminal, has_next, GAMMA)
  np.testing.assert_array_equal(np.asarray(td_mask), [[1, 1, 0], [1, 1, 1], [1, 1, 1]])
  w = np.asarray(w)
  np.testing.assert_allclose(w[:, :2], 0.6)
  np.testing.assert_allclose(w[1, 2], 0.2, rtol=1e-6)        # terminal: r, no bootstrap
  np.testing.assert_allclose(w[2, 2], 0.3 + GAMMA * 0.5, rtol=1e-6)
  # A stale next-state ratio must not leak into ends without a bootstrap.
  w_inf, _ = targets.bellman_weights(r_within, np.full(3, np.inf), reward, terminal,
                                     has_next, GAMMA)
  np.testing.assert_allclose(np.asarray(w_inf)[:2], w[:2])


# --------------------------------------------------------------------------- #
# 7. Clipping, Polyak, the inference policy, jit.


def test_monte_carlo_lower_bound():
  """w = max(Bellman target, G_t) on every token, before clipping (QSFT.md, Optional)."""
  r_within = np.array([[0.9, 0.2], [0.9, 0.6], [0.9, 0.1]], np.float32)
  r_next = np.array([0.1, 0.1, 0.1], np.float32)
  reward = np.array([0.0, 0.0, 1.0], np.float32)
  terminal = np.array([False, False, True])
  has_next = np.array([True, False, False])         # mid-episode, truncated end, success
  g = np.array([0.5, 0.3, 1.0], np.float32)
  w, td = targets.bellman_weights(r_within, r_next, reward, terminal, has_next, GAMMA,
                                  clip=False, return_to_go=g)
  np.testing.assert_allclose(np.asarray(w), [[0.5, 0.5], [0.6, 0.3], [1.0, 1.0]], rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(td), [[1, 1], [1, 0], [1, 1]])
  plain, _ = targets.bellman_weights(r_within, r_next, reward, terminal, has_next, GAMMA,
                                     clip=False)
  np.testing.assert_allclose(np.asarray(plain)[0], [0.2, GAMMA * 0.1], rtol=1e-6)
  # Zero returns change nothing; the bound never lowers a weight.
  same, _ = targets.bellman_weights(r_within, r_next, reward, terminal, has_next, GAMMA,
                                    clip=False, return_to_go=np.zeros(3))
  np.testing.assert_allclose(np.asarray(same), np.asarray(plain))


def test_mixed_monte_carlo_target():
  """w = (1 - lam) * Bellman target + lam * G_t (Ostrovski et al. 2017); lam = 1 reads
  no bootstrap at all, so even an inf ratio cannot leak into the weight."""
  r_within = np.array([[0.9, 0.2], [0.9, 0.6]], np.float32)
  r_next = np.array([0.4, 0.4], np.float32)
  reward = np.zeros(2, np.float32)
  no, yes = np.zeros(2, bool), np.ones(2, bool)
  g = np.array([0.8, 0.0], np.float32)
  w, _ = targets.bellman_weights(r_within, r_next, reward, no, yes, GAMMA, clip=False,
                                 mixed_return=g, mc_mix=0.25)
  td = np.array([[0.2, GAMMA * 0.4], [0.6, GAMMA * 0.4]])
  np.testing.assert_allclose(np.asarray(w), 0.75 * td + 0.25 * g[:, None], rtol=1e-6)
  pure, _ = targets.bellman_weights(np.full((2, 2), np.inf), np.full(2, np.inf), reward, no,
                                    yes, GAMMA, mixed_return=g, mc_mix=1.0)
  np.testing.assert_allclose(np.asarray(pure), [[0.8, 0.8], [0.0, 0.0]], rtol=1e-6)
  # mc_mix = 0 is the paper's target; the lower bound composes after the mix.
  off, _ = targets.bellman_weights(r_within, r_next, reward, no, yes, GAMMA, mixed_return=g)
  np.testing.assert_allclose(np.asarray(off), td, rtol=1e-6)
  both, _ = targets.bellman_weights(r_within, r_next, reward, no, yes, GAMMA, clip=False,
                                    return_to_go=g, mixed_return=g, mc_mix=0.25)
  np.testing.assert_allclose(np.asarray(both), np.maximum(0.75 * td + 0.25 * g[:, None],
                                                          g[:, None]), rtol=1e-6)


def test_clip_switch():
  r_within = np.array([[0.0, 1.7], [0.0, -0.2]], np.float32)
  args = (r_within, np.array([0.9, 0.9]), np.array([0.5, 0.0]), np.zeros(2, bool),
          np.ones(2, bool), GAMMA)
  clipped, _ = targets.bellman_weights(*args)
  raw, _ = targets.bellman_weights(*args, clip=False)
  np.testing.assert_allclose(np.asarray(raw), [[1.7, 0.5 + 0.81], [-0.2, 0.81]], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(clipped), [[1.0, 1.0], [0.0, 0.81]], rtol=1e-6)


def test_polyak_known_values():
  target = {"a": jnp.array([1.0, 2.0]), "b": {"c": jnp.array(4.0, jnp.bfloat16)},
            "step": jnp.array(3)}
  online = {"a": jnp.array([3.0, 0.0]), "b": {"c": jnp.array(8.0, jnp.bfloat16)},
            "step": jnp.array(7)}
  out = polyak.polyak_update(target, online, 0.25)
  np.testing.assert_allclose(np.asarray(out["a"]), [1.5, 1.5])
  assert out["b"]["c"].dtype == jnp.bfloat16 and float(out["b"]["c"]) == 5.0
  assert int(out["step"]) == 7
  same = polyak.polyak_update(target, online, 0.0)
  np.testing.assert_array_equal(np.asarray(same["a"]), [1.0, 2.0])
  jitted = jax.jit(polyak.polyak_update)(target, online, 0.25)
  np.testing.assert_allclose(np.asarray(jitted["a"]), [1.5, 1.5])


def test_reweighted_logits_masks_and_reduces_to_bc():
  rng = np.random.RandomState(3)
  pi_logits, p_logits = rng.randn(2, 3, 6).astype(np.float32), rng.randn(2, 3, 6)
  valid = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]], bool)
  bc = np.asarray(reweighting.reweighted_logits(pi_logits, p_logits, 0.0, valid))
  vb = np.broadcast_to(valid, bc.shape)
  assert np.all(np.isneginf(bc[~vb]))
  np.testing.assert_allclose(bc[vb], _np_log_softmax(pi_logits)[vb], rtol=1e-6)
  out = np.asarray(reweighting.reweighted_logits(pi_logits, p_logits, 2.5, valid))
  want = _np_log_softmax(pi_logits) + 2.5 * np.exp(_np_log_softmax(p_logits))
  np.testing.assert_allclose(out[vb], want[vb], rtol=1e-5)
  assert np.all(np.isneginf(out[~vb]))
  # Greedy selection never returns an invalid id, even where invalid logits are largest.
  big = pi_logits.copy()
  big[..., 5] = 50.0
  ids = np.asarray(reweighting.select(reweighting.reweighted_logits(big, p_logits, 1.0, valid), 0.0))
  assert np.all(valid[np.arange(3), ids])


def test_select_argmax_and_seeded_sampling():
  logits = jnp.log(jnp.array([[0.1, 0.6, 0.3, 0.0], [0.5, 0.2, 0.2, 0.1]]))
  np.testing.assert_array_equal(np.asarray(reweighting.select(logits, 0)), [1, 0])
  key = jax.random.PRNGKey(0)
  big = jnp.broadcast_to(logits, (20000, 2, 4))
  a = np.asarray(reweighting.select(big, 1.0, key))
  b = np.asarray(reweighting.select(big, 1.0, key))
  np.testing.assert_array_equal(a, b)
  assert a.dtype == np.int32
  assert not np.array_equal(a, np.asarray(reweighting.select(big, 1.0, jax.random.PRNGKey(1))))
  assert not np.any(a[:, 0] == 3)                         # probability 0 is never sampled
  freq = np.stack([(a == i).mean(0) for i in range(4)], -1)
  np.testing.assert_allclose(freq, np.exp(np.asarray(logits)), atol=0.02)
  hot = np.asarray(reweighting.select(big, 0.5, key))           # temperature sharpens
  np.testing.assert_allclose((hot[:, 0] == 1).mean(), 0.36 / 0.46, atol=0.02)
  # A traced temperature works under jit; <= 0 still means argmax.
  sel = jax.jit(reweighting.select)
  np.testing.assert_array_equal(np.asarray(sel(logits, 0.0, key)), [1, 0])
  np.testing.assert_array_equal(np.asarray(sel(big, 1.0, key)), a)
  with pytest.raises(ValueError, match="rng"):
    reweighting.select(logits, 1.0)


def test_jit_matches_eager():
  logits, tokens, valid, mask, dummy = _random_batch(seed=4)
  w = np.random.RandomState(5).rand(*tokens.shape).astype(np.float32)
  for residual in ("dummy", "uniform"):
    fn = functools.partial(losses.weighted_cross_entropy, residual=residual, dummy_id=dummy)
    eager = fn(logits, tokens, w, valid_mask=valid, mask=mask)
    jitted = jax.jit(lambda l, t, w, v, m: fn(l, t, w, valid_mask=v, mask=m))(  # pylint: disable=cell-var-from-loop
        logits, tokens, w, valid, mask)
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5), eager,
                           jitted)
  np.testing.assert_allclose(jax.jit(losses.cross_entropy)(logits, tokens, mask),
                             losses.cross_entropy(logits, tokens, mask), rtol=1e-6)

  p_logits = np.random.RandomState(6).randn(*logits.shape).astype(np.float32)
  r = targets.support_ratio_max(logits, p_logits, valid)
  np.testing.assert_allclose(jax.jit(targets.support_ratio_max)(logits, p_logits, valid, 1e-4),
                             r, rtol=1e-6)
  args = (r, r[:, 0], np.array([0.1, 0.0, 0.3, 1.0]), np.array([0, 0, 1, 1], bool),
          np.array([1, 0, 0, 0], bool))
  for clip in (True, False):
    eager = targets.bellman_weights(*args, GAMMA, clip=clip)
    jitted = jax.jit(targets.bellman_weights, static_argnames="clip")(*args, GAMMA, clip=clip)
    for x, y in zip(eager, jitted):
      np.testing.assert_allclose(x, y, rtol=1e-6)
  np.testing.assert_allclose(
      jax.jit(reweighting.reweighted_logits)(logits, p_logits, 2.0, valid),
      reweighting.reweighted_logits(logits, p_logits, 2.0, valid), rtol=1e-6)
