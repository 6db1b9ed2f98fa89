"""The robot-host Controller: known answers against teacher forcing, bounds, bad input, history."""

import dataclasses
import math
import os
import re
import shutil

import jax
import numpy as np
import pytest

from checkpoint_fixture import write_checkpoint
from conftest import REPO, ROBOT_HOST_ABSENT, run_without_tensorflow
from qsft_vla.policy import TrainedPolicy, checkpoints
from qsft_vla.policy.controller import Controller, ControllerError, ObservationError, resize_images

INSTRUCTION = "go to the red ball"


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
  """Checkpoint directories by (robot, algorithm, architecture), written on first use.
  Their runs' extraction is the paper's "p" (the robot configs' default is "sample"):
  most tests here check p's reweighting against the teacher-forced reference."""
  cache = {}

  def get(robot="babyai", algorithm="qsft", architecture="separate", image_size=None,
          p_parametrization="independent", ratio_eps=0.01):
    key = (robot, algorithm, architecture, image_size, p_parametrization, ratio_eps)
    if key not in cache:
      d = tmp_path_factory.mktemp("_".join(map(str, key)))
      cache[key] = write_checkpoint(
          d, robot, algorithm, architecture, image_size=image_size,
          **{"learner.p_parametrization": p_parametrization, "learner.ratio_eps": ratio_eps,
             "learner.extraction": "p"})
    return cache[key]

  return get


_CONTROLLERS = {}


def controller(path, **kwargs):
  """A Controller.load(path, **kwargs), compiled once per module and handed
  out with the defaults restored (beta, temperature, latency statistics)."""
  key = (path, tuple(sorted(kwargs.items())))
  if key not in _CONTROLLERS:
    _CONTROLLERS[key] = Controller.load(path, **kwargs)
  ctrl = _CONTROLLERS[key]
  run_beta = ctrl.learner_config.beta_of(ctrl.extraction)
  ctrl.beta = kwargs.get("beta", run_beta if ctrl.has_p else 0.0)
  ctrl.temperature = kwargs.get("temperature", 0.0)
  ctrl.reset_latency_stats()
  return ctrl


def random_observation(spec, rng):
  obs = {c.name: rng.randint(0, 256, (c.height, c.width, 3)).astype(np.uint8)
         for c in spec.cameras}
  if spec.state_dim:
    obs["state"] = rng.randn(spec.state_dim).astype(np.float32)
  return obs


def pipeline_windows(frames, window):
  """The training pipeline's windows (data/transforms.py), one per step:
  frames t-W+1..t clamped at 0, mask False where clamped."""
  out = []
  for t in range(len(frames)):
    idx = [max(t + o, 0) for o in range(-window + 1, 1)]
    obs = {k: np.stack([frames[i][k] for i in idx])[None] for k in frames[0]}
    out.append((obs, np.array([[t + o >= 0 for o in range(-window + 1, 1)]])))
  return out


def _log_softmax(x):
  x = x - x.max()
  return x - np.log(np.exp(x).sum())


_LOADED = {}


def load_reference(path):
  """(TrainedPolicy, jitted model.apply) of a checkpoint, loaded once."""
  if path not in _LOADED:
    ck = TrainedPolicy.load(path)
    _LOADED[path] = ck, jax.jit(ck.model.apply)
  return _LOADED[path]


