"""What a fine-tune's result depends on, recorded in its workdir, so a result always belongs to its inputs.

    of_run(config)                  {init, data, task, recipe}: the --init checkpoint (its step and
                                    manifest digest), the data files' SHA-256 (or the hub dataset's
                                    name and splits), the task, and every config value that changes
                                    what is trained
    differences(saved, current)     one phrase per part that differs ("the data file dev.jsonl changed")
    read(workdir) / write(...)      WORKDIR/fingerprint.json

Values that change only how a run is carried out (logging, checkpoint cadence, the mesh, caches,
paths of the run's own folders) are not part of it: a resume on another mesh is the same run.
"""

import hashlib
import json

from etils import epath

from bertjax import atomic
from bertjax.config import loading as config_loading
from bertjax.finetune import sources
from bertjax.tasks import GLUE
from bertjax.train import checkpoint, manifest

FILENAME = "fingerprint.json"
# Sections (or section.key) of the config that say how a run is carried out, not what it learns.
_NOT_RECIPE = (
  "mesh",
  "checkpoint",
  "metrics",
  "train.log_every",
  "train.eval_every",
  "train.eval_batches",
  "train.profile_steps",
  "train.compilation_cache",
  "train.distributed_timeout_s",
  "data.cache_dir",
  "data.num_proc",
  "data.prefetch",
  "finetune.init",  # the init's identity is its checkpoint, not its path
  "finetune.data",  # the data's identity is its files' contents
  "finetune.train_file",
  "finetune.dev_file",
)


def _sha256(path: epath.Path) -> str:
  digest = hashlib.sha256()
  with path.open("rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _data_files(f) -> dict[str, epath.Path]:
  """The local files a fine-tune reads, by the name a message gives them."""
  if f.glue_task and not f.data.startswith("hf:"):
    folder = sources.glue_task_folder(f.data, f.glue_task)
    names = ["train.tsv", *GLUE[f.glue_task].dev_files.values()]
    return {name: folder / name for name in names}
  return {epath.Path(p).name: epath.Path(p) for p in (f.train_file, f.dev_file) if p}


def _data(f) -> dict[str, str]:
  if f.data.startswith("hf:"):  # a hub dataset: its name and splits (its revision is the hub's)
    return {"hub dataset": f"{f.data} {f.train_split}/{f.dev_split}"}
  return {name: _sha256(path) for name, path in _data_files(f).items() if path.exists()}


def _init(init: str) -> dict:
  """The --init run's newest good checkpoint: its step and the digest of its manifest (which
  lists every file of the step with its SHA-256)."""
  with checkpoint.Checkpoints(init, read_only=True) as source:
    good = source.good_steps()
  if not good:
    return {"step": None}
  step_dir = epath.Path(init) / checkpoint.CHECKPOINT_DIR / str(good[-1])
  return {"step": good[-1], "checkpoint": _sha256(step_dir / manifest.MANIFEST)}


def _recipe(config) -> dict:
  values = config_loading.to_dict(config)
  for key in _NOT_RECIPE:
    section, _, name = key.partition(".")
    if name:
      values.get(section, {}).pop(name, None)
    else:
      values.pop(section, None)
  return values


def of_run(config) -> dict:
  """The fingerprint of a validated fine-tuning config's run."""
  f = config.finetune
  return {"init": _init(f.init), "data": _data(f), "task": f.task, "recipe": _recipe(config)}


def _flat(values: dict, prefix: str = "") -> dict:
  out = {}
  for key, value in values.items():
    out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
  return out


def differences(saved: dict, current: dict) -> list[str]:
  """What differs between two fingerprints, one phrase each, in the order init, data, task, recipe."""
  said = []
  if saved.get("init") != current["init"]:
    said.append("the --init checkpoint differs")
  old_data, new_data = saved.get("data", {}), current["data"]
  if set(old_data) != set(new_data):
    said.append(f"the data is {', '.join(sorted(new_data))}, not {', '.join(sorted(old_data))}")
  else:
    said.extend(f"the data {name} changed" for name in sorted(new_data) if old_data[name] != new_data[name])
  if saved.get("task") != current["task"]:
    said.append(f"the task is {current['task']}, not {saved.get('task')}")
  old, new = _flat(saved.get("recipe", {})), _flat(current["recipe"])
  for key in sorted(set(old) | set(new)):
    if old.get(key) != new.get(key):
      said.append(f"{key} is {new.get(key)!r}, not {old.get(key)!r}")
  return said


def read(workdir) -> dict | None:
  path = epath.Path(workdir) / FILENAME
  return json.loads(path.read_text()) if path.exists() else None


def write(workdir, fingerprint: dict) -> None:
  atomic.write_text(epath.Path(workdir) / FILENAME, json.dumps(fingerprint, indent=1, sort_keys=True) + "\n")
