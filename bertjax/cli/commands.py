"""One function per command: loads and validates the config once, then calls the library.

Each takes the parsed arguments and the `--config.KEY=VALUE` overrides and returns the exit
status; the library is imported inside, so `bertjax --help` starts without JAX.
"""

from collections.abc import Callable
from pathlib import Path

from bertjax.cli import stores
from bertjax.errors import BertjaxError


def _loaded_config(args, overrides):
  """--config FILE[:ARG] with the overrides: validated here, once, and passed down as it is."""
  from bertjax.config import loading

  config = loading.load_config(args.config, overrides)
  stores.check_config(config)  # the config's gs:// paths: bucket and credentials, before any work
  return config


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


def _data_prepare(args, overrides) -> int:
  import shlex

  from bertjax.data import prepare

  processes = prepare.Processes(args.num_processes, args.process_id, args.workers)
  command = shlex.join(
    ["bertjax", "data", "prepare", "--config", args.config, "--out", args.out, *(f"--config.{o}" for o in overrides)]
  )
  result = prepare.prepare(_loaded_config(args, overrides), args.out, processes, args.shard_mb, command)
  m = result["manifest"]
  if m is None:
    print(
      f"process {args.process_id}: its {result['mine']} shards are done ({result['made']} made now); the last "
      f"process to finish writes {args.out}/manifest.json",
      flush=True,
    )
  else:
    print(
      f"{args.out}: {result['shards']} shards ({result['made']} made now), {m['documents']:,} documents, "
      f"{m['sentences']:,} sentences, {m['tokens']:,} tokens, {m['bytes'] / 1e6:.1f} MB; train from it with "
      f"--config.data.source=prepared:{args.out}",
      flush=True,
    )
  return 0


def _prepare_devices(args, config, *, preemption: bool = False) -> None:
  """Join the multi-process job (if any) and set up the compilation cache; then devices may be used.

  Only `train` keeps JAX's preemption service: it takes SIGTERM away from the default action, so
  any other command would go on running when a scheduler or launch/local.sh asks it to stop.
  """
  import os

  import jax

  from bertjax.perf import tpu as tpu_lib
  from bertjax.train import distributed

  # On a TPU, libtpu reads this when JAX first uses the devices: some train steps need its
  # compiler's deeper thread stack.
  os.environ["LIBTPU_INIT_ARGS"] = tpu_lib.libtpu_init_args(os.environ.get("LIBTPU_INIT_ARGS", ""))
  if not preemption:
    jax.config.update("jax_enable_preemption_service", False)
  spec = distributed.ProcessSpec(args.coordinator, args.num_processes, args.process_id)
  distributed.initialize(spec, config.train.distributed_timeout_s)
  cache = config.train.compilation_cache
  if cache != "off":
    default = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "bertjax", "jax")
    jax.config.update("jax_compilation_cache_dir", default if cache == "auto" else cache)


