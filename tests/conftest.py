"""Shared test setup: 8 fake CPU devices, offline hubs, the micro config and synthetic batches.

XLA_FLAGS must be set before JAX creates its backend, so this runs before any test imports jax.
"""

import os

# Unoptimised CPU codegen: at the micro scale the tests are compile-bound, and level 0 compiles a
# train step about 2.5x faster; results agree with the optimised build within float32 rounding.
os.environ["XLA_FLAGS"] = " ".join(filter(None, [
    os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8",
    "--xla_backend_optimization_level=0"]))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
for _offline in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
  os.environ.setdefault(_offline, "1")

import functools  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

from bertjax import model as model_lib  # noqa: E402
from configs import common  # noqa: E402

# The test-only micro scale: H=32, 2 layers, vocab 256 (250 where padding matters), seq 32.
MICRO = dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=128, max_position_embeddings=64)
MICRO_DATA = dict(seq_len=32, max_predictions=5, vocab_size=256)


def micro_run_config():
  """The full run config at micro scale (a ConfigDict, as the CLI would build it)."""
  c = common.get_config()
  c.model.update(MICRO)
  c.data.update(MICRO_DATA)
  c.train.batch_size = 8
  return c


@pytest.fixture
def micro_config():
  return micro_run_config()


def micro_bert(vocab_size: int = 256, **changes) -> model_lib.BertConfig:
  return model_lib.BertConfig(vocab_size=vocab_size, **{**MICRO, **changes})


def synthetic_batch(batch_size=8, seq_len=32, max_predictions=5, vocab_size=256, seed=0):
  """A batch in the pipeline's array names: right-padded rows, two segments, unique masks.

  Ids avoid the first 5 (special tokens); masked positions are distinct real tokens; the
  last prediction slot of odd rows is padding (weight 0) to exercise the weights.
  """
  rng = np.random.default_rng(seed)
  ids = rng.integers(5, vocab_size, (batch_size, seq_len)).astype(np.int32)
  lengths = rng.integers(seq_len // 2, seq_len + 1, batch_size)
  lengths[0] = seq_len
  attention_mask = (np.arange(seq_len)[None] < lengths[:, None]).astype(np.int32)
  ids = np.where(attention_mask == 1, ids, 0)
  segment_ids = ((np.arange(seq_len)[None] >= (lengths // 2)[:, None]) & (attention_mask == 1)).astype(np.int32)
  positions = np.stack([np.sort(rng.choice(np.arange(1, n), max_predictions, replace=False)) for n in lengths])
  weights = np.ones((batch_size, max_predictions), np.float32)
  weights[1::2, -1] = 0.0
  positions = np.where(weights > 0, positions, 0).astype(np.int32)
  masked_ids = np.where(weights > 0, np.take_along_axis(ids, positions, 1), 0).astype(np.int32)
  return dict(
      input_ids=ids, segment_ids=segment_ids, attention_mask=attention_mask,
      masked_positions=positions, masked_ids=masked_ids, masked_weights=weights,
      nsp_labels=rng.integers(0, 2, batch_size).astype(np.int32),
  )


def forward(model, batch, dropout_key=None):
  """The pretraining forward, compiled (eager dispatch is slow on CPU); see eager_forward."""
  graphdef, state = nnx.split(model)
  return _jitted_forward(graphdef, state, batch, dropout_key)


def eager_forward(model, batch, dropout_key=None):
  return model(batch["input_ids"], batch["segment_ids"], batch["attention_mask"], batch["masked_positions"],
               dropout_key=dropout_key)


@functools.partial(jax.jit, static_argnums=0)
def _jitted_forward(graphdef, state, batch, dropout_key):
  return eager_forward(nnx.merge(graphdef, state), batch, dropout_key)
