"""Optional dependencies the suite needs: present under `make test`, skipped only elsewhere.

`make test` (and so CI) sets BERTJAX_REQUIRE_EXTRAS=1 and installs the `hf` extra; there a missing
torch or transformers fails the collection instead of silently skipping the parity tests. A bare
`pytest` in an environment without the extra skips those modules and says why.
"""

import importlib
import os
import types

import pytest


def require(module: str) -> types.ModuleType:
  """`module`, imported; a skip (or, under make test, a failure) that names the extra otherwise."""
  try:
    return importlib.import_module(module)
  except ImportError as e:
    reason = f"{module} is not installed ({e}); install the test extras: pip install -e '.[dev,hf]'"
    if os.environ.get("BERTJAX_REQUIRE_EXTRAS") == "1":
      pytest.fail(reason, pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def randomise(module):
  """A torch module with random parameters everywhere, in eval mode.

  transformers initialises LayerNorms to (1, 0) and biases to 0: a swapped or dropped
  LayerNorm/bias mapping would go unnoticed. Random values everywhere make every tensor count.
  """
  torch = require("torch")
  generator = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = torch.randn(p.shape, generator=generator)
      p.copy_(1.0 + 0.1 * noise if name.endswith("LayerNorm.weight") else 0.1 * noise)
  return module.eval()
