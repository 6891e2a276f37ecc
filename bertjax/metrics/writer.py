"""Where a run's metrics go: WORKDIR/metrics.jsonl and TensorBoard event files in WORKDIR/tb/.

    MetricsWriter   appends one JSON object per logged step or evaluation, and the same values
                    as TensorBoard scalars `SPLIT/NAME` (tensorboardX: no TensorFlow needed)
    read_metrics    metrics.jsonl back, skipping the fragment a killed run left mid-line (the
                    next writer cuts it off; a killed run's last TensorBoard record may be cut
                    too, at the end of its own events file, where TensorBoard stops reading it)

Only the primary process writes.
"""

import errno
import io
import json
import os
import sys
import time
from typing import TYPE_CHECKING, Any, Self

import numpy as np
from etils import epath

from bertjax.errors import BertjaxError

if TYPE_CHECKING:
  from tensorboardX import SummaryWriter

METRICS_FILENAME = "metrics.jsonl"
TENSORBOARD_DIRNAME = "tb"

_RESERVED_FIELDS = ("step", "split", "time")


def _plain(name: str, value: Any) -> int | float:
  """A Python int or float from a Python, NumPy or JAX scalar (JSON wants plain ones)."""
  array = np.asarray(value)
  if array.size != 1:
    raise ValueError(f"metric {name!r} is not a scalar (shape {array.shape})")
  item = array.reshape(()).item()
  if isinstance(item, (bool, int)):
    return int(item)
  return float(item)


def _is_record(text: str) -> bool:
  try:
    return isinstance(json.loads(text), dict)
  except ValueError:
    return False


def _open_for_append(path: epath.Path):
  """A text handle that appends to `path`, kept open for the run.

  A last line without its newline is what a run killed mid-write left. A fragment is cut off, so
  the file holds whole JSON lines again; a whole record gets its newline. Object stores (gs://)
  may not append: there the lines are copied into a fresh file, so a resumed run still never
  loses what an earlier one logged.
  """
  existing = path.read_text() if path.exists() else ""
  whole = existing[: existing.rfind("\n") + 1]
  tail = existing[len(whole) :]
  end = tail + "\n" if tail and _is_record(tail) else ""
  try:
    handle = path.open("a")
  except (NotImplementedError, ValueError, OSError):
    handle = path.open("w")
    handle.write(whole + end)
    return handle
  if tail:
    try:
      handle.truncate(len(whole.encode()))
    except (OSError, io.UnsupportedOperation):  # a store that appends but cannot cut: own line
      end = "\n"
    handle.write(end)
  return handle


class MetricsWriter:
  """Appends metrics to WORKDIR/metrics.jsonl and TensorBoard scalars to WORKDIR/tb/.

  Construct it on every process with `enabled=jax.process_index() == 0`: the others write
  nothing. Files are opened at the first `write`; use it as a context manager or call `close`.
  """

  def __init__(self, workdir, enabled: bool = True):
    self.workdir = epath.Path(workdir)
    self.enabled = enabled
    self._jsonl = None
    self._events: SummaryWriter | None = None

  def write(self, step: int, metrics: dict[str, Any], split: str = "train") -> None:
    """Append one record {step, split, time, **metrics} and its TensorBoard scalars, then flush.

    Does nothing on a disabled writer.

    Args:
      step: the global step the metrics belong to.
      metrics: name -> scalar (Python, NumPy or JAX; one element).
      split: `train`, `eval`, ...: the record's `split` and the TensorBoard tag prefix.
    Raises:
      ValueError: a metric is not a scalar or is named step, split or time.
      BertjaxError: the files cannot be written (the OS's reason in one line).
    """
    if not self.enabled:
      return
    clashes = [name for name in metrics if name in _RESERVED_FIELDS]
    if clashes:
      raise ValueError(f"metric names {clashes} clash with the record fields {_RESERVED_FIELDS}")
    values = {name: _plain(name, value) for name, value in metrics.items()}
    now = time.time()
    try:
      self._ensure_open()
      self._jsonl.write(json.dumps({"step": int(step), "split": split, "time": now, **values}) + "\n")
      for name, value in values.items():
        self._events.add_scalar(f"{split}/{name}", float(value), global_step=int(step), walltime=now)
      self.flush()  # a few records per log step: readers (bertjax plot, TensorBoard) see them now
    except OSError as e:  # a full disk or a lost permission: what the OS said, in one line
      raise BertjaxError(
        f"writing the metrics of step {step} to {self.workdir} failed: {e.strerror or e} "
        f"({errno.errorcode.get(e.errno, e.errno)}); free some space or restore write permission, then run the "
        "same command to resume from the newest checkpoint"
      ) from e

  def _ensure_open(self) -> None:
    if self._jsonl is not None:
      return
    self.workdir.mkdir(parents=True, exist_ok=True)
    self._jsonl = _open_for_append(self.workdir / METRICS_FILENAME)
    # A resumed run starts a new events file beside the old ones, and TensorBoard reads them in
    # name order: the nanosecond suffix keeps two writers of one second apart and in order.
    self._events = _summary_writer_class()(
      str(self.workdir / TENSORBOARD_DIRNAME), flush_secs=3600, filename_suffix=f".{time.time_ns()}.{os.getpid()}"
    )

  def flush(self) -> None:
    for handle in (self._jsonl, self._events):
      if handle is not None:
        handle.flush()

  def close(self) -> None:
    for handle in (self._jsonl, self._events):
      if handle is not None:
        handle.close()
    self._jsonl = self._events = None

  def __enter__(self) -> Self:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def read_metrics(workdir) -> list[dict]:
  """The records of WORKDIR/metrics.jsonl, in file order ([] if there is none yet).

  A line that does not parse as a JSON object is the fragment a killed run left mid-write (the
  last line, until the next writer cuts it off): it is skipped.
  """
  path = epath.Path(workdir) / METRICS_FILENAME
  if not path.exists():
    return []
  records = []
  for line in path.read_text().splitlines():
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue
    if isinstance(record, dict):
      records.append(record)
  return records


def _summary_writer_class() -> type["SummaryWriter"]:
  """tensorboardX's SummaryWriter, imported without PyTorch.

  tensorboardX imports torch where it is installed (the `hf` extra installs it), only to accept
  torch tensors, which bertjax never passes. Into a JAX training process that would bring
  PyTorch's own CUDA libraries and about 1.5 s of start-up, so torch is hidden while tensorboardX
  is imported (a process that imported torch already keeps it). Imported at the first write, so
  commands that write no metrics do not import it at all.
  """
  if "torch" in sys.modules:
    from tensorboardX import SummaryWriter

    return SummaryWriter
  sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX handles
  try:
    from tensorboardX import SummaryWriter
  finally:
    del sys.modules["torch"]
  return SummaryWriter
