"""Checkpoint files are trusted only as data: planted pickles, truncated and damaged files are refused by
name, by every program that loads a checkpoint, every byte is checked against the SHA-256 it was written with,
and writes are durable (fsync before every rename)."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from launch import TINY, env, ok, run, run_module, spawned_world

from gpt2_scale import checkpoint, fileio
from gpt2_scale.data import default_source, prepare_shards
from gpt2_scale.distributed import DistEnv, all_ranks
from gpt2_scale.engines import layout
from gpt2_scale.errors import TrainingError

ENGINES = ["ddp", "zero1", "zero3"]  # one layout for all; the torch-native writer, ZeRO's, and a legacy one each
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


def forget_sums(path: Path) -> None:
    """Make checkpoint ``path`` one written before SHA256SUMS, for a test of a check its SHA-256s would pre-empt."""
    (path / checkpoint.SUMS).unlink()
    meta = json.loads((path / "meta.json").read_text())
    del meta[checkpoint.SUMMED]
    (path / "meta.json").write_text(json.dumps(meta))


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
        forget_sums(newest(run_dir))  # or planted to match, as a checkpoint from before them: else they name the file first
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
    with open(newest(run_dir) / checkpoint.SUMS, "a") as sums:  # planted with its SHA-256: only the safe read refuses it
        sums.write(f"{fileio.sha256(target)}  {target.name}\n")
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


@pytest.mark.parametrize("engine", ["ddp", "zero3"])
def test_a_truncated_checkpoint_file_is_named(runs, tmp_path, engine):
    run_dir = copy_run(runs[engine], tmp_path / "run")
    biggest = max((p for p in newest(run_dir).rglob("*") if p.is_file() and p.suffix in (".pt", ".distcp")), key=lambda p: p.stat().st_size)
    with open(biggest, "r+b") as f:
        f.truncate(biggest.stat().st_size // 2)
    with pytest.raises(checkpoint.CheckpointError, match=f"{re.escape(str(biggest))}.*(damaged|truncated)"):
        checkpoint.load_model(run_dir)
    line = one_error_line(run("recipes/tiny.py", ["--resume", str(run_dir), "--max-steps", "3"], launcher="python"))
    assert str(biggest) in line


@pytest.mark.parametrize("lost", [".metadata", "*"])
def test_a_checkpoint_that_lost_its_index_or_weights_is_named_not_taken_for_a_legacy_one(runs, tmp_path, lost):
    run_dir = copy_run(runs["ddp"], tmp_path / "run")
    for file in newest(run_dir).glob(lost):
        if file.name not in ("meta.json", "trainer.json"):
            file.unlink()
    what = ".metadata, DCP's index" if lost == ".metadata" else "its weights"
    with pytest.raises(checkpoint.CheckpointError, match=f"{re.escape(str(newest(run_dir)))} has lost {what}"):
        checkpoint.load_model(run_dir)
    if lost == ".metadata":  # under another engine: not "resume it with --engine ddp", the legacy advice
        line = one_error_line(run("recipes/tiny.py", ["--resume", str(run_dir), "--engine", "fsdp", "--max-steps", "3"], launcher="python"))
        assert f"{newest(run_dir)} has lost .metadata" in line, line


def test_a_step_without_a_checkpoint_lists_the_steps_that_have_one(runs):
    with pytest.raises(checkpoint.CheckpointError, match="has no checkpoint for step 7; it has step_00000001, step_00000002$"):
        checkpoint.load_model(runs["ddp"], step=7)


def test_a_directory_that_is_not_a_run_says_what_it_is(runs, tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match=f"checkpoints is not a run directory .*; the run is {re.escape(str(runs['ddp']))}$"):
        checkpoint.load_model(runs["ddp"] / "checkpoints")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(checkpoint.CheckpointError, match="it is a Hugging Face export: load it as one"):
        checkpoint.load_model(tmp_path)


def test_a_zeroed_checkpoint_file_is_one_line_with_dcps_cause_not_its_traceback(runs, tmp_path):
    run_dir = copy_run(runs["ddp"], tmp_path / "run")
    data = next(newest(run_dir).glob("*.distcp"))
    data.write_bytes(bytes(data.stat().st_size))  # same size: past the truncation check, into DCP's reader
    forget_sums(newest(run_dir))  # else its SHA-256 names it first (test_every_byte_...)
    with pytest.raises(checkpoint.CheckpointError, match=f"cannot load {re.escape(str(newest(run_dir)))}: UnpicklingError") as e:
        checkpoint.load_model(run_dir)
    assert "Traceback" not in str(e.value) and "\n" not in str(e.value), e.value


def test_a_damaged_trainer_state_is_named_and_nothing_is_rewritten(runs, tmp_path):
    run_dir = copy_run(runs["ddp"], tmp_path / "run")
    state = newest(run_dir) / "trainer.json"
    state.write_text(state.read_text()[:40])
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    line = one_error_line(run("recipes/tiny.py", ["--resume", str(run_dir), "--max-steps", "3"], launcher="python"))
    assert str(state) in line
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before


@pytest.mark.parametrize("file,edit", [("trainer.json", {"step": -3}), ("trainer.json", {"step": 0}), ("meta.json", {"config": "x"}),
                                       ("meta.json", {"step": "2"}), ("meta.json", {"model": 5})])
def test_a_checkpoint_whose_step_or_config_is_damaged_is_refused_and_nothing_is_rewritten(runs, tmp_path, file, edit):
    """A step that trainer.json and meta.json do not agree on, or a config that is not one: the run would otherwise
    set aside its metrics and train over its own checkpoints."""
    run_dir = copy_run(runs["ddp"], tmp_path / "run")
    path = newest(run_dir) / file
    path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    forget_sums(newest(run_dir))  # as a buggy writer of a valid checkpoint would leave it
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    line = one_error_line(run("recipes/tiny.py", ["--resume", str(run_dir), "--max-steps", "3"], launcher="python"))
    assert "damaged" in line and str(newest(run_dir)) in line, line
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    if file == "meta.json":  # export, sample and eval read it through load_model
        with pytest.raises(checkpoint.CheckpointError, match=f"{re.escape(str(path))} holds a bad .*: it is damaged"):
            checkpoint.load_model(run_dir)


def flip_a_bit(file: Path) -> bytes:
    """Change one bit of ``file`` as a disk or a copy might (in a JSON file, in its last digit, so it stays
    valid JSON: a bad value, not a parse error); returns the original bytes."""
    data = bytearray(original := file.read_bytes())
    at = max(i for i, c in enumerate(data) if chr(c).isdigit()) if file.suffix == ".json" else len(data) // 2
    data[at] ^= 0x01
    file.write_bytes(data)
    return original


@pytest.mark.parametrize("engine", ENGINES)
def test_every_byte_of_a_checkpoint_is_checked_against_its_sha256(runs, tmp_path, engine):
    """A flipped bit in any file is named: in a tensor's bytes it would otherwise load as another model."""
    run_dir = copy_run(runs[engine], tmp_path / "run")
    path = newest(run_dir)
    sums = checkpoint.read_sums(path)
    assert set(sums) == {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()} - {checkpoint.SUMS}
    if shutil.which("sha256sum"):  # the format a user checks a copy with by hand
        subprocess.run(["sha256sum", "--check", "--quiet", checkpoint.SUMS], cwd=path, check=True)
    for name in sums:
        original = flip_a_bit(path / name)
        with pytest.raises(checkpoint.CheckpointError, match=f"^{re.escape(str(path / name))} does not match its SHA-256 in SHA256SUMS"):
            checkpoint.load_model(run_dir)
        (path / name).write_bytes(original)
    checkpoint.load_model(run_dir)


