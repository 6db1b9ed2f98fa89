"""Robot-host controller: camera images + an instruction -> bounded robot actions.

  ctrl = Controller.load("/path/to/workdir")          # latest checkpoint, beta from its learner
  # or: ctrl = Controller(TrainedPolicy.load("/path/to/workdir"), beta=8.0)
  ctrl.reset("pick up the red ball")
  action = ctrl.act({"image": uint8[H, W, 3], "state": float32[S]})   # float32[D]

Q-SFT inference (QSFT.md, "Inference"): per action token,
pi_hat(b|x) ~ pi_phi(b|x) * exp(beta * p_theta(b|x)) over the valid bins of that
dimension, decoded autoregressively (each chosen token is fed back to both
networks). The logits are masked exactly as the learner masked them in
training (learning.reweighting.allowed_ids) before the reweighting. beta = 0 is pure
pi_phi (behaviour cloning); BC / filtered-BC checkpoints have no p_theta and
only run at beta = 0.

One jit-compiled function per act(): resize (if needed), encode the observation
prefix once per network, decode the D tokens with the KV cache, select.
beta, temperature and the rng are traced arguments, so changing them never
recompiles; construction compiles once on zeros (warm-up) so the first real
act() is not a compile. Controllers of the same network and action space share
the compiled function (the training loop builds one per periodic evaluation).

Observation history follows the training pipeline (data/transforms.py): the
window holds frames t-W+1..t; at the start of an episode it is padded by
repeating the first frame, with history_mask False on the padding.

Images must have the robot config's camera size. When the model was trained at
another size (config data.image_size), the controller resizes them as the
pipeline did: bilinear with antialiasing (jax.image.resize, the same
scale-and-translate kernel as tf.image.resize; equal up to float rounding, i.e.
at most one grey level on rare pixels), then rounded to uint8.

Bad input is refused with ObservationError (a ValueError) naming the key and
what was expected: a missing camera, a key the robot does not have (refused
rather than ignored, so a misspelt camera name cannot go unnoticed), a wrong
image shape or a non-uint8 image, a missing, wrongly sized, non-float or
non-finite state. Every returned action is checked against the tokenizer's
bounds (continuous: [low, high]; discrete: one of the values) and is never
NaN; a violation (impossible by construction) raises instead of moving the robot.

TF-free: nothing here imports TensorFlow, TFDS, Reverb or rlds.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import time
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from qsft_vla import errors
from qsft_vla.errors import CheckpointError
from qsft_vla.learning import reweighting
from qsft_vla.policy import bundle, layout

# Latency statistics cover at most this many recent act() calls (a robot host
# may run for days at tens of Hz).
LATENCY_WINDOW = 100_000


# Ranges the setters accept: beta * p and logits / temperature stay finite in float32.
MAX_BETA = 1e6
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-4, 1e4


class ObservationError(ValueError):
  """An observation given to Controller.act is malformed; the message names the key."""


class ControllerError(RuntimeError):
  """The controller was used out of order or produced an action it must not return."""


def resize_images(images, size):
  """uint8[..., H, W, 3] -> uint8[..., h, w, 3]: bilinear, antialiased, as the
  training pipeline's transforms.resize_images. Identity at the same size."""
  h, w = int(size[0]), int(size[1])
  if images.shape[-3:-1] == (h, w):
    return images
  out = jax.image.resize(jnp.asarray(images, jnp.float32), images.shape[:-3] + (h, w, 3),
                         method="linear", antialias=True)
  return jnp.clip(jnp.round(out), 0.0, 255.0).astype(jnp.uint8)


