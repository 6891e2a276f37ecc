"""Fine-tuning on SQuAD v1.1 with google-research/bert's settings: 384-token windows 128 apart,
questions of at most 64 tokens, 2 epochs at lr 3e-5, batch 32; answers of at most 30 tokens
from the 20 best starts and ends.

    bertjax finetune --task qa --config configs/finetune/squad.py --init runs/base \
        --workdir runs/squad --config.finetune.train_file=train-v1.1.json \
        --config.finetune.dev_file=dev-v1.1.json

(or --config.finetune.data=hf:rajpurkar/squad, online). `lr=` sets the learning rate.
"""

from configs.finetune import recipe


def get_config(arg: str | None = None, default_lr: float = 3e-5):
  c = recipe.recipe(recipe.config_args(arg, lr=default_lr).lr)
  c.finetune.task = "qa"
  c.finetune.epochs = 2
  c.finetune.max_seq_len = 384
  c.finetune.doc_stride = 128
  c.finetune.max_query_len = 64
  c.finetune.n_best = 20
  c.finetune.max_answer_len = 30
  return c
