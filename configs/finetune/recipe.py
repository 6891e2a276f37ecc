"""BERT's fine-tuning recipe (Devlin et al. 2018, appendix A.3), which the other files here change.

AdamW as in pretraining (no bias correction, weight decay 0.01 except on biases and LayerNorm,
gradients clipped at global norm 1.0), warmup over the first 10% of the steps then linear decay
to 0, batch 32, dropout 0.1, 3 epochs, sequences of 128 tokens. The learning rate is one of
{2e-5, 3e-5, 5e-5}.
"""

from configs import common

config_args = common.config_args


def get_config(arg: str | None = None):
  """The recipe on its own (`lr=` sets the learning rate); the task files start from `recipe`."""
  return recipe(config_args(arg, lr=2e-5).lr)


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
