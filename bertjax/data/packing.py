"""Sequence packing (`data.pack_pairs`): several NSP pairs in one row, so padding is rarely computed.

A packed row holds up to `data.max_pairs_per_row` pairs, each laid out as it would be alone,
`[CLS] A [SEP] B [SEP]`, one after the other, then padding:

    input_ids     [CLS] a a [SEP] b [SEP] [CLS] a [SEP] b b [SEP] [PAD] ...
    position_ids    0   1 2   3   4   5     0   1   2   3 4   5     0
    segment_ids     0   0 0   0   1   1     0   0   0   1 1   1     0
    pair_ids        1   1 1   1   1   1     2   2   2   2 2   2     0     (0 = padding)
    nsp_positions [0, 6, 0, ...]; nsp_labels, nsp_weights [K]: one slot per pair (weight 0: none)

Which pairs share a row is decided once per epoch (cached pipeline) or per stream window
(streaming pipeline) by `pack`, a first-fit in the order of the shuffled pair stream: each pair
goes into the first of the `OPEN_ROWS` most recently opened rows with room left that it fits
(tokens, pair count and prediction budget), or opens a new row. Rows are numbered in the order they open. The rows of an
epoch then replace its pairs as the examples laid end to end, so step s takes rows [s B, (s+1) B)
and row r of step s is a function of (seed, corpus, s, r) alone: every process computes the same
table from the epoch's pair index (which each process builds anyway) and materialises only its rows.

Masking is per pair: each pair is laid out and masked alone by `base.make_examples` with the key of
its position in the pair stream (the key it would have unpacked), then moved to its offset in the
row. So a pair gets BERT's count, round(mask_prob * its length), at least 1 and at most
`data.max_predictions`, and the same masks it would get in a row of its own. `max_predictions`
stays the row's number of prediction slots: a pair joins a row only if the row's remaining slots
hold its whole count, so no pair ever loses a prediction to its neighbours.
"""

import dataclasses

import numpy as np

from bertjax.data import masking
from bertjax.data import pairs as pairs_lib
from bertjax.data.base import make_examples
from bertjax.data.limits import MIN_PAIR_TOKENS  # a row with less room left takes no other pair

# Rows kept open to more pairs. A bounded set keeps packing linear in the pairs (each pair tries
# at most this many rows) and keeps a row's pairs close in the shuffled stream.
OPEN_ROWS = 64
_CHUNK = 1 << 16  # pairs read into Python at once
_CHECK_EVERY = 256  # pairs between two calls of `pack`'s should_stop


@dataclasses.dataclass(frozen=True)
class Packing:
  """Which pairs each row holds: row r is pairs[row_start[r]:row_start[r + 1]], in slot order."""

  row_start: np.ndarray  # int32 [R + 1] (int64 from 2**31 pairs)
  pairs: np.ndarray  # int32 [P]: indices into the pair index, row by row

  @property
  def num_rows(self) -> int:
    return len(self.row_start) - 1

  def select(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pair indices, output row of each, slot within its row) of `rows`, grouped row by row."""
    rows = np.asarray(rows, np.int64)
    first, counts = self.row_start[rows], self.row_start[rows + 1] - self.row_start[rows]
    row_of_pair = np.repeat(np.arange(len(rows)), counts)
    slot = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    return self.pairs[first[row_of_pair] + slot], row_of_pair, slot


@dataclasses.dataclass(frozen=True)
class RowLayout:
  """How a pipeline turns a stream of pairs into examples: one pair a row, or packed rows."""

  seq_len: int
  max_pairs: int | None  # None: one pair a row (BERT's layout)
  tokenizer: object
  spec: masking.MaskingSpec

  @classmethod
  def from_config(cls, data_config, tokenizer, spec: masking.MaskingSpec) -> "RowLayout":
    d = data_config
    return cls(int(d.seq_len), int(d.max_pairs_per_row) if d.pack_pairs else None, tokenizer, spec)

  def pack(self, pair_index: pairs_lib.PairIndex, should_stop=None) -> Packing | None:
    """The packing of a shuffled pair stream (None without packing); `should_stop` as `pack`'s."""
    if self.max_pairs is None:
      return None
    n = len(pair_index)
    dtype = pairs_lib.length_dtype(self.seq_len)  # a budget is at most the pair's length
    lengths, budgets = np.empty(n, dtype), np.empty(n, dtype)
    for c in range(0, n, _CHUNK):  # compact arrays, filled a chunk at a time
      part = pair_lengths(pair_index.take(slice(c, c + _CHUNK)))
      lengths[c : c + _CHUNK], budgets[c : c + _CHUNK] = part, masking.prediction_budget(part, self.spec)
    return pack(lengths, budgets, self.seq_len, self.max_pairs, self.spec.max_predictions, should_stop)

  @staticmethod
  def count(pair_index: pairs_lib.PairIndex, packed: Packing | None) -> int:
    """Examples of a pair stream: its pairs, or its packed rows."""
    return len(pair_index) if packed is None else packed.num_rows

  def examples(
    self, tokens, pair_index: pairs_lib.PairIndex, packed: Packing | None, examples: np.ndarray, keys_of
  ) -> dict[str, np.ndarray]:
    """Examples `examples` of a pair stream (pairs, or rows of `packed`), laid out and masked;
    `keys_of(pair indices)` gives each pair's masking keys."""
    if packed is None:
      return make_examples(
        tokens, pair_index.take(examples), keys_of(examples), self.seq_len, self.tokenizer, self.spec
      )
    index, row_of_pair, slot = packed.select(examples)
    alone = make_examples(tokens, pair_index.take(index), keys_of(index), self.seq_len, self.tokenizer, self.spec)
    return pack_examples(alone, row_of_pair, slot, len(examples), self.max_pairs, self.tokenizer.pad_id)