class Controller:
  """Turns observations into actions with a TrainedPolicy's networks (Q-SFT or BC).

  Build with `Controller.load(path)` from a checkpoint, or `Controller(policy)`
  from a TrainedPolicy with params (training's periodic evaluation passes its
  live parameters through policy.with_params). Device arrays in policy.params
  are used as they are (not copied): keep them alive while the controller is
  used (do not donate them to a training step meanwhile); numpy arrays are
  put on the default device once.

    beta: None = the learner config's beta for the extraction (0 without p_theta).
    extraction: None = the learner's extraction; "p" (the paper's) or "ratio"
      (reweighting.reweighted_logits; support threshold learner.ratio_eps), or
      "sample" (learner.sample_k whole candidate actions from pi_phi and p_theta,
      ranked by log pi + beta * implied Q: reweighting.best_candidate); sample_k,
      sample_proposal: None = the learner's (how many candidates "sample" draws,
      and from which networks: LearnerConfig.sample_proposal).
    temperature: 0 = argmax (the control default), > 0 = sampling.
    seed: seeds the sampling rng (act() number n samples from fold_in(key(seed), n)).
    warmup: compile now, on zeros, so the first act() runs at full speed.
    robot: the robot host's own RobotSpec (or its config file,
      "robot_configs/<x>.py[:variant]"): a checkpoint whose action space differs
      is refused, naming the dimension, and every action is guarded against the
      host's bounds and values rather than the checkpoint's.
    kv_cache: None = a KV cache only with several action dimensions; one action
      dimension is one pass over the prefix and the start position (no cache
      to fill and read back). True / False force either way (benchmarks).
  """

  def __init__(self, policy: bundle.TrainedPolicy, beta: Optional[float] = None,
               temperature: float = 0.0, seed: int = 0, warmup: bool = True,
               extraction: Optional[str] = None, robot=None, kv_cache: Optional[bool] = None,
               sample_k: Optional[int] = None, sample_proposal: Optional[str] = None):
    if policy.params is None:
      raise ValueError("Controller needs a TrainedPolicy with params (TrainedPolicy.load, "
                       "or policy.with_params)")
    layout.check_networks(policy.params, policy.learner)
    self._policy = policy
    self._model = policy.model
    self._model_config = policy.model_config
    self._learner = learner_config = policy.learner
    self._action_tokenizer = action_tokenizer = policy.action_tokenizer
    self._text_tokenizer = policy.text_tokenizer
    self._spec = policy.robot
    # On the device once (numpy params, e.g. jax.device_get'ed from training,
    # would otherwise be copied to the device on every act()).
    self._params = jax.device_put(dict(policy.params))
    self._has_p = policy.has_p
    self._check_model(policy.image_sizes)
    self._image_sizes = {cam: tuple(int(x) for x in policy.image_sizes[cam])
                         for cam in self._model_config.cameras}
    self._cameras = {c.name: (c.height, c.width) for c in self._spec.cameras}
    self._keys = set(self._cameras) | ({"state"} if self._spec.state_dim else set())

    overrides = {k: v for k, v in (("sample_k", sample_k), ("sample_proposal", sample_proposal))
                 if v is not None}
    if overrides:  # checked as the learner config checks them
      learner_config = dataclasses.replace(learner_config, **overrides)
    self._sampling = {k: getattr(learner_config, k) for k in ("sample_k", "sample_proposal")}
    self._extraction = learner_config.extraction if extraction is None else extraction
    if self._extraction not in reweighting.EXTRACTIONS:
      raise ValueError(f"extraction must be one of {reweighting.EXTRACTIONS}, got {extraction!r}")
    if beta is None:
      beta = learner_config.beta_of(self._extraction) if self._has_p else 0.0
    self.beta = beta
    self.temperature = temperature
    # Host-side key and call counter: numpy arguments keep every act() on the
    # one compiled executable (a device-resident key fed back from the previous
    # call would have a different sharding signature and recompile once).
    self._key = np.asarray(jax.random.PRNGKey(int(seed)))
    self._draws = 0

    self._low, self._high = action_tokenizer.bounds
    self._discrete = [(i, np.asarray(d.values, np.float32))
                      for i, d in enumerate(action_tokenizer.dims) if d.kind == "discrete"]
    if robot is not None:  # the host's own action space, not the checkpoint's word for it
      self._low, self._high, self._discrete = _host_action_space(robot, action_tokenizer,
                                                                 policy.path)
    self._instruct_fn, self._act_fn = _compiled_fns(
        self._model, tuple(action_tokenizer.bins_per_dim), learner_config.residual,
        bool(learner_config.mask_invalid_logits), tuple(sorted(self._image_sizes.items())),
        tuple(sorted(self._params)), self._extraction, float(learner_config.ratio_eps),
        learner_config.p_parametrization,
        self._model_config.num_action_dims > 1 if kv_cache is None else bool(kv_cache),
        learner_config.sample_k, learner_config.sample_proposal)

    self._instruction: Optional[str] = None
    self._text = None
    self._frames: list[dict[str, np.ndarray]] = []
    self._valid = 0
    self._latencies_ms: collections.deque = collections.deque(maxlen=LATENCY_WINDOW)
    self._calls = 0
    if warmup:
      self._warmup()

  @classmethod
  def load(cls, workdir_or_checkpoint: str, beta: Optional[float] = None,
           temperature: float = 0.0, seed: int = 0, step: Optional[int] = None,
           warmup: bool = True, extraction: Optional[str] = None, robot=None,
           kv_cache: Optional[bool] = None, sample_k: Optional[int] = None,
           sample_proposal: Optional[str] = None) -> "Controller":
    """From a workdir, its checkpoints/ directory or one step directory (the
    latest step unless `step`). beta None: the run's beta for the extraction
    (0 for BC); extraction None: the run's learner.extraction; robot: the host's
    own RobotSpec or robot config file (see the class docstring)."""
    return cls(bundle.TrainedPolicy.load(workdir_or_checkpoint, step), beta=beta,
               temperature=temperature, seed=seed, warmup=warmup, extraction=extraction,
               robot=robot, kv_cache=kv_cache, sample_k=sample_k,
               sample_proposal=sample_proposal)

  @property
  def sampling(self) -> Optional[dict[str, Any]]:
    """{"sample_k", "sample_proposal"}: how the "sample" extraction draws its
    candidates; None for the per-token extractions, which draw none."""
    return dict(self._sampling) if self._extraction == "sample" else None

  @property
  def extraction(self) -> str:
    """"p" (pi * exp(beta * p)) or "ratio" (pi * exp(beta * p / pi) on the support)."""
    return self._extraction

  # ------------------------------------------------------------------ checks

  def _check_model(self, image_sizes):
    mc, spec, tok = self._model_config, self._spec, self._action_tokenizer
    if getattr(self._model, "config", mc) != mc:
      raise ValueError("model_config differs from the model's own config")
    if tuple(mc.cameras) != spec.camera_names:
      raise ValueError(f"the model reads cameras {list(mc.cameras)}, the robot "
                       f"{spec.name!r} has {list(spec.camera_names)}")
    if mc.state_dim != spec.state_dim:
      raise ValueError(f"the model reads state_dim={mc.state_dim}, the robot {spec.name!r} "
                       f"has {spec.state_dim}")
    if mc.num_action_dims != tok.num_dims or mc.action_vocab != tok.vocab_size:
      raise ValueError(f"the model decodes {mc.num_action_dims} tokens over {mc.action_vocab} "
                       f"ids, the action tokenizer has {tok.num_dims} dims and "
                       f"{tok.vocab_size} ids")
    missing = [c for c in mc.cameras if c not in image_sizes]
    if missing:
      raise ValueError(f"image_sizes has no size for camera(s) {missing}")

  # ------------------------------------------------------------- properties

  @property
  def spec(self):
    return self._spec

  @property
  def action_tokenizer(self):
    return self._action_tokenizer

  @property
  def learner_config(self):
    return self._learner

  @property
  def policy(self) -> bundle.TrainedPolicy:
    """The TrainedPolicy this controller acts with."""
    return self._policy

  @property
  def step(self) -> Optional[int]:
    return self._policy.step

  @property
  def path(self) -> Optional[str]:
    return self._policy.path

  @property
  def instruction(self) -> Optional[str]:
    return self._instruction

  @property
  def has_p(self) -> bool:
    """Whether the checkpoint has p_theta (Q-SFT), i.e. whether beta may be > 0."""
    return self._has_p

  @property
  def beta(self) -> float:
    """Settable between act() calls; no recompilation (beta is traced)."""
    return self._beta

  @beta.setter
  def beta(self, value: float) -> None:
    b = _finite_float(value, "beta")
    if not 0.0 <= b <= MAX_BETA:  # float32 must hold beta * p without overflow
      raise ValueError(f"beta must be in [0, {MAX_BETA:g}], got {b}")
    if b != 0 and not self._has_p:
      raise ValueError(f"beta={b} needs p_theta, but this checkpoint "
                       f"(algorithm={self._learner.algorithm!r}) has only pi_phi: "
                       "use beta=0 (pure pi_phi)")
    self._beta = b

  @property
  def temperature(self) -> float:
    """Settable between act() calls; no recompilation (it is traced)."""
    return self._temperature

  @temperature.setter
  def temperature(self, value: float) -> None:
    t = _finite_float(value, "temperature")
    if not (t == 0.0 or MIN_TEMPERATURE <= t <= MAX_TEMPERATURE):  # logits / t stay finite
      raise ValueError(f"temperature must be 0 (argmax) or in [{MIN_TEMPERATURE:g}, "
                       f"{MAX_TEMPERATURE:g}], got {t}")
    self._temperature = t

  # ---------------------------------------------------------------- episode

  def reset(self, instruction: Optional[str] = None) -> None:
    """Starts an episode: tokenises the instruction and clears the history.

    A robot whose config fixes the instruction (instruction.source "fixed")
    may pass None to use that text, as the training data did. A refused
    instruction ends the previous episode too: act() then fails until a reset
    succeeds, rather than acting on the old instruction.
    """
    self._text = self._instruction = None
    if instruction is None and self._spec.instruction_source == "fixed":
      instruction = self._spec.instruction_text
    if not isinstance(instruction, str):
      raise TypeError(f"instruction must be a str, got {type(instruction).__name__}")
    problem = errors.instruction_problem(instruction)
    if problem:
      raise ValueError(f"instruction {instruction!r} refused: {problem}")
    ids, mask = self._text_tokenizer.encode_batch([instruction], self._model_config.max_text_len)
    # Encoded once per episode (e.g. MiniLM: most of an RT-1 act() otherwise);
    # fetched to host so act() keeps taking numpy inputs only.
    encoded = jax.device_get(self._instruct_fn(self._params, ids, mask))
    self._text = (ids, mask, encoded)
    self._instruction = instruction
    self._frames = []
    self._valid = 0  # real (not padding) frames in the window

  def act(self, observation: Mapping[str, Any], return_info: bool = False):
    """The action float32[D] for this observation (appended to the history).

    return_info: return (action, info) instead, with the policy's own value of it
    (None for both entries without p_theta, i.e. BC and filtered BC):
      info["q"]: float32[D], per action dimension, the implied Q of the chosen
        token, p_theta / pi_phi of that token given the observation and the
        tokens chosen before it, as the Bellman weights read it. Trained on
        rewards rescaled to [0, 1] with weights clipped to [0, 1], it estimates
        the discounted return of taking the action so far (the last entry: the
        whole action) and continuing as the data's behaviour did. It is a ratio
        of two networks: outside [0, 1] where they disagree, noisy where pi_phi
        is small.
      info["success_estimate"]: the last entry of q clipped to [0, 1]. With a
        success reward of 1 (BabyAI, and Meta-World's success flag) it is a
        discounted success probability: gamma^(steps to success) times success,
        so a lower estimate of the chance to succeed from here.

    Raises ObservationError for a malformed observation, ControllerError when the
    policy's logits come out non-finite (e.g. a finite state so large the network
    overflows); neither leaves the observation in the history."""
    start = time.perf_counter()
    if self._text is None:
      raise ControllerError("act() before reset(instruction): start an episode first")
    frame = self._checked(observation)
    before = (self._frames, self._valid)
    if not self._frames:
      self._frames = [frame] * self._model_config.window  # start padding: frame 0 repeated
    else:
      self._frames = self._frames[1:] + [frame]
    self._valid = min(self._valid + 1, self._model_config.window)
    obs, history_mask = self._window()
    tokens, finite, q = self._act_fn(self._params, obs, history_mask, *self._text,
                                     np.float32(self._beta), np.float32(self._temperature),
                                     self._key, np.uint32(self._draws))
    self._draws += 1
    if not bool(finite):  # argmax of NaN logits is a valid-looking bin: never act on it
      self._frames, self._valid = before  # the refused frame does not enter the history
      raise ControllerError("refusing to act: the policy's logits are not finite for this "
                            "observation (non-finite parameters or an overflow)")
    action = self._guard(self._action_tokenizer.decode(np.asarray(tokens)))
    self._latencies_ms.append((time.perf_counter() - start) * 1e3)
    self._calls += 1
    if not return_info:
      return action
    if not self._has_p:
      return action, {"q": None, "success_estimate": None}
    q = np.asarray(q, np.float32)
    return action, {"q": q, "success_estimate": float(np.clip(q[-1], 0.0, 1.0))}

  def _window(self):
    """The model inputs of the current history: ({camera: uint8[1, window, h, w, 3],
    "state": float32[1, window, S]}, history_mask bool[1, window])."""
    w = self._model_config.window
    obs = {k: np.stack([f[k] for f in self._frames])[None] for k in self._frames[0]}
    mask = (np.arange(w) >= w - self._valid)[None]
    return obs, mask

  def _checked(self, observation) -> dict[str, np.ndarray]:
    """A validated copy (camera drivers reuse their buffers) of one observation."""
    if not isinstance(observation, Mapping):
      raise ObservationError(f"observation must be a dict keyed by {sorted(self._keys)}, "
                             f"got {type(observation).__name__}")
    unknown = sorted(set(observation) - self._keys, key=str)
    if unknown:
      raise ObservationError(f"observation: unknown key(s) {unknown}; the robot "
                             f"{self._spec.name!r} has keys {sorted(self._keys)}")
    out = {}
    for cam, (h, w) in self._cameras.items():
      if cam not in observation:
        raise ObservationError(f"observation: missing camera {cam!r} (expected uint8[{h}, {w}, 3])")
      img = np.asarray(observation[cam])
      if img.dtype != np.uint8:
        raise ObservationError(f"observation[{cam!r}]: expected dtype uint8 (RGB 0..255), "
                               f"got {img.dtype}")
      if img.shape != (h, w, 3):
        raise ObservationError(f"observation[{cam!r}]: expected shape ({h}, {w}, 3) (the "
                               f"robot config's camera size), got {img.shape}")
      out[cam] = img.copy()
    s = self._spec.state_dim
    if s:
      if "state" not in observation:
        raise ObservationError(f"observation: missing 'state' (expected float32[{s}])")
      state = np.asarray(observation["state"])
      if state.dtype.kind != "f":
        raise ObservationError(f"observation['state']: expected a float array (float32[{s}]), "
                               f"got dtype {state.dtype}")
      if state.shape != (s,):
        raise ObservationError(f"observation['state']: expected shape ({s},), got {state.shape}")
      with np.errstate(over="ignore"):  # too large for float32 -> inf, refused below
        state = state.astype(np.float32)
      bad = np.flatnonzero(~np.isfinite(state))
      if bad.size:
        raise ObservationError(f"observation['state']: non-finite value {state[bad[0]]} at "
                               f"index {bad[0]} (after conversion to float32)")
      out["state"] = state
    return out

  def _guard(self, action: np.ndarray) -> np.ndarray:
    action = np.asarray(action, np.float32)
    ok = np.isfinite(action).all() and (action >= self._low).all() and (action <= self._high).all()
    ok = ok and all(np.isin(action[i], values) for i, values in self._discrete)
    if not ok:
      raise ControllerError(f"refusing action {action.tolist()}: outside the bounds "
                            f"[{self._low.tolist()}, {self._high.tolist()}] or not an "
                            "allowed discrete value")
    return action

  # ---------------------------------------------------------------- compute

  def _warmup(self):
    """Compiles act_fn on zeros; touches neither the episode nor the statistics."""
    w = self._model_config.window
    obs = {cam: np.zeros((1, w, h, wd, 3), np.uint8) for cam, (h, wd) in self._cameras.items()}
    if self._spec.state_dim:
      obs["state"] = np.zeros((1, w, self._spec.state_dim), np.float32)
    text_ids, text_mask = self._text_tokenizer.encode_batch(["warm up"],
                                                            self._model_config.max_text_len)
    encoded = jax.device_get(self._instruct_fn(self._params, text_ids, text_mask))
    tokens = self._act_fn(self._params, obs, np.ones((1, w), bool), text_ids, text_mask, encoded,
                          np.float32(0.0), np.float32(0.0), self._key, np.uint32(0))
    jax.block_until_ready(tokens)

  # ---------------------------------------------------------------- latency

  def latency_stats(self) -> dict[str, float]:
    """Wall time of act() calls since the last reset_latency_stats (warm-up
    excluded; percentiles over the last LATENCY_WINDOW calls), in milliseconds."""
    lat = np.asarray(self._latencies_ms, np.float64)
    if not lat.size:
      nan = float("nan")
      return {"calls": self._calls, "p50_ms": nan, "p99_ms": nan, "mean_ms": nan, "max_ms": nan}
    return {"calls": self._calls, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "mean_ms": float(lat.mean()),
            "max_ms": float(lat.max())}

  def reset_latency_stats(self) -> None:
    self._latencies_ms.clear()
    self._calls = 0


