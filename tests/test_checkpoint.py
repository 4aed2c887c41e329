"""Checkpoint files are trusted only as data: planted pickles, truncated and damaged files are refused by
name, by every program that loads a checkpoint, and writes are durable (fsync before every rename)."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from launch import TINY, run, run_module

from gpt2_scale import checkpoint, fileio
from gpt2_scale.data import default_source, prepare_shards
from gpt2_scale.distributed import DistEnv

ENGINES = ["ddp", "fsdp", "zero1", "zero3"]  # zero2 writes zero1's layout
MARKER = "gpt2-scale-planted-pickle-ran"


class Planted:
    """Unpickling this runs a shell command that leaves a marker file: what an attacker would plant."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A 2-step run of each engine, in one process, with a checkpoint at each step."""
    root = tmp_path_factory.mktemp("ckpt")
    corpus = root / "corpus"
    prepare_shards(default_source(), corpus, workers=1, progress=False)
    out = {}
    for engine in ENGINES:
        args = TINY + ["--data", str(corpus), "--engine", engine, "--max-steps", "2", "--total-batch-tokens", "64",
                       "--log.val_every=0", "--checkpoint.every=1", "--run-dir", str(root / engine)]
        proc = run("recipes/tiny.py", args, launcher="python")
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[engine] = root / engine
    return out


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def newest(run_dir: Path) -> Path:
    return checkpoint.latest(run_dir)


def pickled_files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.suffix == ".pt" or p.name == ".metadata" or p.suffix == ".distcp")


def one_error_line(proc) -> str:
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


@pytest.mark.parametrize("engine", ENGINES)
def test_a_planted_pickle_in_any_checkpoint_file_is_refused(runs, tmp_path, engine):
    files = pickled_files(newest(runs[engine]))
    assert files, "the engine wrote no pickled files"
    for i, file in enumerate(files):
        run_dir = copy_run(runs[engine], tmp_path / f"run{i}")
        target = newest(run_dir) / file.relative_to(newest(runs[engine]))
        marker = tmp_path / f"{MARKER}-{i}"
        if target.suffix == ".pt":
            torch.save({"state": Planted(marker)}, target)
        elif target.suffix == ".distcp":  # a whole DCP checkpoint whose non-tensor item is the planted object
            for f in target.parent.glob("*.distcp"):
                f.unlink()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # no process group: intended
                dcp.save({"x": torch.zeros(2), "step": Planted(marker)}, checkpoint_id=target.parent, no_dist=True)
        else:
            target.write_bytes(pickle.dumps(Planted(marker)))
        with pytest.raises(checkpoint.CheckpointError, match=f"refusing to load {re.escape(str(target))}"):
            checkpoint.load_model(run_dir)
        assert not marker.exists(), f"{target.name}: the planted pickle ran"


def test_every_program_refuses_a_planted_pickle_with_one_line(runs, tmp_path):
    run_dir = copy_run(runs["ddp"], tmp_path / "run")
    marker = tmp_path / MARKER
    target = newest(run_dir) / "model_optim.pt"
    torch.save({"model": Planted(marker)}, target)
    config_before = (run_dir / "config.yaml").read_text()
    procs = {
        "resume": run("recipes/tiny.py", ["--resume", str(run_dir), "--max-steps", "3"], launcher="python"),
        "sample": run_module("gpt2_scale.sample", ["--ckpt", str(run_dir), "--max-new-tokens", "2"]),
        "export": run("tools/export.py", [str(run_dir), "--hf", str(tmp_path / "hf")], launcher="python"),
    }
    for name, proc in procs.items():
        line = one_error_line(proc)
        assert "refusing to load" in line and str(target) in line, (name, line)
    assert not marker.exists()
    assert (run_dir / "config.yaml").read_text() == config_before


