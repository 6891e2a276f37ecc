"""Export to and import from transformers folders, from_pretrained, and every bad input.

transformers models are built here with random weights (no hub). The run exported is a micro
model trained for a few steps on a local corpus, with a 250-piece vocabulary (padded to 256 in
bertjax, so padding rows are stripped on export and added back on import).
"""

import json
import logging
import os
import re

import jax
import numpy as np
import pytest
import safetensors.numpy

from bertjax.config import loading as config_lib
from bertjax.data import tokenizer as tokenizer_lib
from bertjax.errors import BertjaxError
from bertjax.hf import export, folders, import_hf, load, names
from bertjax.model.bert import init_model
from bertjax.train import checkpoint, pretrain
from tests.support.corpora import numbered_documents, write_bert_text
from tests.support.extras import randomise, require
from tests.support.micro import MICRO

torch = require("torch")
transformers = require("transformers")

TOLERANCE = 5e-6  # float32 rounding: measured at most 2.4e-6 (hidden states), 1.2e-6 (logits)
VOCAB = 250
TRAIN_OVERRIDES = [f"model.{k}={v}" for k, v in MICRO.items()] + [
  "data.seq_len=32",
  "data.max_predictions=5",
  f"data.vocab_size={VOCAB}",
  "train.batch_size=8",
  "train.log_every=1",
  "train.eval_every=100",
  "train.eval_batches=1",
  "optim.warmup_steps=0",
  "optim.lr=3e-3",
  "train.compilation_cache=off",
  "data.num_proc=1",
]
HF_DIMS = {
  "vocab_size": VOCAB,
  "hidden_size": 48,
  "num_hidden_layers": 2,
  "num_attention_heads": 3,
  "intermediate_size": 96,
  "max_position_embeddings": 64,
  "type_vocab_size": 2,
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp("hf-corpus")
  write_bert_text(root / "corpus.txt", numbered_documents(40))
  return root


def _train_config(corpus, *extra):
  return config_lib.load_config(
    "configs/tiny.py",
    TRAIN_OVERRIDES + [f"data.source=files:{corpus}/corpus.txt", f"data.cache_dir={corpus}/cache", *extra],
  )


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
  """A micro run trained for 3 steps (its tokenizer trained on the corpus)."""
  workdir = tmp_path_factory.mktemp("trained") / "run"
  pretrain.train(_train_config(corpus, "train.steps=3"), workdir)
  return workdir


@pytest.fixture(scope="module")
def hf_export(trained):
  return export.export_hf(trained)


def _vocab(corpus) -> list[str]:
  """A bert-base-like vocab.txt of VOCAB pieces: specials not at 0-4, words, ## continuations."""
  words = sorted({w.strip(".").lower() for doc in numbered_documents(40) for s in doc for w in s.split()})
  pieces = ["[PAD]", "[unused0]", "[unused1]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "."]
  pieces += [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"] + list("abcdefghijklmnopqrstuvwxyz0123456789")
  pieces += [w for w in words if w not in pieces]
  return (pieces + [f"[unused{i}]" for i in range(2, VOCAB)])[:VOCAB]


def _hf_folder(folder, model_class, corpus, legacy_bin=False):
  """A transformers folder as save_pretrained writes it, plus a vocab.txt."""
  torch.manual_seed(0)
  model = randomise(model_class(transformers.BertConfig(**HF_DIMS)))
  model.save_pretrained(str(folder))
  if legacy_bin:  # an older checkpoint: pytorch_model.bin carrying the position_ids buffer
    (folder / "model.safetensors").unlink()
    state = dict(model.state_dict(), **{"embeddings.position_ids": torch.arange(64)[None]})
    torch.save(state, folder / "pytorch_model.bin")
  (folder / "vocab.txt").write_text("\n".join(_vocab(corpus)) + "\n")
  return model


@pytest.fixture(scope="module")
def hf_pretraining_folder(tmp_path_factory, corpus):
  folder = tmp_path_factory.mktemp("hf-pretraining")
  return folder, _hf_folder(folder, transformers.BertForPreTraining, corpus)


def _batch(auto, corpus, rows=4, seq_len=32, seed=0):
  docs = numbered_documents(40)
  enc = auto(
    [d[0] for d in docs[:rows]],
    [d[1] for d in docs[:rows]],
    padding="max_length",
    truncation=True,
    max_length=seq_len,
    return_tensors="np",
  )
  rng = np.random.default_rng(seed)
  lengths = enc["attention_mask"].sum(1)
  positions = np.stack([np.sort(rng.choice(np.arange(1, n), 5, replace=False)) for n in lengths])
  return enc["input_ids"], enc["token_type_ids"], enc["attention_mask"], positions


def test_export_loads_in_transformers_with_the_same_logits(trained, hf_export, corpus):
  config = json.loads((hf_export / "config.json").read_text())
  assert config["model_type"] == "bert" and config["architectures"] == ["BertForPreTraining"]
  assert (config["vocab_size"], config["hidden_size"], config["num_attention_heads"]) == (VOCAB, 32, 2)
  assert config["hidden_act"] == "gelu" and config["layer_norm_eps"] == 1e-12 and config["pad_token_id"] == 0
  model, info = transformers.BertForPreTraining.from_pretrained(str(hf_export), output_loading_info=True)
  assert not info["missing_keys"], info
  assert not info["unexpected_keys"] and not info["mismatched_keys"], info
  model.eval()
  auto = transformers.AutoTokenizer.from_pretrained(str(hf_export))
  ids, segments, mask, positions = _batch(auto, corpus)

  with checkpoint.Checkpoints(trained, read_only=True) as checkpoints:
    params, _ = checkpoints.restore_params()
  ours = init_model(names.bert_config_from_hf(config))
  load.load_params_into(ours, params)
  with jax.default_matmul_precision("highest"):
    mlm, nsp = ours(ids, segments, mask, positions)
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids), token_type_ids=torch.tensor(segments), attention_mask=torch.tensor(mask))
  hf_mlm = np.take_along_axis(out.prediction_logits.numpy(), positions[..., None], axis=1)
  errors = {
    "mlm": float(np.abs(np.asarray(mlm)[..., :VOCAB] - hf_mlm).max()),
    "nsp": float(np.abs(np.asarray(nsp) - out.seq_relationship_logits.numpy()).max()),
  }
  print(f"\nexported trained model, bertjax vs transformers max abs logit errors: {errors}")
  assert max(errors.values()) <= TOLERANCE, errors


def test_autotokenizer_on_the_export_gives_bertjax_ids(trained, hf_export):
  tokenizer = tokenizer_lib.load_tokenizer(trained / "tokenizer")
  auto = transformers.AutoTokenizer.from_pretrained(str(hf_export))
  page = [s for doc in numbered_documents(40)[:8] for s in doc]
  assert auto(page)["input_ids"] == [[tokenizer.cls_id, *ids, tokenizer.sep_id] for ids in tokenizer.encode_batch(page)]


def test_transformers_to_bertjax_to_transformers_is_identical(tmp_path, hf_pretraining_folder):
  folder, model = hf_pretraining_folder
  result = import_hf.import_hf(folder, tmp_path / "imported")
  assert result.fresh_parameters == [] and "step 0" in result.summary()
  exported = export.export_hf(tmp_path / "imported", tmp_path / "out")
  tensors = safetensors.numpy.load_file(str(exported / "model.safetensors"))
  original = {k: v.numpy() for k, v in model.state_dict().items()}
  assert set(tensors) == set(original) - {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}
  for name, tensor in tensors.items():
    np.testing.assert_array_equal(tensor, original[name], err_msg=name)
  assert (exported / "vocab.txt").read_text() == (folder / "vocab.txt").read_text()


def test_bertjax_to_transformers_to_bertjax_is_identical(tmp_path, trained, hf_export):
  import_hf.import_hf(hf_export, tmp_path / "back")
  with checkpoint.Checkpoints(trained, read_only=True) as checkpoints:
    original, _ = checkpoints.restore_params()
  with checkpoint.Checkpoints(tmp_path / "back", read_only=True) as checkpoints:
    back, meta = checkpoints.restore_params()
  assert meta["step"] == 0
  assert meta["tokenizer_fingerprint"] == tokenizer_lib.load_tokenizer(trained / "tokenizer").fingerprint
  for path in (("embeddings", "word"), ("mlm_head", "output_bias")):
    padded = back[path[0]][path[1]]
    assert padded.shape[0] == 256 and (padded[VOCAB:] == 0).all()  # padding rows added back, as zeros
    original[path[0]][path[1]] = original[path[0]][path[1]][:VOCAB]
    back[path[0]][path[1]] = padded[:VOCAB]
  jax.tree.map(np.testing.assert_array_equal, back, original)


def test_a_plain_bert_model_imports_and_pretraining_continues(tmp_path, corpus, caplog):
  folder = tmp_path / "hf"
  model = _hf_folder(folder, transformers.BertModel, corpus, legacy_bin=True)
  result = import_hf.import_hf(folder, tmp_path / "run")
  assert result.fresh_parameters == [
    "mlm_head/output_bias",
    "mlm_head/transform_bias",
    "mlm_head/transform_kernel",
    "mlm_head/transform_norm/bias",
    "mlm_head/transform_norm/scale",
    "nsp_head/bias",
    "nsp_head/kernel",
  ]
  config = config_lib.read_config(tmp_path / "run")
  assert (config.model.hidden_size, config.model.num_heads, config.data.vocab_size) == (48, 3, VOCAB)

  # from_pretrained on the same folder: encode equals transformers' BertModel.
  ours, tokenizer = load.from_pretrained(folder)
  assert tokenizer.cls_id == 4
  auto = transformers.AutoTokenizer.from_pretrained(str(folder))
  ids, segments, mask, _ = _batch(auto, corpus)
  with torch.no_grad():
    reference = model(
      input_ids=torch.tensor(ids), token_type_ids=torch.tensor(segments), attention_mask=torch.tensor(mask)
    ).last_hidden_state.numpy()
  with jax.default_matmul_precision("highest"):
    hidden = np.asarray(ours.encode(ids, segments, mask))
    hidden_from_jax = np.asarray(
      ours.encode(jax.numpy.asarray(ids), jax.numpy.asarray(segments), jax.numpy.asarray(mask))
    )
  error = float(np.abs(hidden - reference)[mask == 1].max())
  print(f"\nfrom_pretrained(BertModel folder).encode vs BertModel max abs error: {error}")
  assert error <= TOLERANCE
  np.testing.assert_array_equal(hidden, hidden_from_jax)

  train_config = config_lib.read_config(tmp_path / "run")
  for override in TRAIN_OVERRIDES[len(MICRO) :] + [
    f"data.source=files:{corpus}/corpus.txt",
    f"data.cache_dir={tmp_path}/cache",
    "train.steps=2",
  ]:
    if not override.startswith("data.vocab_size"):
      config_lib.apply_override(train_config, override)
  with caplog.at_level(logging.INFO, logger="bertjax.train.pretrain"):
    result = pretrain.train(train_config, tmp_path / "run")
  assert "resumed from checkpoint step 0" in caplog.text
  assert int(result.state.step) == 2
  with checkpoint.Checkpoints(tmp_path / "run", read_only=True) as checkpoints:
    assert checkpoints.steps() == [0, 2]
  # Two small steps from the imported weights (random, ~0.1), not from a fresh init (zero biases).
  imported = model.state_dict()["pooler.dense.bias"].numpy()
  np.testing.assert_allclose(np.asarray(result.state.params["pooler"]["bias"]), imported, atol=0.02)


def test_params_export_and_from_pretrained_of_every_kind_agree(tmp_path, trained, hf_export):
  params_dir = export.export_params(trained, tmp_path / "params")
  params, _ = load.load_params_export(params_dir)
  with checkpoint.Checkpoints(trained, read_only=True) as checkpoints:
    original, _ = checkpoints.restore_params()
  jax.tree.map(np.testing.assert_array_equal, params, original)
  ids = np.array([[2, 40, 50, 60, 3, 0]])
  mask = (ids > 0).astype(np.int32)
  hidden = []
  for source in (trained, hf_export, params_dir):
    model, tokenizer = load.from_pretrained(source)
    assert tokenizer.vocab_size == VOCAB and model.config.dtype == "float32"
    with jax.default_matmul_precision("highest"):
      hidden.append(np.asarray(model.encode(ids, None, mask)))
  np.testing.assert_allclose(hidden[1], hidden[0], atol=1e-6)
  np.testing.assert_allclose(hidden[2], hidden[0], atol=1e-6)
  assert load.from_pretrained(hf_export, dtype="bfloat16")[0].config.dtype == "bfloat16"
  # A second export over the first replaces it; a foreign non-empty folder is refused.
  assert export.export(trained, "params", tmp_path / "params") == params_dir


def _one_line(error) -> str:
  message = str(error.value)
  assert "\n" not in message
  return message


def test_bad_inputs_are_one_clear_line(tmp_path, trained, hf_pretraining_folder):
  folder, _ = hf_pretraining_folder
  config = json.loads((folder / "config.json").read_text())

  def variant(name, *, config_changes=None, drop=()):
    bad = tmp_path / name
    bad.mkdir()
    for f in folder.iterdir():
      if f.name not in drop:
        (bad / f.name).write_bytes(f.read_bytes())
    if config_changes:
      (bad / "config.json").write_text(json.dumps({**config, **config_changes}))
    return bad

  cases = {
    "no-weights": (
      variant("no-weights", drop=("model.safetensors",)),
      "holds no model.safetensors or pytorch_model.bin",
    ),
    "no-config": (variant("no-config", drop=("config.json",)), "holds no config.json"),
    "roberta": (variant("roberta", config_changes={"model_type": "roberta"}), "model_type is 'roberta'"),
    "shapes": (variant("shapes", config_changes={"intermediate_size": 64}), r"shape \(96, 48\), expected \(64, 48\)"),
    "relu": (variant("relu", config_changes={"hidden_act": "relu"}), "hidden_act is 'relu'"),
    "no-tokenizer": (variant("no-tokenizer", drop=("vocab.txt",)), "holds no vocab.txt, tokenizer.json or spm.model"),
    "missing": (tmp_path / "nowhere", "no such folder"),
  }
  for name, (source, pattern) in cases.items():
    with pytest.raises(BertjaxError, match=pattern) as error:
      import_hf.import_hf(source, tmp_path / f"run-{name}")
    _one_line(error)
    assert not (tmp_path / f"run-{name}").exists(), name  # nothing half-written
    if name not in ("no-tokenizer",):
      with pytest.raises(BertjaxError, match=pattern):
        load.from_pretrained(source)

  (tmp_path / "occupied").mkdir()
  (tmp_path / "occupied" / "notes.txt").write_text("mine")
  with pytest.raises(BertjaxError, match="not empty") as error:
    import_hf.import_hf(folder, tmp_path / "occupied")
  _one_line(error)
  with pytest.raises(BertjaxError, match="not a bertjax export") as error:
    export.export_hf(trained, tmp_path / "occupied")
  _one_line(error)
  assert [p.name for p in (tmp_path / "occupied").iterdir()] == ["notes.txt"]
  with pytest.raises(BertjaxError, match="no checkpoints") as error:
    export.export_hf(_empty_run(tmp_path, trained), tmp_path / "e")
  _one_line(error)
  with pytest.raises(BertjaxError, match="--step 7: no such checkpoint"):
    export.export_hf(trained, tmp_path / "e", step=7)
  with pytest.raises(BertjaxError, match="--format onnx"):
    export.export(trained, "onnx")


def _sharded(folder, tmp_path, name="sharded") -> tuple:
  """The pretraining folder with its weights in two shards and an index, as save_pretrained
  writes large models."""
  sharded = tmp_path / name
  sharded.mkdir()
  for f in folder.iterdir():
    if f.name != "model.safetensors":
      (sharded / f.name).write_bytes(f.read_bytes())
  tensors = safetensors.numpy.load_file(str(folder / "model.safetensors"))
  names = sorted(tensors)
  weight_map = {}
  for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
    shard = f"model-0000{i + 1}-of-00002.safetensors"
    safetensors.numpy.save_file({n: tensors[n] for n in part}, str(sharded / shard))
    weight_map.update(dict.fromkeys(part, shard))
  (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
  return sharded, weight_map, tensors


def test_a_sharded_folder_reads_and_an_index_cannot_lead_outside_it(tmp_path, hf_pretraining_folder):
  folder, _ = hf_pretraining_folder
  sharded, weight_map, tensors = _sharded(folder, tmp_path)
  _, read = folders.read_hf_checkpoint(sharded)
  assert sorted(read) == sorted(tensors)
  for name, array in tensors.items():
    np.testing.assert_array_equal(read[name], array)

  outside = tmp_path / "outside.safetensors"
  outside.write_bytes((sharded / "model-00001-of-00002.safetensors").read_bytes())
  (sharded / "link.safetensors").symlink_to(outside)
  (sharded / "a-folder.safetensors").mkdir()
  os.mkfifo(sharded / "a-pipe.safetensors")  # reading it would block for ever
  first = next(iter(weight_map))
  index = sharded / "model.safetensors.index.json"
  cases = {
    str(outside): "is not a file name inside the folder",
    "../outside.safetensors": "is not a file name inside the folder",
    "sub/../../outside.safetensors": "is not a file name inside the folder",
    "link.safetensors": f"leads outside the folder \\(to {outside}\\)",
    "a-folder.safetensors": "is not a regular file",
    "a-pipe.safetensors": "is not a regular file",
    "missing.safetensors": "does not exist",
  }
  for shard, problem in cases.items():
    index.write_text(json.dumps({"weight_map": {**weight_map, first: shard}}))
    with pytest.raises(BertjaxError, match=rf"names the shard '{re.escape(shard)}', which {problem}") as error:
      folders.read_hf_checkpoint(sharded)
    _one_line(error)
  for broken in ("{not json", json.dumps({"metadata": {}}), json.dumps({"weight_map": ["a.safetensors"]}), "[]"):
    index.write_text(broken)
    with pytest.raises(BertjaxError, match="has no weight_map of tensor names to shard files") as error:
      folders.read_hf_checkpoint(sharded)
    _one_line(error)
    with pytest.raises(BertjaxError, match="has no weight_map"):
      import_hf.import_hf(sharded, tmp_path / "run-broken")
    assert not (tmp_path / "run-broken").exists()


def _empty_run(tmp_path, trained):
  """A workdir with config and tokenizer but no checkpoints yet."""
  run = tmp_path / "empty-run"
  run.mkdir()
  (run / "config.json").write_bytes((trained / "config.json").read_bytes())
  tokenizer_lib.load_tokenizer(trained / "tokenizer").save(run / "tokenizer")
  return run
