"""GGUF -> HF folder: the q/k un-permutation, a tiny synthetic llama GGUF, and the packaged
SmolLM2 checked tensor by tensor, id by id against transformers' own GGUF loader (the reference)."""

import json
import os
import time

import numpy as np
import pytest

from qsft_vla.weights import gguf_convert, hf, packaged


def llama_cpp_permute(weights, n_head, n_head_kv):
  """convert_hf_to_gguf.py LlamaModel.permute, verbatim (the reference formula)."""
  if n_head_kv is not None and n_head != n_head_kv:
    n_head = n_head_kv
  return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
          .swapaxes(1, 2)
          .reshape(weights.shape))


@pytest.mark.parametrize("n_head,n_kv,head_dim", [(9, 3, 64), (4, 4, 8), (2, 1, 6)])
def test_unpermute_inverts_llama_cpp_permute(n_head, n_kv, head_dim):
  rng = np.random.RandomState(0)
  q = rng.randn(n_head * head_dim, 5).astype(np.float32)
  k = rng.randn(n_kv * head_dim, 5).astype(np.float32)
  qp, kp = llama_cpp_permute(q, n_head, n_head), llama_cpp_permute(k, n_head, n_kv)
  assert not np.array_equal(qp, q)  # it does move rows
  np.testing.assert_array_equal(gguf_convert.unpermute_qk(qp, n_head), q)
  np.testing.assert_array_equal(gguf_convert.unpermute_qk(kp, n_kv), k)
  np.testing.assert_array_equal(gguf_convert.permute_qk(q, n_head), qp)
  bias = rng.randn(n_kv * head_dim).astype(np.float32)  # 1-D (biases) too
  np.testing.assert_array_equal(
      gguf_convert.unpermute_qk(llama_cpp_permute(bias, n_head, n_kv), n_kv), bias)


# --- a tiny synthetic llama GGUF, written with gguf.GGUFWriter -------------------------------

_TOKENS = ["<|endoftext|>", "<s>", "</s>", "a", "b", "c", "Ġ", "ab", "Ġa", "Ġab", "1", "2", "12"]
_MERGES = ["Ġ a", "Ġa b", "a b", "1 2"]


def _tiny_hf(rng, tied, n_layers=2, hidden=12, n_head=3, n_kv=1, ffn=20):
  hd = hidden // n_head
  t = {"model.embed_tokens.weight": rng.randn(len(_TOKENS), hidden),
       "model.norm.weight": rng.randn(hidden)}
  if not tied:
    t["lm_head.weight"] = rng.randn(len(_TOKENS), hidden)
  for i in range(n_layers):
    p = f"model.layers.{i}."
    t.update({p + "self_attn.q_proj.weight": rng.randn(n_head * hd, hidden),
              p + "self_attn.k_proj.weight": rng.randn(n_kv * hd, hidden),
              p + "self_attn.v_proj.weight": rng.randn(n_kv * hd, hidden),
              p + "self_attn.o_proj.weight": rng.randn(hidden, n_head * hd),
              p + "mlp.gate_proj.weight": rng.randn(ffn, hidden),
              p + "mlp.up_proj.weight": rng.randn(ffn, hidden),
              p + "mlp.down_proj.weight": rng.randn(hidden, ffn),
              p + "input_layernorm.weight": rng.randn(hidden),
              p + "post_attention_layernorm.weight": rng.randn(hidden)})
  return {k: v.astype(np.float32) for k, v in t.items()}


