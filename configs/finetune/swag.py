"""SWAG (multiple choice) with the paper's settings: 3 epochs at lr 2e-5, batch 16 (section 4.4),
BERT's AdamW with 10% warmup, 128 tokens a choice.

    bertjax finetune --task multiple_choice --config configs/finetune/swag.py --init runs/base \
        --workdir runs/swag --config.finetune.train_file=train.csv \
        --config.finetune.dev_file=val.csv

Files are SWAG's official train.csv / val.csv or .jsonl rows of context, start, endings and
label. Each of an example's four choices is `[CLS] sent1 [SEP] sent2 endingK [SEP]`; the pooled
[CLS] output of each gives one score, and a softmax over them picks the answer. `lr=` sets the
learning rate (the paper's 2e-5 whatever the model, as SQuAD's files keep theirs).
"""

from configs.finetune import recipe


def get_config(arg: str | None = None):
  c = recipe.recipe(recipe.config_args(arg, lr=2e-5).lr)
  c.finetune.task = "multiple_choice"
  c.train.batch_size = 16
  c.finetune.epochs = 3
  return c