def pair_lengths(pair_index: pairs_lib.PairIndex) -> np.ndarray:
  """Tokens of each pair laid out: [CLS] A [SEP] B [SEP]."""
  return pair_index.a_len.astype(np.int64) + pair_index.b_len.astype(np.int64) + 3


def pack(
  lengths: np.ndarray, budgets: np.ndarray, seq_len: int, max_pairs: int, max_predictions: int, should_stop=None
) -> Packing:
  """First-fit of pairs (in order) into rows of `seq_len` tokens, `max_pairs` pairs and
  `max_predictions` prediction slots, over the `OPEN_ROWS` most recently opened rows that can
  still take a pair.

  Args:
    lengths: each pair's tokens laid out (`pair_lengths`), in stream order.
    budgets: each pair's prediction count (`masking.prediction_budget`).
    seq_len: tokens a row holds.
    max_pairs: pairs a row holds (`data.max_pairs_per_row`).
    max_predictions: prediction slots a row holds.
    should_stop: None, or a function asked every few hundred pairs: True stops packing (it may
      also pause it, as a background build does while batches are made).
  Returns:
    The rows, numbered in the order they open; a row's pairs in stream order.
  Raises:
    pairs.Cancelled: `should_stop` returned True.
  """
  n = len(lengths)
  index_dtype = np.int32 if n < 2**31 else np.int64
  row_of, slot_of = np.empty(n, index_dtype), np.empty(n, np.int16 if max_pairs < 2**15 else np.int32)
  open_rows: list[list[int]] = []  # [row, free tokens, free predictions, pairs], oldest first
  rows = 0
  longest_fit = seq_len - MIN_PAIR_TOKENS  # an open row holds a pair already: no more room
  for p, length, budget in _pairs(lengths, budgets):
    if should_stop is not None and p % _CHECK_EVERY == 0 and should_stop():
      raise pairs_lib.Cancelled(f"packing stopped after {p} of {len(lengths)} pairs")
    entry = None
    if length <= longest_fit:  # (most pairs fill their row: they skip the search)
      entry = next((e for e in open_rows if e[1] >= length and e[2] >= budget), None)
    opened = entry is None
    if opened:
      entry = [rows, seq_len, max_predictions, 0]
      rows += 1
    row_of[p], slot_of[p] = entry[0], entry[3]
    entry[1] -= length
    entry[2] -= budget
    entry[3] += 1
    full = entry[3] >= max_pairs or entry[1] < MIN_PAIR_TOKENS or entry[2] < 1
    if full and not opened:
      open_rows.remove(entry)
    elif not full and opened:
      open_rows.append(entry)
      if len(open_rows) > OPEN_ROWS:
        del open_rows[0]  # the oldest open row is closed as it stands
  # Row by row, within a row in stream order: pair p goes to its row's start plus its slot (the
  # stable argsort of row_of, without sorting).
  row_start = np.zeros(rows + 1, index_dtype)
  np.cumsum(np.bincount(row_of, minlength=rows), out=row_start[1:], dtype=index_dtype)
  order = np.empty(n, index_dtype)
  for c in range(0, n, _CHUNK):
    order[row_start[row_of[c : c + _CHUNK]] + slot_of[c : c + _CHUNK]] = np.arange(c, min(c + _CHUNK, n))
  return Packing(row_start, order)


def _pairs(lengths: np.ndarray, budgets: np.ndarray):
  """(index, length, budget) as Python ints, a chunk at a time (not two lists of all of them)."""
  lengths, budgets = np.asarray(lengths), np.asarray(budgets)
  for c in range(0, len(lengths), _CHUNK):
    yield from zip(range(c, c + _CHUNK), lengths[c : c + _CHUNK].tolist(), budgets[c : c + _CHUNK].tolist())


