"""What a run measures and where it goes: the FLOP model, tokens/s and MFU, the writers.

- `flops_per_sequence`: model FLOPs of BERT pretraining (matmuls only), the basis of MFU.
- `peak_flops_per_device` / `Throughput`: tokens/s, sequences/s, step time and MFU against the
  datasheet dense bf16 peak of the chip (DESIGN.md, "MFU"), or `metrics.peak_tflops` when set.
- `MetricsWriter`: one JSON object per call appended to WORKDIR/metrics.jsonl, and TensorBoard
  scalars under WORKDIR/tb/, written by hand (TFRecord framing, Event protos, CRC32C) so that
  neither TensorFlow nor tensorboard is needed to train. Only the primary process writes.
- `ProgressBar`: one console line with loss, accuracies, tokens/s and ETA.
- `read_metrics` reads metrics.jsonl back; `plot_curves` (bertjax/plot.py) draws it to a PNG.
"""

import json
import re
import socket
import struct
import sys
import time
from collections.abc import Callable
from typing import Any, Self, TextIO

import numpy as np
from etils import epath

from bertjax.model import BertConfig

METRICS_FILENAME = "metrics.jsonl"
TENSORBOARD_DIRNAME = "tb"


def flops_per_sequence(cfg: BertConfig, seq_len: int, max_predictions: int, training: bool = True) -> float:
  """Model FLOPs of one sequence of `seq_len` tokens through BERT pretraining.

  A matmul of [m, k] by [k, n] costs 2*m*k*n FLOPs (one multiply, one add). With H hidden,
  I intermediate, N layers, L = seq_len, P = max_predictions, V = the padded vocabulary:

    per layer, per token (2 x the weights each token meets):
      fused QKV projection            2 * H * 3H = 6 H^2
      attention output projection     2 * H * H  = 2 H^2
      feed-forward in and out         2 * H * I * 2 = 4 H I
    per layer, per sequence (activation x activation, no weights):
      attention scores Q K^T          2 * L * L * H   (summed over heads: heads * head_dim = H)
      attention context P V           2 * L * L * H
    once per sequence:
      pooler ([CLS] -> H)             2 H^2
      NSP classifier (H -> 2)         4 H
    MLM head, at the P gathered prediction slots only (the model never computes the others; the
    padded slots of a batch are computed all the same, so P, not the number of real masks):
      transform                       2 H^2
      decoder tied to the embeddings  2 H V   (V padded to a multiple of 128: those rows are computed)

  forward = N * (L * (8 H^2 + 4 H I) + 4 L^2 H) + 2 H^2 + 4 H + P * (2 H^2 + 2 H V).
  Training is 3 x forward: the backward pass computes the gradients of both the activations and
  the weights, two matmuls for every forward one. Excluded: the embedding gathers (no matmul),
  biases, LayerNorm, softmax, GELU, dropout and the loss (elementwise, under 1% at BERT sizes), and
  rematerialisation (MFU counts the model's FLOPs, not the hardware's).
  """
  h, i, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
  dense_per_token = 6 * h * h + 2 * h * h + 4 * h * i
  attention_per_sequence = 2 * 2 * seq_len * seq_len * h
  encoder = n * (seq_len * dense_per_token + attention_per_sequence)
  pooler_and_nsp = 2 * h * h + 2 * h * 2
  mlm_head = max_predictions * (2 * h * h + 2 * h * cfg.padded_vocab_size)
  forward = encoder + pooler_and_nsp + mlm_head
  return float(3 * forward if training else forward)


def flops_per_token(cfg: BertConfig, seq_len: int, max_predictions: int, training: bool = True) -> float:
  """`flops_per_sequence` spread over the `seq_len` positions (padding included)."""
  return flops_per_sequence(cfg, seq_len, max_predictions, training) / seq_len


# Datasheet dense bf16 TFLOP/s per chip (DESIGN.md, "MFU").
PEAK_TFLOPS: dict[str, float] = {
    "TPU v4": 275.0,
    "TPU v5e": 197.0,
    "TPU v5p": 459.0,
    "TPU v6e": 918.0,
    "A100": 312.0,
    "H100": 989.0,
    "H200": 989.0,
}

# `jax.devices()[0].device_kind` spellings, most specific first: a v5e reports "TPU v5 lite" and a
# v5p plain "TPU v5", so the lite patterns must be tried before the bare generation.
_DEVICE_KIND_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"\btpu v5 ?(lite|e)", "TPU v5e"),
    (r"\btpu v5p?\b", "TPU v5p"),
    (r"\btpu v6 ?(lite|e)?\b", "TPU v6e"),
    (r"\btpu v4\b", "TPU v4"),
    (r"\ba100\b", "A100"),
    (r"\bh100\b", "H100"),
    (r"\bh200\b", "H200"),
)


