"""Joining a multi-process JAX job: explicit flags, or auto-detection on TPU pods and SLURM.

`jax.distributed.initialize` must run before anything touches devices. When a process cannot
reach the coordinator (or a peer never joins), the runtime aborts with a C++ stack trace after
its deadline; a watchdog thread turns that into one clear line and exit status 2 just before.
"""

import dataclasses
import os
import sys
import threading

import jax

EXIT_USER_ERROR = 2
# The runtime's own deadline is this much later than ours, so the watchdog always speaks first.
_RUNTIME_GRACE_S = 30


@dataclasses.dataclass(frozen=True)
class ProcessSpec:
  """The `--coordinator`, `--num_processes` and `--process_id` flags: all three, or none to detect the job."""

  coordinator: str | None = None  # HOST:PORT of process 0
  num_processes: int | None = None
  process_id: int | None = None

  @property
  def explicit(self) -> bool:
    return self.coordinator is not None or self.num_processes is not None or self.process_id is not None


def detected_cluster(environ=os.environ) -> str | None:
  """'slurm' or 'tpu' when this process is one of several that the scheduler started, else None.

  TPU VMs made by `gcloud ... tpu-vm create` carry no marker in the environment that JAX reads
  before asking the metadata server, so launch/tpu_pod.sh exports BERTJAX_CLUSTER=tpu.
  """
  if environ.get("BERTJAX_CLUSTER") in ("tpu", "slurm"):
    return environ["BERTJAX_CLUSTER"]
  if environ.get("SLURM_JOB_ID") and int(environ.get("SLURM_NTASKS", "1")) > 1:
    return "slurm"
  hosts = environ.get("TPU_WORKER_HOSTNAMES", "")
  if len([h for h in hosts.split(",") if h]) > 1:
    return "tpu"
  return None


def check_spec(spec: ProcessSpec) -> None:
  """Explicit multi-process flags come as a complete, consistent set."""
  from bertjax.errors import BertjaxError

  if not spec.explicit:
    return
  if spec.coordinator is None or spec.num_processes is None or spec.process_id is None:
    raise BertjaxError("--coordinator, --num_processes and --process_id go together: give all three")
  if spec.num_processes < 1 or not 0 <= spec.process_id < spec.num_processes:
    raise BertjaxError(
      f"--process_id {spec.process_id} is not in 0..{spec.num_processes - 1} for --num_processes {spec.num_processes}"
    )
  host, _, port = spec.coordinator.rpartition(":")
  if not host or not port.isdigit():
    raise BertjaxError(f"--coordinator {spec.coordinator}: expected HOST:PORT, e.g. localhost:12355")


def initialize(spec: ProcessSpec, timeout_s: int) -> None:
  """Join the job described by `spec` (or by the cluster's environment); one process: nothing."""
  check_spec(spec)
  cluster = None if spec.explicit else detected_cluster()
  if not spec.explicit and cluster is None:
    return
  where = spec.coordinator or f"the {cluster} coordinator"
  joined = threading.Event()

  def watchdog():
    if not joined.wait(timeout_s):
      print(
        f"bertjax: error: process {spec.process_id if spec.process_id is not None else '?'} could not "
        f"join the job at {where} within {timeout_s} s (train.distributed_timeout_s): check that every "
        "process was started with the same --coordinator and --num_processes, that process 0 is "
        "running, and that its port is reachable",
        file=sys.stderr,
        flush=True,
      )
      os._exit(EXIT_USER_ERROR)

  threading.Thread(target=watchdog, name="bertjax-join-watchdog", daemon=True).start()
  kwargs = dict(initialization_timeout=timeout_s + _RUNTIME_GRACE_S)
  if spec.explicit:
    kwargs.update(coordinator_address=spec.coordinator, num_processes=spec.num_processes, process_id=spec.process_id)
  jax.distributed.initialize(**kwargs)
  joined.set()