def reference_tokens(path, obs, history_mask, beta, extraction="p", with_q=False):
  """Greedy decoding by teacher forcing (model __call__), masks and reweighting
  written out in numpy: position j takes the argmax given the tokens before it.
  with_q: also the implied Q = p / pi of each chosen token."""
  ck, apply = load_reference(path)
  mc, tok = ck.model_config, ck.action_tokenizer
  text_ids, text_mask = ck.text_tokenizer.encode_batch([INSTRUCTION], mc.max_text_len)
  obs = {k: (resize_images(v, ck.image_sizes[k]) if k in ck.image_sizes else v)
         for k, v in obs.items()}
  tokens = np.zeros((1, mc.num_action_dims), np.int32)
  q = np.zeros(mc.num_action_dims)
  for j, bins in enumerate(tok.bins_per_dim):
    def logits(name):
      return np.asarray(apply(ck.params[name], obs, history_mask, text_ids, text_mask, tokens),
                        np.float64)
    if "shared" in ck.params:
      out = logits("shared")
      pi, p = out[0, 0, j], out[1, 0, j]
    else:
      pi = logits("pi")[0, j]
      p = logits("p")[0, j] if "p" in ck.params else np.zeros_like(pi)
    pi_ok = np.arange(mc.output_size) < bins
    p_ok = pi_ok | (np.arange(mc.output_size) == mc.dummy_id)
    pi = np.where(pi_ok, pi, -1e9)
    if ck.learner.p_parametrization == "residual":  # p's logits build on log pi
      p = np.where(pi_ok, _log_softmax(pi) + p, p)
    p = np.where(p_ok, p, -1e9)
    log_pi, log_p = _log_softmax(pi), _log_softmax(p)
    if extraction == "p":
      score = np.where(pi_ok, log_pi + beta * np.exp(log_p), -np.inf)
    elif extraction == "p_theta":  # p_theta's own greedy action over the valid bins
      score = np.where(pi_ok, log_p, -np.inf)
    else:  # the implied Q = p / pi over the support pi > ratio_eps
      support = pi_ok & (log_pi > np.log(ck.learner.ratio_eps))
      if not support.any():  # the valid id of largest pi alone
        support = np.arange(len(log_pi)) == np.argmax(np.where(pi_ok, log_pi, -np.inf))
      ratio = np.exp(np.where(support, log_p - log_pi, 0.0))
      score = np.where(support, log_pi + beta * ratio, -np.inf)
    tokens[0, j] = int(np.argmax(score))
    q[j] = np.exp(log_p[tokens[0, j]] - log_pi[tokens[0, j]])
  return (tokens[0], q) if with_q else tokens[0]


@pytest.mark.parametrize("robot,architecture", [("babyai", "separate"), ("babyai", "shared"),
                                                ("metaworld", "shared"),
                                                ("metaworld", "shared_encoder"),
                                                ("metaworld", "pi_head")])
def test_tokens_equal_teacher_forced_argmax(ckpt_dir, robot, architecture):
  path = ckpt_dir(robot, "qsft", architecture)
  ck, _ = load_reference(path)
  ctrl = controller(path)
  assert ctrl.beta == ck.learner.beta  # beta None -> the run's learner.beta
  rng = np.random.RandomState(0)
  frames = [random_observation(ctrl.spec, rng) for _ in range(3)]
  windows = pipeline_windows(frames, ck.model_config.window)
  reweighting_changed_a_token = False
  compiled = ctrl._act_fn._cache_size()
  for beta in (0.0, 4.0, 200.0):
    ctrl.beta = beta
    ctrl.reset(INSTRUCTION)
    for frame, (obs, mask) in zip(frames, windows):
      got = ctrl.action_tokenizer.encode(ctrl.act(frame))
      want = reference_tokens(path, obs, mask, beta)
      np.testing.assert_array_equal(got, want, err_msg=f"beta={beta}")
      if beta and not np.array_equal(want, reference_tokens(path, obs, mask, 0.0)):
        reweighting_changed_a_token = True
  assert reweighting_changed_a_token  # p_theta takes part, not just pi_phi
  assert ctrl._act_fn._cache_size() == compiled  # beta is traced: no recompilation


def _log_pi_and_q(path, obs, mask, tokens):
  """(log pi_phi(a), implied Q of a's last token) of action tokens a, by teacher forcing."""
  ck, apply = load_reference(path)
  mc = ck.model_config
  text_ids, text_mask = ck.text_tokenizer.encode_batch([INSTRUCTION], mc.max_text_len)
  obs = {k: (resize_images(v, ck.image_sizes[k]) if k in ck.image_sizes else v)
         for k, v in obs.items()}
  forward = lambda n: np.asarray(apply(ck.params[n], obs, mask, text_ids, text_mask,
                                       np.asarray(tokens, np.int32)[None]), np.float64)
  if "shared" in ck.params:
    out = forward("shared")
    pi, p = out[0, 0], out[1, 0]
  else:
    pi, p = forward("pi")[0], forward("p")[0]
  total = q = 0.0
  for j, bins in enumerate(ck.action_tokenizer.bins_per_dim):
    pi_ok = np.arange(mc.output_size) < bins
    p_ok = pi_ok | (np.arange(mc.output_size) == mc.dummy_id)
    log_pi = _log_softmax(np.where(pi_ok, pi[j], -1e9))
    log_p = _log_softmax(np.where(p_ok, p[j], -1e9))
    total += log_pi[tokens[j]]
    q = np.exp(log_p[tokens[j]] - log_pi[tokens[j]])
  return total, q


