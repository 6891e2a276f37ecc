"""Classification and regression examples, read through `datasets` from where the config says.

    read_classification(config)  -> ClassificationData: the train split and every dev split

Three kinds of source:

  a GLUE folder    finetune.data=DIR with finetune.glue_task: DIR/SST-2/train.tsv, dev.tsv (MNLI:
                   dev_matched.tsv, dev_mismatched.tsv) with each task's own columns, read as
                   google-research/bert's processors read them: tab-separated, no quoting, the
                   header line skipped (CoLA has none), columns by position
  local files      finetune.train_file / dev_file: .jsonl, .csv or .tsv (tab-separated, no quoting)
                   with the columns finetune.text_column, text_pair_column (optional: a file
                   without it holds single sentences) and label_column
  hf:NAME[:CONFIG] a Hugging Face dataset (online only), splits finetune.train_split and
                   dev_split; a GLUE task there reads nyu-mll/glue's columns

Labels become class ids in the order of the declared classes (a GLUE task's, or
finetune.labels; an hf: dataset's ClassLabel names them when finetune.labels is empty). A label
outside them, a missing column, an empty split or a GLUE folder without the task stops the run
with one line naming the file and the fix, before anything is written.
"""

import contextlib
import csv
import dataclasses
import logging
import os
import tempfile
from collections.abc import Iterator

import numpy as np
from etils import epath

from bertjax import storage, tasks
from bertjax.errors import BertjaxError

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Examples:
  """One split: texts, optional second texts, and labels (class ids, or floats for regression)."""

  source: str  # the file or dataset split, as messages name it
  texts: list[str]
  pairs: list[str] | None
  labels: np.ndarray


@dataclasses.dataclass
class ClassificationData:
  """`read_classification`'s result: the resolved task and its splits."""

  spec: tasks.TaskSpec  # with the classes resolved (an hf: ClassLabel may name them)
  train: Examples | None  # None when only the dev splits were asked for
  dev: dict[str, Examples]  # split name -> examples, in spec.dev_splits order


@contextlib.contextmanager
def quiet_datasets():
  """No progress bars from `datasets` while it reads: the splits are small next to a corpus, and
  a bad input's one-line message then stands alone."""
  import datasets  # heavy: only reading data needs it

  shown = datasets.is_progress_bar_enabled()
  datasets.disable_progress_bars()
  try:
    yield
  finally:
    if shown:
      datasets.enable_progress_bars()


def _datasets_cache(config) -> str | None:
  return str(epath.Path(config.data.cache_dir) / "datasets") if config.data.cache_dir else None


@dataclasses.dataclass
class _Table:
  """A split as `datasets` read it, with how to name its rows in messages."""

  source: str
  columns: dict[str, list]
  first_line: int | None  # the file line of row 0 (None: not a text file; rows are counted)

  def where(self, row: int) -> str:
    return f"{self.source} line {row + self.first_line}" if self.first_line is not None else f"{self.source} row {row}"


def read_classification(config, with_train: bool = True) -> ClassificationData:
  """The train split (unless not `with_train`) and the dev splits the config names, labels as
  class ids."""
  spec = tasks.resolve(config)
  f = config.finetune
  with quiet_datasets():
    if f.glue_task and not f.data.startswith("hf:"):
      return _glue_folder(config, spec, with_train)
    if f.data.startswith("hf:"):
      dev_splits = tasks.GLUE[f.glue_task].hf_dev_splits if f.glue_task else None
      return _hf_dataset(config, spec, dev_splits, with_train)
    return _local_files(config, spec, with_train)


def _local_files(config, spec: tasks.TaskSpec, with_train: bool) -> ClassificationData:
  f = config.finetune
  train = _read_file(config, f.train_file, "finetune.train_file") if with_train else None
  dev = _read_file(config, f.dev_file, "finetune.dev_file")
  first = train or dev  # the train file decides whether the task reads pairs
  pair = f.text_pair_column if f.text_pair_column in first.columns else None
  if pair is None and f.text_pair_column:  # the usual case for single-sentence data: no news
    log.debug("%s has no column %r: single sentences", first.source, f.text_pair_column)
  columns = (f.text_column, pair, f.label_column)
  train_examples = _examples(train, *columns, spec) if train is not None else None
  return ClassificationData(spec, train_examples, {"dev": _examples(dev, *columns, spec)})


# -- GLUE folders --------------------------------------------------------------------------------
def glue_task_folder(root, name: str) -> epath.Path:
  """The folder of GLUE task `name` under `root` (or `root` itself when it is that folder)."""
  task = tasks.GLUE[name]
  root = epath.Path(root)
  folder = root / task.folder
  if not folder.is_dir() and root.name == task.folder:
    folder = root  # finetune.data names the task's own folder
  if not folder.is_dir():
    raise BertjaxError(
      f"GLUE folder {root} holds no {task.folder}/ (task {task.name}): point finetune.data (glue: --data) at "
      f"the folder that holds {task.folder}/ as the GLUE download lays it out, or leave {task.name} out"
    )
  return folder


