"""The file and folder names in a config: absolute once loaded, relative to the run's folder in it.

    absolute(config)                  relative local paths -> absolute (from the working directory)
    to_workdir(values, workdir)       a config dict as WORKDIR/config.json stores it: paths inside
                                      WORKDIR relative to it ("./tokenizer"), the others absolute
    from_workdir(config, workdir)     a config read from WORKDIR/config.json: those relative paths
                                      joined to WORKDIR again

So a command run from another directory (`bertjax eval --workdir W`) finds what the run read, and
a run folder moved or copied whole still finds what it holds. Object-store paths (gs://) and hub
names (hf:) are left as they are.
"""

import os

from bertjax.data import corpus

# Keys whose value names a file or folder; data.source names one after its kind (files:GLOB, ...).
PATH_KEYS = (
  "data.tokenizer",
  "data.cache_dir",
  "train.init_from",
  "finetune.init",
  "finetune.data",
  "finetune.train_file",
  "finetune.dev_file",
)
_SOURCE_KINDS = ("files", "prepared", "disk")
_HERE = "./"


def _local(value: str) -> bool:
  return bool(value) and "://" not in value and not value.startswith("hf:")


def _map(get, set_, change) -> None:
  """Apply `change` to every local path of a config (through `get(section, key)` / `set_`)."""
  for key in PATH_KEYS:
    section, name = key.split(".")
    value = get(section, name)
    if isinstance(value, str) and _local(value):
      set_(section, name, change(value))
  source = get("data", "source")
  if isinstance(source, str) and source.partition(":")[0] in _SOURCE_KINDS:
    kind, arg = corpus.parse_source(source)
    if _local(arg):
      set_("data", "source", f"{kind}:{change(arg)}")


def absolute(config) -> None:
  """Relative local paths of a (not yet validated) config, made absolute."""
  _map(lambda s, k: config[s][k], lambda s, k, v: config[s].__setitem__(k, v), os.path.abspath)


def to_workdir(values: dict, workdir) -> dict:
  """`values` (a config as a dict) with local paths inside `workdir` written relative to it."""
  root = str(workdir)
  local_root = _local(root) and os.path.abspath(root)

  def relative(path: str) -> str:
    if local_root and os.path.isabs(path) and os.path.commonpath([path, local_root]) == local_root:
      return _HERE + os.path.relpath(path, local_root)
    return path

  out = {section: dict(entries) if isinstance(entries, dict) else entries for section, entries in values.items()}
  _map(lambda s, k: out.get(s, {}).get(k), lambda s, k, v: out[s].__setitem__(k, v), relative)
  return out


def from_workdir(config, workdir) -> None:
  """A config read from WORKDIR/config.json, its workdir-relative paths joined to `workdir`."""

  def joined(path: str) -> str:
    return os.path.join(str(workdir), path.removeprefix(_HERE)) if path.startswith(_HERE) else path

  _map(lambda s, k: config[s][k], lambda s, k, v: config[s].__setitem__(k, v), joined)
