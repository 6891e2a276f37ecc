"""The sharded train step: mesh equivalence, accumulation, learning, donation, the guard."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from tests.support.corpora import examples_of
from tests.support.micro import compiled_steps as _steps
from tests.support.micro import micro_bert, synthetic_batch


def _one_step(mesh_shape, batch, grad_accum=1, cfg=None, **optim_changes):
  steps = _steps(mesh_shape, cfg=cfg, grad_accum=grad_accum, **optim_changes)
  state = steps.init(0)
  global_batch = {k: jax.device_put(v, steps.batch_sharding) for k, v in batch.items()}
  state, metrics = steps.train(state, global_batch)
  return jax.device_get(state.params), jax.device_get(metrics)


def test_one_step_is_the_same_on_every_mesh():
  batch = synthetic_batch(batch_size=16)
  reference_params, reference = _one_step((1, 1, 1), batch)
  # Pure data parallelism (the default) and every axis at once: FSDP and tensor shards each hold
  # half of their dimensions there, as many as a 4-way split would test.
  for name, shape in [("data", (8, 1, 1)), ("mixed", (2, 2, 2))]:
    params, metrics = _one_step(shape, batch)
    np.testing.assert_allclose(metrics["loss"], reference["loss"], rtol=1e-6, err_msg=name)
    np.testing.assert_allclose(metrics["grad_norm"], reference["grad_norm"], rtol=1e-5, err_msg=name)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reference_params)):
      np.testing.assert_allclose(a, b, atol=2e-6, err_msg=name)


@pytest.mark.parametrize("dropout_impl", ["threefry", "hash"])
def test_dropout_masks_do_not_depend_on_the_mesh(dropout_impl):
  batch = synthetic_batch(batch_size=16)
  with_dropout = micro_bert(dropout_impl=dropout_impl)
  _, one = _one_step((1, 1, 1), batch, cfg=with_dropout)
  _, eight = _one_step((2, 2, 2), batch, cfg=with_dropout)
  np.testing.assert_allclose(one["loss"], eight["loss"], rtol=1e-6)


def test_gradient_accumulation_equals_one_big_step():
  k = 4  # microbatches of 4 of the 16 rows: one row on each of the mesh's 4 batch shards
  batch = synthetic_batch(batch_size=16)
  whole_params, whole = _one_step((2, 2, 1), batch)
  accum_params, accum = _one_step((2, 2, 1), batch, grad_accum=k)
  for key in ("loss", "mlm_loss", "nsp_loss", "mlm_accuracy", "grad_norm"):
    np.testing.assert_allclose(accum[key], whole[key], rtol=2e-5, err_msg=key)
  for a, b in zip(jax.tree.leaves(accum_params), jax.tree.leaves(whole_params)):
    np.testing.assert_allclose(a, b, atol=3e-6)


def test_overfitting_one_batch_drives_mlm_accuracy_up():
  steps = _steps((2, 1, 1), lr=3e-3)
  state = steps.init(0)
  batch = {k: jax.device_put(v, steps.batch_sharding) for k, v in synthetic_batch(batch_size=8).items()}
  for _ in range(150):
    state, metrics = steps.train(state, batch)
  metrics = jax.device_get(metrics)
  assert metrics["mlm_accuracy"] > 0.9, metrics
  assert metrics["nsp_accuracy"] == 1.0, metrics


def test_state_is_created_sharded_and_donated():
  steps = _steps((1, 8, 1))
  state = steps.init(0)
  word = state.params["embeddings"]["word"]
  assert word.sharding.spec == P(None, "fsdp") or word.sharding.spec == P("tensor", "fsdp")
  # No device holds the whole table: each holds 1/8 of the embed columns.
  assert {s.data.shape for s in word.addressable_shards} == {(word.shape[0], word.shape[1] // 8)}
  mu_word = jax.tree.leaves(state.opt_state, is_leaf=lambda x: hasattr(x, "sharding"))
  assert any(getattr(x, "shape", None) == word.shape and x.sharding.spec == word.sharding.spec for x in mu_word)
  batch = {k: jax.device_put(v, steps.batch_sharding) for k, v in synthetic_batch(batch_size=8).items()}
  new_state, _ = steps.train(state, batch)
  assert word.is_deleted()  # donated: the old state's buffers were reused
  assert int(new_state.step) == 1


def test_abstract_state_carries_the_shardings():
  steps = _steps((2, 2, 2))
  abstract = steps.abstract_state()
  leaf = abstract.params["encoder"]["layers"]["feed_forward"]["in_kernel"]
  assert isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding.spec == P(None, "fsdp", "tensor")


def test_nonfinite_gradients_skip_the_update_and_are_counted():
  steps = _steps((2, 1, 1))
  state = steps.init(0)
  before = jax.device_get(state.params)
  batch = synthetic_batch(batch_size=8)
  batch["masked_weights"] = batch["masked_weights"] * np.float32("nan")
  batch = {k: jax.device_put(v, steps.batch_sharding) for k, v in batch.items()}
  for expected in (1, 2):
    state, metrics = steps.train(state, batch)
    assert int(metrics["nonfinite_consecutive"]) == expected and int(metrics["skipped_steps"]) == expected
  for a, b in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(before)):
    np.testing.assert_array_equal(a, b)
  assert int(state.step) == 2  # the global step still advances: the schedule follows it


# Packed rows of the session corpus (tests/support/corpora.py): at seq 128 with short targets
# about half the rows hold two pairs. The micro model gets 128 positions for them.
PACKED = dict(seq_len=128, short_seq_prob=1.0, max_predictions=20, pack_pairs=True, max_pairs_per_row=4)
PACKED_MODEL = micro_bert(dropout=0.0, attention_dropout=0.0, max_position_embeddings=128)


@pytest.fixture(scope="module")
def packed_and_alone(make_pipeline):
  """A packed global batch of real pairs, and the same pairs one a row, masked alike."""
  from bertjax.data import keyed_random

  p = make_pipeline(**PACKED)
  step = 2
  packed = p.batch(step)
  pairs, packing = p._epoch_data(0)
  index, row_of_pair, slot = packing.select(step * p.batch_size + np.arange(p.batch_size))
  alone = examples_of(p, pairs.take(index), keyed_random.row_keys(p.seed, 0, index))
  assert len(index) >= p.batch_size + 3  # several rows hold more than one pair
  return packed, alone, row_of_pair, slot


def test_a_packed_row_gives_each_pair_the_losses_it_has_alone(packed_and_alone):
  import optax
  from flax import nnx

  from bertjax.model.bert import init_model
  from bertjax.train.pretraining import PACKING_ARRAYS

  packed, alone, row_of_pair, slot = packed_and_alone
  graphdef, params = nnx.split(init_model(PACKED_MODEL, seed=0))

  @jax.jit
  def per_prediction_and_pair(params, batch):
    extra = {k: batch[k] for k in PACKING_ARRAYS if k in batch}
    mlm, nsp = nnx.merge(graphdef, params)(
      batch["input_ids"], batch["segment_ids"], batch["attention_mask"], batch["masked_positions"], **extra
    )
    ce = optax.softmax_cross_entropy_with_integer_labels
    return ce(mlm, batch["masked_ids"]), ce(nsp, batch["nsp_labels"])

  mlm_packed, nsp_packed = jax.device_get(per_prediction_and_pair(params, packed))
  mlm_alone, nsp_alone = jax.device_get(per_prediction_and_pair(params, alone))
  for j, (r, k) in enumerate(zip(row_of_pair, slot)):
    start, n = packed["nsp_positions"][r, k], alone["attention_mask"][j].sum()
    in_pair = (packed["masked_positions"][r] >= start) & (packed["masked_positions"][r] < start + n)
    mine = in_pair & (packed["masked_weights"][r] > 0)
    np.testing.assert_allclose(mlm_packed[r][mine], mlm_alone[j][alone["masked_weights"][j] > 0], atol=2e-5)
    np.testing.assert_allclose(nsp_packed[r, k], nsp_alone[j], atol=2e-5)


@pytest.fixture(scope="module")
def packed_step(packed_and_alone):
  """(parameters, metrics) after one step on the packed batch, on one device."""
  return _one_step((1, 1, 1), packed_and_alone[0], cfg=PACKED_MODEL)


def test_a_packed_step_is_the_step_on_the_same_pairs_unpacked(packed_and_alone, packed_step):
  """Same loss, same gradient, same update: NSP is averaged over real pairs, not rows."""
  packed, alone, row_of_pair, _ = packed_and_alone
  packed_params, p = packed_step
  alone_params, a = _one_step((1, 1, 1), alone, cfg=PACKED_MODEL)
  for key in ("loss", "mlm_loss", "nsp_loss", "mlm_accuracy", "nsp_accuracy", "grad_norm"):
    np.testing.assert_allclose(p[key], a[key], rtol=2e-5, err_msg=key)
  for x, y in zip(jax.tree.leaves(packed_params), jax.tree.leaves(alone_params)):
    np.testing.assert_allclose(x, y, atol=3e-6)
  assert p["pairs_per_row"] == pytest.approx(len(row_of_pair) / 8) and a["pairs_per_row"] == 1.0
  assert p["tokens"] == a["tokens"] == alone["attention_mask"].sum()
  assert p["padding_fraction"] == pytest.approx(1 - packed["attention_mask"].mean())
  assert p["padding_fraction"] < a["padding_fraction"]


def test_a_packed_step_is_the_same_on_a_mesh_with_accumulation(packed_and_alone, packed_step):
  """Eight devices (data, fsdp, tensor) and two microbatches of strided rows: the same step."""
  reference_params, reference = packed_step
  params, metrics = _one_step((2, 2, 2), packed_and_alone[0], grad_accum=2, cfg=PACKED_MODEL)
  for key in ("loss", "nsp_loss", "grad_norm", "pairs_per_row", "padding_fraction"):
    np.testing.assert_allclose(metrics[key], reference[key], rtol=2e-5, err_msg=key)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reference_params)):
    np.testing.assert_allclose(a, b, atol=3e-6)


def test_packed_eval_sums_and_baselines_count_pairs(packed_and_alone):
  from bertjax.train import losses
  from bertjax.train.run import baselines

  packed, alone, _, _ = packed_and_alone
  steps = _steps((1, 1, 1), cfg=PACKED_MODEL)
  params = steps.init(0).params
  got = jax.device_get(steps.eval(params, packed))
  want = jax.device_get(steps.eval(params, alone))
  assert got["nsp_weight_sum"] == want["nsp_weight_sum"] == len(alone["nsp_labels"])
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=2e-5, err_msg=key)
  assert losses.from_sums(got)["nsp_accuracy"] == pytest.approx(float(losses.from_sums(want)["nsp_accuracy"]))
  assert baselines([packed]) == baselines([alone])


def test_a_train_step_makes_no_implicit_host_transfer():
  """Under transfer_guard("disallow"), as the loop feeds it (batches placed explicitly, metrics
  read explicitly), two steps run; a host array slipped into the step is refused."""
  steps = _steps((2, 2, 2))
  state = steps.init(0)
  local = {k: np.asarray(v) for k, v in synthetic_batch(8).items()}
  batch = {k: jax.make_array_from_process_local_data(steps.batch_sharding, v, v.shape) for k, v in local.items()}
  with jax.transfer_guard("disallow"):
    for _ in range(2):
      state, metrics = steps.train(state, batch)
    assert np.isfinite(jax.device_get(metrics)["loss"])
    with pytest.raises(Exception, match="Disallowed host-to-device transfer"):
      steps.train(state, local)


def test_the_configured_rules_place_the_state_and_a_table_that_leaves_fsdp_undone_is_refused():
  """`mesh.rules` reaches the compiled steps: parameters follow the table (here `mlp` over fsdp and
  tensor), and a table that leaves BERT-base's large parameters whole on an fsdp mesh fails, in one
  line naming a parameter, before anything is compiled."""
  from jax.sharding import PartitionSpec

  from bertjax.config import defaults
  from bertjax.errors import BertjaxError
  from bertjax.model.config import resolve_config
  from bertjax.parallel import mesh as mesh_lib
  from bertjax.parallel.layout import parse_rules
  from bertjax.train import steps as steps_lib
  from bertjax.train.pretraining import Pretraining
  from tests.support.micro import optim_config

  base = defaults.get_config().model
  base.variant = "base"
  cfg = resolve_config(base, 30522, backend="cpu")
  mesh = mesh_lib.abstract_mesh((1, 4, 2))
  placed = steps_lib.compile_steps(
    Pretraining(), cfg, optim_config(), 10, 1, mesh, parse_rules("mlp=fsdp+tensor")
  ).state_shardings.params
  # [layers, mlp, embed]: mlp takes fsdp and tensor, so embed (fsdp by default) stays whole here.
  assert placed["encoder"]["layers"]["feed_forward"]["out_kernel"].spec == PartitionSpec(None, ("fsdp", "tensor"), None)
  with pytest.raises(BertjaxError) as error:
    steps_lib.compile_steps(Pretraining(), cfg, optim_config(), 10, 1, mesh, parse_rules("embed=,embed_out="))
  said = str(error.value)
  assert said.startswith("parameter ") and "is not split over mesh axis fsdp (size 4)" in said and "\n" not in said
