"""Token classification (NER): conlleval's entity scores on hand-computed cases, a tag on each word's
first sub-token only, CoNLL and .jsonl files and their bad lines, and the entity task of
tests/support/finetune_families.py learned and exported to
transformers' BertForTokenClassification with bertjax's logits (its eval and resume: test_families.py)."""

import json

import jax
import numpy as np
import pytest

from bertjax.cli import main as cli
from bertjax.data import tokenizer as tokenizer_lib
from bertjax.errors import BertjaxError
from bertjax.finetune import entities, job, ner
from bertjax.finetune import run as run_lib
from bertjax.metrics import writer
from tests.support.finetune_families import ner_task_config

TOLERANCE = 1e-4  # what the export promises (tests/finetune/test_export.py)


# -- conlleval -------------------------------------------------------------------------------------
def _scores(gold, predicted):
  return {k: round(v, 4) for k, v in entities.conlleval(gold, predicted).items()}


def test_identical_tags_score_100():
  tags = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG"]]
  assert _scores(tags, tags) == {"precision": 100.0, "recall": 100.0, "f1": 100.0, "accuracy": 100.0}


def test_an_entity_is_right_only_with_both_boundaries_and_its_type():
  gold = [["B-PER", "I-PER", "O", "B-LOC", "O", "B-ORG"]]
  # (PER 0-1) right; (LOC 3) predicted ORG: wrong type; (ORG 5) right.
  assert _scores(gold, [["B-PER", "I-PER", "O", "B-ORG", "O", "B-ORG"]]) == {
    "precision": 66.6667,
    "recall": 66.6667,
    "f1": 66.6667,
    "accuracy": 83.3333,
  }
  # A boundary one token short: the one entity is wrong, though two of three tags are right.
  assert _scores([["B-PER", "I-PER", "O"]], [["B-PER", "O", "O"]]) == {
    "precision": 0.0,
    "recall": 0.0,
    "f1": 0.0,
    "accuracy": 66.6667,
  }


def test_an_i_of_another_type_starts_an_entity():
  assert entities.chunks(["B-PER", "I-LOC", "I-LOC"]) == [("PER", 0, 0), ("LOC", 1, 2)]
  # Predicted: PER 0 and LOC 1 (two entities), gold PER 0-1: none right; 1 of 2 tags right.
  assert _scores([["B-PER", "I-PER"]], [["B-PER", "I-LOC"]]) == {
    "precision": 0.0,
    "recall": 0.0,
    "f1": 0.0,
    "accuracy": 50.0,
  }


def test_an_i_after_o_starts_an_entity_as_conlleval_reads_it():
  assert entities.chunks(["O", "I-PER", "I-PER", "O", "I-LOC"]) == [("PER", 1, 2), ("LOC", 4, 4)]
  # The entities match although the tags differ (I- where the gold has B-): entity scores 100,
  # token accuracy 2/3.
  assert _scores([["O", "B-PER", "I-PER"]], [["O", "I-PER", "I-PER"]]) == {
    "precision": 100.0,
    "recall": 100.0,
    "f1": 100.0,
    "accuracy": 66.6667,
  }


def test_no_entity_crosses_a_sentence_boundary_and_none_found_scores_0():
  # Across a boundary, B-PER | I-PER are two entities (one, were it a sentence): as B-PER | B-PER.
  assert _scores([["B-PER"], ["I-PER"]], [["B-PER"], ["B-PER"]]) == {
    "precision": 100.0,
    "recall": 100.0,
    "f1": 100.0,
    "accuracy": 50.0,
  }
  assert _scores([["B-PER", "O"], ["I-PER"]], [["O", "O"], ["O"]]) == {
    "precision": 0.0,
    "recall": 0.0,
    "f1": 0.0,
    "accuracy": 33.3333,
  }


def test_iob1_and_iob2_tags_of_the_same_entities():
  """IOB1 starts an entity with I- (B- only right after one of its type), IOB2 with B-. conlleval
  reads either by the same rules, so to_scheme rewrites one into the other and keeps the entities;
  the same tags, though, are different tags in the two schemes."""
  iob1 = ["I-PER", "I-PER", "B-PER", "O", "I-LOC", "I-ORG"]
  iob2 = ["B-PER", "I-PER", "B-PER", "O", "B-LOC", "B-ORG"]
  expected = [("PER", 0, 1), ("PER", 2, 2), ("LOC", 4, 4), ("ORG", 5, 5)]
  assert entities.chunks(iob1) == entities.chunks(iob2) == expected
  assert entities.to_scheme(iob1, "iob2") == iob2 and entities.to_scheme(iob2, "iob1") == iob1
  assert entities.to_scheme(iob1, "iob1") == iob1 and entities.to_scheme(iob2, "iob2") == iob2
  # Scored against IOB2 gold, IOB1 predictions of the same entities are right entity by entity,
  # not tag by tag.
  assert _scores([iob2], [iob1])["f1"] == 100.0 and _scores([iob2], [iob1])["accuracy"] == 50.0


