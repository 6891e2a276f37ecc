"""Input-pipeline throughput: batches from the cached corpus, and tokenisation of raw text.

    python -m bertjax.data.bench --config configs/tiny.py [--workdir DIR] [--seconds S]

prints one JSON line. `pipeline_tokens_per_s` counts the non-padding tokens of finished,
masked global batches taken from the prefetching iterator by one process (the train loop's view);
`padding_fraction` and `pairs_per_row` describe those batches (with `data.pack_pairs`, several
pairs share a row), and for the cached pipeline `epoch_padding_fraction` the whole first epoch;
`tokenize_tokens_per_s` is one process encoding raw sentences of the corpus. With
`data.streaming=True` the pipeline figure includes reading, splitting and tokenising the stream
(the windows after the first; see `streaming.py`).
"""

import time

from etils import epath

from bertjax.data.corpus import load_corpus
from bertjax.data.pipeline import make_pipeline
from bertjax.data.tokenizer import tokenizer_for_run


def _tokenize_rate(corpus, tokenizer, max_chars: int = 4_000_000) -> dict:
  sentences, chars = [], 0
  for doc in corpus.documents():
    sentences.extend(doc)
    chars += sum(map(len, doc))
    if chars >= max_chars:
      break
  start = time.perf_counter()
  tokens = sum(map(len, tokenizer.encode_batch(sentences)))
  seconds = time.perf_counter() - start
  return {
    "tokenize_tokens_per_s": round(tokens / seconds),
    "tokenize_chars_per_s": round(chars / seconds),
    "tokenize_sentences": len(sentences),
  }


def _pipeline_rate(pipeline, seconds: float, start_step: int = 0) -> dict:
  pipeline.batch(start_step)  # builds the first epoch's pair index outside the timing
  tokens = masked = steps = positions = pairs = 0
  start = time.perf_counter()
  with pipeline.iterator(start_step) as it:
    for _, batch in it:
      tokens += int(batch["attention_mask"].sum())
      masked += int(batch["masked_weights"].sum())
      positions += batch["attention_mask"].size
      pairs += int(batch["nsp_weights"].sum()) if "nsp_weights" in batch else len(batch["nsp_labels"])
      steps += 1
      if time.perf_counter() - start >= seconds:
        break
  elapsed = time.perf_counter() - start
  direct = time.perf_counter()
  n_direct = max(3, steps // 4)
  for s in range(n_direct):
    pipeline.batch(start_step + steps + s)
  direct = (time.perf_counter() - direct) / n_direct
  return {
    "pipeline_tokens_per_s": round(tokens / elapsed),
    "pipeline_masked_per_s": round(masked / elapsed),
    "pipeline_steps_per_s": round(steps / elapsed, 2),
    "batch_ms": round(direct * 1000, 2),
    "steps_timed": steps,
    "padding_fraction": round(1 - tokens / positions, 4),
    "pairs_per_row": round(pairs / (steps * pipeline.batch_size), 3),
  }


def run(config, workdir, seconds: float = 10.0) -> dict:
  """Measures both throughputs for `config`; returns one flat dict of figures.

  Args:
    config: a validated run config.
    workdir: the folder whose tokenizer is used, or trained there on first use.
    seconds: how long the prefetching iterator is timed.
  Returns:
    The figures the module docstring names, with the config's data settings.
  """
  workdir = epath.Path(workdir)
  tokenizer = tokenizer_for_run(config, workdir)
  start = time.perf_counter()
  pipeline = make_pipeline(config, tokenizer, workdir)
  setup_s = time.perf_counter() - start
  result = {
    "source": config.data.source,
    "seq_len": int(config.data.seq_len),
    "batch_size": int(config.train.batch_size),
    "vocab_size": tokenizer.vocab_size,
    "whole_word_mask": bool(config.data.whole_word_mask),
    "streaming": bool(config.data.streaming),
    "pack_pairs": bool(config.data.pack_pairs),
    "corpus_tokens": pipeline.stats.get("tokens"),
    "pipeline_setup_s": round(setup_s, 2),
  }
  result.update(_pipeline_rate(pipeline, seconds))
  if "padding_fraction" in pipeline.stats:  # the cached pipeline's whole first epoch
    result["epoch_padding_fraction"] = round(pipeline.stats["padding_fraction"], 4)
    result["epoch_pairs_per_row"] = round(pipeline.stats["pairs_per_epoch"] / pipeline.stats["rows_per_epoch"], 3)
  if config.data.streaming:
    result["stream_tokens_read"] = pipeline.stats["tokens_read"]  # one pass (epoch 0) so far
  result.update(_tokenize_rate(load_corpus(config), tokenizer))
  return result
