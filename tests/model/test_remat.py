"""Rematerialisation policies: the same loss and gradients as none, named points, fewer residuals."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax._src import ad_checkpoint

from bertjax.model import bert, layers
from bertjax.model import config as model_config
from tests.support.micro import eager_forward, micro_bert, pretraining_loss, synthetic_batch

BETWEEN = [p for p in model_config.REMAT_POLICIES if p not in ("none", "full")]


@functools.cache
def _loss_and_grads(remat: str, scan_layers: bool):
  """The pretraining loss and its parameter gradients on the micro model, with dropout on."""
  # The same seed: the same parameters whatever the policy.
  graphdef, params = nnx.split(bert.init_model(micro_bert(remat=remat, scan_layers=scan_layers), seed=3))
  batch = synthetic_batch()

  def loss(params):
    mlm, nsp = eager_forward(nnx.merge(graphdef, params), batch, jax.random.key(7))
    return pretraining_loss(mlm, nsp, batch)[0]

  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("scan_layers", [True, False])
@pytest.mark.parametrize("remat", model_config.REMAT_POLICIES[1:])
def test_every_policy_gives_the_loss_and_gradients_of_none(remat, scan_layers):
  want_loss, want_grads = _loss_and_grads("none", scan_layers)
  loss, grads = _loss_and_grads(remat, scan_layers)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads, want_grads)


def _encoder(remat: str):
  cfg = micro_bert(remat=remat, scan_layers=True)
  graphdef, state = nnx.split(layers.Encoder(cfg, rngs=nnx.Rngs(0)))
  x_BxLxE = jnp.ones((2, 16, cfg.hidden_size))
  mask_Bx1xLxL = jnp.ones((2, 1, 16, 16), bool)

  def out(state, x_BxLxE):
    return nnx.merge(graphdef, state)(x_BxLxE, mask_Bx1xLxL, None, jax.random.key(1)).sum()

  return out, state, x_BxLxE


def test_the_named_points_are_in_the_layer():
  out, state, x = _encoder("none")
  named = set(re.findall(r"\bname=(\w+)", str(jax.make_jaxpr(out)(state, x))))
  assert set(model_config.REMAT_POINTS) <= named


def _saved_bytes(remat: str) -> int:
  out, state, x = _encoder(remat)
  return sum(aval.size * aval.dtype.itemsize for aval, _ in ad_checkpoint.saved_residuals(out, state, x))


def test_policies_between_none_and_full_save_between_their_residuals():
  saved = {remat: _saved_bytes(remat) for remat in model_config.REMAT_POLICIES}
  for remat in BETWEEN:
    assert saved["full"] < saved[remat] < saved["none"], (remat, saved)
  # Keeping fewer names keeps fewer bytes.
  assert saved["attention_out_mlp_in"] < saved["dots_except_mlp_wide"] < saved["dots"], saved


def test_every_policy_has_a_checkpoint_policy():
  assert set(layers._REMAT) == set(model_config.REMAT_POLICIES) - {"none"}
