"""The extractive-QA family: SQuAD questions read in context windows, scored by the official scripts.

    FAMILY   prepare: `squad.read_questions` in windows (train: answers in their context only);
             score: n-best span decoding (`answers`), exact match and F1 (SQuAD 2.0: with the
             HasAns/NoAns parts); extras: the answers and null odds the run writes

The answers follow google-research/bert's run_squad.py; the scores, the official evaluation scripts.
"""

from bertjax import tasks
from bertjax.finetune import answers, metrics, squad
from bertjax.finetune.family import Data, Family, no_train


def prepare(config, tokenizer, with_train: bool) -> Data:
  f = config.finetune
  window = dict(max_seq_len=f.max_seq_len, doc_stride=f.doc_stride, max_query_len=f.max_query_len)
  train = no_train(f.max_seq_len)
  if with_train:
    source, train_questions = squad.read_questions(config, "train")
    train_questions = squad.answerable_in_context(train_questions, source)
    train = squad.windows(train_questions, tokenizer, **window, with_labels=True)
  _, dev_questions = squad.read_questions(config, "dev")
  dev = squad.windows(dev_questions, tokenizer, **window, with_labels=False)
  return Data(tasks.resolve(config), tokenizer, train, {"dev": dev}, {"dev": dev_questions})


def score(config, spec, dev, questions, outputs) -> tuple[dict[str, float], dict]:
  f = config.finetune
  found, null_odds = answers.decode(
    questions,
    dev,
    outputs["start_logits"],
    outputs["end_logits"],
    n_best=f.n_best,
    max_answer_len=f.max_answer_len,
    squad_v2=f.squad_v2,
    null_score_threshold=f.null_score_threshold,
  )
  gold = [{"id": q.id, "answers": q.answers} for q in questions]
  scores = metrics.squad_v2(gold, found) if f.squad_v2 else metrics.squad_v1(gold, found)
  return scores, {"predictions": found, "null_odds": null_odds}


FAMILY = Family(prepare, score)
