"""`bertjax data prepare` and `data.source=prepared:DIR`: shards that do not depend on the number of processes and
equal the per-run cache, resume, refusals, the same batches as the cache, gs:// both ways, one cache build per host."""

import json
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
from etils import epath

from bertjax.data import prepare as prepare_lib
from bertjax.data import prepared as prepared_lib
from bertjax.data import token_store
from bertjax.data.cached import CachedPipeline
from bertjax.data.corpus import Corpus
from bertjax.data.tokenizer import load_tokenizer, tokenizer_for_run, train_tokenizer
from bertjax.errors import BertjaxError
from tests.support.corpora import data_config, numbered_documents, write_bert_text
from tests.support.runs import launch, train_args, train_losses

SHARD_MB = 0.002  # about 2 KB of text a shard: the small files are cut into byte ranges


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, micro_tokenizer):
  """Two .txt files and a .jsonl (documents 0-59) with what a reader must survive at a cut: runs of blank
  lines, whitespace-only lines, undecodable bytes; and the micro tokenizer saved as a folder."""
  root = tmp_path_factory.mktemp("prepare-corpus")
  docs = numbered_documents(60, seed=3)
  write_bert_text(root / "part-0.txt", docs[:25])
  (root / "part-1.jsonl").write_text("".join(json.dumps({"text": "\n".join(d)}) + "\n" for d in docs[25:40]))
  text = "\n\n \n\t\n".join("\n".join(d) for d in docs[40:])
  (root / "part-2.txt").write_bytes(b"\n\n" + text.encode().replace(b"says", b"s\xffys", 3) + b"\n\n\n")
  micro_tokenizer.save(root / "tokenizer")
  return root


def _config(corpus, source=None, **data):
  data.setdefault("tokenizer", str(corpus / "tokenizer"))
  return data_config(source or f"files:{corpus}/part-*", corpus / "cache", **data)


def _arrays(store):
  return (
    np.asarray(store.tokens[np.arange(len(store.tokens))]),
    np.asarray(store.sent_start),
    np.asarray(store.doc_start),
  )


def _open(source, tokenizer, cache):
  return token_store.open_token_store(Corpus(source), tokenizer, cache, 1)


def _shard_bytes(out) -> bytes:
  folder = epath.Path(out) / prepared_lib.SHARDS
  return b"".join((p / n).read_bytes() for p in sorted(folder.glob("[0-9]*[0-9]")) for n in prepared_lib.ARRAYS)


def _job(config, out, n):
  """The n processes of a multi-host job, as threads here: process 0 waits for the others' shards."""
  results, errors = [None] * n, []

  def run(i):
    try:
      results[i] = prepare_lib.prepare(config, out, prepare_lib.Processes(n, i), SHARD_MB)
    except Exception as e:
      errors.append(e)

  threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(60)
  assert not errors, errors
  return results