@pytest.mark.parametrize("robot,architecture", [("babyai", "separate"), ("metaworld", "shared")])
def test_sample_extraction_acts_on_the_best_candidate(ckpt_dir, robot, architecture):
  """extraction "sample": the chosen action scores at least pi_phi's greedy action
  (always candidate 0) and, with the "pi+p" proposal, p_theta's (candidate 1), by
  log pi + beta * Q computed by teacher forcing; with one action dimension and many
  candidates every action is drawn, so the choice is the argmax over all of them;
  beta 0 with one candidate is pi_phi's greedy action; two candidates are exactly
  the two greedy actions."""
  path = ckpt_dir(robot, "qsft", architecture)
  ck, _ = load_reference(path)
  rng = np.random.RandomState(5)
  frames = [random_observation(ck.robot, rng) for _ in range(3)]
  windows = pipeline_windows(frames, ck.model_config.window)
  greedy_ctrl = controller(path, extraction="sample", sample_k=1, beta=0.0)
  greedy_ctrl.reset(INSTRUCTION)
  for frame, (obs, mask) in zip(frames, windows):
    got = greedy_ctrl.action_tokenizer.encode(greedy_ctrl.act(frame))
    np.testing.assert_array_equal(got, reference_tokens(path, obs, mask, 0.0))
  for proposal in ("pi+p", "pi"):
    for beta in (0.0, 30.0):
      ctrl = controller(path, extraction="sample", sample_k=256, beta=beta,
                        sample_proposal=proposal)
      assert ctrl.sampling == {"sample_k": 256, "sample_proposal": proposal}
      assert controller(path).sampling is None  # per-token extraction: no candidates
      ctrl.reset(INSTRUCTION)
      for frame, (obs, mask) in zip(frames, windows):
        action, info = ctrl.act(frame, return_info=True)
        chosen = ctrl.action_tokenizer.encode(action)
        score = lambda a: np.dot(_log_pi_and_q(path, obs, mask, a), (1.0, beta))
        assert score(chosen) >= score(reference_tokens(path, obs, mask, 0.0)) - 1e-4
        if proposal == "pi+p":
          assert score(chosen) >= score(reference_tokens(path, obs, mask, 0.0, "p_theta")) - 1e-4
        np.testing.assert_allclose(info["q"][-1], _log_pi_and_q(path, obs, mask, chosen)[1],
                                   rtol=1e-4)
        if robot == "babyai":
          assert chosen[0] == int(np.argmax([score([a]) for a in range(7)]))
  two = controller(path, extraction="sample", sample_k=2, beta=30.0)
  two.reset(INSTRUCTION)
  for frame, (obs, mask) in zip(frames, windows):
    chosen = two.action_tokenizer.encode(two.act(frame))
    greedy = [reference_tokens(path, obs, mask, 0.0, e) for e in ("p", "p_theta")]
    scores = [np.dot(_log_pi_and_q(path, obs, mask, a), (1.0, 30.0)) for a in greedy]
    np.testing.assert_array_equal(chosen, greedy[int(np.argmax(scores))])


def test_best_candidate_known_answer():
  from qsft_vla.learning import reweighting
  log_pi, q = np.array([-1.0, -3.0, -2.0]), np.array([0.1, 0.9, 0.5])
  assert int(reweighting.best_candidate(log_pi, q, 0.0)) == 0   # pi's most likely
  assert int(reweighting.best_candidate(log_pi, q, 10.0)) == 1  # 0 vs 6 vs 3
  assert int(reweighting.best_candidate(log_pi, q, 2.0)) == 0   # -0.8 vs -1.2 vs -1


