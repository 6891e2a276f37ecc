"""BERT-tiny (L2/H128) on the builtin corpus: the default of `make train`, minutes on a CPU.

The builtin corpus (Python's own documentation) is small, so the vocabulary is about 8,000
pieces and the schedule is short with a larger learning rate than BERT-base's.
"""

from configs import common


def get_config(arg: str | None = None):
  del arg
  c = common.get_config()
  c.model.variant = "tiny"
  c.data.source = "builtin"
  c.data.vocab_size = 8000
  c.train.batch_size = 64
  c.train.steps = 2000
  c.train.log_every = 50
  c.train.eval_every = 500
  c.train.eval_batches = 8
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 100
  c.checkpoint.every_steps = 500
  return c