def setup_logging() -> None:
  import logging

  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
  for noisy in ("jax._src", "datasets"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  # orbax logs through absl, warning for every item a partial restore leaves out (bertjax reads
  # meta alone on purpose); its real failures reach bertjax as exceptions.
  for quiet in ("absl", "orbax"):
    logging.getLogger(quiet).setLevel(logging.ERROR)
  # gcsfs logs every retried request and fallback, with tracebacks, up to ERROR; google's clients
  # likewise. Their real failures reach bertjax as exceptions, which say what went wrong in one line.
  for silent in ("gcsfs", "fsspec", "google", "urllib3"):
    logging.getLogger(silent).setLevel(logging.CRITICAL)


def _run_config(args, overrides):
  """--config FILE, or else the config.json of the run folder (a resumed or imported run);
  validated once, here."""
  from bertjax.config import loading

  if args.config:
    return _loaded_config(args, overrides)
  if not (Path(args.workdir) / loading.CONFIG_FILENAME).exists() and "://" not in args.workdir:
    raise BertjaxError(f"--config is required: {args.workdir} holds no config.json of an earlier run")
  config = loading.load_run_config(args.workdir, overrides)
  stores.check_config(config)
  return config


def _train(args, overrides) -> int:
  config = _run_config(args, overrides)
  if args.dry_run:
    import json

    from bertjax.perf import dryrun
    from bertjax.perf import tpu as tpu_lib

    if not args.compile and not args.estimate:
      raise BertjaxError("train: --no-estimate leaves out --compile's estimate; add --compile")
    if args.compile and (args.topology or tpu_lib.is_tpu(args.device_kind)):
      import jax

      # The TPU is libtpu's compile-only devices; this process runs nothing, on no accelerator.
      jax.config.update("jax_platforms", "cpu")
    figures = dryrun.describe(
      config, args.devices, args.device_kind, topology=args.topology, compile_step=args.compile, estimate=args.estimate
    )
    print(json.dumps(figures) if args.json else dryrun.format_report(figures), flush=True)
    return 0
  dry_run_only = (args.devices is not None, args.device_kind is not None, args.topology, args.compile, args.json)
  if any(dry_run_only) or not args.estimate:
    raise BertjaxError(
      "train: --devices, --device-kind, --topology, --compile, --no-estimate and --json describe a --dry-run; "
      "add --dry-run"
    )
  from bertjax.train import pretrain, run

  data = run.prepare_data(config, args.workdir)  # before JAX starts: tokenising forks
  _prepare_devices(args, config, preemption=True)
  import jax

  result = pretrain.train(config, args.workdir, data=data, step=args.step)
  if jax.process_index() == 0:
    if result.stopped_by:
      _print_stopped(result, args.workdir)
    else:
      _print_summary(result.final, args.workdir)
  return 0


def _eval(args, overrides) -> int:
  import json

  from bertjax.train import run

  config = _run_config(args, overrides)
  if config.finetune.task:  # a fine-tuning run: its task's dev metrics
    from bertjax.finetune import job as finetune_job

    _prepare_devices(args, config)
    print(json.dumps(finetune_job.evaluate_checkpoint(config, args.workdir, step=args.step)), flush=True)
    return 0
  data = run.prepare_data(config, args.workdir)
  _prepare_devices(args, config)
  print(json.dumps(run.evaluate_checkpoint(config, args.workdir, data=data, step=args.step)), flush=True)
  return 0


def _print_stopped(result, workdir: str) -> None:
  """A run a signal stopped: where it saved, and that the same command resumes it."""
  step = int(result.state.step)
  print(
    f"stopped by {result.stopped_by} after step {step}: saved checkpoint {step} in {workdir}/checkpoints; "
    "run the same command to resume",
    flush=True,
  )


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
  from bertjax.finetune import init as finetune_init
  from bertjax.finetune import job
  from bertjax.finetune import run as finetune_run

  config = finetune_init.load_config(args.config, overrides, task=args.task, init=args.init)
  stores.check_config(config)
  data = finetune_run.prepare(config)  # read and tokenised first: bad data stops before any write
  _prepare_devices(args, config, preemption=True)
  import jax

  result = job.finetune(config, args.workdir, data, overwrite=args.overwrite)
  if jax.process_index() == 0:
    if result.stopped_by:
      _print_stopped(result, args.workdir)
    else:
      scores = ", ".join(f"{k} {_number(k, v)}" for k, v in result.final.items())
      print(f"{data.spec.name} dev: {scores}", flush=True)
      written = ", ".join(job.results_files(args.workdir))
      print(f"run folder {args.workdir}: {written}, checkpoints/, metrics.jsonl, tb/ (TensorBoard)")
  return 0


def _number(name: str, value) -> str:
  """A metric as people read it: counts (SQuAD 2.0's totals) whole, the rest to four decimals."""
  return str(int(value)) if name.endswith("total") else f"{value:.4f}"


def _glue(args, overrides) -> int:
  from bertjax.config import loading
  from bertjax.finetune import glue
  from bertjax.finetune import init as finetune_init

  spec = args.config or str(loading.PACKAGED_CONFIGS / "finetune" / "glue.py")
  names, lrs = glue.parse_tasks(args.tasks), glue.parse_lrs(args.lrs)
  first = [*overrides, f"finetune.glue_task={names[0]}", f"finetune.data={args.data}"]
  _prepare_devices(args, finetune_init.load_config(spec, first, task="classification", init=args.init), preemption=True)
  import jax

  summary = glue.run_suite(
    spec, overrides, init=args.init, data=args.data, workdir=args.workdir, task_names=names, seeds=args.seeds, lrs=lrs
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
  "data prepare": _data_prepare,
}
