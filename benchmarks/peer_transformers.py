"""The peer bertjax is measured against: transformers' BertForPreTraining train step in PyTorch.

    python benchmarks/peer_transformers.py SIZE SEQ BATCH [--compile] [--steps N] [--warmup N]
        [--dropout P] [--attn-dropout P] [--dtype bfloat16|float32]

One MLM + NSP train step (forward, backward, AdamW; fused on GPU), bf16 autocast by default,
SDPA attention, vocabulary 30,522, random ids with 15% of the positions labelled. Prints one JSON
line with the mean step time and tokens/s. Its settings match `bertjax bench` on the same shape:
see docs/performance.md for the figures and the commands that made them.
"""

import argparse
import json
import time

import torch
from transformers import BertConfig, BertForPreTraining

VOCAB = 30522
SIZES = {  # L, H, heads, intermediate: Google's compact BERTs, base and large
  "tiny": (2, 128, 2, 512),
  "mini": (4, 256, 4, 1024),
  "small": (4, 512, 8, 2048),
  "medium": (8, 512, 8, 2048),
  "base": (12, 768, 12, 3072),
  "large": (24, 1024, 16, 4096),
}


def parse_args() -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("size", choices=SIZES)
  p.add_argument("seq", type=int)
  p.add_argument("batch", type=int)
  p.add_argument("--compile", action="store_true", help="torch.compile the step")
  p.add_argument("--steps", type=int, default=20, help="timed steps")
  p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
  p.add_argument("--dropout", type=float, default=0.1, help="hidden-state dropout")
  p.add_argument("--attn-dropout", type=float, default=None, help="attention dropout (default: --dropout)")
  p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="autocast; float32 = off")
  return p.parse_args()


def synthetic_batch(batch: int, seq: int, device: str) -> dict[str, torch.Tensor]:
  """Random ids, two segments, 15% of the positions labelled, random NSP labels; seeded."""
  g = torch.Generator().manual_seed(0)
  ids = torch.randint(5, VOCAB, (batch, seq), generator=g)
  labels = torch.full_like(ids, -100)
  masked = torch.rand(batch, seq, generator=g) < 0.15
  labels[masked] = ids[masked]
  segments = torch.zeros_like(ids)
  segments[:, seq // 2 :] = 1
  nsp = torch.randint(0, 2, (batch,), generator=g)
  tensors = dict(
    input_ids=ids, token_type_ids=segments, attention_mask=torch.ones_like(ids), labels=labels, next_sentence_label=nsp
  )
  return {k: v.to(device) for k, v in tensors.items()}


def main() -> None:
  a = parse_args()
  device = "cuda" if torch.cuda.is_available() else "cpu"
  layers, hidden, heads, intermediate = SIZES[a.size]
  attn_dropout = a.dropout if a.attn_dropout is None else a.attn_dropout
  config = BertConfig(
    vocab_size=VOCAB,
    max_position_embeddings=512,
    attn_implementation="sdpa",
    hidden_dropout_prob=a.dropout,
    attention_probs_dropout_prob=attn_dropout,
    num_hidden_layers=layers,
    hidden_size=hidden,
    num_attention_heads=heads,
    intermediate_size=intermediate,
  )
  model = BertForPreTraining(config).to(device).train()
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
  batch = synthetic_batch(a.batch, a.seq, device)

  def step():
    with torch.autocast(device, dtype=torch.bfloat16, enabled=a.dtype == "bfloat16"):
      loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss

  run = torch.compile(step) if a.compile else step
  for _ in range(a.warmup):
    run()
  if device == "cuda":
    torch.cuda.synchronize()
  start = time.perf_counter()
  for _ in range(a.steps):
    loss = run()
  if device == "cuda":
    torch.cuda.synchronize()
  step_s = (time.perf_counter() - start) / a.steps
  print(
    json.dumps(
      dict(
        peer="transformers",
        size=a.size,
        seq=a.seq,
        batch=a.batch,
        compile=a.compile,
        dropout=a.dropout,
        attn_dropout=attn_dropout,
        dtype=a.dtype,
        step_s=round(step_s, 5),
        tokens_per_s=round(a.batch * a.seq / step_s),
        params=sum(p.numel() for p in model.parameters()),
        loss=float(loss.detach()),
        device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
        torch=torch.__version__,
      )
    ),
    flush=True,
  )


if __name__ == "__main__":
  main()
