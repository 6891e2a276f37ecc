"""SQuAD: token offsets back to the context's characters, windows with a document stride, n-best
decoding, the null-score threshold, and reading SQuAD files (bad ones included)."""

import json
import logging
import unicodedata

import numpy as np
import pytest

from bertjax.config import loading
from bertjax.data import tokenizer as tokenizer_lib
from bertjax.errors import BertjaxError
from bertjax.finetune import answers, metrics, squad
from tests.support.corpora import numbered_documents

TEXT = "  Café  naïve RIVER,  ｆｕｌｌ-width 123!  The mill's wheel."


def test_sentencepiece_offsets_cover_each_pieces_own_characters(micro_tokenizer):
  [(ids, spans)] = micro_tokenizer.encode_with_offsets([TEXT])
  assert ids == micro_tokenizer.encode(TEXT)
  ends = [0]
  for i, (start, end) in zip(ids, spans):
    assert ends[-1] <= start <= end and not TEXT[start : end or start + 1][:1].isspace()
    piece = micro_tokenizer.id_to_piece(i).lstrip("\u2581")
    if piece and i != micro_tokenizer.unk_id:  # the model folds case and width (NFKC) itself
      assert unicodedata.normalize("NFKC", TEXT[start:end]).casefold() == piece
    ends.append(end)


