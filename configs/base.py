"""BERT-base (L12/H768/A12) with BERT's recipe: batch 256, 1M steps, seq 128 then 512.

`configs/base.py:phase=1` (default) trains steps 0-900k at seq 128 with 20 predictions;
`phase=2` continues to 1M at seq 512 with 80, started from phase 1 with
`--config.train.init_from=PHASE1_WORKDIR`; both phases share one learning-rate schedule.
The optimizer and batch defaults in configs/common.py are BERT's already. The vocabulary is
BERT's 30,522 WordPiece pieces, so that dry runs and `bertjax bench` size the MLM head as a real
run does; a run with `data.tokenizer` takes the tokenizer's own size, and a tokenizer bertjax
trains gets 30,522 pieces. The compact BERTs (mini, small, medium) and large inherit it, as
Google's released models share bert-base's vocabulary.

The layers are unrolled (`model.scan_layers=False`): on one H200 the train step is 30% faster
for base and 22% for large than with scanned layers, XLA's TPU cost model puts base on v5e 5.5%
faster with half the memory, and a GPU compiles the large step in about 40 s
(docs/performance.md). A deeper model, or a faster compile on a small machine, can scan again
with `--config.model.scan_layers=true`.
"""

from configs import common

TOTAL_STEPS = 1_000_000
PHASE1_STEPS = 900_000  # 90% of the steps at seq 128
BERT_VOCAB_SIZE = 30_522  # bert-base-uncased's WordPiece vocabulary


def get_config(arg: str | None = None):
  phase = common.config_args(arg, phase=(1, 2)).phase  # 1: seq 128, 2: seq 512
  c = common.get_config()
  c.model.variant = "base"
  c.model.scan_layers = False
  c.data.vocab_size = BERT_VOCAB_SIZE
  c.optim.schedule_steps = TOTAL_STEPS
  if phase == 1:
    c.train.steps = PHASE1_STEPS
  else:
    c.train.steps = TOTAL_STEPS
    c.data.seq_len = 512
    c.data.max_predictions = 80
  return c
