"""Two 'nodes' on this machine (two launcher processes, one rank each, rendezvousing on localhost) train the
tiny recipe unchanged, under torchrun and under the deepspeed launcher (--no_ssh, --node_rank)."""

import json
import select
import subprocess
import sys

import pytest
from launch import REPO, env

from gpt2_scale.distributed import free_port

RECIPE_ARGS = ["--model", "gpt2-tiny", "--max-steps", "2", "--micro-batch", "2", "--seq-len", "32", "--total-batch-tokens", "128",
               "--log.sample_every=0", "--log.val_every=0", "--log.tensorboard=false", "--engine.device=cpu"]


def _launch(commands: list[list[str]]) -> None:
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for cmd in commands]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]


def _check_run(run_dir) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["finished"] and summary["step"] == 1
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert any('"train_loss"' in line for line in lines)


def test_torchrun_two_nodes(tmp_path):
    port = free_port()
    _launch([[sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(i),
              "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "multinode-test",
              "recipes/tiny.py", *RECIPE_ARGS, "--run-dir", str(tmp_path / "run")] for i in range(2)])
    _check_run(tmp_path / "run")


def test_deepspeed_launcher_two_nodes(tmp_path):
    pytest.importorskip("deepspeed")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")  # names are never contacted with --no_ssh
    port = free_port()
    _launch([[sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(i),
              "--master_addr", "127.0.0.1", "--master_port", str(port),
              "recipes/tiny.py", *RECIPE_ARGS, "--engine", "zero2", "--run-dir", str(tmp_path / "run")] for i in range(2)])
    _check_run(tmp_path / "run")


WAIT_FOR_PEERS = """
import sys
from gpt2_scale import distributed
distributed.JOIN_NOTICE_S = 0.5
distributed.init("cpu")
"""


def test_a_rank_whose_peers_never_start_says_what_it_waits_for(tmp_path):
    """RANK and WORLD_SIZE left set in a shell, or a node that was never started: joining the group waits for its
    timeout (30 minutes) in silence otherwise. Without MASTER_ADDR/MASTER_PORT it cannot join at all: one line."""
    alone = {k: v for k, v in env().items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "recipes/tiny.py", "--engine.device=cpu"], cwd=REPO, env={**alone, "RANK": "0", "WORLD_SIZE": "2"},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: cannot join the process group as rank 0 of 2 ("), proc.stderr
    assert "unset RANK and WORLD_SIZE to run one process" in proc.stderr and "Traceback" not in proc.stderr
    port = free_port()
    waiting = subprocess.Popen([sys.executable, "-c", WAIT_FOR_PEERS], cwd=REPO, stderr=subprocess.PIPE, text=True,
                               env={**alone, "RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    try:
        ready, _, _ = select.select([waiting.stderr], [], [], 60)
        line = waiting.stderr.readline() if ready else "(nothing in 60 s)"
    finally:
        waiting.kill()
        waiting.wait()
    assert line.startswith(f"rank 0: still waiting after 0.5 s for the other ranks of 2 to join at 127.0.0.1:{port}: start them"), line
