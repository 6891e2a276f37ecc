"""bertjax tokenizers across the transformers boundary, both ways.

Export writes what `transformers.AutoTokenizer.from_pretrained(folder)` needs to give bertjax's ids
with BERT's `[CLS] A [SEP] B [SEP]` template and token types 0/1:

  sentencepiece  tokenizer.json: a `tokenizers` Unigram or BPE model built from the spm proto by
                 transformers' own SpmConverter (Precompiled normaliser, whitespace handling and
                 dummy prefix as sentencepiece does them), tokenizer_class PreTrainedTokenizerFast.
                 spm.model rides along so that importing the export gives back the very same
                 bertjax tokenizer (same fingerprint, checkpoints stay compatible).
  WordPiece      vocab.txt and tokenizer.json, tokenizer_class BertTokenizer.

Both also get tokenizer_config.json and special_tokens_map.json.

Import reads a transformers folder's tokenizer: spm.model (a bertjax export) first, then
tokenizer.json (transformers' exact pipeline), then vocab.txt with tokenizer_config.json's
do_lower_case.
"""

import json
import logging

import tokenizers
from etils import epath
from tokenizers import normalizers, processors

from bertjax.data import tokenizer as tokenizer_lib
from bertjax.data.tokenizer import SPECIAL_TOKENS, Tokenizer
from bertjax.errors import BertjaxError

log = logging.getLogger(__name__)

# transformers' attribute name of each BERT special token, in SPECIAL_TOKENS order.
_SPECIAL_ATTRIBUTES = ("pad_token", "unk_token", "cls_token", "sep_token", "mask_token")
# Without this, transformers' generic fast tokenizer returns no token_type_ids, which BERT wants.
_MODEL_INPUT_NAMES = ["input_ids", "token_type_ids", "attention_mask"]


def _spm_fast_tokenizer(model_proto: bytes) -> tokenizers.Tokenizer:
  # Imported here: transformers is only needed when exporting a sentencepiece tokenizer.
  from sentencepiece import sentencepiece_model_pb2
  from transformers.convert_slow_tokenizer import SpmConverter

  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(model_proto)
  model_type = proto.trainer_spec.model_type  # 1 unigram, 2 bpe (sentencepiece_model.proto)
  if model_type == 1:
    vocab = [(p.piece, p.score) for p in proto.pieces]
  elif model_type == 2:  # a dict asks SpmConverter for BPE, merges ranked by piece score
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
  else:
    raise BertjaxError(
      f"the sentencepiece model is of type {model_type}, neither unigram nor bpe; "
      "export a tokenizer trained with data.tokenizer_model=unigram or bpe"
    )
  fast = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab)
  if fast is None:
    raise RuntimeError("transformers' SpmConverter built no tokenizer from the sentencepiece model")
  return fast


def fast_tokenizer(tokenizer: Tokenizer) -> tokenizers.Tokenizer:
  """A `tokenizers.Tokenizer` that encodes like `tokenizer` and adds BERT's special tokens.

  `encode(text, add_special_tokens=False).ids` equals `tokenizer.encode(text)`; with special
  tokens, single texts become `[CLS] A [SEP]` and pairs `[CLS] A [SEP] B [SEP]`, type ids 0/1.
  """
  if tokenizer.kind == "sentencepiece":
    fast = _spm_fast_tokenizer(tokenizer.serialized_model)
  else:
    fast = tokenizers.Tokenizer.from_str(tokenizer.serialized_model.decode("utf-8"))
    if tokenizer.lowercase:  # lower-cased in Python by bertjax: make it part of the pipeline
      steps = [normalizers.Lowercase()] + ([fast.normalizer] if fast.normalizer is not None else [])
      fast.normalizer = normalizers.Sequence(steps)
  fast.no_truncation()
  fast.no_padding()
  # Already in the vocabulary: marking them special keeps their ids, makes them atomic in text
  # (as in BertTokenizer) and lets decode(skip_special_tokens=True) drop them.
  fast.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
  cls, sep = "[CLS]", "[SEP]"
  fast.post_processor = processors.TemplateProcessing(
    single=f"{cls}:0 $A:0 {sep}:0",
    pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
    special_tokens=[(cls, tokenizer.cls_id), (sep, tokenizer.sep_id)],
  )
  return fast


def _is_wordpiece(fast: tokenizers.Tokenizer) -> bool:
  return json.loads(fast.to_str())["model"]["type"] == "WordPiece"


