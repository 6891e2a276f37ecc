"""The FLOP model, peaks and MFU, the JSONL and TensorBoard writers, the progress bar, the plot."""

import io
import json
import math
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bertjax import metrics
from bertjax import model as model_lib
from bertjax.errors import BertjaxError

BERT_VOCAB = 30522  # bert-base-uncased; padded to 30592 = 239 * 128


def bert(variant: str, **changes) -> model_lib.BertConfig:
  v = model_lib.VARIANTS[variant]
  return model_lib.BertConfig(vocab_size=BERT_VOCAB, hidden_size=v.hidden_size, num_layers=v.num_layers,
                              num_heads=v.num_heads, intermediate_size=v.intermediate_size, **changes)


# ---------------------------------------------------------------------------------------------
# FLOP model


def test_flops_of_bert_base_at_128_with_20_predictions_match_the_hand_count():
  h, i, n, seq, preds, vocab = 768, 3072, 12, 128, 20, 30592
  qkv = 2 * h * 3 * h               # 3,538,944 per token
  attention_out = 2 * h * h         # 1,179,648 per token
  ffn = 2 * h * i * 2               # 9,437,184 per token
  per_token_dense = qkv + attention_out + ffn  # 14,155,776
  scores_and_context = 2 * 2 * seq * seq * h   # 50,331,648 per layer per sequence
  encoder = n * (seq * per_token_dense + scores_and_context)  # 12 * 1,862,270,976 = 22,347,251,712
  pooler_and_nsp = 2 * h * h + 2 * h * 2       # 1,179,648 + 3,072
  mlm = preds * (2 * h * h + 2 * h * vocab)    # 20 * (1,179,648 + 46,989,312) = 963,379,200
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
    assert metrics.flops_per_sequence(cfg, seq, preds) == 3 * metrics.flops_per_sequence(cfg, seq, preds, training=False)


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
  kernels = sum(math.prod(leaf.shape) for path, leaf in jax.tree_util.tree_leaves_with_path(params)
                if "kernel" in jax.tree_util.keystr(path))
  one_token_no_attention_no_heads = (metrics.flops_per_sequence(cfg, 1, 0, training=False)
                                     - 12 * 4 * 768 - (2 * 768 * 768 + 4 * 768))
  assert one_token_no_attention_no_heads == 2 * kernels


def test_forward_flops_agree_with_xla_cost_analysis():
  # XLA also counts elementwise work (softmax, GELU, LayerNorm, biases) that the model leaves out,
  # so it sits a little above; layers unrolled because cost analysis counts a scan body once.
  cfg = model_lib.BertConfig(vocab_size=1000, hidden_size=256, num_layers=2, num_heads=4, intermediate_size=1024,
                             scan_layers=False, dropout=0.0, attention_dropout=0.0)
  graphdef, state = nnx.split(model_lib.abstract_model(cfg))
  batch, seq, preds = 2, 128, 20

  def forward(state, ids, segments, mask, positions):
    return nnx.merge(graphdef, state)(ids, segments, mask, positions)

  ints = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
  cost = jax.jit(forward).lower(state, ints(batch, seq), ints(batch, seq), ints(batch, seq),
                                ints(batch, preds)).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  xla_per_sequence = cost["flops"] / batch
  model = metrics.flops_per_sequence(cfg, seq, preds, training=False)
  assert model < xla_per_sequence < 1.10 * model


# ---------------------------------------------------------------------------------------------
# Peaks and throughput


@pytest.mark.parametrize("kind, tflops", [
    ("TPU v4", 275), ("TPU v5 lite", 197), ("TPU v5e", 197), ("TPU v5p", 459), ("TPU v5", 459),
    ("TPU v6 lite", 918), ("TPU v6e", 918), ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H200", 989),
    ("NVIDIA A100-SXM4-40GB", 312), ("NVIDIA A100-SXM4-80GB", 312),
])
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
  assert set(meter.update(step=1, sequences=8, tokens=1000, seconds=0.5)) == {"tokens_per_s", "sequences_per_s", "step_s"}
  with pytest.raises(ValueError):
    meter.update(step=2, sequences=8, tokens=1000, seconds=0.0)


# ---------------------------------------------------------------------------------------------
# Writers


@pytest.mark.parametrize("data, crc", [
    (b"", 0x00000000), (b"123456789", 0xE3069283), (b"a", 0xC1D04330),
    (bytes(32), 0x8A9136AA), (b"\xff" * 32, 0x62A8AB43), (bytes(range(32)), 0x46DD794E),
])
def test_crc32c_known_vectors(data, crc):  # RFC 3720 B.4 and the classic check value
  assert metrics.crc32c(data) == crc


