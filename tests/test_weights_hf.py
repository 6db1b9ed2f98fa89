"""HF checkpoint folders: round trip, sharded folders, the packaged MiniLM folder, clear errors."""

import json
import os
import struct

import numpy as np
import pytest

from qsft_vla.weights import hf, packaged


def _random_tensors(seed=0):
  rng = np.random.RandomState(seed)
  return {"model.embed_tokens.weight": rng.randn(11, 4).astype(np.float32),
          "model.layers.0.mlp.up_proj.weight": rng.randn(8, 4).astype(np.float16),
          "model.norm.weight": rng.randn(4).astype(np.float64),
          "position_ids": np.arange(7, dtype=np.int64)[None],
          "mask": np.array([True, False]),
          "scalar": np.array(3.5, np.float32)}


def test_round_trip(tmp_path):
  tensors = _random_tensors()
  cfg = {"model_type": "llama", "hidden_size": 4}
  out = hf.save_folder(str(tmp_path / "ckpt"), cfg, tensors, tokenizer_json='{"x": 1}')
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "tokenizer.json"]
  ck = hf.load_folder(out)
  assert ck.path == out and ck.config == cfg
  assert ck.tokenizer_path == os.path.join(out, "tokenizer.json")
  assert sorted(ck.tensors) == sorted(tensors)
  for k, v in tensors.items():
    assert ck.tensors[k].dtype == v.dtype and ck.tensors[k].shape == v.shape, k
    np.testing.assert_array_equal(ck.tensors[k], v)
  ck32 = hf.load_folder(out, dtype=np.float32)
  assert ck32.tensors["model.norm.weight"].dtype == np.float32
  assert ck32.tensors["position_ids"].dtype == np.int64  # integers keep their dtype
  # No temp folders left beside; saving again replaces the folder atomically.
  hf.save_folder(out, {"v": 2}, {"a": np.zeros(3, np.float32)})
  assert os.listdir(tmp_path) == ["ckpt"]
  ck = hf.load_folder(out)
  assert ck.config == {"v": 2} and list(ck.tensors) == ["a"] and ck.tokenizer_path is None


def test_files_readable_by_safetensors_library(tmp_path):
  from safetensors.numpy import load_file, save_file
  tensors = _random_tensors(1)
  out = hf.save_folder(str(tmp_path / "c"), {}, tensors)
  back = load_file(os.path.join(out, "model.safetensors"))
  for k, v in tensors.items():
    np.testing.assert_array_equal(back[k], v)
  save_file(tensors, os.path.join(out, "model.safetensors"))
  for k, v in hf.load_folder(out).tensors.items():
    np.testing.assert_array_equal(v, tensors[k])


def test_bf16_widened_to_float32(tmp_path):
  torch = pytest.importorskip("torch")
  from safetensors.torch import save_file
  x = torch.randn(3, 5).to(torch.bfloat16)
  os.makedirs(tmp_path / "c")
  save_file({"w": x}, str(tmp_path / "c" / "model.safetensors"))
  (tmp_path / "c" / "config.json").write_text("{}")
  w = hf.load_folder(str(tmp_path / "c")).tensors["w"]
  assert w.dtype == np.float32
  np.testing.assert_array_equal(w, x.float().numpy())


def _write_sharded(d, tensors, split):
  os.makedirs(d, exist_ok=True)
  names = sorted(tensors)
  shards = {"model-00001-of-00002.safetensors": names[:split],
            "model-00002-of-00002.safetensors": names[split:]}
  weight_map = {}
  for shard, keys in shards.items():
    hf.write_safetensors(os.path.join(d, shard), {k: tensors[k] for k in keys})
    weight_map.update({k: shard for k in keys})
  with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)
  with open(os.path.join(d, "config.json"), "w") as f:
    json.dump({"model_type": "llama"}, f)
  return shards


def test_sharded_folder(tmp_path):
  tensors = _random_tensors(2)
  d = str(tmp_path / "sharded")
  _write_sharded(d, tensors, 3)
  ck = hf.load_folder(d)
  assert sorted(ck.tensors) == sorted(tensors) and ck.tokenizer_path is None
  for k, v in tensors.items():
    np.testing.assert_array_equal(ck.tensors[k], v)


