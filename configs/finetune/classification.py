"""Fine-tuning on your own classification or regression data with BERT's recipe.

    bertjax finetune --task classification --config configs/finetune/classification.py \
        --init runs/base --workdir runs/mine --config.finetune.train_file=train.jsonl \
        --config.finetune.dev_file=dev.jsonl --config.finetune.labels=neg,pos

Files are .jsonl, .csv or .tsv with the columns text, text_pair (optional) and label (rename
them with finetune.text_column, text_pair_column, label_column). For a real-valued label set
finetune.regression=true instead of the labels. `lr=` sets the learning rate (default: by the
--init model's width, 2e-5 for BERT-base).
"""

from configs.finetune import recipe


def get_config(arg: str | None = None):
  c = recipe.recipe(recipe.config_args(arg, lr=recipe.BY_MODEL_SIZE).lr)
  c.finetune.task = "classification"
  return c
