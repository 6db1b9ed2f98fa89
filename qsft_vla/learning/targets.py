"""Q-SFT Bellman targets on logits (QSFT.md, "The Bellman weight").

Probabilities are always the softmax over the model's FULL output vocabulary
(action bins, the dummy id and any other ids), exactly as the losses train
them; a valid mask only selects which ids are candidate actions.

Indexing convention (0-based, D action dimensions, one control step t):
  position j of a step's logits [B, D, V] is the model's prediction of token
  k_t[j], made at the token state x_t[j] = (history up to o_t, instruction,
  k_t[0..j-1]). QSFT.md counts from 1: its x_t^{j+1} is our x_t[j].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from qsft_vla.learning.spec import DEFAULT_EPS  # noqa: F401 (re-exported)


def vocab_valid_mask(action_mask, vocab_size: int, offset: int = 0) -> np.ndarray:
  """Places an action-token mask bool[D, K] (ActionTokenizer.valid_mask()) at
  ids offset..offset+K-1 of a model vocabulary of `vocab_size`: bool[D, V].
  Every other id (the dummy, text tokens) is invalid."""
  action_mask = np.asarray(action_mask, bool)
  n_dims, k = action_mask.shape
  if offset < 0 or offset + k > vocab_size:
    raise ValueError(f"action ids {offset}..{offset + k - 1} do not fit a vocabulary of "
                     f"{vocab_size}")
  out = np.zeros((n_dims, vocab_size), bool)
  out[:, offset:offset + k] = action_mask
  return out


def support_ratio_max(pi_logits, p_target_logits, valid_mask, eps=DEFAULT_EPS):
  """R(x) = max over valid b with pi_phi(b|x) > eps of p_theta_bar(b|x) / pi_phi(b|x).

  Args:
    pi_logits: [..., V] logits of the behaviour policy pi_phi.
    p_target_logits: [..., V] logits of the target likelihood model p_theta_bar.
    valid_mask: bool, broadcastable to [..., V]; True for the action bins that
      may be taken at that position (e.g. vocab_valid_mask(...) [D, V] for
      logits [B, D, V]).
    eps: support threshold on pi_phi (QSFT.md: 1e-4).

  Returns:
    float32[...]: R at each position. Both distributions are softmaxes over
    the full vocabulary V; the ratio is exp(log p - log pi) in float32. If no
    valid b has pi_phi(b|x) > eps, R falls back to the ratio at the valid token
    of largest pi_phi (the one action the data supports most). Not
    stop-gradient'ed: bellman_weights does that.
  """
  log_pi = jax.nn.log_softmax(jnp.asarray(pi_logits, jnp.float32), axis=-1)
  log_p = jax.nn.log_softmax(jnp.asarray(p_target_logits, jnp.float32), axis=-1)
  valid = jnp.broadcast_to(jnp.asarray(valid_mask, bool), log_pi.shape)
  log_ratio = log_p - log_pi
  support = valid & (log_pi > jnp.log(jnp.asarray(eps, jnp.float32)))
  best = jnp.max(jnp.where(support, log_ratio, -jnp.inf), axis=-1)
  # Fallback index: the most likely valid token under pi_phi.
  fallback_id = jnp.argmax(jnp.where(valid, log_pi, -jnp.inf), axis=-1)
  fallback = jnp.take_along_axis(log_ratio, fallback_id[..., None], axis=-1)[..., 0]
  return jnp.exp(jnp.where(jnp.any(support, axis=-1), best, fallback))


def support_ratio_expectile(pi_logits, p_target_logits, valid_mask, tau, eps=DEFAULT_EPS,
                            iterations=30):
  """The tau-expectile of p_theta_bar(b|x) / pi_phi(b|x) over b ~ pi_phi restricted to
  the support (valid b with pi_phi(b|x) > eps): a soft in-support max.

  The hard max of support_ratio_max takes the largest of several noisy ratios of
  two networks, which exceeds 1/gamma wherever every supported action is about as
  good, so weights pile up at the clip and the ranking between near-1 actions is
  noise. The expectile (as IQL's value backup) moves from the pi-weighted mean of
  the ratios (tau = 0.5) towards their max (tau -> 1) without reading the single
  largest one. m solves sum_b pi(b) |tau - 1[r_b < m]| (r_b - m) = 0; the
  fixed-point iteration m <- weighted mean with weights pi(b) |tau - 1[r_b < m]|
  reaches it in at most one step per distinct ratio (`iterations` of them).
  Falls back like support_ratio_max where no valid b is in the support.
  Returns float32[...] for logits [..., V].
  """
  log_pi = jax.nn.log_softmax(jnp.asarray(pi_logits, jnp.float32), axis=-1)
  log_p = jax.nn.log_softmax(jnp.asarray(p_target_logits, jnp.float32), axis=-1)
  valid = jnp.broadcast_to(jnp.asarray(valid_mask, bool), log_pi.shape)
  support = valid & (log_pi > jnp.log(jnp.asarray(eps, jnp.float32)))
  ratio = jnp.exp(jnp.where(support, log_p - log_pi, 0.0))
  w = jnp.where(support, jnp.exp(log_pi), 0.0)
  total = jnp.maximum(jnp.sum(w, axis=-1, keepdims=True), 1e-30)
  m = jnp.sum(w * ratio, axis=-1, keepdims=True) / total        # tau = 0.5: the mean

  def body(_, m):
    c = w * jnp.where(ratio >= m, tau, 1.0 - tau)
    return jnp.sum(c * ratio, axis=-1, keepdims=True) / jnp.maximum(
        jnp.sum(c, axis=-1, keepdims=True), 1e-30)

  m = jax.lax.fori_loop(0, iterations, body, m)[..., 0]
  fallback = support_ratio_max(pi_logits, p_target_logits, valid_mask, eps)
  return jnp.where(jnp.any(support, axis=-1), m, fallback)


def behavior_value(p_target_logits, valid_mask):
  """The "mean" backup: E_{b ~ pi}[p_theta_bar(b|x) / pi(b|x)] = sum over valid b of
  p_theta_bar(b|x), the implied value of the behaviour policy at x (SARSA-like).

  Where the max of support_ratio_max takes the largest of several noisy ratios
  of two networks (biased upwards, so that weights pile up at the clip), this
  needs no ratio and no pi_phi at all: with the "dummy" residual it is
  1 - p_theta_bar(dummy|x). Q then estimates the behaviour's Q-function, and
  the policy extraction is one step of improvement on it (one-step offline RL).
  Returns float32[...] for logits [..., V].
  """
  p = jax.nn.softmax(jnp.asarray(p_target_logits, jnp.float32), axis=-1)
  valid = jnp.broadcast_to(jnp.asarray(valid_mask, bool), p.shape)
  return jnp.sum(jnp.where(valid, p, 0.0), axis=-1)


def backup_value(backup: str, pi_logits, p_target_logits, valid_mask, eps=DEFAULT_EPS,
                 tau: float = 0.9):
  """R(x) of LearnerConfig.backup: "max" (support_ratio_max), "expectile"
  (support_ratio_expectile at tau) or "mean" (behavior_value; pi_logits unused,
  may be None)."""
  if backup == "max":
    return support_ratio_max(pi_logits, p_target_logits, valid_mask, eps)
  if backup == "expectile":
    return support_ratio_expectile(pi_logits, p_target_logits, valid_mask, tau, eps)
  if backup == "mean":
    return behavior_value(p_target_logits, valid_mask)
  raise ValueError(f"unknown backup {backup!r}")


def bellman_weights(R_within, R_next_first, reward, terminal, has_next, gamma, clip=True,  # pylint: disable=invalid-name
                    return_to_go=None, mixed_return=None, mc_mix=0.0):
  """Per-token Q-SFT weights w[B, D] and the mask of tokens that have a target.

  Args:
    R_within: float[B, D]; R_within[:, j] = R(x_t[j]), the support ratio at
      the position that predicts token j of step t (support_ratio_max on the
      step's logits [B, D, V] gives exactly this). Column 0 is not used here:
      R(x_t[0]) is the bootstrap of the previous step, not of this one.
    R_next_first: float[B]; R(x_{t+1}[0]), the ratio at the first token of the
      next step (position 0 of the next observation's logits). Ignored where
      there is no bootstrap (terminal or no next state).
    reward: float[B], already rescaled so that Q stays in [0, 1].
    terminal: bool[B]; the step reached a terminal state (no bootstrap).
    has_next: bool[B]; False on an episode's last step (no s').
    gamma: discount, applied once per control step.
    clip: clip w to [0, 1] (QSFT.md default; the author's code does not clip).
    return_to_go: optional float[B], the observed discounted return G_t from
      step t (same gamma, rescaled rewards): the Monte-Carlo lower bound
      (QSFT.md, "Optional"): every token's weight becomes max(w, G_t), before
      clipping. It also applies where the bootstrap is dropped (truncated
      ends), but those tokens stay masked.
    mixed_return: optional float[B], G_t again, for the mixed Monte-Carlo
      target (Ostrovski et al. 2017, "mixed Monte Carlo"): every token's
      weight becomes (1 - mc_mix) * w + mc_mix * G_t, before the lower bound
      and the clip. mc_mix = 1 is the pure Monte-Carlo target (no
      bootstrapping): p -> pi_beta * E[G | s, a].
    mc_mix: the mixing coefficient in [0, 1]; 0 (default) is the paper.

  Returns:
    w: float32[B, D], stop-gradient.
      j < D-1: w[:, j] = R_within[:, j+1] (the state after token j; gamma = 1
               and no reward inside a step).
      j = D-1: w[:, D-1] = reward + gamma * (1 - terminal) * R_next_first.
    td_mask: float32[B, D], 1 where the token has a target. A truncated end
      (not terminal and not has_next) has no s', so its bootstrap is dropped:
      td_mask[:, D-1] = 0 there (and w[:, D-1] = reward, never read), while
      its inside-step tokens keep their targets (they need no s').
  """
  r_within = jnp.asarray(R_within, jnp.float32)
  reward = jnp.asarray(reward, jnp.float32)
  terminal = jnp.asarray(terminal, bool)
  has_next = jnp.asarray(has_next, bool)
  bootstrap = ~terminal & has_next
  # where, not multiply: a stale R_next_first (e.g. inf) must not leak via 0 * inf.
  last = reward + jnp.where(bootstrap, gamma * jnp.asarray(R_next_first, jnp.float32), 0.0)
  w = jnp.concatenate([r_within[:, 1:], last[:, None]], axis=1)
  if mixed_return is not None and mc_mix:
    g = jnp.broadcast_to(jnp.asarray(mixed_return, jnp.float32)[:, None], w.shape)
    # At mc_mix = 1 the bootstrap is not read at all (a stale inf must not give 0 * inf).
    w = g if mc_mix >= 1.0 else (1.0 - mc_mix) * w + mc_mix * g
  if return_to_go is not None:
    w = jnp.maximum(w, jnp.asarray(return_to_go, jnp.float32)[:, None])
  if clip:
    w = jnp.clip(w, 0.0, 1.0)
  truncated = ~terminal & ~has_next
  td_mask = jnp.ones(w.shape, jnp.float32).at[:, -1].set(jnp.where(truncated, 0.0, 1.0))
  return jax.lax.stop_gradient(w), td_mask
