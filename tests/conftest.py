"""Shared test setup: 8 fake CPU devices, offline hubs, and the fixture modules of tests/support.

XLA_FLAGS must be set before JAX creates its backend, so this runs before any test imports jax.
"""

import os

# Unoptimised CPU codegen: at the micro scale the tests are compile-bound, and level 0 compiles a
# train step about 2.5x faster; results agree with the optimised build within float32 rounding.
os.environ["XLA_FLAGS"] = " ".join(
  filter(
    None,
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0"],
  )
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
for _offline in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
  os.environ.setdefault(_offline, "1")

# Fixtures shared across test folders live in these modules, never in another test file.
pytest_plugins = ["tests.support.micro", "tests.support.corpora", "tests.support.runs", "tests.support.finetune"]
