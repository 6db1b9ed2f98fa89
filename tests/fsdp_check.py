"""Run by tests/test_sharding.py in a fresh interpreter with 8 host CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=8 must be set before jax
starts): the same Q-SFT learner, init and batches on one device and on (data,
fsdp) mesh of 2x4; prints JSON: the largest difference of every state
leaf from the one-device run, the metrics' differences, and the bytes of the
state per device."""

import json
import sys

import jax
import numpy as np

from qsft_vla.learning import learner as L
from qsft_vla.learning import sharding
from qsft_vla.models.rt1_small import RT1Small, RT1SmallConfig

# Big enough that the kernels and the embedding pass sharding.DEFAULT_MIN_SIZE.
MODEL = RT1SmallConfig(num_action_dims=2, action_vocab=8, window=1, width=64, depth=1,
                       num_heads=2, conv_channels=(16,), tokens_per_image=2, max_text_len=8,
                       text_vocab=1024, text_dim=32)
VALID = np.ones((2, 8), bool)
STEPS, LR = 3, 1e-3


def batch(seed, n=8):
  rng = np.random.default_rng(seed)
  img = lambda: rng.integers(0, 256, (n, 1, 16, 16, 3), dtype=np.uint8)
  return {"observation": {"image": img()}, "history_mask": np.ones((n, 1), bool),
          "next_observation": {"image": img()}, "next_history_mask": np.ones((n, 1), bool),
          "text_ids": rng.integers(1, 1024, (n, 8)).astype(np.int32),
          "text_mask": np.ones((n, 8), bool),
          "action_tokens": rng.integers(0, 8, (n, 2)).astype(np.int32),
          "reward": (rng.random(n) < 0.3).astype(np.float32), "terminal": rng.random(n) < 0.3,
          "has_next": rng.random(n) < 0.9, "return_to_go": rng.random(n).astype(np.float32)}


def run(mesh):
  # The paper's bootstrapped target: pi_phi and the Polyak target at s' and s,
  # so every pass of a Q-SFT step runs on the mesh.
  cfg = L.LearnerConfig(lr_pi=LR, lr_p=LR, polyak_alpha=0.25, mc_lower_bound=True)
  model = RT1Small(L.model_config_for(MODEL, cfg))
  lrn = L.Learner(model, cfg, VALID, mesh=mesh)
  b0 = batch(0)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), b0["observation"], b0["history_mask"],
                                  b0["text_ids"], b0["text_mask"], b0["action_tokens"])
  state = lrn.init(jax.random.PRNGKey(0), b0, variables=variables)
  held = sharding.bytes_per_device(state)
  metrics = []
  for i in range(STEPS):
    state, m = lrn.step(state, batch(i))
    metrics.append({k: float(v) for k, v in m.items()})
  fsdp = int(mesh.shape["fsdp"])
  specs, expected = {}, 0
  for (path, s), leaf in zip(jax.tree_util.tree_flatten_with_path(lrn.state_shardings(state))[0],
                             jax.tree_util.tree_leaves(state), strict=True):
    specs[sharding.leaf_name(path)] = str(s.spec)
    expected += leaf.nbytes // fsdp if "fsdp" in str(s.spec) else leaf.nbytes
  return state, metrics, held, specs, expected


def main():
  devices = jax.devices()
  assert len(devices) == 8, devices
  ref, ref_metrics, ref_held, _, _ = run(sharding.make_mesh(devices[:1], 1))
  total = sum(ref_held.values())
  out = {"total_bytes": total}
  for name, mesh in (("data2_fsdp4", sharding.make_mesh(devices, 4)),):
    state, metrics, held, specs, expected = run(mesh)
    diffs = [float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) if np.size(a) else 0.0
             for a, b in zip(jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(state),
                             strict=True)]
    metric_diff = max(abs(a[k] - b[k]) for a, b in zip(ref_metrics, metrics) for k in a)
    sharded = [n for n, s in specs.items() if "fsdp" in s]
    out[name] = {"max_leaf_diff": max(diffs), "leaves_over_1e-5": sum(d > 1e-5 for d in diffs),
                 "leaves": len(diffs), "max_metric_diff": metric_diff,
                 "bytes_per_device": sorted(held.values()), "expected_bytes_per_device": int(expected),
                 "sharded_leaves": sharded,
                 "fsdp": int(mesh.shape["fsdp"])}
  json.dump(out, sys.stdout)


if __name__ == "__main__":
  main()
