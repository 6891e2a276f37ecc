"""The GLUE metrics and SQuAD's exact match and F1 on cases computed by hand.

The SQuAD expectations follow the official evaluate-v1.1.py and evaluate-v2.0.py: answers are
lower-cased, stripped of punctuation and of the articles a/an/the, and their whitespace
collapsed; the best gold answer counts; v2.0 scores a no-answer as 1 only against a no-answer.
"""

import math

import numpy as np
import pytest

from bertjax.finetune import metrics


def test_accuracy_f1_and_matthews_by_hand():
  pred = [1, 1, 0, 0, 1, 0]
  gold = [1, 0, 0, 1, 1, 0]
  # tp = 2 (0, 4), fp = 1 (1), fn = 1 (3), tn = 2 (2, 5)
  got = metrics.classification(("accuracy", "f1", "matthews"), pred, gold)
  assert got["accuracy"] == pytest.approx(4 / 6)
  assert got["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
  assert got["matthews"] == pytest.approx((2 * 2 - 1 * 1) / math.sqrt(3 * 3 * 3 * 3))


def test_matthews_is_zero_when_one_class_is_always_predicted_and_one_for_a_perfect_match():
  assert metrics.classification(("matthews",), [1, 1, 1, 1], [1, 0, 1, 0])["matthews"] == 0.0
  assert metrics.classification(("matthews",), [0, 1, 1, 0], [0, 1, 1, 0])["matthews"] == pytest.approx(1.0)
  assert metrics.classification(("matthews",), [1, 0, 0, 1], [0, 1, 1, 0])["matthews"] == pytest.approx(-1.0)


def test_matthews_for_three_classes_follows_the_confusion_matrix_formula():
  pred = [0, 1, 2, 2, 1, 0, 2]
  gold = [0, 1, 2, 1, 1, 2, 2]
  confusion = np.zeros((3, 3))
  for g, p in zip(gold, pred):
    confusion[g, p] += 1
  t, p, c, s = confusion.sum(1), confusion.sum(0), np.trace(confusion), confusion.sum()
  expected = (c * s - t @ p) / math.sqrt((s * s - p @ p) * (s * s - t @ t))
  assert metrics.classification(("matthews",), pred, gold)["matthews"] == pytest.approx(expected)


def test_f1_is_of_class_one_and_zero_without_true_positives():
  assert metrics.classification(("f1",), [0, 0, 0], [1, 1, 0])["f1"] == 0.0
  assert metrics.classification(("f1",), [1, 1, 1], [1, 1, 1])["f1"] == 1.0


def test_pearson_and_spearman_by_hand():
  pred = [1.0, 2.0, 3.0, 4.0]
  gold = [1.0, 3.0, 2.0, 5.0]
  got = metrics.regression(("pearson", "spearman"), pred, gold)
  # Spearman: ranks 1 2 3 4 and 1 3 2 4, d^2 = 0 1 1 0: 1 - 6 * 2 / (4 * 15) = 0.8.
  assert got["spearman"] == pytest.approx(0.8)
  x, y = np.array(pred) - 2.5, np.array(gold) - 2.75
  assert got["pearson"] == pytest.approx((x @ y) / math.sqrt((x @ x) * (y @ y)))
  assert metrics.regression(("pearson",), [2.0, 2.0, 2.0], gold[:3]) == {"pearson": 0.0}  # undefined


@pytest.mark.parametrize(
  "text, normalized",
  [
    ("The Eiffel Tower", "eiffel tower"),
    ("  an   apple,  a pear!  ", "apple pear"),
    ("Theater", "theater"),  # an article only as a whole word
    ("the-end", "theend"),  # punctuation goes before the articles: "theend" is no article
    ("A", ""),
    ("U.S.A. (1990)", "usa 1990"),
  ],
)
def test_answers_are_normalized_as_the_official_scripts_do(text, normalized):
  assert metrics.normalize_answer(text) == normalized


def test_squad_v1_exact_match_and_f1_by_hand():
  questions = [
    {"id": "a", "answers": ["the Eiffel Tower", "Eiffel Tower in Paris"]},
    {"id": "b", "answers": ["1990"]},
    {"id": "c", "answers": ["red fox"]},
    {"id": "d", "answers": ["blue"]},  # no prediction: counts as 0
  ]
  predictions = {"a": "Eiffel tower.", "b": "in 1990", "c": "the red red fox"}
  got = metrics.squad_v1(questions, predictions)
  # a: exact against the first gold. b: F1 of [in 1990] vs [1990] = 2 * 0.5 * 1 / 1.5 = 2/3.
  # c: [red red fox] vs [red fox]: common 2, precision 2/3, recall 1: F1 0.8.
  assert got["exact_match"] == pytest.approx(100 * 1 / 4)
  assert got["f1"] == pytest.approx(100 * (1 + 2 / 3 + 0.8 + 0) / 4)


def test_squad_v1_takes_the_best_gold_answer_for_each_score_separately():
  questions = [{"id": "a", "answers": ["big red barn", "the barn"]}]
  got = metrics.squad_v1(questions, {"a": "red barn"})
  # exact: neither. F1: [red barn] vs [big red barn] = 2 * 1 * 2/3 / (5/3) = 0.8; vs [barn] = 2/3.
  assert got == {"exact_match": 0.0, "f1": pytest.approx(80.0)}


def test_squad_v2_no_answers_and_the_has_answer_breakdown():
  questions = [
    {"id": "a", "answers": ["Paris"]},
    {"id": "b", "answers": ["in the year 1990", "1990"]},
    {"id": "c", "answers": []},  # unanswerable
    {"id": "d", "answers": []},
    {"id": "e", "answers": ["a"]},  # normalises to "": treated as no answer, yet counted as answerable
  ]
  predictions = {"a": "paris", "b": "year 1990", "c": "", "d": "somewhere", "e": ""}
  got = metrics.squad_v2(questions, predictions)
  # a: 1/1. b: best gold "in the year 1990" -> [in year 1990] vs [year 1990]: F1 0.8, exact 0;
  # "1990" -> F1 2/3. c: "" vs "": 1/1. d: "somewhere" vs "": 0/0. e: gold [""] vs "": 1/1.
  assert got["exact"] == pytest.approx(100 * 3 / 5)
  assert got["f1"] == pytest.approx(100 * (1 + 0.8 + 1 + 0 + 1) / 5)
  assert got["total"] == 5
  assert got["HasAns_total"] == 3 and got["NoAns_total"] == 2
  assert got["HasAns_exact"] == pytest.approx(100 * 2 / 3)
  assert got["HasAns_f1"] == pytest.approx(100 * (1 + 0.8 + 1) / 3)
  assert got["NoAns_exact"] == pytest.approx(50.0) and got["NoAns_f1"] == pytest.approx(50.0)


def test_squad_v2_leaves_out_questions_without_a_prediction():
  questions = [{"id": "a", "answers": ["x"]}, {"id": "b", "answers": []}]
  got = metrics.squad_v2(questions, {"a": "x"})
  assert got["total"] == 1 and got["exact"] == 100.0
  assert "NoAns_total" not in got