def _glue_folder(config, spec: tasks.TaskSpec, with_train: bool) -> ClassificationData:
  task = tasks.GLUE[config.finetune.glue_task]
  folder = glue_task_folder(config.finetune.data, task.name)
  tsv_to_id = {label: i for i, label in enumerate(task.tsv_labels)}

  def split(name: str) -> Examples:
    path = folder / name
    if not path.exists():
      raise BertjaxError(f"{path} does not exist: the GLUE folder for {task.name} needs train.tsv and the dev files")
    table = _read_tsv(config, path, task.header)
    if not next(iter(table.columns.values())):
      raise _empty(table.source)
    width = len(table.columns)

    def column(index: int) -> list[str]:
      return table.columns[f"c{index % width}"]

    texts = column(task.text)
    pairs = column(task.pair) if task.pair is not None else None
    if task.regression:
      labels = _numbers(column(task.label), table)
    else:
      labels = _ids(column(task.label), tsv_to_id, table, f"{task.name}'s", "is it that task's file?")
    return Examples(table.source, texts, pairs, labels)

  train = split("train.tsv") if with_train else None
  return ClassificationData(spec, train, {name: split(file) for name, file in task.dev_files.items()})


@contextlib.contextmanager
def _readable_locally(path) -> Iterator[str]:
  """`path` as a local file name for `datasets` (which, offline, reads no gs://): a remote file
  is copied to a temporary local file first."""
  if not storage.is_remote(path):
    yield str(path)
    return
  with tempfile.TemporaryDirectory(prefix="bertjax-data-") as folder:
    local = os.path.join(folder, epath.Path(path).name)
    with open(local, "wb") as f:
      f.write(epath.Path(path).read_bytes())
    yield local


def _read_tsv(config, path: epath.Path, header: bool) -> _Table:
  """A GLUE TSV as google-research/bert reads it: tab-separated, no quote characters, all strings."""
  with path.open() as f:
    first = f.readline()
  if not first.strip():
    raise _empty(str(path))
  names = [f"c{i}" for i in range(len(first.rstrip("\r\n").split("\t")))]
  try:
    with _readable_locally(path) as local:
      ds = _load_tsv(config, local, names)
  except Exception as e:  # pandas' parser errors name the line
    raise BertjaxError(f"{path} cannot be read as a GLUE TSV ({_first_line(e)}); fix the line it names") from None
  columns = {name: ds[name][1:] if header else ds[name] for name in names}
  return _Table(str(path), columns, first_line=2 if header else 1)


def _load_tsv(config, local: str, names: list[str]):
  import datasets  # heavy: only reading data needs it

  return datasets.load_dataset(
    "csv",
    data_files=local,
    split="train",
    sep="\t",
    quoting=csv.QUOTE_NONE,
    header=None,
    column_names=names,
    features=datasets.Features({name: datasets.Value("string") for name in names}),
    keep_default_na=False,
    cache_dir=_datasets_cache(config),
  )


# -- local files and hf: datasets -----------------------------------------------------------------
_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv"}


def _read_file(config, path: str, key: str) -> _Table:
  import datasets  # heavy: only reading data needs it

  file = epath.Path(path)
  if not file.exists():
    raise BertjaxError(f"{key}={path} does not exist: give a .jsonl, .csv or .tsv file")
  builder = _FORMATS.get(file.suffix.lower())
  if builder is None or file.suffix.lower() == ".json":
    raise BertjaxError(
      f"{key}={path}: classification reads .jsonl, .csv or .tsv files; convert it (a SQuAD .json is for --task qa)"
    )
  options = {"keep_default_na": False} if builder == "csv" else {}
  if file.suffix.lower() == ".tsv":
    options.update(sep="\t", quoting=csv.QUOTE_NONE)
  _check_text(file, header=builder == "csv")
  try:
    with _readable_locally(path) as local:
      ds = datasets.load_dataset(builder, data_files=local, split="train", cache_dir=_datasets_cache(config), **options)
  except Exception as e:
    raise BertjaxError(f"{path} cannot be read as {file.suffix} ({_first_line(e)}); fix the file") from None
  first_line = 2 if builder == "csv" else 1  # csv and tsv files start with their header
  return _Table(path, {name: ds[name] for name in ds.column_names}, first_line)


def _check_text(file: epath.Path, header: bool) -> None:
  """A data file is UTF-8 text with at least one example (after its header line, if it has one):
  what `datasets` would otherwise report as a traceback or an obscure message."""
  data = file.read_bytes()
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data[: e.start].count(b"\n") + 1
    raise BertjaxError(f"{file} line {line} is not UTF-8 text (byte {e.start}); save the file as UTF-8") from None
  lines = [line for line in text.splitlines() if line.strip()]
  if len(lines) <= int(header):
    raise _empty(str(file))


