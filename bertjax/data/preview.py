"""`bertjax data preview`: the arrays a train step receives, written to .npz and shown as text."""

import numpy as np
from etils import epath

from bertjax.data.pipeline import make_pipeline
from bertjax.data.tokenizer import tokenizer_for_run


def preview(config, workdir, num_batches: int, out_path, show: int = 3) -> None:
  """Writes `num_batches` training batches to `out_path` (.npz) and prints a few examples.

  Args:
    config: a validated run config.
    workdir: the run folder; its tokenizer is trained there on first use (`tokenizer_for_run`).
    num_batches: the steps 0..num_batches-1 whose global batches are written, concatenated.
    out_path: the .npz file (its folder is created).
    show: how many of the first examples to print as text.
  """
  pipeline = make_pipeline(config, tokenizer_for_run(config, workdir), workdir)
  batches = [pipeline.batch(s) for s in range(int(num_batches))]
  arrays = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
  out_path = epath.Path(out_path)
  out_path.parent.mkdir(parents=True, exist_ok=True)
  with out_path.open("wb") as f:
    np.savez(f, **arrays)
  print(f"wrote {len(arrays['nsp_labels'])} sequences of {num_batches} batches to {out_path}")
  for r in range(min(show, len(arrays["nsp_labels"]))):
    labels = arrays["nsp_labels"][r]
    if "nsp_weights" in arrays:  # packed: one label per pair, pairs separated by " || "
      labels = labels[arrays["nsp_weights"][r] > 0].tolist()
    print(f"--- example {r}: nsp_label={labels}")
    print(describe_example(pipeline.tokenizer, {k: v[r] for k, v in arrays.items()}))


def describe_example(tokenizer, ex: dict) -> str:
  """One example as text: each masked position shown as [MASK=original] / {replaced->original}."""
  original = ex["input_ids"].copy()
  w = ex["masked_weights"] > 0
  original[ex["masked_positions"][w]] = ex["masked_ids"][w]
  masked_at = {int(p): int(i) for p, i in zip(ex["masked_positions"][w], ex["masked_ids"][w])}
  words = []
  for pos in range(int(ex["attention_mask"].sum())):
    if pos and "pair_ids" in ex and ex["pair_ids"][pos] != ex["pair_ids"][pos - 1]:
      words.append("||")
    piece = tokenizer.id_to_piece(int(ex["input_ids"][pos]))
    if pos in masked_at:
      truth = tokenizer.id_to_piece(masked_at[pos])
      piece = f"[MASK={truth}]" if int(ex["input_ids"][pos]) == tokenizer.mask_id else (f"{{{piece}->{truth}}}")
    words.append(piece)
  return " ".join(words)
