"""NSP sentence pairs with the semantics of google-research/bert's `create_instances_from_document`.

A pair index is a table of spans into the flat token array: segment A is contiguous sentences of
one document, B is either their actual continuation (NSP label 0) or contiguous sentences from
another document starting at a random sentence (label 1, and A's unused sentences go back to be
used by the next pair). Per document, the target length is `seq_len - 3`, or with probability
`short_seq_prob` a random length in [2, seq_len - 3]. The longer side is truncated, one token at a
time from a random end, until both fit; `assemble` lays pairs out as `[CLS] A [SEP] B [SEP]`.

One deviation: google's code makes a chunk of a single sentence always a random pair. When
sentences are long for `seq_len` most chunks are one sentence and NSP would be mostly "random";
here such a chunk takes the document's next sentence as its B with the usual probability, so the
labels stay balanced and IsNext pairs remain truly consecutive.
"""

import bisect
import dataclasses

import numpy as np


@dataclasses.dataclass
class PairIndex:
  """Spans (after truncation) of each pair's segments in the flat token array, and NSP labels."""

  a_start: np.ndarray  # int64 [P]
  a_len: np.ndarray  # int32 [P]
  b_start: np.ndarray  # int64 [P]
  b_len: np.ndarray  # int32 [P]
  label: np.ndarray  # int32 [P]: 0 = B follows A, 1 = B is random

  def __len__(self):
    return len(self.label)

  def take(self, idx: np.ndarray) -> "PairIndex":
    return PairIndex(*(getattr(self, f.name)[idx] for f in dataclasses.fields(self)))


def truncated_lengths(len_a: np.ndarray, len_b: np.ndarray, max_tokens: int):
  """Final lengths after google's `truncate_seq_pair` (trim the longer side; ties trim B).

  Closed form of the token-by-token loop: if trimming only the longer side reaches the budget
  before it becomes the shorter, only it shrinks; otherwise both end at half the budget (A gets
  the odd token).

  Args:
    len_a: segment A's lengths in tokens (an integer array).
    len_b: segment B's, shaped as `len_a`.
    max_tokens: the budget for A + B (`seq_len - 3`: [CLS] and two [SEP]).
  Returns:
    (new_a, new_b): int64 arrays shaped as the inputs; pairs within the budget are unchanged.
  """
  len_a = np.asarray(len_a, np.int64)
  len_b = np.asarray(len_b, np.int64)
  over = len_a + len_b > max_tokens
  half_a, half_b = (max_tokens + 1) // 2, max_tokens // 2
  # B is trimmed first when it is at least as long as A.
  only_b = (len_b >= len_a) & (max_tokens - len_a >= len_a - 1)
  only_a = (len_a > len_b) & (max_tokens - len_b >= len_b)
  new_a = np.where(only_b, len_a, np.where(only_a, max_tokens - len_b, half_a))
  new_b = np.where(only_b, max_tokens - len_a, np.where(only_a, len_b, half_b))
  return np.where(over, new_a, len_a), np.where(over, new_b, len_b)