def peak_flops_per_device(device_kind: str, override_tflops: float = 0.0) -> float | None:
  """Peak FLOP/s of one device: `override_tflops` when > 0, else the datasheet peak of
  `device_kind`, else None (CPU, unknown chips: MFU is then left out rather than made up)."""
  if override_tflops > 0:
    return override_tflops * 1e12
  kind = device_kind.lower()
  for pattern, name in _DEVICE_KIND_PATTERNS:
    if re.search(pattern, kind):
      return PEAK_TFLOPS[name] * 1e12
  return None


class Throughput:
  """Rates over the interval since the previous update, and MFU when the peak is known.

  `sequences` and `tokens` count the whole global batch (all processes) over the interval, and
  `num_devices` is the global device count. Tokens are the real (non-padding) ones; MFU uses
  `flops_per_sequence`, which covers every position the model computed, padding included.
  """

  def __init__(self, flops_per_sequence: float, num_devices: int, peak_flops_per_device: float | None,
               start_step: int = 0):
    self.flops_per_sequence = flops_per_sequence
    self.num_devices = num_devices
    self.peak_flops_per_device = peak_flops_per_device
    self.last_step = start_step

  def update(self, step: int, sequences: int, tokens: int, seconds: float) -> dict[str, float]:
    """Rates for the steps (last step, `step`], which took `seconds` and saw those counts."""
    if seconds <= 0:
      raise ValueError(f"Throughput.update needs a positive interval, got seconds={seconds}")
    steps = max(step - self.last_step, 1)
    self.last_step = step
    rates = {
        "tokens_per_s": tokens / seconds,
        "sequences_per_s": sequences / seconds,
        "step_s": seconds / steps,
    }
    if self.peak_flops_per_device:
      model_flops_per_s = self.flops_per_sequence * sequences / seconds
      rates["mfu"] = model_flops_per_s / (self.num_devices * self.peak_flops_per_device)
    return rates


def _crc32c_table() -> tuple[int, ...]:
  poly = 0x82F63B78  # Castagnoli, bit-reversed
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ poly if crc & 1 else crc >> 1
    table.append(crc)
  return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli), the checksum of TFRecord framing. Pure Python: records are small."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc32c(data: bytes) -> int:
  # TFRecord stores a rotated, offset CRC so that a CRC of data that embeds CRCs stays strong.
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
  """One TFRecord: uint64 length, masked CRC of the length, data, masked CRC of the data."""
  length = struct.pack("<Q", len(data))
  return length + struct.pack("<I", _masked_crc32c(length)) + data + struct.pack("<I", _masked_crc32c(data))


def _varint(value: int) -> bytes:
  value &= (1 << 64) - 1  # int64 fields: negatives take ten bytes, as protobuf writes them
  out = bytearray()
  while True:
    low, value = value & 0x7F, value >> 7
    out.append(low | (0x80 if value else 0))
    if not value:
      return bytes(out)


def _length_delimited(field: int, payload: bytes) -> bytes:
  return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _event(wall_time: float, step: int, *, file_version: str | None = None,
           scalars: dict[str, float] | None = None) -> bytes:
  """A tensorflow.Event proto: wall_time (1, double), step (2, int64), file_version (3) or
  summary (5) of Summary.Value{tag (1), simple_value (2, float)}."""
  event = _varint(1 << 3 | 1) + struct.pack("<d", wall_time) + _varint(2 << 3 | 0) + _varint(step)
  if file_version is not None:
    event += _length_delimited(3, file_version.encode())
  if scalars:
    values = b"".join(
        _length_delimited(1, _length_delimited(1, tag.encode()) + _varint(2 << 3 | 5) + struct.pack("<f", value))
        for tag, value in scalars.items())
    event += _length_delimited(5, values)
  return event


_RESERVED_FIELDS = ("step", "split", "time")


def _plain(name: str, value: Any) -> int | float:
  """A Python int or float from a Python, NumPy or JAX scalar (JSON and protos need plain ones)."""
  array = np.asarray(value)
  if array.size != 1:
    raise ValueError(f"metric {name!r} is not a scalar (shape {array.shape})")
  item = array.reshape(()).item()
  if isinstance(item, (bool, int)):
    return int(item)
  return float(item)