@functools.lru_cache(maxsize=16)
def _compiled_fns(model, bins_per_dim: tuple[int, ...], residual: str, mask_invalid: bool,
                  image_sizes: tuple[tuple[str, tuple[int, int]], ...], nets: tuple[str, ...],
                  extraction: str = "p", ratio_eps: float = 0.01,
                  p_parametrization: str = "independent", kv_cache: bool = True,
                  sample_k: int = 32, sample_proposal: str = "pi+p"):
  """The jit-compiled (instruct_fn, act_fn) of one network and action space,
  shared by every Controller built for them (the training loop builds one per
  periodic evaluation; it must not recompile each time).

  nets: ("pi", "p"), ("pi",) (no p_theta: beta must be 0) or ("shared",).
  instruct_fn(params, text_ids, text_mask) -> {net: the model's
  encode_instruction}, once per episode.
  act_fn(params, obs, history_mask, text_ids, text_mask, encoded, beta,
  temperature, key, draw) -> (int32[D] tokens, bool finite, float32[D] the
  implied Q = p / pi of each chosen token; meaningless without p_theta).
  kv_cache False (one action dimension only): position 0's logits in one pass
  (model.first_action_logits) instead of encode_prefix + decode_step.
  extraction "sample": sample_k candidate actions decoded as one batch (the
  prefix encoded once) from sample_proposal (LearnerConfig), and
  reweighting.best_candidate picks one.
  """
  if not kv_cache and model.config.num_action_dims != 1:
    raise ValueError("kv_cache=False needs one action dimension, the model has "
                     f"{model.config.num_action_dims}")
  mc = model.config
  valid = np.arange(mc.action_vocab)[None, :] < np.asarray(bins_per_dim)[:, None]
  pi_allowed, p_allowed = reweighting.allowed_ids(valid, mc.output_size, mc.dummy_id, residual)
  sizes = dict(image_sizes)

  def instruct_fn(params, text_ids, text_mask):
    return {n: model.apply(params[n], text_ids, text_mask, method=model.encode_instruction)
            for n in nets}

  def encode(variables, obs, history_mask, text_ids, text_mask, encoded):
    return model.apply(variables, obs, history_mask, text_ids, text_mask, encoded,
                       method=model.encode_prefix)

  def decode(variables, cache, prev, j):
    return model.apply(variables, cache, prev, j, method=model.decode_step)

  def first(variables, obs, history_mask, text_ids, text_mask, encoded):
    return model.apply(variables, obs, history_mask, text_ids, text_mask, encoded,
                       method=model.first_action_logits)

  def act_fn(params, obs, history_mask, text_ids, text_mask, encoded, beta, temperature, key,
             draw):
    obs = {k: (resize_images(v, sizes[k]) if k in sizes else v) for k, v in obs.items()}
    call_key = jax.random.fold_in(key, draw)  # a fresh stream per act()

    def masked(out, j):
      """(pi_phi's, p_theta's logits [B, V], allowed ids [V]) at position j, masked
      and parametrised as in training."""
      pi_logits, p_logits = layout.pi_and_p_logits(out)
      if p_logits is None:
        p_logits = jnp.zeros_like(pi_logits)  # no p_theta: beta is 0
      pi_ok, p_ok = jnp.asarray(pi_allowed)[j], jnp.asarray(p_allowed)[j]
      if mask_invalid:  # as in training, before every softmax
        pi_logits = reweighting.mask_logits(pi_logits, pi_ok)
      if p_parametrization == "residual":  # as in training: p's logits build on pi's
        p_logits = reweighting.residual_p_logits(pi_logits, p_logits, pi_ok)
      if mask_invalid:
        p_logits = reweighting.mask_logits(p_logits, p_ok)
      return pi_logits, p_logits, pi_ok

    def finite_and_q(pi_logits, p_logits, logits, pi_ok, tok):
      """Whether the networks' logits are finite (the reweighted ones may be -inf
      off the ratio extraction's support, never NaN, and the chosen one must be
      finite), per row; and the implied Q of each chosen token, from the
      softmaxes the Bellman weights read."""
      finite = (jnp.all(jnp.where(pi_ok, jnp.isfinite(pi_logits) & jnp.isfinite(p_logits)
                                  & ~jnp.isnan(logits), True), axis=-1)
                & jnp.isfinite(jnp.take_along_axis(logits, tok[..., None], -1))[..., 0])
      chosen = lambda x: jnp.take_along_axis(jax.nn.log_softmax(x, -1), tok[..., None], -1)
      return finite, jnp.exp(chosen(p_logits) - chosen(pi_logits))[..., 0]

    def choose(out, j):
      """(token [1], finite, implied Q) at action position j from {net: logits}."""
      pi_logits, p_logits, pi_ok = masked(out, j)
      logits = reweighting.reweighted_logits(pi_logits, p_logits, beta, pi_ok, extraction, ratio_eps)
      tok = reweighting.select(logits, temperature, jax.random.fold_in(call_key, j))
      finite, q = finite_and_q(pi_logits, p_logits, logits, pi_ok, tok)
      return tok, jnp.all(finite), q[0]

    def candidate(out, j):
      """Position j of every candidate ([K] tokens, finite, implied Q, log pi):
      candidate 0 takes pi_phi's argmax, the others a draw from pi_phi; with the
      "pi+p" proposal the odd candidates are p_theta's instead (its argmax for
      candidate 1, draws for the others), from p_theta over the valid bins. Each
      candidate is one row, so an action comes whole from one of the two."""
      pi_logits, p_logits, pi_ok = masked(out, j)
      log_pi = jnp.where(pi_ok, jax.nn.log_softmax(pi_logits, -1), -jnp.inf)
      key = jax.random.fold_in(call_key, j)
      k = jnp.arange(sample_k)
      tok = jnp.where(k == 0, jnp.argmax(log_pi, -1),
                      jax.random.categorical(key, log_pi, axis=-1))
      if sample_proposal == "pi+p" and nets != ("pi",):  # without p_theta: pi alone
        log_q = jax.nn.log_softmax(jnp.where(pi_ok, p_logits, -jnp.inf), -1)
        from_p = jnp.where(k == 1, jnp.argmax(log_q, -1),
                           jax.random.categorical(jax.random.fold_in(key, 1), log_q, axis=-1))
        tok = jnp.where(k % 2 == 1, from_p, tok)
      tok = tok.astype(jnp.int32)
      finite, q = finite_and_q(pi_logits, p_logits, log_pi, pi_ok, tok)
      return tok, finite, q, jnp.take_along_axis(log_pi, tok[:, None], -1)[:, 0]

    def widen(tree):  # batch 1 -> the sample_k candidates (leaves without a batch axis stay)
      return jax.tree_util.tree_map(
          lambda x: jnp.broadcast_to(x, (sample_k,) + x.shape[1:])
          if x.ndim and x.shape[0] == 1 else x, tree)

    def pick(tokens, finite, q, log_pi):
      """The candidate to act on, from [D, K] tokens, finite, implied Q and log pi."""
      best = reweighting.best_candidate(log_pi.sum(0), q[-1], beta, temperature,
                                        jax.random.fold_in(call_key, mc.num_action_dims))
      return tokens[:, best], jnp.all(finite[:, best]), q[:, best]

    step = candidate if extraction == "sample" else choose
    if not kv_cache:
      out = {n: first(params[n], obs, history_mask, text_ids, text_mask, encoded[n])
             for n in nets}
      if extraction == "sample":  # one action dimension: the candidates share the logits
        out = {n: jnp.broadcast_to(x, x.shape[:-2] + (sample_k, x.shape[-1]))
               for n, x in out.items()}
        return pick(*(x[None] for x in candidate(out, 0)))
      tok, finite, q = choose(out, 0)
      return tok, finite, q[None]
    caches = {n: encode(params[n], obs, history_mask, text_ids, text_mask, encoded[n])
              for n in nets}
    rows = 1
    if extraction == "sample":
      caches, rows = widen(caches), sample_k

    def token(carry, j):
      prev, caches = carry
      caches, out = dict(caches), {}
      for n in nets:
        out[n], caches[n] = decode(params[n], caches[n], prev, j)
      outs = step(out, j)
      return (outs[0], caches), outs

    prev = jnp.zeros((rows,), jnp.int32)
    _, outs = jax.lax.scan(token, (prev, caches), jnp.arange(mc.num_action_dims))
    if extraction == "sample":
      return pick(*outs)
    tokens, finite, q = outs
    return tokens[:, 0], jnp.all(finite), q

  return jax.jit(instruct_fn), jax.jit(act_fn)


