"""BERT-mini (L4/H256), one of Google's compact BERTs, on BERT-base's recipe and phases."""

from configs import base


def get_config(arg: str | None = None):
  c = base.get_config(arg)
  c.model.variant = "mini"
  return c
