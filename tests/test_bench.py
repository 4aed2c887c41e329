"""tools/bench.py: one row per engine with timings and model states, the seed loop side by side, bad input."""

import os
import subprocess
import sys

import pytest

from gpt2_scale import bench, memory
from gpt2_scale.zoo import ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool(*args):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "tools/bench.py", *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)


def test_bench_rows_for_two_engines_and_the_seed():
    out = _tool("--model", "gpt2-tiny", "--engines", "ddp,zero1", "--micro-batch", "2", "--seq-len", "16", "--accum", "2",
                "--warmup", "1", "--steps", "2", "--compare-seed", "--peak-tflops", "1")
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ") and not line.startswith("| engine")]
    assert [r.split(" | ")[0] for r in rows] == ["| ddp", "| zero1", "| seed"]
    psi = ModelConfig.from_name("gpt2-tiny", pad_vocab=True).num_params()
    ddp = rows[0].split(" | ")
    # one rank, fp32 on CPU: 4Ψ weights, 4Ψ gradients, 8Ψ Adam state, as the accounting says
    assert ddp[-1].rstrip(" |") == f"{memory.expected_state_bytes(psi, 'ddp', 1, bf16=False).total / 2**20:,.1f} MiB"
    assert ddp[8].endswith("%") and float(ddp[5].replace(",", "")) > 0  # MFU against --peak-tflops, ms/step
    assert "ours/seed tokens/s: ddp" in out.stdout


@pytest.mark.parametrize("args, message", [
    (["--engines", "ddp,zero4"], "unknown zero4"),
    (["--model", "gpt2-huge"], "unknown model"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--data", "/nonexistent"], "not a directory"),
    (["--loss-chunk", "-1"], "engine.loss_chunk must be >= 0"),
])
def test_bad_input_is_an_error_with_exit_2(args, message):
    out = _tool(*args)
    assert out.returncode == 2 and out.stderr.startswith("error: ") and message in out.stderr


def test_seq_len_beyond_the_context_is_refused():
    with pytest.raises(ValueError):
        bench.BenchSpec("gpt2-tiny", "ddp", 2, 512).config(1)


def test_loss_chunk_reaches_the_engine_and_names_the_row():
    spec = bench.BenchSpec("gpt2-tiny", "zero3", 2, 16, loss_chunk=8)
    assert spec.config(1).engine.loss_chunk == 8
    result = bench.BenchResult(spec, 1, "cpu", 1.0, 32.0, None, None, {"rss": 0}, None)
    assert bench.row(result)[0] == "zero3 +loss_chunk=8"
    assert bench.with_engine(spec, bench.SEED).loss_chunk == 0  # the seed loop is the plain loss's yardstick
