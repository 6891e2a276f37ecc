"""BERT's fine-tuning recipe (Devlin et al. 2018, appendix A.3), which the other files here change.

AdamW as in pretraining (no bias correction, weight decay 0.01 except on biases and LayerNorm,
gradients clipped at global norm 1.0), warmup over the first 10% of the steps then linear decay
to 0, batch 32, dropout 0.1, 3 epochs, sequences of 128 tokens. The paper picks the learning
rate among {5e-5, 4e-5, 3e-5, 2e-5} on the dev set; `lr=` sets one, and left out the --init
model's width decides (`bertjax.config.loading.finetuning_learning_rate`).
"""

from configs import common

config_args = common.config_args


# lr=0: the learning rate the --init model's width calls for (the paper's 2e-5 for BERT-base and
# large, larger for compact models: bertjax.config.loading.finetuning_learning_rate).
BY_MODEL_SIZE = 0.0


def get_config(arg: str | None = None):
  """The recipe on its own (`lr=` sets the learning rate); the task files start from `recipe`."""
  return recipe(config_args(arg, lr=BY_MODEL_SIZE).lr)


def recipe(lr: float):
  c = common.get_config()
  c.optim.lr = lr
  c.optim.name = "adamw"
  c.optim.weight_decay = 0.01
  c.optim.clip_norm = 1.0
  c.optim.decay = "linear"
  c.optim.end_lr = 0.0
  c.train.batch_size = 32
  c.train.log_every = 50
  c.finetune.epochs = 3
  c.finetune.warmup_fraction = 0.1
  c.finetune.max_seq_len = 128
  c.checkpoint.every_steps = 1000
  c.checkpoint.keep = 2
  return c
