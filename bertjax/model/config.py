"""The model's sizes and settings: BERT variants and the resolved `BertConfig`.

A leaf of the package: plain dataclasses and tables, no JAX or Flax at import time, so the config
validation and the FLOP model can read sizes without building anything.

    VARIANTS          Google's compact BERTs (Turc et al. 2019), base and large: name -> sizes
    variant_sizes     a run config's `model` section -> the sizes it asks for
    resolve_config    a run config's `model` section -> BertConfig, with every `auto` decided
"""

import dataclasses
from typing import Any

from bertjax.errors import BertjaxError

VOCAB_MULTIPLE = 128


@dataclasses.dataclass(frozen=True)
class Variant:
  """A BERT size: depth, width, attention heads and feed-forward width."""

  num_layers: int
  hidden_size: int
  num_heads: int
  intermediate_size: int


def _sized(num_layers: int, hidden_size: int) -> Variant:
  # Google's recipe for every size: 64-dimensional heads, a 4x feed-forward.
  return Variant(num_layers, hidden_size, hidden_size // 64, 4 * hidden_size)


# Google's compact BERTs (Turc et al. 2019), L in {2..12} x H in {128..768}, plus base and large.
VARIANTS: dict[str, Variant] = {
  f"L{layers}_H{hidden}": _sized(layers, hidden) for layers in (2, 4, 6, 8, 10, 12) for hidden in (128, 256, 512, 768)
}
VARIANTS.update(
  tiny=VARIANTS["L2_H128"],
  mini=VARIANTS["L4_H256"],
  small=VARIANTS["L4_H512"],
  medium=VARIANTS["L8_H512"],
  base=_sized(12, 768),
  large=_sized(24, 1024),
)

ATTENTION_IMPLS = ("auto", "xla", "cudnn", "pallas")
# The fused kernels of `attention_impl=pallas` (bertjax.model.fused_attention), by platform.
FUSED_KERNELS = {"gpu": "triton", "tpu": "mosaic", "cpu": "triton"}
# The Triton kernel tiles the sequence by 64 or by the whole length; its matmuls need a
# power-of-two head size of at least 16.
FUSED_TILE = 64
# The Mosaic kernel holds a block of queries' [L, block_q] float32 intermediates in VMEM: this
# length keeps them within a v5e's default scoped VMEM.
MOSAIC_MAX_LENGTH = 2048


# `auto` takes the Mosaic kernel on TPUs from this length. At 512 tokens it fits a larger batch
# and costs less by both of XLA's estimates on every chip measured; at 128 XLA's attention is
# small already, and with the kernel BERT-base fits no more and costs as much or more by the
# roofline on v5p (docs/performance.md, "Attention on TPUs").
MOSAIC_AUTO_MIN_LENGTH = 512


def mosaic_block_q(seq_len: int) -> int:
  """Queries a Mosaic kernel instance takes: the whole row up to 256 (the MXU's width on v6e),
  else 256, else 128 past 1024 (VMEM)."""
  return seq_len if seq_len <= 256 else 256 if seq_len <= 1024 else 128


def mosaic_head_group(num_heads: int, head_dim: int) -> int:
  """Heads a Mosaic kernel instance takes side by side: the fewest that fill whole 128-lane rows
  (two of BERT's 64-wide heads), else all of them (a block as wide as the array)."""
  return next((g for g in range(1, num_heads + 1) if num_heads % g == 0 and g * head_dim % 128 == 0), num_heads)


def fused_attention_fits(seq_len: int, head_dim: int, kernel: str = "triton") -> str | None:
  """Why the fused attention kernel `kernel` (triton | mosaic) cannot run these sizes, or None."""
  if kernel == "mosaic":
    if seq_len % 8 or seq_len > MOSAIC_MAX_LENGTH or seq_len % mosaic_block_q(seq_len):
      return (
        f"sequence length {seq_len} is not a multiple of 8 up to 256, of 256 up to 1024 or of 128 up to "
        f"{MOSAIC_MAX_LENGTH}"
      )
    return None
  if not (seq_len % FUSED_TILE == 0 or (seq_len >= 16 and seq_len & (seq_len - 1) == 0)):
    return f"sequence length {seq_len} is neither a multiple of {FUSED_TILE} nor a power of two from 16"
  if head_dim < 16 or head_dim & (head_dim - 1):
    return f"head size {head_dim} is not a power of two from 16"
  return None


# The activations of an encoder layer that a rematerialisation policy can keep, by the
# `checkpoint_name` bertjax.model.layers gives them: the QKV projection [B, L, 3, N, D], the
# attention context [B, L, N, D], the attention block's output, the MLP's input and output
# [B, L, E], and the MLP's wide activation before its GELU [B, L, M].
REMAT_POINTS = ("qkv", "context", "attention_out", "mlp_in", "mlp_wide", "mlp_out")
# From keeping everything to keeping only each layer's input (bertjax.model.layers._REMAT):
#   none                  no rematerialisation
#   dots                  the outputs of matmuls without batch dimensions (the four projections)
#   dots_except_mlp_wide  every point but mlp_wide
#   attention_out_mlp_in  the attention block's output and the MLP's input
#   offload_dots          every point, in host memory (TPUs); nothing kept on the device
#   full                  nothing
REMAT_POLICIES = ("none", "dots", "dots_except_mlp_wide", "attention_out_mlp_in", "offload_dots", "full")
DROPOUT_IMPLS = ("auto", "threefry", "hash")  # bertjax.model.dropout; auto: hash on GPUs and TPUs
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Everything the network needs, resolved (no `auto` left)."""

  vocab_size: int
  hidden_size: int = 128
  num_layers: int = 2
  num_heads: int = 2
  intermediate_size: int = 512
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  dropout: float = 0.1
  attention_dropout: float = 0.1
  layer_norm_eps: float = 1e-12
  initializer_range: float = 0.02
  dtype: str = "float32"  # compute dtype; parameters are always float32
  attention_impl: str = "xla"  # xla | cudnn | pallas
  fused_kernel: str = "triton"  # pallas's kernel: triton (GPUs) | mosaic (TPUs); interpreted on CPU
  remat: str = "none"
  scan_layers: bool = True
  dropout_impl: str = "threefry"  # threefry | hash: how dropout masks are drawn (bertjax.model.dropout)

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def padded_vocab_size(self) -> int:
    return -(-self.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE

  @property
  def compute_dtype(self):
    """The numpy dtype (bfloat16 included) that activations are computed in."""
    import jax.numpy as jnp  # the sizes above need no JAX; only the dtype does

    return jnp.dtype(self.dtype)


def variant_sizes(model_section: Any) -> Variant:
  """The variant's sizes with the config's overrides applied (`None` keeps the variant's)."""
  base = VARIANTS[model_section.variant]
  hidden = model_section.hidden_size or base.hidden_size
  derived = _sized(base.num_layers, hidden) if hidden != base.hidden_size else base
  return Variant(
    num_layers=model_section.num_layers or base.num_layers,
    hidden_size=hidden,
    num_heads=model_section.num_heads or max(derived.num_heads, 1),
    intermediate_size=model_section.intermediate_size or derived.intermediate_size,
  )


def resolve_config(
  model_section: Any, vocab_size: int, backend: str | None = None, seq_len: int | None = None
) -> BertConfig:
  """A BertConfig from the `model` section of a run config, resolving `auto` for `backend`.

  `auto` dtype is bfloat16 on accelerators and float32 on CPU. `auto` attention is the platform's
  fused kernel with dropout inside (`pallas`) when there is attention dropout and the kernel
  takes `seq_len`: Triton on GPUs, Mosaic on TPUs from `MOSAIC_AUTO_MIN_LENGTH` tokens; on GPUs
  cuDNN flash attention when there is none (16-bit compute); else XLA.
  `auto` dropout masks are the counter-based hash on GPUs (the fused kernel's; measured faster
  there) and TPUs (a quarter fewer cycles for BERT-large's layer by libtpu's estimates), and
  threefry on CPU. docs/performance.md has the measurements behind each choice.

  Args:
    model_section: the run config's `model` section.
    vocab_size: the tokenizer's vocabulary size (the embedding table is padded past it).
    backend: `cpu`, `gpu` or `tpu`; None asks JAX for this process's default backend.
    seq_len: the length of the rows the model will see; None keeps `auto` off the fused kernel.
  """
  if backend is None:
    import jax  # only to ask which platform runs this process

    backend = jax.default_backend()
  sizes = variant_sizes(model_section)
  dtype = model_section.dtype
  if dtype == "auto":
    dtype = "float32" if backend == "cpu" else "bfloat16"
  impl = model_section.attention_impl
  kernel = FUSED_KERNELS.get(backend, "triton")
  head_dim = sizes.hidden_size // sizes.num_heads
  if impl == "auto":
    fused_ok = seq_len is not None and fused_attention_fits(seq_len, head_dim, kernel) is None
    long_enough = backend == "gpu" or (backend == "tpu" and seq_len is not None and seq_len >= MOSAIC_AUTO_MIN_LENGTH)
    if model_section.attention_dropout > 0 and fused_ok and long_enough:
      impl = "pallas"
    elif backend == "gpu" and dtype in ("bfloat16", "float16") and model_section.attention_dropout == 0:
      impl = "cudnn"
    else:
      impl = "xla"
  if impl == "pallas" and seq_len is not None and (why := fused_attention_fits(seq_len, head_dim, kernel)):
    raise BertjaxError(
      f"config model.attention_impl='pallas' cannot run here: the {kernel} kernel's {why}; "
      "set model.attention_impl=auto"
    )
  dropout_impl = model_section.dropout_impl
  if dropout_impl == "auto":
    dropout_impl = "threefry" if backend == "cpu" else "hash"
  return BertConfig(
    vocab_size=vocab_size,
    hidden_size=sizes.hidden_size,
    num_layers=sizes.num_layers,
    num_heads=sizes.num_heads,
    intermediate_size=sizes.intermediate_size,
    max_position_embeddings=model_section.max_position_embeddings,
    type_vocab_size=model_section.type_vocab_size,
    dropout=model_section.dropout,
    attention_dropout=model_section.attention_dropout,
    layer_norm_eps=model_section.layer_norm_eps,
    initializer_range=model_section.initializer_range,
    dtype=dtype,
    attention_impl=impl,
    fused_kernel=kernel,
    remat=model_section.remat,
    scan_layers=model_section.scan_layers,
    dropout_impl=dropout_impl,
  )
