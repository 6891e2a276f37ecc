"""Tokenizers: sentencepiece models bertjax trains, and WordPiece vocabularies it imports.

One `Tokenizer` class hides which library is underneath. Everything downstream reads the special
token ids from it (a sentencepiece model bertjax trains has [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4;
bert-base-uncased's vocab.txt has 0/100/101/102/103), never from constants.
"""

import hashlib
import io
import json
import logging
import os

import numpy as np
import sentencepiece as spm
import tokenizers
from etils import epath

from bertjax import atomic
from bertjax.errors import BertjaxError

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
SPM_FILE = "spm.model"
INFO_FILE = "tokenizer_info.json"
_WORD_START = "\u2581"  # sentencepiece's word-boundary marker

log = logging.getLogger(__name__)


class Tokenizer:
  """A sentencepiece- or WordPiece-backed tokenizer with BERT's five special tokens."""

  def __init__(self, kind: str, data: bytes, lowercase: bool = False, source: str = "<memory>"):
    # `data` is the whole model (spm proto, or a tokenizers JSON) so the object pickles cheaply
    # into `datasets.map` workers and its fingerprint is a hash of exactly what encodes.
    self.kind = kind
    self._data = data
    self._lowercase = lowercase
    self._source = source
    self._build()

  def _build(self):
    if self.kind == "sentencepiece":
      self._sp = spm.SentencePieceProcessor(model_proto=self._data)
      size = self._sp.get_piece_size()
      self._pieces = [self._sp.id_to_piece(i) for i in range(size)]
    elif self.kind == "wordpiece":
      self._tk = tokenizers.Tokenizer.from_str(self._data.decode("utf-8"))
      size = self._tk.get_vocab_size(with_added_tokens=True)
      vocab = self._tk.get_vocab(with_added_tokens=True)
      self._pieces = [""] * size
      for piece, i in vocab.items():
        self._pieces[i] = piece
    else:
      raise ValueError(f"unknown tokenizer kind {self.kind!r}")
    self._index = {p: i for i, p in enumerate(self._pieces)}
    missing = [t for t in SPECIAL_TOKENS if t not in self._index]
    if missing:
      raise BertjaxError(
        f"tokenizer {self._source} lacks the special tokens {' '.join(missing)}: "
        "use a BERT vocabulary with [PAD] [UNK] [CLS] [SEP] [MASK], or let bertjax train one "
        "(data.tokenizer='')"
      )
    self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (self._index[t] for t in SPECIAL_TOKENS)
    self.fingerprint = hashlib.sha256(self.kind.encode() + self._data).hexdigest()[:16]

  def __getstate__(self):
    return {"kind": self.kind, "data": self._data, "lowercase": self._lowercase, "source": self._source}

  def __setstate__(self, state):
    self.kind, self._data = state["kind"], state["data"]
    self._lowercase, self._source = state["lowercase"], state["source"]
    self._build()

  def __repr__(self):
    return f"Tokenizer({self.kind}, vocab={self.vocab_size}, fingerprint={self.fingerprint})"

  @property
  def vocab_size(self) -> int:
    return len(self._pieces)

  @property
  def special_ids(self) -> np.ndarray:
    return np.array([self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id], np.int32)

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without special tokens."""
    return self.encode_batch([text])[0]

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    if self.kind == "sentencepiece":
      return self._sp.encode(list(texts), out_type=int)
    if self._lowercase:
      texts = [t.lower() for t in texts]
    return [e.ids for e in self._tk.encode_batch(list(texts), add_special_tokens=False)]

  def encode_with_offsets(self, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """Token ids of each text, as `encode_batch` gives them, with each token's (start, end)
    character span in the original text, leading whitespace excluded (extractive QA maps a
    predicted span of tokens back to the characters of its context with them).

    A token that covers no character (a lone word-start marker) gets the empty span at the
    position of the next character.
    """
    if self.kind == "sentencepiece":
      return [self._spm_offsets(text) for text in texts]
    lowered = [self._lowered_with_map(t) for t in texts] if self._lowercase else [(t, None) for t in texts]
    encodings = self._tk.encode_batch([t for t, _ in lowered], add_special_tokens=False)
    out = []
    for text, (_, to_original), e in zip(texts, lowered, encodings):
      spans = [(s, t) if to_original is None else (int(to_original[s]), int(to_original[t])) for s, t in e.offsets]
      out.append((list(e.ids), [_strip_leading_space(text, s, t) for s, t in spans]))
    return out

  def _spm_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    try:
      proto = self._sp.encode(text, return_type="proto")
    except TypeError:  # sentencepiece before 0.2.1 names it out_type
      proto = self._sp.encode(text, out_type="immutable_proto")
    # sentencepiece reports UTF-8 byte offsets into the original (unnormalised) text.
    char_at_byte = np.zeros(len(text.encode("utf-8")) + 1, np.int64)
    position = 0
    for i, ch in enumerate(text):
      width = len(ch.encode("utf-8"))
      char_at_byte[position : position + width] = i
      position += width
    char_at_byte[position] = len(text)
    ids = [p.id for p in proto.pieces]
    spans = [_strip_leading_space(text, int(char_at_byte[p.begin]), int(char_at_byte[p.end])) for p in proto.pieces]
    return ids, spans

  @staticmethod
  def _lowered_with_map(text: str) -> tuple[str, np.ndarray]:
    # str.lower() may lengthen a character ('İ' -> 'i̇'): keep where each lowered one came from.
    pieces = [ch.lower() for ch in text]
    to_original = np.repeat(np.arange(len(text)), [len(p) for p in pieces]) if pieces else np.zeros(0, np.int64)
    return "".join(pieces), np.append(to_original, len(text))

  def decode(self, ids) -> str:
    ids = [int(i) for i in ids]
    if self.kind == "sentencepiece":
      return self._sp.decode(ids)
    return self._tk.decode(ids, skip_special_tokens=False)

  def id_to_piece(self, i: int) -> str:
    return self._pieces[int(i)]

  def word_start_mask(self) -> np.ndarray:
    """bool [vocab]: True where a piece begins a word (whole-word masking groups the rest onto it).

    sentencepiece marks word starts with '▁'; WordPiece marks continuations with '##'. Special
    tokens count as word starts so that no word ever spans one.
    """
    if self.kind == "sentencepiece":
      starts = np.array([p.startswith(_WORD_START) for p in self._pieces])
    else:
      starts = np.array([not p.startswith("##") for p in self._pieces])
    starts[self.special_ids] = True
    starts[[i for i, p in enumerate(self._pieces) if p.startswith("<") and p.endswith(">")]] = True
    return starts

  @property
  def lowercase(self) -> bool:
    """Whether `encode` lower-cases text before the model sees it (WordPiece wrappers only; a
    sentencepiece model folds case in its own normaliser, and a tokenizer.json in its normalizer)."""
    return self._lowercase

  @property
  def serialized_model(self) -> bytes:
    """Exactly what encodes: the sentencepiece ModelProto bytes, or the tokenizers JSON (UTF-8).
    Export (bertjax.hf.tokenizer) converts it for transformers."""
    return self._data

  def save(self, directory) -> epath.Path:
    """Writes the tokenizer's files into `directory` (spm.model, or tokenizer.json + vocab.txt)."""
    directory = epath.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if self.kind == "sentencepiece":
      (directory / SPM_FILE).write_bytes(self._data)
    else:
      (directory / "tokenizer.json").write_bytes(self._data)
      (directory / "vocab.txt").write_text("".join(p + "\n" for p in self._pieces))
    info = {
      "kind": self.kind,
      "fingerprint": self.fingerprint,
      "vocab_size": self.vocab_size,
      "lowercase": self._lowercase,
      "special_ids": dict(zip(SPECIAL_TOKENS, self.special_ids.tolist())),
    }
    (directory / INFO_FILE).write_text(json.dumps(info, indent=1) + "\n")
    return directory


