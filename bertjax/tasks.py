"""What a fine-tuning task is: the GLUE tasks' layouts, labels and metrics, and a run's task resolved.

    GLUE             name -> GlueTask: the folder and columns of the distributed GLUE data (as
                     google-research/bert's processors read them), the nyu-mll/glue columns, the
                     classes and the official metrics
    METRICS          every metric name a task may report
    resolve(config)  the `finetune` section -> TaskSpec (head, classes, metrics, dev splits)

A leaf: no JAX, no datasets, so the config validation reads these tables without building
anything. Class i of a GLUE task is label id i of nyu-mll/glue's ClassLabel, and its name is that
ClassLabel's name; the TSV files write the same classes as `tsv_labels` (MRPC's "0"/"1", MNLI's
names). F1 is the F1 of class 1 (MRPC: equivalent, QQP: duplicate), as GLUE reports it.
"""

import dataclasses

# Classification metrics, regression metrics, and those of extractive QA.
CLASSIFICATION_METRICS = ("accuracy", "f1", "matthews")
REGRESSION_METRICS = ("pearson", "spearman")
METRICS = CLASSIFICATION_METRICS + REGRESSION_METRICS
# Token classification reports conlleval's entity-level scores and its token accuracy (percent).
NER_METRICS = ("precision", "recall", "f1", "accuracy")
KINDS = ("classification", "qa", "ner", "multiple_choice")
TAG_SCHEMES = ("iob2", "iob1")  # the entity tags a token classifier is trained to predict


@dataclasses.dataclass(frozen=True)
class GlueTask:
  """One GLUE task: its TSV folder and columns, its nyu-mll/glue columns, its classes and metrics."""

  name: str
  folder: str  # the task's folder in the GLUE download
  header: bool  # whether train.tsv and dev.tsv start with a header line (CoLA's do not)
  text: int  # column indices as google-research/bert's processors read them (-1: the last)
  pair: int | None
  label: int
  labels: tuple[str, ...]  # class names, in nyu-mll/glue's label id order; () for regression
  tsv_labels: tuple[str, ...]  # the same classes as the TSV files write them
  metrics: tuple[str, ...]
  hf_columns: tuple[str, str | None]  # (text, pair) in nyu-mll/glue
  dev_files: dict[str, str]  # dev split name -> file (MNLI has two)
  hf_dev_splits: dict[str, str]  # dev split name -> nyu-mll/glue split

  @property
  def regression(self) -> bool:
    return not self.labels


