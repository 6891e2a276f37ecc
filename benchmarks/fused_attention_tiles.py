"""The fused attention kernel's forward + backward against XLA's explicit path, per tile size.

    python benchmarks/fused_attention_tiles.py [--shapes 256:128:12,32:512:16] [--tiles 128:32,128:64,64:64,64:32]

Times jit(grad) of a sum over `bertjax.model.fused_attention.attention` (bf16, dropout 0.1,
head size 64) for each (forward tile, backward tile), and the explicit path of
`layers.SelfAttention` with the hash mask at the same shape; prints one JSON line each. Shapes
are BATCH:SEQ:HEADS (BERT-base phase 1 and BERT-large phase 2 by default). For a GPU.
"""

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp

from bertjax.model import fused_attention, layers
from bertjax.model.bert import attention_mask_for


def _explicit(q, k, v, pairs, key, rate):
  return layers.attention_with_dropout(q, k, v, attention_mask_for(None, pairs), key, rate, "hash")


def _fused(q, k, v, pairs, key, tiles):
  return fused_attention.attention(q, k, v, pairs, key, 0.1, tiles=tiles)


def _time(fn, *args, steps=20) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return sorted(times)[len(times) // 2]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", default="256:128:12,32:512:16")
  parser.add_argument("--tiles", default="128:32,128:64,64:64,64:32")
  args = parser.parse_args()
  key = jax.random.key(0)
  for shape in args.shapes.split(","):
    batch, length, heads = map(int, shape.split(":"))
    q, k, v = (jax.random.normal(s, (batch, length, heads, 64), jnp.bfloat16) for s in jax.random.split(key, 3))
    pairs = jnp.ones((batch, length), jnp.int32)
    variants = {"explicit": lambda q, k, v, p=pairs: _explicit(q, k, v, p, key, 0.1)}
    for tile in args.tiles.split(","):
      tiles = tuple(map(int, tile.split(":")))
      variants[f"fused {tile}"] = functools.partial(_fused, pairs=pairs, key=key, tiles=tiles)
    for name, attend in variants.items():
      step = jax.jit(jax.grad(lambda q, k, v, f=attend: f(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2)))
      try:
        seconds = _time(step, q, k, v)
        print(json.dumps({"shape": shape, "attention": name, "fwd_bwd_ms": round(seconds * 1e3, 3)}), flush=True)
      except Exception as error:  # a tile the compiler refuses: report it, time the rest
        print(json.dumps({"shape": shape, "attention": name, "error": str(error).splitlines()[0][:200]}), flush=True)


if __name__ == "__main__":
  main()