def load_tokenizer(path) -> Tokenizer:
  """Loads a tokenizer: a folder holding spm.model / tokenizer.json / vocab.txt, or such a file."""
  path = epath.Path(path)
  if not path.exists():
    raise BertjaxError(
      f"tokenizer {path} does not exist: set data.tokenizer to a tokenizer folder "
      "or file, or leave it empty to train one"
    )
  lowercase = None
  if path.is_dir():
    info = path / INFO_FILE
    if info.exists():
      lowercase = json.loads(info.read_text()).get("lowercase")
    for name in (SPM_FILE, "tokenizer.json", "vocab.txt"):
      if (path / name).exists():
        path = path / name
        break
    else:
      models = sorted(path.glob("*.model"))
      if not models:
        raise BertjaxError(
          f"tokenizer folder {path} holds no spm.model, tokenizer.json or "
          "vocab.txt: point data.tokenizer at a tokenizer bertjax or "
          "transformers saved"
        )
      path = models[0]
  name = path.name
  if name.endswith(".model"):
    data = path.read_bytes()
    try:
      spm.SentencePieceProcessor(model_proto=data)
    except Exception as e:  # sentencepiece raises RuntimeError / OSError on junk
      raise BertjaxError(f"tokenizer {path} is not a sentencepiece model ({e}): give a valid .model file") from e
    return Tokenizer("sentencepiece", data, source=str(path))
  if name.endswith(".json"):
    text = path.read_text()
    try:
      tokenizers.Tokenizer.from_str(text)
    except Exception as e:
      raise BertjaxError(
        f"tokenizer {path} is not a tokenizers JSON file ({e}): give a transformers tokenizer.json"
      ) from e
    return Tokenizer("wordpiece", text.encode("utf-8"), lowercase=False, source=str(path))
  if name.endswith(".txt"):
    return _from_vocab_txt(path, lowercase)
  raise BertjaxError(f"tokenizer {path} is neither a .model, a tokenizer.json nor a vocab.txt: give one of those")


