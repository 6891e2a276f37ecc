"""`bertjax data prepare` and `data.source=prepared:DIR`; one build of the per-run cache per host."""

import subprocess
import sys
import textwrap

from tests.support.corpora import numbered_documents, write_bert_text

_BUILD_ONCE = """
import sys, time
from pathlib import Path
from bertjax.data import token_store
from bertjax.data.corpus import Corpus
from bertjax.data.tokenizer import load_tokenizer

corpus_glob, tokenizer, cache, log, go = sys.argv[1:]
build = token_store._build
def counted(*args):
  with open(log, "a") as f:
    f.write("built\\n")
  time.sleep(1.0)  # long enough for the other process to find the lock taken
  return build(*args)
token_store._build = counted
while not Path(go).exists():
  time.sleep(0.01)
store = token_store.open_token_store(Corpus(corpus_glob), load_tokenizer(tokenizer), cache, 1)
print(store.meta["documents"])
"""


def test_two_processes_opening_one_cache_at_once_build_it_once(tmp_path, micro_tokenizer):
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  write_bert_text(corpus / "part-0.txt", numbered_documents(60))
  micro_tokenizer.save(corpus / "tokenizer")
  script = tmp_path / "open.py"
  script.write_text(textwrap.dedent(_BUILD_ONCE))
  args = [
    f"files:{corpus}/part-*",
    str(corpus / "tokenizer"),
    str(tmp_path / "cache"),
    str(tmp_path / "log"),
    str(tmp_path / "go"),
  ]
  procs = [
    subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for _ in range(2)
  ]
  (tmp_path / "go").touch()
  outs = [p.communicate(timeout=120)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outs
  assert [o.strip().splitlines()[-1] for o in outs] == ["60", "60"]
  assert (tmp_path / "log").read_text() == "built\n"
