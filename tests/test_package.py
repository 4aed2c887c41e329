"""A plain (non-editable) install runs the recipes and tools away from the checkout: the DeepSpeed JSONs are package
data and every tool is an entry point, nothing is found through the source tree."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from launch import TINY, ok

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "gpt2_scale")  # what the build reads: the project, its readme, the package


def can_build_offline() -> str | None:
    """Why pip cannot build the wheel here without the network, or None: no build isolation, so the build backend
    (pyproject's setuptools>=69, with bdist_wheel: its own from 70.1, the wheel package before) must be installed.
    Read from the installed metadata: importing setuptools into pytest's process would meddle with distutils."""
    if importlib.util.find_spec("pip") is None:
        return "pip is not installed"
    try:
        release = tuple(int(part) for part in metadata.version("setuptools").split(".")[:2])
    except (metadata.PackageNotFoundError, ValueError):
        return "setuptools is not installed"
    if release < (69, 0):
        return f"setuptools {metadata.version('setuptools')} < 69"
    if release < (70, 1) and importlib.util.find_spec("wheel") is None:
        return f"setuptools {metadata.version('setuptools')} builds wheels only with the wheel package, not installed"
    return None


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """gpt2-scale built from a copy of its sources (the checkout stays untouched) and installed with pip --target."""
    reason = can_build_offline()
    if reason:
        pytest.skip(f"cannot build the package offline: {reason}")
    root = tmp_path_factory.mktemp("package")
    (root / "src").mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, root / "src" / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(REPO / name, root / "src" / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                           "--disable-pip-version-check", "--quiet", "--target", str(root / "site"), str(root / "src")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root / "site"


def run_outside(site: Path, cwd: Path, *command: str) -> subprocess.CompletedProcess:
    """``command`` in ``cwd`` with the install as the only gpt2_scale on the path (a caller's PYTHONPATH entry that
    holds one, such as the checkout, is dropped; others, such as carried wheels, stay)."""
    kept = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and not (Path(p) / "gpt2_scale").exists()]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), *kept]), "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1", "GPT2_SCALE_CACHE": str(cwd / "cache")}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_the_install_is_the_package_imported_away_from_the_checkout(site, tmp_path):
    where = ok(run_outside(site, tmp_path, sys.executable, "-c", "import gpt2_scale; print(gpt2_scale.__file__)"))
    assert Path(where.strip()).is_relative_to(site), where


def test_a_recipe_trains_zero1_from_the_install_outside_the_checkout(site, tmp_path):
    # The failure: DeepSpeed config .../site-packages/ds_configs/zero1.json does not exist.
    shutil.copy(REPO / "recipes" / "tiny.py", tmp_path / "tiny.py")
    ok(run_outside(site, tmp_path, sys.executable, "tiny.py", "--engine", "zero1", "--max-steps", "2", *TINY,
                   "--total-batch-tokens", "64", "--run-dir", "run"))
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["finished"]
    assert (tmp_path / "run" / "checkpoints" / "step_00000002" / ".metadata").is_file()  # written through DeepSpeed


def test_every_tool_is_an_entry_point_of_the_install(site, tmp_path):
    listing = ok(run_outside(site, tmp_path, sys.executable, "-c", (
        "import json; from importlib.metadata import distribution\n"
        "eps = [ep for ep in distribution('gpt2-scale').entry_points if ep.group == 'console_scripts']\n"
        "assert all(callable(ep.load()) for ep in eps)\n"
        "print(json.dumps({ep.name: ep.value for ep in eps}))")))
    scripts = json.loads(listing)
    for tool in (REPO / "tools").glob("*.py"):  # tools/NAME.py is gpt2-NAME, "_" written "-"
        assert scripts.get(f"gpt2-{tool.stem.replace('_', '-')}") == f"gpt2_scale.tools.{tool.stem}:main", tool.name
    out = ok(run_outside(site, tmp_path, str(site / "bin" / "gpt2-estimate-memory"), "--help"))
    assert out.startswith("usage: gpt2-estimate-memory")
    assert ok(run_outside(site, tmp_path, str(site / "bin" / "gpt2-sample"), "--help")).startswith("usage: gpt2-sample ")
    assert ok(run_outside(site, tmp_path, sys.executable, "-m", "gpt2_scale.sample", "--help")).startswith("usage: python -m gpt2_scale.sample ")
    out = ok(run_outside(site, tmp_path, str(site / "bin" / "gpt2-estimate-memory"), "--model", "gpt2-xl", "--engine", "zero3"))
    assert out.startswith("gpt2-1558m: Ψ = 1,557,686,400 parameters") and "engine zero3" in out
    # The checkout's wrapper runs the installed code too.
    assert "usage:" in ok(run_outside(site, tmp_path, sys.executable, str(REPO / "tools" / "estimate_memory.py"), "--help"))
