"""Checkpoints with orbax: async saves, exact resume, retention that checks validity, warm starts.

    WORKDIR/checkpoints/N/
      params/ opt_state/      orbax StandardSave of plain dicts (restored onto any mesh)
      meta/                   JSON: step, rng, data position, config, model sizes, tokenizer
                              fingerprint, code version
      bertjax_manifest.json   every file of the step with its size, written once the save is
                              complete: a truncated or missing file shows against it

A step is *good* when its manifest matches the files on disk. Resume takes the newest step that
restores, warning about (and skipping) any that does not. Retention keeps the newest
`checkpoint.keep` good steps plus every `checkpoint.keep_period`-th, and never deletes a step
while fewer good ones are newer: orbax's own retention deletes by step number, not by validity,
so it is off (max_to_keep=None) and this module prunes.
"""

import dataclasses
import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import serialization

import bertjax
from bertjax.errors import BertjaxError

log = logging.getLogger(__name__)
CHECKPOINT_DIR = "checkpoints"
MANIFEST = "bertjax_manifest.json"
ITEMS = ("params", "opt_state", "meta")
# Sizes that must match for a checkpoint's parameters to fit the model (dtype, dropout, remat
# and attention kernel may change between runs; the arrays do not).
STRUCTURAL_KEYS = (
  "vocab_size",
  "hidden_size",
  "num_layers",
  "num_heads",
  "intermediate_size",
  "max_position_embeddings",
  "type_vocab_size",
)


class CheckpointError(BertjaxError):
  """A checkpoint could not be written or read; the run stops rather than go on without one."""


def _step_files(step_dir: epath.Path) -> dict[str, int]:
  """Every file below `step_dir` (but the manifest) with its size, walked folder by folder."""
  files, folders = {}, [epath.Path(step_dir)]
  while folders:
    for path in folders.pop().iterdir():
      if path.is_dir():
        folders.append(path)
      elif path.name != MANIFEST:
        files[str(path.relative_to(step_dir))] = path.stat().length
  return dict(sorted(files.items()))


def is_good(step_dir: epath.Path) -> bool | None:
  """True when the manifest matches the files; False when it does not; None without a manifest."""
  manifest = step_dir / MANIFEST
  if not manifest.exists():
    return None
  try:
    expected = json.loads(manifest.read_text())["files"]
  except (ValueError, KeyError):
    return False
  return _step_files(step_dir) == expected


