"""BERT-small (L4/H512), one of Google's compact BERTs, on BERT-base's recipe and phases."""

from configs import base


def get_config(arg: str | None = None):
  c = base.get_config(arg)
  c.model.variant = "small"
  return c