# -- files and features ----------------------------------------------------------------------------
def test_conll_columns_and_jsonl_read_alike_and_the_tags_come_in_first_seen_order(tmp_path):
  conll = tmp_path / "train.txt"
  conll.write_text(
    "-DOCSTART- -X- -X- O\n\nriver NNP I-NP I-LOC\nmill NNP I-NP I-LOC\nplay VB I-VP O\n\n"
    "children NNS I-NP I-PER\n\n-DOCSTART- -X- -X- O\n\nsongs NNS I-NP O\n"
  )
  jsonl = tmp_path / "train.jsonl"
  rows = [(["river", "mill", "play"], ["B-LOC", "I-LOC", "O"]), (["children"], ["B-PER"]), (["songs"], ["O"])]
  jsonl.write_text("".join(json.dumps({"tokens": t, "tags": g}) + "\n" for t, g in rows))
  from_conll, from_jsonl = ner.read_sentences(conll, "iob2"), ner.read_sentences(jsonl, "iob2")
  assert [(s.words, s.tags) for s in from_conll] == [(tuple(t), tuple(g)) for t, g in rows]
  assert [(s.words, s.tags) for s in from_jsonl] == [(tuple(t), tuple(g)) for t, g in rows]
  assert from_conll[1].where == f"{conll} line 7" and from_jsonl[1].where == f"{jsonl} line 2"
  assert ner.tag_set((), from_conll) == ("O", "B-LOC", "I-LOC", "B-PER")
  assert ner.tag_set(("O", "B-PER", "I-PER", "B-LOC", "I-LOC"), from_conll)[1] == "B-PER"  # declared: as given
  assert ner.read_sentences(conll, "iob1")[0].tags == ("I-LOC", "I-LOC", "O")


@pytest.fixture(scope="module")
def tokenizer(pretrained):
  return tokenizer_lib.load_tokenizer(pretrained / "tokenizer")


def test_a_tag_goes_on_a_words_first_piece_only(tokenizer, whole_words):
  split_word = whole_words[3] + whole_words[4]
  pieces = tokenizer.encode(split_word)
  assert len(pieces) >= 2, pieces  # the word the test is about is split
  sentence = ner.Sentence(("river", split_word, "mill"), ("B-PER", "B-MISC", "O"), "test line 1")
  tags = ("O", "B-PER", "B-MISC")
  features, cut = ner.encode_sentences([sentence], tags, tokenizer, 12)
  row = [tokenizer.cls_id, *tokenizer.encode("river"), *pieces, *tokenizer.encode("mill"), tokenizer.sep_id]
  assert cut == 0 and features["input_ids"][0, : len(row)].tolist() == row
  assert (features["input_ids"][0, len(row) :] == tokenizer.pad_id).all()
  firsts = [1, 2, 2 + len(pieces)]  # river, the split word's first piece, mill
  assert np.flatnonzero(features["label_weights"][0]).tolist() == firsts  # not [CLS], later pieces, [SEP], padding
  assert features["tag_ids"][0, firsts].tolist() == [1, 2, 0]
  assert features["attention_mask"][0].sum() == len(row) and not features["segment_ids"].any()


def test_the_loss_reads_first_pieces_of_real_rows_only():
  from bertjax.finetune.task import loss_sums
  from bertjax.tasks import TaskSpec

  spec = TaskSpec("ner", "ner", ("O", "B-PER", "I-PER"))
  logits_BxLxC = jax.random.normal(jax.random.key(0), (3, 5, 3))
  weights_BxL = np.array([[0, 1, 0, 1, 0], [0, 1, 1, 0, 0], [0, 1, 0, 0, 0]], np.float32)
  batch = {
    "tag_ids": np.ones((3, 5), np.int32),
    "label_weights": weights_BxL,
    "weights": np.array([1, 1, 0], np.float32),
  }
  sums = loss_sums(spec, logits_BxLxC, batch)
  assert float(sums["weight_sum"]) == 4  # two words in row 0, two in row 1; row 2 is padding
  changed = {**batch, "tag_ids": np.where(weights_BxL * batch["weights"][:, None] > 0, 1, 2).astype(np.int32)}
  for k in ("loss_sum", "weight_sum", "correct_sum"):  # tags under weight 0 change nothing
    assert float(loss_sums(spec, logits_BxLxC, changed)[k]) == float(sums[k])


def test_a_long_sentence_keeps_the_whole_words_that_fit_and_the_cut_ones_score_as_o(tokenizer, whole_words):
  words = tuple(whole_words[:6])
  sentence = ner.Sentence(words, ("B-PER",) + ("O",) * 4 + ("B-PER",), "test line 1")
  features, cut = ner.encode_sentences([sentence], ("O", "B-PER"), tokenizer, 6)  # [CLS] 4 words [SEP]
  assert cut == 2 and features["label_weights"][0].sum() == 4
  predicted = ner.predicted_tags(_spec(), features, features["tag_ids"], [sentence])
  assert predicted == [["B-PER", "O", "O", "O", "O", "O"]]  # the last entity was cut: predicted O


def _spec():
  from bertjax.tasks import TaskSpec

  return TaskSpec("ner", "ner", ("O", "B-PER"))