def _host_action_space(robot, action_tokenizer, path: Optional[str]):
  """(low, high, discrete) of the HOST's robot for the guard, after checking that
  the checkpoint's action tokenizer decodes into exactly that action space."""
  if isinstance(robot, str):
    from qsft_vla.config import load_config_file  # pylint: disable=g-import-not-at-top
    from qsft_vla.robot import RobotSpec  # pylint: disable=g-import-not-at-top
    robot = RobotSpec.from_config(load_config_file(robot).robot, where=robot)
  where = path or "the checkpoint"
  host, ours = robot.action_dims, action_tokenizer.dims
  if [d.name for d in host] != [d.name for d in ours]:
    raise CheckpointError(
        f"{where} acts in dimensions {[d.name for d in ours]}, the robot {robot.name!r} in "
        f"{[d.name for d in host]}: refusing to drive it")
  low, high = action_tokenizer.bounds
  discrete = []
  for i, (h, d) in enumerate(zip(host, ours)):
    at = f"{where}: action dimension {h.name!r} (index {i})"
    if h.kind != d.kind or h.bins != d.bins:
      raise CheckpointError(f"{at} is {d.kind} with {d.bins} bins in the checkpoint, "
                                        f"{h.kind} with {h.bins} bins on the robot")
    if h.kind == "discrete":
      if tuple(float(v) for v in d.values) != tuple(h.values):
        raise CheckpointError(f"{at} takes values {list(d.values)} in the "
                                          f"checkpoint, {list(h.values)} on the robot")
      low[i], high[i] = h.values[0], h.values[-1]
      discrete.append((i, np.asarray(h.values, np.float32)))
    elif h.low is not None:  # bounds from dataset quantiles (None) are the run's to say
      if not (np.float32(h.low) <= low[i] and high[i] <= np.float32(h.high)):
        raise CheckpointError(f"{at} decodes into [{low[i]}, {high[i]}], outside the "
                                          f"robot's [{h.low}, {h.high}]")
      low[i], high[i] = h.low, h.high
  return low, high, discrete


def _finite_float(value, name: str) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
    raise TypeError(f"{name} must be a number, got {value!r}")
  v = float(value)
  if not math.isfinite(v):
    raise ValueError(f"{name} must be finite, got {v}")
  return v