def from_vocab_txt(path, lowercase: bool | None = None) -> Tokenizer:
  """A BERT vocab.txt as a WordPiece tokenizer; `lowercase=None` guesses from the vocabulary
  (transformers folders say it in tokenizer_config.json's do_lower_case)."""
  return _from_vocab_txt(epath.Path(path), lowercase)


def _from_vocab_txt(path: epath.Path, lowercase: bool | None) -> Tokenizer:
  """Wraps a BERT vocab.txt in a tokenizers WordPiece pipeline, as transformers' BertTokenizer."""
  words = [w.rstrip("\r") for w in path.read_text().split("\n")]
  while words and not words[-1]:
    words.pop()
  if lowercase is None:
    # An uncased vocabulary has no upper-case word pieces besides the bracketed specials.
    lowercase = not any(any(c.isupper() for c in w) for w in words if not (w.startswith("[") and w.endswith("]")))
  model = tokenizers.models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]")
  tk = tokenizers.Tokenizer(model)
  tk.normalizer = tokenizers.normalizers.BertNormalizer(
    clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase
  )
  tk.pre_tokenizer = tokenizers.pre_tokenizers.BertPreTokenizer()
  tk.decoder = tokenizers.decoders.WordPiece(prefix="##")
  return Tokenizer("wordpiece", tk.to_str().encode("utf-8"), lowercase=False, source=str(path))


def check_vocab_size(tokenizer: Tokenizer, model_vocab_size: int) -> None:
  """Refuses a tokenizer whose vocabulary differs from the model's embedding rows (unpadded)."""
  if tokenizer.vocab_size != model_vocab_size:
    raise BertjaxError(
      f"tokenizer {tokenizer.fingerprint} has {tokenizer.vocab_size} pieces but the model "
      f"expects {model_vocab_size}: set data.vocab_size={tokenizer.vocab_size} or use the "
      "tokenizer the model was trained with"
    )


def sample_sentences(corpus, limit: int, seed: int) -> list[str]:
  """At most `limit` sentences of `corpus`, a uniform sample (reservoir), deterministic in `seed`."""
  rng = np.random.Generator(np.random.Philox(np.random.SeedSequence([seed, 0x70CE])))
  reservoir: list[str] = []
  seen = 0
  for doc in corpus.documents():
    for sentence in doc:
      seen += 1
      if len(reservoir) < limit:
        reservoir.append(sentence)
      else:
        j = int(rng.integers(seen))
        if j < limit:
          reservoir[j] = sentence
  return reservoir


