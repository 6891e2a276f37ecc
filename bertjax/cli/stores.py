"""The object stores a command touches: set up and checked before any other work.

    prepare_stores(args, config=None)   gcsfs with bounded requests; every gs:// path the command
                                        names (its flags, and the config's corpus, init, tokenizer
                                        and fine-tuning files) checked for its bucket and credentials
    quiet_store_clients()               the clients' per-request chatter off the console

A bucket that does not exist or credentials that are missing are one line naming the flag or key,
the path and the fix (exit status 2), before any device work and before anything is written.
"""

import logging

from bertjax import storage

# Flags of the commands that name a folder or file (`data` is `bertjax glue`'s GLUE folder).
_PATH_FLAGS = ("workdir", "init", "out", "hf", "data")
# Config keys that name a folder or file (data.source is read by its own syntax).
_CONFIG_PATH_KEYS = (
  "data.tokenizer",
  "data.cache_dir",
  "train.init_from",
  "finetune.init",
  "finetune.data",
  "finetune.train_file",
  "finetune.dev_file",
)


def quiet_store_clients() -> None:
  """gcsfs logs every retried request and fallback, with tracebacks, up to ERROR; google's clients
  likewise. Their real failures reach bertjax as exceptions, which say what went wrong in one line."""
  for name in ("gcsfs", "fsspec", "google", "urllib3"):
    logging.getLogger(name).setLevel(logging.CRITICAL)


def _config_paths(config) -> list[tuple[str, str]]:
  """(key, path) of every path a config names."""
  if config is None:
    return []
  kind, _, arg = str(config.data.source).partition(":")
  out = [("data.source", arg.split("*", 1)[0])] if kind in ("files", "disk", "prepared") and arg else []
  for key in _CONFIG_PATH_KEYS:
    section, _, name = key.partition(".")
    value = config[section].get(name) if section in config else None
    out.extend([(key, str(value))] if value else [])
  return out


def prepare_stores(args, config=None) -> None:
  """Configure gcsfs, then check every gs:// path of the command's flags and of `config`.

  Raises:
    BertjaxError: a bucket that does not exist, missing credentials, or a store out of reach.
  """
  storage.configure_gcsfs()
  quiet_store_clients()
  named = [(f"--{flag}", getattr(args, flag, None)) for flag in _PATH_FLAGS] + _config_paths(config)
  checked = set()
  for what, path in named:
    if path and str(path).startswith("gs://"):
      bucket = str(path).removeprefix("gs://").split("/", 1)[0]
      if bucket not in checked:
        storage.check_reachable(path, what)
        checked.add(bucket)
