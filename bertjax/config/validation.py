"""Validation of a run config: every value checked once, at the entry point, before any device work.

Each problem is a BertjaxError whose one line names the key and the fix, e.g.
`config data.seq_len=1024 exceeds model.max_position_embeddings=512; lower data.seq_len or ...`.
The checks of a section's values live here and nowhere else; the modules that use the values
trust them. The mesh arithmetic is `bertjax.parallel.layout`'s and the corpus-source syntax
`bertjax.data.corpus`'s: this module calls them rather than repeating them.
"""

from collections.abc import Sequence

from ml_collections import config_dict

from bertjax import tasks
from bertjax.data import corpus
from bertjax.data.limits import MIN_PAIR_TOKENS
from bertjax.errors import BertjaxError
from bertjax.model import config as model_config_lib
from bertjax.parallel import layout


def validate(config: config_dict.ConfigDict) -> None:
  """Raise a BertjaxError for the first invalid value of a run config.

  Every check that needs no devices is here, once: `load_config` and `load_run_config` call it
  at the entry point, and nothing downstream checks the config again.
  """
  _check_model(config)
  _check_data(config)
  _check_train(config)
  _check_optim(config)
  _positive(config, "checkpoint.every_steps", "checkpoint.keep")
  if config.checkpoint.keep_period < 0:
    _fail(
      "checkpoint.keep_period", f"{config.checkpoint.keep_period} is negative", "set it to 0 (off) or a step interval"
    )
  layout.check_mesh_config(config.mesh)
  layout.parse_rules(config.mesh.rules)  # an unknown logical or mesh axis in mesh.rules
  if config.finetune.task:
    _check_finetune(config)


def validate_for_devices(config: config_dict.ConfigDict, device_count: int) -> tuple[int, int, int]:
  """The checks that need the device count: the mesh fills the devices and the batch splits over
  it. Returns the mesh shape (data, fsdp, tensor)."""
  shape = layout.mesh_shape(config.mesh, device_count)
  layout.check_batch_split(config.train.batch_size, config.train.grad_accum, shape)
  return shape


def _check_model(config) -> None:
  m = config.model
  if m.variant not in model_config_lib.VARIANTS:
    named = ", ".join(k for k in model_config_lib.VARIANTS if not k.startswith("L"))
    _fail("model.variant", f"{m.variant!r} is unknown", f"choose one of {named} or L{{2,4,..,12}}_H{{128,256,512,768}}")
  _positive(
    config,
    "model.hidden_size",
    "model.num_layers",
    "model.num_heads",
    "model.intermediate_size",
    "model.max_position_embeddings",
    "model.type_vocab_size",
    "model.layer_norm_eps",
    "model.initializer_range",
  )
  sizes = model_config_lib.variant_sizes(m)
  if sizes.hidden_size % sizes.num_heads:
    _fail(
      "model.hidden_size",
      f"{sizes.hidden_size} is not divisible by model.num_heads={sizes.num_heads}",
      "set model.num_heads to a divisor of model.hidden_size",
    )
  _fraction(config, "model.dropout")
  _fraction(config, "model.attention_dropout")
  _choice(config, "model.dtype", model_config_lib.DTYPES)
  _choice(config, "model.attention_impl", model_config_lib.ATTENTION_IMPLS)
  _choice(config, "model.remat", model_config_lib.REMAT_POLICIES)
  _choice(config, "model.dropout_impl", model_config_lib.DROPOUT_IMPLS)
  if m.attention_impl == "cudnn" and m.attention_dropout > 0:
    _fail(
      "model.attention_impl",
      "'cudnn' needs model.attention_dropout=0 (cuDNN flash attention has no attention dropout)",
      "set --config.model.attention_dropout=0, or model.attention_impl=auto to fall back to XLA",
    )


