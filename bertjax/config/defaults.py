"""Every default of a run in one place: the config that experiment files start from.

`get_config()` returns a *locked* ConfigDict: a delta file (`configs/*.py`) or a command-line
override that names a key which does not exist fails instead of silently adding it. The values
are BERT-base's recipe; `configs/` holds the experiments, each changing only what differs.
"""

import types
from typing import Any

from ml_collections import config_dict

from bertjax.parallel import layout


def config_args(arg: str | None, **accepted: Any) -> types.SimpleNamespace:
  """The `KEY=VALUE,...` after `FILE:` on the command line, each parsed like its default.

  Args:
    arg: what followed `FILE:` (None or "" when nothing did).
    accepted: each key the config file takes, with its default: an int, a float or a str, or a
      tuple of the accepted values (the first is the default; each value is parsed like it).
  Returns:
    One attribute per accepted key.
  Raises:
    ValueError: one line naming the key and what it takes (`--config` reports it as the input's fault).
  """
  takes = ", ".join(f"{k}={'|'.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in accepted.items())
  values = {k: v[0] if isinstance(v, tuple) else v for k, v in accepted.items()}
  for item in filter(None, (arg or "").split(",")):
    key, sep, text = (part.strip() for part in item.partition("="))
    if not sep or key not in accepted:
      raise ValueError(f"config argument {item!r}: this config takes {takes or 'no argument'}")
    values[key] = _parse_arg_value(key, text, accepted[key], takes)
  return types.SimpleNamespace(**values)


def _parse_arg_value(key: str, text: str, default: Any, takes: str) -> Any:
  choices = default if isinstance(default, tuple) else None
  kind = type(choices[0] if choices else default)
  try:
    value = kind(text)
  except ValueError:
    raise ValueError(f"config argument {key}={text}: expected a {kind.__name__}; this config takes {takes}") from None
  if choices and value not in choices:
    raise ValueError(f"config argument {key}={text}: this config takes {takes}")
  return value


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
  """Every default of a run, locked: a key that does not exist cannot be set."""
  del arg
  c = config_dict.ConfigDict()
  c.model = _model()
  c.data = _data()
  c.train = _train()
  c.optim = _optim()
  c.mesh = _mesh()
  c.checkpoint = _checkpoint()
  c.metrics = _metrics()
  c.finetune = _finetune()
  c.lock()
  return c


def _model() -> config_dict.ConfigDict:
  model = config_dict.ConfigDict()
  model.variant = "tiny"  # a name in bertjax.model.config.VARIANTS
  # Overrides of the variant's sizes; None takes the variant's value. Changing hidden_size
  # alone re-derives num_heads (H / 64) and intermediate_size (4 H).
  model.hidden_size = config_dict.placeholder(int)
  model.num_layers = config_dict.placeholder(int)
  model.num_heads = config_dict.placeholder(int)
  model.intermediate_size = config_dict.placeholder(int)
  model.max_position_embeddings = 512
  model.type_vocab_size = 2
  model.dropout = 0.1
  model.attention_dropout = 0.1
  model.layer_norm_eps = 1e-12
  model.initializer_range = 0.02
  model.dtype = "auto"  # auto: bfloat16 on accelerators, float32 on CPU
  # auto: with attention dropout, the fused kernel with it inside (pallas) on GPUs, and on TPUs
  # from 512 tokens; cuDNN on GPUs without attention dropout; XLA elsewhere. auto | xla | cudnn | pallas
  model.attention_impl = "auto"
  # What a layer keeps for its backward pass: none | dots | dots_except_mlp_wide |
  # attention_out_mlp_in | offload_dots | full (bertjax.model.config.REMAT_POLICIES). none is the
  # fastest where the batch fits; where it does not, dots_except_mlp_wide first (docs/scaling.md,
  # "Rematerialisation").
  model.remat = "none"
  # One traced layer under lax.scan (compile time flat in depth) or the layers unrolled (faster
  # steps on GPU and TPU, longer compiles); configs/base.py and large.py unroll.
  model.scan_layers = True
  # How dropout masks are drawn: threefry (jax.random) or hash (a counter-based hash computed where
  # the mask is applied, never written to memory); both are mesh-independent.
  # auto: hash on GPUs and TPUs, threefry on CPU.
  model.dropout_impl = "auto"
  return model


def _data() -> config_dict.ConfigDict:
  data = config_dict.ConfigDict()
  data.source = "builtin"  # builtin | files:GLOB | hf:NAME[:CONFIG] | disk:DIR
  data.text_column = "text"
  data.streaming = False
  data.seq_len = 128
  data.max_predictions = 20
  data.mask_prob = 0.15
  data.whole_word_mask = False
  data.short_seq_prob = 0.1
  data.tokenizer = ""  # a tokenizer folder or file; empty: train one into WORKDIR/tokenizer
  data.vocab_size = 8000  # for a tokenizer bertjax trains, and synthetic bench batches
  data.tokenizer_model = "unigram"  # unigram | bpe
  data.tokenizer_sentences = 1_000_000
  data.lowercase = True
  data.eval_fraction = 0.02  # share of whole documents held out for evaluation
  data.cache_dir = ""  # tokenised-corpus cache; empty: a user cache folder
  data.num_proc = 0  # tokenisation processes; 0: one per core
  data.prefetch = 2  # batches prepared ahead in the background
  data.max_sentence_chars = 10_000  # longer "sentences" (runaway lines) are cut at spaces
  data.hf_split = "train"  # the split an hf: or disk: source reads
  data.pair_random_next_prob = 0.5  # NSP: share of pairs whose B comes from another document
  data.mask_token_prob = 0.8  # of the chosen positions: share replaced by [MASK]
  data.random_token_prob = 0.1  # ... share replaced by a random token (the rest stay unchanged)
  # data.streaming: documents per shuffle window (pairs, random B and shuffling stay within one)
  data.streaming_window_documents = 10_000
  data.streaming_eval_documents = 1_000  # streaming: the stream's first N documents are held out (0: none)
  # Sequence packing: several NSP pairs in a row, each with its own [CLS], positions, masks and NSP
  # label, attending only within itself (docs/data.md). Off: BERT's one pair a row, padded.
  data.pack_pairs = False
  data.max_pairs_per_row = 4  # with data.pack_pairs: the most pairs one row holds
  return data


def _train() -> config_dict.ConfigDict:
  train = config_dict.ConfigDict()
  train.batch_size = 256  # global, in sequences
  train.steps = 1_000_000
  train.seed = 0
  train.grad_accum = 1
  train.log_every = 100
  train.eval_every = 10_000
  train.eval_batches = 10
  train.init_from = ""
  train.init_params_only = False
  train.profile_steps = ""  # "START:STOP" writes a jax.profiler trace of those steps
  train.compilation_cache = "auto"  # auto (a user cache folder) | off | a folder
  train.distributed_timeout_s = 300  # a process that cannot join the job fails after this
  return train


def _optim() -> config_dict.ConfigDict:
  optim = config_dict.ConfigDict()
  optim.name = "adamw"  # adamw | lamb
  optim.lr = 1e-4
  optim.warmup_steps = 10_000
  optim.schedule_steps = 0  # length of the decay; 0: train.steps (phases share one schedule)
  optim.decay = "linear"  # linear | polynomial | constant
  optim.decay_power = 1.0
  optim.end_lr = 0.0
  optim.weight_decay = 0.01
  optim.b1 = 0.9
  optim.b2 = 0.999
  optim.eps = 1e-6
  optim.clip_norm = 1.0
  optim.max_nonfinite = 10
  return optim


def _mesh() -> config_dict.ConfigDict:
  mesh = config_dict.ConfigDict()
  mesh.data = -1  # -1 fills with the devices the other axes leave
  mesh.fsdp = 1
  mesh.tensor = 1
  # A layout by name fills the devices: data | fsdp | fsdp_tensor (mesh.tensor is the tensor
  # size, fsdp takes the rest); "" uses mesh.data/fsdp/tensor as given.
  mesh.parallelism = ""
  mesh.dcn_data = 1  # slices (TPU multislice) or nodes (GPU): data-parallel across the slow network
  # Where each logical axis of the model lands on the mesh: LOGICAL=MESH[+MESH] entries, comma-
  # separated; LOGICAL= replicates, and an axis left out keeps this default (docs/scaling.md,
  # "Sharding rules"). E.g. --config.mesh.rules='mlp=fsdp+tensor,act_batch=data'.
  mesh.rules = layout.format_rules(layout.RULES)
  return mesh


def _checkpoint() -> config_dict.ConfigDict:
  checkpoint = config_dict.ConfigDict()
  checkpoint.every_steps = 1000
  checkpoint.keep = 3
  checkpoint.keep_period = 0  # 0: keep no step permanently
  checkpoint["async"] = True  # `async` is a Python keyword: read it as checkpoint["async"]
  return checkpoint


def _metrics() -> config_dict.ConfigDict:
  metrics = config_dict.ConfigDict()
  metrics.peak_tflops = 0.0  # 0: the chip's datasheet dense bf16 peak (bertjax.metrics.flops)
  # On an object store (gs://), metrics.jsonl and the TensorBoard events are uploaded whole at most
  # this often (and at the end); local files are flushed at every log step.
  metrics.upload_every_s = 30.0
  return metrics


def _finetune() -> config_dict.ConfigDict:
  """Fine-tuning (`bertjax finetune`, `bertjax glue`; docs/finetuning.md). The model's sizes come
  from the --init run; train.batch_size, train.seed, train.log_every, optim.* (but
  optim.warmup_steps, which warmup_fraction replaces), mesh.* and checkpoint.* apply as in
  pretraining; train.steps does not (finetune.epochs does)."""
  finetune = config_dict.ConfigDict()
  finetune.task = ""  # classification | qa | ner | multiple_choice (`--task` sets it); empty: not a fine-tuning run
  finetune.init = ""  # the pretraining or import-hf workdir whose parameters start the run (`--init`)
  # Where the data is: a GLUE folder (with glue_task), or hf:NAME[:CONFIG] (online only); empty:
  # train_file and dev_file.
  finetune.data = ""
  finetune.glue_task = ""  # cola | sst2 | mrpc | stsb | qqp | mnli | qnli | rte | wnli; empty: custom data
  # .jsonl / .csv / .tsv (classification), a SQuAD .json (qa), CoNLL columns or .jsonl (ner), SWAG's
  # .csv or .jsonl (multiple_choice)
  finetune.train_file = ""
  finetune.dev_file = ""
  finetune.train_split = "train"  # the splits of an hf: dataset; dev_split may list several, a,b
  finetune.dev_split = "validation"
  # Columns of custom classification data; a file without text_pair_column holds single sentences.
  finetune.text_column = "text"
  finetune.text_pair_column = "text_pair"
  finetune.label_column = "label"
  # Custom classes as the label column writes them, "neg,pos"; empty: a GLUE task's. NER: the tags
  # ("O,B-PER,I-PER,..."); empty: the train file's in first-seen order, O first.
  finetune.labels = ""
  finetune.regression = False  # custom data: a real-valued label, mean-squared error
  finetune.metrics = ""  # custom data: accuracy,f1,matthews,pearson,spearman; empty: accuracy or pearson,spearman
  finetune.epochs = 3  # BERT: 3 for GLUE, 2 for SQuAD
  finetune.warmup_fraction = 0.1  # of all fine-tuning steps, warming the learning rate up linearly
  finetune.head_dropout = 0.1  # on the pooled output, before the classifier (BERT's)
  finetune.max_seq_len = 128  # every sequence is padded or truncated (longest first) to this
  # Extractive QA (SQuAD): question + context windows and span decoding, as google-research/bert.
  finetune.squad_v2 = False  # unanswerable questions exist (SQuAD 2.0)
  finetune.doc_stride = 128  # tokens between the starts of consecutive context windows
  finetune.max_query_len = 64  # questions are truncated to this many tokens
  finetune.n_best = 20  # start and end candidates considered per window
  finetune.max_answer_len = 30  # tokens
  finetune.null_score_threshold = 0.0  # SQuAD 2.0: predict no answer when null - best span > this
  # NER: the entity tags the model learns (iob2: every entity starts with B-; iob1: with I-, B- only
  # after an adjacent entity of its type); the files may use either, and are re-tagged.
  finetune.tag_scheme = "iob2"
  return finetune