def _lowercases(fast: tokenizers.Tokenizer) -> bool:
  """Whether the pipeline lower-cases (for BertTokenizer's do_lower_case flag)."""

  def walk(spec):
    if not spec:
      return False
    if spec.get("type") == "Lowercase" or (spec.get("type") == "BertNormalizer" and spec.get("lowercase")):
      return True
    return any(walk(s) for s in spec.get("normalizers", []))

  return walk(json.loads(fast.to_str()).get("normalizer"))


def save_for_transformers(tokenizer: Tokenizer, directory, model_max_length: int) -> list[str]:
  """Write `tokenizer` for transformers into `directory`; returns the file names written.

  Args:
    tokenizer: a bertjax Tokenizer (WordPiece or SentencePiece).
    directory: the folder to write into (created if absent); existing files of the same names
      are overwritten.
    model_max_length: the longest input in tokens (the model's `max_position_embeddings`).
  Returns:
    The file names written, sorted.
  """
  directory = epath.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  fast = fast_tokenizer(tokenizer)
  files = {"tokenizer.json": fast.to_str(pretty=True)}
  special_tokens = dict(zip(_SPECIAL_ATTRIBUTES, SPECIAL_TOKENS))
  config = {
    **special_tokens,
    "model_max_length": model_max_length,
    "model_input_names": _MODEL_INPUT_NAMES,
    "padding_side": "right",
    "clean_up_tokenization_spaces": False,
  }
  if tokenizer.kind == "sentencepiece":
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    (directory / tokenizer_lib.SPM_FILE).write_bytes(tokenizer.serialized_model)
  elif _is_wordpiece(fast):
    config.update(tokenizer_class="BertTokenizer", do_lower_case=_lowercases(fast))
    vocab = fast.get_vocab(with_added_tokens=False)
    files["vocab.txt"] = "".join(piece + "\n" for piece, _ in sorted(vocab.items(), key=lambda kv: kv[1]))
  else:  # some other tokenizers model imported from a tokenizer.json: the generic fast class runs it
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
  files["tokenizer_config.json"] = json.dumps(config, indent=2) + "\n"
  files["special_tokens_map.json"] = json.dumps(special_tokens, indent=2) + "\n"
  for name, text in files.items():
    (directory / name).write_text(text)
  return sorted([*files, *([tokenizer_lib.SPM_FILE] if tokenizer.kind == "sentencepiece" else [])])


def has_tokenizer(directory) -> bool:
  """Whether `directory` holds a tokenizer `load_from_transformers` reads (spm.model, tokenizer.json, vocab.txt)."""
  directory = epath.Path(directory)
  return any((directory / name).exists() for name in (tokenizer_lib.SPM_FILE, "tokenizer.json", "vocab.txt"))


def load_from_transformers(directory) -> Tokenizer:
  """The tokenizer of a transformers folder (or of a bertjax export) as a bertjax Tokenizer."""
  directory = epath.Path(directory)
  if (directory / tokenizer_lib.SPM_FILE).exists():
    return tokenizer_lib.load_tokenizer(directory / tokenizer_lib.SPM_FILE)
  if (directory / "tokenizer.json").exists():
    source = directory / "tokenizer.json"
    try:
      fast = tokenizers.Tokenizer.from_str(source.read_text())
    except Exception as e:  # tokenizers raises its own exception types on bad JSON
      raise BertjaxError(
        f"{source} is not a tokenizers JSON file ({e}); give the folder's original "
        "tokenizer.json or delete it to use vocab.txt"
      ) from e
    # The stored pipeline is kept as is, but saved padding or truncation would change encode().
    fast.no_truncation()
    fast.no_padding()
    if not _is_wordpiece(fast):
      log.warning("%s is not a WordPiece model: whole-word masking will treat every piece as a word", source)
    return Tokenizer("wordpiece", fast.to_str().encode("utf-8"), source=str(source))
  if (directory / "vocab.txt").exists():
    lowercase = None
    config_file = directory / "tokenizer_config.json"
    if config_file.exists():
      lowercase = json.loads(config_file.read_text()).get("do_lower_case")
    return tokenizer_lib.from_vocab_txt(directory / "vocab.txt", lowercase)
  raise BertjaxError(
    f"transformers folder {directory} holds no vocab.txt, tokenizer.json or spm.model; copy the "
    "checkpoint's tokenizer files into that folder"
  )
