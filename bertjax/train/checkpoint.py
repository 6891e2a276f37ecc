"""Checkpoints with orbax: async saves, exact resume, retention that checks validity, warm starts.

    WORKDIR/checkpoints/N/
      params/ opt_state/      orbax StandardSave of plain dicts (restored onto any mesh)
      meta/                   JSON: step, rng, data position, config, model sizes, tokenizer
                              fingerprint, code version
      bertjax_manifest.json   every file of the step with its size and SHA-256, written once the
                              save is complete (train/manifest.py)
    WORKDIR/checkpoints/N.damaged-TIME/   a step that failed to restore, moved out of the way

A step is *good* when its files and sizes match its manifest. Resume takes the newest step whose
files match their digests and that restores; a training run moves each newer step it skipped out
of orbax's step namespace (kept for inspection) and saves it afresh when it gets there. Process 0
checks and moves; every process restores the same step. Retention keeps the newest
`checkpoint.keep` good steps plus every `checkpoint.keep_period`-th and never deletes a step while
fewer good ones are newer (orbax's `max_to_keep` deletes by step number, not validity: it is off).
A failed save (a full disk, a lost permission) stops the run with one line naming the operating
system's reason; earlier steps stay as they were.
"""

import contextlib
import logging
import os
import time
from concurrent import futures

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import serialization

import bertjax
from bertjax.errors import BertjaxError
from bertjax.train import manifest, processes, save_failures

log = logging.getLogger(__name__)
CHECKPOINT_DIR = "checkpoints"
MANIFEST = manifest.MANIFEST
ITEMS = ("params", "opt_state", "meta")
DAMAGED = ".damaged-"  # N.damaged-TIME: not a step name to orbax, never a tmp folder either


class CheckpointError(BertjaxError):
  """A checkpoint could not be written or read; the run stops rather than go on without one."""


def is_good(step_dir: epath.Path) -> bool | None:
  """True when the manifest's files and sizes match; False when not; None without a manifest."""
  return manifest.quick_check(step_dir)


