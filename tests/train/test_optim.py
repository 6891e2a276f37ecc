"""bertjax.train.optim: the schedule, the weight-decay mask, AdamW (Google's, no bias correction) against
a NumPy reference, LAMB's per-layer trust ratio, clipping and the non-finite guard."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from bertjax.config import defaults
from bertjax.errors import BertjaxError
from bertjax.model import bert as model_lib
from bertjax.train import optim
from configs import base
from tests.support.micro import micro_bert


def optim_config(**changes):
  c = defaults.get_config().optim
  c.update(changes)
  return c


def small_params():
  """A kernel (decayed), a bias and a LayerNorm scale (both excluded), all non-zero."""
  rng = np.random.default_rng(0)
  return {
    "dense": {
      "kernel": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
      "bias": jnp.asarray(rng.normal(size=(4,)), jnp.float32),
    },
    "norm": {"scale": jnp.asarray(1.0 + rng.normal(size=(4,)), jnp.float32)},
  }


def small_grads(seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), small_params())


def run_steps(tx, params, grads_list):
  update = jax.jit(tx.update)
  state = tx.init(params)
  for grads in grads_list:
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return params, state


# -- schedule --

LR, END, WARMUP, TOTAL = 1e-3, 1e-5, 100, 1100


@pytest.mark.parametrize(
  "decay, decayed_fraction",
  [
    ("linear", lambda progress: 1 - progress),
    ("polynomial", lambda progress: (1 - progress) ** 2),
    ("constant", None),
  ],
)
def test_schedule_warms_up_then_decays_and_clamps(decay, decayed_fraction):
  cfg = optim_config(lr=LR, end_lr=END, warmup_steps=WARMUP, decay=decay, decay_power=2.0, schedule_steps=0)
  schedule = optim.learning_rate_schedule(cfg, TOTAL)
  after_warmup = (
    (lambda step: LR)
    if decayed_fraction is None
    else (lambda step: END + (LR - END) * decayed_fraction(min((step - WARMUP) / (TOTAL - WARMUP), 1.0)))
  )
  expected = {
    0: 0.0,
    50: LR / 2,
    99: LR * 0.99,
    WARMUP: LR,
    600: after_warmup(600),
    850: after_warmup(850),
    TOTAL: after_warmup(TOTAL),
    5000: after_warmup(5000),
  }
  got = {step: float(schedule(step)) for step in expected}
  np.testing.assert_allclose(list(got.values()), list(expected.values()), rtol=1e-6, atol=1e-12)
  if decay != "constant":
    assert got[TOTAL] == pytest.approx(END) and got[5000] == pytest.approx(END)


def test_schedule_without_warmup_starts_at_peak():
  schedule = optim.learning_rate_schedule(optim_config(lr=LR, warmup_steps=0, end_lr=0.0), 1000)
  assert float(schedule(0)) == pytest.approx(LR)
  assert float(schedule(500)) == pytest.approx(LR / 2)


def test_both_phases_share_one_schedule():
  phase1, phase2 = base.get_config("phase=1"), base.get_config("phase=2")
  assert phase1.train.steps != phase2.train.steps
  s1 = optim.learning_rate_schedule(phase1.optim, phase1.train.steps)
  s2 = optim.learning_rate_schedule(phase2.optim, phase2.train.steps)
  steps = jnp.array([0, 5_000, 10_000, 500_000, 899_999, 900_000, 950_000, 1_000_000, 1_200_000])
  np.testing.assert_array_equal(s1(steps), s2(steps))
  lr, warmup = phase1.optim.lr, phase1.optim.warmup_steps
  assert float(s2(900_000)) == pytest.approx(lr * (1 - (900_000 - warmup) / (1_000_000 - warmup)), rel=1e-5)


# -- weight-decay mask --


@pytest.fixture(scope="module")
def micro_params():
  return nnx.to_pure_dict(nnx.state(model_lib.init_model(micro_bert(), 0), nnx.Param))


# Every bias and every LayerNorm parameter of the model; everything else is decayed.
NOT_DECAYED = {
  "embeddings/norm/scale",
  "embeddings/norm/bias",
  "encoder/layers/attention/qkv_bias",
  "encoder/layers/attention/out_bias",
  "encoder/layers/attention_norm/scale",
  "encoder/layers/attention_norm/bias",
  "encoder/layers/feed_forward/in_bias",
  "encoder/layers/feed_forward/out_bias",
  "encoder/layers/output_norm/scale",
  "encoder/layers/output_norm/bias",
  "pooler/bias",
  "nsp_head/bias",
  "mlm_head/transform_bias",
  "mlm_head/output_bias",
  "mlm_head/transform_norm/scale",
  "mlm_head/transform_norm/bias",
}


def path_str(path):
  return jax.tree_util.keystr(path, simple=True, separator="/")


def test_mask_excludes_exactly_biases_and_layernorms(micro_params):
  mask = optim.weight_decay_mask(micro_params)
  assert jax.tree.structure(mask) == jax.tree.structure(micro_params)
  excluded = {path_str(p) for p, decayed in jax.tree_util.tree_leaves_with_path(mask) if not decayed}
  assert excluded == NOT_DECAYED


@pytest.mark.parametrize("name", ["adamw", "lamb"])
def test_zero_gradient_shrinks_only_decayed_parameters(micro_params, name):
  # Non-zero everywhere (biases start at 0, which decay would leave at 0 anyway).
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda p: jnp.asarray(1.0 + rng.random(p.shape), jnp.float32), micro_params)
  cfg = optim_config(name=name, lr=0.1, warmup_steps=0, weight_decay=0.5)
  new, _ = run_steps(optim.build_optimizer(cfg, 100), params, [jax.tree.map(jnp.zeros_like, params)])
  for (path, old), changed in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(new)):
    if path_str(path) in NOT_DECAYED:
      np.testing.assert_array_equal(changed, old, err_msg=path_str(path))
    else:
      assert np.all(np.asarray(changed) < np.asarray(old)), path_str(path)


# -- AdamW against NumPy --


def numpy_bert_adamw(params, grads_list, *, lr_at, b1, b2, eps, wd, clip, decayed):
  """google-research/bert's AdamWeightDecayOptimizer (no bias correction), after global-norm clipping."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v = {k: np.zeros_like(x) for k, x in p.items()}
  for t, grads in enumerate(grads_list):
    g = {k: np.asarray(x, np.float64) for k, x in grads.items()}
    norm = np.sqrt(sum(np.sum(x**2) for x in g.values()))
    if clip and norm > clip:
      g = {k: x * clip / norm for k, x in g.items()}
    for k, w in list(p.items()):
      m[k] = b1 * m[k] + (1 - b1) * g[k]
      v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
      step = m[k] / (np.sqrt(v[k]) + eps) + (wd * w if decayed[k] else 0.0)
      p[k] = w - lr_at(t) * step
  return p


