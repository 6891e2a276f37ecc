"""The FLOP model against the model's own parameter counts, the chips' peaks, throughput and MFU."""

import math

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from bertjax.metrics import flops as metrics
from bertjax.model import bert as model_lib
from bertjax.model import config as model_config

BERT_VOCAB = 30522  # bert-base-uncased; padded to 30592 = 239 * 128


def bert(variant: str, **changes) -> model_config.BertConfig:
  v = model_config.VARIANTS[variant]
  return model_config.BertConfig(
    vocab_size=BERT_VOCAB,
    hidden_size=v.hidden_size,
    num_layers=v.num_layers,
    num_heads=v.num_heads,
    intermediate_size=v.intermediate_size,
    **changes,
  )


def test_flops_of_bert_base_at_128_with_20_predictions_match_the_hand_count():
  h, i, n, seq, preds, vocab = 768, 3072, 12, 128, 20, 30592
  qkv = 2 * h * 3 * h  # 3,538,944 per token
  attention_out = 2 * h * h  # 1,179,648 per token
  ffn = 2 * h * i * 2  # 9,437,184 per token
  per_token_dense = qkv + attention_out + ffn  # 14,155,776
  scores_and_context = 2 * 2 * seq * seq * h  # 50,331,648 per layer per sequence
  encoder = n * (seq * per_token_dense + scores_and_context)  # 12 * 1,862,270,976 = 22,347,251,712
  pooler_and_nsp = 2 * h * h + 2 * h * 2  # 1,179,648 + 3,072
  mlm = preds * (2 * h * h + 2 * h * vocab)  # 20 * (1,179,648 + 46,989,312) = 963,379,200
  forward = encoder + pooler_and_nsp + mlm
  assert forward == 23_311_813_632
  cfg = bert("base")
  assert cfg.padded_vocab_size == vocab
  assert metrics.flops_per_sequence(cfg, seq, preds, training=False) == forward
  assert metrics.flops_per_sequence(cfg, seq, preds) == 3 * forward == 69_935_440_896
  assert metrics.flops_per_token(cfg, seq, preds) == pytest.approx(3 * forward / seq)


def test_training_is_three_forwards():
  for variant, seq, preds in (("base", 128, 20), ("large", 512, 80), ("tiny", 64, 10)):
    cfg = bert(variant)
    assert metrics.flops_per_sequence(cfg, seq, preds) == 3 * metrics.flops_per_sequence(
      cfg, seq, preds, training=False
    )


def test_mlm_head_cost_follows_max_predictions_not_seq_len():
  cfg = bert("base")
  fwd = lambda seq, preds: metrics.flops_per_sequence(cfg, seq, preds, training=False)
  per_prediction = 2 * 768 * 768 + 2 * 768 * 30592
  assert fwd(128, 21) - fwd(128, 20) == per_prediction
  assert fwd(128, 40) - fwd(128, 20) == 20 * per_prediction
  # Longer sequences at fixed predictions add encoder work only, no head work.
  encoder_per_token_and_layer = 8 * 768**2 + 4 * 768 * 3072
  attention = lambda seq: 12 * 4 * seq * seq * 768
  assert fwd(256, 20) - fwd(128, 20) == 12 * 128 * encoder_per_token_and_layer + attention(256) - attention(128)


def _encoder_parameter_count(cfg) -> int:
  params = nnx.state(model_lib.abstract_model(cfg).encoder, nnx.Param)
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))


def test_six_n_approximation_is_close_for_base_at_128():
  # 6 * N * tokens (N = non-embedding parameters: the encoder's) counts the dense layers only; the
  # model adds attention scores/context (4 L^2 H per layer, ~2.6% at L=128) and the MLM head on
  # 20 of 128 positions (~4.1%), so 6N must fall below it, by more than a little, within 10%.
  cfg = bert("base")
  n = _encoder_parameter_count(cfg)
  assert 85_000_000 < n < 85_100_000
  six_n = 6 * n * 128
  model = metrics.flops_per_sequence(cfg, 128, 20)
  assert 0.90 * model < six_n < 0.97 * model