def test_one_action_dimension_acts_without_a_kv_cache(ckpt_dir):
  """BabyAI (D = 1) acts in one pass by default; the KV-cache path gives the same
  tokens and implied Q (the one-pass path is checked against teacher forcing above)."""
  path = ckpt_dir("babyai", "qsft", "separate")
  one, cached = controller(path), controller(path, kv_cache=True)
  rng = np.random.RandomState(3)
  for beta in (0.0, 8.0):
    for ctrl in (one, cached):
      ctrl.beta = beta
      ctrl.reset(INSTRUCTION)
    for _ in range(3):
      frame = random_observation(one.spec, rng)
      a, info_a = one.act(frame, return_info=True)
      b, info_b = cached.act(frame, return_info=True)
      np.testing.assert_array_equal(a, b)
      np.testing.assert_allclose(info_a["q"], info_b["q"], rtol=1e-5)
  with pytest.raises(ValueError, match="kv_cache=False needs one action dimension"):
    Controller.load(ckpt_dir("metaworld", "qsft", "shared"), kv_cache=False)


# ratio_eps 0.14: about half of BabyAI's 7 actions (pi ~ 1/7 at init) fall outside the
# support, whose -inf logits must not read as non-finite.
@pytest.mark.parametrize("robot,architecture", [("babyai", "separate"), ("metaworld", "shared")])
def test_info_holds_the_implied_q_of_the_chosen_tokens(ckpt_dir, robot, architecture):
  """act(return_info=True): per dimension p / pi of the token chosen, as teacher forcing
  gives it; the success estimate is the last one clipped to [0, 1]; BC has none."""
  path = ckpt_dir(robot, "qsft", architecture)
  ctrl = controller(path)
  ctrl.beta = 4.0
  ctrl.reset(INSTRUCTION)
  rng = np.random.RandomState(2)
  frames = [random_observation(ctrl.spec, rng) for _ in range(2)]
  windows = pipeline_windows(frames, load_reference(path)[0].model_config.window)
  for frame, (obs, mask) in zip(frames, windows):
    action, info = ctrl.act(frame, return_info=True)
    want_tokens, want_q = reference_tokens(path, obs, mask, 4.0, with_q=True)
    np.testing.assert_array_equal(ctrl.action_tokenizer.encode(action), want_tokens)
    assert info["q"].shape == (len(ctrl.spec.action_dims),) and info["q"].dtype == np.float32
    np.testing.assert_allclose(info["q"], want_q, rtol=2e-4)
    assert info["success_estimate"] == pytest.approx(float(np.clip(want_q[-1], 0, 1)), rel=2e-4)
  bc = controller(ckpt_dir(robot, "bc"))
  bc.reset(INSTRUCTION)
  _, info = bc.act(frames[0], return_info=True)
  assert info == {"q": None, "success_estimate": None}


@pytest.mark.parametrize("p_parametrization,ratio_eps", [("independent", 0.01),
                                                         ("residual", 0.01),
                                                         ("independent", 0.14)])
def test_ratio_extraction_equals_teacher_forced_argmax(ckpt_dir, p_parametrization, ratio_eps):
  path = ckpt_dir("babyai", "qsft", "separate", p_parametrization=p_parametrization,
                  ratio_eps=ratio_eps)
  ck, _ = load_reference(path)
  ctrl = controller(path, extraction="ratio")
  assert ctrl.extraction == "ratio" and ctrl.beta == ck.learner.ratio_beta
  rng = np.random.RandomState(1)
  frames = [random_observation(ctrl.spec, rng) for _ in range(3)]
  windows = pipeline_windows(frames, ck.model_config.window)
  for beta in (0.0, 3.0, 1000.0):
    ctrl.beta = beta
    ctrl.reset(INSTRUCTION)
    for frame, (obs, mask) in zip(frames, windows):
      got = ctrl.action_tokenizer.encode(ctrl.act(frame))
      np.testing.assert_array_equal(got, reference_tokens(path, obs, mask, beta, "ratio"),
                                    err_msg=f"beta={beta}")
  with pytest.raises(ValueError, match="extraction"):
    controller(path, extraction="softmax")


