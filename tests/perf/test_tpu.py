"""TPU slices by name (`bertjax.perf.tpu`): Cloud TPU's accelerator types, device kinds and shapes,
the one-line refusals of names that are no slice, and the settings libtpu starts with."""

import os

import pytest

from bertjax.errors import BertjaxError
from bertjax.perf import tpu as tpu_lib


@pytest.mark.parametrize(
  "name, chips, shape, host_bounds",
  [
    ("v5p-8", 4, (2, 2, 1), (2, 2, 1)),  # TensorCores in the name: 2 a chip
    ("v5p-128", 64, (4, 4, 4), (2, 2, 1)),
    ("v5p-256", 128, (4, 4, 8), (2, 2, 1)),
    ("v4-64", 32, (2, 4, 4), (2, 2, 1)),
    ("v5p:4x4x12", 192, (4, 4, 12), (2, 2, 1)),  # v5p-384, named by its shape
    ("v5e-1", 1, (1, 1), (1, 1, 1)),  # chips in the name; up to 8 chips are one host
    ("v5litepod-8", 8, (2, 4), (2, 4, 1)),
    ("v5e-256", 256, (16, 16), (2, 2, 1)),
    ("v6e-16", 16, (4, 4), (2, 2, 1)),
  ],
)
def test_topology_names_give_the_slices_shape(name, chips, shape, host_bounds):
  tpu = tpu_lib.parse_topology(name)
  assert (tpu.chips, tpu.shape, tpu.host_bounds) == (chips, shape, host_bounds)


def test_device_kinds_name_the_same_slices():
  assert tpu_lib.tpu_slice("TPU v5p", 64) == tpu_lib.parse_topology("v5p-128")
  assert tpu_lib.tpu_slice("TPU v5", 64) == tpu_lib.parse_topology("v5p-128")  # a v5p's own device_kind
  assert tpu_lib.tpu_slice("TPU v5 lite", 256) == tpu_lib.parse_topology("v5e-256")
  assert tpu_lib.tpu_slice("TPU v6e", 16).topology == "v6e:4x4"
  assert tpu_lib.tpu_slice("H100", 8) is None and not tpu_lib.is_tpu("NVIDIA H100 80GB HBM3")


@pytest.mark.parametrize(
  "name, message",
  [
    ("v9-8", "--topology 'v9-8': not a TPU slice; name one as v5p-128"),
    ("h100", "not a TPU slice"),
    ("v5p-12", "v5p-N is named here for N = 8, 16, 32"),
    ("v5p-7", "v5p-N counts TensorCores, 2 per chip"),
    ("v5e-2", "v5e slices have 1, 4, 8, 16, 32, 64, 128, 256 chips"),
    ("v6e:4x4x4", "a v6e slice has 2 axes of chips, e.g. v6e:16x16"),
  ],
)
def test_a_bad_topology_is_refused(name, message):
  with pytest.raises(BertjaxError, match=message):
    tpu_lib.parse_topology(name)


def test_libtpus_compiler_gets_a_deeper_thread_stack_unless_the_user_sets_one():
  deeper = f"--fibers_default_thread_stack_size={64 * 2**20}"
  assert tpu_lib.libtpu_init_args("") == deeper
  assert tpu_lib.libtpu_init_args("--xla_tpu_enable_latency_hiding_scheduler=true") == (
    f"--xla_tpu_enable_latency_hiding_scheduler=true {deeper}"
  )
  theirs = "--xla_jf_rematerialization_percent_shared_memory_limit=98 --fibers_default_thread_stack_size=134217728"
  assert tpu_lib.libtpu_init_args(theirs) == theirs


def test_a_run_starts_libtpu_with_the_deeper_stack_and_keeps_the_users_flags(monkeypatch):
  """What `bertjax train` (and every command that uses devices) sets before JAX first uses them."""
  import argparse

  from bertjax.cli import commands
  from bertjax.config import loading
  from tests.support.runs import MICRO_OVERRIDES

  monkeypatch.setenv("LIBTPU_INIT_ARGS", "--xla_tpu_enable_latency_hiding_scheduler=true")
  config = loading.load_config("configs/tiny.py", MICRO_OVERRIDES)
  spec = argparse.Namespace(coordinator=None, num_processes=None, process_id=None)
  commands._prepare_devices(spec, config, preemption=True)  # as `train` does
  assert os.environ["LIBTPU_INIT_ARGS"] == (
    f"--xla_tpu_enable_latency_hiding_scheduler=true --fibers_default_thread_stack_size={64 * 2**20}"
  )
