"""The pipeline a config asks for: the cached one, or with data.streaming the streaming one."""

from bertjax.data.base import Pipeline
from bertjax.data.cached import CachedPipeline
from bertjax.data.streaming import StreamingPipeline


def make_pipeline(config, tokenizer, workdir=None) -> Pipeline:
  """The pipeline `config.data.streaming` asks for: `CachedPipeline` (tokenised cache, random
  access) or `StreamingPipeline` (reads the corpus as a stream, no cache). Same interface.

  Args:
    config: a validated run config (its `data` and `train` sections are read).
    tokenizer: the run's tokenizer (`tokenizer.tokenizer_for_run`).
    workdir: the run folder; neither pipeline writes there (the cache is shared between runs).
  """
  if config.data.streaming:
    return StreamingPipeline(config, tokenizer, workdir)
  return CachedPipeline(config, tokenizer, workdir)