def test_bc_checkpoint_is_pure_pi_and_refuses_beta(ckpt_dir):
  path = ckpt_dir("babyai", "bc", image_size=(32, 32))
  ctrl = controller(path)
  assert ctrl.beta == 0.0 and not ctrl.has_p
  rng = np.random.RandomState(1)
  ctrl.reset(INSTRUCTION)
  for frame in [random_observation(ctrl.spec, rng) for _ in range(3)]:
    obs, mask = pipeline_windows([frame], 1)[0]
    np.testing.assert_array_equal(ctrl.action_tokenizer.encode(ctrl.act(frame)),
                                  reference_tokens(path, obs, mask, 0.0))
  with pytest.raises(ValueError, match="p_theta"):
    Controller.load(path, beta=1.0, warmup=False)
  with pytest.raises(ValueError, match="p_theta"):
    ctrl.beta = 0.5


def test_resizes_camera_images_to_the_model_size(ckpt_dir):
  path = ckpt_dir("babyai", "bc", image_size=(32, 32))
  ck, _ = load_reference(path)
  assert ck.image_sizes["image"] == (32, 32)
  ctrl = controller(path)
  rng = np.random.RandomState(2)
  ctrl.reset(INSTRUCTION)
  for _ in range(2):
    frame = random_observation(ctrl.spec, rng)  # 56x56, the camera's size
    obs, mask = pipeline_windows([frame], 1)[0]
    np.testing.assert_array_equal(ctrl.action_tokenizer.encode(ctrl.act(frame)),
                                  reference_tokens(path, obs, mask, ctrl.beta))
  with pytest.raises(ObservationError, match=r"'image'.*\(56, 56, 3\)"):
    ctrl.act({"image": np.zeros((32, 32, 3), np.uint8)})  # the camera size, not the model's


def test_resize_matches_the_training_pipeline():
  tf = pytest.importorskip("tensorflow")
  from qsft_vla.data import transforms
  images = np.random.RandomState(3).randint(0, 256, (2, 56, 56, 3)).astype(np.uint8)
  for size in [(32, 32), (84, 70)]:
    want = transforms.resize_images(tf.constant(images), size).numpy().astype(int)
    got = np.asarray(resize_images(images, size)).astype(int)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1  # the same kernel; float rounding only
    assert (got != want).mean() < 0.01
  assert resize_images(images, (56, 56)) is images


@pytest.mark.parametrize("robot,architecture", [("babyai", "separate"), ("metaworld", "shared")])
def test_actions_always_within_bounds(ckpt_dir, robot, architecture):
  ctrl = controller(ckpt_dir(robot, "qsft", architecture))
  ctrl.temperature = 5.0  # sampling reaches many bins
  low, high = ctrl.action_tokenizer.bounds
  rng = np.random.RandomState(4)
  seen = set()
  for episode in range(3):
    ctrl.reset(f"episode {episode}")
    ctrl.beta = float(rng.choice([0.0, 1.0, 50.0]))
    for _ in range(15):
      obs = random_observation(ctrl.spec, rng)
      if "state" in obs:
        obs["state"] *= 10.0 ** rng.randint(-3, 4)
      a = ctrl.act(obs)
      assert a.dtype == np.float32 and a.shape == (ctrl.spec.action_dim,)
      assert np.isfinite(a).all() and (a >= low).all() and (a <= high).all()
      for i, d in enumerate(ctrl.action_tokenizer.dims):
        if d.kind == "discrete":
          assert float(a[i]) in d.values
      seen.add(tuple(a.tolist()))
  assert len(seen) > 5


def test_sampling_is_seeded(ckpt_dir):
  path = ckpt_dir("babyai")

  def actions(ctrl):
    ctrl.reset(INSTRUCTION)
    rng = np.random.RandomState(5)
    return np.stack([ctrl.act(random_observation(ctrl.spec, rng)) for _ in range(10)])

  # A moderate beta: with the run's beta a peaked policy could sample the same actions
  # under every seed.
  first = actions(Controller.load(path, beta=1.0, temperature=1.0, seed=11))
  np.testing.assert_array_equal(first, actions(Controller.load(path, beta=1.0, temperature=1.0,
                                                               seed=11)))
  assert not np.array_equal(first, actions(controller(path, beta=1.0, temperature=1.0, seed=12)))


@pytest.fixture
def metaworld_ctrl(ckpt_dir):
  return controller(ckpt_dir("metaworld", "qsft", "shared"))


def _good(ctrl):
  return random_observation(ctrl.spec, np.random.RandomState(6))