class Checkpoints:
  """The checkpoints of one workdir: save, restore, retention. Use as a context manager."""

  def __init__(self, workdir, checkpoint_cfg=None, *, read_only: bool = False):
    # orbax's finalisation wants absolute paths; `make train` passes runs/tiny.
    local = "://" not in str(workdir)
    self.dir = epath.Path(os.path.abspath(workdir) if local else workdir) / CHECKPOINT_DIR
    cfg = checkpoint_cfg
    self.keep = cfg.keep if cfg is not None else 0
    self.keep_period = cfg.keep_period if cfg is not None else 0
    options = ocp.CheckpointManagerOptions(
      max_to_keep=None,
      create=not read_only,
      read_only=read_only,
      cleanup_tmp_directories=not read_only,
      enable_async_checkpointing=bool(cfg["async"]) if cfg is not None else False,
    )
    self.manager = ocp.CheckpointManager(self.dir, options=options, item_names=ITEMS)
    self._unsealed: list[int] = []  # saved steps whose manifest is not written yet
    self.is_primary = jax.process_index() == 0

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, tb):
    if exc_type is None:
      self.close()
      return
    try:  # already failing: finish what can be finished, but never mask the first error
      self.close()
    except Exception as e:
      log.warning("while stopping after an error, closing the checkpoints failed too: %s", e)

  # -- what is there -------------------------------------------------------------------------
  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def good_steps(self) -> list[int]:
    return [s for s in self.steps() if is_good(self.dir / str(s))]

  def reached_preemption(self, step: int) -> bool:
    """orbax's preemption sync point: True on every process at the same step after a preemption
    notice to any of them (JAX's preemption service; every process must ask at every step)."""
    return self.manager.reached_preemption(step)

  # -- saving --------------------------------------------------------------------------------
  def save(self, state, meta: dict, *, wait: bool = False) -> None:
    """Save `state` (a TrainState) at its step with `meta`; asynchronous unless `wait`."""
    step = int(jax.device_get(state.step))
    meta = {
      **meta,
      "step": step,
      "rng": np.asarray(jax.device_get(state.rng)).tolist(),
      "code_version": bertjax.__version__,
    }
    args = ocp.args.Composite(
      params=ocp.args.StandardSave(state.params),
      opt_state=ocp.args.StandardSave(serialization.to_state_dict(state.opt_state)),
      meta=ocp.args.JsonSave(meta),
    )
    try:
      self.manager.save(step, args=args, force=True)  # also surfaces an earlier async failure
    except Exception as e:
      raise CheckpointError(
        f"saving checkpoint step {step} to {self.dir} failed ({type(e).__name__}: "
        f"{str(e).splitlines()[0] if str(e) else ''}); the run stops rather than go on "
        "without checkpoints: check the workdir's space and permissions"
      ) from e
    self._unsealed.append(step)
    if wait:
      self.wait()
    else:
      self._seal(finished=self._unsealed[:-1])

  def wait(self) -> None:
    """Wait for pending saves, then seal and prune."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      raise CheckpointError(
        f"an asynchronous checkpoint save to {self.dir} failed ({type(e).__name__}: {e}); "
        "the run stops rather than go on without checkpoints"
      ) from e
    self._seal(finished=list(self._unsealed))

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self.manager.close()

  def _seal(self, finished: list[int]) -> None:
    """Write the manifests of completed saves, then apply retention."""
    for step in finished:
      step_dir = self.dir / str(step)
      if self.is_primary and step_dir.exists():  # absent: the save failed, and said so
        (step_dir / MANIFEST).write_text(json.dumps({"step": step, "files": _step_files(step_dir)}))
      self._unsealed.remove(step)
    if finished:
      self._prune()

  def _prune(self) -> None:
    if not self.keep:
      return
    steps, good = self.steps(), self.good_steps()
    newest_good = good[-self.keep :]
    if len(newest_good) < self.keep:
      return  # not enough good steps yet: delete nothing
    keep = set(newest_good) | {s for s in steps if s > newest_good[-1] or s in self._unsealed}
    if self.keep_period:
      keep |= {s for s in good if s % self.keep_period == 0}
    for step in steps:
      if step not in keep and step < newest_good[0]:
        self.manager.delete(step)

  # -- restoring -----------------------------------------------------------------------------
  def _candidates(self, step: int | None) -> list[int]:
    if step is not None:
      if step not in self.steps():
        raise CheckpointError(f"--step {step}: no such checkpoint in {self.dir}; present: {self.steps() or 'none'}")
      return [step]
    return self.steps()[::-1]

  def _restore_items(self, step: int, args: dict) -> dict:
    good = is_good(self.dir / str(step))
    if good is False:
      raise ValueError("its files do not match its manifest (truncated or missing files)")
    return self.manager.restore(step, args=ocp.args.Composite(**args))

  def read_meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def _first_restorable(self, step: int | None, make_args, check=None) -> tuple[int, dict]:
    """The newest candidate that restores; `check(meta)` may refuse a readable one outright."""
    problems = []
    for candidate in self._candidates(step):
      try:
        if check is not None:
          meta = self.read_meta(candidate)
          check(meta)  # a BertjaxError here is the user's to fix, not a broken checkpoint
        return candidate, self._restore_items(candidate, make_args())
      except BertjaxError:  # CheckpointError included: the user's to fix
        raise
      except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        if step is not None:
          raise CheckpointError(f"checkpoint step {step} in {self.dir} cannot be restored: {reason}") from e
        log.warning("skipping checkpoint step %d in %s: %s", candidate, self.dir, reason)
        problems.append(candidate)
    raise CheckpointError(
      f"no checkpoint in {self.dir} can be restored (tried steps {problems}); remove the folder to start afresh"
    )

  def restore(self, abstract_state, step: int | None = None, check=None):
    """(state, meta) of `step` or the newest restorable step, placed as `abstract_state` says.

    `check(meta)` runs on a step's meta before its arrays are read (model sizes, tokenizer).
    """

    def make_args():
      return dict(
        params=ocp.args.StandardRestore(abstract_state.params),
        opt_state=ocp.args.StandardRestore(serialization.to_state_dict(abstract_state.opt_state)),
        meta=ocp.args.JsonRestore(),
      )

    _, items = self._first_restorable(step, make_args, check)
    meta = items["meta"]
    rng_sharding = abstract_state.rng.sharding
    state = abstract_state.replace(
      step=jax.device_put(jnp.asarray(meta["step"], jnp.int32), abstract_state.step.sharding),
      params=items["params"],
      opt_state=serialization.from_state_dict(abstract_state.opt_state, items["opt_state"]),
      rng=jax.device_put(np.asarray(meta["rng"], np.uint32), rng_sharding),
    )
    return state, meta

  def restore_params(self, abstract_params=None, step: int | None = None, check=None):
    """(params, meta) of a step; without `abstract_params`, host arrays shaped as saved."""

    def make_args():
      target = abstract_params
      if target is None:
        shapes = self.manager.item_metadata(self._candidates(step)[0])["params"]
        target = jax.tree.map(lambda m: np.empty(m.shape, m.dtype), shapes)
      return dict(params=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())

    _, items = self._first_restorable(step, make_args, check)
    params = items["params"] if abstract_params is not None else jax.tree.map(np.asarray, items["params"])
    return params, items["meta"]


def checkpoint_bytes(abstract_state) -> int:
  """About what one checkpoint of this state takes on disk (uncompressed array bytes)."""
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract_state))


def check_room(workdir, abstract_state) -> None:
  """Fail before training when a local workdir has no room for one more checkpoint."""
  if "://" in str(workdir):
    return  # object stores report no free space
  needed = checkpoint_bytes(abstract_state)
  free = shutil.disk_usage(os.fspath(workdir)).free
  if free < needed:
    raise BertjaxError(
      f"--workdir {workdir}: {free / 2**20:,.0f} MiB free, but one checkpoint needs about "
      f"{needed / 2**20:,.1f} MiB; free some space or choose another folder"
    )


def model_sizes(model_config) -> dict:
  sizes = dataclasses.asdict(model_config)
  return {k: sizes[k] for k in STRUCTURAL_KEYS}


def check_compatible(meta: dict, model_config, tokenizer_fingerprint: str | None, source: str) -> None:
  """Refuse a checkpoint whose parameters or tokenizer do not fit this run."""
  saved, current = meta.get("model", {}), model_sizes(model_config)
  differing = [f"{k} {saved.get(k)} -> {current[k]}" for k in STRUCTURAL_KEYS if saved.get(k) != current[k]]
  if differing:
    raise BertjaxError(
      f"{source}: the model differs from the checkpoint's ({', '.join(differing)}); "
      "use the checkpoint's model config or a new workdir"
    )
  saved_tokenizer = meta.get("tokenizer_fingerprint")
  if tokenizer_fingerprint and saved_tokenizer and saved_tokenizer != tokenizer_fingerprint:
    raise BertjaxError(
      f"{source}: the tokenizer ({tokenizer_fingerprint}) differs from the one the checkpoint "
      f"was trained with ({saved_tokenizer}); use that tokenizer or a new workdir"
    )


def warm_start(init_from, steps, model_config, *, params_only: bool, seed: int, tokenizer_fingerprint=None):
  """A TrainState for a new run from another run's newest good checkpoint.

  By default the parameters, optimizer state and global step carry over (phase 2 continues
  phase 1's learning-rate schedule); with `params_only`, only the parameters do, and the
  optimizer starts afresh at step 0 (fine-tuning, a new optimizer). `steps` is the new run's
  CompiledSteps: the state lands on its mesh.
  """
  with Checkpoints(init_from, read_only=True) as source:
    if not source.steps():
      raise BertjaxError(f"train.init_from={init_from}: no checkpoints there; point it at a bertjax run folder")

    def check(meta):
      check_compatible(meta, model_config, tokenizer_fingerprint, f"train.init_from={init_from}")

    if params_only:
      params, _ = source.restore_params(steps.abstract_state().params, check=check)
      return steps.init(seed).replace(params=params)
    state, _ = source.restore(steps.abstract_state(), check=check)
    return state