def padding_fraction(pair_index: pairs_lib.PairIndex, seq_len: int, packing: Packing | None) -> float:
  """The share of padding positions when the pairs are laid out one per row or as `packing` packs them.

  Args:
    pair_index: the pairs.
    seq_len: tokens a row holds.
    packing: `pack`'s result for these pairs, or None for one pair a row.
  """
  rows = len(pair_index) if packing is None else packing.num_rows
  return 1.0 - float(pair_lengths(pair_index).sum()) / max(rows * seq_len, 1)


def pack_examples(
  alone: dict[str, np.ndarray], row_of_pair: np.ndarray, slot: np.ndarray, n_rows: int, max_pairs: int, pad_id: int
) -> dict[str, np.ndarray]:
  """Moves examples laid out one per row (`make_examples`) into `n_rows` packed rows.

  `row_of_pair` must be non-decreasing (a row's pairs together, in slot order); every row gets at
  least one pair. Returns the unpacked arrays plus position_ids, pair_ids [N, L] and
  nsp_positions, nsp_labels, nsp_weights [N, K].

  Args:
    alone: `make_examples`' arrays for M pairs, [M, L] and [M, P].
    row_of_pair: int [M], the packed row of each pair.
    slot: int [M], each pair's slot within its row (0 first).
    n_rows: N.
    max_pairs: K, the NSP slots of a row.
    pad_id: the tokenizer's [PAD] id.
  Returns:
    int32 arrays except float32 `masked_weights` and `nsp_weights`; a pair's `pair_ids` are its
    slot + 1 (0 = padding); empty NSP slots have weight 0.
  Raises:
    ValueError: a row would hold more than L tokens or P predictions.
  """
  real_MxL = alone["attention_mask"] > 0
  m, length = real_MxL.shape
  p = alone["masked_positions"].shape[1]
  n_tokens = real_MxL.sum(1)
  pair_end = np.cumsum(n_tokens)
  pair_start = pair_end - n_tokens  # where each pair's tokens start among all pairs' tokens
  row_first_pair = np.searchsorted(row_of_pair, np.arange(n_rows))
  row_start = pair_start[row_first_pair] if m else np.zeros(n_rows, np.int64)
  offset = pair_start - row_start[row_of_pair]  # the column where each pair begins in its row
  row_tokens = np.bincount(row_of_pair, weights=n_tokens, minlength=n_rows).astype(np.int64)
  if row_tokens.max(initial=0) > length:
    raise ValueError(f"packed rows hold up to {row_tokens.max()} tokens, more than seq_len={length}")

  # Every pair's real tokens one after the other, and one padding entry that empty places read.
  cols = np.arange(length)[None, :]
  in_row = cols < row_tokens[:, None]
  src = np.where(in_row, row_start[:, None] + cols, pair_end[-1] if m else 0)

  def packed(values_MxL, fill):
    return np.append(values_MxL[real_MxL], fill).astype(np.int32)[src]

  pair_ids = np.broadcast_to((slot + 1)[:, None], (m, length))
  positions = np.broadcast_to(np.arange(length)[None, :], (m, length))
  out = {
    "input_ids": packed(alone["input_ids"], pad_id),
    "segment_ids": packed(alone["segment_ids"], 0),
    "attention_mask": in_row.astype(np.int32),
    "position_ids": packed(positions, 0),
    "pair_ids": packed(pair_ids, 0),
  }

  # Predictions: each pair's (sorted) positions shifted by its offset, left-aligned in the row.
  chosen_MxP = alone["masked_weights"] > 0
  per_row = np.bincount(row_of_pair, weights=chosen_MxP.sum(1), minlength=n_rows).astype(np.int64)
  if per_row.max(initial=0) > p:
    raise ValueError(f"packed rows need up to {per_row.max()} predictions, more than max_predictions={p}")
  pcols = np.arange(p)[None, :]
  has = pcols < per_row[:, None]
  psrc = np.where(has, (np.cumsum(per_row) - per_row)[:, None] + pcols, int(chosen_MxP.sum()))
  shifted = alone["masked_positions"] + offset[:, None]
  out["masked_positions"] = np.append(shifted[chosen_MxP], 0).astype(np.int32)[psrc]
  out["masked_ids"] = np.append(alone["masked_ids"][chosen_MxP], 0).astype(np.int32)[psrc]
  out["masked_weights"] = has.astype(np.float32)

  out["nsp_positions"] = np.zeros((n_rows, max_pairs), np.int32)
  out["nsp_labels"] = np.zeros((n_rows, max_pairs), np.int32)
  out["nsp_weights"] = np.zeros((n_rows, max_pairs), np.float32)
  out["nsp_positions"][row_of_pair, slot] = offset
  out["nsp_labels"][row_of_pair, slot] = alone["nsp_labels"]
  out["nsp_weights"][row_of_pair, slot] = 1.0
  return out
