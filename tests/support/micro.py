"""The test-only micro scale (H=32, 2 layers, vocab 256, seq 32) and what tests build at it."""

import functools

import jax
import numpy as np
import pytest
from flax import nnx

from bertjax.config import defaults
from bertjax.data import synthetic
from bertjax.model.config import BertConfig
from bertjax.parallel import mesh as mesh_lib
from bertjax.parallel.layout import MESH_AXES
from bertjax.train import losses
from bertjax.train import steps as steps_lib
from bertjax.train.pretraining import Pretraining

MICRO = dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=128, max_position_embeddings=64)
MICRO_DATA = dict(seq_len=32, max_predictions=5, vocab_size=256)


def micro_run_config():
  """The full run config at micro scale (a ConfigDict, as the CLI would build it)."""
  c = defaults.get_config()
  c.model.update(MICRO)
  c.data.update(MICRO_DATA)
  c.train.batch_size = 8
  return c


@pytest.fixture
def micro_config():
  return micro_run_config()


def micro_bert(vocab_size: int = 256, **changes) -> BertConfig:
  return BertConfig(vocab_size=vocab_size, **{**MICRO, **changes})


def synthetic_batch(batch_size=8, seq_len=32, max_predictions=5, vocab_size=256, seed=0):
  """bertjax's synthetic batch in its padded form: rows of random length, unused prediction slots."""
  return synthetic.synthetic_batch(batch_size, seq_len, max_predictions, vocab_size, seed=seed, padded=True)


def forward(model, batch, dropout_key=None):
  """The pretraining forward, compiled (eager dispatch is slow on CPU); see eager_forward."""
  graphdef, state = nnx.split(model)
  return _jitted_forward(graphdef, state, batch, dropout_key)


def eager_forward(model, batch, dropout_key=None):
  return model(
    batch["input_ids"],
    batch["segment_ids"],
    batch["attention_mask"],
    batch["masked_positions"],
    dropout_key=dropout_key,
  )


@functools.partial(jax.jit, static_argnums=0)
def _jitted_forward(graphdef, state, batch, dropout_key):
  return eager_forward(nnx.merge(graphdef, state), batch, dropout_key)


def optim_config(**changes):
  """The default optimizer section at a learning rate that moves a micro model in a few steps."""
  c = defaults.get_config().optim
  c.update({"lr": 1e-3, "warmup_steps": 0, **changes})
  return c


def compiled_steps(mesh_shape, cfg=None, grad_accum=1, devices=None, **optim_changes) -> steps_lib.CompiledSteps:
  """The micro model's steps on a (data, fsdp, tensor) mesh of the first devices (or `devices`)."""
  mesh_cfg = dict(zip(MESH_AXES, mesh_shape))
  devices = jax.devices()[: int(np.prod(mesh_shape))] if devices is None else devices
  mesh = mesh_lib.make_mesh(mesh_cfg, devices)
  return steps_lib.compile_steps(
    Pretraining(),
    cfg or micro_bert(dropout=0.0, attention_dropout=0.0),
    optim_config(**optim_changes),
    100,
    grad_accum,
    mesh,
  )


def pretraining_loss(mlm_logits, nsp_logits, batch):
  """(loss, metrics) of one batch: MLM + NSP, each the mean over its real predictions or pairs."""
  metrics = losses.from_sums(losses.pretraining_sums(mlm_logits, nsp_logits, batch))
  return metrics["loss"], metrics
