"""Preparation: shards equal the tokenized documents, splits, resume after interruption, errors, CLI."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from launch import env

from gpt2_scale import fileio, tokenizer
from gpt2_scale.data import (
    DataError,
    TokenLoader,
    ensure_default_corpus,
    fineweb_edu_source,
    prepare_shards,
    read_manifest,
    text_source,
    tokenize_document,
    verify_shards,
)
from gpt2_scale.data import prepare as prepare_module
from gpt2_scale.data.loader import MANIFEST
from gpt2_scale.tools import prepare_data

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"

WORDS = "the of and to a in is was for that on with as by it he at from his an were are which this be".split()


def documents(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, rng.integers(1, 60))).capitalize() + "." for _ in range(n)]


def expected_tokens(texts: list[str]) -> np.ndarray:
    return np.concatenate([tokenize_document(t) for t in texts])


def read_back(root: Path) -> tuple[dict, dict[str, np.ndarray]]:
    m = read_manifest(root)
    tokens = {}
    for split in ("val", "train"):
        parts = [np.fromfile(root / s["file"], dtype=np.uint16) for s in m["shards"][split]]
        for part, s in zip(parts, m["shards"][split]):
            assert len(part) == s["tokens"] and (part == tokenizer.EOT).sum() == s["documents"]
        tokens[split] = np.concatenate(parts)
    return m, tokens


def write_fineweb_parquet(path: Path, texts: list[str]) -> None:
    """A file in FineWeb-Edu's schema."""
    n = len(texts)
    table = pa.table(
        {
            "text": texts,
            "id": [f"<urn:uuid:{i:08d}>" for i in range(n)],
            "dump": ["CC-MAIN-2024-10"] * n,
            "url": [f"https://example.org/{i}" for i in range(n)],
            "file_path": ["s3://commoncrawl/crawl-data/x.warc.gz"] * n,
            "language": ["en"] * n,
            "language_score": pa.array([0.95] * n, pa.float64()),
            "token_count": pa.array([len(tokenizer.encode(t)) for t in texts], pa.int64()),
            "score": pa.array([3.1] * n, pa.float64()),
            "int_score": pa.array([3] * n, pa.int64()),
        }
    )
    pq.write_table(table, path)


def test_fineweb_edu_parquet_from_dir(tmp_path):
    texts = documents(300)
    (tmp_path / "fw").mkdir()
    write_fineweb_parquet(tmp_path / "fw" / "000_00000.parquet", texts[:200])
    write_fineweb_parquet(tmp_path / "fw" / "001_00000.parquet", texts[200:])
    m = prepare_shards(
        fineweb_edu_source(from_dir=tmp_path / "fw"), tmp_path / "out", shard_tokens=1000, workers=2,
        command="python tools/prepare_data.py fineweb-edu --from-dir fw --out out", progress=False,
    )  # fmt: skip
    m2, tokens = read_back(tmp_path / "out")
    assert m == m2
    everything = expected_tokens(texts)
    assert np.array_equal(np.concatenate([tokens["val"], tokens["train"]]), everything)
    assert len(tokens["val"]) == 1000 and m["shards"]["val"] == [m["shards"]["val"][0]]  # the first shard
    assert all(s["tokens"] == 1000 for s in m["shards"]["train"][:-1])
    assert m["tokens"] == {"val": len(tokens["val"]), "train": len(tokens["train"])}
    assert m["documents"] == 300 and m["source"]["kind"] == "fineweb-edu"
    assert m["tokenizer"] == {"name": "gpt2", "hash": tokenizer.HASH, "vocab_size": 50257}
    assert m["dtype"] == "uint16" and m["command"].startswith("python tools/prepare_data.py fineweb-edu")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        [MANIFEST] + [s["file"] for split in ("val", "train") for s in m["shards"][split]]
    )
    TokenLoader(tmp_path / "out", "train", 4, 64).next_batch()


