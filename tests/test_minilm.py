"""MiniLM sentence encoder (Flax) against transformers' torch BertModel + mean pooling."""

import os

import numpy as np
import pytest

from qsft_vla.weights import packaged

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the reference loads the local folder only
os.environ.setdefault("USE_TF", "0")          # transformers: skip importing TensorFlow

TEXTS = ["pick up the red block", "grasp the red cube", "open the top drawer",
         "Put the apple in the bowl, then close the drawer!", "a"]


@pytest.fixture(scope="module")
def encoder():
  from qsft_vla.models import minilm
  return minilm.MiniLMSentenceEncoder.from_package(max_len=32)


@pytest.mark.slow  # imports torch + transformers (~10 s)
def test_matches_transformers_bert_with_mean_pooling(encoder):
  import torch  # a test dependency (pyproject [test]): the reference implementation
  import transformers  # pylint: disable=g-import-not-at-top
  ref = transformers.BertModel.from_pretrained(packaged.locate("minilm_folder"),
                                               add_pooling_layer=False).eval()
  ids, mask = encoder.tokenize(TEXTS)
  assert mask.sum(1).min() >= 3 and not mask.all()  # [CLS] a [SEP]; padding present
  with torch.no_grad():
    tm = torch.from_numpy(mask.astype(np.int64))
    hidden = ref(input_ids=torch.from_numpy(ids.astype(np.int64)), attention_mask=tm)[0]
    m = tm[..., None].float()
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    want = torch.nn.functional.normalize(pooled, dim=-1).numpy()
  got = encoder.encode(TEXTS)
  assert got.shape == (len(TEXTS), 384)
  np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-5)
  diff = np.abs(got - want).max()
  print(f"MiniLM: max|flax - torch| over sentence embeddings {diff:.2e}")
  assert diff < 1e-5


def test_padding_does_not_change_embeddings(encoder):
  from qsft_vla.models import minilm
  long = minilm.MiniLMSentenceEncoder(encoder.module, encoder.variables,
                                      encoder.tokenizer.files()[0], max_len=64)
  np.testing.assert_allclose(long.encode(TEXTS), encoder.encode(TEXTS), atol=1e-5)


TRIPLES = [
    ("pick up the red block", "grasp the red cube", "open the top drawer"),
    ("open the top drawer", "pull the upper drawer open", "pick up the red block"),
    ("push the button", "press the button", "pour water into the cup"),
    ("close the window", "shut the window", "move the green ball to the left"),
    ("put the apple in the bowl", "place the apple into the bowl", "turn on the faucet"),
]


def test_paraphrases_are_closer_than_unrelated_instructions(encoder):
  for anchor, para, other in TRIPLES:
    a, p, o = encoder.encode([anchor, para, other])
    sim_p, sim_o = float(a @ p), float(a @ o)
    print(f"{anchor!r}: paraphrase {sim_p:.3f}, unrelated {sim_o:.3f}")
    assert sim_p > sim_o + 0.1, (anchor, sim_p, sim_o)


def test_config_and_checkpoint_checks():
  from qsft_vla.models import minilm
  with pytest.raises(ValueError, match="position_embedding_type"):
    minilm.BertConfig.from_hf({"position_embedding_type": "relative_key"})
  with pytest.raises(ValueError, match="divisible"):
    minilm.BertConfig(hidden_size=10, num_attention_heads=3)
  cfg = minilm.BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1,
                          num_attention_heads=2, intermediate_size=16)
  with pytest.raises(KeyError, match="word_embeddings"):
    minilm.convert_tensors({}, cfg)
