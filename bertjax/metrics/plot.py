"""`bertjax plot`: the loss and accuracy curves of a run's metrics.jsonl, train and eval, in one PNG.

Drawn with matplotlib's object API (a `Figure` on an Agg canvas) rather than pyplot, so no global
backend or figure registry is touched and no display is needed.
"""

from etils import epath
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from bertjax.errors import BertjaxError
from bertjax.metrics.writer import METRICS_FILENAME, read_metrics

CURVES = ("loss", "mlm_loss", "nsp_loss", "mlm_accuracy", "nsp_accuracy")
DEFAULT_FILENAME = "curves.png"
_SPLIT_STYLES = {"train": {"color": "tab:blue", "linewidth": 1.2}, "eval": {"color": "tab:orange", "marker": "o"}}


def curves_by_split(records: list[dict], name: str) -> dict[str, tuple[list[int], list[float]]]:
  """{split: (steps, values)} of one metric, sorted by step.

  A resumed run logs again the steps between its checkpoint and the crash; the later record of a
  step wins, so each curve is a function of the step.
  """
  latest: dict[str, dict[int, float]] = {}
  for record in records:
    if name in record and "step" in record:
      latest.setdefault(record.get("split", "train"), {})[int(record["step"])] = float(record[name])
  return {split: (sorted(points), [points[s] for s in sorted(points)]) for split, points in latest.items()}


def plot_curves(workdir, out_path=None) -> epath.Path:
  """Render CURVES of WORKDIR/metrics.jsonl to `out_path` (default WORKDIR/curves.png)."""
  workdir = epath.Path(workdir)
  if not (workdir / METRICS_FILENAME).exists():
    raise BertjaxError(
      f"--workdir {workdir}: no {METRICS_FILENAME} there; train first, or pass the workdir of a bertjax run"
    )
  records = read_metrics(workdir)
  curves = {name: curves_by_split(records, name) for name in CURVES}
  if not any(curves.values()):
    raise BertjaxError(
      f"--workdir {workdir}: {METRICS_FILENAME} has no loss or accuracy yet; plot after the first log step"
    )
  out_path = epath.Path(out_path) if out_path else workdir / DEFAULT_FILENAME

  figure = Figure(figsize=(15, 8), layout="constrained")
  FigureCanvasAgg(figure)
  axes = figure.subplots(2, 3).flatten()
  for ax, name in zip(axes, CURVES):
    for split, (steps, values) in sorted(curves[name].items()):
      ax.plot(steps, values, label=split, **_SPLIT_STYLES.get(split, {}))
    ax.set_title(name)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if curves[name]:
      ax.legend()
  axes[-1].set_visible(False)  # five curves on a 2x3 grid
  figure.suptitle(str(workdir))

  out_path.parent.mkdir(parents=True, exist_ok=True)
  with out_path.open("wb") as f:
    figure.savefig(f, format="png", dpi=100)
  return out_path
