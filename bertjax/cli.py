"""`bertjax <command>`: parses, validates, dispatches. No logic lives here.

A user error (a BertjaxError, a bad flag) prints one line and exits with status 2; nothing
else is printed, no traceback.
"""

import argparse
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from bertjax.errors import BertjaxError

EXIT_USER_ERROR = 2


class _Parser(argparse.ArgumentParser):
  """argparse, but a bad command line is one line naming the problem and where help is."""

  def error(self, message):
    raise BertjaxError(f"{self.prog.removeprefix('bertjax ')}: {message} (see {self.prog} --help)")


def _add_config(p: argparse.ArgumentParser, required: bool = True) -> None:
  p.add_argument(
    "--config",
    required=required,
    metavar="FILE[:ARG]",
    help="config file, e.g. configs/base.py:phase=2 (or a packaged name: tiny, base, large); "
    "then any number of --config.KEY=VALUE overrides, e.g. --config.train.steps=1000",
  )


def _add_distributed(p: argparse.ArgumentParser) -> None:
  g = p.add_argument_group("multi-process (default: auto-detect a TPU pod or SLURM, else one process)")
  g.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0's coordinator")
  g.add_argument("--num_processes", type=int, metavar="N", help="number of processes in the job")
  g.add_argument("--process_id", type=int, metavar="I", help="this process's index, 0..N-1")


def build_parser() -> argparse.ArgumentParser:
  parser = _Parser(prog="bertjax", description="Pretrain BERT with JAX/Flax, from one CPU to a TPU pod.")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

  p = sub.add_parser("train", help="pretrain (resumes from WORKDIR's newest checkpoint)")
  _add_config(p, required=False)
  p.add_argument("--workdir", required=True, help="run folder (local path or gs://...)")
  p.add_argument("--step", type=int, help="restore this checkpoint step instead of the newest")
  p.add_argument("--dry-run", action="store_true", help="print mesh, memory and expected step time; do not train")
  p.add_argument(
    "--devices",
    type=int,
    metavar="N",
    help="with --dry-run: plan for N devices in all (a v5p-128 has 64; default: this machine's)",
  )
  p.add_argument(
    "--device-kind",
    metavar="KIND",
    help='with --dry-run: the chip, for its peak FLOP/s, e.g. "TPU v5p", "H100" (default: this machine\'s)',
  )
  p.add_argument(
    "--topology",
    metavar="NAME",
    help="with --dry-run: one TPU slice, e.g. v5p-128 (64 chips), v5e-256, v6e-256, v4-64, or v5p:4x4x12; "
    "--config.mesh.dcn_data=N for N such slices",
  )
  p.add_argument(
    "--compile",
    action="store_true",
    help="with --dry-run: compile the train step for the target (a TPU through libtpu, from any machine; "
    "or this machine's GPUs) and add XLA's memory per chip, collectives and step time",
  )
  p.add_argument("--json", action="store_true", help="with --dry-run: print the figures as one JSON line")
  _add_distributed(p)

  p = sub.add_parser("eval", help="evaluate a checkpoint on the held-out split; prints one JSON line")
  p.add_argument("--workdir", required=True)
  _add_config(p, required=False)
  p.add_argument("--step", type=int, help="checkpoint step (default: the newest good one)")
  _add_distributed(p)

  p = sub.add_parser("export", help="write a checkpoint as a transformers BERT folder or as plain params")
  p.add_argument("--workdir", required=True)
  p.add_argument("--format", required=True, choices=("hf", "params"))
  p.add_argument("--out", help="output folder (default: WORKDIR/export/hf or WORKDIR/export/params)")
  p.add_argument("--step", type=int, help="checkpoint step (default: newest)")

  p = sub.add_parser("import-hf", help="make a workdir from a transformers BERT folder")
  p.add_argument("--hf", required=True, help="folder with config.json and model.safetensors or pytorch_model.bin")
  p.add_argument("--workdir", required=True)

  p = sub.add_parser("tokenizer", help="tokenizer tools")
  tok = p.add_subparsers(dest="tokenizer_command", metavar="ACTION", parser_class=_Parser, required=True)
  t = tok.add_parser("train", help="train a sentencepiece tokenizer on the configured corpus")
  _add_config(t)
  t.add_argument("--out", required=True, help="folder to write the tokenizer into")

  p = sub.add_parser("data", help="input-pipeline tools")
  data = p.add_subparsers(dest="data_command", metavar="ACTION", parser_class=_Parser, required=True)
  t = data.add_parser("preview", help="write N batches as .npz and print decoded examples")
  _add_config(t)
  t.add_argument("--workdir", required=True)
  t.add_argument("--batches", type=int, default=1, metavar="N")
  t.add_argument("--out", required=True, metavar="FILE.npz")
  t = data.add_parser("bench", help="input-pipeline and tokenizer throughput; prints one JSON line")
  _add_config(t)
  t.add_argument("--workdir", required=True, help="where the run's tokenizer is (trained there if missing)")
  t.add_argument("--seconds", type=float, default=10.0, help="how long to time the pipeline")

  p = sub.add_parser("bench", help="time the compiled train step on synthetic batches; one JSON line per shape")
  _add_config(p)
  p.add_argument("--steps", type=int, default=20, metavar="N")
  p.add_argument("--profile", metavar="DIR", help="also trace a few steps into DIR and report the time by kernel")
  _add_distributed(p)

  p = sub.add_parser("plot", help="render loss and accuracy curves to a PNG")
  p.add_argument("--workdir", required=True)
  p.add_argument("--out", help="PNG path (default: WORKDIR/curves.png)")

  p = sub.add_parser(
    "finetune", help="fine-tune a pretrained run on classification, regression or extractive QA (resumes)"
  )
  p.add_argument("--task", required=True, choices=("classification", "qa"))
  _add_config(p)
  p.add_argument("--workdir", required=True, help="the fine-tuning run's folder (local path or gs://...)")
  p.add_argument("--init", required=True, help="the pretraining or import-hf workdir whose parameters it starts from")
  _add_distributed(p)

  p = sub.add_parser("glue", help="fine-tune every GLUE task with several seeds; a results table like the paper's")
  p.add_argument("--init", required=True, help="the pretraining or import-hf workdir to fine-tune")
  p.add_argument("--data", required=True, metavar="GLUE_DIR", help="the GLUE folder (SST-2/, MRPC/, ...)")
  p.add_argument("--workdir", required=True, help="one run per task and seed goes into WORKDIR/TASK/seed-S")
  p.add_argument("--tasks", default="", metavar="T1,T2", help="e.g. sst2,mrpc (default: all nine)")
  p.add_argument("--seeds", type=int, default=3, metavar="N", help="runs per task, seeds 0..N-1 (default 3)")
  _add_config(p, required=False)  # default: configs/finetune/glue.py
  _add_distributed(p)
  return parser


