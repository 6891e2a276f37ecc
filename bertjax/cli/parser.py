"""The command line's grammar: the commands, their flags, and `--config.KEY=VALUE` overrides."""

import argparse
from collections.abc import Sequence

from bertjax import tasks
from bertjax.errors import BertjaxError


class Parser(argparse.ArgumentParser):
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
  parser = Parser(prog="bertjax", description="Pretrain BERT with JAX/Flax, from one CPU to a TPU pod.")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
  for add in (
    _add_train,
    _add_eval,
    _add_export,
    _add_import_hf,
    _add_tokenizer,
    _add_data,
    _add_bench,
    _add_plot,
    _add_finetune,
    _add_glue,
  ):
    add(sub)
  return parser


def _add_train(sub) -> None:
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
  p.add_argument(
    "--no-estimate",
    dest="estimate",
    action="store_false",
    help="with --compile: memory and whether it fits only (one compile, no step-time estimate), "
    "e.g. to search for the largest batch that fits",
  )
  p.add_argument("--json", action="store_true", help="with --dry-run: print the figures as one JSON line")
  _add_distributed(p)


def _add_eval(sub) -> None:
  p = sub.add_parser("eval", help="evaluate a checkpoint on the held-out split; prints one JSON line")
  p.add_argument("--workdir", required=True)
  _add_config(p, required=False)
  p.add_argument("--step", type=int, help="checkpoint step (default: the newest good one)")
  _add_distributed(p)


def _add_export(sub) -> None:
  p = sub.add_parser("export", help="write a checkpoint as a transformers BERT folder or as plain params")
  p.add_argument("--workdir", required=True)
  p.add_argument("--format", required=True, choices=("hf", "params"))
  p.add_argument("--out", help="output folder (default: WORKDIR/export/hf or WORKDIR/export/params)")
  p.add_argument("--step", type=int, help="checkpoint step (default: newest)")


def _add_import_hf(sub) -> None:
  p = sub.add_parser("import-hf", help="make a workdir from a transformers BERT folder")
  p.add_argument("--hf", required=True, help="folder with config.json and model.safetensors or pytorch_model.bin")
  p.add_argument("--workdir", required=True)


def _add_tokenizer(sub) -> None:
  p = sub.add_parser("tokenizer", help="tokenizer tools")
  tok = p.add_subparsers(dest="tokenizer_command", metavar="ACTION", parser_class=Parser, required=True)
  t = tok.add_parser("train", help="train a sentencepiece tokenizer on the configured corpus")
  _add_config(t)
  t.add_argument("--out", required=True, help="folder to write the tokenizer into")


def _add_data(sub) -> None:
  p = sub.add_parser("data", help="input-pipeline tools")
  data = p.add_subparsers(dest="data_command", metavar="ACTION", parser_class=Parser, required=True)
  t = data.add_parser("preview", help="write N batches as .npz and print decoded examples")
  _add_config(t)
  t.add_argument("--workdir", required=True)
  t.add_argument("--batches", type=int, default=1, metavar="N")
  t.add_argument("--out", required=True, metavar="FILE.npz")
  t = data.add_parser("bench", help="input-pipeline and tokenizer throughput; prints one JSON line")
  _add_config(t)
  t.add_argument("--workdir", required=True, help="where the run's tokenizer is (trained there if missing)")
  t.add_argument("--seconds", type=float, default=10.0, help="how long to time the pipeline")
  t = data.add_parser(
    "prepare",
    help="tokenise the corpus once into shards (data.source=prepared:DIR trains from them); resumable",
    description="Tokenise data.source once into shards in DIR, with the tokenizer (data.tokenizer, or one trained "
    "on the corpus) and a manifest; training then reads them with --config.data.source=prepared:DIR. Run the same "
    "command again to finish a stopped one.",
  )
  _add_config(t)
  t.add_argument("--out", required=True, metavar="DIR", help="the prepared folder (local path or gs://...)")
  t.add_argument(
    "--shard_mb",
    type=float,
    default=64.0,
    metavar="MB",
    help="input per shard, in MiB (default 64; a begun DIR keeps its own)",
  )
  g = t.add_argument_group("processes (default: one)")
  g.add_argument(
    "--num_processes",
    type=int,
    default=1,
    metavar="N",
    help="processes in all; without --process_id they are started here",
  )
  g.add_argument(
    "--process_id",
    type=int,
    metavar="I",
    help="this process's index in a multi-host job (every host runs the command with its own I, e.g. "
    "launch/tpu_pod.sh prepare); process 0 writes the tokenizer and the plan, and the manifest at the end",
  )
  g.add_argument(
    "--workers", type=int, default=1, metavar="W", help="with --process_id: worker processes for this process's shards"
  )


