"""Where the time of a traced step went: device time per kernel from a jax.profiler trace."""

import collections
import gzip
import json

from etils import epath

TOP_KERNELS = 30  # kernels listed, the biggest first


def kernel_summary(trace_path, steps: int, top: int = TOP_KERNELS) -> dict:
  """Time per step and device by kernel, from a perfetto trace.

  On GPUs the kernels of every `/device:` process (its streams); where a device has an "XLA Ops"
  line (TPU) only that line, since its module and step lines span the same time again. On CPU
  the XLA ops (events naming an `hlo_op`), leaving out control flow (`while`, `conditional`,
  `call`), whose events contain their bodies' ops. Times are averaged over the devices.
  """
  with gzip.open(epath.Path(trace_path).open("rb")) as f:
    events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  metadata = [e for e in events if e.get("ph") == "M"]
  processes = {e["pid"]: e["args"]["name"] for e in metadata if e.get("name") == "process_name"}
  threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in metadata if e.get("name") == "thread_name"}
  # "/device:CUSTOM:..." lines are a profiler plugin's (libtpu, where installed, adds "Megascale
  # Trace" even to a CPU trace), not a device's.
  devices = {pid for pid, name in processes.items() if name.startswith("/device:") and "CUSTOM" not in name}
  op_lines = {(pid, tid) for (pid, tid), name in threads.items() if pid in devices and name == "XLA Ops"}
  with_op_lines = {pid for pid, _ in op_lines}

  def is_kernel(e) -> bool:
    if devices:
      pid = e.get("pid")
      return pid in devices and (pid not in with_op_lines or (pid, e.get("tid")) in op_lines)
    op = e.get("args", {}).get("hlo_op")
    return op is not None and not op.startswith(("while", "conditional", "call"))

  kernels = [e for e in events if e.get("ph") == "X" and is_kernel(e)]
  n_devices = len(devices) or len({e["args"].get("device_ordinal") for e in kernels}) or 1
  time_us, calls = collections.Counter(), collections.Counter()
  for e in kernels:
    time_us[e["name"]] += e.get("dur", 0)
    calls[e["name"]] += 1
  per = steps * n_devices
  return {
    "devices": n_devices,
    "busy_ms_per_step": round(sum(time_us.values()) / per / 1e3, 3),
    "top": [[name, round(us / per / 1e3, 3), calls[name] / per] for name, us in time_us.most_common(top)],
  }