def test_text_sources_one_document_per_file_or_record(tmp_path):
    texts = documents(7, seed=1)
    (tmp_path / "a.txt").write_text(texts[0])
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"body": t, "n": 1}) + "\n" for t in texts[1:4]) + "\n")
    pq.write_table(pa.table({"body": texts[4:]}), tmp_path / "c.parquet")
    source = text_source([tmp_path / "a.txt", tmp_path / "b.jsonl", tmp_path / "c.parquet"], field="body")
    m = prepare_shards(source, tmp_path / "out", shard_tokens=10_000, workers=1, progress=False)
    _, tokens = read_back(tmp_path / "out")
    assert np.array_equal(np.concatenate([tokens["val"], tokens["train"]]), expected_tokens(texts))
    assert m["documents"] == 7 and len(tokens["val"]) == len(expected_tokens(texts)) // 10  # fits one shard: 10%


@settings(max_examples=25, deadline=None)
@given(
    n_docs=st.integers(1, 40),
    shard_tokens=st.integers(16, 400),
    val_tokens=st.one_of(st.none(), st.integers(1, 300)),
    seed=st.integers(0, 1000),
)
def test_shards_are_the_token_stream_cut_in_order(tmp_path_factory, n_docs, shard_tokens, val_tokens, seed):
    texts = documents(n_docs, seed)
    everything = expected_tokens(texts)
    out = tmp_path_factory.mktemp("p") / "out"
    source = ({"kind": "test", "seed": seed}, iter(texts))
    if val_tokens is not None and val_tokens >= len(everything):
        with pytest.raises(DataError, match="all taken by the validation split; lower --val-tokens"):
            prepare_shards(source, out, shard_tokens, val_tokens, workers=1, progress=False)
        assert not out.exists()  # no re-run of it could finish: nothing is left behind
        return
    m = prepare_shards(source, out, shard_tokens, val_tokens, workers=1, progress=False)
    _, tokens = read_back(out)
    assert np.array_equal(np.concatenate([tokens["val"], tokens["train"]]), everything)
    if val_tokens is not None:
        assert len(tokens["val"]) == val_tokens
    elif len(everything) > shard_tokens:
        assert len(tokens["val"]) == shard_tokens
    else:
        assert len(tokens["val"]) == max(1, len(everything) // 10)
    assert all(s["tokens"] <= shard_tokens for split in m["shards"].values() for s in split)
    assert sum(s["documents"] for split in m["shards"].values() for s in split) == m["documents"] == n_docs


class Interrupted(Exception):
    pass


def interrupted_after(texts: list[str], n: int):
    yield from texts[:n]
    raise Interrupted("the machine went away")


@pytest.mark.parametrize("workers", [1, 2])
def test_interrupted_preparation_resumes_to_the_same_shards(tmp_path, workers):
    texts = documents(120, seed=2)
    reference = prepare_shards(({"kind": "test"}, iter(texts)), tmp_path / "ref", 400, workers=1, progress=False)

    out = tmp_path / "out"
    with pytest.raises(Interrupted):
        prepare_shards(({"kind": "test"}, interrupted_after(texts, 70)), out, 400, workers=workers, progress=False)
    with pytest.raises(DataError, match="did not finish"):  # the loader accepts nothing yet
        TokenLoader(out, "train", 1, 8)
    partial = json.loads((out / MANIFEST).read_text())
    done = [s["file"] for split in partial["shards"].values() for s in split]
    assert done and partial["resume"]["documents"] < 70
    before = {f: ((out / f).read_bytes(), (out / f).stat().st_mtime_ns) for f in done}
    # What a kill during the next write would leave: a temporary file and a shard the manifest does not list.
    (out / "train_000099.bin.tmp").write_bytes(b"\x00" * 10)
    (out / f"train_{len(partial['shards']['train']):06d}.bin").write_bytes(b"\x01" * 10)

    tokenized = []
    real = prepare_module.tokenize_document
    counting = lambda t: tokenized.append(t) or real(t)  # noqa: E731
    prepare_module.tokenize_document = counting
    try:
        resumed = prepare_shards(({"kind": "test"}, iter(texts)), out, 400, workers=1, progress=False)
    finally:
        prepare_module.tokenize_document = real
    assert len(tokenized) <= len(texts) - partial["resume"]["documents"], "finished documents were re-tokenized"
    assert resumed == {**reference, "command": resumed["command"]}
    for f in reference["shards"]["val"] + reference["shards"]["train"]:
        assert (out / f["file"]).read_bytes() == (tmp_path / "ref" / f["file"]).read_bytes()
    for f, (data, mtime) in before.items():
        assert (out / f).read_bytes() == data and (out / f).stat().st_mtime_ns == mtime, f"{f} was rewritten"


def test_small_corpus_resumes_between_its_val_and_train_shards(tmp_path, monkeypatch):
    texts = documents(40, seed=3)
    reference = prepare_shards(({"kind": "test"}, iter(texts)), tmp_path / "ref", 10**6, workers=1, progress=False)
    real = prepare_module.write_atomic

    def disk_full_for_train(path: Path, data: bytes) -> None:
        if path.name.startswith("train_"):
            raise OSError("No space left on device")
        real(path, data)

    monkeypatch.setattr(prepare_module, "write_atomic", disk_full_for_train)
    with pytest.raises(OSError):
        prepare_shards(({"kind": "test"}, iter(texts)), tmp_path / "out", 10**6, workers=1, progress=False)
    monkeypatch.setattr(prepare_module, "write_atomic", real)
    resumed = prepare_shards(({"kind": "test"}, iter(texts)), tmp_path / "out", 10**6, workers=1, progress=False)
    assert resumed == reference
    assert (tmp_path / "out" / "train_000000.bin").read_bytes() == (tmp_path / "ref" / "train_000000.bin").read_bytes()


def test_rerun_of_a_finished_preparation_changes_nothing(tmp_path):
    texts = documents(30)
    m = prepare_shards(({"kind": "test"}, iter(texts)), tmp_path, 300, workers=1, progress=False)
    stamp = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    assert prepare_shards(({"kind": "test"}, iter(texts)), tmp_path, 300, workers=1, progress=False) == m
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == stamp


def test_other_settings_or_foreign_directory_are_refused(tmp_path):
    prepare_shards(({"kind": "test"}, iter(documents(30))), tmp_path / "a", 300, workers=1, progress=False)
    manifest = (tmp_path / "a" / MANIFEST).read_bytes()
    with pytest.raises(DataError, match="other shard_tokens.*choose another --out"):
        prepare_shards(({"kind": "test"}, iter(documents(30))), tmp_path / "a", 500, workers=1, progress=False)
    assert (tmp_path / "a" / MANIFEST).read_bytes() == manifest
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty"):
        prepare_shards(({"kind": "test"}, iter(documents(3))), tmp_path / "b", 300, workers=1, progress=False)
    assert os.listdir(tmp_path / "b") == ["notes.txt"]


def test_bad_sources(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="missing.txt"):
        text_source([tmp_path / "missing.txt"])
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(DataError, match="unsupported file type '.csv'"):
        text_source([tmp_path / "a.csv"])
    (tmp_path / "a.jsonl").write_text('{"content": "hi"}\n')
    with pytest.raises(DataError, match="no 'text' field.*--field"):
        text_source([tmp_path / "a.jsonl"])
    pq.write_table(pa.table({"content": ["hi"]}), tmp_path / "a.parquet")
    with pytest.raises(DataError, match="no 'text' field.*not a file of HuggingFaceFW/fineweb-edu.*prepare_data.py text DIR --field") as e:
        fineweb_edu_source(from_dir=tmp_path)  # the fineweb-edu command has no --field to pass
    assert "; pass --field" not in str(e.value)
    with pytest.raises(DataError, match="--workers must be >= 1"):
        prepare_shards(({"kind": "test"}, iter(["x"])), tmp_path / "w", 100, workers=0)
    assert not (tmp_path / "w").exists()
    monkeypatch.setattr(prepare_module, "_hub_reachable", lambda: False)
    with pytest.raises(ConnectionError, match="--from-dir"):
        fineweb_edu_source("sample-10BT")


def test_unreadable_inputs_name_the_file(tmp_path, monkeypatch):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    (tmp_path / "late.jsonl").write_text('{"text": "fine"}\n{"text": "cut')
    (tmp_path / "junk.parquet").write_bytes(b"not a parquet file at all")
    for name, message in [
        ("latin1.txt", "is not UTF-8 text .*byte 0xe9"),
        ("bad.jsonl", "is not UTF-8 text"),
        ("late.jsonl", ":2 is not valid JSON"),
        ("junk.parquet", "cannot read .*junk.parquet"),
    ]:
        with pytest.raises(DataError, match=message) as info:
            prepare_shards(text_source([tmp_path / name]), tmp_path / f"out-{name}", 100, workers=2, progress=False)
        assert name in str(info.value)
        assert not (tmp_path / f"out-{name}").exists()  # nothing was usable: nothing is left behind


def test_failed_fresh_preparation_never_removes_what_was_there(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    (tmp_path / "mine").mkdir()
    with pytest.raises(DataError, match=f"{empty} holds no text .*1 empty document.*give input that has text"):
        prepare_shards(text_source([empty]), tmp_path / "mine", 100, workers=1, progress=False)
    assert (tmp_path / "mine").is_dir() and not any((tmp_path / "mine").iterdir())  # emptied, not removed
    with pytest.raises(DataError, match="holds no text"):
        prepare_shards(text_source([empty]), tmp_path / "new" / "deeper", 100, workers=1, progress=False)
    assert not (tmp_path / "new").exists()  # every directory this run created is gone
    (tmp_path / "empty.jsonl").write_text("\n")  # no record at all: no text, not a missing field
    with pytest.raises(DataError, match=f"{tmp_path / 'empty.jsonl'} holds no text"):
        prepare_shards(text_source([tmp_path / "empty.jsonl"]), tmp_path / "new", 100, workers=1, progress=False)


def test_failure_after_a_shard_keeps_it_to_resume(tmp_path):
    out = tmp_path / "out"
    (tmp_path / "a.txt").write_text(" ".join(documents(60)))
    (tmp_path / "b.txt").write_bytes(b"\xff\xfe broken")
    with pytest.raises(DataError, match="b.txt is not UTF-8"):
        prepare_shards(text_source([tmp_path / "a.txt", tmp_path / "b.txt"]), out, 100, workers=1, progress=False)
    assert json.loads((out / MANIFEST).read_text())["shards"]["val"]  # the finished shards stay for a re-run


@pytest.mark.parametrize(
    "content, message",
    [
        (b"[]", "damaged: it is not a JSON object"),
        (b'{"format": 1', "is not valid JSON"),
        (b'{"format": 1, "complete": false, "tokenizer": {}}', "damaged: it has no shards"),
        ("drop-resume", "damaged: it has no resume position"),
    ],
)
def test_resume_with_a_corrupt_manifest_is_refused_and_changes_nothing(tmp_path, content, message):
    texts = documents(60)
    with pytest.raises(Interrupted):
        prepare_shards(({"kind": "test"}, interrupted_after(texts, 50)), tmp_path, 300, workers=1, progress=False)
    if content == "drop-resume":
        m = json.loads((tmp_path / MANIFEST).read_text())
        del m["resume"]
        content = json.dumps(m).encode()
    (tmp_path / MANIFEST).write_bytes(content)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(DataError, match=f"{MANIFEST}.*{message}.*delete {tmp_path} and prepare it again"):
        prepare_shards(({"kind": "test"}, iter(texts)), tmp_path, 300, workers=1, progress=False)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@pytest.mark.parametrize("complete", [True, False])
def test_rerun_over_a_truncated_shard_is_refused(tmp_path, complete):
    texts = documents(60)
    source = lambda: ({"kind": "test"}, iter(texts) if complete else interrupted_after(texts, 50))  # noqa: E731
    with pytest.raises(Interrupted) if not complete else contextlib.nullcontext():
        prepare_shards(source(), tmp_path, 300, workers=1, progress=False)
    with open(tmp_path / "val_000000.bin", "r+b") as f:
        f.truncate(599)
    with pytest.raises(DataError, match="val_000000.bin has 599 bytes, not a whole number of 2-byte tokens"):
        prepare_shards(({"kind": "test"}, iter(texts)), tmp_path, 300, workers=1, progress=False)


def test_out_that_is_a_file_or_a_shard_too_big_for_memory(tmp_path, monkeypatch):
    (tmp_path / "f").write_text("mine")
    with pytest.raises(DataError, match="is a file; give a new or empty directory"):
        prepare_shards(({"kind": "test"}, iter(["x"])), tmp_path / "f", 100, workers=1, progress=False)
    assert (tmp_path / "f").read_text() == "mine"
    real_empty = np.empty

    def no_memory(n, *args, **kwargs):  # what numpy does when the allocation fails
        if isinstance(n, int) and n > 10**9:
            raise MemoryError(f"cannot allocate {n} items")
        return real_empty(n, *args, **kwargs)

    monkeypatch.setattr(prepare_module.np, "empty", no_memory)
    with pytest.raises(DataError, match="does not fit in memory; lower --shard-tokens"):
        prepare_shards(({"kind": "test"}, iter(["x"])), tmp_path / "big", 10**12, workers=1, progress=False)
    monkeypatch.setattr(prepare_module.np, "empty", real_empty)
    with pytest.raises(DataError, match="does not fit in memory; lower --shard-tokens"):  # more than numpy indexes: ValueError
        prepare_shards(({"kind": "test"}, iter(["x"])), tmp_path / "big", 10**20, workers=1, progress=False)
    assert not (tmp_path / "big").exists()


def test_ensure_default_corpus_prepares_once(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2_SCALE_CACHE", str(tmp_path))
    out = ensure_default_corpus()
    assert out == tmp_path / "default" and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    m = read_manifest(out)
    assert m["tokens"]["val"] >= 5000 and m["tokens"]["train"] >= 100_000
    stamp = (out / MANIFEST).stat().st_mtime_ns
    assert ensure_default_corpus(tmp_path) == out and (out / MANIFEST).stat().st_mtime_ns == stamp
    TokenLoader(out, "val", 16, 256).next_batch()  # the tiny recipe's shapes fit the validation split
    (out / "train_000000.bin").unlink()
    with pytest.raises(DataError, match="train_000000.bin"):  # reported, never silently replaced
        ensure_default_corpus(tmp_path)


# --- the command line ----------------------------------------------------------------------------


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason="the shared tinyshakespeare corpus is absent")
def test_cli_text_tinyshakespeare(tmp_path):
    out = tmp_path / "ts"
    cmd = [sys.executable, "tools/prepare_data.py", "text", str(SHAKESPEARE), "--out", str(out), "--quiet"]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env())
    assert run.returncode == 0, run.stderr
    m = read_manifest(out)
    assert m["tokens"]["train"] + m["tokens"]["val"] == len(tokenizer.encode(SHAKESPEARE.read_text())) + 1
    assert m["documents"] == 1


def test_cli_errors_exit_2_without_traceback(tmp_path, capsys):
    assert prepare_data.main(["text", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: input file") and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def written(out: Path) -> list[dict]:
    """The train shards the manifest of ``out`` lists (written atomically, so it can be read while a run writes it)."""
    try:
        return json.loads((out / MANIFEST).read_text())["shards"]["train"]
    except FileNotFoundError:
        return []


def test_ctrl_c_stops_every_process_with_one_line_and_keeps_what_was_written(tmp_path):
    """SIGINT to the process group, as Ctrl-C sends it: the tokenizer workers ignore it, the parent says how to go
    on; no traceback from any process."""
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in documents(400, seed=3) * 60))  # ~3M tokens
    out = tmp_path / "out"
    cmd = [sys.executable, "tools/prepare_data.py", "text", str(source), "--out", str(out), "--quiet", "--workers", "2", "--shard-tokens", "5000"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while not written(out) and proc.poll() is None:  # mid-way
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert err.strip() == f"interrupted; what it wrote is kept: run `python tools/prepare_data.py {' '.join(cmd[2:])}` again to go on from there"
    assert not json.loads((out / MANIFEST).read_text())["complete"] and written(out)


def run_cli(*args) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "tools/prepare_data.py", *map(str, args), "--quiet", "--workers", "1"]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env())


