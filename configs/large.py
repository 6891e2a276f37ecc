"""BERT-large (L24/H1024/A16): BERT-base's recipe, phases and 30,522-piece vocabulary with the larger encoder."""

from configs import base


def get_config(arg: str | None = None):
  c = base.get_config(arg)
  c.model.variant = "large"
  return c