@pytest.mark.parametrize("change,key,expected", [
    (lambda o: o.pop("image"), "image", "missing camera"),
    (lambda o: o.update(wrist=o["image"]), "wrist", "unknown key"),
    (lambda o: o.update(image=o["image"][:32]), "image", r"expected shape \(64, 64, 3\)"),
    (lambda o: o.update(image=o["image"][..., :1]), "image", "expected shape"),
    (lambda o: o.update(image=o["image"].astype(np.float32)), "image", "uint8"),
    (lambda o: o.pop("state"), "state", "missing"),
    (lambda o: o.update(state=o["state"][:38]), "state", r"expected shape \(39,\)"),
    (lambda o: o.update(state=np.zeros((1, 39), np.float32)), "state", "expected shape"),
    (lambda o: o.update(state=np.arange(39)), "state", "float"),
    (lambda o: o["state"].__setitem__(5, np.nan), "state", "non-finite value nan at index 5"),
    (lambda o: o["state"].__setitem__(0, np.inf), "state", "non-finite value inf"),
    (lambda o: o.update(state=np.full(39, 1e300)), "state", "non-finite"),
])
def test_malformed_observations_are_refused(metaworld_ctrl, change, key, expected):
  ctrl = metaworld_ctrl
  ctrl.reset(INSTRUCTION)
  ctrl.act(_good(ctrl))
  before = ctrl._window()
  obs = _good(ctrl)
  change(obs)
  with pytest.raises(ObservationError, match=expected) as e:
    ctrl.act(obs)
  assert repr(key) in str(e.value) or f"[{key!r}]" in str(e.value)
  after = ctrl._window()  # a refused observation leaves the history alone
  np.testing.assert_array_equal(before[1], after[1])
  np.testing.assert_array_equal(before[0]["image"], after[0]["image"])


def test_observation_must_be_a_dict(metaworld_ctrl):
  metaworld_ctrl.reset(INSTRUCTION)
  with pytest.raises(ObservationError, match="dict"):
    metaworld_ctrl.act(np.zeros((64, 64, 3), np.uint8))


def test_instruction_and_order_checks(ckpt_dir):
  ck, _ = load_reference(ckpt_dir("babyai"))
  ctrl = Controller(ck, warmup=False)
  obs = random_observation(ctrl.spec, np.random.RandomState(7))
  with pytest.raises(ControllerError, match="before reset"):
    ctrl.act(obs)
  for bad in ("", "   \n", "\u200b\u200b", "\u200d \ufeff"):  # blank or only invisible marks
    with pytest.raises(ValueError, match="letter or digit"):
      ctrl.reset(bad)
  for bad in (None, 3, b"bytes"):
    with pytest.raises(TypeError, match="str"):
      ctrl.reset(bad)
  with pytest.raises(ValueError, match=r"not valid Unicode text \(surrogates not allowed at "
                     r"index 6\)"):
    ctrl.reset("go to \ud800 ball")   # a lone surrogate, e.g. from a bad decode upstream
  with pytest.raises(ControllerError, match="before reset"):
    ctrl.act(obs)  # failed resets start nothing
  ctrl.reset(INSTRUCTION)
  assert ctrl.instruction == INSTRUCTION
  ctrl.act(obs)
  with pytest.raises(ValueError):
    ctrl.reset(" ")
  with pytest.raises(ControllerError, match="before reset"):
    ctrl.act(obs)  # ... and end the previous episode
  assert ctrl.instruction is None
  fixed = dataclasses.replace(ck.robot, instruction_source="fixed", instruction_text="tidy up")
  fixed_ctrl = Controller(dataclasses.replace(ck, robot=fixed), warmup=False)
  fixed_ctrl.reset()  # a robot with a fixed instruction (as its training data had)
  assert fixed_ctrl.instruction == "tidy up"
  for name, bad in (("beta", -1.0), ("beta", math.nan), ("beta", 1e39), ("temperature", -0.5),
                    ("temperature", math.inf), ("temperature", 1e39), ("temperature", 1e-45)):
    with pytest.raises(ValueError, match=name):
      setattr(ctrl, name, bad)
    with pytest.raises(ValueError, match=name):
      Controller(ck, warmup=False, **{name: bad})