def _add_bench(sub) -> None:
  p = sub.add_parser("bench", help="time the compiled train step on synthetic batches; one JSON line per shape")
  _add_config(p)
  p.add_argument("--steps", type=int, default=20, metavar="N")
  p.add_argument("--profile", metavar="DIR", help="also trace a few steps into DIR and report the time by kernel")
  _add_distributed(p)


def _add_plot(sub) -> None:
  p = sub.add_parser("plot", help="render loss and accuracy curves to a PNG")
  p.add_argument("--workdir", required=True)
  p.add_argument("--out", help="PNG path (default: WORKDIR/curves.png)")


def _add_finetune(sub) -> None:
  p = sub.add_parser(
    "finetune",
    help="fine-tune a pretrained run on a task (resumes)",
    description="Fine-tune the parameters of a pretraining (or import-hf) run, --init, on a task: a head on "
    "BERT's encoder trained with BERT's recipe on the task's data (the --config file and its overrides), "
    "evaluated on the dev split at the end of each epoch. The same command resumes an interrupted run. "
    "WORKDIR gets checkpoints/, metrics.jsonl, tb/ and, once complete, eval_results.json.",
  )
  p.add_argument("--task", required=True, choices=tasks.KINDS, help="the head: " + ", ".join(tasks.KINDS))
  _add_config(p)
  p.add_argument("--workdir", required=True, help="the fine-tuning run's folder (local path or gs://...)")
  p.add_argument("--init", required=True, help="the pretraining or import-hf workdir whose parameters it starts from")
  p.add_argument(
    "--overwrite",
    action="store_true",
    help="replace the run WORKDIR holds (by default a run of other inputs there is refused, and one of the same "
    "inputs resumes or reports)",
  )
  _add_distributed(p)


def _add_glue(sub) -> None:
  p = sub.add_parser(
    "glue",
    help="fine-tune every GLUE task over a learning-rate grid and several seeds; a results table like the paper's",
    description="Fine-tune every GLUE task (or --tasks) with each learning rate of --lrs and seeds 0..N-1, select "
    "each task's rate on the dev set as the paper does, and write the table of the selected runs' medians and "
    "spreads. A rerun reuses complete runs of the same inputs and trains again those whose inputs changed.",
  )
  p.add_argument("--init", required=True, help="the pretraining or import-hf workdir to fine-tune")
  p.add_argument("--data", required=True, metavar="GLUE_DIR", help="the GLUE folder (SST-2/, MRPC/, ...)")
  p.add_argument(
    "--workdir",
    required=True,
    help="one run per task, rate and seed: WORKDIR/TASK/lr-LR/seed-S (without --lrs: TASK/seed-S)",
  )
  p.add_argument(
    "--lrs",
    default="",
    metavar="LR1,LR2",
    help="the learning-rate grid, e.g. 5e-5,4e-5,3e-5,2e-5 as the paper (default: the config's one rate)",
  )
  p.add_argument("--tasks", default="", metavar="T1,T2", help="e.g. sst2,mrpc (default: all nine)")
  p.add_argument("--seeds", type=int, default=3, metavar="N", help="runs per task, seeds 0..N-1 (default 3)")
  _add_config(p, required=False)  # default: configs/finetune/glue.py
  _add_distributed(p)


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
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
