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

import array
import bisect
import dataclasses

import numpy as np

# Pairs are built and shuffled in chunks of this many: what the vectorised steps hold at once.
_CHUNK = 1 << 16
# The build loop asks `should_stop` every this many documents (about 0.4 ms of work).
_CHECK_EVERY = 16


class Cancelled(Exception):
  """A pair-index build stopped because its `should_stop` said so (its pipeline is gone)."""


def length_dtype(seq_len: int):
  """The dtype of truncated segment lengths (< seq_len): int16 for every seq_len BERT uses."""
  return np.int16 if seq_len <= np.iinfo(np.int16).max else np.int32


@dataclasses.dataclass
class PairIndex:
  """Spans (after truncation) of each pair's segments in the flat token array, and NSP labels.

  Compact: 21 bytes a pair (lengths are int16 below seq_len 32768, `length_dtype`); the starts
  are int64, the token count of a large corpus passes 2**31.
  """

  a_start: np.ndarray  # int64 [P]
  a_len: np.ndarray  # int16 [P] (`length_dtype`)
  b_start: np.ndarray  # int64 [P]
  b_len: np.ndarray  # int16 [P]
  label: np.ndarray  # int8 [P]: 0 = B follows A, 1 = B is random

  def __len__(self):
    return len(self.label)

  @property
  def nbytes(self) -> int:
    return sum(getattr(self, f.name).nbytes for f in dataclasses.fields(self))

  def take(self, idx: np.ndarray) -> "PairIndex":
    return PairIndex(*(getattr(self, f.name)[idx] for f in dataclasses.fields(self)))

  def permute(self, perm: np.ndarray) -> "PairIndex":
    """`take(perm)` in place: each array is replaced by its permuted copy in turn, gathered a
    chunk at a time, so the peak is this index plus one array (not two indices)."""
    for f in dataclasses.fields(self):
      old = getattr(self, f.name)
      new = np.empty(len(perm), old.dtype)
      for c in range(0, len(perm), _CHUNK):
        np.take(old, perm[c : c + _CHUNK], out=new[c : c + _CHUNK])
      setattr(self, f.name, new)
      del old
    return self


def shuffle_order(rng: np.random.Generator, n: int) -> np.ndarray:
  """`rng.permutation(n)`, the same draws and values, as int32 when n fits (half the memory).

  `Generator.permutation(n)` shuffles `arange(n)` in place, one draw per element whatever the
  dtype, so shuffling an int32 `arange` gives the same permutation.
  """
  order = np.arange(n, dtype=np.int32 if n < 2**31 else np.int64)
  rng.shuffle(order)
  return order


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
  should_stop=None,
) -> PairIndex:
  """Pairs from the documents `doc_ids` (random B drawn among them too), in document order.

  `sent_start` [S+1] gives each sentence's first token, `doc_start` [D+1] each document's first
  sentence. One Python step per pair (not per token), appending to typed buffers (25 bytes a
  pair, not Python lists of ints); truncation runs over chunks of them.

  Args:
    sent_start: int [S+1] token offsets (the last is the token count).
    doc_start: int [D+1] sentence offsets (the last is S).
    doc_ids: the documents to pair; segment A comes from each in this order.
    seq_len: the row length L; A + B get at most L - 3 tokens.
    short_seq_prob: the probability that a document's target length is drawn short.
    random_next_prob: the probability that B is a random segment (label 1).
    rng: the generator all choices draw from; the same state gives the same pairs.
    should_stop: None, or a function asked every few documents: True stops the build (it may
      also pause it, as a background build does while batches are made).
  Returns:
    The truncated pairs.
  Raises:
    Cancelled: `should_stop` returned True.
  """
  max_tokens = seq_len - 3
  sent_start = np.asarray(sent_start)  # a memmap's plain view: slices of it are cheaper
  doc_start = np.asarray(doc_start)
  doc_ids = np.asarray(doc_ids, np.int64)
  n_docs = len(doc_ids)
  # Spans before truncation: starts (int64) and lengths (int32: one sentence holds fewer tokens).
  a_start, a_len, b_start, b_len = array.array("q"), array.array("i"), array.array("q"), array.array("i")
  labels = array.array("b")
  for pos, d in _documents(doc_ids):
    if should_stop is not None and pos % _CHECK_EVERY == 0 and should_stop():
      raise Cancelled(f"pair index stopped after {pos} of {n_docs} documents")
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
        other = sent_start[r0 : r1 + 1].tolist()  # token offsets of the other document's sentences
        target_b = target - (offsets[a_end] - offsets[i])
        want = other[start - r0] + max(target_b, 1)
        # The first sentence boundary after `start` at or past `want`, at most the document's end.
        stop = min(bisect.bisect_left(other, want, start + 1 - r0, r1 + 1 - r0) + r0, r1)
        b_start.append(other[start - r0]), b_len.append(other[stop - r0] - other[start - r0])
        labels.append(1)
        next_i = a_end  # A's unused sentences go back
      else:
        b_start.append(offsets[a_end]), b_len.append(offsets[j] - offsets[a_end])
        labels.append(0)
        next_i = j
      a_start.append(offsets[i]), a_len.append(offsets[a_end] - offsets[i])
      i = next_i
  return _truncate(
    _array(a_start, np.int64),
    _array(a_len, np.int32),
    _array(b_start, np.int64),
    _array(b_len, np.int32),
    _array(labels, np.int8),
    seq_len,
    rng,
  )


def _documents(doc_ids: np.ndarray):
  """(position, document id) as Python ints, a chunk at a time (not one list of all of them)."""
  for c in range(0, len(doc_ids), _CHUNK):
    yield from enumerate(doc_ids[c : c + _CHUNK].tolist(), start=c)


def _array(buffer: array.array, dtype) -> np.ndarray:
  """A numpy view of a typed buffer (no copy)."""
  return np.frombuffer(buffer, dtype) if len(buffer) else np.zeros(0, dtype)


def _truncate(a_start, a_len, b_start, b_len, labels, seq_len: int, rng) -> PairIndex:
  """The pairs truncated to `seq_len` - 3 tokens, chunk by chunk; the starts move in place.

  Which end each trimmed token came from is a fair coin per token: only the counts matter. All of
  A's counts are drawn before all of B's, elementwise (`binomial` draws element by element, so
  drawing a chunk at a time gives the same numbers as one call over all pairs).
  """
  max_tokens = seq_len - 3
  new_a, new_b = np.empty(len(a_len), length_dtype(seq_len)), np.empty(len(b_len), length_dtype(seq_len))
  chunks = [slice(c, c + _CHUNK) for c in range(0, len(labels), _CHUNK)]
  for c in chunks:
    new_a[c], new_b[c] = truncated_lengths(a_len[c], b_len[c], max_tokens)
  for start, length, new in ((a_start, a_len, new_a), (b_start, b_len, new_b)):
    for c in chunks:
      start[c] += rng.binomial(length[c].astype(np.int64) - new[c], 0.5)
  return PairIndex(a_start, new_a, b_start, new_b, labels)


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