def _check_data(config) -> None:
  m, d = config.model, config.data
  _positive(config, "data.seq_len", "data.max_predictions", "data.vocab_size", "data.tokenizer_sentences")
  if d.seq_len > m.max_position_embeddings:
    _fail(
      "data.seq_len",
      f"{d.seq_len} exceeds model.max_position_embeddings={m.max_position_embeddings}",
      "lower data.seq_len or raise model.max_position_embeddings",
    )
  if d.seq_len < 8:
    _fail("data.seq_len", f"{d.seq_len} leaves no room for a sentence pair", "set data.seq_len to at least 8")
  if d.max_predictions > d.seq_len:
    _fail(
      "data.max_predictions",
      f"{d.max_predictions} exceeds data.seq_len={d.seq_len}",
      "set data.max_predictions to at most data.seq_len (BERT: 20 at 128, 80 at 512)",
    )
  _fraction(config, "data.mask_prob", low_open=True)
  _fraction(config, "data.short_seq_prob", high_open=False)
  _fraction(config, "data.eval_fraction")
  if d.vocab_size < 8:
    _fail(
      "data.vocab_size", f"{d.vocab_size} is too small", "set data.vocab_size to at least 8 (5 special tokens + pieces)"
    )
  if corpus.parse_source(d.source)[0] == "prepared" and d.streaming:
    _fail(
      "data.streaming",
      "True cannot read a prepared: source (its shards are read in place, not streamed)",
      "set data.streaming=False",
    )
  _choice(config, "data.tokenizer_model", ("unigram", "bpe"))
  _fraction(config, "data.pair_random_next_prob", high_open=False)
  _fraction(config, "data.mask_token_prob", high_open=False)
  _fraction(config, "data.random_token_prob", high_open=False)
  if d.mask_token_prob + d.random_token_prob > 1:
    _fail(
      "data.mask_token_prob",
      f"{d.mask_token_prob} + data.random_token_prob={d.random_token_prob} exceeds 1",
      "lower them so that their sum is at most 1 (BERT: 0.8 and 0.1)",
    )
  _positive(config, "data.prefetch", "data.max_sentence_chars")
  if d.num_proc < 0:
    _fail("data.num_proc", f"{d.num_proc} is negative", "set it to 0 (one process per core) or more")
  _check_rows(config)


def _check_rows(config) -> None:
  """How documents become rows: the streaming windows and held-out split, and packing."""
  d = config.data
  if d.streaming_window_documents < 2:
    _fail(
      "data.streaming_window_documents",
      f"{d.streaming_window_documents} leaves no other document for a random next sentence",
      "set it to at least 2",
    )
  if d.streaming_eval_documents == 1 or d.streaming_eval_documents < 0:
    _fail(
      "data.streaming_eval_documents",
      f"{d.streaming_eval_documents} cannot make NSP pairs",
      "set it to 0 (no held-out split) or at least 2",
    )
  _positive(config, "data.max_pairs_per_row")
  if d.pack_pairs and d.max_pairs_per_row > d.seq_len // MIN_PAIR_TOKENS:
    _fail(
      "data.max_pairs_per_row",
      f"{d.max_pairs_per_row} pairs cannot fit in data.seq_len={d.seq_len} (a pair takes at least "
      f"{MIN_PAIR_TOKENS} tokens)",
      f"set it to at most {d.seq_len // MIN_PAIR_TOKENS}",
    )


def _check_train(config) -> None:
  t = config.train
  _positive(config, "train.batch_size", "train.steps", "train.grad_accum", "train.log_every", "train.eval_every")
  if t.eval_batches < 0:
    _fail("train.eval_batches", f"{t.eval_batches} is negative", "set it to 0 (no evaluation) or more")
  upload_every_s = config.metrics.upload_every_s
  if upload_every_s < 0:
    _fail("metrics.upload_every_s", f"{upload_every_s} is negative", "set it to 0 (every log step) or more")
  if t.batch_size % t.grad_accum:
    _fail(
      "train.batch_size",
      f"{t.batch_size} is not divisible by train.grad_accum={t.grad_accum}",
      "make the global batch a multiple of the number of microbatches",
    )

  if t.profile_steps:
    start, _, stop = t.profile_steps.partition(":")
    if not (start.isdigit() and stop.isdigit() and int(start) < int(stop)):
      _fail(
        "train.profile_steps",
        f"{t.profile_steps!r}: expected START:STOP with START < STOP",
        "e.g. --config.train.profile_steps=10:15, or empty for no trace",
      )
  if t.distributed_timeout_s <= 0:
    _fail("train.distributed_timeout_s", f"{t.distributed_timeout_s} must be positive", "e.g. 300 (seconds)")