def build_pair_index(
  sent_start: np.ndarray,
  doc_start: np.ndarray,
  doc_ids: np.ndarray,
  seq_len: int,
  short_seq_prob: float,
  random_next_prob: float,
  rng: np.random.Generator,
) -> PairIndex:
  """Pairs from the documents `doc_ids` (random B drawn among them too), in document order.

  `sent_start` [S+1] gives each sentence's first token, `doc_start` [D+1] each document's first
  sentence. One Python step per pair (not per token); spans, truncation and layout are arrays.

  Args:
    sent_start: int [S+1] token offsets (the last is the token count).
    doc_start: int [D+1] sentence offsets (the last is S).
    doc_ids: the documents to pair; segment A comes from each in this order.
    seq_len: the row length L; A + B get at most L - 3 tokens.
    short_seq_prob: the probability that a document's target length is drawn short.
    random_next_prob: the probability that B is a random segment (label 1).
    rng: the generator all choices draw from; the same state gives the same pairs.
  Returns:
    The truncated pairs.
  """
  max_tokens = seq_len - 3
  doc_ids = np.asarray(doc_ids, np.int64)
  n_docs = len(doc_ids)
  a0, a1, b0, b1, labels = [], [], [], [], []
  for pos, d in enumerate(doc_ids.tolist()):
    s0, s1 = int(doc_start[d]), int(doc_start[d + 1])
    offsets = sent_start[s0 : s1 + 1].tolist()  # token offsets of this document's sentences
    target = max_tokens
    if rng.random() < short_seq_prob:
      target = int(rng.integers(2, max_tokens + 1))
    i = 0
    n = s1 - s0
    while i < n:
      # The chunk: sentences i..j-1, added until the target is reached or the document ends.
      j = min(max(bisect.bisect_left(offsets, offsets[i] + target), i + 1), n)
      size = j - i
      a_end = i + (int(rng.integers(1, size)) if size >= 2 else 1)
      if size == 1:
        is_random = j >= n or rng.random() < random_next_prob
        if not is_random:
          j = i + 2  # the deviation above: the next sentence is B
      else:
        is_random = rng.random() < random_next_prob
      if is_random and n_docs > 1:
        k = int(rng.integers(n_docs - 1))
        r = int(doc_ids[k + (k >= pos)])
        r0, r1 = int(doc_start[r]), int(doc_start[r + 1])
        start = int(rng.integers(r0, r1))
        target_b = target - (offsets[a_end] - offsets[i])
        want = int(sent_start[start]) + max(target_b, 1)
        stop = int(np.searchsorted(sent_start[start + 1 : r1 + 1], want)) + start + 1
        stop = min(stop, r1)
        b0.append(int(sent_start[start])), b1.append(int(sent_start[stop]))
        labels.append(1)
        next_i = a_end  # A's unused sentences go back
      else:
        b0.append(offsets[a_end]), b1.append(offsets[j])
        labels.append(0)
        next_i = j
      a0.append(offsets[i]), a1.append(offsets[a_end])
      i = next_i
  a_start = np.array(a0, np.int64)
  a_len = np.array(a1, np.int64) - a_start
  b_start = np.array(b0, np.int64)
  b_len = np.array(b1, np.int64) - b_start
  new_a, new_b = truncated_lengths(a_len, b_len, max_tokens)
  # Which end each trimmed token came from is a fair coin per token: only the counts matter.
  cut_a = rng.binomial(a_len - new_a, 0.5)
  cut_b = rng.binomial(b_len - new_b, 0.5)
  return PairIndex(
    a_start + cut_a, new_a.astype(np.int32), b_start + cut_b, new_b.astype(np.int32), np.array(labels, np.int32)
  )


def assemble(tokens: np.ndarray, pairs: PairIndex, seq_len: int, cls_id: int, sep_id: int, pad_id: int):
  """`[CLS] A [SEP] B [SEP]` then padding: input_ids, segment_ids, attention_mask, int32 [N, L].

  Args:
    tokens: the flat token array the spans of `pairs` point into.
    pairs: N truncated pairs (A + B at most `seq_len` - 3 tokens).
    seq_len: L.
    cls_id, sep_id, pad_id: the tokenizer's special ids.
  Returns:
    (input_ids, segment_ids, attention_mask): segment 1 covers B and its [SEP]; the mask is 1 up to
    the last [SEP].
  """
  j = np.arange(seq_len, dtype=np.int64)[None, :]
  la = pairs.a_len.astype(np.int64)[:, None]
  lb = pairs.b_len.astype(np.int64)[:, None]
  in_a = (j >= 1) & (j <= la)
  in_b = (j >= la + 2) & (j <= la + lb + 1)
  src = np.where(in_a, pairs.a_start[:, None] + j - 1, pairs.b_start[:, None] + j - la - 2)
  src = np.where(in_a | in_b, src, 0)
  ids = np.asarray(tokens[src.ravel()]).reshape(src.shape).astype(np.int32)
  ids = np.where(in_a | in_b, ids, pad_id)
  is_sep = (j == la + 1) | (j == la + lb + 2)
  ids = np.where(is_sep, sep_id, ids)
  ids[:, 0] = cls_id
  segment_ids = ((j >= la + 2) & (j <= la + lb + 2)).astype(np.int32)
  attention_mask = (j <= la + lb + 2).astype(np.int32)
  return ids.astype(np.int32), segment_ids, attention_mask
