"""Where a run's metrics go: WORKDIR/metrics.jsonl and TensorBoard event files in WORKDIR/tb/.

    MetricsWriter   appends one JSON object per logged step or evaluation, and the same values
                    as TensorBoard scalars `SPLIT/NAME` (tensorboardX: no TensorFlow needed)
    read_metrics    metrics.jsonl back, skipping the fragment a killed run left mid-line (the
                    next writer cuts it off; a killed run's last TensorBoard record may be cut
                    too, at the end of its own events file, where TensorBoard stops reading it)

Only the primary process writes.

On an object store (gs://) nothing can be appended: metrics.jsonl is kept in memory and the
TensorBoard events are written to a local folder, and a background thread uploads both whole (one
object each) at most every `upload_every_s` seconds and at the end. A reader always sees whole
lines and what was logged up to the last upload; the loop never waits on the store; a failed
upload is retried at the next one, and closing waits for the last upload at most
`storage.CLOSING_S`, so exit never hangs on a store.
"""

import errno
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from typing import TYPE_CHECKING, Any, Self

import numpy as np
from etils import epath

from bertjax import atomic, storage
from bertjax.errors import BertjaxError

if TYPE_CHECKING:
  from tensorboardX import SummaryWriter

log = logging.getLogger(__name__)
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


def _whole_lines(existing: str) -> str:
  """What a resumed writer keeps of metrics.jsonl: its whole lines. A last line without its
  newline is what a run killed mid-write left: a fragment is cut off, a whole record gets its
  newline."""
  whole = existing[: existing.rfind("\n") + 1]
  tail = existing[len(whole) :]
  return whole + (tail + "\n" if tail and _is_record(tail) else "")


def _open_for_append(path: epath.Path):
  """A text handle that appends to local `path`, kept open for the run, after `_whole_lines`."""
  existing = path.read_text() if path.exists() else ""
  kept = _whole_lines(existing)
  handle = path.open("a")
  if kept != existing:
    whole = existing[: existing.rfind("\n") + 1]
    handle.truncate(len(whole.encode()))
    handle.write(kept[len(whole) :])
  return handle


class _StoreMirror:
  """A run's metrics on an object store, uploaded from a background thread.

  metrics.jsonl is kept in memory and the TensorBoard events are written to a local folder; each
  upload puts both whole under the run's folder (one object each, so a reader sees whole lines
  and whole records). The training loop never waits on the store: `request` only wakes the
  thread; an upload that fails is logged and retried at the next one; `close` waits for the last
  upload at most `storage.CLOSING_S` and leaves whatever is then missing logged, not hung.
  """

  def __init__(self, workdir: epath.Path, events_dir: str):
    self.jsonl_path = workdir / METRICS_FILENAME
    self.events_remote = workdir / TENSORBOARD_DIRNAME
    self.events_dir = events_dir
    existing = self.jsonl_path.read_text() if self.jsonl_path.exists() else ""
    self.text = _whole_lines(existing)
    self._uploaded: dict[str, bytes] = {str(self.jsonl_path): existing.encode()}
    self._wake = threading.Event()
    self._closing = False
    self._abandoned = False
    self._warned = False
    self._thread = threading.Thread(target=self._run, name="bertjax-metrics-upload", daemon=True)
    self._thread.start()

  def write(self, line: str) -> None:
    self.text += line

  def request(self) -> None:
    self._wake.set()

  def _run(self) -> None:
    while True:
      self._wake.wait()
      self._wake.clear()
      closing = self._closing
      try:
        self._upload_changed()
        self._warned = False
      except Exception as e:  # the store is away for a while: what was logged stays for the next upload
        if self._abandoned:  # `close` gave up on this upload and said so already
          return
        if closing or not self._warned:
          log.warning("could not upload the metrics to %s (%s); retrying at the next log step", self.jsonl_path, e)
          self._warned = True
      if closing:
        return

  def _upload_changed(self) -> None:
    files = {self.jsonl_path: self.text.encode()}
    for name in sorted(os.listdir(self.events_dir)):
      with open(os.path.join(self.events_dir, name), "rb") as f:
        files[self.events_remote / name] = f.read()
    for path, data in files.items():
      if self._uploaded.get(str(path)) != data:
        atomic.write_bytes(path, data)
        self._uploaded[str(path)] = data

  def close(self) -> bool:
    """The last upload; True when it finished in time."""
    self._closing = True
    self._wake.set()
    self._thread.join(timeout=storage.CLOSING_S)
    self._abandoned = self._thread.is_alive()
    return not self._abandoned


class MetricsWriter:
  """Appends metrics to WORKDIR/metrics.jsonl and TensorBoard scalars to WORKDIR/tb/.

  Construct it on every process with `enabled=jax.process_index() == 0`: the others write
  nothing. Files are opened at the first `write`; use it as a context manager or call `close`.
  `upload_every_s` paces the uploads on an object store (local files are flushed at every write).
  """

  def __init__(self, workdir, enabled: bool = True, upload_every_s: float = 30.0):
    self.workdir = epath.Path(workdir)
    self.enabled = enabled
    self.upload_every_s = upload_every_s
    self._last_upload = -float("inf")
    self._jsonl = None
    self._mirror: _StoreMirror | None = None
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
      (self._mirror or self._jsonl).write(json.dumps({"step": int(step), "split": split, "time": now, **values}) + "\n")
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
    if self._events is not None:
      return
    if storage.is_remote(self.workdir):
      events_dir = tempfile.mkdtemp(prefix="bertjax-tb-")
      self._mirror = _StoreMirror(self.workdir, events_dir)
    else:
      self.workdir.mkdir(parents=True, exist_ok=True)
      self._jsonl = _open_for_append(self.workdir / METRICS_FILENAME)
      events_dir = str(self.workdir / TENSORBOARD_DIRNAME)
    # A resumed run starts a new events file beside the old ones, and TensorBoard reads them in
    # name order: the nanosecond suffix keeps two writers of one second apart and in order.
    # tensorboardX writes events from its own thread and puts them on disk every `flush_secs`;
    # on a store, each upload takes what is on disk by then.
    flush_secs = max(1.0, self.upload_every_s) if self._mirror is not None else 3600
    self._events = _summary_writer_class()(
      events_dir, flush_secs=flush_secs, filename_suffix=f".{time.time_ns()}.{os.getpid()}"
    )

  def flush(self) -> None:
    """Local files: flushed now. On an object store: an upload is started when one is due."""
    for handle in (self._jsonl, self._events):
      if handle is not None:
        handle.flush()
    if self._mirror is not None and time.monotonic() - self._last_upload >= self.upload_every_s:
      self._last_upload = time.monotonic()
      self._mirror.request()

  def close(self) -> None:
    for handle in (self._jsonl, self._events):
      if handle is not None:
        handle.close()
    mirror, self._jsonl, self._events, self._mirror = self._mirror, None, None, None
    if mirror is not None:
      if not mirror.close():
        log.error(
          "the last metrics of this run may be missing from %s: the store did not answer within %.0f s "
          "(the checkpoints are not affected)",
          self.workdir,
          storage.CLOSING_S,
        )
      shutil.rmtree(mirror.events_dir, ignore_errors=True)

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