def train_tokenizer(config, out_dir) -> Tokenizer:
  """Trains a sentencepiece model on the configured corpus and saves it into `out_dir`."""
  from bertjax.data.corpus import load_corpus  # corpus imports nothing from here; keep it lazy

  d = config.data
  sentences = sample_sentences(load_corpus(config), int(d.tokenizer_sentences), config.train.seed)
  if not sentences:
    raise BertjaxError(f"corpus {d.source} has no sentences to train a tokenizer on: point data.source at some text")
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences),
      model_writer=model,
      vocab_size=int(d.vocab_size),
      model_type=d.tokenizer_model,
      pad_id=0,
      unk_id=1,
      bos_id=-1,
      eos_id=-1,
      pad_piece="[PAD]",
      unk_piece="[UNK]",
      control_symbols=["[CLS]", "[SEP]", "[MASK]"],
      normalization_rule_name="nmt_nfkc_cf" if d.lowercase else "nmt_nfkc",
      input_sentence_size=len(sentences),
      shuffle_input_sentence=False,
      max_sentence_length=1 << 16,
      num_threads=os.cpu_count() or 1,
      minloglevel=2,
    )
  except RuntimeError as e:
    raise BertjaxError(
      f"sentencepiece could not train {d.vocab_size} pieces on {d.source} "
      f"({str(e).splitlines()[0]}): lower data.vocab_size or give more text"
    ) from e
  tokenizer = Tokenizer("sentencepiece", model.getvalue(), source=f"trained on {d.source}")
  tokenizer.save(out_dir)
  log.info("trained %s on %d sentences", tokenizer, len(sentences))
  return tokenizer


def tokenizer_for_run(config, workdir) -> Tokenizer:
  """The run's tokenizer: data.tokenizer if set (copied into WORKDIR/tokenizer), else the one in
  WORKDIR/tokenizer, trained there on first use and reused afterwards. A corpus of
  `data.source=prepared:DIR` brings its own, DIR/tokenizer, which is copied in the same way.

  Several processes may call this at once on a shared workdir: each writes a complete folder
  under a temporary name and renames it into place; the first rename wins and every process
  then reads that one, so all of them use the same tokenizer.

  Raises:
    BertjaxError: data.tokenizer (or a prepared corpus's tokenizer) differs from the one in
      WORKDIR/tokenizer, or from the one the prepared corpus was made with; a prepared DIR is
      missing or unfinished.
  """
  wanted, named = _prepared_tokenizer(config), f"data.tokenizer={config.data.tokenizer}"
  if wanted:
    named = f"the tokenizer of {config.data.source}"
  wanted = wanted or config.data.tokenizer
  target = epath.Path(workdir) / "tokenizer"
  if (target / INFO_FILE).exists():
    existing = load_tokenizer(target)
    if wanted and load_tokenizer(wanted).fingerprint != existing.fingerprint:
      raise BertjaxError(
        f"{named} differs from the tokenizer in {target} this workdir was trained with: use that one or a new workdir"
      )
    return existing
  with atomic.staged_folder(target, replace=False) as staging:  # another process may win: use theirs
    if wanted:
      load_tokenizer(wanted).save(staging)
    else:
      train_tokenizer(config, staging)
  log.info("the run's tokenizer is in %s", target)
  return load_tokenizer(target)


def _prepared_tokenizer(config) -> str:
  """DIR/tokenizer for `data.source=prepared:DIR` (checked against data.tokenizer), else ''."""
  from bertjax.data import corpus, prepared  # corpus imports nothing from here; keep it lazy

  kind, directory = corpus.parse_source(config.data.source)
  if kind != "prepared":
    return ""
  made_with = prepared.read_manifest(directory)["tokenizer"]
  if config.data.tokenizer and load_tokenizer(config.data.tokenizer).fingerprint != made_with:
    raise BertjaxError(
      f"data.tokenizer={config.data.tokenizer} is not the tokenizer {config.data.source} was made with "
      f"({made_with}): leave data.tokenizer empty to use {directory}/{prepared.TOKENIZER_DIR}, or prepare the "
      "corpus again with this one"
    )
  return str(epath.Path(directory) / prepared.TOKENIZER_DIR)


def _strip_leading_space(text: str, start: int, end: int) -> tuple[int, int]:
  """(start, end) without the whitespace a word-start piece carries in front of it."""
  while start < end and text[start].isspace():
    start += 1
  return start, end