def test_wordpiece_offsets_cover_each_pieces_own_characters(tmp_path):
  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "cafe", "na", "##ive", "river", ",", "123", "!", "the"]
  vocab += ["mill", "'", "s", "wheel", ".", "-", "width"]
  (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
  tokenizer = tokenizer_lib.from_vocab_txt(tmp_path / "vocab.txt", lowercase=True)
  [(ids, spans)] = tokenizer.encode_with_offsets([TEXT])
  assert ids == tokenizer.encode(TEXT)
  pieces = [(tokenizer.id_to_piece(i), TEXT[s:e]) for i, (s, e) in zip(ids, spans)]
  assert pieces[:5] == [("cafe", "Café"), ("na", "na"), ("##ive", "ïve"), ("river", "RIVER"), (",", ",")]
  assert ("[UNK]", "ｆｕｌｌ") in pieces and ("wheel", "wheel") in pieces


@pytest.fixture(scope="module")
def whole(micro_tokenizer) -> list[str]:
  corpus_words = {w for doc in numbered_documents(60) for s in doc for w in s.rstrip(".").split()}
  return sorted(w for w in corpus_words if w.isalpha() and w.islower() and len(micro_tokenizer.encode(w)) == 1)


def _question(words, answer_at: int, n_words: int = 30) -> squad.Question:
  """A context of one-piece words with the answer "X, Y" (capitalised) at word `answer_at`."""
  tokens = [words[2 + i % (len(words) - 2)] for i in range(n_words)]
  tokens[answer_at], tokens[answer_at + 1] = words[0].capitalize() + ",", words[1].upper()
  context = " ".join(tokens)
  answer = f"{tokens[answer_at]} {tokens[answer_at + 1]}"
  return squad.Question("q", words[0], context, (answer,), (context.index(answer),))


def test_an_answer_cut_by_one_window_is_whole_in_the_next(micro_tokenizer, whole):
  # 16 tokens: [CLS] question(1) [SEP] 12 context tokens [SEP]; windows start at 0, 4, 8, ...
  # The answer "X, Y" is three tokens (X , Y) at tokens 10-12: the first window ends at token 11.
  q = _question(whole, answer_at=10)
  [(ids, _)] = micro_tokenizer.encode_with_offsets([q.context])
  assert len(ids) == 31  # 30 one-piece words and the comma
  f = squad.windows([q], micro_tokenizer, max_seq_len=16, doc_stride=4, max_query_len=8, with_labels=True)
  assert len(f["input_ids"]) == 6 and (f["example_index"] == 0).all()  # windows start at 0, 4, ..., 20
  assert f["start_positions"][0] == f["end_positions"][0] == 0  # cut: not in this window
  start, end = f["start_positions"][1], f["end_positions"][1]
  assert (start, end) == (10 - 4 + 3, 12 - 4 + 3)  # context tokens follow [CLS] question [SEP]
  offsets = f["offsets"][1]
  assert q.context[offsets[start, 0] : offsets[end, 1]] == q.answers[0]
  # Every context token is the max-context token of exactly one window.
  owners = np.zeros(len(ids), int)
  for w, (window_offsets, best) in enumerate(zip(f["offsets"], f["max_context"])):
    context_positions = np.flatnonzero(window_offsets[:, 0] >= 0)
    assert (f["segment_ids"][w][context_positions] == 1).all()
    for position in context_positions[best[context_positions]]:
      owners[4 * w + position - 3] += 1
  assert (owners == 1).all()


def _logits(f, base: float = -10.0):
  return np.full(f["input_ids"].shape, base, np.float32), np.full(f["input_ids"].shape, base, np.float32)


def _peaked(f, window: int, start: int, end: int, strength: float = 8.0):
  starts, ends = _logits(f)
  starts[window, start] = ends[window, end] = strength
  return starts, ends


def test_decoding_maps_the_best_span_back_to_the_original_characters(micro_tokenizer, whole):
  q = _question(whole, answer_at=10)
  f = squad.windows([q], micro_tokenizer, 16, 4, 8, with_labels=True)
  starts, ends = _peaked(f, 1, f["start_positions"][1], f["end_positions"][1])
  starts[1, 7] = ends[1, 7] = 3.0  # token 8 alone: a weaker span, which window 1 sees best
  decode = lambda n: answers.decode(
    [q], f, starts, ends, n_best=5, max_answer_len=n, squad_v2=False, null_score_threshold=0
  )
  assert decode(5)[0] == {"q": q.answers[0]}  # "X, Y" exactly as the context writes it
  o = f["offsets"][1]
  assert decode(2)[0] == {"q": q.context[o[7, 0] : o[7, 1]]}  # the answer's 3 tokens exceed 2


def test_spans_in_the_question_backwards_or_outside_their_max_context_are_not_answers(micro_tokenizer, whole):
  q = _question(whole, answer_at=10)
  f = squad.windows([q], micro_tokenizer, 16, 4, 8, with_labels=True)
  starts, ends = _logits(f, base=-20.0)
  starts[:, 1] = ends[:, 1] = 50.0  # the question's token
  starts[:, 0] = ends[:, 0] = 40.0  # [CLS]
  starts[0, 8], ends[0, 6] = 30.0, 30.0  # an end before its start
  starts[0, 14], ends[0, 14] = 25.0, 25.0  # token 11: window 1 sees it with more context than window 0
  starts[2, 9], ends[2, 10] = 10.0, 10.0  # tokens 14-15, best seen by window 2: the answer
  found, _ = answers.decode([q], f, starts, ends, n_best=20, max_answer_len=5, squad_v2=False, null_score_threshold=0)
  assert not f["max_context"][0, 14] and f["max_context"][2, 9]
  o = f["offsets"][2]
  assert found == {"q": q.context[o[9, 0] : o[10, 1]]}


def test_the_null_score_threshold_decides_squad_v2s_no_answer(micro_tokenizer, whole):
  q = _question(whole, answer_at=2, n_words=8)
  f = squad.windows([q], micro_tokenizer, 32, 8, 8, with_labels=True)
  assert len(f["input_ids"]) == 1
  starts, ends = _peaked(f, 0, f["start_positions"][0], f["end_positions"][0], strength=4.0)
  starts[0, 0], ends[0, 0] = 3.0, 3.0  # null score 6 vs the span's 8: difference -2
  decode = lambda **kw: answers.decode([q], f, starts, ends, n_best=5, max_answer_len=5, **kw)
  found, odds = decode(squad_v2=True, null_score_threshold=0.0)
  assert found == {"q": q.answers[0]} and odds["q"] == pytest.approx(-2.0)
  assert decode(squad_v2=True, null_score_threshold=-3.0)[0] == {"q": ""}
  assert decode(squad_v2=False, null_score_threshold=-3.0)[0] == {"q": q.answers[0]}  # v1 always answers


# -- reading SQuAD files --------------------------------------------------------------------------
def _squad_file(path, qas, context="The old mill stands by the river."):
  path.write_text(
    json.dumps({"version": "1.1", "data": [{"title": "t", "paragraphs": [{"context": context, "qas": qas}]}]})
  )


def _config(tmp_path, *extra):
  return loading.load_config(
    "configs/finetune/squad.py",
    [
      "finetune.init=/nowhere",
      f"finetune.train_file={tmp_path}/train.json",
      f"finetune.dev_file={tmp_path}/dev.json",
      *extra,
    ],
  )


def test_reading_squad_files_and_skipping_answers_that_are_not_in_their_context(tmp_path, caplog):
  qas = [
    {"id": "1", "question": "what stands?", "answers": [{"text": "old mill", "answer_start": 4}]},
    {"id": "2", "question": "where?", "answers": [{"text": "the river", "answer_start": 2}]},  # wrong offset
    {"id": "3", "question": "what?", "answers": [{"text": "a barn", "answer_start": 4}]},  # not there at all
  ]
  _squad_file(tmp_path / "train.json", qas)
  source, questions = squad.read_questions(_config(tmp_path), "train")
  assert [q.id for q in questions] == ["1", "2", "3"] and questions[0].answer_starts == (4,)
  with caplog.at_level(logging.WARNING):
    kept = squad.answerable_in_context(questions, source)
  assert [q.id for q in kept] == ["1"]
  reports = [r.getMessage() for r in caplog.records if "not in their context" in r.getMessage()]
  assert reports == [
    f"{tmp_path}/train.json: 2 of 3 questions have an answer that is not in their context at its "
    "answer_start; skipped them"
  ]


@pytest.mark.parametrize(
  "qas, extra, message",
  [
    ([], [], "holds no questions"),
    (
      [{"id": "1", "question": "?", "answers": [], "is_impossible": True}],
      [],
      "has unanswerable questions (SQuAD 2.0): set finetune.squad_v2=true",
    ),
    (
      [{"id": "q7", "answers": [{"text": "x", "answer_start": 0}]}],
      [],
      "article 0 paragraph 0 question q7 has no 'question'; give a SQuAD-format file",
    ),
    (
      [{"id": "q8", "question": "?", "answers": [{"text": "x", "answer_start": "abc"}]}],
      [],
      "article 0 paragraph 0 question q8 has an answer without a whole-number answer_start and a text",
    ),
  ],
)
def test_bad_squad_files_are_one_line(tmp_path, qas, extra, message):
  _squad_file(tmp_path / "train.json", qas)
  with pytest.raises(BertjaxError) as e:
    squad.read_questions(_config(tmp_path, *extra), "train")
  assert message in str(e.value) and str(tmp_path / "train.json") in str(e.value) and "\n" not in str(e.value)


def test_no_answer_in_any_context_and_a_missing_or_broken_file(tmp_path):
  _squad_file(tmp_path / "train.json", [{"id": "1", "question": "?", "answers": [{"text": "x", "answer_start": 0}]}])
  source, questions = squad.read_questions(_config(tmp_path), "train")
  with pytest.raises(BertjaxError, match="no answer is in its context at its answer_start"):
    squad.answerable_in_context(questions, source)
  with pytest.raises(BertjaxError, match="dev_file=.*dev.json does not exist"):
    squad.read_questions(_config(tmp_path), "dev")
  (tmp_path / "dev.json").write_text("[1, 2]")
  with pytest.raises(BertjaxError, match="is not a SQuAD JSON file"):
    squad.read_questions(_config(tmp_path), "dev")


def test_a_squad_2_file_whose_answers_are_all_misplaced_is_refused_not_trained_on_its_unanswerables(tmp_path):
  qas = [
    {"id": "1", "question": "?", "answers": [{"text": "old mill", "answer_start": 9}]},  # wrong offset
    {"id": "2", "question": "?", "answers": []},
  ]
  _squad_file(tmp_path / "train.json", qas)
  source, questions = squad.read_questions(_config(tmp_path, "finetune.squad_v2=true"), "train")
  with pytest.raises(BertjaxError) as e:
    squad.answerable_in_context(questions, source)
  assert str(e.value).startswith(f"{tmp_path}/train.json: no answer is in its context at its answer_start (the file")


def test_answerability_is_the_official_scripts_a_question_with_answers_has_one(tmp_path):
  """evaluate-v2.0.py decides by whether `answers` is empty; `is_impossible` may say otherwise."""
  qas = [
    {
      "id": "says-impossible",
      "question": "?",
      "answers": [{"text": "old mill", "answer_start": 4}],
      "is_impossible": True,
    },
    {"id": "says-possible", "question": "?", "answers": [], "is_impossible": False},
  ]
  _squad_file(tmp_path / "dev.json", qas)
  _, questions = squad.read_questions(_config(tmp_path, "finetune.squad_v2=true"), "dev")
  assert {q.id: q.answers for q in questions} == {"says-impossible": ("old mill",), "says-possible": ()}
  gold = [{"id": q.id, "answers": list(q.answers)} for q in questions]
  scores = metrics.squad_v2(gold, {"says-impossible": "old mill", "says-possible": ""})
  assert scores["exact"] == 100.0 and scores["HasAns_total"] == 1 and scores["NoAns_total"] == 1


def test_a_squad_file_that_is_not_utf8_is_one_line(tmp_path):
  (tmp_path / "dev.json").write_bytes(b'{"data": [{"paragraphs": [{"context": "caf\xe9"}]}]}')
  with pytest.raises(BertjaxError) as e:
    squad.read_questions(_config(tmp_path), "dev")
  assert str(e.value) == f"{tmp_path}/dev.json is not UTF-8 text (byte 42); save it as UTF-8"


def test_a_run_reads_its_windows_with_the_configured_stride_and_question_length(
  pretrained, task_files, whole_words, tmp_path
):
  """doc_stride and max_query_len given different values (5 and 6): each context's window w starts
  at its context token 5 w, and every question (ten words here) is cut to 6 tokens, as a run
  prepares them."""
  from bertjax.finetune import run as run_lib
  from tests.support.finetune import squad_task_config

  squad_json = json.loads((task_files / "squad-dev.json").read_text())
  for article in squad_json["data"]:
    for paragraph in article["paragraphs"]:
      for qa in paragraph["qas"]:
        qa["question"] = " ".join(whole_words[2:12])
  (tmp_path / "dev.json").write_text(json.dumps(squad_json))
  config = squad_task_config(
    pretrained,
    task_files,
    f"finetune.dev_file={tmp_path}/dev.json",
    "finetune.doc_stride=5",
    "finetune.max_query_len=6",
  )
  data = run_lib.prepare(config, with_train=False)
  dev, questions, tokenizer = data.dev["dev"], data.questions["dev"], data.tokenizer
  sep = np.argmax(dev["input_ids"] == tokenizer.sep_id, axis=1)  # the first [SEP] ends the question
  assert sep.max() - 1 == 6  # the longest question is cut to max_query_len tokens
  checked = 0
  for i, q in enumerate(questions):
    rows = np.flatnonzero(dev["example_index"] == i)
    _, char_spans = tokenizer.encode_with_offsets([q.context])[0]
    context_starts = [start for start, _ in np.asarray(char_spans).reshape(-1, 2)]
    for w, row in enumerate(rows):
      first = sep[row] + 1  # the window's first context token
      assert dev["offsets"][row][first][0] == context_starts[5 * w]
      checked += 1
  assert checked > len(questions)  # contexts need several windows