def _check_optim(config) -> None:
  _choice(config, "optim.name", ("adamw", "lamb"))
  _choice(config, "optim.decay", ("linear", "polynomial", "constant"))
  _positive(config, "optim.lr", "optim.max_nonfinite", "optim.eps")
  for key in ("optim.warmup_steps", "optim.weight_decay", "optim.clip_norm", "optim.end_lr"):
    if _get(config, key) < 0:
      _fail(key, f"{_get(config, key)} is negative", f"set --config.{key} to 0 or more")
  _fraction(config, "optim.b1")
  _fraction(config, "optim.b2")


def _check_finetune(config) -> None:
  f = config.finetune
  _choice(config, "finetune.task", tasks.KINDS)
  if not f.init:
    _fail("finetune.init", "'' names no pretrained run", "pass --init DIR (a pretraining or import-hf workdir)")
  _positive(config, "finetune.epochs", "finetune.max_seq_len")
  _fraction(config, "finetune.warmup_fraction")
  _fraction(config, "finetune.head_dropout")
  if f.max_seq_len > config.model.max_position_embeddings:
    _fail(
      "finetune.max_seq_len",
      f"{f.max_seq_len} exceeds model.max_position_embeddings={config.model.max_position_embeddings}",
      "lower finetune.max_seq_len (BERT: 128 for GLUE, 384 for SQuAD)",
    )
  reads_data = f.task in ("classification", "qa")  # the others read train_file and dev_file only
  if f.data and reads_data and not f.data.startswith("hf:") and not (f.task == "classification" and f.glue_task):
    _fail(
      "finetune.data",
      f"{f.data!r} is neither hf:NAME[:CONFIG] nor, with finetune.glue_task, a GLUE folder",
      "set finetune.glue_task for a GLUE folder, or leave finetune.data empty and set finetune.train_file/dev_file",
    )
  if not f.data and not (f.train_file and f.dev_file):
    _fail(
      "finetune.train_file" if not f.train_file else "finetune.dev_file",
      "'' leaves the run without data",
      "set finetune.train_file and finetune.dev_file, or finetune.data (a GLUE folder or hf:NAME)",
    )
  if f.data.startswith("hf:") and not (tasks.split_list(f.train_split) and tasks.split_list(f.dev_split)):
    _fail("finetune.dev_split", "names no split", "name the hf: dataset's splits, e.g. train and validation")
  checks = {"qa": _check_qa, "ner": _check_ner, "multiple_choice": _check_multiple_choice}
  checks.get(f.task, _check_classification)(config)


def _check_file_task(config) -> None:
  """NER and multiple choice read finetune.train_file and dev_file, and nothing of classification."""
  f = config.finetune
  if f.data:
    _fail("finetune.data", f"{f.data!r} is not read by --task {f.task}", "set finetune.train_file and dev_file")
  if f.glue_task:
    _fail("finetune.glue_task", f"{f.glue_task!r} is a classification task", "run it with --task classification")
  if f.regression:
    _fail("finetune.regression", f"True does not apply to --task {f.task}", "leave it false")


def _check_ner(config) -> None:
  f = config.finetune
  _check_file_task(config)
  _choice(config, "finetune.tag_scheme", tasks.TAG_SCHEMES)
  tags = tasks.split_list(f.labels)
  for tag in tags:
    prefix, dash, kind = tag.partition("-")
    if tag != "O" and not (prefix in ("B", "I") and dash and kind):
      _fail("finetune.labels", f"tag {tag!r} is neither O nor B-TYPE / I-TYPE", "list IOB tags, e.g. O,B-PER,I-PER")
  if len(set(tags)) != len(tags):
    _fail("finetune.labels", f"{f.labels!r} lists a tag twice", "list each tag once")
  if f.max_seq_len < 3:  # [CLS] word [SEP]
    _fail("finetune.max_seq_len", f"{f.max_seq_len} leaves no room for a word", "set it to at least 3 (BERT: 128)")


