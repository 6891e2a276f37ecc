"""From start and end logits to answers: n-best span decoding, as google-research/bert's run_squad.py.

    decode(questions, features, start_logits_FxL, end_logits_FxL, ...) -> (answers, null_odds)

In every window of a question, the `n_best` highest start and end logits pair into candidate
spans; a candidate must lie in the context, start where this window has the token's maximum
context, end at or after its start, and be at most `max_answer_len` tokens long. The best
candidate over all windows (by start + end logit) is the answer, its text the context's own
characters between the first token's start and the last token's end. SQuAD 2.0 also scores "no
answer" as the [CLS] logits, start[0] + end[0], taking the lowest over the question's windows;
the answer is "" when that null score exceeds the best span's by more than
`null_score_threshold` (null_odds holds the difference, as run_squad.py's null_odds.json).
"""

import numpy as np


def _best_span(start_L, end_L, offsets_Lx2, max_context_L, n_best: int, max_answer_len: int):
  """(score, first token, last token) of the best valid candidate in one window, or None."""
  k = min(n_best, len(start_L))
  starts = np.argsort(-start_L, kind="stable")[:k]
  ends = np.argsort(-end_L, kind="stable")[:k]
  in_context = offsets_Lx2[:, 0] >= 0
  length = ends[None, :] - starts[:, None] + 1
  valid = (
    (in_context[starts] & max_context_L[starts])[:, None]
    & in_context[ends][None, :]
    & (length >= 1)
    & (length <= max_answer_len)
  )
  if not valid.any():
    return None
  scores = np.where(valid, start_L[starts][:, None] + end_L[ends][None, :], -np.inf)
  i, j = np.unravel_index(np.argmax(scores), scores.shape)
  return float(scores[i, j]), int(starts[i]), int(ends[j])


def decode(
  questions,
  features: dict[str, np.ndarray],
  start_logits_FxL: np.ndarray,
  end_logits_FxL: np.ndarray,
  *,
  n_best: int,
  max_answer_len: int,
  squad_v2: bool,
  null_score_threshold: float,
) -> tuple[dict[str, str], dict[str, float]]:
  """({question id: answer text}, {question id: null score - best span score}) for every
  question; "" is no answer (SQuAD 2.0, or no valid span at all).

  Args:
    questions: the questions `features` were made from (`squad.windows`; `example_index` indexes them).
    features: `squad.windows`' arrays; `example_index`, `offsets` and `max_context` are read.
    start_logits_FxL, end_logits_FxL: the model's logits for each window.
    n_best: the top start and end logits a window pairs into candidates.
    max_answer_len: the longest answer in tokens.
    squad_v2: score "no answer"; without it null_odds are 0 and every answer is the best span.
    null_score_threshold: answer "" when null score - best span score exceeds it (SQuAD 2.0).
  """
  answers, null_odds = {}, {}
  windows_of: dict[int, list[int]] = {}
  for f, example in enumerate(features["example_index"]):
    windows_of.setdefault(int(example), []).append(f)
  for i, q in enumerate(questions):
    best, null = None, np.inf
    for f in windows_of.get(i, []):
      null = min(null, float(start_logits_FxL[f, 0] + end_logits_FxL[f, 0]))
      span = _best_span(
        start_logits_FxL[f],
        end_logits_FxL[f],
        features["offsets"][f],
        features["max_context"][f],
        n_best,
        max_answer_len,
      )
      if span is not None and (best is None or span[0] > best[0]):
        best = (*span, f)
    if best is None:  # no valid span in any window (run_squad.py then scores an empty one as 0)
      answers[q.id], null_odds[q.id] = "", null if squad_v2 else 0.0
      continue
    score, first, last, f = best
    offsets = features["offsets"][f]
    text = q.context[offsets[first, 0] : offsets[last, 1]]
    null_odds[q.id] = null - score if squad_v2 else 0.0
    answers[q.id] = "" if squad_v2 and null_odds[q.id] > null_score_threshold else text
  return answers, null_odds
