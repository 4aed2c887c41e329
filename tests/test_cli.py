"""Every recipe and tool answers --help with exit 0, as a new user's first command."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(str(p.relative_to(REPO)) for p in [*REPO.glob("recipes/*.py"), *REPO.glob("tools/*.py")])


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_exits_0(script, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(REPO / script), run_name="__main__")
    assert e.value.code in (0, None), capsys.readouterr()
    out = capsys.readouterr().out
    assert "usage" in out.lower(), out[:500]
    if script.startswith("recipes/"):  # the recipe's own description, then every config field
        doc = runpy.run_path(str(REPO / script))["__doc__"] or ""
        assert doc.split(".")[0].strip()[:40] in " ".join(out.split()), out[:500]
        assert "--engine.activation-checkpointing" in out and "--micro-batch" in out


@pytest.mark.parametrize("argv", [["tools/estimate_memory.py", "--model", "gpt2-xl"], ["tools/compare_baselines.py", "--list"]])
def test_a_tool_whose_reader_left_stops_quietly(argv):
    """`tool | head -1`: the reader closes the pipe early, which is no error of the tool's (it showed a traceback)."""
    import subprocess

    from launch import env

    proc = subprocess.Popen([sys.executable, *argv], cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before the tool writes: its first write finds no reader
    assert proc.wait(timeout=120) == 0
    err = proc.stderr.read().decode()
    assert "Traceback" not in err and "Exception ignored" not in err and "Broken pipe" not in err, err
