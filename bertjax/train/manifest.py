"""The manifest of a checkpoint step: every file with its size and SHA-256, written once the save is complete.

    WORKDIR/checkpoints/N/bertjax_manifest.json
      {"step": N, "files": {path: size}, "sha256": {path: hex digest}}

    write(step_dir, step)          after orbax has finished the step: walk, hash, write (atomically)
    quick_check(step_dir)          True / False / None (no manifest): the listing and sizes only
    damage(step_dir, items)        None when the files of `items` match sizes and digests, else why
    digested(step_dir, items)      whether `damage` checked digests (not sizes alone) for them

`files` keeps the form bertjax 0.1.0 wrote (sizes), so its manifests still read and a manifest
written now still reads in 0.1.0; `sha256` catches what keeps sizes (flipped bytes). A manifest
without `sha256` is checked by sizes alone. Retention asks `quick_check` (a listing, no reads);
a restore asks `damage`, which reads every file it checks.
"""

import hashlib
import json
import os
from collections.abc import Iterable
from concurrent import futures

from etils import epath

from bertjax import atomic

MANIFEST = "bertjax_manifest.json"
_STAGING_PREFIX = atomic.staging_prefix(MANIFEST)  # a manifest being written
_CHUNK = 4 * 2**20
# Reading and hashing release the GIL: a restore checks several files at once.
_RESTORE_WORKERS = min(8, os.cpu_count() or 1)


def step_files(step_dir: epath.Path) -> dict[str, int]:
  """Every file below `step_dir` (but the manifest) with its size, walked folder by folder."""
  files, folders = {}, [epath.Path(step_dir)]
  while folders:
    for path in folders.pop().iterdir():
      if path.is_dir():
        folders.append(path)
      elif path.name != MANIFEST and not path.name.startswith(_STAGING_PREFIX):
        files[str(path.relative_to(step_dir))] = path.stat().length
  return dict(sorted(files.items()))


def sha256(path: epath.Path) -> str:
  """The hex SHA-256 of a file's bytes, read in chunks."""
  digest = hashlib.sha256()
  with path.open("rb") as f:
    while chunk := f.read(_CHUNK):
      digest.update(chunk)
  return digest.hexdigest()


def write(step_dir: epath.Path, step: int) -> None:
  """Record the files of a complete step. Runs on a background thread: reading a base-sized step
  (1.3 GB) takes about a second, which the training thread never waits for."""
  step_dir = epath.Path(step_dir)
  files = step_files(step_dir)
  digests = {name: sha256(step_dir / name) for name in files}
  atomic.write_text(step_dir / MANIFEST, json.dumps({"step": step, "files": files, "sha256": digests}))


def _read(step_dir: epath.Path) -> dict | None:
  """The manifest, {} when it cannot be read, None when there is none."""
  path = step_dir / MANIFEST
  if not path.exists():
    return None
  try:
    manifest = json.loads(path.read_text())
  except ValueError:
    return {}
  return manifest if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict) else {}


def quick_check(step_dir: epath.Path) -> bool | None:
  """True when the files and sizes match the manifest; False when not; None without a manifest."""
  manifest = _read(epath.Path(step_dir))
  if manifest is None:
    return None
  return bool(manifest) and step_files(step_dir) == manifest["files"]


def digested(step_dir: epath.Path, items: Iterable[str] | None = None) -> bool:
  """Whether the manifest has a digest of every file of `items`: then `damage` proved them intact."""
  manifest = _read(epath.Path(step_dir))
  if not manifest or not isinstance(manifest.get("sha256"), dict):
    return False
  items = None if items is None else set(items)
  return all(name in manifest["sha256"] for name in manifest["files"] if _in_items(name, items))


def _in_items(name: str, items: Iterable[str] | None) -> bool:
  """Top-level files belong to every item; the rest to the item folder they are in."""
  return items is None or "/" not in name or name.split("/", 1)[0] in items


def damage(step_dir: epath.Path, items: Iterable[str] | None = None) -> str | None:
  """Why the files of `items` (default: all) do not match the manifest, or None when they do.

  A step without a manifest is None: orbax committed it, and nothing recorded its contents.
  """
  step_dir = epath.Path(step_dir)
  manifest = _read(step_dir)
  if manifest is None:
    return None
  if not manifest:
    return f"its {MANIFEST} cannot be read"
  items = None if items is None else set(items)
  expected = {k: v for k, v in manifest["files"].items() if _in_items(k, items)}
  found = {k: v for k, v in step_files(step_dir).items() if _in_items(k, items)}
  missing = sorted(set(expected) - set(found))
  if missing:
    return f"{missing[0]} is missing" + (f" (and {len(missing) - 1} more files)" if len(missing) > 1 else "")
  extra = sorted(set(found) - set(expected))
  if extra:
    return f"{extra[0]} is not in its manifest"
  for name, size in expected.items():
    if found[name] != size:
      return f"{name} has {found[name]} bytes, the manifest says {size}"
  digests = manifest.get("sha256") or {}
  names = [name for name in expected if name in digests]
  with futures.ThreadPoolExecutor(_RESTORE_WORKERS) as pool:
    for name, digest in zip(names, pool.map(lambda n: sha256(step_dir / n), names)):
      if digest != digests[name]:
        return f"{name} differs from its SHA-256 in the manifest (changed after the save)"
  return None