def _hf_dataset(config, spec: tasks.TaskSpec, glue_dev: dict[str, str] | None, with_train: bool) -> ClassificationData:
  import datasets  # heavy: only reading data needs it

  f = config.finetune
  name, _, conf = f.data.removeprefix("hf:").partition(":")
  if glue_dev is not None:
    text, pair = tasks.GLUE[f.glue_task].hf_columns
    label = "label"
    dev_splits = glue_dev
  else:
    text, pair, label = f.text_column, f.text_pair_column, f.label_column
    dev_names = tasks.split_list(f.dev_split)
    dev_splits = {"dev": dev_names[0]} if len(dev_names) == 1 else {s: s for s in dev_names}

  def load(split: str):
    try:
      return datasets.load_dataset(name, conf or None, split=split, cache_dir=_datasets_cache(config))
    except Exception as e:  # the hub raises many kinds; all mean "cannot get this split"
      raise BertjaxError(
        f"finetune.data={f.data} split {split!r} could not be loaded ({type(e).__name__}: {_first_line(e)}): "
        "check the name, the split names (finetune.train_split, dev_split) and the network"
      ) from None

  dev_ds = {split_name: load(hf_split) for split_name, hf_split in dev_splits.items()}
  train_ds = load(f.train_split) if with_train else None
  first = train_ds if train_ds is not None else next(iter(dev_ds.values()))
  feature = first.features.get(label)
  if not spec.regression and not spec.labels:
    if not isinstance(feature, datasets.ClassLabel):
      raise BertjaxError(
        f"finetune.data={f.data}: its column {label!r} is not a ClassLabel that names the classes; "
        "declare them in finetune.labels (or set finetune.regression=true)"
      )
    spec = dataclasses.replace(spec, labels=tuple(feature.names))
    if "f1" in spec.metrics and len(spec.labels) != 2:
      raise BertjaxError(f"finetune.metrics: f1 needs two classes, and {f.data} has {len(spec.labels)}; drop f1")

  def examples(ds, split: str) -> Examples:
    table = _Table(f"{f.data}:{split}", {c: ds[c] for c in ds.column_names}, first_line=None)
    label_feature = ds.features.get(label)
    if isinstance(label_feature, datasets.ClassLabel):
      names = label_feature.names
    else:  # a copy of a GLUE task without ClassLabel metadata still writes class ids
      names = spec.labels if glue_dev is not None and not spec.regression else None
    if names is not None and label in table.columns:
      # Class ids as names; -1 (a test split's missing label) stays "-1" and is refused below.
      table.columns[label] = [
        names[v] if isinstance(v, int) and 0 <= v < len(names) else v for v in table.columns[label]
      ]
    return _examples(table, text, pair, label, spec)

  if pair and pair not in first.column_names and glue_dev is None:
    log.info("%s has no column %r: single sentences", f.data, pair)
    pair = None
  dev = {split_name: examples(ds, dev_splits[split_name]) for split_name, ds in dev_ds.items()}
  return ClassificationData(spec, examples(train_ds, f.train_split) if with_train else None, dev)


def _examples(table: _Table, text: str, pair: str | None, label: str, spec: tasks.TaskSpec) -> Examples:
  for key, column in (("text_column", text), ("text_pair_column", pair), ("label_column", label)):
    if column is not None and column not in table.columns:
      raise BertjaxError(
        f"{table.source} has no column {column!r} (it has {', '.join(table.columns) or 'none'}): "
        f"set finetune.{key} to the column that holds it"
      )
  if not table.columns[text]:
    raise _empty(table.source)
  texts = [_text(v) for v in table.columns[text]]
  pairs = [_text(v) for v in table.columns[pair]] if pair is not None else None
  if spec.regression:
    labels = _numbers(table.columns[label], table)
  else:
    classes = {c: i for i, c in enumerate(spec.labels)}
    labels = _ids(table.columns[label], classes, table, "the declared", "or declare the class in finetune.labels")
  return Examples(table.source, texts, pairs, labels)


def _text(value) -> str:
  return "" if value is None else str(value)


def _ids(values: list, index: dict[str, int], table: _Table, whose: str, hint: str) -> np.ndarray:
  ids = np.empty(len(values), np.int32)
  for row, value in enumerate(values):
    key = str(value)
    if key not in index:
      raise BertjaxError(
        f"{table.where(row)}: label {key!r} is not one of {whose} classes ({', '.join(index)}); "
        f"correct or remove that example ({hint})"
      )
    ids[row] = index[key]
  return ids


def _numbers(values: list, table: _Table) -> np.ndarray:
  out = np.empty(len(values), np.float32)
  for row, value in enumerate(values):
    try:
      out[row] = float(value)
    except (TypeError, ValueError):
      raise BertjaxError(
        f"{table.where(row)}: label {value!r} is not a number, which a regression needs; correct or remove it"
      ) from None
  return out


def _empty(source: str) -> BertjaxError:
  return BertjaxError(f"{source} holds no examples: give a split with at least one")


def _first_line(e: Exception) -> str:
  text = str(e).strip()
  return text.splitlines()[0][:300] if text else type(e).__name__