def assert_one_error_line(run: subprocess.CompletedProcess, *names: str) -> str:
    """Exit 2 with a single ``error:`` line that names each of ``names``, and no traceback."""
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    assert all(name in lines[0] for name in names), lines[0]
    return lines[0]


def test_cli_empty_text_names_the_file_and_leaves_no_output(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    line = assert_one_error_line(run_cli("text", tmp_path / "empty.txt", "--out", tmp_path / "o"), "empty.txt")
    assert "holds no text" in line and "--val-tokens" not in line
    assert [p.name for p in tmp_path.iterdir()] == ["empty.txt"]


def test_cli_binary_text_and_corrupt_manifest_are_one_line(tmp_path, capsys):
    (tmp_path / "image.txt").write_bytes(bytes(range(256)) * 4)
    assert prepare_data.main(["text", str(tmp_path / "image.txt"), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {tmp_path / 'image.txt'} is not UTF-8 text")
    assert not (tmp_path / "o").exists()
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / MANIFEST).write_text('{"format": 1, "shards": []}')
    assert prepare_data.main(["default", "--out", str(tmp_path / "d"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {tmp_path / 'd' / MANIFEST} is damaged")
    assert (tmp_path / "d" / MANIFEST).read_text() == '{"format": 1, "shards": []}'


def test_cli_default_into_a_directory(tmp_path, capsys):
    assert prepare_data.main(["default", "--out", str(tmp_path / "d"), "--quiet", "--workers", "1"]) == 0
    assert "train and" in capsys.readouterr().out
    assert read_manifest(tmp_path / "d")["source"]["kind"] == "default"


def test_hellaswag_is_fetched_into_the_cache_the_recipes_read(tmp_path, monkeypatch, capsys):
    """`prepare_data.py hellaswag` (and `fineweb-edu`, after its shards) put the eval set where training looks
    when --log.hellaswag_data is unset, so an offline node needs no network; a failed fetch leaves the shards."""
    from test_hellaswag import write_examples

    from gpt2_scale.eval import hellaswag

    (tmp_path / "mirror").mkdir()
    source = write_examples(tmp_path / "mirror" / "hellaswag_val.jsonl")
    monkeypatch.setenv("GPT2_SCALE_CACHE", str(tmp_path / "cache"))
    assert prepare_data.main(["hellaswag", "--url", source.as_uri()]) == 0
    out, err = capsys.readouterr()
    assert "5 validation examples" in out and "holds 5 examples, HellaSwag's validation split 10,042" in err
    assert len(hellaswag.load_examples(None)) == 5  # what train.py reads without --log.hellaswag_data

    (tmp_path / "fw").mkdir()
    write_fineweb_parquet(tmp_path / "fw" / "000_00000.parquet", documents(50))
    monkeypatch.setenv("GPT2_SCALE_CACHE", str(tmp_path / "cache2"))
    monkeypatch.setattr(hellaswag, "VAL_URL", source.as_uri())
    args = ["fineweb-edu", "--from-dir", str(tmp_path / "fw"), "--out", str(tmp_path / "out"), "--quiet", "--shard-tokens", "1000"]
    assert prepare_data.main(args) == 0
    assert (tmp_path / "cache2" / "hellaswag" / "hellaswag_val.jsonl").is_file()

    monkeypatch.setenv("GPT2_SCALE_CACHE", str(tmp_path / "cache3"))
    monkeypatch.setattr(hellaswag, "VAL_URL", (tmp_path / "nowhere.jsonl").as_uri())
    assert prepare_data.main([*args[:3], "--out", str(tmp_path / "out2"), *args[5:]]) == 0
    assert "warning: HellaSwag was not fetched" in capsys.readouterr().err
    TokenLoader(tmp_path / "out2", "train", 2, 64).next_batch()


def test_hellaswag_is_fetched_from_a_file_path_and_a_bad_url_leaves_nothing(tmp_path, capsys):
    """A copy brought from a machine with network is passed by its path; a URL urllib cannot open is one error line,
    with nothing left in the cache directory (torch's downloader makes its file before it opens the URL)."""
    from test_hellaswag import write_examples

    source = write_examples(tmp_path / "hellaswag_val.jsonl")
    assert prepare_data.main(["hellaswag", "--url", str(source), "--out", str(tmp_path / "cache")]) == 0
    assert (tmp_path / "cache" / "hellaswag_val.jsonl").read_bytes() == source.read_bytes()
    capsys.readouterr()
    for url in ("gopher://example.org/hellaswag_val.jsonl", str(tmp_path / "absent.jsonl")):
        assert prepare_data.main(["hellaswag", "--url", url, "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
        assert not any((tmp_path / "bad").glob("*"))  # hidden files too


def test_each_shard_records_its_sha256_and_verify_finds_a_changed_byte(tmp_path, capsys):
    m = prepare_shards(({"kind": "test"}, iter(documents(60))), tmp_path, 300, workers=1, progress=False)
    shards = m["shards"]["val"] + m["shards"]["train"]
    assert [s["sha256"] for s in shards] == [fileio.sha256(tmp_path / s["file"]) for s in shards]
    assert verify_shards(tmp_path, progress=False) == (len(shards), 0)
    assert prepare_data.main(["verify", str(tmp_path), "--quiet"]) == 0
    assert capsys.readouterr().out == f"{tmp_path}: all {len(shards)} shard(s) match the SHA-256 recorded when they were written\n"

    m = json.loads((tmp_path / MANIFEST).read_text())
    m["shards"]["val"][0]["sha256"] = m["shards"]["val"][0]["sha256"].upper()  # a user's tool that writes upper case: still hex
    (tmp_path / MANIFEST).write_text(json.dumps(m))
    assert verify_shards(tmp_path, progress=False) == (len(shards), 0)
    victim = tmp_path / shards[-2]["file"]
    data = bytearray(victim.read_bytes())
    data[7] ^= 1  # one bit, same size: check_shards, which every run does, cannot see it
    victim.write_bytes(bytes(data))
    read_manifest(tmp_path)
    changed = rf"1 of the {len(shards)} shards of .* differ .* \({victim.name}\): .*delete {tmp_path} and prepare it again"
    with pytest.raises(DataError, match=changed):
        verify_shards(tmp_path, progress=False)
    assert prepare_data.main(["verify", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: 1 of the") and victim.name in err


def test_verify_a_preparation_from_before_sha256s_or_one_not_finished(tmp_path, capsys):
    prepare_shards(({"kind": "test"}, iter(documents(60))), tmp_path / "old", 300, workers=1, progress=False)
    m = json.loads((tmp_path / "old" / MANIFEST).read_text())
    for shard in m["shards"]["val"] + m["shards"]["train"]:
        del shard["sha256"]
    (tmp_path / "old" / MANIFEST).write_text(json.dumps(m))
    n = len(m["shards"]["val"] + m["shards"]["train"])
    assert verify_shards(tmp_path / "old", progress=False) == (0, n)
    assert prepare_data.main(["verify", str(tmp_path / "old"), "--quiet"]) == 0
    assert "prepared before SHA-256s were recorded, so only their sizes could be checked" in capsys.readouterr().out
    m["shards"]["train"][0]["sha256"] = "not a digest"
    (tmp_path / "old" / MANIFEST).write_text(json.dumps(m))
    read_manifest(tmp_path / "old")  # training never reads it: no reason to refuse the data
    with pytest.raises(DataError, match=rf"gives {m['shards']['train'][0]['file']} a sha256 that is not 64 hex digits: it was edited"):
        verify_shards(tmp_path / "old", progress=False)

    with pytest.raises(Interrupted):
        prepare_shards(({"kind": "test"}, interrupted_after(documents(60), 50)), tmp_path / "new", 300, workers=1, progress=False)
    assert prepare_data.main(["verify", str(tmp_path / "new"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "match the SHA-256" in out and "the preparation has not finished" in out
    assert prepare_data.main(["verify", str(tmp_path / "none"), "--quiet"]) == 2
    assert "no token shards" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("model: {}\n")
    for path, says in ((tmp_path / "run", "is a training run's directory; pass the directory of its data"),
                        (tmp_path / "run" / "config.yaml", "is a file; pass the directory a preparation wrote (its --out)"),
                        (tmp_path, "holds no manifest.json, so nothing was prepared there; prepare it first, e.g. "
                                   "`python tools/prepare_data.py default --out NEW_DIR`")):
        assert prepare_data.main(["verify", str(path), "--quiet"]) == 2
        assert f"error: no token shards: {path} {says}" in capsys.readouterr().err
    assert prepare_data.main(["fineweb-edu", "--from-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "fw")]) == 2
    assert f"--from-dir {tmp_path / 'nowhere'} is not a directory" in capsys.readouterr().err


def test_a_second_preparation_into_the_same_directory_waits_for_the_first(tmp_path, capsys):
    """Under srun with several tasks, say: the others wait, then find the work done (or resume it, had it failed)."""
    out = tmp_path / "out"
    out.mkdir()
    fd, _ = fileio.lock_exclusive(out / fileio.LOCK, 0, "preparation")  # another process's, as flock sees it
    threading.Timer(0.5, os.close, [fd]).start()  # it ends
    m = prepare_shards(({"kind": "test"}, iter(documents(30))), out, 300, workers=1, progress=False)
    assert f"{out} is in use by another preparation (pid {os.getpid()} on " in capsys.readouterr().out
    assert m["complete"] and fileio.LOCK not in os.listdir(out)  # nothing left behind when it ends
    # a lock file left by a process that died is no lock: the kernel released it with the process
    (out / fileio.LOCK).write_text("pid 4242 on node07, since 2026-11-27 01:02:03\n")
    assert prepare_shards(({"kind": "test"}, iter(documents(30))), out, 300, workers=1, progress=False) == m


def test_a_finished_preparation_in_a_directory_that_cannot_be_locked_is_still_read(tmp_path, monkeypatch):
    m = prepare_shards(({"kind": "test"}, iter(documents(30))), tmp_path, 300, workers=1, progress=False)

    def read_only(*args):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(prepare_module, "lock_exclusive", read_only)  # a read-only mount (root here writes anyway)
    assert prepare_shards(({"kind": "test"}, iter(documents(30))), tmp_path, 300, workers=1, progress=False) == m


def test_a_damaged_cached_hellaswag_is_fetched_again_and_an_explicit_url_replaces_it(tmp_path, monkeypatch, capsys):
    """What reads the cache names the way to mend it; `prepare_data.py hellaswag` mends it (--url always fetches:
    it was ignored once anything was cached)."""
    from test_hellaswag import write_examples

    from gpt2_scale.eval import hellaswag

    monkeypatch.setenv("GPT2_SCALE_CACHE", str(tmp_path / "cache"))
    good = write_examples(tmp_path / "good.jsonl")
    cached = hellaswag.cache_dir() / "hellaswag_val.jsonl"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(good.read_bytes()[:-20])  # cut off, as an interrupted copy by hand
    with pytest.raises(hellaswag.HellaSwagError, match=r"That is the cached copy: `python tools/prepare_data.py hellaswag` fetches it again"):
        hellaswag.load_examples(None)
    monkeypatch.setattr(hellaswag, "VAL_URL", good.as_uri())
    assert prepare_data.main(["hellaswag"]) == 0 and cached.read_bytes() == good.read_bytes()
    assert "; fetching it again" in capsys.readouterr().err
    other = write_examples(tmp_path / "other.jsonl", labels=(1, 2, 3))
    assert prepare_data.main(["hellaswag", "--url", str(other)]) == 0 and cached.read_bytes() == other.read_bytes()
    assert prepare_data.main(["hellaswag", "--url", str(tmp_path / "nowhere.jsonl")]) == 2  # not silently the cached one
    assert cached.read_bytes() == other.read_bytes()


def test_a_cache_or_out_that_is_a_file_is_one_line(tmp_path, monkeypatch, capsys):
    """GPT2_SCALE_CACHE set to a file by mistake: each program that makes the cache says so (a recipe showed a traceback)."""
    afile = tmp_path / "notes.txt"
    afile.write_text("x")
    monkeypatch.setenv("GPT2_SCALE_CACHE", str(afile))
    assert prepare_data.main(["default", "--quiet"]) == 2
    assert capsys.readouterr().err == (f"error: the cache directory {afile} (from $GPT2_SCALE_CACHE) cannot be made: {afile} is a file; "
                                       "set GPT2_SCALE_CACHE to a directory\n")
    assert prepare_data.main(["hellaswag", "--url", str(afile), "--out", str(afile)]) == 2
    assert capsys.readouterr().err == f"error: --out {afile} cannot be made: {afile} is a file; pass a directory to --out\n"
    assert afile.read_text() == "x"