def test_tfrecord_framing():
  record = metrics.tfrecord(b"hello")
  assert struct.unpack("<Q", record[:8])[0] == 5 and record[12:17] == b"hello" and len(record) == 21


def _write_two_steps(workdir, writer_cls=metrics.MetricsWriter):
  with writer_cls(workdir) as writer:
    writer.write(10, {"loss": 7.5, "mlm_accuracy": np.float32(0.125), "skipped_steps": np.int64(0)})
    writer.write(10, {"loss": jnp.asarray(7.25)}, split="eval")


def test_jsonl_records_parse_and_a_resumed_run_appends(tmp_path):
  _write_two_steps(tmp_path)
  with metrics.MetricsWriter(tmp_path) as writer:  # a resumed run
    writer.write(20, {"loss": 6.0, "epoch": 1})
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert len(lines) == 3
  records = [json.loads(line) for line in lines]
  assert records[0]["step"] == 10 and records[0]["split"] == "train" and records[0]["mlm_accuracy"] == 0.125
  assert isinstance(records[0]["skipped_steps"], int) and isinstance(records[0]["time"], float)
  assert records[1] == {"step": 10, "split": "eval", "time": records[1]["time"], "loss": 7.25}
  assert records[2]["epoch"] == 1 and metrics.read_metrics(tmp_path) == records


def test_read_metrics_skips_a_line_cut_by_a_crash(tmp_path):
  _write_two_steps(tmp_path)
  with (tmp_path / "metrics.jsonl").open("a") as f:
    f.write('{"step": 11, "split": "tr')  # killed mid-write
  assert [r["step"] for r in metrics.read_metrics(tmp_path)] == [10, 10]
  with metrics.MetricsWriter(tmp_path) as writer:  # resuming starts a fresh line after the fragment
    writer.write(12, {"loss": 5.0})
  assert [r["step"] for r in metrics.read_metrics(tmp_path)] == [10, 10, 12]
  assert metrics.read_metrics(tmp_path / "elsewhere") == []


def test_a_store_that_cannot_append_keeps_the_earlier_lines(tmp_path):
  class NoAppendPath(type(metrics.epath.Path(tmp_path))):  # like gs:// on some backends
    def open(self, mode="r", *args, **kwargs):
      if "a" in mode:
        raise NotImplementedError("append")
      return super().open(mode, *args, **kwargs)

  path = NoAppendPath(tmp_path / "metrics.jsonl")
  path.write_text('{"step": 1}\n{"step": 2')  # the second line was cut by a crash
  with metrics._open_for_append(path) as handle:
    handle.write('{"step": 3}\n')
  assert path.read_text() == '{"step": 1}\n{"step": 2\n{"step": 3}\n'


def test_writer_refuses_what_json_and_tensorboard_cannot_hold(tmp_path):
  with metrics.MetricsWriter(tmp_path) as writer:
    with pytest.raises(ValueError, match="step"):
      writer.write(1, {"step": 3.0})
    with pytest.raises(ValueError, match="scalar"):
      writer.write(1, {"loss": np.ones(3)})


def test_tensorboard_reads_back_the_same_tags_steps_and_values(tmp_path):
  from tensorboard.backend.event_processing import event_accumulator

  _write_two_steps(tmp_path)
  with metrics.MetricsWriter(tmp_path) as writer:
    writer.write(20, {"loss": 6.0})
  files = sorted((tmp_path / "tb").iterdir())
  assert len(files) == 2 and all(f.name.startswith("events.out.tfevents.") for f in files)

  acc = event_accumulator.EventAccumulator(str(tmp_path / "tb"))
  acc.Reload()
  assert set(acc.Tags()["scalars"]) == {"train/loss", "train/mlm_accuracy", "train/skipped_steps", "eval/loss"}
  assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(10, 7.5), (20, 6.0)]
  assert [(e.step, e.value) for e in acc.Scalars("train/mlm_accuracy")] == [(10, 0.125)]
  assert [(e.step, e.value) for e in acc.Scalars("eval/loss")] == [(10, 7.25)]


def test_event_file_starts_with_the_file_version_and_checksums_verify(tmp_path):
  from tensorboard.backend.event_processing import event_file_loader

  _write_two_steps(tmp_path)
  (path,) = (tmp_path / "tb").iterdir()
  events = list(event_file_loader.EventFileLoader(str(path)).Load())
  assert events[0].file_version == "brain.Event:2"
  assert [e.step for e in events[1:]] == [10, 10]
  assert events[1].wall_time == pytest.approx(metrics.read_metrics(tmp_path)[0]["time"])
  # Flip one payload byte: the data CRC no longer matches, which TensorBoard's reader checks.
  raw = bytearray(path.read_bytes())
  raw[-6] ^= 0xFF
  path.write_bytes(bytes(raw))
  assert len(list(event_file_loader.EventFileLoader(str(path)).Load())) < len(events)