def test_sharded_duplicate_and_missing_shard(tmp_path):
  tensors = _random_tensors(3)
  d = str(tmp_path / "dup")
  shards = _write_sharded(d, tensors, 3)
  second = list(shards)[1]
  name = sorted(tensors)[0]  # lives in the first shard; now also in the second
  hf.write_safetensors(os.path.join(d, second),
                       {k: tensors[k] for k in shards[second] + [name]})
  with pytest.raises(hf.CheckpointError, match=rf"'{name}'.*both.*00001.*00002"):
    hf.load_folder(d)
  os.remove(os.path.join(d, second))
  with pytest.raises(hf.CheckpointError, match="missing.*00002-of-00002"):
    hf.load_folder(d)


def test_packaged_minilm_folder():
  try:
    path = packaged.locate("minilm_folder")
  except packaged.MissingWeightsError as e:
    pytest.skip(str(e))
  ck = hf.load_folder(path)
  cfg = ck.config
  assert cfg["model_type"] == "bert"
  assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
          cfg["intermediate_size"], cfg["vocab_size"]) == (384, 6, 12, 1536, 30522)
  assert ck.tokenizer_path and os.path.isfile(ck.tokenizer_path)
  t = {k.removeprefix("bert."): v for k, v in ck.tensors.items()}  # some exports prefix "bert."
  assert t["embeddings.word_embeddings.weight"].shape == (30522, 384)
  assert t["embeddings.position_embeddings.weight"].shape == (512, 384)
  assert t["embeddings.LayerNorm.weight"].shape == (384,)
  for i in range(6):
    p = f"encoder.layer.{i}."
    assert t[p + "attention.self.query.weight"].shape == (384, 384)
    assert t[p + "attention.self.key.bias"].shape == (384,)
    assert t[p + "attention.output.dense.weight"].shape == (384, 384)
    assert t[p + "intermediate.dense.weight"].shape == (1536, 384)
    assert t[p + "output.dense.weight"].shape == (384, 1536)
    assert t[p + "output.LayerNorm.bias"].shape == (384,)
  assert all(v.dtype == np.float32 for k, v in t.items() if "position_ids" not in k)
  assert np.isfinite(t["embeddings.word_embeddings.weight"]).all()


def test_clear_errors(tmp_path):
  with pytest.raises(hf.CheckpointError, match="does not exist"):
    hf.load_folder(str(tmp_path / "nope"))
  d = tmp_path / "c"
  d.mkdir()
  with pytest.raises(hf.CheckpointError, match="no config.json"):
    hf.load_folder(str(d))
  (d / "config.json").write_text("{not json")
  with pytest.raises(hf.CheckpointError, match="config.json: cannot read"):
    hf.load_folder(str(d))
  (d / "config.json").write_text("{}")
  with pytest.raises(hf.CheckpointError, match="no model.safetensors and no model.safetensors.index"):
    hf.load_folder(str(d))
  (d / "pytorch_model.bin").write_bytes(b"x")
  with pytest.raises(hf.CheckpointError, match="pickle"):
    hf.load_folder(str(d))
  os.remove(d / "pytorch_model.bin")
  st = d / "model.safetensors"
  st.write_bytes(b"abc")
  with pytest.raises(hf.CheckpointError, match=r"model.safetensors: not a safetensors file"):
    hf.load_folder(str(d))
  st.write_bytes(struct.pack("<Q", 5) + b"{oops")
  with pytest.raises(hf.CheckpointError, match="header is not valid JSON"):
    hf.load_folder(str(d))
  # Truncated file: the tensor's byte range runs past the end; the error names it.
  hf.write_safetensors(str(st), {"w": np.ones((4, 4), np.float32)})
  st.write_bytes(st.read_bytes()[:-8])
  with pytest.raises(hf.CheckpointError, match=r"model.safetensors: tensor 'w'.*truncated"):
    hf.load_folder(str(d))
  head = json.dumps({"w": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}).encode()
  st.write_bytes(struct.pack("<Q", len(head)) + head + b"\0" * 8)
  with pytest.raises(hf.CheckpointError, match="tensor 'w' has unsupported dtype C64"):
    hf.load_folder(str(d))
  with pytest.raises(hf.CheckpointError, match="cannot store"):
    hf.save_folder(str(tmp_path / "bad"), {}, {"z": np.zeros(2, np.complex64)})
  assert not (tmp_path / "bad").exists() and [p.name for p in tmp_path.iterdir()] == ["c"]