def test_units_cut_at_document_boundaries_and_give_the_corpus_back(tmp_path):
  docs = numbered_documents(30, seed=5)
  write_bert_text(tmp_path / "a.txt", [[s for d in docs[:10] for s in d]] + docs[10:20])  # a document of many units
  (tmp_path / "a.txt").write_bytes((tmp_path / "a.txt").read_bytes().rstrip(b"\n"))  # and no newline at the end
  (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": "\n".join(d)}) + "\n\n" for d in docs[20:]))
  corpus = Corpus(f"files:{tmp_path}/*")
  whole = list(corpus.documents())
  for shard_bytes in (1, 300, 2000, 1 << 30):
    units = prepare_lib.plan_units(corpus, shard_bytes)
    assert [d for u in units for d in corpus.unit_documents(u)] == whole, shard_bytes
  assert len(units) == 2 and len(prepare_lib.plan_units(corpus, 300)) > 20
  assert prepare_lib.plan_units(corpus, 300)[0]["bytes"] > 3000  # the long document is one unit


@pytest.fixture(scope="module")
def prepared_once(corpus, micro_tokenizer):
  """The corpus prepared by 1 process, by a job of 2, and by 3 local (spawned) processes."""
  config = _config(corpus)
  poll, prepare_lib._POLL_S = prepare_lib._POLL_S, 0.05  # the job's waiting process looks often
  one = prepare_lib.prepare(config, corpus / "one", prepare_lib.Processes(1), SHARD_MB)
  two = _job(config, corpus / "two", 2)
  three = prepare_lib.prepare(config, corpus / "three", prepare_lib.Processes(3), SHARD_MB)
  prepare_lib._POLL_S = poll
  return {"one": one, "two": two, "three": three}


def test_one_two_and_three_processes_make_the_same_shards_as_the_cache(corpus, micro_tokenizer, prepared_once):
  one = prepared_once["one"]
  assert one["shards"] > 6 and one["made"] == one["shards"]  # the files were cut
  units = one["manifest"]["shards"]
  assert {u["unit"]["kind"] for u in units} == {"bytes"}
  names = [u["unit"]["path"].rsplit("/", 1)[1] for u in units]
  assert names == sorted(names) and len(set(names)) == 3  # in corpus order; the .jsonl cut too
  mine = [r["mine"] for r in prepared_once["two"]]
  assert 0 not in mine and sum(mine) == one["shards"]
  assert prepared_once["two"][0]["manifest"] is not None  # process 0 waited and wrote it
  assert _shard_bytes(corpus / "one") == _shard_bytes(corpus / "two") == _shard_bytes(corpus / "three")
  manifests = [(corpus / d / "manifest.json").read_bytes() for d in ("one", "two", "three")]
  assert manifests[0] == manifests[1] == manifests[2]
  assert one["manifest"]["warnings"] == {f"lines with undecodable bytes (replaced by U+FFFD) in {corpus}/part-2.txt": 3}

  cached = _open(f"files:{corpus}/part-*", micro_tokenizer, corpus / "cache")
  store = _open(f"prepared:{corpus}/three", micro_tokenizer, corpus / "cache")
  for got, want in zip(_arrays(store), _arrays(cached)):
    np.testing.assert_array_equal(got, want)
  assert store.meta["documents"] == cached.meta["documents"] == 60
  assert store.meta["warnings"] == cached.meta["warnings"]
  assert store.tokens[int(store.sent_start[7])] == cached.tokens[int(cached.sent_start[7])]
  assert Corpus(f"prepared:{corpus}/three").fingerprint == Corpus(f"files:{corpus}/part-*").fingerprint
  decoded = list(Corpus(f"prepared:{corpus}/three").documents())  # what `data bench` reads of it
  assert [len(d) for d in decoded] == [len(d) for d in Corpus(f"files:{corpus}/part-*").documents()]
  assert decoded[0][0].lower().startswith("doc 0 line 0 says")


def test_training_batches_from_prepared_equal_those_from_the_cache(corpus, micro_tokenizer, prepared_once):
  for extra in ({}, {"pack_pairs": True}):
    cached = CachedPipeline(_config(corpus, **extra), micro_tokenizer)
    from_prepared = CachedPipeline(_config(corpus, f"prepared:{corpus}/two", **extra), micro_tokenizer)
    assert from_prepared.state_for(3) == cached.state_for(3)
    for step in (0, 1, 5, 17):
      want, got = cached.batch(step), from_prepared.batch(step, np.arange(8))
      assert want.keys() == got.keys()
      for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    for want, got in zip(cached.eval_batches(), from_prepared.eval_batches()):
      for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_a_killed_prepare_resumes_with_the_missing_shard_and_a_finished_one_does_nothing(
  corpus, prepared_once, tmp_path
):
  out = tmp_path / "resumed"
  shutil.copytree(corpus / "one", out)
  manifest = (out / "manifest.json").read_bytes()
  (out / "manifest.json").unlink()
  shutil.rmtree(out / "shards" / "000003")
  (out / "shards" / "000005" / "tokens.bin").write_bytes(b"half")  # damaged: its sizes no longer match
  (out / "shards" / ".000004.partial-host-1-abcd").mkdir()  # what a killed writer leaves
  with pytest.raises(BertjaxError, match=r"is unfinished \(no manifest.json\): run bertjax data prepare .* again"):
    prepared_lib.read_manifest(out)
  first = prepare_lib.prepare(_config(corpus), out, prepare_lib.Processes(1), SHARD_MB)
  assert first["made"] == 2 and (out / "manifest.json").read_bytes() == manifest
  assert not list((out / "shards").glob(".*"))
  before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
  again = prepare_lib.prepare(_config(corpus), out, prepare_lib.Processes(2), SHARD_MB * 4)  # the plan stays
  assert again["made"] == 0 and again["manifest"]["fingerprint"] == prepared_once["one"]["manifest"]["fingerprint"]
  assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # nothing written


@pytest.fixture(scope="module")
def other_tokenizer(corpus, tmp_path_factory):
  """A tokenizer folder other than the micro tokenizer (200 pieces)."""
  folder = tmp_path_factory.mktemp("other-tokenizer")
  train_tokenizer(_config(corpus, vocab_size=200), folder)
  return folder


def test_another_tokenizer_or_corpus_is_refused_and_nothing_is_written(
  corpus, micro_tokenizer, prepared_once, other_tokenizer, tmp_path
):
  other = load_tokenizer(other_tokenizer)
  before = _shard_bytes(corpus / "one")
  with pytest.raises(BertjaxError, match=r"--out .*one holds shards of tokenizer .* give another --out"):
    prepare_lib.prepare(_config(corpus, tokenizer=str(other_tokenizer)), corpus / "one")
  with pytest.raises(BertjaxError, match=r"holds shards of another corpus"):
    prepare_lib.prepare(_config(corpus, f"files:{corpus}/part-0.txt"), corpus / "one")
  assert _shard_bytes(corpus / "one") == before
  # training from it: data.tokenizer must be the prepared one, which the run otherwise takes
  config = _config(corpus, f"prepared:{corpus}/one", tokenizer=str(other_tokenizer))
  with pytest.raises(BertjaxError, match=r"data.tokenizer=.* is not the tokenizer prepared:.* was made with"):
    tokenizer_for_run(config, tmp_path / "run")
  config.data.tokenizer = ""
  assert tokenizer_for_run(config, tmp_path / "run").fingerprint == micro_tokenizer.fingerprint
  with pytest.raises(BertjaxError, match=r"was made with tokenizer .*, not this run's"):
    _open(f"prepared:{corpus}/one", other, tmp_path / "cache")


def test_when_process_0_refuses_a_job_the_others_stop_with_its_reason(corpus, prepared_once, other_tokenizer):
  """Process 0 alone checks the tokenizer against the folder; the others would wait for its plan."""
  config = _config(corpus, tokenizer=str(other_tokenizer))
  begun = corpus / "begun"  # a folder whose tokenizer is written, but not its plan yet
  shutil.copytree(corpus / "one" / "tokenizer", begun / "tokenizer")
  errors = {}

  def run(i):
    try:
      prepare_lib.prepare(config, begun, prepare_lib.Processes(2, i), SHARD_MB)
    except BertjaxError as e:
      errors[i] = str(e)

  threads = [threading.Thread(target=run, args=(i,)) for i in (1, 0)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(60)
  assert not any(t.is_alive() for t in threads)
  assert "holds shards of tokenizer" in errors[0]
  assert errors[1] == f"process 0 of this job stopped: {errors[0]}"


def test_missing_unfinished_and_streamed_prepared_sources_are_refused(corpus, tmp_path):
  from bertjax.config import validation

  with pytest.raises(BertjaxError, match=r"prepared:.*/none: no such folder; make it with bertjax data prepare"):
    Corpus(f"prepared:{tmp_path}/none")
  (tmp_path / "half").mkdir()
  with pytest.raises(BertjaxError, match=r"half is unfinished .* run bertjax data prepare --config FILE --out"):
    Corpus(f"prepared:{tmp_path}/half")
  with pytest.raises(BertjaxError, match="config data.streaming=True cannot read a prepared: source"):
    validation.validate(_config(corpus, f"prepared:{tmp_path}/half", streaming=True))
  with pytest.raises(BertjaxError, match="matches no files"):
    prepare_lib.prepare(_config(corpus, f"files:{tmp_path}/no/*.txt"), tmp_path / "out")
  with pytest.raises(BertjaxError, match="is already prepared"):
    prepare_lib.prepare(_config(corpus, f"prepared:{corpus}/one"), tmp_path / "out")
  assert not (tmp_path / "out").exists()


def test_on_gcs_prepare_reads_files_there_writes_shards_there_and_a_run_trains_from_them(
  gcs_bucket, corpus_and_tokenizer, tmp_path
):
  root = corpus_and_tokenizer
  bucket = epath.Path(gcs_bucket)
  (bucket / "corpus" / "corpus.txt").write_bytes((root / "corpus.txt").read_bytes())
  config = data_config(f"files:{gcs_bucket}/corpus/*.txt", tmp_path / "cache", tokenizer=str(root / "tokenizer"))
  result = prepare_lib.prepare(config, f"{gcs_bucket}/prepared", prepare_lib.Processes(1), 0.004)
  assert result["shards"] > 1 and (bucket / "prepared" / "tokenizer" / "spm.model").exists()
  local = data_config(f"files:{root}/corpus.txt", tmp_path / "cache", tokenizer=str(root / "tokenizer"))
  local_result = prepare_lib.prepare(local, tmp_path / "local", prepare_lib.Processes(1), 0.004)
  assert _shard_bytes(f"{gcs_bucket}/prepared") == _shard_bytes(tmp_path / "local")
  assert result["manifest"]["shards"][0]["sha256"] == local_result["manifest"]["shards"][0]["sha256"]

  workdir = tmp_path / "run"
  args = train_args(root, workdir, steps=3) + [
    f"--config.data.source=prepared:{gcs_bucket}/prepared",
    "--config.data.tokenizer=",
    f"--config.data.cache_dir={tmp_path}/run-cache",
  ]
  proc = launch(args, devices=1)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-3000:]
  assert len(train_losses(workdir)) == 3
  copies = sorted((tmp_path / "run-cache" / "prepared" / result["manifest"]["fingerprint"] / "shards").iterdir())
  assert len(copies) == result["shards"]  # the run copied the tokens into its cache, shard by shard
  copies[1].unlink()  # a copy that stopped: the next open copies that shard again
  tokenizer = load_tokenizer(root / "tokenizer")
  store = _open(f"prepared:{gcs_bucket}/prepared", tokenizer, tmp_path / "run-cache")
  assert copies[1].exists()
  for got, want in zip(_arrays(store), _arrays(_open(f"files:{root}/corpus.txt", tokenizer, tmp_path / "cache"))):
    np.testing.assert_array_equal(got, want)


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


def test_two_processes_opening_one_cache_at_once_build_it_once(corpus, tmp_path):
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


def test_the_command_with_two_local_processes_then_again_then_with_another_tokenizer(
  corpus, prepared_once, other_tokenizer, tmp_path
):
  out = tmp_path / "cli"
  args = ["data", "prepare", "--config", "configs/tiny.py", "--out", str(out), "--shard_mb", str(SHARD_MB)]
  args += [f"--config.data.source=files:{corpus}/part-*", f"--config.data.tokenizer={corpus}/tokenizer"]

  def run(*extra):
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    return subprocess.run(
      [sys.executable, "-m", "bertjax", *args, *extra], capture_output=True, text=True, env=env, timeout=120
    )

  first = run("--num_processes", "2")
  assert first.returncode == 0, first.stderr
  shards = prepared_once["one"]["shards"]
  assert first.stdout.startswith(f"{out}: {shards} shards ({shards} made now), 60 documents")
  assert f"--config.data.source=prepared:{out}" in first.stdout
  assert _shard_bytes(out) == _shard_bytes(corpus / "one")
  plan = json.loads((out / "plan.json").read_text())
  assert shlex.split(plan["command"]) == ["bertjax", *args[:6], *args[8:]]  # without --shard_mb: DIR keeps its own
  again = run()
  assert again.returncode == 0 and f"({0} made now)" in again.stdout
  other = run("--config.data.tokenizer=")  # DIR's own tokenizer: fine
  assert other.returncode == 0, other.stderr
  refused = run(f"--config.data.tokenizer={other_tokenizer}")
  assert refused.returncode == 2 and refused.stdout == ""
  assert refused.stderr.count("\n") == 1 and "bertjax: error: --out" in refused.stderr
  assert f"holds shards of tokenizer {prepared_once['one']['manifest']['tokenizer']}" in refused.stderr