def test_history_window_pads_with_the_first_frame(metaworld_ctrl):
  ctrl = metaworld_ctrl
  rng = np.random.RandomState(8)
  frames = [_good(ctrl) for _ in range(4)]
  for f in frames:
    f["image"] = rng.randint(0, 256, f["image"].shape).astype(np.uint8)
  ctrl.reset(INSTRUCTION)

  def check(want_frames, want_mask):
    obs, mask = ctrl._window()
    np.testing.assert_array_equal(mask, [want_mask])
    for k in ("image", "state"):
      np.testing.assert_array_equal(obs[k][0], np.stack([f[k] for f in want_frames]))

  buffer = frames[0]["image"]
  ctrl.act(frames[0])
  kept = buffer.copy()
  buffer[:] = 0  # a camera driver reusing its buffer must not change the history
  check([{**frames[0], "image": kept}] * 2, [False, True])
  frames[0]["image"] = kept
  ctrl.act(frames[1])
  check(frames[:2], [True, True])
  ctrl.act(frames[2])
  check(frames[1:3], [True, True])
  ctrl.reset(INSTRUCTION)  # a new episode starts a new window
  ctrl.act(frames[3])
  check([frames[3]] * 2, [False, True])


def test_latency_stats(ckpt_dir):
  ctrl = controller(ckpt_dir("babyai"))
  assert ctrl.latency_stats()["calls"] == 0  # the warm-up does not count
  assert math.isnan(ctrl.latency_stats()["p50_ms"])
  ctrl.reset(INSTRUCTION)
  rng = np.random.RandomState(9)
  for _ in range(30):
    ctrl.act(random_observation(ctrl.spec, rng))
  s = ctrl.latency_stats()
  assert s["calls"] == 30
  assert 0 < s["p50_ms"] <= s["p99_ms"] <= s["max_ms"]
  assert s["p50_ms"] < 1000  # compiled once at construction, not in act()
  ctrl.reset_latency_stats()
  assert ctrl.latency_stats()["calls"] == 0


def test_in_memory_params_give_the_same_actions(ckpt_dir):
  path = ckpt_dir("metaworld", "qsft", "shared")
  ck = TrainedPolicy.load(path)
  loaded = controller(path)
  live = Controller(ck.with_params(jax.device_get(ck.params)), beta=None, temperature=0.0,
                    seed=0, warmup=False)
  assert live.step is None and loaded.step == ck.step
  rng = np.random.RandomState(10)
  loaded.reset(INSTRUCTION)
  live.reset(INSTRUCTION)
  for _ in range(3):
    obs = random_observation(ck.robot, rng)
    np.testing.assert_array_equal(loaded.act(obs), live.act(obs))
  with pytest.raises(ValueError, match="needs keys"):
    Controller(dataclasses.replace(ck, params={"pi": ck.params["shared"]}), warmup=False)


def test_non_finite_params_are_refused_at_load_and_never_act(tmp_path):
  """A checkpoint with a NaN parameter is refused by name; params handed over in memory
  that make the logits NaN make act() raise instead of returning argmax(NaN) = bin 0."""
  path = write_checkpoint(tmp_path / "nan", "babyai", "bc", nan_params=True)
  with pytest.raises(checkpoints.CheckpointError, match=r"\['head'\]\['kernel'\].*non-finite"):
    Controller.load(path)
  clean = TrainedPolicy.load(write_checkpoint(tmp_path / "ok", "babyai", "bc"))
  nan = jax.tree_util.tree_map(lambda x: np.full_like(x, np.nan), jax.device_get(clean.params))
  ctrl = Controller(clean.with_params(nan), warmup=False)
  ctrl.reset(INSTRUCTION)
  with pytest.raises(ControllerError, match="not finite"):
    ctrl.act(random_observation(clean.robot, np.random.RandomState(0)))


def _largest_file(folder):
  files = [os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs]
  return max(files, key=os.path.getsize)