def flat(tree):
  return {path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_adamw_matches_googles_update(clip):
  cfg = optim_config(
    name="adamw", lr=0.1, warmup_steps=2, schedule_steps=10, end_lr=0.0, weight_decay=0.1, clip_norm=clip
  )
  params, grads_list = small_params(), [small_grads(seed) for seed in range(4)]
  got, _ = run_steps(optim.build_optimizer(cfg, 100), params, grads_list)
  lr_at = lambda t: 0.1 * t / 2 if t < 2 else 0.1 * (1 - (t - 2) / 8)
  want = numpy_bert_adamw(
    flat(params),
    [flat(g) for g in grads_list],
    lr_at=lr_at,
    b1=0.9,
    b2=0.999,
    eps=1e-6,
    wd=0.1,
    clip=clip,
    decayed={"dense/kernel": True, "dense/bias": False, "norm/scale": False},
  )
  for k, x in flat(got).items():
    np.testing.assert_allclose(x, want[k], rtol=1e-5, atol=1e-6, err_msg=k)


# -- LAMB --


def test_lamb_equals_optax_lamb_on_unstacked_decayed_parameters():
  cfg = optim_config(name="lamb", lr=0.01, warmup_steps=0, clip_norm=0.0, weight_decay=0.1)
  params = {"a": {"kernel": small_params()["dense"]["kernel"]}, "b": {"kernel": 5 * jnp.ones((2, 2))}}
  grads_list = [jax.tree.map(lambda p, s=s: jnp.sin(p + s), params) for s in range(3)]
  got, _ = run_steps(optim.build_optimizer(cfg, 100), params, grads_list)
  reference = optax.lamb(optim.learning_rate_schedule(cfg, 100), b1=0.9, b2=0.999, eps=1e-6, weight_decay=0.1)
  want, _ = run_steps(reference, params, grads_list)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), got, want)


