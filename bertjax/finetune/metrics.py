"""The official metrics: GLUE's per task, and SQuAD's exact match and F1 as its evaluation scripts.

    classification(names, predictions, labels)   accuracy, f1, matthews (of integer classes)
    regression(names, predictions, targets)      pearson, spearman
    squad_v1(questions, predictions)             exact_match and f1, as evaluate-v1.1.py
    squad_v2(questions, predictions)             exact and f1 with HasAns/NoAns parts, as evaluate-v2.0.py

All values are fractions in [0, 1] (correlations in [-1, 1]) except SQuAD's, which the official
scripts report in percent and so does this module. GLUE's F1 is binary, of class 1 (MRPC's
"equivalent", QQP's "duplicate"); Matthews correlation is scikit-learn's; the correlations are
scipy's. The SQuAD functions follow the scripts line by line, normalisation included (lower case,
punctuation and the articles a/an/the removed, whitespace collapsed): a score that differs from
theirs would not be comparable with any published one.
"""

import collections
import re
import string
from collections.abc import Mapping, Sequence

import numpy as np


def _accuracy(pred: np.ndarray, gold: np.ndarray) -> float:
  return float(np.mean(pred == gold)) if len(gold) else 0.0


def _f1(pred: np.ndarray, gold: np.ndarray) -> float:
  tp = float(np.sum((pred == 1) & (gold == 1)))
  fp = float(np.sum((pred == 1) & (gold != 1)))
  fn = float(np.sum((pred != 1) & (gold == 1)))
  return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def _matthews(pred: np.ndarray, gold: np.ndarray) -> float:
  """Matthews correlation from the confusion matrix (scikit-learn's multiclass formula; for two
  classes it is (tp tn - fp fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn))); 0 when undefined."""
  classes = np.union1d(pred, gold)
  confusion = np.zeros((len(classes), len(classes)))
  np.add.at(confusion, (np.searchsorted(classes, gold), np.searchsorted(classes, pred)), 1)
  t, p = confusion.sum(1), confusion.sum(0)  # per class: true and predicted counts
  c, s = np.trace(confusion), confusion.sum()
  denominator = np.sqrt((s * s - p @ p) * (s * s - t @ t))
  return float((c * s - t @ p) / denominator) if denominator else 0.0


_CLASSIFICATION = {"accuracy": _accuracy, "f1": _f1, "matthews": _matthews}


def classification(names: Sequence[str], predictions, labels) -> dict[str, float]:
  """Each of `names` (accuracy, f1, matthews) for predicted and gold class ids."""
  pred, gold = np.asarray(predictions), np.asarray(labels)
  return {name: _CLASSIFICATION[name](pred, gold) for name in names}


def regression(names: Sequence[str], predictions, targets) -> dict[str, float]:
  """Each of `names` (pearson, spearman) between predicted and gold values (0 when a side is
  constant, where a correlation is undefined)."""
  from scipy import stats  # only regression needs it

  pred, gold = np.asarray(predictions, np.float64), np.asarray(targets, np.float64)
  if len(gold) < 2 or np.ptp(pred) == 0 or np.ptp(gold) == 0:
    return {name: 0.0 for name in names}
  functions = {"pearson": stats.pearsonr, "spearman": stats.spearmanr}
  return {name: float(functions[name](pred, gold)[0]) for name in names}


# -- SQuAD ---------------------------------------------------------------------------------------
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def normalize_answer(s: str) -> str:
  """Lower case, punctuation and articles removed, whitespace collapsed (both scripts)."""
  s = s.lower()
  s = "".join(ch for ch in s if ch not in _PUNCTUATION)
  s = _ARTICLES.sub(" ", s)
  return " ".join(s.split())


def _tokens(s: str) -> list[str]:
  return normalize_answer(s).split() if s else []


def _f1_of_tokens(pred: list[str], gold: list[str]) -> float:
  common = collections.Counter(pred) & collections.Counter(gold)
  same = sum(common.values())
  if same == 0:
    return 0.0
  precision, recall = same / len(pred), same / len(gold)
  return 2 * precision * recall / (precision + recall)


def v1_exact(prediction: str, gold: str) -> float:
  """1.0 when the normalised texts are equal, else 0.0 (evaluate-v1.1.py's exact_match_score)."""
  return float(normalize_answer(prediction) == normalize_answer(gold))


def v1_f1(prediction: str, gold: str) -> float:
  """The F1 of the normalised texts' tokens; 0.0 without a common token (evaluate-v1.1.py's f1_score)."""
  return _f1_of_tokens(normalize_answer(prediction).split(), normalize_answer(gold).split())


def v2_exact(gold: str, prediction: str) -> float:
  """1.0 when the normalised texts are equal, else 0.0 (evaluate-v2.0.py's compute_exact, gold first)."""
  return float(normalize_answer(gold) == normalize_answer(prediction))


def v2_f1(gold: str, prediction: str) -> float:
  """Token F1 as `v1_f1`; when a side has no tokens (no answer), 1.0 if both have none, else 0.0 (compute_f1)."""
  gold_tokens, pred_tokens = _tokens(gold), _tokens(prediction)
  if not gold_tokens or not pred_tokens:  # a no-answer on either side: 1 if both are, else 0
    return float(gold_tokens == pred_tokens)
  return _f1_of_tokens(pred_tokens, gold_tokens)


def squad_v1(questions: Sequence[Mapping], predictions: Mapping[str, str]) -> dict[str, float]:
  """evaluate-v1.1.py: `questions` are {id, answers: [texts]}; a question without a prediction
  scores 0 and still counts."""
  exact = f1 = 0.0
  for q in questions:
    if q["id"] not in predictions:
      continue
    prediction = predictions[q["id"]]
    exact += max(v1_exact(prediction, gold) for gold in q["answers"])
    f1 += max(v1_f1(prediction, gold) for gold in q["answers"])
  total = len(questions)
  return {"exact_match": 100.0 * exact / total, "f1": 100.0 * f1 / total}


def squad_v2(questions: Sequence[Mapping], predictions: Mapping[str, str]) -> dict[str, float]:
  """evaluate-v2.0.py with its default no-answer probabilities: `questions` are {id, answers:
  [texts]} (none for an unanswerable one); "" predicts no answer. Questions without a prediction
  are left out, as the script does; HasAns and NoAns are the answerable and unanswerable parts."""
  exact, f1, has_answer = {}, {}, {}
  for q in questions:
    has_answer[q["id"]] = bool(q["answers"])
    gold = [a for a in q["answers"] if normalize_answer(a)] or [""]
    if q["id"] not in predictions:
      continue
    prediction = predictions[q["id"]]
    exact[q["id"]] = max(v2_exact(a, prediction) for a in gold)
    f1[q["id"]] = max(v2_f1(a, prediction) for a in gold)
  out = _v2_part(exact, f1, list(exact), "")
  for prefix, wanted in (("HasAns_", True), ("NoAns_", False)):
    ids = [i for i, has in has_answer.items() if has == wanted and i in exact]
    if ids:
      out.update(_v2_part(exact, f1, ids, prefix))
  return out


def _v2_part(exact: dict, f1: dict, ids: list[str], prefix: str) -> dict[str, float]:
  total = len(ids)
  return {
    f"{prefix}exact": 100.0 * sum(exact[i] for i in ids) / total if total else 0.0,
    f"{prefix}f1": 100.0 * sum(f1[i] for i in ids) / total if total else 0.0,
    f"{prefix}total": total,
  }