@pytest.mark.parametrize("engine", ["ddp", "fsdp", "zero3"])
def test_a_truncated_checkpoint_file_is_named(runs, tmp_path, engine):
    run_dir = copy_run(runs[engine], tmp_path / "run")
    biggest = max((p for p in newest(run_dir).rglob("*") if p.is_file() and p.suffix in (".pt", ".distcp")), key=lambda p: p.stat().st_size)
    with open(biggest, "r+b") as f:
        f.truncate(biggest.stat().st_size // 2)
    with pytest.raises(checkpoint.CheckpointError, match=f"{re.escape(str(biggest))}.*(damaged|truncated)"):
        checkpoint.load_model(run_dir)
    line = one_error_line(run("recipes/tiny.py", ["--resume", str(run_dir), "--max-steps", "3"], launcher="python"))
    assert str(biggest) in line


def test_a_damaged_trainer_state_is_named_and_nothing_is_rewritten(runs, tmp_path):
    run_dir = copy_run(runs["ddp"], tmp_path / "run")
    state = newest(run_dir) / "trainer_rank0.json"
    state.write_text(state.read_text()[:40])
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    line = one_error_line(run("recipes/tiny.py", ["--resume", str(run_dir), "--max-steps", "3"], launcher="python"))
    assert str(state) in line
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before


def test_a_checkpoint_whose_trainer_state_was_a_pickle_still_resumes(runs, tmp_path):
    """Checkpoints written before the trainer state became JSON held numpy's RNG state as an array."""
    import numpy as np

    run_dir = copy_run(runs["ddp"], tmp_path / "run")
    new = newest(run_dir) / "trainer_rank0.json"
    state = json.loads(new.read_text())
    rng = state["rng"]
    rng["torch"] = checkpoint._unb64(rng["torch"]).clone()
    rng["python"] = tuple([rng["python"][0], tuple(rng["python"][1]), rng["python"][2]])
    rng["numpy"] = (rng["numpy"][0], np.asarray(rng["numpy"][1], dtype=np.uint32), *rng["numpy"][2:])
    torch.save(state, new.with_suffix(".pt"))
    new.unlink()
    proc = run("recipes/tiny.py", ["--resume", str(run_dir), "--max-steps", "3"], launcher="python")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout


def test_rng_state_round_trips_through_json():
    import random

    import numpy as np

    torch.manual_seed(3), random.seed(3), np.random.seed(3)
    state = json.loads(json.dumps(checkpoint.rng_state()))
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(4), random.seed(4), np.random.seed(4)
    checkpoint.set_rng_state(state)
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]


class _Engine:
    def save(self, path: Path) -> None:
        (path / "weights.pt").write_bytes(b"weights")


def test_a_checkpoint_is_on_disk_before_latest_names_it(tmp_path, monkeypatch):
    """Every file and directory of a checkpoint is fsync'ed before it is renamed into place, and its parent
    after, and only then does `latest` move: a power loss cannot leave `latest` naming lost data."""
    events: list[tuple[str, str]] = []
    real_fsync, real_rename, real_replace = os.fsync, os.rename, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    monkeypatch.setattr(fileio.os, "fsync", fsync)
    monkeypatch.setattr(fileio.os, "rename", lambda a, b: (events.append(("rename", str(b))), real_rename(a, b))[1])
    monkeypatch.setattr(fileio.os, "replace", lambda a, b: (events.append(("replace", str(b))), real_replace(a, b))[1])
    env = DistEnv(0, 0, 1, torch.device("cpu"))
    final = checkpoint.save(_Engine(), tmp_path, 7, {"model": "gpt2-tiny", "engine": "ddp"}, {"step": 7}, env, keep=2)
    root = checkpoint.checkpoints_root(tmp_path)
    publish = events.index(("rename", str(final)))
    synced_before = {path for kind, path in events[:publish] if kind == "fsync"}
    tmp = root / f".tmp-{final.name}"
    for name in ("weights.pt", "meta.json", "trainer_rank0.json", ""):
        assert str(tmp / name).rstrip("/") in synced_before, name
    moved = events.index(("replace", str(root / checkpoint.LATEST)))
    assert ("fsync", str(root)) in events[publish:moved]  # the rename itself is durable before latest moves
    assert ("fsync", str(root)) in events[moved:]  # and so is latest's