def _write_tiny_gguf(path, tensors, arch="llama", n_layers=2, hidden=12, n_head=3, n_kv=1,
                     ffn=20, extra_tensor=None):
  import gguf
  inv = {v: k for k, v in gguf_convert._GLOBAL_NAMES.items()}
  inv.update({f"model.layers.{i}.{hfn}.weight": f"blk.{i}.{g}.weight"
              for i in range(n_layers) for g, hfn in gguf_convert._LAYER_NAMES.items()})
  w = gguf.GGUFWriter(path, arch)
  w.add_block_count(n_layers)
  w.add_context_length(64)
  w.add_embedding_length(hidden)
  w.add_feed_forward_length(ffn)
  w.add_head_count(n_head)
  w.add_head_count_kv(n_kv)
  w.add_rope_freq_base(12345.0)
  w.add_layer_norm_rms_eps(1e-5)
  w.add_vocab_size(len(_TOKENS))
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre("smollm")
  w.add_token_list(_TOKENS)
  w.add_token_types([3, 3, 3] + [1] * (len(_TOKENS) - 3))
  w.add_token_merges(_MERGES)
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  w.add_pad_token_id(2)
  for name, arr in tensors.items():
    if name.endswith("q_proj.weight"):
      arr = llama_cpp_permute(arr, n_head, n_head)
    elif name.endswith("k_proj.weight"):
      arr = llama_cpp_permute(arr, n_head, n_kv)
    w.add_tensor(inv[name], np.ascontiguousarray(arr))
  if extra_tensor:
    w.add_tensor(extra_tensor, np.zeros(4, np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


@pytest.mark.parametrize("tied", [True, False])
def test_tiny_llama_gguf_round_trip(tmp_path, tied):
  tensors = _tiny_hf(np.random.RandomState(1), tied)
  _write_tiny_gguf(str(tmp_path / "tiny.gguf"), tensors)
  out = gguf_convert.convert_gguf(str(tmp_path / "tiny.gguf"), str(tmp_path / "hf"))
  ck = hf.load_folder(out)
  assert sorted(ck.tensors) == sorted(tensors)
  for k, v in tensors.items():  # F32 in the GGUF: exact, q/k un-permuted
    np.testing.assert_array_equal(ck.tensors[k], v, err_msg=k)
  c = ck.config
  assert c["tie_word_embeddings"] is tied
  assert (c["num_hidden_layers"], c["hidden_size"], c["num_attention_heads"],
          c["num_key_value_heads"], c["head_dim"], c["intermediate_size"], c["vocab_size"],
          c["rope_theta"], c["max_position_embeddings"]) == (2, 12, 3, 1, 4, 20, 13, 12345.0, 64)
  from tokenizers import Tokenizer
  tok = Tokenizer.from_file(ck.tokenizer_path)
  assert tok.encode("ab a ab").ids == [7, 8, 9]
  assert tok.encode("12").ids == [10, 11]  # smollm: digits one by one, the "1 2" merge unused
  assert tok.encode("a</s>b").ids == [3, 2, 4]
  assert tok.decode([9, 6, 3]) == " ab a"
  assert sorted(os.listdir(tmp_path)) == ["hf", "tiny.gguf"]  # no staging folders left


def test_clear_errors(tmp_path):
  tensors = _tiny_hf(np.random.RandomState(2), True)
  _write_tiny_gguf(str(tmp_path / "qwen.gguf"), tensors, arch="qwen2")
  with pytest.raises(gguf_convert.GGUFConversionError, match=r"qwen.gguf: architecture 'qwen2'"):
    gguf_convert.convert_gguf(str(tmp_path / "qwen.gguf"), str(tmp_path / "out"))
  _write_tiny_gguf(str(tmp_path / "odd.gguf"), tensors, extra_tensor="rope_freqs.weight")
  with pytest.raises(gguf_convert.GGUFConversionError, match="'rope_freqs.weight'"):
    gguf_convert.convert_gguf(str(tmp_path / "odd.gguf"), str(tmp_path / "out"))
  (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
  with pytest.raises(gguf_convert.GGUFConversionError, match="junk.gguf: cannot read as GGUF"):
    gguf_convert.convert_gguf(str(tmp_path / "junk.gguf"), str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()


# --- the packaged SmolLM2 ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
  """The packaged GGUF converted once for this module, through the real smollm2_folder."""
  try:
    gguf_path = packaged.locate("smollm2_gguf")
  except packaged.MissingWeightsError as e:
    pytest.skip(str(e))
  cache = str(tmp_path_factory.mktemp("qsft_cache"))
  t0 = time.time()
  folder = gguf_convert.smollm2_folder(cache=cache)
  print(f"\nSmolLM2 GGUF -> HF folder: {time.time() - t0:.1f} s")
  return gguf_path, cache, folder


@pytest.mark.slow
def test_smollm2_config_and_cache(smollm2, monkeypatch):
  gguf_path, cache, folder = smollm2
  sha = packaged.ARTIFACTS["smollm2_gguf"].sha256
  assert folder == os.path.join(cache, "smollm2", f"{sha[:16]}-v{gguf_convert.CONVERTER_VERSION}")
  assert sorted(os.listdir(os.path.dirname(folder))) == [os.path.basename(folder)]
  with open(os.path.join(folder, "config.json")) as f:
    c = json.load(f)
  assert c["architectures"] == ["LlamaForCausalLM"] and c["model_type"] == "llama"
  assert c["rope_theta"] == 100000.0
  assert (c["num_hidden_layers"], c["hidden_size"], c["num_attention_heads"],
          c["num_key_value_heads"], c["head_dim"], c["intermediate_size"],
          c["vocab_size"]) == (30, 576, 9, 3, 64, 1536, 49152)
  assert c["tie_word_embeddings"] is True
  assert c["max_position_embeddings"] == 8192
  assert c["rms_norm_eps"] == 1e-5
  assert (c["bos_token_id"], c["eos_token_id"], c["pad_token_id"]) == (1, 2, 2)
  with open(os.path.join(folder, "tokenizer_config.json")) as f:
    tc = json.load(f)
  assert (tc["bos_token"], tc["eos_token"], tc["pad_token"], tc["unk_token"]) == (
      "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
  assert "<|im_start|>" in tc["chat_template"]
  # Cached: a second call converts nothing.
  monkeypatch.setattr(gguf_convert, "convert_gguf", lambda *a: pytest.fail("converted again"))
  assert gguf_convert.smollm2_folder(cache=cache) == folder
  # A new converter version is a new cache entry.
  calls = []
  monkeypatch.setattr(gguf_convert, "convert_gguf", lambda g, out: calls.append((g, out)) or out)
  monkeypatch.setattr(gguf_convert, "CONVERTER_VERSION", gguf_convert.CONVERTER_VERSION + 1)
  assert gguf_convert.smollm2_folder(cache=cache) != folder
  assert calls and calls[0][0] == gguf_path


@pytest.mark.slow
def test_smollm2_tensors_match_transformers(smollm2):
  torch = pytest.importorskip("torch")
  from transformers import AutoConfig, LlamaForCausalLM
  from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
  gguf_path, _, folder = smollm2
  ck = hf.load_folder(folder)
  # transformers' from_pretrained(gguf_file=) needs `accelerate`; its GGUF reader (dequantize +
  # un-permute + renaming) is load_gguf_checkpoint, which a model on the meta device names for.
  d, n = os.path.split(gguf_path)
  cfg = AutoConfig.from_pretrained(d, gguf_file=n)
  with torch.device("meta"):
    model = LlamaForCausalLM(cfg)
  ref = load_gguf_checkpoint(gguf_path, return_tensors=True, model_to_load=model)["tensors"]
  assert sorted(ref) == sorted(ck.tensors)
  assert len(ck.tensors) == 2 + 30 * 9 and "lm_head.weight" not in ck.tensors
  worst = 0.0
  for k, v in ck.tensors.items():
    r = np.asarray(ref[k], dtype=np.float32)
    assert v.dtype == np.float32 and v.shape == r.shape, k
    worst = max(worst, float(np.abs(v - r).max()))
  print(f"\nmax |ours - transformers| over all tensors: {worst:g}")
  assert worst <= 1e-6
  assert ck.tensors["model.layers.0.self_attn.q_proj.weight"].shape == (576, 576)
  assert ck.tensors["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
  assert ck.tensors["model.layers.0.mlp.down_proj.weight"].shape == (576, 1536)
  # Config fields transformers reads from the same metadata agree.
  for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "rope_theta",
              "max_position_embeddings", "tie_word_embeddings", "bos_token_id", "eos_token_id"):
    assert ck.config[key] == getattr(cfg, key), key


TEXTS = [
    "Hello world", " leading space", "  two leading spaces", "trailing space ",
    "Pick up the red block and put it in the drawer.",
    "def f(x):\n    return x ** 2  # square\n\tindented\n",
    "naïve café, Größe, 日本語のテキスト, emoji 🤖🦾, Ελληνικά", "Ġ is not a space",
    "numbers 2024, 3.14159, 1e-5, -42, 007", "don't they'll I'M", "a\n\n\nb\r\n",
    "<|im_start|>user\nMove the arm left.<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more <jupyter_code>x", "<|im_start|<|im_end|>>", "",
]


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers(smollm2):
  pytest.importorskip("torch")
  from tokenizers import Tokenizer
  from transformers import AutoTokenizer
  gguf_path, _, folder = smollm2
  ours = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
  d, n = os.path.split(gguf_path)
  ref = AutoTokenizer.from_pretrained(d, gguf_file=n)
  assert ours.get_vocab_size() == len(ref) == 49152
  for s in TEXTS:
    ids = ours.encode(s).ids
    # transformers' GGUF tokenizer prepends BOS by default; SmolLM2's does not (add_bos_token False).
    assert ids == ref.encode(s, add_special_tokens=False), s
    assert ours.decode(ids, skip_special_tokens=False) == s
  assert ours.encode("<|endoftext|><|im_start|><|im_end|>").ids == [0, 1, 2]
  # SmolLM2 ("smollm" pre-tokenizer) splits numbers into single digits.
  assert [ours.id_to_token(i) for i in ours.encode("2024").ids] == ["2", "0", "2", "4"]
  assert ours.encode("<|im_start|>hi", add_special_tokens=True).ids[0] == 1  # no BOS added


@pytest.mark.slow
def test_smollm2_folder_runs_in_transformers(smollm2):
  """End to end: transformers loads the converted folder as a plain hub checkpoint and the
  model answers; a wrong q/k permutation or tie would give gibberish here."""
  torch = pytest.importorskip("torch")
  from transformers import AutoTokenizer, LlamaForCausalLM
  _, _, folder = smollm2
  tok = AutoTokenizer.from_pretrained(folder)
  assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
  model, info = LlamaForCausalLM.from_pretrained(folder, output_loading_info=True)
  assert not any(info.values()), info
  assert model.config.rope_theta == 100000.0 and model.config.tie_word_embeddings
  enc = tok("The capital of France is", return_tensors="pt")
  with torch.no_grad():
    out = model.generate(**enc, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
  assert "Paris" in tok.decode(out[0, enc.input_ids.shape[1]:])