@pytest.mark.parametrize("edit,error", [
    (lambda text: text.replace("  ", " x", 1), "cannot read .*SHA256SUMS \\(line 1 is not a SHA-256 and a name inside"),
    (lambda text: text + 64 * "0" + "  ../../config.yaml\n", "cannot read .*SHA256SUMS \\(line 5 is not a SHA-256 and a name inside"),
    (lambda text: text + 64 * "0" + "  model_optim.pt\n", "model_optim.pt is missing, though SHA256SUMS lists it: .*damaged"),
    (lambda text: "\n".join(line[::-1] for line in text.splitlines()), "cannot read"),
    (lambda text: "", r"step_00000002/.metadata \(and 3 more\) is not in SHA256SUMS, which lists every file a save writes: .*damaged"),
    (lambda text: text.split("\n", 1)[1], "is not in SHA256SUMS"),  # one file no longer checked
    (lambda text: None, "SHA256SUMS is missing, though meta.json says the checkpoint was saved with it: .*damaged"),
    (lambda text: None, None),  # none, and meta.json without the mark: a checkpoint from before them loads as it did
], ids=["garbled", "outside", "lost-file", "reversed", "emptied", "line-lost", "lost", "before-them"])
def test_a_damaged_list_of_sha256s_is_refused_and_only_a_checkpoint_from_before_them_has_none(runs, tmp_path, edit, error):
    run_dir = copy_run(runs["ddp"], tmp_path / "run")
    sums = newest(run_dir) / checkpoint.SUMS
    if (text := edit(sums.read_text())) is None and error is None:
        forget_sums(newest(run_dir))
        model = checkpoint.load_model(run_dir)
        assert all(torch.equal(w, model.state_dict()[k]) for k, w in checkpoint.load_model(runs["ddp"]).state_dict().items())
        return
    if text is None:
        sums.unlink()
    else:
        sums.write_text(text)
    with pytest.raises(checkpoint.CheckpointError, match=error):
        checkpoint.load_model(run_dir)