def _split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Separate `--config.KEY=VALUE` (or `--config.KEY VALUE`) from the other arguments."""
  rest, overrides = [], []
  argv = list(argv)
  i = 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith("--config."):
      body = arg[len("--config.") :]
      if "=" not in body:
        if i + 1 >= len(argv):
          raise BertjaxError(f"{arg}: missing value; write {arg}=VALUE")
        body = f"{body}={argv[i + 1]}"
        i += 1
      overrides.append(body)
    else:
      rest.append(arg)
    i += 1
  return rest, overrides


def _loaded_config(args, overrides):
  """--config FILE[:ARG] with the overrides: validated here, once, and passed down as it is."""
  from bertjax.config import loading

  return loading.load_config(args.config, overrides)


def _tokenizer_train(args, overrides) -> int:
  from bertjax.data import tokenizer as tokenizer_lib

  tokenizer = tokenizer_lib.train_tokenizer(_loaded_config(args, overrides), args.out)
  print(f"wrote {tokenizer} to {args.out}")
  return 0


def _data_preview(args, overrides) -> int:
  from bertjax.data import preview

  if args.batches < 1:
    raise BertjaxError(f"--batches {args.batches}: give at least 1")
  preview.preview(_loaded_config(args, overrides), args.workdir, args.batches, args.out)
  return 0


def _data_bench(args, overrides) -> int:
  import json

  from bertjax.data import bench

  print(json.dumps(bench.run(_loaded_config(args, overrides), args.workdir, args.seconds)))
  return 0


def _prepare_devices(args, config, *, preemption: bool = False) -> None:
  """Join the multi-process job (if any) and set up the compilation cache; then devices may be used.

  Only `train` keeps JAX's preemption service: it takes SIGTERM away from the default action, so
  any other command would go on running when a scheduler or launch/local.sh asks it to stop.
  """
  import jax

  from bertjax.train import distributed

  if not preemption:
    jax.config.update("jax_enable_preemption_service", False)
  spec = distributed.ProcessSpec(args.coordinator, args.num_processes, args.process_id)
  distributed.initialize(spec, config.train.distributed_timeout_s)
  cache = config.train.compilation_cache
  if cache != "off":
    import os

    default = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "bertjax", "jax")
    jax.config.update("jax_compilation_cache_dir", default if cache == "auto" else cache)


def _setup_logging() -> None:
  import logging

  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
  for noisy in ("jax._src", "datasets"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  # orbax logs through absl, warning for every item a partial restore leaves out (bertjax reads
  # meta alone on purpose); its real failures reach bertjax as exceptions.
  for quiet in ("absl", "orbax"):
    logging.getLogger(quiet).setLevel(logging.ERROR)


def _run_config(args, overrides):
  """--config FILE, or else the config.json of the run folder (a resumed or imported run);
  validated once, here."""
  from bertjax.config import loading

  if args.config:
    return _loaded_config(args, overrides)
  if not (Path(args.workdir) / loading.CONFIG_FILENAME).exists() and "://" not in args.workdir:
    raise BertjaxError(f"--config is required: {args.workdir} holds no config.json of an earlier run")
  return loading.load_run_config(args.workdir, overrides)


def _train(args, overrides) -> int:
  config = _run_config(args, overrides)
  if args.dry_run:
    import json

    from bertjax.perf import aot, dryrun

    if args.compile and (args.topology or aot.is_tpu(args.device_kind)):
      import jax

      # The TPU is libtpu's compile-only devices; this process runs nothing, on no accelerator.
      jax.config.update("jax_platforms", "cpu")
    figures = dryrun.describe(config, args.devices, args.device_kind, topology=args.topology, compile_step=args.compile)
    print(json.dumps(figures) if args.json else dryrun.format_report(figures), flush=True)
    return 0
  if args.devices is not None or args.device_kind is not None or args.topology or args.compile or args.json:
    raise BertjaxError(
      "train: --devices, --device-kind, --topology, --compile and --json describe a --dry-run; add --dry-run"
    )
  from bertjax.train import loop, run

  data = run.prepare_data(config, args.workdir)  # before JAX starts: tokenising forks
  _prepare_devices(args, config, preemption=True)
  import jax

  result = loop.train(config, args.workdir, data=data, step=args.step)
  if jax.process_index() == 0:
    if result.stopped_by:
      print(
        f"stopped by {result.stopped_by} after step {int(result.state.step)}: saved checkpoint "
        f"{int(result.state.step)} in {args.workdir}/checkpoints; run the same command to resume",
        flush=True,
      )
    else:
      _print_summary(result.final, args.workdir)
  return 0


def _eval(args, overrides) -> int:
  import json

  from bertjax.train import run

  config = _run_config(args, overrides)
  if config.finetune.task:  # a fine-tuning run: its task's dev metrics
    from bertjax.finetune import loop as finetune_loop

    _prepare_devices(args, config)
    print(json.dumps(finetune_loop.evaluate_checkpoint(config, args.workdir, step=args.step)), flush=True)
    return 0
  data = run.prepare_data(config, args.workdir)
  _prepare_devices(args, config)
  print(json.dumps(run.evaluate_checkpoint(config, args.workdir, data=data, step=args.step)), flush=True)
  return 0


def _print_summary(final: dict, workdir: str) -> None:
  if final:
    print(
      f"held-out MLM accuracy {final['mlm_accuracy']:.3f} (always the most frequent token: "
      f"{final['mlm_baseline_accuracy']:.3f}), NSP accuracy {final['nsp_accuracy']:.3f} "
      f"(always the majority label: {final['nsp_baseline_accuracy']:.3f}), "
      f"MLM loss {final['mlm_loss']:.3f}, NSP loss {final['nsp_loss']:.3f}"
    )
  print(f"run folder {workdir}: config.json, tokenizer/, checkpoints/, metrics.jsonl, tb/ (TensorBoard)")


def _bench(args, overrides) -> int:
  import json

  config = _loaded_config(args, overrides)
  if args.steps < 1:
    raise BertjaxError(f"--steps {args.steps}: give at least 1")
  _prepare_devices(args, config)
  from bertjax.perf import bench

  print(json.dumps(bench.run(config, steps=args.steps, profile_dir=args.profile)), flush=True)
  return 0


def _export(args, overrides) -> int:
  from bertjax.hf import export

  print(f"wrote {export.export(args.workdir, args.format, args.out, args.step)}", flush=True)
  return 0


def _import_hf(args, overrides) -> int:
  from bertjax.hf import import_hf

  print(import_hf.import_hf(args.hf, args.workdir).summary(), flush=True)
  return 0


def _plot(args, overrides) -> int:
  from bertjax.metrics import plot

  print(f"wrote {plot.plot_curves(args.workdir, args.out)}")
  return 0


def _finetune(args, overrides) -> int:
  from bertjax.finetune import loop
  from bertjax.finetune import run as finetune_run

  config = finetune_run.load_config(args.config, overrides, task=args.task, init=args.init)
  data = finetune_run.prepare(config)  # read and tokenised first: bad data stops before any write
  _prepare_devices(args, config, preemption=True)
  import jax

  result = loop.finetune(config, args.workdir, data)
  if jax.process_index() == 0:
    if result.stopped_by:
      print(
        f"stopped by {result.stopped_by} after step {int(result.state.step)}: saved checkpoint "
        f"{int(result.state.step)} in {args.workdir}/checkpoints; run the same command to resume",
        flush=True,
      )
    else:
      scores = ", ".join(f"{k} {v:.4f}" for k, v in result.final.items())
      print(f"{data.spec.name} dev: {scores}", flush=True)
      print(f"run folder {args.workdir}: {loop.RESULTS_FILE}, checkpoints/, metrics.jsonl, tb/ (TensorBoard)")
  return 0


def _glue(args, overrides) -> int:
  from bertjax.config import loading
  from bertjax.finetune import glue
  from bertjax.finetune import run as finetune_run

  spec = args.config or str(loading.PACKAGED_CONFIGS / "finetune" / "glue.py")
  names = glue.parse_tasks(args.tasks)
  first = [*overrides, f"finetune.glue_task={names[0]}", f"finetune.data={args.data}"]
  _prepare_devices(args, finetune_run.load_config(spec, first, task="classification", init=args.init), preemption=True)
  import jax

  summary = glue.run_suite(
    spec, overrides, init=args.init, data=args.data, workdir=args.workdir, task_names=names, seeds=args.seeds
  )
  if jax.process_index() == 0:
    if summary is None:
      print(f"stopped by a signal: the runs so far are saved in {args.workdir}; run the same command to resume")
    else:
      print(glue.format_table(summary, args.seeds), end="", flush=True)
      print(f"wrote {args.workdir}/{glue.RESULTS_JSON} and {args.workdir}/{glue.RESULTS_MD}")
  return 0


COMMANDS: dict[str, Callable] = {
  "finetune": _finetune,
  "glue": _glue,
  "train": _train,
  "export": _export,
  "import-hf": _import_hf,
  "eval": _eval,
  "bench": _bench,
  "plot": _plot,
  "tokenizer train": _tokenizer_train,
  "data preview": _data_preview,
  "data bench": _data_bench,
}


def main(argv: Sequence[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  # transformers (export's tokenizer converter) announces at import that torch is absent.
  os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
  try:
    rest, overrides = _split_overrides(argv)
    parser = build_parser()
    args = parser.parse_args(rest)
    if args.command is None:
      parser.print_help()
      return EXIT_USER_ERROR
    name = " ".join(
      filter(None, (args.command, getattr(args, "tokenizer_command", None), getattr(args, "data_command", None)))
    )
    if overrides and "config" not in vars(args):
      raise BertjaxError(f"{name}: takes no --config.KEY=VALUE overrides")
    _setup_logging()
    return COMMANDS[name](args, overrides) or 0
  except BertjaxError as e:
    print(f"bertjax: error: {e}", file=sys.stderr)
    # Work a failed step left in flight (a checkpoint write's coroutines) is dropped on purpose; at
    # exit Python would warn about it after the error line, which must stay the last thing printed.
    warnings.filterwarnings("ignore", message=r"coroutine .* was never awaited", category=RuntimeWarning)
    return EXIT_USER_ERROR
  except KeyboardInterrupt:
    print("bertjax: interrupted", file=sys.stderr)
    return 130