def test_dense_terms_are_twice_the_encoder_kernels_per_token():
  cfg = bert("base")
  params = nnx.state(model_lib.abstract_model(cfg).encoder, nnx.Param)
  kernels = sum(
    math.prod(leaf.shape)
    for path, leaf in jax.tree_util.tree_leaves_with_path(params)
    if "kernel" in jax.tree_util.keystr(path)
  )
  one_token_no_attention_no_heads = (
    metrics.flops_per_sequence(cfg, 1, 0, training=False) - 12 * 4 * 768 - (2 * 768 * 768 + 4 * 768)
  )
  assert one_token_no_attention_no_heads == 2 * kernels


def test_forward_flops_agree_with_xla_cost_analysis():
  # XLA also counts elementwise work (softmax, GELU, LayerNorm, biases) that the model leaves out,
  # so it sits a little above; layers unrolled because cost analysis counts a scan body once.
  cfg = model_config.BertConfig(
    vocab_size=1000,
    hidden_size=256,
    num_layers=2,
    num_heads=4,
    intermediate_size=1024,
    scan_layers=False,
    dropout=0.0,
    attention_dropout=0.0,
  )
  graphdef, state = nnx.split(model_lib.abstract_model(cfg))
  batch, seq, preds = 2, 128, 20

  def forward(state, ids, segments, mask, positions):
    return nnx.merge(graphdef, state)(ids, segments, mask, positions)

  ints = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
  cost = (
    jax.jit(forward)
    .lower(state, ints(batch, seq), ints(batch, seq), ints(batch, seq), ints(batch, preds))
    .compile()
    .cost_analysis()
  )
  cost = cost[0] if isinstance(cost, list) else cost
  xla_per_sequence = cost["flops"] / batch
  model = metrics.flops_per_sequence(cfg, seq, preds, training=False)
  assert model < xla_per_sequence < 1.10 * model


# ---------------------------------------------------------------------------------------------
# Peaks and throughput


@pytest.mark.parametrize(
  "kind, tflops",
  [
    ("TPU v4", 275),
    ("TPU v5 lite", 197),
    ("TPU v5e", 197),
    ("TPU v5p", 459),
    ("TPU v5", 459),
    ("TPU v6 lite", 918),
    ("TPU v6e", 918),
    ("NVIDIA H100 80GB HBM3", 989),
    ("NVIDIA H200", 989),
    ("NVIDIA A100-SXM4-40GB", 312),
    ("NVIDIA A100-SXM4-80GB", 312),
  ],
)
def test_datasheet_peak_for_each_device_kind(kind, tflops):
  assert metrics.peak_flops_per_device(kind) == tflops * 1e12


@pytest.mark.parametrize("kind", ["cpu", "TFRT_CPU_0", "NVIDIA GeForce RTX 4090", "Tesla V100-SXM2-16GB", ""])
def test_unknown_devices_have_no_peak(kind):
  assert metrics.peak_flops_per_device(kind) is None


def test_configured_peak_wins():
  assert metrics.peak_flops_per_device("TPU v4", override_tflops=100.0) == 100e12
  assert metrics.peak_flops_per_device("cpu", override_tflops=0.5) == 0.5e12
  assert metrics.peak_flops_per_device("cpu", override_tflops=0.0) is None


def test_throughput_and_mfu_arithmetic():
  # 10 steps of 64 sequences in 4 s on 8 chips of 100 TFLOP/s, 1e12 FLOPs per sequence:
  # 640 sequences * 1e12 / 4 s = 1.6e14 FLOP/s over 8e14 peak = 0.2.
  meter = metrics.Throughput(flops_per_sequence=1e12, num_devices=8, peak_flops_per_device=100e12, start_step=100)
  rates = meter.update(step=110, sequences=640, tokens=60_000, seconds=4.0)
  assert rates == pytest.approx({"tokens_per_s": 15_000, "sequences_per_s": 160, "step_s": 0.4, "mfu": 0.2})
  rates = meter.update(step=115, sequences=320, tokens=30_000, seconds=1.0)  # interval since step 110
  assert rates["step_s"] == pytest.approx(0.2) and rates["mfu"] == pytest.approx(0.4)


def test_throughput_without_a_peak_leaves_mfu_out():
  meter = metrics.Throughput(flops_per_sequence=1e9, num_devices=1, peak_flops_per_device=None)
  assert set(meter.update(step=1, sequences=8, tokens=1000, seconds=0.5)) == {
    "tokens_per_s",
    "sequences_per_s",
    "step_s",
  }
  with pytest.raises(ValueError):
    meter.update(step=2, sequences=8, tokens=1000, seconds=0.0)
