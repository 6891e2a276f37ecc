"""BERT-tiny (L2/H128) on the builtin corpus: the default of `make train`, minutes on a CPU.

The builtin corpus (Python's own documentation, ~400k tokens) is small, so the vocabulary is
about 8,000 pieces, sequences are 64 tokens, and the schedule is short with a larger learning rate
than BERT-base's. The warmup is long for its length on purpose: BERT's AdamW has no bias
correction, so its first few hundred updates are up to 3x the nominal rate, and with 100 warmup
steps at 2e-3 the model stayed on the unigram plateau (MLM accuracy = the most-frequent-token
baseline) for 1,200 steps; 300 steps at 1e-3 leave it within 400.
"""

from configs import common


def get_config(arg: str | None = None):
  common.config_args(arg)  # takes none
  c = common.get_config()
  c.model.variant = "tiny"
  c.data.source = "builtin"
  c.data.vocab_size = 8000
  c.data.seq_len = 64
  c.data.max_predictions = 10  # 15% of 64
  c.data.eval_fraction = 0.05  # ~30 of 605 documents: a held-out NSP set that is not lopsided
  c.train.batch_size = 64
  c.train.steps = 1500
  c.train.log_every = 50
  c.train.eval_every = 500
  c.train.eval_batches = 8
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 300
  c.checkpoint.every_steps = 500
  return c
