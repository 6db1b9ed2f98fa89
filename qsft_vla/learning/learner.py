"""The Q-SFT learner (QSFT.md): pi_phi, p_theta and p_theta_bar trained on batches.

Algorithms (LearnerConfig.algorithm):
  "qsft":        pi_phi with L_CE, p_theta with L_WCE (Bellman weights from
                 pi_phi and the Polyak target p_theta_bar), Polyak update of
                 the target after every p_theta step.
  "bc":          pi_phi with L_CE only (no p_theta, no target).
  "filtered_bc": L_CE on pi_phi, as "bc": the data side keeps only the episodes
                 at or above filter_quantile of their dataset's returns and drops
                 the rest before batching (train.filter_thresholds ->
                 data.pipeline keep_returns), so every batch is full of kept
                 steps and the learner has nothing to filter.

Architectures (LearnerConfig.architecture):
  "separate": pi_phi and p_theta are two copies of a single-head model
              (model.config.num_output_heads == 1); params_pi and params_p are
              full flax variable dicts, params_target a copy of params_p.
  With the pure Monte-Carlo target (mc_mix = 1) nothing reads p_theta_bar, so
  params_target is {} under every architecture (layout.param_groups): no Polyak
  update, nothing saved.
  "shared":   one trunk with two output heads (num_output_heads == 2): head 0
              ("head") is pi_phi, head 1 ("head_1") is p_theta. params_pi
              holds the trunk AND the pi head, params_p only {"params":
              {"head_1": ...}}; params_target is a copy of the whole shared
              variables (trunk and both heads), of which only head 1 is read.
              At init head_1 is a copy of head, so p_theta starts equal to
              pi_phi, as with separate backbones.
  "shared_encoder": as "shared", but p_theta also has its own transformer
              (rt1_small's p_trunk, in params_p beside head_1) on the one
              observation encoder, which runs once for both networks and is
              trained by both losses (it sits in params_pi, so L_WCE's
              gradient reaches it there). At init p_trunk is a copy of
              pi_phi's transformer.
  "pi_head":  one trunk with two heads, the other way round: the trunk and
              head 1 are p_theta (params_p) and train on L_WCE alone; pi_phi is
              head 0 (params_pi = {"params": {"head"}}) behind a stop-gradient
              (the model's detach_head0), trained by L_CE. A step costs about one
              network's. With the Monte-Carlo target (mc_mix = 1) and the
              independent parametrization p_theta's training never reads pi_phi,
              so it is exactly a separate p_theta's (without dropout).

Schedules (LearnerConfig.schedule):
  "joint":      every step trains both (the author's code: L_CE + L_WCE).
  "sequential": steps [0, pi_steps) train pi_phi only, later steps p_theta
                only with pi_phi frozen (the paper's Algorithm 1). With the
                shared architecture the p phase trains only the p head (the
                trunk belongs to pi_phi and stays frozen); pi_head refuses it.
A frozen group's params and optimiser state are kept bit for bit (selected
with jnp.where), and the target moves only on steps that update p_theta.

The weight of the last token of a step needs R(x_{t+1}[0]), i.e. pi_phi and
p_theta_bar at position 0 of the NEXT observation. The next step's action
tokens are unknown, but position 0 is exact with any tokens: its input is the
learned start embedding (never a token), and the prefix-LM mask lets it
attend only to the observation prefix and itself, so tokens fed at positions
>= 1 cannot reach it. We feed zeros.

Chunked batches (LearnerConfig.chunk_length = L > 1): every L rows of a batch are
consecutive steps of one episode (the data pipeline builds them; `check_chunks`
verifies it on the host from episode_index / step_index). Where a row bootstraps
(has_next and not terminal) the next row is its next step, so the forward pass a
step already makes at the current states gives position 0 of the next states:
the target's next-state logits are its current-state logits shifted by one row
(with D > 1, where those are computed anyway: 2B passes become B + B/L), and
pi_phi's come from the loss's own forward pass (B become B/L; exact without
dropout; with dropout pi_phi keeps its own no-dropout pass). Only each chunk's
last row needs its next state passed on its own. A row that does not bootstrap
never reads its next state, so a chunk may cross the end of an episode. The
weights equal the reference path's to float tolerance when the instruction is
the same at t and t+1 and nothing augments frames (augmentation crops s' in the
next row differently from s' in this row's next_observation; both are valid).

Targets (LearnerConfig.backup, mc_lower_bound, mc_mix): the paper's in-support
max of p_theta_bar / pi_phi at the next state, the behaviour's value
sum_b p_theta_bar(b), or the expectile of the in-support ratios between them
(targets.backup_value); optionally bounded below by the return-to-go G_t and/or
mixed with it. With mc_mix = 1 the target is G_t alone and the target network is
never evaluated; with one action dimension it is evaluated at the next state only.

LoRA (LearnerConfig.lora_rank > 0, models/lora.py): params_pi, params_p and
params_target are adapter sets {"adapters", "trained"} on one frozen base
(TrainState.base: the pretrained weights, never updated, never checkpointed);
each network applied is lora.merge(base, set). Optimisers, Polyak update and
the finiteness check run on the sets; gradients reach the sets only.

A step whose losses or gradients are not all finite changes nothing (params,
optimiser states and target are kept bit for bit) and reports
metrics["nonfinite"] = 1; the training loop decides whether to stop.

Logits of ids that are not allowed at a position are replaced by a large
negative constant before every softmax (LearnerConfig.mask_invalid_logits):
pi_phi may put mass only on the valid bins of that dimension, p_theta on those
bins and the dummy (bins only with residual "uniform"). Then those ids have
probability exactly 0 and their logits do not matter for L_CE / L_WCE / R. The controller must apply the same
masks (reweighting.allowed_ids / reweighting.mask_logits) before reweighting.reweighted_logits.

Batch (leading axis B; with steps_per_call S > 1 every leaf has a leading
microbatch axis [S, B, ...] and S optimiser steps run in one call via
lax.scan): observation, history_mask, next_observation, next_history_mask,
text_ids int32[B, L], text_mask bool[B, L] (tokenised outside), action_tokens
int32[B, D], reward, terminal, has_next (and return_to_go for the Monte-Carlo
targets). Other keys (instruction bytes, indices) are dropped.

Everything is TF-free; `step` is jit-compiled on a jax.sharding.Mesh with axes
("data", "fsdp") (learning/sharding.py): the batch split over every device, the
params, target and optimiser states split over "fsdp" by rules keyed on their
names (fsdp = 1: replicated, plain data parallelism).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from qsft_vla.learning import losses, polyak, reweighting, sharding, targets
from qsft_vla.models import lora
# The schema lives in spec.py and the parameter layout in policy/layout.py
# (optax-free, shared with the checkpoint loader and the Controller); the
# schema's names are re-exported for training code.
from qsft_vla.learning.spec import (ALGORITHMS, ARCHITECTURES, BACKUPS,  # noqa: F401
                                    SCHEDULES, LearnerConfig, check_model_fields,
                                    model_config_for)
from qsft_vla.policy import layout
from qsft_vla.policy.layout import P_HEAD, merge_shared

RESIDUAL_DUMMY_BIAS = 20.0
NEG_INF = reweighting.NEG_INF
BATCH_KEYS = ("observation", "history_mask", "next_observation", "next_history_mask",
              "text_ids", "text_mask", "action_tokens", "reward", "terminal", "has_next",
              "return_to_go")
CHUNK_KEYS = ("episode_index", "step_index")  # what check_chunks reads (dataset_index too)


def check_chunks(batch, length: int) -> None:
  """Raises ValueError unless every `length` rows of the batch ([B] or [S, B]
  leaves) are consecutive steps wherever a row bootstraps (has_next and not
  terminal): the next row must be the same episode of the same dataset, one step
  later. Host-side numpy on index arrays (microseconds)."""
  missing = [k for k in CHUNK_KEYS if k not in batch]
  if missing:
    raise ValueError(f"learner.chunk_length={length} needs the batch's {missing} to check "
                     "that its rows are consecutive steps")
  flat = lambda k: np.asarray(batch[k]).reshape(-1, length)
  if np.asarray(batch["reward"]).size % length:
    raise ValueError(f"a batch of {np.asarray(batch['reward']).shape} does not split into "
                     f"chunks of learner.chunk_length={length}")
  ep, step = flat("episode_index"), flat("step_index")
  ds = flat("dataset_index") if "dataset_index" in batch else np.zeros_like(ep)
  boot = (flat("has_next") & ~flat("terminal"))[:, :-1]
  ok = (ep[:, 1:] == ep[:, :-1]) & (ds[:, 1:] == ds[:, :-1]) & (step[:, 1:] == step[:, :-1] + 1)
  bad = np.argwhere(boot & ~ok)
  if bad.size:
    c, i = bad[0]
    raise ValueError(
        f"learner.chunk_length={length}: row {c * length + i} (dataset {ds[c, i]}, episode "
        f"{ep[c, i]}, step {step[c, i]}) bootstraps but the next row is dataset "
        f"{ds[c, i + 1]}, episode {ep[c, i + 1]}, step {step[c, i + 1]}: the batch is not "
        "chunks of consecutive steps (build it with the pipeline's chunk_length)")


def _by_chunk(x, length: int):
  """[B, ...] -> [B / length, length, ...]: the rows of each chunk together."""
  return x.reshape((-1, length) + x.shape[1:])


def _shift_next(current, ends, length: int):
  """Per chunk of `length` rows: the rows' values at the NEXT state from those at
  the current state (row i+1) and, for each chunk's last row, `ends` [B/L, ...]."""
  cur = _by_chunk(current, length)
  return jnp.concatenate([cur[:, 1:], ends[:, None]], axis=1).reshape(current.shape)


