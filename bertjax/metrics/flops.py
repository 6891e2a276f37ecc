"""The FLOP model of BERT pretraining, the chips' peaks, and throughput and MFU from them.

flops_per_sequence   model FLOPs of one sequence (matmuls only), the basis of MFU
PEAK_TFLOPS          datasheet dense bf16 TFLOP/s per chip; `peak_flops_per_device` looks a
                     device kind up (or takes `metrics.peak_tflops` from the config)
Throughput           tokens/s, sequences/s, step time and MFU over an interval
"""

import re

from bertjax.model.config import BertConfig


def flops_per_sequence(cfg: BertConfig, seq_len: int, max_predictions: int, training: bool = True) -> float:
  """Model FLOPs of one sequence of `seq_len` tokens through BERT pretraining.

  A matmul of [m, k] by [k, n] costs 2*m*k*n FLOPs (one multiply, one add). With H hidden,
  I intermediate, N layers, L = seq_len, P = max_predictions, V = the padded vocabulary:

    per layer, per token (2 x the weights each token meets):
      fused QKV projection            2 * H * 3H = 6 H^2
      attention output projection     2 * H * H  = 2 H^2
      feed-forward in and out         2 * H * I * 2 = 4 H I
    per layer, per sequence (activation x activation, no weights):
      attention scores Q K^T          2 * L * L * H   (summed over heads: heads * head_dim = H)
      attention context P V           2 * L * L * H
    once per sequence:
      pooler ([CLS] -> H)             2 H^2
      NSP classifier (H -> 2)         4 H
    MLM head, at the P gathered prediction slots only (the model never computes the others; the
    padded slots of a batch are computed all the same, so P, not the number of real masks):
      transform                       2 H^2
      decoder tied to the embeddings  2 H V   (V padded to a multiple of 128: those rows are computed)

  forward = N * (L * (8 H^2 + 4 H I) + 4 L^2 H) + 2 H^2 + 4 H + P * (2 H^2 + 2 H V).
  Training is 3 x forward: the backward pass computes the gradients of both the activations and
  the weights, two matmuls for every forward one. Excluded: the embedding gathers (no matmul),
  biases, LayerNorm, softmax, GELU, dropout and the loss (elementwise, under 1% at BERT sizes), and
  rematerialisation (MFU counts the model's FLOPs, not the hardware's).
  """
  h, i, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
  dense_per_token = 6 * h * h + 2 * h * h + 4 * h * i
  attention_per_sequence = 2 * 2 * seq_len * seq_len * h
  encoder = n * (seq_len * dense_per_token + attention_per_sequence)
  pooler_and_nsp = 2 * h * h + 2 * h * 2
  mlm_head = max_predictions * (2 * h * h + 2 * h * cfg.padded_vocab_size)
  forward = encoder + pooler_and_nsp + mlm_head
  return float(3 * forward if training else forward)


def flops_per_token(cfg: BertConfig, seq_len: int, max_predictions: int, training: bool = True) -> float:
  """`flops_per_sequence` spread over the `seq_len` positions (padding included)."""
  return flops_per_sequence(cfg, seq_len, max_predictions, training) / seq_len


# Datasheet dense bf16 TFLOP/s per chip: MFU is model FLOP/s over this peak.
PEAK_TFLOPS: dict[str, float] = {
  "TPU v4": 275.0,
  "TPU v5e": 197.0,
  "TPU v5p": 459.0,
  "TPU v6e": 918.0,
  "A100": 312.0,
  "H100": 989.0,
  "H200": 989.0,
}

# `jax.devices()[0].device_kind` spellings, most specific first: a v5e reports "TPU v5 lite" and a
# v5p plain "TPU v5", so the lite patterns must be tried before the bare generation.
_DEVICE_KIND_PATTERNS: tuple[tuple[str, str], ...] = (
  (r"\btpu v5 ?(lite|e)", "TPU v5e"),
  (r"\btpu v5p?\b", "TPU v5p"),
  (r"\btpu v6 ?(lite|e)?\b", "TPU v6e"),
  (r"\btpu v4\b", "TPU v4"),
  (r"\ba100\b", "A100"),
  (r"\bh100\b", "H100"),
  (r"\bh200\b", "H200"),
)


def peak_flops_per_device(device_kind: str, override_tflops: float = 0.0) -> float | None:
  """Peak FLOP/s of one device: `override_tflops` when > 0, else the datasheet peak of
  `device_kind`, else None (CPU, unknown chips: MFU is then left out rather than made up)."""
  if override_tflops > 0:
    return override_tflops * 1e12
  kind = device_kind.lower()
  for pattern, name in _DEVICE_KIND_PATTERNS:
    if re.search(pattern, kind):
      return PEAK_TFLOPS[name] * 1e12
  return None


class Throughput:
  """Rates over the interval since the previous update, and MFU when the peak is known.

  `sequences` and `tokens` count the whole global batch (all processes) over the interval, and
  `num_devices` is the global device count. Tokens are the real (non-padding) ones; MFU uses
  `flops_per_sequence`, which covers every position the model computed, padding included.
  """

  def __init__(
    self, flops_per_sequence: float, num_devices: int, peak_flops_per_device: float | None, start_step: int = 0
  ):
    self.flops_per_sequence = flops_per_sequence
    self.num_devices = num_devices
    self.peak_flops_per_device = peak_flops_per_device
    self.last_step = start_step

  def update(self, step: int, sequences: int, tokens: int, seconds: float) -> dict[str, float]:
    """Rates for the steps (last step, `step`], which took `seconds` and saw those counts."""
    if seconds <= 0:
      raise ValueError(f"Throughput.update needs a positive interval, got seconds={seconds}")
    steps = max(step - self.last_step, 1)
    self.last_step = step
    rates = {
      "tokens_per_s": tokens / seconds,
      "sequences_per_s": sequences / seconds,
      "step_s": seconds / steps,
    }
    if self.peak_flops_per_device:
      model_flops_per_s = self.flops_per_sequence * sequences / seconds
      rates["mfu"] = model_flops_per_s / (self.num_devices * self.peak_flops_per_device)
    return rates
