"""Dynamic masked-LM masking, vectorised over a whole batch.

Every random number is keyed by (seed, epoch, example index, position) through `keyed_random`, so
an example is masked afresh each epoch, identically on any process, and without a Python loop per
token. As in google-research/bert: `round(mask_prob * tokens)` positions (at least 1, at most
`max_predictions`, counting [CLS] and [SEP] in the length) are chosen among the non-special
tokens; 80% of them become [MASK], 10% a random token, 10% stay (the split is configurable).

Whole-word masking draws one key per word instead of per token and takes whole words in that
random order while they fit the budget (google skips a word that overflows and keeps looking;
taking the prefix stops at the first that does not fit, which only ever predicts fewer tokens).
"""

import dataclasses

import numpy as np

from bertjax.data import keyed_random

_SELECT, _ACTION, _REPLACEMENT = 1, 2, 3  # keyed_random streams


@dataclasses.dataclass(frozen=True)
class MaskingSpec:
  """What masking needs from the config and the tokenizer (ids come from the tokenizer)."""

  mask_prob: float
  max_predictions: int
  mask_token_prob: float
  random_token_prob: float
  mask_id: int
  maskable_V: np.ndarray  # bool [vocab]: may be chosen (not [PAD] [CLS] [SEP] [MASK])
  random_ids: np.ndarray  # int32: what a "random token" is drawn from (no special tokens)
  word_start_V: np.ndarray | None  # bool [vocab] for whole-word masking, else None

  @classmethod
  def from_config(cls, data_config, tokenizer) -> "MaskingSpec":
    special = np.zeros(tokenizer.vocab_size, bool)
    special[[tokenizer.pad_id, tokenizer.cls_id, tokenizer.sep_id, tokenizer.mask_id]] = True
    not_random = special.copy()
    not_random[tokenizer.unk_id] = True
    return cls(
      mask_prob=float(data_config.mask_prob),
      max_predictions=int(data_config.max_predictions),
      mask_token_prob=float(data_config.mask_token_prob),
      random_token_prob=float(data_config.random_token_prob),
      mask_id=tokenizer.mask_id,
      maskable_V=~special,
      random_ids=np.flatnonzero(~not_random).astype(np.int32),
      word_start_V=tokenizer.word_start_mask() if data_config.whole_word_mask else None,
    )


def prediction_budget(lengths_N: np.ndarray, spec: MaskingSpec) -> np.ndarray:
  """BERT's count rule: round(mask_prob * length) predictions, at least 1, at most max_predictions.

  The length counts [CLS] and [SEP] as google-research/bert does; numpy rounds half to even, as
  Python 3's `round`, which google's code calls. Sequence packing (`packing.py`) fills rows under
  it too.
  """
  lengths = np.asarray(lengths_N)
  return np.clip(np.round(lengths * spec.mask_prob), 1, spec.max_predictions).astype(np.int64)


def mask_batch(
  ids_NxL: np.ndarray, attention_NxL: np.ndarray, keys_N: np.ndarray, spec: MaskingSpec
) -> dict[str, np.ndarray]:
  """Masks a batch; returns input_ids (masked), masked_positions, masked_ids, masked_weights.

  Args:
    ids_NxL: token ids of laid-out rows.
    attention_NxL: 1 on real tokens, 0 on padding.
    keys_N: uint64, one key per row: the same key gives the same masking.
    spec: the masking settings.
  Returns:
    int32 `input_ids` [N, L] with the chosen tokens replaced; and [N, P], P = `spec.max_predictions`:
    int32 `masked_positions` (ascending), int32 `masked_ids` (the original tokens) and float32
    `masked_weights` (1 for a prediction, 0 for a padding slot, whose position and id are 0).
  """
  n, length = ids_NxL.shape
  p = spec.max_predictions
  cols = np.arange(length)
  real = attention_NxL.astype(bool)
  cand = spec.maskable_V[ids_NxL] & real
  budget = prediction_budget(real.sum(1), spec)
  u_select = keyed_random.uniform(keys_N, _SELECT, length)

  if spec.word_start_V is None:
    key = np.where(cand, u_select, np.inf)
    order = np.argsort(key, axis=1, kind="stable")
    chosen_sorted = cols[None, :] < budget[:, None]
  else:
    # A word is a word-start piece and the continuation pieces after it; a non-candidate
    # (special, padding) is a word of its own, so no word crosses a [SEP].
    starts = spec.word_start_V[ids_NxL] | ~cand
    word = np.cumsum(starts, axis=1) - 1
    key = np.where(cand, np.take_along_axis(u_select, word, axis=1), np.inf)
    order = np.argsort(key, axis=1, kind="stable")  # words in random order, pieces in order
    word_sorted = np.take_along_axis(word, order, axis=1)
    is_last = np.ones_like(word_sorted, bool)
    is_last[:, :-1] = word_sorted[:, 1:] != word_sorted[:, :-1]
    # For each sorted slot, the slot where its word ends: a word is taken only whole.
    end = np.where(is_last, cols[None, :], length)
    end = np.minimum.accumulate(end[:, ::-1], axis=1)[:, ::-1]
    chosen_sorted = end < budget[:, None]
  chosen_sorted &= np.take_along_axis(cand, order, axis=1)
  chosen = np.zeros_like(cand)
  np.put_along_axis(chosen, order, chosen_sorted, axis=1)

  u_action = keyed_random.uniform(keys_N, _ACTION, length)
  to_mask = chosen & (u_action < spec.mask_token_prob)
  to_random = chosen & (u_action >= spec.mask_token_prob) & (u_action < spec.mask_token_prob + spec.random_token_prob)
  u_token = keyed_random.uniform(keys_N, _REPLACEMENT, length)
  random_tokens = spec.random_ids[(u_token * len(spec.random_ids)).astype(np.int64)]
  masked = np.where(to_mask, spec.mask_id, np.where(to_random, random_tokens, ids_NxL))

  positions = np.sort(np.where(chosen, cols[None, :], length), axis=1)[:, :p]
  if positions.shape[1] < p:  # seq_len < max_predictions: pad the columns
    positions = np.pad(positions, ((0, 0), (0, p - positions.shape[1])), constant_values=length)
  weights = positions < length
  positions = np.where(weights, positions, 0)
  masked_ids = np.where(weights, np.take_along_axis(ids_NxL, positions, axis=1), 0)
  return {
    "input_ids": masked.astype(np.int32),
    "masked_positions": positions.astype(np.int32),
    "masked_ids": masked_ids.astype(np.int32),
    "masked_weights": weights.astype(np.float32),
  }
