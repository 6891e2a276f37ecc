"""The gs:// paths a command names, checked before any other work.

    check_flags(args)      gcsfs set up with bounded requests; every gs:// path among the command's
                           flags checked for its bucket and credentials (called once, by main)
    check_config(config)   the same for the paths the config names: corpus, tokenizer, cache,
                           init and fine-tuning files (called where the config is loaded)

A bucket that does not exist or credentials that are missing are one line naming the flag or key,
the path and the fix (exit status 2), before any device work and before anything is written.
"""

from bertjax import storage
from bertjax.config import paths  # the config keys that name a folder or file
from bertjax.data import corpus

# Flags of the commands that name a folder or file (`data` is `bertjax glue`'s GLUE folder).
_PATH_FLAGS = ("workdir", "init", "out", "hf", "data")


def _check(named) -> None:
  """Each bucket of the (what, path) pairs checked once."""
  checked = set()
  for what, path in named:
    if path and str(path).startswith("gs://") and storage.bucket_of(path) not in checked:
      storage.check_reachable(path, what)
      checked.add(storage.bucket_of(path))


def check_flags(args) -> None:
  """Configure gcsfs, then check every gs:// flag of the command.

  Raises:
    BertjaxError: a bucket that does not exist, missing credentials, or a store out of reach.
  """
  storage.configure_gcsfs()
  _check((f"--{flag}", getattr(args, flag, None)) for flag in _PATH_FLAGS)


def check_config(config) -> None:
  """Check every gs:// path a loaded config names (the flags were checked by `check_flags`).

  Raises:
    BertjaxError: as `check_flags`.
  """
  kind, arg = corpus.parse_source(config.data.source)
  named = [("data.source", arg.split("*", 1)[0])] if kind in ("files", "disk", "prepared") else []
  for key in paths.PATH_KEYS:
    section, _, name = key.partition(".")
    named.append((key, config[section].get(name) if section in config else None))
  _check(named)