def test_disabled_writer_writes_nothing(tmp_path):
  with metrics.MetricsWriter(tmp_path / "run", enabled=False) as writer:
    writer.write(1, {"loss": 1.0})
    writer.flush()
  assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# Console


class FakeClock:
  def __init__(self):
    self.now = 1000.0

  def __call__(self):
    return self.now


def test_progress_bar_prints_a_line_per_update_off_a_terminal():
  stream, clock = io.StringIO(), FakeClock()
  bar = metrics.ProgressBar(total_steps=1000, start_step=100, stream=stream, clock=clock)
  clock.now += 60.0  # 100 steps a minute: 800 steps to go take 8 minutes
  bar.update(200, {"loss": 6.54321, "mlm_accuracy": 0.1234, "nsp_accuracy": 0.6, "tokens_per_s": 123456.7})
  clock.now += 3600.0
  bar.update(300, {"loss": 5.0})
  bar.close()
  assert stream.getvalue().splitlines() == [
      "step  200/1000 | loss 6.5432 | mlm_acc 0.1234 | nsp_acc 0.6000 | 123,457 tok/s | ETA 8m00s",
      "step  300/1000 | loss 5.0000 | ETA 3h33m",  # (60 + 3600) s / 200 steps * 700 steps = 12810 s = 3h33m30s
  ]
  assert "\r" not in stream.getvalue()


def test_progress_bar_redraws_in_place_on_a_terminal():
  class Terminal(io.StringIO):
    def isatty(self):
      return True

  stream, clock = Terminal(), FakeClock()
  bar = metrics.ProgressBar(total_steps=10, stream=stream, clock=clock)
  bar.update(0, {"loss": 10.0, "tokens_per_s": 1e6})
  clock.now += 1.0
  bar.update(5, {"loss": 9.0})
  bar.close()
  first, second = stream.getvalue().split("\r")[1:]
  assert first == "step  0/10 | loss 10.0000 | 1,000,000 tok/s | ETA ?"
  assert second.rstrip("\n").rstrip() == "step  5/10 | loss 9.0000 | ETA 0m01s"
  assert len(second.rstrip("\n")) == len(first) and stream.getvalue().endswith("\n")


def test_disabled_progress_bar_prints_nothing():
  stream = io.StringIO()
  bar = metrics.ProgressBar(total_steps=10, enabled=False, stream=stream)
  bar.update(5, {"loss": 1.0})
  bar.close()
  assert stream.getvalue() == ""


# ---------------------------------------------------------------------------------------------
# Plot


def test_plot_curves_writes_a_png_of_train_and_eval(tmp_path):
  from bertjax import plot

  with metrics.MetricsWriter(tmp_path) as writer:
    for step in range(0, 200, 10):
      decay = math.exp(-step / 100)
      writer.write(step, {"loss": 1 + 9 * decay, "mlm_loss": 9 * decay, "nsp_loss": 0.7 * decay,
                          "mlm_accuracy": 1 - decay, "nsp_accuracy": 1 - 0.5 * decay})
      if step % 50 == 0:
        writer.write(step, {"loss": 1.5 + 9 * decay, "mlm_accuracy": 0.9 - decay}, split="eval")
  out = metrics.plot_curves(tmp_path)
  assert out == tmp_path / "curves.png"
  png = out.read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
  curves = plot.curves_by_split(metrics.read_metrics(tmp_path), "loss")
  assert set(curves) == {"train", "eval"} and curves["eval"][0] == [0, 50, 100, 150]

  elsewhere = metrics.plot_curves(tmp_path, tmp_path / "plots" / "run.png")
  assert elsewhere.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_curves_keep_the_latest_record_of_a_step_logged_twice():
  from bertjax import plot

  records = [{"step": 10, "split": "train", "loss": 3.0}, {"step": 20, "split": "train", "loss": 2.0},
             {"step": 10, "split": "train", "loss": 2.5}]  # resumed from step 10
  assert plot.curves_by_split(records, "loss") == {"train": ([10, 20], [2.5, 2.0])}


def test_plot_without_metrics_is_a_user_error(tmp_path):
  with pytest.raises(BertjaxError, match=r"--workdir .*no metrics.jsonl there; train first"):
    metrics.plot_curves(tmp_path)
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "split": "train", "time": 0, "lr": 0.1}\n')
  with pytest.raises(BertjaxError, match="no loss or accuracy"):
    metrics.plot_curves(tmp_path)