def test_lamb_has_one_trust_ratio_per_stacked_layer_and_none_for_biases():
  lr, wd = 0.01, 0.1
  cfg = optim_config(name="lamb", lr=lr, warmup_steps=0, clip_norm=0.0, weight_decay=wd)
  rng = np.random.default_rng(2)
  kernel = rng.normal(size=(2, 3, 4)) * np.array([1.0, 10.0])[:, None, None]  # layers of unequal norm
  params = {
    "encoder": {
      "layers": {
        "ffn": {"kernel": jnp.asarray(kernel, jnp.float32), "bias": jnp.asarray(rng.normal(size=(2, 4)), jnp.float32)}
      }
    }
  }
  grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
  new, _ = run_steps(optim.build_optimizer(cfg, 100), params, [grads])
  layer = params["encoder"]["layers"]["ffn"]
  g = grads["encoder"]["layers"]["ffn"]
  # First bias-corrected Adam step: m_hat / (sqrt(v_hat) + eps) = g / (|g| + eps).
  direction = {k: np.asarray(g[k]) / (np.abs(np.asarray(g[k])) + 1e-6) for k in g}
  u = direction["kernel"] + wd * kernel
  ratios = np.linalg.norm(kernel.reshape(2, -1), axis=1) / np.linalg.norm(u.reshape(2, -1), axis=1)
  assert abs(ratios[0] - ratios[1]) > 1.0
  new_layer = new["encoder"]["layers"]["ffn"]
  np.testing.assert_allclose(new_layer["kernel"], kernel - lr * ratios[:, None, None] * u, rtol=1e-5)
  np.testing.assert_allclose(new_layer["bias"], layer["bias"] - lr * direction["bias"], rtol=1e-5)
  # And it is not AdamW: the same step with AdamW lands elsewhere.
  adamw, _ = run_steps(
    optim.build_optimizer(optim_config(name="adamw", lr=lr, warmup_steps=0, clip_norm=0.0, weight_decay=wd), 100),
    params,
    [grads],
  )
  assert not np.allclose(adamw["encoder"]["layers"]["ffn"]["kernel"], new_layer["kernel"], rtol=1e-3)


# -- clipping --


def test_clipping_a_norm_10_gradient_equals_the_gradient_scaled_to_norm_1():
  params, grads = small_params(), small_grads(3)
  norm = float(optax.tree.norm(grads))
  big = jax.tree.map(lambda g: g * 10.0 / norm, grads)
  unit = jax.tree.map(lambda g: g / norm, grads)
  tx = optim.build_optimizer(optim_config(name="adamw", lr=0.1, warmup_steps=0, clip_norm=1.0), 100)
  (p_big, s_big), (p_unit, s_unit) = run_steps(tx, params, [big]), run_steps(tx, params, [unit])
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), (p_big, s_big), (p_unit, s_unit))
  # Without clipping the first moment keeps the norm-10 gradient.
  unclipped = optim.build_optimizer(optim_config(name="adamw", lr=0.1, warmup_steps=0, clip_norm=0.0), 100)
  _, s_off = run_steps(unclipped, params, [big])
  mu_off, mu_on = (optax.tree_utils.tree_get(s, "mu") for s in (s_off, s_big))
  np.testing.assert_allclose(optax.tree.norm(mu_off), 10 * optax.tree.norm(mu_on), rtol=1e-5)