@flax.struct.dataclass
class TrainState:
  """params_pi / params_p: the two trained groups (see the module docstring for
  what they hold per architecture); params_target: p_theta_bar ({} without
  p_theta); opt_pi / opt_p: their optax states; rng: base key for dropout;
  base: LoRA's frozen pretrained weights ({} without LoRA)."""
  step: jax.Array
  params_pi: Any
  params_p: Any
  params_target: Any
  opt_pi: Any
  opt_p: Any
  rng: jax.Array
  base: Any = dataclasses.field(default_factory=dict)


def _tree_where(cond, a, b):
  return jax.tree_util.tree_map(lambda x, y: jnp.where(cond, x, y), a, b)


class Learner:
  """Learner(model, config, valid_mask): init(rng, example_batch) and step(state, batch).

  model: an RT1Small-like flax module, __call__(observation, history_mask,
    text_ids, text_mask, action_tokens, train) -> logits [B, D, V] (or
    [2, B, D, V] for the shared architecture), with config.dummy_id and
    config.num_output_heads (use model_config_for).
  valid_mask: bool[D, K] (ActionTokenizer.valid_mask()); action ids are 0..K-1.
  mesh: a Mesh with axes ("data", "fsdp") (sharding.make_mesh), or only "data";
    default: all local devices on "data".
  sharding_rules: "REGEX:AXIS" rules placing each state leaf on the "fsdp" axis
    (sharding.DEFAULT_RULES by default); they change where the state lives, never
    the math.
  """

  def __init__(self, model, config: LearnerConfig, valid_mask, mesh: Optional[Mesh] = None,
               sharding_rules=sharding.DEFAULT_RULES):
    self.model = model
    self.config = config
    absent = {"num_output_heads": 1, "p_trunk": False, "detach_head0": False}
    want = {**absent, **config.model_fields}
    got = {k: getattr(model.config, k, absent[k]) for k in want}
    if got != want:
      raise ValueError(f"algorithm={config.algorithm!r}, architecture={config.architecture!r} "
                       f"needs a model with {want}, got {got} (use learner.model_config_for)")
    self.dummy_id = int(model.config.dummy_id)
    vocab = int(model.config.output_size)
    self.valid, self.p_allowed = reweighting.allowed_ids(valid_mask, vocab, self.dummy_id,
                                                    config.residual)   # [D, V] each
    self.mesh = mesh if mesh is not None else sharding.make_mesh(jax.devices(), 1)
    self.rules = sharding.parse_rules(sharding_rules)
    self.lora = lora.spec_of(config)
    self.opt_pi = self._optimizer(config.lr_pi)
    self.opt_p = self._optimizer(config.lr_p)
    self._jit_step = None

  # ------------------------------------------------------------------ pieces
  def _optimizer(self, lr):
    chain = []
    if self.config.grad_clip_norm is not None:
      chain.append(optax.clip_by_global_norm(self.config.grad_clip_norm))
    chain.append(optax.adam(lr))
    return optax.chain(*chain)

  def mask_pi_logits(self, logits):
    """pi_phi's logits [..., D, V] with ids other than that dim's bins at NEG_INF."""
    if not self.config.mask_invalid_logits:
      return logits
    return reweighting.mask_logits(logits, self.valid)

  def mask_p_logits(self, logits):
    """p_theta's logits [..., D, V] with ids other than that dim's bins and the
    dummy ("dummy" residual) at NEG_INF."""
    if not self.config.mask_invalid_logits:
      return logits
    return reweighting.mask_logits(logits, self.p_allowed)

  def p_logits_from(self, pi_logits, p_raw):
    """p_theta's masked logits from the p network's raw output and pi_phi's masked
    logits (used only by the "residual" parametrization)."""
    if self.config.p_parametrization == "residual":
      p_raw = reweighting.residual_p_logits(pi_logits, p_raw, self.valid)
    return self.mask_p_logits(p_raw)

  def _apply(self, variables, obs, hm, ti, tm, tokens, rng):
    if rng is None:
      return self.model.apply(variables, obs, hm, ti, tm, tokens, False)
    return self.model.apply(variables, obs, hm, ti, tm, tokens, True, rngs={"dropout": rng})

  def policy_logits(self, params, obs, hm, ti, tm, tokens):
    """Masked logits [B, D, V] of pi_phi and p_theta (None without p_theta) for
    inference params (layout.inference_params), teacher-forced on `tokens`, no dropout."""
    if "shared" in params:
      out = self._apply(params["shared"], obs, hm, ti, tm, tokens, None)
      pi_raw, p_raw = out[0], out[1]
    else:
      pi_raw = self._apply(params["pi"], obs, hm, ti, tm, tokens, None)
      p_raw = self._apply(params["p"], obs, hm, ti, tm, tokens, None) if "p" in params else None
    pi_logits = self.mask_pi_logits(pi_raw)
    return pi_logits, (None if p_raw is None else self.p_logits_from(pi_logits, p_raw))

  def network(self, state: TrainState, group):
    """The full variables a training group stands for (LoRA: base + adapters)."""
    return lora.merge(state.base, group, self.lora) if self.lora else group

  def inference_params(self, state: TrainState):
    """{"pi": variables, "p": variables} for separate backbones (p absent for BC),
    {"shared": variables} (head 0 = pi, head 1 = p) for the shared trunk; LoRA
    sets are merged into full variables."""
    pi = self.network(state, state.params_pi)
    p = self.network(state, state.params_p) if self.config.uses_p else state.params_p
    return layout.inference_params(self.config, pi, p)

  # -------------------------------------------------------------------- init
  def init(self, rng, example_batch, variables=None, pretrained=None) -> TrainState:
    """All networks start from the same weights: `variables` (e.g. pretrained)
    or a fresh model.init(rng, ...) on example_batch (leading axis B; with
    steps_per_call > 1 the [S, B, ...] batch is accepted too).
    pretrained: with LoRA, the paths of the leaves of `variables` that come from
    pretrained weights (lora.paths(registry.pretrained_params(...))): the base."""
    batch = self._select(example_batch, check_targets=False)
    if self.config.steps_per_call > 1 and np.ndim(batch["reward"]) == 2:
      batch = jax.tree_util.tree_map(lambda x: x[0], batch)
    init_rng, state_rng = jax.random.split(rng)
    if variables is None:
      variables = jax.jit(self.model.init, static_argnums=6)(
          init_rng, batch["observation"], batch["history_mask"], batch["text_ids"],
          batch["text_mask"], batch["action_tokens"], False)
    variables = jax.tree_util.tree_map(jnp.asarray, flax.core.unfreeze(variables))
    if self.lora:
      return self._init_lora(variables, pretrained, init_rng, state_rng)
    residual = self.config.p_parametrization == "residual"
    shared = self.config.num_output_heads == 2
    if shared:
      params = dict(variables["params"])
      params[P_HEAD] = jax.tree_util.tree_map(jnp.array, params["head"])  # p starts as pi
      if layout.P_TRUNK in params:  # shared encoder: so does p_theta's own transformer
        params[layout.P_TRUNK] = {k: jax.tree_util.tree_map(jnp.array, params[k])
                                  for k in params[layout.P_TRUNK]}
      if residual:
        params[P_HEAD] = self._residual_head(params[P_HEAD])
      variables = {**variables, "params": params}
    groups = layout.param_groups(variables, self.config)
    group_pi = groups["params_pi"]
    # Separate backbones: p_theta gets its own buffers (the shared split already has them).
    group_p = groups["params_p"] if shared else jax.tree_util.tree_map(jnp.array,
                                                                        groups["params_p"])
    if residual and not shared and self.config.uses_p:
      if "head" not in group_p.get("params", {}):
        raise ValueError('p_parametrization="residual" needs a model whose output layer is '
                         f'a parameter "head" (rt1_small); {type(self.model).__name__} has '
                         f'{sorted(group_p.get("params", {}))}')
      group_p = {**group_p, "params": {**group_p["params"],
                                       "head": self._residual_head(group_p["params"]["head"])}}
    target = {}
    if groups["params_target"]:  # {} for BC and for the pure Monte-Carlo target
      target = jax.tree_util.tree_map(jnp.array, variables if shared else group_p)
    state = TrainState(step=jnp.zeros((), jnp.int32), params_pi=group_pi, params_p=group_p,
                       params_target=target, opt_pi=self.opt_pi.init(group_pi),
                       opt_p=self.opt_p.init(group_p), rng=state_rng)
    return jax.device_put(state, self.state_shardings(state))

  def _init_lora(self, variables, pretrained, init_rng, state_rng) -> TrainState:
    """Three equal adapter sets (B = 0: each equals the base) on the frozen base."""
    if not pretrained:
      raise ValueError("lora_rank > 0 needs a model with pretrained weights (the frozen base); "
                       f"{type(self.model).__name__} with this config loads none")
    base, group_pi = lora.split(variables, pretrained, self.lora, jax.random.fold_in(init_rng, 1))
    copy = lambda t: jax.tree_util.tree_map(jnp.array, t)
    group_p = copy(group_pi) if self.config.uses_p else {}
    target = copy(group_pi) if self.config.keeps_target else {}
    state = TrainState(step=jnp.zeros((), jnp.int32), params_pi=group_pi, params_p=group_p,
                       params_target=target, opt_pi=self.opt_pi.init(group_pi),
                       opt_p=self.opt_p.init(group_p), rng=state_rng, base=base)
    return jax.device_put(state, self.state_shardings(state))

  def state_shardings(self, state: TrainState):
    """Where each leaf of a TrainState (or of its abstract shapes) lives on self.mesh."""
    return sharding.tree_shardings(state, self.mesh, self.rules)

  def _residual_head(self, head):
    """The p network's output layer at the start of the "residual" parametrization:
    zero, except a dummy bias of -RESIDUAL_DUMMY_BIAS, so p_theta = pi_phi (to e^-20)."""
    zero = jax.tree_util.tree_map(jnp.zeros_like, head)
    if "bias" in zero:
      zero["bias"] = zero["bias"].at[self.dummy_id].set(-RESIDUAL_DUMMY_BIAS)
    return zero

  # -------------------------------------------------------------------- step
  def _select(self, batch, check_targets=True):
    if check_targets and self.config.chunk_length > 1:
      check_chunks(batch, self.config.chunk_length)
    out = {k: batch[k] for k in BATCH_KEYS if k in batch}
    missing = [k for k in BATCH_KEYS[:10] if k not in out]
    if missing:
      raise ValueError(f"batch misses keys {missing}; got {sorted(batch)}")
    if check_targets and self.config.uses_p and (self.config.mc_lower_bound or self.config.mc_mix) \
        and "return_to_go" not in out:
      raise ValueError("mc_lower_bound / mc_mix need a batch field 'return_to_go'")
    return out

  def _active(self, step):
    """(train pi_phi?, train p_theta?) as bool scalars for this step."""
    cfg = self.config
    if not cfg.uses_p:
      return jnp.asarray(True), jnp.asarray(False)
    if cfg.schedule == "joint":
      return jnp.asarray(True), jnp.asarray(True)
    in_pi_phase = step < cfg.pi_steps
    return in_pi_phase, ~in_pi_phase

  def train_step(self, state: TrainState, batch) -> tuple[TrainState, dict]:
    """One optimiser step on one batch [B, ...] (plain function; `step` jits it)."""
    cfg = self.config
    train_pi, train_p = self._active(state.step)
    rng = jax.random.fold_in(state.rng, state.step)
    k = cfg.microbatches
    if k == 1:
      g_pi, g_p, aux = self._gradients(state, batch, train_pi, train_p, rng)
    else:
      size = batch["reward"].shape[0]
      if size % k or (size // k) % cfg.chunk_length:
        raise ValueError(f"batch of {size} does not split into learner.microbatches={k}"
                         + (f" of whole chunks of learner.chunk_length={cfg.chunk_length}"
                            if cfg.chunk_length > 1 else ""))
      micro = jax.tree_util.tree_map(lambda x: x.reshape((k, size // k) + x.shape[1:]), batch)

      def accumulate(carry, mb):
        i, total = carry
        out = self._gradients(state, mb, train_pi, train_p, jax.random.fold_in(rng, i))
        return (i + 1, jax.tree_util.tree_map(jnp.add, total, out)), None

      zeros = jax.tree_util.tree_map(
          jnp.zeros_like, jax.eval_shape(
              lambda mb: self._gradients(state, mb, train_pi, train_p, rng),
              jax.tree_util.tree_map(lambda x: x[0], micro)))
      (_, total), _ = jax.lax.scan(accumulate, (jnp.zeros((), jnp.int32), zeros), micro)
      # The mean over microbatches: gradients and metrics alike.
      g_pi, g_p, aux = jax.tree_util.tree_map(lambda x: x / k, total)
    return self._update(state, g_pi, g_p, aux, train_pi, train_p)

  def _gradients(self, state: TrainState, batch, train_pi, train_p, rng):
    """(grad of pi_phi's group, grad of p_theta's group, metrics) on one (micro)batch."""
    cfg = self.config
    obs, hm = batch["observation"], batch["history_mask"]
    ti, tm = batch["text_ids"], batch["text_mask"]
    tokens = jnp.asarray(batch["action_tokens"], jnp.int32)
    w_pi = train_pi.astype(jnp.float32)
    w_p = train_p.astype(jnp.float32)
    rng_pi = rng_p = None
    if self.model.config.dropout > 0:
      rng_pi, rng_p = jax.random.split(rng)
    shared = cfg.num_output_heads == 2
    chunk = cfg.chunk_length
    pi_from_loss = False

    if cfg.keeps_target:  # the bootstrapped target reads p_theta_bar
      # Targets: constants computed before the update, from the current pi_phi and p_theta_bar.
      next_tokens = jnp.zeros_like(tokens)  # exact for position 0, see the module docstring
      nobs, nhm = batch["next_observation"], batch["next_history_mask"]
      # The "mean" backup needs no pi_phi at the next state (one forward pass less),
      # unless p_theta's logits are built on pi_phi's.
      need_pi_next = cfg.backup != "mean" or cfg.p_parametrization == "residual"
      # The target at the current state only gives the inside-step weights of tokens
      # 0..D-2: with one action dimension there are none (one forward pass less).
      need_now = tokens.shape[-1] > 1
      head = (lambda x: x[1]) if shared else (lambda x: x)
      if chunk > 1:  # each chunk's last next state: the one not in the batch's rows
        # (check_chunks and train_step have made sure the (micro)batch is whole chunks)
        e_in = jax.tree_util.tree_map(lambda x: _by_chunk(x, chunk)[:, -1],
                                      (nobs, nhm, ti, tm, next_tokens))
        # pi_phi at the next states is the loss's own pass (no dropout there).
        pi_from_loss = need_pi_next and self.model.config.dropout == 0
      if need_pi_next:
        online = (merge_shared(state.params_pi, state.params_p) if shared
                  else self.network(state, state.params_pi))
        pick = (lambda x: x[0]) if shared else (lambda x: x)
        if pi_from_loss:
          pi_end = self.mask_pi_logits(pick(self._apply(online, *e_in, None)))
        else:
          pi_next = self.mask_pi_logits(pick(
              self._apply(online, nobs, nhm, ti, tm, next_tokens, None)))
      target = self.network(state, state.params_target)
      if chunk > 1 and need_now:
        # One pass over the current states and the chunks' last next states.
        both = jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a, b]),
                                      (obs, hm, ti, tm, tokens), e_in)
        out = head(self._apply(target, *both, None))
        size = tokens.shape[0]
        tgt_now, tgt_next_raw = out[:size], _shift_next(out[:size], out[size:], chunk)
      else:
        if need_now:
          tgt_now = head(self._apply(target, obs, hm, ti, tm, tokens, None))
        tgt_next_raw = head(self._apply(target, nobs, nhm, ti, tm, next_tokens, None))

    def loss_fn(group_pi, group_p):
      if shared:
        logits = self._apply(merge_shared(group_pi, group_p), obs, hm, ti, tm, tokens, rng_pi)
        pi_logits, p_logits = logits[0], logits[1]
      else:
        pi_logits = self._apply(self.network(state, group_pi), obs, hm, ti, tm, tokens, rng_pi)
        p_logits = (self._apply(self.network(state, group_p), obs, hm, ti, tm, tokens, rng_p)
                    if cfg.uses_p else None)
      pi_logits = self.mask_pi_logits(pi_logits)
      loss_pi = losses.cross_entropy(pi_logits, tokens)
      aux = {"loss_pi": loss_pi}
      if not cfg.uses_p:
        return loss_pi, aux
      pi_sg = jax.lax.stop_gradient(pi_logits)
      p_logits = self.p_logits_from(pi_sg, p_logits)
      r_within = jnp.zeros(tokens.shape, jnp.float32)  # read only at columns 1..D-1
      if not cfg.bootstraps:  # pure Monte Carlo: the bootstrap terms are multiplied by 0
        r_next = jnp.zeros(tokens.shape[:1], jnp.float32)
      else:
        def backup(pi_l, tgt_l, valid):
          return targets.backup_value(cfg.backup, pi_l, tgt_l, valid, cfg.eps, cfg.expectile_tau)
        if need_now:
          r_within = backup(pi_sg, self.p_logits_from(pi_sg, tgt_now), self.valid)
        pi_nx = _shift_next(pi_sg, pi_end, chunk) if pi_from_loss else (
            pi_next if need_pi_next else None)
        tgt_next = (self.p_logits_from(pi_nx, tgt_next_raw) if need_pi_next
                    else self.mask_p_logits(tgt_next_raw))
        r_next = backup(pi_nx[:, 0] if need_pi_next else None, tgt_next[:, 0], self.valid[0])
      # r_next_first: the mean R(x_{t+1}[0]) over the rows whose weight reads it.
      bootstrap = (~jnp.asarray(batch["terminal"], bool)
                   & jnp.asarray(batch["has_next"], bool)).astype(jnp.float32)
      w, td_mask = targets.bellman_weights(
          r_within, r_next, batch["reward"], batch["terminal"], batch["has_next"], cfg.gamma,
          cfg.clip_weights,
          return_to_go=batch["return_to_go"] if cfg.mc_lower_bound else None,
          mixed_return=batch["return_to_go"] if cfg.mc_mix else None, mc_mix=cfg.mc_mix)
      loss_p, wmetrics = losses.weighted_cross_entropy(
          p_logits, tokens, w, residual=cfg.residual, dummy_id=self.dummy_id,
          valid_mask=self.valid, mask=td_mask)
      logp_p = jax.nn.log_softmax(jax.lax.stop_gradient(p_logits), -1)
      logp_pi = jax.nn.log_softmax(pi_sg, -1)
      tok = tokens[..., None]
      log_ratio = (jnp.take_along_axis(logp_p, tok, -1) - jnp.take_along_axis(logp_pi, tok, -1))
      aux.update({"loss_p": loss_p, "ratio_p_pi": jnp.mean(jnp.exp(log_ratio)),
                  "r_next_first": losses.masked_mean(r_next, bootstrap),
                  "td_mask_mean": jnp.mean(td_mask)})
      aux.update(wmetrics)
      return w_pi * loss_pi + w_p * loss_p, aux

    (_, aux), (g_pi, g_p) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
        state.params_pi, state.params_p)
    return g_pi, g_p, aux

  def _update(self, state: TrainState, g_pi, g_p, aux, train_pi, train_p):
    """The optimiser steps, the Polyak target and the metrics, from the gradients."""
    cfg = self.config
    shared = cfg.num_output_heads == 2
    w_pi = train_pi.astype(jnp.float32)
    w_p = train_p.astype(jnp.float32)
    # A step whose losses or gradients are not all finite changes nothing (the
    # params, optimiser states and target stay bit for bit) and says so in
    # metrics["nonfinite"]; the training loop decides whether to stop.
    grad_norm_pi, grad_norm_p = optax.global_norm(g_pi), optax.global_norm(g_p)
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in
                                (aux["loss_pi"], aux.get("loss_p", 0.0),
                                 grad_norm_pi, grad_norm_p)]))
    train_pi = train_pi & finite
    train_p = train_p & finite

    upd, new_opt_pi = self.opt_pi.update(g_pi, state.opt_pi, state.params_pi)
    new_pi = optax.apply_updates(state.params_pi, upd)
    new_pi = _tree_where(train_pi, new_pi, state.params_pi)
    new_opt_pi = _tree_where(train_pi, new_opt_pi, state.opt_pi)
    metrics = dict(aux)
    metrics["grad_norm_pi"] = grad_norm_pi
    metrics["lr_pi"] = w_pi * cfg.lr_pi
    new_p, new_opt_p, new_target = state.params_p, state.opt_p, state.params_target
    if cfg.uses_p:
      upd, new_opt_p = self.opt_p.update(g_p, state.opt_p, state.params_p)
      new_p = optax.apply_updates(state.params_p, upd)
      new_p = _tree_where(train_p, new_p, state.params_p)
      new_opt_p = _tree_where(train_p, new_opt_p, state.opt_p)
      if cfg.keeps_target:
        online_p = merge_shared(new_pi, new_p) if shared else new_p
        new_target = _tree_where(
            train_p, polyak.polyak_update(state.params_target, online_p, cfg.polyak_alpha),
            state.params_target)
      metrics["grad_norm_p"] = grad_norm_p
      metrics["lr_p"] = w_p * cfg.lr_p
    metrics["nonfinite"] = 1.0 - finite.astype(jnp.float32)
    new_state = state.replace(step=state.step + 1, params_pi=new_pi, params_p=new_p,
                              params_target=new_target, opt_pi=new_opt_pi, opt_p=new_opt_p)
    return new_state, metrics

  def train_steps(self, state: TrainState, batch) -> tuple[TrainState, dict]:
    """steps_per_call steps: one on [B, ...], or a lax.scan over [S, B, ...];
    with S > 1 the metrics are stacked per step ([S])."""
    if self.config.steps_per_call == 1:
      return self.train_step(state, batch)
    return jax.lax.scan(self.train_step, state, batch)

  def step(self, state: TrainState, batch) -> tuple[TrainState, dict]:
    """Jitted train_steps on self.mesh: the state where state_shardings puts it,
    the batch split over every device, the metrics replicated."""
    fn, args = self._jitted_call(state, batch)
    return fn(*args)

  def lower_step(self, state: TrainState, batch):
    """The jitted step lowered for these arguments, exactly as `step` runs it (e.g.
    for XLA's cost analysis: .compile().cost_analysis())."""
    fn, args = self._jitted_call(state, batch)
    return fn.lower(*args)

  def _jitted_call(self, state: TrainState, batch):
    """(the jitted train_steps, its arguments) for a state and a batch."""
    batch = self._select(batch)
    data = sharding.batch_sharding(self.mesh, steps_axis=self.config.steps_per_call > 1)
    if self._jit_step is None:
      replicated = NamedSharding(self.mesh, P())
      placed = self.state_shardings(state)
      self._jit_step = jax.jit(self.train_steps,
                               in_shardings=(placed, data),
                               out_shardings=(placed, replicated),
                               donate_argnums=(0,) if self.config.donate_state else ())
    # Several processes: each passed its own rows; together they are the batch.
    return self._jit_step, (state, sharding.global_batch(batch, data))