def test_a_file_that_cannot_be_read_is_named_not_raised(runs, monkeypatch):
    """An OSError while hashing is a problem like a mismatch: raised on one rank alone, it would leave the others
    waiting in the gather for the rest of the collective timeout."""
    path = newest(runs["ddp"])

    def sha256(file):
        if file.name == "trainer.json":
            raise PermissionError(13, "Permission denied")
        return fileio.sha256(file)

    monkeypatch.setattr(checkpoint, "sha256", sha256)
    with pytest.raises(checkpoint.CheckpointError, match=f"^{re.escape(str(path / 'trainer.json'))} cannot be read \\(Permission denied\\): "
                       "fix its permissions$"):  # not "damaged": its bytes may be fine
        checkpoint.check_sums(path, split=True)


def _verify_on_two_ranks(rank: int, port: int, tmp: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        checkpoint.verify(Path(tmp) / "ckpt", split=True)
        error = None
    except checkpoint.CheckpointError as e:
        error = str(e)
    errors = all_ranks(error)
    if rank == 0:
        torch.save(errors, Path(tmp) / "results.pt")
    dist.destroy_process_group()


def test_ranks_split_the_sha256s_and_all_stop_on_a_file_only_one_read(runs, tmp_path):
    """Each rank reads a share of the files; a damaged one in rank 1's share stops rank 0 too, with the same
    line, before either enters the engine's load."""
    path = shutil.copytree(newest(runs["ddp"]), tmp_path / "ckpt")
    names = sorted(checkpoint.read_sums(path))
    assert "__0_0.distcp" in names[1::2] and "__0_0.distcp" not in names[0::2]
    flip_a_bit(path / "__0_0.distcp")
    errors = spawned_world(_verify_on_two_ranks, 2, tmp_path)
    assert errors[0] == errors[1] and errors[0].startswith(f"{path / '__0_0.distcp'} does not match its SHA-256"), errors


# What a checkpoint of today's engines holds, rewritten in the layout main wrote before (engines/legacy.py): DDP's
# model_optim.pt or DeepSpeed's own files, and per-rank trainer state with the RNG states it carried then.
TO_LEGACY = """
import json, sys
from pathlib import Path
import numpy as np, torch
from gpt2_scale import checkpoint, distributed, engines
from gpt2_scale.config import config_from_yaml_file
from gpt2_scale.train import build_model

run_dir = Path(sys.argv[1])
path, cfg, env = checkpoint.latest(run_dir), config_from_yaml_file(run_dir / "config.yaml"), distributed.init("cpu")
engine = engines.build(cfg, env)
engine.setup(build_model(cfg))
state = checkpoint.load(engine, path)
for f in [*path.glob("*.distcp"), path / ".metadata", path / "trainer.json", path / checkpoint.SUMS]:
    f.unlink()
meta = json.loads((path / "meta.json").read_text())
del meta[checkpoint.SUMMED]
(path / "meta.json").write_text(json.dumps(meta))
if cfg.engine.name == "ddp":
    torch.save({"model": engine.module.state_dict(), "optimizer": engine.optimizer.state_dict()}, path / "model_optim.pt")
else:
    engine.model.save_checkpoint(str(path), tag="engine", save_latest=False)
state["rng"] = {"torch": torch.get_rng_state(), "python": (3, tuple(range(625)), None),
                "numpy": ("MT19937", np.zeros(624, dtype=np.uint32), 0, 0, 0.0)}
torch.save(state, path / "trainer_rank0.pt")  # the oldest form: a pickle with numpy's array, loaded weights-only
engine.close()
distributed.shutdown()
"""


@pytest.mark.parametrize("engine", ["ddp", "zero1"])
def test_a_checkpoint_from_before_the_common_layout_resumes_where_it_was_written(runs, tmp_path, engine):
    run_dir = copy_run(runs[engine], tmp_path / "run")
    proc = subprocess.run([sys.executable, "-c", TO_LEGACY, str(run_dir)], env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    legacy = newest(run_dir)
    assert not layout.is_elastic(legacy)
    exported = checkpoint.load_model(run_dir).state_dict()  # export reads every layout
    for name, w in checkpoint.load_model(runs[engine]).state_dict().items():
        assert torch.equal(exported[name], w), name
    line = one_error_line(run("recipes/tiny.py", ["--resume", str(run_dir), "--engine", "fsdp", "--max-steps", "3"], launcher="python"))
    assert f"--engine {engine} on 1 rank(s)" in line
    proc = run("recipes/tiny.py", ["--resume", str(run_dir), "--max-steps", "3"], launcher="python")
    assert proc.returncode == 0 and "resumed from" in proc.stdout, proc.stderr[-3000:]
    assert layout.is_elastic(newest(run_dir))  # the checkpoint it writes moves anywhere


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
    for name in ("weights.pt", "meta.json", "trainer.json", ""):
        assert str(tmp / name).rstrip("/") in synced_before, name
    moved = events.index(("replace", str(root / checkpoint.LATEST)))
    assert ("fsync", str(root)) in events[publish:moved]  # the rename itself is durable before latest moves
    assert ("fsync", str(root)) in events[moved:]  # and so is latest's


ONE = DistEnv(0, 0, 1, torch.device("cpu"))
META = {"model": "gpt2-tiny", "engine": "ddp"}


def _save(run_dir: Path, step: int, keep: int = 2, engine=None) -> Path:
    return checkpoint.save(engine or _Engine(), run_dir, step, META, {"step": step}, ONE, keep)


def _steps(run_dir: Path) -> list[str]:
    return sorted(p.name for p in checkpoint.checkpoints_root(run_dir).iterdir())


def test_a_save_keeps_itself_and_the_newest_before_it_never_another_attempts_later_step(tmp_path):
    """A kill after step 6 was renamed into place but before `latest` moved leaves step 6 beside latest = step 4; the
    restarted run, preempted at step 5, saves step 5: pruning by name alone deleted step 5 and left latest naming it."""
    for step in (2, 4, 6):
        _save(tmp_path, step)
    root = checkpoint.checkpoints_root(tmp_path)
    (root / checkpoint.LATEST).write_text("step_00000004")  # as the kill left it
    _save(tmp_path, 5, keep=1)
    assert checkpoint.latest(tmp_path) == root / "step_00000005"
    assert _steps(tmp_path) == [checkpoint.LATEST, "step_00000005", "step_00000006"]  # 6 stays until step 6 is saved again
    _save(tmp_path, 6, keep=2)
    assert _steps(tmp_path) == [checkpoint.LATEST, "step_00000005", "step_00000006"]
    assert checkpoint.read_meta(root / "step_00000006")["step"] == 6


def test_a_save_clears_what_killed_saves_left_but_never_a_steps_only_copy(tmp_path):
    _save(tmp_path, 2)
    root = checkpoint.checkpoints_root(tmp_path)
    (root / ".tmp-step_00000003").mkdir()  # a preemption's save killed at the end of its grace period
    (root / ".tmp-step_00000003" / "__0_0.distcp").write_bytes(b"x" * 100)
    shutil.copytree(root / "step_00000002", root / ".step_00000002.old-4242")  # killed after publish_dir's second rename
    shutil.copytree(root / "step_00000002", root / ".step_00000001.old-4242")  # killed between them: step 1's only copy
    _save(tmp_path, 4)
    assert _steps(tmp_path) == [".step_00000001.old-4242", checkpoint.LATEST, "step_00000002", "step_00000004"]


def test_a_checkpoint_that_cannot_be_written_stops_the_run_in_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    class Full:
        def save(self, path: Path) -> None:
            (path / "__0_0.distcp").write_bytes(b"half")
            raise OSError(28, "No space left on device")

    with pytest.raises(TrainingError, match=r"cannot write checkpoint .*step_00000002 \(OSError: \[Errno 28\] No space left on device; "
                       r"[0-9.]+ GiB free on its file system\); free space .*no checkpoint was written yet"):
        _save(tmp_path, 2, engine=Full())
    _save(tmp_path, 4)
    with pytest.raises(TrainingError, match=rf"free space or fix the permissions there, then the last complete checkpoint is "
                       rf"{checkpoint.checkpoints_root(tmp_path) / 'step_00000004'}: continue with --resume {tmp_path}"):
        _save(tmp_path, 6, engine=Full())
    assert _steps(tmp_path) == [checkpoint.LATEST, "step_00000004"]  # nothing half-written stays to fill the disk

    class Bug:
        def save(self, path: Path) -> None:
            raise RuntimeError("Expected all tensors to be on the same device")

    with pytest.raises(RuntimeError, match="Expected all tensors") as raised:  # not the disk's fault: its traceback, as it is
        _save(tmp_path, 8, engine=Bug())
    assert not isinstance(raised.value, TrainingError) and _steps(tmp_path) == [checkpoint.LATEST, "step_00000004"]

    class TorchSave:  # how torch.save's zip writer meets a full disk
        def save(self, path: Path) -> None:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: usage._replace(free=10 << 20))
    with pytest.raises(TrainingError, match=r"cannot write checkpoint .*enforce fail.*; 0\.01 GiB free on its file system"):
        _save(tmp_path, 8, engine=TorchSave())


def test_checkpoints_that_are_a_file_or_cannot_be_read_are_one_line(tmp_path, monkeypatch):
    checkpoint.checkpoints_root(tmp_path).write_text("")
    with pytest.raises(checkpoint.CheckpointError, match="checkpoints, where the run keeps its checkpoints, is a file; move it"):
        checkpoint.latest(tmp_path)

    def unreadable(root):
        raise PermissionError(13, "Permission denied", str(root / checkpoint.LATEST))

    monkeypatch.setattr(checkpoint, "_latest", unreadable)  # root reads anything here
    with pytest.raises(checkpoint.CheckpointError, match=r"cannot read .*checkpoints/latest \(Permission denied\); fix its permissions"):
        checkpoint.latest(tmp_path)


def test_a_checkpoint_its_training_run_removes_while_a_tool_reads_it_is_not_called_damaged(runs, tmp_path):
    """export or sample of a run still training, whose save of a newer checkpoint prunes the one being read."""
    run_dir = copy_run(runs["ddp"], tmp_path / "run")
    path = newest(run_dir)
    shutil.copytree(path, path.with_name("step_00000009"))  # the newer one it saved
    (path.parent / checkpoint.LATEST).write_text("step_00000009")
    meta = checkpoint.read_meta(path)  # read before the prune, as the tool did
    next(path.glob("*.distcp")).unlink()
    with pytest.raises(checkpoint.CheckpointError, match="damaged or altered"):  # nobody trains there: it is damaged
        checkpoint.model_at(path, meta)
    fd, _ = fileio.lock_exclusive(run_dir / fileio.LOCK, 0, "run")  # as the training run holds it
    try:
        with pytest.raises(checkpoint.CheckpointError, match="damaged or altered"):  # still there: damaged all the same
            checkpoint.model_at(path, meta)
        shutil.rmtree(path)  # the prune
        with pytest.raises(checkpoint.CheckpointError, match=f"{path} was removed while it was read: its run is training now .*run this again"):
            checkpoint.model_at(path, meta)
    finally:
        os.close(fd)


def test_a_tools_json_output_is_json_alone(runs, tmp_path):
    """Reading a checkpoint imports DeepSpeed (its pickled globals are allowed by name), whose logger writes to stdout:
    that line goes to stderr, so `eval_hellaswag --json | jq` and `sample > out.txt` hold only their output."""
    from test_hellaswag import write_examples

    data = write_examples(tmp_path / "val.jsonl")
    proc = run_module("gpt2_scale.tools.eval_hellaswag", ["--ckpt", str(runs["ddp"]), "--data", str(data), "--device", "cpu", "--json"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["n"] == 5


def test_export_of_a_damaged_checkpoint_names_the_steps_to_export_instead(runs, tmp_path):
    """For a training run the way on is to resume from an earlier checkpoint; for export it is --step."""
    run_dir = copy_run(runs["ddp"], tmp_path / "run")
    flip_a_bit(newest(run_dir) / "trainer.json")
    line = one_error_line(run("tools/export.py", [str(run_dir), "--hf", str(tmp_path / "hf")], launcher="python"))
    assert line.endswith("does not match its SHA-256 in SHA256SUMS: the checkpoint was damaged or altered after it was written; "
                         "export another step with --step N (complete: 1)"), line
    assert "resume" not in line and not (tmp_path / "hf").exists()
    ok(run("tools/export.py", [str(run_dir), "--hf", str(tmp_path / "hf"), "--step", "1"], launcher="python"))