# -- the non-finite guard --


@pytest.mark.parametrize("name", ["adamw", "lamb"])
def test_nonfinite_gradient_skips_the_update_and_is_counted(name):
  tx = optim.build_optimizer(optim_config(name=name, lr=0.1, warmup_steps=0), 100)

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, optim.nonfinite_counts(state)

  params = small_params()
  state = tx.init(params)
  params, state, counts = step(params, state, small_grads(0))
  assert tuple(map(int, counts)) == (0, 0)
  moments = lambda s: (optax.tree_utils.tree_get(s, "mu"), optax.tree_utils.tree_get(s, "nu"))
  for consecutive, bad in enumerate([jnp.nan, jnp.inf], start=1):
    grads = small_grads(1)
    grads["dense"]["bias"] = grads["dense"]["bias"].at[0].set(bad)
    new_params, new_state, counts = step(params, state, grads)
    jax.tree.map(np.testing.assert_array_equal, (new_params, moments(new_state)), (params, moments(state)))
    assert tuple(map(int, counts)) == (consecutive, consecutive)
    params, state = new_params, new_state
  new_params, state, counts = step(params, state, small_grads(2))
  assert tuple(map(int, counts)) == (0, 2)
  assert not np.allclose(new_params["dense"]["kernel"], params["dense"]["kernel"])


def test_skipped_steps_still_advance_the_schedule():
  # Warmup makes lr(0) = 0: if the skipped step 0 did not count, step 1 would not move anything.
  cfg = optim_config(name="adamw", lr=0.1, warmup_steps=10, weight_decay=0.0, clip_norm=0.0)
  params, grads = small_params(), small_grads(0)
  nan_grads = jax.tree.map(lambda g: g * jnp.nan, grads)
  new, _ = run_steps(optim.build_optimizer(cfg, 100), params, [nan_grads, grads])
  g = np.asarray(grads["dense"]["kernel"])
  first_step = 0.1 * g / (np.sqrt(0.001) * np.abs(g) + 1e-6)  # uncorrected Adam, step 1
  np.testing.assert_allclose(new["dense"]["kernel"], params["dense"]["kernel"] - 0.1 / 10 * first_step, rtol=1e-5)


def test_check_nonfinite_stops_at_the_threshold():
  optim.check_nonfinite(0, 10, step=5)
  optim.check_nonfinite(jnp.int32(9), 10, step=1233)
  with pytest.raises(BertjaxError) as error:
    optim.check_nonfinite(jnp.int32(10), 10, step=1234)
  message = str(error.value)
  assert "\n" not in message
  assert message.startswith("step 1225 went non-finite, and so did every step to step 1234")
  assert "10 consecutive steps" in message and "optim.max_nonfinite=10" in message
  for advice in ("optim.lr", "optim.warmup_steps", "optim.clip_norm", "model.dtype=float32"):
    assert advice in message
  assert "start again" in message
  with pytest.raises(
    BertjaxError, match="; checkpoint 1200 is from before it: resume from there with a lower optim.lr"
  ):
    optim.check_nonfinite(jnp.int32(10), 10, step=1234, newest_checkpoint=1200)


@pytest.mark.parametrize("name", ["adamw", "lamb"])
def test_moments_map_like_parameters(name):
  # bertjax.parallel.rules.optimizer_shardings places the state with tree_map_params: every moment must be
  # recognised as parameter-shaped, every counter as not.
  tx = optim.build_optimizer(optim_config(name=name), 100)
  params = small_params()
  marked = optax.tree_utils.tree_map_params(
    tx, lambda _: "param", tx.init(params), transform_non_params=lambda _: "other"
  )
  counts = {kind: jax.tree.leaves(marked).count(kind) for kind in ("param", "other")}
  assert counts["param"] == 2 * len(jax.tree.leaves(params))
  assert counts["other"] == {"adamw": 4, "lamb": 5}[name]  # guard's 3, schedule count (+ LAMB's Adam count)
