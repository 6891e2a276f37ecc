"""Every default of a run in one place: the config that experiment files start from.

`get_config()` returns a *locked* ConfigDict: a delta file (`configs/*.py`) or a command-line
override that names a key which does not exist fails instead of silently adding it. The values
are BERT-base's recipe; `configs/` holds the experiments, each changing only what differs.
"""

from ml_collections import config_dict

from bertjax.parallel import layout


def parse_arg(arg: str | None) -> dict[str, str]:
  """`"phase=2,foo=bar"` (the part after `FILE:` on the command line) as a dict."""
  if not arg:
    return {}
  pairs = [item.split("=", 1) for item in arg.split(",") if item]
  bad = [p[0] for p in pairs if len(p) != 2]
  if bad:
    raise ValueError(f"config argument {bad[0]!r} is not KEY=VALUE (write e.g. FILE:phase=2)")
  return {k.strip(): v.strip() for k, v in pairs}


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
  del arg
  c = config_dict.ConfigDict()

  c.model = config_dict.ConfigDict()
  c.model.variant = "tiny"  # a name in bertjax.model.config.VARIANTS
  # Overrides of the variant's sizes; None takes the variant's value. Changing hidden_size
  # alone re-derives num_heads (H / 64) and intermediate_size (4 H).
  c.model.hidden_size = config_dict.placeholder(int)
  c.model.num_layers = config_dict.placeholder(int)
  c.model.num_heads = config_dict.placeholder(int)
  c.model.intermediate_size = config_dict.placeholder(int)
  c.model.max_position_embeddings = 512
  c.model.type_vocab_size = 2
  c.model.dropout = 0.1
  c.model.attention_dropout = 0.1
  c.model.layer_norm_eps = 1e-12
  c.model.initializer_range = 0.02
  c.model.dtype = "auto"  # auto: bfloat16 on accelerators, float32 on CPU
  # auto: on GPUs the fused kernel with attention dropout inside (pallas), or cuDNN without
  # attention dropout; XLA elsewhere. auto | xla | cudnn | pallas
  c.model.attention_impl = "auto"
  # What a layer keeps for its backward pass: none | dots | dots_except_mlp_wide |
  # attention_out_mlp_in | offload_dots | full (bertjax.model.config.REMAT_POLICIES).
  c.model.remat = "none"
  # One traced layer under lax.scan (compile time flat in depth) or the layers unrolled (faster
  # steps on GPU and TPU, longer compiles); configs/base.py and large.py unroll.
  c.model.scan_layers = True
  # How dropout masks are drawn: threefry (jax.random) or hash (a counter-based hash computed where
  # the mask is applied, never written to memory); both are mesh-independent.
  # auto: hash on GPUs and TPUs, threefry on CPU.
  c.model.dropout_impl = "auto"

  c.data = config_dict.ConfigDict()
  c.data.source = "builtin"  # builtin | files:GLOB | hf:NAME[:CONFIG] | disk:DIR
  c.data.text_column = "text"
  c.data.streaming = False
  c.data.seq_len = 128
  c.data.max_predictions = 20
  c.data.mask_prob = 0.15
  c.data.whole_word_mask = False
  c.data.short_seq_prob = 0.1
  c.data.tokenizer = ""  # a tokenizer folder or file; empty: train one into WORKDIR/tokenizer
  c.data.vocab_size = 8000  # for a tokenizer bertjax trains, and synthetic bench batches
  c.data.tokenizer_model = "unigram"  # unigram | bpe
  c.data.tokenizer_sentences = 1_000_000
  c.data.lowercase = True
  c.data.eval_fraction = 0.02  # share of whole documents held out for evaluation
  c.data.cache_dir = ""  # tokenised-corpus cache; empty: a user cache folder
  c.data.num_proc = 0  # tokenisation processes; 0: one per core
  c.data.prefetch = 2  # batches prepared ahead in the background
  c.data.max_sentence_chars = 10_000  # longer "sentences" (runaway lines) are cut at spaces
  c.data.hf_split = "train"  # the split an hf: or disk: source reads
  c.data.pair_random_next_prob = 0.5  # NSP: share of pairs whose B comes from another document
  c.data.mask_token_prob = 0.8  # of the chosen positions: share replaced by [MASK]
  c.data.random_token_prob = 0.1  # ... share replaced by a random token (the rest stay unchanged)
  # data.streaming: documents per shuffle window (pairs, random B and shuffling stay within one)
  c.data.streaming_window_documents = 10_000
  c.data.streaming_eval_documents = 1_000  # streaming: the stream's first N documents are held out (0: none)
  # Sequence packing: several NSP pairs in a row, each with its own [CLS], positions, masks and NSP
  # label, attending only within itself (docs/data.md). Off: BERT's one pair a row, padded.
  c.data.pack_pairs = False
  c.data.max_pairs_per_row = 4  # with data.pack_pairs: the most pairs one row holds

  c.train = config_dict.ConfigDict()
  c.train.batch_size = 256  # global, in sequences
  c.train.steps = 1_000_000
  c.train.seed = 0
  c.train.grad_accum = 1
  c.train.log_every = 100
  c.train.eval_every = 10_000
  c.train.eval_batches = 10
  c.train.init_from = ""
  c.train.init_params_only = False
  c.train.profile_steps = ""  # "START:STOP" writes a jax.profiler trace of those steps
  c.train.compilation_cache = "auto"  # auto (a user cache folder) | off | a folder
  c.train.distributed_timeout_s = 300  # a process that cannot join the job fails after this

  c.optim = config_dict.ConfigDict()
  c.optim.name = "adamw"  # adamw | lamb
  c.optim.lr = 1e-4
  c.optim.warmup_steps = 10_000
  c.optim.schedule_steps = 0  # length of the decay; 0: train.steps (phases share one schedule)
  c.optim.decay = "linear"  # linear | polynomial | constant
  c.optim.decay_power = 1.0
  c.optim.end_lr = 0.0
  c.optim.weight_decay = 0.01
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-6
  c.optim.clip_norm = 1.0
  c.optim.max_nonfinite = 10

  c.mesh = config_dict.ConfigDict()
  c.mesh.data = -1  # -1 fills with the devices the other axes leave
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  # A layout by name fills the devices: data | fsdp | fsdp_tensor (mesh.tensor is the tensor
  # size, fsdp takes the rest); "" uses mesh.data/fsdp/tensor as given.
  c.mesh.parallelism = ""
  c.mesh.dcn_data = 1  # slices (TPU multislice) or nodes (GPU): data-parallel across the slow network
  # Where each logical axis of the model lands on the mesh: LOGICAL=MESH[+MESH] entries, comma-
  # separated; LOGICAL= replicates, and an axis left out keeps this default (docs/scaling.md,
  # "Sharding rules"). E.g. --config.mesh.rules='mlp=fsdp+tensor,act_batch=data'.
  c.mesh.rules = layout.format_rules(layout.RULES)

  c.checkpoint = config_dict.ConfigDict()
  c.checkpoint.every_steps = 1000
  c.checkpoint.keep = 3
  c.checkpoint.keep_period = 0  # 0: keep no step permanently
  c.checkpoint["async"] = True  # `async` is a Python keyword: read it as checkpoint["async"]

  c.metrics = config_dict.ConfigDict()
  c.metrics.peak_tflops = 0.0  # 0: the chip's datasheet dense bf16 peak (bertjax.metrics.flops)
  # On an object store (gs://), metrics.jsonl and the TensorBoard events are uploaded whole at most
  # this often (and at the end); local files are flushed at every log step.
  c.metrics.upload_every_s = 30.0

  # Fine-tuning (`bertjax finetune`, `bertjax glue`; docs/finetuning.md). The model's sizes come
  # from the --init run; train.batch_size, train.seed, train.log_every, optim.* (but
  # optim.warmup_steps, which warmup_fraction replaces), mesh.* and checkpoint.* apply as in
  # pretraining; train.steps does not (finetune.epochs does).
  c.finetune = config_dict.ConfigDict()
  c.finetune.task = ""  # classification | qa (`--task` sets it); empty: not a fine-tuning run
  c.finetune.init = ""  # the pretraining or import-hf workdir whose parameters start the run (`--init`)
  # Where the data is: a GLUE folder (with glue_task), or hf:NAME[:CONFIG] (online only); empty:
  # train_file and dev_file.
  c.finetune.data = ""
  c.finetune.glue_task = ""  # cola | sst2 | mrpc | stsb | qqp | mnli | qnli | rte | wnli; empty: custom data
  c.finetune.train_file = ""  # .jsonl / .csv / .tsv (classification) or a SQuAD .json (qa)
  c.finetune.dev_file = ""
  c.finetune.train_split = "train"  # the splits of an hf: dataset; dev_split may list several, a,b
  c.finetune.dev_split = "validation"
  # Columns of custom classification data; a file without text_pair_column holds single sentences.
  c.finetune.text_column = "text"
  c.finetune.text_pair_column = "text_pair"
  c.finetune.label_column = "label"
  c.finetune.labels = ""  # custom classes as the label column writes them, "neg,pos"; empty: a GLUE task's
  c.finetune.regression = False  # custom data: a real-valued label, mean-squared error
  c.finetune.metrics = ""  # custom data: accuracy,f1,matthews,pearson,spearman; empty: accuracy or pearson,spearman
  c.finetune.epochs = 3  # BERT: 3 for GLUE, 2 for SQuAD
  c.finetune.warmup_fraction = 0.1  # of all fine-tuning steps, warming the learning rate up linearly
  c.finetune.head_dropout = 0.1  # on the pooled output, before the classifier (BERT's)
  c.finetune.max_seq_len = 128  # every sequence is padded or truncated (longest first) to this
  # Extractive QA (SQuAD): question + context windows and span decoding, as google-research/bert.
  c.finetune.squad_v2 = False  # unanswerable questions exist (SQuAD 2.0)
  c.finetune.doc_stride = 128  # tokens between the starts of consecutive context windows
  c.finetune.max_query_len = 64  # questions are truncated to this many tokens
  c.finetune.n_best = 20  # start and end candidates considered per window
  c.finetune.max_answer_len = 30  # tokens
  c.finetune.null_score_threshold = 0.0  # SQuAD 2.0: predict no answer when null - best span > this

  c.lock()
  return c
