"""Fine-tuning on a GLUE task with BERT's recipe: batch 32, 3 epochs, AdamW, 10% warmup.

    bertjax finetune --task classification --config configs/finetune/glue.py:task=mrpc \
        --init runs/base --workdir runs/mrpc --config.finetune.data=GLUE_DIR

`task=` names the GLUE task (cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli), `lr=` the
learning rate: the paper picks the best of {5e-5, 4e-5, 3e-5, 2e-5} on the dev set (the
recipe's grid is {2e-5, 3e-5, 5e-5}); 2e-5 is the default. Sequences are 128 tokens. The model's
sizes and the tokenizer come from the --init run.
"""

from configs.finetune import recipe


def get_config(arg: str | None = None):
  args = recipe.config_args(arg, task="", lr=2e-5)
  c = recipe.recipe(args.lr)
  c.finetune.glue_task = args.task
  c.finetune.task = "classification"
  return c