class Checkpoints:
  """The checkpoints of one workdir: save, restore, retention. Use as a context manager."""

  def __init__(self, workdir, checkpoint_cfg=None, *, read_only: bool = False):
    # orbax's finalisation wants absolute paths; `make train` passes runs/tiny.
    local = "://" not in str(workdir)
    self.dir = epath.Path(os.path.abspath(workdir) if local else workdir) / CHECKPOINT_DIR
    cfg = checkpoint_cfg
    self.keep = cfg.keep if cfg is not None else 0
    self.keep_period = cfg.keep_period if cfg is not None else 0
    self.read_only = read_only
    options = ocp.CheckpointManagerOptions(
      max_to_keep=None,
      create=not read_only,
      read_only=read_only,
      cleanup_tmp_directories=not read_only,
      enable_async_checkpointing=bool(cfg["async"]) if cfg is not None else False,
    )
    # Handlers named up front, so that a step's metadata (shapes, dtypes) reads before a restore.
    handlers = {
      "params": ocp.StandardCheckpointHandler(),
      "opt_state": ocp.StandardCheckpointHandler(),
      "meta": ocp.JsonCheckpointHandler(),
    }
    self.manager = ocp.CheckpointManager(self.dir, options=options, item_handlers=handlers)
    self.is_primary = jax.process_index() == 0
    self._resources = contextlib.ExitStack()  # closed by close()
    self._resources.enter_context(save_failures.quiet_orbax())
    self._in_flight: int | None = None  # the step orbax may still be writing
    self._sealing: dict[int, futures.Future] = {}  # steps whose manifest is being written
    # Manifests are written off the training thread (process 0 writes them all).
    self._sealer = futures.ThreadPoolExecutor(1, thread_name_prefix="bertjax-manifest")
    self._failed = False  # a save failed and said so: closing does not wait for it again

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, tb):
    if exc_type is None:
      self.close()
      return
    try:  # already failing: finish what can be finished, but never mask the first error
      self.close()
    except Exception as e:
      if not isinstance(exc, CheckpointError):  # a failed save has said what went wrong
        log.warning("while stopping after an error, closing the checkpoints failed too: %s", save_failures.one_line(e))

  # -- what is there -------------------------------------------------------------------------
  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def good_steps(self) -> list[int]:
    """The steps whose files and sizes match their manifest, oldest first (`is_good`)."""
    return [s for s in self.steps() if is_good(self.dir / str(s))]

  def damaged(self) -> list[str]:
    """The folders of steps moved aside as damaged, oldest first."""
    if not self.dir.exists():
      return []
    names = [p.name for p in self.dir.iterdir() if DAMAGED in p.name and p.name.split(".")[0].isdigit()]
    return sorted(names, key=lambda n: (int(n.split(".")[0]), n))

  def reached_preemption(self, step: int) -> bool:
    """orbax's preemption sync point: True on every process at the same step after a preemption
    notice to any of them (JAX's preemption service; every process must ask at every step)."""
    return self.manager.reached_preemption(step)

  # -- saving --------------------------------------------------------------------------------
  def save(self, state, meta: dict, *, wait: bool = False) -> None:
    """Save `state` (a TrainState) at its step with `meta`; asynchronous unless `wait`.

    Args:
      state: the TrainState; its `step` names the checkpoint and its `rng` goes into the meta.
      meta: JSON-serialisable run facts (model sizes, tokenizer fingerprint, data position, ...);
        `step`, `rng` and `code_version` are added.
      wait: block until this save and its manifest are written, then prune.
    Raises:
      CheckpointError: this save, a previous one in flight, or a manifest could not be written
        (one line with the operating system's reason and the steps still intact).
    """
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
    self._finish_save()  # orbax would wait for it inside save(); here a failure names its step
    sealed = self._check_sealed(block=False)
    unwritable = save_failures.probe(self.dir, save_failures.checkpoint_bytes(state))
    if processes.any_raised(unwritable is not None):  # before orbax starts threads it cannot stop
      raise self._failure(step, unwritable or OSError("another process of the job cannot write there"))
    try:
      self.manager.save(step, args=args, force=True)
    except Exception as e:
      raise self._failure(step, e) from e
    self._in_flight = step
    if wait:
      self.wait()
    elif sealed:
      self._prune()

  def wait(self) -> None:
    """Wait for pending saves and their manifests, then prune."""
    self._finish_save()
    self._check_sealed(block=True)
    self._prune()

  def close(self) -> None:
    try:
      if not self._failed:
        self.wait()
    finally:
      self._sealer.shutdown(wait=True)
      self._resources.close()
      self.manager.close()

  def _finish_save(self) -> None:
    """Wait for orbax's save in flight; once complete, its manifest is written in the background."""
    step, self._in_flight = self._in_flight, None
    try:
      self.manager.wait_until_finished()
      written = step is not None and self.is_primary and (self.dir / str(step)).exists()
    except Exception as e:
      raise self._failure(step, e) from e
    if written:
      self._sealing[step] = self._sealer.submit(manifest.write, self.dir / str(step), step)

  def _check_sealed(self, block: bool) -> bool:
    """Whether any manifest was written since the last call; raises if writing one failed."""
    done = [step for step, future in self._sealing.items() if block or future.done()]
    for step in done:
      try:
        self._sealing.pop(step).result()
      except Exception as e:
        raise self._failure(step, e, what="writing the manifest of checkpoint step") from e
    return bool(done)

  def _failure(self, step: int | None, exc: BaseException, what: str = "saving checkpoint step") -> CheckpointError:
    self._failed = True
    futures.wait(self._sealing.values())  # a step whose manifest is being written is complete
    try:
      intact = [s for s in self.steps() if s != step and is_good(self.dir / str(s)) is not False]
    except OSError:  # an object store out of reach: the resume will find the newest good step
      intact = None
    return CheckpointError(save_failures.describe(f"{what} {step} to {self.dir}", exc, intact))

  def _prune(self) -> None:
    if not self.keep:
      return
    steps, good = self.steps(), self.good_steps()
    newest_good = good[-self.keep :]
    if len(newest_good) < self.keep:
      return  # not enough good steps yet: delete nothing
    unsealed = set(self._sealing) | {self._in_flight}
    keep = set(newest_good) | {s for s in steps if s > newest_good[-1] or s in unsealed}
    if self.keep_period:
      keep |= {s for s in good if s % self.keep_period == 0}
    for step in steps:
      if step not in keep and step < newest_good[0]:
        self.manager.delete(step)

  # -- restoring -----------------------------------------------------------------------------
  def _candidates(self, step: int | None) -> list[int]:
    if step is not None:
      if step not in self.steps():
        aside = [n for n in self.damaged() if n.split(".")[0] == str(step)]
        note = f"; it was moved aside as damaged ({', '.join(aside)})" if aside else ""
        raise CheckpointError(
          f"--step {step}: no such checkpoint in {self.dir}; present: {self.steps() or 'none'}{note}"
        )
      return [step]
    return self.steps()[::-1]

  def read_meta(self, step: int) -> dict:
    """The JSON meta of `step`, read without its arrays."""
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def _first_restorable(self, step: int | None, items: tuple[str, ...], make_args, check=None) -> tuple[int, dict]:
    """The newest candidate whose `items` match the manifest and restore on every process.

    `make_args(candidate)` gives the restore arguments; `check(meta)` may refuse a readable step
    outright (a BertjaxError: the user's to fix, not a broken checkpoint).
    """
    skipped = []
    for candidate in self._candidates(step):
      step_dir = self.dir / str(candidate)
      reason = self._damage(step_dir, items) if self.is_primary else None
      if processes.from_primary(reason is not None):
        reason = reason or "process 0 found its files damaged"
      else:
        restored = None
        try:
          if check is not None:
            check(self.read_meta(candidate))
          restored = self.manager.restore(candidate, args=ocp.args.Composite(**make_args(candidate)))
        except BertjaxError:  # CheckpointError included: the user's to fix
          raise
        except Exception as e:
          reason = save_failures.one_line(e)
        if not processes.any_raised(reason is not None):
          return candidate, restored
        reason = reason or "another process could not restore it"
        if manifest.digested(step_dir, items):  # its files are as saved: the trouble is elsewhere
          raise CheckpointError(
            f"checkpoint step {candidate} in {self.dir} cannot be restored, though its files are as saved: "
            f"{reason}; fix that (memory, devices), or pass --step to restore an earlier step"
          )
      if step is not None:
        raise CheckpointError(f"checkpoint step {step} in {self.dir} cannot be restored: {reason}")
      self._skip(candidate, reason)
      skipped.append(candidate)
    aside = f" (moved aside as damaged: {', '.join(self.damaged())})" if self.damaged() else ""
    raise CheckpointError(f"no checkpoint in {self.dir} can be restored{aside}; move that folder away to start afresh")

  @staticmethod
  def _damage(step_dir: epath.Path, items) -> str | None:
    try:
      return manifest.damage(step_dir, items)
    except OSError as e:
      return f"its files cannot be read ({e.strerror or e})"

  def _skip(self, step: int, reason: str) -> None:
    """Warn once about a damaged step; a training run moves it out of orbax's step namespace."""
    if self.read_only:
      log.warning("skipping checkpoint step %d in %s: %s", step, self.dir, reason)
      return
    aside = self.dir / f"{step}{DAMAGED}{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    moved = None
    if self.is_primary:
      try:
        (self.dir / str(step)).rename(aside)
      except OSError as e:
        moved = e
    if processes.from_primary(moved is not None):
      raise CheckpointError(
        f"checkpoint step {step} in {self.dir} is damaged ({reason}) and cannot be moved aside "
        f"({moved.strerror if moved else 'on process 0'}); move {self.dir / str(step)} away, then run the same command"
      )
    processes.barrier(f"bertjax-moved-aside-{step}")
    self.manager.reload()
    where = aside.name if self.is_primary else "a .damaged- folder (process 0 moved it)"
    log.warning(
      "skipping checkpoint step %d in %s: %s; moved it aside to %s (kept for inspection, never restored); "
      "training saves step %d afresh when it gets there",
      step,
      self.dir,
      reason,
      where,
      step,
    )

  def restore(self, abstract_state, step: int | None = None, check=None):
    """(state, meta) of `step` or the newest restorable step, placed as `abstract_state` says.

    `check(meta)` runs on a step's meta before its arrays are read (model sizes, tokenizer).

    Args:
      abstract_state: the TrainState of ShapeDtypeStructs with shardings
        (`CompiledSteps.abstract_state()`).
      step: the step to restore; None takes the newest that restores, skipping damaged ones (a
        writable Checkpoints moves those aside).
      check: called with a step's meta; raises a BertjaxError to refuse it.
    Returns:
      (state, meta): the TrainState with its step and rng from the meta, and the step's meta dict.
    Raises:
      CheckpointError: `step` is absent or cannot be restored, or no step can.
      BertjaxError: whatever `check` raises.
    """

    def make_args(candidate):
      return dict(
        params=ocp.args.StandardRestore(abstract_state.params),
        opt_state=ocp.args.StandardRestore(serialization.to_state_dict(abstract_state.opt_state)),
        meta=ocp.args.JsonRestore(),
      )

    _, items = self._first_restorable(step, ITEMS, make_args, check)
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
    """(params, meta) of a step; without `abstract_params`, host arrays shaped as saved.

    Without a target the arrays are read onto this host's CPU, whatever mesh or device count
    saved them (an export on a laptop of a run trained on a pod).

    Args:
      abstract_params: ShapeDtypeStructs with shardings for the parameters, or None for numpy
        arrays on this host.
      step, check: as in `restore`.
    Returns:
      (params, meta): the parameter pure dict (jax.Arrays placed as `abstract_params` says, or
      numpy arrays) and the step's meta dict.
    Raises:
      CheckpointError, BertjaxError: as in `restore`.
    """

    def make_args(candidate):
      target = abstract_params
      if target is None:
        shapes = self.manager.item_metadata(candidate)["params"]
        host = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=host), shapes)
      return dict(params=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())

    _, items = self._first_restorable(step, ("params", "meta"), make_args, check)
    params = items["params"] if abstract_params is not None else jax.tree.map(np.asarray, items["params"])
    return params, items["meta"]