def test_bad_lines_are_one_line_naming_file_and_line(tmp_path, pretrained, family_files, capsys):
  conll = tmp_path / "bad.conll"
  conll.write_text("river NNP I-NP B-LOC\nmill\n")
  with pytest.raises(BertjaxError, match=f"^{conll} line 2: 'mill' has no tag; a CoNLL line is TOKEN ... TAG"):
    ner.read_sentences(conll, "iob2")
  jsonl = tmp_path / "bad.jsonl"
  jsonl.write_text('{"tokens": ["river"], "tags": ["O"]}\n{"tokens": ["river", "mill"], "tags": ["O", "O", "O"]}\n')
  with pytest.raises(BertjaxError, match=f"^{jsonl} line 2: 2 tokens but 3 tags; give one tag per token"):
    ner.read_sentences(jsonl, "iob2")
  workdir = tmp_path / "run"
  args = ["finetune", "--task", "ner", "--config", "configs/finetune/ner.py", "--init", str(pretrained)]
  args += ["--workdir", str(workdir), f"--config.finetune.train_file={jsonl}"]
  args += [f"--config.finetune.dev_file={family_files}/entities-dev.jsonl", "--config.finetune.max_seq_len=24"]
  assert cli.main(args) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err == [
    f"bertjax: error: {jsonl} line 2: 2 tokens but 3 tags; give one tag per token (two lists of one length)"
  ]
  assert not workdir.exists()


def test_a_tag_outside_the_tags_names_its_sentence(tokenizer, tmp_path):
  dev = tmp_path / "dev.jsonl"
  dev.write_text('{"tokens": ["river"], "tags": ["O"]}\n{"tokens": ["mill"], "tags": ["B-ORG"]}\n')
  with pytest.raises(BertjaxError, match=f"^{dev} line 2: tag 'B-ORG' is not one of the tags \\(O, B-PER\\); declare"):
    ner.encode_sentences(ner.read_sentences(dev, "iob2"), ("O", "B-PER"), tokenizer, 8)


def test_config_values_ner_cannot_use_are_refused(pretrained, family_files):
  with pytest.raises(BertjaxError, match="config finetune.tag_scheme='bio' is not supported; choose one of iob2, iob1"):
    ner_task_config(pretrained, family_files, "finetune.tag_scheme=bio")
  with pytest.raises(BertjaxError, match="config finetune.data='hf:conll2003' is not read by --task ner; set finetune"):
    ner_task_config(pretrained, family_files, "finetune.data=hf:conll2003")
  with pytest.raises(BertjaxError, match="config finetune.labels=tag 'PER' is neither O nor B-TYPE / I-TYPE"):
    ner_task_config(pretrained, family_files, "finetune.labels=O,PER")


# -- the entity task -------------------------------------------------------------------------------
def test_the_entity_task_is_learned(ner_run):
  config, workdir, result = ner_run
  final = result.final
  assert final["f1"] >= 80 and final["recall"] >= 90 and final["accuracy"] >= 90, final  # all O: f1 0
  data = run_lib.prepare(config)
  assert data.spec.labels[0] == "O" and set(data.spec.labels) == {"O", "B-PER", "B-LOC", "I-LOC", "B-MISC"}
  evals = [r for r in writer.read_metrics(workdir) if r["split"] == "eval"]
  assert [r["epoch"] for r in evals] == [1.0, 2.0, 3.0] and evals[-1]["f1"] == final["f1"]
  assert json.loads((workdir / job.RESULTS_FILE).read_text()) == {"step": result.state.step, "task": "ner", **final}


def test_the_token_classifier_exports_as_bert_for_token_classification(ner_run, whole_words):
  from tests.support.extras import require

  torch, transformers = require("torch"), require("transformers")
  from bertjax.hf import load

  _, workdir, _ = ner_run
  assert cli.main(["export", "--workdir", str(workdir), "--format", "hf"]) == 0
  folder = workdir / "export" / "hf"
  hf_config = json.loads((folder / "config.json").read_text())
  ours, tokenizer, spec = load.load_finetuned(workdir)
  assert hf_config["architectures"] == ["BertForTokenClassification"]
  assert hf_config["id2label"] == {str(i): t for i, t in enumerate(spec.labels)}
  assert hf_config["label2id"] == {t: i for i, t in enumerate(spec.labels)}
  model, info = transformers.BertForTokenClassification.from_pretrained(folder, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
  texts = [" ".join(whole_words[:5]), whole_words[3] + whole_words[4] + " " + whole_words[1]]
  tokens = hf_tokenizer(texts, return_tensors="pt", padding=True)
  arrays = tuple(tokens[k].numpy() for k in ("input_ids", "token_type_ids", "attention_mask"))
  assert arrays[0][0][1:6].tolist() == tokenizer.encode(texts[0])  # both tokenizers agree
  with torch.no_grad():
    expected = model.eval()(**tokens).logits.numpy()
  with jax.default_matmul_precision("highest"):
    got = np.asarray(ours(*arrays))
  assert got.shape == expected.shape == (2, arrays[0].shape[1], len(spec.labels))
  real = arrays[2] == 1
  np.testing.assert_allclose(got[real], expected[real], atol=TOLERANCE, rtol=0)