def _open_for_append(path: epath.Path):
  """A text handle that appends to `path`, kept open for the run.

  Object stores (gs://) may not append: there the existing lines are copied into a fresh file,
  so a resumed run still never loses what an earlier one logged.
  """
  existing = path.read_text() if path.exists() else ""
  try:
    handle = path.open("a")
  except (NotImplementedError, ValueError, OSError):
    handle = path.open("w")
    handle.write(existing)
  if existing and not existing.endswith("\n"):
    handle.write("\n")  # a run killed mid-line: keep its fragment on a line of its own
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
    self._events = None

  def write(self, step: int, metrics: dict[str, Any], split: str = "train") -> None:
    if not self.enabled:
      return
    clashes = [name for name in metrics if name in _RESERVED_FIELDS]
    if clashes:
      raise ValueError(f"metric names {clashes} clash with the record fields {_RESERVED_FIELDS}")
    values = {name: _plain(name, value) for name, value in metrics.items()}
    now = time.time()
    self._ensure_open(now)
    self._jsonl.write(json.dumps({"step": int(step), "split": split, "time": now, **values}) + "\n")
    scalars = {f"{split}/{name}": float(value) for name, value in values.items()}
    self._events.write(tfrecord(_event(now, int(step), scalars=scalars)))
    self.flush()  # a few records per log step: readers (bertjax plot, TensorBoard) see them now

  def _ensure_open(self, now: float) -> None:
    if self._jsonl is not None:
      return
    self.workdir.mkdir(parents=True, exist_ok=True)
    self._jsonl = _open_for_append(self.workdir / METRICS_FILENAME)
    tb_dir = self.workdir / TENSORBOARD_DIRNAME
    tb_dir.mkdir(parents=True, exist_ok=True)
    self._events = self._new_events_file(tb_dir, now).open("wb")
    self._events.write(tfrecord(_event(now, 0, file_version="brain.Event:2")))

  @staticmethod
  def _new_events_file(tb_dir: epath.Path, now: float) -> epath.Path:
    # A resumed run starts a new file beside the old ones; TensorBoard reads them all.
    name = f"events.out.tfevents.{int(now)}.{socket.gethostname()}"
    path, attempt = tb_dir / name, 0
    while path.exists():
      attempt += 1
      path = tb_dir / f"{name}.{attempt}"
    return path

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

  A line that does not parse is the fragment a killed run left mid-write (the last line, or the
  last of a run that was later resumed): it is skipped.
  """
  path = epath.Path(workdir) / METRICS_FILENAME
  if not path.exists():
    return []
  records = []
  for line in path.read_text().splitlines():
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      continue
  return records


def plot_curves(workdir, out_path=None) -> epath.Path:
  """Train and eval loss and accuracy curves to a PNG (default WORKDIR/curves.png); plot.py."""
  from bertjax import plot  # matplotlib only for `bertjax plot`, never for training

  return plot.plot_curves(workdir, out_path)


def _duration(seconds: float) -> str:
  seconds = round(seconds)
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class ProgressBar:
  """One status line: step/total, loss, MLM and NSP accuracy, tokens/s and ETA.

  On a terminal the line is redrawn in place; elsewhere (logs, pipes) each update is a new line,
  which is why the loop calls it only at log steps. The ETA extrapolates the step rate since
  construction (compilation included, so the first estimate is pessimistic).
  """

  def __init__(self, total_steps: int, start_step: int = 0, enabled: bool = True, stream: TextIO = sys.stderr,
               clock: Callable[[], float] = time.monotonic):
    self.total_steps = total_steps
    self.start_step = start_step
    self.enabled = enabled
    self.stream = stream
    self.clock = clock
    self.start_time = clock()
    self.is_tty = enabled and bool(getattr(stream, "isatty", lambda: False)())
    self._drawn_width = 0

  def format(self, step: int, metrics: dict[str, Any]) -> str:
    width = len(str(self.total_steps))
    parts = [f"step {step:>{width}}/{self.total_steps}"]
    for key, label in (("loss", "loss"), ("mlm_accuracy", "mlm_acc"), ("nsp_accuracy", "nsp_acc")):
      if key in metrics:
        parts.append(f"{label} {float(metrics[key]):.4f}")
    if "tokens_per_s" in metrics:
      parts.append(f"{float(metrics['tokens_per_s']):,.0f} tok/s")
    parts.append(f"ETA {self._eta(step)}")
    return " | ".join(parts)

  def _eta(self, step: int) -> str:
    done, elapsed = step - self.start_step, self.clock() - self.start_time
    if done <= 0 or elapsed <= 0:
      return "?"
    return _duration(max(self.total_steps - step, 0) * elapsed / done)

  def update(self, step: int, metrics: dict[str, Any]) -> None:
    if not self.enabled:
      return
    line = self.format(step, metrics)
    if self.is_tty:
      # Pad over the previous line's tail: a shorter line would leave stale characters behind.
      self.stream.write("\r" + line.ljust(self._drawn_width))
      self._drawn_width = len(line)
    else:
      self.stream.write(line + "\n")
    self.stream.flush()

  def close(self) -> None:
    if self.is_tty and self._drawn_width:
      self.stream.write("\n")
      self.stream.flush()
    self._drawn_width = 0