_BINARY = ("0", "1")
_ENTAILMENT = ("entailment", "not_entailment")
# fmt: off
_ROWS = (
  # name, folder, header, text, pair, label, classes (nyu-mll/glue order), TSV labels, metrics, nyu-mll/glue columns
  ("cola", "CoLA", False, 3, None, 1, ("unacceptable", "acceptable"), _BINARY, ("matthews",), ("sentence", None)),
  ("sst2", "SST-2", True, 0, None, 1, ("negative", "positive"), _BINARY, ("accuracy",), ("sentence", None)),
  ("mrpc", "MRPC", True, 3, 4, 0, ("not_equivalent", "equivalent"), _BINARY, ("f1", "accuracy"),
   ("sentence1", "sentence2")),
  ("stsb", "STS-B", True, 7, 8, -1, (), (), ("pearson", "spearman"), ("sentence1", "sentence2")),
  ("qqp", "QQP", True, 3, 4, 5, ("not_duplicate", "duplicate"), _BINARY, ("f1", "accuracy"),
   ("question1", "question2")),
  ("mnli", "MNLI", True, 8, 9, -1, ("entailment", "neutral", "contradiction"),
   ("entailment", "neutral", "contradiction"), ("accuracy",), ("premise", "hypothesis")),
  ("qnli", "QNLI", True, 1, 2, -1, _ENTAILMENT, _ENTAILMENT, ("accuracy",), ("question", "sentence")),
  ("rte", "RTE", True, 1, 2, -1, _ENTAILMENT, _ENTAILMENT, ("accuracy",), ("sentence1", "sentence2")),
  ("wnli", "WNLI", True, 1, 2, -1, ("not_entailment", "entailment"), _BINARY, ("accuracy",),
   ("sentence1", "sentence2")),
)
# fmt: on
# MNLI has two dev sets; every other task one, dev.tsv (nyu-mll/glue: validation).
_DEV_FILES = {"mnli": {"matched": "dev_matched.tsv", "mismatched": "dev_mismatched.tsv"}}
_HF_DEV_SPLITS = {"mnli": {"matched": "validation_matched", "mismatched": "validation_mismatched"}}
GLUE: dict[str, GlueTask] = {
  row[0]: GlueTask(
    *row[:6],
    labels=row[6],
    tsv_labels=row[7],
    metrics=row[8],
    hf_columns=row[9],
    dev_files=_DEV_FILES.get(row[0], {"dev": "dev.tsv"}),
    hf_dev_splits=_HF_DEV_SPLITS.get(row[0], {"dev": "validation"}),
  )
  for row in _ROWS
}
# The BERT paper's GLUE average leaves out "the problematic WNLI set" (its footnote).
GLUE_AVERAGE_EXCLUDES = ("wnli",)


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """A run's task, resolved from its config: what the head predicts and what is measured."""

  kind: str  # classification | qa | ner | multiple_choice
  name: str  # the GLUE task, "squad", "squad_v2", "ner", "multiple_choice", or "custom"
  labels: tuple[str, ...] = ()  # class names (ner: the tags); () for regression, QA and multiple choice
  regression: bool = False
  metrics: tuple[str, ...] = ()  # per dev split (SQuAD 2.0 adds the HasAns/NoAns parts)
  dev_splits: tuple[str, ...] = ("dev",)

  @property
  def num_outputs(self) -> int:
    """Logits per sequence (classification: classes, 1 for regression), per token (QA: 2; NER: the
    tags) or per choice (multiple choice: 1)."""
    if self.kind == "qa":
      return 2
    return 1 if self.regression or self.kind == "multiple_choice" else len(self.labels)


def split_list(text: str) -> tuple[str, ...]:
  """A comma-separated config value as its items ("a, b" -> ("a", "b"))."""
  return tuple(item.strip() for item in text.split(",") if item.strip())


def custom_metrics(f) -> tuple[str, ...]:
  """The metrics of custom classification data: finetune.metrics, or the natural default."""
  if f.metrics:
    return split_list(f.metrics)
  return REGRESSION_METRICS if f.regression else ("accuracy",)


def glue_spec(name: str) -> TaskSpec:
  """The TaskSpec of a GLUE task."""
  glue = GLUE[name]
  return TaskSpec("classification", name, glue.labels, glue.regression, glue.metrics, tuple(glue.dev_files))


def resolve(config) -> TaskSpec:
  """The task of a validated config's `finetune` section."""
  f = config.finetune
  if f.task == "ner":  # the tags: finetune.labels, or the train file's (bertjax.finetune.ner)
    return TaskSpec("ner", "ner", split_list(f.labels), metrics=NER_METRICS)
  if f.task == "multiple_choice":
    return TaskSpec("multiple_choice", "multiple_choice", metrics=("accuracy",))
  if f.task == "qa":
    # The official scripts' names: evaluate-v1.1.py says exact_match, evaluate-v2.0.py exact.
    if f.squad_v2:
      return TaskSpec("qa", "squad_v2", metrics=("exact", "f1"))
    return TaskSpec("qa", "squad", metrics=("exact_match", "f1"))
  if f.glue_task:
    return glue_spec(f.glue_task)
  dev_splits = ("dev",)
  if f.data.startswith("hf:") and len(split_list(f.dev_split)) > 1:
    dev_splits = split_list(f.dev_split)
  return TaskSpec("classification", "custom", split_list(f.labels), f.regression, custom_metrics(f), dev_splits)


def metric_names(spec: TaskSpec) -> list[str]:
  """The names a task's evaluation reports: `metric` with one dev split, `metric_split` with several."""
  if len(spec.dev_splits) == 1:
    return list(spec.metrics)
  return [f"{m}_{s}" for s in spec.dev_splits for m in spec.metrics]