def _check_multiple_choice(config) -> None:
  _check_file_task(config)
  if config.finetune.labels:
    _fail("finetune.labels", f"{config.finetune.labels!r} names classes", "leave it empty: the choices are the labels")
  if config.finetune.max_seq_len < 5:  # [CLS] context [SEP] choice [SEP]
    _fail("finetune.max_seq_len", f"{config.finetune.max_seq_len} leaves no room for a choice", "set it to at least 5")


def _check_classification(config) -> None:
  f = config.finetune
  if f.glue_task:
    if f.glue_task not in tasks.GLUE:
      _fail("finetune.glue_task", f"{f.glue_task!r} is not a GLUE task", f"choose one of {', '.join(tasks.GLUE)}")
    if not f.data:
      _fail(
        "finetune.data", "'' names no GLUE data", "set it to the GLUE folder (holding SST-2/, MRPC/, ...) or hf:NAME"
      )
    return
  if not f.text_column or not f.label_column:
    _fail("finetune.text_column" if not f.text_column else "finetune.label_column", "'' names no column", "name one")
  labels = tasks.split_list(f.labels)
  if f.regression and labels:
    _fail("finetune.labels", f"{f.labels!r} declares classes for a regression", "leave it empty or regression=false")
  if not f.regression and len(labels) < 2 and not (f.data.startswith("hf:") and not labels):
    _fail(
      "finetune.labels",
      f"{f.labels!r} declares {len(labels)} class(es)",
      "list the classes as the label column writes them, e.g. --config.finetune.labels=neg,pos "
      "(an hf: dataset's ClassLabel names them itself), or set finetune.regression=true",
    )
  if len(set(labels)) != len(labels):
    _fail("finetune.labels", f"{f.labels!r} lists a class twice", "list each class once")
  allowed = tasks.REGRESSION_METRICS if f.regression else tasks.CLASSIFICATION_METRICS
  for metric in tasks.split_list(f.metrics):
    if metric not in allowed:
      _fail("finetune.metrics", f"{metric!r} does not apply here", f"choose among {', '.join(allowed)}")
  if "f1" in tasks.split_list(f.metrics) and labels and len(labels) != 2:
    _fail("finetune.metrics", "f1 needs exactly two classes (it is the F1 of the second)", "drop f1")


def _check_qa(config) -> None:
  f = config.finetune
  if f.glue_task:
    _fail("finetune.glue_task", f"{f.glue_task!r} is a classification task", "run it with --task classification")
  _positive(config, "finetune.doc_stride", "finetune.max_query_len", "finetune.n_best", "finetune.max_answer_len")
  if f.max_query_len + 4 > f.max_seq_len:  # [CLS] question [SEP] >= 1 context token [SEP]
    _fail(
      "finetune.max_query_len",
      f"{f.max_query_len} leaves no context in finetune.max_seq_len={f.max_seq_len}",
      "lower it (BERT: 64 of 384)",
    )
  if f.doc_stride > f.max_seq_len - f.max_query_len - 3:
    _fail(
      "finetune.doc_stride",
      f"{f.doc_stride} is longer than a context window, so windows would skip context",
      "lower it (BERT: 128 with max_seq_len 384 and max_query_len 64)",
    )


def _fail(key: str, problem: str, fix: str):
  raise BertjaxError(f"config {key}={problem}; {fix}")


def _positive(config, *keys: str):
  for key in keys:
    value = _get(config, key)
    if value is not None and value <= 0:
      _fail(key, f"{value} must be positive", f"set --config.{key} to a value above 0")


def _get(config, key: str):
  node = config
  for part in key.split("."):
    node = node[part]
  return node


def _choice(config, key: str, choices: Sequence[str]):
  value = _get(config, key)
  if value not in choices:
    _fail(key, f"{value!r} is not supported", f"choose one of {', '.join(choices)}")


def _fraction(config, key: str, low_open: bool = False, high_open: bool = True):
  value = _get(config, key)
  lo_ok = value > 0 if low_open else value >= 0
  hi_ok = value < 1 if high_open else value <= 1
  if not (lo_ok and hi_ok):
    _fail(
      key,
      f"{value} is out of range",
      f"set --config.{key} to a value in {'(' if low_open else '['}0, 1{')' if high_open else ']'}",
    )