def test_damaged_checkpoints_are_refused_naming_the_file(ckpt_dir, tmp_path):
  """A bit flip, a truncation or an edited meta file is refused before anything is
  read back, naming the file and the other steps; without a manifest (older
  checkpoints) it loads unchecked."""
  src = ckpt_dir("babyai", "qsft", "shared")
  for damage in ("flip", "truncate", "meta"):
    work = tmp_path / damage
    shutil.copytree(src, work)
    ck_dir, step = checkpoints.resolve(str(work))
    step_dir = os.path.join(ck_dir, str(step))
    if damage == "meta":
      target = os.path.join(step_dir, "meta", "metadata")
      with open(target) as f:
        text = f.read()
      with open(target, "w") as f:
        f.write(text.replace('"qsft"', '"qsfT"'))  # same size, other content
    else:
      target = _largest_file(os.path.join(step_dir, "params_pi"))
      with open(target, "r+b") as f:
        if damage == "flip":
          f.seek(os.path.getsize(target) // 2)
          byte = f.read(1)
          f.seek(-1, os.SEEK_CUR)
          f.write(bytes([byte[0] ^ 0x10]))
        else:
          f.truncate(os.path.getsize(target) - 7)
    rel = os.path.relpath(target, step_dir)
    why = {"flip": "sha256 differs", "truncate": "bytes, written with",
           "meta": "sha256 differs"}[damage]
    with pytest.raises(checkpoints.CheckpointError,
                       match=rf"damaged since it was saved.*{re.escape(rel)}: .*{why}"):
      Controller.load(str(work), warmup=False)
  # A manifest-less step (written before checksums existed) still loads.
  work = tmp_path / "old"
  shutil.copytree(src, work)
  ck_dir, step = checkpoints.resolve(str(work))
  os.remove(os.path.join(ck_dir, str(step), checkpoints.CHECKSUMS))
  assert not checkpoints.verify(ck_dir, step, None)
  Controller.load(str(work), warmup=False)
  assert checkpoints.verify(*checkpoints.resolve(str(src)), None)


def test_the_robot_host_guards_with_its_own_action_space(ckpt_dir):
  """A checkpoint whose action values were edited (1000..1006 for BabyAI's 0..6) acts
  1000+ when trusted; with the host's robot config it is refused, naming the
  dimension. The real checkpoint loads and acts under the host's config."""
  from qsft_vla.tokenizers.action import ActionTokenizer  # pylint: disable=g-import-not-at-top
  babyai = os.path.join(REPO, "robot_configs", "babyai.py")
  path = ckpt_dir("babyai", "bc")
  ctrl = Controller.load(path, robot=babyai, warmup=False)
  ctrl.reset(INSTRUCTION)
  action = ctrl.act(random_observation(ctrl.spec, np.random.RandomState(3)))
  assert 0 <= action[0] <= 6
  ck = TrainedPolicy.load(path)
  spec = ck.action_tokenizer.to_spec()
  for d in spec["dims"]:
    d["values"] = [v + 1000.0 for v in d["values"]]
  edited = dataclasses.replace(ck, action_tokenizer=ActionTokenizer.from_spec(spec))
  trusting = Controller(edited, warmup=False)
  trusting.reset(INSTRUCTION)
  assert trusting.act(random_observation(ck.robot, np.random.RandomState(3)))[0] >= 1000
  with pytest.raises(checkpoints.CheckpointError, match=r"action dimension 'action'.*1000"):
    Controller(edited, warmup=False, robot=ck.robot)
  metaworld = os.path.join(REPO, "robot_configs", "metaworld.py")
  with pytest.raises(checkpoints.CheckpointError, match="dimensions"):
    Controller.load(path, robot=metaworld, warmup=False)


def test_controller_is_tensorflow_and_optax_free(ckpt_dir):
  """The robot host's package (qsft_vla.policy): no TF, TFDS, Reverb, rlds, nor optax."""
  path = ckpt_dir("metaworld", "qsft", "shared")
  out = run_without_tensorflow(f"""
      import numpy as np
      from qsft_vla.policy import Controller, TrainedPolicy   # the whole robot-host package
      ctrl = Controller.load({path!r})
      assert "robot: metaworld" in TrainedPolicy.load({path!r}).describe()
      ctrl.reset("pick up the puck")
      obs = {{"image": np.zeros((64, 64, 3), np.uint8), "state": np.zeros(39, np.float32)}}
      print(ctrl.act(obs).shape, ctrl.latency_stats()["calls"])
  """, absent=ROBOT_HOST_ABSENT)
  assert out.strip() == "(4,) 1"
