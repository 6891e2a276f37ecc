"""The rule-based sentence splitter, and the prose filter for reST-like text.

Rules (documented in docs/data.md): a sentence ends at '.', '!' or '?' (possibly repeated, and
followed by closing quotes or brackets) when whitespace follows and the next word starts with an
upper-case letter, a digit, or an opening quote or bracket, unless the word before the period is a
known abbreviation ("e.g.", "Dr.", "etc."), a single letter (an initial, "J. Smith"), or a number
("3. Items"). Everything else stays inside the sentence. Text is never changed except that runs of
whitespace become one space.
"""

import re

VERSION = "sentences-v1"  # part of every corpus fingerprint: bump when the rules change

_ABBREVIATIONS = frozenset(
  """
e.g i.e etc cf vs viz al mr mrs ms dr prof sr jr st mt no nos fig figs eq eqs vol vols ch sec
approx dept est inc ltd co corp jan feb mar apr jun jul aug sep sept oct nov dec
""".split()
)
_BOUNDARY = re.compile(r"[.!?]+[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")
_SPACES = re.compile(r"\s+")


def split_sentences(paragraph: str) -> list[str]:
  """Splits one paragraph into sentences by the rules above; returns [] for blank text."""
  text = _SPACES.sub(" ", paragraph).strip()
  if not text:
    return []
  out, start = [], 0
  for m in _BOUNDARY.finditer(text):
    before = text[start : m.start()].rsplit(" ", 1)[-1].lstrip("\"'([").lower()
    if text[m.start()] == "." and (before in _ABBREVIATIONS or len(before) == 1 or before.isdigit()):
      continue
    out.append(text[start : m.end()].rstrip())
    start = m.end()
  tail = text[start:].strip()
  if tail:
    out.append(tail)
  return out


def cut_long(sentence: str, limit: int) -> list[str]:
  """Cuts a sentence longer than `limit` characters at spaces (or hard, if it has none)."""
  out = []
  while len(sentence) > limit:
    cut = sentence.rfind(" ", 0, limit)
    cut = cut if cut > 0 else limit
    out.append(sentence[:cut].strip())
    sentence = sentence[cut:].strip()
  if sentence:
    out.append(sentence)
  return out


def prose_paragraphs(text: str) -> list[str]:
  """The prose paragraphs of reST-like documentation (docstrings, pydoc topics).

  Paragraphs are separated by blank lines. An indented paragraph is a literal block (code, a
  grammar, a table) and is dropped, as are doctest lines ('>>>', '...'), underlines ('====') and
  paragraphs with no letters. Lines of a paragraph are joined with spaces.
  """
  out = []
  for block in re.split(r"\n\s*\n", text):
    lines = block.split("\n")
    if not lines or lines[0][:1].isspace():
      continue
    kept = [
      ln.strip()
      for ln in lines
      if not ln.lstrip().startswith((">>>", "... ")) and not re.fullmatch(r"\s*([=\-~*^#+])\1{2,}\s*", ln)
    ]
    joined = " ".join(k for k in kept if k)
    if any(c.isalpha() for c in joined):
      out.append(joined)
  return out
