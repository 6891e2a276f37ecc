"""Fine-tuning on a GLUE task with BERT's recipe: batch 32, 3 epochs, AdamW, 10% warmup.

    bertjax finetune --task classification --config configs/finetune/glue.py:task=mrpc \
        --init runs/base --workdir runs/mrpc --config.finetune.data=GLUE_DIR

`task=` names the GLUE task (cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli), `lr=` the
learning rate: the paper picks the best of {5e-5, 4e-5, 3e-5, 2e-5} on the dev set (`bertjax
glue --lrs` runs that grid); by default the --init model's width decides (2e-5 for BERT-base and
large, 1e-4 for the compact BERTs, 1e-3 for the narrowest). Sequences are 128 tokens. The model's
sizes and the tokenizer come from the --init run.
"""

from configs.finetune import recipe


def get_config(arg: str | None = None):
  args = recipe.config_args(arg, task="", lr=recipe.BY_MODEL_SIZE)
  c = recipe.recipe(args.lr)
  c.finetune.glue_task = args.task
  c.finetune.task = "classification"
  return c
